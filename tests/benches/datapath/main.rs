//! The data path's cost on a simulated node (root, real kernel): `cargo xtask bench`, which
//! writes docs/BENCHMARKS.md from criterion's estimates and from the JSON this writes.
//!
//! * `connect`: the `connect(2)` call alone, from the client pod's network namespace, with the
//!   process outside the hooked cgroup (no hooks), inside it with an unprotected destination,
//!   and redirected to the proxy; plus a node-local listener without hooks, the same path the
//!   redirect takes, as the redirect's baseline.
//! * `request_persistent` / `request_per_connection`: a 64-byte request and a 256-byte
//!   response through the proxy (VIP) and directly to the same backend process (an
//!   unprotected port), in the same run.
//! * A custom pass for what criterion does not give: p50/p90/p99 of single requests,
//!   requests/s with several connections at once, upload throughput, and the kernel's own
//!   run time per BPF program in every phase (`kernel.bpf_stats_enabled`).
//!
//! The backend is this same executable started inside the backend pod ([`server::ROLE_ENV`]).

mod bpf_stats;
mod cgroup;
mod netns_worker;
mod server;
mod wire;

use std::{
    cell::RefCell,
    env, fs,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use bpf_stats::{Prog, Snapshot, StatsEnabled};
use cgroup::CgroupHome;
use criterion::{Criterion, SamplingMode};
use netns_worker::NetnsWorker;
use nodegate_tests::harness::{
    Gateway, Mode, Node, NodeSpec, Proc, ServiceConfig, Tools, workspace_dir,
};
use serde_json::{Value, json};

/// Set (to anything) for a short run that only checks that everything works.
const QUICK_ENV: &str = "NODEGATE_BENCH_QUICK";
/// Where the custom pass's JSON goes (default `target/nodegate-bench/results.json`).
const OUT_ENV: &str = "NODEGATE_BENCH_OUT";

const SERVICE: &str = "bench";
const CLIENT: &str = "client";
const BACKEND: &str = "backend";
/// The backend's protected endpoint (behind the VIP).
const PROTECTED_PORT: u16 = 8080;
/// The same backend process on a port no service covers: the direct path.
const OPEN_PORT: u16 = 9090;

fn main() -> ExitCode {
    if let Some(addrs) = env::var_os(server::ROLE_ENV) {
        return server::run(&addrs.to_string_lossy());
    }
    let load_start = load_average();
    let plan = if env::var_os(QUICK_ENV).is_some() {
        Plan::QUICK
    } else {
        Plan::FULL
    };
    let out = env::var_os(OUT_ENV).map_or_else(
        || {
            workspace_dir()
                .join("target")
                .join("nodegate-bench")
                .join("results.json")
        },
        PathBuf::from,
    );
    let rig = match Rig::new() {
        Ok(rig) => rig,
        Err(e) => {
            eprintln!("bench: setting up the simulated node failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut criterion = Criterion::default()
        .sample_size(plan.samples)
        .warm_up_time(plan.warm_up)
        .measurement_time(plan.measurement)
        .nresamples(20_000)
        .configure_from_args();
    let mut benchmarks = Vec::new();
    bench_connect(&mut criterion, &rig, &mut benchmarks);
    bench_requests(&mut criterion, &rig, &mut benchmarks);
    criterion.final_summary();

    println!("\ncustom pass: single-request percentiles, concurrency, upload, BPF run time");
    let latency = latency_pass(&rig, &plan);
    let concurrent = concurrency_pass(&rig, &plan);
    let upload = upload_pass(&rig, &plan);
    let results = json!({
        "quick": plan.quick,
        "environment": environment(&rig),
        "load_average": { "start": load_start, "end": load_average() },
        "criterion": {
            "sample_size": plan.samples,
            "warm_up_s": plan.warm_up.as_secs_f64(),
            "measurement_s": plan.measurement.as_secs_f64(),
            "benchmarks": benchmarks,
        },
        "latency": latency,
        "concurrent": concurrent,
        "upload": upload,
        "bpf": rig.phases.take(),
    });
    if let Err(e) = write_json(&out, &results) {
        eprintln!("bench: {e}");
        return ExitCode::FAILURE;
    }
    println!("bench: results written to {}", out.display());
    ExitCode::SUCCESS
}

/// How long each part runs.
struct Plan {
    quick: bool,
    samples: usize,
    warm_up: Duration,
    measurement: Duration,
    /// Requests per mode in the percentile pass (split into interleaved rounds).
    requests: usize,
    connections: usize,
    concurrent_for: Duration,
    upload_bytes: u64,
}

impl Plan {
    const FULL: Self = Self {
        quick: false,
        samples: 50,
        warm_up: Duration::from_secs(2),
        measurement: Duration::from_secs(5),
        requests: 50_000,
        connections: 10_000,
        concurrent_for: Duration::from_secs(5),
        upload_bytes: 1 << 30,
    };
    const QUICK: Self = Self {
        quick: true,
        samples: 10,
        warm_up: Duration::from_millis(200),
        measurement: Duration::from_millis(500),
        requests: 2_000,
        connections: 500,
        concurrent_for: Duration::from_millis(500),
        upload_bytes: 32 << 20,
    };
    const ROUNDS: usize = 5;
    const CONCURRENCY: usize = 8;
}

/// The simulated node with the gateway and the servers, the client's worker thread, and the
/// BPF statistics. Fields drop in order: the process leaves the node's cgroups and the sysctl
/// is restored before the node is torn down.
struct Rig {
    worker: NetnsWorker,
    /// Moves the process back out of the node's cgroups when dropped.
    _home: CgroupHome,
    _stats: StatsEnabled,
    gateway: Gateway,
    _servers: Vec<Proc>,
    node: Node,
    progs: Vec<Prog>,
    /// The client pod's cgroup (hooked).
    hooked: PathBuf,
    /// The node's own cgroup (not hooked).
    unhooked: PathBuf,
    vip: SocketAddrV4,
    open: SocketAddrV4,
    /// The proxy's own listener, dialed directly: where a redirect lands, minus the hook.
    proxy: SocketAddrV4,
    phases: RefCell<Vec<Value>>,
}

impl Rig {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let tools = Tools::from_env().with_ngpeer(env!("CARGO_BIN_EXE_ngpeer"));
        let node = Node::new(NodeSpec::new("bench").pods(&[CLIENT, BACKEND]).tools(tools))?;
        for netns in [node.node_netns(), node.pod(CLIENT).netns.as_str()] {
            tune_ports(netns)?;
        }
        let backend = node.pod(BACKEND);
        let exe = env::current_exe()?;
        let server = |place: &nodegate_tests::harness::Place, addrs: &[SocketAddr]| {
            let list = addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let mut cmd = Command::new(&exe);
            cmd.env(server::ROLE_ENV, &list);
            let proc = place.spawn("bench-server", cmd)?;
            for addr in addrs {
                proc.wait_for_stdout(&format!("listening {addr}"), Duration::from_secs(5))?;
            }
            Ok::<_, nodegate_tests::harness::Error>(proc)
        };
        let open = SocketAddrV4::new(backend.ipv4, OPEN_PORT);
        let servers = vec![server(
            backend,
            &[backend.v4(PROTECTED_PORT), SocketAddr::V4(open)],
        )?];
        let vip = match node.vip_v4(10, 80) {
            SocketAddr::V4(vip) => vip,
            SocketAddr::V6(_) => return Err("vip_v4 gave an IPv6 address".into()),
        };
        let service = ServiceConfig::new(SERVICE, Mode::Enforce)
            .vip(SocketAddr::V4(vip))
            .endpoint(backend.v4(PROTECTED_PORT))
            .allow(&node.cidr_v4());
        let gateway = node.start_gateway(node.gateway_config().service(service))?;
        let proxy = match gateway.config().proxy_v4 {
            SocketAddr::V4(proxy) => proxy,
            SocketAddr::V6(_) => return Err("the proxy's v4 listener is IPv6".into()),
        };
        let progs = bpf_stats::attached(&node.pods_cgroup())?;
        if progs.is_empty() {
            return Err(format!("no program attached to {}", node.pods_cgroup().display()).into());
        }
        let stats = StatsEnabled::enable()?;
        let worker = NetnsWorker::new(&node.pod(CLIENT).netns)?;
        let home = CgroupHome::new()?;
        let rig = Self {
            worker,
            _home: home,
            _stats: stats,
            gateway,
            _servers: servers,
            hooked: node.pod(CLIENT).cgroup.clone(),
            unhooked: node.node().cgroup.clone(),
            node,
            progs,
            vip,
            open,
            proxy,
            phases: RefCell::new(Vec::new()),
        };
        CgroupHome::enter(&rig.hooked)?;
        // One request each way before anything is measured: both paths work.
        for target in [rig.vip, rig.open] {
            rig.worker.run(move || {
                let mut stream = wire::connect(SocketAddr::V4(target))?;
                wire::round_trip(&mut stream)
            })?;
        }
        Ok(rig)
    }

    fn snapshot(&self) -> Snapshot {
        bpf_stats::snapshot(&self.progs)
    }

    /// Records what every program did since `before`, as phase `name`.
    fn record(&self, name: &str, before: &Snapshot) {
        let after = self.snapshot();
        self.phases.borrow_mut().push(json!({
            "phase": name,
            "programs": bpf_stats::delta(&self.progs, before, &after),
        }));
    }
}

/// Moves the bench process (every thread) into `cgroup`: the hooks run or not by the cgroup
/// of the process calling `connect()`.
fn enter(cgroup: &Path) {
    CgroupHome::enter(cgroup)
        .unwrap_or_else(|e| panic!("moving the bench into {}: {e}", cgroup.display()));
}

/// Ephemeral ports: most of the range, and `TIME_WAIT` reuse for outgoing connections (the
/// proxy's upstream sockets close first). Only inside the simulated node's namespaces, written
/// through `/proc/sys/net`, which shows the namespace of the thread that opens it.
fn tune_ports(netns: &str) -> std::io::Result<()> {
    NetnsWorker::new(netns)?.run(|| {
        fs::write("/proc/sys/net/ipv4/ip_local_port_range", "16000 65000")?;
        fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")
    })
}

fn bench_connect(c: &mut Criterion, rig: &Rig, benchmarks: &mut Vec<Value>) {
    let mut group = c.benchmark_group("connect");
    // Each iteration also does an untimed round trip (below): flat sampling keeps the wall
    // time predictable.
    group.sampling_mode(SamplingMode::Flat);
    let cases = [
        (
            "no_hooks",
            None,
            &rig.unhooked,
            rig.open,
            Then::RoundTrip,
            "caller outside the hooked cgroup → backend pod (unprotected port)",
        ),
        (
            "hooks_unprotected",
            Some("connect/no_hooks"),
            &rig.hooked,
            rig.open,
            Then::RoundTrip,
            "caller in the hooked cgroup, destination not protected → backend pod",
        ),
        (
            "no_hooks_proxy",
            None,
            &rig.unhooked,
            rig.proxy,
            Then::UntilClosed,
            "caller outside the hooked cgroup → the proxy's listener itself (it then refuses: no \
             original destination)",
        ),
        (
            "redirected",
            Some("connect/no_hooks_proxy"),
            &rig.hooked,
            rig.vip,
            Then::RoundTrip,
            "caller in the hooked cgroup → VIP, rewritten to the proxy's listener",
        ),
    ];
    for (id, baseline, cgroup, target, then, what) in cases {
        enter(cgroup);
        let before = rig.snapshot();
        group.bench_function(id, |b| {
            b.iter_custom(|iters| rig.worker.run(move || connect_loop(target, then, iters)));
        });
        let name = format!("connect/{id}");
        rig.record(&name, &before);
        benchmarks
            .push(json!({ "id": name, "baseline": baseline, "what": what, "unit": "connect()" }));
    }
    group.finish();
    enter(&rig.hooked);
}

/// What a connect benchmark does, untimed, after each connection is established.
#[derive(Clone, Copy)]
enum Then {
    /// One request and its response: the server (or the proxy) has taken the connection.
    RoundTrip,
    /// Wait for the peer to close it (the proxy refuses a connection it was not redirected).
    UntilClosed,
}

/// `iters` timed `connect(2)` calls. After each one, an untimed step makes sure the server (or
/// the proxy) has taken the connection before the next one, so its accept queue never fills;
/// then the client resets the connection (no `TIME_WAIT`).
fn connect_loop(target: SocketAddrV4, then: Then, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let (connected, took) =
            wire::timed_connect(target).unwrap_or_else(|e| panic!("connect to {target}: {e}"));
        total += took;
        match (connected, then) {
            (wire::Connected::Open(mut stream), Then::RoundTrip) => {
                wire::round_trip(&mut stream)
                    .unwrap_or_else(|e| panic!("request to {target}: {e}"));
                wire::abort(stream);
            }
            (wire::Connected::Open(mut stream), Then::UntilClosed) => {
                wire::wait_closed(&mut stream);
                wire::abort(stream);
            }
            (wire::Connected::Reset, Then::UntilClosed) => {}
            (wire::Connected::Reset, Then::RoundTrip) => {
                panic!("{target} reset the connection during the handshake")
            }
        }
    }
    total
}

fn bench_requests(c: &mut Criterion, rig: &Rig, benchmarks: &mut Vec<Value>) {
    let paths = [
        ("direct", None, rig.open),
        ("proxy", Some("direct"), rig.vip),
    ];

    let mut group = c.benchmark_group("request_persistent");
    for (id, baseline, target) in paths {
        let before = rig.snapshot();
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                rig.worker.run(move || {
                    let addr = SocketAddr::V4(target);
                    let mut stream =
                        wire::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
                    let start = Instant::now();
                    for _ in 0..iters {
                        wire::round_trip(&mut stream)
                            .unwrap_or_else(|e| panic!("request to {addr}: {e}"));
                    }
                    let elapsed = start.elapsed();
                    wire::abort(stream);
                    elapsed
                })
            });
        });
        let name = format!("request_persistent/{id}");
        rig.record(&name, &before);
        benchmarks.push(json!({
            "id": name,
            "baseline": baseline.map(|b| format!("request_persistent/{b}")),
            "what": format!("64 B request, 256 B response on an open connection, {id}"),
            "unit": "request",
        }));
    }
    group.finish();

    let mut group = c.benchmark_group("request_per_connection");
    group.sampling_mode(SamplingMode::Flat);
    for (id, baseline, target) in paths {
        let before = rig.snapshot();
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                rig.worker.run(move || {
                    let start = Instant::now();
                    for _ in 0..iters {
                        one_connection(target);
                    }
                    start.elapsed()
                })
            });
        });
        let name = format!("request_per_connection/{id}");
        rig.record(&name, &before);
        benchmarks.push(json!({
            "id": name,
            "baseline": baseline.map(|b| format!("request_per_connection/{b}")),
            "what": format!("connect, one request and response, close; {id}"),
            "unit": "connection",
        }));
    }
    group.finish();
}

