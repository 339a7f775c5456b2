//! `cargo xtask bench`: runs `tests/benches/datapath` (root, simulated node, release gateway)
//! and writes docs/BENCHMARKS.md from criterion's estimates and the bench's own JSON (the
//! percentile, concurrency and upload passes and the kernel's per-program BPF statistics).

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    bench_peers,
    cmd::{self, Steps},
    setup,
    test::GATEWAY_BIN_ENV,
};

#[derive(clap::Args)]
pub struct Args {
    /// A short run that checks that everything works (a few seconds per benchmark); its
    /// report goes to target/nodegate-bench/ unless --output says otherwise.
    #[arg(long)]
    quick: bool,
    /// Where to write the report (default docs/BENCHMARKS.md for a full run of every pass,
    /// target/nodegate-bench/BENCHMARKS.md otherwise).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Only write the report again from the last run's JSON (target/nodegate-bench/).
    #[arg(long)]
    report_only: bool,
    /// Which passes: `datapath` (kernel path and L4 proxy, criterion; plus the policy and
    /// token benches), `http` (side by side with Envoy and nginx), `scale` (kernel cost with
    /// 10 to 10,000 services), `all` (the default). Options may come before or after.
    #[arg(value_enum)]
    passes: Vec<Pass>,
    /// After `--`: passed on to the datapath bench binary (criterion's options, e.g. a name
    /// filter).
    #[arg(last = true)]
    criterion: Vec<OsString>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pass {
    All,
    Datapath,
    Http,
    Scale,
}

/// The passes of a run.
#[derive(Clone, Copy, Default)]
struct Passes {
    datapath: bool,
    http: bool,
    scale: bool,
}

impl Passes {
    const ALL: Self = Self {
        datapath: true,
        http: true,
        scale: true,
    };

    /// The passes named (none named: all of them).
    fn of(named: &[Pass]) -> Self {
        if named.is_empty() || named.contains(&Pass::All) {
            return Self::ALL;
        }
        Self {
            datapath: named.contains(&Pass::Datapath),
            http: named.contains(&Pass::Http),
            scale: named.contains(&Pass::Scale),
        }
    }

    fn all(self) -> bool {
        self.datapath && self.http && self.scale
    }

    fn peers_env(self) -> String {
        let mut p = Vec::new();
        if self.http {
            p.push("http");
        }
        if self.scale {
            p.push("scale");
        }
        p.join(",")
    }
}

pub fn run(args: &Args) -> Result<()> {
    let passes = Passes::of(&args.passes);
    let criterion_args = args.criterion.as_slice();
    let mut steps = Steps::default();
    if args.report_only {
        let out_dir = cmd::target_dir().join("nodegate-bench");
        let output = args
            .output
            .clone()
            .unwrap_or_else(|| out_dir.join("BENCHMARKS.md"));
        return write_report(
            passes,
            &out_dir.join("results.json"),
            &out_dir.join("peers.json"),
            &cmd::target_dir().join("criterion"),
            SystemTime::UNIX_EPOCH,
            &output,
        );
    }
    steps.run("setup", setup::run)?;
    let tools = if passes.http {
        Some(steps.run(
            "benchmark tools (wrk, h2load, nginx, oha, Envoy)",
            setup::bench_tools,
        )?)
    } else {
        None
    };
    steps.run("build the gateway (release)", build_release)?;
    let out_dir = cmd::target_dir().join("nodegate-bench");
    let results_path = out_dir.join("results.json");
    let peers_path = out_dir.join("peers.json");
    let criterion_dir = cmd::target_dir().join("criterion");
    let started = SystemTime::now();
    let gateway_bin = cmd::target_dir().join("release").join("gateway");
    if passes.datapath {
        steps.run("run the benchmarks (root, simulated node)", || {
            let mut bench = cmd::cargo();
            bench
                .args(["bench", "-p", "nodegate-tests", "--bench", "datapath", "--"])
                .args(criterion_args)
                .env(GATEWAY_BIN_ENV, &gateway_bin)
                .env("NODEGATE_BENCH_OUT", &results_path)
                .env("CRITERION_HOME", &criterion_dir);
            if args.quick {
                bench.env("NODEGATE_BENCH_QUICK", "1");
            }
            cmd::run(&mut bench)
        })?;
        steps.run(
            "run the policy and token benchmarks (userspace hot path)",
            || {
                let mut bench = cmd::cargo();
                bench
                    .args([
                        "bench", "-p", "gateway", "--bench", "policy", "--bench", "auth", "--",
                    ])
                    .args(criterion_args)
                    .env("CRITERION_HOME", &criterion_dir);
                if args.quick {
                    bench.args(["--warm-up-time", "0.5", "--measurement-time", "1"]);
                }
                cmd::run(&mut bench)
            },
        )?;
    }
    if passes.http || passes.scale {
        steps.run(
            "run the side-by-side and scale benchmarks (root, simulated node)",
            || {
                run_peers(
                    args.quick,
                    passes,
                    tools.as_ref(),
                    &gateway_bin,
                    &peers_path,
                )
            },
        )?;
    }
    let output = args.output.clone().unwrap_or_else(|| {
        if args.quick || !passes.all() {
            out_dir.join("BENCHMARKS.md")
        } else {
            cmd::project_root().join("docs").join("BENCHMARKS.md")
        }
    });
    steps.run("write the report", || {
        write_report(
            passes,
            &results_path,
            &peers_path,
            &criterion_dir,
            started,
            &output,
        )
    })?;
    steps.print_summary("cargo xtask bench: done");
    Ok(())
}

fn write_report(
    passes: Passes,
    results_path: &Path,
    peers_path: &Path,
    criterion_dir: &Path,
    started: SystemTime,
    output: &Path,
) -> Result<()> {
    let read = |path: &Path| -> Result<Value> {
        serde_json::from_str(
            &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))
    };
    let results = if passes.datapath {
        read(results_path)?
    } else {
        Value::Null
    };
    let peers = if passes.http || passes.scale {
        read(peers_path)?
    } else {
        Value::Null
    };
    let report = Report::new(&results, criterion_dir, started)
        .with_peers(&peers)
        .render();
    if let Some(dir) = output.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(output, report).with_context(|| format!("writing {}", output.display()))?;
    println!("wrote {}", output.display());
    Ok(())
}

