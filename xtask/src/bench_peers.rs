//! The side-by-side (`http`) and many-services (`scale`) sections of docs/BENCHMARKS.md, from
//! the JSON of `tests/benches/peers` (`target/nodegate-bench/peers.json`).

use std::fmt::Write as _;

use serde_json::Value;

/// The targets for the gateway with full auth and policy.
const TARGET_VS_NGINX: f64 = 0.8;
const TARGET_VS_ENVOY_CACHED: f64 = 2.5;
const TARGET_ADDED_P50_US: f64 = 40.0;
const TARGET_P99_VS_NGINX: f64 = 1.2;
const TARGET_CPU_PER_1000: f64 = 0.08;
const TARGET_RSS_IDLE_MB: f64 = 16.0;
const TARGET_RSS_CONNS_MB: f64 = 64.0;

const TARGETS: [(&str, &str); 8] = [
    ("direct", "direct (backend, no proxy)"),
    ("gateway", "Nodegate: JWT + 100-rule policy"),
    ("envoy", "Envoy: jwt_authn + RBAC"),
    ("envoy_cached", "Envoy: jwt_authn (jwt_cache_config) + RBAC"),
    ("nginx", "nginx: proxy_pass, upstream keep-alive"),
    // The gateway's layers (HTTP/1.1 only): what its cost is made of.
    (
        "gateway_l4",
        "layer: Nodegate as an L4 rule (redirect + byte copy)",
    ),
    (
        "gateway_anon",
        "layer: Nodegate HTTP, 1 rule, anonymous (no token)",
    ),
    (
        "hyper_floor",
        "floor: hyper server + client, pass-through only",
    ),
];
const PROTOS: [&str; 4] = ["http/1.1", "h2c", "http/1.1+tls", "h2+tls"];

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    })
}

fn rows(peers: &Value) -> &[Value] {
    peers["http"]["rows"]
        .as_array()
        .map_or(&[][..], Vec::as_slice)
}

fn get(row: &Value, path: &[&str]) -> Option<f64> {
    let mut v = row;
    for key in path {
        v = v.get(key)?;
    }
    v.as_f64()
}

/// The value of `path` in every trial of `target` over `proto`.
fn series(peers: &Value, proto: &str, target: &str, path: &[&str]) -> Vec<f64> {
    rows(peers)
        .iter()
        .filter(|r| r["proto"] == proto && r["target"] == target)
        .filter_map(|r| get(r, path))
        .collect()
}

fn med(peers: &Value, proto: &str, target: &str, path: &[&str]) -> Option<f64> {
    median(series(peers, proto, target, path))
}

/// Per-trial ratio `a(target_a) / b(target_b)` (same trial), and its median.
fn trial_ratios(
    peers: &Value,
    proto: &str,
    (ta, pa): (&str, &[&str]),
    (tb, pb): (&str, &[&str]),
    diff: bool,
) -> Vec<f64> {
    let trials: std::collections::BTreeSet<u64> = rows(peers)
        .iter()
        .filter_map(|r| r["trial"].as_u64())
        .collect();
    trials
        .into_iter()
        .filter_map(|t| {
            let find = |target: &str, path: &[&str]| {
                rows(peers)
                    .iter()
                    .find(|r| r["trial"] == t && r["proto"] == proto && r["target"] == target)
                    .and_then(|r| get(r, path))
            };
            let (a, b) = (find(ta, pa)?, find(tb, pb)?);
            Some(if diff { a - b } else { a / b })
        })
        .collect()
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_owned(), f)
}

fn us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

fn list(values: &[f64], f: impl Fn(f64) -> String) -> String {
    values.iter().map(|&v| f(v)).collect::<Vec<_>>().join(", ")
}

type TargetRow = (String, String, String, Option<bool>);

