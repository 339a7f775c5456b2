//! `gateway run`: config → telemetry → admin → datapath (attach, sync) → listeners → ready →
//! serve; reload on SIGHUP and on file change; drain on SIGTERM/SIGINT.
//!
//! Three execution contexts: the proxy on a multi-thread runtime of its own (the data plane),
//! the admin server on its own thread, and this control loop (signals, reloads, bypass events,
//! the Kubernetes source's watchers and its snapshots) on a current-thread runtime in the main
//! thread.
//!
//! With a `kubernetes` section the kernel maps are first written when the source has listed
//! everything once ([`KubernetesSource::snapshots`]); until then the previous run's pinned
//! state stays in force and `/readyz` says what the gateway waits for.

use std::{path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};

use super::{
    CliError,
    dataplane::{Dataplane, Flavor},
    reload::{Reloader, log_sync},
};
use crate::{
    admin::{AdminServer, Readiness},
    auth::{AuthObserver, Authenticator},
    config::{CgroupDriverSetting, Config, KubernetesSection, Overrides},
    ebpf::{BypassEvents, Datapath, PinLock},
    proxy::{
        self, Routes, SharedRoutes,
        http::{AssertionSigner, BrowserLogin, HttpContext, LoginFlow, SharedAuth},
    },
    source::{
        kubernetes::{GatewayPeers, Health, KubernetesConfig, KubernetesSource},
        model::Snapshot,
        pods::CgroupDriver,
    },
    telemetry::{
        self, Metrics,
        bypass::{BypassLog, ServiceLookup, SourceLookup},
    },
};

const RELOAD_POLL: Duration = Duration::from_secs(1);
/// How often issuer keys are checked for age and JWKS files for changes.
const KEY_REFRESH_TICK: Duration = Duration::from_secs(10);

pub(super) fn run(path: Option<&Path>, overrides: &Overrides) -> Result<(), CliError> {
    // Dropped last, on every return: the decision lines still pending are written.
    let _flush = telemetry::FlushDecisionLogOnDrop;
    let (config, metrics) = load_config(path, overrides)?;
    // Before anything is bound or attached: a second gateway on these pins stops here.
    let pins = claim_pins(&config.bpffs)?;

    // The assertion key lives as long as the process; backends fetch its JWKS from the admin port.
    let signer = Arc::new(AssertionSigner::generate(config.assertion.clone()));
    tracing::info!(kid = signer.kid(), issuer = %config.assertion.issuer, "assertion signing key generated");
    let authenticator = Authenticator::new(&config.auth, metrics.clone() as Arc<dyn AuthObserver>)?;

    let readiness = Arc::new(Readiness::default());
    let admin = AdminServer::start(
        config.admin.listen,
        readiness.clone(),
        metrics.clone(),
        Arc::from(signer.jwks()),
    )?;
    let runtime_err = |what| move |source| CliError::Runtime { what, source };
    let flavor = Flavor::configured(config.proxy.threads);
    let dataplane = Dataplane::start(flavor).map_err(runtime_err("proxy"))?;
    tracing::info!(runtime = ?flavor, "proxy runtime started");
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(runtime_err("control"))?;

    let signals = Signals::install(&control)?;
    for report in control.block_on(authenticator.load_keys()) {
        super::reload::log_key_load(&report);
    }
    let auth: SharedAuth = Arc::new(ArcSwap::from_pointee(authenticator));
    proxy::check_mark(config.proxy.mark)?;
    let (datapath, events) = start_datapath(&config, pins, &readiness, &control)?;
    let listeners = proxy::bind(&config.proxy.listeners())?;
    let routes = Routes::shared(&config);
    admin.serve_explain(routes.clone(), auth.clone());
    let shared = Arc::new(proxy::Shared {
        node: config.node.as_str().into(),
        routes: routes.clone(),
        orig: Box::new(datapath.orig_dst()),
        metrics: metrics.clone(),
        mark: Some(config.proxy.mark),
        http: HttpContext::new(
            auth.clone(),
            signer,
            browser_login(&config, dataplane.handle())?,
            Some(config.proxy.mark),
            routes.clone(),
        ),
    });
    let bypass_log = BypassLog::new(
        config.node.clone(),
        config.log.bypass_lines_per_source,
        config.log.bypass_interval,
        service_lookup(&routes),
        metrics.clone(),
    )
    .with_sources(source_lookup(&routes));
    let drain = config.proxy.drain_timeout;
    let source = (config.kubernetes.as_ref())
        .map(|section| start_source(&config, section, &control))
        .transpose()?;
    let mut reloader = Reloader::new(
        config,
        overrides.clone(),
        path.map(Path::to_path_buf),
        datapath,
        routes,
        metrics.clone(),
        readiness.clone(),
    );
    initial_sync(&mut reloader)?;

    let result = control.block_on(async {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let proxy_task =
            dataplane
                .handle()
                .spawn(proxy::serve(listeners, shared, shutdown_rx.clone(), drain));
        let bypass_task = tokio::spawn(bypass_log.run(events, shutdown_rx));
        readiness.set_listening(true);
        tracing::info!(admin = %admin.local_addr(), "ready");
        let feeds = SourceFeeds::new(source.as_ref(), readiness.clone(), metrics);
        let result = control_loop(&mut reloader, &auth, signals, feeds, proxy_task).await;
        readiness.set_listening(false);
        let _ = shutdown_tx.send(true);
        let result = match result {
            Ok(mut proxy_task) => match (&mut proxy_task).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(CliError::Proxy(err)),
                Err(err) => Err(CliError::ProxyTask(err)),
            },
            Err(err) => Err(err),
        };
        if let Err(err) = bypass_task.await {
            tracing::warn!(error = %err, "bypass log task failed");
        }
        result
    });
    dataplane.shutdown(Duration::from_secs(1));
    admin.stop();
    // The datapath is dropped here; its links stay pinned, so protection holds (fail closed).
    drop(reloader);
    drop(source);
    tracing::info!("stopped");
    result
}

