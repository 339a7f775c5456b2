//! Side by side with Envoy and nginx on a simulated node (root, real kernel): `cargo xtask
//! bench http` / `cargo xtask bench scale` (and `cargo xtask bench`, which runs everything),
//! which write docs/BENCHMARKS.md from the JSON this writes.
//!
//! * `http`: HTTP/1.1 keep-alive (then h2c, and TLS where the proxy terminates it) through
//!   each proxy under test, pinned to core 0, from a load generator pinned to core 1 in the
//!   client pod, to an nginx `return 200` backend in the backend pod (also on core 1, so
//!   that core 0 is the proxy's alone). Targets: the backend directly; the gateway (its
//!   redirect: the client dials the service VIP) with a bearer JWT from a static-JWKS issuer
//!   and a 100-rule policy whose last rule allows the token's `groups`; Envoy with
//!   `jwt_authn` (without and with `jwt_cache_config`) and RBAC on the same claim; nginx
//!   `proxy_pass` with upstream keep-alive. Three trials, each in a rotated order; per
//!   target: wrk/h2load max rate, oha at 1000 req/s with latency correction, the proxy's
//!   CPU seconds per 1000 requests (utime+stime) and its RSS idle and with 10,000 idle
//!   keep-alive connections.
//! * `scale`: the kernel programs' cost per connect and per packet (kernel BPF statistics)
//!   with 10, 1,000 and 10,000 protected services loaded through the config.

#[path = "../datapath/bpf_stats.rs"]
mod bpf_stats;
#[path = "../datapath/cgroup.rs"]
mod cgroup;
mod hold;
mod load;
#[path = "../datapath/netns_worker.rs"]
mod netns_worker;
mod peers;
mod procfs;
mod scale;
#[path = "../datapath/server.rs"]
mod server;
#[path = "../datapath/wire.rs"]
#[allow(
    dead_code,
    reason = "shared with the datapath bench, which uses all of it"
)]
mod wire;

