//! The proxy's view of the config: original destination → service and target. Built once per
//! config and swapped whole on reload ([`SharedRoutes`]); a connection keeps the snapshot it
//! started with.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;

use crate::{
    config::{Config, L4Rule},
    ebpf::Mode,
};

/// The live service table, shared by the proxy, the bypass log and the reloader.
pub type SharedRoutes = Arc<ArcSwap<Routes>>;

#[derive(Debug)]
pub struct Routes {
    dests: HashMap<SocketAddr, Route>,
    services: HashMap<u32, Arc<ServiceRoute>>,
    pub connect_timeout: Duration,
}

#[derive(Debug)]
pub struct ServiceRoute {
    pub id: u32,
    pub name: String,
    pub mode: Mode,
    pub endpoints: Vec<SocketAddr>,
    pub rule: L4Rule,
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
        let mut dests = HashMap::new();
        let mut services = HashMap::new();
        for s in &config.services {
            let service = Arc::new(ServiceRoute {
                id: s.id,
                name: s.name.clone(),
                mode: s.mode,
                endpoints: s.endpoints.clone(),
                rule: s.rule.clone(),
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
            services.insert(s.id, service);
        }
        Self {
            dests,
            services,
            connect_timeout: config.proxy.connect_timeout,
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
                let (same, other): (Vec<SocketAddr>, Vec<SocketAddr>) = eps
                    .iter()
                    .partition(|ep| ep.ip().to_canonical().is_ipv6() == v6);
                let rotate = |group: &[SocketAddr]| -> Vec<SocketAddr> {
                    if group.is_empty() {
                        return Vec::new();
                    }
                    let at = start % group.len();
                    group[at..].iter().chain(&group[..at]).copied().collect()
                };
                let mut out = rotate(&same);
                out.extend(rotate(&other));
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
        assert_eq!(r.service(route.service.id).unwrap().name, "web");
    }
}
