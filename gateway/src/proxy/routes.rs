//! The proxy's view of the config: original destination → service and target. Built once per
//! config and swapped whole on reload ([`SharedRoutes`]); a connection keeps the snapshot it
//! started with.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;

use crate::{
    config::{Config, HttpService, L4Rule, StaticWorkload},
    ebpf::Mode,
    policy,
};

/// The live service table, shared by the proxy, the bypass log and the reloader.
pub type SharedRoutes = Arc<ArcSwap<Routes>>;

#[derive(Debug)]
pub struct Routes {
    /// Looked up on every request: `foldhash`, not std's `SipHash-1-3`.
    dests: HashMap<SocketAddr, Route, foldhash::quality::RandomState>,
    services: HashMap<u32, Arc<ServiceRoute>>,
    /// Services that terminate TLS, in config order (SNI selection).
    tls_services: Vec<Arc<ServiceRoute>>,
    pub connect_timeout: Duration,
    pub workloads: Workloads,
}

/// Static workloads by cgroup id and source address (config source).
#[derive(Debug, Default)]
pub struct Workloads {
    entries: Vec<WorkloadEntry>,
    by_cgroup: HashMap<u64, usize>,
}

#[derive(Debug)]
pub struct WorkloadEntry {
    pub config: StaticWorkload,
    /// The form policy matches on, built once.
    pub policy: policy::Workload,
}

impl WorkloadEntry {
    /// How the decision and bypass lines name it; `from` says how it was found.
    pub fn log(&self, from: &'static str) -> crate::telemetry::decision::WorkloadLog {
        crate::telemetry::decision::WorkloadLog {
            namespace: self.config.namespace.clone(),
            service_account: self.config.service_account.clone(),
            pod: self.config.pod.clone(),
            from,
        }
    }
}

impl Workloads {
    pub fn new(list: &[StaticWorkload]) -> Self {
        let mut by_cgroup = HashMap::new();
        let entries = list
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if let Some(id) = w.cgroup_id {
                    by_cgroup.insert(id, i);
                }
                WorkloadEntry {
                    config: w.clone(),
                    policy: policy::Workload {
                        namespace: w.namespace.clone(),
                        service_account: w.service_account.clone(),
                        labels: w.labels.clone(),
                    },
                }
            })
            .collect();
        Self { entries, by_cgroup }
    }

    /// A workload of that namespace and service account (the first one known: pods of one
    /// account usually share their labels).
    pub fn by_account(&self, namespace: &str, service_account: &str) -> Option<&WorkloadEntry> {
        self.entries.iter().find(|e| {
            e.policy.namespace == namespace && e.policy.service_account == service_account
        })
    }

    /// The workload of a connection: by the cgroup the kernel saw the `connect()` in (exact),
    /// else by the source address (a pod IP, or a host-network process's node address).
    pub fn lookup(&self, cgroup_id: Option<u64>, src: IpAddr) -> Option<&WorkloadEntry> {
        if let Some(&i) = cgroup_id.and_then(|id| self.by_cgroup.get(&id)) {
            return self.entries.get(i);
        }
        let src = src.to_canonical();
        self.entries
            .iter()
            .find(|e| e.config.addresses.iter().any(|n| n.contains(&src)))
    }
}

#[derive(Debug)]
pub struct ServiceRoute {
    pub id: u32,
    /// Shared with every decision line of the service (no copy a request).
    pub name: Arc<str>,
    pub mode: Mode,
    pub endpoints: Vec<SocketAddr>,
    pub rule: L4Rule,
    /// Set for HTTP services: per-request policy.
    pub http: Option<HttpService>,
    /// Round-robin position over `endpoints` for connections to a VIP.
    next: AtomicUsize,
}

/// What the client dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A service VIP: any endpoint will do, those of the VIP's own family first (Kubernetes
    /// keeps endpoints per family; the other family is only a fallback for single-stack
    /// backends behind a dual-stack static config).
    Vip { v6: bool },
    /// A backend endpoint dialed directly: exactly that one.
    Endpoint(SocketAddr),
}

#[derive(Debug, Clone)]
pub struct Route {
    pub service: Arc<ServiceRoute>,
    pub target: Target,
}

impl Routes {
    pub fn new(config: &Config) -> Self {
        let mut dests = HashMap::default();
        let mut services = HashMap::new();
        let mut tls_services = Vec::new();
        for s in &config.services {
            let service = Arc::new(ServiceRoute {
                id: s.id,
                name: s.name.as_str().into(),
                mode: s.mode,
                endpoints: s.endpoints.clone(),
                rule: s.rule.clone(),
                http: s.http.clone(),
                next: AtomicUsize::new(0),
            });
            for vip in &s.vips {
                dests.insert(
                    *vip,
                    Route {
                        service: service.clone(),
                        target: Target::Vip {
                            v6: vip.ip().to_canonical().is_ipv6(),
                        },
                    },
                );
            }
            for ep in &s.endpoints {
                dests.insert(
                    *ep,
                    Route {
                        service: service.clone(),
                        target: Target::Endpoint(*ep),
                    },
                );
            }
            if s.http.as_ref().is_some_and(|h| h.tls.is_some()) {
                tls_services.push(service.clone());
            }
            services.insert(s.id, service);
        }
        Self {
            dests,
            services,
            tls_services,
            connect_timeout: config.proxy.connect_timeout,
            workloads: Workloads::new(&config.workloads),
        }
    }

    pub fn shared(config: &Config) -> SharedRoutes {
        Arc::new(ArcSwap::from_pointee(Self::new(config)))
    }

    /// The route of an original destination (IPv4-mapped IPv6 is looked up as IPv4).
    pub fn resolve(&self, dst: SocketAddr) -> Option<&Route> {
        self.dests
            .get(&SocketAddr::new(dst.ip().to_canonical(), dst.port()))
    }