/// The config (file or embedded, with the command-line overrides), the metrics and the
/// daemon's logging, and the start-up log lines about the config.
fn load_config(
    path: Option<&Path>,
    overrides: &Overrides,
) -> Result<(Config, Arc<Metrics>), CliError> {
    let config = match path {
        Some(path) => Config::load_with(path, overrides)?,
        None => Config::parse_overridden(
            crate::config::EMBEDDED_DEFAULT,
            crate::config::Origin::Embedded,
            overrides,
        )?,
    };
    let metrics = Arc::new(Metrics::new(Some(config.bpffs.clone())));
    telemetry::init_daemon(config.log.decisions_file.as_deref(), &metrics)?;
    tracing::info!(
        origin = %config.origin,
        config = %serde_json::to_string(&config).unwrap_or_default(),
        "effective config"
    );
    tracing::info!("{}", config.summary());
    super::reload::log_policies(&config);
    Ok((config, metrics))
}

/// One gateway per pin directory ([`PinLock`]): taken first, then held by the datapath.
fn claim_pins(bpffs: &Path) -> Result<PinLock, CliError> {
    PinLock::acquire(bpffs).map_err(CliError::ebpf(format!(
        "cannot claim the pin directory {}",
        bpffs.display()
    )))
}

/// Attach the programs and open the event stream (the maps are synced by the reloader).
fn start_datapath(
    config: &Config,
    pins: PinLock,
    readiness: &Readiness,
    control: &tokio::runtime::Runtime,
) -> Result<(Datapath, BypassEvents), CliError> {
    let mut datapath = Datapath::start(&config.cgroup, pins).map_err(CliError::ebpf(format!(
        "cannot load and attach the eBPF programs (cgroup {}, bpffs {})",
        config.cgroup.display(),
        config.bpffs.display()
    )))?;
    for link in datapath.links() {
        tracing::info!(
            program = link.name,
            how = link.how,
            link_id = link.link_id,
            "program attached"
        );
    }
    tracing::info!(
        cgroup_id = datapath.cgroup_id(),
        bpffs = %datapath.bpffs().display(),
        "datapath started"
    );
    readiness.set_attached(true);
    // The ring buffer registers with the reactor of the runtime that reads it.
    let events = {
        let _context = control.enter();
        datapath
            .take_events()
            .map_err(CliError::ebpf("cannot open the bypass event ring buffer"))?
    };
    Ok((datapath, events))
}

/// Installed before start-up, so that a signal during it is handled once serving, never
/// by the default action.
struct Signals {
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
}

