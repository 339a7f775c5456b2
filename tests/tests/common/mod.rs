//! Shared by the scenario files: node construction and assertions that read well in a test.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{net::SocketAddr, time::Duration};

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
    assert_eq!(r.reply, format!("{server}:{msg}\n"), "reply of {server}: {}", r.raw);
}

/// Asserts the connection attempt timed out (SYNs dropped).
#[track_caller]
pub fn assert_timed_out(r: &PeerReply) {
    assert!(!r.connected && r.kind() == "timeout", "expected a connect timeout, got {}", r.raw);
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
