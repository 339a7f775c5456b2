//! The static configuration: YAML (`raw`) parsed once into domain types. Every later stage
//! (proxy routes, the kernel's desired state, the admin server) reads the parsed form only:
//! addresses are canonical (IPv4-mapped IPv6 becomes IPv4), CIDRs are truncated to their
//! network, service ids are computed, and every cross-field rule has been checked.

mod raw;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    num::NonZeroUsize,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{
    auth::{
        AuthConfig,
        login_config::{LoginConfig, LoginConfigError, LoginSettings},
    },
    ebpf::{self, DesiredService, DesiredState, Mode},
    policy::{CompiledPolicy, Policy, wire::PolicySpec},
    proxy::tls::{ServerTls, ServerTlsFiles, UpstreamTls, upstream::UpstreamTlsFiles},
};

/// The configuration `gateway run` uses without `--config`: protects nothing, listens on
/// loopback (a VM or a laptop where every client is in the host network namespace).
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.yaml");

/// `SO_MARK` of the gateway's upstream sockets when `proxy.mark` is not set ("NG").
pub const DEFAULT_MARK: u32 = 0x4e47;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15021));
pub const DEFAULT_BYPASS_LINES_PER_SOURCE: u32 = 5;
pub const DEFAULT_BYPASS_INTERVAL: Duration = Duration::from_secs(1);
/// `gateway_common::SERVICE_NAME_LEN` less the terminating NUL.
pub const MAX_SERVICE_NAME_LEN: usize = gateway_common::SERVICE_NAME_LEN - 1;
/// `iss` of the identity assertions the gateway signs, when `assertion.issuer` is not set.
pub const DEFAULT_ASSERTION_ISSUER: &str = "nodegate";
pub const DEFAULT_ASSERTION_TTL: Duration = Duration::from_secs(60);
/// An assertion is replayable by whoever sees it until it expires: keep it short.
pub const MAX_ASSERTION_TTL: Duration = Duration::from_secs(3600);

/// Where a configuration came from (for messages and for reloads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    File(PathBuf),
    Embedded,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Embedded => f.write_str("<embedded default config>"),
        }
    }
}

/// One problem in a config, named by its field path (`services[1].vips[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not a valid nodegate config")]
    Syntax {
        origin: Origin,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{origin}: {}", display_problems(.problems))]
    Invalid {
        origin: Origin,
        problems: Vec<FieldError>,
    },
}

fn display_problems(problems: &[FieldError]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut out = format!("{} problems:", many.len());
            for p in many {
                out.push_str("\n  - ");
                out.push_str(&p.to_string());
            }
            out
        }
    }
}

/// The parsed, checked configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub origin: Origin,
    pub node: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub gateways: Vec<IpAddr>,
    pub log: LogConfig,
    pub services: Vec<Service>,
    /// Bearer-token issuers; validated here, turned into an `auth::Authenticator` by `run`.
    pub auth: AuthConfig,
    /// Static workload identities (config source), matched by cgroup id, then source address.
    pub workloads: Vec<StaticWorkload>,
    pub assertion: AssertionConfig,
    /// Browser login (`login:`), checked here; `run` builds the login flow from it.
    pub login: Option<LoginSection>,
    /// The Kubernetes source (`kubernetes:`): protected Services, their endpoints, this node's
    /// pods and `AccessPolicy` objects come from the API server and are merged with the rest.
    pub kubernetes: Option<KubernetesSection>,
    /// `kubernetes.services`: per protected Service (`namespace/name`), the HTTP settings that
    /// its label and policy cannot carry (hosts, login, identity headers, TLS). Applied at each
    /// merge, so a reload changes them without a restart.
    pub kube_services: BTreeMap<String, KubeServiceSettings>,
}

/// The settings `kubernetes.services` gives a protected Service, applied when it is an HTTP
/// service (it has a valid policy). The certificate files are read and checked with the config
/// and watched like a static service's once the Service is enforced.
#[derive(Debug, Clone, Serialize)]
pub struct KubeServiceSettings {
    pub hosts: Vec<String>,
    pub identity_headers: bool,
    pub login: bool,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::proxy::tls::serialize_opt"
    )]
    pub tls: Option<Arc<ServerTls>>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::proxy::tls::serialize_opt"
    )]
    pub upstream_tls: Option<Arc<UpstreamTls>>,
}

impl KubeServiceSettings {
    /// Gives `http` (a Kubernetes service's, built from its policy) these settings.
    pub fn apply_to(&self, http: &mut HttpService) {
        http.hosts.clone_from(&self.hosts);
        http.identity_headers = self.identity_headers;
        http.login = self.login;
        http.tls.clone_from(&self.tls);
        http.upstream_tls.clone_from(&self.upstream_tls);
    }
}

/// The `kubernetes:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KubernetesSection {
    /// A kubeconfig for development; `None`: the in-cluster service account (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    pub cgroup_driver: CgroupDriverSetting,
    /// Where the gateway `DaemonSet`'s pods run, whose addresses are allowed to reach protected
    /// endpoints (`peers: true`); `None`: no peer discovery (one node, or a static `gateways`).
    pub peers_namespace: Option<String>,
    /// Write `AccessPolicy` status conditions and events.
    pub write_status: bool,
    #[serde(rename = "debounce_ms", serialize_with = "as_millis")]
    pub debounce: Duration,
}

/// How pods' cgroups are named (`kubernetes.cgroup_driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriverSetting {
    /// Detected from the layout under `cgroup` (`kubepods.slice` or `kubepods`).
    Auto,
    Systemd,
    Cgroupfs,
    /// Pods are named by address only.
    None,
}

pub const DEFAULT_KUBE_DEBOUNCE: Duration = Duration::from_millis(50);
/// Above this a label change could not be enforced within a second.
pub const MAX_KUBE_DEBOUNCE: Duration = Duration::from_millis(500);

/// Values from the command line that replace the file's (`gateway run --node ...`), applied
/// before validation, at start and on every reload. In the `DaemonSet` they come from the
/// downward API, which a `ConfigMap` shared by every node cannot hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `node`.
    pub node: Option<String>,
    /// `proxy.listen`.
    pub proxy_listen: Option<String>,
    /// `kubernetes.peers_namespace`.
    pub peers_namespace: Option<String>,
    /// `kubernetes.kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
}

/// The `login:` section: the operator's text and where its relative file paths start.
#[derive(Debug, Clone, PartialEq)]
pub struct LoginSection {
    pub config: LoginConfig,
    /// The config file's directory (the working directory for the embedded config).
    pub base_dir: PathBuf,
}

