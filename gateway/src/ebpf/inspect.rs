//! Read-only views of pinned state for the CLI and `/metrics`; work with or without a daemon.
//! Everything is opened from the pins (`MapData::from_pin`, `BPF_OBJ_GET`), never from a
//! running gateway.

use std::{collections::BTreeMap, io, net::IpAddr, os::fd::AsFd as _, path::Path};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::links::PinnedLink,
};
use gateway_common::{
    Addr, BypassCount, BypassKey, DestKey, DestValue, OrigDst, ProxyConfig, ServiceMeta, SockKey,
};

use super::{
    EbpfError, Mode,
    links::{self, HOOKS},
    loader::{PinLock, is_permission_error},
    maps::{
        self, NG_BYPASS, NG_DESTS, NG_GATEWAYS, NG_ORIG, NG_PENDING, NG_PROXY, NG_SERVICE_META,
        NG_STATS,
    },
    sys,
};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CounterRow {
    pub service: String,
    pub service_id: u32,
    pub source: IpAddr,
    pub reason: &'static str,
    pub action: &'static str,
    pub syns: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub bypass: Vec<CounterRow>,
    /// `STAT_*` names → sums over CPUs.
    pub stats: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    /// `connect4`, `connect6`, `sockops`, `ingress`.
    pub name: String,
    pub pinned: bool,
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
    pub prog_name: Option<String>,
    pub cgroup_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DestStatus {
    pub addr: std::net::SocketAddr,
    pub service: String,
    pub service_id: u32,
    /// `vip` or `endpoint`.
    pub kind: &'static str,
    pub mode: Mode,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceStatus {
    pub id: u32,
    pub name: String,
    pub mode: Mode,
    pub removed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    pub bpffs: std::path::PathBuf,
    pub links: Vec<LinkStatus>,
    pub destinations: Vec<DestStatus>,
    pub gateways: Vec<IpAddr>,
    pub services: Vec<ServiceStatus>,
    pub proxy_v4: Option<std::net::SocketAddrV4>,
    pub proxy_v6: Option<std::net::SocketAddrV6>,
    /// Entry counts per map name.
    pub map_entries: BTreeMap<&'static str, u64>,
}

/// What `detach` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DetachReport {
    pub links_removed: Vec<String>,
    pub maps_removed: Vec<String>,
}

/// Bypass counters and program stats from the pinned maps.
pub fn counters(bpffs: &Path) -> Result<Counters, EbpfError> {
    let names = service_names(bpffs);
    let bypass: PerCpuHashMap<MapData, BypassKey, BypassCount> = open(bpffs, NG_BYPASS)?;
    let mut rows = Vec::new();
    for entry in bypass.iter().take(ITER_CAP) {
        let (key, per_cpu) = entry.map_err(read_err(NG_BYPASS))?;
        let (syns, packets, bytes) = per_cpu.iter().fold((0u64, 0u64, 0u64), |acc, c| {
            (
                acc.0.wrapping_add(c.syns),
                acc.1.wrapping_add(c.packets),
                acc.2.wrapping_add(c.bytes),
            )
        });
        rows.push(CounterRow {
            service: service_label(&names, key.service_id),
            service_id: key.service_id,
            source: maps::ip_from_addr(&key.src),
            reason: maps::reason_str(key.reason),
            action: maps::action_str(key.action),
            syns,
            packets,
            bytes,
        });
    }
    rows.sort_by(|a, b| {
        (&a.service, a.source, a.reason, a.action).cmp(&(&b.service, b.source, b.reason, b.action))
    });
    let stats_map: PerCpuArray<MapData, u64> = open(bpffs, NG_STATS)?;
    let mut stats = BTreeMap::new();
    for (idx, name) in maps::STAT_NAMES {
        let per_cpu = stats_map.get(&idx, 0).map_err(read_err(NG_STATS))?;
        stats.insert(name, per_cpu.iter().fold(0u64, |a, v| a.wrapping_add(*v)));
    }
    Ok(Counters {
        bypass: rows,
        stats,
    })
}

/// Links, protected entries, services and modes from the pins.
pub fn status(bpffs: &Path) -> Result<Status, EbpfError> {
    if !bpffs.exists() {
        return Err(EbpfError::NotPinned {
            path: bpffs.to_path_buf(),
        });
    }
    let links = HOOKS
        .iter()
        .map(|hook| link_status(bpffs, hook.name))
        .collect();
    let meta: HashMap<MapData, u32, ServiceMeta> = open(bpffs, NG_SERVICE_META)?;
    let mut services = Vec::new();
    let mut names = BTreeMap::new();
    for entry in meta.iter().take(ITER_CAP) {
        let (id, m) = entry.map_err(read_err(NG_SERVICE_META))?;
        let name = maps::service_name(&m);
        names.insert(id, name.clone());
        services.push(ServiceStatus {
            id,
            name,
            mode: maps::mode_from_code(m.mode),
            removed: m.removed != 0,
        });
    }
    services.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));

    let dests: HashMap<MapData, DestKey, DestValue> = open(bpffs, NG_DESTS)?;
    let mut destinations = Vec::new();
    for entry in dests.iter().take(ITER_CAP) {
        let (k, v) = entry.map_err(read_err(NG_DESTS))?;
        destinations.push(DestStatus {
            addr: maps::socket_from_addr(&k.addr, k.port),
            service: service_label(&names, v.service_id),
            service_id: v.service_id,
            kind: maps::kind_str(v.kind),
            mode: maps::mode_from_code(v.mode),
        });
    }
    destinations.sort_by(|a, b| (&a.service, a.addr).cmp(&(&b.service, b.addr)));

    let gw: HashMap<MapData, Addr, u32> = open(bpffs, NG_GATEWAYS)?;
    let mut gateways: Vec<IpAddr> = gw
        .keys()
        .take(ITER_CAP)
        .map(|k| k.map(|a| maps::ip_from_addr(&a)))
        .collect::<Result<_, _>>()
        .map_err(read_err(NG_GATEWAYS))?;
    gateways.sort_unstable();

    let proxy: Array<MapData, ProxyConfig> = open(bpffs, NG_PROXY)?;
    let cfg = proxy.get(&0, 0).map_err(read_err(NG_PROXY))?;
    let (proxy_v4, proxy_v6) = if cfg.ready == 0 {
        (None, None)
    } else {
        maps::proxy_addrs(&cfg)
    };

    let mut map_entries = BTreeMap::new();
    map_entries.insert(NG_DESTS, destinations.len() as u64);
    map_entries.insert(NG_GATEWAYS, gateways.len() as u64);
    map_entries.insert(NG_SERVICE_META, services.len() as u64);
    map_entries.insert(NG_PROXY, u64::from(cfg.ready != 0));
    let pending: HashMap<MapData, u64, OrigDst> = open(bpffs, NG_PENDING)?;
    map_entries.insert(
        NG_PENDING,
        count(pending.keys()).map_err(read_err(NG_PENDING))?,
    );
    let orig: HashMap<MapData, SockKey, OrigDst> = open(bpffs, NG_ORIG)?;
    map_entries.insert(NG_ORIG, count(orig.keys()).map_err(read_err(NG_ORIG))?);
    let bypass: PerCpuHashMap<MapData, BypassKey, BypassCount> = open(bpffs, NG_BYPASS)?;
    map_entries.insert(
        NG_BYPASS,
        count(bypass.keys()).map_err(read_err(NG_BYPASS))?,
    );

    Ok(Status {
        bpffs: bpffs.to_path_buf(),
        links,
        destinations,
        gateways,
        services,
        proxy_v4,
        proxy_v6,
        map_entries,
    })
}

