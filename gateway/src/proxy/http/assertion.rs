//! The identity assertion: a short-lived ES256 JWT (`X-Nodegate-Assertion`) that tells the
//! backend who the gateway authenticated, signed with a P-256 key generated at start. Its public
//! half is served as a JWKS on the admin port (`/.well-known/jwks.json`); the `kid` is the key's
//! RFC 7638 thumbprint, so a backend caching keys by `kid` notices a restart's new key.
//!
//! Signing is done here rather than through jsonwebtoken: ES256 is a SHA-256 ECDSA signature
//! in the fixed 64-byte `r || s` form (RFC 7518 §3.4), which ring's
//! `ECDSA_P256_SHA256_FIXED_SIGNING` produces directly (ring is the crypto provider rustls
//! already uses here; its P-256 is about ten times faster than the pure-Rust one).
//!
//! An ECDSA signature still costs tens of microseconds, more than the rest of a request's
//! authorization. So a signed assertion is reused for the same claims (service, identity,
//! workload, client certificate) until a quarter of its lifetime has passed, as Pomerium reuses
//! its per-session assertion: a backend always gets at least three quarters of `ttl` of
//! validity, and `jti` names the assertion (the request that caused it to be signed), not every
//! request that carries it. The cache holds the exact claims as its key, so two callers never
//! share an assertion, and is cleared when it grows past [`CACHE_MAX`] entries.

use std::{
    collections::HashMap,
    fmt,
    hash::BuildHasher as _,
    sync::{Mutex, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use bytes::Bytes;
use hyper::header::HeaderValue;
use ring::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
};
use serde::{Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::config::AssertionConfig;

/// Distinct live assertions kept for reuse; past this the cache starts over (a burst of new
/// identities costs signatures, never memory).
pub const CACHE_MAX: usize = 10_000;

/// Signs assertions with a key that lives as long as the process.
pub struct AssertionSigner {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    /// `base64url(header) + "."`, the same for every token.
    header_b64: String,
    jwks: String,
    config: AssertionConfig,
    /// The tokens signed for claims (without `iat`/`exp`/`jti`), by their hash.
    cache: Mutex<Cache>,
    /// Hashes claims for the cache (seeded per process).
    hasher: foldhash::quality::RandomState,
}

#[derive(Default)]
struct Cache {
    by_hash: HashMap<u64, Vec<(Claims, Reusable)>>,
    len: usize,
}

struct Reusable {
    /// The header value itself: handing it out again copies nothing.
    token: HeaderValue,
    /// Unix seconds after which a fresh one is signed.
    until: u64,
}

/// What an assertion says but its times and `jti`, borrowed from the request: a reusable
/// assertion is found by hashing and comparing these fields (no serialization per request).
#[derive(Hash, PartialEq)]
struct ClaimsRef<'a> {
    service: &'a str,
    kind: &'a str,
    subject: Option<&'a str>,
    email: Option<&'a str>,
    groups: &'a [String],
    issuer: Option<&'a str>,
    workload: Option<(&'a str, &'a str, Option<&'a str>)>,
    client_cert: Option<(&'a str, Option<&'a str>)>,
}

/// [`ClaimsRef`], owned, kept with the assertion signed for it.
struct Claims {
    service: String,
    kind: String,
    subject: Option<String>,
    email: Option<String>,
    groups: Vec<String>,
    issuer: Option<String>,
    workload: Option<(String, String, Option<String>)>,
    client_cert: Option<(String, Option<String>)>,
}

impl ClaimsRef<'_> {
    fn to_owned(&self) -> Claims {
        let own = |s: Option<&str>| s.map(str::to_owned);
        Claims {
            service: self.service.to_owned(),
            kind: self.kind.to_owned(),
            subject: own(self.subject),
            email: own(self.email),
            groups: self.groups.to_vec(),
            issuer: own(self.issuer),
            workload: self
                .workload
                .map(|(ns, sa, pod)| (ns.to_owned(), sa.to_owned(), own(pod))),
            client_cert: self
                .client_cert
                .map(|(subject, spiffe)| (subject.to_owned(), own(spiffe))),
        }
    }
}

impl Claims {
    fn view(&self) -> ClaimsRef<'_> {
        ClaimsRef {
            service: &self.service,
            kind: &self.kind,
            subject: self.subject.as_deref(),
            email: self.email.as_deref(),
            groups: &self.groups,
            issuer: self.issuer.as_deref(),
            workload: self
                .workload
                .as_ref()
                .map(|(ns, sa, pod)| (ns.as_str(), sa.as_str(), pod.as_deref())),
            client_cert: self
                .client_cert
                .as_ref()
                .map(|(subject, spiffe)| (subject.as_str(), spiffe.as_deref())),
        }
    }
}

