//! Running the gateway on a simulated node: config, lifecycle, decision log, CLI.

use std::{
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::{
    Error, Result, io_err,
    netns::http_get_in_netns,
    node::Node,
    process::{Output, POLL, Proc, run_command},
};

/// Port of the proxy on the node IP.
pub const PROXY_PORT: u16 = 15001;
/// Port of the admin server on the node netns' loopback (each node has its own loopback).
pub const ADMIN_PORT: u16 = 15000;
/// How long `gateway run` may take to answer `/readyz` 200.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of one CLI call (`counters`, `status`, `detach`, `check-config`).
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// Per-service enforcement mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

/// One `services:` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub mode: Mode,
    pub vips: Vec<SocketAddr>,
    pub endpoints: Vec<SocketAddr>,
    /// CIDRs, written as given (so a test can write an invalid one).
    pub allow_sources: Vec<String>,
    /// `http:` (`hosts`, `identity_headers`, `login`), written as given (JSON is YAML).
    pub http: Option<Value>,
    /// `policy:` (deny / allow rules), written as given.
    pub policy: Option<Value>,
}

impl ServiceConfig {
    pub fn new(name: &str, mode: Mode) -> Self {
        Self {
            name: name.to_owned(),
            mode,
            vips: Vec::new(),
            endpoints: Vec::new(),
            allow_sources: Vec::new(),
            http: None,
            policy: None,
        }
    }

    #[must_use]
    pub fn vip(mut self, addr: SocketAddr) -> Self {
        self.vips.push(addr);
        self
    }

    #[must_use]
    pub fn endpoint(mut self, addr: SocketAddr) -> Self {
        self.endpoints.push(addr);
        self
    }

    #[must_use]
    pub fn allow(mut self, cidr: &str) -> Self {
        self.allow_sources.push(cidr.to_owned());
        self
    }

    /// Makes it an HTTP service: `http:` as given (e.g. `{"hosts": ["api.test"]}`).
    #[must_use]
    pub fn http(mut self, http: Value) -> Self {
        self.http = Some(http);
        self
    }

    /// Its `policy:` as given (e.g. `{"allow": [{"id": "ops", "when": {"groups": "ops"}}]}`).
    #[must_use]
    pub fn policy(mut self, policy: Value) -> Self {
        self.policy = Some(policy);
        self
    }
}

/// The gateway's YAML config (docs/ARCHITECTURE.md, README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    pub node: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub proxy_v4: SocketAddr,
    pub proxy_v6: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub gateways: Vec<IpAddr>,
    pub decisions_file: PathBuf,
    pub services: Vec<ServiceConfig>,
    /// `auth:` (issuers), written as given.
    pub auth: Option<Value>,
    /// `workloads:` (static workload identities), written as given.
    pub workloads: Vec<Value>,
    /// Other top-level sections (`login:` ...), written as given, in order.
    pub sections: Vec<(String, Value)>,
    /// `proxy.threads` (absent: one per CPU).
    pub proxy_threads: Option<u32>,
}

