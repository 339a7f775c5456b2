//! The data path on a running gateway: redirect, enforcement, audit, L4 rule, IPv6.
//! Every scenario checks the wire, the decision log and (where they move) the counters.

mod common;

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use common::{
    DROP_TIMEOUT, OK_TIMEOUT, assert_allowed, assert_answered, assert_closed_unanswered,
    assert_timed_out, both, bypass_line, config, connection_line, connection_line_from,
    connection_lines_to, counters, curl, dial, is_node_ip, node, s, served, served_peer, start,
    web,
};
use nodegate_tests::harness::{Mode, PROXY_PORT, ServiceConfig, metric_value, poll_until};

const NOT_FROM_GATEWAY: &str = "not_from_gateway";

#[test]
fn vip_reaches_the_backend_through_the_gateway() {
    let node = node("vip", &["a", "b"]);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    let vip = node.vip_v4(10, 80);

    // HTTP with curl.
    let (body, client) = curl(a, &format!("http://{vip}/"));
    assert_eq!(body, "hello from b");
    let client = client.expect("curl reports its local address");
    assert_eq!(client.ip(), IpAddr::from(a.ipv4));
    let line = connection_line(&gw, client);
    assert_allowed(&line, "web", vip, a, &both(b, 8080));
    assert_eq!(s(&line, "mode"), "enforce");
    assert_eq!(s(&line, "node"), gw.config().node, "{line}");
    assert!(
        line["bytes_up"].as_u64() > Some(0) && line["bytes_down"].as_u64() > Some(0),
        "{line}"
    );

    // Half-close: the backend answers only after EOF, which the proxy must forward.
    let r = a
        .connect_half_close(vip, "half-closed", OK_TIMEOUT)
        .expect("ngpeer");
    assert!(r.ok, "{}", r.raw);
    assert_eq!(r.reply, "b:half-closed");
    let client = common::local(&r);
    let line = connection_line(&gw, client);
    assert_allowed(&line, "web", vip, a, &both(b, 8080));
    assert_eq!(line["bytes_up"].as_u64(), Some(11), "{line}");
    assert_eq!(line["bytes_down"].as_u64(), Some(13), "{line}");
    // Exactly one line per connection.
    let lines = gw.decisions().expect("decisions");
    assert_eq!(
        lines
            .iter()
            .filter(|d| common::addr(d, "src") == Some(client))
            .count(),
        1
    );

    // The backend saw the gateway (node IP), never the pod.
    let peer = served_peer(&backend.stdout(), "half-closed").expect("backend saw the connection");
    assert!(is_node_ip(&node, peer.ip()), "backend saw {peer}");

    // Nothing of this is a bypass.
    let c = counters(&gw);
    for source in [a.ipv4.into(), node.ipv4().into(), node.ipv6().into()] {
        let moved: u64 = ["dropped", "passed"]
            .iter()
            .map(|act| c.syns("web", source, NOT_FROM_GATEWAY, act))
            .sum();
        assert_eq!(moved, 0, "bypass counted for {source}: {:?}", c.0);
    }

    // Two allowed connections on /metrics.
    let metrics = gw.metrics().expect("/metrics");
    let allowed = metric_value(
        &metrics,
        r#"nodegate_connections_total{service="web",decision="allow",reason="source_allowed"}"#,
    );
    assert_eq!(allowed, Some(2.0), "/metrics:\n{metrics}");
}

