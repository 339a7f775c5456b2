//! In-process tests of HTTP services: a hyper (or raw TCP) client ↔ the real accept loop and
//! request path on 127.0.0.1 with a fake original-destination table ↔ a fake backend that
//! echoes what it received.

#![expect(
    clippy::many_single_char_names,
    reason = "p(roxy), c(lient), t(oken), h(eaders), l(ine): the same short names in every test"
)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{Empty, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

use super::*;
use crate::{
    auth::{Authenticator, NoopObserver},
    config::{Config, Origin},
    ebpf::OrigDst,
    proxy::{OrigDstLookup, Routes, SharedRoutes, bind},
    telemetry::{Metrics, decision::capture::Captured},
};

const VIP: &str = "10.96.0.10:80";
const ISSUER: &str = "https://login.example.test";
const TIMEOUT: Duration = Duration::from_secs(5);
const EC1: &str = include_str!("../../auth/testdata/ec1.pem");

/// The HTTP context of a config (keys from its `jwks_file`s), loaded.
pub(in crate::proxy) fn context(config: &Config, routes: SharedRoutes) -> HttpContext {
    let auth = Authenticator::new(&config.auth, Arc::new(NoopObserver)).unwrap();
    let auth: SharedAuth = Arc::new(ArcSwap::from_pointee(auth));
    HttpContext::new(
        auth,
        Arc::new(AssertionSigner::generate(config.assertion.clone())),
        None,
        None,
        routes,
    )
}

#[derive(Default)]
struct FakeOrig(Mutex<HashMap<SocketAddr, OrigDst>>);

impl OrigDstLookup for Arc<FakeOrig> {
    fn take(&self, peer: SocketAddr) -> Option<OrigDst> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC1.as_bytes()).unwrap()
}

/// An ES256 token of the test issuer; `extra` overrides claims.
fn token(extra: &Value) -> String {
    let mut claims = json!({
        "iss": ISSUER, "sub": "alice", "aud": "nodegate", "exp": now() + 600, "iat": now(),
        "email": "alice@example.test", "groups": ["devs"],
    });
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(&header, &claims, &key()).unwrap()
}

