//! TLS and mTLS end to end on a simulated node: curl (and `openssl s_client`) in pod `a` dial
//! service VIPs on :443; the kernel redirects them to the gateway, which terminates TLS with the
//! service's certificate (SNI picks the service), verifies client certificates, applies the
//! policy (`spiffe_id`) and talks plain HTTP or verified TLS to the backends. Certificates come
//! from rcgen: a server CA, a client CA (SPIFFE IDs, an expired one) and another CA.
//!
//! Pods: `a` client; `b`, `c` ngpeer HTTP backends; `d` `openssl s_server` on :8443 (certificate
//! from the server CA) and :9443 (another CA); `e` `openssl s_server` behind a service without a
//! certificate (pass-through).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nodegate_tests::harness::{
    Gateway, HttpReply, HttpRequest, Mode, Node, Place, Proc, ServiceConfig,
};
use serde_json::{Value, json};

use common::{
    LOG_TIMEOUT, node,
    pki::{Ca, dns, uri, write},
    s, start,
};

const API: &str = "api.nodegate.test";
const WEB: &str = "web.nodegate.test";
const SECURE: &str = "secure.nodegate.test";
const ROGUE: &str = "rogue.nodegate.test";
const PASS: &str = "pass.nodegate.test";
const BACKEND: &str = "backend.nodegate.test";
const ALLOWED: &str = "spiffe://cluster.test/ns/shop/sa/checkout";
const OTHER: &str = "spiffe://cluster.test/ns/shop/sa/cart";
/// The serial number of the client certificate `clients.crl` revokes.
const REVOKED_SERIAL: u64 = 0x0bad_cafe;

/// The scenario: a node, its certificates (in `pki`), the backends and the gateway.
struct Tls {
    node: Node,
    gw: Gateway,
    pki: PathBuf,
    server_ca: Ca,
    _backends: Vec<Proc>,
}

/// The policy of every terminated service: the checkout workload by SPIFFE ID, or `/public`.
fn policy() -> Value {
    json!({"allow": [
        {"id": "checkout", "when": {"spiffe_id": ALLOWED}},
        {"id": "public", "when": {"path": {"prefix": "/public"}}},
    ]})
}

/// `openssl s_server -www` (answers any GET with a status page) on `port` in `place`.
fn s_server(place: &Place, port: u16, cert: &Path, key: &Path) -> Proc {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_server",
        "-quiet",
        "-www",
        "-accept",
        &port.to_string(),
        "-cert",
    ])
    .arg(cert)
    .arg("-key")
    .arg(key);
    place
        .spawn(&format!("s_server-{port}"), cmd)
        .unwrap_or_else(|e| panic!("openssl s_server in {}: {e}", place.name))
}

