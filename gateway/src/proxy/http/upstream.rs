//! The pooled upstream client of HTTP services: HTTP/1.1 connections to endpoints, kept alive
//! and reused per endpoint, opened like the L4 proxy's (`SO_MARK` before `connect()`, so that
//! connect4/6 never redirect the gateway's own sockets). An `https://` URI is an endpoint of a
//! service with `upstream_tls`: the connection is TLS, verified with that service's settings
//! (pooled apart from plaintext ones: the pool keys on scheme and authority).

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
    client::legacy::{
        Client as LegacyClient,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

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

/// An upstream connection: plain, or TLS to a service with `upstream_tls`.
pub(super) enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamIo>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mark = self.mark;
        let routes = self.routes.load_full();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "endpoint is not ip:port")
                })?;
            // TLS settings of the service the endpoint belongs to (an endpoint belongs to
            // exactly one service); never plaintext for an `https` URI.
            let tls = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                let tls = routes
                    .resolve(addr)
                    .and_then(|r| r.service.http.as_ref())
                    .and_then(|h| h.upstream_tls.clone())
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::NotFound,
                            "the endpoint's service has no upstream_tls (config reloaded?)",
                        )
                    })?;
                Some(tls)
            } else {
                None
            };
            let stream =
                crate::proxy::upstream::connect_one(addr, mark, routes.connect_timeout).await?;
            let io = match tls {
                None => UpstreamIo::Plain(stream),
                Some(tls) => UpstreamIo::Tls(Box::new(
                    tls.connect(addr, stream).await.map_err(io::Error::other)?,
                )),
            };
            Ok(TokioIo::new(io))
        })
    }
}
