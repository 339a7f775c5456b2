//! Map names, the conversions between `std::net` types and the kernel's key forms, and the
//! reconcile logic of [`Datapath::sync`](super::Datapath::sync).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap};
use gateway_common::{
    ACTION_DROPPED, ACTION_PASSED, Addr, BypassCount, BypassKey, DEST_KIND_ENDPOINT, DEST_KIND_VIP,
    DestKey, DestValue, MODE_AUDIT, MODE_ENFORCE, ProxyConfig, REASON_NO_PROXY,
    REASON_NOT_FROM_GATEWAY, SERVICE_NAME_LEN, STAT_BYPASS_UNCOUNTED, STAT_CONNECT_CALLS,
    STAT_CONNECT_REDIRECTS, STAT_CONNECT_REFUSED, STAT_INGRESS_DROPS, STAT_INGRESS_PACKETS,
    STAT_RINGBUF_FULL, STAT_SOCKOPS_MISSED, STAT_SOCKOPS_RECORDED, ServiceMeta,
};

use super::{DesiredState, EbpfError, Mode, SyncReport};

pub const NG_DESTS: &str = "NG_DESTS";
pub const NG_PROXY: &str = "NG_PROXY";
pub const NG_GATEWAYS: &str = "NG_GATEWAYS";
pub const NG_SERVICE_META: &str = "NG_SERVICE_META";
pub const NG_PENDING: &str = "NG_PENDING";
pub const NG_ORIG: &str = "NG_ORIG";
pub const NG_BYPASS: &str = "NG_BYPASS";
pub const NG_EVENTS: &str = "NG_EVENTS";
pub const NG_STATS: &str = "NG_STATS";

/// Every map of the object (all pinned by name under the pin directory).
pub const ALL_MAPS: [&str; 9] = [
    NG_DESTS,
    NG_PROXY,
    NG_GATEWAYS,
    NG_SERVICE_META,
    NG_PENDING,
    NG_ORIG,
    NG_BYPASS,
    NG_EVENTS,
    NG_STATS,
];

/// `STAT_*` index → stable name.
pub const STAT_NAMES: [(u32, &str); 9] = [
    (STAT_CONNECT_CALLS, "connect_calls"),
    (STAT_CONNECT_REDIRECTS, "connect_redirects"),
    (STAT_CONNECT_REFUSED, "connect_refused"),
    (STAT_SOCKOPS_RECORDED, "sockops_recorded"),
    (STAT_SOCKOPS_MISSED, "sockops_missed"),
    (STAT_INGRESS_PACKETS, "ingress_packets"),
    (STAT_INGRESS_DROPS, "ingress_drops"),
    (STAT_RINGBUF_FULL, "ringbuf_full"),
    (STAT_BYPASS_UNCOUNTED, "bypass_uncounted"),
];

/// `REASON_*` → stable string.
pub fn reason_str(code: u16) -> &'static str {
    match code {
        REASON_NOT_FROM_GATEWAY => "not_from_gateway",
        REASON_NO_PROXY => "no_proxy",
        _ => "unknown",
    }
}

/// `ACTION_*` → stable string.
pub fn action_str(code: u8) -> &'static str {
    match code {
        ACTION_DROPPED => "dropped",
        ACTION_PASSED => "passed",
        _ => "unknown",
    }
}

/// `DEST_KIND_*` → stable string.
pub fn kind_str(code: u8) -> &'static str {
    match code {
        DEST_KIND_VIP => "vip",
        DEST_KIND_ENDPOINT => "endpoint",
        _ => "unknown",
    }
}

pub fn mode_code(mode: Mode) -> u8 {
    match mode {
        Mode::Enforce => MODE_ENFORCE,
        Mode::Audit => MODE_AUDIT,
    }
}

/// The kernel enforces anything that is not explicitly audit; so does this view.
pub fn mode_from_code(code: u8) -> Mode {
    if code == MODE_AUDIT {
        Mode::Audit
    } else {
        Mode::Enforce
    }
}

/// An IP address in the kernel's 16-byte form (IPv4 mapped). A v4-mapped `Ipv6Addr` gives
/// the same key as the IPv4 address: there is one form per address.
pub fn addr_from_ip(ip: IpAddr) -> Addr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Addr::from_v4_raw(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => addr_from_octets(v6.octets()),
    }
}

fn addr_from_octets(o: [u8; 16]) -> Addr {
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    Addr {
        words: [w(0), w(4), w(8), w(12)],
    }
}

