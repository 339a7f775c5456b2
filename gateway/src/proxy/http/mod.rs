//! HTTP services: every request on a redirected connection is parsed, authenticated, evaluated
//! against the service's policy and logged, then forwarded (exactly as evaluated) over a pooled
//! upstream connection, or refused.
//!
//! ```text
//! accepted ─detect─▶ HTTP/1.1 (hyper, FramingGuard) ─┐
//!                    h2c prior knowledge (hyper)  ───┴▶ per request: id → canonical path → Host
//!   → header checks → strip gateway headers → Authn (bearer → session → anonymous)
//!   → workload (cgroup id / source) → CompiledPolicy::evaluate → refuse | forward (+ assertion)
//! ```
//!
//! Each request re-reads the live route table, so a reloaded policy or a revoked token applies
//! to the next request of an open connection.

pub mod assertion;
pub mod authn;
pub mod framing;
pub mod headers;
mod idle;
mod io;
pub mod login;
pub mod response;
mod upstream;

use std::{
    borrow::Cow,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http::uri::PathAndQuery;
use http_body_util::BodyExt as _;
use hyper::{
    Method, Request, Response, StatusCode, Version,
    body::{Body as _, Incoming},
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::{Notify, watch},
};

pub(in crate::proxy) use self::idle::IdleStream;
pub use self::{
    assertion::AssertionSigner,
    authn::{LoginFlow, SharedAuth},
    login::BrowserLogin,
};
use self::{
    assertion::{AssertedCert, AssertedWorkload, Subject},
    authn::{Authn, LoginRequest},
    framing::{FramingGuard, Refused},
    headers::{
        RequestId, X_NODEGATE_ASSERTION, X_NODEGATE_EMAIL, X_NODEGATE_GROUPS, X_NODEGATE_USER,
        X_REQUEST_ID,
    },
    idle::{Idle, IdleIo, IdleTimer, Rewind},
    response::{ProxyBody, Refusal, accepts_html, refusal},
    upstream::SendError,
};
use super::{OrigDst, Shared, routes::Route, tls::TlsConn};
use crate::{
    auth::Identity,
    config::HttpService,
    ebpf::Mode,
    policy::{CanonicalPath, RequestContext, Verdict},
    telemetry::{
        Decision, RequestLine,
        decision::{IdentityLog, WorkloadLog, clip},
    },
};

/// How long a connection may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After a refused framing or at shutdown: how long in-flight responses may finish.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Bytes read (and dropped) after answering a refused request, so that closing does not reset
/// the connection before the client has read the 400.
const LINGER_DRAIN: usize = 64 * 1024;

/// What the HTTP side of the proxy shares across connections.
pub struct HttpContext {
    pub auth: SharedAuth,
    pub signer: Arc<AssertionSigner>,
    /// The browser-login module, when configured.
    pub login: Option<Arc<dyn LoginFlow>>,
    client: upstream::Client,
}

impl HttpContext {
    pub fn new(
        auth: SharedAuth,
        signer: Arc<AssertionSigner>,
        login: Option<Arc<dyn LoginFlow>>,
        mark: Option<u32>,
        routes: super::SharedRoutes,
    ) -> Self {
        Self {
            auth,
            signer,
            login,
            client: upstream::client(mark, routes),
        }
    }
}

/// The wire protocol of a connection, as detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1.1",
            Self::Http2 => "h2",
        }
    }
}

/// One HTTP connection.
struct Conn {
    shared: Arc<Shared>,
    peer: SocketAddr,
    orig: OrigDst,
    protocol: Protocol,
    /// Set when the gateway terminated TLS for this connection.
    tls: Option<Arc<TlsConn>>,
    /// Requests whose response body hyper still holds.
    in_flight: Arc<AtomicUsize>,
}

impl Conn {
    /// The connection's route in `routes`: the service SNI chose, else the original
    /// destination's.
    fn route(&self, routes: &super::Routes) -> Option<Route> {
        match self.tls.as_ref().and_then(|t| t.service) {
            Some(id) => routes.service_route(id, self.orig.dst.ip().to_canonical().is_ipv6()),
            None => routes.resolve(self.orig.dst).cloned(),
        }
    }
}

