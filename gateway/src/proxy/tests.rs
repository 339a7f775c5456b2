//! In-process proxy tests on 127.0.0.1 with a fake original-destination table: the real
//! accept loop, rule, upstream connect, forwarding and decision lines, without the kernel.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
};

use super::*;
use crate::{
    config::{Config, Origin},
    telemetry::decision::capture::Captured,
};

const VIP: &str = "10.96.0.10:80";
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct FakeOrig(Mutex<HashMap<SocketAddr, OrigDst>>);

impl FakeOrig {
    fn insert(&self, peer: SocketAddr, dst: SocketAddr) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                peer,
                OrigDst {
                    dst,
                    service_id: 0,
                    cgroup_id: 42,
                    pid: 1,
                },
            );
    }
}

impl OrigDstLookup for Arc<FakeOrig> {
    fn take(&self, peer: SocketAddr) -> Option<OrigDst> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&peer)
    }
}

fn config(services: &str) -> Config {
    let text = format!(
        "node: node-t\ncgroup: /sys/fs/cgroup/t\nproxy:\n  listen: 127.0.0.2:15001\n  \
         connect_timeout_ms: 1000\ngateways: [127.0.0.1]\nservices:\n{services}"
    );
    Config::parse(&text, Origin::Embedded).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

struct Proxy {
    addr: SocketAddr,
    orig: Arc<FakeOrig>,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), ProxyError>>,
    captured: Captured,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Proxy {
    /// Must run on a current-thread runtime: the capturing subscriber is per thread.
    fn start(config: &Config, drain: Duration) -> Self {
        let captured = Captured::default();
        let guard = captured.install();
        let listeners = bind(&["127.0.0.1:0".parse().unwrap()]).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let orig = Arc::new(FakeOrig::default());
        let routes = Routes::shared(config);
        let shared = Arc::new(Shared {
            node: config.node.as_str().into(),
            routes: routes.clone(),
            orig: Box::new(orig.clone()),
            metrics: Arc::new(Metrics::new(None)),
            mark: None,
            http: http::tests::context(config, routes),
        });
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listeners, shared.clone(), rx, drain));
        Self {
            addr,
            orig,
            shared,
            shutdown,
            task,
            captured,
            _guard: guard,
        }
    }

    /// Connect to the proxy as if redirected from `dst` (`None`: dialed directly).
    async fn connect(&self, dst: Option<&str>) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        if let Some(dst) = dst {
            self.orig
                .insert(socket.local_addr().unwrap(), dst.parse().unwrap());
        }
        socket.connect(self.addr).await.unwrap()
    }

    /// Wait until `n` connection lines were written, and return them.
    async fn lines(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let lines: Vec<_> = self
                .captured
                .lines()
                .into_iter()
                .filter(|l| l["kind"] == "connection")
                .collect();
            if lines.len() >= n {
                assert_eq!(lines.len(), n, "more lines than connections: {lines:?}");
                return lines;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} lines: {lines:?}",
                lines.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// An upstream that reads until EOF and then answers `pong:` + what it got, and counts
/// the connections it accepted.
async fn pong_server() -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let mut reply = b"pong:".to_vec();
                    reply.extend_from_slice(&got);
                    let _ = s.write_all(&reply).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    (addr, accepted)
}

/// A free local port with nothing listening.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

async fn exchange(client: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
    client.write_all(msg).await?;
    // Half-close: the upstream sees EOF, and the reply must still come back.
    client.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(TIMEOUT, client.read_to_end(&mut reply))
        .await
        .map_err(|_| io::Error::other("timed out"))??;
    Ok(reply)
}

