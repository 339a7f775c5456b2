//! What the gateway would decide for one HTTP request, the rule that decided and every rule's
//! verdict: the core of `gateway explain`. The same evaluation runs on a config file (the CLI
//! with `--config`) and on the running daemon's live state (the admin server's
//! `POST /explain`: the services a Kubernetes source protects, their `AccessPolicy`, the pods
//! seen on the node, the issuers' keys as loaded), in the gateway's order: path (400), Host
//! (421), the token (401), then the policy.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    auth::Authenticator,
    ebpf::Mode,
    policy::{self, CanonicalPath, RequestContext, RuleTrace, Verdict},
    proxy::{
        http::authn::policy_identity,
        routes::{Routes, ServiceRoute},
    },
    telemetry::decision::mode_str,
};

/// Names listed at most in the error for an unknown service (a cluster may protect many).
const LIST_SERVICES_MAX: usize = 20;

/// The request to explain. Also the JSON body of the admin server's `POST /explain`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// The service (with a policy): its config name, or `namespace/name` for a Service the
    /// Kubernetes source protects.
    pub service: String,
    #[serde(default = "default_method")]
    pub method: String,
    /// The request target as sent (`/path?query`).
    pub path: String,
    #[serde(default)]
    pub host: Option<String>,
    /// A bearer token (the JWT), verified with the issuers' keys.
    #[serde(default)]
    pub token: Option<String>,
    /// Claims, NOT verified: a dry run of what a token with them would get.
    #[serde(default)]
    pub claims: Option<serde_json::Map<String, Value>>,
    /// The calling workload, `namespace/service-account`.
    #[serde(default)]
    pub workload: Option<String>,
    /// The source address (`source_cidr`, and the workload of a pod or static workload).
    #[serde(default)]
    pub source: Option<IpAddr>,
    /// The SPIFFE ID of a verified client certificate.
    #[serde(default)]
    pub spiffe_id: Option<String>,
}

fn default_method() -> String {
    "GET".to_owned()
}

/// A query that cannot be explained (unknown service, malformed input): exit code 64 in the
/// CLI, `400` from the admin server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadQuery(pub String);

/// The explanation; `gateway explain --json` prints it as it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explained {
    pub service: String,
    pub mode: String,
    pub policy_version: String,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub identity: IdentityOut,
    pub workload: Option<WorkloadOut>,
    /// `allow` or `deny` (the policy's verdict; in audit mode a deny is forwarded as
    /// `would_deny`).
    pub decision: String,
    pub reason: String,
    pub rule: Option<String>,
    pub rules: Vec<RuleTrace>,
    pub notes: Vec<String>,
    /// The source address asked about.
    pub src: Option<IpAddr>,
    /// `config` (a file) or `live` (the running daemon).
    pub state: String,
}

