//! Wire format: the serde types of the policy YAML (and, later, of the `AccessPolicy` CRD spec).
//!
//! These types only describe *shape*. Every field is optional where the format allows it and
//! unknown fields are refused (`deny_unknown_fields`, so a typo such as `grups:` is an error that
//! names its path instead of a silently ignored criterion). Meaning is checked in
//! [`super::model`], which turns these into domain types with `TryFrom`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};

/// A whole policy file: `policy:` at the top level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    pub policy: PolicySpec,
}

/// The policy of one service (also the future CRD `spec`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// Only `deny` is accepted; kept as a string so that any other value gets our own message.
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub deny: Vec<RuleSpec>,
    #[serde(default)]
    pub allow: Vec<RuleSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Missing ids become `allow[3]` / `deny[0]` (the rule's position).
    #[serde(default)]
    pub id: Option<String>,
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

/// `claim: { name: team, equals: platform }` or `claim: { name: groups, contains: x }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimSpec {
    pub name: String,
    /// Any YAML value, its type kept (no coercion between `"3"` and `3`). `equals: ~` is
    /// `Some(Null)`, not "absent", so that it is refused rather than read as a missing operator.
    #[serde(default, deserialize_with = "present")]
    pub equals: Option<serde_json::Value>,
    #[serde(default)]
    pub contains: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub labels: Option<Labels>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSpec {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub glob: Option<String>,
}

/// `time_window: { days: [mon..fri], from: "08:00", to: "18:00", tz: UTC }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindowSpec {
    #[serde(default)]
    pub days: Option<Vec<String>>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub tz: Option<String>,
}

/// A string or a list of strings: `email_domain: example.com` and `groups: [a, b]` both read
/// naturally. Written as a visitor rather than `#[serde(untagged)]` so that a wrong type gets a
/// precise message ("expected a string or a list of strings") instead of serde's generic
/// "data did not match any variant".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StringList(pub Vec<String>);

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