impl fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("kid", &self.kid)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The workload part of an assertion.
#[derive(Debug, Clone, Copy, Serialize)]
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
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AssertedCert<'a> {
    /// RFC 4514 subject.
    pub subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<&'a str>,
}

/// What an assertion says, without its times: the cache key, and the body of the claims.
#[derive(Serialize)]
struct Stable<'a> {
    iss: &'a str,
    aud: Audience<'a>,
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
}

/// `aud`: the configured prefix and the service name, written as one string without building
/// it.
struct Audience<'a>(&'a str, &'a str);

impl Serialize for Audience<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Audience<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)?;
        f.write_str(self.1)
    }
}

#[derive(Serialize)]
struct Times<'a> {
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
    ///
    /// # Panics
    /// If the OS random source fails (the process cannot run safely without it).
    pub fn generate(config: AssertionConfig) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("the OS random source works");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("a key ring just generated parses");
        Self::with_key(key, rng, config)
    }

    fn with_key(key: EcdsaKeyPair, rng: SystemRandom, config: AssertionConfig) -> Self {
        // The public key is the uncompressed point: 0x04 || x || y, 32 bytes each.
        let point = key.public_key().as_ref();
        let (x, y) = match point {
            [4, rest @ ..] if rest.len() == 64 => {
                (B64.encode(&rest[..32]), B64.encode(&rest[32..]))
            }
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
            rng,
            kid,
            header_b64,
            jwks,
            config,
            cache: Mutex::new(Cache::default()),
            hasher: foldhash::quality::RandomState::default(),
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

    /// A signed assertion about `subject` for `service`, as the header value: one signed
    /// earlier for exactly these claims while it is fresh (see the module docs), else a new one
    /// whose `jti` is `request_id`. `None` only if the token were not a valid header value
    /// (base64url and dots always are).
    pub fn sign(
        &self,
        service: &str,
        subject: &Subject<'_>,
        request_id: &str,
    ) -> Option<HeaderValue> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        self.sign_at(now, service, subject, request_id)
    }

    /// [`Self::sign`] at `now` (Unix seconds), for a caller that has read the clock already.
    pub fn sign_at(
        &self,
        now: u64,
        service: &str,
        subject: &Subject<'_>,
        request_id: &str,
    ) -> Option<HeaderValue> {
        let claims = ClaimsRef {
            service,
            kind: subject.kind,
            subject: subject.subject,
            email: subject.email,
            groups: subject.groups,
            issuer: subject.issuer,
            workload: subject
                .workload
                .map(|w| (w.namespace, w.service_account, w.pod)),
            client_cert: subject.client_cert.map(|c| (c.subject, c.spiffe_id)),
        };
        let hash = self.hasher.hash_one(&claims);
        if let Some((_, hit)) = self
            .lock()
            .by_hash
            .get(&hash)
            .and_then(|list| list.iter().find(|(c, _)| c.view() == claims))
            && now < hit.until
        {
            return Some(hit.token.clone());
        }
        let stable = Stable {
            iss: &self.config.issuer,
            aud: Audience(&self.config.audience_prefix, service),
            sub: subject.subject,
            nodegate_kind: subject.kind,
            email: subject.email,
            groups: subject.groups,
            idp: subject.issuer,
            workload: subject.workload,
            client_cert: subject.client_cert,
        };
        // Claims are strings and numbers: serializing them cannot fail.
        let body = serde_json::to_vec(&stable).unwrap_or_default();
        let token = self.sign_now(&body, now, request_id);
        let token = HeaderValue::from_maybe_shared(Bytes::from(token)).ok()?;
        let reusable = Reusable {
            token: token.clone(),
            until: now + self.config.ttl.as_secs() / 4,
        };
        let mut cache = self.lock();
        if cache.len >= CACHE_MAX {
            *cache = Cache::default();
        }
        let list = cache.by_hash.entry(hash).or_default();
        if let Some(stale) = list.iter_mut().find(|(c, _)| c.view() == claims) {
            stale.1 = reusable;
        } else {
            list.push((claims.to_owned(), reusable));
            cache.len += 1;
        }
        Some(token)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `stable` (a JSON object) with the times spliced in, signed.
    fn sign_now(&self, stable: &[u8], now: u64, request_id: &str) -> String {
        let times = serde_json::to_vec(&Times {
            iat: now,
            exp: now + self.config.ttl.as_secs(),
            jti: request_id,
        })
        .unwrap_or_default();
        // `{...stable...}` + `{...times...}` → `{...stable...,...times...}`.
        let mut payload = Vec::with_capacity(stable.len() + times.len());
        payload.extend_from_slice(stable.strip_suffix(b"}").unwrap_or(stable));
        payload.push(b',');
        payload.extend_from_slice(times.strip_prefix(b"{").unwrap_or(&times));
        let mut token = String::with_capacity(self.header_b64.len() + payload.len() * 2 + 90);
        token.push_str(&self.header_b64);
        B64.encode_string(&payload, &mut token);
        // Signing fails only if the random source does; an unsigned token would be refused
        // by every backend, which is the safe outcome.
        let signature = self.key.sign(&self.rng, token.as_bytes());
        token.push('.');
        if let Ok(signature) = signature {
            B64.encode_string(signature.as_ref(), &mut token);
        }
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
        let token = signer
            .sign(
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
            )
            .unwrap();
        let set: JwkSet = serde_json::from_str(signer.jwks()).unwrap();
        let token = token.to_str().unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.kid.as_deref(), Some(signer.kid()));
        let jwk = set.find(signer.kid()).unwrap();
        let mut validation = Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_audience(&["urn:ng:grafana"]);
        validation.set_issuer(&["nodegate"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            token,
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
        let forged = other
            .sign(
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
            )
            .unwrap();
        assert!(
            jsonwebtoken::decode::<serde_json::Value>(
                forged.to_str().unwrap(),
                &DecodingKey::from_jwk(jwk).unwrap(),
                &validation,
            )
            .is_err()
        );
    }

    fn subject<'a>(sub: &'a str, groups: &'a [String]) -> Subject<'a> {
        Subject {
            kind: "user",
            subject: Some(sub),
            email: None,
            groups,
            issuer: Some("https://idp.test"),
            workload: None,
            client_cert: None,
        }
    }

    #[test]
    fn an_assertion_is_reused_only_for_the_same_claims_while_fresh() {
        let signer = AssertionSigner::generate(AssertionConfig {
            issuer: "nodegate".into(),
            ttl: Duration::from_secs(60),
            audience_prefix: String::new(),
        });
        let devs = vec!["devs".to_owned()];
        let ops = vec!["ops".to_owned()];
        let a1 = signer.sign("web", &subject("alice", &devs), "r1").unwrap();
        let a2 = signer.sign("web", &subject("alice", &devs), "r2").unwrap();
        assert_eq!(
            a1.as_bytes().as_ptr(),
            a2.as_bytes().as_ptr(),
            "same claims, fresh: reused"
        );
        // Any difference in the claims is another assertion.
        let workload = AssertedWorkload {
            namespace: "ci",
            service_account: "builder",
            pod: None,
        };
        let cert = AssertedCert {
            subject: "CN=alice",
            spiffe_id: None,
        };
        let variants = [
            Subject {
                email: Some("alice@example.com"),
                ..subject("alice", &devs)
            },
            Subject {
                workload: Some(workload),
                ..subject("alice", &devs)
            },
            Subject {
                workload: Some(AssertedWorkload {
                    pod: Some("builder-0"),
                    ..workload
                }),
                ..subject("alice", &devs)
            },
            Subject {
                client_cert: Some(cert),
                ..subject("alice", &devs)
            },
            Subject {
                kind: "workload",
                ..subject("alice", &devs)
            },
            Subject {
                issuer: None,
                ..subject("alice", &devs)
            },
        ];
        let mut others = vec![
            signer.sign("web", &subject("bob", &devs), "r3").unwrap(),
            signer.sign("web", &subject("alice", &ops), "r4").unwrap(),
            signer.sign("api", &subject("alice", &devs), "r5").unwrap(),
        ];
        for variant in &variants {
            others.push(signer.sign("web", variant, "r7").unwrap());
        }
        for (i, other) in others.iter().enumerate() {
            for earlier in &others[..i] {
                assert_ne!(other, earlier);
            }
        }
        for other in others {
            assert_ne!(other, a1);
            let (_, claims) = decode(&other);
            assert_ne!(claims["jti"], "r1");
        }
        let (_, claims) = decode(&a1);
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["jti"], "r1");
        // Stale (a quarter of the ttl has passed): a new one.
        signer
            .lock()
            .by_hash
            .values_mut()
            .flatten()
            .for_each(|(_, r)| r.until = 0);
        let a3 = signer.sign("web", &subject("alice", &devs), "r6").unwrap();
        assert_ne!(a3, a1);
        assert_eq!(decode(&a3).1["jti"], "r6");
        // The cache never grows past its bound.
        for i in 0..CACHE_MAX + 10 {
            let _ = signer
                .sign("web", &subject(&i.to_string(), &devs), "x")
                .unwrap();
        }
        assert!(signer.lock().len <= CACHE_MAX);
        assert!(signer.lock().by_hash.values().map(Vec::len).sum::<usize>() <= CACHE_MAX);
    }

    fn decode(token: &HeaderValue) -> (serde_json::Value, serde_json::Value) {
        let mut parts = token.to_str().unwrap().split('.');
        let mut part = || -> serde_json::Value {
            serde_json::from_slice(&B64.decode(parts.next().unwrap()).unwrap()).unwrap()
        };
        (part(), part())
    }
}
