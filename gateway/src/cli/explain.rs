//! `gateway explain`: what the gateway would decide for one request, the rule that decided and
//! every rule's verdict. Exit code: 0 allow, 2 deny, 64 bad input.

use std::{net::IpAddr, path::Path, sync::Arc};

use serde::Serialize;
use serde_json::Value;

use super::CliError;
use crate::{
    auth::{Authenticator, NoopObserver},
    config::{Config, HttpService, Service},
    ebpf::Mode,
    policy::{self, CanonicalPath, Explanation, RequestContext, Verdict},
    proxy::{http::authn::policy_identity, routes::Workloads},
    telemetry::decision::mode_str,
};

/// Exit code of a deny (`EX_USAGE` 64 stays for bad input).
pub(super) const EXIT_DENY: u8 = 2;

/// The request to explain, as given on the command line.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request<'a> {
    pub config: &'a Path,
    pub service: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub host: Option<&'a str>,
    pub token: Option<&'a Path>,
    pub claims: Option<&'a str>,
    pub workload: Option<&'a str>,
    pub source: Option<IpAddr>,
    /// The SPIFFE ID of a verified client certificate.
    pub spiffe_id: Option<&'a str>,
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    service: &'a str,
    mode: &'static str,
    policy_version: &'a str,
    method: &'a str,
    path: &'a str,
    host: Option<&'a str>,
    identity: IdentityOut,
    workload: Option<WorkloadOut>,
    /// `allow` or `deny` (the policy's verdict; in audit mode a deny is forwarded as
    /// `would_deny`).
    decision: &'static str,
    reason: String,
    rule: Option<String>,
    rules: Vec<policy::RuleTrace>,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct IdentityOut {
    kind: &'static str,
    subject: Option<String>,
    email: Option<String>,
    groups: Vec<String>,
    issuer: Option<String>,
    /// `token` (verified), `claims` (unverified dry run) or `none`.
    from: &'static str,
}

#[derive(Debug, Serialize)]
struct WorkloadOut {
    namespace: String,
    service_account: String,
}

