//! The pooled upstream client of HTTP services: HTTP/1.1 connections to endpoints, kept alive
//! and reused per endpoint, opened like the L4 proxy's (`SO_MARK` before `connect()`, so that
//! connect4/6 never redirect the gateway's own sockets). An endpoint of a service with
//! `upstream_tls` is reached over TLS, verified with that service's settings (pooled apart
//! from plaintext ones: the pool keys on TLS and address).
//!
//! The pool is the gateway's own, over hyper's connection API: a request takes the most recently
//! returned connection of its endpoint that is ready (else opens one), and its connection goes
//! back when the response body has ended, from the body itself. (hyper-util's pooled client did
//! the same with a pool keyed by scheme and authority, hashed three times a request, a checkout
//! future raced against a connect, and a task spawned per request to wait for the connection
//! to be ready again.)

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    Request, Response, StatusCode,
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::client::TlsStream;

use super::response::ProxyBody;
use crate::proxy::SharedRoutes;

/// Idle upstream connections are closed after this long (below common backend keep-alive
/// timeouts of 60-120 s would be safer still, but a request that meets a connection closed
/// while idle is sent again on another one).
const POOL_IDLE: Duration = Duration::from_secs(30);
const POOL_MAX_IDLE_PER_ENDPOINT: usize = 64;

/// TLS or not, and the endpoint.
type Key = (bool, SocketAddr);

/// Why an upstream request failed.
#[derive(Debug)]
pub(super) enum SendError {
    /// Connecting (TCP, TLS) failed: nothing was sent.
    Connect(io::Error),
    /// The exchange failed once connected.
    Request(hyper::Error),
}

pub(super) struct Client {
    connector: Connector,
    pool: Arc<Pool>,
    reaper: AtomicBool,
}

pub(super) fn client(mark: Option<u32>, routes: SharedRoutes) -> Client {
    Client {
        connector: Connector { mark, routes },
        pool: Arc::new(Pool::default()),
        reaper: AtomicBool::new(false),
    }
}

