//! Identity-aware HTTP policy end to end: a client pod's requests to an HTTP service VIP are
//! redirected by the kernel to the gateway, which authenticates the bearer token (tokens of a
//! real `OpenID` Connect provider running in pod `idp`, or minted with its keys), evaluates the
//! service's policy and logs one `request` line per request. Every case asserts the HTTP result
//! and the decision line (decision, reason, rule).

mod common;

use std::time::Duration;

use nodegate_tests::harness::{HttpRequest, Signing, TokenSpec, oidc};
use serde_json::{Value, json};

use common::{
    LOG_TIMEOUT,
    identity::{
        ALT_HOST, API_HOST, Api, CLUSTER_AUDIENCE, CLUSTER_ISSUER, assert_line, assert_status, now,
    },
    s,
};

/// Claims of a token from the provider for `sub`, valid now, as `machine-*` tokens look.
fn machine_claims(api: &Api, sub: &str, groups: &[&str], team: &str) -> Value {
    let now = now();
    json!({
        "iss": api.idp.issuer(),
        "sub": sub,
        "aud": api.idp.audience(),
        "iat": now,
        "exp": now + 600,
        "groups": groups,
        "team": team,
        "client_id": sub,
    })
}

#[test]
fn a_machine_token_is_allowed_by_group_and_claim_and_denied_without_them() {
    let api = Api::start("idmach", |_, c| c);

    let ops = api.machine_token("machine-ops");
    let (reply, line) = api.send(&api.get("/orders").bearer(&ops));
    assert_status(&reply, 200, "machine-ops GET /orders");
    assert_eq!(reply.body, "hello from b");
    assert_line(&line, "allow", "allowed_by_rule", Some("ops-team"));
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(s(&line, "method"), "GET", "{line}");
    assert_eq!(s(&line, "path"), "/orders", "{line}");
    assert_eq!(s(&line, "host"), API_HOST, "{line}");
    assert_eq!(line["identity"]["subject"], "machine-ops", "{line}");
    assert_eq!(line["identity"]["issuer"], api.idp.issuer(), "{line}");
    assert_eq!(
        line["identity"]["groups"],
        json!(["ops", "machines"]),
        "{line}"
    );

    // In the guests group, without the ops group and the payments team: no rule allows it.
    let guest = api.machine_token("machine-guest");
    let (reply, line) = api.send(&api.get("/orders").bearer(&guest));
    assert_status(&reply, 403, "machine-guest GET /orders");
    assert_line(&line, "deny", "no_rule_matched", None);
    assert_eq!(line["status"], 403, "{line}");
    assert_eq!(line["identity"]["subject"], "machine-guest", "{line}");

    // A deny rule wins over the allow rule for guests.
    let (reply, line) = api.send(&api.get("/admin/users").bearer(&guest));
    assert_status(&reply, 403, "machine-guest GET /admin/users");
    assert_line(&line, "deny", "denied_by_rule", Some("no-guests-admin"));

    let (reply, line) = api.send(&api.get("/public/status").bearer(&guest));
    assert_status(&reply, 200, "machine-guest GET /public/status");
    assert_line(&line, "allow", "allowed_by_rule", Some("guests-public"));

    // The group alone is not enough: `ops` in another team (a token the provider never issues,
    // signed with its key).
    let kid = api.idp.current_kid().expect("kid");
    let other_team = api
        .idp
        .mint(&[TokenSpec::rs256(
            &kid,
            machine_claims(&api, "machine-x", &["ops"], "marketing"),
        )])
        .expect("mint");
    let (reply, line) = api.send(&api.get("/orders").bearer(&other_team[0]));
    assert_status(&reply, 403, "ops in team marketing");
    assert_line(&line, "deny", "no_rule_matched", None);

    // No token at all: anonymous, 401.
    let (reply, line) = api.send(&api.get("/orders"));
    assert_status(&reply, 401, "no token");
    assert_line(&line, "deny", "no_rule_matched", None);
    assert_eq!(line["identity"]["kind"], "anonymous", "{line}");

    let reads = api.backend_reads();
    assert!(
        !reads.iter().any(|r| r.contains("/admin")),
        "a denied request reached the backend: {reads:?}"
    );
}

