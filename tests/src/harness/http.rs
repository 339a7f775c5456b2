//! HTTP requests from a place of the node, made with curl: the status, headers and body of each,
//! and the client address the proxy saw. Several requests can share one connection (curl
//! `--next`), to test keep-alive.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::Path,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::Value;

use super::{Error, Result, node::Place};

/// Per-transfer limit (`curl --max-time`).
const CURL_MAX_TIME: Duration = Duration::from_secs(10);

/// One request. Built with [`HttpRequest::get`] and the builder methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    /// The URL as curl gets it (`http://10.96.3.20/path`).
    pub url: String,
    /// Raw header lines (`Name: value`), sent as given, duplicates included.
    pub headers: Vec<String>,
    pub body: Option<String>,
    /// Send the path exactly as written (`--path-as-is`: no `..` squashing by curl).
    pub path_as_is: bool,
    /// More curl options for this request (`--request-target X`); curl requests only.
    pub curl_args: Vec<String>,
    /// Wait this long before sending it, the connection kept open ([`Place::h1_paced`] and
    /// [`Place::h2c`] only: curl cannot pause between transfers).
    pub delay: Option<Duration>,
}

impl HttpRequest {
    pub fn get(url: &str) -> Self {
        Self {
            method: "GET".to_owned(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: None,
            path_as_is: true,
            curl_args: Vec::new(),
            delay: None,
        }
    }

    #[must_use]
    pub fn method(mut self, method: &str) -> Self {
        method.clone_into(&mut self.method);
        self
    }

    /// Adds a raw header line `Name: value`.
    #[must_use]
    pub fn header(mut self, line: &str) -> Self {
        self.headers.push(line.to_owned());
        self
    }

    /// Adds `Authorization: Bearer <token>`.
    #[must_use]
    pub fn bearer(self, token: &str) -> Self {
        self.header(&format!("Authorization: Bearer {token}"))
    }

    /// Sets the `Host` header.
    #[must_use]
    pub fn host(self, host: &str) -> Self {
        self.header(&format!("Host: {host}"))
    }

    /// Adds curl options for this request.
    #[must_use]
    pub fn curl_args(mut self, args: &[&str]) -> Self {
        self.curl_args.extend(args.iter().map(|&a| a.to_owned()));
        self
    }

    /// Sends it only `delay` after the previous reply, on the same connection.
    #[must_use]
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    #[must_use]
    pub fn body(mut self, body: &str) -> Self {
        self.body = Some(body.to_owned());
        self
    }
}

/// What came back for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// 0 when no response arrived (see `error`).
    pub status: u16,
    /// Response header fields in order, names as received.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The client's address (what the gateway logs as `src`).
    pub local: Option<SocketAddr>,
    /// New connections this transfer opened (0: it reused the previous one).
    pub num_connects: u64,
    /// curl's error message, if the transfer failed.
    pub error: Option<String>,
}

impl HttpReply {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).map_err(|e| Error::Parse {
            what: "HTTP response body".into(),
            detail: format!("{e}: {}", self.body),
        })
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Place {
    /// Sends `request` with curl from here.
    pub fn http(&self, request: &HttpRequest) -> Result<HttpReply> {
        let mut replies = self.http_keepalive(std::slice::from_ref(request))?;
        replies.pop().ok_or_else(|| Error::Parse {
            what: format!("curl {}", request.url),
            detail: "no transfer reported".into(),
        })
    }

    /// Sends `requests` in order with one curl (`--next` between them), which keeps the
    /// connection open across them when the server allows: check `num_connects`.
    pub fn http_keepalive(&self, requests: &[HttpRequest]) -> Result<Vec<HttpReply>> {
        if let Some(r) = requests.iter().find(|r| r.delay.is_some()) {
            return Err(Error::Parse {
                what: describe(r),
                detail: "curl cannot pause between requests: use Place::h1_paced".into(),
            });
        }
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = self.dir().join(format!("curl-{}-{seq}", self.name));
        let mut cmd = Command::new("curl");
        for (i, r) in requests.iter().enumerate() {
            if i > 0 {
                cmd.arg("--next");
            }
            cmd.args(["-sS", "-g", "--max-time"])
                .arg(CURL_MAX_TIME.as_secs().to_string())
                .args(["-X", &r.method])
                .arg("-o")
                .arg(base.with_extension(format!("{i}.body")))
                .arg("-D")
                .arg(base.with_extension(format!("{i}.head")))
                .args(["-w", "%{json}\\n"]);
            if r.path_as_is {
                cmd.arg("--path-as-is");
            }
            for h in &r.headers {
                cmd.args(["-H", h]);
            }
            if let Some(body) = &r.body {
                cmd.args(["--data-binary", body]);
            }
            cmd.args(&r.curl_args);
            cmd.arg(&r.url);
        }
        let timeout =
            CURL_MAX_TIME * u32::try_from(requests.len()).unwrap_or(1) + Duration::from_secs(5);
        let out = self.run(cmd, timeout)?;
        let reports: Vec<Value> = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if reports.len() != requests.len() {
            return Err(Error::Parse {
                what: out.command,
                detail: format!(
                    "{} transfer reports for {} requests; stdout: {}; stderr: {}",
                    reports.len(),
                    requests.len(),
                    out.stdout,
                    out.stderr
                ),
            });
        }
        let replies = reports
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let head = base.with_extension(format!("{i}.head"));
                let body = base.with_extension(format!("{i}.body"));
                let reply = reply_of(w, &head, &body);
                let _ = fs::remove_file(head);
                let _ = fs::remove_file(body);
                reply
            })
            .collect();
        Ok(replies)
    }
}

