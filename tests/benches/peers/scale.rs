//! The kernel programs' cost with many protected services: for 10, 1,000 and 10,000 services
//! loaded through the config (each with a VIP and an endpoint of its own, as the gateway's
//! maps hold them), the kernel's own run time per program (`kernel.bpf_stats_enabled`) for a
//! redirected connect, an unprotected connect, and packets on open connections. Hash-map
//! lookups: it must not grow with the number of services.

use std::{
    fs,
    net::{SocketAddr, SocketAddrV4},
    process::Command,
    time::{Duration, Instant},
};

use nodegate_tests::harness::{GatewayConfig, Mode, Node, NodeSpec, ServiceConfig, Tools};
use serde_json::{Value, json};

use crate::{
    bpf_stats::{self, StatsEnabled},
    cgroup::CgroupHome,
    netns_worker::NetnsWorker,
    server, wire,
};

const CLIENT: &str = "client";
const BACKEND: &str = "backend";
const PROTECTED_PORT: u16 = 8080;
const OPEN_PORT: u16 = 9090;

pub fn run(quick: bool) -> Result<Value, String> {
    let (counts, connects, packets): (&[usize], u64, u64) = if quick {
        (&[10, 1_000, 10_000], 1_000, 2_000)
    } else {
        (&[10, 1_000, 10_000], 20_000, 50_000)
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let tools = Tools::from_env();
    let node = Node::new(NodeSpec::new("scale").pods(&[CLIENT, BACKEND]).tools(tools))
        .map_err(|e| format!("simulated node: {e}"))?;
    let backend = node.pod(BACKEND);
    let protected = SocketAddrV4::new(backend.ipv4, PROTECTED_PORT);
    let open = SocketAddrV4::new(backend.ipv4, OPEN_PORT);
    let mut cmd = Command::new(&exe);
    cmd.env(server::ROLE_ENV, format!("{protected},{open}"));
    let server = backend
        .spawn("bench-server", cmd)
        .map_err(|e| e.to_string())?;
    for addr in [protected, open] {
        server
            .wait_for_stdout(&format!("listening {addr}"), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
    }
    tune_ports(&node)?;
    let worker = NetnsWorker::new(&node.pod(CLIENT).netns).map_err(|e| e.to_string())?;
    let _stats = StatsEnabled::enable().map_err(|e| format!("bpf_stats_enabled: {e}"))?;
    let mut rows = Vec::new();
    for &count in counts {
        println!("scale: {count} services");
        let vip = match node.vip_v4(10, 80) {
            SocketAddr::V4(v) => v,
            SocketAddr::V6(_) => return Err("vip_v4 gave IPv6".into()),
        };
        let config = config_with(&node, count, vip, protected)?;
        let start = Instant::now();
        let gateway = match node.start_gateway(config) {
            Ok(g) => g,
            Err(e) => {
                let err = e.to_string();
                // The daemon's own error lines (the first lines are its config dump).
                let errors = err
                    .lines()
                    .filter(|l| {
                        l.contains("ERROR") || l.starts_with("Error") || l.contains("error:")
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                println!("  failed: {errors}");
                rows.push(json!({ "services": count, "error": if errors.is_empty() { first_lines(&err, 12) } else { errors } }));
                continue;
            }
        };
        let ready_s = start.elapsed().as_secs_f64();
        let progs = bpf_stats::attached(&node.pods_cgroup())?;
        let home = CgroupHome::new().map_err(|e| e.to_string())?;
        CgroupHome::enter(&node.pod(CLIENT).cgroup).map_err(|e| e.to_string())?;
        let mut phases = Vec::new();
        let mut phase = |name: &str, job: Box<dyn FnOnce() -> Result<Vec<u64>, String> + Send>| {
            let before = bpf_stats::snapshot(&progs);
            let mut times = worker.run(job)?;
            let after = bpf_stats::snapshot(&progs);
            times.sort_unstable();
            #[expect(clippy::cast_precision_loss, reason = "nanoseconds far below 2^52")]
            let median_us = times.get(times.len() / 2).map(|&ns| ns as f64 / 1000.0);
            phases.push(json!({
                "phase": name,
                "median_connect_us": median_us,
                "programs": bpf_stats::delta(&progs, &before, &after),
            }));
            Ok::<(), String>(())
        };
        phase(
            "redirected_connect",
            Box::new(move || connects_to(vip, connects)),
        )?;
        phase(
            "unprotected_connect",
            Box::new(move || connects_to(open, connects)),
        )?;
        phase(
            "packets_direct",
            Box::new(move || round_trips(open, packets)),
        )?;
        phase(
            "packets_via_gateway",
            Box::new(move || round_trips(vip, packets)),
        )?;
        drop(home);
        rows.push(json!({
            "services": count,
            "ready_s": ready_s,
            "phases": phases,
        }));
        drop(gateway);
    }
    drop(server);
    Ok(json!({ "connects": connects, "round_trips": packets, "rows": rows }))
}

/// Tens of thousands of connects: the client's ports and the gateway's upstream ports (it
/// closes first, so its side waits in `TIME_WAIT`) run out with the default range. Only
/// inside the simulated node's namespaces.
fn tune_ports(node: &Node) -> Result<(), String> {
    for netns in [node.node_netns(), node.pod(CLIENT).netns.as_str()] {
        NetnsWorker::new(netns)
            .map_err(|e| e.to_string())?
            .run(|| {
                fs::write("/proc/sys/net/ipv4/ip_local_port_range", "16000 65000")?;
                fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")
            })
            .map_err(|e| format!("port range in {netns}: {e}"))?;
    }
    Ok(())
}

/// `count` services: the measured one (VIP `vip`, endpoint `protected`) last, the others each
/// with a VIP and an endpoint of their own.
fn config_with(
    node: &Node,
    count: usize,
    vip: SocketAddrV4,
    protected: SocketAddrV4,
) -> Result<GatewayConfig, String> {
    let backend = node.pod(BACKEND);
    let mut config = node.gateway_config();
    for i in 0..count - 1 {
        let port = u16::try_from(20_000 + i).map_err(|e| e.to_string())?;
        let vport = u16::try_from(30_000 + i).map_err(|e| e.to_string())?;
        config = config.service(
            ServiceConfig::new(&format!("svc-{i}"), Mode::Enforce)
                .vip(node.vip_v4(20, vport))
                .endpoint(backend.v4(port))
                .allow(&node.cidr_v4()),
        );
    }
    Ok(config.service(
        ServiceConfig::new("measured", Mode::Enforce)
            .vip(SocketAddr::V4(vip))
            .endpoint(SocketAddr::V4(protected))
            .allow(&node.cidr_v4()),
    ))
}

fn first_lines(text: &str, n: usize) -> String {
    text.lines().take(n).collect::<Vec<_>>().join("\n")
}

/// `n` connects (each timed alone), each followed by a round trip and a reset.
fn connects_to(target: SocketAddrV4, n: u64) -> Result<Vec<u64>, String> {
    let mut times = Vec::new();
    for _ in 0..n {
        let (connected, took) =
            wire::timed_connect(target).map_err(|e| format!("connect {target}: {e}"))?;
        let wire::Connected::Open(mut stream) = connected else {
            return Err(format!("{target} reset the connection"));
        };
        wire::round_trip(&mut stream).map_err(|e| format!("request {target}: {e}"))?;
        wire::abort(stream);
        times.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }
    Ok(times)
}

/// `n` round trips on one connection (each a packet each way, plus ACKs).
fn round_trips(target: SocketAddrV4, n: u64) -> Result<Vec<u64>, String> {
    let mut stream =
        wire::connect(SocketAddr::V4(target)).map_err(|e| format!("connect {target}: {e}"))?;
    for _ in 0..n {
        wire::round_trip(&mut stream).map_err(|e| format!("request {target}: {e}"))?;
    }
    wire::abort(stream);
    Ok(Vec::new())
}
