//! Domain types: a policy that parsed is a policy that means one thing.
//!
//! [`Policy`] is built only through `TryFrom` the wire types (or [`Policy::from_yaml`]); every
//! value is validated there with an error naming its path in the document
//! (`policy.allow[1].when.and[0].method[2]`). The request side ([`RequestContext`]) lives here
//! too, since criteria and requests are two halves of the same vocabulary.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::path::{CanonicalPath, MAX_PATH_LEN};
use super::spiffe::SpiffePattern;
use super::wire::{
    ClaimSpec, ConditionSpec, PathSpec, PolicyDocument, PolicySpec, RuleSpec, StringList,
    TimeWindowSpec, WorkloadSpec,
};

/// Deepest allowed nesting of `and` / `or` / `not`. Real policies use two or three levels; the
/// bound keeps recursion in compile, evaluate and explain far from the stack limit whatever the
/// input.
pub const MAX_CONDITION_DEPTH: usize = 16;

/// Longest accepted rule id.
pub const MAX_RULE_ID_LEN: usize = 128;

/// RFC 5321 §4.5.3.1.3: the longest usable e-mail address.
const MAX_EMAIL_LEN: usize = 254;
/// RFC 1035: the longest DNS name in text form, without the trailing dot.
const MAX_HOST_LEN: usize = 253;

/// A policy that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The document does not have the policy's shape: bad YAML, an unknown field, a wrong type.
    /// `serde_yaml`'s message starts with the path (`policy.allow[0].when: unknown field ...`).
    #[error("policy document: {0}")]
    Syntax(#[from] serde_yaml::Error),
    /// The shape is right but a value is not acceptable.
    #[error("{path}: {kind}")]
    Invalid { path: String, kind: InvalidPolicy },
}

impl PolicyError {
    fn at(path: impl Into<String>, kind: InvalidPolicy) -> Self {
        Self::Invalid {
            path: path.into(),
            kind,
        }
    }

    /// Where in the document the problem is, for semantic errors.
    #[must_use]
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::Syntax(_) => None,
            Self::Invalid { path, .. } => Some(path),
        }
    }

    /// What is wrong, for semantic errors.
    #[must_use]
    pub fn kind(&self) -> Option<&InvalidPolicy> {
        match self {
            Self::Syntax(_) => None,
            Self::Invalid { kind, .. } => Some(kind),
        }
    }
}

/// What is wrong with a value of an otherwise well-formed policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPolicy {
    #[error(
        "`default: {0}` is not supported: only `deny` is allowed (a request that no allow rule \
         matches is always denied)"
    )]
    DefaultNotDeny(String),
    #[error(
        "empty condition: give exactly one criterion (user, email, email_domain, groups, claim, \
         issuer, spiffe_id, workload, method, host, path, source_cidr, time_window) or \
         combinator (and, or, not)"
    )]
    EmptyCondition,
    #[error(
        "a condition holds exactly one criterion or combinator, found {}: {}; combine them \
         explicitly with `and:` or `or:`",
        .0.len(),
        .0.join(", ")
    )]
    AmbiguousCondition(Vec<&'static str>),
    #[error("`{0}` needs at least one condition")]
    EmptyCombinator(&'static str),
    #[error("conditions are nested deeper than {MAX_CONDITION_DEPTH} levels of and/or/not")]
    TooDeep,
    #[error("`{0}` needs at least one value (an empty list never matches)")]
    EmptyList(&'static str),
    #[error("empty string: it would match requests that lack this attribute in some token formats")]
    EmptyValue,
    #[error(
        "rule id `{0}` is invalid: use 1 to {MAX_RULE_ID_LEN} characters from A-Z a-z 0-9 . _ : - \
         starting with a letter or digit"
    )]
    InvalidRuleId(String),
    #[error("rule id `{id}` is already used by {first}")]
    DuplicateRuleId { id: String, first: String },
    #[error(
        "`{0}` is not an HTTP method: methods are case-sensitive upper-case tokens such as GET, \
         POST, PROPFIND"
    )]
    InvalidMethod(String),
    #[error("host pattern `{host}` is invalid: {reason}")]
    InvalidHost { host: String, reason: &'static str },
    #[error("e-mail `{email}` is invalid: {reason}")]
    InvalidEmail { email: String, reason: &'static str },
    #[error("`{value}` is not a SPIFFE ID or `<SPIFFE ID>/*` pattern: {reason}")]
    InvalidSpiffeId { value: String, reason: &'static str },
    #[error("e-mail domain `{domain}` is invalid: {reason}")]
    InvalidEmailDomain {
        domain: String,
        reason: &'static str,
    },
    #[error("`path` needs exactly one of `exact`, `prefix`, `glob`")]
    PathMatcherCount,
    #[error("path pattern `{pattern}` is invalid: {reason}")]
    InvalidPathPattern {
        pattern: String,
        reason: &'static str,
    },
    #[error("`claim` needs exactly one of `equals`, `contains`")]
    ClaimOperatorCount,
    #[error(
        "`claim.equals` must be a string, a number or a boolean (found {0}); use `contains` to \
         test an element of a list claim"
    )]
    ClaimEqualsNotScalar(&'static str),
    #[error("`workload` needs at least one of `namespace`, `service_account`, `labels`")]
    EmptyWorkload,
    #[error("`{value}` is not an IP network: {reason}")]
    InvalidCidr { value: String, reason: String },
    #[error("`{value}` has host bits set: write the network address `{network}`")]
    CidrHostBits { value: String, network: String },
    #[error(
        "`{0}` is an IPv4-mapped IPv6 network: write the IPv4 form (mapped source addresses are \
         compared as IPv4)"
    )]
    CidrV4Mapped(String),
    #[error(
        "`source_cidr` is only an extra condition: put it directly in an `and` together with at \
         least one identity criterion (user, email, email_domain, groups, claim, issuer, \
         spiffe_id, workload); an allow rule must never be network-only"
    )]
    SourceCidrInAllow,
    #[error(
        "`source_cidr` is only an extra condition: put it directly in an `and` together with at \
         least one identity or request criterion (user, email, email_domain, groups, claim, \
         issuer, workload, method, host, path)"
    )]
    SourceCidrInDeny,
    #[error("`time_window` needs at least one of `days`, `from`, `to`")]
    EmptyTimeWindow,
    #[error("`{0}` is not a day: use mon, tue, wed, thu, fri, sat, sun or a range like mon..fri")]
    InvalidDay(String),
    #[error("`{0}` is not a time of day: use HH:MM in 24-hour form (`to` may be 24:00)")]
    InvalidTimeOfDay(String),
    #[error(
        "time zone `{0}` is not supported: use UTC or a fixed offset like +02:00 (named zones \
         need a tz database and DST rules, which the data path does not carry)"
    )]
    InvalidTimezone(String),
    #[error(
        "`from` ({from}) must be before `to` ({to}): split a window that crosses midnight into \
         two conditions under `or`"
    )]
    InvertedTimeWindow { from: String, to: String },
}

/// Allow or deny list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    Allow,
    Deny,
}

impl RuleKind {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated policy. The default is always deny and therefore not stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    deny: Vec<Rule>,
    allow: Vec<Rule>,
}

impl Policy {
    /// Parses a policy document (`policy:` at the top level).
    ///
    /// # Errors
    /// [`PolicyError::Syntax`] for shape errors, [`PolicyError::Invalid`] for bad values; both
    /// name the path of the offending field.
    pub fn from_yaml(text: &str) -> Result<Self, PolicyError> {
        let doc: PolicyDocument = serde_yaml::from_str(text)?;
        Self::try_from(doc)
    }

    /// Deny rules in document order.
    #[must_use]
    pub fn deny(&self) -> &[Rule] {
        &self.deny
    }

    /// Allow rules in document order.
    #[must_use]
    pub fn allow(&self) -> &[Rule] {
        &self.allow
    }

    /// Builds from a spec whose errors are reported under `root` (`policy` for the file format,
    /// `spec` for the CRD).
    ///
    /// # Errors
    /// [`PolicyError::Invalid`] naming the path of the first bad value.
    pub fn from_spec(spec: PolicySpec, root: &str) -> Result<Self, PolicyError> {
        if let Some(default) = spec.default
            && default != "deny"
        {
            return Err(PolicyError::at(
                format!("{root}.default"),
                InvalidPolicy::DefaultNotDeny(default),
            ));
        }
        // Ids are unique across both lists: a rule id names one rule in the decision log.
        let mut seen: HashMap<String, String> = HashMap::new();
        let deny = rules(spec.deny, RuleKind::Deny, root, &mut seen)?;
        let allow = rules(spec.allow, RuleKind::Allow, root, &mut seen)?;
        Ok(Self { deny, allow })
    }
}

