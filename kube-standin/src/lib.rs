//! A stand-in Kubernetes API server for Nodegate's tests (no kube-apiserver runs on these
//! machines).
//!
//! It speaks the real protocol over HTTP/1.1, for the kinds the gateway watches (`core/v1`
//! services and pods, `discovery.k8s.io/v1` endpointslices, `nodegate.io/v1alpha1`
//! accesspolicies with a status subresource, `events.k8s.io/v1` events):
//! - list: `resourceVersion` in the list metadata, label and field selectors;
//! - watch (`?watch=true|1`): a chunked stream of `ADDED`/`MODIFIED`/`DELETED` from the given
//!   resourceVersion, `BOOKMARK`s when `allowWatchBookmarks=true`, `timeoutSeconds`; an object
//!   that stops matching a selector yields `DELETED` of its *previous* content, as the API
//!   server's watch cache does; a resourceVersion older than the last compaction yields the
//!   API server's answer: HTTP 200 and an `ERROR` event carrying a `410 Expired` Status;
//! - get, create (POST), replace (PUT), merge-patch (PATCH), delete, and `/status`;
//! - discovery documents (`/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`, `/version`).
//!
//! Tests drive it through [`FakeApi`]: write objects directly (like controllers would), break
//! the API (refuse connections, or answer 500: not 503, which kube's client retries by itself),
//! heal it, compact history, hold watches. Every response is written with `TCP_NODELAY`.
//!
//! Used by the gateway's unit tests (`gateway/src/source/tests`, on loopback) and by the
//! simulated-node harness of `nodegate-tests`, which binds it inside a node's network namespace
//! through a [`Binder`] so that `gateway run` on that node reaches it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The kinds served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    Pod,
    EndpointSlice,
    AccessPolicy,
    /// `events.k8s.io/v1`, written by the gateway.
    Event,
}

impl Kind {
    const ALL: [Self; 5] = [
        Self::Service,
        Self::Pod,
        Self::EndpointSlice,
        Self::AccessPolicy,
        Self::Event,
    ];

    fn plural(self) -> &'static str {
        match self {
            Self::Service => "services",
            Self::Pod => "pods",
            Self::EndpointSlice => "endpointslices",
            Self::AccessPolicy => "accesspolicies",
            Self::Event => "events",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::Pod => "Pod",
            Self::EndpointSlice => "EndpointSlice",
            Self::AccessPolicy => "AccessPolicy",
            Self::Event => "Event",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Pod => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::AccessPolicy => "nodegate.io/v1alpha1",
            Self::Event => "events.k8s.io/v1",
        }
    }

    fn prefix(self) -> String {
        match self.api_version() {
            "v1" => "/api/v1".to_owned(),
            gv => format!("/apis/{gv}"),
        }
    }

    fn of(api_version: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.name() == kind)
    }
}

/// How the API is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// The port is closed: connections are refused.
    Refuse,
    /// Every request gets `500 Internal Server Error`.
    Error500,
}

type Key = (Kind, String, String);

#[derive(Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    old: Option<Value>,
    new: Option<Value>,
}

struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get `410 Expired`.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Change>>,
    uids: u64,
    outage: Option<Outage>,
    requests: Vec<String>,
}

/// Opens the listening socket at an address: [`FakeApi::start`] binds in the caller's network
/// namespace; the harness binds from a thread that has entered a node's namespace. Called again
/// by [`FakeApi::heal`] after [`Outage::Refuse`], for the same address.
pub type Binder = Arc<dyn Fn(SocketAddr) -> io::Result<std::net::TcpListener> + Send + Sync>;

struct Inner {
    addr: SocketAddr,
    binder: Binder,
    /// The runtime the server was started on: where a healed listener is served.
    runtime: tokio::runtime::Handle,
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Connections; aborted to cut every client off at once.
    conns: Mutex<JoinSet<()>>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// While true, new watch requests wait (to make changes a watch will only see by re-list).
    hold_watches: watch::Sender<bool>,
    /// Bumped to end every open watch cleanly (terminating chunk, no error).
    end_watches: watch::Sender<u64>,
    bookmark_every: Duration,
}

