//! The decision log vocabulary and the two kinds of lines (docs/ARCHITECTURE.md, "Decision log
//! lines"). Fields without a value (no original destination, so no service) are omitted.

use std::{net::SocketAddr, time::Duration};

use super::{DECISION_TARGET, Metrics};
use crate::ebpf::Mode;

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
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SourceAllowed => "source_allowed",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::NoOriginalDestination => "no_original_destination",
            Self::UnknownDestination => "unknown_destination",
            Self::UpstreamUnavailable => "upstream_unavailable",
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
    pub decision: Decision,
    pub reason: Reason,
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
            decision: Decision::Deny,
            reason: Reason::NoOriginalDestination,
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
            decision = self.decision.as_str(),
            reason = self.reason.as_str(),
            upstream = self.upstream.map(display),
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
        );
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
    }
}
