//! The daemon's life cycle: crash (fail closed), restart (no second copy, counters kept),
//! config reload, detach.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use common::{
    DROP_TIMEOUT, OK_TIMEOUT, assert_allowed, assert_answered, assert_refused, assert_timed_out,
    config, connection_line, connection_lines_to, counters, dial, node, s, served_peer, start,
    status, web,
};
use nodegate_tests::harness::{
    Gateway, Mode, ServiceConfig, bpftool_cgroup_show, bpftool_prog_ids, metric_value, poll_until,
};
use serde_json::Value;

const NOT_FROM_GATEWAY: &str = "not_from_gateway";

/// The kernel's view: attach type → number of programs attached directly to `cgroup`.
fn attached(cgroup: &Path) -> BTreeMap<String, usize> {
    let mut by_type = BTreeMap::new();
    for prog in bpftool_cgroup_show(cgroup).unwrap_or_else(|e| panic!("bpftool cgroup show: {e}")) {
        *by_type
            .entry(s(&prog, "attach_type").to_owned())
            .or_insert(0) += 1;
    }
    by_type
}

#[track_caller]
fn assert_one_copy_each(cgroup: &Path) -> BTreeMap<String, usize> {
    let by_type = attached(cgroup);
    for hook in [
        "cgroup_inet4_connect",
        "cgroup_inet6_connect",
        "cgroup_inet_ingress",
    ] {
        assert!(
            by_type.contains_key(hook),
            "{hook} not attached to {}: {by_type:?}",
            cgroup.display()
        );
    }
    assert!(
        by_type.values().all(|&n| n == 1),
        "more than one copy of a program on {}: {by_type:?}",
        cgroup.display()
    );
    by_type
}