/// Counts a response until hyper drops its body (written, or the connection gone).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one redirected connection to an HTTP service until it closes: a TCP stream, or the
/// decrypted stream of a TLS connection the gateway terminated (`tls`). When the proxy starts
/// draining, hyper finishes the requests in flight and closes the connection (idle keep-alive
/// connections at once); at the drain timeout (`abort`) it gets [`CLOSE_GRACE`] more.
#[expect(
    clippy::too_many_arguments,
    reason = "the connection's state, handed over as it is"
)]
pub(super) fn serve<S>(
    stream: S,
    peer: SocketAddr,
    orig: OrigDst,
    protocol: Protocol,
    tls: Option<Arc<TlsConn>>,
    shared: Arc<Shared>,
    mut draining: watch::Receiver<bool>,
    mut abort: watch::Receiver<bool>,
) -> impl Future<Output = ()>
where
    S: IdleStream,
{
    // Not an async fn: its arguments would take room in the connection's task for as long as
    // the connection lives, next to the `Conn` they are moved into.
    let conn = Arc::new(Conn {
        shared,
        peer,
        orig,
        protocol,
        tls,
        in_flight: Arc::new(AtomicUsize::new(0)),
    });
    let service = {
        let conn = conn.clone();
        service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(&conn, req).await) }
        })
    };
    // Draining or aborted: either way hyper is asked to shut down gracefully, and the abort
    // bounds how long that may take.
    let aborted = async move {
        let drain = async { draining.wait_for(|d| *d).await.is_ok() };
        let abort = async { abort.wait_for(|a| *a).await.is_ok() };
        tokio::select! {
            true = drain => {}
            true = abort => {}
            // Both senders gone: nobody will ever stop this connection.
            else => std::future::pending::<()>().await,
        }
    };
    async move {
        let mut aborted = std::pin::pin!(aborted);
        match protocol {
            Protocol::Http2 => {
                // Boxed: h2's connection state would otherwise size every connection's task.
                let mut served = Box::pin(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
                tokio::select! {
                    res = served.as_mut() => log_conn_error(res.err(), &conn),
                    () = aborted.as_mut() => {
                        served.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(CLOSE_GRACE, served).await;
                    }
                }
            }
            Protocol::Http1 => serve_http1(stream, conn, service, aborted).await,
        }
    }
}

/// An HTTP/1.1 connection: hyper serves it while it is busy; once it has waited
/// [`idle::RELEASE_AFTER`] for its next request, hyper's connection (and its buffers) is
/// dropped and the socket alone waits for the next bytes (see [`idle`]).
async fn serve_http1<IO, S>(
    stream: IO,
    conn: Arc<Conn>,
    service: S,
    mut aborted: std::pin::Pin<&mut impl Future<Output = ()>>,
) where
    IO: IdleStream,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Unpin,
    S::Future: Send + 'static,
{
    let mut stream = Rewind::new(stream);
    // The header read deadline carried over to the next hyper connection.
    let mut deadline = None;
    loop {
        // Boxed: its state is the connection's only while hyper serves it.
        let round = Box::pin(serve_hyper(
            stream,
            &conn,
            service.clone(),
            aborted.as_mut(),
            deadline,
        ));
        let (released, since) = match round.await {
            Round::Closed => return,
            Round::Idle(stream, since) => (stream, since),
        };
        stream = released;
        let head_deadline = since + HEADER_READ_TIMEOUT;
        if !stream.has_prefix() {
            enum Woken {
                Readable(std::io::Result<()>),
                Stopped,
                TimedOut,
            }
            let woken = {
                let readable = std::future::poll_fn(|cx| stream.get_ref().poll_readable(cx));
                tokio::select! {
                    biased;
                    res = readable => Woken::Readable(res),
                    () = aborted.as_mut() => Woken::Stopped,
                    () = tokio::time::sleep_until(head_deadline) => Woken::TimedOut,
                }
            };
            match woken {
                Woken::Readable(Ok(())) => {}
                Woken::Readable(Err(err)) => {
                    tracing::debug!(peer = %conn.peer, error = %err, "http connection ended with an error");
                    return;
                }
                // Draining: an idle connection is closed at once, as hyper closes its own.
                Woken::Stopped => {
                    let _ = stream.shutdown().await;
                    return;
                }
                // As hyper's header read timeout: the connection is dropped.
                Woken::TimedOut => {
                    tracing::debug!(peer = %conn.peer, "http connection ended with an error: read header from client timeout");
                    return;
                }
            }
        }
        deadline = Some(head_deadline);
    }
}

/// How one hyper connection of an HTTP/1.1 connection ended.
enum Round<IO> {
    Closed,
    /// Released while idle: the stream, and since when it has waited for the next request.
    Idle(Rewind<IO>, tokio::time::Instant),
}

