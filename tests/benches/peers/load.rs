//! The load generators, run in the client pod on their own core (`taskset -c 1`), one worker
//! each: wrk (HTTP/1.1 max rate), h2load (h2 max rate), oha (fixed rate with latency
//! correction: p50/p99/p99.9 at 1000 req/s). Each parser fails on any non-2xx answer or error,
//! so a misconfigured proxy answering 401 fast can never pass for a fast one.

use std::{path::Path, process::Command, time::Duration};

use nodegate_tests::harness::Place;
use serde_json::{Value, json};

/// The load generator's core; the proxy under test gets core 0.
pub const LOAD_CPU: &str = "1";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Proto {
    /// HTTP/1.1 keep-alive over plain TCP.
    H1,
    /// h2 with prior knowledge (h2c).
    H2c,
    /// HTTP/1.1 over TLS.
    H1Tls,
    /// h2 over TLS (ALPN).
    H2Tls,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::H1 => "http/1.1",
            Self::H2c => "h2c",
            Self::H1Tls => "http/1.1+tls",
            Self::H2Tls => "h2+tls",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, Self::H1Tls | Self::H2Tls)
    }

    pub fn h2(self) -> bool {
        matches!(self, Self::H2c | Self::H2Tls)
    }
}

pub struct Load<'a> {
    pub client: &'a Place,
    pub url: String,
    pub headers: Vec<String>,
    pub proto: Proto,
}

fn pinned(program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", LOAD_CPU]).arg(program);
    cmd
}

impl Load<'_> {
    fn run(&self, cmd: Command, duration: Duration) -> Result<String, String> {
        let out = self
            .client
            .run(cmd, duration + Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
        if !out.success() {
            return Err(format!(
                "{} failed ({:?}): {}\n{}",
                out.command,
                out.status,
                out.stderr.trim(),
                out.stdout.trim()
            ));
        }
        Ok(out.stdout)
    }

    /// Max rate: wrk (HTTP/1.1) or h2load (h2), one thread, `connections` connections.
    pub fn max_rate(
        &self,
        tools: &Tools,
        connections: u32,
        duration: Duration,
    ) -> Result<Value, String> {
        let secs = duration.as_secs().max(1).to_string();
        if self.proto.h2() {
            let mut cmd = pinned(&tools.h2load);
            // The same number of requests in flight as over HTTP/1.1 (`connections`), as
            // H2_STREAMS streams on each of connections / H2_STREAMS connections: more would
            // mostly measure how each proxy's upstream pool copes with a burst it cannot keep
            // (nginx `keepalive 64` and the gateway's 64 idle connections per endpoint then
            // open and close upstream connections per request).
            let h2_connections = (connections / H2_STREAMS).max(1);
            cmd_args_h2(&mut cmd, h2_connections, &secs);
            for h in &self.headers {
                cmd.args(["-H", h]);
            }
            cmd.arg(&self.url);
            let out = self.run(cmd, duration)?;
            parse_h2load(&out)
        } else {
            let mut cmd = pinned(&tools.wrk);
            cmd.args([
                "-t",
                "1",
                "-c",
                &connections.to_string(),
                "-d",
                &format!("{secs}s"),
            ]);
            for h in &self.headers {
                cmd.args(["-H", h]);
            }
            cmd.arg(&self.url);
            let out = self.run(cmd, duration)?;
            parse_wrk(&out)
        }
    }

    /// Fixed rate with latency correction (coordinated omission accounted for).
    pub fn fixed_rate(
        &self,
        tools: &Tools,
        rate: u32,
        connections: u32,
        duration: Duration,
    ) -> Result<Value, String> {
        let mut cmd = pinned(&tools.oha);
        cmd.args([
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
        ])
        .args(["-q", &rate.to_string(), "-c", &connections.to_string()])
        .args(["-z", &format!("{}s", duration.as_secs().max(1))]);
        if self.proto.h2() {
            cmd.arg("--http2");
        }
        if self.proto.tls() {
            cmd.arg("--insecure");
        }
        for h in &self.headers {
            cmd.args(["-H", h]);
        }
        cmd.arg(&self.url);
        let out = self.run(cmd, duration)?;
        parse_oha(&out)
    }
}

/// Streams per h2 connection at max rate.
pub const H2_STREAMS: u32 = 4;