fn addr_octets(a: &Addr) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (chunk, w) in o.as_chunks_mut::<4>().0.iter_mut().zip(a.words) {
        *chunk = w.to_ne_bytes();
    }
    o
}

/// The kernel form back to an address: mapped → `V4`, otherwise `V6`.
pub fn ip_from_addr(a: &Addr) -> IpAddr {
    if a.is_v4() {
        IpAddr::V4(Ipv4Addr::from(a.words[3].to_ne_bytes()))
    } else {
        IpAddr::V6(Ipv6Addr::from(addr_octets(a)))
    }
}

pub fn socket_from_addr(a: &Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip_from_addr(a), port)
}

pub fn dest_key(sa: SocketAddr) -> DestKey {
    DestKey {
        addr: addr_from_ip(sa.ip()),
        port: sa.port(),
        _pad: 0,
    }
}

/// `ServiceMeta` for a name: truncated to `SERVICE_NAME_LEN` bytes on a character boundary.
pub fn service_meta(name: &str, mode: Mode, removed: bool) -> ServiceMeta {
    let mut end = name.len().min(SERVICE_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut buf = [0u8; SERVICE_NAME_LEN];
    buf[..end].copy_from_slice(&name.as_bytes()[..end]);
    ServiceMeta {
        name: buf,
        mode: mode_code(mode),
        removed: u8::from(removed),
        _pad: [0; 6],
    }
}

/// The name stored in a `ServiceMeta` (NUL padded; invalid UTF-8 replaced).
pub fn service_name(meta: &ServiceMeta) -> String {
    let len = meta
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(SERVICE_NAME_LEN);
    String::from_utf8_lossy(&meta.name[..len]).into_owned()
}

/// `ProxyConfig` for the desired proxy addresses (a missing family has port 0).
pub fn proxy_config(desired: &DesiredState) -> ProxyConfig {
    let (v4_addr, v4_port) = desired
        .proxy_v4
        .map_or((0, 0), |p| (u32::from_ne_bytes(p.ip().octets()), p.port()));
    let (v6_addr, v6_port) = desired.proxy_v6.map_or((Addr::default(), 0), |p| {
        (addr_from_ip(IpAddr::V6(*p.ip())), p.port())
    });
    ProxyConfig {
        v4_addr,
        v4_port,
        v6_port,
        v6_addr,
        mark: desired.mark,
        ready: 1,
    }
}

/// Proxy addresses back from a `ProxyConfig` (port 0 = none).
pub fn proxy_addrs(cfg: &ProxyConfig) -> (Option<SocketAddrV4>, Option<SocketAddrV6>) {
    let v4 = (cfg.v4_port != 0)
        .then(|| SocketAddrV4::new(Ipv4Addr::from(cfg.v4_addr.to_ne_bytes()), cfg.v4_port));
    let v6 = (cfg.v6_port != 0)
        .then(|| SocketAddrV6::new(Ipv6Addr::from(addr_octets(&cfg.v6_addr)), cfg.v6_port, 0, 0));
    (v4, v6)
}

/// The map contents `desired` stands for, validated.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    pub proxy: ProxyConfig,
    pub gateways: BTreeSet<Addr>,
    pub services: BTreeMap<u32, ServiceMeta>,
    pub dests: Vec<(DestKey, DestValue)>,
}

impl Plan {
    pub fn new(desired: &DesiredState) -> Result<Self, EbpfError> {
        let gateways = desired
            .gateways
            .iter()
            .map(|ip| addr_from_ip(*ip))
            .collect();
        let mut services = BTreeMap::new();
        let mut dests: BTreeMap<DestKeyOrd, (DestValue, &str)> = BTreeMap::new();
        for svc in &desired.services {
            if svc.id == 0 {
                return Err(EbpfError::InvalidState(format!(
                    "service {:?} has id 0 (ids are never 0)",
                    svc.name
                )));
            }
            if let Some(prev) = services.insert(svc.id, service_meta(&svc.name, svc.mode, false)) {
                return Err(EbpfError::InvalidState(format!(
                    "services {:?} and {:?} share the id {} (rename one of them)",
                    service_name(&prev),
                    svc.name,
                    svc.id
                )));
            }
            let mode = mode_code(svc.mode);
            let entries = svc
                .vips
                .iter()
                .map(|a| (a, DEST_KIND_VIP))
                .chain(svc.endpoints.iter().map(|a| (a, DEST_KIND_ENDPOINT)));
            for (addr, kind) in entries {
                let key = DestKeyOrd(dest_key(*addr));
                let value = DestValue {
                    service_id: svc.id,
                    kind,
                    mode,
                    _pad: 0,
                };
                if let Some((prev, prev_name)) = dests.insert(key, (value, &svc.name))
                    && prev != value
                {
                    return Err(EbpfError::InvalidState(format!(
                        "{} is listed by service {prev_name:?} as {} and by {:?} as {}",
                        addr.to_canonical_socket(),
                        kind_str(prev.kind),
                        svc.name,
                        kind_str(kind),
                    )));
                }
            }
        }
        Ok(Self {
            proxy: proxy_config(desired),
            gateways,
            services,
            dests: dests.into_iter().map(|(k, (v, _))| (k.0, v)).collect(),
        })
    }
}