use std::{
    env, fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use load::{Load, Proto};
use nodegate_tests::harness::{
    Gateway, GatewayConfig, Mode, Node, NodeSpec, Place, Proc, ServiceConfig, TokenSpec, Tools,
    oidc, workspace_dir,
};
use serde_json::{Value, json};

const QUICK_ENV: &str = "NODEGATE_BENCH_QUICK";
/// Comma-separated passes to run: `http`, `scale` (default both).
const PASSES_ENV: &str = "NODEGATE_BENCH_PASSES";
/// Where the JSON goes (default `target/nodegate-bench/peers.json`).
const OUT_ENV: &str = "NODEGATE_PEERS_OUT";
/// Paths of the tools `cargo xtask bench` installs outside PATH.
const OHA_ENV: &str = "NODEGATE_BENCH_OHA";
const ENVOY_ENV: &str = "NODEGATE_BENCH_ENVOY";
/// The hyper pass-through (default: the release build of `gateway/examples/hyper_floor.rs`).
const HYPER_FLOOR_ENV: &str = "NODEGATE_BENCH_HYPER_FLOOR";

const CLIENT: &str = "client";
const BACKEND: &str = "backend";
const SERVICE: &str = "bench";
const ISSUER: &str = "https://issuer.bench.nodegate.test";
const AUDIENCE: &str = "nodegate";
/// The proxy under test's core.
const PROXY_CPU: usize = 0;

fn main() -> ExitCode {
    if let Some(spec) = env::var_os(hold::ROLE_ENV) {
        return hold::run(&spec.to_string_lossy());
    }
    if let Some(addrs) = env::var_os(server::ROLE_ENV) {
        return server::run(&addrs.to_string_lossy());
    }
    let quick = env::var_os(QUICK_ENV).is_some();
    let passes = env::var(PASSES_ENV).unwrap_or_else(|_| "http,scale".to_owned());
    let out = env::var_os(OUT_ENV).map_or_else(
        || workspace_dir().join("target/nodegate-bench/peers.json"),
        PathBuf::from,
    );
    if let Err(e) = procfs::raise_nofile() {
        eprintln!("bench: raising the open-file limit: {e}");
    }
    let load_start = procfs::load_average();
    let mut results = json!({
        "quick": quick,
        "started_unix": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "environment": environment(),
    });
    // Written after each pass, so that a later pass failing keeps the earlier results.
    let write = |results: &Value| -> Result<(), String> {
        if let Some(dir) = out.parent() {
            let _ = fs::create_dir_all(dir);
        }
        fs::write(
            &out,
            serde_json::to_string_pretty(results).unwrap_or_default(),
        )
        .map_err(|e| format!("writing {}: {e}", out.display()))
    };
    let mut failed = false;
    for pass in passes.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let outcome = match pass {
            "http" => http_pass(quick),
            "scale" => scale::run(quick),
            other => Err(format!("unknown pass {other:?} (http, scale)")),
        };
        match outcome {
            Ok(value) => results[pass] = value,
            Err(e) => {
                eprintln!("bench: the {pass} pass failed: {e}");
                results[pass] = json!({ "error": e });
                failed = true;
            }
        }
        results["load_average"] = json!({ "start": load_start, "end": procfs::load_average() });
        if let Err(e) = write(&results) {
            eprintln!("bench: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("bench: results written to {}", out.display());
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// How long each part runs.
struct Plan {
    trials: usize,
    warm_up: Duration,
    max_for: Duration,
    fixed_for: Duration,
    /// Max-rate and fixed-rate durations for h2c and TLS.
    other_for: Duration,
    max_connections: u32,
    fixed_connections: u32,
    fixed_rate: u32,
    idle_connections: usize,
}

impl Plan {
    const FULL: Self = Self {
        trials: 3,
        warm_up: Duration::from_secs(2),
        max_for: Duration::from_secs(10),
        fixed_for: Duration::from_secs(10),
        other_for: Duration::from_secs(5),
        max_connections: 64,
        fixed_connections: 16,
        fixed_rate: 1000,
        idle_connections: 10_000,
    };
    const QUICK: Self = Self {
        trials: 1,
        warm_up: Duration::from_secs(1),
        max_for: Duration::from_secs(2),
        fixed_for: Duration::from_secs(2),
        other_for: Duration::from_secs(1),
        max_connections: 64,
        fixed_connections: 16,
        fixed_rate: 1000,
        idle_connections: 1_000,
    };
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Direct,
    Gateway,
    Envoy,
    EnvoyCached,
    Nginx,
    /// The gateway's layers, HTTP/1.1 only (what the full gateway's cost is made of): the same
    /// service as an L4 rule (the kernel redirect and a byte copy, no HTTP) ...
    GatewayL4,
    /// ... and as HTTP with one rule that allows anonymous `GET`, requests sent without a
    /// token (hyper on both sides, the framing guard, the canonical path, the decision line,
    /// the identity assertion; no token check, a 1-rule policy).
    GatewayAnon,
    /// Not the gateway: hyper's server and client passing requests through and nothing else
    /// (`gateway/examples/hyper_floor.rs`), the floor of any proxy built on hyper.
    HyperFloor,
}

const TARGETS: [Target; 8] = [
    Target::Direct,
    Target::Gateway,
    Target::Envoy,
    Target::EnvoyCached,
    Target::Nginx,
    Target::GatewayL4,
    Target::GatewayAnon,
    Target::HyperFloor,
];
const PROTOS: [Proto; 4] = [Proto::H1, Proto::H2c, Proto::H1Tls, Proto::H2Tls];

impl Target {
    fn id(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Gateway => "gateway",
            Self::Envoy => "envoy",
            Self::EnvoyCached => "envoy_cached",
            Self::Nginx => "nginx",
            Self::GatewayL4 => "gateway_l4",
            Self::GatewayAnon => "gateway_anon",
            Self::HyperFloor => "hyper_floor",
        }
    }

    /// Whether the target runs for `proto` (the gateway's layers: HTTP/1.1 only).
    fn serves(self, proto: Proto) -> bool {
        !matches!(self, Self::GatewayL4 | Self::GatewayAnon | Self::HyperFloor)
            || proto == Proto::H1
    }

    /// Whether its RSS with 10,000 idle keep-alive connections is measured: not for the
    /// layers and the floor, which open a backend connection per client connection (20,000
    /// sockets, past what the node's limits hold) and are not what the targets are about.
    fn holds_idle(self) -> bool {
        matches!(
            self,
            Self::Gateway | Self::Envoy | Self::EnvoyCached | Self::Nginx
        )
    }

    /// Which of the gateway's set-ups; `None` for the other targets.
    const fn layer(self) -> Option<Layer> {
        match self {
            Self::Gateway => Some(Layer::Full),
            Self::GatewayL4 => Some(Layer::L4),
            Self::GatewayAnon => Some(Layer::Anonymous),
            Self::Direct | Self::Envoy | Self::EnvoyCached | Self::Nginx | Self::HyperFloor => None,
        }
    }
}

/// The gateway's set-ups: the benchmark's (JWT + 100 rules) and its layers (see [`Target`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layer {
    Full,
    L4,
    Anonymous,
}

/// The simulated node with the backend running, the token, the certificate and the tools.
struct Topo {
    node: Node,
    _backend: Proc,
    backend_ip: IpAddr,
    vip: SocketAddr,
    token: String,
    jwks: PathBuf,
    cert: peers::Cert,
    tools: load::Tools,
    envoy: PathBuf,
    nginx: PathBuf,
    dir: PathBuf,
}

/// A proxy under test, running until dropped.
enum Running {
    None,
    Gateway(Box<Gateway>),
    Proc(Proc),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Self::None => None,
            Self::Gateway(g) => Some(g.pid()),
            Self::Proc(p) => Some(p.pid()),
        }
    }
}

