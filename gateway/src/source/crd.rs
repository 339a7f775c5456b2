//! The `AccessPolicy` custom resource (`nodegate.io/v1alpha1`, namespaced).
//!
//! ```yaml
//! apiVersion: nodegate.io/v1alpha1
//! kind: AccessPolicy
//! metadata: { name: grafana, namespace: monitoring }
//! spec:
//!   target: { service: grafana }            # or: { selector: { matchLabels: { tier: admin } } }
//!   mode: enforce                           # optional: enforce | audit (else the Service's)
//!   policy:                                 # the policy format of the static config
//!     allow:
//!       - id: sre
//!         when: { groups: [sre] }
//! ```
//!
//! The CRD and its `OpenAPI` v3 schema are generated from these types ([`crd`]); the policy part
//! of the schema comes from the policy wire types (`policy::wire`). The types here are the
//! *wire* form: [`AccessPolicyRule::parse`] turns an object into the domain form or an
//! error naming the field, which ends up in the object's status (`Accepted=False`).

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::model::Mode;
use crate::policy::wire::{PolicySpec, schema::open_object};
use crate::policy::{Policy, PolicyError};

/// The condition type every `AccessPolicy` carries.
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// Most label values a selector target may list; a bound on work per Service per policy.
const MAX_SELECTOR_LABELS: usize = 32;

/// What an `AccessPolicy` says.
#[derive(CustomResource, Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[expect(
    clippy::duplicated_attributes,
    reason = "kube's printcolumn(...) repeats `type_ = \"string\"` by design"
)]
#[kube(
    group = "nodegate.io",
    version = "v1alpha1",
    kind = "AccessPolicy",
    plural = "accesspolicies",
    singular = "accesspolicy",
    shortname = "ngap",
    category = "nodegate",
    namespaced,
    status = "AccessPolicyStatus",
    doc = "Who may reach a Service protected by Nodegate (label nodegate.io/protected=true).",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.target.service"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(deny_unknown_fields)]
#[schemars(
    transform = open_object,
    description = "Which protected Service(s) of this namespace, and who may reach them."
)]
pub struct AccessPolicySpec {
    /// The protected Service(s) of this namespace the policy applies to.
    pub target: TargetSpec,
    /// Overrides the Service's `nodegate.io/mode` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        description = "`enforce` or `audit` (let everything through, log what would be denied); \
                       default: the Service's nodegate.io/mode annotation, else enforce."
    )]
    pub mode: Option<Mode>,
    /// The policy, in the same format as a service's `policy` in the static config. Kept as
    /// written (the same reason as `RawService::policy`): its canonical text is versioned and
    /// it is parsed by the policy module's own wire types, with their error paths.
    #[schemars(
        schema_with = "policy_schema",
        description = "The same policy format as the static config: `default` (only deny), \
                       `deny` and `allow` rules `{id?, when: <condition>}`; deny wins, no match \
                       denies. An invalid policy is refused in the status and its Services allow \
                       nothing."
    )]
    pub policy: serde_json::Value,
}

/// Exactly one of `service` and `selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = target_schema)]
pub struct TargetSpec {
    /// Name of a Service in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Services of the policy's namespace whose labels include all of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<SelectorSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = open_object)]
pub struct SelectorSpec {
    #[serde(rename = "matchLabels", default)]
    pub match_labels: BTreeMap<String, String>,
}

/// Written by the gateways. Every node computes the same status from the same API state and
/// writes only when it differs, so N nodes converge without fighting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(description = "Written by the Nodegate gateways.")]
pub struct AccessPolicyStatus {
    /// `metadata.generation` the conditions describe.
    #[serde(
        rename = "observedGeneration",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<StatusCondition>,
    /// Protected Services (names, in this namespace) the policy currently applies to.
    #[serde(default)]
    pub services: Vec<String>,
}

/// The shape of `metav1.Condition`, without pulling k8s-openapi's schemars feature (which
/// adds `JsonSchema` to every Kubernetes type and minutes to the build).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(description = "A metav1.Condition; type `Accepted`.")]
pub struct StatusCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase: `Valid`, `InvalidSpec`, `InvalidTarget`, `InvalidPolicy`, `Conflict`.
    pub reason: String,
    pub message: String,
    #[serde(rename = "lastTransitionTime")]
    pub last_transition_time: String,
    #[serde(
        rename = "observedGeneration",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub observed_generation: Option<i64>,
}

fn policy_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    generator.subschema_for::<PolicySpec>()
}

fn target_schema(schema: &mut schemars::Schema) {
    open_object(schema);
    schema.insert("minProperties".into(), 1.into());
    schema.insert("maxProperties".into(), 1.into());
}

/// The CRD, as `gateway crd` prints it and `daemonset/crd.yaml` holds it.
pub fn crd() -> CustomResourceDefinition {
    AccessPolicy::crd()
}

/// The CRD as YAML.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Generated from the Rust types (gateway/src/source/crd.rs): do not edit, regenerate.\n",
    );
    out.push_str(&serde_yaml::to_string(&crd())?);
    Ok(out)
}