impl GatewayConfig {
    pub(crate) fn for_node(node: &Node) -> Self {
        Self {
            node: node.node_name(),
            cgroup: node.pods_cgroup(),
            bpffs: node.bpffs(),
            proxy_v4: SocketAddr::new(IpAddr::V4(node.ipv4()), PROXY_PORT),
            proxy_v6: Some(SocketAddr::new(IpAddr::V6(node.ipv6()), PROXY_PORT)),
            admin: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), ADMIN_PORT),
            gateways: vec![IpAddr::V4(node.ipv4()), IpAddr::V6(node.ipv6())],
            decisions_file: node.dir().join("decisions.log"),
            services: Vec::new(),
            auth: None,
            workloads: Vec::new(),
            sections: Vec::new(),
            proxy_threads: None,
        }
    }

    /// Sets `proxy.threads`.
    #[must_use]
    pub fn proxy_threads(mut self, threads: u32) -> Self {
        self.proxy_threads = Some(threads);
        self
    }

    #[must_use]
    pub fn service(mut self, service: ServiceConfig) -> Self {
        self.services.push(service);
        self
    }

    /// Sets `auth:` (e.g. `{"issuers": [...]}`).
    #[must_use]
    pub fn auth(mut self, auth: Value) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Adds a `workloads:` entry (e.g. `{"namespace": "shop", "service_account": "cart",
    /// "cgroup": "/sys/fs/cgroup/..."}`).
    #[must_use]
    pub fn workload(mut self, workload: Value) -> Self {
        self.workloads.push(workload);
        self
    }

    /// Adds (or replaces) a top-level section `name: value`.
    #[must_use]
    pub fn section(mut self, name: &str, value: Value) -> Self {
        self.sections.retain(|(n, _)| n != name);
        self.sections.push((name.to_owned(), value));
        self
    }

    #[must_use]
    pub fn without_service(mut self, name: &str) -> Self {
        self.services.retain(|s| s.name != name);
        self
    }

    /// The YAML text (strings JSON-quoted, which YAML reads as is).
    pub fn to_yaml(&self) -> String {
        let q = |s: &str| Value::from(s).to_string();
        let list = |items: Vec<String>| {
            format!(
                "[{}]",
                items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
            )
        };
        let mut y = String::new();
        let _ = writeln!(y, "node: {}", q(&self.node));
        let _ = writeln!(y, "cgroup: {}", q(&self.cgroup.to_string_lossy()));
        let _ = writeln!(y, "bpffs: {}", q(&self.bpffs.to_string_lossy()));
        let _ = write!(y, "proxy: {{ listen: {}", q(&self.proxy_v4.to_string()));
        if let Some(v6) = self.proxy_v6 {
            let _ = write!(y, ", listen_v6: {}", q(&v6.to_string()));
        }
        if let Some(threads) = self.proxy_threads {
            let _ = write!(y, ", threads: {threads}");
        }
        let _ = writeln!(y, " }}");
        let _ = writeln!(y, "admin: {{ listen: {} }}", q(&self.admin.to_string()));
        let _ = writeln!(
            y,
            "gateways: {}",
            list(self.gateways.iter().map(ToString::to_string).collect())
        );
        let _ = writeln!(
            y,
            "log: {{ decisions_file: {} }}",
            q(&self.decisions_file.to_string_lossy())
        );
        if self.services.is_empty() {
            y.push_str("services: []\n");
        } else {
            y.push_str("services:\n");
            for s in &self.services {
                let mut extra = String::new();
                if let Some(http) = &s.http {
                    let _ = write!(extra, ", http: {http}");
                }
                if let Some(policy) = &s.policy {
                    let _ = write!(extra, ", policy: {policy}");
                }
                let _ = writeln!(
                    y,
                    "  - {{ name: {}, mode: {}, vips: {}, endpoints: {}, allow_sources: {}{extra} }}",
                    q(&s.name),
                    q(s.mode.as_str()),
                    list(s.vips.iter().map(ToString::to_string).collect()),
                    list(s.endpoints.iter().map(ToString::to_string).collect()),
                    list(s.allow_sources.clone()),
                );
            }
        }
        if let Some(auth) = &self.auth {
            let _ = writeln!(y, "auth: {auth}");
        }
        if !self.workloads.is_empty() {
            let _ = writeln!(y, "workloads: {}", Value::from(self.workloads.clone()));
        }
        for (name, value) in &self.sections {
            let _ = writeln!(y, "{name}: {value}");
        }
        y
    }
}

impl Node {
    /// `10.96.N.host:port`: a service VIP of this node (routed nowhere: only the gateway's
    /// redirect makes it reachable).
    pub fn vip_v4(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, self.index(), host)), port)
    }

    /// `10.N.0.0/16`: the node IP, its pods and the foreign node.
    pub fn cidr_v4(&self) -> String {
        format!("{}/16", Ipv4Addr::new(10, self.index(), 0, 0))
    }

    /// `fd00:N::/32`: the node IP, its pods and the foreign node.
    pub fn cidr_v6(&self) -> String {
        format!(
            "{}/32",
            Ipv6Addr::new(0xfd00, self.index().into(), 0, 0, 0, 0, 0, 0)
        )
    }

    /// `[fd96:N::host]:port`.
    pub fn vip_v6(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(
                0xfd96,
                self.index().into(),
                0,
                0,
                0,
                0,
                0,
                host.into(),
            )),
            port,
        )
    }
}