impl LoginSection {
    /// The validated settings; reads the files the section names (secrets, CA bundle).
    pub fn settings(&self) -> Result<LoginSettings, LoginConfigError> {
        LoginSettings::from_config(self.config.clone(), &self.base_dir)
    }
}

/// What the effective-config log line shows of the login section: no secrets.
impl Serialize for LoginSection {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let c = &self.config;
        let mut s = serializer.serialize_struct("LoginSection", 6)?;
        s.serialize_field("issuer", &c.issuer)?;
        s.serialize_field("client_id", &c.client_id)?;
        s.serialize_field("hosts", &c.hosts)?;
        s.serialize_field("cookie_name", &c.cookie_name)?;
        s.serialize_field("cookie_secret_file", &c.cookie_secret_file)?;
        s.serialize_field("session_ttl_s", &c.session_ttl_s)?;
        s.end()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyConfig {
    /// The first listener (IPv4 or IPv6).
    pub listen: SocketAddr,
    /// A second, IPv6 listener next to an IPv4 `listen`.
    pub listen_v6: Option<SocketAddrV6>,
    pub mark: u32,
    #[serde(rename = "connect_timeout_ms", serialize_with = "as_millis")]
    pub connect_timeout: Duration,
    #[serde(rename = "drain_timeout_ms", serialize_with = "as_millis")]
    pub drain_timeout: Duration,
    /// The proxy's threads; `None`: one per CPU the process may use. One runs the proxy on a
    /// single-threaded runtime (see `cli::dataplane`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<NonZeroUsize>,
}

impl ProxyConfig {
    /// The IPv4 listener, where IPv4 connections are redirected.
    pub fn v4(&self) -> Option<SocketAddrV4> {
        match self.listen {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        }
    }

    /// The IPv6 listener, where IPv6 connections are redirected.
    pub fn v6(&self) -> Option<SocketAddrV6> {
        match self.listen {
            SocketAddr::V6(a) => Some(a),
            SocketAddr::V4(_) => self.listen_v6,
        }
    }

    /// Every address the proxy listens on.
    pub fn listeners(&self) -> Vec<SocketAddr> {
        let mut out = vec![self.listen];
        out.extend(self.listen_v6.map(SocketAddr::V6));
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogConfig {
    pub decisions_file: Option<PathBuf>,
    pub bypass_lines_per_source: u32,
    #[serde(rename = "bypass_interval_ms", serialize_with = "as_millis")]
    pub bypass_interval: Duration,
}

/// A protected service.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub id: u32,
    pub name: String,
    pub mode: Mode,
    pub vips: Vec<SocketAddr>,
    pub endpoints: Vec<SocketAddr>,
    pub rule: L4Rule,
    /// Set for an HTTP service (one with a `policy`): every request is authorized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpService>,
}

/// The identity-aware part of a service: requests are parsed, authenticated and evaluated
/// against `policy` one by one.
#[derive(Debug, Clone, Serialize)]
pub struct HttpService {
    /// Host names served (lower case, `*.suffix` allowed); empty: any. Another Host gets 421.
    pub hosts: Vec<String>,
    /// Send plain `X-Nodegate-User` / `-Email` / `-Groups` upstream besides the assertion.
    pub identity_headers: bool,
    /// Unauthenticated browsers are sent to the login flow instead of getting a 401.
    pub login: bool,
    #[serde(serialize_with = "as_inner")]
    pub policy: Arc<ServicePolicy>,
    /// `tls:`: the gateway terminates TLS with this certificate.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::proxy::tls::serialize_opt"
    )]
    pub tls: Option<Arc<ServerTls>>,
    /// `upstream_tls:`: backends are reached over TLS, verified against this CA.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::proxy::tls::serialize_opt"
    )]
    pub upstream_tls: Option<Arc<UpstreamTls>>,
}

fn as_inner<S: serde::Serializer, T: Serialize>(v: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    T::serialize(v, s)
}

impl HttpService {
    /// Whether `host` (as received: any case, maybe with a port) is served.
    pub fn serves_host(&self, host: Option<&str>) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let Some(host) = host else {
            return false;
        };
        let name = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        self.hosts.iter().any(|h| match h.strip_prefix("*.") {
            Some(suffix) => name
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => *h == name,
        })
    }
}

/// `host[:port]` or `[v6]:port` → the host part.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(h, _)| h);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A compiled service policy and the version it is logged under.
#[derive(Debug, Serialize)]
pub struct ServicePolicy {
    /// First 12 hex digits of the SHA-256 of the policy's canonical YAML: equal text, equal
    /// version, across reloads and nodes. Shared with every decision line logged under it.
    pub version: Arc<str>,
    pub deny_rules: usize,
    pub allow_rules: usize,
    #[serde(skip)]
    pub compiled: CompiledPolicy,
}

impl ServicePolicy {
    /// Parses and compiles a policy given as YAML; errors are reported under `root`.
    pub fn from_value(value: &serde_yaml::Value, root: &str) -> Result<Self, String> {
        let canonical = serde_yaml::to_string(value).map_err(|e| e.to_string())?;
        let spec: PolicySpec = serde_yaml::from_str(&canonical).map_err(|e| {
            // serde_yaml names the path inside the policy; the line refers to the re-serialized
            // snippet, so it is dropped.
            let text = e.to_string();
            let text = text.split(" at line ").next().unwrap_or(&text).to_owned();
            if e.location().is_some() && text.contains(": ") {
                format!("{root}.{text}")
            } else {
                format!("{root}: {text}")
            }
        })?;
        let policy = Policy::from_spec(spec, root).map_err(|e| e.to_string())?;
        let (deny_rules, allow_rules) = (policy.deny().len(), policy.allow().len());
        let digest = Sha256::digest(canonical.as_bytes());
        let version = digest[..6].iter().fold(String::new(), |mut out, b| {
            use std::fmt::Write as _;
            let _ = write!(out, "{b:02x}");
            out
        });
        Ok(Self {
            version: version.into(),
            deny_rules,
            allow_rules,
            compiled: CompiledPolicy::compile(&policy),
        })
    }
}

/// A workload known to the config source: requests from its cgroup (preferred, exact) or from
/// one of its addresses carry its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaticWorkload {
    pub namespace: String,
    pub service_account: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub addresses: Vec<IpNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The cgroup v2 id of `cgroup` (its directory's inode number), resolved at load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

/// The identity assertion (`X-Nodegate-Assertion`) signed for the backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssertionConfig {
    pub issuer: String,
    #[serde(rename = "ttl_s", serialize_with = "as_secs")]
    pub ttl: Duration,
    /// `aud` = prefix + service name.
    pub audience_prefix: String,
}