fn jwks_file() -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut jwk = Jwk::from_encoding_key(&key(), Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let path = std::env::temp_dir().join(format!(
        "nodegate-http-jwks-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, json!({ "keys": [jwk] }).to_string()).unwrap();
    path
}

const POLICY: &str = r"
    policy:
      deny:
        - id: no-admin
          when: { path: { prefix: /admin } }
      allow:
        - id: devs
          when: { groups: devs }
        - id: public
          when: { path: { prefix: /public } }
        - id: ci
          when: { workload: { namespace: ci } }";

fn config(backend: SocketAddr, service_extra: &str) -> Config {
    let jwks = jwks_file();
    let text = format!(
        "node: node-t\ncgroup: /sys/fs/cgroup\nproxy:\n  listen: 127.0.0.2:15001\n  connect_timeout_ms: 1000\n\
         gateways: [127.0.0.1]\n\
         auth:\n  issuers:\n    - {{ name: test, issuer: \"{ISSUER}\", jwks_file: \"{}\", audiences: [nodegate], algorithms: [ES256], leeway_s: 0 }}\n\
         workloads:\n  - {{ namespace: ci, service_account: builder, pod: builder-0, addresses: [127.0.0.9] }}\n\
         services:\n  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{backend}\"]\n{service_extra}{POLICY}\n{login}",
        jwks.display(),
        login = if service_extra.contains("login: true") {
            "login: { issuer: \"https://login.example.test\", client_id: gw, client_secret: s, \
             hosts: [web.example.test] }\n"
        } else {
            ""
        },
    );
    Config::parse(&text, Origin::Embedded).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

struct Proxy {
    addr: SocketAddr,
    orig: Arc<FakeOrig>,
    shared: Arc<Shared>,
    captured: Captured,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), crate::proxy::ProxyError>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Proxy {
    /// On a current-thread runtime (the capturing subscriber is per thread).
    async fn start(config: &Config) -> Self {
        Self::start_with(config, None).await
    }

    async fn start_with(config: &Config, login: Option<Arc<dyn LoginFlow>>) -> Self {
        let captured = Captured::default();
        let guard = captured.install();
        let listeners = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let orig = Arc::new(FakeOrig::default());
        let routes = Routes::shared(config);
        let mut http = context(config, routes.clone());
        http.login = login;
        for report in http.auth.load().load_keys().await {
            report.result.unwrap();
        }
        let shared = Arc::new(Shared {
            node: config.node.as_str().into(),
            routes,
            orig: Box::new(orig.clone()),
            metrics: Arc::new(Metrics::new(None)),
            mark: None,
            http,
        });
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(crate::proxy::serve(listeners, shared.clone(), rx, TIMEOUT));
        Self {
            addr,
            orig,
            shared,
            captured,
            shutdown,
            task,
            _guard: guard,
        }
    }

    /// A TCP connection to the proxy as if redirected from the VIP, from `src` (127.0.0.x).
    async fn tcp_from(&self, src: &str) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(format!("{src}:0").parse().unwrap()).unwrap();
        let local = socket.local_addr().unwrap();
        self.orig
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                local,
                OrigDst {
                    dst: VIP.parse().unwrap(),
                    service_id: 0,
                    cgroup_id: 42,
                    pid: 1,
                },
            );
        socket.connect(self.addr).await.unwrap()
    }

    async fn tcp(&self) -> TcpStream {
        self.tcp_from("127.0.0.1").await
    }

    /// An HTTP/1.1 client connection (keep-alive).
    async fn h1(&self) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(self.tcp().await))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        send
    }

    /// Request lines written so far, waiting for at least `n`.
    async fn requests(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let lines: Vec<_> = self
                .captured
                .lines()
                .into_iter()
                .filter(|l| l["kind"] == "request")
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(tokio::time::Instant::now() < deadline, "{lines:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A backend answering every request with a JSON echo of what it received; `Upgrade`
/// requests get a 101 and then an echo of the raw bytes.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<Incoming>| async move {
                    if req.headers().contains_key(header::UPGRADE) {
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(up) = on.await {
                                let mut io = TokioIo::new(up);
                                let mut buf = [0u8; 64];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        });
                        return Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .status(101)
                                .header("connection", "upgrade")
                                .header("upgrade", "websocket")
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        );
                    }
                    let mut headers = serde_json::Map::new();
                    for (k, v) in req.headers() {
                        headers
                            .entry(k.as_str())
                            .or_insert_with(|| json!([]))
                            .as_array_mut()
                            .unwrap()
                            .push(json!(v.to_str().unwrap_or("<bin>")));
                    }
                    let method = req.method().to_string();
                    let uri = req.uri().to_string();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map_or(0, |b| b.to_bytes().len());
                    let echo =
                        json!({"method": method, "uri": uri, "headers": headers, "body": body});
                    Ok(Response::new(Full::new(Bytes::from(echo.to_string()))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path).header("host", "web.example.test")
}