#[test]
fn same_node_direct_pod_ip_connect_is_redirected() {
    let node = node("direct", &["a", "b"]);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));

    for (target, label) in [(b.v4(8080), "direct4"), (b.v6(8080), "direct6")] {
        let r = dial(a, target, label, OK_TIMEOUT);
        assert_answered(&r, "b", label);
        let line = connection_line(&gw, common::local(&r));
        assert_allowed(&line, "web", target, a, &[target]);
        let peer = served_peer(&backend.stdout(), label).expect("backend saw it");
        let node_ip: IpAddr = if target.is_ipv4() {
            node.ipv4().into()
        } else {
            node.ipv6().into()
        };
        assert_eq!(peer.ip(), node_ip, "{label} must arrive from the gateway");
    }
    let c = counters(&gw);
    for source in [a.ipv4.into(), a.ipv6.into()] {
        let moved: u64 = ["dropped", "passed"]
            .iter()
            .map(|act| c.syns("web", source, NOT_FROM_GATEWAY, act))
            .sum();
        assert_eq!(
            moved, 0,
            "a redirected connection is not a bypass ({source}): {:?}",
            c.0
        );
    }
    assert!(
        !gw.decisions()
            .expect("decisions")
            .iter()
            .any(|d| s(d, "kind") == "bypass"),
        "no bypass line expected:\n{}",
        gw.decision_text()
    );
}

#[test]
fn foreign_node_direct_connect_is_dropped_counted_and_logged() {
    let node = node("foreign", &["a", "b"]);
    let (b, foreign) = (node.pod("b"), node.foreign());
    let backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));

    for (target, source) in [
        (b.v4(8080), IpAddr::from(foreign.ipv4)),
        (b.v6(8080), IpAddr::from(foreign.ipv6)),
    ] {
        let before = counters(&gw).syns("web", source, NOT_FROM_GATEWAY, "dropped");
        let r = dial(foreign, target, "sneak", DROP_TIMEOUT);
        assert_timed_out(&r);
        let after = counters(&gw).syns("web", source, NOT_FROM_GATEWAY, "dropped");
        assert!(
            after > before,
            "syns for (web, {source}, not_from_gateway, dropped): {before} -> {after}"
        );
        let line = bypass_line(&gw, source, target, "dropped");
        assert_eq!(s(&line, "service"), "web", "{line}");
        assert_eq!(s(&line, "reason"), NOT_FROM_GATEWAY, "{line}");
        assert_eq!(s(&line, "mode"), "enforce", "{line}");
        assert!(line.get("suppressed").is_some(), "{line}");
    }
    assert!(
        served(&backend.stdout()).is_empty(),
        "the backend must see nothing: {}",
        backend.stdout()
    );
    let metrics = gw.metrics().expect("/metrics");
    let attempts = metric_value(
        &metrics,
        r#"nodegate_bypass_attempts_total{service="web",reason="not_from_gateway",action="dropped"}"#,
    );
    assert!(attempts >= Some(2.0), "/metrics:\n{metrics}");
}

#[test]
fn audit_mode_lets_a_foreign_direct_connect_through_and_counts_it() {
    let node = node("audit", &["a", "b"]);
    let (a, b, foreign) = (node.pod("a"), node.pod("b"), node.foreign());
    let backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Audit)]));

    for (target, source) in [
        (b.v4(8080), IpAddr::from(foreign.ipv4)),
        (b.v6(8080), IpAddr::from(foreign.ipv6)),
    ] {
        let r = dial(foreign, target, "audited", OK_TIMEOUT);
        assert_answered(&r, "b", "audited");
        let syns = counters(&gw).syns("web", source, NOT_FROM_GATEWAY, "passed");
        assert!(
            syns >= 1,
            "syns for (web, {source}, not_from_gateway, passed): {syns}"
        );
        let line = bypass_line(&gw, source, target, "passed");
        assert_eq!(s(&line, "mode"), "audit", "{line}");
        assert_eq!(
            counters(&gw).syns("web", source, NOT_FROM_GATEWAY, "dropped"),
            0
        );
    }
    let peers: Vec<_> = served(&backend.stdout())
        .iter()
        .filter_map(|v| common::addr(v, "peer"))
        .collect();
    assert!(
        peers.iter().any(|p| p.ip() == IpAddr::from(foreign.ipv4)),
        "backend saw {peers:?}"
    );

    // Pods still go through the proxy in audit mode.
    let vip = node.vip_v4(10, 80);
    let r = dial(a, vip, "via-vip", OK_TIMEOUT);
    assert_answered(&r, "b", "via-vip");
    let line = connection_line(&gw, common::local(&r));
    assert_eq!(s(&line, "mode"), "audit", "{line}");
    assert_allowed(&line, "web", vip, a, &both(b, 8080));
}

