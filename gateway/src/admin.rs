//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`, the JWKS of the gateway's
//! identity assertions at `/.well-known/jwks.json`, and `POST /explain` (`gateway explain`
//! against the live state; answered only to connections from the gateway's own host). It runs on a thread and a
//! runtime of its own, so health checks and scrapes answer whatever the data plane is doing
//! (and a scrape, which reads the pinned maps, never takes a proxy worker).

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::oneshot};

use crate::{
    explain::{self, Origin, Query},
    proxy::{SharedRoutes, http::SharedAuth},
    telemetry::Metrics,
};

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest `POST /explain` body (a query with a token of up to the default 16 KiB limit,
/// or claims, fits many times over).
const EXPLAIN_BODY_MAX: usize = 256 * 1024;
/// How long the body of a `POST /explain` may take to arrive.
const EXPLAIN_BODY_TIMEOUT: Duration = Duration::from_secs(5);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} for the admin server (admin.listen): is the port free?")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the admin server")]
    Start(#[source] io::Error),
}

/// What `/readyz` waits for.
#[derive(Debug, Default)]
pub struct Readiness {
    attached: AtomicBool,
    synced: AtomicBool,
    listening: AtomicBool,
    /// Why the maps are not synced yet, when it is more than "not yet" (e.g. waiting for the
    /// first Kubernetes snapshot).
    sync_wait: Mutex<Option<String>>,
    /// The Kubernetes source: `None` without one; its health as JSON and, when it is not
    /// following the API server, why.
    source: Mutex<Option<SourceReadiness>>,
}

#[derive(Debug, Clone)]
struct SourceReadiness {
    error: Option<String>,
    json: serde_json::Value,
}

impl Readiness {
    pub fn set_attached(&self, v: bool) {
        self.attached.store(v, Ordering::Release);
    }

    pub fn set_synced(&self, v: bool) {
        self.synced.store(v, Ordering::Release);
    }

    pub fn set_listening(&self, v: bool) {
        self.listening.store(v, Ordering::Release);
    }

    /// What "maps not synced" is waiting for, until [`Self::set_synced`].
    pub fn set_sync_wait(&self, why: Option<String>) {
        *lock(&self.sync_wait) = why;
    }

    /// The Kubernetes source's state: `error` is `None` while it follows the API server.
    /// While it is `Some` the gateway is not ready (it still enforces the last-known-good
    /// snapshot; readiness tells the operator and a rolling update that it is stale).
    pub fn set_source(&self, error: Option<String>, json: serde_json::Value) {
        *lock(&self.source) = Some(SourceReadiness { error, json });
    }

    /// What is missing for readiness (empty: ready).
    pub fn missing(&self) -> Vec<String> {
        let synced = match lock(&self.sync_wait).as_ref() {
            Some(why) => format!("maps not synced ({why})"),
            None => "maps not synced".to_owned(),
        };
        let mut out: Vec<String> = [
            (&self.attached, "programs not attached".to_owned()),
            (&self.synced, synced),
            (&self.listening, "proxy not listening".to_owned()),
        ]
        .into_iter()
        .filter(|(flag, _)| !flag.load(Ordering::Acquire))
        .map(|(_, what)| what)
        .collect();
        if let Some(SourceReadiness { error: Some(e), .. }) = lock(&self.source).as_ref() {
            out.push(format!("kubernetes source: {e}"));
        }
        out
    }

    /// `/status`: readiness and the source's health.
    pub fn to_json(&self) -> serde_json::Value {
        let missing = self.missing();
        serde_json::json!({
            "ready": missing.is_empty(),
            "missing": missing,
            "kubernetes": lock(&self.source).as_ref().map(|s| s.json.clone()),
        })
    }
}

/// A poisoned lock only means a panic elsewhere while holding plain data: keep using it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Clone)]
struct State {
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    /// The public key set of the identity assertions (`/.well-known/jwks.json`).
    jwks: Arc<str>,
    live: Arc<OnceLock<Live>>,
}

/// What `POST /explain` evaluates against: the routes and the authenticator the proxy uses.
struct Live {
    routes: SharedRoutes,
    auth: SharedAuth,
}

