//! JWT parsing and verification: the steps before the signature check (shape, header, unverified
//! `iss`) and the jsonwebtoken call that checks signature, `iss`, `aud`, `exp` and `nbf`.
//!
//! Everything here reads attacker input, so the order matters: size and shape first (cheap and
//! allocation-free), then the header (alg allow-list), then the unverified `iss`, which only picks
//! the issuer whose keys to try; nothing read before the signature check reaches the identity.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value};

use super::config::{IssuerSettings, is_asymmetric};

/// Every reason code [`AuthError::reason`] can return. The decision log and dashboards key on
/// these: add new ones, never rename.
pub const REASONS: &[&str] = &[
    "token_missing",
    "token_too_large",
    "token_malformed",
    "token_alg_not_allowed",
    "token_bad_issuer",
    "token_unknown_kid",
    "token_bad_signature",
    "token_expired",
    "token_not_yet_valid",
    "token_bad_audience",
    "token_missing_claim",
    "token_bad_claim",
    "issuer_unavailable",
];

/// Why a bearer token was not accepted. `issuer` fields hold the configured issuer *name*;
/// values copied from the token are clipped so that a hostile token cannot flood the logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("no bearer token in the request")]
    Missing,
    #[error("bearer token is {len} bytes, over the {max}-byte limit (auth.max_token_bytes)")]
    TooLarge { len: usize, max: usize },
    #[error("bearer token is malformed: {why}")]
    Malformed { why: &'static str },
    #[error("token algorithm {alg:?} is not allowed{}", for_issuer(issuer.as_deref()))]
    AlgNotAllowed { alg: String, issuer: Option<String> },
    #[error(
        "issuer `{issuer}`: key {kid:?} cannot verify {alg:?} tokens (key type or `alg` differs)"
    )]
    KeyMismatch {
        issuer: String,
        kid: String,
        alg: Algorithm,
    },
    #[error("token issuer {iss:?} is not a configured issuer")]
    UnknownIssuer { iss: String },
    #[error("token has no `iss` claim")]
    MissingIssuer,
    #[error("issuer `{issuer}`: no signing key {} in its JWKS, even after a refetch (refetches are rate-limited by jwks_refresh_min_interval_s)", kid.as_deref().map_or_else(|| "for this algorithm".to_owned(), |k| format!("with kid {k:?}")))]
    UnknownKid { issuer: String, kid: Option<String> },
    #[error(
        "issuer `{issuer}`: token has no kid and the JWKS holds {candidates} {alg:?} keys; a kid is required when the choice is ambiguous"
    )]
    AmbiguousKey {
        issuer: String,
        alg: Algorithm,
        candidates: usize,
    },
    #[error("issuer `{issuer}`: token signature does not verify")]
    BadSignature { issuer: String },
    #[error("issuer `{issuer}`: token expired")]
    Expired { issuer: String },
    #[error("issuer `{issuer}`: token is not valid yet (nbf in the future beyond the leeway)")]
    NotYetValid { issuer: String },
    #[error("issuer `{issuer}`: token audience matches none of the configured audiences")]
    BadAudience { issuer: String },
    #[error("issuer `{issuer}`: token `iss` does not match")]
    BadIssuer { issuer: String },
    #[error("issuer `{issuer}`: token lacks the required claim `{claim}`")]
    MissingClaim { issuer: String, claim: String },
    #[error("issuer `{issuer}`: claim `{claim}` {why}")]
    BadClaim {
        issuer: String,
        claim: String,
        why: &'static str,
    },
    #[error(
        "issuer `{issuer}`: no signing keys loaded (JWKS/discovery fetch failing; see the jwks warnings)"
    )]
    IssuerUnavailable { issuer: String },
}

fn for_issuer(issuer: Option<&str>) -> String {
    issuer
        .map(|i| format!(" for issuer `{i}`"))
        .unwrap_or_default()
}

impl AuthError {
    /// Stable reason code for the decision log (one of [`REASONS`]).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "token_missing",
            Self::TooLarge { .. } => "token_too_large",
            Self::Malformed { .. } => "token_malformed",
            Self::AlgNotAllowed { .. } | Self::KeyMismatch { .. } => "token_alg_not_allowed",
            Self::UnknownIssuer { .. } | Self::MissingIssuer | Self::BadIssuer { .. } => {
                "token_bad_issuer"
            }
            Self::UnknownKid { .. } | Self::AmbiguousKey { .. } => "token_unknown_kid",
            Self::BadSignature { .. } => "token_bad_signature",
            Self::Expired { .. } => "token_expired",
            Self::NotYetValid { .. } => "token_not_yet_valid",
            Self::BadAudience { .. } => "token_bad_audience",
            Self::MissingClaim { .. } => "token_missing_claim",
            Self::BadClaim { .. } => "token_bad_claim",
            Self::IssuerUnavailable { .. } => "issuer_unavailable",
        }
    }

    /// The configured issuer the token was routed to, when it got that far.
    #[must_use]
    pub fn issuer(&self) -> Option<&str> {
        match self {
            Self::AlgNotAllowed { issuer, .. } => issuer.as_deref(),
            Self::KeyMismatch { issuer, .. }
            | Self::UnknownKid { issuer, .. }
            | Self::AmbiguousKey { issuer, .. }
            | Self::BadSignature { issuer }
            | Self::Expired { issuer }
            | Self::NotYetValid { issuer }
            | Self::BadAudience { issuer }
            | Self::BadIssuer { issuer }
            | Self::MissingClaim { issuer, .. }
            | Self::BadClaim { issuer, .. }
            | Self::IssuerUnavailable { issuer } => Some(issuer),
            Self::Missing
            | Self::TooLarge { .. }
            | Self::Malformed { .. }
            | Self::UnknownIssuer { .. }
            | Self::MissingIssuer => None,
        }
    }
}