impl Tls {
    fn start(name: &str) -> Self {
        let node = node(name, &["a", "b", "c", "d", "e"]);
        let pki = node.dir().join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        let server_ca = Ca::new("Nodegate Test Server CA");
        let client_ca = Ca::new("Nodegate Test Client CA");
        let other_ca = Ca::new("Some Other CA");
        write(&pki.join("ca.pem"), &server_ca.pem);
        write(&pki.join("clients-ca.pem"), &client_ca.pem);
        for (file, host) in [
            ("api", API),
            ("web", WEB),
            ("secure", SECURE),
            ("rogue", ROGUE),
        ] {
            server_ca.leaf(&pki, file, host, vec![dns(host)], false, false);
        }
        server_ca.leaf(&pki, "backend", BACKEND, vec![dns(BACKEND)], false, false);
        other_ca.leaf(&pki, "impostor", BACKEND, vec![dns(BACKEND)], false, false);
        other_ca.leaf(&pki, "pass", PASS, vec![dns(PASS)], false, false);
        client_ca.leaf(
            &pki,
            "checkout",
            "checkout",
            vec![uri(ALLOWED)],
            true,
            false,
        );
        client_ca.leaf(&pki, "cart", "cart", vec![uri(OTHER)], true, false);
        revoked_client(&client_ca, &pki);
        client_ca.leaf(&pki, "expired", "checkout", vec![uri(ALLOWED)], true, true);
        other_ca.leaf(&pki, "foreign", "checkout", vec![uri(ALLOWED)], true, false);

        let f = |n: &str| pki.join(n);
        let mut backends = vec![
            node.pod("b").serve(8080, "b").expect("ngpeer in b"),
            node.pod("c").serve(8080, "c").expect("ngpeer in c"),
        ];
        let d = node.pod("d");
        backends.push(s_server(d, 8443, &f("backend.crt"), &f("backend.key")));
        backends.push(s_server(d, 9443, &f("impostor.crt"), &f("impostor.key")));
        backends.push(s_server(
            node.pod("e"),
            8443,
            &f("pass.crt"),
            &f("pass.key"),
        ));

        let service = |name: &str, host: u8, endpoint, http_host: &str| {
            ServiceConfig::new(name, Mode::Enforce)
                .vip(node.vip_v4(host, 443))
                .endpoint(endpoint)
                .allow(&node.cidr_v4())
                .http(json!({"hosts": [http_host]}))
                .policy(policy())
        };
        // The TLS tests also cover the proxy's single-threaded runtime (`proxy.threads: 1`, what
        // a gateway limited to one CPU runs); the other end-to-end tests run one worker per CPU.
        let config = node
            .gateway_config()
            .proxy_threads(1)
            .service(service("api", 20, node.pod("b").v4(8080), API))
            .service(service("web", 21, node.pod("c").v4(8080), WEB))
            .service(service("secure", 22, d.v4(8443), SECURE))
            .service(service("rogue", 23, d.v4(9443), ROGUE))
            .service(service("pass", 24, node.pod("e").v4(8443), PASS));
        let p = |n: &str| f(n).display().to_string();
        let tls = |name: &str| json!({"cert_file": p(&format!("{name}.crt")), "key_file": p(&format!("{name}.key"))});
        let mut api_tls = tls("api");
        api_tls["client_ca_file"] = json!(p("clients-ca.pem"));
        api_tls["client_cert"] = json!("optional");
        api_tls["client_crl_file"] = json!(p("clients.crl"));
        let upstream = json!({"ca_file": p("ca.pem"), "server_name": BACKEND});
        let mut yaml = config.to_yaml();
        for (service, extra) in [
            ("api", format!("tls: {api_tls}")),
            ("web", format!("tls: {}", tls("web"))),
            (
                "secure",
                format!("tls: {}, upstream_tls: {upstream}", tls("secure")),
            ),
            (
                "rogue",
                format!("tls: {}, upstream_tls: {upstream}", tls("rogue")),
            ),
        ] {
            yaml = with_service_keys(&yaml, service, &extra);
        }
        // The harness writes services without `tls:`; start with that, then the full file.
        let mut gw = start(&node, config);
        gw.write_config_text(&yaml).expect("write the TLS config");
        gw.restart()
            .unwrap_or_else(|e| panic!("gateway with TLS: {e}\n{yaml}\n{}", gw.stderr()));
        Self {
            node,
            gw,
            pki,
            server_ca,
            _backends: backends,
        }
    }

    fn file(&self, name: &str) -> String {
        self.pki.join(name).display().to_string()
    }

