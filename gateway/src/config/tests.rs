use super::*;

const GOOD: &str = r#"
node: node-a
cgroup: /sys/fs/cgroup/unified/kubepods
bpffs: /sys/fs/bpf/nodegate
proxy:
  listen: 10.77.0.1:15001
  listen_v6: "[fd77::1]:15001"
  mark: 0x4e47
  connect_timeout_ms: 3000
admin:
  listen: 127.0.0.1:15021
gateways: [10.77.0.1, "fd77::1"]
log:
  decisions_file: /var/log/nodegate/decisions.log
  bypass_lines_per_source: 5
  bypass_interval_ms: 1000
services:
  - name: grafana
    mode: enforce
    vips: ["10.96.0.10:80", "[fd96::10]:80"]
    endpoints: ["10.77.2.2:8080"]
    allow_sources: ["10.77.1.0/24"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse_with(text, Origin::Embedded, &Overrides::default(), || {
        Some("host-1".into())
    })
}

/// `GOOD` with `from` replaced by `to` (exactly once).
fn good_with(from: &str, to: &str) -> String {
    assert_eq!(
        GOOD.matches(from).count(),
        1,
        "{from:?} must occur once in GOOD"
    );
    GOOD.replace(from, to)
}

#[test]
fn good_config_parses_into_domain_types() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.node, "node-a");
    assert_eq!(c.cgroup, PathBuf::from("/sys/fs/cgroup/unified/kubepods"));
    assert_eq!(c.proxy.v4(), Some("10.77.0.1:15001".parse().unwrap()));
    assert_eq!(c.proxy.v6(), Some("[fd77::1]:15001".parse().unwrap()));
    assert_eq!(c.proxy.mark, 0x4e47);
    assert_eq!(c.proxy.connect_timeout, Duration::from_secs(3));
    assert_eq!(c.proxy.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(c.gateways.len(), 2);
    assert_eq!(c.log.bypass_lines_per_source, 5);
    let s = &c.services[0];
    assert_eq!(s.id, service_id("grafana"));
    assert_eq!(s.mode, Mode::Enforce);
    assert_eq!(s.vips.len(), 2);
    assert!(s.rule.allows("10.77.1.9".parse().unwrap()));

    let d = c.desired_state();
    assert_eq!(d.proxy_v4, c.proxy.v4());
    assert_eq!(d.proxy_v6, c.proxy.v6());
    assert_eq!(d.mark, 0x4e47);
    assert_eq!(d.gateways, c.gateways);
    assert_eq!(d.services[0].id, s.id);
    assert_eq!(d.services[0].endpoints, s.endpoints);
    assert!(
        c.summary()
            .contains("1 service(s) (1 enforce, 0 audit, 0 http), 3 protected destination(s)")
    );
}

#[test]
fn defaults_and_alternative_forms() {
    let c = parse(
        r#"
cgroup: /sys/fs/cgroup
proxy: { listen: "[fd77::1]:15001", mark: "0x10" }
services:
  - name: a.b/c-1
    mode: audit
    vips: ["[fd96::1]:80"]
    allow_sources: ["10.1.2.3", "10.77.1.5/24", "fd00::/8"]
"#,
    )
    .unwrap();
    assert_eq!(c.node, "host-1");
    assert_eq!(c.bpffs, PathBuf::from(ebpf::DEFAULT_BPFFS));
    assert_eq!(c.admin.listen, DEFAULT_ADMIN_LISTEN);
    assert_eq!(c.proxy.mark, 0x10);
    assert_eq!(c.proxy.v4(), None);
    assert_eq!(c.log.bypass_interval, DEFAULT_BYPASS_INTERVAL);
    let s = &c.services[0];
    assert_eq!(s.mode, Mode::Audit);
    // An IPv4-mapped address is IPv4.
    let mapped = parse(&good_with(
        "\"10.96.0.10:80\"",
        "\"[::ffff:10.96.0.10]:80\"",
    ))
    .unwrap();
    assert_eq!(
        mapped.services[0].vips[0],
        "10.96.0.10:80".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        s.rule.allow_sources,
        ["10.1.2.3/32", "10.77.1.0/24", "fd00::/8"].map(|n| n.parse::<IpNet>().unwrap())
    );
    assert_eq!(
        parse(&good_with("mark: 0x4e47", "mark: 77"))
            .unwrap()
            .proxy
            .mark,
        77
    );
    assert_eq!(
        parse(&good_with("mark: 0x4e47", "mark: \"123\""))
            .unwrap()
            .proxy
            .mark,
        123
    );
}

