//! The kernel side of the data path: load the embedded eBPF object, attach it to
//! the configured cgroup (re-using pinned links), keep the maps in sync with the
//! desired state, and read pinned state for the CLI.
//!
//! API contract used by `proxy`, `telemetry`, `admin` and `cli` (see docs/ARCHITECTURE.md).
//! Bodies marked `unimplemented!` are being filled in; signatures are stable.

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
};

/// Default pin directory.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/nodegate";

/// Errors of the kernel data path. Messages name the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("{0}")]
    Other(String),
}

/// Per-service enforcement mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
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

/// Options for [`Datapath::start`].
#[derive(Debug, Clone)]
pub struct DatapathOptions {
    /// cgroup v2 directory whose processes are intercepted.
    pub cgroup: PathBuf,
    /// Pin directory (created if missing; bpffs must be mounted above it).
    pub bpffs: PathBuf,
}

/// What a [`Datapath::sync`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub dests_added: usize,
    pub dests_removed: usize,
    pub gateways_added: usize,
    pub gateways_removed: usize,
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
    _private: (),
}

impl Datapath {
    /// Load the embedded object (maps pinned/re-used under `bpffs`), attach the programs to
    /// `cgroup` or swap them into the pinned links, and return the handle.
    pub fn start(_opts: &DatapathOptions) -> Result<Self, EbpfError> {
        unimplemented!()
    }

    /// Make the maps equal `desired` (add, update, remove stale entries).
    pub fn sync(&mut self, _desired: &DesiredState) -> Result<SyncReport, EbpfError> {
        unimplemented!()
    }

    /// A cloneable, thread-safe handle for the proxy's original-destination lookups.
    pub fn orig_dst(&self) -> OrigDstTable {
        unimplemented!()
    }

    /// The bypass event stream (ring buffer). Can be taken once.
    pub fn take_events(&mut self) -> Result<BypassEvents, EbpfError> {
        unimplemented!()
    }
}

/// Original-destination lookups for the proxy.
#[derive(Clone)]
pub struct OrigDstTable {
    _private: (),
}

impl OrigDstTable {
    /// Look up and remove the entry for the accepted connection's peer address.
    pub fn take(&self, _peer: SocketAddr) -> Option<OrigDst> {
        unimplemented!()
    }
}

/// Async stream of kernel bypass events.
pub struct BypassEvents {
    _private: (),
}

impl BypassEvents {
    /// Wait for the next batch of events (never empty unless the stream ended).
    pub async fn next_batch(&mut self) -> Result<Vec<BypassEvent>, EbpfError> {
        unimplemented!()
    }
}

/// Read-only views of pinned state for the CLI and `/metrics`; work with or without a daemon.
pub mod inspect {
    use super::{EbpfError, Mode, Path};

    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
    pub struct CounterRow {
        pub service: String,
        pub service_id: u32,
        pub source: std::net::IpAddr,
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
        pub stats: std::collections::BTreeMap<&'static str, u64>,
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
        pub gateways: Vec<std::net::IpAddr>,
        pub services: Vec<ServiceStatus>,
        pub proxy_v4: Option<std::net::SocketAddrV4>,
        pub proxy_v6: Option<std::net::SocketAddrV6>,
        /// Entry counts per map name.
        pub map_entries: std::collections::BTreeMap<&'static str, u64>,
    }

    /// Bypass counters and program stats from the pinned maps.
    pub fn counters(_bpffs: &Path) -> Result<Counters, EbpfError> {
        unimplemented!()
    }

    /// Links, protected entries, services and modes from the pins.
    pub fn status(_bpffs: &Path) -> Result<Status, EbpfError> {
        unimplemented!()
    }

    /// What `detach` removed.
    #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
    pub struct DetachReport {
        pub links_removed: Vec<String>,
        pub maps_removed: Vec<String>,
    }

    /// Remove every pinned link (detaching the programs) and map, then the directory.
    pub fn detach(_bpffs: &Path) -> Result<DetachReport, EbpfError> {
        unimplemented!()
    }
}
