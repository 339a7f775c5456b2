//! Shared by the scenario files: node construction and assertions that read well in a test.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod identity;
pub mod pki;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use nodegate_tests::harness::{Node, NodeSpec, PeerReply, Place, Tools};
use serde_json::Value;

/// Connect timeout of connections expected to succeed.
pub const OK_TIMEOUT: Duration = Duration::from_secs(3);
/// Connect timeout of connections expected to be dropped (SYN + one retransmit).
pub const DROP_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a decision line may take to reach the file.
pub const LOG_TIMEOUT: Duration = Duration::from_secs(5);

/// The harness's tools: this package's `ngpeer`, the workspace's gateway build (or
/// `NODEGATE_GATEWAY_BIN`).
pub fn tools() -> Tools {
    Tools::from_env().with_ngpeer(env!("CARGO_BIN_EXE_ngpeer"))
}

/// A simulated node named `name` with the given pods. Panics with the reason if it cannot be
/// built (privileged tests never skip).
pub fn node(name: &str, pods: &[&str]) -> Node {
    Node::new(NodeSpec::new(name).pods(pods).tools(tools()))
        .unwrap_or_else(|e| panic!("building simulated node `{name}`: {e}"))
}

/// `ngpeer connect` from `from` to `to`; panics if the harness itself fails.
pub fn dial(from: &Place, to: SocketAddr, msg: &str, timeout: Duration) -> PeerReply {
    from.connect(to, msg, timeout)
        .unwrap_or_else(|e| panic!("ngpeer connect {} -> {to}: {e}", from.name))
}

/// Asserts the connection went through and the peer named `server` answered `msg`.
#[track_caller]
pub fn assert_answered(r: &PeerReply, server: &str, msg: &str) {
    assert!(r.ok, "expected an answer from {server}, got {}", r.raw);
    assert_eq!(
        r.reply,
        format!("{server}:{msg}\n"),
        "reply of {server}: {}",
        r.raw
    );
}

/// Asserts the peer accepted and closed without answering: either the client saw EOF or a reset
/// after connecting, or the reset arrived before `connect()` returned (ECONNRESET). Refused
/// (nothing listening) and timeouts are not "closed by the proxy".
#[track_caller]
pub fn assert_closed_unanswered(r: &PeerReply) {
    assert!(r.reply.is_empty(), "expected no answer: {}", r.raw);
    let closed = if r.connected {
        r.ok || matches!(r.kind(), "reset" | "aborted")
    } else {
        r.kind() == "reset"
    };
    assert!(
        closed,
        "expected an accepted-then-closed connection: {}",
        r.raw
    );
}

/// Asserts the connection attempt timed out (SYNs dropped).
#[track_caller]
pub fn assert_timed_out(r: &PeerReply) {
    assert!(
        !r.connected && r.kind() == "timeout",
        "expected a connect timeout, got {}",
        r.raw
    );
}

/// Asserts the connection was refused (RST to the SYN: ECONNREFUSED).
#[track_caller]
pub fn assert_refused(r: &PeerReply) {
    assert!(
        !r.connected && r.kind() == "refused" && r.errno == Some(libc::ECONNREFUSED),
        "expected ECONNREFUSED, got {}",
        r.raw
    );
}

/// The `conn` lines a `ngpeer serve` printed.
pub fn served(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "conn")
        .collect()
}

/// The peer address the server saw for the connection that carried `msg`.
pub fn served_peer(stdout: &str, msg: &str) -> Option<SocketAddr> {
    served(stdout)
        .into_iter()
        .find(|v| v["read"].as_str().is_some_and(|r| r.trim_end() == msg))
        .and_then(|v| v["peer"].as_str()?.parse().ok())
}

/// A field of a JSON value as a string ("" if absent).
pub fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// A field holding `ip:port`.
pub fn addr(v: &Value, key: &str) -> Option<SocketAddr> {
    s(v, key).parse().ok()
}

use nodegate_tests::harness::{Counters, Gateway, GatewayConfig, Mode, ServiceConfig};

/// `web`: VIPs `10.96.N.10:80` and `[fd96:N::10]:80`, endpoints pod b `:8080` (v4 and v6),
/// sources allowed: the node's whole range.
pub fn web(node: &Node, mode: Mode) -> ServiceConfig {
    let b = node.pod("b");
    ServiceConfig::new("web", mode)
        .vip(node.vip_v4(10, 80))
        .vip(node.vip_v6(10, 80))
        .endpoint(b.v4(8080))
        .endpoint(b.v6(8080))
        .allow(&node.cidr_v4())
        .allow(&node.cidr_v6())
}

/// The node's config with `services`.
pub fn config(node: &Node, services: Vec<ServiceConfig>) -> GatewayConfig {
    services
        .into_iter()
        .fold(node.gateway_config(), GatewayConfig::service)
}