impl Explained {
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.decision == "allow"
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityOut {
    pub kind: String,
    pub subject: Option<String>,
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub issuer: Option<String>,
    /// `token` (verified), `claims` (unverified dry run) or `none`.
    pub from: String,
}

impl IdentityOut {
    fn anonymous() -> Self {
        Self {
            kind: "anonymous".into(),
            subject: None,
            email: None,
            groups: Vec::new(),
            issuer: None,
            from: "none".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadOut {
    pub namespace: String,
    pub service_account: String,
    /// The pod the source address belongs to, when the source named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// Where the explanation's state comes from (said in its output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Config,
    Live,
}

impl Origin {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Live => "live",
        }
    }
}

/// Explains `query` against `routes` (the services, their policies and the workloads) and
/// `auth` (the issuers and their keys as loaded). `notes` are carried into the output (e.g.
/// keys that could not be loaded).
///
/// # Errors
/// [`BadQuery`] for an unknown service, an L4 service without a source address, a malformed
/// SPIFFE ID, workload or claims.
pub fn explain(
    routes: &Routes,
    auth: &Authenticator,
    query: &Query,
    origin: Origin,
    mut notes: Vec<String>,
) -> Result<Explained, BadQuery> {
    if let Some(id) = &query.spiffe_id {
        policy::spiffe::check_id(id).map_err(|e| BadQuery(format!("spiffe id {id:?}: {e}")))?;
    }
    let service = routes
        .services()
        .find(|s| *s.name == *query.service)
        .ok_or_else(|| unknown_service(routes, &query.service))?;
    let Some(http) = &service.http else {
        return explain_l4(service, query, origin, notes);
    };
    let (identity, identity_out, auth_refusal) = identity(auth, query, &mut notes)?;
    let workload = workload(routes, query)?;

    let mut out = Explained {
        service: service.name.to_string(),
        mode: mode_str(service.mode).to_owned(),
        policy_version: http.policy.version.to_string(),
        method: query.method.clone(),
        path: query.path.clone(),
        host: query.host.clone(),
        identity: identity_out,
        workload: workload.as_ref().map(|(w, pod)| WorkloadOut {
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            pod: pod.clone(),
        }),
        decision: String::new(),
        reason: String::new(),
        rule: None,
        rules: Vec::new(),
        notes,
        src: query.source,
        state: origin.as_str().to_owned(),
    };
    let allowed = match CanonicalPath::parse(query.path.as_bytes()) {
        Err(err) => {
            err.reason_code().clone_into(&mut out.reason);
            out.notes
                .push(format!("the gateway answers 400 before policy: {err}"));
            false
        }
        Ok(path) => {
            let explanation = http.policy.compiled.explain(&RequestContext {
                identity: identity.view(),
                workload: workload.as_ref().map(|(w, _)| w),
                source_ip: query.source,
                spiffe_id: query.spiffe_id.as_deref(),
                method: &query.method,
                host: query.host.as_deref(),
                path: &path,
                now: now_unix(),
            });
            out.rules = explanation.rules;
            out.rule = explanation.decision.rule_id.as_deref().map(str::to_owned);
            explanation
                .decision
                .reason
                .as_str()
                .clone_into(&mut out.reason);
            // The gateway's order: Host (421) before authentication, a refused token (401)
            // before the rules.
            if !http.serves_host(query.host.as_deref()) {
                "host_not_served".clone_into(&mut out.reason);
                out.rule = None;
                out.notes.push(format!(
                    "host {:?} is not in http.hosts: the gateway answers 421 before policy",
                    query.host.as_deref().unwrap_or_default()
                ));
                false
            } else if let Some(reason) = auth_refusal {
                reason.clone_into(&mut out.reason);
                out.rule = None;
                false
            } else {
                explanation.decision.verdict == Verdict::Allow
            }
        }
    };
    // Checked per connection before any request: its refusal is the answer, whatever the
    // request's own verdict.
    let connection = connection_allowed(service, query, &mut out);
    let allowed = connection && allowed;
    if allowed { "allow" } else { "deny" }.clone_into(&mut out.decision);
    if !allowed && service.mode == Mode::Audit {
        out.notes.push(
            "the service is in audit mode: this request is forwarded and logged as would_deny"
                .into(),
        );
    }
    Ok(out)
}

/// An HTTP service's `allow_sources`, when it lists any, is checked per connection before any
/// request: a source it does not allow is refused there (in enforce mode), whatever the
/// policy says.
fn connection_allowed(service: &ServiceRoute, query: &Query, out: &mut Explained) -> bool {
    let sources = &service.rule.allow_sources;
    if sources.is_empty() {
        return true;
    }
    let list = list_sources(&service.rule);
    let Some(source) = query.source else {
        out.notes.push(format!(
            "allow_sources ({list}) is checked per connection before any request: give the \
             source to include it"
        ));
        return true;
    };
    if service.rule.allows(source) {
        return true;
    }
    match service.mode {
        Mode::Enforce => {
            "source_not_allowed".clone_into(&mut out.reason);
            out.rule = None;
            out.notes.push(format!(
                "{source} is not in allow_sources ({list}): the connection is refused before \
                 any request"
            ));
            false
        }
        Mode::Audit => {
            out.notes.push(format!(
                "{source} is not in allow_sources ({list}): in audit mode the connection is \
                 logged as would_deny and its requests are decided as above"
            ));
            true
        }
    }
}

/// A service without a policy: only the connection's source address decides (`allow_sources`),
/// as the L4 proxy does for every connection.
fn explain_l4(
    service: &ServiceRoute,
    query: &Query,
    origin: Origin,
    mut notes: Vec<String>,
) -> Result<Explained, BadQuery> {
    let Some(source) = query.source else {
        return Err(BadQuery(format!(
            "service {:?} has no policy: it is an L4 service, where only the source address \
             decides (allow_sources): give the source",
            query.service
        )));
    };
    if query.token.is_some() || query.claims.is_some() || query.spiffe_id.is_some() {
        notes.push(
            "an L4 service does not look at tokens, claims or certificates: only the source \
             address decides"
                .into(),
        );
    }
    let (decision, reason) = crate::proxy::decide(&service.rule, service.mode, source);
    let allowed = decision == crate::telemetry::Decision::Allow;
    let sources = &service.rule.allow_sources;
    notes.push(if sources.is_empty() {
        "allow_sources is empty: no source may connect".to_owned()
    } else {
        format!("allow_sources: {}", list_sources(&service.rule))
    });
    if !allowed && service.mode == Mode::Audit {
        notes.push(
            "the service is in audit mode: this connection is forwarded and logged as would_deny"
                .into(),
        );
    }
    Ok(Explained {
        service: service.name.to_string(),
        mode: mode_str(service.mode).to_owned(),
        policy_version: String::new(),
        method: query.method.clone(),
        path: query.path.clone(),
        host: query.host.clone(),
        identity: IdentityOut::anonymous(),
        workload: None,
        decision: if allowed { "allow" } else { "deny" }.to_owned(),
        reason: reason.as_str().to_owned(),
        rule: None,
        rules: Vec::new(),
        notes,
        src: query.source,
        state: origin.as_str().to_owned(),
    })
}

/// `allow_sources` as the notes show it: `10.0.0.0/24, fd00::/64`.
fn list_sources(rule: &crate::config::L4Rule) -> String {
    rule.allow_sources
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn unknown_service(routes: &Routes, name: &str) -> BadQuery {
    use std::fmt::Write as _;
    let mut names: Vec<&str> = routes.services().map(|s| &*s.name).collect();
    names.sort_unstable();
    let more = names.len().saturating_sub(LIST_SERVICES_MAX);
    names.truncate(LIST_SERVICES_MAX);
    let mut list = names.join(", ");
    if more > 0 {
        let _ = write!(list, " and {more} more");
    }
    BadQuery(format!("no service {name:?} (services: {list})"))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

type IdentityParts = (policy::Identity, IdentityOut, Option<&'static str>);

fn identity(
    auth: &Authenticator,
    query: &Query,
    notes: &mut Vec<String>,
) -> Result<IdentityParts, BadQuery> {
    if query.token.is_some() && query.claims.is_some() {
        return Err(BadQuery("a token or claims, not both".into()));
    }
    let none = IdentityOut::anonymous();
    if let Some(token) = &query.token {
        let token = token.trim();
        let token = crate::auth::parse_bearer(token).unwrap_or(token);
        return Ok(match auth.authenticate_now(token) {
            Ok(id) => {
                let out = IdentityOut {
                    kind: id.kind.as_str().to_owned(),
                    subject: Some(id.subject.clone()),
                    email: id.email.clone(),
                    groups: id.groups.clone(),
                    issuer: Some(id.issuer.clone()),
                    from: "token".into(),
                };
                (policy_identity(Some(&id)).to_identity(), out, None)
            }
            Err(err) => {
                notes.push(format!("token refused: {}", crate::cli::error_chain(&err)));
                (policy::Identity::anonymous(), none, Some(err.reason()))
            }
        });
    }
    if let Some(claims) = &query.claims {
        notes.push("claims: not verified (dry run)".into());
        let mapped = auth
            .map_unverified_claims(claims.clone())
            .map_err(|e| BadQuery(format!("claims: {}", crate::cli::error_chain(&e))))?;
        let identity = if let Some(id) = &mapped {
            policy_identity(Some(id)).to_identity()
        } else {
            notes.push(
                "claims: no configured issuer has this `iss`: mapped with the default claims \
                 (sub, email, groups) as a user"
                    .into(),
            );
            default_mapping(claims.clone())
        };
        let kind = match identity.kind {
            policy::IdentityKind::User => "user",
            policy::IdentityKind::Workload => "workload",
            policy::IdentityKind::Anonymous => "anonymous",
        };
        let out = IdentityOut {
            kind: kind.into(),
            subject: identity.subject.clone(),
            email: identity.email.clone(),
            groups: identity.groups.clone(),
            issuer: identity.issuer.clone(),
            from: "claims".into(),
        };
        return Ok((identity, out, None));
    }
    Ok((policy::Identity::anonymous(), none, None))
}

fn default_mapping(claims: serde_json::Map<String, Value>) -> policy::Identity {
    let string = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    let groups = match claims.get("groups") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(s)) => s
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    policy::Identity {
        kind: policy::IdentityKind::User,
        subject: string("sub"),
        email: string("email"),
        groups,
        issuer: string("iss"),
        claims,
    }
}

/// The workload: as named (its labels those of a known workload of that name, if any), else
/// the one the source address belongs to, with its pod.
fn workload(
    routes: &Routes,
    query: &Query,
) -> Result<Option<(policy::Workload, Option<String>)>, BadQuery> {
    if let Some(w) = &query.workload {
        let Some((ns, sa)) = w
            .split_once('/')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains('/'))
        else {
            return Err(BadQuery(format!(
                "workload {w:?} is not namespace/service-account"
            )));
        };
        let labels = routes
            .workloads
            .by_account(ns, sa)
            .map(|e| e.policy.labels.clone())
            .unwrap_or_default();
        return Ok(Some((
            policy::Workload {
                namespace: ns.to_owned(),
                service_account: sa.to_owned(),
                labels,
            },
            None,
        )));
    }
    Ok(query
        .source
        .and_then(|ip| routes.workloads.lookup(None, ip))
        .map(|e| (e.policy.clone(), e.config.pod.clone())))
}
