//! The stand-in Kubernetes API server (crate `kube-standin`) on a simulated node, and the
//! objects the gateway's Kubernetes source reads, built for the harness's pods.
//!
//! `gateway run` runs in the node netns and cannot reach the test process's loopback, so the
//! stand-in's listening socket is opened by a thread that has entered the node netns
//! (`setns(2)`, see [`super::netns`]) at the node IP, port [`API_PORT`]; the socket stays in
//! that namespace and is served by a tokio runtime owned by [`KubeApi`] in the test process.
//! The test writes objects in-process (`apply`, `delete`, `break_api`, `heal`): no helper
//! process, no port to discover, and the state the gateway sees is the state the test holds.
//! Linked nodes ([`Node::link_with`]) reach it through the link.
//!
//! The gateway reads it through a kubeconfig (plain HTTP, no credentials) written into the
//! node's temp dir ([`KubeApi::write_kubeconfig`]).

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

pub use kube_standin::{FakeApi, Kind, Outage};
use serde_json::{Map, Value, json};

use super::{Result, io_err, netns::tcp_listen_in_netns, node::Node};

/// Port of the stand-in API server on the node IP.
pub const API_PORT: u16 = 6443;
/// Label that makes a Service protected.
pub const PROTECTED_LABEL: &str = "nodegate.io/protected";
/// Annotation holding a Service's policy (short form of an `AccessPolicy`).
pub const POLICY_ANNOTATION: &str = "nodegate.io/policy";
/// Namespace of the gateway pods ([`gateway_pod_object`]), the gateway's default.
pub const GATEWAY_NAMESPACE: &str = "nodegate-system";

/// A running stand-in API server. Dropping it stops it (and its runtime).
pub struct KubeApi {
    // Dropped before the runtime that serves it.
    api: FakeApi,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("url", &self.api.url())
            .finish_non_exhaustive()
    }
}

impl KubeApi {
    /// Starts on `<node IP>:6443` inside `node`'s netns.
    pub fn start(node: &Node) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kube-standin")
            .enable_all()
            .build()
            .map_err(io_err("start the stand-in API server's tokio runtime"))?;
        let netns = node.node_netns().to_owned();
        let addr = SocketAddr::new(IpAddr::V4(node.ipv4()), API_PORT);
        let binder: kube_standin::Binder = Arc::new(move |addr| {
            tcp_listen_in_netns(&netns, addr).map_err(|e| std::io::Error::other(e.to_string()))
        });
        let api = FakeApi::start_with(runtime.handle(), addr, binder)
            .map_err(io_err(format!("start the stand-in API server at {addr}")))?;
        Ok(Self { api, runtime })
    }

    /// `http://<node IP>:6443`.
    pub fn url(&self) -> String {
        self.api.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.api.addr()
    }

    /// The stand-in itself (compact history, hold watches, requests seen...).
    pub fn api(&self) -> &FakeApi {
        &self.api
    }

    /// Writes a kubeconfig for this server into `node`'s temp dir (`kubeconfig.yaml`): the
    /// server URL over plain HTTP, a user without credentials. Returns its path.
    pub fn write_kubeconfig(&self, node: &Node) -> Result<PathBuf> {
        let path = node.dir().join("kubeconfig.yaml");
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: standin\n  cluster:\n    server: {}\n\
             users:\n- name: nobody\n  user: {{}}\n\
             contexts:\n- name: standin\n  context:\n    cluster: standin\n    user: nobody\n    namespace: default\n\
             current-context: standin\n",
            self.url()
        );
        fs::write(&path, text).map_err(io_err(format!("write {}", path.display())))?;
        Ok(path)
    }

    /// Creates or replaces an object (whole, `status` included). Returns its resourceVersion.
    pub fn apply(&self, obj: Value) -> u64 {
        self.api.apply(obj)
    }

    /// Applies several objects in order.
    pub fn apply_all(&self, objs: impl IntoIterator<Item = Value>) {
        for obj in objs {
            self.api.apply(obj);
        }
    }

    /// Deletes an object; false if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.api.delete(kind, namespace, name)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        self.api.get(kind, namespace, name)
    }

    /// All objects of a kind.
    pub fn all(&self, kind: Kind) -> Vec<Value> {
        self.api.all(kind)
    }

    /// Breaks the API: connections refused, or every request answered 500. Open watches are cut.
    pub fn break_api(&self, outage: Outage) {
        self.api.break_api(outage);
    }

    /// Repairs it (the same address again after [`Outage::Refuse`]).
    pub fn heal(&self) {
        let _runtime = self.runtime.enter();
        self.api.heal();
    }
}

