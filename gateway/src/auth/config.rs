//! Authentication config: the YAML wire types and their validated domain form.
//!
//! The wire types (`AuthConfig`, `IssuerConfig`) are what an operator writes; `TryFrom` turns each
//! issuer into an [`IssuerSettings`] whose fields are already checked and canonical (parsed URIs,
//! parsed algorithms, durations), so nothing later re-validates strings.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

/// Upper bound for `leeway_s`: clock skew beyond five minutes is a broken clock, not skew.
pub const MAX_LEEWAY_S: u64 = 300;
/// Upper bound for `max_token_bytes`; the default is [`DEFAULT_MAX_TOKEN_BYTES`].
pub const MAX_TOKEN_BYTES_LIMIT: usize = 64 * 1024;
/// Tokens above this size are rejected before any parsing (Envoy and most proxies cap headers at
/// 8–60 KiB; a real access token is 1–2 KiB).
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Upper bound for the token cache TTL: a cached token skips the signature check, so a key removed
/// from the JWKS keeps verifying cached tokens for at most this long.
pub const MAX_CACHE_TTL_S: u64 = 300;

/// The `auth` section of the gateway config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Trusted token issuers; a token whose `iss` is not listed here is denied.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    /// Bearer tokens longer than this are rejected before parsing.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Cache of verified tokens (the hot path for repeated tokens).
    #[serde(default)]
    pub token_cache: TokenCacheConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            token_cache: TokenCacheConfig::default(),
        }
    }
}

/// Verified-token cache settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCacheConfig {
    /// Maximum cached tokens; 0 disables the cache.
    #[serde(default = "default_cache_entries")]
    pub max_entries: usize,
    /// An entry lives until min(token `exp`, insertion + `ttl_s`).
    #[serde(default = "default_cache_ttl_s")]
    pub ttl_s: u64,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        Self {
            max_entries: default_cache_entries(),
            ttl_s: default_cache_ttl_s(),
        }
    }
}

/// What kind of principal an issuer's tokens name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuerKind {
    /// People (OIDC access tokens): subject, email, groups.
    #[default]
    User,
    /// Machine clients of a non-Kubernetes issuer (`client_credentials`, SPIFFE JWT-SVIDs...).
    Workload,
    /// Kubernetes `ServiceAccount` tokens: namespace and service account come from the token.
    Kubernetes,
}

/// Which claims feed the identity. A name starting with `/` is an RFC 6901 JSON pointer into the
/// claims (`/realm_access/roles`); anything else is a top-level claim name, dots included
/// (`https://example.com/groups` is one claim).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimsConfig {
    #[serde(default = "default_user_claim")]
    pub user: String,
    #[serde(default = "default_email_claim")]
    pub email: String,
    #[serde(default = "default_groups_claim")]
    pub groups: String,
}

impl Default for ClaimsConfig {
    fn default() -> Self {
        Self {
            user: default_user_claim(),
            email: default_email_claim(),
            groups: default_groups_claim(),
        }
    }
}

/// One trusted issuer, as written in the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Short name used in logs and metrics.
    pub name: String,
    /// Exact `iss` value of this issuer's tokens.
    pub issuer: String,
    /// Fetch `<issuer>/.well-known/openid-configuration` for `jwks_uri`. Defaults to true unless
    /// `jwks_uri` or `jwks_file` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<bool>,
    /// JWKS URL; replaces discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// JWKS JSON file (a cluster's SA issuer keys, for instance); read at start and reloaded when
    /// it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    /// PEM CA bundle that replaces the built-in web roots for this issuer's HTTPS fetches (the
    /// cluster CA for an in-cluster API server issuer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Allow plain-HTTP discovery/JWKS URLs on non-loopback hosts. Keys fetched over plain HTTP can
    /// be swapped by anyone on the path, so this is for labs only. Loopback is always allowed.
    #[serde(default)]
    pub allow_http: bool,
    /// Accepted audiences; the token's `aud` must contain at least one.
    pub audiences: Vec<String>,
    /// Accepted signature algorithms (default `[RS256]`). `none` and HS* are refused: every issuer
    /// here publishes public keys, and a shared secret would let anyone holding the JWKS mint tokens.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock-skew allowance for `exp` and `nbf`, in seconds (max 300).
    #[serde(default = "default_leeway_s")]
    pub leeway_s: u64,
    #[serde(default)]
    pub claims: ClaimsConfig,
    #[serde(default)]
    pub kind: IssuerKind,
    /// Minimum seconds between two JWKS refetches triggered by an unknown `kid`.
    #[serde(default = "default_refresh_min_interval_s")]
    pub jwks_refresh_min_interval_s: u64,
    /// Keys are refreshed when older than this.
    #[serde(default = "default_max_age_s")]
    pub jwks_max_age_s: u64,
    /// Budget for one discovery or JWKS fetch (connect, TLS, headers and body).
    #[serde(default = "default_fetch_timeout_s")]
    pub fetch_timeout_s: u64,
}