#[test]
fn a_serviceaccount_token_is_a_workload_identity_for_workload_rules() {
    let mut cluster_keys = None;
    let api = Api::start("idsa", |node, config| {
        let private = node.dir().join("cluster.private.json");
        let public = node.dir().join("cluster.jwks.json");
        oidc::genkey("cluster-1", &private, &public).expect("a cluster signing key");
        cluster_keys = Some(private);
        let mut auth = config.auth.clone().expect("auth");
        auth["issuers"]
            .as_array_mut()
            .expect("issuers")
            .push(json!({
                "name": "cluster",
                "issuer": CLUSTER_ISSUER,
                "jwks_file": public,
                "audiences": [CLUSTER_AUDIENCE],
                "kind": "kubernetes",
            }));
        // Pod c runs as shop/checkout: its requests carry that workload without a token.
        let c = node.pod("c");
        config.auth(auth).workload(json!({
            "namespace": "shop",
            "service_account": "checkout",
            "pod": "checkout-static",
            "cgroup": c.cgroup,
        }))
    });
    let keys = cluster_keys.expect("keys");
    let now = now();
    let sa = |ns: &str, name: &str, pod: &str| {
        TokenSpec::rs256(
            "cluster-1",
            json!({
                "iss": CLUSTER_ISSUER,
                "sub": format!("system:serviceaccount:{ns}:{name}"),
                "aud": [CLUSTER_AUDIENCE],
                "iat": now,
                "nbf": now,
                "exp": now + 600,
                "kubernetes.io": {
                    "namespace": ns,
                    "serviceaccount": {"name": name, "uid": "8f1c1a52-5b0c-4d5e-9a1e-3c2b1a0f9e8d"},
                    "pod": {"name": pod, "uid": "0b6b2b9e-6a43-4c3c-8d7e-2f1e0d9c8b7a"},
                },
            }),
        )
    };
    let tokens = oidc::mint(
        &keys,
        &[
            sa("shop", "checkout", "checkout-7d9f-abcde"),
            sa("shop", "cart", "cart-5c6b-fghij"),
        ],
    )
    .expect("mint");

    let (reply, line) = api.send(&api.get("/orders").bearer(&tokens[0]));
    assert_status(&reply, 200, "shop/checkout token");
    assert_line(&line, "allow", "allowed_by_rule", Some("checkout-sa"));
    assert_eq!(line["identity"]["kind"], "workload", "{line}");
    assert_eq!(line["identity"]["issuer"], CLUSTER_ISSUER, "{line}");
    assert_eq!(
        line["workload"],
        json!({"namespace": "shop", "service_account": "checkout", "pod": "checkout-7d9f-abcde", "from": "token"}),
        "{line}"
    );

    let (reply, line) = api.send(&api.get("/orders").bearer(&tokens[1]));
    assert_status(&reply, 403, "shop/cart token");
    assert_line(&line, "deny", "no_rule_matched", None);
    assert_eq!(line["workload"]["service_account"], "cart", "{line}");
    assert_eq!(line["workload"]["from"], "token", "{line}");

    // The static workload of pod c (by cgroup), no token.
    let c = api.node.pod("c");
    let (reply, line) = api.send_from(c, &api.get("/orders"));
    assert_status(&reply, 200, "pod c without a token");
    assert_line(&line, "allow", "allowed_by_rule", Some("checkout-sa"));
    assert_eq!(line["identity"]["kind"], "anonymous", "{line}");
    assert_eq!(
        line["workload"],
        json!({"namespace": "shop", "service_account": "checkout", "pod": "checkout-static", "from": "source"}),
        "{line}"
    );
    assert_eq!(
        line["cgroup_id"].as_u64(),
        Some(c.cgroup_id().expect("cgroup id")),
        "{line}"
    );
}

