//! `gateway run` with a Kubernetes source, against the stand-in API server (crate
//! `kube-standin`) served inside the node netns, on the real kernel. Every scenario changes
//! objects in the API and asserts what the kernel and the proxy then do: pinned destinations
//! (`gateway status --json`), connections allowed, redirected or dropped, bypass counters and
//! decision lines.
//!
//! The node's pods live in the cgroups a kubelet would give them (`kubepods/...pod<uid>/ctr`
//! under the hooked cgroup), so the gateway names them by the cgroup id the kernel reports.

mod common;
mod kube_common;

use std::time::{Duration, Instant};

use nodegate_tests::harness::{
    ADMIN_PORT, Endpoint, Gateway, GatewayConfig, HttpRequest, KubeApi, KubeletDriver, Node,
    NodeSpec, Place, Proc, ServiceObject, kube,
};
use serde_json::{Value, json};

use common::{
    DROP_TIMEOUT, OK_TIMEOUT, assert_answered, assert_timed_out, bypass_line, counters, dial,
    pki::{Ca, dns, write},
    s, start, status, tools,
};
use kube_common::{
    BACKEND_PORT, BUDGET, NS, WEB, allow_accounts, destinations, dests, get, kube_config, median,
    names_pod, readyz, request_line, send, tail, wait_dests, wait_readyz,
};

/// A node whose pods are `client` (service account `client`), `other` (service account
/// `other`) and the backends `web1`, `web2` (ngpeer on :8080), all known to the API server,
/// with the gateway following it.
struct Cluster {
    node: Node,
    api: KubeApi,
    gw: Gateway,
    _backends: Vec<Proc>,
}

const PODS: [(&str, &str); 4] = [
    ("client", "client"),
    ("other", "other"),
    ("web1", "web"),
    ("web2", "web"),
];

impl Cluster {
    /// Builds node `name`, starts the API server with the pods and `objects`, the backends and
    /// the gateway (ready: it has applied its first snapshot).
    fn start(name: &str, driver: KubeletDriver, objects: impl FnOnce(&Node) -> Vec<Value>) -> Self {
        Self::start_with(name, driver, objects, |_, config| config)
    }

    /// Like [`Self::start`], with the gateway's config changed by `tweak`.
    fn start_with(
        name: &str,
        driver: KubeletDriver,
        objects: impl FnOnce(&Node) -> Vec<Value>,
        tweak: impl FnOnce(&Node, GatewayConfig) -> GatewayConfig,
    ) -> Self {
        let node = Node::new(
            NodeSpec::new(name)
                .pods(&PODS.map(|(p, _)| p))
                .kubelet_cgroups(driver)
                .tools(tools()),
        )
        .unwrap_or_else(|e| panic!("building simulated node `{name}`: {e}"));
        let api = KubeApi::start(&node).unwrap_or_else(|e| panic!("stand-in API: {e}"));
        for (pod, sa) in PODS {
            api.apply(
                kube::pod_object(&node, pod, NS, sa, &json!({"app": pod})).expect("pod object"),
            );
        }
        api.apply_all(objects(&node));
        let backends = ["web1", "web2"]
            .iter()
            .map(|b| {
                node.pod(b)
                    .serve(BACKEND_PORT, b)
                    .unwrap_or_else(|e| panic!("ngpeer serve in {b}: {e}"))
            })
            .collect();
        let gw = start(&node, tweak(&node, kube_config(&node, &api)));
        Self {
            node,
            api,
            gw,
            _backends: backends,
        }
    }

    fn pod(&self, name: &str) -> &Place {
        self.node.pod(name)
    }

    fn vips(&self) -> [std::net::SocketAddr; 2] {
        [self.node.vip_v4(10, 80), self.node.vip_v6(10, 80)]
    }

    /// Service `shop/web` on the node's VIPs, port 80 → 8080.
    fn web(&self) -> ServiceObject {
        web(&self.node)
    }

    /// Endpoints (v4 and v6, port 8080) of the given backend pods.
    fn endpoints(&self, pods: &[&str]) -> Vec<std::net::SocketAddr> {
        pods.iter()
            .flat_map(|p| [self.pod(p).v4(BACKEND_PORT), self.pod(p).v6(BACKEND_PORT)])
            .collect()
    }