/// The gateway and `hyper_floor`, the hyper pass-through the `http` pass runs beside it.
fn build_release() -> Result<()> {
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "-p",
        "gateway",
        "--bins",
        "--example",
        "hyper_floor",
    ]))
}

/// `cargo bench -p nodegate-tests --bench peers`: the `http` and `scale` passes.
fn run_peers(
    quick: bool,
    passes: Passes,
    tools: Option<&setup::BenchTools>,
    gateway_bin: &Path,
    peers_path: &Path,
) -> Result<()> {
    let mut bench = cmd::cargo();
    bench
        .args(["bench", "-p", "nodegate-tests", "--bench", "peers"])
        .env(GATEWAY_BIN_ENV, gateway_bin)
        .env("NODEGATE_BENCH_PASSES", passes.peers_env())
        .env("NODEGATE_PEERS_OUT", peers_path);
    if let Some(tools) = tools {
        bench
            .env("NODEGATE_BENCH_OHA", &tools.oha)
            .env("NODEGATE_BENCH_ENVOY", &tools.envoy);
    }
    if quick {
        bench.env("NODEGATE_BENCH_QUICK", "1");
    }
    cmd::run(&mut bench)
}

/// bpftool's attach types in the order a connection meets the programs.
const ATTACH_ORDER: [&str; 4] = [
    "cgroup_inet4_connect",
    "cgroup_inet6_connect",
    "cgroup_sock_ops",
    "cgroup_inet_ingress",
];

/// criterion's estimate of one benchmark, in nanoseconds.
struct Estimate {
    median: f64,
    mean: f64,
    mean_low: f64,
    mean_high: f64,
}

/// Reads `<criterion>/<group>/<name>/new/estimates.json`, ignoring results older than this run
/// (a benchmark filtered out keeps its previous files).
fn estimate(criterion_dir: &Path, id: &str, started: SystemTime) -> Option<Estimate> {
    let path = criterion_dir.join(id).join("new").join("estimates.json");
    let modified = fs::metadata(&path).and_then(|m| m.modified()).ok()?;
    if modified < started {
        return None;
    }
    let value: Value = serde_json::from_str(&fs::read_to_string(&path).ok()?).ok()?;
    let point = |key: &str| value.get(key)?.get("point_estimate")?.as_f64();
    let bound = |key: &str| {
        value
            .get("mean")?
            .get("confidence_interval")?
            .get(key)?
            .as_f64()
    };
    Some(Estimate {
        median: point("median")?,
        mean: point("mean")?,
        mean_low: bound("lower_bound")?,
        mean_high: bound("upper_bound")?,
    })
}