/// Remove every pinned link (detaching the programs) and map, then the directory.
///
/// Only this gateway's pins are removed (the four links and the `NG_*` maps), so a wrong
/// `--bpffs` cannot wipe other software's pins. Idempotent: a missing directory or pin is
/// not an error. Refused while a gateway runs on `bpffs` (it holds the [`PinLock`]).
pub fn detach(bpffs: &Path) -> Result<DetachReport, EbpfError> {
    let mut report = DetachReport::default();
    if !bpffs.exists() {
        return Ok(report);
    }
    let _lock = PinLock::acquire(bpffs)?;
    let links_dir = links::links_dir(bpffs);
    for hook in HOOKS {
        // A replacement link left by a start that died between pinning and renaming.
        let tmp = links_dir.join(links::replacement_name(hook));
        if let Err(e) = std::fs::remove_file(&tmp)
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(remove_err(&tmp, e));
        }
        let path = links_dir.join(hook.name);
        if !path.exists() {
            continue;
        }
        // Unpinning drops the last reference: the kernel detaches the program.
        let removed = match PinnedLink::from_pin(&path) {
            Ok(link) => link.unpin().map(drop),
            Err(_) => std::fs::remove_file(&path),
        };
        match removed {
            Ok(()) => report.links_removed.push(hook.name.to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(remove_err(&path, source)),
        }
    }
    remove_dir_if_empty(&links_dir)?;
    for name in maps::ALL_MAPS {
        let path = bpffs.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => report.maps_removed.push(name.to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(remove_err(&path, source)),
        }
    }
    remove_dir_if_empty(bpffs)?;
    Ok(report)
}

