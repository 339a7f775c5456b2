//! The Kubernetes source against the stand-in API server (crate `kube-standin`), over real
//! HTTP.
//!
//! Latencies are measured from the moment the stand-in has committed a change (the call that
//! writes it returns) to the moment the source publishes a snapshot that reflects it: watch
//! event delivery + decode + cache + debounce (50 ms) + reconcile. Writing the kernel maps
//! from a snapshot is measured by the gateway's own tests once this is wired in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::source::kubernetes::{GatewayPeers, Health, KubernetesConfig, KubernetesSource};
use crate::source::model::{DenyReason, ObjectKey, PolicyBinding, PolicySource, Snapshot};
use crate::source::pods::CgroupDriver;
use kube_standin::{FakeApi, Kind, Outage};
use serde_json::{Value, json};
use tokio::sync::watch;

const NODE: &str = "node-a";
const BUDGET: Duration = Duration::from_secs(1);

/// A kube client for the stand-in (plain HTTP, no credentials).
fn client(api: &FakeApi) -> kube::Client {
    let config = kube::Config::new(api.url().parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}

fn service(name: &str, protected: bool, annotations: &Value) -> Value {
    let labels = if protected {
        json!({"app": name, "nodegate.io/protected": "true"})
    } else {
        json!({"app": name})
    };
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop", "labels": labels,
                        "annotations": annotations},
           "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                    "ports": [{"port": 80, "targetPort": 8080}]}})
}

fn slice(service: &str, name: &str, ready: &[&str], not_ready: &[&str]) -> Value {
    let ep = |ip: &&str, ready: bool| json!({"addresses": [ip], "conditions": {"ready": ready}});
    let mut endpoints: Vec<Value> = ready.iter().map(|ip| ep(ip, true)).collect();
    endpoints.extend(not_ready.iter().map(|ip| ep(ip, false)));
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": name, "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"port": 8080, "protocol": "TCP"}]})
}

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "labels": {"app": "client"}},
           "spec": {"nodeName": node, "serviceAccountName": "client",
                    "containers": [{"name": "c", "image": "x"}]},
           "status": {"phase": "Running", "qosClass": "Burstable", "podIPs": [{"ip": ip}]}})
}

fn access_policy(name: &str, spec: &Value) -> Value {
    json!({"apiVersion": "nodegate.io/v1alpha1", "kind": "AccessPolicy",
           "metadata": {"name": name, "namespace": "shop"}, "spec": spec})
}

fn web() -> ObjectKey {
    ObjectKey::new("shop", "web")
}

struct Harness {
    api: FakeApi,
    source: KubernetesSource,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    health: watch::Receiver<Health>,
}

impl Harness {
    /// Starts the source against a stand-in holding `objects`, and waits for the first snapshot.
    async fn start(objects: Vec<Value>) -> Self {
        let api = FakeApi::start();
        for obj in objects {
            api.apply(obj);
        }
        let mut config = KubernetesConfig::new(NODE);
        config.cgroup_driver = Some(CgroupDriver::Systemd);
        // Short backoff so that recovery tests take seconds, not the production 30 s cap.
        config.backoff_initial = Duration::from_millis(100);
        config.backoff_max = Duration::from_millis(800);
        config.peers = Some(GatewayPeers::in_namespace("nodegate-system"));
        let source = KubernetesSource::start(client(&api), config).expect("start");
        let snapshots = source.snapshots();
        let health = source.health();
        let mut h = Self {
            api,
            source,
            snapshots,
            health,
        };
        h.snapshot_where("first snapshot", Duration::from_secs(5), |_| true)
            .await;
        h
    }

    /// Waits for a snapshot satisfying `pred`; returns how long it took.
    async fn snapshot_where(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> Duration {
        let start = Instant::now();
        let waited = tokio::time::timeout(
            timeout,
            self.snapshots.wait_for(|s| s.as_deref().is_some_and(&pred)),
        )
        .await
        .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => start.elapsed(),
            Ok(Err(_)) => panic!("{what}: the source stopped"),
            Err(tokio::time::error::Elapsed { .. }) => panic!(
                "{what}: not within {timeout:?}; last snapshot: {:#?}; health: {:#?}",
                self.snapshots.borrow().as_deref(),
                self.health.borrow().to_json()
            ),
        }
    }