impl Signals {
    /// Needs the runtime that will poll them.
    fn install(runtime: &tokio::runtime::Runtime) -> Result<Self, CliError> {
        let _context = runtime.enter();
        let handler = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| CliError::Signal {
                signal: name,
                source,
            })
        };
        Ok(Self {
            sigterm: handler(SignalKind::terminate(), "SIGTERM")?,
            sigint: handler(SignalKind::interrupt(), "SIGINT")?,
            sighup: handler(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

type ProxyTask = tokio::task::JoinHandle<Result<(), proxy::ProxyError>>;

/// Until SIGTERM/SIGINT: reload on SIGHUP and on file change. Returns the still running
/// proxy task to drain, or an error if the proxy stopped on its own.
async fn control_loop(
    reloader: &mut Reloader<Datapath>,
    auth: &SharedAuth,
    signals: Signals,
    mut feeds: SourceFeeds,
    mut proxy_task: ProxyTask,
) -> Result<ProxyTask, CliError> {
    let Signals {
        mut sigterm,
        mut sigint,
        mut sighup,
    } = signals;
    let mut poll = tokio::time::interval(RELOAD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut key_upkeep = spawn_key_upkeep(auth.load_full());
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); key_upkeep.abort(); return Ok(proxy_task); }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); key_upkeep.abort(); return Ok(proxy_task); }
            _ = sighup.recv() => {
                reloader.reload("SIGHUP");
                for report in auth.load().reload_files().await {
                    super::reload::log_key_load(&report);
                }
            }
            _ = poll.tick() => reloader.poll(),
            snapshot = feeds.snapshots.next() => reloader.apply_snapshot(snapshot),
            () = feeds.health.changed() => {}
            res = &mut proxy_task => return Err(match res {
                Ok(Err(err)) => CliError::Proxy(err),
                Ok(Ok(())) => CliError::Proxy(proxy::ProxyError::Listener(
                    std::io::Error::other("the proxy stopped on its own"),
                )),
                Err(err) => CliError::ProxyTask(err),
            }),
        }
        // A reload that changed `auth`: load the new issuers' keys before requests meet them.
        if let Some(new) = reloader.take_pending_auth() {
            for report in new.load_keys().await {
                super::reload::log_key_load(&report);
            }
            auth.store(new.clone());
            key_upkeep.abort();
            key_upkeep = spawn_key_upkeep(new);
            tracing::info!("token issuers reloaded");
        }
    }
}

/// The maps at start-up: the static config now, or the first Kubernetes snapshot later.
fn initial_sync(reloader: &mut Reloader<Datapath>) -> Result<(), CliError> {
    let report = reloader.start().map_err(CliError::ebpf(
        "cannot write the desired state to the kernel maps",
    ))?;
    if let Some(report) = report {
        log_sync(&report, "maps synced");
    }
    Ok(())
}

/// Starts the Kubernetes source's tasks on the control runtime.
fn start_source(
    config: &Config,
    section: &KubernetesSection,
    control: &tokio::runtime::Runtime,
) -> Result<KubernetesSource, CliError> {
    let cgroup_driver = match section.cgroup_driver {
        CgroupDriverSetting::Systemd => Some(CgroupDriver::Systemd),
        CgroupDriverSetting::Cgroupfs => Some(CgroupDriver::Cgroupfs),
        CgroupDriverSetting::None => None,
        CgroupDriverSetting::Auto => {
            let found = CgroupDriver::detect(&config.cgroup);
            if found.is_none() {
                tracing::warn!(
                    cgroup = %config.cgroup.display(),
                    "kubernetes.cgroup_driver auto: neither kubepods.slice nor kubepods under \
                     the cgroup; pods are named by address only (set the driver to override)"
                );
            }
            found
        }
    };
    let mut kube = KubernetesConfig::new(config.node.clone());
    kube.cgroup_driver = cgroup_driver;
    kube.debounce = section.debounce;
    kube.write_status = section.write_status;
    kube.peers = section
        .peers_namespace
        .as_ref()
        .map(|ns| GatewayPeers::in_namespace(ns.clone()));
    let client = control
        .block_on(crate::source::kubernetes::client(
            section.kubeconfig.as_deref(),
        ))
        .map_err(CliError::Kubernetes)?;
    let _context = control.enter();
    let source = KubernetesSource::start(client, kube).map_err(CliError::Kubernetes)?;
    tracing::info!(
        node = %config.node,
        cgroup_driver = ?cgroup_driver,
        peers = ?section.peers_namespace,
        kubeconfig = ?section.kubeconfig,
        "kubernetes source started"
    );
    Ok(source)
}

/// The Kubernetes source's two streams, for the control loop: snapshots to apply, and health
/// for readiness and metrics. Without a source both stay pending forever.
struct SourceFeeds {
    snapshots: SnapshotFeed,
    health: HealthFeed,
}