/// Connect, one round trip, reset.
fn one_connection(target: SocketAddrV4) {
    let mut stream = match wire::timed_connect(target) {
        Ok((wire::Connected::Open(stream), _)) => stream,
        Ok((wire::Connected::Reset, _)) => {
            panic!("{target} reset the connection during the handshake")
        }
        Err(e) => panic!("connect to {target}: {e}"),
    };
    wire::round_trip(&mut stream).unwrap_or_else(|e| panic!("request to {target}: {e}"));
    wire::abort(stream);
}

/// Latency of single requests, one at a time, direct and proxied in interleaved rounds (so
/// that both see the same machine state): percentiles and requests/s.
fn latency_pass(rig: &Rig, plan: &Plan) -> Vec<Value> {
    let mut rows = Vec::new();
    for (kind, per_mode) in [
        ("persistent", plan.requests),
        ("per_connection", plan.connections),
    ] {
        let mut samples: [(&str, SocketAddrV4, Vec<u64>); 2] = [
            ("direct", rig.open, Vec::new()),
            ("proxy", rig.vip, Vec::new()),
        ];
        let mut snapshots: Vec<(Snapshot, Snapshot)> = Vec::new();
        for _ in 0..Plan::ROUNDS {
            for (_, target, collected) in &mut samples {
                let target = *target;
                let n = per_mode / Plan::ROUNDS;
                let persistent = kind == "persistent";
                let before = rig.snapshot();
                collected.extend(
                    rig.worker
                        .run(move || timed_requests(target, n, persistent)),
                );
                snapshots.push((before, rig.snapshot()));
            }
        }
        for (i, (mode, _, collected)) in samples.iter_mut().enumerate() {
            // This mode's rounds, summed per program.
            let phase: Vec<&(Snapshot, Snapshot)> = snapshots.iter().skip(i).step_by(2).collect();
            rig.phases.borrow_mut().push(json!({
                "phase": format!("single_requests/{kind}/{mode}"),
                "programs": sum_deltas(&rig.progs, &phase),
            }));
            collected.sort_unstable();
            let row = percentiles(collected);
            println!("  {kind:<15} {mode:<7} {row}");
            rows.push(json!({ "kind": kind, "mode": mode, "stats": row }));
        }
    }
    rows
}