/// One target row: the median of the per-trial `values`, formatted, and whether it is `ok`.
fn target_row(
    what: &str,
    goal: String,
    values: &[f64],
    fmt: fn(f64) -> String,
    ok: impl Fn(f64) -> bool,
) -> TargetRow {
    let m = median(values.to_vec());
    (
        what.to_owned(),
        goal,
        format!("{} (trials {})", fmt_opt(m, fmt), list(values, fmt)),
        m.map(ok),
    )
}

fn times(v: f64) -> String {
    format!("{v:.2}×")
}

fn cpu(v: f64) -> String {
    format!("{v:.3}")
}

/// The gateway's figures against the targets: (what, goal, measured, met).
pub fn targets(peers: &Value) -> Vec<TargetRow> {
    let p = "http/1.1";
    let per_s: &[&str] = &["max", "per_s"];
    let vs = |other: &str, path: &[&str], diff: bool| {
        trial_ratios(peers, p, ("gateway", path), (other, path), diff)
    };
    let mut out: Vec<TargetRow> = vec![
        target_row(
            "max req/s vs nginx",
            format!("≥ {TARGET_VS_NGINX}×"),
            &vs("nginx", per_s, false),
            times,
            |v| v >= TARGET_VS_NGINX,
        ),
        target_row(
            "max req/s vs Envoy (cached jwt_authn + RBAC)",
            format!("≥ {TARGET_VS_ENVOY_CACHED}×"),
            &vs("envoy_cached", per_s, false),
            times,
            |v| v >= TARGET_VS_ENVOY_CACHED,
        ),
        target_row(
            "added p50 at 1000 req/s (gateway − direct)",
            format!("≤ {TARGET_ADDED_P50_US} µs"),
            &vs("direct", &["fixed", "p50_us"], true),
            us,
            |v| v <= TARGET_ADDED_P50_US,
        ),
        target_row(
            "context: p50 at 1000 req/s, gateway − nginx (nginx's own added p50 is in the tables)",
            "–".to_owned(),
            &vs("nginx", &["fixed", "p50_us"], true),
            us,
            |_| true,
        ),
        target_row(
            "p99 at 1000 req/s vs nginx",
            format!("≤ {TARGET_P99_VS_NGINX}×"),
            &vs("nginx", &["fixed", "p99_us"], false),
            times,
            |v| v <= TARGET_P99_VS_NGINX,
        ),
    ];
    // The context row has no goal.
    out[3].3 = None;
    for (label, path) in [
        (
            "CPU s per 1000 requests at 1000 req/s",
            ["fixed", "cpu_s_per_1000"],
        ),
        (
            "CPU s per 1000 requests at max rate",
            ["max", "cpu_s_per_1000"],
        ),
    ] {
        out.push(target_row(
            label,
            format!("≤ {TARGET_CPU_PER_1000}"),
            &series(peers, p, "gateway", &path),
            cpu,
            |v| v <= TARGET_CPU_PER_1000,
        ));
    }
    for (label, key, limit) in [
        ("RSS idle", "rss_idle_bytes", TARGET_RSS_IDLE_MB),
        (
            "RSS with the idle connections open",
            "rss_idle_conns_bytes",
            TARGET_RSS_CONNS_MB,
        ),
    ] {
        out.push(target_row(
            label,
            format!("≤ {limit} MB"),
            &series(peers, p, "gateway", &[key]),
            mb,
            |v| v / 1e6 <= limit,
        ));
    }
    out
}

