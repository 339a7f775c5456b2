//! Two simulated nodes on one kernel, each with its own gateway (own netns, cgroup subtree and
//! bpffs dir), both following one stand-in Kubernetes API server: a client pod on node A
//! reaches a protected Service whose backend runs on node B through A's gateway, allowed or
//! denied by policy on its workload and its bearer token; B admits A's gateway (a peer found
//! in the API) and drops and counts a host without a gateway; B's gateway serves its own pods.

mod common;
mod kube_common;

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use nodegate_tests::harness::{
    Endpoint, Gateway, KubeApi, KubeletDriver, Node, NodeSpec, ServiceObject, TokenSpec, kube,
    oidc, poll_until,
};
use serde_json::{Value, json};

use common::{
    DROP_TIMEOUT, OK_TIMEOUT, assert_answered, assert_timed_out, bypass_line, counters, dial, s,
    served, start, status, tools,
};
use kube_common::{
    BACKEND_PORT, NS, WEB, dests, get, kube_config, names_pod, request_line, send, tail, wait_dests,
};

/// Nodes `<name>a` (index `n`) and `<name>b` (index `n + 1`), pods' cgroups laid out by a
/// cgroupfs kubelet, linked.
fn two_nodes(name: &str, n: u8, pods_a: &[&str], pods_b: &[&str]) -> (Node, Node) {
    let build = |suffix: &str, index: u8, pods: &[&str]| {
        Node::new(
            NodeSpec::new(&format!("{name}{suffix}"))
                .index(index)
                .pods(pods)
                .kubelet_cgroups(KubeletDriver::Cgroupfs)
                .tools(tools()),
        )
        .unwrap_or_else(|e| panic!("building node {name}{suffix}: {e}"))
    };
    let a = build("a", n, pods_a);
    let b = build("b", n + 1, pods_b);
    a.link_with(&b)
        .unwrap_or_else(|e| panic!("linking {} and {}: {e}", a.prefix(), b.prefix()));
    (a, b)
}

#[test]
fn linked_nodes_route_pods_to_each_other_and_reach_the_api() {
    let (a, b) = two_nodes("mnlink", 61, &["cli"], &["srv"]);
    let server = b.pod("srv");
    let _serving = server.serve(8080, "srv").expect("ngpeer serve on b/srv");
    let client = a.pod("cli");
    for target in [server.v4(8080), server.v6(8080)] {
        let reply = dial(client, target, "hi", OK_TIMEOUT);
        assert_answered(&reply, "srv", "hi");
        // Not translated on the way: the server sees the pod's own address.
        assert_eq!(
            reply.local.map(|l| l.ip()),
            Some(client.ip_for(target)),
            "{}",
            reply.raw
        );
    }
    // The pods' cgroups are where a cgroupfs kubelet puts them.
    let uid = a.pod_uid("cli");
    assert!(
        client
            .cgroup
            .ends_with(format!("pods/kubepods/besteffort/pod{uid}/ctr")),
        "{}",
        client.cgroup.display()
    );

    // The stand-in API on node A answers from both node netns.
    let api = KubeApi::start(&a).expect("stand-in API");
    for node in [&a, &b] {
        let (code, body) = nodegate_tests::harness::http_get_in_netns(
            node.node_netns(),
            api.addr(),
            "/version",
            OK_TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("GET /version from {}: {e}", node.prefix()));
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("nodegate-stand-in"), "{body}");
    }
    api.break_api(kube::Outage::Refuse);
    assert!(
        nodegate_tests::harness::http_get_in_netns(
            b.node_netns(),
            api.addr(),
            "/version",
            OK_TIMEOUT
        )
        .is_err(),
        "refused while broken"
    );
    api.heal();
    let (code, _) = nodegate_tests::harness::http_get_in_netns(
        b.node_netns(),
        api.addr(),
        "/version",
        OK_TIMEOUT,
    )
    .expect("healed");
    assert_eq!(code, 200);
    let _ = IpAddr::from(a.ipv4());
}

/// The token issuer of the scenario: a static `jwks_file` issuer of people.
const CORP: &str = "https://corp.nodegate.test";
const AUDIENCE: &str = "nodegate";