impl Place {
    /// Sends `requests` over one HTTP/2 prior-knowledge (h2c) connection, one after the other
    /// (`node tests/oidc/requests.mjs`: curl 7.88 cannot reuse an h2c connection), each after
    /// its `delay`. `curl_args` and `path_as_is` do not apply.
    pub fn h2c(&self, requests: &[HttpRequest]) -> Result<Vec<HttpReply>> {
        self.node_requests("h2c", requests)
    }

    /// Sends `requests` over one HTTP/1.1 keep-alive connection (node's agent), each after its
    /// `delay`: the connection stays open while the test does something in between.
    /// `num_connects` is 0 for a request that reused the connection.
    pub fn h1_paced(&self, requests: &[HttpRequest]) -> Result<Vec<HttpReply>> {
        self.node_requests("h1", requests)
    }

    fn node_requests(&self, protocol: &str, requests: &[HttpRequest]) -> Result<Vec<HttpReply>> {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let file = self
            .dir()
            .join(format!("{protocol}-{}-{seq}.json", self.name));
        let list: Vec<Value> = requests
            .iter()
            .map(|r| {
                serde_json::json!({
                    "method": r.method, "url": r.url, "headers": r.headers, "body": r.body,
                    "delay_ms": r.delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                })
            })
            .collect();
        fs::write(&file, Value::from(list).to_string())
            .map_err(super::io_err(format!("write {}", file.display())))?;
        let script = super::oidc::oidc_dir().join("requests.mjs");
        let mut cmd = Command::new("node");
        cmd.arg(&script).arg(protocol).arg(&file);
        let delays: Duration = requests.iter().filter_map(|r| r.delay).sum();
        let timeout = CURL_MAX_TIME * u32::try_from(requests.len()).unwrap_or(1)
            + delays
            + Duration::from_secs(5);
        let out = self.run(cmd, timeout)?;
        let _ = fs::remove_file(&file);
        let results = out.json()?;
        let Some(results) = results.as_array().filter(|r| r.len() == requests.len()) else {
            return Err(Error::Parse {
                what: out.command,
                detail: format!("expected {} results: {results}", requests.len()),
            });
        };
        Ok(results
            .iter()
            .map(|r| HttpReply {
                status: r["status"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(0),
                headers: serde_json::from_value(r["headers"].clone()).unwrap_or_default(),
                body: r["body"].as_str().unwrap_or_default().to_owned(),
                local: r["local"].as_str().and_then(|l| l.parse().ok()),
                num_connects: u64::from(!r["reused"].as_bool().unwrap_or(false)),
                error: r["error"].as_str().map(str::to_owned),
            })
            .collect())
    }
}

fn reply_of(w: &Value, head: &Path, body: &Path) -> HttpReply {
    let head = fs::read_to_string(head).unwrap_or_default();
    let body = fs::read(body)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let local = w["local_ip"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .zip(w["local_port"].as_u64().and_then(|p| u16::try_from(p).ok()))
        .map(|(ip, port)| SocketAddr::new(ip, port));
    let error = w["errormsg"]
        .as_str()
        .filter(|e| !e.is_empty())
        .map(str::to_owned);
    HttpReply {
        status: w["http_code"]
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(0),
        headers: parse_head(&head),
        body,
        local,
        num_connects: w["num_connects"].as_u64().unwrap_or(0),
        error,
    }
}

/// Header fields of the last response head in curl's `-D` output (skipping `100 Continue`).
fn parse_head(text: &str) -> Vec<(String, String)> {
    let last = text
        .split("\r\n\r\n")
        .filter(|block| !block.trim().is_empty())
        .last()
        .unwrap_or_default();
    last.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A request as one line, for failure messages.
pub fn describe(request: &HttpRequest) -> String {
    let mut s = format!("{} {}", request.method, request.url);
    for h in &request.headers {
        let shown = if h.to_ascii_lowercase().starts_with("authorization:") {
            format!("{}…", h.chars().take(40).collect::<String>())
        } else {
            h.clone()
        };
        let _ = write!(s, " [{shown}]");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_head_wins() {
        let text = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nX-Request-Id: abc\r\n\r\n";
        assert_eq!(
            parse_head(text),
            vec![
                ("Content-Type".to_owned(), "application/json".to_owned()),
                ("X-Request-Id".to_owned(), "abc".to_owned())
            ]
        );
    }
}
