//! A [`Snapshot`] of the Kubernetes source → what the gateway enforces: the static config with
//! the protected Services and the local pods' identities merged in. Pure, apart from reading
//! pods' cgroup directories (their inode numbers are the cgroup ids the kernel reports).
//!
//! - Each protected Service becomes a config service named [`ProtectedService::kernel_name`]
//!   (`namespace/name`), id [`service_id`] of that name. The proxy gets its *ready* endpoints;
//!   the kernel guards ready and not-ready ones ([`Merged::desired`]): a pod that is starting
//!   or draining is as reachable around the gateway as a ready one.
//! - A valid policy makes it an HTTP service: any Host, no identity headers, no browser login,
//!   no TLS termination, unless the config's `kubernetes.services` entry of that name says
//!   otherwise ([`crate::config::KubeServiceSettings`]); [`PolicyBinding::DenyAll`] makes it an
//!   L4 service whose rule allows no source.
//! - A static service keeps its place: a Kubernetes service whose id or destinations clash with
//!   it is left out, with a warning (the static config is the operator's explicit word).
//! - Gateways: the static list ∪ the peers of the snapshot ∪ this gateway's proxy address.
//! - Workloads: the static ones first, then one entry per cgroup id of each local pod (the pod
//!   cgroup and its containers'), then each pod by address (never host-network pods, which
//!   share the node's address).

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
};

use ipnet::IpNet;

use super::{
    model::{ObjectKey, PolicyBinding, ProtectedService, Snapshot},
    pods,
};
use crate::{
    config::{Config, HttpService, L4Rule, Service, ServicePolicy, StaticWorkload, service_id},
    ebpf::DesiredState,
};

/// The effective config and kernel state for one snapshot.
#[derive(Debug)]
pub struct Merged {
    /// The static config plus the Kubernetes services and workloads: for the proxy's routes.
    pub config: Config,
    /// What the kernel maps should hold (not-ready endpoints included).
    pub desired: DesiredState,
    /// Kubernetes services left out or degraded, for the log.
    pub warnings: Vec<String>,
}

/// Merges `snapshot` into `base`. `cgroup_root` is the cgroup v2 directory the pods' cgroup
/// paths are relative to (the config's `cgroup`).
pub fn merge(base: &Config, snapshot: &Snapshot, cgroup_root: &Path) -> Merged {
    let mut config = base.clone();
    let mut warnings = Vec::new();
    let mut ids: HashSet<u32> = config.services.iter().map(|s| s.id).collect();
    let mut dests: HashSet<SocketAddr> = config
        .services
        .iter()
        .flat_map(|s| s.vips.iter().chain(&s.endpoints).copied())
        .collect();
    // Not-ready endpoints per service id, added to the kernel state only.
    let mut not_ready: Vec<(u32, Vec<SocketAddr>)> = Vec::new();

    for svc in snapshot.services.values() {
        let name = svc.kernel_name();
        let id = service_id(&name);
        if !ids.insert(id) {
            warnings.push(format!(
                "{}: service id {id:#010x} already taken (a static service, or a hash clash): \
                 not enforced by this gateway",
                svc.key
            ));
            continue;
        }
        let clash: Vec<String> = svc
            .vips
            .iter()
            .copied()
            .chain(svc.guarded_endpoints())
            .filter(|d| dests.contains(d))
            .map(|d| d.to_string())
            .collect();
        if !clash.is_empty() {
            warnings.push(format!(
                "{}: {} already protected by another service: not enforced by this gateway",
                svc.key,
                clash.join(", ")
            ));
            ids.remove(&id);
            continue;
        }
        dests.extend(svc.vips.iter().copied().chain(svc.guarded_endpoints()));
        let (mut http, warning) = http_of(svc);
        warnings.extend(warning);
        // By the full `namespace/name` (the kernel name of a long one is shortened).
        if let Some(settings) = base.kube_services.get(&svc.key.to_string()) {
            match http.as_mut() {
                Some(http) => settings.apply_to(http),
                None => warnings.push(format!(
                    "{}: its kubernetes.services settings are not applied: it has no valid \
                     policy ({}), so it allows nothing",
                    svc.key,
                    match &svc.policy {
                        PolicyBinding::DenyAll(reason) => reason.to_string(),
                        PolicyBinding::Policy { source, .. } => format!("{source} is invalid"),
                    }
                )),
            }
        }
        config.services.push(Service {
            id,
            name,
            mode: svc.mode,
            vips: svc.vips.clone(),
            endpoints: svc.endpoints.clone(),
            rule: L4Rule::default(),
            http,
        });
        if !svc.not_ready_endpoints.is_empty() {
            not_ready.push((id, svc.not_ready_endpoints.clone()));
        }
    }

    // A key that names no protected Service (a typo, a missing label) does nothing: say so.
    for key in base.kube_services.keys() {
        let protected = key
            .split_once('/')
            .is_some_and(|(ns, name)| snapshot.services.contains_key(&ObjectKey::new(ns, name)));
        if !protected {
            warnings.push(format!(
                "kubernetes.services[{key:?}]: no Service of that name is protected (label \
                 nodegate.io/protected=true): its settings are unused"
            ));
        }
    }

    let mut gateways: BTreeSet<IpAddr> = config.gateways.iter().copied().collect();
    gateways.extend(snapshot.gateways.iter().map(IpAddr::to_canonical));
    for addr in config.proxy.listeners() {
        if !addr.ip().is_unspecified() {
            gateways.insert(addr.ip().to_canonical());
        }
    }
    config.gateways = gateways.into_iter().collect();

    config
        .workloads
        .extend(pod_workloads(snapshot, cgroup_root, &mut warnings));

    let mut desired = config.desired_state();
    for (id, extra) in not_ready {
        if let Some(s) = desired.services.iter_mut().find(|s| s.id == id) {
            s.endpoints.extend(extra);
        }
    }
    Merged {
        config,
        desired,
        warnings,
    }
}