impl TryFrom<PolicySpec> for Policy {
    type Error = PolicyError;

    fn try_from(spec: PolicySpec) -> Result<Self, Self::Error> {
        Self::from_spec(spec, "policy")
    }
}

impl TryFrom<PolicyDocument> for Policy {
    type Error = PolicyError;

    fn try_from(doc: PolicyDocument) -> Result<Self, Self::Error> {
        Self::from_spec(doc.policy, "policy")
    }
}

/// One allow or deny rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    id: String,
    kind: RuleKind,
    when: Condition,
}

impl Rule {
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    #[must_use]
    pub fn kind(&self) -> RuleKind {
        self.kind
    }

    #[must_use]
    pub fn when(&self) -> &Condition {
        &self.when
    }
}

/// A tree of criteria. Combinator lists are never empty.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    And(Vec<Condition>),
    Or(Vec<Condition>),
    Not(Box<Condition>),
    Criterion(Criterion),
}

/// One test on the request. Lists are any-of and never empty.
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    /// Identity subject, only for `IdentityKind::User`; exact.
    User(Vec<String>),
    /// Verified e-mail; ASCII case-insensitive.
    Email(Vec<String>),
    /// Domain part of the e-mail; ASCII case-insensitive, exact (no subdomains).
    EmailDomain(Vec<String>),
    /// Any of the identity's groups; exact.
    Groups(Vec<String>),
    Claim(ClaimMatch),
    /// Token issuer; exact.
    Issuer(Vec<String>),
    /// SPIFFE ID of the verified client certificate; exact or below a path.
    SpiffeId(Vec<SpiffePattern>),
    Workload(WorkloadMatch),
    /// Upper-case method tokens; exact.
    Method(Vec<String>),
    Host(Vec<HostPattern>),
    Path(PathPattern),
    SourceCidr(Vec<IpNet>),
    TimeWindow(TimeWindow),
}

impl Criterion {
    /// The YAML key of this criterion.
    #[must_use]
    pub const fn key(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::Email(_) => "email",
            Self::EmailDomain(_) => "email_domain",
            Self::Groups(_) => "groups",
            Self::Claim(_) => "claim",
            Self::Issuer(_) => "issuer",
            Self::SpiffeId(_) => "spiffe_id",
            Self::Workload(_) => "workload",
            Self::Method(_) => "method",
            Self::Host(_) => "host",
            Self::Path(_) => "path",
            Self::SourceCidr(_) => "source_cidr",
            Self::TimeWindow(_) => "time_window",
        }
    }

    /// Criteria that say who is calling.
    #[must_use]
    pub const fn is_identity(&self) -> bool {
        matches!(
            self,
            Self::User(_)
                | Self::Email(_)
                | Self::EmailDomain(_)
                | Self::Groups(_)
                | Self::Claim(_)
                | Self::Issuer(_)
                | Self::SpiffeId(_)
                | Self::Workload(_)
        )
    }

    /// Criteria that say what is being asked for.
    #[must_use]
    pub const fn is_request(&self) -> bool {
        matches!(self, Self::Method(_) | Self::Host(_) | Self::Path(_))
    }
}

/// `claim: { name, equals | contains }` on a top-level claim. The name is not split on dots:
/// namespaced claims such as `https://example.com/roles` are common and would be misread.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimMatch {
    name: String,
    op: ClaimOp,
}

impl ClaimMatch {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn op(&self) -> &ClaimOp {
        &self.op
    }
}

/// How a claim is compared. There is no type coercion: `"3"` does not equal `3` and `"true"` does
/// not equal `true`, because coercion rules are where policy bypasses hide.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimOp {
    /// Same type and value (numbers compare numerically). Never matches an array or object claim.
    Equals(ClaimScalar),
    /// On a string claim: case-sensitive substring. On an array claim: some element is a string
    /// equal to the value. Never matches other claim types.
    Contains(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClaimScalar {
    String(String),
    Number(serde_json::Number),
    Bool(bool),
}

/// All given parts must match the request's workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadMatch {
    namespace: Option<String>,
    service_account: Option<String>,
    labels: BTreeMap<String, String>,
}

impl WorkloadMatch {
    #[must_use]
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    #[must_use]
    pub fn service_account(&self) -> Option<&str> {
        self.service_account.as_deref()
    }

    #[must_use]
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }
}

/// `host` pattern, without port and trailing dot, as written (lower-cased when compiled).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `api.example.com`
    Exact(String),
    /// `*.example.com`, stored as `.example.com`: one or more labels before the suffix; does not
    /// match `example.com` itself.
    Suffix(String),
}

/// `path` matcher on the canonical (decoded) path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Whole-path equality; a trailing `/` is significant.
    Exact(String),
    /// Segment-aware prefix, stored without trailing `/`: `/admin` (or `/admin/`) matches
    /// `/admin`, `/admin/` and `/admin/x` but not `/administrator`. `/` matches every path.
    Prefix(String),
    Glob(Glob),
}

/// Segment-aware glob: `*` matches within one segment, `**` (a whole segment) matches zero or
/// more segments. `/admin/**` therefore also matches `/admin` itself, which is what a deny rule
/// author means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    source: String,
    segments: Vec<GlobSegment>,
}

impl Glob {
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.source
    }

    #[must_use]
    pub fn segments(&self) -> &[GlobSegment] {
        &self.segments
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobSegment {
    /// `**`
    AnySegments,
    /// A segment without `*`.
    Literal(String),
    /// A segment with at least one `*`, split at the stars: `*.json` is `["", ".json"]`.
    Wildcard(Vec<String>),
}

/// Days of week and a half-open time-of-day range `[from, to)` in a fixed UTC offset.
/// Evaluated from the request's `now` (unix seconds) only: the matcher stays pure.
///
/// Plain arithmetic instead of `time`/`chrono`/`jiff`: with fixed offsets the only calendar fact
/// needed is the weekday, and leaving out a tz database keeps DST ambiguity (a 02:30 that
/// happens twice or never) out of the data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// Bit 0 = Monday .. bit 6 = Sunday.
    days: u8,
    from_minute: u16,
    to_minute: u16,
    offset_seconds: i32,
}

impl TimeWindow {
    #[must_use]
    pub const fn days_mask(&self) -> u8 {
        self.days
    }

    /// Minutes after local midnight, inclusive.
    #[must_use]
    pub const fn from_minute(&self) -> u16 {
        self.from_minute
    }

    /// Minutes after local midnight, exclusive (1440 = end of day).
    #[must_use]
    pub const fn to_minute(&self) -> u16 {
        self.to_minute
    }

    #[must_use]
    pub const fn offset_seconds(&self) -> i32 {
        self.offset_seconds
    }

    /// Whether the unix time `now` falls in the window.
    #[must_use]
    pub fn contains(&self, now: i64) -> bool {
        let Some(local) = now.checked_add(i64::from(self.offset_seconds)) else {
            return false;
        };
        let day = local.div_euclid(86_400);
        // 1970-01-01 was a Thursday: with Monday = 0 that is index 3.
        let weekday = (day + 3).rem_euclid(7);
        let second = local.rem_euclid(86_400);
        self.days & (1 << weekday) != 0
            && second >= i64::from(self.from_minute) * 60
            && second < i64::from(self.to_minute) * 60
    }
}

/// Who is calling, as established by the auth layer. Only verified values belong here: the
/// matcher trusts every field (e.g. `email` only when the `IdP` marked it verified).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Identity {
    pub kind: IdentityKind,
    pub subject: Option<String>,
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub issuer: Option<String>,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl Identity {
    #[must_use]
    pub fn anonymous() -> Self {
        Self::default()
    }

    /// The borrowed form the matcher reads.
    #[must_use]
    pub fn view(&self) -> IdentityRef<'_> {
        IdentityRef {
            kind: self.kind,
            subject: self.subject.as_deref(),
            email: self.email.as_deref(),
            groups: &self.groups,
            issuer: self.issuer.as_deref(),
            claims: &self.claims,
        }
    }
}

