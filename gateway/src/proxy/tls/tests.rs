//! In-process TLS tests: rustls clients ↔ the real accept loop and request path on 127.0.0.1
//! (fake original destinations) ↔ plain and TLS echo backends; certificates from rcgen (a CA,
//! servers, clients with SPIFFE IDs, an expired client, a client of another CA).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client::TlsStream};

use crate::{
    config::{Config, ConfigError, Origin},
    ebpf::OrigDst,
    proxy::{OrigDstLookup, Routes, Shared, bind, http::tests::context},
    telemetry::{Metrics, decision::capture::Captured},
};

const WEB_VIP: &str = "10.96.0.10:443";
const API_VIP: &str = "10.96.0.11:443";
const WEB: &str = "web.example.test";
const API: &str = "api.example.test";
const ALLOWED: &str = "spiffe://td.test/ns/ci/sa/builder";
const OTHER: &str = "spiffe://td.test/ns/ci/sa/intruder";
const TIMEOUT: Duration = Duration::from_secs(5);

/// A CA that signs certificates into files of a temporary directory.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A leaf: (certificate PEM, key PEM).
    fn leaf(&self, cn: &str, sans: Vec<SanType>, client: bool, expired: bool) -> (String, String) {
        self.leaf_numbered(cn, sans, client, expired, None)
    }

    /// A leaf with the given serial number.
    fn leaf_numbered(
        &self,
        cn: &str,
        sans: Vec<SanType>,
        client: bool,
        expired: bool,
        serial: Option<u64>,
    ) -> (String, String) {
        let mut params = CertificateParams::default();
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A CRL (PEM) of this CA revoking the certificates with the `revoked` serial numbers.
    fn crl(&self, number: u64, revoked: &[u64]) -> String {
        rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2026, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().unwrap())
}

/// A fresh directory for one test's files.
fn dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "nodegate-tls-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The PKI of a test: the gateway's and the backends' CA, the clients' CA, another CA.
struct Pki {
    dir: PathBuf,
    ca: Ca,
    clients: Ca,
    other: Ca,
}

impl Pki {
    fn new() -> Self {
        let dir = dir();
        let pki = Self {
            ca: Ca::new("Nodegate Test CA"),
            clients: Ca::new("Clients CA"),
            other: Ca::new("Other CA"),
            dir,
        };
        write(&pki.dir, "ca.pem", &pki.ca.pem);
        write(&pki.dir, "clients-ca.pem", &pki.clients.pem);
        pki.server("web", WEB);
        pki.server("api", API);
        pki
    }

