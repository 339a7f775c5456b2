//! The Kubernetes source: four watchers feeding reflector caches, a debounced reconcile into a
//! [`Snapshot`], `AccessPolicy` status written back, and health for `/readyz`.
//!
//! ```text
//! Services  (label nodegate.io/protected=true)  ─┐
//! EndpointSlices (label kubernetes.io/service-name)─┤ watcher ─▶ reflector cache ─┐ notify
//! Pods      (field spec.nodeName=<NODE_NAME>)     ─┤                             ├──▶ debounce ─▶ reconcile::build
//! AccessPolicies (untyped: one bad object must not ─┘                             │        │          │
//!                 stop the stream)                                                │        ▼          ▼
//!                                          health (per watcher, last sync) ◀──────┘  watch<Snapshot>  status writer
//! ```
//!
//! Failure handling, in the order things go wrong:
//! - *API unreachable or erroring* (connection refused, 500, 403): the watcher's caches and the
//!   last published snapshot stay as they are (last-known-good: the kernel keeps enforcing it),
//!   the error is in [`Health`], and the watcher is rebuilt after an exponential backoff with
//!   jitter. Rebuilding re-lists, as client-go's reflector does after a watch error, so recovery
//!   is an observable event (`InitDone`) rather than a silent resumed watch.
//! - *`410 Gone` / `Expired` inside the watch stream*: kube's watcher re-lists by itself; the
//!   cache swaps in the new list atomically at `InitDone`, so objects deleted while the watch
//!   was away disappear and nothing half-listed is ever published. Not an outage: counted, not
//!   reported as an error.
//! - *An object stops matching the selector* (label removed, pod moved): the API server sends
//!   `DELETED` with the old object; the cache drops it like any delete.
//! - *Start-up*: nothing is published before every watcher has listed once. A partial first
//!   snapshot (services known, `AccessPolicy` objects not yet) would briefly enforce deny-all, and an
//!   empty one would unprotect everything that the pinned maps of the previous run still hold.

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fmt::Debug;
use std::hash::{BuildHasher as _, Hash};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::crd::{AccessPolicy, AccessPolicyStatus};
use super::model::{ObjectKey, Snapshot};
use super::pods::CgroupDriver;
use super::reconcile::{self, PROTECTED_LABEL, SERVICE_NAME_LABEL, Verdict};

/// Field manager of the status writes (`kubectl get -o yaml --show-managed-fields`).
pub const FIELD_MANAGER: &str = "nodegate-gateway";
/// `reportingController` of the events (`kubectl get events -o wide`).
pub const EVENT_CONTROLLER: &str = "nodegate.io/gateway";

/// How long a rebuilt watcher must have stayed healthy before its backoff starts again from the
/// initial delay. Shorter, and an API server that lists fine but fails every watch would be
/// hammered at the initial rate forever.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "the node name is empty: set NODE_NAME from the downward API (fieldRef spec.nodeName) \
         so that only this node's pods are watched"
    )]
    NoNodeName,
    #[error(
        "no Kubernetes client configuration: not running in a pod (no service account token) and \
         no kubeconfig found ({0})"
    )]
    Config(#[source] kube::Error),
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from the in-cluster service account, or from `kubeconfig` for development.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(kube::Error::InferConfig(e)))?,
    };
    Client::try_from(config).map_err(KubeError::Client)
}

/// Tuning of the source. [`KubernetesConfig::new`] has the production defaults.
#[derive(Debug, Clone)]
pub struct KubernetesConfig {
    /// This node (`spec.nodeName` of the pods to watch).
    pub node_name: String,
    /// How pods' cgroups are named; `None`: identities without cgroup (by address only).
    pub cgroup_driver: Option<CgroupDriver>,
    /// Changes arriving within this window are folded into one snapshot.
    pub debounce: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Write `AccessPolicy` status (needs `patch` on `accesspolicies/status`).
    pub write_status: bool,
    /// Where the gateways of the other nodes run, to allow their addresses to reach protected
    /// endpoints (`Snapshot::gateways`). `None`: no peers (one node, or a static list).
    pub peers: Option<GatewayPeers>,
}