/// Runs the explanation; `Ok(true)` when the request would be allowed.
pub(super) fn explain(req: &Request<'_>) -> Result<bool, CliError> {
    if let Some(id) = req.spiffe_id {
        policy::spiffe::check_id(id)
            .map_err(|e| CliError::Input(format!("--spiffe-id {id:?}: {e}")))?;
    }
    let config = Config::load(req.config)?;
    let service = config
        .services
        .iter()
        .find(|s| s.name == req.service)
        .ok_or_else(|| {
            CliError::Input(format!(
                "no service {:?} in {} (services: {})",
                req.service,
                req.config.display(),
                config
                    .services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    let Some(http) = &service.http else {
        return Err(CliError::Input(format!(
            "service {:?} has no policy: it is an L4 service (allow_sources only)",
            req.service
        )));
    };
    let mut notes = Vec::new();
    let (identity, identity_out, auth_refusal) = identity(&config, req, &mut notes)?;
    let workload = workload(&config, req)?;
    let workload_out = workload.as_ref().map(|w| WorkloadOut {
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
    });

    let mut out = Output {
        service: &service.name,
        mode: mode_str(service.mode),
        policy_version: &http.policy.version,
        method: req.method,
        path: req.path,
        host: req.host,
        identity: identity_out,
        workload: workload_out,
        decision: "deny",
        reason: String::new(),
        rule: None,
        rules: Vec::new(),
        notes,
    };
    let allowed = match CanonicalPath::parse(req.path.as_bytes()) {
        Err(err) => {
            err.reason_code().clone_into(&mut out.reason);
            out.notes
                .push(format!("the gateway answers 400 before policy: {err}"));
            false
        }
        Ok(path) => {
            let explanation = evaluate(http, &identity, workload.as_ref(), req, &path);
            out.rules = explanation.rules;
            out.rule = explanation.decision.rule_id.clone();
            explanation
                .decision
                .reason
                .as_str()
                .clone_into(&mut out.reason);
            // The gateway's order: Host (421) before authentication, a refused token (401)
            // before the rules.
            if !http.serves_host(req.host) {
                "host_not_served".clone_into(&mut out.reason);
                out.rule = None;
                out.notes.push(format!(
                    "host {:?} is not in http.hosts: the gateway answers 421 before policy",
                    req.host.unwrap_or_default()
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
    out.decision = if allowed { "allow" } else { "deny" };
    if !allowed && service.mode == Mode::Audit {
        out.notes.push(
            "the service is in audit mode: this request is forwarded and logged as would_deny"
                .into(),
        );
    }
    if req.json {
        let text =
            serde_json::to_string_pretty(&out).map_err(|e| CliError::Input(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render(&out, service));
    }
    Ok(allowed)
}

fn evaluate(
    http: &HttpService,
    identity: &policy::Identity,
    workload: Option<&policy::Workload>,
    req: &Request<'_>,
    path: &CanonicalPath,
) -> Explanation {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    http.policy.compiled.explain(&RequestContext {
        identity: identity.view(),
        workload,
        source_ip: req.source,
        spiffe_id: req.spiffe_id,
        method: req.method,
        host: req.host,
        path,
        now,
    })
}

type IdentityParts = (policy::Identity, IdentityOut, Option<&'static str>);

fn identity(
    config: &Config,
    req: &Request<'_>,
    notes: &mut Vec<String>,
) -> Result<IdentityParts, CliError> {
    let none = IdentityOut {
        kind: "anonymous",
        subject: None,
        email: None,
        groups: Vec::new(),
        issuer: None,
        from: "none",
    };
    let auth = Authenticator::new(&config.auth, Arc::new(NoopObserver))?;
    if let Some(file) = req.token {
        let text = std::fs::read_to_string(file).map_err(|e| {
            CliError::Input(format!(
                "cannot read the token file {}: {e}",
                file.display()
            ))
        })?;
        let token = text.trim();
        let token = crate::auth::parse_bearer(token).unwrap_or(token);
        // Keys: JWKS files are read locally; discovery/JWKS URLs are fetched once if reachable.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| CliError::Runtime {
                what: "explain",
                source,
            })?;
        for report in runtime.block_on(auth.load_keys()) {
            if let Err(err) = report.result {
                notes.push(format!(
                    "issuer {}: keys not loaded ({}); its tokens show as issuer_unavailable",
                    report.issuer,
                    super::error_chain(&err)
                ));
            }
        }
        return Ok(match auth.authenticate_now(token) {
            Ok(id) => {
                let out = IdentityOut {
                    kind: id.kind.as_str(),
                    subject: Some(id.subject.clone()),
                    email: id.email.clone(),
                    groups: id.groups.clone(),
                    issuer: Some(id.issuer.clone()),
                    from: "token",
                };
                (policy_identity(Some(&id)).to_identity(), out, None)
            }
            Err(err) => {
                notes.push(format!("token refused: {}", super::error_chain(&err)));
                (policy::Identity::anonymous(), none, Some(err.reason()))
            }
        });
    }
    if let Some(json) = req.claims {
        let claims: serde_json::Map<String, Value> = serde_json::from_str(json)
            .map_err(|e| CliError::Input(format!("--claims is not a JSON object: {e}")))?;
        notes.push("--claims: not verified (dry run)".into());
        let mapped = auth
            .map_unverified_claims(claims.clone())
            .map_err(|e| CliError::Input(format!("--claims: {}", super::error_chain(&e))))?;
        let identity = if let Some(id) = &mapped {
            policy_identity(Some(id)).to_identity()
        } else {
            notes.push(
                "--claims: no configured issuer has this `iss`: mapped with the default \
                     claims (sub, email, groups) as a user"
                    .into(),
            );
            default_mapping(claims)
        };
        let kind = match identity.kind {
            policy::IdentityKind::User => "user",
            policy::IdentityKind::Workload => "workload",
            policy::IdentityKind::Anonymous => "anonymous",
        };
        let out = IdentityOut {
            kind,
            subject: identity.subject.clone(),
            email: identity.email.clone(),
            groups: identity.groups.clone(),
            issuer: identity.issuer.clone(),
            from: "claims",
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

fn workload(config: &Config, req: &Request<'_>) -> Result<Option<policy::Workload>, CliError> {
    let table = Workloads::new(&config.workloads);
    if let Some(w) = req.workload {
        let Some((ns, sa)) = w
            .split_once('/')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty())
        else {
            return Err(CliError::Input(format!(
                "--workload {w:?} is not namespace/service-account"
            )));
        };
        // Labels are those of a configured workload of that name, if any.
        let labels = config
            .workloads
            .iter()
            .find(|c| c.namespace == ns && c.service_account == sa)
            .map(|c| c.labels.clone())
            .unwrap_or_default();
        return Ok(Some(policy::Workload {
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
            labels,
        }));
    }
    Ok(req
        .source
        .and_then(|ip| table.lookup(None, ip))
        .map(|e| e.policy.clone()))
}

fn render(out: &Output<'_>, service: &Service) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "service   {} (mode {}, policy {})",
        service.name, out.mode, out.policy_version
    );
    let _ = writeln!(
        s,
        "request   {} {}{}",
        out.method,
        out.path,
        out.host.map(|h| format!(" (host {h})")).unwrap_or_default()
    );
    let id = &out.identity;
    let _ = write!(s, "identity  {}", id.kind);
    if let Some(sub) = &id.subject {
        let _ = write!(s, " {sub}");
    }
    if let Some(email) = &id.email {
        let _ = write!(s, " <{email}>");
    }
    if !id.groups.is_empty() {
        let _ = write!(s, " groups [{}]", id.groups.join(", "));
    }
    if let Some(iss) = &id.issuer {
        let _ = write!(s, " issuer {iss}");
    }
    let _ = writeln!(s, " (from {})", id.from);
    if let Some(w) = &out.workload {
        let _ = writeln!(s, "workload  {}/{}", w.namespace, w.service_account);
    }
    let _ = writeln!(
        s,
        "decision  {} ({}{})",
        out.decision.to_uppercase(),
        out.reason,
        out.rule
            .as_ref()
            .map(|r| format!(", rule {r}"))
            .unwrap_or_default()
    );
    for note in &out.notes {
        let _ = writeln!(s, "note      {note}");
    }
    if !out.rules.is_empty() {
        let mut table = super::table::Table::new(&[
            ("KIND", super::table::Align::Left),
            ("RULE", super::table::Align::Left),
            ("VERDICT", super::table::Align::Left),
            ("WHY", super::table::Align::Left),
        ]);
        for r in &out.rules {
            table.row(vec![
                r.kind.as_str().to_owned(),
                r.id.clone(),
                if r.matched { "match" } else { "-" }.to_owned(),
                r.why.clone(),
            ]);
        }
        s.push('\n');
        s.push_str(&table.render());
    }
    s
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
    use serde_json::json;

    use super::*;

    const EC1: &str = include_str!("../auth/testdata/ec1.pem");

    struct Files(Vec<std::path::PathBuf>);

    impl Drop for Files {
        fn drop(&mut self) {
            for f in &self.0 {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    fn write(files: &mut Files, name: &str, text: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("nodegate-explain-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        files.0.push(path.clone());
        path
    }

    #[test]
    #[expect(clippy::too_many_lines, reason = "one fixture, a table of cases")]
    fn explain_verifies_tokens_offline_and_reports_the_deciding_rule() {
        let mut files = Files(Vec::new());
        let key = EncodingKey::from_ec_pem(EC1.as_bytes()).unwrap();
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("k1".into());
        let jwks = write(
            &mut files,
            "jwks.json",
            &json!({ "keys": [jwk] }).to_string(),
        );
        let config = write(
            &mut files,
            "config.yaml",
            &format!(
                "node: n\ncgroup: /sys/fs/cgroup\nproxy: {{ listen: 127.0.0.2:15001 }}\ngateways: [127.0.0.1]\n\
                 auth: {{ issuers: [ {{ name: t, issuer: https://idp.test, jwks_file: \"{}\", audiences: [ng], algorithms: [ES256] }} ] }}\n\
                 workloads: [ {{ namespace: ci, service_account: builder, addresses: [10.0.0.9] }} ]\n\
                 services:\n  - name: web\n    vips: [\"10.96.0.1:80\"]\n    policy:\n      deny: [ {{ id: no-admin, when: {{ path: {{ prefix: /admin }} }} }} ]\n      allow:\n        - {{ id: devs, when: {{ groups: devs }} }}\n        - {{ id: ci, when: {{ workload: {{ namespace: ci }} }} }}\n        - {{ id: mesh, when: {{ spiffe_id: \"spiffe://td.test/ns/ci/*\" }} }}\n  - name: l4\n    vips: [\"10.96.0.2:80\"]\n",
                jwks.display()
            ),
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let claims = json!({"iss": "https://idp.test", "sub": "alice", "aud": "ng", "exp": now + 600, "groups": ["devs"]});
        let token = write(
            &mut files,
            "token",
            &jsonwebtoken::encode(&header, &claims, &key).unwrap(),
        );
        let expired = json!({"iss": "https://idp.test", "sub": "alice", "aud": "ng", "exp": now - 600, "groups": ["devs"]});
        let expired = write(
            &mut files,
            "expired",
            &jsonwebtoken::encode(&header, &expired, &key).unwrap(),
        );

        let base = Request {
            config: &config,
            service: "web",
            method: "GET",
            path: "/app",
            host: None,
            token: None,
            claims: None,
            workload: None,
            source: None,
            spiffe_id: None,
            json: true,
        };
        assert!(
            explain(&Request {
                token: Some(&token),
                ..base
            })
            .unwrap()
        );
        assert!(
            !explain(&Request {
                token: Some(&token),
                path: "/admin/x",
                ..base
            })
            .unwrap()
        );
        assert!(
            !explain(&Request {
                token: Some(&expired),
                ..base
            })
            .unwrap()
        );
        assert!(!explain(&base).unwrap(), "anonymous");
        assert!(
            !explain(&Request {
                token: Some(&token),
                path: "/a/../admin",
                ..base
            })
            .unwrap()
        );
        assert!(
            explain(&Request {
                claims: Some(r#"{"iss":"https://idp.test","sub":"bob","groups":["devs"]}"#),
                ..base
            })
            .unwrap()
        );
        assert!(
            explain(&Request {
                workload: Some("ci/builder"),
                ..base
            })
            .unwrap()
        );
        assert!(
            explain(&Request {
                source: "10.0.0.9".parse().ok(),
                ..base
            })
            .unwrap()
        );
        assert!(
            explain(&Request {
                spiffe_id: Some("spiffe://td.test/ns/ci/sa/builder"),
                ..base
            })
            .unwrap()
        );
        assert!(
            !explain(&Request {
                spiffe_id: Some("spiffe://other.test/ns/ci/sa/builder"),
                ..base
            })
            .unwrap()
        );
        for bad in [
            Request {
                spiffe_id: Some("https://td.test/x"),
                ..base
            },
            Request {
                service: "nope",
                ..base
            },
            Request {
                service: "l4",
                ..base
            },
            Request {
                claims: Some("[1]"),
                ..base
            },
            Request {
                workload: Some("ci"),
                ..base
            },
        ] {
            assert_eq!(
                explain(&bad).unwrap_err().exit_code(),
                super::super::EXIT_USAGE
            );
        }
        assert_eq!(CliError::Denied.exit_code(), EXIT_DENY);
    }
}
