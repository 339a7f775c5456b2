//! Kubernetes `ServiceAccount` tokens: the workload named by a verified, projected SA token.
//!
//! A projected token (`TokenRequest` API) carries
//! `"kubernetes.io": {"namespace", "serviceaccount": {"name", "uid"}, "pod": {"name", "uid"}}` and
//! `sub = system:serviceaccount:<namespace>:<name>`. The structured claim is preferred; `sub` is the
//! fallback, and when both are present they must agree, so a token cannot name one workload to the
//! policy and another to the logs. Legacy secret-based tokens have no `exp` and never get here (the
//! verifier requires `exp`).

use serde_json::{Map, Value};

use super::identity::WorkloadRef;

const SUB_PREFIX: &str = "system:serviceaccount:";

/// Why the Kubernetes claims of a verified token do not name a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaClaimError {
    #[error("neither `kubernetes.io` nor a `system:serviceaccount:` subject is present")]
    Missing,
    #[error("`kubernetes.io` is not an object")]
    NotObject,
    #[error("`kubernetes.io.namespace` is missing or not a string")]
    NoNamespace,
    #[error("`kubernetes.io.serviceaccount.name` is missing or not a string")]
    NoServiceAccount,
    #[error("`sub` is not `system:serviceaccount:<namespace>:<name>`")]
    BadSubject,
    #[error("`sub` names a different namespace or service account than `kubernetes.io`")]
    Conflict,
    #[error("the namespace is not a valid Kubernetes name")]
    BadNamespace,
    #[error("the service account name is not a valid Kubernetes name")]
    BadServiceAccount,
    #[error("`kubernetes.io.pod.name` is not a valid Kubernetes name")]
    BadPod,
}

impl SaClaimError {
    /// The claim at fault, for the decision log.
    #[must_use]
    pub fn claim(self) -> &'static str {
        match self {
            Self::BadSubject | Self::Conflict => "sub",
            Self::Missing | Self::NotObject => "kubernetes.io",
            Self::NoNamespace | Self::BadNamespace => "kubernetes.io.namespace",
            Self::NoServiceAccount | Self::BadServiceAccount => "kubernetes.io.serviceaccount.name",
            Self::BadPod => "kubernetes.io.pod.name",
        }
    }

    /// A short reason, for the decision log.
    #[must_use]
    pub fn why(self) -> &'static str {
        match self {
            Self::Missing => "is missing",
            Self::NotObject => "is not an object",
            Self::NoNamespace | Self::NoServiceAccount => "is missing or not a string",
            Self::BadSubject => "is not system:serviceaccount:<namespace>:<name>",
            Self::Conflict => "disagrees with kubernetes.io",
            Self::BadNamespace | Self::BadServiceAccount | Self::BadPod => {
                "is not a valid Kubernetes name"
            }
        }
    }
}

/// The workload named by a verified SA token's claims.
///
/// # Errors
/// Which claim is missing, malformed or inconsistent.
pub fn workload_from_claims(claims: &Map<String, Value>) -> Result<WorkloadRef, SaClaimError> {
    let from_sub = match claims.get("sub") {
        Some(Value::String(sub)) => Some(parse_sub(sub).ok_or(SaClaimError::BadSubject)?),
        Some(_) => return Err(SaClaimError::BadSubject),
        None => None,
    };
    let workload = match claims.get("kubernetes.io") {
        Some(Value::Object(k8s)) => {
            let namespace = k8s
                .get("namespace")
                .and_then(Value::as_str)
                .ok_or(SaClaimError::NoNamespace)?;
            let service_account = k8s
                .get("serviceaccount")
                .and_then(|sa| sa.get("name"))
                .and_then(Value::as_str)
                .ok_or(SaClaimError::NoServiceAccount)?;
            if from_sub.is_some_and(|(ns, sa)| ns != namespace || sa != service_account) {
                return Err(SaClaimError::Conflict);
            }
            let pod = match k8s.get("pod").and_then(|p| p.get("name")) {
                None | Some(Value::Null) => None,
                Some(Value::String(name)) if is_dns_subdomain(name) => Some(name.clone()),
                Some(_) => return Err(SaClaimError::BadPod),
            };
            WorkloadRef {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                pod,
            }
        }
        Some(_) => return Err(SaClaimError::NotObject),
        None => {
            let (namespace, service_account) = from_sub.ok_or(SaClaimError::Missing)?;
            WorkloadRef {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                pod: None,
            }
        }
    };
    // Names end up in policy matches and log lines: only what the API server itself would accept.
    if !is_dns_label(&workload.namespace) {
        return Err(SaClaimError::BadNamespace);
    }
    if !is_dns_subdomain(&workload.service_account) {
        return Err(SaClaimError::BadServiceAccount);
    }
    Ok(workload)
}

