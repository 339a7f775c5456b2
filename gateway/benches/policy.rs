//! Policy evaluation with 1, 100 and 1,000 rules (target: median <= 1 us at 1,000 rules).
//!
//! Rules are generated in five realistic shapes (group + path prefix + method, e-mail domain +
//! negated glob, claim + host, workload, user + glob), plus one deny rule per ten allow rules.
//! The request matches the *last* allow rule, the worst case for a linear scan; a second request
//! matches nothing (default deny), and a third policy has only rules the index cannot use
//! (numeric claim equality), which shows the cost of the fallback scan.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use gateway::policy::{
    CanonicalPath, CompiledPolicy, Identity, IdentityKind, Policy, RequestContext, Workload,
};

fn rule(i: usize) -> String {
    match i % 5 {
        0 => format!(
            "{{and: [{{groups: team-{i}}}, {{path: {{prefix: /svc-{i}}}}}, {{method: [GET, HEAD]}}]}}"
        ),
        1 => format!(
            "{{and: [{{email_domain: dom-{i}.example}}, {{not: {{path: {{glob: '/svc-{i}/admin/**'}}}}}}]}}"
        ),
        2 => format!(
            "{{and: [{{claim: {{name: team, equals: team-{i}}}}}, {{host: h-{i}.example.com}}]}}"
        ),
        3 => format!("{{workload: {{namespace: ns-{i}, service_account: sa}}}}"),
        _ => format!("{{and: [{{user: [user-{i}]}}, {{path: {{glob: '/svc-{i}/*/items/**'}}}}]}}"),
    }
}

fn policy(n: usize) -> CompiledPolicy {
    let mut yaml = String::from("policy:\n  deny:\n");
    for i in 0..n / 10 {
        let _ = writeln!(
            yaml,
            "    - id: deny-{i}\n      when: {{groups: blocked-{i}}}"
        );
    }
    yaml.push_str("  allow:\n");
    for i in 0..n {
        let _ = writeln!(yaml, "    - id: allow-{i}\n      when: {}", rule(i));
    }
    compile(&yaml)
}

/// Numeric claim rules: nothing the index can key on, so every rule is evaluated.
fn unindexed_policy(n: usize) -> CompiledPolicy {
    let mut yaml = String::from("policy:\n  allow:\n");
    for i in 0..n {
        let _ = writeln!(yaml, "    - when: {{claim: {{name: level, equals: {i}}}}}");
    }
    compile(&yaml)
}

fn compile(yaml: &str) -> CompiledPolicy {
    match Policy::from_yaml(yaml) {
        Ok(p) => CompiledPolicy::compile(&p),
        Err(e) => panic!("bench policy does not parse: {e}"),
    }
}

/// A user that matches allow rule `last` (shape 4: user + glob), with a realistic amount of
/// identity data.
fn identity(last: usize) -> Identity {
    let claims = serde_json::json!({
        "team": "team-none", "sub": format!("user-{last}"), "roles": ["a", "b"]
    });
    Identity {
        kind: IdentityKind::User,
        subject: Some(format!("user-{last}")),
        email: Some(format!("User-{last}@Corp.Example")),
        groups: vec![
            "devs".into(),
            "everyone".into(),
            "team-x".into(),
            "oncall".into(),
            "readers".into(),
        ],
        issuer: Some("https://idp.example.com".into()),
        claims: match claims {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    }
}

fn bench(c: &mut Criterion) {
    let workload = Workload {
        namespace: "apps".into(),
        service_account: "web".into(),
        labels: BTreeMap::from([("app".into(), "web".into())]),
    };
    let mut group = c.benchmark_group("evaluate");
    for n in [1usize, 100, 1_000] {
        let compiled = policy(n);
        // The last rule of shape 4 (user + glob).
        let last = (0..n).rev().find(|i| i % 5 == 4).unwrap_or(0);
        let id = identity(last);
        let target = if n == 1 {
            // With one rule (shape 0) match it instead.
            "/svc-0/api/items/42".to_owned()
        } else {
            format!("/svc-{last}/v1/items/42?expand=true")
        };
        let path = CanonicalPath::parse(target.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let mut id_for_one = id.clone();
        id_for_one.groups.push("team-0".into());
        let ctx = RequestContext {
            identity: if n == 1 { id_for_one.view() } else { id.view() },
            workload: Some(&workload),
            source_ip: Some("10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}"))),
            spiffe_id: None,
            method: "GET",
            host: Some("App.Example.com:443"),
            path: &path,
            now: 1_704_110_400,
        };
        assert!(
            compiled.evaluate(&ctx).is_allow(),
            "bench request must be allowed"
        );
        group.bench_with_input(BenchmarkId::new("allow_last_rule", n), &ctx, |b, ctx| {
            b.iter(|| compiled.evaluate(black_box(ctx)));
        });

        let nobody = Identity {
            subject: Some("mallory".into()),
            email: Some("mallory@evil.example".into()),
            groups: vec!["everyone".into(), "guests".into()],
            ..id.clone()
        };
        let miss = RequestContext {
            identity: nobody.view(),
            ..ctx
        };
        assert!(
            !compiled.evaluate(&miss).is_allow(),
            "bench request must be denied"
        );
        group.bench_with_input(BenchmarkId::new("no_match", n), &miss, |b, ctx| {
            b.iter(|| compiled.evaluate(black_box(ctx)));
        });

        let unindexed = unindexed_policy(n);
        group.bench_with_input(BenchmarkId::new("unindexed_scan", n), &miss, |b, ctx| {
            b.iter(|| unindexed.evaluate(black_box(ctx)));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("canonical_path");
    for target in [
        &b"/"[..],
        b"/svc-42/v1/items/42?expand=true",
        b"/api/v1/namespaces/default/pods/caf%C3%A9-7d4b9c/log?follow=true",
    ] {
        let name = String::from_utf8_lossy(target).into_owned();
        group.bench_with_input(BenchmarkId::new("parse", name), target, |b, t| {
            b.iter(|| CanonicalPath::parse(black_box(t)));
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: this is a 2-core machine shared with other builds.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
