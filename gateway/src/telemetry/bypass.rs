//! Bypass events from the kernel ring buffer become `bypass` decision lines, rate-limited per
//! source address so that a flood cannot drown the log. The kernel counters stay exact; the
//! log stays accountable: every line carries `suppressed`, the number of events from the same
//! source not written since its previous line, so lines + Σ suppressed = events.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{
    Metrics,
    decision::{BypassLine, WorkloadLog},
};
use crate::ebpf::{BypassEvent, BypassEvents, Mode};

/// Sources tracked at once; beyond that, new sources share one bucket (a spoofed-source flood
/// must not grow memory without bound).
const MAX_SOURCES: usize = 16_384;

/// A token bucket per source (GCRA form): `lines` per `interval`, bursts of `lines`.
#[derive(Debug)]
pub struct RateLimiter {
    /// Time one token takes to refill.
    emission: Duration,
    /// How far ahead of now the theoretical arrival time may run (capacity − 1 tokens).
    tolerance: Duration,
    max_sources: usize,
    sources: HashMap<SourceKey, SourceState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    Ip(IpAddr),
    Overflow,
}

#[derive(Debug)]
struct SourceState {
    /// Theoretical arrival time of the next conforming event.
    tat: Instant,
    /// Events suppressed since the last line.
    pending: u64,
    /// The most recent suppressed event, written by [`RateLimiter::flush`].
    last: Option<BypassEvent>,
}

/// What to do with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Write a line for it, carrying this many earlier suppressed events.
    Line {
        suppressed: u64,
    },
    Suppress,
}

impl RateLimiter {
    pub fn new(lines: u32, interval: Duration) -> Self {
        let lines = lines.max(1);
        let emission = interval / lines;
        Self {
            emission,
            tolerance: interval.saturating_sub(emission),
            max_sources: MAX_SOURCES,
            sources: HashMap::new(),
        }
    }

    fn key(&self, src: IpAddr) -> SourceKey {
        let key = SourceKey::Ip(src.to_canonical());
        if self.sources.len() < self.max_sources || self.sources.contains_key(&key) {
            key
        } else {
            SourceKey::Overflow
        }
    }

    fn conforms(
        emission: Duration,
        tolerance: Duration,
        state: &mut SourceState,
        now: Instant,
    ) -> bool {
        let tat = state.tat.max(now);
        if tat.duration_since(now) > tolerance {
            return false;
        }
        state.tat = tat + emission;
        true
    }

    pub fn admit(&mut self, event: &BypassEvent, now: Instant) -> Admit {
        let key = self.key(event.src.ip());
        let state = self.sources.entry(key).or_insert(SourceState {
            tat: now,
            pending: 0,
            last: None,
        });
        if Self::conforms(self.emission, self.tolerance, state, now) {
            let suppressed = std::mem::take(&mut state.pending);
            state.last = None;
            Admit::Line { suppressed }
        } else {
            state.pending += 1;
            state.last = Some(*event);
            Admit::Suppress
        }
    }

    /// Suppressed events still pending for a source that may write again: its last event as
    /// a line, with the others in `suppressed`. Also forgets idle sources.
    pub fn flush(&mut self, now: Instant) -> Vec<(BypassEvent, u64)> {
        let mut out = Vec::new();
        for state in self.sources.values_mut() {
            let Some(last) = state.last else { continue };
            if Self::conforms(self.emission, self.tolerance, state, now) {
                out.push((last, state.pending.saturating_sub(1)));
                state.pending = 0;
                state.last = None;
            }
        }
        self.sources.retain(|_, s| s.pending > 0 || s.tat > now);
        out
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.len()
    }
}

/// Service name and mode of a service id (from the live service table).
pub type ServiceLookup = Box<dyn Fn(u32) -> Option<(String, Mode)> + Send + Sync>;
/// The local workload that owns a source address (a pod of this node), if any.
pub type SourceLookup = Box<dyn Fn(IpAddr) -> Option<WorkloadLog> + Send + Sync>;