async fn send(
    client: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: http::request::Builder,
) -> (StatusCode, hyper::HeaderMap, Value) {
    client.ready().await.unwrap();
    let resp = client
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, headers, value)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test]
async fn allow_and_deny_by_policy_with_decision_lines() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    let t = token(&json!({}));
    let (status, _, echo) = send(
        &mut c,
        get("/app?x=%2F..").header("authorization", bearer(&t)),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(
        echo["uri"], "/app?x=%2F..",
        "the query is forwarded untouched"
    );
    let (status, _, body) = send(
        &mut c,
        get("/admin/users").header("authorization", bearer(&t)),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["reason"], "denied_by_rule");
    let (status, headers, body) =
        send(&mut c, get("/app").header("accept", "application/json")).await;
    assert_eq!(status, 401);
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"nodegate\"");
    assert_eq!(body["reason"], "no_rule_matched");
    let (status, headers, _) = send(&mut c, get("/app").header("accept", "text/html,*/*")).await;
    assert_eq!(status, 401);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let (status, _, _) = send(&mut c, get("/public/x")).await;
    assert_eq!(status, 200);

    let lines = p.requests(5).await;
    let l = &lines[0];
    for (k, v) in [
        ("decision", "allow"),
        ("reason", "allowed_by_rule"),
        ("rule", "devs"),
        ("service", "web"),
        ("policy", "web"),
        ("mode", "enforce"),
        ("method", "GET"),
        ("path", "/app"),
        ("host", "web.example.test"),
        ("node", "node-t"),
        ("protocol", "http/1.1"),
    ] {
        assert_eq!(l[k], v, "{k} in {l}");
    }
    assert_eq!(l["identity"]["kind"], "user");
    assert_eq!(l["identity"]["subject"], "alice");
    assert_eq!(l["identity"]["groups"][0], "devs");
    assert_eq!(l["identity"]["issuer"], ISSUER);
    assert_eq!(l["status"], 200);
    assert_eq!(l["request_id"].as_str().unwrap().len(), 32);
    assert_eq!(
        l["policy_version"],
        *cfg.services[0].http.as_ref().unwrap().policy.version
    );
    assert!(l["latency_us"].is_u64());
    assert_eq!(lines[1]["decision"], "deny");
    assert_eq!(lines[1]["rule"], "no-admin");
    assert_eq!(lines[1]["status"], 403);
    assert_eq!(lines[2]["identity"]["kind"], "anonymous");
    assert_eq!(lines[2]["status"], 401);
    assert_eq!(lines[4]["rule"], "public");
    let metrics = p.shared.metrics.encode().unwrap();
    assert!(metrics.contains("nodegate_requests_total{service=\"web\",decision=\"allow\",reason=\"allowed_by_rule\"} 2"), "{metrics}");
}

#[tokio::test]
async fn keep_alive_re_evaluates_every_request() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    let t = token(&json!({"exp": now() + 1}));
    let (status, _, _) = send(&mut c, get("/app").header("authorization", bearer(&t))).await;
    assert_eq!(status, 200);
    // `exp` has one-second resolution: 2.5 s later it is in the past whatever the sub-second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Same connection, same token, now expired.
    let (status, headers, body) =
        send(&mut c, get("/app").header("authorization", bearer(&t))).await;
    assert_eq!(status, 401);
    assert_eq!(body["reason"], "token_expired");
    assert!(
        headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let lines = p.requests(2).await;
    assert_eq!(lines[1]["reason"], "token_expired");
    assert_eq!(lines[1]["decision"], "deny");
    assert_eq!(lines[0]["src"], lines[1]["src"], "one connection");
}

#[tokio::test]
async fn a_bad_token_is_a_deny_never_anonymous() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    // `/public` allows anonymous callers; a bad token is still refused.
    let bad = token(&json!({"aud": "other"}));
    let (status, _, body) = send(
        &mut c,
        get("/public/x").header("authorization", bearer(&bad)),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["reason"], "token_bad_audience");
    let (status, _, body) = send(
        &mut c,
        get("/public/x").header("authorization", "Basic YTpi"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["reason"], "token_malformed");
}

#[tokio::test]
async fn forged_identity_headers_are_stripped_and_the_assertion_verifies() {
    let cfg = config(backend().await, "    http: { identity_headers: true }\n");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    let t = token(&json!({}));
    let (status, _, echo) = send(
        &mut c,
        get("/app")
            .header("authorization", bearer(&t))
            .header("x-nodegate-user", "root")
            .header("X_Nodegate_Groups", "admins")
            .header("x-nodegate-assertion", "forged")
            .header("x-request-id", "client-chosen"),
    )
    .await;
    assert_eq!(status, 200);
    let h = &echo["headers"];
    assert_eq!(h["x-nodegate-user"], json!(["alice"]));
    assert_eq!(h["x-nodegate-email"], json!(["alice@example.test"]));
    assert_eq!(h["x-nodegate-groups"], json!(["devs"]));
    assert!(h.get("x_nodegate_groups").is_none(), "{h}");
    assert_eq!(h["x-request-id"].as_array().unwrap().len(), 1);
    assert_ne!(h["x-request-id"][0], "client-chosen");
    let assertion = h["x-nodegate-assertion"][0].as_str().unwrap();
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(p.shared.http.signer.jwks()).unwrap();
    let mut v = jsonwebtoken::Validation::new(Algorithm::ES256);
    v.set_audience(&["web"]);
    v.set_issuer(&["nodegate"]);
    let claims = jsonwebtoken::decode::<Value>(
        assertion,
        &jsonwebtoken::DecodingKey::from_jwk(&set.keys[0]).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["jti"], h["x-request-id"][0]);
    let lines = p.requests(1).await;
    assert_eq!(claims["jti"], lines[0]["request_id"]);
}