#[test]
fn after_a_key_rotation_tokens_with_the_new_kid_are_accepted() {
    let api = Api::start("idrot", |_, c| c);
    let before = api.machine_token("machine-ops");
    let (reply, line) = api.send(&api.get("/orders").bearer(&before));
    assert_status(&reply, 200, "token of the first key");
    assert_line(&line, "allow", "allowed_by_rule", Some("ops-team"));
    let old_kid = api.idp.current_kid().expect("kid");

    let new_kid = api.idp.rotate().expect("rotate");
    assert_ne!(new_kid, old_kid);
    let after = api.machine_token("machine-ops");
    let (header, _) = oidc::decode_unverified(&after).expect("JWT");
    assert_eq!(header["kid"], new_kid.as_str(), "{header}");
    // jwks_refresh_min_interval_s is 1: let the start-up fetch age past it.
    std::thread::sleep(Duration::from_millis(1100));
    let (reply, line) = api.send(&api.get("/orders").bearer(&after));
    assert_status(
        &reply,
        200,
        "token of the new key (unknown kid: JWKS refetched)",
    );
    assert_line(&line, "allow", "allowed_by_rule", Some("ops-team"));

    // The old key is still published: its tokens stay valid until they expire.
    let (reply, line) = api.send(&api.get("/orders").bearer(&before));
    assert_status(&reply, 200, "token of the old key after the rotation");
    assert_line(&line, "allow", "allowed_by_rule", Some("ops-team"));
}

#[test]
fn refused_tokens_are_denied_with_their_reason() {
    let api = Api::start("idneg", |_, c| c);
    let kid = api.idp.current_kid().expect("kid");
    let now = now();
    let good = machine_claims(&api, "machine-ops", &["ops"], "payments");
    let with = |patch: Value| {
        let mut claims = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            claims[k] = v.clone();
        }
        claims
    };
    let cases: Vec<(&str, TokenSpec, &str)> = vec![
        (
            "expired an hour ago",
            TokenSpec::rs256(&kid, with(json!({"iat": now - 7200, "exp": now - 3600}))),
            "token_expired",
        ),
        (
            "not valid for another hour",
            TokenSpec::rs256(&kid, with(json!({"nbf": now + 3600}))),
            "token_not_yet_valid",
        ),
        (
            "for another audience",
            TokenSpec::rs256(&kid, with(json!({"aud": "https://other.nodegate.test"}))),
            "token_bad_audience",
        ),
        (
            "from an unknown issuer",
            TokenSpec::rs256(&kid, with(json!({"iss": "http://evil.example"}))),
            "token_bad_issuer",
        ),
        (
            "alg none",
            TokenSpec::rs256(&kid, good.clone())
                .header(json!({"alg": "none", "typ": "JWT"}))
                .signing(Signing::None),
            "token_alg_not_allowed",
        ),
        (
            "HS256 keyed with the issuer's public key",
            TokenSpec::rs256(&kid, good.clone())
                .header(json!({"alg": "HS256", "typ": "JWT", "kid": kid}))
                .signing(Signing::Hs256WithPublicPem),
            "token_alg_not_allowed",
        ),
        (
            "an unknown kid",
            TokenSpec::rs256(&kid, good.clone())
                .header(json!({"alg": "RS256", "typ": "JWT", "kid": "rsa-404"})),
            "token_unknown_kid",
        ),
        (
            "a signature that does not verify",
            TokenSpec::rs256(&kid, good.clone()).signing(Signing::Garbage),
            "token_bad_signature",
        ),
    ];
    let specs: Vec<TokenSpec> = cases.iter().map(|(_, spec, _)| spec.clone()).collect();
    let tokens = api.idp.mint(&specs).expect("mint");
    // The control: the same claims, properly signed, pass.
    let control = api
        .idp
        .mint(&[TokenSpec::rs256(&kid, good.clone())])
        .expect("mint");
    let (reply, line) = api.send(&api.get("/orders").bearer(&control[0]));
    assert_status(&reply, 200, "the control token");
    assert_line(&line, "allow", "allowed_by_rule", Some("ops-team"));

    for ((what, _, reason), token) in cases.iter().zip(&tokens) {
        let (reply, line) = api.send(&api.get("/orders").bearer(token));
        assert_status(&reply, 401, what);
        assert!(
            reply
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{what}: no WWW-Authenticate: Bearer: {reply:?}"
        );
        assert_line(&line, "deny", reason, None);
        assert_eq!(line["status"], 401, "{what}: {line}");
        assert_eq!(line["identity"]["kind"], "anonymous", "{what}: {line}");
    }

    // A real token of the provider, for another resource server.
    let other = api
        .idp
        .client_credentials(api.a(), "machine-ops", Some("https://other.nodegate.test"))
        .expect("token for another audience");
    let (reply, line) = api.send(&api.get("/orders").bearer(&other));
    assert_status(&reply, 401, "a provider token for another audience");
    assert_line(&line, "deny", "token_bad_audience", None);

    assert_eq!(
        api.backend_reads().len(),
        1,
        "only the control request reaches the backend: {:?}",
        api.backend_reads()
    );
}