/// `n` requests, each timed alone: on one connection (`persistent`), or each on its own.
fn timed_requests(target: SocketAddrV4, n: usize, persistent: bool) -> Vec<u64> {
    let addr = SocketAddr::V4(target);
    let mut out = Vec::with_capacity(n);
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    if persistent {
        let mut stream = wire::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        for _ in 0..n {
            let start = Instant::now();
            wire::round_trip(&mut stream).unwrap_or_else(|e| panic!("request to {addr}: {e}"));
            out.push(nanos(start.elapsed()));
        }
        wire::abort(stream);
    } else {
        for _ in 0..n {
            let start = Instant::now();
            one_connection(target);
            out.push(nanos(start.elapsed()));
        }
    }
    out
}

fn sum_deltas(progs: &[Prog], phases: &[&(Snapshot, Snapshot)]) -> Vec<Value> {
    let mut before = Snapshot::new();
    let mut after = Snapshot::new();
    for (b, a) in phases {
        for prog in progs {
            let (b0, b1) = b.get(&prog.id).copied().unwrap_or_default();
            let (a0, a1) = a.get(&prog.id).copied().unwrap_or_default();
            let (t, n) = after.entry(prog.id).or_insert((0, 0));
            *t += a0.saturating_sub(b0);
            *n += a1.saturating_sub(b1);
        }
    }
    for prog in progs {
        before.insert(prog.id, (0, 0));
    }
    bpf_stats::delta(progs, &before, &after)
}