/// Why an auth config was refused. Each message names the issuer and the field to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("auth.issuers[{index}]: `name` is empty")]
    EmptyName { index: usize },
    #[error("auth issuer `{0}` is defined twice (names must be unique)")]
    DuplicateName(String),
    #[error(
        "auth issuers `{first}` and `{second}` share the issuer {issuer:?}; tokens are routed by `iss`, so it must be unique"
    )]
    DuplicateIssuer {
        first: String,
        second: String,
        issuer: String,
    },
    #[error("auth issuer `{0}`: `issuer` is empty")]
    EmptyIssuer(String),
    #[error(
        "auth issuer `{0}`: `audiences` is empty; without one any token of this issuer, for any service, would pass"
    )]
    NoAudience(String),
    #[error("auth issuer `{0}`: an empty string in `audiences`")]
    EmptyAudience(String),
    #[error("auth issuer `{0}`: `algorithms` is empty")]
    NoAlgorithm(String),
    #[error("auth issuer `{0}`: algorithm `none` is never accepted (unsigned tokens)")]
    AlgNone(String),
    #[error(
        "auth issuer `{issuer}`: algorithm {alg} is refused: HMAC needs a shared secret, and this issuer's keys are public (accepting HS* lets anyone with the public key forge tokens)"
    )]
    SymmetricAlg { issuer: String, alg: String },
    #[error(
        "auth issuer `{issuer}`: unknown algorithm {alg:?} (supported: RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
    )]
    UnknownAlg { issuer: String, alg: String },
    #[error("auth issuer `{issuer}`: leeway_s = {value} is over the {MAX_LEEWAY_S} s maximum")]
    LeewayTooLarge { issuer: String, value: u64 },
    #[error("auth issuer `{issuer}`: {field} must be between {min} and {max}, got {value}")]
    OutOfRange {
        issuer: String,
        field: &'static str,
        min: u64,
        max: u64,
        value: u64,
    },
    #[error("auth issuer `{0}`: set only one of `jwks_uri` and `jwks_file`")]
    TwoKeySources(String),
    #[error("auth issuer `{0}`: `discovery: true` contradicts `{1}`; remove one of them")]
    DiscoveryConflict(String, &'static str),
    #[error(
        "auth issuer `{0}`: no key source (enable `discovery`, or set `jwks_uri` or `jwks_file`)"
    )]
    NoKeySource(String),
    #[error("auth issuer `{issuer}`: {field} {value:?} is not an absolute http(s) URL")]
    BadUrl {
        issuer: String,
        field: &'static str,
        value: String,
    },
    #[error(
        "auth issuer `{issuer}`: {field} {value:?} uses plain http on a non-loopback host; keys fetched that way can be replaced in transit (set `allow_http: true` only in a lab)"
    )]
    InsecureUrl {
        issuer: String,
        field: &'static str,
        value: String,
    },
    #[error("auth issuer `{issuer}`: claims.{field} is empty or an invalid JSON pointer")]
    BadClaimPath { issuer: String, field: &'static str },
    #[error("auth issuer `{0}`: `ca_file` only applies to HTTPS fetches, not to `jwks_file`")]
    CaFileWithFile(String),
    #[error("auth issuer `{issuer}`: cannot use ca_file {path:?}: {reason}")]
    CaFile {
        issuer: String,
        path: PathBuf,
        reason: String,
    },
    #[error("auth.max_token_bytes = {0} must be between 512 and {MAX_TOKEN_BYTES_LIMIT}")]
    TokenLimit(usize),
    #[error("auth.token_cache.ttl_s = {0} must be between 1 and {MAX_CACHE_TTL_S}")]
    CacheTtl(u64),
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// OIDC discovery at `<issuer>/.well-known/openid-configuration`.
    Discovery(Uri),
    /// A fixed JWKS URL.
    Uri(Uri),
    /// A JWKS file on disk.
    File(PathBuf),
}