#[test]
fn unprotected_traffic_is_untouched() {
    let node = node("unprot", &["a", "b", "c"]);
    let (a, b, c, foreign) = (node.pod("a"), node.pod("b"), node.pod("c"), node.foreign());
    let _web = b.serve(8080, "b").expect("backend");
    let other_port = b.serve(9090, "b9").expect("b's unprotected port");
    let other_pod = c.serve(8080, "c").expect("pod not in any service");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));

    let cases = [
        (a, b.v4(9090), &other_port, "a-b9090"),
        (a, b.v6(9090), &other_port, "a-b9090-6"),
        (a, c.v4(8080), &other_pod, "a-c8080"),
        (foreign, b.v4(9090), &other_port, "f-b9090"),
        (foreign, c.v6(8080), &other_pod, "f-c8080-6"),
        (node.hostnet(), c.v4(8080), &other_pod, "h-c8080"),
    ];
    for (from, target, server, label) in cases {
        let r = dial(from, target, label, OK_TIMEOUT);
        let name = if target.port() == 9090 { "b9" } else { "c" };
        assert_answered(&r, name, label);
        // Not proxied: the server sees the client itself.
        let peer = served_peer(&server.stdout(), label).expect("server saw it");
        assert_eq!(Some(peer), r.local, "{label}: peer seen by the server");
        assert!(
            connection_lines_to(&gw, target).is_empty(),
            "{label}: unexpected decision line:\n{}",
            gw.decision_text()
        );
    }
    let c = counters(&gw);
    assert!(
        !c.rows().iter().any(|r| s(r, "source")
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip == IpAddr::from(foreign.ipv4) || ip == IpAddr::from(foreign.ipv6))),
        "foreign traffic to unprotected ports counted: {:?}",
        c.0
    );
    assert!(
        gw.decision_text().trim().is_empty(),
        "no decision lines expected:\n{}",
        gw.decision_text()
    );
}

#[test]
fn host_network_process_in_the_hooked_cgroup_is_redirected() {
    let node = node("hostnet", &["a", "b"]);
    let (b, host) = (node.pod("b"), node.hostnet());
    let backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));

    for (target, upstreams) in [
        (node.vip_v4(10, 80), both(b, 8080).to_vec()),
        (node.vip_v6(10, 80), both(b, 8080).to_vec()),
        (b.v4(8080), vec![b.v4(8080)]),
    ] {
        let label = format!("host-{target}");
        let r = dial(host, target, &label, OK_TIMEOUT);
        assert_answered(&r, "b", &label);
        let client = common::local(&r);
        assert!(
            client.ip() == IpAddr::from(node.ipv4()) || client.ip() == IpAddr::from(node.ipv6())
        );
        let line = connection_line(&gw, client);
        assert_allowed(&line, "web", target, host, &upstreams);
    }
    assert_eq!(served(&backend.stdout()).len(), 3);
}