/// p50/p90/p99/max/mean in µs and requests/s of sorted nanosecond samples.
#[expect(
    clippy::cast_precision_loss,
    reason = "nanosecond values far below 2^52"
)]
fn percentiles(sorted: &[u64]) -> Value {
    let at = |q: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "q in [0, 1] times a length: a valid index"
        )]
        let i = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[i] as f64 / 1000.0
    };
    let total: u64 = sorted.iter().sum();
    let mean_us = if sorted.is_empty() {
        0.0
    } else {
        total as f64 / sorted.len() as f64 / 1000.0
    };
    json!({
        "count": sorted.len(),
        "p50_us": at(0.50),
        "p90_us": at(0.90),
        "p99_us": at(0.99),
        "max_us": at(1.0),
        "mean_us": mean_us,
        "per_s": if total == 0 { 0.0 } else { sorted.len() as f64 / (total as f64 / 1e9) },
    })
}

/// Requests/s with [`Plan::CONCURRENCY`] persistent connections at once, direct then proxied.
fn concurrency_pass(rig: &Rig, plan: &Plan) -> Vec<Value> {
    let mut rows = Vec::new();
    for (mode, target) in [("direct", rig.open), ("proxy", rig.vip)] {
        let duration = plan.concurrent_for;
        let before = rig.snapshot();
        let (requests, elapsed) = rig
            .worker
            .run(move || concurrent_requests(target, duration));
        rig.record(&format!("concurrent/{mode}"), &before);
        #[expect(clippy::cast_precision_loss, reason = "request counts far below 2^52")]
        let per_s = requests as f64 / elapsed.as_secs_f64();
        println!(
            "  concurrent      {mode:<7} {} connections: {per_s:.0} requests/s",
            Plan::CONCURRENCY
        );
        rows.push(json!({
            "mode": mode,
            "connections": Plan::CONCURRENCY,
            "requests": requests,
            "seconds": elapsed.as_secs_f64(),
            "per_s": per_s,
        }));
    }
    rows
}