/// The cgroup ids of the local pods' cgroups (pod and containers), sorted: when it changes a
/// container started (or stopped) since the last merge, and the workloads must be re-read.
pub fn cgroup_fingerprint(snapshot: &Snapshot, cgroup_root: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = snapshot
        .pods
        .values()
        .filter_map(|p| p.cgroup.as_ref())
        .filter_map(|c| pods::cgroup_ids(cgroup_root, c).ok())
        .flatten()
        .collect();
    ids.sort_unstable();
    ids
}

/// The HTTP side of a protected service: its compiled policy, or none (L4, deny all).
fn http_of(svc: &ProtectedService) -> (Option<HttpService>, Option<String>) {
    let PolicyBinding::Policy { source, document } = &svc.policy else {
        return (None, None);
    };
    match ServicePolicy::from_value(document, "policy") {
        Ok(policy) => (
            Some(HttpService {
                hosts: Vec::new(),
                identity_headers: false,
                login: false,
                policy: Arc::new(policy),
                tls: None,
                upstream_tls: None,
            }),
            None,
        ),
        // The source validated it with the same parser; should it still fail, allow nothing.
        Err(e) => (
            None,
            Some(format!(
                "{}: {source} is invalid: {e}: denying all",
                svc.key
            )),
        ),
    }
}

