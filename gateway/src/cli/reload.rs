//! Config reload: on SIGHUP and when the file's content changes (its hash, polled every
//! second). A good config swaps the proxy's route table and re-syncs the
//! maps; a config that does not parse, or that changes what only a restart can, is refused
//! and the running one kept. Open connections keep the table they started with.

use std::{
    collections::BTreeSet,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::PathBuf,
    sync::Arc,
};

use crate::{
    admin::Readiness,
    auth::{self, AuthObserver, Authenticator, LoadReport},
    config::{Config, ConfigError, Overrides},
    ebpf::{Datapath, DesiredState, EbpfError, SyncReport},
    proxy::{Routes, SharedRoutes},
    source::{apply, model::Snapshot},
    telemetry::{Metrics, metrics::ReloadResult},
};

/// Writes the desired state to the kernel maps: the [`Datapath`], or a fake in tests.
pub(super) trait MapSync {
    fn sync(&mut self, desired: &DesiredState) -> Result<SyncReport, EbpfError>;
}

impl MapSync for Datapath {
    fn sync(&mut self, desired: &DesiredState) -> Result<SyncReport, EbpfError> {
        Datapath::sync(self, desired)
    }
}

/// One line per HTTP service: the policy version its requests are logged under.
pub(super) fn log_policies(config: &Config) {
    for s in &config.services {
        if let Some(http) = &s.http {
            tracing::info!(
                service = %s.name,
                policy_version = %http.policy.version,
                deny_rules = http.policy.deny_rules,
                allow_rules = http.policy.allow_rules,
                "policy loaded"
            );
        }
    }
}

pub(super) fn log_key_load(report: &LoadReport) {
    match &report.result {
        Ok(keys) => tracing::info!(issuer = %report.issuer, keys, "issuer keys loaded"),
        Err(err) => tracing::warn!(
            issuer = %report.issuer,
            error = %super::error_chain(err),
            "issuer keys not loaded: its tokens are refused (issuer_unavailable) until a fetch succeeds"
        ),
    }
}

pub(super) fn log_sync(report: &SyncReport, what: &str) {
    tracing::info!(
        dests_added = report.dests_added,
        dests_removed = report.dests_removed,
        gateways_added = report.gateways_added,
        gateways_removed = report.gateways_removed,
        names_pruned = report.names_pruned,
        "{what}"
    );
}

/// Applies config changes: new services and rules for new connections, the maps re-synced;
/// a config that does not parse, or that changes something only a restart can, is refused
/// and the running one kept.
///
/// With a Kubernetes source, what is enforced is the file's config merged with the source's
/// last snapshot ([`apply::merge`]); a new file and a new snapshot each re-merge. Before the
/// first snapshot the maps are not touched at all: they hold the previous run's state, which
/// is closer to the truth than the file's static services alone.
pub(super) struct Reloader<S> {
    /// The file's config (with the command-line overrides): the base of every merge.
    config: Config,
    overrides: Overrides,
    path: Option<PathBuf>,
    maps: S,
    routes: SharedRoutes,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    /// Content hash of the file at the last check.
    seen: Option<u64>,
    /// Whether the file was unreadable at the last check (to warn once, not every second).
    unreadable: bool,
    /// A new authenticator for a changed `auth` section, for the control loop to load and swap.
    pending_auth: Option<Arc<Authenticator>>,
    /// `Some` with a Kubernetes source.
    kube: Option<KubeInput>,
    /// What the maps were last synced to by this process (`None`: not touched yet).
    applied: Option<DesiredState>,
    /// Services and workload identities of the effective config (for the log).
    enforced: (usize, usize),
}