/// Where a mapped claim lives in the claims object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimPath {
    /// A top-level claim name.
    Name(String),
    /// An RFC 6901 JSON pointer.
    Pointer(String),
}

impl ClaimPath {
    fn parse(raw: &str) -> Option<Self> {
        if raw.is_empty() {
            None
        } else if raw.starts_with('/') {
            // serde_json accepts any pointer; an escape other than ~0/~1 is an operator typo.
            let bad_escape = raw
                .split('~')
                .skip(1)
                .any(|rest| !rest.starts_with(['0', '1']));
            (!bad_escape).then(|| Self::Pointer(raw.to_owned()))
        } else {
            Some(Self::Name(raw.to_owned()))
        }
    }

    /// The claim's value, if present.
    #[must_use]
    pub fn get<'a>(
        &self,
        claims: &'a serde_json::Map<String, serde_json::Value>,
    ) -> Option<&'a serde_json::Value> {
        match self {
            Self::Name(name) => claims.get(name),
            Self::Pointer(pointer) => {
                let (first, rest) = split_pointer(pointer)?;
                let top = claims.get(&first)?;
                if rest.is_empty() {
                    Some(top)
                } else {
                    top.pointer(rest)
                }
            }
        }
    }

    /// The configured spelling, for error messages.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            Self::Name(s) | Self::Pointer(s) => s,
        }
    }
}

/// Splits `/a~1b/c` into the unescaped first token (`a/b`) and the remaining pointer (`/c`).
fn split_pointer(pointer: &str) -> Option<(String, &str)> {
    let body = pointer.strip_prefix('/')?;
    let (first, rest) = body
        .find('/')
        .map_or((body, ""), |i| (&body[..i], &body[i..]));
    Some((first.replace("~1", "/").replace("~0", "~"), rest))
}

/// Claim mapping, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimMapping {
    pub user: ClaimPath,
    pub email: ClaimPath,
    pub groups: ClaimPath,
}

/// One issuer, validated and canonical.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub name: String,
    pub issuer: String,
    pub source: KeySource,
    pub ca_file: Option<PathBuf>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway_s: u64,
    pub claims: ClaimMapping,
    pub kind: IssuerKind,
    pub refresh_min_interval: Duration,
    pub max_age: Duration,
    pub fetch_timeout: Duration,
    /// Whether a discovered `jwks_uri` may be plain HTTP on a non-loopback host.
    pub allow_http: bool,
}

impl TryFrom<&IssuerConfig> for IssuerSettings {
    type Error = ConfigError;

    fn try_from(c: &IssuerConfig) -> Result<Self, ConfigError> {
        let name = c.name.clone();
        if c.issuer.is_empty() {
            return Err(ConfigError::EmptyIssuer(name));
        }
        if c.audiences.is_empty() {
            return Err(ConfigError::NoAudience(name));
        }
        if c.audiences.iter().any(String::is_empty) {
            return Err(ConfigError::EmptyAudience(name));
        }
        let algorithms = parse_algorithms(&name, &c.algorithms)?;
        if c.leeway_s > MAX_LEEWAY_S {
            return Err(ConfigError::LeewayTooLarge {
                issuer: name,
                value: c.leeway_s,
            });
        }
        let range = |field, min, max, value| {
            if (min..=max).contains(&value) {
                Ok(Duration::from_secs(value))
            } else {
                Err(ConfigError::OutOfRange {
                    issuer: c.name.clone(),
                    field,
                    min,
                    max,
                    value,
                })
            }
        };
        let refresh_min_interval = range(
            "jwks_refresh_min_interval_s",
            1,
            86_400,
            c.jwks_refresh_min_interval_s,
        )?;
        let max_age = range("jwks_max_age_s", 1, 7 * 86_400, c.jwks_max_age_s)?;
        let fetch_timeout = range("fetch_timeout_s", 1, 120, c.fetch_timeout_s)?;

        let source = key_source(c)?;
        if c.ca_file.is_some() && matches!(source, KeySource::File(_)) {
            return Err(ConfigError::CaFileWithFile(name));
        }
        let claim = |field, raw: &str| {
            ClaimPath::parse(raw).ok_or_else(|| ConfigError::BadClaimPath {
                issuer: c.name.clone(),
                field,
            })
        };
        let claims = ClaimMapping {
            user: claim("user", &c.claims.user)?,
            email: claim("email", &c.claims.email)?,
            groups: claim("groups", &c.claims.groups)?,
        };
        Ok(Self {
            name,
            issuer: c.issuer.clone(),
            source,
            ca_file: c.ca_file.clone(),
            audiences: c.audiences.clone(),
            algorithms,
            leeway_s: c.leeway_s,
            claims,
            kind: c.kind,
            refresh_min_interval,
            max_age,
            fetch_timeout,
            allow_http: c.allow_http,
        })
    }
}