/// The running server; stops when [`AdminServer::stop`] is called or it is dropped.
pub struct AdminServer {
    addr: SocketAddr,
    live: Arc<OnceLock<Live>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl AdminServer {
    /// Bind `listen` (now, so that a busy port is a start-up error) and serve on a new thread.
    pub fn start(
        listen: SocketAddr,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
        jwks: Arc<str>,
    ) -> Result<Self, AdminError> {
        let bind_err = |source| AdminError::Bind {
            addr: listen,
            source,
        };
        let listener = std::net::TcpListener::bind(listen).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let addr = listener.local_addr().map_err(bind_err)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(AdminError::Start)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let live = Arc::new(OnceLock::new());
        let state = State {
            readiness,
            metrics,
            jwks,
            live: live.clone(),
        };
        let thread = thread::Builder::new()
            .name("ng-admin".into())
            .spawn(move || runtime.block_on(serve(listener, state, stop_rx)))
            .map_err(AdminError::Start)?;
        tracing::info!(%addr, "admin server listening");
        Ok(Self {
            addr,
            live,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves `POST /explain` from now on, against the proxy's live routes and authenticator
    /// (until then it answers 503). Set once; later calls change nothing.
    pub fn serve_explain(&self, routes: SharedRoutes, auth: SharedAuth) {
        let _ = self.live.set(Live { routes, auth });
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the admin server thread panicked");
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve(listener: std::net::TcpListener, state: State, mut stop: oneshot::Receiver<()>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(error = %err, "admin server cannot use its listener");
            return;
        }
    };
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            res = listener.accept() => match res {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::debug!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let local = stream.local_addr().ok();
        tokio::spawn(async move {
            let same_host = local.is_some_and(|local| same_host(peer, local));
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    Ok::<_, Infallible>(if req.uri().path() == "/explain" {
                        explain_endpoint(req, same_host, &state).await
                    } else {
                        route(&req, &state)
                    })
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(err) = conn.await {
                tracing::debug!(error = %err, "admin connection");
            }
        });
    }
}

/// A connection from the gateway's own host: from loopback, or from the very address it
/// reached (a local connection to one of the host's own addresses has that address as its
/// source; a remote peer cannot complete a handshake with it).
fn same_host(peer: SocketAddr, local: SocketAddr) -> bool {
    let peer = peer.ip().to_canonical();
    peer.is_loopback() || peer == local.ip().to_canonical()
}

/// `POST /explain`: a JSON [`Query`] in, the [`explain::Explained`] out (`400` with the reason
/// for a query that cannot be explained). It discloses policy, so it answers only connections
/// from the gateway's own host (`kubectl exec` into the gateway's pod, the node itself).
async fn explain_endpoint(
    req: Request<Incoming>,
    same_host: bool,
    state: &State,
) -> Response<Full<Bytes>> {
    if !same_host {
        return text(
            StatusCode::FORBIDDEN,
            "explain answers only connections from the gateway's own host\n".into(),
        );
    }
    if req.method() != Method::POST {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST a JSON query to /explain\n".into(),
        );
    }
    let body = Limited::new(req.into_body(), EXPLAIN_BODY_MAX).collect();
    let body = match tokio::time::timeout(EXPLAIN_BODY_TIMEOUT, body).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(err)) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the query: {err}\n"),
            );
        }
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                "the query did not arrive in time\n".into(),
            );
        }
    };
    let query: Query = match serde_json::from_slice(&body) {
        Ok(query) => query,
        Err(err) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("the query is not valid JSON for explain: {err}\n"),
            );
        }
    };
    let Some(live) = state.live.get() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy is not started yet\n".into(),
        );
    };
    let routes = live.routes.load();
    let auth = live.auth.load();
    match explain::explain(&routes, &auth, &query, Origin::Live, Vec::new()) {
        Ok(out) => match serde_json::to_string(&out) {
            Ok(json) => response(StatusCode::OK, "application/json", json),
            Err(err) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding the explanation failed: {err}\n"),
            ),
        },
        Err(err) => text(StatusCode::BAD_REQUEST, format!("{err}\n")),
    }
}

