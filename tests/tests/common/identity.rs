//! The identity scenarios' fixture: a node with a client pod `a`, a backend pod `b` (ngpeer on
//! :8080), a pod `c` with a static workload identity, and the test OIDC provider in pod `idp`;
//! the gateway protects the HTTP service `api` (VIP `10.96.N.20:80`, hosts
//! `api.nodegate.test` and `alt.nodegate.test`) with the policy of [`api_policy`].

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nodegate_tests::harness::{
    Gateway, GatewayConfig, HttpReply, HttpRequest, Mode, Node, OidcProvider, Place, Proc,
    ServiceConfig, describe_request,
};
use serde_json::{Value, json};

use super::{LOG_TIMEOUT, node, s, start};

pub const API_HOST: &str = "api.nodegate.test";
pub const ALT_HOST: &str = "alt.nodegate.test";
/// Name of the provider's issuer in the gateway config.
pub const IDP: &str = "idp";
/// The Kubernetes-style issuer whose keys the tests write to a `jwks_file`.
pub const CLUSTER_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const CLUSTER_AUDIENCE: &str = "nodegate";

/// The `api` policy:
/// * deny `no-guests-admin`: group `guests` under `/admin`;
/// * allow `ops-team`: group `ops` and claim `team` = `payments` (the `machine-ops` client);
/// * allow `guests-public`: group `guests` under `/public`;
/// * allow `guests-reports`: group `guests`, host `api.nodegate.test`, under `/reports`;
/// * allow `checkout-sa`: workload `shop/checkout` (from a token or from the source).
pub fn api_policy() -> Value {
    json!({
        "deny": [
            {"id": "no-guests-admin", "when": {"and": [{"groups": "guests"}, {"path": {"prefix": "/admin"}}]}},
        ],
        "allow": [
            {"id": "ops-team", "when": {"and": [{"groups": "ops"}, {"claim": {"name": "team", "equals": "payments"}}]}},
            {"id": "guests-public", "when": {"and": [{"groups": "guests"}, {"path": {"prefix": "/public"}}]}},
            {"id": "guests-reports", "when": {"and": [{"groups": "guests"}, {"host": API_HOST}, {"path": {"prefix": "/reports"}}]}},
            {"id": "checkout-sa", "when": {"workload": {"namespace": "shop", "service_account": "checkout"}}},
        ],
    })
}