fn tool_path(env_name: &str, default: &str) -> PathBuf {
    env::var_os(env_name).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

impl Topo {
    fn new() -> Result<Self, String> {
        let tools = Tools::from_env();
        let node = Node::new(NodeSpec::new("peers").pods(&[CLIENT, BACKEND]).tools(tools))
            .map_err(|e| format!("simulated node: {e}"))?;
        let dir = node.dir().join("peers");
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let backend = node.pod(BACKEND);
        let backend_ip = IpAddr::V4(backend.ipv4);
        let cert = peers::make_cert(&dir, &[backend_ip, IpAddr::V4(node.ipv4())])?;
        let nginx = tool_path("NODEGATE_BENCH_NGINX", "/usr/sbin/nginx");
        let conf = peers::write(
            &dir,
            "backend.conf",
            &peers::nginx_backend_conf(&dir, backend_ip, &cert),
        )?;
        let backend_proc = spawn_pinned(backend, "nginx-backend", load::LOAD_CPU, &nginx, |c| {
            c.arg("-e").arg(dir.join("backend.stderr.log"));
            c.arg("-p").arg(&dir).arg("-c").arg(&conf);
        })?;
        // Keys and a token: an RSA key whose public JWKS is the issuer's static `jwks_file`.
        let private = dir.join("issuer-private.json");
        let jwks = dir.join("issuer-jwks.json");
        oidc::genkey("bench-1", &private, &jwks).map_err(|e| format!("genkey: {e}"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "bench-user", "email": "bench@example.com",
            "groups": [peers::GROUP], "iat": now, "nbf": now, "exp": now + 6 * 3600,
        });
        let token = oidc::mint(&private, &[TokenSpec::rs256("bench-1", claims)])
            .map_err(|e| format!("mint: {e}"))?
            .pop()
            .ok_or("mint returned no token")?;
        let vip = node.vip_v4(10, 80);
        let topo = Self {
            _backend: backend_proc,
            backend_ip,
            vip,
            token,
            jwks,
            cert,
            tools: load::Tools {
                wrk: tool_path("NODEGATE_BENCH_WRK", "/usr/bin/wrk"),
                h2load: tool_path("NODEGATE_BENCH_H2LOAD", "/usr/bin/h2load"),
                oha: tool_path(OHA_ENV, "oha"),
            },
            envoy: tool_path(ENVOY_ENV, "envoy"),
            nginx,
            dir,
            node,
        };
        topo.wait_ok(
            &format!("http://{}/", topo.backend(peers::BACKEND_H1)),
            Proto::H1,
        )?;
        Ok(topo)
    }

    fn client(&self) -> &Place {
        self.node.pod(CLIENT)
    }

    fn backend(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.backend_ip, port)
    }

    fn node_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.node.ipv4()), port)
    }

    /// The gateway's config: one service behind the VIP, the issuer, and per `layer` the
    /// policy (100 rules on the token's groups; one rule for anonymous `GET`; none: L4).
    fn gateway_config(&self, layer: Layer) -> GatewayConfig {
        let service = ServiceConfig::new(SERVICE, Mode::Enforce)
            .vip(self.vip)
            .endpoint(self.backend(peers::BACKEND_PROTECTED))
            .allow(&self.node.cidr_v4());
        let service = match layer {
            Layer::Full => {
                let mut allow: Vec<Value> = (0..peers::RULES - 1)
                    .map(|i| json!({ "id": format!("rule-{i:03}"), "when": { "groups": peers::other_group(i) } }))
                    .collect();
                allow.push(json!({ "id": format!("rule-{:03}", peers::RULES - 1), "when": { "groups": peers::GROUP } }));
                service.policy(json!({ "allow": allow }))
            }
            Layer::Anonymous => service.policy(
                json!({ "allow": [{ "id": "anyone-get", "when": { "method": ["GET"] } }] }),
            ),
            Layer::L4 => service,
        };
        self.node
            .gateway_config()
            .service(service)
            .auth(json!({ "issuers": [{
                "name": "bench", "issuer": ISSUER, "jwks_file": self.jwks,
                "audiences": [AUDIENCE], "algorithms": ["RS256"],
            }] }))
    }

    /// The gateway with [`Self::gateway_config`]; with `tls`, the service also terminates TLS
    /// with the bench certificate (the harness writes services without `tls:`: start, then
    /// write the file with it and restart).
    fn start_gateway(&self, layer: Layer, tls: bool) -> Result<Gateway, String> {
        let config = self.gateway_config(layer);
        let mut gateway = self
            .node
            .start_gateway(config.clone())
            .map_err(|e| format!("gateway: {e}"))?;
        if tls {
            let tls = json!({ "cert_file": self.cert.cert, "key_file": self.cert.key });
            let name = format!("name: {}", Value::from(SERVICE));
            let yaml: String = config
                .to_yaml()
                .lines()
                .map(|line| {
                    if line.trim_start().starts_with(&format!("- {{ {name},")) {
                        let body = line.trim_end().strip_suffix('}').unwrap_or(line);
                        format!("{body}, tls: {tls} }}\n")
                    } else {
                        format!("{line}\n")
                    }
                })
                .collect();
            if !yaml.contains("tls:") {
                return Err(format!("no service line for {SERVICE} in:\n{yaml}"));
            }
            gateway
                .write_config_text(&yaml)
                .map_err(|e| format!("gateway TLS config: {e}"))?;
            gateway
                .restart()
                .map_err(|e| format!("gateway with TLS: {e}\n{}", gateway.stderr()))?;
        }
        Ok(gateway)
    }

    /// Starts `target` pinned to [`PROXY_CPU`]; `None` when it cannot serve `proto`.
    fn start(&self, target: Target, proto: Proto) -> Result<Option<(Running, String)>, String> {
        let scheme = if proto.tls() { "https" } else { "http" };
        let url = |addr: SocketAddr| format!("{scheme}://{addr}/");
        let cpu = PROXY_CPU.to_string();
        Ok(Some(match target {
            Target::Direct => {
                let port = match proto {
                    Proto::H1 => peers::BACKEND_H1,
                    Proto::H2c => peers::BACKEND_H2C,
                    Proto::H1Tls | Proto::H2Tls => peers::BACKEND_TLS,
                };
                (Running::None, url(self.backend(port)))
            }
            Target::Gateway | Target::GatewayL4 | Target::GatewayAnon => {
                let layer = target.layer().unwrap_or(Layer::Full);
                let previous = procfs::pin_thread(&[PROXY_CPU]).map_err(|e| format!("pin: {e}"))?;
                let started = self.start_gateway(layer, proto.tls());
                procfs::restore_affinity(&previous).map_err(|e| format!("unpin: {e}"))?;
                (Running::Gateway(Box::new(started?)), url(self.vip))
            }
            Target::Envoy | Target::EnvoyCached => {
                let yaml = peers::EnvoyJwt {
                    listen_ip: IpAddr::V4(self.node.ipv4()),
                    backend: self.backend(peers::BACKEND_H1),
                    issuer: ISSUER,
                    audience: AUDIENCE,
                    jwks_file: &self.jwks,
                    cached: target == Target::EnvoyCached,
                    cert: &self.cert,
                }
                .yaml();
                let conf = peers::write(&self.dir, &format!("{}.yaml", target.id()), &yaml)?;
                let proc = spawn_pinned(self.node.node(), target.id(), &cpu, &self.envoy, |c| {
                    c.arg("-c").arg(&conf).args([
                        "--concurrency",
                        "1",
                        "--disable-hot-restart",
                        "--log-level",
                        "warn",
                    ]);
                })?;
                let port = if proto.tls() {
                    peers::ENVOY_TLS
                } else {
                    peers::ENVOY_PLAIN
                };
                (Running::Proc(proc), url(self.node_addr(port)))
            }
            Target::HyperFloor => {
                let program = env::var_os(HYPER_FLOOR_ENV).map_or_else(
                    || workspace_dir().join("target/release/examples/hyper_floor"),
                    PathBuf::from,
                );
                if !program.exists() {
                    return Err(format!(
                        "{} is missing: cargo +1.99.1 build --release -p gateway --example \
                         hyper_floor (or set {HYPER_FLOOR_ENV})",
                        program.display()
                    ));
                }
                let listen = self.node_addr(peers::HYPER_FLOOR_H1);
                let backend = self.backend(peers::BACKEND_H1);
                let proc = spawn_pinned(self.node.node(), "hyper-floor", &cpu, &program, |c| {
                    c.arg(listen.to_string()).arg(backend.to_string());
                })?;
                (Running::Proc(proc), url(listen))
            }
            Target::Nginx => {
                let conf = peers::write(
                    &self.dir,
                    "proxy.conf",
                    &peers::nginx_proxy_conf(
                        &self.dir,
                        IpAddr::V4(self.node.ipv4()),
                        self.backend(peers::BACKEND_H1),
                        &self.cert,
                    ),
                )?;
                let proc = spawn_pinned(self.node.node(), "nginx-proxy", &cpu, &self.nginx, |c| {
                    c.arg("-e").arg(self.dir.join("proxy.stderr.log"));
                    c.arg("-p").arg(&self.dir).arg("-c").arg(&conf);
                })?;
                let port = match proto {
                    Proto::H1 => peers::NGINX_H1,
                    Proto::H2c => peers::NGINX_H2C,
                    Proto::H1Tls | Proto::H2Tls => peers::NGINX_TLS,
                };
                (Running::Proc(proc), url(self.node_addr(port)))
            }
        }))
    }

    /// One request with the token from the client pod, until it answers 200 (10 s).
    fn wait_ok(&self, url: &str, proto: Proto) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut cmd = Command::new("curl");
            cmd.args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
            ])
            .args(["--max-time", "3", "-H"])
            .arg(format!("Authorization: Bearer {}", self.token));
            match proto {
                Proto::H1 => cmd.arg("--http1.1"),
                Proto::H2c => cmd.arg("--http2-prior-knowledge"),
                Proto::H1Tls => cmd.args(["-k", "--http1.1"]),
                Proto::H2Tls => cmd.args(["-k", "--http2"]),
            };
            cmd.arg(url);
            let out = self
                .client()
                .run(cmd, Duration::from_secs(5))
                .map_err(|e| e.to_string())?;
            let want_version = if proto.h2() { "2" } else { "1.1" };
            if out.stdout.trim() == format!("200 {want_version}") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{url} ({}) never answered 200 over {want_version}: {} {}",
                    proto.as_str(),
                    out.stdout.trim(),
                    out.stderr.trim()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Opens `count` keep-alive connections to `addr` from the client pod, one request each,
    /// and returns the process holding them (idle) once they are all open.
    fn hold(&self, addr: SocketAddr, count: usize) -> Result<Proc, String> {
        let exe = env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.env(hold::ROLE_ENV, format!("{addr},{count}")).env(
            hold::REQUEST_ENV,
            format!(
                "GET / HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
                self.token
            ),
        );
        let proc = self
            .client()
            .spawn("hold", cmd)
            .map_err(|e| e.to_string())?;
        proc.wait_for_stdout("holding", Duration::from_secs(180))
            .map_err(|e| {
                format!(
                    "holding {count} connections to {addr}: {e}: {}",
                    proc.stderr()
                )
            })?;
        Ok(proc)
    }
}