/// An [`Identity`] as the matcher reads it, borrowed from wherever the verified values live
/// (the auth layer's cached identity on the request path), so that evaluating a request copies
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdentityRef<'a> {
    pub kind: IdentityKind,
    pub subject: Option<&'a str>,
    pub email: Option<&'a str>,
    pub groups: &'a [String],
    pub issuer: Option<&'a str>,
    pub claims: &'a serde_json::Map<String, serde_json::Value>,
}

impl IdentityRef<'_> {
    /// An owned copy (`gateway explain`, tests).
    #[must_use]
    pub fn to_identity(&self) -> Identity {
        Identity {
            kind: self.kind,
            subject: self.subject.map(str::to_owned),
            email: self.email.map(str::to_owned),
            groups: self.groups.to_vec(),
            issuer: self.issuer.map(str::to_owned),
            claims: self.claims.clone(),
        }
    }
}

impl IdentityRef<'static> {
    /// No credential.
    #[must_use]
    pub fn anonymous() -> Self {
        static NO_CLAIMS: std::sync::LazyLock<serde_json::Map<String, serde_json::Value>> =
            std::sync::LazyLock::new(serde_json::Map::new);
        Self {
            kind: IdentityKind::Anonymous,
            subject: None,
            email: None,
            groups: &[],
            issuer: None,
            claims: &NO_CLAIMS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityKind {
    User,
    Workload,
    #[default]
    Anonymous,
}

/// The calling workload (from a verified `ServiceAccount` token or the source pod the kernel saw).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
}

/// Everything the matcher may look at. Borrowed so that building one per request costs nothing;
/// the path can only be a [`CanonicalPath`], so an undecoded or ambiguous path cannot reach
/// policy.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    pub identity: IdentityRef<'a>,
    pub workload: Option<&'a Workload>,
    pub source_ip: Option<IpAddr>,
    /// The SPIFFE ID of the client certificate verified in the TLS handshake (never from a
    /// header or a token).
    pub spiffe_id: Option<&'a str>,
    /// As received; compared case-sensitively (RFC 9110 §9.1).
    pub method: &'a str,
    /// `Host` / `:authority`, port and case as received; normalised by the matcher.
    pub host: Option<&'a str>,
    pub path: &'a CanonicalPath,
    /// Unix seconds; an input so that evaluation is a pure function.
    pub now: i64,
}

// ---------------------------------------------------------------------------------------------
// Conversion from the wire types.
// ---------------------------------------------------------------------------------------------

fn rules(
    specs: Vec<RuleSpec>,
    kind: RuleKind,
    root: &str,
    seen: &mut HashMap<String, String>,
) -> Result<Vec<Rule>, PolicyError> {
    let mut out = Vec::with_capacity(specs.len());
    for (index, spec) in specs.into_iter().enumerate() {
        let path = format!("{root}.{kind}[{index}]");
        let id = match spec.id {
            Some(id) => {
                if !valid_rule_id(&id) {
                    return Err(PolicyError::at(
                        format!("{path}.id"),
                        InvalidPolicy::InvalidRuleId(id),
                    ));
                }
                id
            }
            // User ids cannot contain `[`, so an automatic id never collides with a written one.
            None => format!("{kind}[{index}]"),
        };
        if let Some(first) = seen.get(&id) {
            return Err(PolicyError::at(
                format!("{path}.id"),
                InvalidPolicy::DuplicateRuleId {
                    id,
                    first: first.clone(),
                },
            ));
        }
        seen.insert(id.clone(), path.clone());
        let when_path = format!("{path}.when");
        let when = condition(spec.when, &when_path, 0)?;
        check_source_cidr(&when, &when_path, kind, false)?;
        out.push(Rule { id, kind, when });
    }
    Ok(out)
}

fn valid_rule_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_RULE_ID_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Names of the keys present in a condition map, in declaration order.
fn present_keys(c: &ConditionSpec) -> Vec<&'static str> {
    let flags = [
        ("and", c.and.is_some()),
        ("or", c.or.is_some()),
        ("not", c.not.is_some()),
        ("user", c.user.is_some()),
        ("email", c.email.is_some()),
        ("email_domain", c.email_domain.is_some()),
        ("groups", c.groups.is_some()),
        ("claim", c.claim.is_some()),
        ("issuer", c.issuer.is_some()),
        ("spiffe_id", c.spiffe_id.is_some()),
        ("workload", c.workload.is_some()),
        ("method", c.method.is_some()),
        ("host", c.host.is_some()),
        ("path", c.path.is_some()),
        ("source_cidr", c.source_cidr.is_some()),
        ("time_window", c.time_window.is_some()),
    ];
    flags
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
}

/// `depth` counts the combinators above this condition.
fn condition(spec: ConditionSpec, path: &str, depth: usize) -> Result<Condition, PolicyError> {
    let keys = present_keys(&spec);
    match keys.len() {
        0 => return Err(PolicyError::at(path, InvalidPolicy::EmptyCondition)),
        1 => {}
        _ => {
            return Err(PolicyError::at(
                path,
                InvalidPolicy::AmbiguousCondition(keys),
            ));
        }
    }
    let ConditionSpec {
        and,
        or,
        not,
        user,
        email,
        email_domain,
        groups,
        claim,
        issuer,
        spiffe_id,
        workload,
        method,
        host,
        path: path_spec,
        source_cidr,
        time_window: window,
    } = spec;

    if let Some(inner) = not {
        let not_path = format!("{path}.not");
        if depth + 1 > MAX_CONDITION_DEPTH {
            return Err(PolicyError::at(not_path, InvalidPolicy::TooDeep));
        }
        return Ok(Condition::Not(Box::new(condition(
            *inner,
            &not_path,
            depth + 1,
        )?)));
    }
    if let Some(list) = and {
        return combinator(list, "and", path, depth).map(Condition::And);
    }
    if let Some(list) = or {
        return combinator(list, "or", path, depth).map(Condition::Or);
    }

    let at = |key: &str| format!("{path}.{key}");
    let criterion = if let Some(list) = user {
        Criterion::User(plain_list(list, "user", &at("user"))?)
    } else if let Some(list) = email {
        Criterion::Email(checked_list(list, "email", &at("email"), email_value)?)
    } else if let Some(list) = email_domain {
        Criterion::EmailDomain(checked_list(
            list,
            "email_domain",
            &at("email_domain"),
            email_domain_value,
        )?)
    } else if let Some(list) = groups {
        Criterion::Groups(plain_list(list, "groups", &at("groups"))?)
    } else if let Some(spec) = claim {
        Criterion::Claim(claim_match(spec, &at("claim"))?)
    } else if let Some(list) = issuer {
        Criterion::Issuer(plain_list(list, "issuer", &at("issuer"))?)
    } else if let Some(list) = spiffe_id {
        Criterion::SpiffeId(checked_list(
            list,
            "spiffe_id",
            &at("spiffe_id"),
            spiffe_value,
        )?)
    } else if let Some(spec) = workload {
        Criterion::Workload(workload_match(spec, &at("workload"))?)
    } else if let Some(list) = method {
        Criterion::Method(checked_list(list, "method", &at("method"), method_value)?)
    } else if let Some(list) = host {
        Criterion::Host(checked_list(list, "host", &at("host"), host_pattern)?)
    } else if let Some(spec) = path_spec {
        Criterion::Path(path_pattern(spec, &at("path"))?)
    } else if let Some(list) = source_cidr {
        Criterion::SourceCidr(checked_list(
            list,
            "source_cidr",
            &at("source_cidr"),
            cidr_value,
        )?)
    } else if let Some(spec) = window {
        Criterion::TimeWindow(time_window(spec, &at("time_window"))?)
    } else {
        // `keys.len() == 1` above guarantees one branch was taken.
        return Err(PolicyError::at(path, InvalidPolicy::EmptyCondition));
    };
    Ok(Condition::Criterion(criterion))
}

/// The children of `and` / `or`; `depth` is that of the combinator's own condition.
fn combinator(
    list: Vec<ConditionSpec>,
    op: &'static str,
    path: &str,
    depth: usize,
) -> Result<Vec<Condition>, PolicyError> {
    if depth + 1 > MAX_CONDITION_DEPTH {
        return Err(PolicyError::at(
            format!("{path}.{op}"),
            InvalidPolicy::TooDeep,
        ));
    }
    if list.is_empty() {
        return Err(PolicyError::at(
            format!("{path}.{op}"),
            InvalidPolicy::EmptyCombinator(op),
        ));
    }
    let mut children = Vec::with_capacity(list.len());
    for (i, child) in list.into_iter().enumerate() {
        children.push(condition(child, &format!("{path}.{op}[{i}]"), depth + 1)?);
    }
    Ok(children)
}