#[test]
fn ipv6_vip_direct_and_foreign() {
    let node = node("ipv6", &["a", "b"]);
    let (a, b, foreign) = (node.pod("a"), node.pod("b"), node.foreign());
    let backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    let vip = node.vip_v6(10, 80);

    let (body, client) = curl(a, &format!("http://{vip}/"));
    assert_eq!(body, "hello from b");
    let client = client.expect("curl local address");
    assert_eq!(client.ip(), IpAddr::from(a.ipv6));
    assert_allowed(&connection_line(&gw, client), "web", vip, a, &both(b, 8080));

    let r = a
        .connect_half_close(vip, "six", OK_TIMEOUT)
        .expect("ngpeer");
    assert!(r.ok && r.reply == "b:six", "{}", r.raw);
    assert_allowed(
        &connection_line(&gw, common::local(&r)),
        "web",
        vip,
        a,
        &both(b, 8080),
    );
    let peer = served_peer(&backend.stdout(), "six").map(|p| p.ip());
    assert!(
        peer.is_some_and(|ip| is_node_ip(&node, ip)),
        "backend saw {peer:?}"
    );

    let r = dial(a, b.v6(8080), "direct-six", OK_TIMEOUT);
    assert_answered(&r, "b", "direct-six");
    assert_allowed(
        &connection_line(&gw, common::local(&r)),
        "web",
        b.v6(8080),
        a,
        &[b.v6(8080)],
    );

    let r = dial(foreign, b.v6(8080), "foreign-six", DROP_TIMEOUT);
    assert_timed_out(&r);
    let source = IpAddr::from(foreign.ipv6);
    assert!(counters(&gw).syns("web", source, NOT_FROM_GATEWAY, "dropped") >= 1);
    bypass_line(&gw, source, b.v6(8080), "dropped");
}

#[test]
fn l4_rule_allows_listed_sources_and_denies_the_rest() {
    let node = node("l4", &["a", "b", "c"]);
    let (a, b, c) = (node.pod("a"), node.pod("b"), node.pod("c"));
    let backend = b.serve(8080, "b").expect("backend");
    let only_a = ServiceConfig::new("web", Mode::Enforce)
        .vip(node.vip_v4(10, 80))
        .vip(node.vip_v6(10, 80))
        .endpoint(b.v4(8080))
        .endpoint(b.v6(8080))
        .allow(&format!("{}/32", a.ipv4))
        .allow(&format!("{}/128", a.ipv6));
    let gw = start(&node, config(&node, vec![only_a]));

    for vip in [node.vip_v4(10, 80), node.vip_v6(10, 80)] {
        let r = dial(a, vip, "allowed", OK_TIMEOUT);
        assert_answered(&r, "b", "allowed");
        assert_allowed(
            &connection_line(&gw, common::local(&r)),
            "web",
            vip,
            a,
            &both(b, 8080),
        );

        let r = dial(c, vip, "denied", OK_TIMEOUT);
        assert_closed_unanswered(&r);
        let line =
            connection_line_from(&gw, c.ip_for(vip), |d| common::addr(d, "dst") == Some(vip));
        assert_eq!(s(&line, "decision"), "deny", "{line}");
        assert_eq!(s(&line, "reason"), "source_not_allowed", "{line}");
        assert_eq!(s(&line, "service"), "web", "{line}");
        assert_eq!(common::addr(&line, "dst"), Some(vip), "{line}");
        assert_eq!(
            line["cgroup_id"].as_u64(),
            Some(c.cgroup_id().expect("cgroup id")),
            "{line}"
        );
    }
    assert!(
        served_peer(&backend.stdout(), "denied").is_none(),
        "denied traffic reached the backend"
    );

    // `gateway explain` asks the running gateway and decides the same way, by the source.
    let admin = gw.config().admin.to_string();
    for (source, exit, reason) in [
        (a.ipv4, 0, "source_allowed"),
        (c.ipv4, 2, "source_not_allowed"),
    ] {
        let mut cmd = std::process::Command::new(node.tools().require_gateway().expect("gateway"));
        let source = source.to_string();
        cmd.args([
            "explain",
            "--admin",
            &admin,
            "--service",
            "web",
            "--path",
            "/",
            "--source",
            &source,
            "--json",
        ]);
        let out = node
            .node()
            .run(cmd, Duration::from_secs(20))
            .expect("gateway explain");
        assert_eq!(out.code(), Some(exit), "{out:?}");
        let v = out.json().expect("explain --json");
        assert_eq!(s(&v, "reason"), reason, "{v}");
        assert_eq!(s(&v, "state"), "live", "{v}");
    }
}