/// Starts `program` pinned to `cpu` (`taskset -c`, which execs it: same PID) at `place`, and
/// waits until its stderr stays quiet for a moment is not needed: callers poll readiness.
fn spawn_pinned(
    place: &Place,
    label: &str,
    cpu: &str,
    program: &Path,
    args: impl FnOnce(&mut Command),
) -> Result<Proc, String> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu]).arg(program);
    args(&mut cmd);
    place
        .spawn(label, cmd)
        .map_err(|e| format!("start {}: {e}", program.display()))
}

/// `NODEGATE_PEERS_ONLY=gateway,http/1.1`: only these targets and protocols (for profiling
/// one of them under load; the report then lacks the others).
const ONLY_ENV: &str = "NODEGATE_PEERS_ONLY";

fn http_pass(quick: bool) -> Result<Value, String> {
    let mut plan = if quick { Plan::QUICK } else { Plan::FULL };
    // `NODEGATE_PEERS_SECONDS`: a longer max-rate run (to profile under load).
    if let Some(secs) = env::var("NODEGATE_PEERS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        plan.max_for = Duration::from_secs(secs);
    }
    // `NODEGATE_PEERS_FIXED_SECONDS`: a longer fixed-rate run (to profile at 1000 req/s).
    if let Some(secs) = env::var("NODEGATE_PEERS_FIXED_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        plan.fixed_for = Duration::from_secs(secs);
    }
    let only = env::var(ONLY_ENV).unwrap_or_default();
    let only: Vec<&str> = only.split(',').filter(|s| !s.is_empty()).collect();
    let selected =
        |name: &str, all: &[&str]| !only.iter().any(|o| all.contains(o)) || only.contains(&name);
    let target_ids: Vec<&str> = TARGETS.iter().map(|t| t.id()).collect();
    let proto_ids: Vec<&str> = PROTOS.iter().map(|p| p.as_str()).collect();
    let topo = Topo::new()?;
    let mut rows = Vec::new();
    for trial in 0..plan.trials {
        for proto in PROTOS {
            if !selected(proto.as_str(), &proto_ids) {
                continue;
            }
            let mut order = TARGETS.to_vec();
            order.rotate_left(trial % TARGETS.len());
            for target in order {
                if !selected(target.id(), &target_ids) || !target.serves(proto) {
                    continue;
                }
                println!(
                    "http: trial {} {} {}",
                    trial + 1,
                    proto.as_str(),
                    target.id()
                );
                let row = run_target(&topo, &plan, trial, proto, target)?;
                println!("  {row}");
                rows.push(row);
            }
        }
    }
    Ok(json!({
        "plan": {
            "trials": plan.trials,
            "warm_up_s": plan.warm_up.as_secs_f64(),
            "max_rate_s": plan.max_for.as_secs_f64(),
            "fixed_rate_s": plan.fixed_for.as_secs_f64(),
            "other_protocols_s": plan.other_for.as_secs_f64(),
            "max_rate_connections": plan.max_connections,
            "fixed_rate": plan.fixed_rate,
            "fixed_rate_connections": plan.fixed_connections,
            "idle_connections": plan.idle_connections,
            "rules": peers::RULES,
            "proxy_cpu": PROXY_CPU,
            "load_cpu": load::LOAD_CPU,
            "backend_cpu": load::LOAD_CPU,
        },
        "rows": rows,
    }))
}