/// The gateway's `kubernetes:` config section for `kubeconfig` (cgroup driver `auto`, no
/// peers, status written, 50 ms debounce); change fields with [`set`].
pub fn kubernetes_section(kubeconfig: &std::path::Path) -> Value {
    json!({
        "kubeconfig": kubeconfig,
        "cgroup_driver": "auto",
        "peers": false,
        "write_status": true,
        "debounce_ms": 50,
    })
}

/// `value` with `key` set (for the JSON objects of this module).
#[must_use]
pub fn set(mut value: Value, key: &str, field: Value) -> Value {
    value[key] = field;
    value
}

/// A pod of `node` as the API server has it once it runs there: UID [`Node::pod_uid`],
/// `spec.nodeName` [`Node::node_name`], `status.podIP(s)` the place's v4 and v6 addresses,
/// `BestEffort`, `Running`. `pod` is the harness's pod name, also the object's name.
pub fn pod_object(
    node: &Node,
    pod: &str,
    namespace: &str,
    service_account: &str,
    labels: &Value,
) -> Result<Value> {
    let place = node.get(pod)?;
    Ok(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod, "namespace": namespace, "uid": node.pod_uid(pod),
                     "labels": labels},
        "spec": {"nodeName": node.node_name(), "serviceAccountName": service_account,
                 "containers": [{"name": "ctr", "image": "ngpeer"}]},
        "status": {"phase": "Running", "qosClass": "BestEffort",
                   "podIP": place.ipv4.to_string(),
                   "podIPs": [{"ip": place.ipv4.to_string()}, {"ip": place.ipv6.to_string()}]},
    }))
}

/// The gateway pod of `node` (the `DaemonSet`'s): host network, the node's addresses as pod
/// IPs, the labels the gateway selects its peers by, in [`GATEWAY_NAMESPACE`].
pub fn gateway_pod_object(node: &Node) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("nodegate-{}", node.node_name()),
                     "namespace": GATEWAY_NAMESPACE,
                     "uid": node.pod_uid("nodegate-gateway"),
                     "labels": {"app.kubernetes.io/name": "nodegate",
                                "app.kubernetes.io/component": "gateway"}},
        "spec": {"nodeName": node.node_name(), "hostNetwork": true,
                 "serviceAccountName": "nodegate",
                 "containers": [{"name": "gateway", "image": "nodegate"}]},
        "status": {"phase": "Running", "qosClass": "Burstable",
                   "podIP": node.ipv4().to_string(),
                   "podIPs": [{"ip": node.ipv4().to_string()}, {"ip": node.ipv6().to_string()}]},
    })
}

/// A Service: `clusterIP(s)` = the given VIPs' addresses, one TCP port per distinct VIP port
/// (all to `target_port`), protected by the label when `protected`.
#[derive(Debug, Clone)]
pub struct ServiceObject {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<SocketAddr>,
    pub target_port: u16,
    pub protected: bool,
    pub labels: Map<String, Value>,
    pub annotations: Map<String, Value>,
}