/// Summary lines for the top of the file.
pub fn summary(peers: &Value) -> Vec<String> {
    if rows(peers).is_empty() {
        return Vec::new();
    }
    let met: Vec<_> = targets(peers);
    let reached = met.iter().filter(|t| t.3 == Some(true)).count();
    let judged = met.iter().filter(|t| t.3.is_some()).count();
    let mut lines = vec![format!(
        "Side by side (HTTP/1.1 keep-alive, proxy on one core): the gateway with JWT auth and a \
         100-rule policy meets {reached} of {judged} targets (table below)."
    )];
    let p = "http/1.1";
    let per_s = |t: &str| med(peers, p, t, &["max", "per_s"]);
    if let (Some(g), Some(n), Some(e), Some(ec), Some(d)) = (
        per_s("gateway"),
        per_s("nginx"),
        per_s("envoy"),
        per_s("envoy_cached"),
        per_s("direct"),
    ) {
        lines.push(format!(
            "Max rate (medians): gateway {g:.0} req/s, nginx {n:.0}, Envoy {e:.0} ({ec:.0} with its \
             JWT cache), direct {d:.0}."
        ));
    }
    lines
}

pub fn render_http(md: &mut String, peers: &Value) {
    if rows(peers).is_empty() {
        return;
    }
    let plan = &peers["http"]["plan"];
    let _ = writeln!(
        md,
        "## Side by side: Nodegate, Envoy, nginx\n\n\
         The proxy under test is pinned to CPU {} (`taskset`; the gateway then runs its proxy on one \
         thread, a single-threaded runtime, Envoy runs with `--concurrency 1`, nginx with one process), the load \
         generator to CPU {} with one thread, and the nginx `return 200` backend (one process) \
         also to CPU {}, so that CPU {} is the proxy's alone. {} trial(s); each trial runs every \
         target in a rotated order, each proxy freshly started. Per target: a {} s warm-up, then \
         max rate for {} s with {} connections (wrk for HTTP/1.1, h2load for h2: the same number of \
         streams in flight, 4 per connection), then oha at a fixed {} req/s on {} connections with \
         `--latency-correction` for {} s (h2c and TLS: {} s each), then {} idle keep-alive \
         connections (one request each) for the RSS. Every request carries the same bearer \
         token; only the gateway and Envoy check it. Any non-2xx answer fails the run. \
         The `layer:` rows (HTTP/1.1 only) are the gateway with less to do, to show what its \
         cost is made of: the same service as an L4 rule (kernel redirect and byte copy), and \
         as HTTP with one rule allowing anonymous `GET`, its requests sent without the token. \
         The `floor:` row is not the gateway: hyper's HTTP/1.1 server and client passing \
         requests through, nothing else (`gateway/examples/hyper_floor.rs`), the floor of a \
         proxy built on hyper.\n",
        plan["proxy_cpu"],
        str_of(&plan["load_cpu"]),
        str_of(&plan["backend_cpu"]),
        plan["proxy_cpu"],
        plan["trials"],
        plan["warm_up_s"],
        plan["max_rate_s"],
        plan["max_rate_connections"],
        plan["fixed_rate"],
        plan["fixed_rate_connections"],
        plan["fixed_rate_s"],
        plan["other_protocols_s"],
        plan["idle_connections"],
    );
    render_targets(md, peers);
    render_medians(md, peers);
    render_trials(md, peers);
}

fn render_targets(md: &mut String, peers: &Value) {
    let _ = writeln!(
        md,
        "### Targets (gateway, HTTP/1.1, medians of the per-trial values)\n"
    );
    let _ = writeln!(md, "| target | goal | measured | met |\n|---|---|---|---|");
    for (what, goal, value, met) in targets(peers) {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(md, "| {what} | {goal} | {value} | {met} |");
    }
    let _ = writeln!(md);
}