#[tokio::test]
async fn ambiguous_paths_are_400_before_policy() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let t = token(&json!({}));
    for (target, reason) in [
        ("/admin/../app", "path_dot_segment"),
        ("/%2e%2e/admin", "path_dot_segment"),
        ("/app/%2e%2e/admin", "path_dot_segment"),
        ("/admin%2fusers", "path_encoded_slash"),
        ("/app/..;/admin", "path_semicolon"),
        ("//admin", "path_empty_segment"),
        ("/app%00", "path_nul"),
        ("/%252e%252e/admin", "path_double_encoding"),
    ] {
        let mut s = p.tcp().await;
        s.write_all(
            format!("GET {target} HTTP/1.1\r\nHost: web\r\nAuthorization: Bearer {t}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let reply = read_response(&mut s).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{target}: {reply}");
        assert!(reply.contains(reason), "{target}: {reply}");
    }
    let lines = p.requests(8).await;
    assert!(
        lines
            .iter()
            .all(|l| l["status"] == 400 && l["decision"] == "deny"),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l.get("rule").is_none()));
}

async fn read_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(TIMEOUT, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&out);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|n| n.trim().parse::<usize>().ok());
                    if len.is_some_and(|len| body.len() >= len) {
                        break;
                    }
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn ambiguous_framing_is_refused_never_forwarded() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let cases: &[(&str, &str)] = &[
        (
            "POST /public/x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "framing_cl_and_te",
        ),
        (
            "POST /public/x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            "framing_duplicate_content_length",
        ),
        (
            "POST /public/x HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            "framing_duplicate_content_length",
        ),
        (
            "POST /public/x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "framing_transfer_encoding",
        ),
        (
            "POST /public/x HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            "framing_transfer_encoding",
        ),
        (
            "GET /public/x HTTP/1.1\nHost: web\r\n\r\n",
            "framing_bare_lf",
        ),
        (
            "GET /public/x HTTP/1.1\r\nHost: web\r\n\n",
            "framing_bare_lf",
        ),
        // A good request, then a bad one on the same connection: the first is answered.
        (
            "GET /public/a HTTP/1.1\r\nHost: web\r\n\r\nGET /public/b HTTP/1.1\r\nHost: web\n\r\n",
            "framing_bare_lf",
        ),
    ];
    for (raw, reason) in cases {
        let mut s = p.tcp().await;
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut reply)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.contains("HTTP/1.1 400 Bad Request"),
            "{raw:?}: {reply}"
        );
        assert!(reply.contains(reason), "{raw:?}: {reply}");
        if raw.contains("/public/a") {
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
            assert!(
                reply.contains("/public/a") && !reply.contains("/public/b"),
                "{reply}"
            );
        } else {
            assert!(!reply.contains("\"uri\""), "forwarded: {raw:?}: {reply}");
        }
    }
    let lines = p.requests(cases.len() + 1).await;
    let framing: Vec<_> = lines
        .iter()
        .filter(|l| l["reason"].as_str().unwrap().starts_with("framing_"))
        .collect();
    assert_eq!(framing.len(), cases.len(), "{lines:?}");
    assert!(
        framing
            .iter()
            .all(|l| l["status"] == 400 && l["service"] == "web")
    );
}

