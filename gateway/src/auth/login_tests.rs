//! Browser login against a real OIDC provider (npm `oidc-provider`, `tests/oidc/server.mjs`),
//! driven the way a browser drives it: the gateway's redirect, the provider's login and consent
//! forms (devInteractions), the redirect back to the callback. The login flow is called in
//! process through its framework-neutral API; the provider is a separate node process on
//! 127.0.0.1, started per test and killed when the test ends.
//!
//! Needs `node` (20 or later) on PATH and the provider's npm packages in `tests/oidc/node_modules`
//! (`cargo xtask setup` runs `npm ci` there). Without them these tests fail and say so: a
//! skipped login test would look like a passing one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use http::header::{ACCEPT, CONTENT_TYPE, COOKIE, HOST, LOCATION, SET_COOKIE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, StatusCode};
use tokio::io::AsyncBufReadExt as _;

use super::http_client::{HttpClientOptions, OidcHttpClient};
use super::login::{LoginError, LoginEvent, LoginFlow, RequestCtx, Response};
use super::login_config::{LoginConfig, LoginSettings};
use super::session::{RefreshError, Refresher as _, SessionError, SessionIdentity};

const HOST_NAME: &str = "gw.test";
const ALT_HOST: &str = "alt.test:8080";
const CALLBACK: &str = "/.nodegate/callback";

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc")
}

/// Numbers the cookie secret files of the flows (one each).
static SECRET_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Scratch files of these tests (provider logs, the cookie secret).
fn tmp_dir() -> PathBuf {
    std::env::temp_dir()
}

/// The provider's packages must be installed; a missing install is a failure, not a skip.
fn require_node_modules() {
    let dir = oidc_dir();
    assert!(
        dir.join("node_modules/oidc-provider/package.json").exists(),
        "the test OIDC provider's npm packages are not installed in {}: run `cargo xtask setup` \
         (or `npm ci` in that directory), then run the tests again",
        dir.display()
    );
}

/// The provider process. Killed (SIGKILL, by its own handle) when dropped.
struct Idp {
    _child: tokio::process::Child,
    issuer: String,
    client_secret: String,
    log: PathBuf,
}

