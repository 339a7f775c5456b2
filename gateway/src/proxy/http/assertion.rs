//! The identity assertion: a short-lived ES256 JWT (`X-Nodegate-Assertion`) that tells the
//! backend who the gateway authenticated, signed with a P-256 key generated at start. Its public
//! half is served as a JWKS on the admin port (`/.well-known/jwks.json`); the `kid` is the key's
//! RFC 7638 thumbprint, so a backend caching keys by `kid` notices a restart's new key.
//!
//! Signing is done here rather than through jsonwebtoken: ES256 is a SHA-256 ECDSA signature
//! in the fixed 64-byte `r || s` form (RFC 7518 §3.4), which p256 produces directly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use p256::ecdsa::{Signature, SigningKey, signature::Signer as _};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::config::AssertionConfig;

/// Signs assertions with a key that lives as long as the process.
pub struct AssertionSigner {
    key: SigningKey,
    kid: String,
    /// `base64url(header) + "."`, the same for every token.
    header_b64: String,
    jwks: String,
    config: AssertionConfig,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("kid", &self.kid)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The workload part of an assertion.
#[derive(Debug, Clone, Serialize)]
pub struct AssertedWorkload<'a> {
    pub namespace: &'a str,
    pub service_account: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<&'a str>,
}

/// What an assertion says about one request.
#[derive(Debug, Clone)]
pub struct Subject<'a> {
    /// `user`, `workload` or `anonymous`.
    pub kind: &'static str,
    pub subject: Option<&'a str>,
    pub email: Option<&'a str>,
    pub groups: &'a [String],
    pub issuer: Option<&'a str>,
    pub workload: Option<AssertedWorkload<'a>>,
    /// The verified client certificate of a TLS connection the gateway terminated.
    pub client_cert: Option<AssertedCert<'a>>,
}

/// A verified client certificate, as asserted.
#[derive(Debug, Clone, Serialize)]
pub struct AssertedCert<'a> {
    /// RFC 4514 subject.
    pub subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    /// `user`, `workload` or `anonymous`.
    nodegate_kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    groups: &'a [String],
    /// The issuer that authenticated the caller (the token's `iss`).
    #[serde(skip_serializing_if = "Option::is_none")]
    idp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<AssertedWorkload<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cert: Option<AssertedCert<'a>>,
    iat: u64,
    exp: u64,
    jti: &'a str,
}

#[derive(Serialize)]
struct Jwk<'a> {
    kty: &'static str,
    crv: &'static str,
    x: &'a str,
    y: &'a str,
    kid: &'a str,
    alg: &'static str,
    #[serde(rename = "use")]
    use_: &'static str,
}

impl AssertionSigner {
    /// A signer with a fresh key from the OS random source.
    pub fn generate(config: AssertionConfig) -> Self {
        Self::with_key(SigningKey::random(&mut rand_core::OsRng), config)
    }

    fn with_key(key: SigningKey, config: AssertionConfig) -> Self {
        let point = key.verifying_key().to_encoded_point(false);
        // An uncompressed point of a valid key always has both coordinates.
        let (x, y) = match (point.x(), point.y()) {
            (Some(x), Some(y)) => (B64.encode(x), B64.encode(y)),
            _ => (String::new(), String::new()),
        };
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let thumbprint_input = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = B64.encode(Sha256::digest(thumbprint_input.as_bytes()));
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        let header_b64 = format!("{}.", B64.encode(header.to_string()));
        let jwk = Jwk {
            kty: "EC",
            crv: "P-256",
            x: &x,
            y: &y,
            kid: &kid,
            alg: "ES256",
            use_: "sig",
        };
        let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
        Self {
            key,
            kid,
            header_b64,
            jwks,
            config,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key set, as served on the admin port.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    pub fn config(&self) -> &AssertionConfig {
        &self.config
    }

    /// A signed assertion about `subject` for `service`, identified by the request id.
    pub fn sign(&self, service: &str, subject: &Subject<'_>, request_id: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let claims = Claims {
            iss: &self.config.issuer,
            aud: format!("{}{service}", self.config.audience_prefix),
            sub: subject.subject,
            nodegate_kind: subject.kind,
            email: subject.email,
            groups: subject.groups,
            idp: subject.issuer,
            workload: subject.workload.clone(),
            client_cert: subject.client_cert.clone(),
            iat: now,
            exp: now + self.config.ttl.as_secs(),
            jti: request_id,
        };
        // Claims are strings and numbers: serializing them cannot fail.
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let mut token = String::with_capacity(self.header_b64.len() + payload.len() * 2 + 90);
        token.push_str(&self.header_b64);
        B64.encode_string(&payload, &mut token);
        let signature: Signature = self.key.sign(token.as_bytes());
        token.push('.');
        B64.encode_string(signature.to_bytes(), &mut token);
        token
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{DecodingKey, Validation, jwk::JwkSet};

    use super::*;

    #[test]
    fn assertions_verify_with_the_served_jwks() {
        let signer = AssertionSigner::generate(AssertionConfig {
            issuer: "nodegate".into(),
            ttl: Duration::from_secs(60),
            audience_prefix: "urn:ng:".into(),
        });
        let groups = vec!["devs".to_owned()];
        let token = signer.sign(
            "grafana",
            &Subject {
                kind: "user",
                subject: Some("alice"),
                email: Some("alice@example.com"),
                groups: &groups,
                issuer: Some("https://login.example.com"),
                workload: Some(AssertedWorkload {
                    namespace: "ci",
                    service_account: "builder",
                    pod: None,
                }),
                client_cert: Some(AssertedCert {
                    subject: "CN=builder,O=Example",
                    spiffe_id: Some("spiffe://td.test/ns/ci/sa/builder"),
                }),
            },
            "00ff",
        );
        let set: JwkSet = serde_json::from_str(signer.jwks()).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(signer.kid()));
        let jwk = set.find(signer.kid()).unwrap();
        let mut validation = Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_audience(&["urn:ng:grafana"]);
        validation.set_issuer(&["nodegate"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_jwk(jwk).unwrap(),
            &validation,
        )
        .unwrap();
        let c = data.claims;
        assert_eq!(c["sub"], "alice");
        assert_eq!(c["groups"][0], "devs");
        assert_eq!(c["workload"]["namespace"], "ci");
        assert_eq!(
            c["client_cert"]["spiffe_id"],
            "spiffe://td.test/ns/ci/sa/builder"
        );
        assert_eq!(c["client_cert"]["subject"], "CN=builder,O=Example");
        assert_eq!(c["jti"], "00ff");
        assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 60);

        // A token signed by another gateway's key does not verify with this JWKS.
        let other = AssertionSigner::generate(signer.config().clone());
        let forged = other.sign(
            "grafana",
            &Subject {
                kind: "anonymous",
                subject: None,
                email: None,
                groups: &[],
                issuer: None,
                workload: None,
                client_cert: None,
            },
            "1",
        );
        assert!(
            jsonwebtoken::decode::<serde_json::Value>(
                &forged,
                &DecodingKey::from_jwk(jwk).unwrap(),
                &validation,
            )
            .is_err()
        );
    }
}