    pub fn service(&self, id: u32) -> Option<&ServiceRoute> {
        self.services.get(&id).map(AsRef::as_ref)
    }

    /// A service reached through another service's address (chosen by TLS SNI): any of its
    /// endpoints, those of the dialed family first.
    pub fn service_route(&self, id: u32, v6: bool) -> Option<Route> {
        self.services.get(&id).map(|service| Route {
            service: service.clone(),
            target: Target::Vip { v6 },
        })
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceRoute>> {
        self.services.values()
    }

    /// Services that terminate TLS, in config order.
    pub fn tls_services(&self) -> &[Arc<ServiceRoute>] {
        &self.tls_services
    }

    /// The TLS service that answers to `sni` (lower case): an exact name first, then a
    /// wildcard; the first in config order among equals.
    pub fn by_sni(&self, sni: &str) -> Option<&Arc<ServiceRoute>> {
        let tls = |s: &&Arc<ServiceRoute>| s.http.as_ref().and_then(|h| h.tls.clone());
        self.tls_services
            .iter()
            .find(|s| tls(s).is_some_and(|t| t.serves_name(sni, true)))
            .or_else(|| {
                self.tls_services
                    .iter()
                    .find(|s| tls(s).is_some_and(|t| t.serves_name(sni, false)))
            })
    }
}

impl Route {
    /// Upstream addresses to try, in order: for a VIP every endpoint, those of the VIP's
    /// family first, each group starting at the next round-robin position; for an endpoint,
    /// that endpoint.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        match self.target {
            Target::Endpoint(ep) => vec![ep],
            Target::Vip { v6 } => {
                let eps = &self.service.endpoints;
                if eps.is_empty() {
                    return Vec::new();
                }
                let start = self.service.next.fetch_add(1, Ordering::Relaxed);
                // Filled in place (one allocation per request): this family's group, then the
                // other's, each rotated to the round-robin position.
                let mut out = Vec::with_capacity(eps.len());
                for same in [true, false] {
                    let group = eps
                        .iter()
                        .filter(|ep| (ep.ip().to_canonical().is_ipv6() == v6) == same);
                    let len = group.clone().count();
                    if len == 0 {
                        continue;
                    }
                    let at = start % len;
                    out.extend(group.clone().skip(at).chain(group.take(at)).copied());
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Origin;

    fn routes() -> Routes {
        let config = Config::parse(
            r#"
node: n
cgroup: /sys/fs/cgroup/t
proxy: { listen: "10.0.0.1:15001", listen_v6: "[fd00::1]:15001" }
gateways: [10.0.0.1]
services:
  - name: web
    vips: ["10.96.0.1:80", "[fd96::1]:80"]
    endpoints: ["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]
"#,
            Origin::Embedded,
        )
        .unwrap();
        Routes::new(&config)
    }

    #[test]
    fn vip_round_robins_over_all_endpoints() {
        let r = routes();
        let route = r.resolve("10.96.0.1:80".parse().unwrap()).unwrap();
        let firsts: Vec<SocketAddr> = (0..4).map(|_| route.candidates()[0]).collect();
        assert_eq!(
            firsts,
            [
                "10.1.0.1:8080",
                "10.1.0.2:8080",
                "10.1.0.3:8080",
                "10.1.0.1:8080"
            ]
            .map(|s| s.parse::<SocketAddr>().unwrap())
        );
        assert_eq!(route.candidates().len(), 3);
    }

    #[test]
    fn vip_prefers_endpoints_of_its_own_family() {
        let config = Config::parse(
            r#"
node: n
cgroup: /sys/fs/cgroup/t
proxy: { listen: "10.0.0.1:15001", listen_v6: "[fd00::1]:15001" }
gateways: [10.0.0.1]
services:
  - name: web
    vips: ["10.96.0.1:80", "[fd96::1]:80"]
    endpoints: ["10.1.0.1:8080", "[fd01::1]:8080", "10.1.0.2:8080", "[fd01::2]:8080"]
  - name: v4only
    vips: ["[fd96::2]:80"]
    endpoints: ["10.1.0.9:8080"]
"#,
            Origin::Embedded,
        )
        .unwrap();
        let r = Routes::new(&config);
        let v4 = r.resolve("10.96.0.1:80".parse().unwrap()).unwrap();
        let v6 = r.resolve("[fd96::1]:80".parse().unwrap()).unwrap();
        for _ in 0..4 {
            let c = v4.candidates();
            assert_eq!(c.len(), 4);
            assert!(c[..2].iter().all(SocketAddr::is_ipv4), "{c:?}");
            let c = v6.candidates();
            assert!(c[..2].iter().all(SocketAddr::is_ipv6), "{c:?}");
        }
        // No endpoint of the VIP's family: the other family is the fallback.
        let only = r.resolve("[fd96::2]:80".parse().unwrap()).unwrap();
        assert_eq!(
            only.candidates(),
            ["10.1.0.9:8080".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn endpoint_is_exact_and_mapped_addresses_resolve() {
        let r = routes();
        let route = r
            .resolve("[::ffff:10.1.0.2]:8080".parse().unwrap())
            .unwrap();
        assert_eq!(
            route.target,
            Target::Endpoint("10.1.0.2:8080".parse().unwrap())
        );
        assert_eq!(
            route.candidates(),
            ["10.1.0.2:8080".parse::<SocketAddr>().unwrap()]
        );
        assert!(r.resolve("[fd96::1]:80".parse().unwrap()).is_some());
        assert!(r.resolve("10.96.0.1:81".parse().unwrap()).is_none());
        assert_eq!(&*r.service(route.service.id).unwrap().name, "web");
    }
}