/// Ids of the programs attached directly to `cgroup`.
fn attached_ids(cgroup: &Path) -> BTreeSet<u64> {
    bpftool_cgroup_show(cgroup)
        .unwrap_or_else(|e| panic!("bpftool cgroup show: {e}"))
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// After a restart: the new programs were swapped into the links and the old ones are gone
/// from the kernel (none leaked, none still attached).
#[track_caller]
fn assert_swapped(cgroup: &Path, old: &BTreeSet<u64>) -> BTreeSet<u64> {
    let new = attached_ids(cgroup);
    assert!(
        new.is_disjoint(old),
        "old programs still attached: old {old:?}, now {new:?}"
    );
    // Programs are freed after an RCU grace period: allow a moment.
    poll_until(
        "the old programs to be unloaded",
        Duration::from_secs(5),
        || Ok(bpftool_prog_ids()?.is_disjoint(old).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}: old {old:?}, loaded {:?}", bpftool_prog_ids()));
    new
}

/// Destinations listed by `status --json` for `service`.
fn destinations(status: &Value, service: &str) -> Vec<SocketAddr> {
    status["destinations"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter(|e| s(e, "service") == service)
                .filter_map(|e| common::addr(e, "addr"))
                .collect()
        })
        .unwrap_or_default()
}

fn foreign_drop(gw: &Gateway, node: &nodegate_tests::harness::Node) -> u64 {
    let foreign = node.foreign();
    let target = node.pod("b").v4(8080);
    let before = counters(gw).syns("web", foreign.ipv4.into(), NOT_FROM_GATEWAY, "dropped");
    assert_timed_out(&dial(foreign, target, "sneak", DROP_TIMEOUT));
    let after = counters(gw).syns("web", foreign.ipv4.into(), NOT_FROM_GATEWAY, "dropped");
    assert!(
        after > before,
        "dropped syns did not move: {before} -> {after}"
    );
    after
}

#[test]
fn kill_9_fails_closed() {
    let node = node("kill9", &["a", "b"]);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    assert_answered(
        &dial(a, node.vip_v4(10, 80), "alive", OK_TIMEOUT),
        "b",
        "alive",
    );
    let before = foreign_drop(&gw, &node);

    gw.kill9().expect("the gateway was running");
    assert!(!gw.is_running());

    // The VIP is still redirected, to a proxy address where nothing listens: refused.
    assert_refused(&dial(a, node.vip_v4(10, 80), "dead", OK_TIMEOUT));
    assert_refused(&dial(a, node.vip_v6(10, 80), "dead6", OK_TIMEOUT));
    // A direct pod-IP connect is redirected too, never let through to the backend.
    assert_refused(&dial(a, b.v4(8080), "dead-direct", OK_TIMEOUT));
    // Direct packets from elsewhere are still dropped and counted (read from the pins).
    let after = foreign_drop(&gw, &node);
    assert!(
        after > before,
        "counter did not move while the daemon was dead: {before} -> {after}"
    );
}

#[test]
fn restart_reuses_the_links_and_keeps_the_counters() {
    let node = node("restart", &["a", "b"]);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _backend = b.serve(8080, "b").expect("backend");
    let mut gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    let hooks = assert_one_copy_each(&node.pods_cgroup());
    let links_before = status(&gw)["links"].as_array().map_or(0, Vec::len);
    assert_eq!(
        links_before,
        hooks.len(),
        "status links vs attached programs"
    );
    let before = foreign_drop(&gw, &node);
    let ids = attached_ids(&node.pods_cgroup());

    // A crash and restart, then a clean stop and restart.
    gw.restart()
        .unwrap_or_else(|e| panic!("restart after kill -9: {e}"));
    assert_eq!(
        assert_one_copy_each(&node.pods_cgroup()),
        hooks,
        "after restart"
    );
    let ids = assert_swapped(&node.pods_cgroup(), &ids);
    let kept = counters(&gw).syns(
        "web",
        node.foreign().ipv4.into(),
        NOT_FROM_GATEWAY,
        "dropped",
    );
    assert!(
        kept >= before,
        "counters lost across restart: {before} -> {kept}"
    );

    gw.stop(Duration::from_secs(10))
        .expect("SIGTERM stops the gateway");
    gw.restart()
        .unwrap_or_else(|e| panic!("restart after SIGTERM: {e}"));
    assert_eq!(
        assert_one_copy_each(&node.pods_cgroup()),
        hooks,
        "after the second restart"
    );
    assert_swapped(&node.pods_cgroup(), &ids);

    let r = dial(a, node.vip_v4(10, 80), "restarted", OK_TIMEOUT);
    assert_answered(&r, "b", "restarted");
    assert_allowed(
        &connection_line(&gw, common::local(&r)),
        "web",
        node.vip_v4(10, 80),
        a,
        &common::both(b, 8080),
    );
    assert!(foreign_drop(&gw, &node) > kept);
}

#[test]
fn reload_adds_and_removes_services() {
    let node = node("reload", &["a", "b", "c"]);
    let (a, b, c, foreign) = (node.pod("a"), node.pod("b"), node.pod("c"), node.foreign());
    let _web = b.serve(8080, "b").expect("web backend");
    let api_backend = c.serve(8080, "c").expect("api backend");
    let _db_backend = b.serve(5432, "db").expect("db backend");
    let api = ServiceConfig::new("api", Mode::Enforce)
        .vip(node.vip_v4(20, 80))
        .endpoint(c.v4(8080))
        .endpoint(c.v6(8080))
        .allow(&node.cidr_v4())
        .allow(&node.cidr_v6());
    let db = ServiceConfig::new("db", Mode::Enforce)
        .vip(node.vip_v4(30, 5432))
        .vip(node.vip_v6(30, 5432))
        .endpoint(b.v4(5432))
        .endpoint(b.v6(5432))
        .allow(&node.cidr_v4())
        .allow(&node.cidr_v6());
    let mut gw = start(&node, config(&node, vec![web(&node, Mode::Enforce), api]));

    // Before: api protected, db not.
    let r = dial(a, c.v4(8080), "api-before", OK_TIMEOUT);
    assert_answered(&r, "c", "api-before");
    connection_line(&gw, common::local(&r));
    assert_timed_out(&dial(
        foreign,
        c.v4(8080),
        "api-foreign-before",
        DROP_TIMEOUT,
    ));
    assert!(
        !dial(a, node.vip_v4(30, 5432), "db-before", OK_TIMEOUT).ok,
        "db VIP must not answer yet"
    );

    gw.reload(config(&node, vec![web(&node, Mode::Enforce), db]))
        .expect("reload");
    let st = poll_until(
        "status to show db and no api",
        Duration::from_secs(10),
        || {
            let st = gw.status()?;
            Ok(
                (destinations(&st, "api").is_empty() && destinations(&st, "db").len() == 4)
                    .then_some(st),
            )
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}; status now: {:?}; stderr:\n{}",
            gw.status(),
            gw.stderr()
        )
    });
    assert_eq!(destinations(&st, "web").len(), 4, "web untouched: {st}");

    // Added: db is redirected.
    for vip in [node.vip_v4(30, 5432), node.vip_v6(30, 5432)] {
        let r = dial(a, vip, "db-after", OK_TIMEOUT);
        assert_answered(&r, "db", "db-after");
        assert_allowed(
            &connection_line(&gw, common::local(&r)),
            "db",
            vip,
            a,
            &common::both(b, 5432),
        );
    }
    // Removed: api is no longer intercepted, neither from a pod nor from the foreign node.
    let r = dial(a, c.v4(8080), "api-after", OK_TIMEOUT);
    assert_answered(&r, "c", "api-after");
    assert_eq!(
        served_peer(&api_backend.stdout(), "api-after"),
        r.local,
        "not proxied any more"
    );
    let r = dial(foreign, c.v4(8080), "api-foreign-after", OK_TIMEOUT);
    assert_answered(&r, "c", "api-foreign-after");
    assert_eq!(
        connection_lines_to(&gw, c.v4(8080)).len(),
        1,
        "no new line for api:\n{}",
        gw.decision_text()
    );
    assert!(
        gw.is_running(),
        "reload must not stop the daemon: {}",
        gw.stderr()
    );
}