#[tokio::test]
async fn duplicate_authorization_and_host_handling() {
    let cfg = config(backend().await, "    http: { hosts: [web.example.test] }\n");
    let p = Proxy::start(&cfg).await;
    let t = token(&json!({}));
    let mut c = p.h1().await;
    let (status, _, body) = send(
        &mut c,
        get("/app")
            .header("authorization", bearer(&t))
            .header("authorization", bearer(&t)),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["reason"], "header_duplicate_authorization");
    // Host is case-insensitive (and may carry a port).
    let (status, _, echo) = send(
        &mut c,
        Request::get("/app")
            .header("host", "WEB.Example.TEST:80")
            .header("authorization", bearer(&t)),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["host"][0], "WEB.Example.TEST:80");
    let (status, _, body) = send(&mut c, Request::get("/app").header("host", "other.test")).await;
    assert_eq!(status, 421);
    assert_eq!(body["reason"], "host_not_served");
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served_per_stream() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let (mut c, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(p.tcp().await))
            .await
            .unwrap();
    tokio::spawn(conn);
    let t = token(&json!({}));
    let req = Request::get("http://web.example.test/app")
        .header("authorization", bearer(&t))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(echo["headers"]["host"][0], "web.example.test");
    let req = Request::get("http://web.example.test/admin")
        .header("authorization", bearer(&t))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(c.send_request(req).await.unwrap().status(), 403);
    let lines = p.requests(2).await;
    assert_eq!(lines[0]["protocol"], "h2");
    assert_eq!(lines[1]["rule"], "no-admin");
}

#[tokio::test]
async fn audit_mode_forwards_would_deny() {
    let cfg = config(backend().await, "    mode: audit\n");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    let (status, _, echo) = send(&mut c, get("/admin/x")).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["uri"], "/admin/x");
    let l = &p.requests(1).await[0];
    assert_eq!(l["decision"], "would_deny");
    assert_eq!(l["reason"], "denied_by_rule");
    assert_eq!(l["mode"], "audit");
}

#[tokio::test]
async fn workload_from_the_source_address() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let (mut c, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(p.tcp_from("127.0.0.9").await))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (status, _, _) = send(&mut c, get("/app")).await;
    assert_eq!(status, 200);
    let l = &p.requests(1).await[0];
    assert_eq!(l["rule"], "ci");
    assert_eq!(l["workload"]["namespace"], "ci");
    assert_eq!(l["workload"]["pod"], "builder-0");
    assert_eq!(l["workload"]["from"], "source");
}

#[tokio::test]
async fn websocket_upgrade_is_authorized_then_spliced() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    // Denied: no upgrade, and the connection closes.
    let mut s = p.tcp().await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let reply = read_response(&mut s).await;
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    // Allowed: 101, then bytes both ways.
    let t = token(&json!({}));
    let mut s = p.tcp().await;
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nAuthorization: Bearer {t}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tokio::time::timeout(TIMEOUT, s.read(&mut b))
                .await
                .unwrap()
                .unwrap(),
            1
        );
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping\n\x00raw").await.unwrap();
    let mut echo = [0u8; 9];
    tokio::time::timeout(TIMEOUT, s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping\n\x00raw");
    let lines = p.requests(2).await;
    assert_eq!(lines[1]["status"], 101);
    assert_eq!(lines[1]["decision"], "allow");
}

#[tokio::test]
async fn reload_swaps_the_policy_for_open_connections() {
    let backend = backend().await;
    let cfg = config(backend, "");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    assert_eq!(send(&mut c, get("/public/x")).await.0, 200);
    let text = format!(
        "node: node-t\ncgroup: /sys/fs/cgroup\nproxy: {{ listen: 127.0.0.2:15001 }}\ngateways: [127.0.0.1]\n\
         services:\n  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{backend}\"]\n    policy: {{ allow: [ {{ id: only-ops, when: {{ groups: ops }} }} ] }}\n"
    );
    let new = Config::parse(&text, Origin::Embedded).unwrap();
    p.shared.routes.store(Arc::new(Routes::new(&new)));
    let (status, _, _) = send(&mut c, get("/public/x")).await;
    assert_eq!(status, 401, "the open connection uses the new policy");
    let lines = p.requests(2).await;
    assert_ne!(lines[0]["policy_version"], lines[1]["policy_version"]);
}