/// Upper bound on map iterations: a hash map's key walk restarts when the current key is
/// deleted meanwhile, so a busy map could otherwise be walked forever.
const ITER_CAP: usize = 1 << 20;

fn count<K: aya::Pod>(keys: aya::maps::MapKeys<'_, K>) -> Result<u64, MapError> {
    let mut n = 0u64;
    for k in keys.take(ITER_CAP) {
        k?;
        n += 1;
    }
    Ok(n)
}

fn read_err(map: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map {
        context: format!("reading pinned map {map}"),
        source: Box::new(source),
    }
}

fn remove_err(path: &Path, source: io::Error) -> EbpfError {
    let action = format!("removing {}", path.display());
    if source.kind() == io::ErrorKind::PermissionDenied {
        EbpfError::NotPermitted { action, source }
    } else {
        EbpfError::Io {
            context: action,
            source,
        }
    }
}

/// Removes a directory that is now empty; one still holding other pins (not ours) stays.
fn remove_dir_if_empty(dir: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EBUSY)) => {
            tracing::warn!(dir = %dir.display(), "left in place: it holds pins that are not the gateway's");
            Ok(())
        }
        Err(source) => Err(remove_err(dir, source)),
    }
}

/// Opens the pinned map `name` as the typed map `T`.
fn open<T>(bpffs: &Path, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = bpffs.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        if not_found(&e) {
            EbpfError::NotPinned {
                path: bpffs.to_path_buf(),
            }
        } else if is_permission_error(&e) {
            EbpfError::NotPermitted {
                action: format!("opening {}", path.display()),
                source: io::Error::from_raw_os_error(libc::EPERM),
            }
        } else {
            EbpfError::Map {
                context: format!("opening {}", path.display()),
                source: Box::new(e),
            }
        }
    })?;
    let map = Map::from_map_data(data).map_err(|source| EbpfError::Map {
        context: format!("opening {}", path.display()),
        source: Box::new(source),
    })?;
    T::try_from(map).map_err(|source| EbpfError::Map {
        context: format!(
            "{} does not have the layout of this gateway version (run `gateway detach`)",
            path.display()
        ),
        source: Box::new(source),
    })
}

fn not_found(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::NotFound
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Service id → name; empty when the metadata map cannot be read (rows then show ids).
fn service_names(bpffs: &Path) -> BTreeMap<u32, String> {
    let Ok(meta) = open::<HashMap<MapData, u32, ServiceMeta>>(bpffs, NG_SERVICE_META) else {
        return BTreeMap::new();
    };
    meta.iter()
        .take(ITER_CAP)
        .filter_map(Result::ok)
        .map(|(id, m)| (id, maps::service_name(&m)))
        .collect()
}

fn service_label(names: &BTreeMap<u32, String>, id: u32) -> String {
    names
        .get(&id)
        .cloned()
        .unwrap_or_else(|| format!("id:{id}"))
}

fn link_status(bpffs: &Path, name: &str) -> LinkStatus {
    let path = links::links_dir(bpffs).join(name);
    let mut status = LinkStatus {
        name: name.to_owned(),
        pinned: false,
        link_id: None,
        prog_id: None,
        prog_name: None,
        cgroup_id: None,
    };
    let Ok(fd) = sys::obj_get(&path) else {
        return status;
    };
    status.pinned = true;
    if let Ok(info) = sys::link_info(fd.as_fd()) {
        status.link_id = Some(info.id);
        status.prog_id = Some(info.prog_id);
        status.cgroup_id = Some(info.cgroup_id);
        status.prog_name = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == info.prog_id)
            .and_then(|p| p.name_as_str().map(str::to_owned));
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_of_a_missing_dir_is_a_no_op() {
        let report = detach(Path::new("/nonexistent/ng-unit-missing")).unwrap();
        assert_eq!(report, DetachReport::default());
    }

    #[test]
    fn unknown_services_are_named_by_id() {
        let mut names = BTreeMap::new();
        names.insert(1, "grafana".to_owned());
        assert_eq!(service_label(&names, 1), "grafana");
        assert_eq!(service_label(&names, 7), "id:7");
    }
}