impl Idp {
    async fn start() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        require_node_modules();
        let log = tmp_dir().join(format!(
            "ng-oidc-idp-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let stderr = std::fs::File::create(&log).expect("provider log file");
        let mut child = tokio::process::Command::new("node")
            .arg(oidc_dir().join("server.mjs"))
            .args(["--redirect-uri", &format!("http://{HOST_NAME}{CALLBACK}")])
            .args(["--redirect-uri", &format!("https://{HOST_NAME}{CALLBACK}")])
            .args(["--redirect-uri", &format!("http://{ALT_HOST}{CALLBACK}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("starting `node oidc/server.mjs` (is node on PATH?)");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("provider did not start in 30 s; see {}", log.display()))
            .expect("reading the provider's stdout")
            .unwrap_or_else(|| panic!("provider exited; see {}", log.display()));
        let info: serde_json::Value = serde_json::from_str(&line).expect("provider's JSON line");
        Self {
            _child: child,
            issuer: info["issuer"].as_str().expect("issuer").to_owned(),
            client_secret: info["client_secret"].as_str().expect("secret").to_owned(),
            log,
        }
    }

    /// A login flow configured for this provider, the way an operator would write it.
    fn flow(&self, extra_yaml: &str) -> LoginFlow {
        let dir = tmp_dir();
        let dir = dir.as_path();
        // A file per flow: tests run in parallel, and a write to a shared one (truncate, then
        // write) could be read empty by another test's flow in between.
        let seq = SECRET_SEQ.fetch_add(1, Ordering::Relaxed);
        let secret = dir.join(format!(
            "ng-oidc-cookie-secret-{}-{seq}",
            std::process::id()
        ));
        std::fs::write(&secret, b"0123456789abcdef0123456789abcdef-test-secret\n")
            .expect("writing the cookie secret");
        let yaml = format!(
            "issuer: {issuer}\n\
             client_id: gateway\n\
             client_secret: {secret_value}\n\
             allow_http_issuer: true\n\
             scopes: [openid, email, profile]\n\
             hosts: [{HOST_NAME}, \"{ALT_HOST}\"]\n\
             cookie_secret_file: {secret_file}\n\
             session_ttl_s: 600\n\
             refresh_skew_s: 120\n\
             {extra_yaml}",
            issuer = self.issuer,
            secret_value = self.client_secret,
            secret_file = secret.display(),
        );
        let config: LoginConfig = serde_yaml::from_str(&yaml).expect("login config");
        let settings = LoginSettings::from_config(config, dir).expect("login settings");
        LoginFlow::new(settings).expect("login flow")
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("provider log: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// A cookie jar good enough for one host: name, value, path; `Max-Age=0` deletes.
#[derive(Default, Clone)]
struct Jar {
    cookies: Vec<(String, String, String)>,
}

impl Jar {
    fn store<'a>(&mut self, set_cookies: impl Iterator<Item = &'a HeaderValue>) {
        for header in set_cookies {
            let header = header.to_str().expect("ASCII Set-Cookie");
            let mut parts = header.split(';').map(str::trim);
            let (name, value) = parts
                .next()
                .and_then(|p| p.split_once('='))
                .expect("name=value");
            let mut path = "/".to_owned();
            let mut delete = false;
            for attr in parts {
                let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
                if k.eq_ignore_ascii_case("path") {
                    v.clone_into(&mut path);
                } else if k.eq_ignore_ascii_case("max-age") && v.trim() == "0"
                    || k.eq_ignore_ascii_case("expires") && v.contains("1970")
                {
                    delete = true;
                }
            }
            self.cookies.retain(|(n, _, p)| !(n == name && *p == path));
            if !delete {
                self.cookies.push((name.to_owned(), value.to_owned(), path));
            }
        }
    }

    fn header_for(&self, path: &str) -> Option<HeaderValue> {
        let pairs: Vec<String> = self
            .cookies
            .iter()
            .filter(|(_, _, p)| path.starts_with(p.as_str()))
            .map(|(n, v, _)| format!("{n}={v}"))
            .collect();
        (!pairs.is_empty())
            .then(|| HeaderValue::from_str(&pairs.join("; ")).expect("cookie header"))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, _)| v.as_str())
    }
}

/// One browser: its cookies for the provider and for the gateway host.
struct Browser {
    http: OidcHttpClient,
    idp: Jar,
    gw: Jar,
    host: String,
    tls: bool,
}

impl Browser {
    fn new(host: &str, tls: bool) -> Self {
        let http = OidcHttpClient::new(&HttpClientOptions {
            ca_pem: None,
            allow_http: true,
            timeout: Duration::from_secs(10),
        })
        .expect("test HTTP client");
        Self {
            http,
            idp: Jar::default(),
            gw: Jar::default(),
            host: host.to_owned(),
            tls,
        }
    }

    fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host
        )
    }

    /// A request to the gateway, with this browser's cookies for that path.
    fn request(&self, method: Method, path_and_query: &str, accept: &str) -> Request<()> {
        let path = path_and_query.split('?').next().unwrap_or("/");
        let mut builder = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(HOST, &self.host)
            .header(ACCEPT, accept);
        if let Some(cookies) = self.gw.header_for(path) {
            builder = builder.header(COOKIE, cookies);
        }
        builder.body(()).expect("request")
    }

    /// Follows the provider's redirects and submits its login and consent forms until it
    /// redirects back to the gateway; returns that callback URL's path and query.
    async fn sign_in_at_provider(&mut self, authorize_url: &str, login: &str) -> String {
        let mut url = authorize_url.to_owned();
        let mut form: Option<String> = None;
        for _ in 0..16 {
            let path = url::Url::parse(&url)
                .expect("provider URL")
                .path()
                .to_owned();
            let mut builder = Request::builder().uri(&url);
            if let Some(cookies) = self.idp.header_for(&path) {
                builder = builder.header(COOKIE, cookies);
            }
            let request = match form.take() {
                Some(body) => builder
                    .method(Method::POST)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body.into_bytes()),
                None => builder.method(Method::GET).body(Vec::new()),
            }
            .expect("provider request");
            let response = self.http.send(request).await.expect("provider reachable");
            self.idp
                .store(response.headers().get_all(SET_COOKIE).iter());
            let body = String::from_utf8_lossy(response.body()).into_owned();
            if response.status().is_redirection() {
                let location = response.headers()[LOCATION].to_str().expect("Location");
                let next = url::Url::parse(&url)
                    .expect("base")
                    .join(location)
                    .expect("Location URL");
                if next.as_str().starts_with(&self.origin()) {
                    return next[url::Position::BeforePath..].to_owned();
                }
                url = next.into();
            } else if response.status() == StatusCode::OK && body.contains("<form") {
                let (action, mut fields) = parse_form(&body);
                if fields.iter().any(|(k, _)| k == "login") || body.contains("name=\"login\"") {
                    fields.retain(|(k, _)| k != "login" && k != "password");
                    fields.push(("login".into(), login.into()));
                    fields.push(("password".into(), "any".into()));
                }
                form = Some(
                    url::form_urlencoded::Serializer::new(String::new())
                        .extend_pairs(fields)
                        .finish(),
                );
                url = url::Url::parse(&url)
                    .expect("base")
                    .join(&action)
                    .expect("action")
                    .into();
            } else {
                panic!(
                    "unexpected provider response {} at {url}: {body}",
                    response.status()
                );
            }
        }
        panic!("the provider never redirected back to the gateway");
    }
}

/// The form's action and its hidden inputs (enough for oidc-provider's dev interactions).
fn parse_form(html: &str) -> (String, Vec<(String, String)>) {
    fn attr(tag: &str, name: &str) -> Option<String> {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        let end = tag[start..].find('"')? + start;
        Some(tag[start..end].replace("&amp;", "&"))
    }
    let form_start = html.find("<form").expect("form");
    let form_tag =
        &html[form_start..form_start + html[form_start..].find('>').expect("form tag end")];
    let action = attr(form_tag, "action").expect("form action");
    let mut fields = Vec::new();
    let mut rest = &html[form_start..];
    while let Some(i) = rest.find("<input") {
        let tag = &rest[i..i + rest[i..].find('>').expect("input end")];
        if tag.contains("type=\"hidden\"")
            && let (Some(n), Some(v)) = (attr(tag, "name"), attr(tag, "value"))
        {
            fields.push((n, v));
        }
        rest = &rest[i + tag.len()..];
    }
    (action, fields)
}

const HTML: &str = "text/html,application/xhtml+xml,*/*;q=0.8";

fn now() -> SystemTime {
    SystemTime::now()
}

fn location(response: &Response) -> String {
    response.headers()[LOCATION]
        .to_str()
        .expect("Location")
        .to_owned()
}

/// An unauthenticated page view: the gateway's challenge, which must be a login redirect.
async fn start_login(flow: &LoginFlow, browser: &mut Browser, path: &str) -> String {
    let request = browser.request(Method::GET, path, HTML);
    let response = flow
        .challenge(&RequestCtx::new(&request, browser.tls), now())
        .await
        .expect("challenge");
    assert_eq!(response.status(), StatusCode::FOUND);
    browser
        .gw
        .store(response.headers().get_all(SET_COOKIE).iter());
    location(&response)
}

/// The callback request as the browser sends it.
async fn callback(
    flow: &LoginFlow,
    browser: &mut Browser,
    callback_path: &str,
    at: SystemTime,
) -> Result<(SessionIdentity, Response), LoginError> {
    let request = browser.request(Method::GET, callback_path, HTML);
    let result = flow
        .callback(&RequestCtx::new(&request, browser.tls), at)
        .await;
    if let Ok((_, response)) = &result {
        browser
            .gw
            .store(response.headers().get_all(SET_COOKIE).iter());
    }
    result
}

/// A whole login: page view, provider, callback. Returns the identity and the redirect target.
async fn login(
    flow: &LoginFlow,
    browser: &mut Browser,
    path: &str,
    user: &str,
) -> (SessionIdentity, String) {
    let authorize = start_login(flow, browser, path).await;
    let cb = browser.sign_in_at_provider(&authorize, user).await;
    let (identity, response) = callback(flow, browser, &cb, now()).await.expect("callback");
    assert_eq!(response.status(), StatusCode::FOUND);
    (identity, location(&response))
}

async fn authenticate(
    flow: &LoginFlow,
    browser: &Browser,
    at: SystemTime,
) -> Result<Option<super::session::Authenticated>, SessionError> {
    let request = browser.request(Method::GET, "/app", HTML);
    flow.authenticate(&RequestCtx::new(&request, browser.tls), at)
        .await
}

fn query_param(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url)
        .expect("URL")
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn with_param(path_and_query: &str, name: &str, value: &str) -> String {
    let mut url = url::Url::parse(&format!("http://x{path_and_query}")).expect("URL");
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            if k == name {
                (k.into_owned(), value.to_owned())
            } else {
                (k.into_owned(), v.into_owned())
            }
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url[url::Position::BeforePath..].to_owned()
}

#[tokio::test]
async fn browser_login_end_to_end() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(HOST_NAME, false);