#[test]
fn ambiguous_paths_are_rejected_before_policy() {
    let api = Api::start("idpath", |_, c| c);
    let guest = api.machine_token("machine-guest");
    // Each one would reach /admin on a backend that normalizes, while a naive prefix match on
    // /public (allowed for guests) would let it through.
    let cases = [
        ("/public/../admin/users", "path_dot_segment"),
        ("/public/%2e%2e/admin/users", "path_dot_segment"),
        ("/public/%2E%2E/admin/users", "path_dot_segment"),
        ("/public%2f..%2fadmin/users", "path_encoded_slash"),
        ("/public/..;/admin/users", "path_semicolon"),
        ("//admin/users", "path_empty_segment"),
        ("/public/%252e%252e/admin/users", "path_double_encoding"),
        ("/public/%5c../admin/users", "path_encoded_backslash"),
        ("/public/users%00/../../admin", "path_nul"),
        ("/admin%00/users", "path_nul"),
    ];
    for (path, reason) in cases {
        let (reply, line) = api.send(&api.get(path).bearer(&guest));
        assert_status(&reply, 400, path);
        assert_line(&line, "deny", reason, None);
        assert_eq!(line["status"], 400, "{path}: {line}");
    }
    let reads = api.backend_reads();
    assert!(
        reads.is_empty(),
        "ambiguous paths reached the backend: {reads:?}"
    );

    // The canonical spelling is decided by policy as usual.
    let (reply, line) = api.send(&api.get("/admin/users").bearer(&guest));
    assert_status(&reply, 403, "/admin/users");
    assert_line(&line, "deny", "denied_by_rule", Some("no-guests-admin"));
    let (reply, line) = api.send(&api.get("/public/a%20b?x=/../admin").bearer(&guest));
    assert_status(&reply, 200, "a query never takes part in path matching");
    assert_line(&line, "allow", "allowed_by_rule", Some("guests-public"));
    assert_eq!(s(&line, "path"), "/public/a b", "{line}");
}