impl Default for AssertionConfig {
    fn default() -> Self {
        Self {
            issuer: DEFAULT_ASSERTION_ISSUER.to_owned(),
            ttl: DEFAULT_ASSERTION_TTL,
            audience_prefix: String::new(),
        }
    }
}

/// The L4 access rule of a service: the connection's source must be in one of the CIDRs.
/// No CIDR means deny all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct L4Rule {
    pub allow_sources: Vec<IpNet>,
}

impl L4Rule {
    /// Whether `src` may connect. IPv4-mapped IPv6 sources are matched as IPv4.
    pub fn allows(&self, src: IpAddr) -> bool {
        let src = src.to_canonical();
        self.allow_sources.iter().any(|net| net.contains(&src))
    }
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_millis())
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

/// Stable 32-bit id of a service: FNV-1a of its name, never 0 (0 is "no service" in the maps).
pub fn service_id(name: &str) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let hash = name
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u32::from(b)).wrapping_mul(PRIME));
    // Deterministic, so still stable; a clash with the name hashing to 1 is caught like any other.
    if hash == 0 { 1 } else { hash }
}

impl Config {
    /// Read and parse a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(path, &Overrides::default())
    }

    /// Read and parse a config file, with command-line `overrides`.
    pub fn load_with(path: &Path, overrides: &Overrides) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_overridden(&text, Origin::File(path.to_path_buf()), overrides)
    }

    /// The embedded default config.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(EMBEDDED_DEFAULT, Origin::Embedded)
    }

    /// Parse a config from YAML text. `node` defaults to the hostname.
    pub fn parse(text: &str, origin: Origin) -> Result<Self, ConfigError> {
        Self::parse_overridden(text, origin, &Overrides::default())
    }

    /// Parse a config from YAML text with command-line `overrides`.
    pub fn parse_overridden(
        text: &str,
        origin: Origin,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        Self::parse_with(text, origin, overrides, hostname)
    }

    fn parse_with(
        text: &str,
        origin: Origin,
        overrides: &Overrides,
        default_node: impl FnOnce() -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut raw: raw::RawConfig = match serde_yaml::from_str(text) {
            Ok(raw) => raw,
            Err(source) => return Err(ConfigError::Syntax { origin, source }),
        };
        let mut p = Problems::default();
        apply_overrides(&mut raw, overrides, &mut p);
        let config = Self::from_raw(raw, origin.clone(), default_node, &mut p);
        match config {
            Some(config) if p.0.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                origin,
                problems: p.0,
            }),
        }
    }

    /// The kernel maps' desired content.
    pub fn desired_state(&self) -> DesiredState {
        DesiredState {
            proxy_v4: self.proxy.v4(),
            proxy_v6: self.proxy.v6(),
            mark: self.proxy.mark,
            gateways: self.gateways.clone(),
            services: self
                .services
                .iter()
                .map(|s| DesiredService {
                    id: s.id,
                    name: s.name.clone(),
                    mode: s.mode,
                    vips: s.vips.clone(),
                    endpoints: s.endpoints.clone(),
                })
                .collect(),
        }
    }

    /// Fields that differ from `self` and cannot change without a restart (listeners, pins,
    /// the attach point, the mark the kernel uses to recognise the gateway, log sinks).
    pub fn restart_required(&self, new: &Self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                out.push(name);
            }
        };
        check("node", self.node != new.node);
        check("cgroup", self.cgroup != new.cgroup);
        check("bpffs", self.bpffs != new.bpffs);
        check("proxy.listen", self.proxy.listen != new.proxy.listen);
        check(
            "proxy.listen_v6",
            self.proxy.listen_v6 != new.proxy.listen_v6,
        );
        check("proxy.mark", self.proxy.mark != new.proxy.mark);
        check(
            "proxy.drain_timeout_ms",
            self.proxy.drain_timeout != new.proxy.drain_timeout,
        );
        check("proxy.threads", self.proxy.threads != new.proxy.threads);
        check("admin.listen", self.admin.listen != new.admin.listen);
        check("log", self.log != new.log);
        // The assertion key is generated at start and its issuer is what backends pin.
        check("assertion", self.assertion != new.assertion);
        // The login flow holds the cookie keys and the signed-out sessions: a new one would
        // log everybody out (or, with a generated secret, invalidate every cookie).
        check("login", self.login != new.login);
        // The source's watchers are started once, with this section's settings.
        check("kubernetes", self.kubernetes != new.kubernetes);
        out
    }

    /// Number of protected destinations (VIPs + endpoints).
    pub fn destination_count(&self) -> usize {
        self.services
            .iter()
            .map(|s| s.vips.len() + s.endpoints.len())
            .sum()
    }

    /// One line for `check-config` and the start-up log.
    pub fn summary(&self) -> String {
        let audit = self
            .services
            .iter()
            .filter(|s| s.mode == Mode::Audit)
            .count();
        let listeners = self
            .proxy
            .listeners()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" + ");
        let http = self.services.iter().filter(|s| s.http.is_some()).count();
        format!(
            "node {}: {} service(s) ({} enforce, {audit} audit, {http} http), {} protected \
             destination(s), {} gateway source(s), {} token issuer(s), {} workload(s), proxy \
             {listeners}, admin {}, cgroup {}, bpffs {}",
            self.node,
            self.services.len(),
            self.services.len() - audit,
            self.destination_count(),
            self.gateways.len(),
            self.auth.issuers.len(),
            self.workloads.len(),
            self.admin.listen,
            self.cgroup.display(),
            self.bpffs.display(),
        )
    }

    fn from_raw(
        raw: raw::RawConfig,
        origin: Origin,
        default_node: impl FnOnce() -> Option<String>,
        p: &mut Problems,
    ) -> Option<Self> {
        let node = if let Some(node) = raw.node {
            parse_node(&node).map_err(|m| p.push("node", m)).ok()
        } else if let Some(host) = default_node() {
            parse_node(&host)
                .map_err(|m| p.push("node", format!("not set, and the hostname {m}")))
                .ok()
        } else {
            p.push("node", "not set, and the hostname could not be read");
            None
        };
        let cgroup = match raw.cgroup {
            Some(c) if c.is_absolute() => Some(c),
            Some(c) => {
                p.push(
                    "cgroup",
                    format!(
                        "{:?} must be an absolute path to a cgroup v2 directory",
                        c.display()
                    ),
                );
                None
            }
            None => {
                p.push(
                    "cgroup",
                    "missing: set the cgroup v2 directory whose processes are intercepted \
                     (e.g. /sys/fs/cgroup/kubepods.slice)",
                );
                None
            }
        };
        let bpffs = match raw.bpffs {
            Some(b) if b.is_absolute() => Some(b),
            Some(b) => {
                p.push(
                    "bpffs",
                    format!(
                        "{:?} must be an absolute path under a bpffs mount",
                        b.display()
                    ),
                );
                None
            }
            None => Some(PathBuf::from(ebpf::DEFAULT_BPFFS)),
        };
        let proxy = parse_proxy(raw.proxy, p);
        let admin = parse_admin(raw.admin, p);
        let gateways = parse_gateways(&raw.gateways, p);
        let log = parse_log(raw.log, p);
        let services = parse_services(raw.services, p);
        let auth = raw.auth.unwrap_or_default();
        if let Err(err) = crate::auth::config::validate(&auth) {
            p.push("auth", err.to_string());
        }
        let workloads = parse_workloads(raw.workloads, p);
        let assertion = parse_assertion(raw.assertion, p);
        let login = parse_login(raw.login, &origin, &services, p);
        let (kubernetes, kube_services) = match raw.kubernetes {
            Some(mut k) => {
                let settings = std::mem::take(&mut k.services);
                (
                    parse_kubernetes(k, &origin, p),
                    parse_kube_services(settings, login.is_some(), p),
                )
            }
            None => (None, BTreeMap::new()),
        };

        let (node, cgroup, bpffs, proxy, admin, log) =
            (node?, cgroup?, bpffs?, proxy?, admin?, log?);
        check_cross_fields(&proxy, &admin, &gateways, &services, p);
        Some(Self {
            origin,
            node,
            cgroup,
            bpffs,
            proxy,
            admin,
            gateways,
            log,
            services,
            auth,
            workloads,
            assertion,
            login,
            kubernetes,
            kube_services,
        })
    }
}