/// `system:serviceaccount:<ns>:<name>` → `(ns, name)`.
fn parse_sub(sub: &str) -> Option<(&str, &str)> {
    let rest = sub.strip_prefix(SUB_PREFIX)?;
    let (ns, name) = rest.split_once(':')?;
    (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then_some((ns, name))
}

/// RFC 1123 label, as Kubernetes checks namespace names.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// RFC 1123 subdomain, as Kubernetes checks service account and pod names.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run(v: &Value) -> Result<WorkloadRef, SaClaimError> {
        workload_from_claims(v.as_object().expect("object"))
    }

    #[test]
    fn projected_token() {
        let w = run(&json!({
            "sub": "system:serviceaccount:shop:checkout",
            "kubernetes.io": {
                "namespace": "shop",
                "serviceaccount": {"name": "checkout", "uid": "u1"},
                "pod": {"name": "checkout-7d9f-abcde", "uid": "u2"}
            }
        }))
        .expect("valid");
        assert_eq!(
            w,
            WorkloadRef {
                namespace: "shop".into(),
                service_account: "checkout".into(),
                pod: Some("checkout-7d9f-abcde".into())
            }
        );
    }

    #[test]
    fn sub_fallback() {
        let w = run(&json!({"sub": "system:serviceaccount:ns1:sa.one"})).expect("valid");
        assert_eq!(
            (w.namespace.as_str(), w.service_account.as_str(), w.pod),
            ("ns1", "sa.one", None)
        );
    }

    #[test]
    fn rejections() {
        let k8s = |ns: &str, sa: &str| json!({"namespace": ns, "serviceaccount": {"name": sa}});
        let cases = [
            (json!({}), SaClaimError::Missing),
            (json!({"sub": "alice"}), SaClaimError::BadSubject),
            (
                json!({"sub": "system:serviceaccount:ns"}),
                SaClaimError::BadSubject,
            ),
            (
                json!({"sub": "system:serviceaccount:ns:a:b"}),
                SaClaimError::BadSubject,
            ),
            (json!({"sub": 5}), SaClaimError::BadSubject),
            (json!({"kubernetes.io": "x"}), SaClaimError::NotObject),
            (
                json!({"kubernetes.io": {"serviceaccount": {"name": "a"}}}),
                SaClaimError::NoNamespace,
            ),
            (
                json!({"kubernetes.io": {"namespace": "a"}}),
                SaClaimError::NoServiceAccount,
            ),
            (
                json!({"sub": "system:serviceaccount:a:b", "kubernetes.io": k8s("a", "c")}),
                SaClaimError::Conflict,
            ),
            (
                json!({"sub": "system:serviceaccount:x:b", "kubernetes.io": k8s("a", "b")}),
                SaClaimError::Conflict,
            ),
            (
                json!({"kubernetes.io": k8s("Bad_NS", "b")}),
                SaClaimError::BadNamespace,
            ),
            (
                json!({"kubernetes.io": k8s("a", "b c")}),
                SaClaimError::BadServiceAccount,
            ),
            (
                json!({"sub": "system:serviceaccount:-a:b"}),
                SaClaimError::BadNamespace,
            ),
            (
                json!({"kubernetes.io": {"namespace": "a", "serviceaccount": {"name": "b"}, "pod": {"name": "P"}}}),
                SaClaimError::BadPod,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(run(&input), Err(want), "{input}");
        }
    }
}
