//! The decision log vocabulary and the two kinds of lines (docs/ARCHITECTURE.md, "Decision log
//! lines"). Fields without a value (no original destination, so no service) are omitted.

use std::{
    borrow::Cow,
    cell::RefCell,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Serialize, Serializer};

use super::{
    DECISION_TARGET, Metrics,
    format::OBJECT_FIELD,
    json::{self, timestamp},
};
use crate::{
    auth::{Identity, cert::CertIdentity},
    ebpf::Mode,
    proxy::http::headers::RequestId,
};

/// What happened to a connection. `WouldDeny`: audit mode, the rule denied, forwarded anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    WouldDeny,
}

impl Decision {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::WouldDeny => "would_deny",
        }
    }
}

/// Why. Stable strings: dashboards and tests match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    SourceAllowed,
    SourceNotAllowed,
    NoOriginalDestination,
    UnknownDestination,
    UpstreamUnavailable,
    /// An HTTP service's client sent nothing decisive in time.
    ProtocolTimeout,
    /// The TLS handshake with the client failed (not TLS, no common parameters, a timeout).
    TlsHandshakeFailed,
    /// The service requires a client certificate and the client sent none.
    ClientCertRequired,
    /// The client certificate did not verify (another CA, expired, not for client auth).
    ClientCertInvalid,
    /// The client certificate is listed in the service's `client_crl_file`.
    ClientCertRevoked,
    /// Plain HTTP (HTTP/1.1 or h2c) to a service that terminates TLS.
    PlainHttpToTls,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SourceAllowed => "source_allowed",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::NoOriginalDestination => "no_original_destination",
            Self::UnknownDestination => "unknown_destination",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::ProtocolTimeout => "protocol_detect_timeout",
            Self::TlsHandshakeFailed => "tls_handshake_failed",
            Self::ClientCertRequired => "client_cert_required",
            Self::ClientCertInvalid => "client_cert_invalid",
            Self::ClientCertRevoked => "client_cert_revoked",
            Self::PlainHttpToTls => "plain_http_to_tls",
        }
    }
}

pub const fn mode_str(mode: Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
    }
}

/// One connection, built up while it is handled and emitted once, when it ends.
#[derive(Debug, Clone)]
pub struct ConnectionLine<'a> {
    pub node: &'a str,
    pub service: Option<&'a str>,
    pub mode: Option<Mode>,
    pub dst: Option<SocketAddr>,
    pub src: SocketAddr,
    pub cgroup_id: Option<u64>,
    /// The workload the source was attributed to (cgroup id, else address).
    pub src_workload: Option<WorkloadLog>,
    /// The TLS server name of a connection passed through to an HTTP service.
    pub sni: Option<String>,
    pub decision: Decision,
    pub reason: Reason,
    /// What the TLS library said about a failed handshake.
    pub detail: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration: Duration,
}

impl<'a> ConnectionLine<'a> {
    /// A line for a connection from `src` about which nothing is known yet.
    pub fn new(node: &'a str, src: SocketAddr) -> Self {
        Self {
            node,
            service: None,
            mode: None,
            dst: None,
            src,
            cgroup_id: None,
            src_workload: None,
            sni: None,
            decision: Decision::Deny,
            reason: Reason::NoOriginalDestination,
            detail: None,
            upstream: None,
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
        }
    }

    /// Write the line and count the connection.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.connection(self.service, self.decision, self.reason);
        tracing::info!(
            target: DECISION_TARGET,
            kind = "connection",
            node = self.node,
            service = self.service,
            mode = self.mode.map(mode_str),
            dst = self.dst.map(display),
            src = %self.src,
            cgroup_id = self.cgroup_id,
            src_namespace = self.src_workload.as_ref().map(|w| w.namespace.as_str()),
            src_service_account = self.src_workload.as_ref().map(|w| w.service_account.as_str()),
            src_pod = self.src_workload.as_ref().and_then(|w| w.pod.as_deref()),
            sni = self.sni.as_deref(),
            decision = self.decision.as_str(),
            reason = self.reason.as_str(),
            detail = self.detail.as_deref(),
            upstream = self.upstream.map(display),
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
        );
    }
}