#[tokio::test]
async fn tls_passes_through_under_the_l4_rule_with_its_sni_logged() {
    // A TCP echo "backend": TLS is not terminated, so the bytes arrive as sent.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let hello = crate::proxy::detect::tests::hello("web.example.test");
    for (sources, passes) in [("[127.0.0.0/8]", true), ("[]", false)] {
        let cfg = config(echo, &format!("    allow_sources: {sources}\n"));
        let p = Proxy::start(&cfg).await;
        let mut s = p.tcp().await;
        s.write_all(&hello).await.unwrap();
        let mut back = vec![0u8; hello.len()];
        let got = tokio::time::timeout(TIMEOUT, s.read_exact(&mut back))
            .await
            .unwrap();
        assert_eq!(got.is_ok(), passes, "allow_sources {sources}");
        drop(s);
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let line = loop {
            let lines = p.captured.lines();
            if let Some(l) = lines.iter().find(|l| l["kind"] == "connection") {
                break l.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "{lines:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(line["sni"], "web.example.test", "{line}");
        let want = if passes { "allow" } else { "deny" };
        assert_eq!(line["decision"], want, "{line}");
        assert!(p.requests(0).await.is_empty(), "no request lines for TLS");
    }
}

#[tokio::test]
async fn an_http10_backend_does_not_end_the_clients_keep_alive() {
    // Answers `HTTP/1.0` + `Connection: close` and closes: hop-by-hop, between gateway and backend.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    let cfg = config(backend, "");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    for _ in 0..2 {
        client_ok(&mut c).await;
    }
    let lines = p.requests(2).await;
    assert_eq!(lines[0]["src"], lines[1]["src"], "one client connection");
}

async fn client_ok(c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) {
    c.ready()
        .await
        .expect("the client connection is still open");
    let resp = c
        .send_request(get("/public/x").body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert!(!resp.headers().contains_key("connection"));
}

/// A stand-in for the login module: a session cookie `ng_session=alice`, a 302 to start a
/// login, and a 200 for the reserved paths.
struct FakeLogin;

impl LoginFlow for FakeLogin {
    fn session<'a>(
        &'a self,
        _service: &'a str,
        headers: &'a hyper::HeaderMap,
        _tls: bool,
    ) -> authn::SessionFuture<'a> {
        let cookie = headers.get(header::COOKIE).cloned();
        Box::pin(async move {
            let Some(cookie) = cookie else {
                return authn::SessionLookup::NoSession;
            };
            let mut response_headers = hyper::HeaderMap::new();
            let alice = cookie
                .to_str()
                .unwrap_or_default()
                .split(';')
                .any(|pair| pair.trim() == "ng_session=alice");
            if !alice {
                response_headers.append(
                    header::SET_COOKIE,
                    HeaderValue::from_static("ng_session=; Max-Age=0"),
                );
                return authn::SessionLookup::Refused {
                    reason: "session_invalid",
                    response_headers,
                };
            }
            let mut id = Identity::anonymous();
            id.kind = crate::auth::IdentityKind::User;
            id.subject = "alice".into();
            id.groups = vec!["devs".into()];
            id.issuer = ISSUER.into();
            response_headers.append(
                header::SET_COOKIE,
                HeaderValue::from_static("ng_session=alice; Max-Age=60"),
            );
            response_headers.append(header::SET_COOKIE, HeaderValue::from_static("ng_csrf=1"));
            authn::SessionLookup::Valid {
                identity: Arc::new(id),
                response_headers,
            }
        })
    }

    fn start<'a>(&'a self, req: LoginRequest<'a>) -> authn::LoginFuture<'a> {
        let host = req.host.unwrap_or_default();
        let response = Response::builder()
            .status(302)
            .header(
                "location",
                format!("https://idp.test/authorize?rd=//{host}{}", req.target),
            )
            .body(response::full(Bytes::new()))
            .unwrap();
        Box::pin(async move {
            authn::LoginAnswer {
                response,
                allowed: true,
                reason: "login_start",
                identity: None,
            }
        })
    }

    fn reserved<'a>(&'a self, req: LoginRequest<'a>) -> authn::LoginFuture<'a> {
        let path = req.target.split('?').next().unwrap_or_default().to_owned();
        Box::pin(async move {
            let (status, allowed, reason) = if path == authn::CALLBACK_PATH {
                (200, true, "login_callback")
            } else {
                (404, false, "reserved_path")
            };
            authn::LoginAnswer {
                response: Response::builder()
                    .status(status)
                    .body(response::full(path))
                    .unwrap(),
                allowed,
                reason,
                identity: None,
            }
        })
    }

    fn strip_cookies(&self, headers: &mut hyper::HeaderMap) {
        crate::auth::cookie::remove_cookies(headers, |name| name.starts_with("ng_"));
    }
}