#[tokio::test]
async fn allowed_connection_is_forwarded_with_half_close_and_counted() {
    let (up, accepted) = pong_server().await;
    let cfg = config(&format!(
        "  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{up}\"]\n    allow_sources: [127.0.0.0/8]\n"
    ));
    let p = Proxy::start(&cfg, TIMEOUT);
    let mut client = p.connect(Some(VIP)).await;
    let src = client.local_addr().unwrap();
    assert_eq!(
        exchange(&mut client, b"hello").await.unwrap(),
        b"pong:hello"
    );

    let lines = p.lines(1).await;
    let l = &lines[0];
    assert_eq!(l["decision"], "allow", "{l}");
    assert_eq!(l["reason"], "source_allowed");
    assert_eq!(l["service"], "web");
    assert_eq!(l["mode"], "enforce");
    assert_eq!(l["node"], "node-t");
    assert_eq!(l["dst"], VIP);
    assert_eq!(l["src"], src.to_string());
    assert_eq!(l["upstream"], up.to_string());
    assert_eq!(l["cgroup_id"], 42);
    assert_eq!(l["bytes_up"], 5);
    assert_eq!(l["bytes_down"], 10);
    assert!(l["duration_ms"].is_u64());
    assert_eq!(*accepted.lock().unwrap(), 1);
    let metrics = p.shared.metrics.encode().unwrap();
    assert!(
        metrics.contains(
            "nodegate_connections_total{service=\"web\",decision=\"allow\",reason=\"source_allowed\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn large_transfer_both_ways_is_counted_exactly() {
    let (up, _) = pong_server().await;
    let cfg = config(&format!(
        "  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{up}\"]\n    allow_sources: [127.0.0.1]\n"
    ));
    let p = Proxy::start(&cfg, TIMEOUT);
    let mut client = p.connect(Some(VIP)).await;
    let payload = vec![7u8; 1024 * 1024 + 3];
    let reply = exchange(&mut client, &payload).await.unwrap();
    assert_eq!(reply.len(), payload.len() + 5);
    let l = &p.lines(1).await[0];
    assert_eq!(l["bytes_up"], payload.len());
    assert_eq!(l["bytes_down"], payload.len() + 5);
}

#[tokio::test]
async fn denied_connection_is_closed_without_forwarding() {
    let (up, accepted) = pong_server().await;
    let cfg = config(&format!(
        "  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{up}\"]\n    allow_sources: [10.0.0.0/8]\n"
    ));
    let p = Proxy::start(&cfg, TIMEOUT);
    let mut client = p.connect(Some(VIP)).await;
    let reply = exchange(&mut client, b"hello").await.unwrap_or_default();
    assert!(reply.is_empty(), "denied connection got {reply:?}");

    let l = &p.lines(1).await[0];
    assert_eq!(l["decision"], "deny", "{l}");
    assert_eq!(l["reason"], "source_not_allowed");
    assert_eq!(l["service"], "web");
    assert_eq!(l["bytes_up"], 0);
    assert!(l.get("upstream").is_none(), "{l}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*accepted.lock().unwrap(), 0, "the upstream was contacted");
}

#[tokio::test]
async fn audit_mode_forwards_what_would_be_denied() {
    let (up, _) = pong_server().await;
    let cfg = config(&format!(
        "  - name: web\n    mode: audit\n    vips: [\"{VIP}\"]\n    endpoints: [\"{up}\"]\n"
    ));
    let p = Proxy::start(&cfg, TIMEOUT);
    let mut client = p.connect(Some(VIP)).await;
    assert_eq!(exchange(&mut client, b"x").await.unwrap(), b"pong:x");
    let l = &p.lines(1).await[0];
    assert_eq!(l["decision"], "would_deny", "{l}");
    assert_eq!(l["reason"], "source_not_allowed");
    assert_eq!(l["mode"], "audit");
    assert_eq!(l["bytes_up"], 1);
}

#[tokio::test]
async fn connection_without_original_destination_is_refused() {
    let (up, accepted) = pong_server().await;
    let cfg = config(&format!(
        "  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{up}\"]\n    allow_sources: [127.0.0.0/8]\n"
    ));
    let p = Proxy::start(&cfg, TIMEOUT);
    let mut client = p.connect(None).await;
    let src = client.local_addr().unwrap();
    let reply = exchange(&mut client, b"hello").await.unwrap_or_default();
    assert_eq!(reply, b"");
    let l = &p.lines(1).await[0];
    assert_eq!(l["decision"], "deny", "{l}");
    assert_eq!(l["reason"], "no_original_destination");
    assert_eq!(l["src"], src.to_string());
    assert!(l.get("service").is_none() && l.get("dst").is_none(), "{l}");
    assert_eq!(*accepted.lock().unwrap(), 0);
}

#[tokio::test]
async fn unknown_destination_is_denied() {
    let cfg = config(&format!("  - name: web\n    vips: [\"{VIP}\"]\n"));
    let p = Proxy::start(&cfg, TIMEOUT);
    let mut client = p.connect(Some("10.99.0.1:80")).await;
    assert_eq!(exchange(&mut client, b"x").await.unwrap_or_default(), b"");
    let l = &p.lines(1).await[0];
    assert_eq!(l["reason"], "unknown_destination", "{l}");
    assert_eq!(l["dst"], "10.99.0.1:80");
}

#[tokio::test]
async fn upstream_unavailable_and_fallback_to_the_next_endpoint() {
    let dead = closed_port();
    let (alive, _) = pong_server().await;
    let cfg = config(&format!(
        "  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{dead}\", \"{alive}\"]\n    allow_sources: [127.0.0.1]\n"
    ));
    let p = Proxy::start(&cfg, TIMEOUT);
    // Round-robin starts at the dead endpoint; the connection falls back to the live one.
    let mut client = p.connect(Some(VIP)).await;
    assert_eq!(exchange(&mut client, b"a").await.unwrap(), b"pong:a");
    // Dialing the dead endpoint itself: exactly that one, so unavailable.
    let mut client = p.connect(Some(&dead.to_string())).await;
    assert_eq!(exchange(&mut client, b"b").await.unwrap_or_default(), b"");
    let lines = p.lines(2).await;
    let by_dst = |dst: &str| lines.iter().find(|l| l["dst"] == dst).unwrap().clone();
    let via_vip = by_dst(VIP);
    assert_eq!(via_vip["decision"], "allow");
    assert_eq!(via_vip["upstream"], alive.to_string());
    let direct = by_dst(&dead.to_string());
    assert_eq!(direct["decision"], "deny", "{direct}");
    assert_eq!(direct["reason"], "upstream_unavailable");
    assert_eq!(direct["upstream"], dead.to_string());
}

#[tokio::test]
async fn reload_keeps_open_connections_and_applies_to_new_ones() {
    let (up, _) = pong_server().await;
    let cfg = config(&format!(
        "  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{up}\"]\n    allow_sources: [127.0.0.1]\n"
    ));
    let p = Proxy::start(&cfg, TIMEOUT);
    let mut open = p.connect(Some(VIP)).await;
    open.write_all(b"before").await.unwrap();
    // Give the proxy time to accept and route the first connection on the old table.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while p.shared.metrics.connections_active().get() == 0 || !p.orig.0.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;

    let other = config("  - name: other\n    vips: [\"10.96.0.99:80\"]\n");
    p.shared.routes.store(Arc::new(Routes::new(&other)));

    let mut new = p.connect(Some(VIP)).await;
    assert_eq!(exchange(&mut new, b"x").await.unwrap_or_default(), b"");
    assert_eq!(
        exchange(&mut open, b"+after").await.unwrap(),
        b"pong:before+after"
    );
    let lines = p.lines(2).await;
    assert!(
        lines.iter().any(|l| l["reason"] == "unknown_destination"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["decision"] == "allow" && l["bytes_up"] == 12),
        "{lines:?}"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_closes_what_outlives_the_drain() {
    let (up, _) = pong_server().await;
    let cfg = config(&format!(
        "  - name: web\n    vips: [\"{VIP}\"]\n    endpoints: [\"{up}\"]\n    allow_sources: [127.0.0.1]\n"
    ));
    let p = Proxy::start(&cfg, Duration::from_millis(200));
    let mut open = p.connect(Some(VIP)).await;
    open.write_all(b"idle").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    p.shutdown.send(true).unwrap();
    let served = tokio::time::timeout(TIMEOUT, p.task)
        .await
        .unwrap()
        .unwrap();
    assert!(served.is_ok());
    // The idle connection was closed at the drain timeout, and its line written.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, open.read_to_end(&mut rest))
        .await
        .unwrap();
    let lines: Vec<_> = p
        .captured
        .lines()
        .into_iter()
        .filter(|l| l["kind"] == "connection")
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["bytes_up"], 4);
    assert!(
        TcpStream::connect(p.addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn upstream_sockets_carry_the_mark() {
    // Needs CAP_NET_ADMIN, like the gateway itself (CI runs as root).
    check_mark(0x4e47).expect("setting SO_MARK needs CAP_NET_ADMIN: run the tests as root");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stream = upstream::connect_one(addr, Some(0x4e47), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(socket2::SockRef::from(&stream).mark().unwrap(), 0x4e47);
}

#[test]
fn l4_decision_table() {
    let rule = L4Rule {
        allow_sources: vec!["10.77.1.0/24".parse().unwrap()],
    };
    let inside: IpAddr = "10.77.1.7".parse().unwrap();
    let outside: IpAddr = "10.77.2.7".parse().unwrap();
    let cases = [
        (
            inside,
            Mode::Enforce,
            Decision::Allow,
            Reason::SourceAllowed,
        ),
        (inside, Mode::Audit, Decision::Allow, Reason::SourceAllowed),
        (
            outside,
            Mode::Enforce,
            Decision::Deny,
            Reason::SourceNotAllowed,
        ),
        (
            outside,
            Mode::Audit,
            Decision::WouldDeny,
            Reason::SourceNotAllowed,
        ),
    ];
    for (src, mode, decision, reason) in cases {
        assert_eq!(
            decide(&rule, mode, src),
            (decision, reason),
            "{src} {mode:?}"
        );
    }
}
