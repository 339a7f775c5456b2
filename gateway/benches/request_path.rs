//! The userspace cost of one HTTP/1.1 request through the gateway's real request path (framing
//! guard, hyper, authentication with a cached bearer JWT, a 100-rule policy, the decision line
//! appended to the daemon's decision log (its flusher thread writes to a file, uncounted),
//! the identity assertion, the pooled upstream client), in process on 127.0.0.1: a raw
//! keep-alive client and a fixed-answer backend (both as cheap as they can be) on the same
//! current-thread runtime, so that what varies is the gateway's share.
//!
//! Prints the heap allocations per request (a counting global allocator; the client and the
//! backend allocate nothing per request after their buffers), then times a request with
//! criterion: `cargo +1.99.1 bench -p gateway --bench request_path`. Wall time on a shared
//! machine is noisy; instructions per request are not. Where the CPU's counters are not
//! available (VMs), callgrind counts them, for `measured` only (the setup verifies the token
//! and opens the upstream connection before):
//!
//! ```text
//! REQUEST_PATH_COUNT=2000 valgrind --tool=callgrind --collect-atstart=no \
//!     --toggle-collect=request_path::measured target/release/deps/request_path-<hash> --bench
//! ```
//!
//! (the total divided by 2000; `callgrind_annotate --inclusive=yes` splits it by function).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::HashMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use gateway::{
    auth::{Authenticator, NoopObserver},
    config::{Config, Origin},
    ebpf::OrigDst,
    proxy::{
        OrigDstLookup, Routes, Shared,
        http::{AssertionSigner, HttpContext, SharedAuth},
    },
    telemetry::Metrics,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    runtime::Runtime,
    sync::watch,
};

/// Counts allocations (and reallocations) of the whole process.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const EC1: &str = include_str!("../src/auth/testdata/ec1.pem");
const ISSUER: &str = "https://login.example.test";
const VIP: &str = "10.96.0.10:80";
const GROUP: &str = "devs";
const RULES: usize = 100;
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

/// The original destinations the kernel would report, by client address.
#[derive(Default, Clone)]
struct FakeOrig(Arc<Mutex<HashMap<SocketAddr, OrigDst>>>);

impl OrigDstLookup for FakeOrig {
    fn take(&self, peer: SocketAddr) -> Option<OrigDst> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer)
    }
}

