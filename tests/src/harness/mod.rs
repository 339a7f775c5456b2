//! The simulated node.
//!
//! ```text
//!  <prefix>-pod-a ─eth0──┐                         ┌── <prefix>-foreign (eth0)
//!  <prefix>-pod-b ─eth0──┤ v-a, v-b, ... v-foreign │   another node, no gateway,
//!          ...           └──── <prefix>-node ──────┘   routed through the node
//!                              lo: 10.N.0.1, fd00:N::1 (node IP), forwarding on
//!                              gateway (cgroup <prefix>/gateway)
//!                              host-network process (cgroup <prefix>/pods/hostnet)
//! ```
//!
//! * Pods: one netns and one cgroup (`/sys/fs/cgroup/unified/<prefix>/pods/<pod>`) each; pod `i`
//!   has `10.N.1.(10+i)/32` and `fd00:N:1::(10+i)/128`, default routes via the node. The node
//!   routes to each pod with the node IP as source, so the gateway's upstream connections come
//!   from an address listed in `gateways`.
//! * The gateway hooks `/sys/fs/cgroup/unified/<prefix>/pods` and pins under `/sys/fs/bpf/<prefix>`.
//! * Every process is started with `setns(2)` on the netns (never `ip netns exec`, which remounts
//!   `/sys` and hides bpffs and cgroupfs) and written into its cgroup before `exec`; every PID is
//!   recorded and killed on drop.
//! * Names are derived from the caller's node name only, so that a run killed half-way is cleaned
//!   up by the next run with the same name, and nodes with different names run in parallel.

mod gateway;
mod http;
pub mod kube;
mod netns;
mod node;
pub mod oidc;
mod process;

use std::{
    io,
    path::{Path, PathBuf},
    process::ExitStatus,
};

pub use gateway::{
    ADMIN_PORT, Counters, Gateway, GatewayConfig, Mode, PROXY_PORT, ServiceConfig,
    bpftool_cgroup_show, bpftool_prog_ids, metric_value, poll_until, with_only_caps,
};
pub use http::{HttpReply, HttpRequest, describe as describe_request};
pub use kube::{Endpoint, KubeApi, ServiceObject};
pub use netns::{http_get_in_netns, in_netns, tcp_connect_in_netns, tcp_listen_in_netns};
pub use node::{FOREIGN, Footprint, HOSTNET, KubeletDriver, NODE, Node, NodeSpec, Place};
pub use oidc::{BrowserLogin, OidcOptions, OidcProvider, Signing, TokenSpec};
pub use process::{Output, PeerReply, Proc, run_command};

/// Root of the cgroup v2 hierarchy on the machines this runs on.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
/// Where bpffs is (or gets) mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Parent of the per-node temporary directories (logs, configs, decision files).
pub const TMP_ROOT: &str = "/tmp/nodegate-tests";

/// Errors of the harness. `Debug` prints the same text as `Display`, so that `expect()` in a test
/// shows the reason rather than a struct dump.
#[derive(thiserror::Error)]
pub enum Error {
    #[error(
        "the simulated node needs root (euid {euid}): run the tests as root, e.g. `sudo -E cargo test -p nodegate-tests`"
    )]
    NotRoot { euid: u32 },
    #[error("invalid name `{name}`: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("timed out after {seconds:.1}s: {what}")]
    Timeout { what: String, seconds: f64 },
    #[error("{tool} not found at {path}: {hint}")]
    MissingTool {
        tool: &'static str,
        path: PathBuf,
        hint: &'static str,
    },
    #[error("gateway: {0}")]
    Gateway(String),
    #[error("unexpected output of {what}: {detail}")]
    Parse { what: String, detail: String },
    #[error("no place named `{0}` on this node")]
    NoSuchPlace(String),
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Paths of the binaries the harness runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    /// The `gateway` binary.
    pub gateway: PathBuf,
    /// The `ngpeer` traffic helper of this package.
    pub ngpeer: PathBuf,
}

impl Tools {
    /// The workspace's debug builds: `<workspace>/target/debug/{gateway,ngpeer}`, with
    /// `NODEGATE_GATEWAY_BIN` overriding the gateway. Integration tests should pass
    /// `env!("CARGO_BIN_EXE_ngpeer")` through [`Tools::with_ngpeer`].
    pub fn from_env() -> Self {
        let target = workspace_dir().join("target").join("debug");
        let gateway = std::env::var_os("NODEGATE_GATEWAY_BIN")
            .map_or_else(|| target.join("gateway"), PathBuf::from);
        Self {
            gateway,
            ngpeer: target.join("ngpeer"),
        }
    }

    #[must_use]
    pub fn with_ngpeer(mut self, path: impl Into<PathBuf>) -> Self {
        self.ngpeer = path.into();
        self
    }

    #[must_use]
    pub fn with_gateway(mut self, path: impl Into<PathBuf>) -> Self {
        self.gateway = path.into();
        self
    }

    /// Fails unless the gateway binary exists.
    pub fn require_gateway(&self) -> Result<&Path> {
        if self.gateway.is_file() {
            Ok(&self.gateway)
        } else {
            Err(Error::MissingTool {
                tool: "gateway",
                path: self.gateway.clone(),
                hint: "build it first: cargo build -p gateway (or set NODEGATE_GATEWAY_BIN)",
            })
        }
    }

    /// Fails unless the ngpeer binary exists.
    pub fn require_ngpeer(&self) -> Result<&Path> {
        if self.ngpeer.is_file() {
            Ok(&self.ngpeer)
        } else {
            Err(Error::MissingTool {
                tool: "ngpeer",
                path: self.ngpeer.clone(),
                hint: "build it first: cargo build -p nodegate-tests --bin ngpeer",
            })
        }
    }
}

/// The workspace root (parent of this package).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

pub(crate) fn status_text(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "killed after timeout".to_owned(), |s| s.to_string())
}