    async fn health_where(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Health) -> bool,
    ) -> Duration {
        let start = Instant::now();
        let waited = tokio::time::timeout(timeout, self.health.wait_for(|h| pred(h)))
            .await
            .map(|r| r.map(|_| ()));
        match waited {
            Ok(Ok(())) => start.elapsed(),
            _ => panic!(
                "{what}: not within {timeout:?}; health: {:#}",
                self.health.borrow().to_json()
            ),
        }
    }

    fn current(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone().expect("a snapshot")
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_and_unlabel_within_one_second() {
    let mut h = Harness::start(vec![
        service("web", false, &json!({})),
        slice("web", "web-1", &["10.1.0.1"], &[]),
    ])
    .await;
    assert!(h.current().services.is_empty(), "unlabelled: not protected");

    let (mut protect, mut unprotect) = (Vec::new(), Vec::new());
    for round in 0..10 {
        h.api.apply(service("web", true, &json!({})));
        protect.push(
            h.snapshot_where(&format!("labelled (round {round})"), BUDGET, |s| {
                s.services
                    .get(&web())
                    .is_some_and(|w| w.endpoints.len() == 1 && w.vips.len() == 1)
            })
            .await,
        );
        h.api.apply(service("web", false, &json!({})));
        unprotect.push(
            h.snapshot_where(&format!("unlabelled (round {round})"), BUDGET, |s| {
                !s.services.contains_key(&web())
            })
            .await,
        );
    }
    protect.sort();
    unprotect.sort();
    println!(
        "label -> in snapshot: min {:?} p50 {:?} max {:?}; unlabel -> gone: min {:?} p50 {:?} max {:?} (10 rounds, debounce 50 ms)",
        protect[0],
        percentile(&protect, 50),
        protect[9],
        unprotect[0],
        percentile(&unprotect, 50),
        unprotect[9]
    );
    // The watchers asked the API server to filter, not the client.
    let requests = h.api.requests().join("\n");
    assert!(
        requests.contains("labelSelector=nodegate.io%2Fprotected%3Dtrue"),
        "{requests}"
    );
    assert!(
        requests.contains("fieldSelector=spec.nodeName%3Dnode-a"),
        "{requests}"
    );
    assert!(requests.contains("allowWatchBookmarks=true"), "{requests}");
}

/// A scaling step: what, the change, the (ready, not ready) endpoints expected after it.
type Step = (
    &'static str,
    Box<dyn Fn(&FakeApi)>,
    Option<(Vec<String>, Vec<String>)>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_scaling() {
    let mut h = Harness::start(vec![
        service("web", true, &json!({})),
        slice("web", "web-1", &["10.1.0.1"], &[]),
        slice("other", "other-1", &["10.9.0.1"], &[]),
    ])
    .await;
    let endpoints = |s: &Snapshot| {
        s.services.get(&web()).map(|w| {
            let ready: Vec<String> = w.endpoints.iter().map(ToString::to_string).collect();
            let not_ready: Vec<String> = w
                .not_ready_endpoints
                .iter()
                .map(ToString::to_string)
                .collect();
            (ready, not_ready)
        })
    };
    let expect = |ready: &[&str], not_ready: &[&str]| {
        Some((
            ready.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
            not_ready
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
        ))
    };
    assert_eq!(
        endpoints(&h.current()),
        expect(&["10.1.0.1:8080"], &[]),
        "only its own slices"
    );

    let steps: Vec<Step> = vec![
        (
            "scale up to 3",
            Box::new(|api: &FakeApi| {
                api.apply(slice(
                    "web",
                    "web-1",
                    &["10.1.0.1", "10.1.0.2", "10.1.0.3"],
                    &[],
                ));
            }),
            expect(&["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"], &[]),
        ),
        (
            "a second slice",
            Box::new(|api: &FakeApi| {
                api.apply(slice("web", "web-2", &["10.1.1.1"], &[]));
            }),
            expect(
                &[
                    "10.1.0.1:8080",
                    "10.1.0.2:8080",
                    "10.1.0.3:8080",
                    "10.1.1.1:8080",
                ],
                &[],
            ),
        ),
        (
            "one becomes not ready",
            Box::new(|api: &FakeApi| {
                api.apply(slice(
                    "web",
                    "web-1",
                    &["10.1.0.1", "10.1.0.2"],
                    &["10.1.0.3"],
                ));
            }),
            expect(
                &["10.1.0.1:8080", "10.1.0.2:8080", "10.1.1.1:8080"],
                &["10.1.0.3:8080"],
            ),
        ),
        (
            "scale down to 1",
            Box::new(|api: &FakeApi| {
                api.apply(slice("web", "web-1", &["10.1.0.1"], &[]));
                api.delete(Kind::EndpointSlice, "shop", "web-2");
            }),
            expect(&["10.1.0.1:8080"], &[]),
        ),
        (
            "scale to zero",
            Box::new(|api: &FakeApi| {
                api.delete(Kind::EndpointSlice, "shop", "web-1");
            }),
            expect(&[], &[]),
        ),
    ];
    for (what, change, want) in steps {
        change(&h.api);
        let took = h
            .snapshot_where(what, BUDGET, |s| endpoints(s) == want)
            .await;
        println!("{what}: {took:?}");
    }
}

async fn outage_keeps_last_known_good(outage: Outage) {
    let mut h = Harness::start(vec![
        service("web", true, &json!({})),
        slice("web", "web-1", &["10.1.0.1"], &[]),
    ])
    .await;
    let before = h.current();
    assert!(before.services.contains_key(&web()));

    h.api.break_api(outage);
    let want = match outage {
        Outage::Refuse => "connection refused",
        Outage::Error500 => "http 500 internalerror",
    };
    // The first error of a watcher may be the cut connection ("reset by peer": a connection
    // still in the closing listener's backlog); the retries then meet the outage itself.
    let noticed = h
        .health_where("errors reported", Duration::from_secs(5), |h| {
            h.watchers.iter().all(|w| {
                w.error
                    .as_ref()
                    .is_some_and(|e| e.to_lowercase().contains(want))
            })
        })
        .await;
    let health = h.health.borrow().clone();
    assert!(!health.ready());
    let error = health.error().expect("an error");
    println!("{outage:?}: noticed after {noticed:?}: {error}");
    assert!(error.to_lowercase().contains(want), "{error}");

    // While the API is away the world changes; the source cannot know and keeps what it had.
    h.api.delete(Kind::Service, "shop", "web");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        *h.current(),
        *before,
        "last-known-good kept during the outage"
    );
    assert!(
        h.health.borrow().watchers.iter().all(|w| w.failures >= 2),
        "retried with backoff"
    );

    let healed = Instant::now();
    h.api.heal();
    h.health_where("recovered", Duration::from_secs(5), Health::ready)
        .await;
    h.snapshot_where(
        "change made during the outage",
        Duration::from_secs(2),
        |s| !s.services.contains_key(&web()),
    )
    .await;
    println!(
        "{outage:?}: healed -> ready and up to date in {:?}",
        healed.elapsed()
    );
    assert!(h.health.borrow().error().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_keep_last_known_good() {
    outage_keeps_last_known_good(Outage::Refuse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_errors_keep_last_known_good() {
    outage_keeps_last_known_good(Outage::Error500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watch_relists_without_stale_objects() {
    let mut h = Harness::start(vec![
        service("web", true, &json!({})),
        service("db", true, &json!({})),
        pod("client-1", NODE, "10.1.5.1"),
    ])
    .await;
    assert_eq!(h.current().services.len(), 2);

    // The watches end (as at timeoutSeconds); before they resume, `db` is deleted, `api` is
    // added, a pod goes away, and the history is compacted: the resumed watches get `410
    // Expired` in the stream and only a re-list can tell what happened.
    h.api.hold_watches();
    h.api.end_watches();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.api.delete(Kind::Service, "shop", "db");
    h.api.apply(service("api", true, &json!({})));
    h.api.delete(Kind::Pod, "shop", "client-1");
    h.api.compact();
    h.api.release_watches();

    h.snapshot_where("re-listed", Duration::from_secs(3), |s| {
        s.services
            .keys()
            .map(|k| k.name.as_str())
            .collect::<Vec<_>>()
            == ["api", "web"]
            && s.pods.is_empty()
    })
    .await;
    let health = h.health.borrow().clone();
    assert!(
        health.ready(),
        "a 410 is not an outage: {:#}",
        health.to_json()
    );
    for w in &health.watchers {
        assert!(
            w.relists >= 1,
            "{} re-listed after 410: {:#}",
            w.resource,
            health.to_json()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_access_policy_is_refused_and_denies_all() {
    let ops = json!({"nodegate.io/policy": "allow: [{when: {groups: ops}}]"});
    let mut h = Harness::start(vec![service("web", true, &ops)]).await;
    assert!(matches!(
        h.current().services[&web()].policy,
        PolicyBinding::Policy {
            source: PolicySource::Annotation,
            ..
        }
    ));

    // A typo in a criterion: never silently dropped, never falls back to the annotation.
    h.api.apply(access_policy(
        "web",
        &json!({"target": {"service": "web"},
                "policy": {"allow": [{"when": {"workload": {"namespce": "prod"}}}]}}),
    ));
    // And a spec the typed CRD struct could not even decode must not stop the watcher.
    h.api.apply(access_policy(
        "garbage",
        &json!({"target": "web", "policy": 3}),
    ));
    h.snapshot_where("deny-all", BUDGET, |s| {
        matches!(
            &s.services[&web()].policy,
            PolicyBinding::DenyAll(DenyReason::Invalid { source: PolicySource::AccessPolicy(name), .. })
                if name == "web"
        )
    })
    .await;

    let status = wait_status(&h.api, "web", |s| s["conditions"][0]["status"] == "False").await;
    let condition = &status["conditions"][0];
    println!("status of the invalid policy: {condition:#}");
    assert_eq!(condition["type"], "Accepted");
    assert_eq!(condition["reason"], "InvalidPolicy");
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.policy.allow[0].when.workload: unknown field `namespce`"),
        "{message}"
    );
    assert!(message.contains("web allow nothing"), "{message}");
    assert_eq!(status["services"], json!(["web"]));
    let garbage = wait_status(&h.api, "garbage", |s| {
        s["conditions"][0]["status"] == "False"
    })
    .await;
    assert_eq!(garbage["conditions"][0]["reason"], "InvalidSpec");

    // Fixed: accepted, enforced, observedGeneration follows the new generation.
    h.api.apply(access_policy(
        "web",
        &json!({"target": {"service": "web"}, "mode": "audit",
                "policy": {"allow": [{"when": {"workload": {"namespace": "prod"}}}]}}),
    ));
    h.snapshot_where("policy applied", BUDGET, |s| {
        matches!(&s.services[&web()].policy,
            PolicyBinding::Policy { source: PolicySource::AccessPolicy(name), .. } if name == "web")
    })
    .await;
    let status = wait_status(&h.api, "web", |s| s["conditions"][0]["status"] == "True").await;
    let generation = h
        .api
        .get(Kind::AccessPolicy, "shop", "web")
        .expect("policy")["metadata"]["generation"]
        .clone();
    assert_eq!(status["observedGeneration"], generation);
    assert_eq!(status["conditions"][0]["reason"], "Valid");
    assert!(
        !h.current().services[&web()].warnings.is_empty(),
        "annotation shadowed: warned"
    );

    // One event per change of verdict: InvalidPolicy and InvalidSpec, then Valid. An event is
    // posted after its status write, so the last one may still be on its way: waited for, up
    // to 3 s, then compared (an extra event would show here as well).
    let own = |name: &str, type_: &str, reason: &str| {
        (name.to_owned(), type_.to_owned(), reason.to_owned())
    };
    let want = vec![
        own("garbage", "Warning", "InvalidSpec"),
        own("web", "Normal", "Valid"),
        own("web", "Warning", "InvalidPolicy"),
    ];
    let start = Instant::now();
    let events = loop {
        let mut events = events_by_object(&h.api);
        events.sort();
        if events.len() >= want.len() || start.elapsed() > Duration::from_secs(3) {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(events, want);

    // The status writes do not loop: a few seconds later, no more PATCHes than needed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let patches = h
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH"))
        .count();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let later = h
        .api
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH"))
        .count();
    assert_eq!(patches, later, "status converged");
    assert!(h.source.health().borrow().status_error.is_none());
}

/// `(regarding.name, type, reason)` of every event written.
fn events_by_object(api: &FakeApi) -> Vec<(String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    api.all(Kind::Event)
        .iter()
        .map(|e| {
            (
                text(&e["regarding"]["name"]),
                text(&e["type"]),
                text(&e["reason"]),
            )
        })
        .collect()
}

async fn wait_status(api: &FakeApi, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let status = api
            .get(Kind::AccessPolicy, "shop", name)
            .map_or(Value::Null, |o| o["status"].clone());
        if pred(&status) {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "status of {name}: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_this_nodes_pods_with_identity() {
    let mut h = Harness::start(vec![
        pod("here", NODE, "10.1.5.1"),
        pod("elsewhere", "node-b", "10.2.5.1"),
    ])
    .await;
    let snap = h.current();
    assert_eq!(snap.pods.len(), 1);
    let here = snap.pods.values().next().expect("pod");
    assert_eq!(
        (here.name.as_str(), here.service_account.as_str()),
        ("here", "client")
    );
    let uid = here.uid.replace('-', "_");
    assert_eq!(
        here.cgroup.as_deref().map(|p| p.display().to_string()),
        Some(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice"
        ))
    );
    assert_eq!(
        snap.pod_by_ip("10.1.5.1".parse().expect("ip"))
            .map(|p| p.name.as_str()),
        Some("here")
    );

    h.api.apply(pod("second", NODE, "10.1.5.2"));
    h.snapshot_where("new pod", BUDGET, |s| s.pods.len() == 2)
        .await;
    h.api.delete(Kind::Pod, "shop", "here");
    h.snapshot_where("pod gone", BUDGET, |s| {
        s.pods.values().map(|p| p.name.as_str()).collect::<Vec<_>>() == ["second"]
    })
    .await;
}

fn gateway_pod(namespace: &str, node: &str, ip: &str, host_network: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": format!("nodegate-{node}"), "namespace": namespace,
                        "labels": {"app.kubernetes.io/name": "nodegate",
                                   "app.kubernetes.io/component": "gateway"}},
           "spec": {"nodeName": node, "hostNetwork": host_network,
                    "containers": [{"name": "gateway", "image": "x"}]},
           "status": {"phase": "Running", "podIPs": [{"ip": ip}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_peers_from_the_daemonset_namespace_only() {
    let mut h = Harness::start(vec![
        gateway_pod("nodegate-system", NODE, "192.168.1.1", true),
        gateway_pod("nodegate-system", "node-b", "192.168.1.2", true),
        // Same labels elsewhere, or without host network: never a gateway.
        gateway_pod("shop", "node-c", "10.1.9.9", true),
        gateway_pod("nodegate-system", "node-d", "10.1.9.8", false),
    ])
    .await;
    let ips = |s: &Snapshot| {
        s.gateways
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(ips(&h.current()), ["192.168.1.1", "192.168.1.2"]);
    h.api.apply(gateway_pod(
        "nodegate-system",
        "node-e",
        "192.168.1.5",
        true,
    ));
    h.snapshot_where("a node joins", BUDGET, |s| s.gateways.len() == 3)
        .await;
    h.api
        .delete(Kind::Pod, "nodegate-system", "nodegate-node-b");
    h.snapshot_where("a node leaves", BUDGET, |s| {
        ips(s) == ["192.168.1.1", "192.168.1.5"]
    })
    .await;
    // The gateway's own pod is on this node but is host-network: never a workload by address.
    assert!(
        h.current()
            .pod_by_ip("192.168.1.1".parse().expect("ip"))
            .is_none()
    );
}