/// Command-line values replace the file's before anything is checked, so that their errors
/// read like the file's (with the flag named).
fn apply_overrides(raw: &mut raw::RawConfig, o: &Overrides, p: &mut Problems) {
    if let Some(node) = &o.node {
        raw.node = Some(node.clone());
    }
    if let Some(listen) = &o.proxy_listen {
        let proxy = raw.proxy.get_or_insert_with(Default::default);
        match listen_flag(listen) {
            Ok(Some((first, v6))) => {
                proxy.listen = Some(first.to_string());
                if let Some(v6) = v6 {
                    proxy.listen_v6 = Some(v6.to_string());
                }
            }
            Err(m) => p.push("proxy.listen", format!("--proxy-listen={listen}: {m}")),
            // Not a list of addresses: checked (and reported) as the file's value would be.
            Ok(None) => proxy.listen = Some(listen.clone()),
        }
    }
    for (flag, set) in [
        ("--peers-namespace", o.peers_namespace.is_some()),
        ("--kubeconfig", o.kubeconfig.is_some()),
    ] {
        if set && raw.kubernetes.is_none() {
            p.push(
                "kubernetes",
                format!("{flag} is given, but the config has no kubernetes section"),
            );
        }
    }
    if let Some(k) = raw.kubernetes.as_mut() {
        if let Some(ns) = &o.peers_namespace {
            k.peers_namespace = Some(ns.clone());
        }
        if let Some(path) = &o.kubeconfig {
            k.kubeconfig = Some(path.clone());
        }
    }
}

fn parse_kubernetes(
    raw: raw::RawKubernetes,
    origin: &Origin,
    p: &mut Problems,
) -> Option<KubernetesSection> {
    let before = p.0.len();
    let cgroup_driver = match raw.cgroup_driver.as_deref() {
        None | Some("auto") => CgroupDriverSetting::Auto,
        Some("systemd") => CgroupDriverSetting::Systemd,
        Some("cgroupfs") => CgroupDriverSetting::Cgroupfs,
        Some("none") => CgroupDriverSetting::None,
        Some(other) => {
            p.push(
                "kubernetes.cgroup_driver",
                format!("{other:?}: expected auto, systemd, cgroupfs or none"),
            );
            CgroupDriverSetting::None
        }
    };
    let peers_namespace = match (raw.peers.unwrap_or(false), raw.peers_namespace) {
        (true, None) => {
            p.push(
                "kubernetes.peers",
                "true needs the gateway's namespace: set kubernetes.peers_namespace or pass \
                 --peers-namespace (the DaemonSet passes $(POD_NAMESPACE))",
            );
            None
        }
        (true, Some(ns)) => match check_dns_label(&ns) {
            Ok(()) => Some(ns),
            Err(m) => {
                p.push("kubernetes.peers_namespace", format!("{ns:?} {m}"));
                None
            }
        },
        (false, _) => None,
    };
    let debounce = parse_millis(
        "kubernetes.debounce_ms",
        raw.debounce_ms,
        DEFAULT_KUBE_DEBOUNCE,
        p,
    );
    if debounce > MAX_KUBE_DEBOUNCE {
        p.push(
            "kubernetes.debounce_ms",
            format!(
                "{} is above {} ms: changes would not be enforced within a second",
                debounce.as_millis(),
                MAX_KUBE_DEBOUNCE.as_millis()
            ),
        );
    }
    // A relative kubeconfig is relative to the config file, like the login section's files.
    let kubeconfig = raw.kubeconfig.map(|path| match origin {
        Origin::File(file) if path.is_relative() => file
            .parent()
            .map_or_else(|| path.clone(), |dir| dir.join(&path)),
        _ => path,
    });
    if let Some(path) = &kubeconfig
        && !path.is_file()
    {
        p.push(
            "kubernetes.kubeconfig",
            format!("{}: no such file", path.display()),
        );
    }
    (p.0.len() == before).then_some(KubernetesSection {
        kubeconfig,
        cgroup_driver,
        peers_namespace,
        write_status: raw.write_status.unwrap_or(true),
        debounce,
    })
}

/// An RFC 1123 label (namespace names).
fn check_dns_label(name: &str) -> Result<(), &'static str> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("is not a namespace name (lower-case letters, digits and '-', at most 63)")
    }
}

