//! The `ngpeer` helper on the test's own loopback (no root): the scenarios rely on its replies
//! and on its JSON report, so they are pinned down here.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nodegate_tests::harness::{Output, run_command};
use serde_json::Value;

const NGPEER: &str = env!("CARGO_BIN_EXE_ngpeer");

/// `ngpeer serve` on a free loopback port; killed on drop.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    fn start_with(name: &str, extra: &[&str]) -> Self {
        // Reserve a free port, then hand it to ngpeer (a tiny race, only with this test itself).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(NGPEER)
            .args(["serve", "--name", name, "--listen", &addr])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ngpeer serve");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "ngpeer serve did not listen on {addr}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(args: &[&str]) -> Value {
    let mut cmd = Command::new(NGPEER);
    cmd.arg("connect").args(args);
    let out: Output = run_command(cmd, Duration::from_secs(10)).expect("run ngpeer connect");
    assert!(
        out.success(),
        "ngpeer connect exits 0 whatever happens: {out:?}"
    );
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn line_and_half_close_replies() {
    let server = Server::start("s");
    let v = connect(&[&server.addr, "--send", "ping", "--timeout-ms", "2000"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["connected"], true, "{v}");
    assert_eq!(v["reply"], "s:ping\n", "{v}");
    assert!(
        v["local"]
            .as_str()
            .is_some_and(|l| l.starts_with("127.0.0.1:")),
        "{v}"
    );
    assert!(v["kind"].is_null() && v["errno"].is_null(), "{v}");

    let v = connect(&[&server.addr, "--send", "no newline", "--half-close"]);
    assert_eq!(v["reply"], "s:no newline", "{v}");

    // --raw: as is, write side open; an HTTP request head is answered without EOF from us.
    let v = connect(&[
        &server.addr,
        "--send",
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "--raw",
    ]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("HTTP/1.0 200") && r.ends_with("hello from s")),
        "{v}"
    );
}

#[test]
fn http_get_is_answered() {
    let server = Server::start("web");
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "3"])
        .arg(format!("http://{}/", server.addr));
    let out = run_command(curl, Duration::from_secs(5)).expect("run curl");
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "hello from web");

    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "3",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
    ])
    .arg(format!("http://{}/bytes/1000003", server.addr));
    let out = run_command(curl, Duration::from_secs(5)).expect("run curl");
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout, "1000003");
}

#[test]
fn http_headers_are_echoed_as_received() {
    let server = Server::start("echo");
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "3", "-X", "POST", "-d", "x=1"])
        .args([
            "-H",
            "X-Nodegate-User: mallory",
            "-H",
            "x_nodegate_groups: admins",
        ])
        .arg(format!("http://{}/headers?q=1", server.addr));
    let out = run_command(curl, Duration::from_secs(5)).expect("run curl");
    assert!(out.success(), "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(v["name"], "echo", "{v}");
    assert_eq!(v["method"], "POST", "{v}");
    assert_eq!(v["target"], "/headers?q=1", "{v}");
    let headers: Vec<(String, String)> =
        serde_json::from_value(v["headers"].clone()).expect("[[name, value], ...]");
    for expected in [
        ("X-Nodegate-User", "mallory"),
        ("x_nodegate_groups", "admins"),
    ] {
        assert!(
            headers
                .iter()
                .any(|(k, val)| (k.as_str(), val.as_str()) == expected),
            "{expected:?} not in {headers:?}"
        );
    }

    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "3", "-I"])
        .arg(format!("http://{}/", server.addr));
    let out = run_command(curl, Duration::from_secs(5)).expect("run curl");
    assert!(
        out.success() && out.stdout.starts_with("HTTP/1.0 200"),
        "{out:?}"
    );
}

#[test]
fn http11_keeps_the_connection_alive() {
    let server = Server::start_with("k", &["--http11"]);
    let mut curl = Command::new("curl");
    curl.args([
        "-sS",
        "--max-time",
        "3",
        "-w",
        "\n%{http_version} %{num_connects}\n",
    ])
    .arg(format!("http://{}/a", server.addr))
    .args(["-d", "body=1"])
    .arg(format!("http://{}/headers", server.addr))
    .arg(format!("http://{}/c", server.addr));
    let out = run_command(curl, Duration::from_secs(5)).expect("run curl");
    assert!(out.success(), "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{out:?}");
    assert_eq!(lines[0], "hello from k");
    assert_eq!(
        lines[1], "1.1 1",
        "first request opens the connection: {out:?}"
    );
    let echo: Value = serde_json::from_str(lines[2]).expect("echo");
    assert_eq!(echo["method"], "POST", "{echo}");
    assert_eq!(lines[3], "1.1 0", "second request reuses it: {out:?}");
    assert_eq!(lines[5], "1.1 0", "third request reuses it: {out:?}");
}

#[test]
fn refused_is_reported_with_errno() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let v = connect(&[&format!("127.0.0.1:{port}"), "--timeout-ms", "1000"]);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["connected"], false, "{v}");
    assert_eq!(v["kind"], "refused", "{v}");
    assert_eq!(v["errno"], libc::ECONNREFUSED, "{v}");
}

#[test]
fn a_silent_peer_times_out_within_the_deadline() {
    // Accepts (the kernel completes the handshake) but never answers.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let started = Instant::now();
    let v = connect(&[&addr, "--timeout-ms", "300"]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(v["connected"], true, "{v}");
    assert_eq!(v["kind"], "timeout", "{v}");
}

#[test]
fn bad_usage_exits_2() {
    let mut cmd = Command::new(NGPEER);
    cmd.arg("connect").arg("not-an-address");
    let out = run_command(cmd, Duration::from_secs(5)).expect("run");
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("not-an-address"), "{out:?}");
}