fn parse_algorithms(issuer: &str, raw: &[String]) -> Result<Vec<Algorithm>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::NoAlgorithm(issuer.to_owned()));
    }
    let mut out: Vec<Algorithm> = Vec::with_capacity(raw.len());
    for name in raw {
        if name.eq_ignore_ascii_case("none") {
            return Err(ConfigError::AlgNone(issuer.to_owned()));
        }
        let alg: Algorithm = name.parse().map_err(|_| ConfigError::UnknownAlg {
            issuer: issuer.to_owned(),
            alg: name.clone(),
        })?;
        if !is_asymmetric(alg) {
            return Err(ConfigError::SymmetricAlg {
                issuer: issuer.to_owned(),
                alg: name.clone(),
            });
        }
        if !out.contains(&alg) {
            out.push(alg);
        }
    }
    Ok(out)
}

/// True for the public-key algorithms; HS* are the only symmetric ones jsonwebtoken knows.
pub(super) fn is_asymmetric(alg: Algorithm) -> bool {
    !matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn key_source(c: &IssuerConfig) -> Result<KeySource, ConfigError> {
    let name = || c.name.clone();
    match (&c.jwks_uri, &c.jwks_file, c.discovery) {
        (Some(_), Some(_), _) => Err(ConfigError::TwoKeySources(name())),
        (Some(_), None, Some(true)) => Err(ConfigError::DiscoveryConflict(name(), "jwks_uri")),
        (None, Some(_), Some(true)) => Err(ConfigError::DiscoveryConflict(name(), "jwks_file")),
        (Some(uri), None, _) => Ok(KeySource::Uri(checked_url(c, "jwks_uri", uri)?)),
        (None, Some(path), _) => Ok(KeySource::File(path.clone())),
        (None, None, Some(false)) => Err(ConfigError::NoKeySource(name())),
        (None, None, None | Some(true)) => {
            checked_url(c, "issuer", &c.issuer)?;
            let well_known = format!(
                "{}/.well-known/openid-configuration",
                c.issuer.trim_end_matches('/')
            );
            Ok(KeySource::Discovery(checked_url(c, "issuer", &well_known)?))
        }
    }
}

fn checked_url(c: &IssuerConfig, field: &'static str, raw: &str) -> Result<Uri, ConfigError> {
    let bad = || ConfigError::BadUrl {
        issuer: c.name.clone(),
        field,
        value: raw.to_owned(),
    };
    let uri = parse_http_url(raw).ok_or_else(bad)?;
    if !url_transport_allowed(&uri, c.allow_http) {
        return Err(ConfigError::InsecureUrl {
            issuer: c.name.clone(),
            field,
            value: raw.to_owned(),
        });
    }
    Ok(uri)
}

/// Parses an absolute `http`/`https` URL with a host; anything else is `None`.
pub(super) fn parse_http_url(raw: &str) -> Option<Uri> {
    let uri: Uri = raw.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    (scheme_ok && uri.host().is_some_and(|h| !h.is_empty())).then_some(uri)
}

/// HTTPS always; plain HTTP only to loopback, or anywhere when the operator opted in.
pub(super) fn url_transport_allowed(uri: &Uri, allow_http: bool) -> bool {
    match uri.scheme_str() {
        Some("https") => true,
        Some("http") => allow_http || uri.host().is_some_and(is_loopback_host),
        _ => false,
    }
}

fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Validates the whole section: per-issuer rules plus uniqueness of names and `iss` values.
///
/// # Errors
/// The first rule broken, naming the issuer and field.
pub fn validate(config: &AuthConfig) -> Result<Vec<IssuerSettings>, ConfigError> {
    if !(512..=MAX_TOKEN_BYTES_LIMIT).contains(&config.max_token_bytes) {
        return Err(ConfigError::TokenLimit(config.max_token_bytes));
    }
    if !(1..=MAX_CACHE_TTL_S).contains(&config.token_cache.ttl_s) {
        return Err(ConfigError::CacheTtl(config.token_cache.ttl_s));
    }
    let mut names = HashSet::new();
    let mut out: Vec<IssuerSettings> = Vec::with_capacity(config.issuers.len());
    for (index, raw) in config.issuers.iter().enumerate() {
        if raw.name.is_empty() {
            return Err(ConfigError::EmptyName { index });
        }
        if !names.insert(raw.name.as_str()) {
            return Err(ConfigError::DuplicateName(raw.name.clone()));
        }
        let settings = IssuerSettings::try_from(raw)?;
        if let Some(first) = out.iter().find(|s| s.issuer == settings.issuer) {
            return Err(ConfigError::DuplicateIssuer {
                first: first.name.clone(),
                second: settings.name,
                issuer: settings.issuer,
            });
        }
        out.push(settings);
    }
    Ok(out)
}

fn default_max_token_bytes() -> usize {
    DEFAULT_MAX_TOKEN_BYTES
}
fn default_cache_entries() -> usize {
    10_000
}
fn default_cache_ttl_s() -> u64 {
    60
}
fn default_user_claim() -> String {
    "sub".to_owned()
}
fn default_email_claim() -> String {
    "email".to_owned()
}
fn default_groups_claim() -> String {
    "groups".to_owned()
}
fn default_algorithms() -> Vec<String> {
    vec!["RS256".to_owned()]
}
fn default_leeway_s() -> u64 {
    30
}
fn default_refresh_min_interval_s() -> u64 {
    30
}
fn default_max_age_s() -> u64 {
    3600
}
fn default_fetch_timeout_s() -> u64 {
    10
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Vec<IssuerSettings>, ConfigError> {
        let config: AuthConfig = serde_yaml::from_str(yaml).expect("yaml");
        validate(&config)
    }

    const FULL: &str = r"
issuers:
  - name: corp
    issuer: https://login.example.com
    discovery: true
    audiences: [https://gateway.test]
    algorithms: [RS256, ES256]
    leeway_s: 30
    claims: { user: sub, email: email, groups: groups }
    kind: user
    jwks_refresh_min_interval_s: 30
    jwks_max_age_s: 3600
  - name: cluster
    issuer: https://kubernetes.default.svc.cluster.local
    jwks_file: /etc/nodegate/jwks.json
    audiences: [nodegate]
    kind: kubernetes
";

    #[test]
    fn full_example_parses() {
        let issuers = parse(FULL).expect("valid");
        assert_eq!(issuers.len(), 2);
        assert_eq!(
            issuers[0].source,
            KeySource::Discovery(
                "https://login.example.com/.well-known/openid-configuration"
                    .parse()
                    .expect("uri")
            )
        );
        assert_eq!(
            issuers[0].algorithms,
            vec![Algorithm::RS256, Algorithm::ES256]
        );
        assert_eq!(
            issuers[1].source,
            KeySource::File("/etc/nodegate/jwks.json".into())
        );
        assert_eq!(issuers[1].algorithms, vec![Algorithm::RS256]);
        assert_eq!(issuers[1].kind, IssuerKind::Kubernetes);
        assert_eq!(issuers[1].leeway_s, 30);
    }

    fn one(extra: &str) -> Result<Vec<IssuerSettings>, ConfigError> {
        parse(&format!(
            "issuers:\n  - name: a\n    issuer: https://idp.example\n    audiences: [x]\n{extra}"
        ))
    }

    #[test]
    fn table_of_rejections() {
        let cases: &[(&str, &str)] = &[
            ("    algorithms: [none]\n", "AlgNone"),
            ("    algorithms: [HS256]\n", "SymmetricAlg"),
            ("    algorithms: [RS256, HS512]\n", "SymmetricAlg"),
            ("    algorithms: [RS1]\n", "UnknownAlg"),
            ("    algorithms: []\n", "NoAlgorithm"),
            ("    leeway_s: 301\n", "LeewayTooLarge"),
            ("    jwks_refresh_min_interval_s: 0\n", "OutOfRange"),
            (
                "    jwks_uri: https://a/k\n    jwks_file: /k\n",
                "TwoKeySources",
            ),
            (
                "    discovery: true\n    jwks_uri: https://a/k\n",
                "DiscoveryConflict",
            ),
            ("    discovery: false\n", "NoKeySource"),
            ("    jwks_uri: http://10.0.0.1/keys\n", "InsecureUrl"),
            ("    jwks_uri: ftp://a/keys\n", "BadUrl"),
            ("    jwks_uri: /relative\n", "BadUrl"),
            ("    claims: { groups: '' }\n", "BadClaimPath"),
            ("    claims: { groups: '/a~2' }\n", "BadClaimPath"),
            (
                "    jwks_file: /k\n    ca_file: /ca.pem\n",
                "CaFileWithFile",
            ),
        ];
        for (extra, want) in cases {
            let err = one(extra).expect_err(extra);
            assert!(format!("{err:?}").starts_with(want), "{extra}: got {err:?}");
        }
        assert!(matches!(
            parse("issuers:\n  - name: a\n    issuer: https://i\n    audiences: []\n"),
            Err(ConfigError::NoAudience(_))
        ));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_yaml::from_str::<AuthConfig>(
            "issuers:\n  - name: a\n    issuer: https://i\n    audiences: [x]\n    audience: y\n",
        )
        .expect_err("unknown field");
        assert!(
            err.to_string().contains("unknown field `audience`"),
            "{err}"
        );
    }

    #[test]
    fn uniqueness() {
        let dup_name = "issuers:\n  - {name: a, issuer: 'https://i', audiences: [x]}\n  - {name: a, issuer: 'https://j', audiences: [x]}\n";
        assert_eq!(
            parse(dup_name).expect_err("dup"),
            ConfigError::DuplicateName("a".into())
        );
        let dup_iss = "issuers:\n  - {name: a, issuer: 'https://i', audiences: [x]}\n  - {name: b, issuer: 'https://i', audiences: [x]}\n";
        assert!(matches!(
            parse(dup_iss),
            Err(ConfigError::DuplicateIssuer { .. })
        ));
    }

    #[test]
    fn http_rules() {
        assert!(one("    jwks_uri: http://127.0.0.1:8080/keys\n").is_ok());
        assert!(one("    jwks_uri: http://[::1]:8080/keys\n").is_ok());
        assert!(one("    jwks_uri: http://localhost/keys\n").is_ok());
        assert!(one("    jwks_uri: http://idp.lab/keys\n    allow_http: true\n").is_ok());
        assert!(
            parse("issuers:\n  - {name: a, issuer: 'http://idp.lab', audiences: [x]}\n").is_err()
        );
    }

    #[test]
    fn claim_paths() {
        let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"https://x.test/groups":["a"],"realm_access":{"roles":["r"]},"a/b":{"c~d":1}}"#,
        )
        .expect("json");
        let get = |raw: &str| ClaimPath::parse(raw).expect("path").get(&claims).cloned();
        assert_eq!(get("https://x.test/groups"), Some(serde_json::json!(["a"])));
        assert_eq!(get("/realm_access/roles"), Some(serde_json::json!(["r"])));
        assert_eq!(get("/a~1b/c~0d"), Some(serde_json::json!(1)));
        assert_eq!(get("/missing"), None);
    }

    #[test]
    fn limits() {
        let err = parse("max_token_bytes: 100\n").expect_err("too small");
        assert_eq!(err, ConfigError::TokenLimit(100));
        let err = parse("token_cache: { ttl_s: 3600 }\n").expect_err("ttl");
        assert_eq!(err, ConfigError::CacheTtl(3600));
    }
}
