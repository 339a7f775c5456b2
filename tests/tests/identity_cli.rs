//! `gateway explain` and `gateway decisions` against a running scenario: explain, given the
//! same token, decides what the gateway decided on the wire; decisions reads back the lines.

mod common;

use std::{process::Command, time::Duration};

use nodegate_tests::harness::{Output, TokenSpec};
use serde_json::{Value, json};

use common::{
    identity::{API_HOST, Api, assert_line, assert_status, now},
    s,
};

/// `gateway ARGS` in the node netns (where the issuer's JWKS URL is reachable).
fn gateway_cli(api: &Api, args: &[&str]) -> Output {
    let bin = api
        .node
        .tools()
        .require_gateway()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin);
    cmd.args(args);
    api.node
        .node()
        .run(cmd, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("gateway {args:?}: {e}"))
}

/// One `gateway explain` expectation.
struct Case<'a> {
    who: &'a str,
    token: &'a str,
    path: &'a str,
    exit: i32,
    decision: &'a str,
    reason: &'a str,
    rule: Option<&'a str>,
}

fn expired_token(api: &Api) -> String {
    let kid = api.idp.current_kid().expect("kid");
    let now = now();
    api.idp
        .mint(&[TokenSpec::rs256(
            &kid,
            json!({
                "iss": api.idp.issuer(), "sub": "machine-ops", "aud": api.idp.audience(),
                "iat": now - 7200, "exp": now - 3600, "groups": ["ops"], "team": "payments",
            }),
        )])
        .expect("mint")
        .remove(0)
}

/// `gateway explain --json` for `case`, checked; returns its JSON.
fn explain(api: &Api, case: &Case<'_>) -> Value {
    let config = api.gw.config_path().to_string_lossy().into_owned();
    let file = api.node.dir().join(format!("{}.token", case.who));
    std::fs::write(&file, case.token).expect("write token");
    let file = file.to_string_lossy().into_owned();
    let out = gateway_cli(
        api,
        &[
            "explain",
            "--config",
            &config,
            "--service",
            "api",
            "--path",
            case.path,
            "--host",
            API_HOST,
            "--token",
            &file,
            "--json",
        ],
    );
    let what = format!("explain {} {}", case.who, case.path);
    assert_eq!(out.code(), Some(case.exit), "{what}: {out:?}");
    let v: Value = out.json().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(s(&v, "decision"), case.decision, "{what}: {v}");
    assert_eq!(s(&v, "reason"), case.reason, "{what}: {v}");
    assert_eq!(v["rule"].as_str(), case.rule, "{what}: {v}");
    v
}

#[test]
fn explain_decides_as_the_gateway_did() {
    let api = Api::start("idexplain", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let guest = api.machine_token("machine-guest");
    let expired = expired_token(&api);

    // What the gateway decided on the wire, and what explain says for the same token.
    let (reply, allowed) = api.send(&api.get("/orders").bearer(&ops));
    assert_status(&reply, 200, "ops");
    let (reply, denied) = api.send(&api.get("/orders").bearer(&guest));
    assert_status(&reply, 403, "guest");
    let (reply, refused) = api.send(&api.get("/orders").bearer(&expired));
    assert_status(&reply, 401, "expired");
    for (line, case) in [
        (
            &allowed,
            Case {
                who: "ops",
                token: &ops,
                path: "/orders",
                exit: 0,
                decision: "allow",
                reason: "allowed_by_rule",
                rule: Some("ops-team"),
            },
        ),
        (
            &denied,
            Case {
                who: "guest",
                token: &guest,
                path: "/orders",
                exit: 2,
                decision: "deny",
                reason: "no_rule_matched",
                rule: None,
            },
        ),
        (
            &refused,
            Case {
                who: "expired",
                token: &expired,
                path: "/orders",
                exit: 2,
                decision: "deny",
                reason: "token_expired",
                rule: None,
            },
        ),
    ] {
        let v = explain(&api, &case);
        assert_eq!(
            v["reason"], line["reason"],
            "explain {}: {v}\nline: {line}",
            case.who
        );
        assert_eq!(
            v["policy_version"], line["policy_version"],
            "explain {}: {v}\nline: {line}",
            case.who
        );
    }
    for case in [
        Case {
            who: "guest",
            token: &guest,
            path: "/admin/x",
            exit: 2,
            decision: "deny",
            reason: "denied_by_rule",
            rule: Some("no-guests-admin"),
        },
        Case {
            who: "guest",
            token: &guest,
            path: "/public/../admin",
            exit: 2,
            decision: "deny",
            reason: "path_dot_segment",
            rule: None,
        },
        Case {
            who: "guest",
            token: &guest,
            path: "/public/x",
            exit: 0,
            decision: "allow",
            reason: "allowed_by_rule",
            rule: Some("guests-public"),
        },
    ] {
        explain(&api, &case);
    }
}

#[test]
fn decisions_reads_back_the_denied_requests() {
    let api = Api::start("iddecide", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let guest = api.machine_token("machine-guest");
    let (reply, allowed) = api.send(&api.get("/orders").bearer(&ops));
    assert_status(&reply, 200, "ops");
    let (reply, denied) = api.send(&api.get("/orders").bearer(&guest));
    assert_status(&reply, 403, "guest");
    assert_line(&denied, "deny", "no_rule_matched", None);

    let config = api.gw.config_path().to_string_lossy().into_owned();
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["decisions", "--config", &config, "--json"];
        all.extend(args);
        let out = gateway_cli(&api, &all);
        assert!(out.success(), "{out:?}");
        out.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| s(&v, "request_id").to_owned())
            .collect()
    };
    let (allowed, denied) = (
        s(&allowed, "request_id").to_owned(),
        s(&denied, "request_id").to_owned(),
    );
    let all = ids(&[]);
    assert!(all.contains(&allowed) && all.contains(&denied), "{all:?}");
    let deny = ids(&["--deny", "--service", "api"]);
    assert!(
        deny.contains(&denied) && !deny.contains(&allowed),
        "{deny:?}"
    );
    assert_eq!(ids(&["--service", "other"]), Vec::<String>::new());
    assert!(ids(&["--since", "1h"]).contains(&denied));
}

#[test]
fn explain_without_a_served_host_reports_the_host_refusal() {
    // The gateway answers 421 `host_not_served` for a Host not in http.hosts (none given counts),
    // before policy: explain says so, not the policy's verdict (it used to print DENY with
    // `allowed_by_rule` / `ops-team`).
    let api = Api::start("idexhost", |_, c| c);
    let ops = api.machine_token("machine-ops");
    let file = api.node.dir().join("ops.token");
    std::fs::write(&file, &ops).expect("write token");
    let config = api.gw.config_path().to_string_lossy().into_owned();
    let file = file.to_string_lossy().into_owned();
    for host in [None, Some("evil.example")] {
        let mut args = vec![
            "explain",
            "--config",
            &config,
            "--service",
            "api",
            "--path",
            "/orders",
            "--token",
            &file,
            "--json",
        ];
        if let Some(h) = host {
            args.extend(["--host", h]);
        }
        let out = gateway_cli(&api, &args);
        let v: Value = out
            .json()
            .unwrap_or_else(|e| panic!("explain host {host:?}: {e}"));
        assert_eq!(out.code(), Some(2), "host {host:?}: {out:?}");
        assert_eq!(s(&v, "decision"), "deny", "host {host:?}: {v}");
        assert_eq!(
            s(&v, "reason"),
            "host_not_served",
            "host {host:?}: a deny must carry the reason of the deny: {v}"
        );
        assert!(v["rule"].is_null(), "host {host:?}: {v}");
    }
}