#[tokio::test]
async fn the_login_seam_session_redirect_and_reserved_paths() {
    let cfg = config(backend().await, "    http: { login: true }\n");
    let p = Proxy::start_with(&cfg, Some(Arc::new(FakeLogin))).await;
    let mut c = p.h1().await;
    let (status, headers, _) = send(&mut c, get("/app?x=1").header("accept", "text/html")).await;
    assert_eq!(status, 302);
    assert_eq!(
        headers["location"],
        "https://idp.test/authorize?rd=//web.example.test/app?x=1"
    );
    // An API client still gets a 401, with the scheme to authenticate with.
    let (status, headers, _) = send(&mut c, get("/app")).await;
    assert_eq!(status, 401);
    assert_eq!(
        headers[header::WWW_AUTHENTICATE],
        "Bearer realm=\"nodegate\""
    );
    let (status, headers, echo) =
        send(&mut c, get("/app").header("cookie", "ng_session=alice")).await;
    assert_eq!(status, 200, "{echo}");
    // The gateway's cookie is its credential, not the backend's.
    assert!(echo["headers"].get("cookie").is_none(), "{echo}");
    // The session's response headers reach the client, every Set-Cookie of them.
    assert_eq!(headers.get_all(header::SET_COOKIE).iter().count(), 2);
    // A refused session is a fresh login for a browser, never the identity.
    let (status, _, _) = send(
        &mut c,
        get("/app")
            .header("cookie", "ng_session=mallory")
            .header("accept", "text/html"),
    )
    .await;
    assert_eq!(status, 302);
    assert_eq!(send(&mut c, get("/.nodegate/callback?code=x")).await.0, 200);
    let (_, headers, _) = send(&mut c, get("/app").header("cookie", "x=1")).await;
    assert_eq!(
        headers[header::SET_COOKIE],
        "ng_session=; Max-Age=0",
        "a refused session is cleared"
    );
    assert_eq!(send(&mut c, get("/.nodegate/other")).await.0, 404);
    // Reserved after canonicalization: an encoded dot is still the gateway's path.
    let (status, _, body) = send(&mut c, get("/%2Enodegate/callback?code=x")).await;
    assert_eq!(status, 200, "{body}");
    // Other cookies reach the backend, the gateway's do not.
    let (status, _, echo) = send(
        &mut c,
        get("/app").header("cookie", "a=1; ng_session=alice; ng_flow_x=2; b=2"),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["cookie"], json!(["a=1; b=2"]), "{echo}");
    let lines = p.requests(9).await;
    assert_eq!(lines[2]["identity"]["subject"], "alice");
    // A refused session cookie is the reason of the denial (and a login for a browser).
    assert_eq!(lines[3]["decision"], "deny");
    assert_eq!(lines[3]["reason"], "session_invalid");
    assert_eq!(lines[3]["status"], 302);
    assert_eq!(lines[4]["reason"], "login_callback");
    assert_eq!(lines[4]["decision"], "allow");
    assert_eq!(lines[5]["reason"], "session_invalid");
    assert_eq!(lines[5]["status"], 401);
    assert_eq!(lines[6]["decision"], "deny");
    assert_eq!(lines[6]["reason"], "reserved_path");
    assert_eq!(lines[7]["path"], "/.nodegate/callback");
    assert_eq!(lines[7]["reason"], "login_callback");
}

#[tokio::test]
async fn reserved_paths_are_never_forwarded_without_login() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    let (status, _, body) = send(&mut c, get("/.nodegate/callback?code=x")).await;
    assert_eq!(status, 404);
    assert_eq!(body["reason"], "reserved_path");
}