fn render_medians(md: &mut String, peers: &Value) {
    for proto in PROTOS {
        let any = rows(peers).iter().any(|r| r["proto"] == proto);
        if !any {
            continue;
        }
        let _ = writeln!(
            md,
            "### {proto}: medians over the trials\n\n\
             | target | max req/s | vs nginx | vs Envoy cached | p50 | p99 | p99.9 | CPU s / 1000 req (max rate) | CPU s / 1000 req (1000 req/s) | RSS idle | RSS, idle conns |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (id, label) in TARGETS {
            // The layers run for HTTP/1.1 only: no row at all elsewhere.
            let Some(first) = rows(peers)
                .iter()
                .find(|r| r["proto"] == proto && r["target"] == id)
            else {
                continue;
            };
            if let Some(why) = first["missing"].as_str() {
                let _ = writeln!(md, "| {label} | missing: {why} | | | | | | | | | |");
                continue;
            }
            let m = |path: &[&str]| med(peers, proto, id, path);
            let ratio_to = |other: &str| {
                median(trial_ratios(
                    peers,
                    proto,
                    (id, &["max", "per_s"]),
                    (other, &["max", "per_s"]),
                    false,
                ))
            };
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_opt(m(&["max", "per_s"]), |v| format!("{v:.0}")),
                fmt_opt(ratio_to("nginx"), |v| format!("{v:.2}×")),
                fmt_opt(ratio_to("envoy_cached"), |v| format!("{v:.2}×")),
                fmt_opt(m(&["fixed", "p50_us"]), us),
                fmt_opt(m(&["fixed", "p99_us"]), us),
                fmt_opt(m(&["fixed", "p999_us"]), us),
                fmt_opt(m(&["max", "cpu_s_per_1000"]), |v| format!("{v:.3}")),
                fmt_opt(m(&["fixed", "cpu_s_per_1000"]), |v| format!("{v:.3}")),
                fmt_opt(m(&["rss_idle_bytes"]), mb),
                fmt_opt(m(&["rss_idle_conns_bytes"]), mb),
            );
        }
        let _ = writeln!(md);
    }
}