/// One hyper connection on `stream`, until the connection ends or is idle long enough to be
/// released. `deadline`: the header read deadline of its first request head.
async fn serve_hyper<IO, S>(
    stream: Rewind<IO>,
    conn: &Conn,
    service: S,
    mut aborted: std::pin::Pin<&mut impl Future<Output = ()>>,
    deadline: Option<tokio::time::Instant>,
) -> Round<IO>
where
    IO: IdleStream,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<ProxyBody>,
            Error = std::convert::Infallible,
        > + Unpin,
    S::Future: Send + 'static,
{
    let idle = Arc::new(Idle::new(deadline));
    // Taken back once hyper is dropped, to answer a refused request or to wait idle.
    let (stream, handle) = io::SharedIo::new(stream);
    let slot = Arc::new(RefusedSlot::default());
    let guard = FramingGuard::new(stream, slot.clone());
    // Boxed: hyper's connection state (~4.5 KB) is not part of the connection's task, which
    // outlives it while the connection is idle.
    let mut served = Box::new(
        hyper::server::conn::http1::Builder::new()
            .timer(IdleTimer(idle.clone()))
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(IdleIo::new(guard, idle.clone())), service)
            .with_upgrades(),
    );
    let mut released = std::pin::pin!(idle.released(&conn.in_flight));
    let result = tokio::select! {
        biased;
        res = &mut *served => res.err(),
        () = slot.notify.notified() => {
            // Let the responses already under way finish; hyper reads no further (it would
            // wait forever for the rest of the refused head, so it is dropped once idle).
            std::pin::Pin::new(&mut *served).graceful_shutdown();
            let in_flight = conn.in_flight.clone();
            let idle = async move {
                while in_flight.load(Ordering::Acquire) > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // The last body was handed over; give hyper a moment to flush it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            tokio::select! {
                res = &mut *served => res.err(),
                _ = tokio::time::timeout(CLOSE_GRACE, idle) => None,
            }
        }
        () = aborted.as_mut() => {
            std::pin::Pin::new(&mut *served).graceful_shutdown();
            tokio::time::timeout(CLOSE_GRACE, &mut *served).await.ok().and_then(Result::err)
        }
        since = &mut released, if IO::RELEASE_IDLE => {
            // hyper closes an idle connection at once, writing nothing; the stream is kept.
            // Bounded all the same: were it busy after all, it would finish and close.
            idle.release();
            std::pin::Pin::new(&mut *served).graceful_shutdown();
            match tokio::time::timeout(CLOSE_GRACE, &mut *served).await {
                Ok(Ok(())) => {
                    if let Some(parts) = served.into_parts() {
                        let hyper::server::conn::http1::Parts { io, read_buf, .. } = parts;
                        drop(io);
                        if let Some(mut stream) = io::reclaim(handle) {
                            stream.rewind(read_buf);
                            return Round::Idle(stream, since);
                        }
                    }
                    return Round::Closed;
                }
                Ok(Err(err)) => Some(err),
                Err(_) => None,
            }
        }
    };
    // hyper lets go of the stream.
    drop(served);
    let refused = slot.take();
    match refused {
        Some(refused) => {
            if let Some(stream) = io::reclaim(handle) {
                answer_refused(stream, conn, refused).await;
            }
        }
        None => log_conn_error(result, conn),
    }
    Round::Closed
}

/// The refused request reported by the [`FramingGuard`], and a wake-up for the handler.
#[derive(Default)]
struct RefusedSlot {
    refused: Mutex<Option<Refused>>,
    notify: Notify,
}

impl RefusedSlot {
    fn take(&self) -> Option<Refused> {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl framing::OnRefused for RefusedSlot {
    fn refused(&self, refused: Refused) {
        *self.refused.lock().unwrap_or_else(PoisonError::into_inner) = Some(refused);
        self.notify.notify_one();
    }
}

/// Writes the 400 for a request whose framing was refused, logs it, and closes.
async fn answer_refused<S>(mut stream: S, conn: &Conn, refused: Refused)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let request_id = RequestId::new();
    let reason = refused
        .error
        .map_or("framing_invalid", framing::FramingError::code);
    let mut line = new_line(conn, &request_id);
    line.method = refused.method.as_deref().map(|m| Cow::Owned(clip(m)));
    line.path = refused.target.as_deref().map(clip);
    line.host = refused.host.as_deref().map(clip);
    resolve_service(conn, &mut line);
    line.reason = reason;
    line.status = 400;
    let bytes = response::raw_refusal(
        "Bad request",
        reason,
        request_id.as_str(),
        refused.accept_html,
    );
    answer_and_close(&mut stream, &bytes).await;
    line.latency_us = micros(started);
    line.emit(&conn.shared.metrics);
}

/// Writes `answer` (a whole response) on a connection hyper does not own, and closes it. What
/// the client still sends is read (briefly) first, so that closing does not reset the
/// connection and destroy the answer before it was read.
pub(in crate::proxy) async fn answer_and_close<S>(stream: &mut S, answer: &[u8])
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 16 * 1024];
    let mut left = LINGER_DRAIN;
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