    let authorize = start_login(&flow, &mut browser, "/app/page?x=1").await;
    assert!(
        authorize.starts_with(&format!("{}/auth?", idp.issuer)),
        "{authorize}"
    );
    assert_eq!(
        query_param(&authorize, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(
        query_param(&authorize, "response_type").as_deref(),
        Some("code")
    );
    assert_eq!(
        query_param(&authorize, "redirect_uri").as_deref(),
        Some(format!("http://{HOST_NAME}{CALLBACK}").as_str())
    );
    assert_eq!(
        query_param(&authorize, "scope").as_deref(),
        Some("openid email profile")
    );
    for p in ["state", "nonce", "code_challenge"] {
        assert!(
            query_param(&authorize, p).is_some_and(|v| v.len() >= 43),
            "{p}"
        );
    }
    let flow_cookie = browser
        .gw
        .cookies
        .iter()
        .find(|(n, _, _)| n.starts_with("_nodegate_flow_"))
        .cloned()
        .expect("flow cookie");
    assert_eq!(
        flow_cookie.2, CALLBACK,
        "the flow cookie is sent to the callback only"
    );

    let cb = browser.sign_in_at_provider(&authorize, "alice").await;
    let (identity, response) = callback(&flow, &mut browser, &cb, now())
        .await
        .expect("callback");
    assert_eq!(response.status(), StatusCode::FOUND);
    assert_eq!(location(&response), "/app/page?x=1");
    assert_eq!(identity.subject, "alice");
    assert_eq!(identity.email.as_deref(), Some("alice@example.test"));
    assert_eq!(identity.email_verified, Some(true));
    assert_eq!(identity.groups, ["devs", "admins"]);
    assert_eq!(identity.issuer, idp.issuer);
    assert_eq!(identity.name.as_deref(), Some("alice"));

    let set_cookies: Vec<&str> = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    let session_cookie = set_cookies
        .iter()
        .find(|c| c.starts_with("_nodegate="))
        .expect("session cookie");
    assert!(
        session_cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax; Max-Age=600"),
        "{session_cookie}"
    );
    assert!(
        set_cookies
            .iter()
            .any(|c| c.starts_with(&format!("{}=;", flow_cookie.0)) && c.contains("Max-Age=0")),
        "the flow cookie is deleted: {set_cookies:?}"
    );
    assert!(browser.gw.get(&flow_cookie.0).is_none());

    // The session cookie now authenticates requests, with the same identity.
    let authenticated = authenticate(&flow, &browser, now())
        .await
        .expect("valid")
        .expect("session");
    assert_eq!(authenticated.identity, identity);
    assert!(authenticated.set_cookie.is_none());

    // The gateway's cookies never reach the upstream.
    let mut headers = http::HeaderMap::new();
    headers.insert(
        COOKIE,
        HeaderValue::from_str(&format!(
            "app=1; _nodegate={}; other=2",
            browser.gw.get("_nodegate").unwrap()
        ))
        .unwrap(),
    );
    flow.strip_cookies(&mut headers);
    assert_eq!(headers[COOKIE], "app=1; other=2");

    // Another gateway instance (node, restart) with the same cookie secret accepts the session.
    let other_node = idp.flow("");
    let request = browser.request(Method::GET, "/app", HTML);
    let on_other = other_node
        .authenticate(&RequestCtx::new(&request, false), now())
        .await
        .expect("valid")
        .expect("session");
    assert_eq!(on_other.identity.subject, "alice");
}

#[tokio::test]
async fn cookies_are_secure_over_tls() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(HOST_NAME, true);
    let authorize = start_login(&flow, &mut browser, "/").await;
    assert_eq!(
        query_param(&authorize, "redirect_uri").as_deref(),
        Some(format!("https://{HOST_NAME}{CALLBACK}").as_str())
    );
    let cb = browser.sign_in_at_provider(&authorize, "bob").await;
    let (identity, response) = callback(&flow, &mut browser, &cb, now())
        .await
        .expect("callback");
    assert_eq!(identity.groups, ["devs"]);
    for c in response.headers().get_all(SET_COOKIE) {
        assert!(c.to_str().unwrap().ends_with("; Secure"), "{c:?}");
    }
}

#[tokio::test]
async fn tampered_cookie_is_session_invalid() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(HOST_NAME, false);
    login(&flow, &mut browser, "/", "alice").await;
    let good = browser.gw.get("_nodegate").unwrap().to_owned();