/// Checks the `login:` section (reading the files it names, so that `check-config` finds a
/// missing secret file), and that every service with `http.login: true` has one to use.
fn parse_login(
    raw: Option<LoginConfig>,
    origin: &Origin,
    services: &[Service],
    p: &mut Problems,
) -> Option<LoginSection> {
    let Some(config) = raw else {
        for (i, s) in services.iter().enumerate() {
            if s.http.as_ref().is_some_and(|h| h.login) {
                p.push(format!("services[{i}].http.login"), LOGIN_NEEDS_SECTION);
            }
        }
        return None;
    };
    let base_dir = match origin {
        Origin::File(path) => path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        Origin::Embedded => PathBuf::from("."),
    };
    let section = LoginSection { config, base_dir };
    let mut ok = true;
    if let Err(err) = section.settings() {
        ok = false;
        match err {
            LoginConfigError::Invalid { field, message } => {
                p.push(format!("login.{field}"), message);
            }
            LoginConfigError::File {
                field,
                path,
                source,
            } => p.push(
                format!("login.{field}"),
                format!("cannot read {}: {source}", path.display()),
            ),
        }
    }
    // The proxy keeps everything under this prefix away from backends and hands it to the
    // login flow; a reserved path elsewhere would be forwarded instead.
    let prefix = crate::proxy::http::authn::RESERVED_PREFIX;
    for (field, path) in [
        ("redirect_path", &section.config.redirect_path),
        ("logout_path", &section.config.logout_path),
        ("login_path", &section.config.login_path),
    ] {
        if !path.starts_with(prefix) || path.len() == prefix.len() {
            ok = false;
            p.push(
                format!("login.{field}"),
                format!("{path:?} must be a path under {prefix} (reserved by the gateway)"),
            );
        }
    }
    ok.then_some(section)
}

#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
}

fn parse_node(node: &str) -> Result<String, String> {
    let node = node.trim();
    if node.is_empty() {
        return Err("must not be empty".into());
    }
    if node.len() > 253 || !node.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "{node:?} is not a node name (at most 253 printable ASCII characters, no spaces)"
        ));
    }
    Ok(node.to_owned())
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    value
        .trim()
        .parse::<SocketAddr>()
        .map(canonical)
        .map_err(|_| {
            format!("{value:?} is not an address:port (e.g. 10.96.0.10:80 or [fd96::10]:80)")
        })
}

/// The port of a `--proxy-listen` address given without one (the `DaemonSet` passes the
/// node's addresses).
pub const DEFAULT_PROXY_PORT: u16 = 15001;

/// `--proxy-listen`: one `address:port`, or a comma-separated list of addresses (`IP:PORT`,
/// `[IPv6]:PORT`, or a bare IP for port [`DEFAULT_PROXY_PORT`]; empty items and repeats are
/// skipped), at most one IPv4 and one IPv6: the listener (IPv4 first) and the IPv6 one next
/// to it. `Ok(None)`: an item that is not an address (the caller reports it as the file's
/// value would be).
fn listen_flag(value: &str) -> Result<Option<(SocketAddr, Option<SocketAddr>)>, String> {
    let (mut v4, mut v6): (Option<SocketAddr>, Option<SocketAddr>) = (None, None);
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let addr = match item.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => match item.parse::<IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, DEFAULT_PROXY_PORT),
                Err(_) => return Ok(None),
            },
        };
        let (slot, family) = if addr.is_ipv4() {
            (&mut v4, "IPv4")
        } else {
            (&mut v6, "IPv6")
        };
        match slot {
            Some(prev) if *prev != addr => {
                return Err(format!(
                    "two {family} addresses ({prev} and {addr}): at most one of each family"
                ));
            }
            _ => *slot = Some(addr),
        }
    }
    match (v4, v6) {
        (None, None) => Err("no address".into()),
        (Some(v4), v6) => Ok(Some((v4, v6))),
        (None, Some(v6)) => Ok(Some((v6, None))),
    }
}

/// An address the kernel redirects to or a protected destination: a real unicast address
/// with a port.
fn parse_unicast_socket_addr(value: &str) -> Result<SocketAddr, String> {
    let addr = parse_socket_addr(value)?;
    if addr.port() == 0 {
        return Err(format!("{value:?}: port 0 is not a destination"));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(format!("{value:?}: {} is not a unicast address", addr.ip()));
    }
    Ok(addr)
}

fn parse_ip(value: &str) -> Result<IpAddr, String> {
    value
        .trim()
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| format!("{value:?} is not an IP address (e.g. 10.77.0.1 or fd77::1)"))
}

fn parse_cidr(value: &str) -> Result<IpNet, String> {
    let value_t = value.trim();
    if value_t.contains('/') {
        value_t
            .parse::<IpNet>()
            .map(|net| net.trunc())
            .map_err(|_| format!("{value:?} is not a CIDR (e.g. 10.77.1.0/24 or fd77:1::/64)"))
    } else {
        parse_ip(value_t)
            .map(IpNet::from)
            .map_err(|_| format!("{value:?} is not a CIDR or an IP address (e.g. 10.77.1.0/24)"))
    }
}

fn parse_mark(value: &serde_yaml::Value) -> Result<u32, String> {
    let parsed = match value {
        serde_yaml::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        serde_yaml::Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16).ok(),
                None => s.parse::<u32>().ok(),
            }
        }
        _ => None,
    };
    match parsed {
        Some(0) => Err(
            "0 is no mark: the kernel could not tell the gateway's own sockets \
                        from the pods' (use e.g. 0x4e47)"
                .into(),
        ),
        Some(mark) => Ok(mark),
        None => Err(format!(
            "{} is not a 32-bit socket mark (an integer or a \"0x...\" string)",
            serde_yaml::to_string(value).map_or_else(|_| "value".into(), |s| s.trim().to_owned())
        )),
    }
}

/// More proxy threads than this is a typo, not a node.
const MAX_PROXY_THREADS: usize = 1024;

fn parse_millis(path: &str, ms: Option<u64>, default: Duration, p: &mut Problems) -> Duration {
    match ms {
        None => default,
        Some(0) => {
            p.push(path, "must be greater than 0");
            default
        }
        Some(ms) => Duration::from_millis(ms),
    }
}