/// Handle on a running stand-in API server. Dropping it stops the server.
pub struct FakeApi {
    inner: Arc<Inner>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.inner.accept).take() {
            task.abort();
        }
        lock(&self.inner.conns).abort_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread poisons the lock; the state is still usable for the others.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeApi {
    /// Starts on `127.0.0.1:0`, on the current tokio runtime (panics outside one).
    pub fn start() -> Self {
        Self::start_with(
            &tokio::runtime::Handle::current(),
            "127.0.0.1:0".parse().expect("loopback address"),
            Arc::new(std::net::TcpListener::bind),
        )
        .expect("bind loopback")
    }

    /// Starts at `addr` (port 0: any) on `runtime`, with the listening socket opened by
    /// `binder`.
    pub fn start_with(
        runtime: &tokio::runtime::Handle,
        addr: SocketAddr,
        binder: Binder,
    ) -> io::Result<Self> {
        let listener = {
            let _runtime = runtime.enter();
            listen(&binder, addr)?
        };
        let addr = listener.local_addr()?;
        let (changes, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            addr,
            binder,
            runtime: runtime.clone(),
            state: Mutex::new(State {
                rv: 100,
                compacted: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                uids: 0,
                outage: None,
                requests: Vec::new(),
            }),
            changes,
            conns: Mutex::new(JoinSet::new()),
            accept: Mutex::new(None),
            hold_watches: watch::channel(false).0,
            end_watches: watch::channel(0).0,
            bookmark_every: Duration::from_millis(300),
        });
        let task = runtime.spawn(accept_loop(inner.clone(), listener));
        *lock(&inner.accept) = Some(task);
        Ok(Self { inner })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Creates or replaces an object (given whole, `status` included, like a controller).
    /// Returns its resourceVersion.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let kind = Kind::of(
            obj["apiVersion"].as_str().unwrap_or_default(),
            obj["kind"].as_str().unwrap_or_default(),
        )
        .expect("apiVersion/kind of a served kind");
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        obj["metadata"]["namespace"] = json!(ns);
        let mut state = lock(&self.inner.state);
        let old = state
            .objects
            .get(&(kind, ns.clone(), name.clone()))
            .cloned();
        match &old {
            Some(old) => {
                obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let bump = i64::from(old.get("spec") != obj.get("spec"));
                obj["metadata"]["generation"] = json!(generation + bump);
            }
            None => init_meta(&mut state, &mut obj),
        }
        commit(&self.inner, &mut state, kind, (ns, name), old, Some(obj))
    }

    /// Deletes an object; false if it did not exist.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> bool {
        let mut state = lock(&self.inner.state);
        let key = (kind, ns.to_owned(), name.to_owned());
        let Some(old) = state.objects.get(&key).cloned() else {
            return false;
        };
        commit(
            &self.inner,
            &mut state,
            kind,
            (ns.to_owned(), name.to_owned()),
            Some(old),
            None,
        );
        true
    }

    /// All objects of a kind.
    pub fn all(&self, kind: Kind) -> Vec<Value> {
        lock(&self.inner.state)
            .objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        lock(&self.inner.state)
            .objects
            .get(&(kind, ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Breaks the API: refused connections or 500s. Open connections (watches) are cut.
    pub fn break_api(&self, outage: Outage) {
        lock(&self.inner.state).outage = Some(outage);
        if outage == Outage::Refuse
            && let Some(task) = lock(&self.inner.accept).take()
        {
            task.abort();
        }
        lock(&self.inner.conns).abort_all();
    }

    /// Repairs the API (re-opens the same port after [`Outage::Refuse`], with the [`Binder`]).
    pub fn heal(&self) {
        let was = lock(&self.inner.state).outage.take();
        if was == Some(Outage::Refuse) {
            let _runtime = self.inner.runtime.enter();
            let listener = listen(&self.inner.binder, self.inner.addr).expect("re-bind");
            let task = self
                .inner
                .runtime
                .spawn(accept_loop(self.inner.clone(), listener));
            *lock(&self.inner.accept) = Some(task);
        }
    }

    /// The current outage, if the API is broken.
    pub fn outage(&self) -> Option<Outage> {
        lock(&self.inner.state).outage
    }

    /// Forgets history: watches resuming from any earlier resourceVersion get `410 Expired`.
    pub fn compact(&self) {
        let mut state = lock(&self.inner.state);
        state.compacted = state.rv;
        state.history.clear();
    }

    /// Ends every open connection (and so every watch) without an error.
    pub fn close_connections(&self) {
        lock(&self.inner.conns).abort_all();
    }

    /// Ends every open watch cleanly, as the API server does at `timeoutSeconds`: the client
    /// resumes from its last resourceVersion.
    pub fn end_watches(&self) {
        self.inner.end_watches.send_modify(|n| *n += 1);
    }

    /// New watch requests wait until [`FakeApi::release_watches`].
    pub fn hold_watches(&self) {
        self.inner.hold_watches.send_replace(true);
    }

    pub fn release_watches(&self) {
        self.inner.hold_watches.send_replace(false);
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.inner.state).requests.clone()
    }
}

/// Metadata the API server sets on create. A `uid` given by the test is kept (the harness names
/// pods' cgroups after their UIDs before the objects exist).
fn init_meta(state: &mut State, obj: &mut Value) {
    state.uids += 1;
    let n = state.uids;
    if !obj["metadata"]["uid"].is_string() {
        obj["metadata"]["uid"] = json!(format!("{n:08x}-0000-4000-8000-{n:012x}"));
    }
    obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    obj["metadata"]["generation"] = json!(1);
}

/// Records a change under the state lock, so that watchers subscribing under the same lock
/// see every change exactly once (in their backlog or on the channel).
fn commit(
    inner: &Inner,
    state: &mut State,
    kind: Kind,
    (ns, name): (String, String),
    old: Option<Value>,
    new: Option<Value>,
) -> u64 {
    state.rv += 1;
    let rv = state.rv;
    let key = (kind, ns, name);
    let new = new.map(|mut obj| {
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj
    });
    match &new {
        Some(obj) => {
            state.objects.insert(key, obj.clone());
        }
        None => {
            state.objects.remove(&key);
        }
    }
    let change = Arc::new(Change { rv, kind, old, new });
    state.history.push(change.clone());
    let _ = inner.changes.send(change);
    rv
}

/// A tokio listener from the binder's socket (must run inside a runtime).
fn listen(binder: &Binder, addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = binder(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Headers and body chunks go out in separate writes; Nagle would hold each for an ACK.
        let _ = stream.set_nodelay(true);
        let inner2 = inner.clone();
        lock(&inner.conns).spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let inner = inner2.clone();
                async move { Ok::<_, Infallible>(handle(inner, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow with every request.
        while lock(&inner.conns).try_join_next().is_some() {}
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed_unsync())
        .expect("response")
}

fn status_error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// A parsed resource path.
struct Target {
    kind: Kind,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    for kind in Kind::ALL {
        let Some(rest) = path.strip_prefix(&kind.prefix()) else {
            continue;
        };
        let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let (ns, rest) = match parts.as_slice() {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
            rest => (None, rest),
        };
        let target = match rest {
            [plural] if *plural == kind.plural() => Target {
                kind,
                ns,
                name: None,
                status: false,
            },
            [plural, name] if *plural == kind.plural() => Target {
                kind,
                ns,
                name: Some((*name).to_owned()),
                status: false,
            },
            [plural, name, "status"] if *plural == kind.plural() => Target {
                kind,
                ns,
                name: Some((*name).to_owned()),
                status: true,
            },
            _ => continue,
        };
        return Some(target);
    }
    None
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let line = format!("{} {}", req.method(), req.uri());
    {
        let mut state = lock(&inner.state);
        state.requests.push(line);
        if state.outage == Some(Outage::Error500) {
            return status_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "the stand-in API server is broken on purpose",
            );
        }
    }
    let path = req.uri().path().to_owned();
    if let Some(doc) = discovery(&path) {
        return full(StatusCode::OK, &doc);
    }
    let Some(target) = parse_path(&path) else {
        return status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route {path}"),
        );
    };
    let q = query(&req);
    match (req.method().clone(), &target.name) {
        (Method::GET, None) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch_response(inner, &target, &q).await
        }
        (Method::GET, None) => list(&inner, &target, &q),
        (Method::GET, Some(name)) => {
            let ns = target.ns.clone().unwrap_or_default();
            match lock(&inner.state)
                .objects
                .get(&(target.kind, ns, name.clone()))
            {
                Some(obj) => full(StatusCode::OK, obj),
                None => not_found(&target),
            }
        }
        (Method::POST, None) => {
            let body = read_json(req).await;
            create(&inner, &target, body)
        }
        (Method::PUT, Some(_)) => {
            let body = read_json(req).await;
            write(&inner, &target, |_old| body.clone())
        }
        (Method::PATCH, Some(_)) => {
            let ct = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if !ct.starts_with("application/merge-patch+json")
                && !ct.starts_with("application/strategic-merge-patch+json")
            {
                return status_error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    &format!("the stand-in applies merge patches only, not {ct}"),
                );
            }
            let merge = read_json(req).await;
            write(&inner, &target, |old| {
                let mut new = old.clone();
                merge_patch(&mut new, &merge);
                new
            })
        }
        (Method::DELETE, Some(name)) => {
            let ns = target.ns.clone().unwrap_or_default();
            let mut state = lock(&inner.state);
            let key = (target.kind, ns.clone(), name.clone());
            match state.objects.get(&key).cloned() {
                Some(old) => {
                    commit(
                        &inner,
                        &mut state,
                        target.kind,
                        (ns, name.clone()),
                        Some(old.clone()),
                        None,
                    );
                    full(StatusCode::OK, &old)
                }
                None => not_found(&target),
            }
        }
        _ => status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not supported by the stand-in",
        ),
    }
}