    /// Writes the `EndpointSlice`s of `shop/web` with `ready` and `not_ready` backends.
    fn slices(&self, ready: &[&str], not_ready: &[&str]) {
        self.api.apply_all(slices(&self.node, ready, not_ready));
    }

    /// Asserts a direct connection from the foreign node to `pod` is dropped and counted.
    #[track_caller]
    fn assert_direct_dropped(&self, pod: &str, msg: &str) {
        let foreign = self.node.foreign();
        let target = self.pod(pod).v4(BACKEND_PORT);
        let before =
            counters(&self.gw).syns(WEB, foreign.ipv4.into(), "not_from_gateway", "dropped");
        assert_timed_out(&dial(foreign, target, msg, DROP_TIMEOUT));
        let after =
            counters(&self.gw).syns(WEB, foreign.ipv4.into(), "not_from_gateway", "dropped");
        assert!(
            after > before,
            "the drop of {} -> {target} is counted for {WEB}: {before} -> {after}",
            foreign.ipv4
        );
    }

    /// Asserts a direct connection from the foreign node to `pod` reaches it.
    #[track_caller]
    fn assert_direct_answered(&self, pod: &str, msg: &str) {
        let r = dial(
            self.node.foreign(),
            self.pod(pod).v4(BACKEND_PORT),
            msg,
            OK_TIMEOUT,
        );
        assert_answered(&r, pod, msg);
    }

    /// `GET /<path>` on the v4 VIP from `pod`: the reply and its decision line.
    fn get_from(&self, pod: &str, path: &str) -> (nodegate_tests::harness::HttpReply, Value) {
        let reply = send(self.pod(pod), &get(self.vips()[0], path));
        let line = request_line(&self.gw, &reply);
        (reply, line)
    }
}

fn web(node: &Node) -> ServiceObject {
    ServiceObject::new(
        NS,
        "web",
        &[node.vip_v4(10, 80), node.vip_v6(10, 80)],
        BACKEND_PORT,
    )
}

/// `service` and the `EndpointSlice`s of `shop/web` with the `ready` backends.
fn web_objects(node: &Node, service: &ServiceObject, ready: &[&str]) -> Vec<Value> {
    let mut objs = vec![service.to_json()];
    objs.extend(slices(node, ready, &[]));
    objs
}

fn slices(node: &Node, ready: &[&str], not_ready: &[&str]) -> [Value; 2] {
    let eps: Vec<Endpoint<'_>> = ready
        .iter()
        .map(|p| Endpoint::ready(node, p))
        .chain(not_ready.iter().map(|p| Endpoint::not_ready(node, p)))
        .collect();
    kube::endpoint_slices(NS, "web", BACKEND_PORT, &eps).expect("slices")
}

#[test]
fn a_label_protects_within_a_second_and_removing_it_unprotects() {
    const ROUNDS: usize = 7;
    let policy = allow_accounts(&["client"]);
    let c = Cluster::start("k8slabel", KubeletDriver::Cgroupfs, |node| {
        web_objects(node, &web(node).policy(&policy), &["web1"])
    });
    let unlabelled = c.web().policy(&policy).to_json();
    let labelled = c.web().policy(&policy).protected(true).to_json();
    let protected = dests(&c.vips(), &c.endpoints(&["web1"]));

    // Not labelled: nothing pinned for it, the backend is reachable directly.
    let baseline = status(&c.gw)["destinations"].clone();
    assert!(destinations(&c.gw, WEB).is_empty(), "{baseline}");
    c.assert_direct_answered("web1", "before");

    let (mut protect, mut unprotect) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let t = Instant::now();
        c.api.apply(labelled.clone());
        protect.push(wait_dests(
            &c.gw,
            WEB,
            &protected,
            t,
            Duration::from_secs(5),
        ));
        if round == 0 {
            // Enforced: the foreign node is dropped and counted, the client pod's VIP
            // connection is redirected to the gateway and allowed by the policy.
            c.assert_direct_dropped("web1", "labelled");
            let (reply, line) = c.get_from("client", "/hello");
            assert_eq!(reply.status, 200, "{reply:?}");
            assert_eq!(reply.body, "hello from web1");
            assert_eq!(s(&line, "service"), WEB, "{line}");
            assert_eq!(s(&line, "decision"), "allow", "{line}");
            assert_eq!(s(&line, "rule"), "sa-client", "{line}");
            assert!(names_pod(&line, NS, "client"), "{line}");
        }
        let t = Instant::now();
        c.api.apply(unlabelled.clone());
        unprotect.push(wait_dests(
            &c.gw,
            WEB,
            &dests(&[], &[]),
            t,
            Duration::from_secs(5),
        ));
        if round == 0 {
            c.assert_direct_answered("web1", "unlabelled");
            assert_eq!(
                status(&c.gw)["destinations"],
                baseline,
                "no stale destination left behind"
            );
        }
    }
    let (p50, u50) = (median(&mut protect), median(&mut unprotect));
    println!(
        "label -> enforced in the kernel: median {p50:?}, max {:?}; unlabel -> unprotected: \
         median {u50:?}, max {:?} ({ROUNDS} rounds, debounce 50 ms, polled with `gateway status`)",
        protect[ROUNDS - 1],
        unprotect[ROUNDS - 1]
    );
    for (what, samples) in [("label", &protect), ("unlabel", &unprotect)] {
        assert!(
            samples.iter().all(|d| *d < BUDGET),
            "{what} -> kernel over {BUDGET:?}: {samples:?}"
        );
    }
    // Still serving afterwards, and nothing left of the service in the maps.
    assert!(destinations(&c.gw, WEB).is_empty());
    assert!(c.gw.is_running(), "{}", c.gw.stderr());
}

