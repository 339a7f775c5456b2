//! The Kubernetes source's output: a pure, comparable snapshot of what this node must enforce.
//!
//! Built by [`super::kubernetes`] from its watch caches and published on a `tokio::sync::watch`
//! channel; consumers (the kernel maps' desired state, the proxy's routes and policies, the
//! workload-identity table, `gateway status`) read it and never see the Kubernetes objects.
//! Everything here is already validated and canonical: addresses are sorted and deduplicated,
//! IPv4-mapped IPv6 is IPv4, a policy that is present has parsed with the gateway's parser.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::Serialize;

/// Longest service name the kernel's `ServiceMeta` holds (`gateway_common::SERVICE_NAME_LEN`
/// less the terminating NUL).
pub const MAX_KERNEL_NAME_LEN: usize = 63;

pub use crate::ebpf::Mode;

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What one node enforces, as of one moment of the API server's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Labelled (`nodegate.io/protected=true`) Services, by `namespace/name`.
    pub services: BTreeMap<ObjectKey, ProtectedService>,
    /// Pods scheduled on this node, by UID.
    pub pods: BTreeMap<String, LocalPod>,
    /// Addresses of the gateways of every node (this one included): the only sources allowed
    /// to reach protected endpoints (`NG_GATEWAYS`). Empty when peer discovery is off.
    pub gateways: Vec<IpAddr>,
}

impl Snapshot {
    /// The local pod that owns `ip`, for attributing a connection by source address when its
    /// cgroup is unknown. Host-network pods share the node's address and are never returned.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&LocalPod> {
        let ip = ip.to_canonical();
        self.pods
            .values()
            .find(|p| !p.host_network && p.ips.contains(&ip))
    }
}

/// A protected Service and everything needed to enforce it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtectedService {
    pub key: ObjectKey,
    /// `nodegate.io/mode` on the Service, overridden by the `AccessPolicy`'s `mode`; enforce
    /// when absent or unreadable (an unreadable mode never relaxes enforcement).
    pub mode: Mode,
    /// Every `ClusterIP` (v4 and v6) × every TCP port. Empty for a headless Service.
    pub vips: Vec<SocketAddr>,
    /// Ready endpoints of the Service's `EndpointSlice` objects × their TCP ports: where the proxy
    /// sends connections.
    pub endpoints: Vec<SocketAddr>,
    /// Endpoints that are not ready (starting, terminating). The proxy does not use them, but
    /// the kernel must still drop direct traffic to them: a pod that is not ready yet, or is
    /// draining, is as reachable around the gateway as a ready one.
    pub not_ready_endpoints: Vec<SocketAddr>,
    pub policy: PolicyBinding,
    /// Problems found on the way that did not stop protection (a bad `nodegate.io/mode`, an
    /// annotation policy shadowed by an `AccessPolicy`), for `gateway status` and the log.
    pub warnings: Vec<String>,
}

impl ProtectedService {
    /// Every address the kernel protects: VIPs are redirected, these are guarded.
    pub fn guarded_endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints
            .iter()
            .chain(&self.not_ready_endpoints)
            .copied()
    }

    /// The name under which the kernel counts this service (`ServiceMeta.name`, at most
    /// [`MAX_KERNEL_NAME_LEN`] bytes): `namespace/name`, or for longer keys a prefix and a
    /// hash of the whole key so that two long names never share counters.
    pub fn kernel_name(&self) -> String {
        kernel_name(&self.key.to_string())
    }
}

/// See [`ProtectedService::kernel_name`].
pub fn kernel_name(full: &str) -> String {
    if full.len() <= MAX_KERNEL_NAME_LEN {
        return full.to_owned();
    }
    // FNV-1a, the hash the gateway already uses for service ids: stable across versions.
    let hash = full.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let suffix = format!("~{hash:08x}");
    let mut cut = MAX_KERNEL_NAME_LEN - suffix.len();
    // Kubernetes names are ASCII, but the key is built from API input: never split a char.
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &full[..cut])
}

/// Which policy a protected Service is enforced with.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyBinding {
    /// A policy that parsed and validated with the gateway's parser.
    Policy {
        source: PolicySource,
        /// The policy document (`default`/`deny`/`allow`) as written, for
        /// `config::ServicePolicy::from_value`, which versions and compiles it.
        document: serde_yaml::Value,
    },
    /// Nothing is allowed through. Protection never depends on a policy being valid: a
    /// labelled Service with a missing, invalid or ambiguous policy is still protected.
    DenyAll(DenyReason),
}

impl PolicyBinding {
    pub fn is_deny_all(&self) -> bool {
        matches!(self, Self::DenyAll(_))
    }
}

/// Where a service's policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The `AccessPolicy` of this name, in the Service's namespace.
    AccessPolicy(String),
    /// The Service's `nodegate.io/policy` annotation.
    Annotation,
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AccessPolicy(name) => write!(f, "AccessPolicy {name}"),
            Self::Annotation => f.write_str("annotation nodegate.io/policy"),
        }
    }
}

/// Why a protected service allows nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No `AccessPolicy` targets it and it has no `nodegate.io/policy` annotation.
    NoPolicy,
    /// The policy that applies is invalid; `message` names the field.
    Invalid {
        source: PolicySource,
        message: String,
    },
    /// More than one `AccessPolicy` targets it; which one should win is not guessed.
    Conflict { policies: Vec<String> },
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPolicy => f.write_str("no AccessPolicy or nodegate.io/policy annotation"),
            Self::Invalid { source, message } => write!(f, "{source} is invalid: {message}"),
            Self::Conflict { policies } => write!(
                f,
                "targeted by {} AccessPolicies ({}): keep exactly one",
                policies.len(),
                policies.join(", ")
            ),
        }
    }
}

/// A pod scheduled on this node: the workload identity of connections from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs`, canonical. For a host-network pod these are the node's addresses.
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// The pod's cgroup, relative to the cgroup v2 root the gateway hooks (see
    /// [`super::pods`]); `None` when the cgroup driver is unknown or the UID is malformed.
    pub cgroup: Option<PathBuf>,
}