/// The gateway `DaemonSet`'s pods, whose addresses become `Snapshot::gateways`.
///
/// Restricted to one namespace (the gateway's own, `POD_NAMESPACE` from the downward API) and
/// to host-network pods: whoever could add an address here could reach every protected
/// endpoint around the gateway, so it must take the rights to create pods in the gateway's
/// namespace, not just a label on a pod anywhere.
#[derive(Debug, Clone)]
pub struct GatewayPeers {
    pub namespace: String,
    pub label_selector: String,
}

impl GatewayPeers {
    /// The labels `daemonset/daemonset.yaml` puts on the gateway pods.
    pub fn in_namespace(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            label_selector: "app.kubernetes.io/name=nodegate,app.kubernetes.io/component=gateway"
                .to_owned(),
        }
    }
}

impl KubernetesConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            cgroup_driver: None,
            // Long enough to fold an EndpointSlice update and its Service update, short
            // enough to stay far inside the one-second label-to-enforcement budget.
            debounce: Duration::from_millis(50),
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            write_status: true,
            peers: None,
        }
    }
}

/// The watched resources, in [`Health::watchers`] order.
pub const RESOURCES: [&str; 5] = [
    "services",
    "endpointslices",
    "pods",
    "accesspolicies",
    "gateway-pods",
];
const SERVICES: usize = 0;
const SLICES: usize = 1;
const PODS: usize = 2;
const POLICIES: usize = 3;
const PEERS: usize = 4;

/// Health of one watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherHealth {
    pub resource: &'static str,
    /// Listed completely at least once.
    pub synced: bool,
    /// Last complete list or event: when this cache was last known to match the API server.
    pub last_sync: Option<SystemTime>,
    /// The current failure; `None` once a re-list has succeeded.
    pub error: Option<String>,
    pub error_since: Option<SystemTime>,
    /// Consecutive failures (reset by a successful list).
    pub failures: u64,
    /// Re-lists forced by `410 Gone` (normal after API server compaction; a high rate means
    /// the watch is too slow to keep up).
    pub relists: u64,
}

/// Health of the source, for `/readyz`, metrics and `gateway status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub watchers: Vec<WatcherHealth>,
    /// Last time a snapshot was computed from caches that were all in sync.
    pub last_sync: Option<SystemTime>,
    /// Snapshots published (changes only).
    pub revision: u64,
    /// The last failed `AccessPolicy` status write, until one succeeds.
    pub status_error: Option<String>,
}

impl Health {
    fn new() -> Self {
        Self {
            watchers: RESOURCES
                .iter()
                .map(|&resource| WatcherHealth {
                    resource,
                    synced: false,
                    last_sync: None,
                    error: None,
                    error_since: None,
                    failures: 0,
                    relists: 0,
                })
                .collect(),
            last_sync: None,
            revision: 0,
            status_error: None,
        }
    }

    /// Every watcher has listed and none is failing. While this is false the gateway still
    /// enforces the last-known-good snapshot; readiness only tells the operator (and a rolling
    /// update) that it is not following the API server.
    pub fn ready(&self) -> bool {
        self.watchers.iter().all(|w| w.synced && w.error.is_none())
    }

    /// All current errors, one line, for `/readyz`.
    pub fn error(&self) -> Option<String> {
        let errors: Vec<String> = self
            .watchers
            .iter()
            .filter_map(|w| {
                if let Some(e) = &w.error {
                    Some(format!("{}: {e}", w.resource))
                } else if !w.synced {
                    Some(format!("{}: not listed yet", w.resource))
                } else {
                    None
                }
            })
            .collect();
        (!errors.is_empty()).then(|| errors.join("; "))
    }

    /// A JSON view for `/readyz` and `gateway status --json`.
    pub fn to_json(&self) -> serde_json::Value {
        let time = |t: Option<SystemTime>| t.map(rfc3339);
        serde_json::json!({
            "ready": self.ready(),
            "error": self.error(),
            "last_sync": time(self.last_sync),
            "revision": self.revision,
            "status_error": self.status_error,
            "watchers": self.watchers.iter().map(|w| serde_json::json!({
                "resource": w.resource,
                "synced": w.synced,
                "last_sync": time(w.last_sync),
                "error": w.error,
                "error_since": time(w.error_since),
                "failures": w.failures,
                "relists": w.relists,
            })).collect::<Vec<_>>(),
        })
    }
}