#[test]
fn ipv4_destination_without_ipv4_listener_is_an_error() {
    let err = parse(
        r#"
cgroup: /sys/fs/cgroup
proxy: { listen: "[fd77::1]:15001" }
services:
  - name: a
    vips: ["10.96.0.1:80"]
"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(
            "services[0].vips[0]: 10.96.0.1:80 is IPv4 but the proxy has no IPv4 listener"
        ),
        "{err}"
    );
}

#[test]
fn embedded_default_and_example_parse() {
    let c = Config::embedded().unwrap();
    assert!(c.services.is_empty());
    let example =
        Config::parse(include_str!("../../config/example.yaml"), Origin::Embedded).unwrap();
    assert_eq!(example.services.len(), 3);
    assert_eq!(example.services[1].mode, Mode::Audit);
    assert!(example.services[2].http.is_some());
    assert_eq!(example.auth.issuers.len(), 2);
    assert_eq!(example.workloads.len(), 1);
}

/// Each bad config and a fragment its message must contain (the field path and the value).
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one table of cases, one per line of intent"
)]
fn bad_configs_name_the_field() {
    let too_long = "a".repeat(64);
    let cases: Vec<(String, &str)> = vec![
        (
            good_with("node: node-a", "node: node-a\nbogus: 1"),
            "unknown field `bogus`",
        ),
        (
            good_with("    mode: enforce", "    mode: enforce\n    colour: red"),
            "services[0]: unknown field `colour`",
        ),
        (
            good_with("mode: enforce", "mode: block"),
            "unknown variant `block`",
        ),
        (
            good_with("cgroup: /sys/fs/cgroup/unified/kubepods\n", ""),
            "cgroup: missing",
        ),
        (
            good_with(
                "cgroup: /sys/fs/cgroup/unified/kubepods",
                "cgroup: relative/dir",
            ),
            "cgroup: \"relative/dir\" must be an absolute path",
        ),
        (
            good_with("listen: 10.77.0.1:15001", "listen: 10.77.0.1"),
            "proxy.listen: \"10.77.0.1\" is not an address:port",
        ),
        (
            good_with("listen: 10.77.0.1:15001", "listen: 0.0.0.0:15001"),
            "proxy.listen: \"0.0.0.0:15001\": 0.0.0.0 is not a unicast address",
        ),
        (
            good_with("listen: 10.77.0.1:15001", "listen: 10.77.0.1:0"),
            "proxy.listen: \"10.77.0.1:0\": port 0",
        ),
        (
            good_with(
                "listen_v6: \"[fd77::1]:15001\"",
                "listen_v6: \"10.77.0.2:15001\"",
            ),
            "proxy.listen_v6: \"10.77.0.2:15001\" is not an IPv6 address:port",
        ),
        (
            good_with("  listen_v6: \"[fd77::1]:15001\"\n", ""),
            "services[0].vips[1]: [fd96::10]:80 is IPv6 but the proxy has no IPv6 listener",
        ),
        (
            good_with("mark: 0x4e47", "mark: 0"),
            "proxy.mark: 0 is no mark",
        ),
        (
            good_with("mark: 0x4e47", "mark: \"0xzz\""),
            "proxy.mark: 0xzz is not a 32-bit socket mark",
        ),
        (
            good_with("mark: 0x4e47", "mark: 4294967296"),
            "proxy.mark: 4294967296 is not a 32-bit",
        ),
        (
            good_with("connect_timeout_ms: 3000", "connect_timeout_ms: 0"),
            "proxy.connect_timeout_ms: must be greater than 0",
        ),
        (
            good_with("connect_timeout_ms: 3000", "connect_timeout_ms: -1"),
            "proxy.connect_timeout_ms: invalid type: integer `-1`",
        ),
        (
            good_with("connect_timeout_ms: 3000", "threads: 0"),
            "proxy.threads: must be 1 to 1024, or absent for one per CPU",
        ),
        (
            good_with("connect_timeout_ms: 3000", "threads: 1025"),
            "proxy.threads: must be 1 to 1024",
        ),
        (
            good_with("listen: 127.0.0.1:15021", "listen: 10.77.0.1:15001"),
            "admin.listen: 10.77.0.1:15001 is also a proxy listener",
        ),
        (
            good_with("gateways: [10.77.0.1, \"fd77::1\"]", "gateways: []"),
            "gateways: empty, but services have endpoints",
        ),
        (
            good_with(
                "gateways: [10.77.0.1, \"fd77::1\"]",
                "gateways: [10.77.0.1, 10.77.0.1]",
            ),
            "gateways[1]: 10.77.0.1 is listed twice",
        ),
        (
            good_with("gateways: [10.77.0.1, \"fd77::1\"]", "gateways: [10.77.0]"),
            "gateways[0]: \"10.77.0\" is not an IP address",
        ),
        (
            good_with("bypass_lines_per_source: 5", "bypass_lines_per_source: 0"),
            "log.bypass_lines_per_source: must be at least 1",
        ),
        (
            good_with("bypass_interval_ms: 1000", "bypass_interval_ms: 0"),
            "log.bypass_interval_ms: must be greater than 0",
        ),
        (
            good_with("name: grafana", "name: \"\""),
            "services[0].name: must not be empty",
        ),
        (
            good_with("name: grafana", "name: Grafana"),
            "services[0].name: \"Grafana\" is not a service name",
        ),
        (
            good_with("name: grafana", "name: -grafana"),
            "services[0].name: \"-grafana\" is not a service name",
        ),
        (
            good_with("name: grafana", &format!("name: {too_long}")),
            "is longer than 63 bytes",
        ),
        (
            format!("{GOOD}  - name: grafana\n"),
            "services[1].name: \"grafana\" is already the name of services[0]",
        ),
        (
            good_with("\"10.96.0.10:80\"", "\"10.96.0.300:80\""),
            "services[0].vips[0]: \"10.96.0.300:80\" is not an address:port",
        ),
        (
            good_with("\"10.96.0.10:80\"", "\"10.96.0.10:0\""),
            "services[0].vips[0]: \"10.96.0.10:0\": port 0 is not a destination",
        ),
        (
            good_with("\"10.96.0.10:80\"", "\"10.77.2.2:8080\""),
            "services[0].endpoints[0]: 10.77.2.2:8080 is already protected by services[0].vips[0]",
        ),
        (
            format!("{GOOD}  - name: other\n    endpoints: [\"10.77.2.2:8080\"]\n"),
            "services[1].endpoints[0]: 10.77.2.2:8080 is already protected by services[0].endpoints[0]; a destination belongs to exactly one service",
        ),
        (
            good_with("\"10.96.0.10:80\"", "\"10.77.0.1:15001\""),
            "services[0].vips[0]: 10.77.0.1:15001 is the proxy's own listener",
        ),
        (
            good_with("\"10.77.1.0/24\"", "\"10.77.1.0/33\""),
            "services[0].allow_sources[0]: \"10.77.1.0/33\" is not a CIDR",
        ),
        (
            good_with("\"10.77.1.0/24\"", "\"nope\""),
            "services[0].allow_sources[0]: \"nope\" is not a CIDR or an IP address",
        ),
        ("proxy: [".to_owned(), "not a valid nodegate config"),
        ("cgroup: /x\n".to_owned(), "proxy: missing"),
    ];
    for (text, want) in &cases {
        match parse(text) {
            Ok(_) => panic!("accepted a bad config, expected {want:?}:\n{text}"),
            Err(err) => {
                let full = crate::cli::error_chain(&err);
                assert!(full.contains(want), "expected {want:?} in {full:?}");
            }
        }
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = good_with("mark: 0x4e47", "mark: 0").replace("\"10.77.1.0/24\"", "\"x\"");
    let ConfigError::Invalid { problems, .. } = parse(&text).unwrap_err() else {
        panic!("expected Invalid")
    };
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["proxy.mark", "services[0].allow_sources[0]"]);
    let shown = ConfigError::Invalid {
        origin: Origin::File("/etc/ng.yaml".into()),
        problems,
    }
    .to_string();
    assert!(
        shown.starts_with("/etc/ng.yaml: 2 problems:\n  - proxy.mark: "),
        "{shown}"
    );
}