#[tokio::test]
async fn draining_closes_idle_keep_alive_connections_at_once() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let mut c = p.h1().await;
    assert_eq!(send(&mut c, get("/public/x")).await.0, 200);
    drain_closes_at_once(p, c).await;
}

/// The proxy drains; the idle connection `c` is closed at once.
async fn drain_closes_at_once(
    p: Proxy,
    mut c: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) {
    let started = tokio::time::Instant::now();
    p.shutdown.send(true).unwrap();
    let served = tokio::time::timeout(TIMEOUT, p.task)
        .await
        .unwrap()
        .unwrap();
    assert!(served.is_ok());
    // Well before the 5 s drain timeout: the idle connection did not hold the drain up.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let closed = match c.ready().await {
        Err(_) => true,
        Ok(()) => c
            .send_request(get("/public/x").body(Full::new(Bytes::new())).unwrap())
            .await
            .is_err(),
    };
    assert!(closed, "the idle connection is still open");
}

/// A keep-alive connection idle for `idle::RELEASE_AFTER` is released from hyper (its
/// buffers dropped) and served by a new hyper connection when the next bytes come: keep-alive
/// holds, the start of a pipelined request that hyper had read is not lost, a refused framing is
/// still answered, and draining closes a released connection at once.
#[tokio::test]
async fn idle_keep_alive_connections_are_released_and_served_again() {
    let cfg = config(backend().await, "");
    let p = Proxy::start(&cfg).await;
    let pause = idle::RELEASE_AFTER * 3;
    let mut s = p.tcp().await;
    // A request and the start of the next: hyper answers the first, then waits for the rest.
    s.write_all(b"GET /public/a HTTP/1.1\r\nHost: web\r\n\r\nGET /public/b HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let reply = read_response(&mut s).await;
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("/public/a"),
        "{reply}"
    );
    tokio::time::sleep(pause).await;
    s.write_all(b"st: web\r\n\r\n").await.unwrap();
    let reply = read_response(&mut s).await;
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.contains("/public/b"),
        "{reply}"
    );
    assert!(
        !reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );
    for path in ["/public/c", "/public/d"] {
        tokio::time::sleep(pause).await;
        let raw = format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n");
        s.write_all(raw.as_bytes()).await.unwrap();
        let reply = read_response(&mut s).await;
        assert!(
            reply.starts_with("HTTP/1.1 200") && reply.contains(path),
            "{reply}"
        );
    }
    tokio::time::sleep(pause).await;
    s.write_all(b"GET /public/e HTTP/1.1\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 400") && reply.contains("framing_bare_lf"),
        "{reply}"
    );
    let lines = p.requests(5).await;
    assert!(
        lines.iter().all(|l| l["src"] == lines[0]["src"]),
        "one connection: {lines:?}"
    );

    // Released, then the proxy drains: closed at once.
    let mut c = p.h1().await;
    assert_eq!(send(&mut c, get("/public/x")).await.0, 200);
    tokio::time::sleep(pause).await;
    drain_closes_at_once(p, c).await;
}

/// The decision line's method: the standard ones borrowed, any other (an extension method)
/// copied, and clipped like every request-controlled string.
#[test]
fn method_names_are_static_for_the_standard_methods() {
    for name in [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ] {
        let method = Method::from_bytes(name.as_bytes()).unwrap();
        assert!(
            matches!(method_name(&method), Cow::Borrowed(n) if n == name),
            "{name}"
        );
    }
    let purge = Method::from_bytes(b"PURGE").unwrap();
    assert!(matches!(method_name(&purge), Cow::Owned(n) if n == "PURGE"));
    // Methods are case-sensitive: `get` is an extension method, not GET.
    let lower = Method::from_bytes(b"get").unwrap();
    assert!(matches!(method_name(&lower), Cow::Owned(n) if n == "get"));
    let long = Method::from_bytes("X".repeat(2000).as_bytes()).unwrap();
    assert_eq!(method_name(&long), clip(&"X".repeat(2000)));
    assert!(method_name(&long).len() < 2000);
}