fn parse_proxy(raw: Option<raw::RawProxy>, p: &mut Problems) -> Option<ProxyConfig> {
    let Some(raw) = raw else {
        p.push(
            "proxy",
            "missing: set proxy.listen, the address:port pods are redirected to",
        );
        return None;
    };
    let listen = if let Some(v) = raw.listen.as_deref() {
        parse_unicast_socket_addr(v)
            .map_err(|m| p.push("proxy.listen", m))
            .ok()
    } else {
        p.push(
            "proxy.listen",
            "missing: set the address:port pods are redirected to (e.g. 10.77.0.1:15001)",
        );
        None
    };
    let listen_v6 = match raw.listen_v6.as_deref() {
        None => Ok(None),
        Some(v) => match parse_unicast_socket_addr(v) {
            Ok(SocketAddr::V6(a)) => Ok(Some(a)),
            Ok(SocketAddr::V4(_)) => Err(format!("{v:?} is not an IPv6 address:port")),
            Err(m) => Err(m),
        },
    };
    let listen_v6 = listen_v6.map_err(|m| p.push("proxy.listen_v6", m)).ok();
    if listen.is_some_and(|l| l.is_ipv6()) && listen_v6.flatten().is_some() {
        p.push(
            "proxy.listen_v6",
            "proxy.listen is already IPv6; listen_v6 is the IPv6 listener next to an IPv4 listen",
        );
    }
    let mark = match &raw.mark {
        None => Some(DEFAULT_MARK),
        Some(v) => parse_mark(v).map_err(|m| p.push("proxy.mark", m)).ok(),
    };
    let connect_timeout = parse_millis(
        "proxy.connect_timeout_ms",
        raw.connect_timeout_ms,
        DEFAULT_CONNECT_TIMEOUT,
        p,
    );
    let drain_timeout = parse_millis(
        "proxy.drain_timeout_ms",
        raw.drain_timeout_ms,
        DEFAULT_DRAIN_TIMEOUT,
        p,
    );
    let threads = match raw.threads {
        None => Some(None),
        Some(n) => match usize::try_from(n).ok().and_then(NonZeroUsize::new) {
            Some(n) if n.get() <= MAX_PROXY_THREADS => Some(Some(n)),
            _ => {
                p.push(
                    "proxy.threads",
                    format!("must be 1 to {MAX_PROXY_THREADS}, or absent for one per CPU"),
                );
                None
            }
        },
    };
    Some(ProxyConfig {
        listen: listen?,
        listen_v6: listen_v6?,
        mark: mark?,
        connect_timeout,
        drain_timeout,
        threads: threads?,
    })
}

fn parse_admin(raw: Option<raw::RawAdmin>, p: &mut Problems) -> Option<AdminConfig> {
    let listen = match raw.and_then(|a| a.listen) {
        None => DEFAULT_ADMIN_LISTEN,
        Some(v) => parse_socket_addr(&v)
            .map_err(|m| p.push("admin.listen", m))
            .ok()?,
    };
    Some(AdminConfig { listen })
}

fn parse_gateways(raw: &[String], p: &mut Problems) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::with_capacity(raw.len());
    for (i, v) in raw.iter().enumerate() {
        let path = format!("gateways[{i}]");
        match parse_ip(v) {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
                p.push(path, format!("{v:?} is not a unicast address"));
            }
            Ok(ip) if out.contains(&ip) => p.push(path, format!("{ip} is listed twice")),
            Ok(ip) => out.push(ip),
            Err(m) => p.push(path, m),
        }
    }
    out
}

fn parse_log(raw: raw::RawLog, p: &mut Problems) -> Option<LogConfig> {
    let bypass_lines_per_source = match raw.bypass_lines_per_source {
        None => DEFAULT_BYPASS_LINES_PER_SOURCE,
        Some(0) => {
            p.push(
                "log.bypass_lines_per_source",
                "must be at least 1 (the counters are exact either way)",
            );
            DEFAULT_BYPASS_LINES_PER_SOURCE
        }
        Some(n) => n,
    };
    let bypass_interval = parse_millis(
        "log.bypass_interval_ms",
        raw.bypass_interval_ms,
        DEFAULT_BYPASS_INTERVAL,
        p,
    );
    let decisions_file = match raw.decisions_file {
        Some(f) if f.as_os_str().is_empty() || f.file_name().is_none() => {
            p.push(
                "log.decisions_file",
                format!("{:?} is not a file path", f.display()),
            );
            return None;
        }
        other => other,
    };
    Some(LogConfig {
        decisions_file,
        bypass_lines_per_source,
        bypass_interval,
    })
}

fn check_service_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_SERVICE_NAME_LEN {
        return Err(format!(
            "{name:?} is longer than {MAX_SERVICE_NAME_LEN} bytes"
        ));
    }
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let body_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '/'));
    if !body_ok || !edge_ok(name.chars().next()) || !edge_ok(name.chars().next_back()) {
        return Err(format!(
            "{name:?} is not a service name: lowercase letters, digits, '-', '.' and '/', \
             starting and ending with a letter or digit (e.g. monitoring/grafana)"
        ));
    }
    Ok(())
}

fn parse_services(raw: Vec<raw::RawService>, p: &mut Problems) -> Vec<Service> {
    let mut out = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut ids: HashMap<u32, (usize, String)> = HashMap::new();
    let mut dests: HashMap<SocketAddr, String> = HashMap::new();
    for (i, s) in raw.into_iter().enumerate() {
        let base = format!("services[{i}]");
        let mut ok = true;
        if let Err(m) = check_service_name(&s.name) {
            p.push(format!("{base}.name"), m);
            ok = false;
        } else if let Some(first) = names.get(&s.name) {
            p.push(
                format!("{base}.name"),
                format!("{:?} is already the name of services[{first}]", s.name),
            );
            ok = false;
        }
        let id = service_id(&s.name);
        if ok {
            names.insert(s.name.clone(), i);
            if let Some((first, other)) = ids.get(&id) {
                p.push(
                    format!("{base}.name"),
                    format!(
                        "{:?} has the same service id ({id:#010x}) as services[{first}] {other:?}; \
                         rename one of them",
                        s.name
                    ),
                );
            } else {
                ids.insert(id, (i, s.name.clone()));
            }
        }
        let mut parse_dests = |field: &str, values: &[String]| {
            let mut list = Vec::with_capacity(values.len());
            for (j, v) in values.iter().enumerate() {
                let path = format!("{base}.{field}[{j}]");
                match parse_unicast_socket_addr(v) {
                    Ok(addr) => {
                        if let Some(first) = dests.get(&addr) {
                            p.push(
                                path,
                                format!(
                                    "{addr} is already protected by {first}; a destination \
                                     belongs to exactly one service"
                                ),
                            );
                        } else {
                            dests.insert(addr, path);
                            list.push(addr);
                        }
                    }
                    Err(m) => p.push(path, m),
                }
            }
            list
        };
        let vips = parse_dests("vips", &s.vips);
        let endpoints = parse_dests("endpoints", &s.endpoints);
        let mut allow_sources = Vec::with_capacity(s.allow_sources.len());
        for (j, v) in s.allow_sources.iter().enumerate() {
            match parse_cidr(v) {
                Ok(net) => allow_sources.push(net),
                Err(m) => p.push(format!("{base}.allow_sources[{j}]"), m),
            }
        }
        let mut http = parse_http(&base, s.http, s.policy.as_ref(), p);
        parse_tls(
            &base,
            s.tls,
            s.upstream_tls,
            s.policy.is_some(),
            http.as_mut(),
            p,
        );
        out.push(Service {
            id,
            name: s.name,
            mode: s.mode.unwrap_or(Mode::Enforce),
            vips,
            endpoints,
            rule: L4Rule { allow_sources },
            http,
        });
    }
    out
}