/// Longest token-supplied string copied into an error.
const CLIP: usize = 64;

/// Copies at most [`CLIP`] bytes of attacker-controlled text, on a char boundary.
pub(super) fn clip(s: &str) -> String {
    if s.len() <= CLIP {
        return s.to_owned();
    }
    let mut end = CLIP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The three segments of a compact JWS, checked for shape only.
#[derive(Debug, Clone, Copy)]
pub(super) struct Compact<'a> {
    pub header: &'a str,
    pub payload: &'a str,
}

/// Splits `header.payload.signature`, refusing anything that is not three base64url segments with
/// a non-empty header and payload (JWE's five segments, whitespace, padding).
pub(super) fn split_compact(token: &str) -> Result<Compact<'_>, AuthError> {
    let malformed = |why| AuthError::Malformed { why };
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(malformed("characters outside base64url"));
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        // An empty signature passes here on purpose: `alg: none` is then reported as
        // token_alg_not_allowed by the header check, and any other alg fails the signature check.
        (Some(header), Some(payload), Some(_signature), None) => {
            if header.is_empty() || payload.is_empty() {
                Err(malformed("empty header or payload"))
            } else {
                Ok(Compact { header, payload })
            }
        }
        _ => Err(malformed("not three dot-separated segments")),
    }
}

/// The header fields the gateway acts on. Duplicate fields are a parse error (serde's derive),
/// so no two parsers can read a different `alg` from the same bytes.
#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

/// The parsed header: the algorithm (never `none`, never HMAC) and the optional key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

pub(super) fn parse_header(segment: &str) -> Result<Header, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| AuthError::Malformed {
            why: "header is not base64url",
        })?;
    let raw: RawHeader<'_> = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed {
        why: "header is not a JSON object with a string `alg`",
    })?;
    // RFC 7515 §4.1.11: `crit` lists extensions the recipient must understand; this one knows none.
    if raw.crit.is_some() {
        return Err(AuthError::Malformed {
            why: "header has `crit` extensions",
        });
    }
    let alg = match raw.alg.parse::<Algorithm>() {
        Ok(alg) if is_asymmetric(alg) => alg,
        // `none`, HS*, and unknown names: never acceptable here, whatever the issuer.
        _ => {
            return Err(AuthError::AlgNotAllowed {
                alg: clip(&raw.alg),
                issuer: None,
            });
        }
    };
    Ok(Header {
        alg,
        kid: raw.kid.map(Cow::into_owned),
    })
}

#[derive(Deserialize)]
struct PeekClaims<'a> {
    #[serde(borrow, default)]
    iss: Option<Cow<'a, str>>,
}

/// Reads the unverified `iss`, only to choose which issuer's keys to try. A non-string `iss`
/// (jsonwebtoken would accept an array) or a duplicate one is malformed.
pub(super) fn peek_issuer(segment: &str) -> Result<String, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| AuthError::Malformed {
            why: "payload is not base64url",
        })?;
    let peek: PeekClaims<'_> =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed {
            why: "payload is not a JSON object with a string `iss`",
        })?;
    match peek.iss {
        Some(iss) => Ok(iss.into_owned()),
        None => Err(AuthError::MissingIssuer),
    }
}

/// The jsonwebtoken validation for one issuer and one algorithm. Built once per issuer, so the hot
/// path allocates no sets.
pub(super) fn validation_for(settings: &IssuerSettings, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = settings.leeway_s;
    v.validate_exp = true;
    // jsonwebtoken leaves nbf unchecked by default.
    v.validate_nbf = true;
    v.validate_aud = true;
    v.set_audience(&settings.audiences);
    v.set_issuer(&[&settings.issuer]);
    // Required, so that a missing (or, since jsonwebtoken 10.3, mistyped) claim is an error
    // rather than a skipped check.
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v
}