/// A `gateway run` on a node. Dropping it kills the daemon (the node's drop would too); the
/// pins stay until the node is dropped, as they would on a real node.
pub struct Gateway {
    node: Node,
    config: GatewayConfig,
    config_path: PathBuf,
    proc: Proc,
    /// Run with only these capabilities (`setpriv`), as the `DaemonSet` does; `None`: all of
    /// root's.
    caps: Option<Vec<String>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("node", &self.node.prefix())
            .field("config", &self.config_path)
            .field("proc", &self.proc)
            .field("caps", &self.caps)
            .finish()
    }
}

impl Gateway {
    pub(crate) fn start(node: &Node, config: GatewayConfig) -> Result<Self> {
        Self::start_with_caps(node, config, None)
    }

    /// Like [`Self::start`], the daemon (and its restarts) holding only `caps` (capability
    /// names as `setpriv` spells them, e.g. `bpf`, `net_admin`): root's other capabilities
    /// are removed from its bounding set, so it runs as the `DaemonSet`'s container would.
    pub(crate) fn start_with_caps(
        node: &Node,
        config: GatewayConfig,
        caps: Option<Vec<String>>,
    ) -> Result<Self> {
        node.tools().require_gateway()?;
        let config_path = node.dir().join("gateway.yaml");
        write_file(&config_path, &config.to_yaml())?;
        let proc = spawn(node, &config_path, caps.as_deref())?;
        let gateway = Self {
            node: node.clone(),
            config,
            config_path,
            proc,
            caps,
        };
        gateway.wait_ready()?;
        Ok(gateway)
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// The current daemon's stdout (its decision lines and logs).
    pub fn stdout(&self) -> String {
        self.proc.stdout()
    }

    /// The current daemon's stderr.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// Polls `/readyz` in the node netns until 200; fails with the daemon's stderr if it exits
    /// or does not get ready in time.
    pub fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.proc.try_wait() {
                return Err(Error::Gateway(format!(
                    "exited ({status}) before /readyz answered 200; stderr:\n{}\nstdout:\n{}",
                    self.stderr(),
                    self.stdout()
                )));
            }
            let last = match self.admin_get("/readyz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("HTTP {code}: {body}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::Gateway(format!(
                    "/readyz not 200 after {}s (last: {last}); stderr:\n{}",
                    READY_TIMEOUT.as_secs(),
                    self.stderr()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET path` on the admin server (inside the node netns).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        http_get_in_netns(
            self.node.node_netns(),
            self.config.admin,
            path,
            Duration::from_secs(2),
        )
    }

    /// `GET /metrics` (Prometheus text).
    pub fn metrics(&self) -> Result<String> {
        match self.admin_get("/metrics")? {
            (200, body) => Ok(body),
            (code, body) => Err(Error::Gateway(format!("/metrics answered {code}: {body}"))),
        }
    }

    /// SIGKILL the daemon and reap it. Pins and links stay, as after a crash.
    pub fn kill9(&self) -> Option<ExitStatus> {
        self.proc.kill()
    }

    /// SIGTERM, then wait up to `timeout` (SIGKILL after it). Returns the exit status.
    pub fn stop(&self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.signal(libc::SIGTERM);
        let status = self.proc.wait_timeout(timeout);
        if status.is_none() {
            self.proc.kill();
        }
        status
    }

    /// Kills the daemon if it runs, starts it again with the current config file, and waits
    /// until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = spawn(&self.node, &self.config_path, self.caps.as_deref())?;
        self.wait_ready()
    }

    /// Kills the daemon if it runs and starts it again with the current config file, without
    /// waiting for `/readyz` (for a daemon that is expected not to get ready yet).
    pub fn respawn(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = spawn(&self.node, &self.config_path, self.caps.as_deref())?;
        Ok(())
    }

    /// Rewrites the config file with `config` (no signal: for a daemon that is down, or to
    /// test the file watch).
    pub fn write_config(&mut self, config: GatewayConfig) -> Result<()> {
        write_file(&self.config_path, &config.to_yaml())?;
        self.config = config;
        Ok(())
    }

    /// Rewrites the config file with raw text (e.g. one that does not parse).
    pub fn write_config_text(&self, text: &str) -> Result<()> {
        write_file(&self.config_path, text)
    }

    /// Sends SIGHUP (reload the config file).
    pub fn sighup(&self) -> Result<()> {
        if self.proc.signal(libc::SIGHUP) {
            Ok(())
        } else {
            Err(Error::Gateway(format!(
                "not running, cannot SIGHUP; stderr:\n{}",
                self.stderr()
            )))
        }
    }

    /// Rewrites the config file with `config` and sends SIGHUP. The caller waits for the effect
    /// (e.g. with [`Self::status`] and [`poll_until`]).
    pub fn reload(&mut self, config: GatewayConfig) -> Result<()> {
        self.write_config(config)?;
        self.sighup()
    }

    /// Every complete line of the decision file, parsed.
    pub fn decisions(&self) -> Result<Vec<Value>> {
        let text = match fs::read_to_string(&self.config.decisions_file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(io_err(format!(
                    "read {}",
                    self.config.decisions_file.display()
                ))(e));
            }
        };
        // A line still being written has no newline yet.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line).map_err(|e| Error::Parse {
                    what: format!("decision line in {}", self.config.decisions_file.display()),
                    detail: format!("{e}: {line}"),
                })
            })
            .collect()
    }

    /// Waits for the first decision line that satisfies `pred`.
    pub fn wait_decision(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        poll_until(&format!("a decision line {what}"), timeout, || {
            Ok(self.decisions()?.into_iter().find(|d| pred(d)))
        })
        .map_err(|e| match e {
            Error::Timeout { what, seconds } => Error::Timeout {
                what: format!("{what}; decision lines so far:\n{}", self.decision_text()),
                seconds,
            },
            other => other,
        })
    }

    /// The raw decision file, for failure messages.
    pub fn decision_text(&self) -> String {
        fs::read_to_string(&self.config.decisions_file).unwrap_or_default()
    }

    /// Runs `gateway ARGS...` (the CLI) in the test's own namespaces.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(self.node.tools().require_gateway()?);
        cmd.args(args);
        run_command(cmd, CLI_TIMEOUT)
    }

    /// `gateway counters --json --bpffs DIR`.
    pub fn counters(&self) -> Result<Counters> {
        let bpffs = self.config.bpffs.to_string_lossy().into_owned();
        Ok(Counters(
            self.cli(&["counters", "--json", "--bpffs", &bpffs])?
                .ok()?
                .json()?,
        ))
    }

    /// `gateway status --json --bpffs DIR`.
    pub fn status(&self) -> Result<Value> {
        let bpffs = self.config.bpffs.to_string_lossy().into_owned();
        self.cli(&["status", "--json", "--bpffs", &bpffs])?
            .ok()?
            .json()
    }

    /// `gateway status --json --config FILE`, run inside the node netns where the admin server
    /// listens: the pinned state plus `daemon` (its readiness and, with a Kubernetes source,
    /// the source's health under `daemon.kubernetes`).
    pub fn status_with_daemon(&self) -> Result<Value> {
        let mut cmd = Command::new(self.node.tools().require_gateway()?);
        cmd.args(["status", "--json", "--config"])
            .arg(&self.config_path);
        self.node.node().run(cmd, CLI_TIMEOUT)?.ok()?.json()
    }

    /// `gateway detach --bpffs DIR`.
    pub fn detach(&self) -> Result<Output> {
        let bpffs = self.config.bpffs.to_string_lossy().into_owned();
        self.cli(&["detach", "--bpffs", &bpffs])?.ok()
    }
}

fn spawn(node: &Node, config_path: &Path, caps: Option<&[String]>) -> Result<Proc> {
    let gateway = node.tools().require_gateway()?;
    let mut cmd = match caps {
        None => Command::new(gateway),
        Some(caps) => with_only_caps(caps, gateway),
    };
    cmd.arg("run")
        .arg("--config")
        .arg(config_path)
        .env("RUST_BACKTRACE", "1");
    node.spawn_gateway_process("gateway", cmd)
}

/// `program` run holding only `caps` (`setpriv` names, e.g. `bpf`): root's other
/// capabilities are removed from its bounding set, none is inheritable.
pub fn with_only_caps(caps: &[impl AsRef<str>], program: &Path) -> Command {
    let set = caps.iter().fold(String::new(), |mut set, c| {
        let _ = write!(set, ",+{}", c.as_ref());
        set
    });
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all{set}"))
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(program);
    cmd
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    // Write then rename, so a reload never reads half a file.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(io_err(format!("write {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!(
        "rename {} to {}",
        tmp.display(),
        path.display()
    )))
}

/// Calls `probe` every 20 ms until it returns `Some`, an error, or `timeout` passes.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_owned(),
                seconds: timeout.as_secs_f64(),
            });
        }
        thread::sleep(POLL);
    }
}

/// `gateway counters --json` output (`ebpf::inspect::Counters`).
#[derive(Debug, Clone, PartialEq)]
pub struct Counters(pub Value);

impl Counters {
    /// The `bypass` rows.
    pub fn rows(&self) -> &[Value] {
        self.0
            .get("bypass")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice)
    }

    /// Sum of `field` (`syns`, `packets`, `bytes`) over rows matching service, source, reason
    /// and action; 0 if none.
    pub fn sum(
        &self,
        field: &str,
        service: &str,
        source: IpAddr,
        reason: &str,
        action: &str,
    ) -> u64 {
        self.rows()
            .iter()
            .filter(|r| {
                r.get("service").and_then(Value::as_str) == Some(service)
                    && r.get("source")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<IpAddr>().ok())
                        == Some(source)
                    && r.get("reason").and_then(Value::as_str) == Some(reason)
                    && r.get("action").and_then(Value::as_str) == Some(action)
            })
            .filter_map(|r| r.get(field).and_then(Value::as_u64))
            .sum()
    }

    /// SYNs counted for (service, source, reason, action).
    pub fn syns(&self, service: &str, source: IpAddr, reason: &str, action: &str) -> u64 {
        self.sum("syns", service, source, reason, action)
    }

    /// A program statistic (`stats.<name>`), 0 if absent.
    pub fn stat(&self, name: &str) -> u64 {
        self.0
            .get("stats")
            .and_then(|s| s.get(name))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

/// The value of one series in Prometheus text, e.g.
/// `metric_value(text, r#"nodegate_connections_total{service="web",decision="allow",reason="source_allowed"}"#)`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `bpftool cgroup show DIR --json`: the programs the kernel has attached directly to `dir`.
pub fn bpftool_cgroup_show(dir: &Path) -> Result<Vec<Value>> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["cgroup", "show"]).arg(dir).arg("--json");
    let out = run_command(cmd, CLI_TIMEOUT)?.ok()?;
    if out.stdout.trim().is_empty() {
        return Ok(Vec::new());
    }
    match out.json()? {
        Value::Array(items) => Ok(items),
        other => Err(Error::Parse {
            what: out.command,
            detail: format!("not a JSON array: {other}"),
        }),
    }
}

/// Ids of every BPF program loaded in the kernel (`bpftool prog show --json`).
pub fn bpftool_prog_ids() -> Result<std::collections::BTreeSet<u64>> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["prog", "show", "--json"]);
    let out = run_command(cmd, CLI_TIMEOUT)?.ok()?;
    if out.stdout.trim().is_empty() {
        return Ok(std::collections::BTreeSet::new());
    }
    match out.json()? {
        Value::Array(items) => Ok(items.iter().filter_map(|p| p.get("id")?.as_u64()).collect()),
        other => Err(Error::Parse {
            what: out.command,
            detail: format!("not a JSON array: {other}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GatewayConfig {
        GatewayConfig {
            node: "sim-x".to_owned(),
            cgroup: PathBuf::from("/sys/fs/cgroup/unified/ngx/pods"),
            bpffs: PathBuf::from("/sys/fs/bpf/ngx"),
            proxy_v4: "10.7.0.1:15001".parse().expect("addr"),
            proxy_v6: Some("[fd00:7::1]:15001".parse().expect("addr")),
            admin: "127.0.0.1:15000".parse().expect("addr"),
            gateways: vec![
                "10.7.0.1".parse().expect("ip"),
                "fd00:7::1".parse().expect("ip"),
            ],
            decisions_file: PathBuf::from("/tmp/d.log"),
            services: vec![
                ServiceConfig::new("web", Mode::Enforce)
                    .vip("10.96.7.10:80".parse().expect("addr"))
                    .vip("[fd96:7::10]:80".parse().expect("addr"))
                    .endpoint("10.7.1.11:8080".parse().expect("addr"))
                    .allow("10.7.0.0/16"),
            ],
            auth: None,
            workloads: Vec::new(),
            sections: Vec::new(),
            proxy_threads: None,
        }
    }

    #[test]
    fn yaml_has_the_documented_shape() {
        assert_eq!(
            sample().to_yaml(),
            r#"node: "sim-x"
cgroup: "/sys/fs/cgroup/unified/ngx/pods"
bpffs: "/sys/fs/bpf/ngx"
proxy: { listen: "10.7.0.1:15001", listen_v6: "[fd00:7::1]:15001" }
admin: { listen: "127.0.0.1:15000" }
gateways: ["10.7.0.1", "fd00:7::1"]
log: { decisions_file: "/tmp/d.log" }
services:
  - { name: "web", mode: "enforce", vips: ["10.96.7.10:80", "[fd96:7::10]:80"], endpoints: ["10.7.1.11:8080"], allow_sources: ["10.7.0.0/16"] }
"#
        );
        let empty = sample().without_service("web");
        assert!(empty.to_yaml().ends_with("services: []\n"));
    }

    #[test]
    fn http_policy_auth_and_workloads_are_written_as_json() {
        let mut config = sample();
        config.services[0] = config.services[0]
            .clone()
            .http(serde_json::json!({"hosts": ["api.test"]}))
            .policy(serde_json::json!({"allow": [{"id": "ops", "when": {"groups": "ops"}}]}));
        let config = config
            .auth(serde_json::json!({"issuers": []}))
            .workload(serde_json::json!({"namespace": "ns", "service_account": "sa"}));
        let yaml = config.to_yaml();
        assert!(
            yaml.contains(r#"allow_sources: ["10.7.0.0/16"], http: {"hosts":["api.test"]}, policy: {"allow":[{"id":"ops","when":{"groups":"ops"}}]} }"#),
            "{yaml}"
        );
        assert!(
            yaml.ends_with("auth: {\"issuers\":[]}\nworkloads: [{\"namespace\":\"ns\",\"service_account\":\"sa\"}]\n"),
            "{yaml}"
        );
    }

    #[test]
    fn metric_values_are_found_by_exact_series() {
        let text =
            "# TYPE x counter\nx_total{a=\"1\"} 3\nx_total{a=\"10\"} 5\nx_total 7 1700000000\n";
        assert_eq!(metric_value(text, r#"x_total{a="1"}"#), Some(3.0));
        assert_eq!(metric_value(text, r#"x_total{a="10"}"#), Some(5.0));
        assert_eq!(metric_value(text, "x_total"), Some(7.0));
        assert_eq!(metric_value(text, "x"), None);
    }

    #[test]
    fn counters_sum_matching_rows_only() {
        let c = Counters(serde_json::json!({
            "bypass": [
                {"service": "web", "source": "10.7.250.2", "reason": "not_from_gateway", "action": "dropped", "syns": 2, "packets": 3},
                {"service": "web", "source": "10.7.250.2", "reason": "not_from_gateway", "action": "passed", "syns": 5, "packets": 5},
                {"service": "web", "source": "fd00:7:250::2", "reason": "not_from_gateway", "action": "dropped", "syns": 7, "packets": 7},
                {"service": "api", "source": "10.7.250.2", "reason": "not_from_gateway", "action": "dropped", "syns": 11, "packets": 11},
            ],
            "stats": {"connect_redirects": 4},
        }));
        let v4: IpAddr = "10.7.250.2".parse().expect("ip");
        let v6: IpAddr = "fd00:7:250:0::2".parse().expect("ip");
        assert_eq!(c.syns("web", v4, "not_from_gateway", "dropped"), 2);
        assert_eq!(
            c.sum("packets", "web", v4, "not_from_gateway", "dropped"),
            3
        );
        assert_eq!(c.syns("web", v6, "not_from_gateway", "dropped"), 7);
        assert_eq!(c.syns("db", v4, "not_from_gateway", "dropped"), 0);
        assert_eq!(c.stat("connect_redirects"), 4);
        assert_eq!(c.stat("missing"), 0);
    }
}