/// Longest request-controlled string (path, host, method) written into a line.
const MAX_LOGGED_LEN: usize = 1024;

/// Cut `s` to at most [`MAX_LOGGED_LEN`] bytes at a character boundary.
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_LOGGED_LEN {
        return s.to_owned();
    }
    let mut end = MAX_LOGGED_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Who made a request, as established by the gateway (never as claimed by the client): the
/// verified identity itself, shared with the request rather than copied into the line (five
/// allocations a request fewer); `None` is anonymous. Serialized as `kind`, then `subject`,
/// `email` (when known), `groups` (when any) and `issuer`.
#[derive(Debug, Clone, Default)]
pub struct IdentityLog(pub Option<Arc<Identity>>);

impl IdentityLog {
    /// `user`, `workload` or `anonymous`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        self.0.as_ref().map_or("anonymous", |id| id.kind.as_str())
    }
}

impl Serialize for IdentityLog {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("kind", self.kind())?;
        if let Some(id) = &self.0 {
            map.serialize_entry("subject", &id.subject)?;
            if let Some(email) = &id.email {
                map.serialize_entry("email", email)?;
            }
            if !id.groups.is_empty() {
                map.serialize_entry("groups", &id.groups)?;
            }
            map.serialize_entry("issuer", &id.issuer)?;
        }
        map.end()
    }
}

/// The TLS side of a request that came over a connection the gateway terminated.
#[derive(Debug, Clone, Serialize)]
pub struct TlsLog {
    /// The server name the client asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The verified client certificate (mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<CertIdentity>,
}

/// The calling workload: from a verified `ServiceAccount` token, or the source the kernel saw.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadLog {
    pub namespace: String,
    pub service_account: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// `token` or `source` (cgroup id / source address → static workload).
    pub from: &'static str,
}

/// One HTTP request to a service with a policy, written once its response status is known
/// (docs: README "Decision log"). Fields without a value are omitted.
#[derive(Debug, Clone, Serialize)]
pub struct RequestLine {
    #[serde(serialize_with = "arc_str")]
    pub node: Arc<str>,
    #[serde(serialize_with = "request_id_str")]
    pub request_id: RequestId,
    /// The service's, policy's, version's and rule's names are shared with the routes and the
    /// compiled policy: a line copies none of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "mode_opt")]
    pub mode: Option<Mode>,
    #[serde(serialize_with = "decision_str")]
    pub decision: Decision,
    pub reason: &'static str,
    /// The policy that was evaluated (the service's), its deciding rule and version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<Arc<str>>,
    pub identity: IdentityLog,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadLog>,
    /// Set when the gateway terminated TLS for the request's connection.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::proxy::tls::serialize_opt"
    )]
    pub tls: Option<Arc<TlsLog>>,
    #[serde(serialize_with = "socket_addr")]
    pub src: SocketAddr,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "socket_addr_opt"
    )]
    pub dst: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// `http/1.1` or `h2`.
    pub protocol: &'static str,
    /// The standard methods are static strings; others (clipped) are copied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<Cow<'static, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The canonical path when it parsed, else the raw target (clipped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "socket_addr_opt"
    )]
    pub upstream: Option<SocketAddr>,
    pub status: u16,
    pub latency_us: u64,
}

impl RequestLine {
    /// A line for a request about which nothing is known yet (denied until decided).
    pub fn new(
        node: &Arc<str>,
        request_id: RequestId,
        src: SocketAddr,
        protocol: &'static str,
    ) -> Self {
        Self {
            node: node.clone(),
            request_id,
            service: None,
            mode: None,
            decision: Decision::Deny,
            reason: "internal_error",
            policy: None,
            rule: None,
            policy_version: None,
            identity: IdentityLog::default(),
            workload: None,
            tls: None,
            src,
            dst: None,
            cgroup_id: None,
            protocol,
            method: None,
            host: None,
            path: None,
            upstream: None,
            status: 0,
            latency_us: 0,
        }
    }

