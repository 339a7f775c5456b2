//! The simulated node itself, without a gateway: who can reach whom, where processes run, and
//! that nothing is left behind.

mod common;

use std::{fs, net::IpAddr, os::unix::fs::MetadataExt, path::Path, thread, time::Duration};

use common::{OK_TIMEOUT, assert_answered, dial, node, served_peer};
use nodegate_tests::harness::{Footprint, Node, NodeSpec, Place, TMP_ROOT};

fn assert_inside(node: &Node, place: &Place, pid: u32) {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup");
    let rel = place
        .cgroup
        .strip_prefix(nodegate_tests::harness::CGROUP2_ROOT)
        .expect("cgroup under the v2 root");
    assert!(
        cgroups
            .lines()
            .any(|l| l == format!("0::/{}", rel.display())),
        "{} (pid {pid}) not in its cgroup {}: {cgroups}",
        place.name,
        rel.display()
    );
    let ns = fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("stat ns")
        .ino();
    let want = fs::metadata(format!("/run/netns/{}", place.netns))
        .expect("stat netns")
        .ino();
    assert_eq!(
        ns, want,
        "{} (pid {pid}) not in netns {}",
        place.name, place.netns
    );
    let _ = node;
}

fn assert_gone(footprint: &Footprint, pids: &[u32]) {
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind: {left:?}");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left running"
        );
    }
}

#[test]
fn pods_foreign_and_host_network_reach_each_other_without_a_gateway() {
    let node = node("topo", &["a", "b"]);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let server = b.serve(8080, "b").expect("serve in pod b");
    assert_inside(&node, b, server.pid());

    for (from, target) in [
        (a, b.v4(8080)),
        (a, b.v6(8080)),
        (node.foreign(), b.v4(8080)),
        (node.foreign(), b.v6(8080)),
        (node.hostnet(), b.v4(8080)),
        (node.hostnet(), b.v6(8080)),
        (node.node(), b.v4(8080)),
    ] {
        let msg = format!(
            "from-{}-{}",
            from.name,
            if target.is_ipv4() { 4 } else { 6 }
        );
        let r = dial(from, target, &msg, OK_TIMEOUT);
        assert_answered(&r, "b", &msg);
        // No NAT anywhere: the server sees the dialer's own address; the node's own processes
        // use the node IP (the route's `src`).
        let peer = served_peer(&server.stdout(), &msg)
            .unwrap_or_else(|| panic!("b saw no {msg}: {}", server.stdout()));
        let want: IpAddr = if target.is_ipv4() {
            from.ipv4.into()
        } else {
            from.ipv6.into()
        };
        assert_eq!(peer.ip(), want, "{msg}: source seen by b");
    }

    // The node and the host-network process share the node netns but not the cgroup.
    let hostnet = node
        .hostnet()
        .serve(7070, "h")
        .expect("serve on host network");
    assert_inside(&node, node.hostnet(), hostnet.pid());
    assert!(
        node.hostnet().cgroup.starts_with(node.pods_cgroup()),
        "host-network process is under the hooked cgroup"
    );
    assert_answered(
        &dial(a, node.hostnet().v4(7070), "to-host", OK_TIMEOUT),
        "h",
        "to-host",
    );

    // A VIP is routed nowhere until a gateway redirects it.
    let r = dial(a, node.vip_v4(10, 80), "vip", OK_TIMEOUT);
    assert!(!r.ok, "a VIP must not answer without a gateway: {}", r.raw);

    // The harness's own HTTP client runs in the node netns: nothing listens on the admin port.
    assert!(
        nodegate_tests::harness::http_get_in_netns(
            node.node_netns(),
            node.vip_v4(10, 80),
            "/",
            Duration::from_millis(300)
        )
        .is_err()
    );

    // Forwarding is on in the node netns only.
    let sysctl = |netns: &str, key: &str| {
        let mut cat = std::process::Command::new("ip");
        cat.args(["netns", "exec", netns, "cat"])
            .arg(format!("/proc/sys/{key}"));
        let out = nodegate_tests::harness::run_command(cat, Duration::from_secs(5)).expect("cat");
        out.stdout.trim().to_owned()
    };
    assert_eq!(sysctl(node.node_netns(), "net/ipv4/ip_forward"), "1");
    assert_eq!(
        sysctl(node.node_netns(), "net/ipv6/conf/all/forwarding"),
        "1"
    );
    assert_eq!(sysctl(&a.netns, "net/ipv4/ip_forward"), "0");

    let footprint = node.footprint();
    let pids = [server.pid(), hostnet.pid()];
    drop((server, hostnet));
    drop(node);
    assert_gone(&footprint, &pids);
    assert!(
        !footprint.dir.exists(),
        "temp dir {} left behind",
        footprint.dir.display()
    );
}

#[test]
fn curl_runs_inside_a_pod() {
    let node = node("topocurl", &["a", "b"]);
    let _server = node.pod("b").serve(8080, "b").expect("serve in pod b");
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "--max-time", "3"])
        .arg(format!("http://{}/", node.pod("b").v4(8080)));
    let out = node
        .pod("a")
        .run(curl, Duration::from_secs(5))
        .expect("run curl");
    assert!(out.success(), "curl failed: {out:?}");
    assert_eq!(out.stdout, "hello from b");
}

#[test]
fn leftovers_of_a_killed_run_are_removed_first() {
    // Simulate a run killed before its drop: leak the node with a process running in it.
    let leaked = node("topoleak", &["a"]);
    let server = leaked.pod("a").serve(8080, "a").expect("serve");
    let stale_pid = server.pid();
    let footprint = leaked.footprint();
    std::mem::forget(server);
    std::mem::forget(leaked);
    fs::create_dir_all(&footprint.bpffs).expect("a stale pin dir");
    fs::write(footprint.dir.join("stale"), "x").expect("a stale temp file");

    let node = node("topoleak", &["a"]);
    // The leaked server was killed (its cgroup emptied) and everything rebuilt.
    thread::sleep(Duration::from_millis(100));
    let zombie_or_gone = fs::read_to_string(format!("/proc/{stale_pid}/stat"))
        .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"));
    assert!(zombie_or_gone, "stale server {stale_pid} still running");
    assert!(!footprint.bpffs.exists(), "stale pin dir kept");
    assert!(!footprint.dir.join("stale").exists(), "stale temp dir kept");
    let _server = node
        .pod("a")
        .serve(8080, "a")
        .expect("serve again on the same address");
    let r = dial(node.foreign(), node.pod("a").v4(8080), "again", OK_TIMEOUT);
    assert_answered(&r, "a", "again");
}

#[test]
fn a_panicking_test_still_tears_everything_down() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = thread::spawn(move || {
        let node = node("topopanic", &["a"]);
        let server = node.pod("a").serve(8080, "a").expect("serve");
        tx.send((node.footprint(), server.pid()))
            .expect("send footprint");
        panic!("deliberate panic with a node alive");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let (footprint, pid) = rx.recv().expect("footprint");
    assert_gone(&footprint, &[pid]);
    // Logs are kept for a panicking test; the next run with the same name removes them.
    assert!(footprint.dir.starts_with(TMP_ROOT));
    let _ = fs::remove_dir_all(&footprint.dir);
}

#[test]
fn names_are_checked() {
    for bad in ["", "UPPER", "with-dash", "waytoolongname"] {
        let err = Node::new(NodeSpec::new(bad).tools(common::tools())).expect_err(bad);
        assert!(err.to_string().contains("invalid name"), "{bad}: {err}");
    }
}