/// Starts the gateway; panics with its stderr if it does not get ready.
pub fn start(node: &Node, config: GatewayConfig) -> Gateway {
    node.start_gateway(config)
        .unwrap_or_else(|e| panic!("starting the gateway on {}: {e}", node.prefix()))
}

/// `gateway counters --json`; panics with the CLI's output on failure.
pub fn counters(gw: &Gateway) -> Counters {
    gw.counters()
        .unwrap_or_else(|e| panic!("gateway counters: {e}"))
}

/// `gateway status --json`; panics with the CLI's output on failure.
pub fn status(gw: &Gateway) -> Value {
    gw.status()
        .unwrap_or_else(|e| panic!("gateway status: {e}"))
}

/// The `connection` decision line of the connection whose client address is `src`.
pub fn connection_line(gw: &Gateway, src: SocketAddr) -> Value {
    gw.wait_decision(
        &format!("for the connection from {src}"),
        LOG_TIMEOUT,
        |d| s(d, "kind") == "connection" && addr(d, "src") == Some(src),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The first `connection` line from source ip `ip` (any port) that also satisfies `pred`. For
/// connections whose client address is unknown (reset while connecting).
pub fn connection_line_from(gw: &Gateway, ip: IpAddr, pred: impl Fn(&Value) -> bool) -> Value {
    gw.wait_decision(&format!("for a connection from {ip}"), LOG_TIMEOUT, |d| {
        s(d, "kind") == "connection" && addr(d, "src").map(|a| a.ip()) == Some(ip) && pred(d)
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Every `connection` line whose original destination is `dst`.
pub fn connection_lines_to(gw: &Gateway, dst: SocketAddr) -> Vec<Value> {
    gw.decisions()
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|d| s(d, "kind") == "connection" && addr(d, "dst") == Some(dst))
        .collect()
}

/// The first `bypass` line from source ip `src` to `dst` with `action`.
pub fn bypass_line(gw: &Gateway, src: IpAddr, dst: SocketAddr, action: &str) -> Value {
    gw.wait_decision(
        &format!("bypass {src} -> {dst} {action}"),
        LOG_TIMEOUT,
        |d| {
            s(d, "kind") == "bypass"
                && addr(d, "src").map(|a| a.ip()) == Some(src)
                && addr(d, "dst") == Some(dst)
                && s(d, "action") == action
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts a `connection` line says the proxy let `client` through to one of `upstreams`.
#[track_caller]
pub fn assert_allowed(
    line: &Value,
    service: &str,
    dst: SocketAddr,
    client: &Place,
    upstreams: &[SocketAddr],
) {
    assert_eq!(s(line, "service"), service, "{line}");
    assert_eq!(addr(line, "dst"), Some(dst), "original destination: {line}");
    assert_eq!(s(line, "decision"), "allow", "{line}");
    assert_eq!(s(line, "reason"), "source_allowed", "{line}");
    let upstream = addr(line, "upstream");
    assert!(
        upstream.is_some_and(|u| upstreams.contains(&u)),
        "upstream not one of {upstreams:?}: {line}"
    );
    let cgroup_id = client.cgroup_id().expect("cgroup id");
    assert_eq!(
        line["cgroup_id"].as_u64(),
        Some(cgroup_id),
        "cgroup id of {}: {line}",
        client.name
    );
    for field in [
        "timestamp",
        "node",
        "mode",
        "bytes_up",
        "bytes_down",
        "duration_ms",
    ] {
        assert!(line.get(field).is_some(), "`{field}` missing: {line}");
    }
}

/// `curl http://target/` from `from`; returns (body, client address).
pub fn curl(from: &Place, url: &str) -> (String, Option<SocketAddr>) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "-g",
        "--max-time",
        "5",
        "-w",
        "\n%{local_ip} %{local_port}",
    ])
    .arg(url);
    let out = from
        .run(cmd, Duration::from_secs(8))
        .unwrap_or_else(|e| panic!("curl {url} from {}: {e}", from.name));
    assert!(
        out.success(),
        "curl {url} from {} failed: {out:?}",
        from.name
    );
    let (body, local) = out.stdout.rsplit_once('\n').unwrap_or((&out.stdout, ""));
    let local = local
        .split_once(' ')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)));
    (body.to_owned(), local)
}

/// The client address of a connection that connected; panics with the reply otherwise.
#[track_caller]
pub fn local(r: &PeerReply) -> SocketAddr {
    r.local
        .unwrap_or_else(|| panic!("expected the connection to be established: {}", r.raw))
}

/// A pod's v4 and v6 address at `port` (a dual-stack service's endpoints on that pod).
pub fn both(p: &Place, port: u16) -> [SocketAddr; 2] {
    [p.v4(port), p.v6(port)]
}

/// Whether `ip` is one of the node's IPs (what the gateway's upstream connections come from).
pub fn is_node_ip(node: &Node, ip: IpAddr) -> bool {
    ip == IpAddr::from(node.ipv4()) || ip == IpAddr::from(node.ipv6())
}