fn run_target(
    topo: &Topo,
    plan: &Plan,
    trial: usize,
    proto: Proto,
    target: Target,
) -> Result<Value, String> {
    let mut row = json!({ "trial": trial + 1, "proto": proto.as_str(), "target": target.id() });
    let Some((running, url)) = topo.start(target, proto)? else {
        row["missing"] = Value::from("the gateway does not terminate TLS yet");
        return Ok(row);
    };
    topo.wait_ok(&url, proto)?;
    let pid = running.pid();
    if let Some(pid) = pid {
        row["rss_idle_bytes"] = rss(pid);
    }
    let load = Load {
        client: topo.client(),
        url: url.clone(),
        // The anonymous layer is measured without the token (with one, it would be checked).
        headers: if target == Target::GatewayAnon {
            Vec::new()
        } else {
            vec![format!("Authorization: Bearer {}", topo.token)]
        },
        proto,
    };
    let (max_for, fixed_for) = if proto == Proto::H1 {
        (plan.max_for, plan.fixed_for)
    } else {
        (plan.other_for, plan.other_for)
    };
    load.max_rate(&topo.tools, plan.max_connections, plan.warm_up)?;
    let cpu_before = pid.map(procfs::cpu_seconds);
    let cores_before = procfs::cpu_times();
    let mut max = load.max_rate(&topo.tools, plan.max_connections, max_for)?;
    let cores = procfs::busy_between(&cores_before, &procfs::cpu_times());
    max["cores_busy"] = json!(cores);
    if let (Some(pid), Some(Ok(before))) = (pid, cpu_before) {
        max["cpu_s_per_1000"] = per_1000(pid, before, &max);
    }
    row["max"] = max;
    let cpu_before = pid.map(procfs::cpu_seconds);
    let mut fixed = load.fixed_rate(
        &topo.tools,
        plan.fixed_rate,
        plan.fixed_connections,
        fixed_for,
    )?;
    if let (Some(pid), Some(Ok(before))) = (pid, cpu_before) {
        fixed["cpu_s_per_1000"] = per_1000(pid, before, &fixed);
    }
    row["fixed"] = fixed;
    if let Some(pid) = pid
        && proto == Proto::H1
        && target.holds_idle()
    {
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .map_err(|e| format!("{url}: {e}"))?;
        let holder = topo.hold(addr, plan.idle_connections)?;
        // Let the proxy settle (buffers of the last request freed, idle timers armed).
        thread::sleep(Duration::from_millis(500));
        row["rss_idle_conns_bytes"] = rss(pid);
        row["idle_conns"] = Value::from(plan.idle_connections);
        drop(holder);
    }
    if let Running::Gateway(gateway) = &running {
        row["gateway_decision_lines"] = Value::from(gateway.decision_text().lines().count());
    }
    drop(running);
    Ok(row)
}

fn rss(pid: u32) -> Value {
    procfs::rss_bytes(pid).map_or(Value::Null, Value::from)
}

fn per_1000(pid: u32, before: f64, result: &Value) -> Value {
    let requests = result
        .get("requests")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    match procfs::cpu_seconds(pid) {
        Ok(after) if requests > 0.0 => Value::from((after - before) / requests * 1000.0),
        _ => Value::Null,
    }
}

fn environment() -> Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let version = |program: PathBuf, arg: &str| -> Value {
        Command::new(&program)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .map_or(Value::Null, Value::from)
    };
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cpus": thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "gateway": Tools::from_env().gateway.display().to_string(),
        "versions": {
            "nginx": version(tool_path("NODEGATE_BENCH_NGINX", "/usr/sbin/nginx"), "-v"),
            "envoy": version(tool_path(ENVOY_ENV, "envoy"), "--version"),
            "wrk": version(tool_path("NODEGATE_BENCH_WRK", "/usr/bin/wrk"), "-v"),
            "h2load": version(tool_path("NODEGATE_BENCH_H2LOAD", "/usr/bin/h2load"), "--version"),
            "oha": version(tool_path(OHA_ENV, "oha"), "--version"),
        },
    })
}