/// Verifies signature and registered claims; returns the claims and `exp`.
pub(super) fn verify_signed(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
    issuer: &str,
) -> Result<(Map<String, Value>, u64), AuthError> {
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
        .map_err(|e| map_error(e.kind(), issuer))?;
    let exp = data
        .claims
        .get("exp")
        .and_then(numeric_date)
        .ok_or_else(|| AuthError::BadClaim {
            issuer: issuer.to_owned(),
            claim: "exp".to_owned(),
            why: "is not a NumericDate",
        })?;
    Ok((data.claims, exp))
}

/// A JSON `NumericDate` as whole seconds (fractions round down: the cache must not outlive `exp`).
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        let f = v.as_f64()?;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "range checked just before; fractional seconds are dropped on purpose"
        )]
        (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.floor() as u64)
    })
}

fn map_error(kind: &ErrorKind, issuer: &str) -> AuthError {
    let issuer = issuer.to_owned();
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired { issuer },
        ErrorKind::ImmatureSignature => AuthError::NotYetValid { issuer },
        ErrorKind::InvalidAudience => AuthError::BadAudience { issuer },
        ErrorKind::InvalidIssuer => AuthError::BadIssuer { issuer },
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::AlgNotAllowed {
            alg: String::new(),
            issuer: Some(issuer),
        },
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim {
            issuer,
            claim: clip(claim),
        },
        ErrorKind::InvalidClaimFormat(claim) => AuthError::BadClaim {
            issuer,
            claim: clip(claim),
            why: "has the wrong JSON type",
        },
        // Key errors: the backend cannot use this key for this algorithm (the key-fit check
        // should have caught it); either way the token is not proven genuine. Base64 errors:
        // header and payload were already decoded by `parse_header`/`peek_issuer` with the same
        // decoder, so this one is the signature segment's.
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Base64(_) => AuthError::BadSignature { issuer },
        _ => AuthError::Malformed {
            why: "token could not be decoded",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn shape() {
        assert!(split_compact("a.b.c").is_ok());
        assert!(split_compact("a.b.").is_ok());
        for bad in [
            "a.b",
            "a.b.c.d.e",
            ".b.c",
            "a..c",
            "a.b.c=",
            "a b.c.d",
            "a.b.c\n",
            "",
        ] {
            assert!(
                matches!(split_compact(bad), Err(AuthError::Malformed { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn header_algs() {
        let h = |json: &str| parse_header(&b64(json));
        assert_eq!(
            h(r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#),
            Ok(Header {
                alg: Algorithm::RS256,
                kid: Some("k1".into())
            })
        );
        for alg in ["none", "None", "HS256", "HS384", "HS512", "RS1", ""] {
            let err = h(&format!(r#"{{"alg":"{alg}"}}"#)).expect_err(alg);
            assert_eq!(err.reason(), "token_alg_not_allowed", "{alg}");
        }
        for bad in [
            r#"{"alg":"RS256","alg":"none"}"#,
            r#"{"kid":"x"}"#,
            r#"{"alg":1}"#,
            "[]",
            "x",
        ] {
            assert_eq!(h(bad).expect_err(bad).reason(), "token_malformed", "{bad}");
        }
        let crit = h(r#"{"alg":"RS256","crit":["b64"],"b64":false}"#).expect_err("crit");
        assert_eq!(crit.reason(), "token_malformed");
    }

    #[test]
    fn issuer_peek() {
        assert_eq!(
            peek_issuer(&b64(r#"{"iss":"https://i","sub":"a"}"#)),
            Ok("https://i".into())
        );
        assert_eq!(
            peek_issuer(&b64(r#"{"iss":["https://i"]}"#))
                .expect_err("array")
                .reason(),
            "token_malformed"
        );
        assert_eq!(
            peek_issuer(&b64(r#"{"iss":"a","iss":"b"}"#))
                .expect_err("dup")
                .reason(),
            "token_malformed"
        );
        assert_eq!(
            peek_issuer(&b64(r#"{"sub":"a"}"#))
                .expect_err("none")
                .reason(),
            "token_bad_issuer"
        );
    }

    #[test]
    fn clipping() {
        let long = "é".repeat(100);
        let c = clip(&long);
        assert!(c.len() <= CLIP + '…'.len_utf8());
        assert!(c.ends_with('…'));
    }

    #[test]
    fn reasons_are_listed() {
        let samples = [
            AuthError::Missing,
            AuthError::TooLarge { len: 1, max: 0 },
            AuthError::IssuerUnavailable { issuer: "x".into() },
            AuthError::MissingClaim {
                issuer: "x".into(),
                claim: "exp".into(),
            },
        ];
        for e in samples {
            assert!(REASONS.contains(&e.reason()));
        }
    }

    #[test]
    fn numeric_dates() {
        assert_eq!(numeric_date(&serde_json::json!(10)), Some(10));
        assert_eq!(numeric_date(&serde_json::json!(10.9)), Some(10));
        assert_eq!(numeric_date(&serde_json::json!(-1)), None);
        assert_eq!(numeric_date(&serde_json::json!("10")), None);
    }
}