fn parse_http(
    base: &str,
    raw: Option<raw::RawHttp>,
    policy: Option<&serde_yaml::Value>,
    p: &mut Problems,
) -> Option<HttpService> {
    let Some(policy) = policy else {
        if raw.is_some() {
            p.push(
                format!("{base}.http"),
                "set without a `policy`: a service is an HTTP service when it has a policy \
                 (without one, every request would be denied)",
            );
        }
        return None;
    };
    let policy = match ServicePolicy::from_value(policy, &format!("{base}.policy")) {
        Ok(policy) => Arc::new(policy),
        Err(message) => {
            // The message starts with the path of the offending field.
            match message.split_once(": ") {
                Some((path, rest)) if path.starts_with(base) => p.push(path, rest),
                _ => p.push(format!("{base}.policy"), message),
            }
            return None;
        }
    };
    let raw = raw.unwrap_or(raw::RawHttp {
        hosts: Vec::new(),
        identity_headers: false,
        login: false,
    });
    Some(HttpService {
        hosts: parse_hosts(base, &raw.hosts, p),
        identity_headers: raw.identity_headers,
        login: raw.login,
        policy,
        tls: None,
        upstream_tls: None,
    })
}

/// `tls:` and `upstream_tls:` of an HTTP service: the files are read and checked now, so that
/// `check-config` finds a missing file, a bad PEM or a key that does not match its certificate.
fn parse_tls(
    base: &str,
    tls: Option<raw::RawTls>,
    upstream: Option<raw::RawUpstreamTls>,
    has_policy: bool,
    http: Option<&mut HttpService>,
    p: &mut Problems,
) {
    if !has_policy {
        for (field, set) in [("tls", tls.is_some()), ("upstream_tls", upstream.is_some())] {
            if set {
                p.push(
                    format!("{base}.{field}"),
                    "set without a `policy`: TLS is terminated for HTTP services only (a \
                     service without a policy passes TLS through under its L4 rule)",
                );
            }
        }
        return;
    }
    // A policy that did not parse was reported already.
    let Some(http) = http else { return };
    (http.tls, http.upstream_tls) = load_tls(base, tls, upstream, &http.hosts, p);
}

/// Loads a `tls:` (served for `hosts`) and an `upstream_tls:` section; a problem is reported
/// under `base` and leaves its half `None`.
fn load_tls(
    base: &str,
    tls: Option<raw::RawTls>,
    upstream: Option<raw::RawUpstreamTls>,
    hosts: &[String],
    p: &mut Problems,
) -> (Option<Arc<ServerTls>>, Option<Arc<UpstreamTls>>) {
    let server = tls.and_then(|raw| {
        let loaded = ServerTlsFiles::new(
            raw.cert_file,
            raw.key_file,
            raw.client_ca_file,
            raw.client_crl_file,
            raw.client_cert,
        )
        .and_then(|files| ServerTls::load(files, hosts.to_vec()));
        match loaded {
            Ok(tls) => Some(Arc::new(tls)),
            Err(e) => {
                p.push(format!("{base}.tls.{}", e.field()), e.to_string());
                None
            }
        }
    });
    let upstream = upstream.and_then(|raw| {
        let loaded = UpstreamTls::load(UpstreamTlsFiles {
            ca_file: raw.ca_file,
            server_name: raw.server_name,
            cert_file: raw.cert_file,
            key_file: raw.key_file,
        });
        match loaded {
            Ok(tls) => Some(Arc::new(tls)),
            Err(e) => {
                p.push(format!("{base}.upstream_tls.{}", e.field()), e.to_string());
                None
            }
        }
    });
    (server, upstream)
}

/// `kubernetes.services`: keyed by `namespace/name` (RFC 1123 labels); the same `http`, `tls`
/// and `upstream_tls` keys as a static service, checked the same way.
fn parse_kube_services(
    raw: BTreeMap<String, raw::RawKubeService>,
    has_login: bool,
    p: &mut Problems,
) -> BTreeMap<String, KubeServiceSettings> {
    let mut out = BTreeMap::new();
    for (key, s) in raw {
        let base = format!("kubernetes.services[{key:?}]");
        let named = key
            .split_once('/')
            .filter(|(ns, name)| check_dns_label(ns).is_ok() && check_dns_label(name).is_ok());
        if named.is_none() {
            p.push(
                base,
                "is not `namespace/name` of a Service (lower-case letters, digits and '-')",
            );
            continue;
        }
        let http = s.http.unwrap_or(raw::RawHttp {
            hosts: Vec::new(),
            identity_headers: false,
            login: false,
        });
        let hosts = parse_hosts(&base, &http.hosts, p);
        if http.login && !has_login {
            p.push(format!("{base}.http.login"), LOGIN_NEEDS_SECTION);
        }
        let (tls, upstream_tls) = load_tls(&base, s.tls, s.upstream_tls, &hosts, p);
        out.insert(
            key,
            KubeServiceSettings {
                hosts,
                identity_headers: http.identity_headers,
                login: http.login,
                tls,
                upstream_tls,
            },
        );
    }
    out
}

/// `http.hosts` of a service (`base`): lower case, checked; each bad one reported.
fn parse_hosts(base: &str, hosts: &[String], p: &mut Problems) -> Vec<String> {
    let mut out = Vec::with_capacity(hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        match parse_host_name(h) {
            Ok(h) => out.push(h),
            Err(m) => p.push(format!("{base}.http.hosts[{i}]"), m),
        }
    }
    out
}

/// A service with `http.login: true` in a config without a `login:` section.
const LOGIN_NEEDS_SECTION: &str = "browser login needs the top-level `login:` section (issuer, \
                                   client_id, client_secret or client_secret_file, hosts)";