fn route(req: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let missing = state.readiness.missing();
            if missing.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", missing.join(", ")),
                )
            }
        }
        "/status" => response(
            StatusCode::OK,
            "application/json",
            state.readiness.to_json().to_string(),
        ),
        "/.well-known/jwks.json" => response(
            StatusCode::OK,
            "application/jwk-set+json",
            state.jwks.to_string(),
        ),
        "/metrics" => match state.metrics.encode() {
            Ok(body) => response(StatusCode::OK, OPENMETRICS, body),
            Err(err) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {err}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /status, /metrics or /.well-known/jwks.json\n"
                .into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body)
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// Sends `request` (a whole HTTP/1.1 request) and reads the answer to its end.
    fn exchange(addr: SocketAddr, request: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap();
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap();
        (status, body)
    }

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        exchange(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
        )
    }

    #[test]
    fn health_readiness_and_metrics() {
        let readiness = Arc::new(Readiness::default());
        let metrics = Arc::new(Metrics::new(None));
        let server = AdminServer::start(
            "127.0.0.1:0".parse().unwrap(),
            readiness.clone(),
            metrics.clone(),
            Arc::from(r#"{"keys":[]}"#),
        )
        .unwrap();
        let addr = server.local_addr();
        assert_eq!(get(addr, "/healthz").0, 200);
        let (status, body) = get(addr, "/readyz");
        assert_eq!(status, 503);
        assert!(body.contains("programs not attached"), "{body}");
        readiness.set_attached(true);
        readiness.set_synced(true);
        assert_eq!(
            get(addr, "/readyz"),
            (503, "not ready: proxy not listening\n".into())
        );
        readiness.set_listening(true);
        assert_eq!(get(addr, "/readyz").0, 200);
        metrics.config_reload(crate::telemetry::metrics::ReloadResult::Ok);
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        assert!(
            body.contains("nodegate_config_reloads_total{result=\"ok\"} 1"),
            "{body}"
        );
        assert_eq!(get(addr, "/nope").0, 404);
        assert_eq!(
            get(addr, "/.well-known/jwks.json"),
            (200, r#"{"keys":[]}"#.into())
        );
        server.stop();
        assert!(std::net::TcpStream::connect(addr).is_err());
    }

    fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
        exchange(
            addr,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    }

    #[test]
    fn explain_answers_from_the_live_routes() {
        use arc_swap::ArcSwap;

        use crate::{
            auth::{Authenticator, NoopObserver},
            config::{Config, Origin},
            proxy::Routes,
        };

        let server = AdminServer::start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Readiness::default()),
            Arc::new(Metrics::new(None)),
            Arc::from(r#"{"keys":[]}"#),
        )
        .unwrap();
        let addr = server.local_addr();
        let query = r#"{"service":"web","path":"/admin/x","workload":"ops/deployer"}"#;
        // Before the proxy has started.
        assert_eq!(post(addr, "/explain", query).0, 503);

        let config = |policy: &str| {
            Config::parse(
                &format!(
                    "node: n\ncgroup: /sys/fs/cgroup/t\nproxy: {{ listen: \"127.0.0.2:15001\" }}\n\
                     gateways: [127.0.0.1]\nservices:\n  - name: web\n    vips: [\"10.96.0.1:80\"]\n\
                     \x20   policy:\n      allow: [ {policy} ]\n"
                ),
                Origin::Embedded,
            )
            .unwrap()
        };
        let first = config("{ id: ops, when: { workload: { namespace: ops } } }");
        let routes = Routes::shared(&first);
        let auth = Arc::new(ArcSwap::from_pointee(
            Authenticator::new(&first.auth, Arc::new(NoopObserver)).unwrap(),
        ));
        server.serve_explain(routes.clone(), auth);

        let (status, body) = post(addr, "/explain", query);
        assert_eq!(status, 200, "{body}");
        let out: explain::Explained = serde_json::from_str(&body).unwrap();
        assert!(out.allowed(), "{body}");
        assert_eq!(out.rule.as_deref(), Some("ops"));
        assert_eq!(out.state, "live");

        // A reload is what the next explanation sees.
        routes.store(Arc::new(Routes::new(&config(
            "{ id: ci, when: { workload: { namespace: ci } } }",
        ))));
        let (status, body) = post(addr, "/explain", query);
        assert_eq!(status, 200, "{body}");
        let out: explain::Explained = serde_json::from_str(&body).unwrap();
        assert!(!out.allowed(), "{body}");
        assert_eq!(out.reason, "no_rule_matched", "{body}");

        // Bad queries: 400 with the reason; not a POST: 405.
        let (status, body) = post(addr, "/explain", r#"{"service":"nope","path":"/"}"#);
        assert_eq!(status, 400);
        assert!(
            body.contains("no service \"nope\" (services: web)"),
            "{body}"
        );
        let (status, body) = post(
            addr,
            "/explain",
            r#"{"service":"web","path":"/","extra":1}"#,
        );
        assert_eq!(status, 400);
        assert!(body.contains("unknown field `extra`"), "{body}");
        assert_eq!(post(addr, "/explain", "{").0, 400);
        let big = format!(
            r#"{{"service":"web","path":"/","token":"{}"}}"#,
            "a".repeat(EXPLAIN_BODY_MAX)
        );
        assert_eq!(post(addr, "/explain", &big).0, 400);
        assert_eq!(get(addr, "/explain").0, 405);
        server.stop();
    }

    #[test]
    fn only_the_same_host_may_ask_for_explanations() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(same_host(at("127.0.0.1:5000"), at("127.0.0.1:15021")));
        assert!(same_host(at("127.0.0.9:5000"), at("127.0.0.1:15021")));
        assert!(same_host(at("[::1]:5000"), at("[::1]:15021")));
        // The host dialing one of its own addresses.
        assert!(same_host(at("10.0.0.5:5000"), at("10.0.0.5:15021")));
        assert!(same_host(
            at("[::ffff:10.0.0.5]:5000"),
            at("10.0.0.5:15021")
        ));
        // Anyone else: a pod on the node, another node.
        assert!(!same_host(at("10.0.0.6:5000"), at("10.0.0.5:15021")));
        assert!(!same_host(at("10.244.1.7:5000"), at("0.0.0.0:15021")));
    }
}
