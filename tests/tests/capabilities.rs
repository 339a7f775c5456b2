//! The `DaemonSet` runs the gateway with capabilities `BPF`, `NET_ADMIN`, `PERFMON` and `SYS_RESOURCE`
//! instead of `privileged` (daemonset/daemonset.yaml). These tests run it exactly so (root's
//! other capabilities removed from the bounding set with `setpriv`) and check that everything
//! the container does works: attach, sync, redirect, drop and count, a restart onto the
//! pinned links, and the operator's CLI (`counters`, `status`) — and that without `CAP_BPF` it
//! fails with a clear error instead of half-working.

mod common;

use std::{net::IpAddr, process::Command, time::Duration};

use common::{
    DROP_TIMEOUT, OK_TIMEOUT, assert_answered, assert_timed_out, config, counters, dial, node, web,
};
use nodegate_tests::harness::{Mode, run_command, with_only_caps};

/// The `add:` list of daemonset/daemonset.yaml, in `setpriv` spelling.
const DAEMONSET_CAPS: [&str; 4] = ["bpf", "net_admin", "perfmon", "sys_resource"];

/// The capabilities the manifest grants, read from the manifest itself, so that this test
/// follows it.
fn manifest_caps() -> Vec<String> {
    let path = nodegate_tests::harness::workspace_dir().join("daemonset/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("daemonset.yaml");
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).expect("daemonset.yaml parses");
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .expect("securityContext.capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_ascii_lowercase())
        .collect()
}

#[test]
fn the_daemonset_capabilities_are_enough() {
    assert_eq!(
        manifest_caps(),
        DAEMONSET_CAPS,
        "daemonset.yaml changed: update this test"
    );
    let node = node("caps", &["a", "b"]);
    let (a, b, foreign) = (node.pod("a"), node.pod("b"), node.foreign());
    let _backend = b.serve(8080, "b").expect("backend");
    let mut gw = node
        .start_gateway_with_caps(
            config(&node, vec![web(&node, Mode::Enforce)]),
            &DAEMONSET_CAPS,
        )
        .unwrap_or_else(|e| panic!("the gateway with {DAEMONSET_CAPS:?}: {e}"));

    // The daemon really runs without CAP_SYS_ADMIN: its effective set is the four, less what
    // this machine's root does not have either (CAP_SYS_RESOURCE is missing on some CI VMs;
    // the gateway needs it only on kernels before 5.11).
    let cap_eff = cap_set(gw.pid(), "CapEff");
    // CAP_NET_ADMIN 12, CAP_SYS_RESOURCE 24, CAP_PERFMON 38, CAP_BPF 39.
    let want =
        ((1u64 << 12) | (1 << 24) | (1 << 38) | (1 << 39)) & cap_set(std::process::id(), "CapBnd");
    assert_eq!(cap_eff, want, "CapEff {cap_eff:#x}");
    assert_eq!(cap_eff & (1 << 21), 0, "no CAP_SYS_ADMIN");

    let vip = node.vip_v4(10, 80);
    let r = dial(a, vip, "through", OK_TIMEOUT);
    assert_answered(&r, "b", "through");
    let r = dial(foreign, b.v4(8080), "sneak", DROP_TIMEOUT);
    assert_timed_out(&r);
    let foreign_ip = IpAddr::from(foreign.ipv4);
    assert!(counters(&gw).syns("web", foreign_ip, "not_from_gateway", "dropped") >= 1);

    // A restart takes over the pinned links (BPF_LINK_UPDATE) with the same capabilities.
    gw.restart()
        .expect("restart with the DaemonSet's capabilities");
    let r = dial(a, vip, "again", OK_TIMEOUT);
    assert_answered(&r, "b", "again");

    // The operator's CLI in the same container: counters and status from the pins.
    let bpffs = gw.config().bpffs.to_string_lossy().into_owned();
    for args in [
        vec!["counters", "--json", "--bpffs", &bpffs],
        vec!["status", "--json", "--bpffs", &bpffs],
    ] {
        let out =
            run_command(with_caps(&DAEMONSET_CAPS, &args), Duration::from_secs(10)).expect("cli");
        assert!(
            out.success(),
            "gateway {args:?} with {DAEMONSET_CAPS:?}: {}",
            out.stderr
        );
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        if args[0] == "status" {
            let links = v["links"].as_array().expect("links");
            assert!(
                links
                    .iter()
                    .all(|l| l["pinned"] == true && !l["prog_id"].is_null()),
                "{v}"
            );
        }
    }
}

#[test]
fn without_cap_bpf_the_gateway_refuses_to_start_and_says_why() {
    let node = node("nocaps", &["a", "b"]);
    let caps = ["net_admin", "perfmon", "sys_resource"];
    let err = node
        .start_gateway_with_caps(config(&node, vec![web(&node, Mode::Enforce)]), &caps)
        .expect_err("must not get ready without CAP_BPF");
    let text = err.to_string();
    assert!(
        text.contains("eBPF") || text.contains("bpf") || text.contains("permitted"),
        "{text}"
    );
}

/// A capability set (`CapEff`, `CapBnd`...) of process `pid`.
fn cap_set(pid: u32, which: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(which)?.strip_prefix(':'))
        .map_or_else(
            || panic!("{which} of {pid}"),
            |v| u64::from_str_radix(v.trim(), 16).expect("hex"),
        )
}

/// `gateway <args>` holding only `caps`.
fn with_caps(caps: &[&str], args: &[&str]) -> Command {
    let gateway = common::tools()
        .require_gateway()
        .expect("gateway binary")
        .to_path_buf();
    let mut cmd = with_only_caps(caps, &gateway);
    cmd.args(args);
    cmd
}
