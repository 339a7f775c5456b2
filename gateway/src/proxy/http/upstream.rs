//! The pooled upstream client of HTTP services: HTTP/1.1 connections to endpoints, kept alive
//! and reused per endpoint, opened like the L4 proxy's (`SO_MARK` before `connect()`, so that
//! connect4/6 never redirect the gateway's own sockets).

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use hyper::Uri;
use hyper_util::{
    client::legacy::Client as LegacyClient,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;

use super::response::ProxyBody;
use crate::proxy::SharedRoutes;

/// Idle upstream connections are closed after this long (below common backend keep-alive
/// timeouts of 60-120 s would be safer still, but the pool retries a request that hits a
/// connection closed while idle).
const POOL_IDLE: Duration = Duration::from_secs(30);
const POOL_MAX_IDLE_PER_ENDPOINT: usize = 64;

pub(super) type Client = LegacyClient<Connector, ProxyBody>;

pub(super) fn client(mark: Option<u32>, routes: SharedRoutes) -> Client {
    LegacyClient::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_MAX_IDLE_PER_ENDPOINT)
        // The gateway sets Host itself (the client's, as evaluated).
        .set_host(false)
        .build(Connector { mark, routes })
}

/// Connects to the endpoint named by the URI's authority (`ip:port`).
#[derive(Clone)]
pub(super) struct Connector {
    mark: Option<u32>,
    /// For the connect timeout, which a reload may change.
    routes: SharedRoutes,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mark = self.mark;
        let timeout = self.routes.load().connect_timeout;
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "endpoint is not ip:port")
                })?;
            let stream = crate::proxy::upstream::connect_one(addr, mark, timeout).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