fn log_conn_error(err: Option<hyper::Error>, conn: &Conn) {
    let Some(err) = err else { return };
    if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
        // hyper answered 400/431 itself; the request still gets its line.
        let mut line = new_line(conn, &RequestId::new());
        resolve_service(conn, &mut line);
        line.reason = if err.is_parse_too_large() {
            "http_head_too_large"
        } else {
            "http_invalid_request"
        };
        line.status = if err.is_parse_too_large() { 431 } else { 400 };
        line.emit(&conn.shared.metrics);
    } else {
        tracing::debug!(peer = %conn.peer, error = %err, "http connection ended with an error");
    }
}

fn new_line(conn: &Conn, request_id: &RequestId) -> RequestLine {
    let mut line = RequestLine::new(
        &conn.shared.node,
        *request_id,
        conn.peer,
        conn.protocol.as_str(),
    );
    line.dst = Some(conn.orig.dst);
    line.cgroup_id = Some(conn.orig.cgroup_id);
    line.tls = conn.tls.as_ref().map(|t| t.log.clone());
    line
}

fn resolve_service(conn: &Conn, line: &mut RequestLine) {
    let routes = conn.shared.routes.load();
    if let Some(route) = conn.route(&routes) {
        line.service = Some(route.service.name.clone());
        line.mode = Some(route.service.mode);
    }
}

/// The method for the decision line: a static string for the standard methods (no copy a
/// request), a clipped copy of any other.
fn method_name(method: &Method) -> Cow<'static, str> {
    const STANDARD: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::HEAD, "HEAD"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::CONNECT, "CONNECT"),
        (Method::TRACE, "TRACE"),
    ];
    STANDARD.iter().find(|(m, _)| m == method).map_or_else(
        || Cow::Owned(clip(method.as_str())),
        |&(_, name)| Cow::Borrowed(name),
    )
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One request: decide, answer or forward, log.
async fn handle(conn: &Conn, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let request_id = RequestId::new();
    let mut line = new_line(conn, &request_id);
    line.method = Some(method_name(req.method()));
    let html = req
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| accepts_html(v.as_bytes()));
    let upgrade = conn.protocol == Protocol::Http1 && headers::wants_upgrade(req.headers());
    let in_flight = InFlight::new(&conn.in_flight);
    let mut resp = process(conn, req, &mut line, &request_id, html).await;
    if upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The framing guard stopped following the stream at the upgrade request; without the
        // switch, nothing after it may be parsed as HTTP.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    line.status = resp.status().as_u16();
    line.latency_us = micros(started);
    line.emit(&conn.shared.metrics);
    resp.map(|body| {
        Tracked {
            inner: body,
            _in_flight: in_flight,
        }
        .boxed()
    })
}