#[test]
fn service_ids_are_fnv1a_and_never_zero() {
    // Reference values of 32-bit FNV-1a.
    assert_eq!(service_id(""), 0x811c_9dc5);
    assert_eq!(service_id("a"), 0xe40c_292c);
    assert_eq!(service_id("foobar"), 0xbf9c_f968);
    assert_eq!(service_id("grafana"), service_id("grafana"));
    assert_ne!(service_id("grafana"), service_id("grafanb"));
}

#[test]
fn l4_rule_matches_cidrs_of_both_families() {
    let rule = L4Rule {
        allow_sources: ["10.77.1.0/24", "fd77:1::/64", "192.0.2.7/32"]
            .map(|n| n.parse().unwrap())
            .to_vec(),
    };
    let cases = [
        ("10.77.1.1", true),
        ("10.77.1.255", true),
        ("10.77.2.1", false),
        ("::ffff:10.77.1.3", true),
        ("fd77:1::99", true),
        ("fd77:2::1", false),
        ("192.0.2.7", true),
        ("192.0.2.8", false),
    ];
    for (ip, want) in cases {
        assert_eq!(rule.allows(ip.parse().unwrap()), want, "{ip}");
    }
    assert!(
        !L4Rule::default().allows("10.77.1.1".parse().unwrap()),
        "empty rule denies all"
    );
}

