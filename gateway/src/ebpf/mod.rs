//! The kernel side of the data path: load the embedded eBPF object, attach it to
//! the configured cgroup (re-using pinned links), keep the maps in sync with the
//! desired state, and read pinned state for the CLI.
//!
//! API contract used by `proxy`, `telemetry`, `admin` and `cli` (see docs/ARCHITECTURE.md).
//!
//! Modules: `loader` (checks, load, attach), `links` (pinned links re-used with
//! `BPF_LINK_UPDATE`), `maps` (key forms and the reconcile of `sync`), `events` (ring buffer),
//! [`inspect`] (read-only views of the pins for the CLI), `sys` (raw `bpf(2)` calls aya lacks).

mod events;
pub mod inspect;
mod links;
mod loader;
mod maps;
#[cfg(test)]
mod prog_tests;
mod sys;

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::maps::{HashMap, IterableMap as _, MapData, RingBuf};
use gateway_common::SockKey;

pub use self::{events::BypassEvents, loader::PinLock};

/// Default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/nodegate";

/// Errors of the kernel data path. Messages name the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "{path} is not on a mounted bpf file system: mount it with `mount -t bpf bpf /sys/fs/bpf` \
         (or point `bpffs` at a directory under a mounted bpffs)"
    )]
    BpffsNotMounted { path: PathBuf },

    #[error(
        "bpffs directory {path}: names on bpffs cannot contain '.': choose a pin directory without dots"
    )]
    BpffsName { path: PathBuf },

    #[error(
        "cgroup directory {path} does not exist: create it (`mkdir -p {path}`) or set `cgroup` to an \
         existing cgroup v2 directory"
    )]
    CgroupMissing { path: PathBuf },

    #[error(
        "{path} is not a cgroup v2 directory: set `cgroup` to a directory of the cgroup2 mount \
         (e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified; see `mount -t cgroup2`)"
    )]
    NotCgroup2 { path: PathBuf },

    #[error(
        "permission denied while {action}: run the gateway as root, or with CAP_BPF, CAP_NET_ADMIN \
         and CAP_PERFMON (and CAP_SYS_ADMIN on kernels before 5.8)"
    )]
    NotPermitted {
        action: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "the kernel verifier rejected program {program} ({source}); this kernel does not accept \
         this build of the eBPF programs: report it with the kernel version (`uname -r`) and this log:\n{log}"
    )]
    VerifierRejected {
        program: &'static str,
        log: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "pinned map {name} in {bpffs} was created by an incompatible version of the gateway \
         ({property} is {actual}, this version needs {expected}): run `gateway detach --bpffs {bpffs}` \
         (this also resets the bypass counters), then start again"
    )]
    PinnedMapIncompatible {
        name: String,
        bpffs: PathBuf,
        property: &'static str,
        expected: u64,
        actual: u64,
    },

    #[error(
        "cannot use the pinned link {path} ({source}): if it is not a link of this gateway, remove \
         it; `gateway detach` removes every pin of this gateway"
    )]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot pin {path} ({source}): is the directory on a mounted bpffs and writable?")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },

    #[error(
        "another gateway is running on the pin directory {path}{}: two gateways on one pin \
         directory would replace each other's programs and overwrite each other's maps; stop it \
         first (or give this one its own `bpffs`)",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    PinsInUse { path: PathBuf, holder: Option<u32> },

    #[error(
        "no pinned gateway state in {path}: the gateway never ran with this bpffs directory, or \
         `gateway detach` removed it (check `--bpffs`/the config's `bpffs`)"
    )]
    NotPinned { path: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Syscall {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Map {
        context: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error("{context}: {source}")]
    Program {
        context: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("loading the embedded eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),

    #[error("the embedded eBPF object has no {kind} named {name} (build mismatch)")]
    MissingFromObject {
        kind: &'static str,
        name: &'static str,
    },

    #[error("invalid desired state: {0}")]
    InvalidState(String),

    #[error("the bypass event stream was already taken")]
    EventsTaken,

    #[error("the bypass event stream needs a tokio runtime: call take_events() inside one")]
    NoRuntime,
}

// The error travels inside callers' error enums: keep it small (aya's errors are boxed).
const _: () = assert!(size_of::<EbpfError>() <= 88);

/// Per-service enforcement mode.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
#[schemars(
    description = "`enforce` or `audit` (let everything through, log what would be denied); \
                   default: the Service's nodegate.io/mode annotation, else enforce."
)]
pub enum Mode {
    /// Connections are decided by policy; direct access to endpoints is dropped.
    Enforce,
    /// Everything is let through, but what enforce would deny is logged and counted.
    Audit,
}

impl Mode {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What userspace wants the kernel maps to contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    pub proxy_v4: Option<SocketAddrV4>,
    pub proxy_v6: Option<SocketAddrV6>,
    /// `SO_MARK` of the gateway's upstream sockets.
    pub mark: u32,
    /// Sources allowed to reach protected endpoints.
    pub gateways: Vec<IpAddr>,
    pub services: Vec<DesiredService>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub id: u32,
    pub name: String,
    pub mode: Mode,
    pub vips: Vec<SocketAddr>,
    pub endpoints: Vec<SocketAddr>,
}

/// What a [`Datapath::sync`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub dests_added: usize,
    pub dests_removed: usize,
    pub gateways_added: usize,
    pub gateways_removed: usize,
    /// Names of removed services dropped from `NG_SERVICE_META` (no counter needs them).
    pub names_pruned: usize,
}