    /// `GET https://<host><path>` from pod `a`, resolved to the VIP of `via` (`10.96.N.<via>`),
    /// trusting the server CA; `client`: a client certificate's file name (without extension).
    fn get(&self, host: &str, via: u8, path: &str, client: Option<&str>) -> HttpReply {
        let vip = self.node.vip_v4(via, 443);
        let resolve = format!("{host}:443:{}", vip.ip());
        let ca = self.file("ca.pem");
        let mut args = vec!["--cacert", &ca, "--resolve", &resolve];
        let (cert, key) = client.map_or_else(Default::default, |c| {
            (
                self.file(&format!("{c}.crt")),
                self.file(&format!("{c}.key")),
            )
        });
        if client.is_some() {
            args.extend(["--cert", &cert, "--key", &key]);
        }
        let request = HttpRequest::get(&format!("https://{host}{path}")).curl_args(&args);
        self.node
            .pod("a")
            .http(&request)
            .unwrap_or_else(|e| panic!("curl https://{host}{path}: {e}"))
    }

    /// The decision line of `kind` for the connection `reply` came over.
    fn line(&self, reply: &HttpReply, kind: &str) -> Value {
        let src = reply
            .local
            .unwrap_or_else(|| panic!("no connection was made: {reply:?}"));
        self.gw
            .wait_decision(&format!("{kind} from {src}"), LOG_TIMEOUT, |d| {
                s(d, "kind") == kind && s(d, "src") == src.to_string()
            })
            .unwrap_or_else(|e| panic!("{e}; reply {reply:?}\n{}", self.gw.stderr()))
    }

    /// The gateway's threads named `ng-proxy` (`/proc/PID/task/*/comm`).
    fn proxy_threads(&self) -> usize {
        let tasks = format!("/proc/{}/task", self.gw.pid());
        std::fs::read_dir(&tasks)
            .unwrap_or_else(|e| panic!("{tasks}: {e}"))
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == "ng-proxy")
            .count()
    }
}

/// `revoked.crt`/`.key`: a certificate of the client CA with everything right, and
/// `clients.crl`, the CA's list that revokes it.
fn revoked_client(client_ca: &Ca, pki: &Path) {
    client_ca.numbered_leaf(
        pki,
        "revoked",
        "checkout",
        vec![uri(ALLOWED)],
        true,
        false,
        Some(REVOKED_SERIAL),
    );
    client_ca.crl(&pki.join("clients.crl"), &[REVOKED_SERIAL]);
}