/// A response body that counts as in flight until hyper drops it. Size hint and end of stream
/// pass through, so `Content-Length` framing is kept.
struct Tracked {
    inner: ProxyBody,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A refusal answered by the gateway.
fn refuse(
    line: &mut RequestLine,
    status: StatusCode,
    reason: &'static str,
    request_id: &str,
    html: bool,
) -> Response<ProxyBody> {
    line.decision = Decision::Deny;
    line.reason = reason;
    refusal(Refusal {
        status,
        reason,
        request_id,
        html,
    })
}

#[expect(
    clippy::too_many_lines,
    reason = "the request path, step by step in the order it runs"
)]
async fn process(
    conn: &Conn,
    mut req: Request<Incoming>,
    line: &mut RequestLine,
    id: &RequestId,
    html: bool,
) -> Response<ProxyBody> {
    let request_id = id.as_str();
    let routes = conn.shared.routes.load_full();
    let Some(route) = conn.route(&routes) else {
        return refuse(
            line,
            StatusCode::SERVICE_UNAVAILABLE,
            "unknown_destination",
            request_id,
            html,
        );
    };
    let route = &route;
    let service = &route.service;
    line.service = Some(service.name.clone());
    line.mode = Some(service.mode);
    let Some(http) = &service.http else {
        // The service lost its policy in a reload while this connection was open.
        return refuse(
            line,
            StatusCode::SERVICE_UNAVAILABLE,
            "service_not_http",
            request_id,
            html,
        );
    };
    line.policy = Some(service.name.clone());
    line.policy_version = Some(http.policy.version.clone());

    // The path, decoded once; an ambiguous one never reaches policy.
    let whole_uri;
    let target = if let Some(pq) = req.uri().path_and_query() {
        pq.as_str()
    } else {
        whole_uri = req.uri().to_string();
        &whole_uri
    };
    let path = match CanonicalPath::parse(target.as_bytes()) {
        Ok(path) => path,
        Err(err) => {
            line.path = Some(clip(target));
            return refuse(
                line,
                StatusCode::BAD_REQUEST,
                err.reason_code(),
                request_id,
                html,
            );
        }
    };
    line.path = Some(clip(path.as_str()));
    if req.method() == Method::CONNECT {
        return refuse(
            line,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_connect",
            request_id,
            html,
        );
    }

    // Host: the authority of an absolute or HTTP/2 target, else the one Host header.
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return refuse(
            line,
            StatusCode::BAD_REQUEST,
            "header_duplicate_host",
            request_id,
            html,
        );
    }
    // Held (a reference count, not a copy) so that `host` can borrow them while the request's
    // headers are changed below.
    let host_value = req.headers().get(header::HOST).cloned();
    let authority = req.uri().authority().cloned();
    let host_header = match host_value.as_ref().map(HeaderValue::to_str) {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(_)) => {
            return refuse(
                line,
                StatusCode::BAD_REQUEST,
                "header_invalid_host",
                request_id,
                html,
            );
        }
    };
    let host = match (
        authority.as_ref().map(http::uri::Authority::as_str),
        host_header,
    ) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => {
            line.host = Some(clip(h));
            return refuse(
                line,
                StatusCode::BAD_REQUEST,
                "header_host_mismatch",
                request_id,
                html,
            );
        }
        (Some(a), _) => Some(a),
        (None, h) => h,
    };
    line.host = host.map(clip);
    if !http.serves_host(host) {
        return refuse(
            line,
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_served",
            request_id,
            html,
        );
    }
    if req.headers().get_all(header::AUTHORIZATION).iter().count() > 1 {
        return refuse(
            line,
            StatusCode::BAD_REQUEST,
            "header_duplicate_authorization",
            request_id,
            html,
        );
    }
    let stripped = headers::strip_gateway_owned(req.headers_mut());
    if stripped > 0 {
        tracing::debug!(peer = %conn.peer, stripped, "removed gateway-owned headers from a client request");
    }

    let ctx = &conn.shared.http;
    let login = if http.login {
        ctx.login.as_deref()
    } else {
        None
    };
    // On the canonical path: `/%2Enodegate/...` is reserved too, and nothing under the prefix
    // is ever forwarded.
    if path.as_str().starts_with(authn::RESERVED_PREFIX) {
        let target = path.to_origin_form();
        let req = login_request(
            &req,
            &service.name,
            host,
            &target,
            request_id,
            html,
            conn.tls.is_some(),
        );
        // Boxed, like the other rare paths: its state would otherwise be part of every
        // request's future (hyper keeps one per connection).
        return Box::pin(reserved(line, req, login)).await;
    }

    let auth = ctx.auth.load_full();
    let client_cert = conn.tls.as_ref().and_then(|t| t.client_cert());
    let (authn, session_headers) = authn::authenticate(
        &auth,
        login,
        &service.name,
        req.headers(),
        conn.tls.is_some(),
    )
    .await;
    log_identity(line, authn.shared_identity());
    let identity = authn.identity();
    let session_refused = match &authn {
        Authn::Anonymous {
            session_refused: Some(reason),
        } => Some(*reason),
        _ => None,
    };

    let mut resp = async {
        // The workload: a verified ServiceAccount token names it; else the source the kernel saw.
        let kernel_workload = routes
            .workloads
            .lookup(Some(conn.orig.cgroup_id), conn.peer.ip());
        let token_workload = identity.and_then(|i| i.workload.as_ref());
        // Borrowed from the route table or the identity where they hold it already.
        let token_policy_workload;
        let (policy_workload, asserted_workload) = match (token_workload, kernel_workload) {
            (Some(w), k) => {
                line.workload = Some(WorkloadLog {
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    pod: w.pod.clone(),
                    from: "token",
                });
                token_policy_workload = crate::policy::Workload {
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    // Labels are only known for the pod the kernel saw, when it is the same one.
                    labels: k
                        .filter(|k| {
                            k.policy.namespace == w.namespace
                                && k.policy.service_account == w.service_account
                        })
                        .map(|k| k.policy.labels.clone())
                        .unwrap_or_default(),
                };
                let asserted = AssertedWorkload {
                    namespace: &w.namespace,
                    service_account: &w.service_account,
                    pod: w.pod.as_deref(),
                };
                (Some(&token_policy_workload), Some(asserted))
            }
            (None, Some(k)) => {
                line.workload = Some(k.log("source"));
                let asserted = AssertedWorkload {
                    namespace: &k.config.namespace,
                    service_account: &k.config.service_account,
                    pod: k.config.pod.as_deref(),
                };
                (Some(&k.policy), Some(asserted))
            }
            (None, None) => (None, None),
        };

        let policy_identity = authn::policy_identity(identity);
        // One clock read for policy and the assertion.
        let now = now_unix();
        let mut decision = http.policy.compiled.evaluate(&RequestContext {
            identity: policy_identity,
            workload: policy_workload,
            source_ip: Some(conn.peer.ip()),
            spiffe_id: client_cert.and_then(|c| c.spiffe_id.as_deref()),
            method: req.method().as_str(),
            host,
            path: &path,
            now,
        });
        line.rule = decision.rule_id.take();
        line.reason = decision.reason.as_str();
        let denied = match &authn {
            Authn::Refused(err) => {
                line.reason = err.reason();
                line.rule = None;
                Some((StatusCode::UNAUTHORIZED, err.reason()))
            }
            // Denied for lack of an identity, and the session cookie was refused: that is the
            // reason (tampered, expired, signed out), not the policy's no-match.
            _ if decision.verdict == Verdict::Deny && session_refused.is_some() => {
                let reason = session_refused.unwrap_or_default();
                line.reason = reason;
                line.rule = None;
                Some((StatusCode::UNAUTHORIZED, reason))
            }
            _ if decision.verdict == Verdict::Deny => {
                // A verified client certificate is an identity too: 403, not a bearer challenge.
                let status = if identity.is_none() && client_cert.is_none() {
                    StatusCode::UNAUTHORIZED
                } else {
                    StatusCode::FORBIDDEN
                };
                Some((status, decision.reason.as_str()))
            }
            _ => None,
        };
        if let Some((status, reason)) = denied {
            if service.mode == Mode::Enforce {
                line.decision = Decision::Deny;
                if status == StatusCode::UNAUTHORIZED
                    && identity.is_none()
                    && client_cert.is_none()
                    && html
                    && !matches!(authn, Authn::Refused(_))
                    && let Some(login) = login
                {
                    let answer = login
                        .start(login_request(
                            &req,
                            &service.name,
                            host,
                            &path.to_origin_form(),
                            request_id,
                            html,
                            conn.tls.is_some(),
                        ))
                        .await;
                    if !answer.allowed {
                        // The login could not start (host not in login.hosts, provider down).
                        line.reason = answer.reason;
                        line.rule = None;
                    }
                    return answer.response;
                }
                let mut resp = refusal(Refusal {
                    status,
                    reason,
                    request_id,
                    html,
                });
                if let Authn::Refused(_) = authn {
                    resp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(
                            "Bearer realm=\"nodegate\", error=\"invalid_token\"",
                        ),
                    );
                } else if status == StatusCode::UNAUTHORIZED {
                    resp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"nodegate\""),
                    );
                }
                return resp;
            }
            line.decision = Decision::WouldDeny;
        } else {
            line.decision = Decision::Allow;
        }

        let forward = Forward {
            route,
            http,
            path: &path,
            host,
            identity,
            workload: asserted_workload,
            request_id: id,
            now: u64::try_from(now).unwrap_or(0),
        };
        match forward.send(conn, req, line).await {
            Ok(resp) => resp,
            Err(reason) => {
                let decision = line.decision;
                let mut resp = refuse(line, StatusCode::BAD_GATEWAY, reason, request_id, html);
                // The policy decision stands; the upstream failure is in the reason.
                line.decision = if decision == Decision::WouldDeny {
                    decision
                } else {
                    Decision::Deny
                };
                *resp.status_mut() = StatusCode::BAD_GATEWAY;
                resp
            }
        }
    }
    .await;
    // Headers of the login module (a refreshed or cleared session cookie), on any answer.
    let mut last = None;
    for (name, value) in session_headers {
        if let Some(name) = name {
            last = Some(name);
        }
        if let Some(name) = &last {
            resp.headers_mut().append(name, value);
        }
    }
    resp
}

