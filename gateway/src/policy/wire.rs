//! Wire format: the serde types of the policy YAML (and, later, of the `AccessPolicy` CRD spec).
//!
//! These types only describe *shape*. Every field is optional where the format allows it and
//! unknown fields are refused (`deny_unknown_fields`, so a typo such as `grups:` is an error that
//! names its path instead of a silently ignored criterion). Meaning is checked in
//! [`super::model`], which turns these into domain types with `TryFrom`.
//!
//! `JsonSchema` (for the `AccessPolicy` CRD) is derived where the shape is a plain struct and
//! written by hand in [`schema`] where Kubernetes' structural-schema rules cannot express the
//! format: the recursive condition, "a string or a list of strings" and any-scalar `equals`.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

/// A whole policy file: `policy:` at the top level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    pub policy: PolicySpec,
}

/// The policy of one service (also the future CRD `spec`).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schema::open_object)]
pub struct PolicySpec {
    /// Only `deny` is accepted; kept as a string so that any other value gets our own message.
    #[schemars(
        description = "Only `deny` (the default): a request no allow rule matches is denied."
    )]
    #[serde(default)]
    pub default: Option<String>,
    #[schemars(description = "Rules that deny; a matching deny rule wins over every allow rule.")]
    #[serde(default)]
    pub deny: Vec<RuleSpec>,
    #[schemars(description = "Rules that allow; no match denies.")]
    #[serde(default)]
    pub allow: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schema::open_object)]
pub struct RuleSpec {
    /// Missing ids become `allow[3]` / `deny[0]` (the rule's position).
    #[schemars(
        description = "Rule id for the decision log (1-128 of A-Za-z0-9._:-); default `allow[N]` / `deny[N]`."
    )]
    #[serde(default)]
    pub id: Option<String>,
    #[schemars(description = "When the rule applies: exactly one criterion or combinator.")]
    pub when: ConditionSpec,
}

/// One condition: exactly one of the keys below must be present (checked in the model; a map
/// with two criteria would leave the reader guessing between "and" and "or").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    #[serde(default)]
    pub and: Option<Vec<ConditionSpec>>,
    #[serde(default)]
    pub or: Option<Vec<ConditionSpec>>,
    #[serde(default)]
    pub not: Option<Box<ConditionSpec>>,
    #[serde(default)]
    pub user: Option<StringList>,
    #[serde(default)]
    pub email: Option<StringList>,
    #[serde(default)]
    pub email_domain: Option<StringList>,
    #[serde(default)]
    pub groups: Option<StringList>,
    #[serde(default)]
    pub claim: Option<ClaimSpec>,
    #[serde(default)]
    pub issuer: Option<StringList>,
    #[serde(default)]
    pub spiffe_id: Option<StringList>,
    #[serde(default)]
    pub workload: Option<WorkloadSpec>,
    #[serde(default)]
    pub method: Option<StringList>,
    #[serde(default)]
    pub host: Option<StringList>,
    #[serde(default)]
    pub path: Option<PathSpec>,
    #[serde(default)]
    pub source_cidr: Option<StringList>,
    #[serde(default)]
    pub time_window: Option<TimeWindowSpec>,
}

impl JsonSchema for ConditionSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ConditionSpec".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schema::condition(generator, schema::TYPED_CONDITION_LEVELS)
    }
}

/// `claim: { name: team, equals: platform }` or `claim: { name: groups, contains: x }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schema::open_object)]
pub struct ClaimSpec {
    #[schemars(description = "Top-level claim name (not split on dots).")]
    pub name: String,
    /// Any YAML value, its type kept (no coercion between `"3"` and `3`). `equals: ~` is
    /// `Some(Null)`, not "absent", so that it is refused rather than read as a missing operator.
    #[serde(default, deserialize_with = "present")]
    #[schemars(schema_with = "schema::any_scalar")]
    pub equals: Option<serde_json::Value>,
    #[schemars(description = "String claim: substring; array claim: an element equal to it.")]
    #[serde(default)]
    pub contains: Option<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schema::open_object)]