fn pod_workloads(
    snapshot: &Snapshot,
    cgroup_root: &Path,
    warnings: &mut Vec<String>,
) -> Vec<StaticWorkload> {
    let mut by_cgroup = Vec::new();
    let mut by_address = Vec::new();
    for pod in snapshot.pods.values() {
        let identity = StaticWorkload {
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            pod: Some(pod.name.clone()),
            labels: pod.labels.clone(),
            addresses: Vec::new(),
            cgroup: pod.cgroup.as_ref().map(|c| cgroup_root.join(c)),
            cgroup_id: None,
        };
        if let Some(cgroup) = &pod.cgroup {
            match pods::cgroup_ids(cgroup_root, cgroup) {
                Ok(ids) => by_cgroup.extend(ids.into_iter().map(|id| StaticWorkload {
                    cgroup_id: Some(id),
                    ..identity.clone()
                })),
                // Not created yet (the kubelet is still starting it) or another driver: the
                // address still names it.
                Err(e) => warnings.push(format!(
                    "pod {}/{}: cgroup {}: {e}",
                    pod.namespace,
                    pod.name,
                    cgroup_root.join(cgroup).display()
                )),
            }
        }
        if !pod.host_network && !pod.ips.is_empty() {
            by_address.push(StaticWorkload {
                addresses: pod.ips.iter().map(|ip| IpNet::from(*ip)).collect(),
                ..identity
            });
        }
    }
    by_cgroup.extend(by_address);
    by_cgroup
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        config::Origin,
        ebpf::Mode,
        proxy::Routes,
        source::model::{DenyReason, LocalPod, ObjectKey, PolicySource},
    };

    fn base() -> Config {
        Config::parse(
            "node: node-a\ncgroup: /sys/fs/cgroup\nproxy: { listen: 10.0.0.1:15001 }\n\
             gateways: [10.0.0.9]\n\
             services:\n  - { name: static, vips: [\"10.96.0.1:80\"], endpoints: [\"10.1.0.1:80\"] }\n",
            Origin::Embedded,
        )
        .expect("config")
    }

    fn svc(name: &str, policy: PolicyBinding) -> ProtectedService {
        ProtectedService {
            key: ObjectKey::new("shop", name),
            mode: Mode::Enforce,
            vips: vec!["10.96.1.1:80".parse().unwrap()],
            endpoints: vec!["10.2.0.1:8080".parse().unwrap()],
            not_ready_endpoints: vec!["10.2.0.2:8080".parse().unwrap()],
            policy,
            warnings: Vec::new(),
        }
    }

    fn allow_devs() -> PolicyBinding {
        PolicyBinding::Policy {
            source: PolicySource::AccessPolicy("web".into()),
            document: serde_yaml::from_str("allow: [{when: {groups: devs}}]").unwrap(),
        }
    }

    fn snapshot(services: Vec<ProtectedService>) -> Snapshot {
        Snapshot {
            services: services.into_iter().map(|s| (s.key.clone(), s)).collect(),
            pods: BTreeMap::new(),
            gateways: vec!["10.0.0.2".parse().unwrap()],
        }
    }

    #[test]
    fn services_gateways_and_not_ready_endpoints() {
        let snap = snapshot(vec![
            svc("web", allow_devs()),
            svc("db", PolicyBinding::DenyAll(DenyReason::NoPolicy)),
        ]);
        // Two services with the same destinations: the second one is left out.
        let m = merge(&base(), &snap, Path::new("/nonexistent"));
        assert_eq!(m.config.services.len(), 2, "{:?}", m.warnings);
        assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
        assert!(m.warnings[0].contains("shop/web"), "{:?}", m.warnings);
        let db = &m.config.services[1];
        assert_eq!(db.name, "shop/db");
        assert_eq!(db.id, service_id("shop/db"));
        assert!(
            db.http.is_none() && db.rule.allow_sources.is_empty(),
            "deny all"
        );
        assert_eq!(db.endpoints, vec!["10.2.0.1:8080".parse().unwrap()]);
        let kernel = m.desired.services.iter().find(|s| s.id == db.id).unwrap();
        assert_eq!(
            kernel.endpoints,
            vec![
                "10.2.0.1:8080".parse().unwrap(),
                "10.2.0.2:8080".parse().unwrap()
            ],
            "not-ready endpoints are guarded too"
        );
        let gw: Vec<String> = m.desired.gateways.iter().map(ToString::to_string).collect();
        assert_eq!(gw, ["10.0.0.1", "10.0.0.2", "10.0.0.9"]);
    }

    #[test]
    fn a_valid_policy_makes_an_http_service() {
        let m = merge(
            &base(),
            &snapshot(vec![svc("web", allow_devs())]),
            Path::new("/nonexistent"),
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let web = &m.config.services[1];
        assert_eq!(web.http.as_ref().unwrap().policy.allow_rules, 1);
        // The routes accept it (ids and destinations unique).
        let routes = Routes::new(&m.config);
        assert!(routes.service(web.id).is_some());
    }

    #[test]
    fn kubernetes_services_settings_apply_to_http_services_only() {
        let base = Config::parse(
            "node: node-a\ncgroup: /sys/fs/cgroup\nproxy: { listen: 10.0.0.1:15001 }\n\
             gateways: [10.0.0.9]\n\
             kubernetes:\n  services:\n\
             \x20   shop/web: { http: { hosts: [Web.Shop.Test, \"*.web.test\"], identity_headers: true } }\n\
             \x20   shop/db: { http: { hosts: [db.shop.test] } }\n\
             \x20   shop/typo: { http: { hosts: [typo.shop.test] } }\n\
             \x20   a-namespace-with-a-rather-long-name/and-a-service-with-a-long-name-too: { http: { hosts: [long.shop.test] } }\n",
            Origin::Embedded,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut db = svc("db", PolicyBinding::DenyAll(DenyReason::NoPolicy));
        db.vips = vec!["10.96.1.2:80".parse().unwrap()];
        db.endpoints = vec!["10.2.0.3:8080".parse().unwrap()];
        db.not_ready_endpoints.clear();
        let other = ProtectedService {
            key: ObjectKey::new("shop", "other"),
            vips: vec!["10.96.1.3:80".parse().unwrap()],
            endpoints: vec!["10.2.0.4:8080".parse().unwrap()],
            not_ready_endpoints: Vec::new(),
            ..svc("other", allow_devs())
        };
        let long = ProtectedService {
            key: ObjectKey::new(
                "a-namespace-with-a-rather-long-name",
                "and-a-service-with-a-long-name-too",
            ),
            vips: vec!["10.96.1.4:80".parse().unwrap()],
            endpoints: vec!["10.2.0.5:8080".parse().unwrap()],
            not_ready_endpoints: Vec::new(),
            ..svc("long", allow_devs())
        };
        let long_name = long.kernel_name();
        assert_ne!(long_name, long.key.to_string(), "shortened for the kernel");
        let m = merge(
            &base,
            &snapshot(vec![svc("web", allow_devs()), db, other, long]),
            Path::new("/nonexistent"),
        );
        let by_name = |n: &str| m.config.services.iter().find(|s| s.name == n).unwrap();
        let web = by_name("shop/web").http.as_ref().expect("http");
        assert_eq!(web.hosts, ["web.shop.test", "*.web.test"]);
        assert!(web.identity_headers && !web.login);
        assert!(web.serves_host(Some("WEB.shop.test:80")));
        assert!(!web.serves_host(Some("other.shop.test")));
        // Without an entry: any Host, no identity headers.
        let other = by_name("shop/other").http.as_ref().expect("http");
        assert!(other.hosts.is_empty() && !other.identity_headers);
        // A long name is found by its full name.
        let long = by_name(&long_name).http.as_ref().expect("http");
        assert_eq!(long.hosts, ["long.shop.test"]);
        // Deny-all stays deny-all, and the log says why its settings do nothing; so does an
        // entry that names no protected Service.
        assert!(by_name("shop/db").http.is_none());
        assert_eq!(m.warnings.len(), 2, "{:?}", m.warnings);
        assert!(
            m.warnings[0].starts_with("shop/db: its kubernetes.services settings are not applied")
                && m.warnings[0].contains("no AccessPolicy"),
            "{:?}",
            m.warnings
        );
        assert!(
            m.warnings[1]
                .starts_with("kubernetes.services[\"shop/typo\"]: no Service of that name"),
            "{:?}",
            m.warnings
        );
        assert!(
            Routes::new(&m.config)
                .service(service_id("shop/web"))
                .is_some()
        );
    }

    #[test]
    fn a_static_service_wins_a_clash() {
        let mut clash = svc("web", allow_devs());
        clash.vips = vec!["10.96.0.1:80".parse().unwrap()];
        let m = merge(&base(), &snapshot(vec![clash]), Path::new("/nonexistent"));
        assert_eq!(m.config.services.len(), 1);
        assert_eq!(m.config.services[0].name, "static");
        assert!(m.warnings[0].contains("10.96.0.1:80"), "{:?}", m.warnings);
    }

    #[test]
    fn pods_by_cgroup_id_then_address() {
        let root = std::env::temp_dir().join(format!("ng-apply-{}", std::process::id()));
        let pod_dir = root.join("kubepods/pod1");
        std::fs::create_dir_all(pod_dir.join("ctr-a")).unwrap();
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let pod = |uid: &str, ip: &str, host_network: bool, cgroup: Option<&str>| LocalPod {
            uid: uid.into(),
            namespace: "ci".into(),
            name: format!("pod-{uid}"),
            service_account: "builder".into(),
            labels: BTreeMap::from([("app".into(), "build".into())]),
            ips: vec![ip.parse().unwrap()],
            host_network,
            cgroup: cgroup.map(Into::into),
        };
        let mut snap = snapshot(Vec::new());
        for p in [
            pod("1", "10.3.0.5", false, Some("kubepods/pod1")),
            pod("2", "10.0.0.1", true, None),
            pod("3", "10.3.0.6", false, Some("kubepods/missing")),
        ] {
            snap.pods.insert(p.uid.clone(), p);
        }
        let m = merge(&base(), &snap, &root);
        let routes = Routes::new(&m.config);
        for dir in [pod_dir.clone(), pod_dir.join("ctr-a")] {
            let w = routes
                .workloads
                .lookup(Some(ino(&dir)), "192.0.2.1".parse().unwrap())
                .expect("by cgroup id");
            assert_eq!(w.config.pod.as_deref(), Some("pod-1"));
            assert_eq!(w.policy.namespace, "ci");
        }
        let by_ip = routes.workloads.lookup(None, "10.3.0.6".parse().unwrap());
        assert_eq!(by_ip.unwrap().config.pod.as_deref(), Some("pod-3"));
        assert!(
            routes
                .workloads
                .lookup(None, "10.0.0.1".parse().unwrap())
                .is_none(),
            "a host-network pod is never named by the node's address"
        );
        assert_eq!(m.warnings.len(), 1, "the missing cgroup: {:?}", m.warnings);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