/// `DestKey` ordered by (address, port), for deterministic plans.
#[derive(Debug, PartialEq, Eq)]
struct DestKeyOrd(DestKey);

impl PartialOrd for DestKeyOrd {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for DestKeyOrd {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0.addr, self.0.port).cmp(&(other.0.addr, other.0.port))
    }
}

trait CanonicalSocket {
    fn to_canonical_socket(&self) -> SocketAddr;
}

impl CanonicalSocket for SocketAddr {
    fn to_canonical_socket(&self) -> SocketAddr {
        SocketAddr::new(self.ip().to_canonical(), self.port())
    }
}

/// The maps `sync` writes.
pub struct WritableMaps {
    pub proxy: Array<MapData, ProxyConfig>,
    pub gateways: HashMap<MapData, Addr, u32>,
    pub meta: HashMap<MapData, u32, ServiceMeta>,
    pub dests: HashMap<MapData, DestKey, DestValue>,
    /// Read only: which services' counters still need their name.
    pub bypass: PerCpuHashMap<MapData, BypassKey, BypassCount>,
    /// When removed services' names were last pruned from `meta`.
    pub pruned_at: Option<Instant>,
}

/// Removed services' names are pruned at most this often: it reads every key of
/// `NG_BYPASS` (up to 65,536 system calls under a flood).
pub const META_PRUNE_EVERY: Duration = Duration::from_secs(60);

fn map_err(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map {
        context: format!("{op} {map}"),
        source: Box::new(source),
    }
}

impl WritableMaps {
    /// Makes the maps equal the plan. Order keeps the data path fail-closed and consistent:
    /// proxy first (so a new destination always finds its proxy), then gateways and service
    /// names, then destinations; removals last.
    pub fn apply(&mut self, plan: &Plan) -> Result<SyncReport, EbpfError> {
        let mut report = SyncReport::default();
        self.proxy
            .set(0, &plan.proxy, 0)
            .map_err(map_err("write", NG_PROXY))?;

        let old_gateways: BTreeSet<Addr> = self
            .gateways
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err("read", NG_GATEWAYS))?;
        for gw in plan.gateways.difference(&old_gateways) {
            self.gateways
                .insert(gw, &1, 0)
                .map_err(map_err("write", NG_GATEWAYS))?;
            report.gateways_added += 1;
        }

        let old_meta: BTreeMap<u32, ServiceMeta> = self
            .meta
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read", NG_SERVICE_META))?;
        for (id, meta) in &plan.services {
            if old_meta.get(id) != Some(meta) {
                self.meta
                    .insert(id, meta, 0)
                    .map_err(map_err("write", NG_SERVICE_META))?;
            }
        }
        // Services gone from the config keep their name while counters of theirs exist (they
        // stay nameable); pruned below once none do.
        for (id, meta) in &old_meta {
            if !plan.services.contains_key(id) && meta.removed == 0 {
                let removed = ServiceMeta {
                    removed: 1,
                    ..*meta
                };
                self.meta
                    .insert(id, &removed, 0)
                    .map_err(map_err("write", NG_SERVICE_META))?;
            }
        }

