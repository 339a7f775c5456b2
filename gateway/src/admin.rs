//! The admin HTTP server: `/healthz`, `/readyz`, `/metrics`, and the JWKS of the gateway's
//! identity assertions at `/.well-known/jwks.json`. It runs on a thread and a
//! runtime of its own, so health checks and scrapes answer whatever the data plane is doing
//! (and a scrape, which reads the pinned maps, never takes a proxy worker).

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::oneshot};

use crate::telemetry::Metrics;

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
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
}

/// The running server; stops when [`AdminServer::stop`] is called or it is dropped.
pub struct AdminServer {
    addr: SocketAddr,
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
        let state = State {
            readiness,
            metrics,
            jwks,
        };
        let thread = thread::Builder::new()
            .name("ng-admin".into())
            .spawn(move || runtime.block_on(serve(listener, state, stop_rx)))
            .map_err(AdminError::Start)?;
        tracing::info!(%addr, "admin server listening");
        Ok(Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        let stream = tokio::select! {
            _ = &mut stop => return,
            res = listener.accept() => match res {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::debug!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&req, &state)) }
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

    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
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
}