fn cmd_args_h2(cmd: &mut Command, connections: u32, secs: &str) {
    let streams = H2_STREAMS.to_string();
    cmd.args([
        "-t",
        "1",
        "-c",
        &connections.to_string(),
        "-m",
        &streams,
        "-D",
        secs,
    ]);
}

pub struct Tools {
    pub wrk: std::path::PathBuf,
    pub h2load: std::path::PathBuf,
    pub oha: std::path::PathBuf,
}

fn field<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .map(str::trim)
}

/// `Requests/sec:`, the request count, and no errors or non-2xx answers.
fn parse_wrk(out: &str) -> Result<Value, String> {
    if let Some(bad) = field(out, "Non-2xx or 3xx responses:") {
        return Err(format!("wrk: {bad} non-2xx answers:\n{out}"));
    }
    if let Some(errors) = field(out, "Socket errors:") {
        return Err(format!("wrk: socket errors {errors}:\n{out}"));
    }
    let per_s: f64 = field(out, "Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("wrk: no Requests/sec in:\n{out}"))?;
    let requests: u64 = out
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .and_then(|(n, _)| n.parse().ok())
        })
        .ok_or_else(|| format!("wrk: no request count in:\n{out}"))?;
    Ok(json!({ "tool": "wrk", "per_s": per_s, "requests": requests }))
}

/// `finished in Xs, N req/s`, and every request succeeded with 2xx.
fn parse_h2load(out: &str) -> Result<Value, String> {
    let finished = field(out, "finished in").ok_or_else(|| format!("h2load: no result:\n{out}"))?;
    let per_s: f64 = finished
        .split(',')
        .nth(1)
        .and_then(|s| s.trim().strip_suffix("req/s"))
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("h2load: no req/s in:\n{out}"))?;
    let requests = field(out, "requests:").ok_or_else(|| format!("h2load: no counts:\n{out}"))?;
    let count = |what: &str| -> u64 {
        requests
            .split(',')
            .find_map(|part| {
                part.trim()
                    .strip_suffix(what)
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    let (done, ok) = (count("done"), count("succeeded"));
    let status = field(out, "status codes:").unwrap_or("");
    let status_count = |class: &str| -> u64 {
        status
            .split(',')
            .find_map(|p| {
                p.trim()
                    .strip_suffix(class)
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    // The status count may include a response to a request started before the end and
    // finished after it; what counts is that nothing but 2xx came back.
    let twoxx = status_count("2xx");
    let other = status_count("3xx") + status_count("4xx") + status_count("5xx");
    if done == 0 || ok != done || twoxx < done || other > 0 {
        return Err(format!(
            "h2load: {done} done, {ok} succeeded, {twoxx} 2xx, {other} other:\n{out}"
        ));
    }
    Ok(json!({ "tool": "h2load", "per_s": per_s, "requests": done }))
}

/// oha's JSON: p50/p99/p99.9 (s → µs), only 200s, no errors.
fn parse_oha(out: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(out).map_err(|e| format!("oha: {e}:\n{out}"))?;
    let codes = v.get("statusCodeDistribution").and_then(Value::as_object);
    let total: u64 = codes.map_or(0, |c| c.values().filter_map(Value::as_u64).sum());
    let ok = codes
        .and_then(|c| c.get("200"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    // Requests still in flight when `-z` ends are cut off: not an error of the target.
    let errors = v
        .get("errorDistribution")
        .and_then(Value::as_object)
        .map(|e| {
            e.iter()
                .filter(|(k, _)| k.as_str() != "aborted due to deadline")
                .collect::<Vec<_>>()
        })
        .filter(|e| !e.is_empty());
    if total == 0 || ok != total || errors.is_some() {
        return Err(format!(
            "oha: {ok} of {total} answered 200, errors {errors:?}"
        ));
    }
    let p = |key: &str| {
        v.get("latencyPercentiles")
            .and_then(|l| l.get(key))
            .and_then(Value::as_f64)
            .map(|s| s * 1e6)
    };
    Ok(json!({
        "tool": "oha",
        "requests": total,
        "per_s": v.get("summary").and_then(|s| s.get("requestsPerSec")),
        "seconds": v.get("summary").and_then(|s| s.get("total")),
        "p50_us": p("p50"),
        "p99_us": p("p99"),
        "p999_us": p("p99.9"),
    }))
}