#[test]
fn restart_required_fields() {
    let a = parse(GOOD).unwrap();
    let mut b = a.clone();
    b.services.clear();
    b.gateways.clear();
    b.proxy.connect_timeout = Duration::from_secs(1);
    assert_eq!(a.restart_required(&b), [] as [&str; 0]);
    b.proxy.listen = "10.77.0.9:15001".parse().unwrap();
    b.log.bypass_lines_per_source = 1;
    assert_eq!(a.restart_required(&b), ["proxy.listen", "log"]);
    b.proxy.threads = NonZeroUsize::new(1);
    assert_eq!(
        a.restart_required(&b),
        ["proxy.listen", "proxy.threads", "log"]
    );
}

#[test]
fn proxy_threads_default_to_the_cpus() {
    assert_eq!(parse(GOOD).unwrap().proxy.threads, None);
    let one = parse(&good_with("connect_timeout_ms: 3000", "threads: 1")).unwrap();
    assert_eq!(one.proxy.threads, NonZeroUsize::new(1));
}

const HTTP: &str = r#"
node: node-a
cgroup: /sys/fs/cgroup
proxy: { listen: 10.77.0.1:15001 }
gateways: [10.77.0.1]
auth:
  issuers:
    - name: corp
      issuer: https://login.example.com
      jwks_file: /etc/nodegate/corp-jwks.json
      audiences: [nodegate]
      algorithms: [RS256, ES256]
workloads:
  - namespace: ci
    service_account: builder
    pod: builder-0
    labels: { app: build }
    addresses: [10.77.1.5, "10.77.3.0/24"]
    cgroup: /sys/fs/cgroup
assertion: { issuer: nodegate-node-a, ttl_s: 30, audience_prefix: "urn:nodegate:" }
services:
  - name: grafana
    vips: ["10.96.0.10:80"]
    endpoints: ["10.77.2.2:3000"]
    http: { hosts: [grafana.example.com, "*.grafana.example.com"], identity_headers: true }
    policy:
      deny:
        - id: no-admin
          when: { path: { prefix: /admin } }
      allow:
        - id: devs
          when: { groups: devs }
  - name: plain
    vips: ["10.96.0.11:80"]
"#;

