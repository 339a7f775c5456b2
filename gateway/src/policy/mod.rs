//! Identity-aware HTTP policy: wire format, domain model, canonical path, compiled matcher and
//! explain.
//!
//! The pipeline follows ztunnel's `rbac.rs` and rustls' "parse, don't validate":
//!
//! ```text
//! YAML / CRD ──serde──▶ wire::PolicySpec ──TryFrom──▶ model::Policy ──compile──▶ CompiledPolicy
//! request target ──CanonicalPath::parse──▶ CanonicalPath ─┐
//! identity, workload, method, host, now ──────────────────┴─▶ RequestContext ──evaluate──▶ Decision
//! ```
//!
//! Every stage before `evaluate` can fail with an operator-readable error naming the path of the
//! offending field; `evaluate` and `explain` cannot fail and are pure (time is an input). Deny
//! wins; among matching rules the first in document order is reported; no match denies.
//!
//! # Format
//!
//! ```yaml
//! policy:
//!   default: deny                  # optional; any other value is an error
//!   deny:  [ <rule>, ... ]
//!   allow: [ <rule>, ... ]
//! # <rule>:      { id: <id>?, when: <condition> }
//! #   id: 1-128 of [A-Za-z0-9._:-], starting alphanumeric, unique across allow and deny;
//! #   missing -> "allow[3]" / "deny[0]" (its position).
//! # <condition>: a map with exactly ONE key (combine explicitly, never implicitly):
//! #   and: [<condition>, ...]      or: [<condition>, ...]     not: <condition>
//! #   (non-empty; at most 16 levels of and/or/not)
//! #   user: <str|[str]>            identity subject, user identities only; exact
//! #   email: <str|[str]>           ASCII case-insensitive; exact
//! #   email_domain: <str|[str]>    domain of an e-mail with one `@`; case-insensitive; exact
//! #   groups: <str|[str]>          any of the identity's groups; exact
//! #   claim: { name: <str>, equals: <string|number|bool> }   typed, no coercion
//! #   claim: { name: <str>, contains: <str> }   string claim: substring; array: element
//! #   issuer: <str|[str]>          exact
//! #   spiffe_id: <str|[str]>       SPIFFE ID (`spiffe://...` URI SAN) of the verified TLS client
//! #       certificate; exact, or `spiffe://td/path/*` for every ID below that path
//! #       (`spiffe://td/*`: the trust domain); no certificate, no SPIFFE ID: no match
//! #   workload: { namespace?, service_account?, labels?: {k: v} }   all given parts
//! #   method: <str|[str]>          upper-case RFC 9110 tokens; case-sensitive
//! #   host: <str|[str]>            `name` or `*.suffix`; no port; case-insensitive
//! #   path: { exact | prefix | glob: <str> }   on the canonical (decoded) path;
//! #       prefix is segment-aware; glob has `*` (in a segment) and `**` (whole segments)
//! #   source_cidr: <cidr|[cidr]>   only directly inside an `and` with an identity criterion
//! #       (allow rules) or an identity/request criterion (deny rules); never alone
//! #   time_window: { days?: [mon..fri, sun], from?: "HH:MM", to?: "HH:MM", tz?: UTC|+HH:MM }
//! #       half-open [from, to); fixed offsets only (no DST); default all days, 00:00-24:00, UTC
//! ```
//!
//! Lists accept a single string too (`groups: admins`); list items must be YAML strings
//! (quote numbers). Unknown keys, duplicate keys and empty lists or strings are errors.

pub mod explain;
pub mod matcher;
pub mod model;
pub mod path;
pub mod spiffe;
pub mod wire;

pub use explain::{Explanation, RuleTrace};
pub use matcher::{CompiledPolicy, Decision, ReasonCode, Verdict};
pub use model::{
    Identity, IdentityKind, IdentityRef, InvalidPolicy, MAX_CONDITION_DEPTH, Policy, PolicyError,
    RequestContext, RuleKind, Workload,
};
pub use path::{CanonicalPath, MAX_PATH_LEN, PathError};
