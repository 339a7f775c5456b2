//! The YAML wire format, exactly as written by an operator. Addresses stay strings here so
//! that the domain conversion in the parent module can name the offending value and field.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

use crate::{
    auth::{AuthConfig, login_config::LoginConfig},
    ebpf::Mode,
    proxy::tls::ClientCertMode,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub node: Option<String>,
    pub cgroup: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub proxy: Option<RawProxy>,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub services: Vec<RawService>,
    /// Bearer-token issuers (the auth module's own wire type, validated there).
    pub auth: Option<AuthConfig>,
    /// Static workload identities of the config source (Kubernetes fills them later).
    #[serde(default)]
    pub workloads: Vec<RawWorkload>,
    pub assertion: Option<RawAssertion>,
    /// Browser login (the login module's own wire type, validated there).
    pub login: Option<LoginConfig>,
    /// The Kubernetes source (`gateway run` in a cluster).
    pub kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    pub kubeconfig: Option<PathBuf>,
    pub cgroup_driver: Option<String>,
    pub peers: Option<bool>,
    pub peers_namespace: Option<String>,
    pub write_status: Option<bool>,
    pub debounce_ms: Option<u64>,
    /// Per protected Service (`namespace/name`): what its label and policy do not say.
    #[serde(default)]
    pub services: BTreeMap<String, RawKubeService>,
}

/// `kubernetes.services.<namespace/name>`: the same keys as a static HTTP service's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubeService {
    pub http: Option<RawHttp>,
    pub tls: Option<RawTls>,
    pub upstream_tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkload {
    pub namespace: String,
    pub service_account: String,
    pub pod: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAssertion {
    pub issuer: Option<String>,
    pub ttl_s: Option<u64>,
    pub audience_prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub identity_headers: bool,
    #[serde(default)]
    pub login: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub listen: Option<String>,
    pub listen_v6: Option<String>,
    /// An integer or a `"0x..."` string: kept untyped to give one clear message for both.
    pub mark: Option<serde_yaml::Value>,
    pub connect_timeout_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
    pub threads: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub decisions_file: Option<PathBuf>,
    pub bypass_lines_per_source: Option<u32>,
    pub bypass_interval_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub name: String,
    #[serde(default)]
    pub mode: Option<Mode>,
    #[serde(default)]
    pub vips: Vec<String>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub allow_sources: Vec<String>,
    pub http: Option<RawHttp>,
    /// Kept as YAML: its canonical text is hashed into the policy version, then parsed by
    /// the policy module's own wire types.
    pub policy: Option<serde_yaml::Value>,
    /// TLS termination for an HTTP service.
    pub tls: Option<RawTls>,
    /// TLS to the backends of an HTTP service.
    pub upstream_tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub client_crl_file: Option<PathBuf>,
    pub client_cert: Option<ClientCertMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    pub ca_file: PathBuf,
    pub server_name: Option<String>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}