fn not_found(t: &Target) -> Response<Body> {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!(
            "{} \"{}\" not found",
            t.kind.plural(),
            t.name.clone().unwrap_or_default()
        ),
    )
}

async fn read_json(req: Request<Incoming>) -> Value {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

fn create(inner: &Inner, t: &Target, mut obj: Value) -> Response<Body> {
    let Some(ns) = t.ns.clone() else {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "namespaced kinds only",
        );
    };
    let Some(name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
        return status_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required",
        );
    };
    let mut state = lock(&inner.state);
    if state
        .objects
        .contains_key(&(t.kind, ns.clone(), name.clone()))
    {
        return status_error(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{name} already exists"),
        );
    }
    obj["apiVersion"] = json!(t.kind.api_version());
    obj["kind"] = json!(t.kind.name());
    obj["metadata"]["namespace"] = json!(ns);
    init_meta(&mut state, &mut obj);
    commit(
        inner,
        &mut state,
        t.kind,
        (ns.clone(), name.clone()),
        None,
        Some(obj),
    );
    let created = state.objects[&(t.kind, ns, name)].clone();
    full(StatusCode::CREATED, &created)
}

/// PUT or PATCH of an object or its status, with the status subresource's rules: writes to the
/// object keep its status, writes to `/status` change only the status; `generation` counts
/// spec changes.
fn write(inner: &Inner, t: &Target, f: impl FnOnce(&Value) -> Value) -> Response<Body> {
    let ns = t.ns.clone().unwrap_or_default();
    let name = t.name.clone().unwrap_or_default();
    let mut state = lock(&inner.state);
    let Some(old) = state
        .objects
        .get(&(t.kind, ns.clone(), name.clone()))
        .cloned()
    else {
        return not_found(t);
    };
    let proposed = f(&old);
    let mut new = old.clone();
    if t.status {
        new["status"] = proposed.get("status").cloned().unwrap_or(Value::Null);
    } else {
        for (k, v) in proposed.as_object().into_iter().flatten() {
            if k != "status" && k != "metadata" {
                new[k] = v.clone();
            }
        }
        for field in ["labels", "annotations"] {
            new["metadata"][field] = proposed["metadata"][field].clone();
        }
        if old.get("spec") != new.get("spec") {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = json!(generation + 1);
        }
    }
    commit(
        inner,
        &mut state,
        t.kind,
        (ns.clone(), name.clone()),
        Some(old),
        Some(new),
    );
    let written = state.objects[&(t.kind, ns, name)].clone();
    full(StatusCode::OK, &written)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (k, v) in patch {
        if v.is_null() {
            if let Some(map) = target.as_object_mut() {
                map.remove(k);
            }
        } else {
            merge_patch(&mut target[k], v);
        }
    }
}