/// A backend that answers every request head with [`RESPONSE`].
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut have = 0;
                loop {
                    match s.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                        if s.write_all(RESPONSE).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

fn token(key: &EncodingKey) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({
        "iss": ISSUER, "aud": "nodegate", "sub": "bench-user", "email": "bench@example.com",
        "groups": [GROUP], "iat": now, "nbf": now, "exp": now + 6 * 3600,
    });
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

/// The gateway's config: the service with a 100-rule policy whose last rule allows [`GROUP`]
/// (as `cargo xtask bench http` configures it).
fn config(backend: SocketAddr, jwks: &std::path::Path) -> Config {
    let mut rules = String::new();
    for i in 0..RULES {
        let group = if i + 1 == RULES {
            GROUP.to_owned()
        } else {
            format!("other-{i:03}")
        };
        let _ = writeln!(
            rules,
            "        - {{ id: rule-{i:03}, when: {{ groups: {group} }} }}"
        );
    }
    let text = format!(
        "node: node-b\ncgroup: /sys/fs/cgroup\nproxy:\n  listen: 127.0.0.2:15001\n\
         gateways: [127.0.0.1]\n\
         auth:\n  issuers:\n    - {{ name: bench, issuer: \"{ISSUER}\", jwks_file: \"{}\", audiences: [nodegate], algorithms: [ES256] }}\n\
         services:\n  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{backend}\"]\n\
         \x20   policy:\n      allow:\n{rules}",
        jwks.display()
    );
    Config::parse(&text, Origin::Embedded).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// A keep-alive client connection through the gateway, and its request.
struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Client {
    async fn one(&mut self) {
        self.stream.write_all(&self.request).await.expect("write");
        let mut have = 0;
        loop {
            let n = self.stream.read(&mut self.buf[have..]).await.expect("read");
            assert!(n > 0, "the gateway closed the connection");
            have += n;
            let head = &self.buf[..have];
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            assert!(
                head.starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(head)
            );
            // The backend's two-byte body.
            if have >= end + 4 + 2 {
                assert_eq!(have, end + 4 + 2, "one response at a time");
                return;
            }
        }
    }
}

struct Setup {
    rt: Runtime,
    client: Client,
    _shutdown: watch::Sender<bool>,
    dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let key = EncodingKey::from_ec_pem(EC1.as_bytes()).expect("ec key");
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).expect("jwk");
    jwk.common.key_id = Some("k1".into());
    let dir = std::env::temp_dir().join(format!("ng-request-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, json!({ "keys": [jwk] }).to_string()).expect("write jwks");
    let token = token(&key);
    // The decision log as the daemon writes it (to a file: stdout is criterion's).
    let metrics = Arc::new(Metrics::new(None));
    gateway::telemetry::init_daemon_sinks(false, Some(&dir.join("decisions.log")), &metrics)
        .expect("decision log");
    let (client, shutdown) = rt.block_on(async {
        let backend = backend().await;
        let config = config(backend, &jwks);
        let listeners =
            gateway::proxy::bind(&["127.0.0.1:0".parse().expect("addr")]).expect("bind");
        let addr = listeners[0].local_addr().expect("addr");
        let orig = FakeOrig::default();
        let routes = Routes::shared(&config);
        let auth = Authenticator::new(&config.auth, Arc::new(NoopObserver)).expect("auth");
        for report in auth.load_keys().await {
            report.result.expect("keys");
        }
        let auth: SharedAuth = Arc::new(ArcSwap::from_pointee(auth));
        let http = HttpContext::new(
            auth,
            Arc::new(AssertionSigner::generate(config.assertion.clone())),
            None,
            None,
            routes.clone(),
        );
        let shared = Arc::new(Shared {
            node: config.node.as_str().into(),
            routes,
            orig: Box::new(orig.clone()),
            metrics,
            mark: None,
            http,
        });
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(gateway::proxy::serve(
            listeners,
            shared,
            rx,
            Duration::from_secs(1),
        ));
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        orig.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                socket.local_addr().expect("addr"),
                OrigDst {
                    dst: VIP.parse().expect("vip"),
                    service_id: 0,
                    cgroup_id: 42,
                    pid: 1,
                },
            );
        let stream = socket.connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let request = format!(
            "GET /api/items?id=7 HTTP/1.1\r\nHost: web.example.test\r\nUser-Agent: bench\r\n\
             Accept: */*\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .into_bytes();
        let mut client = Client {
            stream,
            request,
            buf: vec![0u8; 16 * 1024],
        };
        // Verifies the token (the cache is warm from then on), opens the upstream connection.
        for _ in 0..1000 {
            client.one().await;
        }
        (client, shutdown)
    });
    Setup {
        rt,
        client,
        _shutdown: shutdown,
        dir,
    }
}

/// `n` requests, one at a time on the keep-alive connection (what callgrind counts).
#[inline(never)]
fn measured(rt: &Runtime, client: &mut Client, n: u32) {
    rt.block_on(async {
        for _ in 0..n {
            client.one().await;
        }
    });
}

fn bench(c: &mut Criterion) {
    const N: u32 = 20_000;
    let Setup {
        rt,
        mut client,
        _shutdown,
        dir,
    } = setup();
    // `REQUEST_PATH_COUNT=n`: only `n` requests in `measured`, for callgrind.
    if let Some(n) = std::env::var("REQUEST_PATH_COUNT")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        measured(&rt, &mut client, n);
        let _ = std::fs::remove_dir_all(&dir);
        std::process::exit(0);
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    measured(&rt, &mut client, N);
    let allocations = (ALLOCATIONS.load(Ordering::Relaxed) - before) / u64::from(N);
    eprintln!("allocations per request (gateway, client and backend): {allocations}");
    c.bench_function("http1_cached_jwt_100_rules", |b| {
        b.iter(|| rt.block_on(client.one()));
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