/// Adds `extra` (`key: value, ...`) to the flow map of service `name` in the harness's YAML.
fn with_service_keys(yaml: &str, name: &str, extra: &str) -> String {
    let marker = format!("  - {{ name: \"{name}\",");
    yaml.lines()
        .map(|line| match line.strip_suffix(" }") {
            Some(head) if line.starts_with(&marker) => format!("{head}, {extra} }}"),
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[track_caller]
fn assert_request(line: &Value, service: &str, decision: &str, reason: &str) {
    assert_eq!(s(line, "service"), service, "{line}");
    assert_eq!(s(line, "decision"), decision, "{line}");
    assert_eq!(s(line, "reason"), reason, "{line}");
}

#[test]
fn sni_chooses_between_two_services_on_one_address() {
    let t = Tls::start("tlssni");
    // api's own name on api's VIP: api's certificate (curl verifies it), its backend b.
    let reply = t.get(API, 20, "/public/x", None);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body.trim(), "hello from b", "{reply:?}");
    let line = t.line(&reply, "request");
    assert_request(&line, "api", "allow", "allowed_by_rule");
    assert_eq!(line["tls"]["sni"], API, "{line}");
    assert_eq!(s(&line, "protocol"), "h2", "ALPN h2: {line}");

    // web's name on api's VIP: web's certificate, policy and backend c.
    let reply = t.get(WEB, 20, "/public/x", None);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body.trim(), "hello from c", "{reply:?}");
    let line = t.line(&reply, "request");
    assert_request(&line, "web", "allow", "allowed_by_rule");
    assert_eq!(line["tls"]["sni"], WEB, "{line}");

    // Plain HTTP on the TLS port (curl in pod a): nginx's 400, and nothing reaches b.
    let vip = t.node.vip_v4(20, 443);
    let request = HttpRequest::get(&format!("http://{API}:443/public/x"))
        .curl_args(&["--resolve", &format!("{API}:443:{}", vip.ip())]);
    let reply = t.node.pod("a").http(&request).expect("curl");
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(
        reply
            .body
            .contains("plain HTTP request was sent to an HTTPS port"),
        "{reply:?}"
    );
    let line = t.line(&reply, "connection");
    assert_eq!(s(&line, "decision"), "deny", "{line}");
    assert_eq!(s(&line, "reason"), "plain_http_to_tls", "{line}");
    assert_eq!(s(&line, "service"), "api", "{line}");

    // All of it was served by one proxy thread.
    assert_eq!(t.proxy_threads(), 1, "proxy.threads: 1");

    // A name no service has: api's certificate as the default, which curl refuses for it.
    let reply = t.get("unknown.nodegate.test", 20, "/", None);
    assert_eq!(reply.status, 0, "{reply:?}");
    assert!(
        reply
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("unknown.nodegate.test"),
        "{reply:?}"
    );
}

#[test]
fn client_certificates_allow_by_spiffe_id_and_bad_ones_are_refused() {
    let t = Tls::start("tlsmtls");
    let reply = t.get(API, 20, "/orders", Some("checkout"));
    assert_eq!(reply.status, 200, "{reply:?}");
    let line = t.line(&reply, "request");
    assert_request(&line, "api", "allow", "allowed_by_rule");
    assert_eq!(s(&line, "rule"), "checkout", "{line}");
    assert_eq!(line["tls"]["client_cert"]["spiffe_id"], ALLOWED, "{line}");
    assert_eq!(
        line["tls"]["client_cert"]["subject"], "CN=checkout",
        "{line}"
    );
    // The backend learns who called from the signed assertion, not from anything the client
    // could send.
    let reply = t.get(API, 20, "/headers", Some("checkout"));
    assert_eq!(reply.status, 200, "{reply:?}");
    let echo = reply.json().expect("the backend's /headers echo");
    let assertion = echo["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| {
            h[0].as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case("x-nodegate-assertion"))
        })
        .and_then(|h| h[1].as_str())
        .unwrap_or_else(|| panic!("no assertion reached the backend: {echo}"));
    let (_, claims) = nodegate_tests::harness::oidc::decode_unverified(assertion).expect("a JWT");
    assert_eq!(claims["client_cert"]["spiffe_id"], ALLOWED, "{claims}");
    assert_eq!(claims["client_cert"]["subject"], "CN=checkout", "{claims}");

    // Verified, another SPIFFE ID: an identity policy does not allow (403).
    let reply = t.get(API, 20, "/orders", Some("cart"));
    assert_eq!(reply.status, 403, "{reply:?}");
    let line = t.line(&reply, "request");
    assert_request(&line, "api", "deny", "no_rule_matched");
    assert_eq!(line["tls"]["client_cert"]["spiffe_id"], OTHER, "{line}");

    // No certificate (optional on api): anonymous, 401.
    let reply = t.get(API, 20, "/orders", None);
    assert_eq!(reply.status, 401, "{reply:?}");

    // Expired, or from another CA: the handshake is refused, logged, nothing reaches b.
    for client in ["expired", "foreign"] {
        let reply = t.get(API, 20, "/orders", Some(client));
        assert_eq!(reply.status, 0, "{client}: {reply:?}");
        let line = t.line(&reply, "connection");
        assert_eq!(s(&line, "service"), "api", "{client}: {line}");
        assert_eq!(s(&line, "decision"), "deny", "{client}: {line}");
        assert_eq!(
            s(&line, "reason"),
            "client_cert_invalid",
            "{client}: {line}"
        );
        assert_eq!(s(&line, "sni"), API, "{client}: {line}");
    }

    // Revoked by api's `client_crl_file` (curl's certificate is otherwise valid): refused.
    let reply = t.get(API, 20, "/orders", Some("revoked"));
    assert_eq!(reply.status, 0, "{reply:?}");
    let line = t.line(&reply, "connection");
    assert_eq!(s(&line, "decision"), "deny", "{line}");
    assert_eq!(s(&line, "reason"), "client_cert_revoked", "{line}");
    assert!(s(&line, "detail").contains("Revoked"), "{line}");
}