    let mut tampered = good.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let flow_cookie_sealed = {
        // A flow cookie sealed by the same gateway must not pass as a session.
        let mut b = Browser::new(HOST_NAME, false);
        start_login(&flow, &mut b, "/").await;
        b.gw.cookies
            .iter()
            .find(|(n, _, _)| n.starts_with("_nodegate_flow_"))
            .unwrap()
            .1
            .clone()
    };
    let garbage = [
        String::from_utf8(tampered).unwrap(),
        good[..good.len() - 4].to_owned(),
        format!("{good}AAAA"),
        "x".repeat(5000),
        String::new(),
        "%00%ff".into(),
        flow_cookie_sealed,
    ];
    for value in garbage {
        browser.gw.cookies.retain(|(n, _, _)| n != "_nodegate");
        browser
            .gw
            .cookies
            .push(("_nodegate".into(), value.clone(), "/".into()));
        let err = authenticate(&flow, &browser, now())
            .await
            .expect_err("must be refused");
        assert_eq!(err.reason(), "session_invalid", "{value:.40}");
    }
}

#[tokio::test]
async fn cookie_replayed_after_logout_is_revoked() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(HOST_NAME, false);
    let (identity, _) = login(&flow, &mut browser, "/", "alice").await;
    let stolen = browser.clone_gw();
    let session = flow
        .sessions()
        .peek(browser.request(Method::GET, "/", HTML).headers())
        .expect("session");

    let request = browser.request(Method::GET, "/.nodegate/logout", HTML);
    let handled = flow
        .handle(&RequestCtx::new(&request, false), now())
        .await
        .expect("reserved")
        .expect("logout");
    match &handled.event {
        LoginEvent::LoggedOut(Some(who)) => assert_eq!(who.session_id, identity.session_id),
        other => panic!("unexpected event {other:?}"),
    }
    assert_eq!(handled.response.status(), StatusCode::OK);
    assert_eq!(
        handled.response.headers()[SET_COOKIE],
        "_nodegate=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"
    );
    browser
        .gw
        .store(handled.response.headers().get_all(SET_COOKIE).iter());
    assert!(
        authenticate(&flow, &browser, now())
            .await
            .unwrap()
            .is_none(),
        "the browser forgot it"
    );

    // A copy of the cookie taken before the sign-out is refused.
    let err = authenticate(&flow, &stolen, now())
        .await
        .expect_err("replay must be refused");
    assert_eq!(err.reason(), "session_revoked");
    assert!(matches!(err, SessionError::Revoked(id) if id == identity.session_id));
    // And the refresh token was revoked at the provider: it cannot mint a new session either.
    let refreshed = flow.refresh(&session, now()).await;
    assert!(
        matches!(refreshed, Err(RefreshError::Rejected(_))),
        "{refreshed:?}"
    );

    // Signing in again works and gives a new session.
    let (again, _) = login(&flow, &mut browser, "/", "alice").await;
    assert_ne!(again.session_id, identity.session_id);
}