#[test]
fn detach_removes_everything() {
    let node = node("detach", &["a", "b"]);
    let (a, b, foreign) = (node.pod("a"), node.pod("b"), node.foreign());
    let backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    assert_one_copy_each(&node.pods_cgroup());

    // While it runs, the pins are this gateway's: a second gateway on them and a detach are
    // refused, naming the process, and nothing changes.
    let pins = format!(
        "another gateway is running on the pin directory {} (pid {})",
        node.bpffs().display(),
        gw.pid()
    );
    let config_path = gw.config_path().display().to_string();
    let bpffs = node.bpffs().display().to_string();
    for args in [
        vec!["run", "--config", &config_path],
        vec!["detach", "--bpffs", &bpffs],
    ] {
        let out = gw
            .cli(&args)
            .unwrap_or_else(|e| panic!("gateway {args:?}: {e}"));
        assert!(
            out.status.is_some_and(|s| !s.success()),
            "{args:?}: {out:?}"
        );
        assert!(out.stderr.contains(&pins), "{args:?}: {}", out.stderr);
    }
    assert_one_copy_each(&node.pods_cgroup());
    assert!(gw.is_running(), "{}", gw.stderr());

    gw.stop(Duration::from_secs(10))
        .expect("SIGTERM stops the gateway");
    assert!(node.bpffs().exists(), "pins stay after the daemon stops");

    let out = gw
        .detach()
        .unwrap_or_else(|e| panic!("gateway detach: {e}"));
    assert!(out.success());
    let left = bpftool_cgroup_show(&node.pods_cgroup()).expect("bpftool");
    assert!(
        left.is_empty(),
        "programs still attached after detach: {left:?}"
    );
    assert!(
        !node.bpffs().exists(),
        "pin dir {} still there",
        node.bpffs().display()
    );

    // Back to plain networking: no redirect, no drop.
    let r = dial(a, b.v4(8080), "plain", OK_TIMEOUT);
    assert_answered(&r, "b", "plain");
    assert_eq!(served_peer(&backend.stdout(), "plain"), r.local);
    assert_answered(
        &dial(foreign, b.v4(8080), "plain-foreign", OK_TIMEOUT),
        "b",
        "plain-foreign",
    );
    assert_eq!(
        served_peer(&backend.stdout(), "plain-foreign").map(|p| p.ip()),
        Some(IpAddr::from(foreign.ipv4))
    );
}