struct Report<'a> {
    results: &'a Value,
    /// `tests/benches/peers`' JSON (`http` and `scale` passes), or null.
    peers: &'a Value,
    criterion_dir: &'a Path,
    started: SystemTime,
}

impl<'a> Report<'a> {
    fn new(results: &'a Value, criterion_dir: &'a Path, started: SystemTime) -> Self {
        Self {
            results,
            peers: &Value::Null,
            criterion_dir,
            started,
        }
    }

    fn with_peers(mut self, peers: &'a Value) -> Self {
        self.peers = peers;
        self
    }

    fn render(&self) -> String {
        let mut md = String::new();
        self.header(&mut md);
        self.summary(&mut md);
        bench_peers::render_http(&mut md, self.peers);
        bench_peers::render_scale(&mut md, self.peers);
        self.criterion_tables(&mut md);
        self.percentiles(&mut md);
        self.throughput(&mut md);
        self.bpf(&mut md);
        self.hot_path(&mut md);
        method(&mut md);
        md
    }

    fn header(&self, md: &mut String) {
        // The datapath pass's environment, or the peers pass's when only that ran.
        let env = if self.results["environment"].is_object() {
            &self.results["environment"]
        } else {
            &self.peers["environment"]
        };
        let quick = if self.results["quick"].as_bool() == Some(true)
            || self.peers["quick"].as_bool() == Some(true)
        {
            " **Quick run (`--quick`): short measurements, for checking only.**"
        } else {
            ""
        };
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "Written by `cargo xtask bench` on {} from commit `{}`.{quick}\n",
            today(),
            commit()
        );
        let _ = writeln!(
            md,
            "Machine: {} ({} CPUs), kernel {}. Gateway: `{}` (release build). Everything below ran \
             on a simulated node (network namespaces and cgroup v2 on the real kernel, as in the \
             end-to-end tests): the client in a pod's namespace, the backend in another pod, the \
             gateway (and the proxies it is compared with) in the node's namespace.\n",
            str_of(&env["cpu"]),
            env["cpus"],
            str_of(&env["kernel"]),
            str_of(&env["gateway"]),
        );
        for (what, results) in [
            ("kernel path and L4 proxy", self.results),
            ("side by side and scale", self.peers),
        ] {
            let load = &results["load_average"];
            if load.is_object() {
                let _ = writeln!(
                    md,
                    "1-minute load average ({what}): {:.2} at the start, {:.2} at the end (with {} \
                     CPUs, anything well above 0 means other work shared the machine and the \
                     figures are noisier).\n",
                    num(&load["start"]),
                    num(&load["end"]),
                    env["cpus"],
                );
            }
        }
    }

    /// Average run time of the program with `attach_type` in `phase`, from the kernel stats.
    fn bpf_avg(&self, phase: &str, attach_type: &str) -> Option<f64> {
        self.results["bpf"]
            .as_array()?
            .iter()
            .find(|p| p["phase"] == phase)?["programs"]
            .as_array()?
            .iter()
            .find(|p| p["attach_type"] == attach_type)?["avg_ns"]
            .as_f64()
    }

    fn median(&self, id: &str) -> Option<f64> {
        estimate(self.criterion_dir, id, self.started).map(|e| e.median)
    }

    /// The figures the rest of the file backs, in a few lines.
    fn summary(&self, md: &mut String) {
        let mut lines = bench_peers::summary(self.peers);
        let connect4 = "cgroup_inet4_connect";
        if let (Some(hook), Some(with), Some(without)) = (
            self.bpf_avg("connect/hooks_unprotected", connect4),
            self.median("connect/hooks_unprotected"),
            self.median("connect/no_hooks"),
        ) {
            lines.push(format!(
                "Unprotected traffic from a hooked pod: connect4 runs in {hook:.0} ns (kernel \
                 statistics), {:.1}% of a `connect()`; the medians, {} with the hooks and {} \
                 without ({}), differ by run-to-run noise (see below).",
                hook / with * 100.0,
                nanos(with),
                nanos(without),
                ratio(with, without)
            ));
        }
        if let (Some(hook), Some(redirected), Some(local)) = (
            self.bpf_avg("connect/redirected", connect4),
            self.median("connect/redirected"),
            self.median("connect/no_hooks_proxy"),
        ) {
            lines.push(format!(
                "Redirect: connect4 runs in {hook:.0} ns when it rewrites the destination. A \
                 redirected `connect()` took {}, one straight to the proxy's listener without \
                 hooks {} ({}): far more apart than the program's run time, because on this VM a \
                 `connect()` is dominated by the listener's side of the handshake (see below).",
                nanos(redirected),
                nanos(local),
                ratio(redirected, local)
            ));
        }
        if let Some(ingress) = self.bpf_avg("request_persistent/direct", "cgroup_inet_ingress") {
            lines.push(format!(
                "Packet enforcement: the ingress program costs {ingress:.0} ns per packet \
                 delivered to a pod."
            ));
        }
        let latency = self.results["latency"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        let stats = |kind: &str, mode: &str| {
            latency
                .iter()
                .find(|r| r["kind"] == kind && r["mode"] == mode)
                .map(|r| &r["stats"])
        };
        for (kind, label) in [
            ("persistent", "on an open connection"),
            ("per_connection", "with a connection per request"),
        ] {
            if let (Some(d), Some(p)) = (stats(kind, "direct"), stats(kind, "proxy")) {
                lines.push(format!(
                    "Proxy, {label}: p50 {} vs {} direct ({}), p99 {} vs {} ({}).",
                    micros(num(&p["p50_us"])),
                    micros(num(&d["p50_us"])),
                    ratio(num(&p["p50_us"]), num(&d["p50_us"])),
                    micros(num(&p["p99_us"])),
                    micros(num(&d["p99_us"])),
                    ratio(num(&p["p99_us"]), num(&d["p99_us"])),
                ));
            }
        }
        let pair = |key: &str, field: &str| -> Option<(f64, f64)> {
            let rows = self.results[key].as_array()?;
            let get = |mode: &str| {
                rows.iter()
                    .find(|r| r["mode"] == mode)
                    .map(|r| num(&r[field]))
            };
            Some((get("direct")?, get("proxy")?))
        };
        if let Some((d, p)) = pair("concurrent", "per_s") {
            lines.push(format!(
                "Proxy throughput, small requests on {} connections: {p:.0} req/s vs {d:.0} direct \
                 ({}).",
                self.results["concurrent"][0]["connections"],
                ratio(p, d)
            ));
        }
        if let Some((d, p)) = pair("upload", "mib_per_s") {
            lines.push(format!(
                "Proxy throughput, one upload: {p:.0} MiB/s vs {d:.0} MiB/s direct ({}).",
                ratio(p, d)
            ));
        }
        if lines.is_empty() {
            return;
        }
        let _ = writeln!(md, "## Summary\n");
        for line in lines {
            let _ = writeln!(md, "- {line}");
        }
        let _ = writeln!(md);
    }

    fn criterion_tables(&self, md: &mut String) {
        let benchmarks = self.results["criterion"]["benchmarks"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        let groups: BTreeSet<&str> = benchmarks
            .iter()
            .filter_map(|b| b["id"].as_str()?.split('/').next())
            .collect();
        let titles = [
            (
                "connect",
                "## connect() latency\n\nThe `connect(2)` call alone (socket creation excluded), from \
                 the client pod's network namespace. Whether the hooks run depends only on the cgroup \
                 of the calling process. `connect()` returns once the handshake is done, and on one \
                 machine the listener's side of it (and the wake-up of the accepting process) often \
                 runs inside the caller's system call, so each case is compared with a connection to \
                 the same listener: `redirected` with `no_hooks_proxy`, which dials the proxy's \
                 listener directly from outside the hooked cgroup. Even so, the medians move by \
                 several microseconds between runs, in either direction: much more than the \
                 programs' own run time (the BPF statistics below), and set by whether the \
                 listening process is busy or has to be woken on an idle virtual CPU. Read these \
                 rows as \"the hooks add nothing measurable to `connect()`\", and the BPF table for \
                 their actual cost.",
            ),
            (
                "request_persistent",
                "## Requests on an open connection: proxy vs direct\n\nA 64-byte request and a \
                 256-byte response, one at a time, on one connection: through the VIP (redirected \
                 to the proxy, which forwards to the backend's protected port) and directly to the \
                 same backend process on an unprotected port.",
            ),
            (
                "request_per_connection",
                "## A connection per request: proxy vs direct\n\nConnect, one request and response, \
                 close: what a client without connection reuse pays, including the proxy's accept, \
                 original-destination lookup, rule, upstream connect and decision line.",
            ),
        ];
        for (group, title) in titles {
            if !groups.contains(group) {
                continue;
            }
            let _ = writeln!(md, "{title}\n");
            let _ = writeln!(
                md,
                "| benchmark | what | median | mean [95% CI] | median vs baseline |"
            );
            let _ = writeln!(md, "|---|---|---:|---:|---:|");
            for bench in benchmarks
                .iter()
                .filter(|b| b["id"].as_str().is_some_and(|id| id.starts_with(group)))
            {
                let id = str_of(&bench["id"]);
                let what = str_of(&bench["what"]);
                let Some(est) = estimate(self.criterion_dir, id, self.started) else {
                    let _ = writeln!(md, "| `{id}` | {what} | not run | | |");
                    continue;
                };
                let ratio = bench["baseline"]
                    .as_str()
                    .and_then(|base| estimate(self.criterion_dir, base, self.started))
                    .map_or_else(
                        || "baseline".to_owned(),
                        |base| ratio(est.median, base.median),
                    );
                let _ = writeln!(
                    md,
                    "| `{id}` | {what} | {} | {} [{} – {}] | {ratio} |",
                    nanos(est.median),
                    nanos(est.mean),
                    nanos(est.mean_low),
                    nanos(est.mean_high),
                );
            }
            let _ = writeln!(md);
        }
    }

    fn percentiles(&self, md: &mut String) {
        let rows = self.results["latency"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "## Latency percentiles: proxy vs direct, same run\n\nEvery request timed on its own; \
             direct and proxied requests alternate in rounds so that both see the same machine. \
             Requests/s is for one client doing one request at a time.\n"
        );
        let _ = writeln!(
            md,
            "| requests | path | count | p50 | p90 | p99 | max | requests/s | p50 vs direct | p99 vs direct |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for row in rows {
            let kind = str_of(&row["kind"]);
            let stats = &row["stats"];
            let direct = rows
                .iter()
                .find(|r| r["kind"] == row["kind"] && r["mode"] == "direct")
                .map(|r| &r["stats"]);
            let vs = |key: &str| match (direct, row["mode"].as_str()) {
                (Some(d), Some("proxy")) => ratio(num(&stats[key]), num(&d[key])),
                _ => String::new(),
            };
            let label = if kind == "persistent" {
                "on an open connection"
            } else {
                "a connection each"
            };
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} |",
                str_of(&row["mode"]),
                stats["count"],
                micros(num(&stats["p50_us"])),
                micros(num(&stats["p90_us"])),
                micros(num(&stats["p99_us"])),
                micros(num(&stats["max_us"])),
                num(&stats["per_s"]),
                vs("p50_us"),
                vs("p99_us"),
            );
        }
        let _ = writeln!(md);
    }

    fn throughput(&self, md: &mut String) {
        let pair = |key: &str| -> Option<(&Value, &Value)> {
            let rows = self.results[key].as_array()?;
            let find = |mode: &str| rows.iter().find(|r| r["mode"] == mode);
            Some((find("direct")?, find("proxy")?))
        };
        let concurrent = pair("concurrent");
        let upload = pair("upload");
        if concurrent.is_none() && upload.is_none() {
            return;
        }
        let _ = writeln!(md, "## Throughput: proxy vs direct, same run\n");
        let _ = writeln!(md, "| workload | direct | proxy | proxy / direct |");
        let _ = writeln!(md, "|---|---:|---:|---:|");
        if let Some((direct, proxy)) = concurrent {
            let (d, p) = (num(&direct["per_s"]), num(&proxy["per_s"]));
            let _ = writeln!(
                md,
                "| {} connections, small requests back to back | {d:.0} req/s | {p:.0} req/s | {} |",
                direct["connections"],
                ratio(p, d),
            );
        }
        if let Some((direct, proxy)) = upload {
            let (d, p) = (num(&direct["mib_per_s"]), num(&proxy["mib_per_s"]));
            let mib = direct["bytes"].as_u64().unwrap_or(0) >> 20;
            let _ = writeln!(
                md,
                "| upload of {mib} MiB on one connection | {d:.0} MiB/s | {p:.0} MiB/s | {} |",
                ratio(p, d),
            );
        }
        let _ = writeln!(md);
    }

    fn bpf(&self, md: &mut String) {
        let phases = self.results["bpf"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        if phases.is_empty() {
            return;
        }
        // Data-path order; programs that never ran (connect6: the bench is IPv4) are left out.
        let mut programs: Vec<(usize, &str)> = Vec::new();
        for phase in phases {
            for prog in phase["programs"].as_array().into_iter().flatten() {
                let name = str_of(&prog["program"]);
                let ran = prog["runs"].as_u64().unwrap_or(0) > 0;
                if ran && !programs.iter().any(|(_, n)| *n == name) {
                    let rank = ATTACH_ORDER
                        .iter()
                        .position(|t| prog["attach_type"] == *t)
                        .unwrap_or(ATTACH_ORDER.len());
                    programs.push((rank, name));
                }
            }
        }
        programs.sort_unstable();
        let programs: Vec<&str> = programs.into_iter().map(|(_, name)| name).collect();
        let _ = writeln!(
            md,
            "## Per-program run time (kernel BPF statistics)\n\nFrom `kernel.bpf_stats_enabled=1` \
             (restored afterwards): the kernel's own `run_time_ns / run_cnt` of each program \
             attached to the hooked cgroup, per phase of the run. A cell is the average run time \
             and, in parentheses, the number of runs; connect4/6 run once per `connect()` from the \
             hooked cgroup, sock_ops on socket events, ingress once per packet delivered to a pod. \
             The backend pod is in the hooked cgroup too, so sock_ops and ingress also run on its \
             side when the caller is not hooked. Phases with few runs (a connect per criterion \
             sample) show cold-cache costs.\n"
        );
        let _ = write!(md, "| phase |");
        for name in &programs {
            let _ = write!(md, " {name} |");
        }
        let _ = writeln!(md);
        let _ = write!(md, "|---|");
        for _ in &programs {
            let _ = write!(md, "---:|");
        }
        let _ = writeln!(md);
        for phase in phases {
            let _ = write!(md, "| `{}` |", str_of(&phase["phase"]));
            for name in &programs {
                let cell = phase["programs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["program"] == *name)
                    .and_then(|p| {
                        let runs = p["runs"].as_u64()?;
                        let avg = p["avg_ns"].as_f64()?;
                        Some(format!("{avg:.0} ns ({runs})"))
                    })
                    .unwrap_or_else(|| "–".to_owned());
                let _ = write!(md, " {cell} |");
            }
            let _ = writeln!(md);
        }
        let _ = writeln!(md);
    }
}

impl Report<'_> {
    /// The gateway's own criterion benches (`gateway/benches/{policy,auth}.rs`): policy
    /// evaluation, path canonicalization and token verification, each measured in-process.
    fn hot_path(&self, md: &mut String) {
        let groups = [
            (
                "evaluate",
                "policy evaluation; the parameter is the number of rules (target: ≤ 1 µs median at 1,000)",
            ),
            (
                "canonical_path",
                "request-target parsing into the canonical path",
            ),
            (
                "verify",
                "bearer JWT verification: a signature check (cold) and a verified-token cache hit (target: ≤ 2 µs)",
            ),
        ];
        let mut rows = Vec::new();
        for (group, what) in groups {
            for id in criterion_ids(self.criterion_dir, group) {
                if let Some(est) = estimate(self.criterion_dir, &id, self.started) {
                    rows.push((id, what, est));
                }
            }
        }
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "## Identity and policy on the request path\n\n`cargo bench -p gateway --bench policy \
             --bench auth`, in-process (no network): the per-request work the HTTP proxy adds on top \
             of forwarding.\n\n| benchmark | what | median | mean [95% CI] |\n|---|---|---:|---:|"
        );
        for (id, what, est) in rows {
            let _ = writeln!(
                md,
                "| `{id}` | {what} | {} | {} [{} – {}] |",
                nanos(est.median),
                nanos(est.mean),
                nanos(est.mean_low),
                nanos(est.mean_high)
            );
        }
        let _ = writeln!(md);
    }
}