#[test]
fn http_services_workloads_auth_and_assertion_parse() {
    let c = parse(HTTP).unwrap_or_else(|e| panic!("{e}"));
    let http = c.services[0].http.as_ref().unwrap();
    assert!(http.identity_headers && !http.login);
    assert_eq!(http.policy.version.len(), 12);
    assert_eq!((http.policy.deny_rules, http.policy.allow_rules), (1, 1));
    assert!(c.services[1].http.is_none());
    assert_eq!(c.auth.issuers.len(), 1);
    let w = &c.workloads[0];
    assert_eq!(w.pod.as_deref(), Some("builder-0"));
    assert_eq!(w.addresses.len(), 2);
    assert!(w.cgroup_id.is_some_and(|id| id > 0));
    assert_eq!(c.assertion.issuer, "nodegate-node-a");
    assert_eq!(c.assertion.ttl, Duration::from_secs(30));
    assert_eq!(c.assertion.audience_prefix, "urn:nodegate:");
    assert!(c.summary().contains("1 http"), "{}", c.summary());
    // The version is a hash of the policy text: equal text, equal version.
    let again = parse(HTTP).unwrap();
    assert_eq!(
        again.services[0].http.as_ref().unwrap().policy.version,
        http.policy.version
    );
    let changed = parse(&HTTP.replace("groups: devs", "groups: ops")).unwrap();
    assert_ne!(
        changed.services[0].http.as_ref().unwrap().policy.version,
        http.policy.version
    );
}

#[test]
fn host_matching_is_case_insensitive_and_ignores_the_port() {
    let c = parse(HTTP).unwrap();
    let http = c.services[0].http.as_ref().unwrap();
    for (host, want) in [
        (Some("grafana.example.com"), true),
        (Some("GRAFANA.Example.COM:8080"), true),
        (Some("a.grafana.example.com"), true),
        (Some("grafana.example.com."), true),
        (Some("evil.com"), false),
        (Some("xgrafana.example.com"), false),
        (None, false),
    ] {
        assert_eq!(http.serves_host(host), want, "{host:?}");
    }
    assert_eq!(strip_port("[fd00::1]:80"), "fd00::1");
    assert_eq!(strip_port("fd00::1"), "fd00::1");
    assert_eq!(strip_port("a.b:80"), "a.b");
}

#[test]
fn http_and_policy_errors_name_the_field() {
    let cases = [
        (
            HTTP.replace("groups: devs", "grups: devs"),
            "services[0].policy.allow[0].when",
        ),
        (
            HTTP.replace("id: devs", "id: no-admin"),
            "services[0].policy.allow[0].id",
        ),
        (
            HTTP.replace("*.grafana.example.com", "grafana.example.com:80"),
            "services[0].http.hosts[1]",
        ),
        (
            HTTP.replace(
                "    vips: [\"10.96.0.11:80\"]",
                "    vips: [\"10.96.0.11:80\"]\n    http: {}",
            ),
            "services[1].http",
        ),
        (
            HTTP.replace("audiences: [nodegate]", "audiences: []"),
            "auth",
        ),
        (HTTP.replace("ttl_s: 30", "ttl_s: 0"), "assertion.ttl_s"),
        (
            HTTP.replace(
                "cgroup: /sys/fs/cgroup\nassertion",
                "cgroup: /sys/fs/cgroup/nodegate-nope\nassertion",
            ),
            "workloads[0].cgroup",
        ),
        (
            HTTP.replace(
                "assertion:",
                "  - { namespace: a, service_account: b, addresses: [10.77.3.9] }\nassertion:",
            ),
            "workloads[1].addresses[0]",
        ),
    ];
    for (text, want) in cases {
        match parse(&text) {
            Err(ConfigError::Invalid { problems, .. }) => assert!(
                problems.iter().any(|p| p.path == want),
                "want {want}, got {problems:?}"
            ),
            Err(ConfigError::Syntax { source, .. }) => {
                panic!("want {want}, got a syntax error: {source}")
            }
            other => panic!("want {want}, got {other:?}"),
        }
    }
    // Unknown fields in the new sections are refused like everywhere else.
    for (from, to) in [
        ("identity_headers: true", "identity_header: true"),
        ("ttl_s: 30", "ttl: 30"),
        ("pod: builder-0", "podname: builder-0"),
    ] {
        assert!(
            matches!(
                parse(&HTTP.replace(from, to)),
                Err(ConfigError::Syntax { .. })
            ),
            "{to}"
        );
    }
}