#[test]
fn a_direct_dial_of_the_proxy_port_is_refused() {
    let node = node("proxydial", &["a", "b"]);
    let b = node.pod("b");
    let backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));

    let proxy4 = SocketAddr::new(node.ipv4().into(), PROXY_PORT);
    let proxy6 = SocketAddr::new(node.ipv6().into(), PROXY_PORT);
    // Outside the hooked cgroup: the node's own processes and the foreign node.
    for (from, target) in [
        (node.node(), proxy4),
        (node.node(), proxy6),
        (node.foreign(), proxy4),
    ] {
        let label = format!("nodst-{}", from.name);
        let r = dial(from, target, &label, OK_TIMEOUT);
        assert_closed_unanswered(&r);
        let line = connection_line_from(&gw, from.ip_for(target), |d| {
            s(d, "reason") == "no_original_destination"
        });
        assert_eq!(s(&line, "decision"), "deny", "{line}");
        assert_eq!(s(&line, "reason"), "no_original_destination", "{line}");
        assert!(
            line.get("upstream").is_none_or(serde_json::Value::is_null),
            "{line}"
        );
    }
    assert!(
        served(&backend.stdout()).is_empty(),
        "nothing may reach the backend: {}",
        backend.stdout()
    );
}

#[test]
fn a_bypass_flood_is_rate_limited_in_the_log_and_counted_exactly() {
    const ATTEMPTS: u64 = 30;
    let node = node("flood", &["a", "b"]);
    let (b, foreign) = (node.pod("b"), node.foreign());
    let _backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    let target = b.v4(8080);
    let source = IpAddr::from(foreign.ipv4);

    // Concurrent attempts that give up before the first SYN retransmit (1 s): one SYN each.
    let flood: Vec<_> = (0..ATTEMPTS)
        .map(|i| {
            let mut cmd = std::process::Command::new(&node.tools().ngpeer);
            cmd.arg("connect").arg(target.to_string()).args([
                "--send",
                "flood",
                "--timeout-ms",
                "300",
            ]);
            foreign
                .spawn(&format!("flood{i}"), cmd)
                .expect("start ngpeer")
        })
        .collect();
    for proc in &flood {
        let status = proc.wait_timeout(Duration::from_secs(5));
        assert!(status.is_some_and(|s| s.success()), "{}", proc.stderr());
        assert!(
            proc.stdout().contains(r#""kind":"timeout""#),
            "{}",
            proc.stdout()
        );
    }

    let syns = counters(&gw).syns("web", source, NOT_FROM_GATEWAY, "dropped");
    assert_eq!(syns, ATTEMPTS, "one SYN counted per attempt");
    // Every event is accounted for: lines + suppressed = events, once the limiter has flushed.
    let (lines, suppressed) = poll_until(
        "bypass lines + suppressed to account for every attempt",
        Duration::from_secs(10),
        || {
            let lines: Vec<_> = gw
                .decisions()?
                .into_iter()
                .filter(|d| {
                    s(d, "kind") == "bypass"
                        && common::addr(d, "src").map(|a| a.ip()) == Some(source)
                })
                .collect();
            let suppressed: u64 = lines.iter().filter_map(|d| d["suppressed"].as_u64()).sum();
            let n = lines.len() as u64;
            Ok((n + suppressed == ATTEMPTS).then_some((n, suppressed)))
        },
    )
    .unwrap_or_else(|e| panic!("{e}; decision lines:\n{}", gw.decision_text()));
    assert!(
        suppressed > 0 && lines < ATTEMPTS,
        "the log was not rate limited: {lines} lines"
    );
}

#[test]
fn audit_mode_forwards_a_source_the_rule_would_deny() {
    let node = node("wouldeny", &["a", "b", "c"]);
    let (a, b, c) = (node.pod("a"), node.pod("b"), node.pod("c"));
    let backend = b.serve(8080, "b").expect("backend");
    let only_a = ServiceConfig::new("web", Mode::Audit)
        .vip(node.vip_v4(10, 80))
        .endpoint(b.v4(8080))
        .allow(&format!("{}/32", a.ipv4));
    let gw = start(&node, config(&node, vec![only_a]));
    let vip = node.vip_v4(10, 80);

    let r = dial(c, vip, "audited", OK_TIMEOUT);
    assert_answered(&r, "b", "audited");
    let line = connection_line(&gw, common::local(&r));
    assert_eq!(s(&line, "decision"), "would_deny", "{line}");
    assert_eq!(s(&line, "reason"), "source_not_allowed", "{line}");
    assert_eq!(s(&line, "mode"), "audit", "{line}");
    assert_eq!(common::addr(&line, "upstream"), Some(b.v4(8080)), "{line}");
    let peer = served_peer(&backend.stdout(), "audited").expect("forwarded");
    assert!(is_node_ip(&node, peer.ip()), "backend saw {peer}");

    let r = dial(a, vip, "listed", OK_TIMEOUT);
    assert_answered(&r, "b", "listed");
    assert_eq!(
        s(&connection_line(&gw, common::local(&r)), "decision"),
        "allow"
    );
}

#[test]
fn an_unavailable_upstream_is_logged_and_the_client_closed() {
    let node = node("noupstrm", &["a", "b"]);
    let a = node.pod("a");
    // Nothing listens on b:8080.
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    let vip = node.vip_v4(10, 80);

    let r = dial(a, vip, "nobody", OK_TIMEOUT);
    assert_closed_unanswered(&r);
    let line = connection_line_from(&gw, a.ipv4.into(), |d| common::addr(d, "dst") == Some(vip));
    assert_eq!(s(&line, "reason"), "upstream_unavailable", "{line}");
    assert_eq!(s(&line, "service"), "web", "{line}");
    assert_ne!(s(&line, "decision"), "", "{line}");
}

/// Peak resident set of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[test]
fn a_large_transfer_streams_through_the_proxy_without_buffering() {
    const SIZE: u64 = 64 * 1024 * 1024;
    let node = node("stream", &["a", "b"]);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    let rss_before = peak_rss_kib(gw.pid());

    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "--max-time", "60", "-o", "/dev/null"])
        .args(["-w", "%{size_download} %{local_ip} %{local_port}"])
        .arg(format!("http://{}/bytes/{SIZE}", node.vip_v4(10, 80)));
    let out = a.run(curl, Duration::from_secs(70)).expect("run curl");
    assert!(out.success(), "{out:?}");
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(
        fields.first().copied(),
        Some(SIZE.to_string().as_str()),
        "{out:?}"
    );
    let client = SocketAddr::new(
        fields[1].parse().expect("local ip"),
        fields[2].parse().expect("local port"),
    );
    let line = connection_line(&gw, client);
    assert!(line["bytes_down"].as_u64() >= Some(SIZE), "{line}");

    // Copying, not buffering: the proxy's peak memory grows far less than what went through.
    let grown = peak_rss_kib(gw.pid()).saturating_sub(rss_before);
    assert!(
        grown < 16 * 1024,
        "gateway peak RSS grew by {grown} KiB for a {SIZE}-byte transfer"
    );
}