/// RFC 3339 in whole seconds, the form of Kubernetes timestamps.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs)
        .ok()
        .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| "1970-01-01T00:00:00Z".to_owned(), |ts| ts.to_string())
}

/// State shared by the tasks.
struct Shared {
    health: watch::Sender<Health>,
    changed: Notify,
}

impl Shared {
    fn update(&self, slot: usize, f: impl FnOnce(&mut WatcherHealth)) {
        self.health.send_modify(|h| f(&mut h.watchers[slot]));
    }

    fn all_synced(&self) -> bool {
        self.health.borrow().watchers.iter().all(|w| w.synced)
    }
}

/// A running Kubernetes source. Dropping it stops its tasks.
pub struct KubernetesSource {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    health: watch::Receiver<Health>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubernetesSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubernetesSource {
    /// Starts the watchers and the reconcile on the current tokio runtime (the control-plane
    /// runtime in the gateway, not the proxy's).
    pub fn start(client: Client, config: KubernetesConfig) -> Result<Self, KubeError> {
        if config.node_name.trim().is_empty() {
            return Err(KubeError::NoNodeName);
        }
        let (health_tx, health_rx) = watch::channel(Health::new());
        let shared = Arc::new(Shared {
            health: health_tx,
            changed: Notify::new(),
        });
        let policy_resource = ApiResource::erase::<AccessPolicy>(&());

        let (services, services_w) = reflector::store::<Service>();
        let (slices, slices_w) = reflector::store::<EndpointSlice>();
        let (pods, pods_w) = reflector::store::<Pod>();
        let (peers, peers_w) = reflector::store::<Pod>();
        let policies_w = reflector::store::Writer::<DynamicObject>::new(policy_resource.clone());
        let policies = policies_w.as_reader();

        let services_cfg = watcher::Config::default().labels(&format!("{PROTECTED_LABEL}=true"));
        // All slices that belong to a Service: the API cannot select "slices of labelled
        // Services", so unprotected ones are filtered in the reconcile.
        let slices_cfg = watcher::Config::default().labels(SERVICE_NAME_LABEL);
        let pods_cfg =
            watcher::Config::default().fields(&format!("spec.nodeName={}", config.node_name));

        let mut tasks = vec![
            tokio::spawn(watch_loop(
                Api::<Service>::all(client.clone()),
                services_cfg,
                services_w,
                SERVICES,
                shared.clone(),
                config.clone(),
            )),
            tokio::spawn(watch_loop(
                Api::<EndpointSlice>::all(client.clone()),
                slices_cfg,
                slices_w,
                SLICES,
                shared.clone(),
                config.clone(),
            )),
            tokio::spawn(watch_loop(
                Api::<Pod>::all(client.clone()),
                pods_cfg,
                pods_w,
                PODS,
                shared.clone(),
                config.clone(),
            )),
            tokio::spawn(watch_loop(
                Api::<DynamicObject>::all_with(client.clone(), &policy_resource),
                watcher::Config::default(),
                policies_w,
                POLICIES,
                shared.clone(),
                config.clone(),
            )),
        ];
        match &config.peers {
            Some(p) => tasks.push(tokio::spawn(watch_loop(
                Api::<Pod>::namespaced(client.clone(), &p.namespace),
                watcher::Config::default().labels(&p.label_selector),
                peers_w,
                PEERS,
                shared.clone(),
                config.clone(),
            ))),
            // Nothing to list: an empty peer set is complete from the start.
            None => shared.update(PEERS, |h| h.synced = true),
        }

        let (snapshots_tx, snapshots_rx) = watch::channel(None);
        let (verdicts_tx, verdicts_rx) = watch::channel(BTreeMap::new());
        let caches = Caches {
            services,
            slices,
            pods,
            peers,
            policies: policies.clone(),
        };
        tasks.push(tokio::spawn(reconcile_loop(
            caches,
            shared.clone(),
            config.clone(),
            snapshots_tx,
            verdicts_tx,
        )));
        if config.write_status {
            tasks.push(tokio::spawn(status_loop(
                client,
                policy_resource,
                policies,
                verdicts_rx,
                shared,
                config,
            )));
        }
        Ok(Self {
            snapshots: snapshots_rx,
            health: health_rx,
            tasks,
        })
    }

