//! Browser login end to end. Headless Chromium (playwright-core, `tests/oidc/login.mjs`) runs in
//! pod `a` and opens `http://app.nodegate.test/...`, which resolves to the service VIP; the
//! gateway sends it to the test provider in pod `idp`, the browser logs in there
//! (devInteractions) and comes back through `/.nodegate/callback` to the protected page. Cookies
//! are then replayed with curl.

mod common;

use std::net::SocketAddr;

use nodegate_tests::harness::{
    BrowserLogin, Gateway, HttpReply, HttpRequest, Mode, Node, OidcOptions, OidcProvider, Proc,
    ServiceConfig, oidc,
};
use serde_json::{Value, json};

use common::{LOG_TIMEOUT, identity::assert_status, node, s, start};

const APP: &str = "app.nodegate.test";
const COOKIE: &str = "_nodegate";

struct App {
    gw: Gateway,
    idp: OidcProvider,
    _backend: Proc,
    vip: SocketAddr,
    node: Node,
}

impl App {
    fn start(name: &str) -> Self {
        let node = node(name, &["a", "b", "idp"]);
        let idp = OidcProvider::start_with(
            &node,
            node.pod("idp"),
            &OidcOptions {
                redirect_uris: vec![format!("http://{APP}/.nodegate/callback")],
                ..OidcOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("starting the OIDC provider: {e}"));
        let backend = node
            .pod("b")
            .serve_http11(8080, "b")
            .unwrap_or_else(|e| panic!("ngpeer serve in b: {e}"));
        let vip = node.vip_v4(30, 80);
        let app = ServiceConfig::new("app", Mode::Enforce)
            .vip(vip)
            .endpoint(node.pod("b").v4(8080))
            .allow(&node.cidr_v4())
            .http(json!({"hosts": [APP], "identity_headers": true, "login": true}))
            .policy(json!({
                "deny": [{"id": "no-bob", "when": {"user": "bob"}}],
                "allow": [{"id": "devs", "when": {"groups": "devs"}}],
            }));
        let (client_id, client_secret) = idp.web_client();
        let config = node.gateway_config().service(app).section(
            "login",
            json!({
                "issuer": idp.issuer(),
                "client_id": client_id,
                "client_secret": client_secret,
                "hosts": [APP],
                "allow_http_issuer": true,
            }),
        );
        let gw = start(&node, config);
        Self {
            gw,
            idp,
            _backend: backend,
            vip,
            node,
        }
    }

    fn url(path: &str) -> String {
        format!("http://{APP}{path}")
    }

    fn browser(&self, url: &str) -> BrowserLogin {
        BrowserLogin::new(url).map(APP, &self.vip.ip())
    }

    fn login(&self, login: &BrowserLogin) -> Value {
        oidc::browser_login(self.node.pod("a"), login)
            .unwrap_or_else(|e| panic!("browser login at {}: {e}", login.url))
    }

    /// The session cookie the browser got for the app host.
    fn session_cookie(report: &Value) -> String {
        report["cookies"]
            .as_array()
            .and_then(|cookies| {
                cookies
                    .iter()
                    .find(|c| c["name"] == COOKIE && c["domain"] == APP)
            })
            .and_then(|c| c["value"].as_str())
            .map_or_else(
                || panic!("no {COOKIE} cookie for {APP}: {report}"),
                str::to_owned,
            )
    }

    /// `GET path` from pod `a` with the session cookie `cookie`, as an API client.
    fn with_cookie(&self, path: &str, cookie: &str) -> (HttpReply, Value) {
        let request = HttpRequest::get(&format!("http://{}{path}", self.vip))
            .host(APP)
            .header(&format!("Cookie: {COOKIE}={cookie}"));
        let reply = self
            .node
            .pod("a")
            .http(&request)
            .unwrap_or_else(|e| panic!("GET {path} with a cookie: {e}"));
        let src = reply
            .local
            .unwrap_or_else(|| panic!("GET {path}: no connection: {reply:?}"));
        let line = self
            .gw
            .wait_decision(&format!("request from {src}"), LOG_TIMEOUT, |d| {
                s(d, "kind") == "request" && s(d, "src") == src.to_string()
            })
            .unwrap_or_else(|e| panic!("{e}"));
        (reply, line)
    }

    /// The first `request` line for `path` that satisfies `pred`.
    fn line_for(&self, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.gw
            .wait_decision(&format!("request for {path}"), LOG_TIMEOUT, |d| {
                s(d, "kind") == "request" && s(d, "path") == path && pred(d)
            })
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// The host part of an absolute URL (`http://h:p/x` → `h:p`); the whole string otherwise.
fn host_of(url: &str) -> &str {
    url.split_once("://").map_or(url, |(_, rest)| {
        rest.split(['/', '?', '#']).next().unwrap_or(rest)
    })
}

#[track_caller]
fn assert_app_line(line: &Value, decision: &str, reason: &str, rule: Option<&str>) {
    assert_eq!(s(line, "service"), "app", "{line}");
    assert_eq!(s(line, "decision"), decision, "decision: {line}");
    assert_eq!(s(line, "reason"), reason, "reason: {line}");
    assert_eq!(
        line.get("rule").and_then(Value::as_str),
        rule,
        "rule: {line}"
    );
}

#[test]
fn a_browser_logs_in_and_reaches_the_protected_page() {
    let app = App::start("idlogin");
    let report = app.login(&app.browser(&App::url("/headers?from=browser")));
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["via_provider"], true,
        "never went to the provider: {report}"
    );
    assert_eq!(
        report["final_url"],
        App::url("/headers?from=browser"),
        "{report}"
    );
    let echo: Value = serde_json::from_str(report["text"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the backend's echo: {e}: {report}"));
    let headers = echo["headers"].to_string().to_ascii_lowercase();
    assert!(
        headers.contains(r#"["x-nodegate-user","alice"]"#),
        "the backend did not get the user: {echo}"
    );
    assert!(
        !headers.contains(COOKIE),
        "the session cookie reached the backend: {echo}"
    );
    let cookie = report["cookies"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == COOKIE))
        .unwrap_or_else(|| panic!("no session cookie: {report}"));
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Lax", "{cookie}");

    let line = app.line_for("/headers", |d| s(d, "decision") == "allow");
    assert_app_line(&line, "allow", "allowed_by_rule", Some("devs"));
    assert_eq!(line["identity"]["kind"], "user", "{line}");
    assert_eq!(line["identity"]["subject"], "alice", "{line}");
    assert_eq!(line["identity"]["email"], "alice@example.test", "{line}");
    assert_eq!(line["identity"]["issuer"], app.idp.issuer(), "{line}");
    let callback = app.line_for("/.nodegate/callback", |_| true);
    assert_app_line(&callback, "allow", "login_callback", None);

    // bob logs in too, and is denied by name.
    let report = app.login(&app.browser(&App::url("/")).login("bob"));
    assert_eq!(report["status"], 403, "{report}");
    let line = app.line_for("/", |d| d["identity"]["subject"] == "bob");
    assert_app_line(&line, "deny", "denied_by_rule", Some("no-bob"));
}

#[test]
fn a_tampered_cookie_and_a_cookie_replayed_after_logout_are_refused() {
    let app = App::start("idcookie");
    let report = app.login(&app.browser(&App::url("/")));
    assert_eq!(report["ok"], true, "{report}");
    let cookie = App::session_cookie(&report);

    let (reply, line) = app.with_cookie("/", &cookie);
    assert_status(&reply, 200, "the session cookie, replayed by curl");
    assert_app_line(&line, "allow", "allowed_by_rule", Some("devs"));

    // One character changed in the middle (the sealed payload), and the cookie cut short.
    let mid = cookie.len() / 2;
    let flipped = if &cookie[mid..=mid] == "A" { "B" } else { "A" };
    let tampered = format!("{}{flipped}{}", &cookie[..mid], &cookie[mid + 1..]);
    for (what, bad) in [
        ("tampered", tampered.as_str()),
        ("truncated", &cookie[..cookie.len() - 4]),
    ] {
        let (reply, line) = app.with_cookie("/", bad);
        assert_status(&reply, 401, what);
        assert_app_line(&line, "deny", "session_invalid", None);
        assert_eq!(line["identity"]["kind"], "anonymous", "{what}: {line}");
    }

    let (reply, line) = app.with_cookie("/.nodegate/logout", &cookie);
    assert_status(&reply, 200, "logout");
    assert_app_line(&line, "allow", "login_logout", None);
    let (reply, line) = app.with_cookie("/", &cookie);
    assert_status(&reply, 401, "the cookie replayed after the logout");
    assert_app_line(&line, "deny", "session_revoked", None);
    assert_eq!(line["identity"]["kind"], "anonymous", "{line}");
}

#[test]
fn post_login_redirects_stay_on_the_protected_origin() {
    let app = App::start("idredir");
    let origin = format!("http://{APP}");
    for rd in [
        "//evil.example/",
        "/\\evil.example/",
        "/%5Cevil.example/",
        "/%2F%2Fevil.example/",
        "http://evil.example/",
        "HTTPS://evil.example/x",
        "javascript:alert(1)",
    ] {
        let encoded: String = rd
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let report = app.login(&app.browser(&App::url(&format!("/.nodegate/login?rd={encoded}"))));
        let final_url = report["final_url"].as_str().unwrap_or_default();
        assert!(
            final_url == origin || final_url.starts_with(&format!("{origin}/")),
            "rd={rd:?}: the login ended on {final_url}: {report}"
        );
        assert_eq!(report["via_provider"], true, "rd={rd:?}: {report}");
        let off_origin: Vec<&Value> = report["navigations"]
            .as_array()
            .map(|n| {
                n.iter()
                    .filter(|n| {
                        n["url"]
                            .as_str()
                            .is_some_and(|u| host_of(u).contains("evil"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(off_origin.is_empty(), "rd={rd:?}: went to {off_origin:?}");
        let blocked: Vec<&Value> = report["blocked"]
            .as_array()
            .map(|b| {
                b.iter()
                    .filter(|u| u.as_str().is_some_and(|u| host_of(u).contains("evil")))
                    .collect()
            })
            .unwrap_or_default();
        assert!(blocked.is_empty(), "rd={rd:?}: tried to go to {blocked:?}");
    }

    // The protected URL itself cannot carry an off-origin path: refused before any login.
    for path in ["//evil.example/", "/\\evil.example/"] {
        let reply = app
            .node
            .pod("a")
            .http(
                &HttpRequest::get(&format!("http://{}{path}", app.vip))
                    .host(APP)
                    .header("Accept: text/html"),
            )
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_status(&reply, 400, path);
        assert!(reply.header("location").is_none(), "{path}: {reply:?}");
    }
}