#[test]
fn the_login_section_is_checked_and_names_the_field() {
    let login = "login:\n  issuer: https://idp.example.com\n  client_id: gw\n  client_secret: s\n  \
                 hosts: [grafana.example.com]\n";
    let with_login = HTTP.replace(
        "identity_headers: true }",
        "identity_headers: true, login: true }",
    );
    let c = parse(&format!("{with_login}{login}")).unwrap_or_else(|e| panic!("{e}"));
    let section = c.login.as_ref().expect("the login section");
    assert!(c.services[0].http.as_ref().unwrap().login);
    assert_eq!(section.config.cookie_name, "_nodegate");
    // The effective-config line shows no secret.
    let shown = serde_json::to_string(&c).unwrap();
    assert!(
        shown.contains("idp.example.com") && !shown.contains("client_secret"),
        "{shown}"
    );

    // `http.login` without a login section to use.
    let err = parse(&with_login).unwrap_err().to_string();
    assert!(err.contains("services[0].http.login"), "{err}");
    // Unknown fields, bad values and unreadable files name the field.
    let err = parse(&format!("{HTTP}{login}  cookie_nmae: x\n")).unwrap_err();
    let err = crate::cli::error_chain(&err);
    assert!(
        err.contains("login") && err.contains("cookie_nmae"),
        "{err}"
    );
    for (extra, field) in [
        ("  session_ttl_s: 5\n", "login.session_ttl_s"),
        (
            "  cookie_secret_file: /nonexistent/secret\n",
            "login.cookie_secret_file",
        ),
        ("  redirect_path: /oauth2/callback\n", "login.redirect_path"),
        ("  logout_path: /.nodegate/\n", "login.logout_path"),
    ] {
        let err = parse(&format!("{HTTP}{login}{extra}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{extra}: {err}");
    }
    let err = parse(&format!("{HTTP}{}", login.replace("https://", "http://")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("login.issuer"), "{err}");

    // A changed login section needs a restart.
    let other = parse(&format!(
        "{HTTP}{}",
        login.replace("client_id: gw", "client_id: gw2")
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.restart_required(&other), ["login"]);
    assert_eq!(c.restart_required(&c.clone()), [] as [&str; 0]);
}

#[test]
fn kubernetes_section_and_command_line_overrides() {
    let kube = "kubernetes:\n  cgroup_driver: cgroupfs\n  peers: true\n  debounce_ms: 20\n";
    // `peers: true` needs the namespace: from the file or from --peers-namespace.
    let err = parse(&format!("{GOOD}{kube}")).unwrap_err().to_string();
    assert!(err.contains("kubernetes.peers"), "{err}");
    assert!(err.contains("--peers-namespace"), "{err}");
    let overrides = Overrides {
        node: Some("worker-7".into()),
        proxy_listen: Some("10.77.0.9:15001".into()),
        peers_namespace: Some("nodegate-system".into()),
        kubeconfig: None,
    };
    let c = Config::parse_with(
        &format!("{GOOD}{kube}"),
        Origin::Embedded,
        &overrides,
        || None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.node, "worker-7");
    assert_eq!(c.proxy.listen, "10.77.0.9:15001".parse().unwrap());
    let k = c.kubernetes.as_ref().expect("kubernetes section");
    assert_eq!(k.cgroup_driver, CgroupDriverSetting::Cgroupfs);
    assert_eq!(k.peers_namespace.as_deref(), Some("nodegate-system"));
    assert!(k.write_status, "status is written by default");
    assert_eq!(k.debounce, Duration::from_millis(20));
    assert!(k.kubeconfig.is_none());

    // A bad override reads like a bad file, naming the field.
    let bad = Overrides {
        proxy_listen: Some("nowhere".into()),
        node: Some("bad name".into()),
        ..Overrides::default()
    };
    let err = Config::parse_with(GOOD, Origin::Embedded, &bad, || None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy.listen"), "{err}");
    assert!(err.contains("node"), "{err}");
    // Kubernetes flags without a kubernetes section are a mistake, not ignored.
    let stray = Overrides {
        peers_namespace: Some("ng".into()),
        ..Overrides::default()
    };
    let err = Config::parse_with(GOOD, Origin::Embedded, &stray, || None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--peers-namespace"), "{err}");

    for (section, field) in [
        (
            "kubernetes:\n  cgroup_driver: systemdd\n",
            "kubernetes.cgroup_driver",
        ),
        (
            "kubernetes:\n  debounce_ms: 2000\n",
            "kubernetes.debounce_ms",
        ),
        ("kubernetes:\n  debounce_ms: 0\n", "kubernetes.debounce_ms"),
        (
            "kubernetes:\n  peers: true\n  peers_namespace: Not_A_Namespace\n",
            "kubernetes.peers_namespace",
        ),
        (
            "kubernetes:\n  kubeconfig: /nonexistent/kubeconfig\n",
            "kubernetes.kubeconfig",
        ),
        ("kubernetes:\n  watch_all: true\n", "watch_all"),
    ] {
        let err = crate::cli::error_chain(&parse(&format!("{GOOD}{section}")).unwrap_err());
        assert!(err.contains(field), "{section}: {err}");
    }

    // An empty section is the defaults; a changed section needs a restart.
    let plain = parse(&format!("{GOOD}kubernetes: {{}}\n")).unwrap_or_else(|e| panic!("{e}"));
    let k = plain.kubernetes.as_ref().unwrap();
    assert_eq!(k.cgroup_driver, CgroupDriverSetting::Auto);
    assert!(k.peers_namespace.is_none());
    assert_eq!(k.debounce, DEFAULT_KUBE_DEBOUNCE);
    let other = parse(&format!("{GOOD}kubernetes: {{ write_status: false }}\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plain.restart_required(&other), ["kubernetes"]);
    assert!(parse(GOOD).unwrap().kubernetes.is_none());
}

#[test]
fn kubernetes_services_settings_are_checked_and_reload_without_a_restart() {
    let with = |entries: &str| format!("{GOOD}kubernetes:\n  services:\n{entries}");
    let c = parse(&with(
        "    monitoring/grafana: { http: { hosts: [Grafana.Example.Com], identity_headers: true } }\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let grafana = &c.kube_services["monitoring/grafana"];
    assert_eq!(grafana.hosts, ["grafana.example.com"]);
    assert!(grafana.identity_headers && !grafana.login);
    assert!(grafana.tls.is_none() && grafana.upstream_tls.is_none());
    // A changed entry is applied by the next merge, not by a restart.
    let changed = parse(&with(
        "    monitoring/grafana: { http: { hosts: [grafana.example.org] } }\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.restart_required(&changed), [] as [&str; 0]);

    for (entries, field, message) in [
        (
            "    grafana: {}\n",
            "kubernetes.services[\"grafana\"]",
            "is not `namespace/name`",
        ),
        (
            "    Monitoring/grafana: {}\n",
            "kubernetes.services[\"Monitoring/grafana\"]",
            "is not `namespace/name`",
        ),
        (
            "    monitoring/graf/ana: {}\n",
            "kubernetes.services[\"monitoring/graf/ana\"]",
            "is not `namespace/name`",
        ),
        (
            "    monitoring/grafana: { http: { login: true } }\n",
            "kubernetes.services[\"monitoring/grafana\"].http.login",
            "needs the top-level `login:` section",
        ),
        (
            "    monitoring/grafana: { http: { hosts: [\"bad host\"] } }\n",
            "kubernetes.services[\"monitoring/grafana\"].http.hosts[0]",
            "\"bad host\" is not a host name",
        ),
        (
            "    monitoring/grafana: { tls: { cert_file: g.crt, key_file: /etc/g.key } }\n",
            "kubernetes.services[\"monitoring/grafana\"].tls.cert_file",
            "must be an absolute path",
        ),
        (
            "    monitoring/grafana: { tls: { cert_file: /nonexistent/g.crt, key_file: /nonexistent/g.key } }\n",
            "kubernetes.services[\"monitoring/grafana\"].tls.cert_file",
            "cannot read /nonexistent/g.crt",
        ),
        (
            "    monitoring/grafana: { upstream_tls: { ca_file: /nonexistent/ca.pem } }\n",
            "kubernetes.services[\"monitoring/grafana\"].upstream_tls.ca_file",
            "cannot read /nonexistent/ca.pem",
        ),
        (
            "    monitoring/grafana: { policy: { allow: [] } }\n",
            "policy",
            "unknown field",
        ),
    ] {
        match parse(&with(entries)) {
            Err(ConfigError::Invalid { problems, .. }) => {
                assert!(
                    problems
                        .iter()
                        .any(|p| p.path == field && p.message.contains(message)),
                    "{entries}: {problems:?}"
                );
            }
            Err(other) => {
                let err = crate::cli::error_chain(&other);
                assert!(
                    err.contains(field) && err.contains(message),
                    "{entries}: {err}"
                );
            }
            Ok(_) => panic!("{entries}: accepted"),
        }
    }
}

#[test]
fn proxy_listen_flag_takes_the_nodes_addresses() {
    // No listen_v6 and no services (whose families the listeners must cover).
    let without_v6 = format!(
        "{}services: []\n",
        GOOD.replace("  listen_v6: \"[fd77::1]:15001\"\n", "")
            .split("services:")
            .next()
            .unwrap()
    );
    let parse_listen = |text: &str, flag: &str| {
        let overrides = Overrides {
            proxy_listen: Some(flag.into()),
            ..Overrides::default()
        };
        Config::parse_with(text, Origin::Embedded, &overrides, || None)
            .map(|c| {
                (
                    c.proxy.listen.to_string(),
                    c.proxy.listen_v6.map(|a| a.to_string()),
                )
            })
            .map_err(|e| crate::cli::error_chain(&e))
    };
    let dual = || {
        Ok((
            "10.0.0.5:15001".to_owned(),
            Some("[fd00::5]:15001".to_owned()),
        ))
    };
    // The DaemonSet's `$(HOST_IP),$(HOST_IPS)`: the primary address, then all of them.
    assert_eq!(
        parse_listen(&without_v6, "10.0.0.5,10.0.0.5,fd00::5"),
        dual()
    );
    assert_eq!(parse_listen(&without_v6, " 10.0.0.5 , fd00::5 "), dual());
    assert_eq!(
        parse_listen(&without_v6, "[fd00::5]:16001,10.0.0.5:16001"),
        Ok(("10.0.0.5:16001".into(), Some("[fd00::5]:16001".into())))
    );
    // HOST_IPS empty (an older cluster): the primary address alone; the file's v6 stays.
    assert_eq!(
        parse_listen(GOOD, "10.0.0.5,"),
        Ok(("10.0.0.5:15001".into(), Some("[fd77::1]:15001".into())))
    );
    // IPv6 only (an IPv6-only cluster: no IPv4 service either).
    let v6_only = format!(
        "{}services: []\n",
        without_v6.split("services:").next().unwrap()
    );
    assert_eq!(
        parse_listen(&v6_only, "fd00::5"),
        Ok(("[fd00::5]:15001".into(), None))
    );
    // The single address:port form is unchanged.
    assert_eq!(
        parse_listen(&without_v6, "10.0.0.5:15002"),
        Ok(("10.0.0.5:15002".into(), None))
    );
    for (flag, message) in [
        (
            "10.0.0.5,10.0.0.6",
            "two IPv4 addresses (10.0.0.5:15001 and 10.0.0.6:15001)",
        ),
        ("fd00::5,fd00::6", "two IPv6 addresses"),
        (",", "--proxy-listen=,: no address"),
        ("10.0.0.5,nowhere", "proxy.listen"),
        ("0.0.0.0", "not a unicast address"),
    ] {
        let err = parse_listen(&without_v6, flag).unwrap_err();
        assert!(err.contains(message), "{flag}: {err}");
    }
    // An IPv6 listen with the file's listen_v6 is the file's error, as before.
    let err = parse_listen(GOOD, "fd00::5").unwrap_err();
    assert!(err.contains("proxy.listen_v6"), "{err}");
}