    /// `<name>.crt` / `<name>.key`: a server certificate for `host`.
    fn server(&self, name: &str, host: &str) {
        let (cert, key) = self.ca.leaf(host, vec![dns(host)], false, false);
        write(&self.dir, &format!("{name}.crt"), &cert);
        write(&self.dir, &format!("{name}.key"), &key);
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// A client certificate and key signed by `ca`.
    fn client(
        ca: &Ca,
        spiffe: &str,
        expired: bool,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        Self::numbered_client(ca, spiffe, expired, None)
    }

    /// A client certificate and key signed by `ca`, with a serial number.
    fn numbered_client(
        ca: &Ca,
        spiffe: &str,
        expired: bool,
        serial: Option<u64>,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let (cert, key) = ca.leaf_numbered("client", vec![uri(spiffe)], true, expired, serial);
        (
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
    }
}

const POLICY: &str = r"
    policy:
      allow:
        - id: builder
          when: { spiffe_id: 'spiffe://td.test/ns/ci/sa/builder' }
        - id: public
          when: { path: { prefix: /public } }";

/// Two TLS services (`web` asks for optional client certificates, `api` requires them and
/// talks TLS to its backend when `api_upstream` is given).
fn config(
    pki: &Pki,
    web_backend: SocketAddr,
    api_backend: SocketAddr,
    api_upstream: &str,
) -> Config {
    let text = format!(
        "node: node-t\ncgroup: /sys/fs/cgroup\nproxy:\n  listen: 127.0.0.2:15001\n  connect_timeout_ms: 1000\n\
         gateways: [127.0.0.1]\n\
         services:\n\
         \x20 - name: web\n    vips: [\"{WEB_VIP}\"]\n    endpoints: [\"{web_backend}\"]\n\
         \x20   http: {{ hosts: [{WEB}] }}\n\
         \x20   tls: {{ cert_file: \"{}\", key_file: \"{}\", client_ca_file: \"{}\", client_cert: optional }}\n{POLICY}\n\
         \x20 - name: api\n    vips: [\"{API_VIP}\"]\n    endpoints: [\"{api_backend}\"]\n\
         \x20   tls: {{ cert_file: \"{}\", key_file: \"{}\", client_ca_file: \"{}\" }}\n{api_upstream}{POLICY}\n",
        pki.path("web.crt"),
        pki.path("web.key"),
        pki.path("clients-ca.pem"),
        pki.path("api.crt"),
        pki.path("api.key"),
        pki.path("clients-ca.pem"),
    );
    Config::parse(&text, Origin::Embedded).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// [`config`] with plain web and api backends, and the proxy serving it.
async fn two_services(pki: &Pki) -> (Config, Proxy) {
    let cfg = config(
        pki,
        backend("web", None).await,
        backend("api", None).await,
        "",
    );
    let proxy = Proxy::start(&cfg).await;
    (cfg, proxy)
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

struct Proxy {
    addr: SocketAddr,
    orig: Arc<FakeOrig>,
    metrics: Arc<Metrics>,
    captured: Captured,
    _shutdown: watch::Sender<bool>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Proxy {
    /// On a current-thread runtime (the capturing subscriber is per thread); spawns the proxy.
    async fn start(config: &Config) -> Self {
        tokio::task::yield_now().await;
        let captured = Captured::default();
        let guard = captured.install();
        let listeners = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let orig = Arc::new(FakeOrig::default());
        let routes = Routes::shared(config);
        let http = context(config, routes.clone());
        let metrics = Arc::new(Metrics::new(None));
        let shared = Arc::new(Shared {
            node: config.node.as_str().into(),
            routes,
            orig: Box::new(orig.clone()),
            metrics: metrics.clone(),
            mark: None,
            http,
        });
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(crate::proxy::serve(listeners, shared, rx, TIMEOUT));
        Self {
            addr,
            orig,
            metrics,
            captured,
            _shutdown: shutdown,
            _guard: guard,
        }
    }

    /// A TCP connection as if redirected from `vip`.
    async fn tcp(&self, vip: &str) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = socket.local_addr().unwrap();
        self.orig
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                local,
                OrigDst {
                    dst: vip.parse().unwrap(),
                    service_id: 0,
                    cgroup_id: 42,
                    pid: 1,
                },
            );
        socket.connect(self.addr).await.unwrap()
    }

    /// A TLS connection to `vip` asking for `sni`, trusting `pki.ca`, with an optional client
    /// certificate and ALPN protocols.
    async fn tls(
        &self,
        pki: &Pki,
        vip: &str,
        sni: &str,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        alpn: &[&[u8]],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca.pem.as_bytes()).unwrap())
            .unwrap();
        let builder = ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match client {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, self.tcp(vip).await)
            .await
    }

    /// Decision lines of `kind` so far, waiting for at least `n`.
    async fn lines(&self, kind: &str, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let lines: Vec<_> = self
                .captured
                .lines()
                .into_iter()
                .filter(|l| l["kind"] == kind)
                .collect();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                self.captured.lines()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The DNS names of the server certificate a connection got.
fn server_names(stream: &TlsStream<TcpStream>) -> Vec<String> {
    let cert = &stream.get_ref().1.peer_certificates().unwrap()[0];
    crate::auth::cert::CertIdentity::from_der(cert)
        .unwrap()
        .dns_sans
}

/// A backend answering `<name> <path>` and the headers it got as JSON; with `tls`, over TLS
/// with that certificate and key.
async fn backend(name: &'static str, tls: Option<(&Path, &Path)>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.map(|(cert, key)| {
        let chain = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let headers: serde_json::Map<String, Value> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
                        .collect();
                    let body =
                        json!({"backend": name, "path": req.uri().path(), "headers": headers});
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        Bytes::from(body.to_string()),
                    )))
                });
                let server = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(a) => {
                        if let Ok(s) = a.accept(s).await {
                            let _ = server.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                    None => {
                        let _ = server.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
            });
        }
    });
    addr
}