/// What an `AccessPolicy` targets, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Service(String),
    /// Non-empty: an empty selector would select every Service of the namespace, which is never
    /// what a policy that lost its labels (to a typo) meant.
    Selector(BTreeMap<String, String>),
}

impl Target {
    /// Whether a protected Service of the policy's namespace is targeted.
    pub fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::Service(target) => target == name,
            Self::Selector(want) => want.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }
}

/// A policy of an `AccessPolicy`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessPolicyRule {
    pub target: Target,
    pub mode: Option<Mode>,
    /// The document as written, for `config::ServicePolicy::from_value`.
    pub document: serde_yaml::Value,
}

/// Why an `AccessPolicy` was not accepted. The reason is the status condition's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    InvalidTarget(String),
    #[error("{0}")]
    InvalidPolicy(String),
}

impl SpecError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::InvalidTarget(_) => "InvalidTarget",
            Self::InvalidPolicy(_) => "InvalidPolicy",
        }
    }
}

impl AccessPolicyRule {
    /// Parses the `spec` of an object as the API server returned it (any JSON: the watcher
    /// keeps objects untyped so that one bad object cannot stop the stream).
    pub fn parse(spec: Option<&serde_json::Value>) -> Result<Self, SpecError> {
        let Some(spec) = spec else {
            return Err(SpecError::InvalidSpec("spec: missing".into()));
        };
        // Through YAML text rather than `serde_json::from_value`: serde_yaml names the path of
        // a bad field (`spec.target: unknown field ...`), serde_json does not.
        // `policy` is any JSON at this stage, so this only fails on `target`, `mode` or an
        // unknown field of the spec; the policy is parsed with its own paths below.
        let spec: AccessPolicySpec =
            from_json_via_yaml(spec).map_err(|e| SpecError::InvalidSpec(format!("spec.{e}")))?;
        let target = match (spec.target.service, spec.target.selector) {
            (Some(name), None) if valid_dns_label(&name) => Target::Service(name),
            (Some(name), None) => {
                return Err(SpecError::InvalidTarget(format!(
                    "spec.target.service: `{name}` is not a Service name"
                )));
            }
            (None, Some(sel)) if sel.match_labels.is_empty() => {
                return Err(SpecError::InvalidTarget(
                    "spec.target.selector.matchLabels: needs at least one label (an empty \
                     selector would select every Service)"
                        .into(),
                ));
            }
            (None, Some(sel)) if sel.match_labels.len() > MAX_SELECTOR_LABELS => {
                return Err(SpecError::InvalidTarget(format!(
                    "spec.target.selector.matchLabels: at most {MAX_SELECTOR_LABELS} labels"
                )));
            }
            (None, Some(sel)) => Target::Selector(sel.match_labels),
            _ => {
                return Err(SpecError::InvalidTarget(
                    "spec.target: give exactly one of `service` and `selector`".into(),
                ));
            }
        };
        let document = validate_policy(&spec.policy, "spec.policy")?;
        Ok(Self {
            target,
            mode: spec.mode,
            document,
        })
    }
}

/// The target of a spec that did not parse, read as far as it can be: an invalid policy whose
/// target is still recognisable must deny all on that target rather than leave the Service to
/// its annotation (which may allow more than the author of the broken policy meant).
pub fn lenient_target(spec: Option<&serde_json::Value>) -> Option<Target> {
    let target = spec?.get("target")?;
    if let Some(name) = target.get("service").and_then(serde_json::Value::as_str) {
        return Some(Target::Service(name.to_owned()));
    }
    let labels = target.get("selector")?.get("matchLabels")?.as_object()?;
    let labels: BTreeMap<String, String> = labels
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect();
    (!labels.is_empty()).then_some(Target::Selector(labels))
}

/// Validates a policy document (`default`/`deny`/`allow`) with the gateway's parser and returns
/// it as YAML for the proxy. `root` prefixes error paths.
pub fn validate_policy(
    value: &serde_json::Value,
    root: &str,
) -> Result<serde_yaml::Value, SpecError> {
    let document = serde_yaml::to_value(value)
        .map_err(|e| SpecError::InvalidPolicy(format!("{root}: {e}")))?;
    let spec: PolicySpec = from_yaml_value(&document).map_err(|e| {
        let text = e.to_string();
        // serde_yaml starts with the path inside the document when it has one.
        if e.location().is_some() && text.contains(": ") {
            SpecError::InvalidPolicy(format!("{root}.{}", strip_location(&text)))
        } else {
            SpecError::InvalidPolicy(format!("{root}: {}", strip_location(&text)))
        }
    })?;
    Policy::from_spec(spec, root)
        .map_err(|e: PolicyError| SpecError::InvalidPolicy(e.to_string()))?;
    Ok(document)
}