struct SnapshotFeed(Option<watch::Receiver<Option<Arc<Snapshot>>>>);

struct HealthFeed {
    rx: Option<watch::Receiver<Health>>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    /// The error last logged, to log each change of state once.
    last_error: Option<String>,
}

impl SourceFeeds {
    fn new(
        source: Option<&KubernetesSource>,
        readiness: Arc<Readiness>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut snapshots = source.map(KubernetesSource::snapshots);
        let mut health = source.map(KubernetesSource::health);
        // What is there already counts as a change: the first snapshot may have arrived, and
        // the health says "not listed yet" until it has.
        if let Some(rx) = snapshots.as_mut() {
            rx.mark_changed();
        }
        if let Some(rx) = health.as_mut() {
            rx.mark_changed();
        }
        Self {
            snapshots: SnapshotFeed(snapshots),
            health: HealthFeed {
                rx: health,
                readiness,
                metrics,
                last_error: None,
            },
        }
    }
}

impl SnapshotFeed {
    /// The next published snapshot.
    async fn next(&mut self) -> Arc<Snapshot> {
        let Some(rx) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            if rx.changed().await.is_err() {
                tracing::error!("the Kubernetes source stopped publishing; keeping the last state");
                self.0 = None;
                return std::future::pending().await;
            }
            if let Some(snapshot) = rx.borrow_and_update().clone() {
                return snapshot;
            }
        }
    }
}

impl HealthFeed {
    /// Waits for a health change and hands it to readiness and the metrics.
    async fn changed(&mut self) {
        let Some(rx) = self.rx.as_mut() else {
            return std::future::pending().await;
        };
        if rx.changed().await.is_err() {
            self.rx = None;
            let error = "the source stopped".to_owned();
            tracing::error!("{error}");
            self.readiness.set_source(
                Some(error.clone()),
                serde_json::json!({ "ready": false, "error": error }),
            );
            return;
        }
        let health = rx.borrow_and_update().clone();
        let error = health.error();
        // "Not listed yet" during start-up is not worth a warning; a failure or a recovery is.
        let failing = health.watchers.iter().any(|w| w.error.is_some());
        if error != self.last_error && (failing || self.last_error.is_some()) {
            if let Some(e) = &error {
                tracing::warn!(
                    error = %e,
                    "kubernetes source not in sync; enforcing the last-known-good state"
                );
            } else {
                tracing::info!("kubernetes source in sync again");
            }
        }
        self.last_error.clone_from(&error);
        self.readiness.set_source(error, health.to_json());
        self.metrics.kubernetes_health(&health);
    }
}

fn spawn_key_upkeep(auth: Arc<Authenticator>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { auth.refresh_loop(KEY_REFRESH_TICK).await })
}

fn service_lookup(routes: &SharedRoutes) -> ServiceLookup {
    let routes = routes.clone();
    Box::new(move |id| {
        routes
            .load()
            .service(id)
            .map(|s| (s.name.to_string(), s.mode))
    })
}

/// Bypass lines name the local pod that owns the source address (by address only: pods'
/// cgroups are known for connects, not for packets arriving from another host).
fn source_lookup(routes: &SharedRoutes) -> SourceLookup {
    let routes = routes.clone();
    Box::new(move |ip| {
        routes
            .load()
            .workloads
            .lookup(None, ip)
            .map(|w| w.log("source"))
    })
}

/// The browser-login module of a config with a `login:` section (read once: a changed section
/// needs a restart, see `Config::restart_required`). Provider discovery runs in the background
/// on `runtime`: the gateway starts while its identity provider is still coming up.
fn browser_login(
    config: &Config,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<Arc<dyn LoginFlow>>, CliError> {
    let Some(section) = &config.login else {
        return Ok(None);
    };
    let invalid = |e: &dyn std::fmt::Display| CliError::Input(format!("{}: {e}", config.origin));
    let settings = section.settings().map_err(|e| invalid(&e))?;
    let flow = crate::auth::login::LoginFlow::new(settings).map_err(|e| invalid(&e))?;
    tracing::info!(
        issuer = %section.config.issuer,
        hosts = ?section.config.hosts,
        "browser login configured"
    );
    let login = Arc::new(BrowserLogin::new(flow));
    let discover = login.clone();
    runtime.spawn(async move { discover.discover().await });
    Ok(Some(login))
}