impl Browser {
    fn clone_gw(&self) -> Browser {
        let mut b = Browser::new(&self.host, self.tls);
        b.gw = self.gw.clone();
        b
    }
}

#[tokio::test]
async fn callback_state_checks() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(HOST_NAME, false);
    let authorize = start_login(&flow, &mut browser, "/").await;
    let cb = browser.sign_in_at_provider(&authorize, "alice").await;
    let state = query_param(&format!("http://x{cb}"), "state").unwrap();

    // Same flow cookie, altered state (last characters, so the flow cookie is still found).
    let mut wrong = state.clone();
    wrong.replace_range(40.., "xyz");
    let err = callback(
        &flow,
        &mut browser,
        &with_param(&cb, "state", &wrong),
        now(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "login_state_mismatch", "{err}");
    // A state that names no flow of this browser.
    let err = callback(
        &flow,
        &mut browser,
        &with_param(&cb, "state", &"Z".repeat(43)),
        now(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "login_state_mismatch", "{err}");
    // A browser with no login in progress (login CSRF: the attacker's callback URL).
    let mut victim = Browser::new(HOST_NAME, false);
    let err = callback(&flow, &mut victim, &cb, now()).await.unwrap_err();
    assert_eq!(err.reason(), "login_flow_missing", "{err}");
    // Malformed callbacks.
    let err = callback(&flow, &mut browser, &format!("{cb}&state=again"), now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "login_callback_invalid", "{err}");
    let err = callback(
        &flow,
        &mut browser,
        &format!("{CALLBACK}?state={state}"),
        now(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "login_callback_invalid", "{err}");
    let err = callback(
        &flow,
        &mut browser,
        &format!("{CALLBACK}?error=access_denied&error_description=no%0d%0a&state={state}"),
        now(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "login_provider_error", "{err}");
    assert_eq!(
        err.to_string(),
        "the identity provider returned an error: access_denied (no??)"
    );
    // Mix-up defence: the response names another issuer.
    let err = callback(
        &flow,
        &mut browser,
        &with_param(&cb, "iss", "https://evil.example"),
        now(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "login_issuer_mismatch", "{err}");
    // Too late.
    let err = callback(&flow, &mut browser, &cb, now() + Duration::from_secs(601))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "login_flow_expired", "{err}");
    // A tampered flow cookie.
    let name = browser
        .gw
        .cookies
        .iter()
        .find(|(n, _, _)| n.starts_with("_nodegate_flow_"))
        .unwrap()
        .0
        .clone();
    let mut tampered = browser.clone_gw();
    for c in &mut tampered.gw.cookies {
        if c.0 == name {
            c.1.replace_range(10..12, "AA");
        }
    }
    let err = callback(&flow, &mut tampered, &cb, now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "login_flow_invalid", "{err}");
    // None of the failures above used the flow up: the genuine callback still completes.
    let (identity, _) = callback(&flow, &mut browser, &cb, now())
        .await
        .expect("genuine callback");
    assert_eq!(identity.subject, "alice");
}

#[tokio::test]
async fn flow_cookie_is_single_use() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(HOST_NAME, false);
    let authorize = start_login(&flow, &mut browser, "/").await;
    let cb = browser.sign_in_at_provider(&authorize, "alice").await;
    let before = browser.clone_gw();
    callback(&flow, &mut browser, &cb, now())
        .await
        .expect("first use");
    // The same callback URL with the same flow cookie (captured before it was deleted).
    let mut replay = before.clone_gw();
    let err = callback(&flow, &mut replay, &cb, now()).await.unwrap_err();
    assert_eq!(err.reason(), "login_flow_replayed", "{err}");
}

#[tokio::test]
async fn open_redirect_attempts_land_on_root() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let attempts = [
        "//evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "http://evil.example",
        "https://evil.example/x",
        "https:evil.example",
        "/%2f%2fevil.example",
        "/%5cevil.example",
        "javascript:alert(1)",
        "/%0d%0aLocation:%20http://evil.example",
    ];
    for rd in attempts {
        let mut browser = Browser::new(HOST_NAME, false);
        let path = format!(
            "/.nodegate/login?rd={}",
            url::form_urlencoded::byte_serialize(rd.as_bytes()).collect::<String>()
        );
        let request = browser.request(Method::GET, &path, HTML);
        let handled = flow
            .handle(&RequestCtx::new(&request, false), now())
            .await
            .expect("reserved")
            .expect("login start");
        assert!(matches!(handled.event, LoginEvent::Started));
        browser
            .gw
            .store(handled.response.headers().get_all(SET_COOKIE).iter());
        let cb = browser
            .sign_in_at_provider(&location(&handled.response), "alice")
            .await;
        let (_, response) = callback(&flow, &mut browser, &cb, now())
            .await
            .expect("callback");
        assert_eq!(location(&response), "/", "rd={rd:?}");
    }
    // The path of the request that needed a login is sanitized too.
    let mut browser = Browser::new(HOST_NAME, false);
    let (_, back_to) = login(&flow, &mut browser, "//evil.example/x", "alice").await;
    assert_eq!(back_to, "/");
    // A safe rd is honoured.
    let mut browser = Browser::new(HOST_NAME, false);
    let request = browser.request(Method::GET, "/.nodegate/login?rd=%2Fdash%3Ftab%3D2", HTML);
    let handled = flow
        .handle(&RequestCtx::new(&request, false), now())
        .await
        .unwrap()
        .unwrap();
    browser
        .gw
        .store(handled.response.headers().get_all(SET_COOKIE).iter());
    let cb = browser
        .sign_in_at_provider(&location(&handled.response), "alice")
        .await;
    let (_, response) = callback(&flow, &mut browser, &cb, now()).await.unwrap();
    assert_eq!(location(&response), "/dash?tab=2");
}

#[tokio::test]
async fn refresh_before_expiry_yields_new_expiry() {
    let idp = Idp::start().await;
    let flow = std::sync::Arc::new(idp.flow(""));
    let mut browser = Browser::new(HOST_NAME, false);
    let t0 = now();
    let (identity, _) = login(&flow, &mut browser, "/", "alice").await;
    let first_expiry = identity.expires_at;
    let original = flow
        .sessions()
        .peek(browser.request(Method::GET, "/", HTML).headers())
        .expect("session");

    // Outside the refresh window: nothing happens.
    let a = authenticate(&flow, &browser, t0 + Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert!(a.set_cookie.is_none());
    assert_eq!(a.identity.expires_at, first_expiry);

    // Inside the window (120 s before expiry), many requests at once: one refresh at the
    // provider, which rotates refresh tokens and would refuse a second use of the old one.
    let at = first_expiry - Duration::from_secs(60);
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (flow, request) = (
            std::sync::Arc::clone(&flow),
            browser.request(Method::GET, "/app", HTML),
        );
        tasks.push(tokio::spawn(async move {
            flow.authenticate(&RequestCtx::new(&request, false), at)
                .await
        }));
    }
    let mut renewed_cookie = None;
    for task in tasks {
        let a = task.await.unwrap().expect("refreshed").expect("session");
        assert_eq!(a.identity.expires_at, at + Duration::from_secs(600));
        assert!(a.identity.expires_at > first_expiry);
        assert_eq!(a.identity.session_id, identity.session_id);
        assert_eq!(a.identity.groups, ["devs", "admins"]);
        renewed_cookie = a.set_cookie;
    }
    let renewed_cookie = renewed_cookie.expect("a renewed cookie");
    assert!(renewed_cookie.to_str().unwrap().contains("Max-Age=600"));
    // A late request still carrying the old cookie gets the same renewal, not a second refresh.
    let late = authenticate(&flow, &browser, at + Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(late.identity.expires_at, at + Duration::from_secs(600));

    // The renewed cookie works, and in its own window refreshes again with the rotated token.
    browser.gw.store(std::iter::once(&renewed_cookie));
    let second_expiry = at + Duration::from_secs(600);
    let b = authenticate(&flow, &browser, at + Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert!(b.set_cookie.is_none());
    let at2 = second_expiry - Duration::from_secs(30);
    let c = authenticate(&flow, &browser, at2).await.unwrap().unwrap();
    assert_eq!(c.identity.expires_at, at2 + Duration::from_secs(600));
    assert!(c.set_cookie.is_some());
    // Which matters: the provider rotated the refresh token, so a second refresh with the
    // original one is refused (and would have ended the session).
    let reused = flow.refresh(&original, at2).await;
    assert!(
        matches!(reused, Err(RefreshError::Rejected(ref why)) if why.contains("invalid_grant")),
        "{reused:?}"
    );

    // Past expiry, an unrefreshed cookie is refused.
    let mut stale = Browser::new(HOST_NAME, false);
    stale.gw = browser.gw.clone();
    let err = authenticate(&flow, &stale, second_expiry + Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "session_expired");
}

#[tokio::test]
async fn unauthenticated_requests_are_challenged() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let browser = Browser::new(HOST_NAME, false);
    for (method, accept) in [
        (Method::GET, "application/json"),
        (Method::GET, "*/*"),
        (Method::POST, HTML),
        (Method::GET, "text/html;q=0"),
    ] {
        let request = browser.request(method.clone(), "/api", accept);
        let response = flow
            .challenge(&RequestCtx::new(&request, false), now())
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {accept}"
        );
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"nodegate\""
        );
    }
    let request = browser.request(Method::GET, "/page", HTML);
    let response = flow
        .challenge(&RequestCtx::new(&request, false), now())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);
    assert!(location(&response).starts_with(&idp.issuer));

    // A host that is not configured for login is refused before anything is sent anywhere.
    let evil = Browser::new("evil.example", false);
    let request = evil.request(Method::GET, "/page", HTML);
    let err = flow
        .challenge(&RequestCtx::new(&request, false), now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "login_host_not_allowed");
    assert_eq!(err.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn nonce_in_the_id_token_must_match() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(HOST_NAME, false);
    let authorize = start_login(&flow, &mut browser, "/").await;
    // The browser (or whoever rewrote the URL) asks the provider for another nonce; the
    // provider echoes it in the ID token, which must then be refused.
    let mut url = url::Url::parse(&authorize).unwrap();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            (
                k.to_string(),
                if k == "nonce" {
                    "attacker-nonce".to_owned()
                } else {
                    v.to_string()
                },
            )
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    let cb = browser.sign_in_at_provider(url.as_str(), "alice").await;
    let err = callback(&flow, &mut browser, &cb, now()).await.unwrap_err();
    assert_eq!(err.reason(), "login_id_token_invalid", "{err}");
    assert!(err.to_string().contains("nonce"), "{err}");
}