/// Parses a policy given as text (the `nodegate.io/policy` annotation: YAML or JSON).
pub fn validate_policy_text(text: &str, root: &str) -> Result<serde_yaml::Value, SpecError> {
    let value: serde_json::Value = serde_yaml::from_str(text)
        .map_err(|e| SpecError::InvalidPolicy(format!("{root}: not YAML: {e}")))?;
    validate_policy(&value, root)
}

fn from_json_via_yaml<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
) -> Result<T, String> {
    let text = serde_yaml::to_string(value).map_err(|e| e.to_string())?;
    serde_yaml::from_str(&text).map_err(|e| strip_location(&e.to_string()).to_owned())
}

fn from_yaml_value<T: serde::de::DeserializeOwned>(
    value: &serde_yaml::Value,
) -> Result<T, serde_yaml::Error> {
    // From text, not `from_value`: only the text parser tracks the path of an error.
    let text = serde_yaml::to_string(value)?;
    serde_yaml::from_str(&text)
}

/// `serde_yaml` appends ` at line L column C`, which refers to our re-serialised text, not to
/// anything the user wrote.
fn strip_location(text: &str) -> &str {
    text.split(" at line ").next().unwrap_or(text)
}

/// RFC 1035 label, the form of a Service name.
fn valid_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn valid_policy_by_name_and_by_selector() {
        let rule = AccessPolicyRule::parse(Some(&json!({
            "target": {"service": "grafana"},
            "mode": "audit",
            "policy": {"allow": [{"id": "sre", "when": {"groups": "sre"}}]}
        })))
        .expect("valid");
        assert_eq!(rule.target, Target::Service("grafana".into()));
        assert_eq!(rule.mode, Some(Mode::Audit));

        let rule = AccessPolicyRule::parse(Some(&json!({
            "target": {"selector": {"matchLabels": {"tier": "admin"}}},
            "policy": {"deny": [{"when": {"path": {"prefix": "/admin"}}}]}
        })))
        .expect("valid");
        let labels = BTreeMap::from([("tier".to_owned(), "admin".to_owned())]);
        assert!(rule.target.matches("anything", &labels));
        assert!(!rule.target.matches("anything", &BTreeMap::new()));
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let cases = [
            (
                json!({"target": {}, "policy": {}}),
                "InvalidTarget",
                "exactly one",
            ),
            (
                json!({"target": {"service": "a", "selector": {"matchLabels": {"a": "b"}}}, "policy": {}}),
                "InvalidTarget",
                "exactly one",
            ),
            (
                json!({"target": {"selector": {"matchLabels": {}}}, "policy": {}}),
                "InvalidTarget",
                "every Service",
            ),
            (
                json!({"target": {"service": "Web_1"}, "policy": {}}),
                "InvalidTarget",
                "not a Service name",
            ),
            (
                json!({"target": {"servce": "web"}, "policy": {}}),
                "InvalidSpec",
                "unknown field `servce`",
            ),
            (
                json!({"target": {"service": "web"}, "mode": "audti", "policy": {}}),
                "InvalidSpec",
                "audti",
            ),
            (
                json!({"target": {"service": "web"},
                       "policy": {"allow": [{"when": {"workload": {"namespce": "prod"}}}]}}),
                "InvalidPolicy",
                "spec.policy.allow[0].when.workload: unknown field `namespce`",
            ),
            (
                json!({"target": {"service": "web"},
                       "policy": {"allow": [{"when": {"groups": "a", "email": "b@c.d"}}]}}),
                "InvalidPolicy",
                "spec.policy.allow[0].when: a condition holds exactly one",
            ),
            (
                json!({"target": {"service": "web"},
                       "policy": {"allow": [{"when": {"source_cidr": "10.0.0.0/8"}}]}}),
                "InvalidPolicy",
                "source_cidr",
            ),
            (
                json!({"target": {"service": "web"}, "policy": {"default": "allow"}}),
                "InvalidPolicy",
                "spec.policy.default",
            ),
        ];
        for (spec, reason, needle) in cases {
            let err = AccessPolicyRule::parse(Some(&spec)).expect_err(&spec.to_string());
            assert_eq!(err.reason(), reason, "{spec}: {err}");
            assert!(err.to_string().contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn crd_schema_is_structural_where_it_matters() {
        let crd = serde_json::to_value(crd()).expect("crd json");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let text = schema.to_string();
        assert!(!text.contains("$ref"), "no $ref in a CRD schema");
        assert!(!text.contains("anyOf"), "no typed anyOf in a CRD schema");
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["required"], json!(["policy", "target"]));
        let when =
            &spec["properties"]["policy"]["properties"]["allow"]["items"]["properties"]["when"];
        assert_eq!(when["maxProperties"], json!(1));
        assert_eq!(when["x-kubernetes-preserve-unknown-fields"], json!(true));
        // Two typed levels, then kept as written.
        let inner = &when["properties"]["and"]["items"]["properties"]["not"];
        assert_eq!(inner["type"], json!("object"));
        assert!(inner.get("properties").is_none());
        assert_eq!(
            crd["spec"]["versions"][0]["subresources"]["status"],
            json!({})
        );
    }
}