/// Bearer tokens of `corp` for (subject, groups), signed with a key made for the test; the
/// issuer's config (its public keys in `a`'s dir, read by both gateways).
fn corp_tokens(a: &Node, people: &[(&str, &[&str])]) -> (Vec<String>, Value) {
    let private = a.dir().join("corp.private.json");
    let public = a.dir().join("corp.jwks.json");
    oidc::genkey("corp-1", &private, &public).expect("a signing key (tests/oidc: npm ci)");
    let now = common::identity::now();
    let specs: Vec<TokenSpec> = people
        .iter()
        .map(|(sub, groups)| {
            TokenSpec::rs256(
                "corp-1",
                json!({"iss": CORP, "sub": sub, "aud": [AUDIENCE], "iat": now, "nbf": now,
                       "exp": now + 600, "groups": groups,
                       "email": format!("{sub}@corp.nodegate.test")}),
            )
        })
        .collect();
    let tokens = oidc::mint(&private, &specs).expect("mint");
    let issuer = json!({"name": "corp", "issuer": CORP, "jwks_file": public,
                        "audiences": [AUDIENCE]});
    (tokens, issuer)
}

/// The gateway of `node` following `api`, with peer discovery and the `corp` issuer.
fn start_gateway(node: &Node, api: &KubeApi, issuer: &Value) -> Gateway {
    let config = kube_config(node, api);
    let mut section = config
        .sections
        .iter()
        .find(|(name, _)| name == "kubernetes")
        .map(|(_, v)| v.clone())
        .expect("kubernetes section");
    section["peers"] = json!(true);
    section["peers_namespace"] = json!(kube::GATEWAY_NAMESPACE);
    let config = config
        .section("kubernetes", section)
        .auth(json!({"issuers": [issuer]}));
    start(node, config)
}

