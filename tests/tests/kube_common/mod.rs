//! Shared by `kubernetes.rs` and `multinode.rs`: gateways whose services come from the stand-in
//! Kubernetes API server, and what their kernel maps and admin server say.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use nodegate_tests::harness::{
    Gateway, GatewayConfig, HttpReply, HttpRequest, KubeApi, Node, Place, describe_request, kube,
    poll_until,
};
use serde_json::{Value, json};

use super::common::{LOG_TIMEOUT, s, status};

/// The namespace of the scenarios' workloads and Services.
pub const NS: &str = "shop";
/// The protected Service of the scenarios, as the gateway names it (`namespace/name`).
pub const WEB: &str = "shop/web";
/// Port the backends listen on (the Service's `targetPort`).
pub const BACKEND_PORT: u16 = 8080;
/// The budget for a label change to reach the kernel (issue: "within 1 s").
pub const BUDGET: Duration = Duration::from_secs(1);

/// `node`'s gateway config with a `kubernetes:` section reading `api` (kubeconfig in the node's
/// dir, cgroup driver `auto`, 50 ms debounce) and no static service.
pub fn kube_config(node: &Node, api: &KubeApi) -> GatewayConfig {
    let kubeconfig = api
        .write_kubeconfig(node)
        .unwrap_or_else(|e| panic!("writing the kubeconfig: {e}"));
    node.gateway_config()
        .section("kubernetes", kube::kubernetes_section(&kubeconfig))
}

/// A policy allowing the workloads `namespace/service_account` (rule id `sa-<account>`).
pub fn allow_accounts(accounts: &[&str]) -> Value {
    json!({"allow": accounts.iter().map(|sa| json!({
        "id": format!("sa-{sa}"),
        "when": {"workload": {"namespace": NS, "service_account": sa}},
    })).collect::<Vec<_>>()})
}

/// `(address, kind)` of every pinned destination of `service` (`gateway status --json`).
pub fn destinations(gw: &Gateway, service: &str) -> BTreeSet<(SocketAddr, String)> {
    dests_of(&status(gw), service)
}

fn dests_of(status: &Value, service: &str) -> BTreeSet<(SocketAddr, String)> {
    status["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["service"] == service)
        .filter_map(|d| Some((s(d, "addr").parse().ok()?, s(d, "kind").to_owned())))
        .collect()
}

/// `(address, kind)` pairs.
pub fn dests(vips: &[SocketAddr], endpoints: &[SocketAddr]) -> BTreeSet<(SocketAddr, String)> {
    vips.iter()
        .map(|a| (*a, "vip".to_owned()))
        .chain(endpoints.iter().map(|a| (*a, "endpoint".to_owned())))
        .collect()
}

/// Polls `gateway status` until `service`'s destinations are `want`; returns the time since
/// `since`. Panics with the last destinations and the daemon's log after `timeout`.
pub fn wait_dests(
    gw: &Gateway,
    service: &str,
    want: &BTreeSet<(SocketAddr, String)>,
    since: Instant,
    timeout: Duration,
) -> Duration {
    let mut last = BTreeSet::new();
    let found = poll_until(
        &format!("{service}'s destinations in the kernel to be {want:?}"),
        timeout,
        || {
            last = destinations(gw, service);
            Ok((&last == want).then(Instant::now))
        },
    );
    match found {
        Ok(at) => at.duration_since(since),
        Err(e) => panic!(
            "{e}; last: {last:?}\ngateway stderr:\n{}",
            tail(&gw.stderr(), 40)
        ),
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `GET /readyz` from the node netns.
pub fn readyz(gw: &Gateway) -> (u16, String) {
    gw.admin_get("/readyz")
        .unwrap_or_else(|e| panic!("GET /readyz: {e}"))
}

/// Polls `/readyz` until it answers `code`; returns the body.
pub fn wait_readyz(gw: &Gateway, code: u16, timeout: Duration) -> String {
    let mut last = (0, String::new());
    poll_until(&format!("/readyz {code}"), timeout, || {
        last = readyz(gw);
        Ok((last.0 == code).then(|| last.1.clone()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}; last: {} {}\ngateway stderr:\n{}",
            last.0,
            last.1,
            tail(&gw.stderr(), 40)
        )
    })
}

/// Whether a decision line names the source pod `namespace/pod`: `src_namespace` and
/// `src_pod` (connection and bypass lines), or a request line's `workload`.
pub fn names_pod(line: &Value, namespace: &str, pod: &str) -> bool {
    (s(line, "src_namespace") == namespace && s(line, "src_pod") == pod)
        || (line["workload"]["namespace"] == namespace && line["workload"]["pod"] == pod)
}

/// `GET http://<vip>/<path>` (any Host).
pub fn get(vip: SocketAddr, path: &str) -> HttpRequest {
    HttpRequest::get(&format!("http://{vip}{path}"))
}

/// Sends `request` from `from`.
pub fn send(from: &Place, request: &HttpRequest) -> HttpReply {
    from.http(request)
        .unwrap_or_else(|e| panic!("{} from {}: {e}", describe_request(request), from.name))
}

/// The `request` decision line of the connection `reply` came over.
pub fn request_line(gw: &Gateway, reply: &HttpReply) -> Value {
    let Some(src) = reply.local else {
        panic!("no connection was made: {reply:?}");
    };
    gw.wait_decision(&format!("request from {src}"), LOG_TIMEOUT, |d| {
        s(d, "kind") == "request" && s(d, "src") == src.to_string()
    })
    .unwrap_or_else(|e| panic!("{e}\ngateway stderr:\n{}", tail(&gw.stderr(), 40)))
}

/// The median of `samples` (sorted in place).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}
