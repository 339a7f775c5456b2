//! `cargo fuzz run policy_yaml`: parsing arbitrary text never panics, and any policy that parses
//! compiles and evaluates without panicking, with the indexed evaluator agreeing with explain's
//! full scan on a few fixed requests.

#![no_main]

use std::collections::BTreeMap;

use gateway::policy::{
    CanonicalPath, CompiledPolicy, Identity, IdentityKind, Policy, RequestContext, Workload,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::from_yaml(text) else {
        return;
    };
    let compiled = CompiledPolicy::compile(&policy);

    let mut claims = serde_json::Map::new();
    claims.insert("team".into(), "platform".into());
    let user = Identity {
        kind: IdentityKind::User,
        subject: Some("alice".into()),
        email: Some("Alice@Example.com".into()),
        groups: vec!["admins".into(), "devs".into()],
        issuer: Some("https://idp.example.com".into()),
        claims,
    };
    let anonymous = Identity::anonymous();
    let workload = Workload {
        namespace: "ci".into(),
        service_account: "builder".into(),
        labels: BTreeMap::from([("app".into(), "build".into())]),
    };
    let paths = ["/", "/admin", "/admin/x/y", "/api/v1/items", "/caf%C3%A9/"];
    for (identity, wl) in [(&user, None), (&anonymous, Some(&workload))] {
        for raw in paths {
            let Ok(path) = CanonicalPath::parse(raw.as_bytes()) else {
                continue;
            };
            for (method, host) in [("GET", Some("App.Example.com:443")), ("POST", None)] {
                let ctx = RequestContext {
                    identity: identity.view(),
                    workload: wl,
                    source_ip: "10.1.2.3".parse().ok(),
                    spiffe_id: None,
                    method,
                    host,
                    path: &path,
                    now: 1_704_110_400,
                };
                let decision = compiled.evaluate(&ctx);
                assert_eq!(decision, compiled.explain(&ctx).decision);
            }
        }
    }
});