/// Turns events into lines.
pub struct BypassLog {
    node: String,
    lookup: ServiceLookup,
    sources: Option<SourceLookup>,
    limiter: RateLimiter,
    metrics: Arc<Metrics>,
}

impl BypassLog {
    pub fn new(
        node: String,
        lines: u32,
        interval: Duration,
        lookup: ServiceLookup,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            node,
            lookup,
            sources: None,
            limiter: RateLimiter::new(lines, interval),
            metrics,
        }
    }

    /// Name the source workload of each line (by address: the kernel's ingress hook has no
    /// cgroup for the sender).
    #[must_use]
    pub fn with_sources(mut self, sources: SourceLookup) -> Self {
        self.sources = Some(sources);
        self
    }

    pub fn handle(&mut self, events: &[BypassEvent], now: Instant) {
        for event in events {
            self.metrics.bypass_events().inc();
            match self.limiter.admit(event, now) {
                Admit::Line { suppressed } => self.write(event, suppressed),
                Admit::Suppress => {}
            }
        }
    }

    pub fn flush(&mut self, now: Instant) {
        for (event, suppressed) in self.limiter.flush(now) {
            self.write(&event, suppressed);
        }
    }

    fn write(&self, event: &BypassEvent, suppressed: u64) {
        // Counted as reported, so the metric always equals the sum over the lines.
        self.metrics.bypass_lines_suppressed().inc_by(suppressed);
        let known = (self.lookup)(event.service_id);
        let fallback;
        let service = if let Some((name, _)) = &known {
            name.as_str()
        } else {
            fallback = format!("unknown-{:#010x}", event.service_id);
            &fallback
        };
        // The action says what the kernel did, whatever the config says now.
        let mode = match event.action {
            "dropped" => Mode::Enforce,
            "passed" => Mode::Audit,
            _ => known.as_ref().map_or(Mode::Enforce, |(_, m)| *m),
        };
        BypassLine {
            node: &self.node,
            service,
            mode,
            src: event.src,
            dst: event.dst,
            reason: event.reason,
            action: event.action,
            suppressed,
            src_workload: self.sources.as_ref().and_then(|f| f(event.src.ip())),
        }
        .emit();
    }

    /// Read events until `stop` turns true or the stream ends; flush pending counts every
    /// `interval`.
    pub async fn run(mut self, mut events: BypassEvents, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.limiter.emission.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = events.next_batch() => match batch {
                    Ok(batch) if batch.is_empty() => {
                        tracing::warn!("the kernel bypass event stream ended");
                        break;
                    }
                    Ok(batch) => self.handle(&batch, Instant::now()),
                    Err(err) => {
                        tracing::warn!(error = %err, "reading bypass events failed; retrying in 1s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                _ = tick.tick() => self.flush(Instant::now()),
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            }
        }
        self.flush(Instant::now() + self.limiter.tolerance + self.limiter.emission);
        if events.malformed() > 0 {
            tracing::warn!(
                malformed = events.malformed(),
                "bypass events too short to decode (kernel and gateway builds differ?)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::decision::capture::Captured;

    fn event(src: &str) -> BypassEvent {
        BypassEvent {
            service_id: 7,
            src: src.parse().unwrap(),
            dst: "10.77.2.2:8080".parse().unwrap(),
            reason: "not_from_gateway",
            action: "dropped",
            ts_ns: 0,
        }
    }

    #[test]
    fn burst_then_one_per_emission_interval() {
        let mut l = RateLimiter::new(5, Duration::from_secs(1));
        let t0 = Instant::now();
        let e = event("10.0.0.1:1000");
        let admitted: Vec<Admit> = (0..8).map(|_| l.admit(&e, t0)).collect();
        assert_eq!(
            admitted,
            [
                Admit::Line { suppressed: 0 },
                Admit::Line { suppressed: 0 },
                Admit::Line { suppressed: 0 },
                Admit::Line { suppressed: 0 },
                Admit::Line { suppressed: 0 },
                Admit::Suppress,
                Admit::Suppress,
                Admit::Suppress,
            ]
        );
        // One token back after 200 ms; the line carries the four events suppressed before it.
        assert_eq!(
            l.admit(&e, t0 + Duration::from_millis(199)),
            Admit::Suppress
        );
        assert_eq!(
            l.admit(&e, t0 + Duration::from_millis(200)),
            Admit::Line { suppressed: 4 }
        );
        assert_eq!(
            l.admit(&e, t0 + Duration::from_millis(200)),
            Admit::Suppress
        );
    }

    #[test]
    fn sources_are_limited_independently() {
        let mut l = RateLimiter::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(
            l.admit(&event("10.0.0.1:1"), t0),
            Admit::Line { suppressed: 0 }
        );
        assert_eq!(l.admit(&event("10.0.0.1:2"), t0), Admit::Suppress);
        assert_eq!(
            l.admit(&event("10.0.0.2:1"), t0),
            Admit::Line { suppressed: 0 }
        );
        assert_eq!(l.admit(&event("[::ffff:10.0.0.2]:1"), t0), Admit::Suppress);
    }

    #[test]
    fn flush_writes_pending_once_a_token_is_back_and_forgets_idle_sources() {
        let mut l = RateLimiter::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        let e = event("10.0.0.1:1");
        l.admit(&e, t0);
        for _ in 0..3 {
            l.admit(&e, t0);
        }
        assert_eq!(l.flush(t0 + Duration::from_millis(500)), []);
        let flushed = l.flush(t0 + Duration::from_secs(1));
        assert_eq!(flushed.len(), 1);
        // The line stands for the last suppressed event; the two before it are in `suppressed`.
        assert_eq!(flushed[0].1, 2);
        assert_eq!(l.flush(t0 + Duration::from_secs(1)), []);
        assert_eq!(l.tracked(), 1);
        l.flush(t0 + Duration::from_secs(3));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn source_table_is_bounded() {
        let mut l = RateLimiter::new(1, Duration::from_secs(1));
        l.max_sources = 2;
        let t0 = Instant::now();
        assert_eq!(
            l.admit(&event("10.0.0.1:1"), t0),
            Admit::Line { suppressed: 0 }
        );
        assert_eq!(
            l.admit(&event("10.0.0.2:1"), t0),
            Admit::Line { suppressed: 0 }
        );
        assert_eq!(
            l.admit(&event("10.0.0.3:1"), t0),
            Admit::Line { suppressed: 0 }
        );
        assert_eq!(l.admit(&event("10.0.0.4:1"), t0), Admit::Suppress);
        assert_eq!(l.tracked(), 3);
    }

    #[test]
    fn lines_plus_suppressed_equal_events() {
        let captured = Captured::default();
        let metrics = Arc::new(Metrics::new(None));
        let lookup: ServiceLookup =
            Box::new(|id| (id == 7).then(|| ("grafana".into(), Mode::Enforce)));
        let mut log = BypassLog::new(
            "node-a".into(),
            2,
            Duration::from_secs(1),
            lookup,
            metrics.clone(),
        );
        let t0 = Instant::now();
        {
            let _guard = captured.install();
            let batch: Vec<BypassEvent> = (0..10)
                .map(|i| event(&format!("10.0.0.{}:9", i % 2)))
                .collect();
            log.handle(&batch, t0);
            log.flush(t0 + Duration::from_secs(2));
        }
        let lines = captured.lines();
        let total: u64 = lines
            .iter()
            .map(|l| 1 + l["suppressed"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 10, "{lines:?}");
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[0]["service"], "grafana");
        assert_eq!(lines[0]["mode"], "enforce");
        assert_eq!(lines[0]["node"], "node-a");
        assert_eq!(metrics.bypass_lines_suppressed().get(), 4);
        assert_eq!(metrics.bypass_events().get(), 10);
    }
}