    /// Snapshots as they change. `None` until every watcher has listed once: a consumer must
    /// not touch the kernel maps before the first `Some` (they hold the previous run's state).
    pub fn snapshots(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.snapshots.clone()
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }
}

/// Exponential backoff with ±20 % jitter, so that the gateways of every node do not retry an
/// API server that just came back in lockstep.
struct Backoff {
    initial: Duration,
    max: Duration,
    current: Option<Duration>,
}

impl Backoff {
    fn new(config: &KubernetesConfig) -> Self {
        Self {
            initial: config.backoff_initial,
            max: config.backoff_max.max(config.backoff_initial),
            current: None,
        }
    }

    fn next(&mut self) -> Duration {
        let base = match self.current {
            None => self.initial,
            Some(d) => d.saturating_mul(2).min(self.max),
        };
        self.current = Some(base);
        // RandomState is seeded per instance from OS randomness: enough for jitter, no extra
        // dependency.
        let random = RandomState::new().hash_one(Instant::now());
        #[expect(
            clippy::cast_precision_loss,
            reason = "a jitter factor needs no more than f64's 53 bits"
        )]
        let unit = (random % 1_000_000) as f64 / 1_000_000.0;
        base.mul_f64(0.8 + 0.4 * unit)
    }

    fn reset(&mut self) {
        self.current = None;
    }
}

/// One watcher, forever: apply events to the cache, report health, rebuild after errors.
async fn watch_loop<K>(
    api: Api<K>,
    watch_config: watcher::Config,
    mut writer: reflector::store::Writer<K>,
    slot: usize,
    shared: Arc<Shared>,
    config: KubernetesConfig,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let resource = RESOURCES[slot];
    let mut backoff = Backoff::new(&config);
    loop {
        let mut healthy_since = None;
        let mut stream = pin!(watcher(api.clone(), watch_config.clone()));
        let error = loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    // `managedFields` is never read and often the largest part of an object.
                    let event = event.modify(|o| o.meta_mut().managed_fields = None);
                    writer.apply_watcher_event(&event);
                    match event {
                        watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        watcher::Event::InitDone => {
                            healthy_since = Some(Instant::now());
                            shared.update(slot, |h| {
                                if h.error.is_some() {
                                    tracing::info!(resource, "watch recovered: re-listed");
                                }
                                h.synced = true;
                                h.last_sync = Some(SystemTime::now());
                                h.error = None;
                                h.error_since = None;
                                h.failures = 0;
                            });
                            shared.changed.notify_one();
                        }
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                            shared.update(slot, |h| h.last_sync = Some(SystemTime::now()));
                            shared.changed.notify_one();
                        }
                    }
                }
                Some(Err(watcher::Error::WatchError(status))) if status.code == 410 => {
                    // kube's watcher starts over with a list on its next poll.
                    tracing::debug!(resource, message = %status.message, "watch expired (410): re-listing");
                    shared.update(slot, |h| h.relists += 1);
                }
                Some(Err(e)) => break with_hint(slot, describe(&e)),
                None => break "watch stream ended".to_owned(),
            }
        };
        if healthy_since.is_some_and(|t: Instant| t.elapsed() >= BACKOFF_RESET_AFTER) {
            backoff.reset();
        }
        let delay = backoff.next();
        shared.update(slot, |h| {
            h.failures += 1;
            h.error_since.get_or_insert_with(SystemTime::now);
            h.error = Some(error.clone());
        });
        tracing::warn!(
            resource,
            error = %error,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "Kubernetes watch failed: keeping the last-known-good state"
        );
        tokio::time::sleep(delay).await;
    }
}