/// Label selector: `k=v`, `k==v`, `k!=v`, `k` (exists), `!k` (absent), comma = and.
fn labels_match(selector: &str, obj: &Value) -> Result<bool, String> {
    let labels = &obj["metadata"]["labels"];
    for req in selector.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let ok = if let Some((k, v)) = req.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
            labels[k.trim()].as_str() == Some(v.trim())
        } else if let Some(k) = req.strip_prefix('!') {
            labels.get(k.trim()).is_none()
        } else if req.contains(' ') || req.contains('(') {
            return Err(format!("unsupported label selector `{req}`"));
        } else {
            labels.get(req).is_some()
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Field selector: `a.b=v`, `a.b==v`, `a.b!=v`, comma = and.
fn fields_match(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .all(|req| {
            let (path, want, negate) = if let Some((p, v)) = req.split_once("!=") {
                (p, v, true)
            } else if let Some((p, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (p, v, false)
            } else {
                return false;
            };
            let got = path
                .trim()
                .split('.')
                .fold(obj, |v, part| &v[part])
                .as_str()
                .unwrap_or_default();
            (got == want.trim()) != negate
        })
}

struct Filter {
    kind: Kind,
    ns: Option<String>,
    labels: String,
    fields: String,
}

impl Filter {
    fn new(t: &Target, q: &BTreeMap<String, String>) -> Result<Self, String> {
        let f = Self {
            kind: t.kind,
            ns: t.ns.clone(),
            labels: q.get("labelSelector").cloned().unwrap_or_default(),
            fields: q.get("fieldSelector").cloned().unwrap_or_default(),
        };
        labels_match(&f.labels, &json!({}))?;
        Ok(f)
    }

    fn matches(&self, obj: &Value) -> bool {
        self.ns
            .as_deref()
            .is_none_or(|ns| obj["metadata"]["namespace"].as_str() == Some(ns))
            && labels_match(&self.labels, obj).unwrap_or(false)
            && fields_match(&self.fields, obj)
    }
}

fn list(inner: &Inner, t: &Target, q: &BTreeMap<String, String>) -> Response<Body> {
    let filter = match Filter::new(t, q) {
        Ok(f) => f,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let state = lock(&inner.state);
    let items: Vec<Value> = state
        .objects
        .iter()
        .filter(|((kind, _, _), obj)| *kind == t.kind && filter.matches(obj))
        .map(|(_, obj)| obj.clone())
        .collect();
    full(
        StatusCode::OK,
        &json!({"apiVersion": t.kind.api_version(), "kind": format!("{}List", t.kind.name()),
                "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
    )
}

/// What a watch with `filter` sees of a change: the API server's watch-cache rules.
fn watch_event(filter: &Filter, change: &Change) -> Option<Value> {
    if change.kind != filter.kind {
        return None;
    }
    let was = change.old.as_ref().is_some_and(|o| filter.matches(o));
    let is = change.new.as_ref().is_some_and(|o| filter.matches(o));
    match (was, is, &change.new, &change.old) {
        (false, true, Some(new), _) => Some(json!({"type": "ADDED", "object": new})),
        (true, true, Some(new), _) => Some(json!({"type": "MODIFIED", "object": new})),
        (true, false, _, Some(old)) => {
            // The previous content, at the resourceVersion of the change.
            let mut old = old.clone();
            old["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            Some(json!({"type": "DELETED", "object": old}))
        }
        _ => None,
    }
}

fn expired(rv: &str) -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": "Failure", "reason": "Expired", "code": 410,
           "message": format!("too old resource version: {rv}")}})
}

async fn watch_response(
    inner: Arc<Inner>,
    t: &Target,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let filter = match Filter::new(t, q) {
        Ok(f) => f,
        Err(e) => return status_error(StatusCode::BAD_REQUEST, "BadRequest", &e),
    };
    let mut hold = inner.hold_watches.subscribe();
    let _ = hold.wait_for(|held| !held).await;
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let rv_text = q.get("resourceVersion").cloned().unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Bytes>(64);

    // Backlog and subscription under one lock: no change is missed or sent twice.
    let (backlog, changes, start_rv) = {
        let state = lock(&inner.state);
        let from = match rv_text.as_str() {
            "" | "0" => None,
            s => Some(s.parse::<u64>().unwrap_or(0)),
        };
        let backlog: Result<Vec<Value>, Value> = match from {
            Some(rv) if rv < state.compacted || rv > state.rv => Err(expired(&rv_text)),
            Some(rv) => Ok(state
                .history
                .iter()
                .filter(|c| c.rv > rv)
                .filter_map(|c| watch_event(&filter, c))
                .collect()),
            // No resourceVersion: synthetic ADDED for what exists, then changes.
            None => Ok(state
                .objects
                .iter()
                .filter(|((kind, _, _), obj)| *kind == t.kind && filter.matches(obj))
                .map(|(_, obj)| json!({"type": "ADDED", "object": obj}))
                .collect()),
        };
        (backlog, inner.changes.subscribe(), state.rv)
    };
    tokio::spawn(pump(
        inner.clone(),
        t.kind,
        filter,
        backlog,
        changes,
        (start_rv, bookmarks, timeout),
        tx,
    ));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .expect("response")
}

/// Feeds one watch: its backlog, then live changes and bookmarks until the client leaves, the
/// timeout passes or the test ends the watches.
async fn pump(
    inner: Arc<Inner>,
    kind: Kind,
    filter: Filter,
    backlog: Result<Vec<Value>, Value>,
    mut changes: broadcast::Receiver<Arc<Change>>,
    (start_rv, bookmarks, timeout): (u64, bool, Option<Duration>),
    tx: mpsc::Sender<Bytes>,
) {
    let every = inner.bookmark_every;
    let mut end = inner.end_watches.subscribe();
    let line = |v: &Value| Bytes::from(format!("{v}\n"));
    {
        let events = match backlog {
            Ok(events) => events,
            Err(error) => {
                let _ = tx.send(line(&error)).await;
                return;
            }
        };
        for ev in &events {
            if tx.send(line(ev)).await.is_err() {
                return;
            }
        }
        let mut last_rv = start_rv;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) => {
                        last_rv = last_rv.max(change.rv);
                        if let Some(ev) = watch_event(&filter, &change)
                            && tx.send(line(&ev)).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // The real API server also drops watchers that cannot keep up.
                        let _ = tx.send(line(&expired(&last_rv.to_string()))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let ev = json!({"type": "BOOKMARK", "object": {
                        "apiVersion": kind.api_version(), "kind": kind.name(),
                        "metadata": {"resourceVersion": last_rv.to_string()}}});
                    if tx.send(line(&ev)).await.is_err() {
                        return;
                    }
                }
                () = until_deadline => return,
                _ = end.changed() => return,
            }
        }
    }
}