/// `api`: VIP `10.96.N.20:80`, endpoints pod c `:8080`.
fn api(node: &nodegate_tests::harness::Node) -> ServiceConfig {
    let c = node.pod("c");
    ServiceConfig::new("api", Mode::Enforce)
        .vip(node.vip_v4(20, 80))
        .endpoint(c.v4(8080))
        .endpoint(c.v6(8080))
        .allow(&node.cidr_v4())
        .allow(&node.cidr_v6())
}

#[test]
fn a_config_that_does_not_parse_keeps_the_running_one() {
    let node = node("badreload", &["a", "b"]);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    let before = status(&gw);

    gw.write_config_text("services: [\n")
        .expect("write a broken config");
    gw.sighup().expect("SIGHUP");
    poll_until(
        "the failed reload on /metrics",
        Duration::from_secs(10),
        || {
            let m = gw.metrics()?;
            let failed = metric_value(&m, r#"nodegate_config_reloads_total{result="error"}"#);
            Ok(failed.is_some_and(|n| n >= 1.0).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", gw.stderr()));
    assert!(
        gw.is_running(),
        "a bad file must not stop the daemon: {}",
        gw.stderr()
    );
    assert_eq!(
        destinations(&status(&gw), "web"),
        destinations(&before, "web"),
        "protected destinations changed"
    );
    let r = dial(a, node.vip_v4(10, 80), "still", OK_TIMEOUT);
    assert_answered(&r, "b", "still");
    connection_line(&gw, common::local(&r));
    assert_timed_out(&dial(
        node.foreign(),
        b.v4(8080),
        "still-dropped",
        DROP_TIMEOUT,
    ));
}

#[test]
fn stale_entries_are_reconciled_on_restart() {
    let node = node("reconcile", &["a", "b", "c"]);
    let (a, c, foreign) = (node.pod("a"), node.pod("c"), node.foreign());
    let _web = node.pod("b").serve(8080, "b").expect("web backend");
    let api_backend = c.serve(8080, "c").expect("api backend");
    let mut gw = start(
        &node,
        config(&node, vec![web(&node, Mode::Enforce), api(&node)]),
    );
    assert_eq!(destinations(&status(&gw), "api").len(), 3);
    assert_timed_out(&dial(foreign, c.v4(8080), "api-protected", DROP_TIMEOUT));

    // The config changes while the daemon is down: the pinned maps still hold api.
    gw.kill9().expect("running");
    gw.write_config(config(&node, vec![web(&node, Mode::Enforce)]))
        .expect("write config");
    assert_eq!(
        destinations(&status(&gw), "api").len(),
        3,
        "pins keep api while down"
    );
    gw.restart()
        .unwrap_or_else(|e| panic!("restart with the new config: {e}"));

    // Ready means reconciled: api is gone at once, web stays.
    let st = status(&gw);
    assert!(
        destinations(&st, "api").is_empty(),
        "stale api entries: {st}"
    );
    assert_eq!(destinations(&st, "web").len(), 4, "{st}");
    let r = dial(foreign, c.v4(8080), "api-open", OK_TIMEOUT);
    assert_answered(&r, "c", "api-open");
    let r = dial(a, c.v4(8080), "api-direct", OK_TIMEOUT);
    assert_answered(&r, "c", "api-direct");
    assert_eq!(
        served_peer(&api_backend.stdout(), "api-direct"),
        r.local,
        "not proxied"
    );
    assert!(
        !dial(a, node.vip_v4(20, 80), "api-vip", OK_TIMEOUT).ok,
        "api VIP gone"
    );
}