/// What the login seam is told about a request.
fn login_request<'a>(
    req: &'a Request<Incoming>,
    service: &'a str,
    host: Option<&'a str>,
    target: &'a str,
    request_id: &'a str,
    html: bool,
    tls: bool,
) -> LoginRequest<'a> {
    LoginRequest {
        service,
        method: req.method(),
        host,
        target,
        headers: req.headers(),
        request_id,
        html,
        tls,
    }
}

fn log_identity(line: &mut RequestLine, identity: Option<&Arc<Identity>>) {
    if let Some(id) = identity {
        line.identity = IdentityLog(Some(id.clone()));
    }
}

/// A path under [`authn::RESERVED_PREFIX`]: the login module's, or a 404. Never forwarded.
async fn reserved(
    line: &mut RequestLine,
    req: LoginRequest<'_>,
    login: Option<&dyn LoginFlow>,
) -> Response<ProxyBody> {
    let Some(login) = login else {
        return refuse(
            line,
            StatusCode::NOT_FOUND,
            "reserved_path",
            req.request_id,
            req.html,
        );
    };
    let answer = login.reserved(req).await;
    line.decision = if answer.allowed {
        Decision::Allow
    } else {
        Decision::Deny
    };
    line.reason = answer.reason;
    log_identity(line, answer.identity.as_ref());
    answer.response
}