fn plain_list(
    list: StringList,
    name: &'static str,
    path: &str,
) -> Result<Vec<String>, PolicyError> {
    checked_list(list, name, path, Ok)
}

/// Validates each item; errors name the item (`...groups[2]`).
fn checked_list<T>(
    list: StringList,
    name: &'static str,
    path: &str,
    check: impl Fn(String) -> Result<T, InvalidPolicy>,
) -> Result<Vec<T>, PolicyError> {
    if list.0.is_empty() {
        return Err(PolicyError::at(path, InvalidPolicy::EmptyList(name)));
    }
    let mut out = Vec::with_capacity(list.0.len());
    for (i, item) in list.0.into_iter().enumerate() {
        let item_path = || format!("{path}[{i}]");
        if item.is_empty() {
            return Err(PolicyError::at(item_path(), InvalidPolicy::EmptyValue));
        }
        out.push(check(item).map_err(|kind| PolicyError::at(item_path(), kind))?);
    }
    Ok(out)
}

fn spiffe_value(value: String) -> Result<SpiffePattern, InvalidPolicy> {
    SpiffePattern::parse(&value).map_err(|reason| InvalidPolicy::InvalidSpiffeId { value, reason })
}

fn method_value(m: String) -> Result<String, InvalidPolicy> {
    // RFC 9110 §5.6.2 `token`, restricted to upper case: the standard methods are upper case and
    // methods are case-sensitive, so `get` would silently never match.
    let tchar =
        |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    if m.bytes().all(tchar) {
        Ok(m)
    } else {
        Err(InvalidPolicy::InvalidMethod(m))
    }
}

/// DNS-name syntax shared by host patterns and e-mail domains.
fn dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_HOST_LEN {
        return Err("a DNS name is 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label must be 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(
                "labels may contain only letters, digits, `-` and `_` (use punycode for IDNs)",
            );
        }
    }
    Ok(())
}

fn host_pattern(raw: String) -> Result<HostPattern, InvalidPolicy> {
    host_pattern_str(&raw).map_err(|reason| InvalidPolicy::InvalidHost { host: raw, reason })
}

fn host_pattern_str(raw: &str) -> Result<HostPattern, &'static str> {
    let (wildcard, rest) = match raw.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    if rest.contains('*') {
        return Err("`*` is only allowed as the whole first label (`*.example.com`)");
    }
    if rest.starts_with('[') {
        return Err("IP literals in brackets are not supported: match the service's DNS name");
    }
    if rest.contains(':') {
        return Err(
            "a host pattern never includes a port: the request's port is stripped before matching",
        );
    }
    // `example.com.` and `example.com` are the same name; the matcher strips request dots too.
    let name = rest.strip_suffix('.').unwrap_or(rest);
    dns_name(name)?;
    Ok(if wildcard {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_owned())
    })
}

fn email_value(raw: String) -> Result<String, InvalidPolicy> {
    let fail = |reason| InvalidPolicy::InvalidEmail {
        email: raw.clone(),
        reason,
    };
    if raw.len() > MAX_EMAIL_LEN {
        return Err(fail("longer than 254 characters"));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail("contains whitespace or control characters"));
    }
    let Some((local, domain)) = raw.split_once('@') else {
        return Err(fail("expected local@domain"));
    };
    if local.is_empty() || domain.contains('@') {
        return Err(fail("expected exactly one `@` with a non-empty local part"));
    }
    dns_name(domain).map_err(fail)?;
    Ok(raw)
}

fn email_domain_value(raw: String) -> Result<String, InvalidPolicy> {
    let fail = |reason| InvalidPolicy::InvalidEmailDomain {
        domain: raw.clone(),
        reason,
    };
    if raw.contains('@') {
        return Err(fail("give the domain only, without `@`"));
    }
    if raw.starts_with('*') || raw.starts_with('.') {
        return Err(fail(
            "no wildcards: the domain is compared exactly (subdomains do not match)",
        ));
    }
    dns_name(&raw).map_err(fail)?;
    Ok(raw)
}

fn cidr_value(raw: String) -> Result<IpNet, InvalidPolicy> {
    let net = match raw.parse::<IpNet>() {
        Ok(net) => {
            if net.addr() != net.network() {
                return Err(InvalidPolicy::CidrHostBits {
                    network: net.trunc().to_string(),
                    value: raw,
                });
            }
            net
        }
        // A bare address is a host route.
        Err(net_err) => match raw.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                return Err(InvalidPolicy::InvalidCidr {
                    reason: net_err.to_string(),
                    value: raw,
                });
            }
        },
    };
    if let IpNet::V6(v6) = net
        && v6.addr().to_ipv4_mapped().is_some()
        && v6.prefix_len() >= 96
    {
        return Err(InvalidPolicy::CidrV4Mapped(raw));
    }
    Ok(net)
}

fn claim_match(spec: ClaimSpec, path: &str) -> Result<ClaimMatch, PolicyError> {
    if spec.name.is_empty() {
        return Err(PolicyError::at(
            format!("{path}.name"),
            InvalidPolicy::EmptyValue,
        ));
    }
    let op = match (spec.equals, spec.contains) {
        (Some(value), None) => {
            let scalar = match value {
                serde_json::Value::String(s) => ClaimScalar::String(s),
                serde_json::Value::Number(n) => ClaimScalar::Number(n),
                serde_json::Value::Bool(b) => ClaimScalar::Bool(b),
                serde_json::Value::Null => return Err(not_scalar(path, "null")),
                serde_json::Value::Array(_) => return Err(not_scalar(path, "a list")),
                serde_json::Value::Object(_) => return Err(not_scalar(path, "a map")),
            };
            ClaimOp::Equals(scalar)
        }
        (None, Some(needle)) => {
            // An empty substring would match every string claim.
            if needle.is_empty() {
                return Err(PolicyError::at(
                    format!("{path}.contains"),
                    InvalidPolicy::EmptyValue,
                ));
            }
            ClaimOp::Contains(needle)
        }
        _ => return Err(PolicyError::at(path, InvalidPolicy::ClaimOperatorCount)),
    };
    Ok(ClaimMatch {
        name: spec.name,
        op,
    })
}

fn not_scalar(path: &str, found: &'static str) -> PolicyError {
    PolicyError::at(
        format!("{path}.equals"),
        InvalidPolicy::ClaimEqualsNotScalar(found),
    )
}

fn workload_match(spec: WorkloadSpec, path: &str) -> Result<WorkloadMatch, PolicyError> {
    let labels = spec.labels.map(|l| l.0).unwrap_or_default();
    if spec.namespace.is_none() && spec.service_account.is_none() && labels.is_empty() {
        return Err(PolicyError::at(path, InvalidPolicy::EmptyWorkload));
    }
    for (field, value) in [
        ("namespace", &spec.namespace),
        ("service_account", &spec.service_account),
    ] {
        if value.as_deref() == Some("") {
            return Err(PolicyError::at(
                format!("{path}.{field}"),
                InvalidPolicy::EmptyValue,
            ));
        }
    }
    // Label values may be empty (Kubernetes allows it); keys may not.
    if labels.contains_key("") {
        return Err(PolicyError::at(
            format!("{path}.labels"),
            InvalidPolicy::EmptyValue,
        ));
    }
    Ok(WorkloadMatch {
        namespace: spec.namespace,
        service_account: spec.service_account,
        labels,
    })
}

fn path_pattern(spec: PathSpec, path: &str) -> Result<PathPattern, PolicyError> {
    let fail = |key: &str, pattern: String, reason| {
        PolicyError::at(
            format!("{path}.{key}"),
            InvalidPolicy::InvalidPathPattern { pattern, reason },
        )
    };
    match (spec.exact, spec.prefix, spec.glob) {
        (Some(p), None, None) => match literal_path(&p, false) {
            Ok(()) => Ok(PathPattern::Exact(p)),
            Err(reason) => Err(fail("exact", p, reason)),
        },
        (None, Some(p), None) => match literal_path(&p, false) {
            Ok(()) => {
                // Segment-aware prefix: `/admin/` and `/admin` are the same prefix, so a deny on
                // `/admin/` also covers `/admin` itself.
                let trimmed = if p.len() > 1 {
                    p.strip_suffix('/').unwrap_or(&p).to_owned()
                } else {
                    p
                };
                Ok(PathPattern::Prefix(trimmed))
            }
            Err(reason) => Err(fail("prefix", p, reason)),
        },
        (None, None, Some(p)) => match glob(&p) {
            Ok(segments) => Ok(PathPattern::Glob(Glob {
                source: p,
                segments,
            })),
            Err(reason) => Err(fail("glob", p, reason)),
        },
        _ => Err(PolicyError::at(path, InvalidPolicy::PathMatcherCount)),
    }
}