    /// Write the line and count the request.
    ///
    /// In the daemon the line is formatted here, once, into a buffer of this thread and
    /// appended to the decision log as it is: the same bytes the tracing layer
    /// ([`super::format::DecisionFormat`]) writes for it, without its dispatch, its copies and
    /// their allocations (together ~7% of the gateway's CPU per request under load: `perf`,
    /// docs/PROFILE.md). Without the daemon's log (tests, the CLI) it is a tracing event.
    pub fn emit(&self, metrics: &Metrics) {
        metrics.request(
            self.service.as_ref(),
            self.decision,
            self.reason,
            self.latency_us,
        );
        if let Some(log) = super::decision_log() {
            let write = |buf: &mut Vec<u8>| {
                buf.clear();
                self.write_line(buf, SystemTime::now());
                log.append(buf);
                // A line far past the usual (a long path, many groups) does not stay around.
                buf.shrink_to(LINE_KEEP);
            };
            // A thread whose locals are being torn down (or a line written from within the
            // write, which nothing does) gets a buffer of its own: never a panic, never a lost
            // line.
            let written = LINE
                .try_with(|cell| cell.try_borrow_mut().map(|mut buf| write(&mut buf)).is_ok())
                .unwrap_or(false);
            if !written {
                write(&mut Vec::with_capacity(LINE_KEEP));
            }
            return;
        }
        // Serializing plain strings and numbers cannot fail; an empty object would still be a
        // well-formed line.
        let mut object = Vec::with_capacity(LINE_KEEP);
        if serde_json::to_writer(&mut object, self).is_err() {
            object.clear();
        }
        tracing::info!(
            target: DECISION_TARGET,
            kind = "request",
            { OBJECT_FIELD } = std::str::from_utf8(&object).unwrap_or_default(),
        );
    }

    /// The whole line, newline included, as the tracing layer formats the event `emit` sends
    /// without the daemon's log: `timestamp`, `level`, `target`, `kind`, then the members of
    /// this struct in order.
    fn write_line(&self, buf: &mut Vec<u8>, now: SystemTime) {
        buf.extend_from_slice(b"{\"timestamp\":\"");
        timestamp::write(buf, now);
        buf.extend_from_slice(b"\",\"level\":\"INFO\",\"target\":\"");
        buf.extend_from_slice(DECISION_TARGET.as_bytes());
        buf.extend_from_slice(b"\",\"kind\":\"request\"");
        self.write_members(buf);
        buf.extend_from_slice(b"}\n");
    }

    /// The members of this struct, each preceded by a comma, exactly as `serde_json` serializes
    /// them (`Serialize` above: same order, same omissions, same escaping), written by hand:
    /// `serde_json`'s per-field and per-byte escaping path was 9% of a request's instructions
    /// (callgrind, `benches/request_path.rs`). The unit test holds the two to the same bytes.
    fn write_members(&self, buf: &mut Vec<u8>) {
        let mut out = json::Members::after(buf);
        out.str("node", &self.node);
        out.str("request_id", self.request_id.as_str());
        out.opt_str("service", self.service.as_deref());
        out.opt_str("mode", self.mode.map(mode_str));
        out.str("decision", self.decision.as_str());
        out.str("reason", self.reason);
        out.opt_str("policy", self.policy.as_deref());
        out.opt_str("rule", self.rule.as_deref());
        out.opt_str("policy_version", self.policy_version.as_deref());
        {
            let mut inner = out.object("identity");
            inner.str("kind", self.identity.kind());
            if let Some(id) = &self.identity.0 {
                inner.str("subject", &id.subject);
                inner.opt_str("email", id.email.as_deref());
                if !id.groups.is_empty() {
                    inner.key("groups");
                    inner.buf.push(b'[');
                    for (i, g) in id.groups.iter().enumerate() {
                        if i > 0 {
                            inner.buf.push(b',');
                        }
                        json::string(inner.buf, g);
                    }
                    inner.buf.push(b']');
                }
                inner.str("issuer", &id.issuer);
            }
            inner.end();
        }
        if let Some(w) = &self.workload {
            let mut inner = out.object("workload");
            inner.str("namespace", &w.namespace);
            inner.str("service_account", &w.service_account);
            inner.opt_str("pod", w.pod.as_deref());
            inner.str("from", w.from);
            inner.end();
        }
        if let Some(tls) = &self.tls {
            // Only on connections the gateway terminated: serde_json as it is.
            out.key("tls");
            if serde_json::to_writer(&mut *out.buf, &**tls).is_err() {
                out.buf.extend_from_slice(b"null");
            }
        }
        out.addr("src", &self.src);
        if let Some(dst) = &self.dst {
            out.addr("dst", dst);
        }
        if let Some(id) = self.cgroup_id {
            out.u64("cgroup_id", id);
        }
        out.str("protocol", self.protocol);
        out.opt_str("method", self.method.as_deref());
        out.opt_str("host", self.host.as_deref());
        out.opt_str("path", self.path.as_deref());
        if let Some(upstream) = &self.upstream {
            out.addr("upstream", upstream);
        }
        out.u64("status", u64::from(self.status));
        out.u64("latency_us", self.latency_us);
    }
}