pub struct WorkloadSpec {
    #[schemars(description = "Namespace of the calling workload.")]
    #[serde(default)]
    pub namespace: Option<String>,
    #[schemars(description = "ServiceAccount of the calling workload.")]
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: Option<Labels>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schema::open_object)]
pub struct PathSpec {
    #[schemars(description = "The whole decoded path.")]
    #[serde(default)]
    pub exact: Option<String>,
    #[schemars(
        description = "Segment-aware prefix: `/admin` matches `/admin/x`, not `/administrator`."
    )]
    #[serde(default)]
    pub prefix: Option<String>,
    #[schemars(description = "`*` within a segment, `**` for whole segments.")]
    #[serde(default)]
    pub glob: Option<String>,
}

/// `time_window: { days: [mon..fri], from: "08:00", to: "18:00", tz: UTC }`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = schema::open_object)]
pub struct TimeWindowSpec {
    #[schemars(description = "Days (`mon`..`sun`) or ranges (`mon..fri`); default every day.")]
    #[serde(default)]
    pub days: Option<Vec<String>>,
    #[schemars(description = "Start, `HH:MM`, inclusive; default 00:00.")]
    #[serde(default)]
    pub from: Option<String>,
    #[schemars(description = "End, `HH:MM`, exclusive (24:00 allowed); default 24:00.")]
    #[serde(default)]
    pub to: Option<String>,
    #[schemars(description = "`UTC` or a fixed offset like `+02:00`; default UTC.")]
    #[serde(default)]
    pub tz: Option<String>,
}

/// A string or a list of strings: `email_domain: example.com` and `groups: [a, b]` both read
/// naturally. Written as a visitor rather than `#[serde(untagged)]` so that a wrong type gets a
/// precise message ("expected a string or a list of strings") instead of serde's generic
/// "data did not match any variant".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StringList(pub Vec<String>);

impl JsonSchema for StringList {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StringList".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schema::string_list()
    }
}

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor;

        impl<'de> Visitor<'de> for ListVisitor {
            type Value = StringList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings (quote numbers: '1234')")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList(vec![v.to_owned()]))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<StringList, E> {
                Ok(StringList(vec![v]))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                // Bounded pre-allocation: the size hint comes from the document.
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(StrictString(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(StringList(items))
            }
        }

        deserializer.deserialize_any(ListVisitor)
    }
}

/// A list item that must be a YAML string. serde's own `String` would accept the plain scalar
/// `1234` in a list but not on its own; requiring quotes in both places keeps the two spellings
/// of a list equivalent and avoids YAML's implicit typing (`1.50` read as `1.5`).
struct StrictString(String);

impl<'de> Deserialize<'de> for StrictString {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;

        impl Visitor<'_> for StrVisitor {
            type Value = StrictString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (quote numbers: '1234')")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<StrictString, E> {
                Ok(StrictString(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<StrictString, E> {
                Ok(StrictString(v))
            }
        }

        deserializer.deserialize_any(StrVisitor)
    }
}

/// For `#[serde(default, deserialize_with = "present")]`: a key that is present yields `Some`,
/// whatever its value (including null); an absent key falls back to `None` through `default`.
fn present<'de, D: de::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(deserializer).map(Some)
}

/// Label selector `{key: value}`. `serde_yaml` keeps the last of two equal keys in a map; here a
/// duplicate is an error, since `{team: a, team: b}` can only be a mistake and silently keeping
/// one of them would change who matches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(pub BTreeMap<String, String>);

impl JsonSchema for Labels {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Labels".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "object",
            "description": "Label names to values; all must be present on the workload.",
            "additionalProperties": {"type": "string"}
        })
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;

        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = Labels;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label names to string values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Labels, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((StrictString(k), StrictString(v))) = map.next_entry()? {
                    if out.contains_key(&k) {
                        return Err(de::Error::custom(format_args!("duplicate label `{k}`")));
                    }
                    out.insert(k, v);
                }
                Ok(Labels(out))
            }
        }

        deserializer.deserialize_map(LabelsVisitor)
    }
}