/// A `Warning` (or, once fixed, `Normal`) event on the `AccessPolicy`, for `kubectl describe`.
/// Best effort: the status condition is the record; a failed event is only logged.
async fn publish_event(recorder: &Recorder, obj: &DynamicObject, verdict: &Verdict) {
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(AccessPolicy::api_version(&()).into_owned()),
        kind: Some(AccessPolicy::kind(&()).into_owned()),
        name: obj.metadata.name.clone(),
        namespace: obj.metadata.namespace.clone(),
        uid: obj.metadata.uid.clone(),
        resource_version: obj.metadata.resource_version.clone(),
        ..Default::default()
    };
    // The Events API caps a note at 1 kB.
    let mut note = verdict.message.clone();
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event = K8sEvent {
        type_: if verdict.accepted {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: verdict.reason.to_owned(),
        note: Some(note),
        action: "Validate".to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!(error = %e, "cannot publish the AccessPolicy event (the status holds the same)");
    }
}

/// What to check, for the failures whose cause is in the installation rather than the network.
fn with_hint(slot: usize, error: String) -> String {
    let hint = if error.contains("HTTP 403") {
        "; check the gateway's ClusterRole (daemonset/clusterrole.yaml)"
    } else if error.contains("HTTP 404") && slot == POLICIES {
        "; is the AccessPolicy CRD installed (kubectl apply -k daemonset/)?"
    } else {
        ""
    };
    error + hint
}

