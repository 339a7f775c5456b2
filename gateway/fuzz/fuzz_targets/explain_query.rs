//! `cargo fuzz run explain_query`: the JSON body of the admin server's `POST /explain`
//! (`explain::Query`) and its evaluation (`explain::explain`) against a fixed config.
//!
//! A query that parses survives the CLI → admin round trip (serialized and parsed again it is
//! the same query); explaining it never panics; an explanation is about the service asked for,
//! decides `allow` or `deny`, and never allows a request whose path the gateway answers with 400
//! or whose `Host` it answers with 421.

#![no_main]

use std::sync::{Arc, OnceLock};

use gateway::{
    auth::{Authenticator, NoopObserver},
    config::{Config, Origin as ConfigOrigin},
    explain::{Origin, Query, explain},
    policy::CanonicalPath,
    proxy::Routes,
};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"
node: fuzz
cgroup: /sys/fs/cgroup
proxy: { listen: 127.0.0.2:15001 }
gateways: [127.0.0.1]
auth:
  issuers:
    - { name: corp, issuer: "https://idp.test", jwks_uri: "http://127.0.0.1:1/jwks", audiences: [ng], algorithms: [ES256, RS256] }
    - { name: cluster, kind: kubernetes, issuer: "https://kubernetes.default.svc", jwks_uri: "http://127.0.0.1:1/k8s", audiences: [ng] }
workloads:
  - { namespace: ci, service_account: builder, addresses: [10.0.0.9], labels: { app: build } }
services:
  - name: web
    vips: ["10.96.0.1:80"]
    http: { hosts: [web.example.com] }
    policy:
      deny:
        - id: no-admin
          when: { and: [ { path: { prefix: /admin } }, { not: { groups: sre } } ] }
      allow:
        - { id: devs, when: { groups: devs } }
        - { id: ci, when: { workload: { namespace: ci } } }
        - { id: mesh, when: { spiffe_id: "spiffe://td.test/ns/ci/*" } }
        - { id: office, when: { and: [ { email_domain: example.com }, { method: [GET, HEAD] }, { source_cidr: [10.0.0.0/8] } ] } }
  - name: l4
    vips: ["10.96.0.2:80"]
    allow_sources: [10.0.0.0/24]
  - name: lan
    mode: audit
    vips: ["10.96.0.3:80"]
    allow_sources: [10.0.0.0/24]
    policy: { allow: [ { id: all, when: { path: { prefix: / } } } ] }
"#;

struct Fixture {
    routes: Routes,
    auth: Authenticator,
    config: Config,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let config = Config::parse(CONFIG, ConfigOrigin::Embedded).expect("the fuzz config");
        let auth = Authenticator::new(&config.auth, Arc::new(NoopObserver)).expect("issuers");
        Fixture {
            routes: Routes::new(&config),
            auth,
            config,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(query) = serde_json::from_slice::<Query>(data) else {
        return;
    };
    let json = serde_json::to_string(&query).expect("a query serializes");
    let again: Query = serde_json::from_str(&json).expect("a serialized query parses");
    assert_eq!(again, query, "{json}");

    let f = fixture();
    let Ok(out) = explain(&f.routes, &f.auth, &query, Origin::Live, Vec::new()) else {
        return;
    };
    assert_eq!(out.service, query.service);
    assert!(
        out.decision == "allow" || out.decision == "deny",
        "{}",
        out.decision
    );
    assert_eq!(out.allowed(), out.decision == "allow");
    let service = f
        .config
        .services
        .iter()
        .find(|s| s.name == query.service)
        .expect("explained a configured service");
    if let Some(http) = &service.http {
        if CanonicalPath::parse(query.path.as_bytes()).is_err() {
            assert!(
                !out.allowed(),
                "a path refused with 400 was allowed: {:?}",
                query.path
            );
        }
        if !http.serves_host(query.host.as_deref()) {
            assert!(
                !out.allowed(),
                "a Host refused with 421 was allowed: {:?}",
                query.host
            );
        }
    }
});