        let old_dests: std::collections::HashMap<DestKey, DestValue> = self
            .dests
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err("read", NG_DESTS))?;
        for (key, value) in &plan.dests {
            match old_dests.get(key) {
                Some(old) if old == value => {}
                Some(_) => self
                    .dests
                    .insert(key, value, 0)
                    .map_err(map_err("write", NG_DESTS))?,
                None => {
                    self.dests
                        .insert(key, value, 0)
                        .map_err(map_err("write", NG_DESTS))?;
                    report.dests_added += 1;
                }
            }
        }
        let wanted: std::collections::HashSet<&DestKey> =
            plan.dests.iter().map(|(k, _)| k).collect();
        for key in old_dests.keys().filter(|k| !wanted.contains(k)) {
            remove_if_present(self.dests.remove(key)).map_err(map_err("remove from", NG_DESTS))?;
            report.dests_removed += 1;
        }

        for gw in old_gateways.difference(&plan.gateways) {
            remove_if_present(self.gateways.remove(gw))
                .map_err(map_err("remove from", NG_GATEWAYS))?;
            report.gateways_removed += 1;
        }
        report.names_pruned = self.prune_meta(&old_meta, plan)?;
        Ok(report)
    }

    /// Drops the names of removed services that no bypass counter refers to any more, so that
    /// services coming and going (preview environments, namespaces deleted) never fill
    /// `NG_SERVICE_META` (16,384 entries) and make the next sync fail. After the destinations
    /// were removed: no new counter of a removed service can appear (but for packets already
    /// in flight on another CPU, whose rows would then show the service id).
    fn prune_meta(
        &mut self,
        old_meta: &BTreeMap<u32, ServiceMeta>,
        plan: &Plan,
    ) -> Result<usize, EbpfError> {
        let gone = old_meta.keys().any(|id| !plan.services.contains_key(id));
        let due = self
            .pruned_at
            .is_none_or(|at| at.elapsed() >= META_PRUNE_EVERY);
        if !gone || !due {
            return Ok(0);
        }
        self.pruned_at = Some(Instant::now());
        let counted: BTreeSet<u32> = self
            .bypass
            .keys()
            .map(|k| k.map(|k| k.service_id))
            .collect::<Result<_, _>>()
            .map_err(map_err("read", NG_BYPASS))?;
        let prune = prunable(old_meta, plan, &counted);
        for id in &prune {
            remove_if_present(self.meta.remove(id))
                .map_err(map_err("remove from", NG_SERVICE_META))?;
        }
        Ok(prune.len())
    }
}

/// Services gone from the plan whose names no counter (`counted`: the service ids of the
/// `NG_BYPASS` keys) needs.
fn prunable(
    old_meta: &BTreeMap<u32, ServiceMeta>,
    plan: &Plan,
    counted: &BTreeSet<u32>,
) -> Vec<u32> {
    old_meta
        .keys()
        .filter(|id| !plan.services.contains_key(id) && !counted.contains(id))
        .copied()
        .collect()
}

