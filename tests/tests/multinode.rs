//! Two simulated nodes on one kernel, each with its own gateway (own netns, cgroup subtree and
//! bpffs dir), both following one stand-in Kubernetes API server: a client pod on node A
//! reaches a protected Service whose backend runs on node B through A's gateway, allowed or
//! denied by policy on its workload and its bearer token; B admits A's gateway (a peer found
//! in the API) and drops and counts a host without a gateway; B's gateway serves its own pods.

mod common;

use std::net::IpAddr;

use nodegate_tests::harness::{KubeApi, Node, NodeSpec, kube};

use common::{OK_TIMEOUT, assert_answered, dial, tools};

/// Nodes `<name>a` (index `n`) and `<name>b` (index `n + 1`), pods' cgroups laid out by a
/// cgroupfs kubelet, linked.
fn two_nodes(name: &str, n: u8, pods_a: &[&str], pods_b: &[&str]) -> (Node, Node) {
    let build = |suffix: &str, index: u8, pods: &[&str]| {
        Node::new(
            NodeSpec::new(&format!("{name}{suffix}"))
                .index(index)
                .pods(pods)
                .kubelet_cgroups(nodegate_tests::harness::KubeletDriver::Cgroupfs)
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