fn parse_host_name(value: &str) -> Result<String, String> {
    let lower = value.trim().trim_end_matches('.').to_ascii_lowercase();
    let name = lower.strip_prefix("*.").unwrap_or(&lower);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{value:?} is not a host name (e.g. grafana.example.com or *.example.com; no port)"
        ));
    }
    Ok(lower)
}

fn parse_workloads(raw: Vec<raw::RawWorkload>, p: &mut Problems) -> Vec<StaticWorkload> {
    let mut out: Vec<StaticWorkload> = Vec::with_capacity(raw.len());
    let mut by_cgroup: HashMap<u64, usize> = HashMap::new();
    for (i, w) in raw.into_iter().enumerate() {
        let base = format!("workloads[{i}]");
        for (field, value) in [
            ("namespace", &w.namespace),
            ("service_account", &w.service_account),
        ] {
            if value.is_empty() || value.len() > 253 || !value.chars().all(|c| c.is_ascii_graphic())
            {
                p.push(
                    format!("{base}.{field}"),
                    format!("{value:?} is not a Kubernetes name"),
                );
            }
        }
        let mut addresses = Vec::with_capacity(w.addresses.len());
        for (j, a) in w.addresses.iter().enumerate() {
            match parse_cidr(a) {
                Ok(net) => {
                    if let Some((k, _)) = out
                        .iter()
                        .enumerate()
                        .find(|(_, o)| o.addresses.iter().any(|n| nets_overlap(n, &net)))
                    {
                        p.push(
                            format!("{base}.addresses[{j}]"),
                            format!(
                                "{net} overlaps an address of workloads[{k}]: a source address \
                                 must name one workload"
                            ),
                        );
                    }
                    addresses.push(net);
                }
                Err(m) => p.push(format!("{base}.addresses[{j}]"), m),
            }
        }
        let cgroup_id = match &w.cgroup {
            None => None,
            Some(path) => match cgroup_id_of(path) {
                Ok(id) => {
                    if let Some(first) = by_cgroup.insert(id, i) {
                        p.push(
                            format!("{base}.cgroup"),
                            format!(
                                "{} is also the cgroup of workloads[{first}]",
                                path.display()
                            ),
                        );
                    }
                    Some(id)
                }
                Err(m) => {
                    p.push(format!("{base}.cgroup"), m);
                    None
                }
            },
        };
        if w.cgroup.is_none() && addresses.is_empty() {
            p.push(
                base.clone(),
                "give `cgroup` and/or `addresses`: how else would a request be matched to it?",
            );
        }
        out.push(StaticWorkload {
            namespace: w.namespace,
            service_account: w.service_account,
            pod: w.pod,
            labels: w.labels,
            addresses,
            cgroup: w.cgroup,
            cgroup_id,
        });
    }
    out
}

fn nets_overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The cgroup v2 id the kernel reports (`bpf_get_current_cgroup_id`) is the kernfs node id,
/// which is the inode number of the cgroup's directory.
fn cgroup_id_of(path: &Path) -> Result<u64, String> {
    use std::os::unix::fs::MetadataExt as _;
    if !path.is_absolute() {
        return Err(format!(
            "{:?} must be an absolute path to a cgroup v2 directory",
            path.display()
        ));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(m.ino()),
        Ok(_) => Err(format!("{} is not a directory", path.display())),
        Err(err) => Err(format!(
            "cannot resolve {} to a cgroup id: {err} (the cgroup must exist when the config \
             is loaded; reload after the pod started)",
            path.display()
        )),
    }
}

fn parse_assertion(raw: Option<raw::RawAssertion>, p: &mut Problems) -> AssertionConfig {
    let mut out = AssertionConfig::default();
    let Some(raw) = raw else {
        return out;
    };
    if let Some(issuer) = raw.issuer {
        if issuer.is_empty() || !issuer.chars().all(|c| c.is_ascii_graphic()) {
            p.push(
                "assertion.issuer",
                format!("{issuer:?} is not an issuer name"),
            );
        }
        out.issuer = issuer;
    }
    if let Some(ttl) = raw.ttl_s {
        if ttl == 0 || ttl > MAX_ASSERTION_TTL.as_secs() {
            p.push(
                "assertion.ttl_s",
                format!(
                    "{ttl} must be between 1 and {} seconds",
                    MAX_ASSERTION_TTL.as_secs()
                ),
            );
        } else {
            out.ttl = Duration::from_secs(ttl);
        }
    }
    if let Some(prefix) = raw.audience_prefix {
        if !prefix.chars().all(|c| c.is_ascii_graphic()) {
            p.push(
                "assertion.audience_prefix",
                format!("{prefix:?} must be printable ASCII without spaces"),
            );
        }
        out.audience_prefix = prefix;
    }
    out
}

fn check_cross_fields(
    proxy: &ProxyConfig,
    admin: &AdminConfig,
    gateways: &[IpAddr],
    services: &[Service],
    p: &mut Problems,
) {
    let listeners: HashSet<SocketAddr> = proxy.listeners().into_iter().collect();
    if listeners.contains(&admin.listen) {
        p.push(
            "admin.listen",
            format!("{} is also a proxy listener", admin.listen),
        );
    }
    let mut has_endpoints = false;
    for (i, s) in services.iter().enumerate() {
        has_endpoints |= !s.endpoints.is_empty();
        for (field, list) in [("vips", &s.vips), ("endpoints", &s.endpoints)] {
            for (j, addr) in list.iter().enumerate() {
                let path = format!("services[{i}].{field}[{j}]");
                if listeners.contains(addr) {
                    p.push(
                        path,
                        format!("{addr} is the proxy's own listener and cannot be protected"),
                    );
                } else if addr.is_ipv6() && proxy.v6().is_none() {
                    p.push(
                        path,
                        format!(
                            "{addr} is IPv6 but the proxy has no IPv6 listener \
                             (set proxy.listen_v6)"
                        ),
                    );
                } else if addr.is_ipv4() && proxy.v4().is_none() {
                    p.push(
                        path,
                        format!(
                            "{addr} is IPv4 but the proxy has no IPv4 listener \
                             (make proxy.listen IPv4 and move the IPv6 one to proxy.listen_v6)"
                        ),
                    );
                }
            }
        }
    }
    if has_endpoints && gateways.is_empty() {
        p.push(
            "gateways",
            "empty, but services have endpoints: list the source addresses of the gateway's \
             upstream connections (e.g. the node IP), or nothing could reach the endpoints",
        );
    }
}