fn render_trials(md: &mut String, peers: &Value) {
    let _ = writeln!(
        md,
        "### Every trial\n\n\
         CPU busy: share of each CPU busy during the max-rate run (`/proc/stat`): which side \
         was saturated.\n\n\
         | trial | protocol | target | max req/s | CPU busy (0, 1) | p50 | p99 | p99.9 | CPU s / 1000 (max, fixed) | RSS idle | RSS, idle conns |\n\
         |---:|---|---|---:|---|---:|---:|---:|---|---:|---:|"
    );
    for r in rows(peers) {
        if let Some(why) = r["missing"].as_str() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | missing: {why} | | | | | | | |",
                r["trial"],
                str_of(&r["proto"]),
                str_of(&r["target"])
            );
            continue;
        }
        let busy = r["max"]["cores_busy"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|v| format!("{:.0}%", v.as_f64().unwrap_or(0.0) * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {busy} | {} | {} | {} | {} / {} | {} | {} |",
            r["trial"],
            str_of(&r["proto"]),
            str_of(&r["target"]),
            fmt_opt(get(r, &["max", "per_s"]), |v| format!("{v:.0}")),
            fmt_opt(get(r, &["fixed", "p50_us"]), us),
            fmt_opt(get(r, &["fixed", "p99_us"]), us),
            fmt_opt(get(r, &["fixed", "p999_us"]), us),
            fmt_opt(get(r, &["max", "cpu_s_per_1000"]), |v| format!("{v:.3}")),
            fmt_opt(get(r, &["fixed", "cpu_s_per_1000"]), |v| format!("{v:.3}")),
            fmt_opt(get(r, &["rss_idle_bytes"]), mb),
            fmt_opt(get(r, &["rss_idle_conns_bytes"]), mb),
        );
    }
    let _ = writeln!(md);
    let versions = &peers["environment"]["versions"];
    if let Some(v) = versions.as_object() {
        let _ = writeln!(
            md,
            "Tools: {}.\n",
            v.iter()
                .map(|(k, v)| format!("{k}: `{}`", str_of(v)))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

pub fn render_scale(md: &mut String, peers: &Value) {
    let Some(rows) = peers["scale"]["rows"].as_array() else {
        return;
    };
    let _ = writeln!(
        md,
        "## Kernel cost with many protected services\n\n\
         The gateway restarted with N services loaded from its config (each with a VIP and an \
         endpoint of its own; the measured one last). Per phase, the kernel's own average run \
         time per program run (`kernel.bpf_stats_enabled`), with the number of runs: \
         {} connects (each followed by one round trip) to the VIP (redirected) and to an \
         unprotected port, and {} round trips on one open connection, direct and through the \
         gateway (ingress runs per packet delivered to the backend pod). `ready` is the time \
         from start to `/readyz` 200.\n",
        peers["scale"]["connects"], peers["scale"]["round_trips"]
    );
    let _ = writeln!(
        md,
        "| services | ready | phase | connect() median | connect4 | sock_ops | ingress |\n\
         |---:|---:|---|---:|---:|---:|---:|"
    );
    for row in rows {
        if let Some(err) = row["error"].as_str() {
            let _ = writeln!(
                md,
                "| {} | failed to start: {} | | | | | |",
                row["services"],
                err.lines().next().unwrap_or("").replace('|', "\\|")
            );
            continue;
        }
        for phase in row["phases"].as_array().map_or(&[][..], Vec::as_slice) {
            let prog = |attach: &str| {
                phase["programs"]
                    .as_array()
                    .and_then(|ps| ps.iter().find(|p| p["attach_type"] == attach))
                    .map_or_else(
                        || "–".to_owned(),
                        |p| match p["avg_ns"].as_f64() {
                            Some(avg) => format!("{avg:.0} ns ({})", p["runs"]),
                            None => "– (0)".to_owned(),
                        },
                    )
            };
            let _ = writeln!(
                md,
                "| {} | {:.1} s | `{}` | {} | {} | {} | {} |",
                row["services"],
                row["ready_s"].as_f64().unwrap_or(f64::NAN),
                str_of(&phase["phase"]),
                fmt_opt(phase["median_connect_us"].as_f64(), |v| format!(
                    "{v:.1} µs"
                )),
                prog("cgroup_inet4_connect"),
                prog("cgroup_sock_ops"),
                prog("cgroup_inet_ingress"),
            );
        }
    }
    let _ = writeln!(md);
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_targets_from_rows() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let row = |trial: u64, target: &str, per_s: f64, p50: f64, p99: f64| {
            serde_json::json!({
                "trial": trial, "proto": "http/1.1", "target": target,
                "max": { "per_s": per_s, "cpu_s_per_1000": 0.05 },
                "fixed": { "p50_us": p50, "p99_us": p99, "p999_us": p99, "cpu_s_per_1000": 0.07 },
                "rss_idle_bytes": 10e6, "rss_idle_conns_bytes": 70e6,
            })
        };
        let peers = serde_json::json!({ "http": { "plan": {}, "rows": [
            row(1, "direct", 100_000.0, 50.0, 90.0),
            row(1, "gateway", 40_000.0, 80.0, 150.0),
            row(1, "nginx", 50_000.0, 70.0, 100.0),
            row(1, "envoy_cached", 10_000.0, 300.0, 600.0),
            { "trial": 1, "proto": "h2+tls", "target": "gateway", "missing": "no TLS" },
        ] } });
        let t = targets(&peers);
        assert_eq!(t[0].3, Some(true), "{t:?}"); // 0.8× nginx
        assert_eq!(t[1].3, Some(true), "{t:?}"); // 4×
        assert_eq!(t[2].3, Some(true), "{t:?}"); // +30 µs
        assert_eq!(t[3].3, None, "{t:?}"); // context: +10 µs
        assert_eq!(t[4].3, Some(false), "{t:?}"); // 1.5×
        assert_eq!(t[8].3, Some(false), "{t:?}"); // 70 MB
        let mut md = String::new();
        render_http(&mut md, &peers);
        assert!(
            md.contains("| Nodegate: JWT + 100-rule policy | 40000 | 0.80× | 4.00× | 80 µs |"),
            "{md}"
        );
        assert!(md.contains("missing: no TLS"), "{md}");
    }
}