/// The Kubernetes half of the effective config.
#[derive(Default)]
struct KubeInput {
    snapshot: Option<Arc<Snapshot>>,
    /// The pods' cgroup ids at the last merge: a container started since has a new one.
    cgroups: Vec<u64>,
    /// The merge warnings last logged (each is logged when it appears, not on every merge).
    warnings: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{} changed: this needs a restart", .0.join(", "))]
    RestartRequired(Vec<&'static str>),
    #[error("cannot sync the kernel maps with the new config")]
    Sync(#[source] EbpfError),
    #[error("auth")]
    Auth(#[source] auth::SetupError),
}

fn content_hash(text: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl<S: MapSync> Reloader<S> {
    pub(super) fn new(
        config: Config,
        overrides: Overrides,
        path: Option<PathBuf>,
        maps: S,
        routes: SharedRoutes,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Self {
        let kube = config.kubernetes.is_some().then(KubeInput::default);
        let mut this = Self {
            config,
            overrides,
            path,
            maps,
            routes,
            metrics,
            readiness,
            seen: None,
            unreadable: false,
            pending_auth: None,
            kube,
            applied: None,
            enforced: (0, 0),
        };
        // The running config came from the file as it is now.
        this.seen = this.read().map(|(hash, _)| hash);
        this
    }

    /// The first sync at start-up: the static config's state, or, with a Kubernetes source,
    /// nothing until its first snapshot (readiness says so).
    pub(super) fn start(&mut self) -> Result<Option<SyncReport>, EbpfError> {
        if self.kube.is_some() {
            self.readiness.set_synced(false);
            self.readiness.set_sync_wait(Some(
                "waiting for the first complete list from the Kubernetes API".into(),
            ));
            return Ok(None);
        }
        let desired = self.config.desired_state();
        let report = self.maps.sync(&desired)?;
        self.applied = Some(desired);
        self.readiness.set_synced(true);
        Ok(Some(report))
    }

    /// The file's content and its hash. Read whole every time: a config file is small, and
    /// mtime and size alone miss a same-size rewrite within the file system's time granularity.
    fn read(&mut self) -> Option<(u64, String)> {
        let path = self.path.as_ref()?;
        match std::fs::read_to_string(path) {
            Ok(text) => {
                self.unreadable = false;
                Some((content_hash(text.as_bytes()), text))
            }
            Err(err) => {
                if !self.unreadable {
                    tracing::warn!(path = %path.display(), error = %err, "cannot read the config file; keeping the running config");
                    self.unreadable = true;
                }
                None
            }
        }
    }

    /// Called every second: reload when the content changed; re-merge when a local pod's
    /// cgroups changed (a container started after its pod was listed).
    pub(super) fn poll(&mut self) {
        if let Some((hash, text)) = self.read() {
            let changed = self.seen != Some(hash);
            self.seen = Some(hash);
            if changed {
                self.apply_text(&text, "file changed");
                return;
            }
        }
        let stale = match &self.kube {
            Some(KubeInput {
                snapshot: Some(snapshot),
                cgroups,
                ..
            }) => apply::cgroup_fingerprint(snapshot, &self.config.cgroup) != *cgroups,
            _ => false,
        };
        if stale {
            match self.install(&self.config.clone()) {
                Ok(Some(report)) => log_sync(&report, "pod cgroups changed: workloads re-read"),
                Ok(None) => {}
                Err(err) => tracing::warn!(
                    error = %super::error_chain(&err),
                    "pod cgroups changed, but the maps could not be synced; keeping the previous state"
                ),
            }
        }
    }

    /// SIGHUP: re-read and apply, changed or not.
    pub(super) fn reload(&mut self, why: &str) {
        if self.path.is_none() {
            tracing::info!("{why}: running on the embedded default config; nothing to reload");
            return;
        }
        if let Some((hash, text)) = self.read() {
            self.seen = Some(hash);
            self.apply_text(&text, why);
        }
    }

    /// A new snapshot from the Kubernetes source.
    pub(super) fn apply_snapshot(&mut self, snapshot: Arc<Snapshot>) {
        let Some(kube) = self.kube.as_mut() else {
            return;
        };
        let first = kube.snapshot.is_none();
        let counts = (
            snapshot.services.len(),
            snapshot.pods.len(),
            snapshot.gateways.len(),
        );
        kube.snapshot = Some(snapshot);
        match self.install(&self.config.clone()) {
            Ok(report) => {
                self.metrics.kubernetes_applied(true);
                self.readiness.set_sync_wait(None);
                if let Some(report) = report {
                    log_sync(&report, "kubernetes snapshot applied");
                }
                tracing::info!(
                    first,
                    services = counts.0,
                    pods = counts.1,
                    gateways = counts.2,
                    "{}",
                    self.routes_summary()
                );
            }
            Err(err) => {
                self.metrics.kubernetes_applied(false);
                tracing::error!(
                    error = %super::error_chain(&err),
                    "cannot apply the Kubernetes snapshot; keeping the previous state"
                );
            }
        }
    }

    fn routes_summary(&self) -> String {
        let (services, workloads) = self.enforced;
        format!("enforcing {services} service(s), {workloads} workload identities")
    }

    fn apply_text(&mut self, text: &str, why: &str) {
        let origin = self.config.origin.clone();
        let result = Config::parse_overridden(text, origin, &self.overrides)
            .map_err(ReloadError::from)
            .and_then(|new| self.apply(new));
        match result {
            Ok(report) => {
                self.metrics.config_reload(ReloadResult::Ok);
                if let Some(report) = report {
                    log_sync(&report, "config reloaded");
                } else {
                    tracing::info!(
                        "config reloaded (maps untouched until the first Kubernetes snapshot)"
                    );
                }
                tracing::info!(reason = why, "{}", self.config.summary());
                log_policies(&self.config);
            }
            Err(err) => {
                self.metrics.config_reload(ReloadResult::Error);
                tracing::warn!(
                    reason = why,
                    error = %super::error_chain(&err),
                    "config reload refused; keeping the running config"
                );
            }
        }
    }

    /// The authenticator of a reload that changed `auth`, once.
    pub(super) fn take_pending_auth(&mut self) -> Option<Arc<Authenticator>> {
        self.pending_auth.take()
    }

    fn apply(&mut self, new: Config) -> Result<Option<SyncReport>, ReloadError> {
        let restart = self.config.restart_required(&new);
        if !restart.is_empty() {
            return Err(ReloadError::RestartRequired(restart));
        }
        let auth_changed =
            serde_json::to_value(&self.config.auth).ok() != serde_json::to_value(&new.auth).ok();
        let new_auth = if auth_changed {
            let observer: Arc<dyn AuthObserver> = self.metrics.clone();
            Some(Arc::new(
                Authenticator::new(&new.auth, observer).map_err(ReloadError::Auth)?,
            ))
        } else {
            None
        };
        let report = self.install(&new)?;
        self.config = new;
        if new_auth.is_some() {
            self.pending_auth = new_auth;
        }
        Ok(report)
    }

    /// Makes `base` (merged with the Kubernetes snapshot, if any) what the proxy and the
    /// kernel enforce. On a failed sync the previous table and maps are restored.
    fn install(&mut self, base: &Config) -> Result<Option<SyncReport>, ReloadError> {
        let (effective, desired) = if let Some(kube) = self.kube.as_mut() {
            match &kube.snapshot {
                Some(snapshot) => {
                    kube.cgroups = apply::cgroup_fingerprint(snapshot, &base.cgroup);
                    let merged = apply::merge(base, snapshot, &base.cgroup);
                    let warnings: BTreeSet<String> = merged.warnings.into_iter().collect();
                    for w in warnings.difference(&kube.warnings) {
                        tracing::warn!("kubernetes: {w}");
                    }
                    kube.warnings = warnings;
                    (merged.config, Some(merged.desired))
                }
                // No snapshot yet: the proxy follows the file, the maps stay as they are.
                None => (base.clone(), None),
            }
        } else {
            (base.clone(), Some(base.desired_state()))
        };
        // The table first: a destination the maps start redirecting is already known to the
        // proxy. Open connections keep their own snapshot.
        let old = self.routes.swap(Arc::new(Routes::new(&effective)));
        self.enforced = (effective.services.len(), effective.workloads.len());
        let Some(desired) = desired else {
            return Ok(None);
        };
        match self.maps.sync(&desired) {
            Ok(report) => {
                self.applied = Some(desired);
                self.readiness.set_synced(true);
                Ok(Some(report))
            }
            Err(err) => {
                self.routes.store(old);
                if let Some(previous) = &self.applied
                    && let Err(again) = self.maps.sync(previous)
                {
                    tracing::error!(error = %again, "cannot restore the previous maps either; not ready");
                    self.readiness.set_synced(false);
                }
                Err(ReloadError::Sync(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::config::Origin;

    #[derive(Default)]
    pub(super) struct FakeMaps {
        pub(super) synced: Vec<DesiredState>,
        pub(super) fail: bool,
    }

    impl MapSync for FakeMaps {
        fn sync(&mut self, desired: &DesiredState) -> Result<SyncReport, EbpfError> {
            self.synced.push(desired.clone());
            if std::mem::take(&mut self.fail) {
                return Err(EbpfError::EventsTaken);
            }
            Ok(SyncReport::default())
        }
    }

    fn text(services: &str, connect_timeout_ms: u32) -> String {
        format!(
            "node: n\ncgroup: /sys/fs/cgroup/t\nproxy: {{ listen: \"127.0.0.2:15001\", \
             connect_timeout_ms: {connect_timeout_ms} }}\ngateways: [127.0.0.1]\nservices:\n{services}"
        )
    }

    const ONE: &str = "  - name: a\n    vips: [\"10.96.0.1:80\"]\n";
    const TWO: &str =
        "  - name: a\n    vips: [\"10.96.0.1:80\"]\n  - name: b\n    vips: [\"10.96.0.2:80\"]\n";

    struct Setup {
        path: PathBuf,
        reloader: Reloader<FakeMaps>,
        routes: SharedRoutes,
        metrics: Arc<Metrics>,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn setup(initial: &str) -> Setup {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "nodegate-reload-{}-{}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, initial).unwrap();
        let config = Config::parse(initial, Origin::File(path.clone())).unwrap();
        let routes = Routes::shared(&config);
        let metrics = Arc::new(Metrics::new(None));
        let readiness = Arc::new(Readiness::default());
        readiness.set_synced(true);
        let mut reloader = Reloader::new(
            config,
            Overrides::default(),
            Some(path.clone()),
            FakeMaps::default(),
            routes.clone(),
            metrics.clone(),
            readiness,
        );
        reloader.start().unwrap();
        reloader.maps.synced.clear();
        Setup {
            path,
            reloader,
            routes,
            metrics,
        }
    }

    fn resolves(routes: &SharedRoutes, dst: &str) -> bool {
        routes.load().resolve(dst.parse().unwrap()).is_some()
    }

    fn reloads(metrics: &Metrics) -> String {
        metrics
            .encode()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("nodegate_config_reloads_total"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn unchanged_file_is_not_reloaded() {
        let mut s = setup(&text(ONE, 1000));
        s.reloader.poll();
        s.reloader.poll();
        assert_eq!(s.reloader.maps.synced.len(), 0);
        assert_eq!(reloads(&s.metrics), "");
    }

    #[test]
    fn a_changed_file_adds_and_removes_services() {
        let mut s = setup(&text(ONE, 1000));
        // Same size, same second: the content hash still sees the change.
        write(&s.path, &text(TWO, 1000));
        s.reloader.poll();
        assert!(resolves(&s.routes, "10.96.0.2:80"));
        assert_eq!(s.reloader.maps.synced.last().unwrap().services.len(), 2);
        write(&s.path, &text(ONE, 2000));
        s.reloader.poll();
        assert!(!resolves(&s.routes, "10.96.0.2:80"));
        assert_eq!(s.routes.load().connect_timeout.as_millis(), 2000);
        assert_eq!(s.reloader.maps.synced.len(), 2);
        assert_eq!(
            reloads(&s.metrics),
            "nodegate_config_reloads_total{result=\"ok\"} 2"
        );
    }

    #[test]
    fn a_bad_file_keeps_the_running_config_and_is_reported_once() {
        let mut s = setup(&text(ONE, 1000));
        write(&s.path, &text("  - name: Bad\n", 1000));
        s.reloader.poll();
        s.reloader.poll();
        assert!(resolves(&s.routes, "10.96.0.1:80"));
        assert_eq!(s.reloader.maps.synced.len(), 0);
        assert_eq!(
            reloads(&s.metrics),
            "nodegate_config_reloads_total{result=\"error\"} 1"
        );
        // SIGHUP tries again, changed or not.
        s.reloader.reload("SIGHUP");
        assert_eq!(
            reloads(&s.metrics),
            "nodegate_config_reloads_total{result=\"error\"} 2"
        );
    }

    #[test]
    fn a_changed_auth_section_hands_over_a_new_authenticator_once() {
        let mut s = setup(&text(ONE, 1000));
        s.reloader.poll();
        assert!(s.reloader.take_pending_auth().is_none());
        let auth = "auth: { issuers: [ { name: t, issuer: \"http://127.0.0.1:1\", \
                    jwks_uri: \"http://127.0.0.1:1/jwks\", audiences: [ng] } ] }\n";
        write(&s.path, &format!("{auth}{}", text(ONE, 1000)));
        s.reloader.poll();
        let new = s.reloader.take_pending_auth().expect("a new authenticator");
        assert_eq!(new.issuers().count(), 1);
        assert!(s.reloader.take_pending_auth().is_none());
        // An invalid auth section refuses the whole reload.
        write(
            &s.path,
            &format!("{}{}", auth.replace("[ng]", "[]"), text(TWO, 1000)),
        );
        s.reloader.poll();
        assert!(!resolves(&s.routes, "10.96.0.2:80"));
        assert!(s.reloader.take_pending_auth().is_none());
    }

    #[test]
    fn a_bad_policy_keeps_the_running_one_and_a_good_one_swaps_it() {
        let policy = |groups: &str| {
            format!(
                "  - name: a\n    vips: [\"10.96.0.1:80\"]\n    policy: {{ allow: [ {{ id: r, when: {{ {groups} }} }} ] }}\n"
            )
        };
        let mut s = setup(&text(&policy("groups: devs"), 1000));
        let version = |routes: &SharedRoutes| {
            let routes = routes.load();
            let route = routes.resolve("10.96.0.1:80".parse().unwrap()).unwrap();
            route.service.http.as_ref().unwrap().policy.version.clone()
        };
        let before = version(&s.routes);
        write(&s.path, &text(&policy("grups: devs"), 1000));
        s.reloader.poll();
        assert_eq!(
            version(&s.routes),
            before,
            "a bad policy is never half-applied"
        );
        assert_eq!(
            reloads(&s.metrics),
            "nodegate_config_reloads_total{result=\"error\"} 1"
        );
        write(&s.path, &text(&policy("groups: ops"), 1000));
        s.reloader.poll();
        assert_ne!(version(&s.routes), before);
    }

    #[test]
    fn a_change_that_needs_a_restart_is_refused() {
        let mut s = setup(&text(ONE, 1000));
        write(
            &s.path,
            &text(TWO, 1000).replace("127.0.0.2:15001", "127.0.0.3:15001"),
        );
        s.reloader.poll();
        assert!(!resolves(&s.routes, "10.96.0.2:80"));
        assert_eq!(s.reloader.maps.synced.len(), 0);
    }

    #[test]
    fn a_failed_sync_restores_the_previous_table_and_maps() {
        let mut s = setup(&text(ONE, 1000));
        s.reloader.maps.fail = true;
        write(&s.path, &text(TWO, 1000));
        s.reloader.poll();
        assert!(!resolves(&s.routes, "10.96.0.2:80"));
        let synced = &s.reloader.maps.synced;
        assert_eq!(
            synced.len(),
            2,
            "the new state, then the previous one again"
        );
        assert_eq!(synced[1].services.len(), 1);
        assert_eq!(
            reloads(&s.metrics),
            "nodegate_config_reloads_total{result=\"error\"} 1"
        );
        assert!(
            !s.reloader
                .readiness
                .missing()
                .iter()
                .any(|m| m.starts_with("maps not synced"))
        );
    }
}

#[cfg(test)]
mod kube_tests {
    use std::{path::PathBuf, sync::Arc};

    use super::{Reloader, SharedRoutes, tests::FakeMaps};
    use crate::{
        admin::Readiness,
        config::{Config, Origin, Overrides},
        ebpf::Mode,
        proxy::Routes,
        source::model::{DenyReason, ObjectKey, PolicyBinding, ProtectedService, Snapshot},
        telemetry::Metrics,
    };

    const BASE: &str = "node: n\ncgroup: /nonexistent/cgroup\nproxy: { listen: \"127.0.0.2:15001\" }\n\
                        gateways: [127.0.0.1]\nkubernetes: { cgroup_driver: none }\nservices:\n\
                        \x20 - { name: static, vips: [\"10.96.0.1:80\"] }\n";

    fn snapshot(services: &[(&str, &str, &str)]) -> Arc<Snapshot> {
        let mut snap = Snapshot::default();
        for &(name, vip, endpoint) in services {
            let key = ObjectKey::new("shop", name);
            snap.services.insert(
                key.clone(),
                ProtectedService {
                    key,
                    mode: Mode::Enforce,
                    vips: vec![vip.parse().unwrap()],
                    endpoints: vec![endpoint.parse().unwrap()],
                    not_ready_endpoints: Vec::new(),
                    policy: PolicyBinding::DenyAll(DenyReason::NoPolicy),
                    warnings: Vec::new(),
                },
            );
        }
        snap.gateways = vec!["10.0.0.7".parse().unwrap()];
        Arc::new(snap)
    }

    fn temp_config(text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("nodegate-reload-kube-{}.yaml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn names(routes: &SharedRoutes, dst: &str) -> Option<String> {
        routes
            .load()
            .resolve(dst.parse().unwrap())
            .map(|r| r.service.name.to_string())
    }

    #[test]
    fn maps_wait_for_the_first_snapshot_then_follow_file_and_snapshots() {
        let path = temp_config(BASE);
        let config = Config::parse(BASE, Origin::File(path.clone())).unwrap();
        let routes = Routes::shared(&config);
        let readiness = Arc::new(Readiness::default());
        let mut r = Reloader::new(
            config,
            Overrides::default(),
            Some(path.clone()),
            FakeMaps::default(),
            routes.clone(),
            Arc::new(Metrics::new(None)),
            readiness.clone(),
        );
        assert!(r.start().unwrap().is_none(), "no sync before a snapshot");
        let missing = readiness.missing().join("; ");
        assert!(
            missing.contains("waiting for the first complete list"),
            "{missing}"
        );

        // A file change before the first snapshot: the proxy follows, the maps stay untouched.
        let two = format!("{BASE}  - {{ name: second, vips: [\"10.96.0.2:80\"] }}\n");
        std::fs::write(&path, &two).unwrap();
        r.poll();
        assert_eq!(names(&routes, "10.96.0.2:80").as_deref(), Some("second"));
        assert!(r.maps.synced.is_empty(), "{:?}", r.maps.synced);

        // The first snapshot: merged with the file's services, synced once, ready.
        r.apply_snapshot(snapshot(&[("web", "10.96.1.1:80", "10.2.0.1:8080")]));
        assert_eq!(r.maps.synced.len(), 1);
        let desired = &r.maps.synced[0];
        let svc_names: Vec<&str> = desired.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(svc_names, ["static", "second", "shop/web"]);
        assert!(
            desired.gateways.contains(&"10.0.0.7".parse().unwrap()),
            "peer gateways reach the endpoints"
        );
        assert_eq!(names(&routes, "10.96.1.1:80").as_deref(), Some("shop/web"));
        assert!(
            !readiness
                .missing()
                .iter()
                .any(|m| m.starts_with("maps not synced")),
            "{:?}",
            readiness.missing()
        );

        // A file change re-merges with the last snapshot.
        std::fs::write(&path, BASE).unwrap();
        r.poll();
        let svc_names: Vec<String> = r.maps.synced[1]
            .services
            .iter()
            .map(|s| s.name.clone())
            .collect();
        assert_eq!(svc_names, ["static", "shop/web"]);
        assert!(names(&routes, "10.96.0.2:80").is_none());

        // The label removed: the next snapshot drops the service from routes and maps.
        r.apply_snapshot(snapshot(&[]));
        assert_eq!(r.maps.synced[2].services.len(), 1);
        assert!(names(&routes, "10.96.1.1:80").is_none());

        // A failed sync keeps the previous state in the maps and the routes.
        r.maps.fail = true;
        r.apply_snapshot(snapshot(&[("db", "10.96.1.2:5432", "10.2.0.2:5432")]));
        assert!(names(&routes, "10.96.1.2:5432").is_none());
        assert_eq!(
            r.maps.synced.last().unwrap().services.len(),
            1,
            "the previous state again"
        );
        let _ = std::fs::remove_file(&path);
    }
}