/// Discovery documents, for clients that ask.
fn discovery(path: &str) -> Option<Value> {
    let resources = |kinds: &[Kind], gv: &str| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
               "resources": kinds.iter().flat_map(|k| [
                   json!({"name": k.plural(), "singularName": k.name().to_lowercase(),
                          "namespaced": true, "kind": k.name(),
                          "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}),
                   json!({"name": format!("{}/status", k.plural()), "singularName": "",
                          "namespaced": true, "kind": k.name(), "verbs": ["get", "patch", "update"]}),
               ]).collect::<Vec<_>>()})
    };
    let group = |name: &str, version: &str| {
        let gv = format!("{name}/{version}");
        json!({"name": name, "versions": [{"groupVersion": gv, "version": version}],
               "preferredVersion": {"groupVersion": gv, "version": version}})
    };
    Some(match path {
        "/version" => {
            json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-nodegate-stand-in",
                             "platform": "linux/amd64"})
        }
        "/api" => json!({"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": []}),
        "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            group("discovery.k8s.io", "v1"), group("events.k8s.io", "v1"),
            group("nodegate.io", "v1alpha1")]}),
        "/api/v1" => resources(&[Kind::Service, Kind::Pod], "v1"),
        "/apis/discovery.k8s.io/v1" => resources(&[Kind::EndpointSlice], "discovery.k8s.io/v1"),
        "/apis/events.k8s.io/v1" => resources(&[Kind::Event], "events.k8s.io/v1"),
        "/apis/nodegate.io/v1alpha1" => resources(&[Kind::AccessPolicy], "nodegate.io/v1alpha1"),
        _ => return None,
    })
}