#[tokio::test]
async fn code_from_another_login_fails_pkce() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    // The victim starts a login; the attacker completes their own and plants their code in
    // the victim's callback (authorization code injection).
    let mut victim = Browser::new(HOST_NAME, false);
    let victim_authorize = start_login(&flow, &mut victim, "/").await;
    let victim_state = query_param(&victim_authorize, "state").unwrap();
    let mut attacker = Browser::new(HOST_NAME, false);
    let attacker_authorize = start_login(&flow, &mut attacker, "/").await;
    let attacker_cb = attacker
        .sign_in_at_provider(&attacker_authorize, "mallory")
        .await;
    let injected = with_param(&attacker_cb, "state", &victim_state);
    let err = callback(&flow, &mut victim, &injected, now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "login_code_exchange_failed", "{err}");
    assert!(err.to_string().contains("invalid_grant"), "{err}");
}

#[tokio::test]
async fn callback_must_come_to_the_host_that_started() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(ALT_HOST, false);
    let authorize = start_login(&flow, &mut browser, "/").await;
    assert_eq!(
        query_param(&authorize, "redirect_uri").as_deref(),
        Some(format!("http://{ALT_HOST}{CALLBACK}").as_str())
    );
    let cb = browser.sign_in_at_provider(&authorize, "alice").await;
    // Same browser cookies presented on the other allowed host.
    let mut moved = Browser::new(HOST_NAME, false);
    moved.gw = browser.gw.clone();
    let err = callback(&flow, &mut moved, &cb, now()).await.unwrap_err();
    assert_eq!(err.reason(), "login_host_mismatch", "{err}");
    let (identity, _) = callback(&flow, &mut browser, &cb, now())
        .await
        .expect("right host");
    assert_eq!(identity.subject, "alice");
}