/// The provider as a gateway issuer (`kind: workload`: machine clients).
pub fn idp_issuer(idp: &OidcProvider) -> Value {
    json!({
        "name": IDP,
        "issuer": idp.issuer(),
        "audiences": [idp.audience()],
        // The provider listens on a pod address over plain HTTP (a lab).
        "allow_http": true,
        "kind": "workload",
        "jwks_refresh_min_interval_s": 1,
    })
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A running identity scenario. Dropping it stops everything (the node's drop).
pub struct Api {
    pub gw: Gateway,
    pub idp: OidcProvider,
    pub backend: Proc,
    pub vip: SocketAddr,
    pub node: Node,
}

impl Api {
    /// Builds node `name`, starts the provider and the backend, and the gateway with the `api`
    /// service and the provider as issuer; `tweak` may change the config first.
    pub fn start(name: &str, tweak: impl FnOnce(&Node, GatewayConfig) -> GatewayConfig) -> Self {
        Self::build(name, false, tweak)
    }

    /// Like [`Self::start`] with a backend that speaks HTTP/1.1 with keep-alive.
    pub fn start_http11(
        name: &str,
        tweak: impl FnOnce(&Node, GatewayConfig) -> GatewayConfig,
    ) -> Self {
        Self::build(name, true, tweak)
    }

    fn build(
        name: &str,
        http11: bool,
        tweak: impl FnOnce(&Node, GatewayConfig) -> GatewayConfig,
    ) -> Self {
        let node = node(name, &["a", "b", "c", "idp"]);
        let idp = OidcProvider::start(&node, node.pod("idp"))
            .unwrap_or_else(|e| panic!("starting the OIDC provider: {e}"));
        let b = node.pod("b");
        let backend = if http11 {
            b.serve_http11(8080, "b")
        } else {
            b.serve(8080, "b")
        }
        .unwrap_or_else(|e| panic!("ngpeer serve in b: {e}"));
        let vip = node.vip_v4(20, 80);
        let api = ServiceConfig::new("api", Mode::Enforce)
            .vip(vip)
            .endpoint(node.pod("b").v4(8080))
            .allow(&node.cidr_v4())
            .http(json!({"hosts": [API_HOST, ALT_HOST], "identity_headers": true}))
            .policy(api_policy());
        let config = node
            .gateway_config()
            .service(api)
            .auth(json!({"issuers": [idp_issuer(&idp)]}));
        let config = tweak(&node, config);
        let gw = start(&node, config);
        Self {
            gw,
            idp,
            backend,
            vip,
            node,
        }
    }

    /// The client pod.
    pub fn a(&self) -> &Place {
        self.node.pod("a")
    }

    /// `GET http://<vip><path>` with `Host: api.nodegate.test`.
    pub fn get(&self, path: &str) -> HttpRequest {
        HttpRequest::get(&format!("http://{}{path}", self.vip)).host(API_HOST)
    }

    /// A `client_credentials` token of `client`, fetched from pod `a`.
    pub fn machine_token(&self, client: &str) -> String {
        self.idp
            .client_credentials(self.a(), client, None)
            .unwrap_or_else(|e| panic!("client_credentials for {client}: {e}"))
    }

    /// Sends `request` from `from`; returns the reply and its `request` decision line.
    pub fn send_from(&self, from: &Place, request: &HttpRequest) -> (HttpReply, Value) {
        let reply = from
            .http(request)
            .unwrap_or_else(|e| panic!("{} from {}: {e}", describe_request(request), from.name));
        let line = self.request_line(&reply, request);
        (reply, line)
    }

    /// Sends `request` from pod `a`; returns the reply and its decision line.
    pub fn send(&self, request: &HttpRequest) -> (HttpReply, Value) {
        self.send_from(self.a(), request)
    }

    /// The `request` line logged for the connection `reply` came over (the first one if the
    /// connection carried several).
    pub fn request_line(&self, reply: &HttpReply, request: &HttpRequest) -> Value {
        self.request_lines(reply, 1, request).remove(0)
    }

    /// The first `count` `request` lines of the connection `reply` came over.
    pub fn request_lines(
        &self,
        reply: &HttpReply,
        count: usize,
        request: &HttpRequest,
    ) -> Vec<Value> {
        let Some(src) = reply.local else {
            panic!(
                "{}: no connection was made: {reply:?}",
                describe_request(request)
            );
        };
        nodegate_tests::harness::poll_until(
            &format!("{count} request line(s) from {src}"),
            LOG_TIMEOUT,
            || {
                let lines: Vec<Value> = self
                    .gw
                    .decisions()?
                    .into_iter()
                    .filter(|d| s(d, "kind") == "request" && s(d, "src") == src.to_string())
                    .collect();
                Ok((lines.len() >= count).then_some(lines))
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; reply {reply:?}\ndecision lines:\n{}\ngateway stderr:\n{}",
                describe_request(request),
                self.gw.decision_text(),
                self.gw.stderr()
            )
        })
    }

    /// Sends a raw HTTP/1.1 request (`head` without the final blank line; `Connection: close`
    /// is added) from pod `a` to the VIP; returns the status, the raw reply and the line.
    pub fn raw(&self, head: &str) -> (u16, String, Value) {
        let text = format!("{head}\r\nConnection: close\r\n\r\n");
        let reply = self
            .a()
            .connect_raw(self.vip, &text, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("raw request {head:?}: {e}"));
        let status = reply
            .reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let Some(src) = reply.local else {
            panic!("raw request {head:?}: not connected: {}", reply.raw);
        };
        let line = self
            .gw
            .wait_decision(&format!("request from {src}"), LOG_TIMEOUT, |d| {
                s(d, "kind") == "request" && s(d, "src") == src.to_string()
            })
            .unwrap_or_else(|e| panic!("raw request {head:?}: {e}; reply {}", reply.raw));
        (status, reply.reply, line)
    }

    /// What the backend received (ngpeer `conn` lines' `read`).
    pub fn backend_reads(&self) -> Vec<String> {
        super::served(&self.backend.stdout())
            .iter()
            .filter_map(|v| v["read"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Asserts a decision line: `decision`, `reason` and the deciding `rule` (`None`: no rule).
#[track_caller]
pub fn assert_line(line: &Value, decision: &str, reason: &str, rule: Option<&str>) {
    assert_eq!(s(line, "kind"), "request", "{line}");
    assert_eq!(s(line, "service"), "api", "{line}");
    assert_eq!(s(line, "decision"), decision, "decision: {line}");
    assert_eq!(s(line, "reason"), reason, "reason: {line}");
    assert_eq!(
        line.get("rule").and_then(Value::as_str),
        rule,
        "rule: {line}"
    );
    for field in ["request_id", "node", "method", "status", "identity"] {
        assert!(line.get(field).is_some(), "`{field}` missing: {line}");
    }
}

/// Asserts the reply's status, naming the request and showing the body when it differs.
#[track_caller]
pub fn assert_status(reply: &HttpReply, status: u16, what: &str) {
    assert_eq!(
        reply.status, status,
        "{what}: expected HTTP {status}, got {} {:?} (error {:?})",
        reply.status, reply.body, reply.error
    );
}

/// How long token checks may take to settle after a key change (JWKS refetch).
pub const REFETCH_WAIT: Duration = Duration::from_secs(2);