/// Original destination of an accepted redirected connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDst {
    pub dst: SocketAddr,
    pub service_id: u32,
    pub cgroup_id: u64,
    pub pid: u32,
}

/// A bypass attempt reported by the kernel (one per SYN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BypassEvent {
    pub service_id: u32,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `not_from_gateway`, ... (stable string of `gateway_common::REASON_*`).
    pub reason: &'static str,
    /// `dropped` or `passed`.
    pub action: &'static str,
    pub ts_ns: u64,
}

/// Loaded and attached programs plus the maps userspace writes.
pub struct Datapath {
    /// Owns the loaded programs (their links are pinned, so they stay attached without it).
    _ebpf: aya::Ebpf,
    /// This gateway's claim on the pin directory, for as long as it runs the datapath.
    pins: PinLock,
    cgroup_id: u64,
    maps: maps::WritableMaps,
    orig: OrigDstTable,
    events: Option<RingBuf<MapData>>,
    attached: Vec<LinkAttach>,
}

/// How [`Datapath::start`] attached one program (for the start-up log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAttach {
    /// `connect4`, `connect6`, `sockops`, `ingress`.
    pub name: &'static str,
    /// `created`, `updated` (pinned link re-used) or `replaced` (pinned link targeted
    /// another cgroup).
    pub how: &'static str,
    pub link_id: u32,
}