/// Waits until `gw`'s pinned gateway sources do (or do not) include `ip`.
fn wait_gateway_source(gw: &Gateway, ip: IpAddr, present: bool) {
    poll_until(
        &format!(
            "{ip} {} the gateway sources",
            if present { "in" } else { "out of" }
        ),
        Duration::from_secs(5),
        || {
            let listed = status(gw)["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| g.as_str().and_then(|g| g.parse().ok()) == Some(ip));
            Ok((listed == present).then_some(()))
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            status(gw)["gateways"],
            tail(&gw.stderr(), 30)
        )
    });
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one end-to-end story across two nodes"
)]
fn a_client_on_node_a_reaches_a_backend_on_node_b_through_its_own_gateway() {
    let (a, b) = two_nodes("mnsvc", 71, &["cli", "oth"], &["web", "loc"]);
    let api = KubeApi::start(&a).unwrap_or_else(|e| panic!("stand-in API: {e}"));
    for (node, pod, sa) in [
        (&a, "cli", "client"),
        (&a, "oth", "other"),
        (&b, "web", "web"),
        (&b, "loc", "local"),
    ] {
        api.apply(kube::pod_object(node, pod, NS, sa, &json!({"app": pod})).expect("pod"));
    }
    // The DaemonSet's pods: each gateway admits the other's node address.
    api.apply(kube::gateway_pod_object(&a));
    api.apply(kube::gateway_pod_object(&b));
    // A cluster-wide Service: the same VIPs on both nodes, its backend on node B.
    let vips: [SocketAddr; 2] = [
        "10.96.200.10:80".parse().expect("vip"),
        "[fd96:200::10]:80".parse().expect("vip"),
    ];
    let policy = json!({"allow": [
        {"id": "client-devs", "when": {"and": [
            {"workload": {"namespace": NS, "service_account": "client"}},
            {"groups": "devs"}]}},
        {"id": "local-pods", "when": {"workload": {"namespace": NS, "service_account": "local"}}},
    ]});
    api.apply(
        ServiceObject::new(NS, "web", &vips, BACKEND_PORT)
            .protected(true)
            .policy(&policy)
            .to_json(),
    );
    api.apply_all(
        kube::endpoint_slices(NS, "web", BACKEND_PORT, &[Endpoint::ready(&b, "web")])
            .expect("slices"),
    );
    let web = b.pod("web");
    let backend = web
        .serve(BACKEND_PORT, "web")
        .expect("ngpeer serve on b/web");
    let (tokens, issuer) = corp_tokens(&a, &[("alice", &["devs"]), ("bob", &["guests"])]);
    let (alice, bob) = (&tokens[0], &tokens[1]);
    let gw_a = start_gateway(&a, &api, &issuer);
    let gw_b = start_gateway(&b, &api, &issuer);

    // Both nodes protect the Service; B admits A's gateway (its peer from the API).
    let protected = dests(&vips, &[web.v4(BACKEND_PORT), web.v6(BACKEND_PORT)]);
    for gw in [&gw_a, &gw_b] {
        wait_dests(gw, WEB, &protected, Instant::now(), Duration::from_secs(5));
    }
    wait_gateway_source(&gw_b, a.ipv4().into(), true);
    wait_gateway_source(&gw_b, a.ipv6().into(), true);
    wait_gateway_source(&gw_a, b.ipv4().into(), true);

    // Pod cli (shop/client) with a token of the devs group: through A's gateway to B.
    let cli = a.pod("cli");
    for vip in vips {
        let reply = send(cli, &get(vip, "/orders").bearer(alice));
        assert_eq!(reply.status, 200, "{vip}: {reply:?}");
        assert_eq!(reply.body, "hello from web");
        let line = request_line(&gw_a, &reply);
        assert_eq!(s(&line, "decision"), "allow", "{line}");
        assert_eq!(s(&line, "rule"), "client-devs", "{line}");
        assert_eq!(line["identity"]["subject"], "alice", "{line}");
        assert!(names_pod(&line, NS, "cli"), "{line}");
        let upstream: Option<SocketAddr> = s(&line, "upstream").parse().ok();
        assert_eq!(
            upstream.map(|u| u.ip()),
            Some(web.ip_for(vip)),
            "forwarded to the pod on node B: {line}"
        );
    }
    // B's backend saw A's gateway (its node address), never the pod.
    let peers: Vec<IpAddr> = served(&backend.stdout())
        .iter()
        .filter_map(|c| s(c, "peer").parse::<SocketAddr>().ok())
        .map(|p| p.ip())
        .collect();
    assert!(
        !peers.is_empty()
            && peers
                .iter()
                .all(|ip| *ip == IpAddr::from(a.ipv4()) || *ip == IpAddr::from(a.ipv6())),
        "backend peers: {peers:?}"
    );
    // Dialing the backend's pod IP from cli is redirected to A's gateway too.
    let reply = send(cli, &get(web.v4(BACKEND_PORT), "/direct").bearer(alice));
    assert_eq!(reply.status, 200, "{reply:?}");
    let line = request_line(&gw_a, &reply);
    assert_eq!(s(&line, "dst"), web.v4(BACKEND_PORT).to_string(), "{line}");

    // Denied: no token, the wrong group, the wrong workload.
    let reply = send(cli, &get(vips[0], "/orders"));
    assert_eq!(reply.status, 401, "anonymous: {reply:?}");
    let reply = send(cli, &get(vips[0], "/orders").bearer(bob));
    assert_eq!(reply.status, 403, "guests: {reply:?}");
    let line = request_line(&gw_a, &reply);
    assert_eq!(s(&line, "reason"), "no_rule_matched", "{line}");
    let reply = send(a.pod("oth"), &get(vips[0], "/orders").bearer(alice));
    assert_eq!(reply.status, 403, "shop/other with a devs token: {reply:?}");
    let line = request_line(&gw_a, &reply);
    assert!(names_pod(&line, NS, "oth"), "{line}");

    // A host without a gateway (node A's foreign place, routed through A to B) dials the
    // backend pod directly: dropped and counted on node B.
    let foreign = a.foreign();
    let target = web.v4(BACKEND_PORT);
    assert_timed_out(&dial(foreign, target, "around", DROP_TIMEOUT));
    assert!(
        counters(&gw_b).syns(WEB, foreign.ipv4.into(), "not_from_gateway", "dropped") >= 1,
        "{:?}",
        counters(&gw_b)
    );
    let line = bypass_line(&gw_b, foreign.ipv4.into(), target, "dropped");
    assert!(line.get("src_pod").is_none(), "not a pod of node B: {line}");

    // Node B's gateway serves its own pods.
    let reply = send(b.pod("loc"), &get(vips[0], "/local"));
    assert_eq!(reply.status, 200, "{reply:?}");
    let line = request_line(&gw_b, &reply);
    assert_eq!(s(&line, "rule"), "local-pods", "{line}");
    assert!(names_pod(&line, NS, "loc"), "{line}");

    // Without A's gateway pod in the API, B no longer admits A's gateway: the same request
    // that was allowed by A's policy cannot reach the backend, and B counts the attempt.
    let peer_v4: IpAddr = a.ipv4().into();
    api.delete(
        kube::Kind::Pod,
        kube::GATEWAY_NAMESPACE,
        &format!("nodegate-{}", a.node_name()),
    );
    wait_gateway_source(&gw_b, peer_v4, false);
    let reply = send(cli, &get(vips[0], "/no-peer").bearer(alice));
    assert_eq!(reply.status, 502, "{reply:?}");
    assert!(
        counters(&gw_b).syns(WEB, peer_v4, "not_from_gateway", "dropped") >= 1,
        "{:?}",
        counters(&gw_b)
    );
    api.apply(kube::gateway_pod_object(&a));
    wait_gateway_source(&gw_b, peer_v4, true);
    let reply = send(cli, &get(vips[0], "/peer-again").bearer(alice));
    assert_eq!(reply.status, 200, "{reply:?}");
}
