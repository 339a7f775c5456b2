//! Prometheus metrics. Userspace counters live in the registry; the kernel's bypass counters,
//! program stats and map sizes are read from the pinned maps at scrape time
//! ([`KernelCollector`]), so they are exact and survive restarts of the daemon.

use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::{Decision, Reason};
use crate::{
    ebpf::inspect,
    source::kubernetes::{Health, WatcherHealth},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    service: String,
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: Arc<str>,
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
}

/// 50 µs .. ~1.6 s in powers of two: gateway-local denials sit at the low end, upstream
/// round trips further up.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct BypassLabels {
    service: String,
    reason: &'static str,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatLabels {
    stat: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

/// Outcome of a config reload, for `nodegate_config_reloads_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    Error,
}

/// `(service, notAfter)` of the TLS services' certificates, shared with the collector.
type SharedExpiries = Arc<Mutex<Vec<(Arc<str>, i64)>>>;

pub struct Metrics {
    registry: Registry,
    connections: Family<ConnectionLabels, Counter>,
    connections_active: Gauge,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    token_cache: Family<ResultLabels, Counter>,
    jwks_fetch_failures: Family<IssuerLabels, Counter>,
    bypass_events: Counter,
    bypass_lines_suppressed: Counter,
    decision_log: DecisionLogMetrics,
    config_reloads: Family<ResultLabels, Counter>,
    kube_applies: Family<ResultLabels, Counter>,
    /// The Kubernetes source's health as last reported (`None`: no source).
    kube_health: Arc<Mutex<Option<Health>>>,
    /// `(service, notAfter)` of the certificates of TLS services, as last checked.
    tls_expiry: SharedExpiries,
    /// The `service` label of requests that never resolved to one: empty.
    no_service: Arc<str>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// `bpffs`: where the kernel counters are read at scrape time (`None`: userspace only).
    pub fn new(bpffs: Option<PathBuf>) -> Self {
        let mut registry = Registry::default();
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "nodegate_connections",
            "Connections handled by the proxy, by service, decision and reason",
            connections.clone(),
        );
        let connections_active = Gauge::default();
        registry.register(
            "nodegate_connections_active",
            "Connections being forwarded now",
            connections_active.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "nodegate_requests",
            "HTTP requests to services with a policy, by service, decision and reason",
            requests.clone(),
        );
        let request_duration =
            Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "nodegate_request_duration_seconds",
            "From the request head to the response head (or the gateway's own answer), by service",
            request_duration.clone(),
        );
        let token_cache = Family::<ResultLabels, Counter>::default();
        registry.register(
            "nodegate_token_cache_lookups",
            "Verified-token cache lookups, by result (hit, miss)",
            token_cache.clone(),
        );
        let jwks_fetch_failures = Family::<IssuerLabels, Counter>::default();
        registry.register(
            "nodegate_jwks_fetch_failures",
            "Discovery/JWKS loads that failed, by issuer",
            jwks_fetch_failures.clone(),
        );
        let bypass_events = Counter::default();
        registry.register(
            "nodegate_bypass_events",
            "Bypass events received from the kernel ring buffer",
            bypass_events.clone(),
        );
        let bypass_lines_suppressed = Counter::default();
        registry.register(
            "nodegate_bypass_lines_suppressed",
            "Bypass events not written as a line of their own by the per-source rate limit \
             (the sum of the lines' `suppressed`)",
            bypass_lines_suppressed.clone(),
        );
        let decision_log = register_decision_log(&mut registry);
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "nodegate_config_reloads",
            "Config reloads, by result (ok, error)",
            config_reloads.clone(),
        );
        let (kube_applies, kube_health) = register_source(&mut registry);
        let tls_expiry = Arc::new(Mutex::new(Vec::new()));
        registry.register_collector(Box::new(TlsCollector {
            certificates: tls_expiry.clone(),
        }));
        if let Some(bpffs) = bpffs {
            let scrape_errors = Counter::default();
            registry.register(
                "nodegate_datapath_scrape_errors",
                "Scrapes that could not read the pinned kernel maps",
                scrape_errors.clone(),
            );
            registry.register_collector(Box::new(KernelCollector {
                bpffs,
                scrape_errors,
            }));
        }
        Self {
            registry,
            connections,
            connections_active,
            requests,
            request_duration,
            token_cache,
            jwks_fetch_failures,
            bypass_events,
            bypass_lines_suppressed,
            decision_log,
            config_reloads,
            kube_applies,
            kube_health,
            tls_expiry,
            no_service: Arc::from(""),
        }
    }

    /// The TLS services' certificates (`(service, notAfter)`), for
    /// `nodegate_tls_certificate_expiry_timestamp_seconds`.
    pub fn tls_certificates(&self, certificates: Vec<(Arc<str>, i64)>) {
        *self
            .tls_expiry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = certificates;
    }

    /// The Kubernetes source's health, for the `nodegate_kubernetes_*` gauges.
    pub fn kubernetes_health(&self, health: &Health) {
        *self
            .kube_health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(health.clone());
    }

    pub fn kubernetes_applied(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.kube_applies
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn connection(&self, service: Option<&str>, decision: Decision, reason: Reason) {
        self.connections
            .get_or_create(&ConnectionLabels {
                service: service.unwrap_or_default().to_owned(),
                decision: decision.as_str(),
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Counts a request and its latency. The service's name is shared, not copied: the labels'
    /// lookups allocate nothing once the series exist.
    pub fn request(
        &self,
        service: Option<&Arc<str>>,
        decision: Decision,
        reason: &'static str,
        latency_us: u64,
    ) {
        let service = service.unwrap_or(&self.no_service).clone();
        self.requests
            .get_or_create(&RequestLabels {
                service: service.clone(),
                decision: decision.as_str(),
                reason,
            })
            .inc();
        #[expect(
            clippy::cast_precision_loss,
            reason = "latencies far below 2^52 µs are exact in an f64"
        )]
        let seconds = latency_us as f64 / 1e6;
        self.request_duration
            .get_or_create(&ServiceLabels { service })
            .observe(seconds);
    }

    pub fn connections_active(&self) -> &Gauge {
        &self.connections_active
    }

    pub fn bypass_events(&self) -> &Counter {
        &self.bypass_events
    }

    pub fn bypass_lines_suppressed(&self) -> &Counter {
        &self.bypass_lines_suppressed
    }

    pub fn decision_log_errors(&self, sink: &'static str) -> Counter {
        self.decision_log
            .errors
            .get_or_create(&SinkLabels { sink })
            .clone()
    }

    /// The decision log's backpressure: requests that waited, and the bytes behind.
    pub fn decision_log_backpressure(&self) -> (Counter, Gauge) {
        (
            self.decision_log.waits.clone(),
            self.decision_log.buffered.clone(),
        )
    }

    pub fn config_reload(&self, result: ReloadResult) {
        let result = match result {
            ReloadResult::Ok => "ok",
            ReloadResult::Error => "error",
        };
        self.config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The `OpenMetrics` text exposition.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl crate::auth::AuthObserver for Metrics {
    fn jwks_loaded(&self, issuer: &str, keys: usize, skipped: usize) {
        tracing::info!(issuer, keys, skipped, "issuer keys loaded");
    }

    fn jwks_fetch_failed(
        &self,
        issuer: &str,
        error: &crate::auth::JwksError,
        kept_stale_keys: bool,
    ) {
        tracing::warn!(issuer, error = %crate::cli::error_chain(error), kept_stale_keys, "issuer keys could not be loaded");
        self.jwks_fetch_failures
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_owned(),
            })
            .inc();
    }

    fn jwks_refetch_rate_limited(&self, issuer: &str) {
        tracing::debug!(issuer, "unknown-kid refetch rate-limited");
    }

    fn token_cache_lookup(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.token_cache
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

/// Reads the pinned maps on every scrape.
#[derive(Debug)]
struct KernelCollector {
    bpffs: PathBuf,
    scrape_errors: Counter,
}

/// Name, help and value of one of the bypass counter families.
type BypassFamily = (&'static str, &'static str, fn(&BypassSums) -> u64);

#[derive(Default)]
struct BypassSums {
    syns: u64,
    packets: u64,
    bytes: u64,
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        match inspect::counters(&self.bpffs) {
            Ok(counters) => encode_counters(&counters, &mut encoder)?,
            Err(err) => {
                self.scrape_errors.inc();
                tracing::warn!(bpffs = %self.bpffs.display(), error = %err, "cannot read the kernel counters");
            }
        }
        match inspect::status(&self.bpffs) {
            Ok(status) => encode_status(&status, &mut encoder)?,
            Err(err) => {
                self.scrape_errors.inc();
                tracing::warn!(bpffs = %self.bpffs.display(), error = %err, "cannot read the datapath status");
            }
        }
        Ok(())
    }
}

/// When the certificate each TLS service presents expires, at scrape time: alert on
/// `nodegate_tls_certificate_expiry_timestamp_seconds - time() < 7 * 86400`.
#[derive(Debug)]
struct TlsCollector {
    certificates: SharedExpiries,
}

impl Collector for TlsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let certificates = self
            .certificates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if certificates.is_empty() {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(
            "nodegate_tls_certificate_expiry_timestamp_seconds",
            "When the certificate a TLS service presents (the one in use) expires, Unix seconds",
            None,
            MetricType::Gauge,
        )?;
        for (service, not_after) in certificates {
            let labels = ServiceLabels { service };
            ConstGauge::new(not_after).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The Kubernetes source's series: snapshots applied, and its health read at scrape time.
/// The decision log's: lines lost per sink, requests that waited, bytes behind.
struct DecisionLogMetrics {
    errors: Family<SinkLabels, Counter>,
    waits: Counter,
    buffered: Gauge,
}

fn register_decision_log(registry: &mut Registry) -> DecisionLogMetrics {
    let errors = Family::<SinkLabels, Counter>::default();
    registry.register(
        "nodegate_decision_log_errors",
        "Decision log lines that could not be written, by sink",
        errors.clone(),
    );
    let waits = Counter::default();
    registry.register(
        "nodegate_decision_log_waits",
        "Decision lines whose writer (a request, a connection) waited: the sinks (stdout, the \
         file) were 8 MiB behind, a slow or blocked output slowing the data plane rather than \
         losing lines",
        waits.clone(),
    );
    let buffered = Gauge::default();
    registry.register(
        "nodegate_decision_log_buffered_bytes",
        "Decision log bytes not yet written to every sink, as of the last batch (requests \
         wait at 8 MiB)",
        buffered.clone(),
    );
    DecisionLogMetrics {
        errors,
        waits,
        buffered,
    }
}

fn register_source(
    registry: &mut Registry,
) -> (Family<ResultLabels, Counter>, Arc<Mutex<Option<Health>>>) {
    let applies = Family::<ResultLabels, Counter>::default();
    registry.register(
        "nodegate_kubernetes_snapshots_applied",
        "Kubernetes snapshots merged into the routes and the kernel maps, by result (ok, error)",
        applies.clone(),
    );
    let health = Arc::new(Mutex::new(None));
    registry.register_collector(Box::new(SourceCollector {
        health: health.clone(),
    }));
    (applies, health)
}

/// A per-watcher family: name, help, type, value.
type PerWatcher = (
    &'static str,
    &'static str,
    MetricType,
    fn(&WatcherHealth) -> u64,
);

/// The Kubernetes source's health at scrape time.
#[derive(Debug)]
struct SourceCollector {
    health: Arc<Mutex<Option<Health>>>,
}

impl Collector for SourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(health) = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let gauge = |encoder: &mut DescriptorEncoder, name, help, value: i64| {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)
        };
        gauge(
            &mut encoder,
            "nodegate_kubernetes_ready",
            "1 while every watcher of the Kubernetes source has listed and none is failing",
            i64::from(health.ready()),
        )?;
        gauge(
            &mut encoder,
            "nodegate_kubernetes_snapshot_revision",
            "Snapshots published by the Kubernetes source (changes only)",
            i64::try_from(health.revision).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "nodegate_kubernetes_last_sync_timestamp_seconds",
            "When a snapshot was last computed from caches all in sync with the API server",
            unix_seconds(health.last_sync),
        )?;
        let families: [PerWatcher; 3] = [
            (
                "nodegate_kubernetes_watcher_synced",
                "1 when the watcher has listed at least once and is not failing",
                MetricType::Gauge,
                |w| u64::from(w.synced && w.error.is_none()),
            ),
            (
                "nodegate_kubernetes_watcher_consecutive_failures",
                "Failures of the watcher since its last successful list",
                MetricType::Gauge,
                |w| w.failures,
            ),
            (
                "nodegate_kubernetes_watcher_relists",
                "Re-lists forced by 410 Gone (resource version too old)",
                MetricType::Counter,
                |w| w.relists,
            ),
        ];
        for (name, help, kind, value) in families {
            let counter = matches!(kind, MetricType::Counter);
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            for w in &health.watchers {
                let labels = ResourceLabels {
                    resource: w.resource,
                };
                let v = value(w);
                if counter {
                    ConstCounter::new(v).encode(metric.encode_family(&labels)?)?;
                } else {
                    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
                        .encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

fn unix_seconds(t: Option<SystemTime>) -> i64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn encode_counters(
    counters: &inspect::Counters,
    encoder: &mut DescriptorEncoder,
) -> Result<(), fmt::Error> {
    // Sum over sources: a source label would make the cardinality attacker-controlled.
    let mut sums: BTreeMap<BypassLabels, BypassSums> = BTreeMap::new();
    for row in &counters.bypass {
        let sum = sums
            .entry(BypassLabels {
                service: row.service.clone(),
                reason: row.reason,
                action: row.action,
            })
            .or_default();
        sum.syns = sum.syns.saturating_add(row.syns);
        sum.packets = sum.packets.saturating_add(row.packets);
        sum.bytes = sum.bytes.saturating_add(row.bytes);
    }
    let families: [BypassFamily; 3] = [
        (
            "nodegate_bypass_attempts",
            "Connection attempts (SYN) to protected endpoints that did not come from a gateway",
            |s| s.syns,
        ),
        (
            "nodegate_bypass_packets",
            "Packets to protected endpoints that did not come from a gateway",
            |s| s.packets,
        ),
        (
            "nodegate_bypass_bytes",
            "Bytes to protected endpoints that did not come from a gateway",
            |s| s.bytes,
        ),
    ];
    for (name, help, value) in families {
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, sum) in &sums {
            ConstCounter::new(value(sum)).encode(metric.encode_family(labels)?)?;
        }
    }
    let mut metric = encoder.encode_descriptor(
        "nodegate_datapath_stats",
        "Kernel program statistics (NG_STATS), summed over CPUs",
        None,
        MetricType::Counter,
    )?;
    for (stat, value) in &counters.stats {
        ConstCounter::new(*value).encode(metric.encode_family(&StatLabels { stat })?)?;
    }
    Ok(())
}

fn encode_status(
    status: &inspect::Status,
    encoder: &mut DescriptorEncoder,
) -> Result<(), fmt::Error> {
    let mut metric = encoder.encode_descriptor(
        "nodegate_map_entries",
        "Entries in each pinned map",
        None,
        MetricType::Gauge,
    )?;
    for (map, entries) in &status.map_entries {
        let entries = i64::try_from(*entries).unwrap_or(i64::MAX);
        ConstGauge::new(entries).encode(metric.encode_family(&MapLabels { map })?)?;
    }
    let mut metric = encoder.encode_descriptor(
        "nodegate_program_attached",
        "1 when the program's pinned link is attached",
        None,
        MetricType::Gauge,
    )?;
    for link in &status.links {
        let attached = i64::from(link.pinned && link.link_id.is_some());
        ConstGauge::new(attached).encode(metric.encode_family(&ProgramLabels {
            program: link.name.clone(),
        })?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_counter_is_exposed_with_labels() {
        let m = Metrics::new(None);
        m.connection(Some("grafana"), Decision::Deny, Reason::SourceNotAllowed);
        m.connection(Some("grafana"), Decision::Deny, Reason::SourceNotAllowed);
        m.config_reload(ReloadResult::Error);
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                "nodegate_connections_total{service=\"grafana\",decision=\"deny\",reason=\"source_not_allowed\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("nodegate_config_reloads_total{result=\"error\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn kernel_counters_are_summed_over_sources() {
        let row = |source: &str, syns| inspect::CounterRow {
            service: "grafana".into(),
            service_id: 7,
            source: source.parse().unwrap(),
            reason: "not_from_gateway",
            action: "dropped",
            syns,
            packets: syns * 2,
            bytes: syns * 100,
        };
        let counters = inspect::Counters {
            bypass: vec![row("10.0.0.1", 2), row("10.0.0.2", 3)],
            stats: BTreeMap::from([("ingress_drops", 10)]),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(counters)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for want in [
            "nodegate_bypass_attempts_total{service=\"grafana\",reason=\"not_from_gateway\",action=\"dropped\"} 5",
            "nodegate_bypass_packets_total{service=\"grafana\",reason=\"not_from_gateway\",action=\"dropped\"} 10",
            "nodegate_datapath_stats_total{stat=\"ingress_drops\"} 10",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }

    #[derive(Debug)]
    struct Fixed(inspect::Counters);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
            encode_counters(&self.0, &mut encoder)
        }
    }

    #[test]
    fn kubernetes_source_health_is_exposed_per_watcher() {
        let m = Metrics::new(None);
        assert!(
            !m.encode().unwrap().contains("nodegate_kubernetes_ready"),
            "no source, no source series"
        );
        let watcher = |resource, error: Option<&str>, failures, relists| WatcherHealth {
            resource,
            synced: true,
            last_sync: None,
            error: error.map(Into::into),
            error_since: None,
            failures,
            relists,
        };
        m.kubernetes_health(&Health {
            watchers: vec![
                watcher("services", None, 0, 2),
                watcher("pods", Some("connection refused"), 3, 0),
            ],
            last_sync: None,
            revision: 7,
            status_error: None,
        });
        m.kubernetes_applied(true);
        let text = m.encode().unwrap();
        for want in [
            "nodegate_kubernetes_ready 0",
            "nodegate_kubernetes_snapshot_revision 7",
            "nodegate_kubernetes_watcher_synced{resource=\"services\"} 1",
            "nodegate_kubernetes_watcher_synced{resource=\"pods\"} 0",
            "nodegate_kubernetes_watcher_consecutive_failures{resource=\"pods\"} 3",
            "nodegate_kubernetes_watcher_relists_total{resource=\"services\"} 2",
            "nodegate_kubernetes_snapshots_applied_total{result=\"ok\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
    }
}