#[tokio::test]
async fn a_session_too_large_for_a_cookie_is_refused_clearly() {
    let idp = Idp::start().await;
    let flow = idp.flow("");
    let mut browser = Browser::new(HOST_NAME, false);
    let authorize = start_login(&flow, &mut browser, "/").await;
    let cb = browser.sign_in_at_provider(&authorize, "huge").await;
    let err = callback(&flow, &mut browser, &cb, now()).await.unwrap_err();
    assert_eq!(err.reason(), "login_session_too_large", "{err}");
    assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(err.to_string().contains("\"huge\""), "{err}");
}

#[tokio::test]
async fn unreachable_provider_is_reported() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = format!(
        "issuer: http://127.0.0.1:{port}\nclient_id: gateway\nclient_secret: x\n\
         allow_http_issuer: true\nhosts: [{HOST_NAME}]\nhttp_timeout_ms: 2000\n"
    );
    let settings =
        LoginSettings::from_config(serde_yaml::from_str(&yaml).unwrap(), Path::new("/")).unwrap();
    let flow = LoginFlow::new(settings).unwrap();
    let browser = Browser::new(HOST_NAME, false);
    let request = browser.request(Method::GET, "/", HTML);
    let err = flow
        .challenge(&RequestCtx::new(&request, false), now())
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "login_provider_unavailable", "{err}");
    assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}