impl Datapath {
    /// Load the embedded object (maps pinned/re-used under the locked pin directory `pins`),
    /// attach the programs to the cgroup v2 directory `cgroup` or swap them into the pinned
    /// links, and return the handle (which holds `pins` from then on).
    pub fn start(cgroup: &Path, pins: PinLock) -> Result<Self, EbpfError> {
        if let Err(e) = sys::raise_memlock_rlimit() {
            // Only matters before Linux 5.11 (memcg accounting since); loading tells if it did.
            tracing::debug!(error = %e, "could not raise RLIMIT_MEMLOCK");
        }
        let bpffs = pins.path();
        let (cgroup_file, cgroup_id) = loader::open_cgroup(cgroup)?;
        let mut ebpf = loader::load_object(bpffs)?;
        let maps = maps::WritableMaps {
            proxy: take_map(&mut ebpf, maps::NG_PROXY)?,
            gateways: take_map(&mut ebpf, maps::NG_GATEWAYS)?,
            meta: take_map(&mut ebpf, maps::NG_SERVICE_META)?,
            dests: take_map(&mut ebpf, maps::NG_DESTS)?,
            bypass: take_map(&mut ebpf, maps::NG_BYPASS)?,
            pruned_at: None,
        };
        let orig: HashMap<MapData, SockKey, gateway_common::OrigDst> =
            take_map(&mut ebpf, maps::NG_ORIG)?;
        let events: RingBuf<MapData> = take_map(&mut ebpf, maps::NG_EVENTS)?;
        let cgroup = links::Cgroup {
            path: cgroup,
            file: &cgroup_file,
            id: cgroup_id,
        };
        let attached = loader::attach_all(&mut ebpf, bpffs, &cgroup)?
            .into_iter()
            .map(|(hook, done)| {
                let (how, link_id) = match done {
                    links::Attached::Created { link_id } => ("created", link_id),
                    links::Attached::Updated { link_id, .. } => ("updated", link_id),
                    links::Attached::Replaced { link_id, .. } => ("replaced", link_id),
                };
                LinkAttach {
                    name: hook.name,
                    how,
                    link_id,
                }
            })
            .collect();
        Ok(Self {
            _ebpf: ebpf,
            pins,
            cgroup_id,
            maps,
            orig: OrigDstTable {
                map: Arc::new(orig),
            },
            events: Some(events),
            attached,
        })
    }

    /// Make the maps equal `desired` (add, update, remove stale entries).
    pub fn sync(&mut self, desired: &DesiredState) -> Result<SyncReport, EbpfError> {
        let plan = maps::Plan::new(desired)?;
        self.maps.apply(&plan)
    }

    /// A cloneable, thread-safe handle for the proxy's original-destination lookups.
    pub fn orig_dst(&self) -> OrigDstTable {
        self.orig.clone()
    }

    /// The bypass event stream (ring buffer). Can be taken once.
    pub fn take_events(&mut self) -> Result<BypassEvents, EbpfError> {
        let ring = self.events.take().ok_or(EbpfError::EventsTaken)?;
        BypassEvents::new(ring)
    }

    /// How each program was attached by [`Datapath::start`].
    pub fn links(&self) -> &[LinkAttach] {
        &self.attached
    }

    /// The pin directory.
    pub fn bpffs(&self) -> &Path {
        self.pins.path()
    }

    /// The id of the cgroup the programs are attached to.
    pub fn cgroup_id(&self) -> u64 {
        self.cgroup_id
    }
}

fn take_map<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::MissingFromObject { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map {
        context: format!("opening {name}"),
        source: Box::new(source),
    })
}

/// Original-destination lookups for the proxy.
#[derive(Clone)]
pub struct OrigDstTable {
    map: Arc<HashMap<MapData, SockKey, gateway_common::OrigDst>>,
}

impl OrigDstTable {
    /// Look up and remove the entry for the accepted connection's peer address.
    ///
    /// One atomic `BPF_MAP_LOOKUP_AND_DELETE_ELEM`: no lock, and two lookups of the same peer
    /// never both get it. A v4-mapped IPv6 peer (dual-stack listener) is the same key as the
    /// IPv4 peer.
    pub fn take(&self, peer: SocketAddr) -> Option<OrigDst> {
        let key = SockKey {
            addr: maps::addr_from_ip(peer.ip()),
            port: peer.port(),
            _pad: 0,
        };
        let fd = self.map.map().fd().as_fd();
        match sys::map_lookup_and_delete::<_, gateway_common::OrigDst>(fd, &key) {
            Ok(found) => found.map(|o| OrigDst {
                dst: maps::socket_from_addr(&o.addr, o.port),
                service_id: o.service_id,
                cgroup_id: o.cgroup_id,
                pid: u32::try_from(o.pid_tgid >> 32).unwrap_or(u32::MAX),
            }),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "NG_ORIG lookup failed");
                None
            }
        }
    }
}