/// An authorized request on its way upstream.
struct Forward<'a> {
    route: &'a Route,
    http: &'a HttpService,
    path: &'a CanonicalPath,
    host: Option<&'a str>,
    identity: Option<&'a Identity>,
    workload: Option<AssertedWorkload<'a>>,
    request_id: &'a RequestId,
    /// Unix seconds, as policy saw them.
    now: u64,
}

impl Forward<'_> {
    async fn send(
        &self,
        conn: &Conn,
        mut req: Request<Incoming>,
        line: &mut RequestLine,
    ) -> Result<Response<ProxyBody>, &'static str> {
        let upgrade = conn.protocol == Protocol::Http1 && headers::wants_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let headers = &mut parts.headers;
        headers::strip_hop_by_hop(headers, upgrade);
        // The gateway's session and login-flow cookies are its credentials, not the backend's
        // (every HTTP service: a service without `login` may share a host with one that has it).
        if let Some(login) = &conn.shared.http.login {
            login.strip_cookies(headers);
        }
        join_cookies(headers);
        // The host as evaluated (the authority of an absolute target wins over `Host`); a
        // `Host` that already says it is left as it is.
        if let Some(host) = self.host
            && headers.get(header::HOST).map(HeaderValue::as_bytes) != Some(host.as_bytes())
            && let Ok(host) = HeaderValue::from_str(host)
        {
            headers.insert(header::HOST, host);
        }
        // One buffer for the request's and the response's copy.
        let request_id =
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(*self.request_id)).ok();
        if let Some(id) = &request_id {
            headers.insert(X_REQUEST_ID, id.clone());
        }
        self.identity_headers(conn, headers);
        let retryable = body.is_end_stream();
        let mut body = Some(body);
        let candidates = self.route.candidates();
        let tls = self.http.upstream_tls.is_some();
        // Built once, for the first attempt: the canonical target, re-encoded.
        let mut target = None;
        let mut last_err = "upstream_unavailable";
        for (i, endpoint) in candidates.iter().enumerate() {
            // A connect failure of a request without a body tries the next endpoint with the
            // same headers; otherwise they are moved into the one attempt.
            let more = retryable && i + 1 < candidates.len();
            let uri = match target.take() {
                Some(uri) => Some(uri),
                None => {
                    PathAndQuery::from_maybe_shared(bytes::Bytes::from(self.path.to_origin_form()))
                        .ok()
                        .map(hyper::Uri::from)
                }
            };
            let Some(uri) = uri else {
                return Err("upstream_invalid_target");
            };
            if more {
                target = Some(uri.clone());
            }
            let body = match body.take() {
                Some(b) => response::boxed_incoming(b),
                None => response::full(bytes::Bytes::new()),
            };
            let mut upstream_req = Request::new(body);
            *upstream_req.method_mut() = parts.method.clone();
            *upstream_req.uri_mut() = uri;
            *upstream_req.version_mut() = Version::HTTP_11;
            *upstream_req.headers_mut() = if more {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            line.upstream = Some(*endpoint);
            match conn
                .shared
                .http
                .client
                .send(tls, *endpoint, upstream_req)
                .await
            {
                Ok(mut resp) => {
                    let upstream_upgrade = (resp.status() == StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| hyper::upgrade::on(&mut resp));
                    let switching = upstream_upgrade.is_some() && client_upgrade.is_some();
                    headers::strip_hop_by_hop(resp.headers_mut(), switching);
                    // The upstream's HTTP version is hop-by-hop too (an HTTP/1.0 backend must not
                    // end the client's keep-alive): the gateway answers in its own (RFC 9110 §6.2).
                    *resp.version_mut() = Version::HTTP_11;
                    if let Some(id) = request_id {
                        resp.headers_mut().insert(X_REQUEST_ID, id);
                    }
                    if let (Some(client), Some(upstream)) = (client_upgrade, upstream_upgrade) {
                        splice_upgraded(client, upstream, conn.peer);
                    }
                    return Ok(resp.map(http_body_util::BodyExt::boxed));
                }
                Err(SendError::Connect(err)) => {
                    if let Some(tls) = super::tls::upstream::UpstreamTlsFailure::find(&err) {
                        // A backend that does not prove its identity is not an unavailable
                        // one: no retry elsewhere, never plaintext.
                        let reason = tls.reason();
                        tracing::warn!(upstream = %endpoint, reason, error = %tls, "upstream TLS refused");
                        return Err(reason);
                    }
                    tracing::warn!(upstream = %endpoint, error = %crate::cli::error_chain(&err), "upstream connect failed");
                    last_err = "upstream_unavailable";
                    // The body was not sent; a request without one can go to the next endpoint.
                    if !more {
                        return Err(last_err);
                    }
                }
                Err(SendError::Request(err)) => {
                    tracing::debug!(upstream = %endpoint, error = %crate::cli::error_chain(&err), "upstream request failed");
                    return Err("upstream_error");
                }
            }
        }
        Err(last_err)
    }

    /// The assertion, and the plain identity headers when the service asks for them.
    fn identity_headers(&self, conn: &Conn, headers: &mut hyper::HeaderMap) {
        let signer = &conn.shared.http.signer;
        let id = self.identity;
        let subject =
            Subject {
                kind: id.map_or("anonymous", |i| i.kind.as_str()),
                subject: id.map(|i| i.subject.as_str()),
                email: id.and_then(|i| i.email.as_deref()),
                groups: id.map_or(&[], |i| i.groups.as_slice()),
                issuer: id.map(|i| i.issuer.as_str()),
                workload: self.workload,
                client_cert: conn.tls.as_ref().and_then(|t| t.client_cert()).map(|c| {
                    AssertedCert {
                        subject: &c.subject,
                        spiffe_id: c.spiffe_id.as_deref(),
                    }
                }),
            };
        if let Some(token) = signer.sign_at(
            self.now,
            &self.route.service.name,
            &subject,
            self.request_id.as_str(),
        ) {
            headers.insert(X_NODEGATE_ASSERTION, token);
        }
        if !self.http.identity_headers {
            return;
        }
        let Some(id) = id else { return };
        let mut put = |name, value: &str| match HeaderValue::from_str(value) {
            Ok(v) => {
                headers.insert(name, v);
            }
            Err(_) => {
                tracing::debug!(header = %name, "identity value is not a valid header value; not sent");
            }
        };
        put(X_NODEGATE_USER, &id.subject);
        if let Some(email) = &id.email {
            put(X_NODEGATE_EMAIL, email);
        }
        if !id.groups.is_empty() {
            put(X_NODEGATE_GROUPS, &id.groups.join(","));
        }
    }
}

/// HTTP/2 may split `Cookie` into several fields (RFC 9113 §8.2.3); HTTP/1.1 upstreams expect
/// one.
fn join_cookies(headers: &mut hyper::HeaderMap) {
    if headers.get_all(header::COOKIE).iter().count() < 2 {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// After a 101 on both sides, copy bytes both ways until either side closes.
fn splice_upgraded(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    peer: SocketAddr,
) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(err) => {
                tracing::debug!(%peer, error = %err, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await
            && err.kind() != std::io::ErrorKind::NotConnected
        {
            tracing::debug!(%peer, error = %err, "upgraded connection ended with an error");
        }
    });
}

#[cfg(test)]
pub(in crate::proxy) mod tests;
