//! Bad configs: `gateway check-config` and `gateway run` exit 64 with a message naming the
//! problem. Needs no root and no simulated node: nothing is loaded before the config parses.

use std::{fs, path::PathBuf, process::Command, time::Duration};

use nodegate_tests::harness::{Output, Tools, run_command};

const EX_CONFIG: i32 = 64;

const GOOD: &str = r#"node: sim-config
cgroup: /sys/fs/cgroup/unified/ngconfig/pods
bpffs: /sys/fs/bpf/ngconfig
proxy: { listen: "10.7.0.1:15001", listen_v6: "[fd00:7::1]:15001" }
admin: { listen: "127.0.0.1:15000" }
gateways: ["10.7.0.1", "fd00:7::1"]
services:
  - { name: web, mode: enforce, vips: ["10.96.7.10:80", "[fd96:7::10]:80"], endpoints: ["10.7.1.11:8080"], allow_sources: ["10.7.0.0/16"] }
"#;

/// A scratch dir for one test of this process, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "nodegate-config-test-{}-{test}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).expect("write config");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn gateway(args: &[&str], file: &PathBuf) -> Output {
    let tools = Tools::from_env();
    let bin = tools.require_gateway().unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin);
    cmd.args(args).arg(file);
    run_command(cmd, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_good_config_checks_clean() {
    let scratch = Scratch::new("good");
    let file = scratch.write("good.yaml", GOOD);
    let out = gateway(&["check-config"], &file);
    assert_eq!(out.code(), Some(0), "check-config of a good file: {out:?}");
}

#[test]
fn bad_configs_exit_64_naming_the_problem() {
    let scratch = Scratch::new("configs");
    // (what is wrong, replace this, with this, any of these must appear in the message)
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "an invalid VIP",
            "10.96.7.10:80",
            "10.96.7.300:80",
            &["10.96.7.300"],
        ),
        (
            "an unknown mode",
            "mode: enforce",
            "mode: block",
            &["block", "mode"],
        ),
        (
            "an invalid CIDR",
            "10.7.0.0/16",
            "10.7.0.0/33",
            &["10.7.0.0/33"],
        ),
        (
            "an endpoint without a port",
            "10.7.1.11:8080",
            "10.7.1.11",
            &["10.7.1.11", "endpoints"],
        ),
        (
            "an unknown field",
            "gateways:",
            "gateway_ips:",
            &["gateway_ips"],
        ),
        (
            "a proxy address that is not ip:port",
            "10.7.0.1:15001",
            "node-ip:15001",
            &["node-ip", "listen"],
        ),
        (
            "an IPv6 service without listen_v6",
            r#", listen_v6: "[fd00:7::1]:15001""#,
            "",
            &["listen_v6"],
        ),
        (
            "a duplicate service name",
            "services:\n",
            "services:\n  - { name: web, vips: [\"10.96.7.11:80\"], endpoints: [\"10.7.1.12:8080\"] }\n",
            &["web", "duplicate"],
        ),
        (
            "YAML that does not parse",
            "services:",
            "services: [",
            &["line", "yaml", "YAML", "parse"],
        ),
    ];
    for (i, (what, from, to, needles)) in cases.iter().enumerate() {
        assert!(
            GOOD.contains(from),
            "case `{what}` does not apply to the base config"
        );
        let file = scratch.write(&format!("bad{i}.yaml"), &GOOD.replacen(from, to, 1));
        for args in [&["check-config"][..], &["run", "--config"][..]] {
            let out = gateway(args, &file);
            assert!(
                !out.timed_out(),
                "`gateway {}` with {what} did not exit: {out:?}",
                args.join(" ")
            );
            assert_eq!(
                out.code(),
                Some(EX_CONFIG),
                "`gateway {}` with {what}: {out:?}",
                args.join(" ")
            );
            let message = format!("{}{}", out.stderr, out.stdout);
            assert!(
                needles.iter().any(|n| message.contains(n)),
                "`gateway {}` with {what}: message should name one of {needles:?}, got:\n{message}",
                args.join(" ")
            );
            assert!(!message.contains("panicked"), "{what}: {message}");
        }
    }
}

#[test]
fn the_harness_config_is_accepted() {
    use nodegate_tests::harness::{GatewayConfig, Mode, ServiceConfig};
    let scratch = Scratch::new("harness");
    let config = GatewayConfig {
        node: "sim-config".to_owned(),
        cgroup: "/sys/fs/cgroup/unified/ngconfig/pods".into(),
        bpffs: "/sys/fs/bpf/ngconfig".into(),
        proxy_v4: "10.7.0.1:15001".parse().expect("addr"),
        proxy_v6: Some("[fd00:7::1]:15001".parse().expect("addr")),
        admin: "127.0.0.1:15000".parse().expect("addr"),
        gateways: vec![
            "10.7.0.1".parse().expect("ip"),
            "fd00:7::1".parse().expect("ip"),
        ],
        decisions_file: scratch.0.join("decisions.log"),
        services: vec![
            ServiceConfig::new("web", Mode::Enforce)
                .vip("10.96.7.10:80".parse().expect("addr"))
                .vip("[fd96:7::10]:80".parse().expect("addr"))
                .endpoint("10.7.1.11:8080".parse().expect("addr"))
                .endpoint("[fd00:7:1::b]:8080".parse().expect("addr"))
                .allow("10.7.0.0/16")
                .allow("fd00:7::/32"),
            ServiceConfig::new("api", Mode::Audit).vip("10.96.7.20:80".parse().expect("addr")),
        ],
        auth: None,
        workloads: Vec::new(),
        sections: Vec::new(),
        proxy_threads: Some(2),
    };
    let file = scratch.write("harness.yaml", &config.to_yaml());
    let out = gateway(&["check-config"], &file);
    assert_eq!(
        out.code(),
        Some(0),
        "check-config of the harness's config:\n{}\n{out:?}",
        config.to_yaml()
    );

    // The identity parts as the identity tests write them: an HTTP service with a policy, an
    // issuer with a JWKS file, a static workload.
    let jwks = scratch.write("sa.jwks.json", r#"{"keys": []}"#);
    let mut identity = config.clone();
    identity.services[0] = identity.services[0]
        .clone()
        .http(serde_json::json!({"hosts": ["api.nodegate.test"], "identity_headers": true}))
        .policy(serde_json::json!({
            "deny": [{"id": "no-admin", "when": {"path": {"prefix": "/admin"}}}],
            "allow": [
                {"id": "ops", "when": {"groups": "ops"}},
                {"id": "checkout", "when": {"workload": {"namespace": "shop", "service_account": "checkout"}}},
            ],
        }));
    let identity = identity
        .auth(serde_json::json!({"issuers": [{
            "name": "cluster",
            "issuer": "https://kubernetes.default.svc",
            "jwks_file": jwks,
            "audiences": ["nodegate"],
            "kind": "kubernetes",
        }]}))
        .workload(serde_json::json!({
            "namespace": "shop",
            "service_account": "cart",
            "addresses": ["10.7.1.10/32"],
        }));
    let file = scratch.write("identity.yaml", &identity.to_yaml());
    let out = gateway(&["check-config"], &file);
    assert_eq!(
        out.code(),
        Some(0),
        "check-config of the harness's identity config:\n{}\n{out:?}",
        identity.to_yaml()
    );
}
