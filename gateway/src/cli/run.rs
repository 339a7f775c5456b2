//! `gateway run`: config → telemetry → admin → datapath (attach, sync) → listeners → ready →
//! serve; reload on SIGHUP and on file change; drain on SIGTERM/SIGINT.
//!
//! Three execution contexts: the proxy on a multi-thread runtime of its own (the data plane),
//! the admin server on its own thread, and this control loop (signals, reloads, bypass events)
//! on a current-thread runtime in the main thread.

use std::{path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};

use super::{
    CliError,
    reload::{Reloader, log_sync},
};
use crate::{
    admin::{AdminServer, Readiness},
    auth::{AuthObserver, Authenticator},
    config::Config,
    ebpf::{BypassEvents, Datapath, DatapathOptions},
    proxy::{
        self, Routes, SharedRoutes,
        http::{AssertionSigner, BrowserLogin, HttpContext, LoginFlow, SharedAuth},
    },
    telemetry::{
        self, Metrics,
        bypass::{BypassLog, ServiceLookup},
    },
};

const RELOAD_POLL: Duration = Duration::from_secs(1);
/// How often issuer keys are checked for age and JWKS files for changes.
const KEY_REFRESH_TICK: Duration = Duration::from_secs(10);

pub(super) fn run(path: Option<&Path>) -> Result<(), CliError> {
    let config = match path {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
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
    let dataplane = tokio::runtime::Builder::new_multi_thread()
        .thread_name("ng-proxy")
        .enable_all()
        .build()
        .map_err(runtime_err("proxy"))?;
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
    let (datapath, events) = start_datapath(&config, &readiness, &control)?;
    let listeners = proxy::bind(&config.proxy.listeners())?;
    let routes = Routes::shared(&config);
    let shared = Arc::new(proxy::Shared {
        node: config.node.clone(),
        routes: routes.clone(),
        orig: Box::new(datapath.orig_dst()),
        metrics: metrics.clone(),
        mark: Some(config.proxy.mark),
        http: HttpContext::new(
            auth.clone(),
            signer,
            browser_login(&config, &dataplane)?,
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
    );
    let drain = config.proxy.drain_timeout;
    let mut reloader = Reloader::new(
        config,
        path.map(Path::to_path_buf),
        datapath,
        routes,
        metrics,
        readiness.clone(),
    );

    let result = control.block_on(async {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let proxy_task =
            dataplane.spawn(proxy::serve(listeners, shared, shutdown_rx.clone(), drain));
        let bypass_task = tokio::spawn(bypass_log.run(events, shutdown_rx));
        readiness.set_listening(true);
        tracing::info!(admin = %admin.local_addr(), "ready");
        let result = control_loop(&mut reloader, &auth, signals, proxy_task).await;
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
    dataplane.shutdown_timeout(Duration::from_secs(1));
    admin.stop();
    // The datapath is dropped here; its links stay pinned, so protection holds (fail closed).
    drop(reloader);
    tracing::info!("stopped");
    result
}

/// Attach the programs, sync the maps and open the event stream.
fn start_datapath(
    config: &Config,
    readiness: &Readiness,
    control: &tokio::runtime::Runtime,
) -> Result<(Datapath, BypassEvents), CliError> {
    let mut datapath = Datapath::start(&DatapathOptions {
        cgroup: config.cgroup.clone(),
        bpffs: config.bpffs.clone(),
    })
    .map_err(CliError::ebpf(format!(
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
    let report = datapath
        .sync(&config.desired_state())
        .map_err(CliError::ebpf(
            "cannot write the desired state to the kernel maps",
        ))?;
    log_sync(&report, "maps synced");
    readiness.set_synced(true);
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

fn spawn_key_upkeep(auth: Arc<Authenticator>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { auth.refresh_loop(KEY_REFRESH_TICK).await })
}

fn service_lookup(routes: &SharedRoutes) -> ServiceLookup {
    let routes = routes.clone();
    Box::new(move |id| routes.load().service(id).map(|s| (s.name.clone(), s.mode)))
}

/// The browser-login module of a config with a `login:` section (read once: a changed section
/// needs a restart, see `Config::restart_required`). Provider discovery runs in the background
/// on `runtime`: the gateway starts while its identity provider is still coming up.
fn browser_login(
    config: &Config,
    runtime: &tokio::runtime::Runtime,
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
