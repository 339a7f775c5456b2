//! `gateway explain`: what the gateway would decide for one request, the rule that decided and
//! every rule's verdict ([`crate::explain`]), from a config file (`--config`) or from the
//! running daemon's live state (its admin server's `POST /explain`: what the Kubernetes source
//! protects, the pods on the node, the keys as loaded). Exit code: 0 allow, 2 deny, 64 bad
//! input.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use super::CliError;
use crate::{
    auth::Authenticator,
    config::Config,
    explain::{self, Explained, Origin, Query},
    policy::RuleKind,
    proxy::routes::Routes,
};

/// Exit code of a deny (`EX_USAGE` 64 stays for bad input).
pub(super) const EXIT_DENY: u8 = 2;
/// How long the daemon may take to answer (it verifies a token with keys it holds: no I/O).
const LIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read from the daemon.
const LIVE_REPLY_MAX: u64 = 4 << 20;

/// Where the policies come from.
#[derive(Debug, Clone, Copy)]
pub(super) enum From<'a> {
    /// A config file, as `gateway run --config` would load it.
    Config(&'a Path),
    /// The running daemon's admin server.
    Live(SocketAddr),
}

/// `gateway explain`'s arguments.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Explain against this config file instead of the running gateway.
    #[arg(long, short, value_name = "FILE", conflicts_with = "admin")]
    pub config: Option<PathBuf>,
    /// The running gateway's admin server (`admin.listen`; default 127.0.0.1:15021). It
    /// answers explanations only to connections from its own host.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// The service (with a policy) to ask: its config name, or `namespace/name` for a
    /// Service protected by its Kubernetes label.
    #[arg(long)]
    pub service: String,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// The request target as sent (`/path?query`); ambiguous paths are denied as the
    /// gateway would (400 before policy).
    #[arg(long)]
    pub path: String,
    #[arg(long)]
    pub host: Option<String>,
    /// A bearer token (a file holding the JWT, or `Bearer <jwt>`), verified with the issuers'
    /// keys: those the running gateway holds, or with `--config` the JWKS files read and the
    /// URLs fetched once.
    #[arg(long, value_name = "FILE", conflicts_with = "claims")]
    pub token: Option<PathBuf>,
    /// Claims as JSON, NOT verified: a dry run of what a token with them would get.
    #[arg(long, value_name = "JSON")]
    pub claims: Option<String>,
    /// The calling workload, `namespace/service-account`.
    #[arg(long, value_name = "NS/SA")]
    pub workload: Option<String>,
    /// The source address (for `source_cidr`, and the workload it belongs to: a pod on the
    /// node, or a static workload's address).
    #[arg(long, value_name = "IP")]
    pub source: Option<IpAddr>,
    /// The SPIFFE ID of a verified client certificate (for `spiffe_id`).
    #[arg(long, value_name = "ID")]
    pub spiffe_id: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// `gateway explain ARGS`: exit 0 allow, 2 deny ([`CliError::Denied`]), 64 bad input.
pub(super) fn run(args: Args) -> Result<(), CliError> {
    let Args {
        config,
        admin,
        service,
        method,
        path,
        host,
        token,
        claims,
        workload,
        source,
        spiffe_id,
        json,
    } = args;
    let query = Query {
        service,
        method,
        path,
        host,
        token: token.as_deref().map(read_token).transpose()?,
        claims: claims.as_deref().map(parse_claims).transpose()?,
        workload,
        source,
        spiffe_id,
    };
    let from = match &config {
        Some(file) => From::Config(file),
        None => From::Live(admin.unwrap_or(crate::config::DEFAULT_ADMIN_LISTEN)),
    };
    if explain(from, &query, json)? {
        Ok(())
    } else {
        Err(CliError::Denied)
    }
}

/// Runs the explanation and prints it; `Ok(true)` when the request would be allowed.
pub(super) fn explain(from: From<'_>, query: &Query, json: bool) -> Result<bool, CliError> {
    let out = match from {
        From::Config(path) => from_config(path, query)?,
        From::Live(admin) => live(admin, query)?,
    };
    if json {
        let text =
            serde_json::to_string_pretty(&out).map_err(|e| CliError::Input(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", render(&out));
    }
    Ok(out.allowed())
}

/// Reads the token file: the JWT, or `Bearer <jwt>`.
pub(super) fn read_token(file: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        CliError::Input(format!(
            "cannot read the token file {}: {e}",
            file.display()
        ))
    })?;
    let token = text.trim();
    Ok(crate::auth::parse_bearer(token).unwrap_or(token).to_owned())
}