/// Capacity a thread's line buffer keeps between lines (a typical line is 500-800 bytes).
const LINE_KEEP: usize = 1024;

thread_local! {
    /// The line being written by this thread (`RequestLine::emit`).
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(LINE_KEEP));
}

#[expect(
    clippy::ref_option,
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes the field by reference"
)]
fn mode_opt<S: Serializer>(mode: &Option<Mode>, s: S) -> Result<S::Ok, S::Error> {
    match mode {
        Some(m) => s.serialize_str(mode_str(*m)),
        None => s.serialize_none(),
    }
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes the field by reference"
)]
fn decision_str<S: Serializer>(d: &Decision, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

fn request_id_str<S: Serializer>(v: &RequestId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_str())
}

fn arc_str<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

/// `addr` as its `Display` writes it (IPv4 by [`json::write_v4`], IPv6 through `Display`).
fn socket_addr<S: Serializer>(addr: &SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    match addr {
        SocketAddr::V4(v4) => {
            let mut buf = [0u8; json::V4_ADDR_LEN];
            let len = json::write_v4(&mut buf, *v4);
            // Digits, dots and a colon: always UTF-8.
            match std::str::from_utf8(&buf[..len]) {
                Ok(text) => s.serialize_str(text),
                Err(_) => s.collect_str(addr),
            }
        }
        SocketAddr::V6(_) => s.collect_str(addr),
    }
}

#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes the field by reference"
)]
fn socket_addr_opt<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
    match addr {
        Some(addr) => socket_addr(addr, s),
        None => s.serialize_none(),
    }
}

/// One bypass attempt reported by the kernel; `suppressed` earlier events from the same
/// source were not written as lines of their own.
#[derive(Debug, Clone)]
pub struct BypassLine<'a> {
    pub node: &'a str,
    pub service: &'a str,
    pub mode: Mode,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub reason: &'a str,
    pub action: &'a str,
    pub suppressed: u64,
    /// The local workload that owns the source address, if any.
    pub src_workload: Option<WorkloadLog>,
}

impl BypassLine<'_> {
    pub fn emit(&self) {
        tracing::info!(
            target: DECISION_TARGET,
            kind = "bypass",
            node = self.node,
            service = self.service,
            mode = mode_str(self.mode),
            src = %self.src,
            dst = %self.dst,
            reason = self.reason,
            action = self.action,
            suppressed = self.suppressed,
            src_namespace = self.src_workload.as_ref().map(|w| w.namespace.as_str()),
            src_service_account = self.src_workload.as_ref().map(|w| w.service_account.as_str()),
            src_pod = self.src_workload.as_ref().and_then(|w| w.pod.as_deref()),
        );
    }
}

#[cfg(test)]
pub(crate) mod capture {
    //! Runs code under a subscriber with the production decision layer writing to memory.