/// Benchmark ids under `<criterion>/<group>/`: `group/name` or `group/name/param`, sorted so
/// that numeric parameters come in order.
fn criterion_ids(criterion_dir: &Path, group: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let Ok(names) = fs::read_dir(criterion_dir.join(group)) else {
        return ids;
    };
    for name in names.flatten() {
        let name_path = name.path();
        let name = name.file_name().to_string_lossy().into_owned();
        if name == "report" {
            continue;
        }
        if name_path.join("new").is_dir() {
            ids.push(format!("{group}/{name}"));
            continue;
        }
        let Ok(params) = fs::read_dir(&name_path) else {
            continue;
        };
        for param in params.flatten() {
            let param = param.file_name().to_string_lossy().into_owned();
            if param != "report" {
                ids.push(format!("{group}/{name}/{param}"));
            }
        }
    }
    ids.sort_by_key(|id| {
        let (head, last) = id.rsplit_once('/').unwrap_or((id.as_str(), ""));
        (
            head.to_owned(),
            last.parse::<u64>().unwrap_or(u64::MAX),
            last.to_owned(),
        )
    });
    ids
}

fn method(md: &mut String) {
    let _ = writeln!(
        md,
        "## Method\n\n\
         - `cargo xtask bench` builds the gateway in release mode and runs \
           `cargo bench -p nodegate-tests --bench datapath` as root (`tests/benches/datapath/`). \
           The backend is the bench executable itself, started inside the backend pod; it answers \
           each 64-byte request with 256 bytes, from a pool of accepting threads.\n\
         - The bench process moves itself between cgroups (the node's own cgroup has no hooks, the \
           client pod's is hooked) and runs its sockets on a thread inside the client pod's network \
           namespace.\n\
         - `connect()` benchmarks time only the `connect(2)` call; each is followed by an untimed \
           round trip, so that the server or the proxy has taken the connection before the next \
           one (their accept queues never fill), and every client connection is closed with an RST \
           (`SO_LINGER` 0) so that hundreds of thousands of connections do not exhaust ephemeral \
           ports. The simulated node's namespaces use ports 16000-65000 and `tcp_tw_reuse=1`.\n\
         - The proxy writes one decision line per connection (stdout and a file): that cost is \
           part of every proxied number, as it is in production.\n\
         - criterion: estimates are of the time per iteration; medians are compared for the \
           ratios. The percentile pass measures each request on its own with `Instant`.\n\
         - Client, proxy and backend share the machine's CPUs: on a small machine the proxy's \
           throughput ratio reflects CPU contention as much as per-request cost.\n\
         - Side by side (`cargo xtask bench http`, `tests/benches/peers/`): the gateway is the \
           release build, started by the harness on the simulated node as in the end-to-end \
           tests; the load generator runs in the client pod (hooked cgroup) and dials the \
           service VIP, which the kernel redirects to the gateway, exactly as a pod would. nginx \
           and Envoy run in the node's namespace (where the gateway runs) and the load generator \
           dials their listen address on the node IP; all three forward to the same backend \
           process (the gateway to its protected port, the others to an unprotected one, which \
           is the same nginx server block). So every proxied request crosses the same veth pairs \
           twice. CPU s / 1000 requests is the proxy process's `utime + stime` (all threads, \
           `/proc/PID/stat`) over the run divided by the requests the load generator counted; \
           RSS is `VmRSS`. On this virtual machine a wake-up from idle is expensive, so at 1000 \
           req/s every proxy spends several times more CPU per request than at full load; both \
           are reported.\n\
         - The gateway writes one decision line per request (stdout and a file), Envoy and nginx \
           no access log: the gateway's figures include that cost.\n\
         - The `layer:` and `floor:` rows (HTTP/1.1) take the gateway apart: `gateway_l4` is \
           the same service as an L4 rule (no HTTP), `gateway_anon` its HTTP path with one rule \
           allowing anonymous `GET` (requests without the token: no token check, no 100 rules), \
           and `hyper_floor` is not the gateway but `gateway/examples/hyper_floor.rs`, hyper's \
           HTTP/1.1 server and client passing requests through with nothing else (one backend \
           connection per client connection, a current-thread runtime), started like nginx in \
           the node's namespace. The distance from `hyper_floor` to `gateway_anon` is the \
           gateway's own per-request work ([PROFILE.md](PROFILE.md)).\n\
         - To profile one proxy under load: `NODEGATE_PEERS_ONLY=gateway,http/1.1 \
           NODEGATE_PEERS_SECONDS=30 cargo xtask bench http --quick` (and \
           `NODEGATE_PEERS_FIXED_SECONDS` for a longer run at 1000 req/s) and, meanwhile, \
           `perf record -g -p <gateway pid>` (a build with `CARGO_PROFILE_RELEASE_DEBUG=1` and \
           `--call-graph dwarf` gives whole stacks). The gateway's profile: \
           [PROFILE.md](PROFILE.md).\n"
    );
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or("?")
}