#[test]
fn duplicate_authorization_headers_are_rejected() {
    let api = Api::start("iddup", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let guest = api.machine_token("machine-guest");
    for (what, first, second) in [
        ("ops then guest", &ops, &guest),
        ("guest then ops", &guest, &ops),
        ("the same token twice", &ops, &ops),
    ] {
        let request = api.get("/orders").bearer(first).bearer(second);
        let (reply, line) = api.send(&request);
        assert_status(&reply, 400, what);
        assert_line(&line, "deny", "header_duplicate_authorization", None);
    }
    assert!(api.backend_reads().is_empty(), "{:?}", api.backend_reads());
}

#[test]
fn host_rules_match_the_host_case_insensitively() {
    let api = Api::start("idhost", |_, c| c);
    let guest = api.machine_token("machine-guest");
    let url = format!("http://{}/reports/q3", api.vip);
    for host in [API_HOST, "API.NODEGATE.TEST", "Api.NodeGate.Test:80"] {
        let (reply, line) = api.send(&HttpRequest::get(&url).host(host).bearer(&guest));
        assert_status(&reply, 200, host);
        assert_line(&line, "allow", "allowed_by_rule", Some("guests-reports"));
    }
    // Another host of the same service: the host rule does not match.
    let (reply, line) = api.send(&HttpRequest::get(&url).host(ALT_HOST).bearer(&guest));
    assert_status(&reply, 403, ALT_HOST);
    assert_line(&line, "deny", "no_rule_matched", None);
    // A host the service does not serve.
    let (reply, line) = api.send(&HttpRequest::get(&url).host("evil.example").bearer(&guest));
    assert_status(&reply, 421, "evil.example");
    assert_line(&line, "deny", "host_not_served", None);
}

#[test]
fn forged_identity_headers_never_reach_the_backend() {
    let api = Api::start("idforge", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let forged = [
        "X-Nodegate-User: mallory",
        "x-nodegate-user: mallory2",
        "X-NODEGATE-GROUPS: admins",
        "X-Nodegate-Email: mallory@evil.example",
        "x_nodegate_email: mallory3@evil.example",
        "X_Nodegate_Groups: root",
        "X-Nodegate-Assertion: forged.assertion.value",
    ];
    let mut request = api.get("/headers").bearer(&ops);
    for h in forged {
        request = request.header(h);
    }
    let (reply, line) = api.send(&request);
    assert_status(&reply, 200, "GET /headers");
    assert_line(&line, "allow", "allowed_by_rule", Some("ops-team"));
    let echo = reply.json().expect("the backend's echo");
    let headers: Vec<(String, String)> =
        serde_json::from_value(echo["headers"].clone()).expect("[[name, value]]");
    let seen = format!("{headers:?}");
    for needle in [
        "mallory",
        "admins",
        "root",
        "forged.assertion.value",
        "evil.example",
    ] {
        assert!(
            !seen.contains(needle),
            "`{needle}` reached the backend: {seen}"
        );
    }
    assert!(
        !headers.iter().any(|(k, _)| k.contains('_')),
        "an underscore spelling reached the backend: {seen}"
    );
    let value = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    // What the gateway itself asserts: the verified identity, once.
    assert_eq!(value("x-nodegate-user"), ["machine-ops"], "{seen}");
    assert_eq!(value("x-nodegate-groups"), ["ops,machines"], "{seen}");
    let assertion = value("x-nodegate-assertion");
    assert_eq!(assertion.len(), 1, "{seen}");
    let (_, claims) = oidc::decode_unverified(assertion[0]).expect("the assertion is a JWT");
    assert_eq!(claims["sub"], "machine-ops", "{claims}");
}

#[test]
fn keep_alive_evaluates_every_request_and_an_expired_token_is_denied() {
    // The backend keeps its connections alive too (see identity_upstream.rs for a backend that
    // speaks HTTP/1.0).
    let api = Api::start_http11("idkeep", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let kid = api.idp.current_kid().expect("kid");
    let now = now();
    let expired = api
        .idp
        .mint(&[TokenSpec::rs256(
            &kid,
            json!({
                "iss": api.idp.issuer(), "sub": "machine-ops", "aud": api.idp.audience(),
                "iat": now - 7200, "exp": now - 3600, "groups": ["ops"], "team": "payments",
            }),
        )])
        .expect("mint");
    let requests = [
        api.get("/orders/1").bearer(&ops),
        api.get("/orders/2").bearer(&expired[0]),
        api.get("/orders/3").bearer(&ops),
    ];
    let replies = api
        .a()
        .http_keepalive(&requests)
        .unwrap_or_else(|e| panic!("three requests on one connection: {e}"));
    assert_status(&replies[0], 200, "first request");
    assert_status(&replies[1], 401, "second request, expired token");
    assert_status(&replies[2], 200, "third request, valid token again");
    assert_eq!(replies[0].num_connects, 1, "{replies:?}");
    assert_eq!(
        (replies[1].num_connects, replies[2].num_connects),
        (0, 0),
        "the requests did not share the connection: {replies:?}"
    );
    assert_eq!(replies[0].local, replies[1].local);
    let lines = api.request_lines(&replies[0], 3, &requests[0]);
    let by_path = |p: &str| {
        lines
            .iter()
            .find(|l| s(l, "path") == p)
            .unwrap_or_else(|| panic!("no line for {p}: {lines:?}"))
    };
    assert_line(
        by_path("/orders/1"),
        "allow",
        "allowed_by_rule",
        Some("ops-team"),
    );
    assert_line(by_path("/orders/2"), "deny", "token_expired", None);
    assert_line(
        by_path("/orders/3"),
        "allow",
        "allowed_by_rule",
        Some("ops-team"),
    );
}

#[test]
fn h2c_streams_are_authorized_one_by_one() {
    let api = Api::start("idh2c", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let kid = api.idp.current_kid().expect("kid");
    let now = now();
    let expired = api
        .idp
        .mint(&[TokenSpec::rs256(
            &kid,
            json!({
                "iss": api.idp.issuer(), "sub": "machine-ops", "aud": api.idp.audience(),
                "iat": now - 7200, "exp": now - 3600, "groups": ["ops"], "team": "payments",
            }),
        )])
        .expect("mint");
    let requests = [
        api.get("/orders/1").bearer(&ops),
        api.get("/orders/2").bearer(&expired[0]),
        api.get("/headers")
            .bearer(&ops)
            .header("X-Nodegate-User: mallory"),
    ];
    let replies = api
        .a()
        .h2c(&requests)
        .unwrap_or_else(|e| panic!("three h2c requests: {e}"));
    assert_status(&replies[0], 200, "h2c, valid token");
    assert_status(&replies[1], 401, "h2c, expired token");
    assert_status(&replies[2], 200, "h2c, valid token, forged header");
    assert!(
        replies
            .iter()
            .all(|r| r.local == replies[0].local && r.local.is_some()),
        "the streams did not share the connection: {replies:?}"
    );
    let echo = replies[2].json().expect("echo");
    assert!(
        !echo["headers"].to_string().contains("mallory"),
        "a forged header reached the backend over h2: {echo}"
    );
    let lines = api.request_lines(&replies[0], 3, &requests[0]);
    for line in &lines {
        assert_eq!(s(line, "protocol"), "h2", "{line}");
    }
    let by_path = |p: &str| {
        lines
            .iter()
            .find(|l| s(l, "path") == p)
            .unwrap_or_else(|| panic!("no line for {p}: {lines:?}"))
    };
    assert_line(
        by_path("/orders/1"),
        "allow",
        "allowed_by_rule",
        Some("ops-team"),
    );
    assert_line(by_path("/orders/2"), "deny", "token_expired", None);
    assert_line(
        by_path("/headers"),
        "allow",
        "allowed_by_rule",
        Some("ops-team"),
    );
}

#[test]
fn audit_mode_logs_would_deny_and_forwards() {
    let api = Api::start("idaudit", |_, mut c| {
        c.services[0].mode = nodegate_tests::harness::Mode::Audit;
        c
    });
    let guest = api.machine_token("machine-guest");
    let (reply, line) = api.send(&api.get("/orders").bearer(&guest));
    assert_status(&reply, 200, "audit mode, no rule matches");
    assert_eq!(reply.body, "hello from b");
    assert_line(&line, "would_deny", "no_rule_matched", None);
    assert_eq!(s(&line, "mode"), "audit", "{line}");

    let (reply, line) = api.send(&api.get("/admin/x").bearer(&guest));
    assert_status(&reply, 200, "audit mode, a deny rule matches");
    assert_line(
        &line,
        "would_deny",
        "denied_by_rule",
        Some("no-guests-admin"),
    );

    let ops = api.machine_token("machine-ops");
    let (reply, line) = api.send(&api.get("/orders").bearer(&ops));
    assert_status(&reply, 200, "audit mode, allowed");
    assert_line(&line, "allow", "allowed_by_rule", Some("ops-team"));

    // Even in audit mode an ambiguous path is never forwarded.
    let (reply, line) = api.send(&api.get("/public/../admin").bearer(&guest));
    assert_status(&reply, 400, "audit mode, ambiguous path");
    assert_line(&line, "deny", "path_dot_segment", None);
}

#[test]
fn request_targets_and_hosts_that_disagree_are_rejected() {
    let api = Api::start("idtarget", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let guest = api.machine_token("machine-guest");

    // Absolute form naming the same host: forwarded in origin form.
    let (reply, line) = api.send(
        &api.get("/ignored")
            .bearer(&ops)
            .curl_args(&["--request-target", &format!("http://{API_HOST}/headers")]),
    );
    assert_status(&reply, 200, "absolute-form target, same host");
    assert_line(&line, "allow", "allowed_by_rule", Some("ops-team"));
    let echo = reply.json().expect("echo");
    assert_eq!(echo["target"], "/headers", "{echo}");

    // Absolute form naming another host than the Host header.
    let (reply, line) = api.send(
        &api.get("/ignored")
            .bearer(&guest)
            .curl_args(&["--request-target", &format!("http://{ALT_HOST}/reports/q3")]),
    );
    assert_status(&reply, 400, "absolute-form target, another host");
    assert_line(&line, "deny", "header_host_mismatch", None);

    // Two Host headers (curl sends one only: raw).
    let (status, reply, line) = api.raw(&format!(
        "GET /reports/q3 HTTP/1.1\r\nHost: {API_HOST}\r\nHost: {ALT_HOST}\r\nAuthorization: Bearer {guest}"
    ));
    assert_eq!(status, 400, "two Host headers: {reply}");
    assert_line(&line, "deny", "header_duplicate_host", None);

    // Paths under /.nodegate/ belong to the gateway; without a login they are not found.
    let (reply, line) = api.send(&api.get("/.nodegate/callback?code=x&state=y").bearer(&ops));
    assert_status(&reply, 404, "/.nodegate/callback without a login");
    assert_line(&line, "deny", "reserved_path", None);

    // An upgrade is authorized before it happens.
    let (reply, line) = api.send(
        &api.get("/ws")
            .header("Connection: Upgrade")
            .header("Upgrade: websocket")
            .header("Sec-WebSocket-Version: 13")
            .header("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
    );
    assert_status(&reply, 401, "a WebSocket upgrade without a token");
    assert_line(&line, "deny", "no_rule_matched", None);

    let reads = api.backend_reads();
    assert_eq!(
        reads.len(),
        1,
        "only the first request reaches the backend: {reads:?}"
    );
}

#[test]
fn ambiguous_framing_is_rejected_and_nothing_is_smuggled() {
    let api = Api::start("idframe", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let auth = format!("Host: {API_HOST}\r\nAuthorization: Bearer {ops}");
    // Each request would hide a second one (`GET /admin/smuggled`) from a parser that frames
    // the body differently from the next hop.
    let smuggled = "GET /admin/smuggled HTTP/1.1\r\nHost: api.nodegate.test\r\n\r\n";
    let cases = [
        (
            "Content-Length and Transfer-Encoding",
            format!(
                "POST /orders HTTP/1.1\r\n{auth}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "framing_cl_and_te",
        ),
        (
            "two Content-Length",
            format!(
                "POST /orders HTTP/1.1\r\n{auth}\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            "framing_duplicate_content_length",
        ),
        (
            "an obfuscated Transfer-Encoding",
            format!(
                "POST /orders HTTP/1.1\r\n{auth}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "framing_transfer_encoding",
        ),
        (
            "Transfer-Encoding: gzip, chunked",
            format!(
                "POST /orders HTTP/1.1\r\n{auth}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            "framing_transfer_encoding",
        ),
        (
            "a bare LF in the head",
            format!("GET /orders HTTP/1.1\r\n{auth}\nX-Hidden: 1\r\n\r\n"),
            "framing_bare_lf",
        ),
    ];
    for (what, text, reason) in &cases {
        let head = text.strip_suffix("\r\n\r\n").unwrap_or(text);
        let (status, reply, line) = api.raw(head);
        assert_eq!(status, 400, "{what}: {reply}");
        assert_line(&line, "deny", reason, None);
    }
    let reads = api.backend_reads();
    assert!(
        reads.is_empty(),
        "a request with ambiguous framing reached the backend: {reads:?}"
    );
}

#[test]
fn a_cached_token_that_expires_on_an_open_connection_is_denied() {
    // No leeway: the token is refused as soon as its `exp` passes, although it was verified
    // (and cached) a moment before on the same connection.
    let api = Api::start_http11("idexp", |_, mut c| {
        let mut auth = c.auth.clone().expect("auth");
        auth["issuers"][0]["leeway_s"] = json!(0);
        c.auth = Some(auth);
        c
    });
    let kid = api.idp.current_kid().expect("kid");
    let now = now();
    let token = api
        .idp
        .mint(&[TokenSpec::rs256(
            &kid,
            json!({
                "iss": api.idp.issuer(), "sub": "machine-ops", "aud": api.idp.audience(),
                "iat": now, "exp": now + 5, "groups": ["ops"], "team": "payments",
            }),
        )])
        .expect("mint");
    let requests = [
        api.get("/orders/1").bearer(&token[0]),
        api.get("/orders/2").bearer(&token[0]),
        api.get("/orders/3")
            .bearer(&token[0])
            .after(Duration::from_secs(6)),
    ];
    let replies = api
        .a()
        .h1_paced(&requests)
        .unwrap_or_else(|e| panic!("three paced requests: {e}"));
    assert_status(&replies[0], 200, "fresh token");
    assert_status(&replies[1], 200, "fresh token again (cached)");
    assert_status(
        &replies[2],
        401,
        "the same token after its exp, same connection",
    );
    assert_eq!(
        replies.iter().map(|r| r.num_connects).collect::<Vec<_>>(),
        [1, 0, 0],
        "not one connection: {replies:?}"
    );
    let lines = api.request_lines(&replies[0], 3, &requests[0]);
    let by_path = |p: &str| {
        lines
            .iter()
            .find(|l| s(l, "path") == p)
            .unwrap_or_else(|| panic!("no line for {p}: {lines:?}"))
    };
    assert_line(
        by_path("/orders/2"),
        "allow",
        "allowed_by_rule",
        Some("ops-team"),
    );
    assert_line(by_path("/orders/3"), "deny", "token_expired", None);
}

#[test]
fn a_policy_reload_applies_to_the_next_request_of_an_open_connection() {
    let mut api = Api::start_http11("idreload", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let requests = [
        api.get("/orders/1").bearer(&ops),
        api.get("/orders/2")
            .bearer(&ops)
            .after(Duration::from_secs(5)),
    ];
    let client = {
        let a = api.a().clone();
        let requests = requests.clone();
        std::thread::spawn(move || a.h1_paced(&requests))
    };
    // While the client waits: ops loses its allow rule.
    api.gw
        .wait_decision("the first request", Duration::from_secs(5), |d| {
            s(d, "kind") == "request" && s(d, "path") == "/orders/1"
        })
        .expect("first request");
    let mut config = api.gw.config().clone();
    config.services[0].policy = Some(json!({
        "allow": [{"id": "guests-only", "when": {"groups": "guests"}}],
    }));
    api.gw.reload(config).expect("reload");
    nodegate_tests::harness::poll_until("the reload", Duration::from_secs(4), || {
        let metrics = api.gw.metrics()?;
        Ok(nodegate_tests::harness::metric_value(
            &metrics,
            r#"nodegate_config_reloads_total{result="ok"}"#,
        )
        .filter(|n| *n >= 1.0))
    })
    .unwrap_or_else(|e| panic!("{e}; stderr:\n{}", api.gw.stderr()));
    let replies = client
        .join()
        .expect("client thread")
        .unwrap_or_else(|e| panic!("two paced requests: {e}"));
    assert_status(&replies[0], 200, "before the reload");
    assert_status(&replies[1], 403, "after the reload, same connection");
    assert_eq!(
        replies[1].num_connects, 0,
        "the reload dropped the connection: {replies:?}"
    );
    let line = api
        .gw
        .wait_decision("the second request", LOG_TIMEOUT, |d| {
            s(d, "kind") == "request" && s(d, "path") == "/orders/2"
        })
        .expect("second request");
    assert_line(&line, "deny", "no_rule_matched", None);
}

#[test]
fn an_http10_backend_does_not_end_the_clients_keep_alive() {
    // ngpeer answers `HTTP/1.0 200 OK` + `Connection: close`: hop-by-hop, between the gateway and
    // the backend. The client's connection to the gateway is HTTP/1.1 and stays open (RFC 9110
    // §6.2: an intermediary sends its own HTTP version).
    let api = Api::start("idhttp10", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let requests = [
        api.get("/orders/1").bearer(&ops),
        api.get("/orders/2").bearer(&ops),
    ];
    let replies = api
        .a()
        .http_keepalive(&requests)
        .unwrap_or_else(|e| panic!("two requests on one connection: {e}"));
    assert_status(&replies[0], 200, "first request");
    assert_status(&replies[1], 200, "second request");
    assert_eq!(
        replies[1].num_connects, 0,
        "the gateway closed the client's connection after an HTTP/1.0 upstream response: {replies:?}"
    );
}