    use std::{
        io,
        sync::{Arc, Mutex, PoisonError},
    };

    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt as _};

    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// Every decision line written so far, parsed.
        pub(crate) fn lines(&self) -> Vec<serde_json::Value> {
            let buf = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            String::from_utf8_lossy(&buf)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        }

        /// Everything written so far, as written.
        pub(crate) fn raw(&self) -> Vec<u8> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }

        /// A guard installing the capturing subscriber on this thread.
        pub(crate) fn install(&self) -> tracing::subscriber::DefaultGuard {
            let subscriber =
                tracing_subscriber::registry().with(super::super::decision_layer(self.clone()));
            tracing::subscriber::set_default(subscriber)
        }
    }

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Captured {
        type Writer = Self;

        fn make_writer(&self) -> Self {
            self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A verified user, as the request path logs it.
    fn user(subject: &str, email: Option<&str>, groups: &[&str], issuer: &str) -> IdentityLog {
        IdentityLog(Some(Arc::new(Identity {
            kind: crate::auth::IdentityKind::User,
            subject: subject.to_owned(),
            email: email.map(str::to_owned),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            issuer: issuer.to_owned(),
            issuer_name: "t".to_owned(),
            claims: serde_json::Map::new(),
            workload: None,
            expires_at: None,
        })))
    }

    /// A request line with every kind of member, awkward strings included.
    fn full_line() -> RequestLine {
        let mut line = RequestLine::new(
            &"node-a".into(),
            RequestId::fixed(b"00000000000000000000000000000001"),
            "10.0.0.7:40000".parse().unwrap(),
            "http/1.1",
        );
        line.service = Some("grafana".into());
        line.mode = Some(Mode::Enforce);
        line.decision = Decision::Allow;
        line.reason = "rule_matched";
        line.policy = Some("grafana".into());
        line.rule = Some("devs \"read\"".into());
        line.policy_version = Some("v1".into());
        line.identity = user(
            "alice\n",
            Some("alice@example.com"),
            &["devs", "ops\\x"],
            "https://login.example",
        );
        line.workload = Some(WorkloadLog {
            namespace: "team".to_owned(),
            service_account: "builder".to_owned(),
            pod: Some("builder-0".to_owned()),
            from: "token",
        });
        line.tls = Some(Arc::new(TlsLog {
            sni: Some("grafana.example".to_owned()),
            client_cert: Some(CertIdentity {
                subject: "CN=builder".to_owned(),
                dns_sans: vec![],
                uri_sans: vec!["spiffe://example.org/ns/team/sa/builder".to_owned()],
                spiffe_id: Some("spiffe://example.org/ns/team/sa/builder".to_owned()),
            }),
        }));
        line.dst = Some("[fe80::1%2]:8080".parse().unwrap());
        line.cgroup_id = Some(u64::MAX);
        line.method = Some("GET".into());
        line.host = Some("grafana.example".to_owned());
        line.path = Some("/a/\u{1}/é".to_owned());
        line.upstream = Some("10.1.0.3:3000".parse().unwrap());
        line.status = 200;
        line.latency_us = 123;
        line
    }

    /// The daemon's direct line and the tracing event's line are the same bytes but for the
    /// time: same members, same order, same escaping. Also with every optional member absent.
    #[test]
    fn the_direct_line_is_the_line_the_tracing_layer_writes() {
        let metrics = Metrics::new(None);
        for line in [
            full_line(),
            RequestLine::new(
                &"n".into(),
                RequestId::fixed(b"ffffffffffffffffffffffffffffffff"),
                "[::1]:1".parse().unwrap(),
                "h2",
            ),
        ] {
            let captured = capture::Captured::default();
            {
                let _guard = captured.install();
                line.emit(&metrics);
            }
            let traced = captured.raw();
            let mut direct = Vec::new();
            line.write_line(&mut direct, SystemTime::now());
            // `{"timestamp":"2026-12-06T16:40:00.123456Z"` and then the same bytes.
            let prefix = br#"{"timestamp":""#.len() + "2026-12-06T16:40:00.123456Z\"".len();
            for bytes in [&traced, &direct] {
                let text = std::str::from_utf8(bytes).unwrap();
                assert!(text.starts_with(r#"{"timestamp":""#), "{text}");
                let time = &text[r#"{"timestamp":""#.len()..prefix - 1];
                assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok(), "{text}");
                assert_eq!(text.matches('\n').count(), 1, "{text}");
                assert!(text.ends_with("}\n"), "{text}");
            }
            assert_eq!(
                String::from_utf8_lossy(&direct[prefix..]),
                String::from_utf8_lossy(&traced[prefix..]),
            );
            let parsed: serde_json::Value = serde_json::from_slice(&direct).unwrap();
            assert_eq!(parsed["kind"], "request");
            assert_eq!(parsed["target"], DECISION_TARGET);
            assert_eq!(parsed["node"], &*line.node);
        }
        // The awkward strings came through escaped and whole.
        let mut direct = Vec::new();
        full_line().write_line(&mut direct, SystemTime::now());
        let parsed: serde_json::Value = serde_json::from_slice(&direct).unwrap();
        assert_eq!(parsed["rule"], "devs \"read\"");
        assert_eq!(parsed["path"], "/a/\u{1}/é");
        assert_eq!(parsed["identity"]["groups"][1], "ops\\x");
        assert_eq!(
            parsed["tls"]["client_cert"]["spiffe_id"],
            "spiffe://example.org/ns/team/sa/builder"
        );
        assert_eq!(parsed["dst"], "[fe80::1%2]:8080");
    }

    #[test]
    fn socket_addresses_are_written_as_display_writes_them() {
        #[derive(Serialize)]
        struct Addrs {
            #[serde(serialize_with = "socket_addr")]
            one: SocketAddr,
            #[serde(serialize_with = "socket_addr_opt")]
            maybe: Option<SocketAddr>,
        }
        let mut addrs: Vec<SocketAddr> = [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.0.1:80",
            "1.22.103.9:8443",
            "100.10.1.0:10",
            "[::1]:443",
            "[fe80::1%2]:8080",
            "[::ffff:10.0.0.1]:15001",
            "[2001:db8::ff00:42:8329]:65535",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        // Every octet value and every port digit count, in every position.
        for n in 0..=255u8 {
            let ip = std::net::Ipv4Addr::new(n, 255 - n, n / 3, n.wrapping_mul(7));
            let port = [0, 9, 10, 99, 100, 999, 1000, 9999, 10_000, 65_535][usize::from(n % 10)];
            addrs.push(SocketAddr::from((ip, port)));
        }
        for addr in addrs {
            let json = serde_json::to_value(Addrs {
                one: addr,
                maybe: Some(addr),
            })
            .unwrap();
            assert_eq!(json["one"], addr.to_string(), "{addr}");
            assert_eq!(json["maybe"], addr.to_string(), "{addr}");
        }
        let none = serde_json::to_value(Addrs {
            one: "1.2.3.4:5".parse().unwrap(),
            maybe: None,
        })
        .unwrap();
        assert_eq!(none["maybe"], serde_json::Value::Null);
    }

    #[test]
    fn connection_line_has_the_documented_shape() {
        let captured = capture::Captured::default();
        let metrics = Metrics::new(None);
        {
            let _guard = captured.install();
            let mut line = ConnectionLine::new("node-a", "10.1.1.2:43122".parse().unwrap());
            line.service = Some("grafana");
            line.mode = Some(Mode::Enforce);
            line.dst = Some("10.96.0.10:80".parse().unwrap());
            line.cgroup_id = Some(1234);
            line.decision = Decision::Allow;
            line.reason = Reason::SourceAllowed;
            line.upstream = Some("10.1.2.2:8080".parse().unwrap());
            line.bytes_up = 77;
            line.bytes_down = 512;
            line.duration = Duration::from_millis(3);
            line.emit(&metrics);
            tracing::info!(target: "other", "not a decision");
        }
        let lines = captured.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        for (k, v) in [
            ("target", "decision"),
            ("level", "INFO"),
            ("kind", "connection"),
            ("node", "node-a"),
            ("service", "grafana"),
            ("mode", "enforce"),
            ("dst", "10.96.0.10:80"),
            ("src", "10.1.1.2:43122"),
            ("decision", "allow"),
            ("reason", "source_allowed"),
            ("upstream", "10.1.2.2:8080"),
        ] {
            assert_eq!(l[k], v, "{k} in {l}");
        }
        for (k, v) in [
            ("cgroup_id", 1234),
            ("bytes_up", 77),
            ("bytes_down", 512),
            ("duration_ms", 3),
        ] {
            assert_eq!(l[k], v, "{k} in {l}");
        }
        assert!(l["timestamp"].is_string());
        assert!(l.get("message").is_none(), "{l}");
    }

    #[test]
    fn request_line_nests_identity_and_workload() {
        let captured = capture::Captured::default();
        let metrics = Metrics::new(None);
        {
            let _guard = captured.install();
            let mut line = RequestLine::new(
                &"node-a".into(),
                RequestId::fixed(b"0123456789abcdef0123456789abcdef"),
                "10.1.1.2:43122".parse().unwrap(),
                "http/1.1",
            );
            line.service = Some("grafana".into());
            line.mode = Some(Mode::Enforce);
            line.decision = Decision::Allow;
            line.reason = "allowed_by_rule";
            line.policy = Some("grafana".into());
            line.rule = Some("devs".into());
            line.policy_version = Some("61ac71a56e80".into());
            line.identity = user(
                "alice",
                Some("alice@example.com"),
                &["devs", "a\"b"],
                "https://login.example.com",
            );
            line.workload = Some(WorkloadLog {
                namespace: "ci".into(),
                service_account: "builder".into(),
                pod: None,
                from: "source",
            });
            line.method = Some("GET".into());
            line.path = Some("/x\n\"y".into());
            line.status = 200;
            line.latency_us = 812;
            line.emit(&metrics);
        }
        let lines = captured.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let l = &lines[0];
        assert_eq!(l["target"], "decision");
        assert_eq!(l["kind"], "request");
        assert_eq!(l["decision"], "allow");
        assert_eq!(l["mode"], "enforce");
        assert_eq!(l["identity"]["kind"], "user");
        assert_eq!(l["identity"]["groups"][1], "a\"b");
        assert_eq!(l["workload"]["service_account"], "builder");
        assert_eq!(l["path"], "/x\n\"y");
        assert_eq!(l["status"], 200);
        assert_eq!(l["latency_us"], 812);
        assert!(
            l.get("object").is_none() && l.get("upstream").is_none(),
            "{l}"
        );
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "nodegate_requests_total{service=\"grafana\",decision=\"allow\",reason=\"allowed_by_rule\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("nodegate_request_duration_seconds_count{service=\"grafana\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(clip("abc"), "abc");
        let long = "é".repeat(MAX_LOGGED_LEN);
        let cut = clip(&long);
        assert!(cut.len() <= MAX_LOGGED_LEN + "…".len() && cut.ends_with('…'));
    }

    #[test]
    fn bypass_line_has_the_documented_shape() {
        let captured = capture::Captured::default();
        {
            let _guard = captured.install();
            BypassLine {
                node: "node-a",
                service: "grafana",
                mode: Mode::Audit,
                src: "10.1.250.2:50122".parse().unwrap(),
                dst: "[fd77::2]:8080".parse().unwrap(),
                reason: "not_from_gateway",
                action: "passed",
                suppressed: 4,
                src_workload: Some(WorkloadLog {
                    namespace: "ci".into(),
                    service_account: "builder".into(),
                    pod: Some("build-1".into()),
                    from: "source",
                }),
            }
            .emit();
        }
        let lines = captured.lines();
        let l = &lines[0];
        assert_eq!(l["kind"], "bypass");
        assert_eq!(l["mode"], "audit");
        assert_eq!(l["dst"], "[fd77::2]:8080");
        assert_eq!(l["action"], "passed");
        assert_eq!(l["suppressed"], 4);
        assert_eq!(l["src_namespace"], "ci");
        assert_eq!(l["src_service_account"], "builder");
        assert_eq!(l["src_pod"], "build-1");
    }
}