/// One line an operator can act on: an API error as `HTTP 403 Forbidden: <message>` (kube's
/// own text embeds the whole `Status` debug dump), anything else with its causes
/// (`... client error (Connect): tcp connect error: Connection refused (os error 111)`).
fn describe(error: &watcher::Error) -> String {
    let api = match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => match e {
            kube::Error::Api(status) => {
                Some((status.code, status.reason.clone(), status.message.clone()))
            }
            _ => None,
        },
        watcher::Error::WatchError(status) => {
            Some((status.code, status.reason.clone(), status.message.clone()))
        }
        watcher::Error::NoResourceVersion => None,
    };
    let what = match error {
        watcher::Error::InitialListFailed(_) => "list",
        watcher::Error::WatchStartFailed(_) => "watch",
        watcher::Error::WatchFailed(_) | watcher::Error::WatchError(_) => "watch stream",
        watcher::Error::NoResourceVersion => "list without resourceVersion",
    };
    if let Some((code, reason, message)) = api {
        return format!("{what}: HTTP {code} {reason}: {message}");
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Display of a wrapper often repeats its cause; keep each piece once.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

struct Caches {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    peers: Store<Pod>,
    policies: Store<DynamicObject>,
}

async fn reconcile_loop(
    caches: Caches,
    shared: Arc<Shared>,
    config: KubernetesConfig,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    verdicts: watch::Sender<BTreeMap<ObjectKey, Verdict>>,
) {
    loop {
        shared.changed.notified().await;
        tokio::time::sleep(config.debounce).await;
        if !shared.all_synced() {
            continue;
        }
        let (services, slices, pods, peers, policies) = (
            caches.services.state(),
            caches.slices.state(),
            caches.pods.state(),
            caches.peers.state(),
            caches.policies.state(),
        );
        let outcome = reconcile::build(reconcile::Inputs {
            services: &services,
            slices: &slices,
            pods: &pods,
            peers: &peers,
            policies: &policies,
            driver: config.cgroup_driver,
        });
        let snapshot = outcome.snapshot;
        let changed = snapshots.send_if_modified(|current| {
            if current.as_deref() == Some(&snapshot) {
                return false;
            }
            *current = Some(Arc::new(snapshot));
            true
        });
        shared.health.send_modify(|h| {
            h.last_sync = Some(SystemTime::now());
            if changed {
                h.revision += 1;
            }
        });
        if changed {
            tracing::debug!("Kubernetes snapshot published");
        }
        verdicts.send_if_modified(|current| {
            if *current == outcome.verdicts {
                return false;
            }
            *current = outcome.verdicts;
            true
        });
    }
}

/// Writes each `AccessPolicy`'s status when it differs from the verdict. Failed writes are
/// retried with backoff; they never hold up snapshots.
async fn status_loop(
    client: Client,
    resource: ApiResource,
    policies: Store<DynamicObject>,
    mut verdicts: watch::Receiver<BTreeMap<ObjectKey, Verdict>>,
    shared: Arc<Shared>,
    config: KubernetesConfig,
) {
    let mut backoff = Backoff::new(&config);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: EVENT_CONTROLLER.to_owned(),
            instance: Some(config.node_name.clone()),
        },
    );
    loop {
        let wanted = verdicts.borrow_and_update().clone();
        let mut failure = None;
        for (key, verdict) in &wanted {
            let oref = ObjectRef::new_with(&key.name, resource.clone()).within(&key.namespace);
            let Some(obj) = policies.get(&oref) else {
                continue;
            };
            // A verdict about another generation is stale; the next reconcile sends a new one.
            if obj.metadata.generation != verdict.generation {
                continue;
            }
            let current: Option<AccessPolicyStatus> = obj
                .data
                .get("status")
                .and_then(|s| serde_json::from_value(s.clone()).ok());
            let desired = verdict.status(current.as_ref(), &rfc3339(SystemTime::now()));
            if current.as_ref() == Some(&desired) {
                continue;
            }
            // Untyped, like the watcher: the response echoes the object, and a typed decode
            // would fail on exactly the invalid specs this status is about.
            let api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &key.namespace, &resource);
            let patch = serde_json::json!({ "status": desired });
            match api
                .patch_status(
                    &obj.name_any(),
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.to_owned()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(
                        policy = %key,
                        accepted = verdict.accepted,
                        reason = verdict.reason,
                        message = %verdict.message,
                        "AccessPolicy status written"
                    );
                    let before = current
                        .as_ref()
                        .and_then(|s| s.conditions.first())
                        .map(|c| (c.status.as_str(), c.reason.as_str()));
                    let after = desired
                        .conditions
                        .first()
                        .map(|c| (c.status.as_str(), c.reason.as_str()));
                    // An event per change of verdict, not per write. Every node computes the
                    // same status and only the one that finds it out of date writes, so this
                    // is normally one event for the cluster, not one per node.
                    if before != after {
                        publish_event(&recorder, &obj, verdict).await;
                    }
                }
                Err(e) => {
                    failure = Some(format!("AccessPolicy {key} status: {e}"));
                    break;
                }
            }
        }
        shared
            .health
            .send_modify(|h| h.status_error.clone_from(&failure));
        if let Some(error) = failure {
            let delay = backoff.next();
            tracing::warn!(error = %error, "cannot write AccessPolicy status; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                r = verdicts.changed() => if r.is_err() { return },
            }
        } else {
            backoff.reset();
            if verdicts.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut config = KubernetesConfig::new("n");
        config.backoff_initial = Duration::from_millis(100);
        config.backoff_max = Duration::from_millis(1000);
        let mut b = Backoff::new(&config);
        let bases = [100, 200, 400, 800, 1000, 1000];
        for base in bases {
            let d = b.next().as_secs_f64() * 1000.0;
            let base = f64::from(base);
            assert!(
                d >= base * 0.8 - 1e-6 && d <= base * 1.2 + 1e-6,
                "{d} around {base}"
            );
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(120));
    }

    #[test]
    fn readiness_needs_every_watcher_listed_and_healthy() {
        let mut h = Health::new();
        assert!(!h.ready());
        assert!(
            h.error()
                .is_some_and(|e| e.contains("services: not listed yet"))
        );
        for w in &mut h.watchers {
            w.synced = true;
        }
        assert!(h.ready() && h.error().is_none());
        h.watchers[POLICIES].error = Some(with_hint(POLICIES, "list: HTTP 404 NotFound: x".into()));
        assert!(!h.ready());
        let error = h.error().unwrap_or_default();
        assert!(
            error.starts_with("accesspolicies: list: HTTP 404"),
            "{error}"
        );
        assert!(error.contains("CRD installed"), "{error}");
        assert_eq!(h.to_json()["ready"], serde_json::json!(false));
    }
}