/// A key that vanished meanwhile is as good as removed.
fn remove_if_present(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::DesiredService;

    #[test]
    fn v4_is_stored_mapped_in_network_order() {
        let a = addr_from_ip("10.1.2.3".parse().unwrap());
        assert!(a.is_v4());
        assert_eq!(
            addr_octets(&a),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
        assert_eq!(a.words[3], u32::from_ne_bytes([10, 1, 2, 3]));
        assert_eq!(ip_from_addr(&a), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn mapped_v6_is_the_same_key_as_v4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            addr_from_ip(mapped),
            addr_from_ip("10.1.2.3".parse().unwrap())
        );
        let sa: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        assert_eq!(dest_key(sa), dest_key("10.1.2.3:80".parse().unwrap()));
    }

    #[test]
    fn v6_round_trips() {
        for s in ["fd00::1", "::1", "2001:db8::ff00:42:8329", "::"] {
            let ip: IpAddr = s.parse().unwrap();
            let a = addr_from_ip(ip);
            assert!(!a.is_v4(), "{s}");
            assert_eq!(ip_from_addr(&a), ip);
        }
        let a = addr_from_ip("fd00::1".parse().unwrap());
        assert_eq!(addr_octets(&a)[0], 0xfd);
        assert_eq!(addr_octets(&a)[15], 1);
    }

    #[test]
    fn proxy_config_round_trips() {
        let desired = DesiredState {
            proxy_v4: Some("10.0.0.1:15001".parse().unwrap()),
            proxy_v6: None,
            mark: 0x4e47,
            gateways: vec![],
            services: vec![],
        };
        let cfg = proxy_config(&desired);
        assert_eq!(cfg.v4_addr, u32::from_ne_bytes([10, 0, 0, 1]));
        assert_eq!(
            (cfg.v4_port, cfg.v6_port, cfg.mark, cfg.ready),
            (15001, 0, 0x4e47, 1)
        );
        assert_eq!(proxy_addrs(&cfg), (desired.proxy_v4, None));
    }

    #[test]
    fn service_names_truncate_on_char_boundary() {
        let long = "é".repeat(40); // 80 bytes
        let meta = service_meta(&long, Mode::Audit, true);
        assert_eq!(service_name(&meta), "é".repeat(32));
        assert_eq!((meta.mode, meta.removed), (MODE_AUDIT, 1));
        assert_eq!(
            service_name(&service_meta("grafana", Mode::Enforce, false)),
            "grafana"
        );
    }

    #[test]
    fn removed_names_are_pruned_once_no_counter_needs_them() {
        let plan = Plan::new(&DesiredState {
            proxy_v4: None,
            proxy_v6: None,
            mark: 1,
            gateways: vec![],
            services: vec![DesiredService {
                id: 1,
                name: "kept".into(),
                mode: Mode::Enforce,
                vips: vec![],
                endpoints: vec![],
            }],
        })
        .unwrap();
        let old = BTreeMap::from([
            (1, service_meta("kept", Mode::Enforce, false)),
            (2, service_meta("gone-counted", Mode::Enforce, true)),
            (3, service_meta("gone", Mode::Enforce, true)),
            (4, service_meta("just-removed", Mode::Audit, false)),
        ]);
        assert_eq!(prunable(&old, &plan, &BTreeSet::from([2, 9])), [3, 4]);
        assert_eq!(
            prunable(&old, &plan, &BTreeSet::from([1, 2, 3, 4])),
            [0u32; 0]
        );
    }

    #[test]
    fn codes_have_stable_strings() {
        assert_eq!(reason_str(REASON_NOT_FROM_GATEWAY), "not_from_gateway");
        assert_eq!(reason_str(REASON_NO_PROXY), "no_proxy");
        assert_eq!(reason_str(99), "unknown");
        assert_eq!(action_str(ACTION_DROPPED), "dropped");
        assert_eq!(action_str(ACTION_PASSED), "passed");
        assert_eq!(mode_from_code(MODE_AUDIT), Mode::Audit);
        assert_eq!(mode_from_code(0), Mode::Enforce);
    }

    fn svc(id: u32, name: &str, vips: &[&str], endpoints: &[&str]) -> DesiredService {
        DesiredService {
            id,
            name: name.into(),
            mode: Mode::Enforce,
            vips: vips.iter().map(|s| s.parse().unwrap()).collect(),
            endpoints: endpoints.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    fn desired(services: Vec<DesiredService>) -> DesiredState {
        DesiredState {
            proxy_v4: Some("10.0.0.1:15001".parse().unwrap()),
            proxy_v6: Some("[fd00::1]:15001".parse().unwrap()),
            mark: 1,
            gateways: vec![
                "10.0.0.1".parse().unwrap(),
                "::ffff:10.0.0.1".parse().unwrap(),
            ],
            services,
        }
    }

    #[test]
    fn plan_collects_vips_and_endpoints() {
        let plan = Plan::new(&desired(vec![svc(
            7,
            "a",
            &["10.96.0.1:80"],
            &["10.1.0.2:8080", "[fd00::2]:8080"],
        )]))
        .unwrap();
        assert_eq!(
            plan.gateways.len(),
            1,
            "mapped and plain v4 gateway are one key"
        );
        assert_eq!(plan.dests.len(), 3);
        let vip = plan
            .dests
            .iter()
            .find(|(k, _)| *k == dest_key("10.96.0.1:80".parse().unwrap()))
            .unwrap();
        assert_eq!(
            (vip.1.service_id, vip.1.kind, vip.1.mode),
            (7, DEST_KIND_VIP, MODE_ENFORCE)
        );
    }

    #[test]
    fn plan_rejects_conflicts() {
        let conflict = desired(vec![
            svc(1, "a", &["10.96.0.1:80"], &[]),
            svc(2, "b", &[], &["10.96.0.1:80"]),
        ]);
        let err = Plan::new(&conflict).unwrap_err().to_string();
        assert!(
            err.contains("10.96.0.1:80") && err.contains("\"a\"") && err.contains("\"b\""),
            "{err}"
        );
        assert!(Plan::new(&desired(vec![svc(1, "a", &[], &[]), svc(1, "b", &[], &[])])).is_err());
        assert!(Plan::new(&desired(vec![svc(0, "a", &[], &[])])).is_err());
        // The same entry twice in one service is not a conflict.
        assert!(
            Plan::new(&desired(vec![svc(
                1,
                "a",
                &["10.96.0.1:80", "[::ffff:10.96.0.1]:80"],
                &[]
            )]))
            .is_ok()
        );
    }
}