/// The parts of the CRD schema written by hand.
///
/// The API server accepts only *structural* schemas: every node has a `type` (or is marked
/// `x-kubernetes-preserve-unknown-fields`), there is no `$ref`, and no `type` inside `anyOf`
/// (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#specifying-a-structural-schema>).
/// Three things in the policy format cannot be said that way and are written here:
/// - the condition is recursive (`and`/`or`/`not` hold conditions): schemars would emit a
///   `$ref`, so the schema is unrolled for [`TYPED_CONDITION_LEVELS`] levels and deeper operands
///   are kept as written, for the gateway to check;
/// - "a string or a list of strings" ([`StringList`]) and the any-scalar `claim.equals` need two
///   types at one node: such a node is left untyped (`x-kubernetes-preserve-unknown-fields`).
///
/// Everything the schema cannot check is checked by the gateway's parser (the same one as for
/// the static config), which reports it in the `AccessPolicy` status and denies all access to the
/// targeted services: the schema gives early `kubectl apply` errors, never the final word.
pub mod schema {
    use schemars::{Schema, SchemaGenerator, json_schema};

    use super::{ClaimSpec, PathSpec, TimeWindowSpec, WorkloadSpec};

    /// Levels of conditions the API server types. Each level adds three copies of the one below
    /// it (`and`, `or`, `not`), so the schema grows by 3^n: two levels keep the CRD small and
    /// cover what policies nest in practice. The gateway accepts up to 16.
    pub const TYPED_CONDITION_LEVELS: usize = 2;

    /// Container transform for every policy object: unknown fields are *kept*, not pruned.
    ///
    /// The API server silently drops fields a structural schema does not list. For a policy that
    /// would widen access: in `workload: {namespce: prod, service_account: deployer}` the misspelt
    /// key would vanish and the rule would match `deployer` in every namespace. Kept, it reaches
    /// the gateway's parser (`deny_unknown_fields`), which rejects the policy with the field's path.
    pub fn open_object(schema: &mut Schema) {
        schema.remove("additionalProperties");
        schema.insert(
            "x-kubernetes-preserve-unknown-fields".to_owned(),
            serde_json::Value::Bool(true),
        );
    }

    /// `claim.equals`: a string, a number or a boolean, type kept (no coercion).
    pub fn any_scalar(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A string, number or boolean, compared with its type (\"3\" is not 3).",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }

    /// A string or a list of strings.
    pub fn string_list() -> Schema {
        json_schema!({
            "description": "A string or a list of strings (quote numbers: '1234').",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }

    /// One condition: a map with exactly one key. `levels` typed levels remain below this one.
    pub fn condition(generator: &mut SchemaGenerator, levels: usize) -> Schema {
        if levels == 0 {
            return json_schema!({
                "type": "object",
                "description": "A nested condition (checked by the gateway).",
                "x-kubernetes-preserve-unknown-fields": true
            });
        }
        let operand = condition(generator, levels - 1);
        let list = |description: &str| {
            json_schema!({
                "type": "array",
                "description": description,
                "minItems": 1,
                "items": operand.clone()
            })
        };
        let mut properties = serde_json::Map::new();
        properties.insert("and".into(), list("All of these conditions.").to_value());
        properties.insert("or".into(), list("Any of these conditions.").to_value());
        properties.insert("not".into(), operand.clone().to_value());
        for (key, description) in [
            ("user", "Identity subject (user identities only); exact."),
            ("email", "Verified e-mail; ASCII case-insensitive."),
            (
                "email_domain",
                "Domain of the e-mail; case-insensitive, exact.",
            ),
            ("groups", "Any of the identity's groups; exact."),
            ("issuer", "Token issuer; exact."),
            (
                "spiffe_id",
                "SPIFFE ID of the verified client certificate; exact, or `<id>/*` below it.",
            ),
            ("method", "Upper-case HTTP methods."),
            ("host", "Host names, `name` or `*.suffix`, without port."),
            (
                "source_cidr",
                "Source networks; only inside an `and` with an identity criterion.",
            ),
        ] {
            let mut list = string_list();
            list.insert("description".into(), description.into());
            properties.insert(key.into(), list.to_value());
        }
        properties.insert(
            "claim".into(),
            generator.subschema_for::<ClaimSpec>().to_value(),
        );
        properties.insert(
            "workload".into(),
            generator.subschema_for::<WorkloadSpec>().to_value(),
        );
        properties.insert(
            "path".into(),
            generator.subschema_for::<PathSpec>().to_value(),
        );
        properties.insert(
            "time_window".into(),
            generator.subschema_for::<TimeWindowSpec>().to_value(),
        );
        json_schema!({
            "type": "object",
            "description": "Exactly one criterion or combinator (and, or, not).",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": properties,
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}