fn concurrent_requests(target: SocketAddrV4, duration: Duration) -> (u64, Duration) {
    let addr = SocketAddr::V4(target);
    let count = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    // Threads started here share this worker's network namespace.
    thread::scope(|scope| {
        for _ in 0..Plan::CONCURRENCY {
            scope.spawn(|| {
                let mut stream =
                    wire::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
                while !stop.load(Ordering::Relaxed) {
                    wire::round_trip(&mut stream)
                        .unwrap_or_else(|e| panic!("request to {addr}: {e}"));
                    count.fetch_add(1, Ordering::Relaxed);
                }
                wire::abort(stream);
            });
        }
        thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
    });
    (count.into_inner(), start.elapsed())
}

/// One upload of `plan.upload_bytes` on one connection, direct then proxied.
fn upload_pass(rig: &Rig, plan: &Plan) -> Vec<Value> {
    let mut rows = Vec::new();
    for (mode, target) in [("direct", rig.open), ("proxy", rig.vip)] {
        let bytes = plan.upload_bytes;
        let before = rig.snapshot();
        let elapsed = rig.worker.run(move || {
            let addr = SocketAddr::V4(target);
            let mut stream =
                wire::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
            let start = Instant::now();
            wire::upload(&mut stream, bytes).unwrap_or_else(|e| panic!("upload to {addr}: {e}"));
            let elapsed = start.elapsed();
            wire::abort(stream);
            elapsed
        });
        rig.record(&format!("upload/{mode}"), &before);
        #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
        let mib_per_s = bytes as f64 / f64::from(1u32 << 20) / elapsed.as_secs_f64();
        println!(
            "  upload          {mode:<7} {} MiB: {mib_per_s:.0} MiB/s",
            bytes >> 20
        );
        rows.push(json!({
            "mode": mode,
            "bytes": bytes,
            "seconds": elapsed.as_secs_f64(),
            "mib_per_s": mib_per_s,
        }));
    }
    rows
}

fn environment(rig: &Rig) -> Value {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown");
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpu": cpu,
        "cpus": thread::available_parallelism().map_or(0, std::num::NonZero::get),
        "gateway": rig.node.tools().gateway.display().to_string(),
        "gateway_decisions": rig.gateway.decisions().map_or(0, |d| d.len()),
        "node_ip": IpAddr::V4(rig.node.ipv4()).to_string(),
        "programs": rig.progs.iter().map(|p| json!({ "name": p.name, "attach_type": p.attach_type })).collect::<Vec<_>>(),
    })
}

/// The 1-minute load average: other work on the machine skews every figure.
fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn write_json(path: &Path, value: &Value) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))
}