/// `NG_BYPASS` holds 65,536 (service, source, reason, action) keys. A flood from that many
/// (spoofable) sources fills it; a bypass from a source after that is still dropped, and the
/// count it could not get is counted in `bypass_uncounted` (`gateway counters`, `/metrics`)
/// instead of vanishing.
#[test]
fn a_full_bypass_map_still_drops_and_counts_what_it_could_not_key() {
    const CAPACITY: u32 = 65_536;
    let node = node("bypassfull", &["a", "b"]);
    let (b, foreign) = (node.pod("b"), node.foreign());
    let _backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    assert_eq!(counters(&gw).stat("bypass_uncounted"), 0);

    // Fill the map as a flood from 198.18.0.0/16 would (a service id no service has), with
    // bpftool, one command per key.
    let map = gw.config().bpffs.join("NG_BYPASS");
    let mut batch = String::new();
    for i in 0..CAPACITY {
        let [.., hi, lo] = i.to_be_bytes();
        let _ = writeln!(
            batch,
            "map update pinned {} key hex f0 ff ff ff 01 00 01 00 \
             00 00 00 00 00 00 00 00 00 00 ff ff c6 12 {hi:02x} {lo:02x} \
             value hex 01 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00 3c 00 00 00 00 00 00 00",
            map.display()
        );
    }
    let file = node.dir().join("fill-bypass.batch");
    std::fs::write(&file, batch).expect("write the batch");
    let mut cmd = std::process::Command::new("bpftool");
    cmd.arg("batch").arg("file").arg(&file);
    let out = node
        .node()
        .run(cmd, Duration::from_secs(120))
        .expect("bpftool batch");
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(
        counters(&gw)
            .rows()
            .iter()
            .filter(|r| r["service_id"] == 0xffff_fff0_u32)
            .count(),
        CAPACITY as usize,
        "the map is full"
    );

    let target = b.v4(8080);
    let source = IpAddr::from(foreign.ipv4);
    assert_timed_out(&dial(foreign, target, "sneak", DROP_TIMEOUT));
    let after = counters(&gw);
    assert_eq!(
        after.syns("web", source, NOT_FROM_GATEWAY, "dropped"),
        0,
        "no room for the source's own row"
    );
    assert!(
        after.stat("bypass_uncounted") >= 1,
        "stats: {:?}",
        after.0.get("stats")
    );
    // The bypass line is still written (the event ring is apart from the counters).
    let line = bypass_line(&gw, source, target, "dropped");
    assert_eq!(s(&line, "service"), "web", "{line}");
    let metrics = gw.metrics().expect("/metrics");
    let uncounted = metric_value(
        &metrics,
        r#"nodegate_datapath_stats_total{stat="bypass_uncounted"}"#,
    );
    assert!(uncounted >= Some(1.0), "/metrics:\n{metrics}");
}