/// `--claims`: a JSON object.
pub(super) fn parse_claims(
    json: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, CliError> {
    serde_json::from_str(json)
        .map_err(|e| CliError::Input(format!("--claims is not a JSON object: {e}")))
}

fn from_config(path: &Path, query: &Query) -> Result<Explained, CliError> {
    let config = Config::load(path)?;
    let auth = Authenticator::new(&config.auth, std::sync::Arc::new(crate::auth::NoopObserver))?;
    let mut notes = Vec::new();
    if query.token.is_some() {
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
    }
    let routes = Routes::new(&config);
    explain::explain(&routes, &auth, query, Origin::Config, notes).map_err(|e| {
        let hint = if query.service.contains('/') && config.kubernetes.is_some() {
            "; a Service protected by its Kubernetes label is known to the running gateway \
             only: leave out --config"
        } else {
            ""
        };
        CliError::Input(format!("{e} in {}{hint}", path.display()))
    })
}

/// `POST /explain` to the daemon's admin server.
fn live(admin: SocketAddr, query: &Query) -> Result<Explained, CliError> {
    // An admin server listening on every address is asked on loopback.
    let admin = if admin.ip().is_unspecified() {
        let lo = if admin.is_ipv6() {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        };
        SocketAddr::new(lo, admin.port())
    } else {
        admin
    };
    let unreachable = |e: &dyn std::fmt::Display| {
        CliError::Input(format!(
            "cannot ask the running gateway at {admin} ({e}): is it running, and is this its \
             admin.listen (--admin)? Or explain a config file with --config"
        ))
    };
    let body = serde_json::to_vec(query).map_err(|e| CliError::Input(e.to_string()))?;
    let mut stream =
        TcpStream::connect_timeout(&admin, LIVE_TIMEOUT).map_err(|e| unreachable(&e))?;
    stream
        .set_read_timeout(Some(LIVE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(LIVE_TIMEOUT)))
        .map_err(|e| unreachable(&e))?;
    let head = format!(
        "POST /explain HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&body))
        .map_err(|e| unreachable(&e))?;
    let mut reply = Vec::new();
    stream
        .take(LIVE_REPLY_MAX)
        .read_to_end(&mut reply)
        .map_err(|e| unreachable(&e))?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| unreachable(&"not an HTTP reply"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.starts_with("HTTP/1.1 200") {
        return serde_json::from_str(body)
            .map_err(|e| unreachable(&format!("not the gateway's explanation: {e}")));
    }
    if status.starts_with("HTTP/1.1 400") {
        return Err(CliError::Input(format!(
            "{} (live state of {admin})",
            body.trim()
        )));
    }
    Err(unreachable(&format!("{status}: {}", body.trim())))
}

fn render(out: &Explained) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "service   {} (mode {}, {}, {})",
        out.service,
        out.mode,
        if out.policy_version.is_empty() {
            "no policy: L4, the source address decides".to_owned()
        } else {
            format!("policy {}", out.policy_version)
        },
        if out.state == "live" {
            "live state of the running gateway"
        } else {
            "from the config file"
        }
    );
    let l4 = out.policy_version.is_empty();
    if !l4 {
        let _ = writeln!(
            s,
            "request   {} {}{}",
            out.method,
            out.path,
            out.host
                .as_ref()
                .map(|h| format!(" (host {h})"))
                .unwrap_or_default()
        );
    }
    if let Some(src) = out.src {
        let _ = writeln!(s, "source    {src}");
    }
    if !l4 {
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
    }
    if let Some(w) = &out.workload {
        let _ = write!(s, "workload  {}/{}", w.namespace, w.service_account);
        if let Some(pod) = &w.pod {
            let _ = write!(s, " (pod {pod})");
        }
        s.push('\n');
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
                RuleKind::as_str(r.kind).to_owned(),
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

    struct Files(Vec<PathBuf>);

    impl Drop for Files {
        fn drop(&mut self) {
            for f in &self.0 {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    fn write(files: &mut Files, name: &str, text: &str) -> PathBuf {
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
                 services:\n  - name: web\n    vips: [\"10.96.0.1:80\"]\n    policy:\n      deny: [ {{ id: no-admin, when: {{ path: {{ prefix: /admin }} }} }} ]\n      allow:\n        - {{ id: devs, when: {{ groups: devs }} }}\n        - {{ id: ci, when: {{ workload: {{ namespace: ci }} }} }}\n        - {{ id: mesh, when: {{ spiffe_id: \"spiffe://td.test/ns/ci/*\" }} }}\n  - name: l4\n    vips: [\"10.96.0.2:80\"]\n    allow_sources: [10.0.0.0/24]\n\
                 \x20 - name: lan\n    vips: [\"10.96.0.3:80\"]\n    allow_sources: [10.0.0.0/24]\n    policy: {{ allow: [ {{ id: all, when: {{ path: {{ prefix: / }} }} }} ] }}\n",
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

        let base = Query {
            service: "web".into(),
            method: "GET".into(),
            path: "/app".into(),
            ..Query::default()
        };
        let run = |q: Query| explain(From::Config(&config), &q, true);
        let token = read_token(&token).unwrap();
        let expired = read_token(&expired).unwrap();
        assert!(
            run(Query {
                token: Some(token.clone()),
                ..base.clone()
            })
            .unwrap()
        );
        assert!(
            !run(Query {
                token: Some(token.clone()),
                path: "/admin/x".into(),
                ..base.clone()
            })
            .unwrap()
        );
        assert!(
            !run(Query {
                token: Some(expired),
                ..base.clone()
            })
            .unwrap()
        );
        assert!(!run(base.clone()).unwrap(), "anonymous");
        assert!(
            !run(Query {
                token: Some(token),
                path: "/a/../admin".into(),
                ..base.clone()
            })
            .unwrap()
        );
        assert!(
            run(Query {
                claims: Some(
                    parse_claims(r#"{"iss":"https://idp.test","sub":"bob","groups":["devs"]}"#)
                        .unwrap()
                ),
                ..base.clone()
            })
            .unwrap()
        );
        assert!(
            run(Query {
                workload: Some("ci/builder".into()),
                ..base.clone()
            })
            .unwrap()
        );
        assert!(
            run(Query {
                source: "10.0.0.9".parse().ok(),
                ..base.clone()
            })
            .unwrap()
        );
        assert!(
            run(Query {
                spiffe_id: Some("spiffe://td.test/ns/ci/sa/builder".into()),
                ..base.clone()
            })
            .unwrap()
        );
        assert!(
            !run(Query {
                spiffe_id: Some("spiffe://other.test/ns/ci/sa/builder".into()),
                ..base.clone()
            })
            .unwrap()
        );
        // An L4 service: the source address decides.
        let l4 = |source: &str| Query {
            service: "l4".into(),
            source: source.parse().ok(),
            ..base.clone()
        };
        assert!(run(l4("10.0.0.9")).unwrap());
        assert!(!run(l4("10.0.1.9")).unwrap());
        // An HTTP service with allow_sources: a source outside it is refused per connection,
        // before its policy (which allows everything) is asked.
        let lan = |source: &str| Query {
            service: "lan".into(),
            source: source.parse().ok(),
            ..base.clone()
        };
        assert!(run(lan("10.0.0.9")).unwrap());
        assert!(!run(lan("10.0.1.9")).unwrap());
        // Refused per connection first, even where the policy would deny too.
        let loaded = Config::load(&config).unwrap();
        let routes = Routes::new(&loaded);
        let auth = Authenticator::new(&loaded.auth, std::sync::Arc::new(crate::auth::NoopObserver))
            .unwrap();
        let out = explain::explain(
            &routes,
            &auth,
            &Query {
                path: "/a/../b".into(),
                ..lan("10.0.1.9")
            },
            Origin::Config,
            Vec::new(),
        )
        .unwrap();
        assert_eq!(
            (out.decision.as_str(), out.reason.as_str()),
            ("deny", "source_not_allowed")
        );
        assert!(
            run(Query {
                source: None,
                ..lan("10.0.1.9")
            })
            .unwrap()
        );
        for bad in [
            Query {
                spiffe_id: Some("https://td.test/x".into()),
                ..base.clone()
            },
            Query {
                service: "nope".into(),
                ..base.clone()
            },
            Query {
                service: "l4".into(),
                ..base.clone()
            },
            Query {
                workload: Some("ci".into()),
                ..base.clone()
            },
            Query {
                workload: Some("ci/a/b".into()),
                ..base.clone()
            },
        ] {
            assert_eq!(run(bad).unwrap_err().exit_code(), super::super::EXIT_USAGE);
        }
        assert_eq!(
            parse_claims("[1]").unwrap_err().exit_code(),
            super::super::EXIT_USAGE
        );
        // Nobody listens there: a clear error, not a hang or a deny.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let err = explain(From::Live(addr), &base, true).unwrap_err();
        assert_eq!(err.exit_code(), super::super::EXIT_USAGE);
        assert!(err.to_string().contains("--config"), "{err}");
        assert_eq!(CliError::Denied.exit_code(), EXIT_DENY);
    }
}
