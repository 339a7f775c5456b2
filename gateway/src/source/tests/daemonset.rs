//! `daemonset/` agrees with the Rust types: the CRD is what they generate, and every example
//! policy is accepted by the gateway's parser (the schema check in `validate.sh` cannot run the
//! semantic checks).

use std::path::PathBuf;

use crate::source::crd::{AccessPolicyRule, crd_yaml, validate_policy_text};
use serde::Deserialize as _;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../daemonset")
}

fn docs(file: &str) -> Vec<serde_json::Value> {
    let path = dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_json::Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

#[test]
fn crd_yaml_is_generated_from_the_types() {
    let path = dir().join("crd.yaml");
    let on_disk =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let generated = crd_yaml().expect("render");
    assert!(
        on_disk == generated,
        "{} is stale: regenerate it (`gateway crd > daemonset/crd.yaml`)",
        path.display()
    );
}

#[test]
fn example_policies_are_accepted_by_the_gateway_parser() {
    let policies: Vec<_> = docs("examples/accesspolicy.yaml")
        .into_iter()
        .filter(|d| d["kind"] == "AccessPolicy")
        .collect();
    assert_eq!(policies.len(), 2, "the two examples");
    for p in &policies {
        AccessPolicyRule::parse(p.get("spec"))
            .unwrap_or_else(|e| panic!("{}: {e}", p["metadata"]["name"]));
    }
    let mut annotated = 0;
    for svc in docs("examples/protected-service.yaml") {
        if let Some(text) = svc["metadata"]["annotations"]["nodegate.io/policy"].as_str() {
            validate_policy_text(text, "annotation")
                .unwrap_or_else(|e| panic!("{}: {e}", svc["metadata"]["name"]));
            annotated += 1;
        }
    }
    assert_eq!(annotated, 1);
}