/// `log.decisions_file` rotated the way logrotate does by default (moved away, no signal): the
/// gateway creates the file again and writes on to it (it checks at most every second), and
/// the moved file keeps what was written before.
#[test]
fn a_rotated_decision_log_file_is_created_again() {
    let node = node("rotate", &["a", "b"]);
    let (a, b) = (node.pod("a"), node.pod("b"));
    let _backend = b.serve(8080, "b").expect("backend");
    let gw = start(&node, config(&node, vec![web(&node, Mode::Enforce)]));
    let vip = node.vip_v4(10, 80);
    let (body, first) = curl(a, &format!("http://{vip}/"));
    assert_eq!(body, "hello from b");
    let first = first.expect("curl reports its local address");
    connection_line(&gw, first);

    let file = gw.config().decisions_file.clone();
    let moved = file.with_extension("log.1");
    std::fs::rename(&file, &moved).expect("rotate the decision log");
    let later = poll_until(
        "a connection's line in the re-created file",
        Duration::from_secs(10),
        || {
            let (_, client) = curl(a, &format!("http://{vip}/"));
            let client = client.expect("curl reports its local address");
            std::thread::sleep(Duration::from_millis(200));
            Ok(gw
                .decisions()?
                .iter()
                .any(|d| common::addr(d, "src") == Some(client))
                .then_some(client))
        },
    )
    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", gw.stderr()));
    let old = std::fs::read_to_string(&moved).expect("the moved file");
    assert!(
        old.contains(&format!("\"src\":\"{first}\"")),
        "the first line stays in the moved file:\n{old}"
    );
    assert!(!old.contains(&format!("\"src\":\"{later}\"")), "{old}");
}