fn num(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

fn ratio(value: f64, baseline: f64) -> String {
    if baseline > 0.0 && value.is_finite() {
        format!("{:.2}×", value / baseline)
    } else {
        "–".to_owned()
    }
}

fn nanos(ns: f64) -> String {
    if ns >= 1_000_000.0 {
        format!("{:.2} ms", ns / 1_000_000.0)
    } else if ns >= 1_000.0 {
        format!("{:.2} µs", ns / 1_000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

fn micros(us: f64) -> String {
    nanos(us * 1_000.0)
}

fn today() -> String {
    cmd::output(Command::new("date").args(["-u", "+%Y-%m-%d"]))
        .map_or_else(|| "?".to_owned(), |d| d.trim().to_owned())
}

fn commit() -> String {
    let root = cmd::project_root();
    let sha = cmd::output(Command::new("git").arg("-C").arg(&root).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]))
    .map_or_else(|| "?".to_owned(), |s| s.trim().to_owned());
    let dirty = cmd::output(Command::new("git").arg("-C").arg(&root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .is_some_and(|s| !s.trim().is_empty());
    if dirty {
        format!("{sha}, with local changes")
    } else {
        sha
    }
}

/// Checks the report writer against a results file without running anything:
/// `cargo xtask bench --output X` after a run uses the same code.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations_and_ratios() {
        assert_eq!(nanos(950.0), "950 ns");
        assert_eq!(nanos(6_543.0), "6.54 µs");
        assert_eq!(nanos(2_500_000.0), "2.50 ms");
        assert_eq!(micros(12.5), "12.50 µs");
        assert_eq!(ratio(3.0, 2.0), "1.50×");
        assert_eq!(ratio(3.0, 0.0), "–");
    }

    #[test]
    fn renders_every_section_from_results() {
        let results = serde_json::json!({
            "quick": true,
            "environment": { "cpu": "Test CPU", "cpus": 2, "kernel": "6.18", "gateway": "g" },
            "criterion": { "benchmarks": [] },
            "latency": [
                { "kind": "persistent", "mode": "direct", "stats": { "count": 10, "p50_us": 10.0, "p90_us": 11.0, "p99_us": 20.0, "max_us": 30.0, "per_s": 90_000.0 } },
                { "kind": "persistent", "mode": "proxy", "stats": { "count": 10, "p50_us": 30.0, "p90_us": 33.0, "p99_us": 50.0, "max_us": 90.0, "per_s": 30_000.0 } }
            ],
            "concurrent": [
                { "mode": "direct", "connections": 8, "per_s": 100_000.0 },
                { "mode": "proxy", "connections": 8, "per_s": 40_000.0 }
            ],
            "upload": [
                { "mode": "direct", "bytes": 33_554_432, "mib_per_s": 2000.0 },
                { "mode": "proxy", "bytes": 33_554_432, "mib_per_s": 1000.0 }
            ],
            "bpf": [
                { "phase": "connect/redirected", "programs": [
                    { "program": "ng_ingress", "attach_type": "cgroup_inet_ingress", "runs": 10, "avg_ns": 250.0 },
                    { "program": "ng_connect4", "attach_type": "cgroup_inet4_connect", "runs": 100, "avg_ns": 400.0 },
                    { "program": "ng_connect6", "attach_type": "cgroup_inet6_connect", "runs": 0, "avg_ns": null }
                ] }
            ]
        });
        let md = Report::new(&results, Path::new("/nonexistent"), SystemTime::UNIX_EPOCH).render();
        assert!(md.contains("Quick run"), "{md}");
        assert!(
            md.contains("| on an open connection | proxy | 10 | 30.00 µs |"),
            "{md}"
        );
        assert!(md.contains("| 3.00× | 2.50× |"), "{md}");
        assert!(md.contains("| 8 connections, small requests back to back | 100000 req/s | 40000 req/s | 0.40× |"), "{md}");
        assert!(md.contains("| phase | ng_connect4 | ng_ingress |"), "{md}");
        assert!(
            md.contains("| `connect/redirected` | 400 ns (100) | 250 ns (10) |"),
            "{md}"
        );
        assert!(
            md.contains("- Proxy, on an open connection: p50 30.00 µs vs 10.00 µs direct (3.00×)"),
            "{md}"
        );
        // No criterion estimates on disk: no connect() lines in the summary.
        assert!(!md.contains("- Redirect:"), "{md}");
    }
}