/// Patterns are written in canonical (decoded) form; anything a canonical path can never contain
/// is refused, since such a pattern could never match and is surely a mistake.
fn literal_path(p: &str, allow_star: bool) -> Result<(), &'static str> {
    if !p.starts_with('/') {
        return Err("must start with `/`");
    }
    if p.len() > MAX_PATH_LEN {
        return Err("longer than the longest accepted request path");
    }
    if p.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if p.contains('%') {
        return Err(
            "patterns match the decoded path: write the character itself (`/a b`, not `/a%20b`)",
        );
    }
    if p.contains('?') || p.contains('#') {
        return Err("the query and fragment never take part in path matching");
    }
    if p.contains('\\') || p.contains(';') {
        return Err("`\\` and `;` are rejected in request paths, so this could never match");
    }
    if !allow_star && p.contains('*') {
        return Err("`*` is only special in `glob:`; use a glob pattern");
    }
    let body = &p[1..];
    let mut segments = body.split('/').peekable();
    while let Some(seg) = segments.next() {
        if seg.is_empty() && segments.peek().is_some() {
            return Err("empty segment (`//`): requests with one are rejected");
        }
        if seg == "." || seg == ".." {
            return Err("dot segment: requests with one are rejected");
        }
    }
    Ok(())
}

fn glob(p: &str) -> Result<Vec<GlobSegment>, &'static str> {
    literal_path(p, true)?;
    if p.contains(['[', ']', '{', '}']) {
        return Err("only `*` and `**` are supported; `[...]` and `{...}` are reserved");
    }
    p[1..]
        .split('/')
        .map(|seg| {
            if seg == "**" {
                Ok(GlobSegment::AnySegments)
            } else if seg.contains("**") {
                Err("`**` must be a whole segment (`/a/**/b`); use `*` within a segment")
            } else if seg.contains('*') {
                Ok(GlobSegment::Wildcard(
                    seg.split('*').map(str::to_owned).collect(),
                ))
            } else {
                Ok(GlobSegment::Literal(seg.to_owned()))
            }
        })
        .collect()
}

fn time_window(spec: TimeWindowSpec, path: &str) -> Result<TimeWindow, PolicyError> {
    if spec.days.is_none() && spec.from.is_none() && spec.to.is_none() {
        return Err(PolicyError::at(path, InvalidPolicy::EmptyTimeWindow));
    }
    let days = match spec.days {
        None => 0x7F,
        Some(items) => {
            if items.is_empty() {
                return Err(PolicyError::at(
                    format!("{path}.days"),
                    InvalidPolicy::EmptyList("days"),
                ));
            }
            let mut mask = 0u8;
            for (i, item) in items.into_iter().enumerate() {
                mask |= day_range(&item).ok_or_else(|| {
                    PolicyError::at(format!("{path}.days[{i}]"), InvalidPolicy::InvalidDay(item))
                })?;
            }
            mask
        }
    };
    let time = |field: &str, value: Option<String>, default: u16| match value {
        None => Ok(default),
        Some(v) => time_of_day(&v, field == "to").ok_or_else(|| {
            PolicyError::at(
                format!("{path}.{field}"),
                InvalidPolicy::InvalidTimeOfDay(v),
            )
        }),
    };
    let from_minute = time("from", spec.from.clone(), 0)?;
    let to_minute = time("to", spec.to.clone(), 24 * 60)?;
    if from_minute >= to_minute {
        return Err(PolicyError::at(
            path,
            InvalidPolicy::InvertedTimeWindow {
                from: spec.from.unwrap_or_else(|| "00:00".to_owned()),
                to: spec.to.unwrap_or_else(|| "24:00".to_owned()),
            },
        ));
    }
    let offset_seconds = match spec.tz {
        None => 0,
        Some(tz) => utc_offset(&tz).ok_or_else(|| {
            PolicyError::at(format!("{path}.tz"), InvalidPolicy::InvalidTimezone(tz))
        })?,
    };
    Ok(TimeWindow {
        days,
        from_minute,
        to_minute,
        offset_seconds,
    })
}

/// `mon` or `mon..fri` (ranges may wrap: `fri..mon` is Friday to Monday) as a day bitmask.
fn day_range(item: &str) -> Option<u8> {
    let day = |s: &str| {
        const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
        NAMES.iter().position(|n| n.eq_ignore_ascii_case(s.trim()))
    };
    let (start, end) = if let Some((a, b)) = item.split_once("..") {
        (day(a)?, day(b)?)
    } else {
        let d = day(item)?;
        (d, d)
    };
    let mut mask = 0u8;
    let mut d = start;
    loop {
        mask |= 1 << d;
        if d == end {
            return Some(mask);
        }
        d = (d + 1) % 7;
    }
}

/// `HH:MM` as minutes after midnight; `24:00` only where `allow_end_of_day`.
fn time_of_day(s: &str, allow_end_of_day: bool) -> Option<u16> {
    let b = s.as_bytes();
    if b.len() != 5 || b[2] != b':' {
        return None;
    }
    let two = |hi: u8, lo: u8| {
        (hi.is_ascii_digit() && lo.is_ascii_digit())
            .then(|| u16::from(hi - b'0') * 10 + u16::from(lo - b'0'))
    };
    let (h, m) = (two(b[0], b[1])?, two(b[3], b[4])?);
    match (h, m) {
        (0..=23, 0..=59) => Some(h * 60 + m),
        (24, 0) if allow_end_of_day => Some(24 * 60),
        _ => None,
    }
}

/// `UTC`, `Z`, `+HH:MM` or `-HH:MM` (at most ±18:00) as seconds east of UTC.
fn utc_offset(tz: &str) -> Option<i32> {
    if tz.eq_ignore_ascii_case("utc") || tz == "Z" {
        return Some(0);
    }
    let (sign, rest) = match tz.as_bytes().first()? {
        b'+' => (1, &tz[1..]),
        b'-' => (-1, &tz[1..]),
        _ => return None,
    };
    let minutes = time_of_day(rest, false)?;
    (minutes <= 18 * 60).then(|| sign * i32::from(minutes) * 60)
}

/// Whether a condition can only match when some criterion of the accepted class matched
/// positively (a `not` never anchors: "anyone but X" is not an identity).
fn anchored(c: &Condition, accept: fn(&Criterion) -> bool) -> bool {
    match c {
        Condition::Criterion(k) => accept(k),
        Condition::And(list) => list.iter().any(|c| anchored(c, accept)),
        Condition::Or(list) => list.iter().all(|c| anchored(c, accept)),
        Condition::Not(_) => false,
    }
}

