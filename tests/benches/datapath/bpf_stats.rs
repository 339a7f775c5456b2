//! Per-program run time from the kernel's own accounting (`kernel.bpf_stats_enabled`).
//!
//! With the sysctl on, the kernel adds each program run's duration to `run_time_ns` and counts
//! it in `run_cnt`; `bpftool prog show --json` reports both. Deltas around a phase give the
//! average cost of one run in that phase.

use std::{collections::BTreeMap, fs, io, path::Path, process::Command};

use nodegate_tests::harness::bpftool_cgroup_show;
use serde_json::{Value, json};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the statistics on and restores the previous value when dropped.
pub struct StatsEnabled {
    previous: String,
}

impl StatsEnabled {
    pub fn enable() -> io::Result<Self> {
        let previous = fs::read_to_string(SYSCTL)?.trim().to_owned();
        fs::write(SYSCTL, "1")?;
        Ok(Self { previous })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = fs::write(SYSCTL, &self.previous) {
            eprintln!(
                "bench: could not restore {SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
}

/// A program attached to the hooked cgroup.
#[derive(Debug, Clone)]
pub struct Prog {
    pub id: u64,
    pub name: String,
    pub attach_type: String,
}

/// The programs the kernel has attached directly to `cgroup` (the gateway's).
pub fn attached(cgroup: &Path) -> Result<Vec<Prog>, String> {
    let listed = bpftool_cgroup_show(cgroup).map_err(|e| e.to_string())?;
    Ok(listed
        .iter()
        .filter_map(|p| {
            Some(Prog {
                id: p.get("id")?.as_u64()?,
                name: p
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned(),
                attach_type: p
                    .get("attach_type")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_owned(),
            })
        })
        .collect())
}

/// (`run_time_ns`, `run_cnt`) per program id.
pub type Snapshot = BTreeMap<u64, (u64, u64)>;

pub fn snapshot(progs: &[Prog]) -> Snapshot {
    progs
        .iter()
        .map(|prog| {
            let out = Command::new("bpftool")
                .args(["prog", "show", "id", &prog.id.to_string(), "--json"])
                .output();
            let value: Value = out
                .ok()
                .and_then(|out| serde_json::from_slice(&out.stdout).ok())
                .unwrap_or(Value::Null);
            let field = |key: &str| value.get(key).and_then(Value::as_u64).unwrap_or(0);
            (prog.id, (field("run_time_ns"), field("run_cnt")))
        })
        .collect()
}

/// What each program did between two snapshots, as JSON rows.
pub fn delta(progs: &[Prog], before: &Snapshot, after: &Snapshot) -> Vec<Value> {
    progs
        .iter()
        .map(|prog| {
            let (t0, n0) = before.get(&prog.id).copied().unwrap_or_default();
            let (t1, n1) = after.get(&prog.id).copied().unwrap_or_default();
            let (time, runs) = (t1.saturating_sub(t0), n1.saturating_sub(n0));
            #[expect(clippy::cast_precision_loss, reason = "nanosecond sums far below 2^52")]
            let avg = (runs > 0).then(|| time as f64 / runs as f64);
            json!({
                "program": prog.name,
                "attach_type": prog.attach_type,
                "runs": runs,
                "run_time_ns": time,
                "avg_ns": avg,
            })
        })
        .collect()
}