impl Client {
    /// Sends `req` (origin-form URI, `Host` set) to `endpoint`, over TLS if `tls`, on a pooled
    /// connection or a new one. A request that a reused connection could not take (closed while
    /// idle) goes to another connection, as it was never sent.
    pub(super) async fn send(
        &self,
        tls: bool,
        endpoint: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        self.start_reaper();
        let key = (tls, endpoint);
        loop {
            let (mut sender, reused) = match self.pool.checkout(key) {
                Some(sender) => (sender, true),
                // Boxed: connecting (TCP, TLS handshake) is rare and its state large; every
                // request's future (hyper keeps one per connection) need not carry it.
                None => (Box::pin(self.connect(key)).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    // After a switch the connection belongs to the upgrade.
                    let back = (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Return {
                        sender,
                        key,
                        pool: self.pool.clone(),
                    });
                    return Ok(resp.map(|body| PooledBody {
                        body,
                        ended: false,
                        back,
                    }));
                }
                Err(mut err) => match err.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Request(err.into_error())),
                },
            }
        }
    }

    async fn connect(&self, (tls, addr): Key) -> Result<SendRequest<ProxyBody>, SendError> {
        let io = self
            .connector
            .connect(tls, addr)
            .await
            .map_err(SendError::Connect)?;
        let (sender, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(SendError::Request)?;
        tokio::spawn(async move {
            if let Err(err) = conn.with_upgrades().await {
                tracing::debug!(upstream = %addr, error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Closes idle connections past [`POOL_IDLE`] even when no request comes to find them.
    fn start_reaper(&self) {
        if self.reaper.load(Ordering::Relaxed) || self.reaper.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(&self.pool);
        tokio::spawn(reap(pool));
    }
}

async fn reap(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(POOL_IDLE);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        pool.lock().retain(|_, list| {
            list.retain(|idle| idle.usable(now));
            !list.is_empty()
        });
    }
}

/// Connections that are not carrying a request, by endpoint, the most recently returned last.
#[derive(Default)]
struct Pool {
    /// Looked up twice a request: `foldhash`, not std's `SipHash-1-3`.
    idle: Mutex<HashMap<Key, Vec<Idle>, foldhash::quality::RandomState>>,
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.saturating_duration_since(self.since) <= POOL_IDLE
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Vec<Idle>, foldhash::quality::RandomState>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently returned connection to `key` that is ready; closed and expired ones
    /// are dropped on the way, one that is not ready yet (its last exchange still finishing)
    /// stays for a later request.
    fn checkout(&self, key: Key) -> Option<SendRequest<ProxyBody>> {
        let now = Instant::now();
        let mut idle = self.lock();
        let list = idle.get_mut(&key)?;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            if !list[i].usable(now) {
                list.remove(i);
            } else if list[i].sender.is_ready() {
                return Some(list.remove(i).sender);
            }
        }
        None
    }

    fn put(&self, key: Key, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if list.len() >= POOL_MAX_IDLE_PER_ENDPOINT {
            list.remove(0);
        }
        list.push(Idle {
            sender,
            since: Instant::now(),
        });
    }
}

/// Where a connection goes back to.
struct Return {
    sender: SendRequest<ProxyBody>,
    key: Key,
    pool: Arc<Pool>,
}

/// An upstream response body; its connection goes back to the pool when the body is dropped
/// after its end (a body dropped before its end closes the connection instead: the rest of
/// the message was not read).
pub(super) struct PooledBody {
    body: Incoming,
    ended: bool,
    back: Option<Return>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some(back) = self.back.take()
            && (self.ended || self.body.is_end_stream())
        {
            back.pool.put(back.key, back.sender);
        }
    }
}

/// Connects to endpoints: plain, or TLS for a service with `upstream_tls`.
struct Connector {
    mark: Option<u32>,
    /// For the connect timeout and the TLS settings, which a reload may change.
    routes: SharedRoutes,
}

impl Connector {
    async fn connect(&self, tls: bool, addr: SocketAddr) -> io::Result<UpstreamIo> {
        let routes = self.routes.load_full();
        // TLS settings of the service the endpoint belongs to (an endpoint belongs to exactly
        // one service); never plaintext for a TLS endpoint.
        let tls = if tls {
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
            crate::proxy::upstream::connect_one(addr, self.mark, routes.connect_timeout).await?;
        Ok(match tls {
            None => UpstreamIo::Plain(stream),
            Some(tls) => UpstreamIo::Tls(Box::new(
                tls.connect(addr, stream).await.map_err(io::Error::other)?,
            )),
        })
    }
}

/// An upstream connection: plain, or TLS to a service with `upstream_tls`.
enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt as _;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::{
        config::{Config, Origin},
        proxy::Routes,
    };

    /// A backend answering each request head with a two-byte body; `close_after`: it closes
    /// each connection after that many answers. Counts the connections it accepted.
    async fn backend(close_after: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = 0;
                    let mut answered = 0;
                    while answered < close_after {
                        match s.read(&mut buf[have..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => have += n,
                        }
                        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
                        {
                            buf.copy_within(end + 4..have, 0);
                            have -= end + 4;
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                            answered += 1;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn test_client() -> Client {
        let config = Config::parse(
            "node: n\ncgroup: /sys/fs/cgroup/t\nproxy: { listen: \"127.0.0.2:15001\" }\n\
             gateways: [127.0.0.1]\nservices: []\n",
            Origin::Embedded,
        )
        .unwrap();
        client(None, Routes::shared(&config))
    }

    fn get() -> Request<ProxyBody> {
        let mut req = Request::new(super::super::response::full(Bytes::new()));
        *req.uri_mut() = "/x".parse().unwrap();
        req.headers_mut()
            .insert(hyper::header::HOST, "b".parse().unwrap());
        req
    }

    async fn exchange(client: &Client, addr: SocketAddr) -> Bytes {
        let resp = client.send(false, addr, get()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    /// Lets the connections' tasks run (a returned connection is ready once its task has seen
    /// the end of the exchange).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    #[tokio::test]
    async fn connections_are_reused_after_the_body_ends() {
        let (addr, accepted) = backend(usize::MAX).await;
        let client = test_client();
        for _ in 0..5 {
            assert_eq!(exchange(&client, addr).await, "ok");
            settle().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // A body dropped before its end: that connection is not used again.
        let resp = client.send(false, addr, get()).await.unwrap();
        drop(resp);
        settle().await;
        assert_eq!(exchange(&client, addr).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Pooled apart per endpoint.
        let (other, other_accepted) = backend(usize::MAX).await;
        assert_eq!(exchange(&client, other).await, "ok");
        assert_eq!(other_accepted.load(Ordering::SeqCst), 1);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced() {
        // The backend closes every connection after one answer, without saying so.
        let (addr, accepted) = backend(1).await;
        let client = test_client();
        for i in 1..=3 {
            assert_eq!(exchange(&client, addr).await, "ok");
            settle().await;
            assert_eq!(accepted.load(Ordering::SeqCst), i);
        }
        assert!(
            client
                .pool
                .lock()
                .values()
                .flatten()
                .all(|idle| !idle.sender.is_closed())
        );
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let client = test_client();
        assert!(matches!(
            client.send(false, addr, get()).await,
            Err(SendError::Connect(_))
        ));
    }
}