/// `source_cidr` (or `not: source_cidr`) may only be a direct child of an `and` whose other
/// children anchor the rule to an identity (allow rules) or to an identity or request attribute
/// (deny rules, which can only ever take access away). `allowed` says whether the parent made
/// this position acceptable.
fn check_source_cidr(
    c: &Condition,
    path: &str,
    kind: RuleKind,
    allowed: bool,
) -> Result<(), PolicyError> {
    let accept: fn(&Criterion) -> bool = match kind {
        RuleKind::Allow => Criterion::is_identity,
        RuleKind::Deny => |k| k.is_identity() || k.is_request(),
    };
    match c {
        Condition::Criterion(Criterion::SourceCidr(_)) if !allowed => Err(PolicyError::at(
            format!("{path}.source_cidr"),
            match kind {
                RuleKind::Allow => InvalidPolicy::SourceCidrInAllow,
                RuleKind::Deny => InvalidPolicy::SourceCidrInDeny,
            },
        )),
        Condition::Criterion(_) => Ok(()),
        Condition::Not(inner) => {
            let is_cidr = matches!(**inner, Condition::Criterion(Criterion::SourceCidr(_)));
            check_source_cidr(inner, &format!("{path}.not"), kind, allowed && is_cidr)
        }
        Condition::Or(list) => list.iter().enumerate().try_for_each(|(i, child)| {
            check_source_cidr(child, &format!("{path}.or[{i}]"), kind, false)
        }),
        Condition::And(list) => list.iter().enumerate().try_for_each(|(i, child)| {
            let siblings_anchor = list
                .iter()
                .enumerate()
                .any(|(j, other)| j != i && anchored(other, accept));
            check_source_cidr(child, &format!("{path}.and[{i}]"), kind, siblings_anchor)
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Policy, PolicyError> {
        Policy::from_yaml(yaml)
    }

    /// The example from the issue, verbatim.
    pub(crate) const EXAMPLE: &str = r#"
policy:
  default: deny            # only deny is allowed as default (no-match denies)
  deny:
    - id: block-contractors
      when: { groups: [contractors] }
  allow:
    - id: admins
      when:
        and:
          - { groups: [admins] }             # any-of list
          - { path: { prefix: /admin/ } }
    - id: devs-read
      when:
        and:
          - or: [ { email_domain: example.com }, { claim: { name: team, equals: platform } } ]
          - { method: [GET, HEAD] }
          - not: { path: { glob: "/admin/**" } }
    - id: ci-bot
      when: { workload: { namespace: ci, service_account: builder } }
    - id: office
      when: { and: [ { user: [alice] }, { source_cidr: [10.0.0.0/8] } ] }
"#;

    #[test]
    fn example_parses_into_the_expected_model() {
        let p = parse(EXAMPLE).unwrap();
        assert_eq!(p.deny().len(), 1);
        assert_eq!(
            p.allow().iter().map(Rule::id).collect::<Vec<_>>(),
            ["admins", "devs-read", "ci-bot", "office"]
        );
        assert_eq!(
            p.deny()[0].when(),
            &Condition::Criterion(Criterion::Groups(vec!["contractors".into()]))
        );
        let Condition::And(admins) = p.allow()[0].when() else {
            panic!("admins is an and")
        };
        assert_eq!(
            admins[1],
            Condition::Criterion(Criterion::Path(PathPattern::Prefix("/admin".into())))
        );
        let Condition::And(devs) = p.allow()[1].when() else {
            panic!("devs-read is an and")
        };
        let Condition::Not(glob) = &devs[2] else {
            panic!("third is not")
        };
        let Condition::Criterion(Criterion::Path(PathPattern::Glob(g))) = &**glob else {
            panic!("glob")
        };
        assert_eq!(
            g.segments(),
            [
                GlobSegment::Literal("admin".into()),
                GlobSegment::AnySegments
            ]
        );
    }

    #[test]
    fn missing_ids_are_positional_and_default_may_be_omitted() {
        let p = parse(
            "policy:\n  allow:\n    - when: {user: a}\n    - when: {user: b}\n  deny:\n    - when: {user: c}\n",
        )
        .unwrap();
        assert_eq!(p.allow()[0].id(), "allow[0]");
        assert_eq!(p.allow()[1].id(), "allow[1]");
        assert_eq!(p.deny()[0].id(), "deny[0]");
        assert_eq!(p.allow()[0].kind(), RuleKind::Allow);
        let empty = parse("policy: {}\n").unwrap();
        assert!(empty.allow().is_empty() && empty.deny().is_empty());
    }

    #[test]
    fn scalars_and_lists_both_accepted_for_string_lists() {
        let a = parse("policy:\n  allow:\n    - when: {groups: admins}\n").unwrap();
        let b = parse("policy:\n  allow:\n    - when: {groups: [admins]}\n").unwrap();
        assert_eq!(a.allow()[0].when(), b.allow()[0].when());
    }

    #[test]
    fn value_normalisation() {
        let p = parse(
            r#"
policy:
  allow:
    - id: h
      when: { host: ["*.Example.com", "API.example.com."] }
    - id: c
      when: { and: [ {user: a}, {source_cidr: [10.1.2.3, "fd00::/8"]} ] }
    - id: p
      when: { path: { prefix: / } }
    - id: t
      when: { time_window: { days: [fri..mon, wed], from: "08:30", to: "24:00", tz: "-05:30" } }
    - id: g
      when: { path: { glob: "/api/*/v*.json/**" } }
"#,
        )
        .unwrap();
        assert_eq!(
            p.allow()[0].when(),
            &Condition::Criterion(Criterion::Host(vec![
                HostPattern::Suffix(".Example.com".into()),
                HostPattern::Exact("API.example.com".into())
            ]))
        );
        let Condition::And(c) = p.allow()[1].when() else {
            panic!()
        };
        assert_eq!(
            c[1],
            Condition::Criterion(Criterion::SourceCidr(vec![
                "10.1.2.3/32".parse().unwrap(),
                "fd00::/8".parse().unwrap()
            ]))
        );
        assert_eq!(
            p.allow()[2].when(),
            &Condition::Criterion(Criterion::Path(PathPattern::Prefix("/".into())))
        );
        let Condition::Criterion(Criterion::TimeWindow(t)) = p.allow()[3].when() else {
            panic!()
        };
        // fri, sat, sun, mon + wed
        assert_eq!(t.days_mask(), 0b111_0101);
        assert_eq!((t.from_minute(), t.to_minute()), (510, 1440));
        assert_eq!(t.offset_seconds(), -(5 * 3600 + 30 * 60));
        let Condition::Criterion(Criterion::Path(PathPattern::Glob(g))) = p.allow()[4].when()
        else {
            panic!()
        };
        assert_eq!(
            g.segments(),
            [
                GlobSegment::Literal("api".into()),
                GlobSegment::Wildcard(vec![String::new(), String::new()]),
                GlobSegment::Wildcard(vec!["v".into(), ".json".into()]),
                GlobSegment::AnySegments,
            ]
        );
    }

    /// Each bad policy and the exact path and error it must produce.
    #[test]
    #[expect(clippy::too_many_lines, reason = "one table of cases")]
    fn semantic_errors_name_their_path() {
        use InvalidPolicy as E;
        let allow = |when: &str| format!("policy:\n  allow:\n    - id: r\n      when: {when}\n");
        let deny = |when: &str| format!("policy:\n  deny:\n    - id: r\n      when: {when}\n");
        let nested = |n: usize| {
            let mut s = "{user: a}".to_owned();
            for _ in 0..n {
                s = format!("{{not: {s}}}");
            }
            s
        };
        let deep_path = format!(
            "policy.allow[0].when{}",
            ".not".repeat(MAX_CONDITION_DEPTH + 1)
        );
        let cases: Vec<(String, &str, InvalidPolicy)> = vec![
            (
                "policy:\n  default: allow\n".into(),
                "policy.default",
                E::DefaultNotDeny("allow".into()),
            ),
            (allow("{}"), "policy.allow[0].when", E::EmptyCondition),
            (
                allow("{user: a, groups: b}"),
                "policy.allow[0].when",
                E::AmbiguousCondition(vec!["user", "groups"]),
            ),
            (
                allow("{and: [{user: a}], or: [{user: b}]}"),
                "policy.allow[0].when",
                E::AmbiguousCondition(vec!["and", "or"]),
            ),
            (allow("{and: []}"), "policy.allow[0].when.and", E::EmptyCombinator("and")),
            (
                allow("{and: [{user: a}, {or: []}]}"),
                "policy.allow[0].when.and[1].or",
                E::EmptyCombinator("or"),
            ),
            (
                allow("{and: [{user: a}, {not: {}}]}"),
                "policy.allow[0].when.and[1].not",
                E::EmptyCondition,
            ),
            (allow("{user: []}"), "policy.allow[0].when.user", E::EmptyList("user")),
            (allow("{groups: [a, '']}"), "policy.allow[0].when.groups[1]", E::EmptyValue),
            (allow("{issuer: ''}"), "policy.allow[0].when.issuer[0]", E::EmptyValue),
            (
                "policy:\n  allow:\n    - id: 'bad id'\n      when: {user: a}\n".into(),
                "policy.allow[0].id",
                E::InvalidRuleId("bad id".into()),
            ),
            (
                "policy:\n  allow:\n    - id: 'allow[1]'\n      when: {user: a}\n".into(),
                "policy.allow[0].id",
                E::InvalidRuleId("allow[1]".into()),
            ),
            (
                "policy:\n  deny:\n    - id: x\n      when: {user: a}\n  allow:\n    - id: y\n      when: {user: a}\n    - id: x\n      when: {user: b}\n".into(),
                "policy.allow[1].id",
                E::DuplicateRuleId { id: "x".into(), first: "policy.deny[0]".into() },
            ),
            (
                allow("{method: [GET, get]}"),
                "policy.allow[0].when.method[1]",
                E::InvalidMethod("get".into()),
            ),
            (
                allow("{method: ['GET /']}"),
                "policy.allow[0].when.method[0]",
                E::InvalidMethod("GET /".into()),
            ),
            (
                allow("{host: ['a.com:443']}"),
                "policy.allow[0].when.host[0]",
                E::InvalidHost {
                    host: "a.com:443".into(),
                    reason: "a host pattern never includes a port: the request's port is stripped before matching",
                },
            ),
            (
                allow("{host: ['a.*.com']}"),
                "policy.allow[0].when.host[0]",
                E::InvalidHost {
                    host: "a.*.com".into(),
                    reason: "`*` is only allowed as the whole first label (`*.example.com`)",
                },
            ),
            (
                allow("{host: ['a..com']}"),
                "policy.allow[0].when.host[0]",
                E::InvalidHost {
                    host: "a..com".into(),
                    reason: "each dot-separated label must be 1 to 63 characters",
                },
            ),
            (
                allow("{email: [alice]}"),
                "policy.allow[0].when.email[0]",
                E::InvalidEmail { email: "alice".into(), reason: "expected local@domain" },
            ),
            (
                allow("{email: ['a@b@c.com']}"),
                "policy.allow[0].when.email[0]",
                E::InvalidEmail {
                    email: "a@b@c.com".into(),
                    reason: "expected exactly one `@` with a non-empty local part",
                },
            ),
            (
                allow("{email_domain: '@example.com'}"),
                "policy.allow[0].when.email_domain[0]",
                E::InvalidEmailDomain {
                    domain: "@example.com".into(),
                    reason: "give the domain only, without `@`",
                },
            ),
            (
                allow("{email_domain: '*.example.com'}"),
                "policy.allow[0].when.email_domain[0]",
                E::InvalidEmailDomain {
                    domain: "*.example.com".into(),
                    reason: "no wildcards: the domain is compared exactly (subdomains do not match)",
                },
            ),
            (
                allow("{spiffe_id: ['spiffe://td.test/a', 'spiffe://td.test/a/']}"),
                "policy.allow[0].when.spiffe_id[1]",
                E::InvalidSpiffeId {
                    value: "spiffe://td.test/a/".into(),
                    reason: "a path segment is empty (`//` or a trailing `/`)",
                },
            ),
            (allow("{path: {}}"), "policy.allow[0].when.path", E::PathMatcherCount),
            (
                allow("{path: {exact: /a, prefix: /b}}"),
                "policy.allow[0].when.path",
                E::PathMatcherCount,
            ),
            (
                allow("{path: {prefix: admin}}"),
                "policy.allow[0].when.path.prefix",
                E::InvalidPathPattern { pattern: "admin".into(), reason: "must start with `/`" },
            ),
            (
                allow("{path: {exact: '/a%20b'}}"),
                "policy.allow[0].when.path.exact",
                E::InvalidPathPattern {
                    pattern: "/a%20b".into(),
                    reason: "patterns match the decoded path: write the character itself (`/a b`, not `/a%20b`)",
                },
            ),
            (
                allow("{path: {prefix: '/a/../b'}}"),
                "policy.allow[0].when.path.prefix",
                E::InvalidPathPattern {
                    pattern: "/a/../b".into(),
                    reason: "dot segment: requests with one are rejected",
                },
            ),
            (
                allow("{path: {exact: '//a'}}"),
                "policy.allow[0].when.path.exact",
                E::InvalidPathPattern {
                    pattern: "//a".into(),
                    reason: "empty segment (`//`): requests with one are rejected",
                },
            ),
            (
                allow("{path: {prefix: '/a*'}}"),
                "policy.allow[0].when.path.prefix",
                E::InvalidPathPattern {
                    pattern: "/a*".into(),
                    reason: "`*` is only special in `glob:`; use a glob pattern",
                },
            ),
            (
                allow("{path: {glob: '/a**'}}"),
                "policy.allow[0].when.path.glob",
                E::InvalidPathPattern {
                    pattern: "/a**".into(),
                    reason: "`**` must be a whole segment (`/a/**/b`); use `*` within a segment",
                },
            ),
            (
                allow("{path: {glob: '/a/{b,c}'}}"),
                "policy.allow[0].when.path.glob",
                E::InvalidPathPattern {
                    pattern: "/a/{b,c}".into(),
                    reason: "only `*` and `**` are supported; `[...]` and `{...}` are reserved",
                },
            ),
            (
                allow("{path: {glob: '/a?'}}"),
                "policy.allow[0].when.path.glob",
                E::InvalidPathPattern {
                    pattern: "/a?".into(),
                    reason: "the query and fragment never take part in path matching",
                },
            ),
            (
                allow("{claim: {name: team}}"),
                "policy.allow[0].when.claim",
                E::ClaimOperatorCount,
            ),
            (
                allow("{claim: {name: team, equals: a, contains: b}}"),
                "policy.allow[0].when.claim",
                E::ClaimOperatorCount,
            ),
            (
                allow("{claim: {name: '', equals: a}}"),
                "policy.allow[0].when.claim.name",
                E::EmptyValue,
            ),
            (
                allow("{claim: {name: team, equals: [a]}}"),
                "policy.allow[0].when.claim.equals",
                E::ClaimEqualsNotScalar("a list"),
            ),
            (
                allow("{claim: {name: team, equals: ~}}"),
                "policy.allow[0].when.claim.equals",
                E::ClaimEqualsNotScalar("null"),
            ),
            (
                allow("{claim: {name: team, contains: ''}}"),
                "policy.allow[0].when.claim.contains",
                E::EmptyValue,
            ),
            (allow("{workload: {}}"), "policy.allow[0].when.workload", E::EmptyWorkload),
            (
                allow("{workload: {namespace: ''}}"),
                "policy.allow[0].when.workload.namespace",
                E::EmptyValue,
            ),
            (
                allow("{and: [{user: a}, {source_cidr: 10.0.0.1/8}]}"),
                "policy.allow[0].when.and[1].source_cidr[0]",
                E::CidrHostBits { value: "10.0.0.1/8".into(), network: "10.0.0.0/8".into() },
            ),
            (
                allow("{and: [{user: a}, {source_cidr: '::ffff:10.0.0.0/104'}]}"),
                "policy.allow[0].when.and[1].source_cidr[0]",
                E::CidrV4Mapped("::ffff:10.0.0.0/104".into()),
            ),
            (
                allow("{source_cidr: [10.0.0.0/8]}"),
                "policy.allow[0].when.source_cidr",
                E::SourceCidrInAllow,
            ),
            (
                allow("{and: [{source_cidr: [10.0.0.0/8]}, {method: GET}]}"),
                "policy.allow[0].when.and[0].source_cidr",
                E::SourceCidrInAllow,
            ),
            (
                allow("{and: [{source_cidr: [10.0.0.0/8]}, {not: {user: a}}]}"),
                "policy.allow[0].when.and[0].source_cidr",
                E::SourceCidrInAllow,
            ),
            (
                allow("{and: [{source_cidr: [10.0.0.0/8]}, {or: [{user: a}, {method: GET}]}]}"),
                "policy.allow[0].when.and[0].source_cidr",
                E::SourceCidrInAllow,
            ),
            (
                allow("{or: [{user: a}, {source_cidr: [10.0.0.0/8]}]}"),
                "policy.allow[0].when.or[1].source_cidr",
                E::SourceCidrInAllow,
            ),
            (
                allow("{and: [{user: a}, {or: [{source_cidr: 10.0.0.0/8}, {user: b}]}]}"),
                "policy.allow[0].when.and[1].or[0].source_cidr",
                E::SourceCidrInAllow,
            ),
            (
                allow("{not: {source_cidr: [10.0.0.0/8]}}"),
                "policy.allow[0].when.not.source_cidr",
                E::SourceCidrInAllow,
            ),
            (
                allow("{and: [{time_window: {from: '08:00'}}, {source_cidr: [10.0.0.0/8]}]}"),
                "policy.allow[0].when.and[1].source_cidr",
                E::SourceCidrInAllow,
            ),
            (
                deny("{source_cidr: [10.0.0.0/8]}"),
                "policy.deny[0].when.source_cidr",
                E::SourceCidrInDeny,
            ),
            (
                deny("{and: [{source_cidr: [10.0.0.0/8]}, {time_window: {from: '08:00'}}]}"),
                "policy.deny[0].when.and[0].source_cidr",
                E::SourceCidrInDeny,
            ),
            (
                allow("{time_window: {tz: UTC}}"),
                "policy.allow[0].when.time_window",
                E::EmptyTimeWindow,
            ),
            (
                allow("{time_window: {days: [mon..fry]}}"),
                "policy.allow[0].when.time_window.days[0]",
                E::InvalidDay("mon..fry".into()),
            ),
            (
                allow("{time_window: {days: []}}"),
                "policy.allow[0].when.time_window.days",
                E::EmptyList("days"),
            ),
            (
                allow("{time_window: {from: '8:00'}}"),
                "policy.allow[0].when.time_window.from",
                E::InvalidTimeOfDay("8:00".into()),
            ),
            (
                allow("{time_window: {from: '24:00'}}"),
                "policy.allow[0].when.time_window.from",
                E::InvalidTimeOfDay("24:00".into()),
            ),
            (
                allow("{time_window: {to: '12:60'}}"),
                "policy.allow[0].when.time_window.to",
                E::InvalidTimeOfDay("12:60".into()),
            ),
            (
                allow("{time_window: {from: '22:00', to: '06:00'}}"),
                "policy.allow[0].when.time_window",
                E::InvertedTimeWindow { from: "22:00".into(), to: "06:00".into() },
            ),
            (
                allow("{time_window: {from: '08:00', tz: Europe/Berlin}}"),
                "policy.allow[0].when.time_window.tz",
                E::InvalidTimezone("Europe/Berlin".into()),
            ),
            (
                allow("{time_window: {from: '08:00', tz: '+19:00'}}"),
                "policy.allow[0].when.time_window.tz",
                E::InvalidTimezone("+19:00".into()),
            ),
            (
                allow(&nested(MAX_CONDITION_DEPTH + 1)),
                &deep_path,
                E::TooDeep,
            ),
        ];
        for (yaml, want_path, want_kind) in cases {
            match parse(&yaml) {
                Ok(p) => panic!("accepted:\n{yaml}\n=> {p:?}"),
                Err(e) => {
                    assert_eq!(e.path(), Some(want_path), "{yaml}\n=> {e}");
                    assert_eq!(e.kind(), Some(&want_kind), "{yaml}\n=> {e}");
                    assert!(e.to_string().starts_with(want_path), "{e}");
                }
            }
        }
        // Depth at the limit is fine.
        parse(&allow(&nested(MAX_CONDITION_DEPTH))).unwrap();
    }

    #[test]
    fn source_cidr_accepted_as_extra_condition() {
        for yaml in [
            "policy:\n  allow:\n    - when: {and: [{user: a}, {source_cidr: [10.0.0.0/8]}]}\n",
            "policy:\n  allow:\n    - when: {and: [{groups: a}, {not: {source_cidr: 10.0.0.0/8}}]}\n",
            "policy:\n  allow:\n    - when: {and: [{or: [{user: a}, {groups: b}]}, {source_cidr: 10.0.0.0/8}]}\n",
            "policy:\n  allow:\n    - when: {or: [{method: GET}, {and: [{workload: {namespace: ci}}, {source_cidr: 10.0.0.0/8}]}]}\n",
            "policy:\n  deny:\n    - when: {and: [{path: {prefix: /admin}}, {not: {source_cidr: 10.0.0.0/8}}]}\n",
        ] {
            if let Err(e) = parse(yaml) {
                panic!("{yaml}\n=> {e}");
            }
        }
    }

    /// Shape errors come from `serde_yaml`; their message must still start with the path.
    #[test]
    fn syntax_errors_name_their_path() {
        let cases = [
            (
                "policy:\n  allow:\n    - when: {grups: [a]}\n",
                "policy.allow[0].when: unknown field `grups`",
            ),
            (
                "policy:\n  allow:\n    - when: {and: [{path: {prefx: /a}}]}\n",
                "policy.allow[0].when.and[0].path: unknown field `prefx`",
            ),
            (
                "policy:\n  allow:\n    - when: {user: a}\n      priority: 1\n",
                "policy.allow[0]: unknown field `priority`",
            ),
            (
                "policy:\n  allow:\n    - id: a\n",
                "policy.allow[0]: missing field `when`",
            ),
            (
                "policy:\n  allow:\n    - when: {groups: 3}\n",
                "policy.allow[0].when.groups: invalid type: integer `3`, expected a string or a list of strings (quote numbers: '1234')",
            ),
            (
                "policy:\n  allow:\n    - when: {groups: [3]}\n",
                "policy.allow[0].when.groups[0]: invalid type: integer `3`, expected a string (quote numbers: '1234')",
            ),
            (
                "policy:\n  allow:\n    - when: {user: a, user: b}\n",
                "policy.allow[0].when: duplicate field `user`",
            ),
            (
                "policy:\n  allow:\n    - when: {workload: {labels: {a: b, a: c}}}\n",
                "policy.allow[0].when.workload.labels: duplicate label `a`",
            ),
            (
                "policy:\n  allowed: []\n",
                "policy: unknown field `allowed`",
            ),
            ("polisy: {}\n", "unknown field `polisy`"),
            ("policy: [\n", "policy: "),
        ];
        for (yaml, prefix) in cases {
            match parse(yaml) {
                Ok(p) => panic!("accepted {yaml}: {p:?}"),
                Err(e @ PolicyError::Invalid { .. }) => panic!("{yaml}: not a syntax error: {e}"),
                Err(PolicyError::Syntax(inner)) => {
                    let msg = inner.to_string();
                    assert!(
                        msg.starts_with(prefix),
                        "{yaml}\n=> {msg}\nwant prefix {prefix}"
                    );
                }
            }
        }
    }

    #[test]
    fn time_window_edges() {
        let tw = |days: u8, from: u16, to: u16, off: i32| TimeWindow {
            days,
            from_minute: from,
            to_minute: to,
            offset_seconds: off,
        };
        // 2024-01-01 00:00:00 UTC was a Monday.
        let monday = 1_704_067_200;
        let weekdays = tw(0b001_1111, 8 * 60, 18 * 60, 0);
        assert!(!weekdays.contains(monday + 8 * 3600 - 1));
        assert!(weekdays.contains(monday + 8 * 3600));
        assert!(weekdays.contains(monday + 18 * 3600 - 1));
        assert!(!weekdays.contains(monday + 18 * 3600));
        // Friday 12:00 in, Saturday 12:00 out.
        assert!(weekdays.contains(monday + 4 * 86_400 + 12 * 3600));
        assert!(!weekdays.contains(monday + 5 * 86_400 + 12 * 3600));
        // Sunday 23:59:59 out, Monday 00:00 with a full-day window in.
        let all_day_mon = tw(0b000_0001, 0, 1440, 0);
        assert!(!all_day_mon.contains(monday - 1));
        assert!(all_day_mon.contains(monday));
        assert!(all_day_mon.contains(monday + 86_399));
        assert!(!all_day_mon.contains(monday + 86_400));
        // +02:00: Monday 07:00 UTC is 09:00 local.
        let plus2 = tw(0b000_0001, 9 * 60, 10 * 60, 7200);
        assert!(plus2.contains(monday + 7 * 3600));
        assert!(!plus2.contains(monday + 9 * 3600));
        // -05:00: Monday 03:00 UTC is Sunday 22:00 local.
        let sunday_late = tw(0b100_0000, 22 * 60, 23 * 60, -5 * 3600);
        assert!(sunday_late.contains(monday + 3 * 3600));
        // Before the epoch and at the extremes: no panic, consistent weekday.
        assert!(tw(0x7F, 0, 1440, 0).contains(-1));
        let thu = tw(0b000_1000, 0, 1440, 0);
        assert!(thu.contains(0));
        assert!(!thu.contains(-1));
        assert!(!tw(0x7F, 0, 1440, 3600).contains(i64::MAX));
        assert!(tw(0x7F, 0, 1440, -3600).contains(i64::MIN + 3600));
    }

    #[test]
    fn error_messages_are_operator_readable() {
        let e = parse("policy:\n  allow:\n    - when: {source_cidr: 10.0.0.0/8}\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "policy.allow[0].when.source_cidr: `source_cidr` is only an extra condition: put it \
             directly in an `and` together with at least one identity criterion (user, email, \
             email_domain, groups, claim, issuer, spiffe_id, workload); an allow rule must \
             never be network-only"
        );
        let e = parse("policy:\n  default: allow\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "policy.default: `default: allow` is not supported: only `deny` is allowed (a \
             request that no allow rule matches is always denied)"
        );
    }
}