/// One GET over HTTP/1.1 (or h2 when ALPN chose it) on `stream`: status and JSON body.
async fn get(
    stream: TlsStream<TcpStream>,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut req = Request::get(if h2 {
        format!("https://{host}{path}")
    } else {
        path.to_owned()
    });
    if !h2 {
        req = req.header("host", host);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let resp = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        send.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn sni_selects_the_service_its_certificate_and_policy() {
    let pki = Pki::new();
    let (_, p) = two_services(&pki).await;
    let builder = Pki::client(&pki.clients, ALLOWED, false);

    // Dialed web's VIP, asked for web: web's certificate, web's backend, h2 by ALPN.
    let s = p
        .tls(&pki, WEB_VIP, WEB, None, &[b"h2", b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(server_names(&s), [WEB]);
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (status, body) = get(s, WEB, "/public/x", &[]).await;
    assert_eq!((status, body["backend"].as_str()), (200, Some("web")));
    let line = &p.lines("request", 1).await[0];
    assert_eq!(line["service"], "web", "{line}");
    assert_eq!(line["protocol"], "h2", "{line}");
    assert_eq!(line["tls"]["sni"], WEB, "{line}");

    // Dialed web's VIP, asked for api: api's certificate, its client-certificate rule, backend.
    let s = p
        .tls(&pki, WEB_VIP, API, Some(builder), &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(server_names(&s), [API]);
    let (status, body) = get(s, API, "/x", &[]).await;
    assert_eq!((status, body["backend"].as_str()), (200, Some("api")));
    let line = &p.lines("request", 2).await[1];
    assert_eq!(line["service"], "api", "{line}");
    assert_eq!(line["rule"], "builder", "{line}");
    assert_eq!(line["tls"]["client_cert"]["spiffe_id"], ALLOWED, "{line}");

    // An unknown name: the dialed service's certificate is the default (a client that checks
    // the name refuses it).
    let err = p
        .tls(&pki, WEB_VIP, "nothing.example.test", None, &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not valid for name"), "{err}");
}

/// A protected Service from Kubernetes (no `tls:` of its own: its label and policy cannot say
/// it) terminates TLS with the certificate its `kubernetes.services` entry names.
#[tokio::test]
async fn a_kubernetes_service_terminates_tls_with_its_kubernetes_services_settings() {
    use crate::source::{
        apply,
        model::{ObjectKey, PolicyBinding, PolicySource, ProtectedService, Snapshot},
    };
    let pki = Pki::new();
    let base = format!(
        "node: node-t\ncgroup: /sys/fs/cgroup\nproxy:\n  listen: 127.0.0.2:15001\n  connect_timeout_ms: 1000\n\
         gateways: [127.0.0.1]\nkubernetes:\n  services:\n\
         \x20   shop/web:\n      http: {{ hosts: [{WEB}] }}\n\
         \x20     tls: {{ cert_file: \"{}\", key_file: \"{}\", client_ca_file: \"{}\", client_cert: optional }}\n",
        pki.path("web.crt"),
        pki.path("web.key"),
        pki.path("clients-ca.pem"),
    );
    let base = Config::parse(&base, Origin::Embedded).unwrap_or_else(|e| panic!("{e}\n{base}"));
    let key = ObjectKey::new("shop", "web");
    let web = ProtectedService {
        key: key.clone(),
        mode: crate::ebpf::Mode::Enforce,
        vips: vec![WEB_VIP.parse().unwrap()],
        endpoints: vec![backend("web", None).await],
        not_ready_endpoints: Vec::new(),
        policy: PolicyBinding::Policy {
            source: PolicySource::AccessPolicy("web".into()),
            document: serde_yaml::from_str(POLICY.trim_start().trim_start_matches("policy:"))
                .unwrap(),
        },
        warnings: Vec::new(),
    };
    let snapshot = Snapshot {
        services: [(key, web)].into(),
        pods: std::collections::BTreeMap::new(),
        gateways: Vec::new(),
    };
    let merged = apply::merge(&base, &snapshot, Path::new("/nonexistent"));
    assert!(merged.warnings.is_empty(), "{:?}", merged.warnings);
    let p = Proxy::start(&merged.config).await;

    let s = p
        .tls(&pki, WEB_VIP, WEB, None, &[b"http/1.1"])
        .await
        .unwrap();
    assert_eq!(server_names(&s), [WEB]);
    let (status, body) = get(s, WEB, "/public/x", &[]).await;
    assert_eq!((status, body["backend"].as_str()), (200, Some("web")));
    let line = &p.lines("request", 1).await[0];
    assert_eq!(line["service"], "shop/web", "{line}");
    assert_eq!(line["rule"], "public", "{line}");
    assert_eq!(line["tls"]["sni"], WEB, "{line}");

    // The client certificate is an identity for the AccessPolicy's `spiffe_id` rule.
    let builder = Pki::client(&pki.clients, ALLOWED, false);
    let s = p
        .tls(&pki, WEB_VIP, WEB, Some(builder), &[b"h2"])
        .await
        .unwrap();
    let (status, _) = get(s, WEB, "/private", &[]).await;
    assert_eq!(status, 200);
    let line = &p.lines("request", 2).await[1];
    assert_eq!(line["rule"], "builder", "{line}");
    assert_eq!(line["tls"]["client_cert"]["spiffe_id"], ALLOWED, "{line}");

    // Another Host than the entry's hosts: 421, as for a static service.
    let s = p
        .tls(&pki, WEB_VIP, WEB, None, &[b"http/1.1"])
        .await
        .unwrap();
    let (status, _) = get(s, "elsewhere.example.test", "/public/x", &[]).await;
    assert_eq!(status, 421);
}

#[tokio::test]
async fn client_certificates_are_identities_for_policy_and_refused_when_invalid() {
    let pki = Pki::new();
    let (_, p) = two_services(&pki).await;

    // Allowed by its SPIFFE ID; identity headers sent by the client are not an identity.
    let s = p
        .tls(
            &pki,
            WEB_VIP,
            WEB,
            Some(Pki::client(&pki.clients, ALLOWED, false)),
            &[],
        )
        .await
        .unwrap();
    let (status, body) = get(s, WEB, "/x", &[("x-nodegate-user", "admin")]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["headers"].get("x-nodegate-user").is_none(), "{body}");
    let line = &p.lines("request", 1).await[0];
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["tls"]["client_cert"]["subject"], "CN=client", "{line}");
    assert_eq!(
        line["tls"]["client_cert"]["uri_sans"],
        json!([ALLOWED]),
        "{line}"
    );

    // A verified certificate with another SPIFFE ID: an identity, denied by policy (403).
    let s = p
        .tls(
            &pki,
            WEB_VIP,
            WEB,
            Some(Pki::client(&pki.clients, OTHER, false)),
            &[],
        )
        .await
        .unwrap();
    let (status, _) = get(s, WEB, "/x", &[]).await;
    assert_eq!(status, 403);
    let line = &p.lines("request", 2).await[1];
    assert_eq!(
        (line["decision"].as_str(), line["reason"].as_str()),
        (Some("deny"), Some("no_rule_matched")),
        "{line}"
    );
    assert_eq!(line["tls"]["client_cert"]["spiffe_id"], OTHER, "{line}");

    // Optional: no certificate, anonymous (401), and the public path still works.
    let s = p.tls(&pki, WEB_VIP, WEB, None, &[]).await.unwrap();
    assert_eq!(get(s, WEB, "/x", &[]).await.0, 401);

    // Expired, and from another CA: the handshake is refused and logged.
    let mut refused = 0;
    for (client, what) in [
        (Pki::client(&pki.clients, ALLOWED, true), "expired"),
        (Pki::client(&pki.other, ALLOWED, false), "another CA"),
    ] {
        // TLS 1.3: the client finishes first; the refusal arrives on its first read.
        if let Ok(s) = p.tls(&pki, WEB_VIP, WEB, Some(client), &[]).await {
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get("/x")
                .header("host", WEB)
                .body(Empty::new())
                .unwrap();
            assert!(send.send_request(req).await.is_err(), "{what}: answered");
        }
        refused += 1;
        let line = &p.lines("connection", refused).await[refused - 1];
        assert_eq!(line["decision"], "deny", "{what}: {line}");
        assert_eq!(line["reason"], "client_cert_invalid", "{what}: {line}");
        assert_eq!(line["service"], "web", "{what}: {line}");
        assert_eq!(line["sni"], WEB, "{what}: {line}");
    }
    let detail = p.lines("connection", 2).await[0]["detail"].to_string();
    assert!(detail.contains("expired"), "{detail}");

    // Required (api): no certificate, no connection.
    if let Ok(s) = p.tls(&pki, API_VIP, API, None, &[]).await {
        let _ = get_refused(s).await;
    }
    let line = &p.lines("connection", 3).await[2];
    assert_eq!(line["reason"], "client_cert_required", "{line}");
    assert_eq!(line["service"], "api", "{line}");
    // None of the refused requests got a request line (never passed on).
    assert_eq!(p.lines("request", 3).await.len(), 3);
}

/// `client_crl_file`: a revoked client certificate is refused at the handshake
/// (`client_cert_revoked`), another one of the same CA is served, and a new list (re-read like
/// the other TLS files) revokes the next one.
#[tokio::test]
async fn revoked_client_certificates_are_refused() {
    const KEPT: u64 = 0x1001;
    const REVOKED: u64 = 0x1002;
    let pki = Pki::new();
    let crl = write(&pki.dir, "clients.crl", &pki.clients.crl(1, &[REVOKED]));
    let text = format!(
        "node: node-t\ncgroup: /sys/fs/cgroup\nproxy:\n  listen: 127.0.0.2:15001\n  connect_timeout_ms: 1000\n\
         gateways: [127.0.0.1]\nservices:\n\
         \x20 - name: web\n    vips: [\"{WEB_VIP}\"]\n    endpoints: [\"{}\"]\n\
         \x20   http: {{ hosts: [{WEB}] }}\n\
         \x20   tls: {{ cert_file: \"{}\", key_file: \"{}\", client_ca_file: \"{}\", client_crl_file: \"{}\" }}\n{POLICY}\n",
        backend("web", None).await,
        pki.path("web.crt"),
        pki.path("web.key"),
        pki.path("clients-ca.pem"),
        crl.display(),
    );
    let cfg = Config::parse(&text, Origin::Embedded).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let p = Proxy::start(&cfg).await;
    let kept = || {
        Some(Pki::numbered_client(
            &pki.clients,
            ALLOWED,
            false,
            Some(KEPT),
        ))
    };
    let revoked = || {
        Some(Pki::numbered_client(
            &pki.clients,
            ALLOWED,
            false,
            Some(REVOKED),
        ))
    };

    let s = p.tls(&pki, WEB_VIP, WEB, kept(), &[]).await.unwrap();
    assert_eq!(get(s, WEB, "/x", &[]).await.0, 200);
    assert_eq!(p.lines("request", 1).await[0]["rule"], "builder");

    // Refused at the handshake (TLS 1.3: seen on the client's first read), and logged.
    let refused = |n: usize| {
        let p = &p;
        async move {
            let line = p.lines("connection", n).await[n - 1].clone();
            assert_eq!(line["decision"], "deny", "{line}");
            assert_eq!(line["reason"], "client_cert_revoked", "{line}");
            assert!(line["detail"].to_string().contains("Revoked"), "{line}");
        }
    };
    if let Ok(s) = p.tls(&pki, WEB_VIP, WEB, revoked(), &[]).await {
        assert!(get_refused(s).await, "a revoked certificate was served");
    }
    refused(1).await;

    // A new list revokes the other one too: new handshakes with it are refused.
    write(
        &pki.dir,
        "clients.crl",
        &pki.clients.crl(2, &[REVOKED, KEPT]),
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut served = 1;
    loop {
        let answered = match p.tls(&pki, WEB_VIP, WEB, kept(), &[]).await {
            Ok(s) => !get_refused(s).await,
            Err(_) => false,
        };
        if !answered {
            break;
        }
        served += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new CRL was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    refused(2).await;
    // Nothing refused was passed on: a request line for each request served, no more.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(p.lines("request", served).await.len(), served);
}

/// Plain HTTP to a service that terminates TLS never skips the handshake (and with it a
/// required client certificate): HTTP/1.1 gets nginx's answer to plain HTTP on an HTTPS port
/// (400) and h2c is closed, each with a connection line; nothing reaches the backend.
#[tokio::test]
async fn plain_http_to_a_tls_service_is_refused() {
    let pki = Pki::new();
    let (cfg, p) = two_services(&pki).await;
    // `api` requires a client certificate; its policy allows `/public` to anyone.
    let (status, body) = plain_get(p.tcp(API_VIP).await, API, "/public/x").await;
    assert_eq!(status, Some(400), "{body}");
    assert!(body.contains("plain_http_to_tls"), "{body}");
    let line = &p.lines("connection", 1).await[0];
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], "plain_http_to_tls", "{line}");
    assert_eq!(line["service"], "api", "{line}");

    // h2c prior knowledge: closed without an answer.
    let mut s = p.tcp(WEB_VIP).await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut rest)).await;
    let line = &p.lines("connection", 2).await[1];
    assert_eq!(line["reason"], "plain_http_to_tls", "{line}");
    assert_eq!(line["service"], "web", "{line}");
    assert!(p.captured.lines().iter().all(|l| l["kind"] != "request"));
    drop(p);

    // Audit mode: logged as would_deny, then served (and the request decided as usual).
    let mut audit = cfg.clone();
    for service in &mut audit.services {
        service.mode = crate::ebpf::Mode::Audit;
    }
    let p = Proxy::start(&audit).await;
    let (status, body) = plain_get(p.tcp(WEB_VIP).await, WEB, "/public/x").await;
    assert_eq!(status, Some(200), "{body}");
    let line = &p.lines("connection", 1).await[0];
    assert_eq!(line["decision"], "would_deny", "{line}");
    assert_eq!(line["reason"], "plain_http_to_tls", "{line}");
    assert_eq!(p.lines("request", 1).await[0]["decision"], "allow");
}

/// `GET path` in plain HTTP/1.1 on `s`: the status (`None`: no answer) and the whole answer.
async fn plain_get(mut s: TcpStream, host: &str, path: &str) -> (Option<u16>, String) {
    let head = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    (status, answer)
}

/// Sends a request on a connection the server is about to refuse; whether it failed.
async fn get_refused(s: TlsStream<TcpStream>) -> bool {
    let Ok((mut send, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s)).await
    else {
        return true;
    };
    tokio::spawn(conn);
    let req = Request::get("/x").body(Empty::new()).unwrap();
    send.send_request(req).await.is_err()
}

#[tokio::test]
async fn backend_tls_is_verified_against_the_configured_ca() {
    let pki = Pki::new();
    // A backend certificate for 127.0.0.1 from the CA, and one from another CA.
    let (cert, key) = pki.ca.leaf(
        "backend",
        vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
        false,
        false,
    );
    let good = (
        write(&pki.dir, "b.crt", &cert),
        write(&pki.dir, "b.key", &key),
    );
    let (cert, key) = pki.other.leaf(
        "rogue",
        vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
        false,
        false,
    );
    let bad = (
        write(&pki.dir, "r.crt", &cert),
        write(&pki.dir, "r.key", &key),
    );
    let upstream = format!(
        "    upstream_tls: {{ ca_file: \"{}\" }}\n",
        pki.path("ca.pem")
    );
    let client = || Some(Pki::client(&pki.clients, ALLOWED, false));

    let good_backend = backend("good", Some((&good.0, &good.1))).await;
    let cfg = config(&pki, backend("web", None).await, good_backend, &upstream);
    let p = Proxy::start(&cfg).await;
    let s = p.tls(&pki, API_VIP, API, client(), &[]).await.unwrap();
    let (status, body) = get(s, API, "/x", &[]).await;
    assert_eq!((status, body["backend"].as_str()), (200, Some("good")));

    let bad_backend = backend("rogue", Some((&bad.0, &bad.1))).await;
    let cfg = config(&pki, backend("web", None).await, bad_backend, &upstream);
    let p = Proxy::start(&cfg).await;
    let s = p.tls(&pki, API_VIP, API, client(), &[]).await.unwrap();
    let (status, _) = get(s, API, "/x", &[]).await;
    assert_eq!(status, 502);
    let line = &p.lines("request", 1).await[0];
    assert_eq!(line["reason"], "upstream_cert_invalid", "{line}");
    assert_eq!(line["decision"], "deny", "{line}");
}

/// `upstream_tls.ca_file` replaced while the gateway runs (a backend CA rotation): the next
/// new backend connection verifies against the new CA; a CA file that does not load keeps the
/// running one.
#[tokio::test]
async fn a_replaced_upstream_ca_applies_to_new_backend_connections() {
    let pki = Pki::new();
    // The backend's certificate comes from the other CA, which the gateway does not trust yet.
    let (cert, key) = pki.other.leaf(
        "backend",
        vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
        false,
        false,
    );
    let cert = write(&pki.dir, "b.crt", &cert);
    let key = write(&pki.dir, "b.key", &key);
    let ca_file = write(&pki.dir, "backend-ca.pem", &pki.ca.pem);
    let upstream = format!(
        "    upstream_tls: {{ ca_file: \"{}\" }}\n",
        ca_file.display()
    );
    let cfg = config(
        &pki,
        backend("web", None).await,
        backend("rotated", Some((&cert, &key))).await,
        &upstream,
    );
    let p = Proxy::start(&cfg).await;
    let client = || Some(Pki::client(&pki.clients, ALLOWED, false));
    let s = p.tls(&pki, API_VIP, API, client(), &[]).await.unwrap();
    assert_eq!(get(s, API, "/x", &[]).await.0, 502);
    let line = &p.lines("request", 1).await[0];
    assert_eq!(line["reason"], "upstream_cert_invalid", "{line}");

    // Garbage first: refused, the running CA stays (still 502, not a plaintext or unverified
    // connection).
    std::fs::write(&ca_file, "not a CA\n").unwrap();
    tokio::time::sleep(super::RELOAD_POLL * 2).await;
    let s = p.tls(&pki, API_VIP, API, client(), &[]).await.unwrap();
    assert_eq!(get(s, API, "/x", &[]).await.0, 502);

    // The new CA: new backend connections verify against it.
    let tmp = pki.dir.join("backend-ca.tmp");
    std::fs::write(&tmp, &pki.other.pem).unwrap();
    std::fs::rename(&tmp, &ca_file).unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let s = p.tls(&pki, API_VIP, API, client(), &[]).await.unwrap();
        let (status, body) = get(s, API, "/x", &[]).await;
        if status == 200 {
            assert_eq!(body["backend"], "rotated");
            break;
        }
        assert_eq!(status, 502);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new upstream CA was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `nodegate_tls_certificate_expiry_timestamp_seconds{service}`: the certificate in use, also
/// after it is replaced.
#[tokio::test]
async fn the_expiry_of_each_certificate_in_use_is_a_metric() {
    let pki = Pki::new();
    let leaf = |year: i32| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, WEB);
        params.subject_alt_names = vec![dns(WEB)];
        params.not_after = rcgen::date_time_ymd(year, 5, 6);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &pki.ca.issuer).unwrap();
        write(&pki.dir, "web.key", &key.serialize_pem());
        write(&pki.dir, "web.crt", &cert.pem());
        let at = chrono::NaiveDate::from_ymd_opt(year, 5, 6)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp();
        format!("nodegate_tls_certificate_expiry_timestamp_seconds{{service=\"web\"}} {at}")
    };
    let first = leaf(2031);
    let (_, p) = two_services(&pki).await;
    let wait_for = |want: String| {
        let metrics = p.metrics.clone();
        async move {
            let deadline = tokio::time::Instant::now() + TIMEOUT;
            loop {
                let text = metrics.encode().unwrap();
                if text.contains(&want) {
                    return text;
                }
                assert!(tokio::time::Instant::now() < deadline, "{want}\n{text}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let text = wait_for(first).await;
    assert!(
        text.contains("nodegate_tls_certificate_expiry_timestamp_seconds{service=\"api\"}"),
        "{text}"
    );
    wait_for(leaf(2032)).await;
}

#[tokio::test]
async fn replaced_certificate_files_apply_to_new_connections_only() {
    let pki = Pki::new();
    let (_, p) = two_services(&pki).await;
    let old = p.tls(&pki, WEB_VIP, WEB, None, &[]).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(old))
            .await
            .unwrap();
    tokio::spawn(conn);
    let public = || {
        Request::get("/public/a")
            .header("host", WEB)
            .body(Empty::new())
            .unwrap()
    };
    assert_eq!(send.send_request(public()).await.unwrap().status(), 200);

    // A new certificate (another name too, so it can be told apart): key first, then cert (a
    // moment with a mismatched pair must keep the running certificate).
    let (cert, key) = pki
        .ca
        .leaf(WEB, vec![dns(WEB), dns("new.example.test")], false, false);
    write(&pki.dir, "web.key", &key);
    tokio::time::sleep(super::RELOAD_POLL * 2).await;
    let s = p.tls(&pki, WEB_VIP, WEB, None, &[]).await.unwrap();
    assert_eq!(
        server_names(&s),
        [WEB],
        "mismatched pair: the old certificate stays"
    );
    write(&pki.dir, "web.crt", &cert);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let s = p.tls(&pki, WEB_VIP, WEB, None, &[]).await.unwrap();
        if server_names(&s).len() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connection opened before keeps working.
    send.ready().await.unwrap();
    assert_eq!(send.send_request(public()).await.unwrap().status(), 200);
}

#[test]
fn tls_config_errors_name_the_field() {
    let pki = Pki::new();
    let (other_cert, _) = pki.ca.leaf("x", vec![dns("x.test")], false, false);
    let other = write(&pki.dir, "other.crt", &other_cert);
    let garbage = write(&pki.dir, "garbage.pem", "not pem at all\n");
    let cases = [
        (
            format!(
                "    tls: {{ cert_file: /nonexistent/c.pem, key_file: \"{}\" }}\n",
                pki.path("web.key")
            ),
            "services[0].tls.cert_file",
            "cannot read /nonexistent/c.pem",
        ),
        (
            format!(
                "    tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
                other.display(),
                pki.path("web.key")
            ),
            "services[0].tls.key_file",
            "does not belong to the certificate",
        ),
        (
            format!(
                "    tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
                garbage.display(),
                pki.path("web.key")
            ),
            "services[0].tls.cert_file",
            "holds no PEM certificate",
        ),
        (
            format!(
                "    tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
                pki.path("web.crt"),
                garbage.display()
            ),
            "services[0].tls.key_file",
            "holds no PEM private key",
        ),
        (
            format!(
                "    tls: {{ cert_file: \"{}\", key_file: \"{}\", client_cert: required }}\n",
                pki.path("web.crt"),
                pki.path("web.key")
            ),
            "services[0].tls.client_cert",
            "needs `client_ca_file`",
        ),
        (
            "    tls: { cert_file: web.crt, key_file: web.key }\n".to_owned(),
            "services[0].tls.cert_file",
            "must be an absolute path",
        ),
        (
            format!(
                "    upstream_tls: {{ ca_file: \"{}\" }}\n",
                garbage.display()
            ),
            "services[0].upstream_tls.ca_file",
            "holds no PEM certificate",
        ),
    ];
    for (tls, field, message) in cases {
        assert_one_problem(&tls, field, message);
    }
}

/// A config with service `web` whose `tls`/`upstream_tls` lines are `tls`.
fn config_with_tls(tls: &str) -> String {
    format!(
        "node: n\ncgroup: /sys/fs/cgroup\nproxy: {{ listen: \"127.0.0.2:15001\" }}\ngateways: [127.0.0.1]\n\
         services:\n  - name: web\n    vips: [\"{WEB_VIP}\"]\n    endpoints: [\"10.1.0.1:80\"]\n{tls}{POLICY}\n"
    )
}

#[track_caller]
fn assert_one_problem(tls: &str, field: &str, message: &str) {
    match Config::parse(&config_with_tls(tls), Origin::Embedded) {
        Err(ConfigError::Invalid { problems, .. }) => {
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].path, field, "{problems:?}");
            assert!(problems[0].message.contains(message), "{problems:?}");
        }
        other => panic!("{tls}: {other:?}"),
    }
}

#[test]
fn crl_and_policy_config_errors_name_the_field() {
    let pki = Pki::new();
    let garbage = write(&pki.dir, "garbage.pem", "not pem at all\n");
    for (tls, field, message) in [
        (
            format!(
                "    tls: {{ cert_file: \"{}\", key_file: \"{}\", client_crl_file: /etc/c.crl }}\n",
                pki.path("web.crt"),
                pki.path("web.key")
            ),
            "services[0].tls.client_crl_file",
            "needs `client_ca_file`",
        ),
        (
            format!(
                "    tls: {{ cert_file: \"{}\", key_file: \"{}\", client_ca_file: \"{}\", client_crl_file: \"{}\" }}\n",
                pki.path("web.crt"),
                pki.path("web.key"),
                pki.path("clients-ca.pem"),
                garbage.display()
            ),
            "services[0].tls.client_crl_file",
            "holds no PEM `X509 CRL`",
        ),
    ] {
        assert_one_problem(&tls, field, message);
    }
    // Without a policy, `tls` is refused (it would be passed through).
    let text = config_with_tls(&format!(
        "    tls: {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
        pki.path("web.crt"),
        pki.path("web.key")
    ))
    .replace(POLICY, "");
    let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&text, Origin::Embedded) else {
        panic!("tls without policy accepted");
    };
    assert_eq!(problems[0].path, "services[0].tls");
}