impl ServiceObject {
    pub fn new(namespace: &str, name: &str, vips: &[SocketAddr], target_port: u16) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            vips: vips.to_vec(),
            target_port,
            protected: false,
            labels: Map::new(),
            annotations: Map::new(),
        }
    }

    /// With or without `nodegate.io/protected: "true"`.
    #[must_use]
    pub fn protected(mut self, protected: bool) -> Self {
        self.protected = protected;
        self
    }

    /// `nodegate.io/policy` (JSON is YAML).
    #[must_use]
    pub fn policy(self, policy: &Value) -> Self {
        self.annotation(POLICY_ANNOTATION, &policy.to_string())
    }

    #[must_use]
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.into());
        self
    }

    #[must_use]
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.into());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut labels = self.labels.clone();
        labels.insert("app".to_owned(), self.name.clone().into());
        if self.protected {
            labels.insert(PROTECTED_LABEL.to_owned(), "true".into());
        }
        let mut ips: Vec<IpAddr> = Vec::new();
        let mut ports: Vec<u16> = Vec::new();
        for vip in &self.vips {
            if !ips.contains(&vip.ip()) {
                ips.push(vip.ip());
            }
            if !ports.contains(&vip.port()) {
                ports.push(vip.port());
            }
        }
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        let families: Vec<&str> = self
            .vips
            .iter()
            .map(|v| if v.is_ipv4() { "IPv4" } else { "IPv6" })
            .fold(Vec::new(), |mut f, x| {
                if !f.contains(&x) {
                    f.push(x);
                }
                f
            });
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": labels,
                         "annotations": self.annotations},
            "spec": {"type": "ClusterIP", "clusterIP": ips.first(), "clusterIPs": ips,
                     "ipFamilies": families,
                     "ports": ports.iter().map(|p| json!({"name": format!("p{p}"), "port": p,
                         "targetPort": self.target_port, "protocol": "TCP"})).collect::<Vec<_>>(),
                     "selector": {"app": self.name}},
        })
    }
}

/// One endpoint of an `EndpointSlice`: a pod of a node.
#[derive(Debug, Clone)]
pub struct Endpoint<'a> {
    pub node: &'a Node,
    pub pod: &'a str,
    pub ready: bool,
}

impl<'a> Endpoint<'a> {
    pub fn ready(node: &'a Node, pod: &'a str) -> Self {
        Self {
            node,
            pod,
            ready: true,
        }
    }

    pub fn not_ready(node: &'a Node, pod: &'a str) -> Self {
        Self {
            node,
            pod,
            ready: false,
        }
    }
}

/// The `EndpointSlice`s of Service `namespace/service` as the controller writes them: one per
/// address family (`<service>-v4`, `<service>-v6`), labelled `kubernetes.io/service-name`,
/// each endpoint with its pod's address, readiness, `nodeName` and `targetRef`, port `port`.
pub fn endpoint_slices(
    namespace: &str,
    service: &str,
    port: u16,
    endpoints: &[Endpoint<'_>],
) -> Result<[Value; 2]> {
    let slice = |family: &str, suffix: &str| -> Result<Value> {
        let eps = endpoints
            .iter()
            .map(|e| {
                let place = e.node.get(e.pod)?;
                let ip = if family == "IPv4" {
                    place.ipv4.to_string()
                } else {
                    place.ipv6.to_string()
                };
                Ok(json!({
                    "addresses": [ip],
                    "conditions": {"ready": e.ready, "serving": e.ready, "terminating": false},
                    "nodeName": e.node.node_name(),
                    "targetRef": {"kind": "Pod", "namespace": namespace, "name": e.pod,
                                  "uid": e.node.pod_uid(e.pod)},
                }))
            })
            .collect::<Result<Vec<Value>>>()?;
        Ok(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-{suffix}"), "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
            "addressType": family,
            "endpoints": eps,
            "ports": [{"name": format!("p{port}"), "port": port, "protocol": "TCP"}],
        }))
    };
    Ok([slice("IPv4", "v4")?, slice("IPv6", "v6")?])
}

/// An `AccessPolicy` targeting Service `service` of `namespace` with `policy` (the static
/// config's policy format), written as given (so a test can write an invalid one).
pub fn access_policy_object(namespace: &str, name: &str, service: &str, policy: &Value) -> Value {
    json!({
        "apiVersion": "nodegate.io/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"target": {"service": service}, "policy": policy},
    })
}

/// The `Accepted` condition of an `AccessPolicy` as the gateway wrote it, if it did.
pub fn accepted_condition(policy: &Value) -> Option<&Value> {
    policy["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
}
