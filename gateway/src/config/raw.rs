//! The YAML wire format, exactly as written by an operator. Addresses stay strings here so
//! that the domain conversion in the parent module can name the offending value and field.

use std::path::PathBuf;

use serde::Deserialize;

use crate::ebpf::Mode;

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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub listen: Option<String>,
    pub listen_v6: Option<String>,
    /// An integer or a `"0x..."` string: kept untyped to give one clear message for both.
    pub mark: Option<serde_yaml::Value>,
    pub connect_timeout_ms: Option<u64>,
    pub drain_timeout_ms: Option<u64>,
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
}