#[test]
fn backend_tls_is_verified_against_the_configured_ca() {
    let t = Tls::start("tlsup");
    let reply = t.get(SECURE, 22, "/public/", None);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("s_server"), "{reply:?}");
    assert_request(
        &t.line(&reply, "request"),
        "secure",
        "allow",
        "allowed_by_rule",
    );

    // The backend's certificate is from another CA: 502 with the reason, no plaintext retry.
    let reply = t.get(ROGUE, 23, "/public/", None);
    assert_eq!(reply.status, 502, "{reply:?}");
    let line = t.line(&reply, "request");
    assert_request(&line, "rogue", "deny", "upstream_cert_invalid");
}

#[test]
fn tls_for_a_service_without_a_certificate_passes_through_with_its_sni_logged() {
    let t = Tls::start("tlspass");
    let vip = t.node.vip_v4(24, 443);
    // The backend's own certificate (another CA): -k, the gateway does not terminate.
    let request = HttpRequest::get(&format!("https://{PASS}/")).curl_args(&[
        "-k",
        "--resolve",
        &format!("{PASS}:443:{}", vip.ip()),
    ]);
    let reply = t.node.pod("a").http(&request).expect("curl");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains("s_server"), "{reply:?}");
    let line = t.line(&reply, "connection");
    assert_eq!(s(&line, "service"), "pass", "{line}");
    assert_eq!(s(&line, "decision"), "allow", "{line}");
    assert_eq!(s(&line, "sni"), PASS, "{line}");
}

#[test]
fn replaced_certificate_files_apply_to_new_connections_while_open_ones_keep_theirs() {
    let t = Tls::start("tlsrot");
    let vip = t.node.vip_v4(21, 443);
    let ca = t.file("ca.pem");
    // One connection, two requests 6 s apart; the certificate is replaced in between.
    let script = format!(
        "(printf 'GET /public/1 HTTP/1.1\\r\\nHost: {WEB}\\r\\n\\r\\n'; sleep 6; \
         printf 'GET /public/2 HTTP/1.1\\r\\nHost: {WEB}\\r\\nConnection: close\\r\\n\\r\\n') | \
         openssl s_client -connect {vip} -servername {WEB} -CAfile {ca} -alpn http/1.1 -ign_eof"
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    let open = t
        .node
        .pod("a")
        .spawn("s_client-open", cmd)
        .expect("s_client");
    open.wait_for_stdout("hello from c", Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("first response: {e}\n{}", open.stderr()));

    t.server_ca
        .leaf(&t.pki, "web", "web-v2", vec![dns(WEB)], false, false);
    let subject = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("subject="))
            .map(str::to_owned)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("openssl s_client -connect {vip} -servername {WEB} -CAfile {ca} </dev/null"),
        ]);
        let out = t
            .node
            .pod("a")
            .run(cmd, Duration::from_secs(5))
            .expect("s_client");
        if subject(&out.stdout).is_some_and(|s| s.contains("web-v2")) {
            assert!(
                out.stdout.contains("Verify return code: 0"),
                "{}",
                out.stdout
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new connections still get {:?}\n{}",
            subject(&out.stdout),
            t.gw.stderr()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // The connection opened before the swap still has the old certificate and is served.
    assert!(
        open.wait_timeout(Duration::from_secs(10)).is_some(),
        "s_client did not finish"
    );
    let out = open.stdout();
    assert!(
        subject(&out).is_some_and(|s| s.contains(WEB) && !s.contains("web-v2")),
        "{out}"
    );
    assert_eq!(out.matches("hello from c").count(), 2, "{out}");
}
