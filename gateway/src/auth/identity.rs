//! The authenticated principal handed to policy and the decision log, and the claim mapping that
//! builds it from a verified token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};

use super::config::{ClaimPath, IssuerKind, IssuerSettings};
use super::jwt::AuthError;
use super::sa;

/// What kind of principal made the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    User,
    Workload,
    /// No credential was presented (policy may still allow, e.g. a public path).
    Anonymous,
}

impl IdentityKind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Workload => "workload",
            Self::Anonymous => "anonymous",
        }
    }
}

/// A Kubernetes workload, as named by a `ServiceAccount` token (or, later, by the node's view of
/// the source pod).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct WorkloadRef {
    pub namespace: String,
    pub service_account: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// A verified principal. Built only from a token whose signature, issuer, audience and validity
/// window were checked, or as [`Identity::anonymous`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Identity {
    pub kind: IdentityKind,
    /// The mapped user claim (`sub` by default); `system:serviceaccount:<ns>:<sa>` for SA tokens.
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub groups: Vec<String>,
    /// The token's `iss` (the configured issuer URL); empty for anonymous.
    pub issuer: String,
    /// The configured issuer's short name (logs, metrics); empty for anonymous.
    pub issuer_name: String,
    /// Every claim of the token, for `claim` policy criteria.
    #[serde(skip)]
    pub claims: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    /// The token's `exp`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "unix_seconds"
    )]
    pub expires_at: Option<SystemTime>,
}

impl Identity {
    #[must_use]
    pub fn anonymous() -> Self {
        Self {
            kind: IdentityKind::Anonymous,
            subject: String::new(),
            email: None,
            groups: Vec::new(),
            issuer: String::new(),
            issuer_name: String::new(),
            claims: Map::new(),
            workload: None,
            expires_at: None,
        }
    }

    /// Maps the claims of a verified token through the issuer's claim mapping.
    pub(super) fn from_verified(
        settings: &IssuerSettings,
        claims: Map<String, Value>,
        exp: u64,
    ) -> Result<Self, AuthError> {
        let bad = |claim: &ClaimPath, why: &'static str| AuthError::BadClaim {
            issuer: settings.name.clone(),
            claim: claim.as_str().to_owned(),
            why,
        };
        let mapping = &settings.claims;
        let subject = match mapping.user.get(&claims) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(bad(&mapping.user, "is empty")),
            Some(_) => return Err(bad(&mapping.user, "is not a string")),
            None => {
                return Err(AuthError::MissingClaim {
                    issuer: settings.name.clone(),
                    claim: mapping.user.as_str().to_owned(),
                });
            }
        };
        let email = match mapping.email.get(&claims) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(bad(&mapping.email, "is not a string")),
        };
        let mut groups = match mapping.groups.get(&claims) {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => parse_groups(v)
                .ok_or_else(|| bad(&mapping.groups, "is not a string or an array of strings"))?,
        };

        let (kind, workload) = match settings.kind {
            IssuerKind::User => (IdentityKind::User, None),
            IssuerKind::Workload => (IdentityKind::Workload, None),
            IssuerKind::Kubernetes => {
                let workload =
                    sa::workload_from_claims(&claims).map_err(|e| AuthError::BadClaim {
                        issuer: settings.name.clone(),
                        claim: e.claim().to_owned(),
                        why: e.why(),
                    })?;
                // The API server's own authenticator puts every SA in these two groups; mirroring it
                // lets a policy say "any SA of namespace X" the way RBAC does.
                groups.push("system:serviceaccounts".to_owned());
                groups.push(format!("system:serviceaccounts:{}", workload.namespace));
                (IdentityKind::Workload, Some(workload))
            }
        };

        Ok(Self {
            kind,
            subject,
            email,
            groups,
            issuer: settings.issuer.clone(),
            issuer_name: settings.name.clone(),
            claims,
            workload,
            expires_at: UNIX_EPOCH.checked_add(Duration::from_secs(exp)),
        })
    }
}

/// Groups as an array of strings, or one string separated by spaces and/or commas (the OAuth
/// `scope` style some identity providers use). Anything else is refused rather than half-read: dropping an
/// entry silently could skip a `deny` rule keyed on that group.
pub(super) fn parse_groups(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
            .collect(),
        Value::String(s) => Some(
            s.split(|c: char| c == ',' || c.is_ascii_whitespace())
                .filter(|g| !g.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        _ => None,
    }
}

#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes the field by reference"
)]
fn unix_seconds<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    s.serialize_some(&secs)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn groups_forms() {
        let cases = [
            (json!(["a", "b"]), Some(vec!["a", "b"])),
            (json!("a b"), Some(vec!["a", "b"])),
            (json!("a,b, c"), Some(vec!["a", "b", "c"])),
            (json!(""), Some(vec![])),
            (json!([]), Some(vec![])),
            (json!(["a", 1]), None),
            (json!([""]), None),
            (json!(7), None),
            (json!({"a": 1}), None),
        ];
        for (input, want) in cases {
            let want = want.map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>());
            assert_eq!(parse_groups(&input), want, "{input}");
        }
    }

    #[test]
    fn anonymous_serializes_compactly() {
        let v = serde_json::to_value(Identity::anonymous()).expect("json");
        assert_eq!(v["kind"], "anonymous");
        assert!(v.get("claims").is_none());
        assert!(v.get("expires_at").is_none());
    }
}