#[test]
fn endpoints_scaling_up_and_down_are_followed_by_the_maps() {
    let policy = allow_accounts(&["client"]);
    let c = Cluster::start("k8sscale", KubeletDriver::Cgroupfs, |node| {
        web_objects(node, &web(node).policy(&policy).protected(true), &["web1"])
    });
    let vips = c.vips();
    let now = Instant::now;
    let wait = |pods: &[&str]| {
        wait_dests(
            &c.gw,
            WEB,
            &dests(&vips, &c.endpoints(pods)),
            now(),
            Duration::from_secs(5),
        )
    };
    wait(&["web1"]);
    c.assert_direct_answered("web2", "not yet an endpoint");

    // Up: web2 joins; it is guarded at once and serves VIP traffic.
    c.slices(&["web1", "web2"], &[]);
    wait(&["web1", "web2"]);
    c.assert_direct_dropped("web2", "scaled up");
    let bodies: std::collections::BTreeSet<String> = (0..8)
        .map(|i| c.get_from("client", &format!("/r{i}")).0.body)
        .collect();
    assert!(
        bodies.contains("hello from web2"),
        "web2 gets VIP traffic: {bodies:?}"
    );

    // A not-ready endpoint is still guarded in the kernel, but gets no traffic.
    c.slices(&["web2"], &["web1"]);
    wait(&["web1", "web2"]);
    c.assert_direct_dropped("web1", "not ready");
    for i in 0..4 {
        let (reply, line) = c.get_from("client", &format!("/nr{i}"));
        assert_eq!(reply.body, "hello from web2", "{line}");
    }

    // Down: web1 leaves; its address is no longer protected. The change is made while every
    // watch is ended and held, then the API server compacts its history: the watchers resume
    // from a resourceVersion that is gone, get `410 Expired` in the stream and re-list, which
    // is no outage.
    c.api.api().hold_watches();
    c.api.api().end_watches();
    c.slices(&["web2"], &[]);
    c.api.api().compact();
    c.api.api().release_watches();
    wait(&["web2"]);
    assert_eq!(readyz(&c.gw).0, 200, "a 410 is not an outage");
    // The relist counter reaches /metrics through the source's health channel, apart from
    // the snapshot that updated the maps: it may show up a moment later.
    let deadline = now() + Duration::from_secs(3);
    let relists = loop {
        let relists = relists(&c.gw, "endpointslices");
        if relists >= 1.0 || now() >= deadline {
            break relists;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(relists >= 1.0, "the slices' watcher re-listed: {relists}");
    c.assert_direct_answered("web1", "scaled down");
    c.assert_direct_dropped("web2", "still an endpoint");

    // The Service goes: nothing left.
    c.api.delete(kube::Kind::Service, NS, "web");
    wait_dests(&c.gw, WEB, &dests(&[], &[]), now(), Duration::from_secs(5));
    c.assert_direct_answered("web2", "service deleted");
}

/// `nodegate_kubernetes_watcher_relists` of `resource` (0 when absent).
fn relists(gw: &Gateway, resource: &str) -> f64 {
    let metrics = gw.metrics().expect("metrics");
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("nodegate_kubernetes_watcher_relists")
                && l.contains(&format!("resource=\"{resource}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn while_the_api_is_down_the_last_state_is_enforced_and_readyz_says_why() {
    let policy = allow_accounts(&["client"]);
    let mut c = Cluster::start("k8sdown", KubeletDriver::Cgroupfs, |node| {
        web_objects(node, &web(node).policy(&policy).protected(true), &["web1"])
    });
    let protected = dests(&c.vips(), &c.endpoints(&["web1"]));
    wait_dests(
        &c.gw,
        WEB,
        &protected,
        Instant::now(),
        Duration::from_secs(5),
    );
    assert_eq!(readyz(&c.gw).0, 200);

    for (outage, says) in [
        (kube::Outage::Refuse, "refused"),
        (kube::Outage::Error500, "500"),
    ] {
        c.api.break_api(outage);
        let body = wait_readyz(&c.gw, 503, Duration::from_secs(10));
        assert!(
            body.to_lowercase().contains(says),
            "{outage:?}: /readyz names the cause ({says}): {body}"
        );
        // A change the gateway cannot see: the label goes while the API is down.
        c.api.apply(c.web().policy(&policy).to_json());
        // Kept: still pinned, still enforced, still serving.
        assert_eq!(destinations(&c.gw, WEB), protected, "{outage:?}");
        c.assert_direct_dropped("web1", "api down");
        let (reply, _) = c.get_from("client", "/during-outage");
        assert_eq!(reply.status, 200, "{outage:?}: {reply:?}");
        // `gateway status` shows the source's health from the daemon.
        let st =
            c.gw.status_with_daemon()
                .unwrap_or_else(|e| panic!("gateway status: {e}"));
        let k = &st["daemon"]["kubernetes"];
        assert_eq!(k["ready"], false, "{st}");
        assert!(
            k["error"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains(says)),
            "{outage:?}: {k}"
        );
        let metrics = c.gw.metrics().expect("metrics");
        assert_eq!(
            nodegate_tests::harness::metric_value(&metrics, "nodegate_kubernetes_ready"),
            Some(0.0),
            "{}",
            metrics
                .lines()
                .filter(|l| l.contains("kubernetes"))
                .collect::<Vec<_>>()
                .join("\n")
        );

        // Healed: ready again, and the change made meanwhile is applied.
        let healed = Instant::now();
        c.api.heal();
        wait_readyz(&c.gw, 200, Duration::from_secs(15));
        wait_dests(&c.gw, WEB, &dests(&[], &[]), healed, Duration::from_secs(5));
        println!(
            "{outage:?}: healed -> ready and in sync in {:?}",
            healed.elapsed()
        );
        c.assert_direct_answered("web1", "healed");
        // Protected again for the next round.
        c.api
            .apply(c.web().policy(&policy).protected(true).to_json());
        wait_dests(
            &c.gw,
            WEB,
            &protected,
            Instant::now(),
            Duration::from_secs(5),
        );
    }

    // A restart while the API is down: the new daemon does not touch the pinned maps before
    // it has a complete snapshot, so the previous run's protection stays in force.
    c.gw.kill9();
    c.api.break_api(kube::Outage::Refuse);
    c.gw.respawn().expect("respawn");
    std::thread::sleep(Duration::from_secs(2));
    let (code, body) = readyz(&c.gw);
    assert_eq!(code, 503, "not ready without a first snapshot: {body}");
    assert!(c.gw.is_running(), "keeps retrying: {}", c.gw.stderr());
    assert_eq!(
        destinations(&c.gw, WEB),
        protected,
        "the pinned state is kept"
    );
    c.assert_direct_dropped("web1", "restarted while down");
    c.api.heal();
    wait_readyz(&c.gw, 200, Duration::from_secs(15));
    assert_eq!(destinations(&c.gw, WEB), protected);
    let (reply, _) = c.get_from("client", "/after-restart");
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[test]
fn an_invalid_access_policy_is_reported_and_denies_all() {
    let valid = allow_accounts(&["client"]);
    let c = Cluster::start("k8sbadpol", KubeletDriver::Cgroupfs, |node| {
        let mut objs = web_objects(node, &web(node).protected(true), &["web1"]);
        objs.push(kube::access_policy_object(NS, "web", "web", &valid));
        objs
    });
    let accepted = |want: &str| {
        nodegate_tests::harness::poll_until(
            &format!("AccessPolicy shop/web Accepted={want}"),
            Duration::from_secs(5),
            || {
                let obj = c.api.get(kube::Kind::AccessPolicy, NS, "web");
                Ok(obj.and_then(|o| {
                    let cond = kube::accepted_condition(&o)?.clone();
                    (cond["status"] == want).then_some(cond)
                }))
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {:?}\ngateway stderr:\n{}",
                c.api.get(kube::Kind::AccessPolicy, NS, "web"),
                tail(&c.gw.stderr(), 30)
            )
        })
    };
    let cond = accepted("True");
    assert_eq!(cond["reason"], "Valid", "{cond}");
    let (reply, line) = c.get_from("client", "/valid");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(s(&line, "policy"), WEB, "{line}");

    // The same policy with one broken rule: refused with the field named, deny-all.
    let mut invalid = valid.clone();
    invalid["allow"]
        .as_array_mut()
        .expect("allow")
        .push(json!({"id": "typo", "when": {"grups": "devs"}}));
    c.api
        .apply(kube::access_policy_object(NS, "web", "web", &invalid));
    let cond = accepted("False");
    assert_eq!(cond["reason"], "InvalidPolicy", "{cond}");
    let message = s(&cond, "message");
    assert!(
        message.contains("allow[1]") && message.contains("web allow nothing"),
        "the message names the field and the effect: {message}"
    );
    // The event follows the status write.
    let event = nodegate_tests::harness::poll_until(
        "a Warning event on AccessPolicy shop/web",
        Duration::from_secs(5),
        || {
            Ok(c.api.all(kube::Kind::Event).into_iter().find(|e| {
                e["regarding"]["name"] == "web"
                    && e["regarding"]["kind"] == "AccessPolicy"
                    && e["reason"] == "InvalidPolicy"
            }))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", c.api.all(kube::Kind::Event)));
    assert_eq!(event["type"], "Warning", "{event}");

    // What the valid policy allowed is denied now: still protected, never widened.
    nodegate_tests::harness::poll_until("the deny-all to apply", Duration::from_secs(5), || {
        let reply = send(c.pod("client"), &get(c.vips()[0], "/probe"));
        Ok((reply.status != 200).then_some(()))
    })
    .expect("deny-all applied");
    let reply = send(c.pod("client"), &get(c.vips()[0], "/invalid"));
    assert_ne!(reply.status, 200, "{reply:?}");
    let src = reply.local;
    let line =
        c.gw.wait_decision("the denied connection", common::LOG_TIMEOUT, |d| {
            s(d, "service") == WEB
                && s(d, "decision") == "deny"
                && src.is_none_or(|a| s(d, "src") == a.to_string())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(names_pod(&line, NS, "client"), "{line}");
    assert_eq!(
        destinations(&c.gw, WEB),
        dests(&c.vips(), &c.endpoints(&["web1"])),
        "still protected"
    );
    c.assert_direct_dropped("web1", "invalid policy");

    // Fixed: accepted again, allowed again.
    c.api
        .apply(kube::access_policy_object(NS, "web", "web", &valid));
    accepted("True");
    nodegate_tests::harness::poll_until(
        "the fixed policy to apply",
        Duration::from_secs(5),
        || {
            let reply = send(c.pod("client"), &get(c.vips()[0], "/fixed"));
            Ok((reply.status == 200).then_some(()))
        },
    )
    .expect("allowed again");
}

#[test]
fn connections_and_bypasses_name_the_source_pod_and_workload_rules_use_it() {
    // The systemd layout (kubepods.slice/...), found by `cgroup_driver: auto`.
    let policy = allow_accounts(&["client"]);
    // The admin server on the node's address (as with `admin.listen: 0.0.0.0:…` for a
    // scraper): pods reach it, and `/explain` must refuse them.
    let c = Cluster::start_with(
        "k8sident",
        KubeletDriver::Systemd,
        |node| web_objects(node, &web(node).policy(&policy).protected(true), &["web1"]),
        |node, mut config| {
            config.admin = std::net::SocketAddr::new(node.node().ipv4.into(), ADMIN_PORT);
            config
        },
    );
    wait_dests(
        &c.gw,
        WEB,
        &dests(&c.vips(), &c.endpoints(&["web1"])),
        Instant::now(),
        Duration::from_secs(5),
    );

    // Pod client (service account client): allowed by its workload, named by cgroup id.
    let client = c.pod("client");
    let (reply, line) = c.get_from("client", "/by-workload");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(s(&line, "rule"), "sa-client", "{line}");
    assert_eq!(
        line["workload"],
        json!({"namespace": NS, "service_account": "client", "pod": "client", "from": "source"}),
        "{line}"
    );
    assert_eq!(
        line["cgroup_id"].as_u64(),
        Some(client.cgroup_id().expect("cgroup id")),
        "{line}"
    );

    // Pod other (service account other): denied (anonymous, so 401 with a challenge), and
    // named too.
    let (reply, line) = c.get_from("other", "/by-workload");
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(s(&line, "decision"), "deny", "{line}");
    assert_eq!(s(&line, "reason"), "no_rule_matched", "{line}");
    assert_eq!(line["workload"]["service_account"], "other", "{line}");
    assert!(names_pod(&line, NS, "other"), "{line}");

    assert_live_explain(&c);

    // A process in pod client's network namespace that escaped the hooked cgroup dials the
    // backend directly: dropped in the kernel, and the bypass line names the local pod (by
    // its address).
    let mut rogue = client.clone();
    rogue.cgroup = c.node.node().cgroup.clone();
    let target = c.pod("web1").v4(BACKEND_PORT);
    assert_timed_out(&dial(&rogue, target, "around", DROP_TIMEOUT));
    let line = bypass_line(&c.gw, client.ipv4.into(), target, "dropped");
    assert_eq!(s(&line, "service"), WEB, "{line}");
    assert!(
        names_pod(&line, NS, "client"),
        "the bypass line names the source pod: {line}"
    );
    assert!(counters(&c.gw).syns(WEB, client.ipv4.into(), "not_from_gateway", "dropped") >= 1);
    // The foreign node is no pod: its bypass line names none.
    let foreign = c.node.foreign();
    assert_timed_out(&dial(foreign, target, "foreign", DROP_TIMEOUT));
    let line = bypass_line(&c.gw, foreign.ipv4.into(), target, "dropped");
    assert!(line.get("src_pod").is_none(), "{line}");
}

/// `gateway explain` asks the running gateway: the `AccessPolicy` and the pods it knows (the
/// config file alone knows neither); `/explain` answers only the gateway's own host.
fn assert_live_explain(c: &Cluster) {
    let client = c.pod("client");
    let admin = c.gw.config().admin.to_string();
    let explain = |args: &[&str]| {
        let mut cmd =
            std::process::Command::new(c.node.tools().require_gateway().expect("gateway"));
        cmd.args(["explain", "--service", WEB, "--path", "/by-workload"])
            .args(args);
        c.node
            .node()
            .run(cmd, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("gateway explain {args:?}: {e}"))
    };
    let client_ip = client.ipv4.to_string();
    let out = explain(&["--admin", &admin, "--source", &client_ip, "--json"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let v = out.json().expect("explain --json");
    assert_eq!(s(&v, "decision"), "allow", "{v}");
    assert_eq!(s(&v, "rule"), "sa-client", "{v}");
    assert_eq!(s(&v, "state"), "live", "{v}");
    assert_eq!(
        v["workload"],
        json!({"namespace": NS, "service_account": "client", "pod": "client"}),
        "{v}"
    );
    let other_ip = c.pod("other").ipv4.to_string();
    let out = explain(&["--admin", &admin, "--source", &other_ip]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(
        out.stdout.contains("DENY (no_rule_matched)")
            && out.stdout.contains("workload  shop/other (pod other)")
            && out.stdout.contains("live state of the running gateway"),
        "{out:?}"
    );
    // From a pod: the admin server answers its metrics, but explains nothing.
    let query = format!(r#"{{"service":"{WEB}","path":"/by-workload"}}"#);
    let from_pod = send(
        client,
        &HttpRequest::get(&format!("http://{admin}/explain"))
            .method("POST")
            .body(&query),
    );
    assert_eq!(from_pod.status, 403, "{from_pod:?}");
    let metrics = send(
        client,
        &HttpRequest::get(&format!("http://{admin}/metrics")),
    );
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let config = c.gw.config_path().display().to_string();
    let out = explain(&["--config", &config]);
    assert_eq!(out.code(), Some(64), "{out:?}");
    assert!(
        out.stderr.contains("no service \"shop/web\"") && out.stderr.contains("leave out --config"),
        "{out:?}"
    );
}

/// A labelled Service's TLS certificate and Host names come from the config's
/// `kubernetes.services` entry (its label and `AccessPolicy` cannot carry files): after a
/// reload of the file (no restart), curl in a pod gets the Service's certificate on its
/// `ClusterIP`, the `AccessPolicy` decides, and the decision line has the SNI and the pod.
#[test]
fn kubernetes_services_settings_terminate_tls_for_a_labelled_service() {
    const HOST: &str = "web.shop.test";
    let mut c = Cluster::start("k8stls", KubeletDriver::Cgroupfs, |node| {
        let mut objs = web_objects(node, &web(node).protected(true), &["web1"]);
        objs.push(kube::access_policy_object(
            NS,
            "web",
            "web",
            &allow_accounts(&["client"]),
        ));
        objs
    });
    let (reply, line) = c.get_from("client", "/plain");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(line["tls"].is_null(), "plain HTTP before: {line}");

    let pki = c.node.dir().join("pki");
    std::fs::create_dir_all(&pki).expect("pki dir");
    let ca = Ca::new("Nodegate Test Server CA");
    write(&pki.join("ca.pem"), &ca.pem);
    ca.leaf(&pki, "web", HOST, vec![dns(HOST)], false, false);
    let file = |name: &str| pki.join(name).display().to_string();
    let kubeconfig = c
        .api
        .write_kubeconfig(&c.node)
        .unwrap_or_else(|e| panic!("writing the kubeconfig: {e}"));
    let section = kube::set(
        kube::kubernetes_section(&kubeconfig),
        "services",
        json!({"shop/web": {
            "http": {"hosts": [HOST]},
            "tls": {"cert_file": file("web.crt"), "key_file": file("web.key")},
        }}),
    );
    c.gw.reload(c.node.gateway_config().section("kubernetes", section))
        .unwrap_or_else(|e| panic!("reload: {e}"));

    let vip = c.vips()[0];
    let https = |pod: &str, path: &str| {
        let resolve = format!("{HOST}:{}:{}", vip.port(), vip.ip());
        let ca = file("ca.pem");
        let request = HttpRequest::get(&format!("https://{HOST}:{}{path}", vip.port()))
            .curl_args(&["--cacert", &ca, "--resolve", &resolve]);
        send(c.pod(pod), &request)
    };
    let reply = nodegate_tests::harness::poll_until(
        "TLS terminated with the entry's certificate",
        Duration::from_secs(10),
        || {
            let reply = https("client", "/tls");
            Ok((reply.status == 200).then_some(reply))
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: last {:?}\ngateway stderr:\n{}",
            https("client", "/tls"),
            tail(&c.gw.stderr(), 30)
        )
    });
    assert!(
        reply.body.contains("web1"),
        "the backend answered: {reply:?}"
    );
    let line = request_line(&c.gw, &reply);
    assert_eq!(s(&line, "service"), WEB, "{line}");
    assert_eq!(s(&line, "decision"), "allow", "{line}");
    assert_eq!(line["tls"]["sni"], HOST, "{line}");
    assert!(names_pod(&line, NS, "client"), "{line}");

    // Over TLS too, the AccessPolicy decides: another service account (no token either) is
    // refused.
    let reply = https("other", "/tls");
    assert_eq!(reply.status, 401, "{reply:?}");
    let line = request_line(&c.gw, &reply);
    assert_eq!(s(&line, "decision"), "deny", "{line}");
    assert_eq!(line["tls"]["sni"], HOST, "{line}");
    assert!(names_pod(&line, NS, "other"), "{line}");
}
