//! Authenticator tests against a real HTTP identity provider stub on 127.0.0.1:0 (discovery +
//! JWKS served by hyper), with test-only keys from `testdata/`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::*;

const RSA1: &str = include_str!("testdata/rsa1.pem");
const RSA2: &str = include_str!("testdata/rsa2.pem");
const RSA1_PUBLIC: &str = include_str!("testdata/rsa1.pub.pem");
const EC1: &str = include_str!("testdata/ec1.pem");
const AUD: &str = "https://gateway.test";

// ---- test identity provider -------------------------------------------------------------------

#[derive(Default)]
struct IdpState {
    issuer: Mutex<String>,
    jwks: Mutex<String>,
    down: AtomicBool,
    jwks_delay_ms: AtomicU64,
    jwks_hits: AtomicUsize,
    discovery_hits: AtomicUsize,
    /// Overrides the `issuer` in the discovery document.
    discovery_issuer: Mutex<Option<String>>,
}

struct TestIdp {
    issuer: String,
    state: Arc<IdpState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestIdp {
    async fn start(jwks: &Value) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let issuer = format!("http://{addr}");
        let state = Arc::new(IdpState::default());
        *state.issuer.lock().expect("lock") = issuer.clone();
        *state.jwks.lock().expect("lock") = jwks.to_string();
        let shared = Arc::clone(&state);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| serve(Arc::clone(&state), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            issuer,
            state,
            server,
        }
    }

    fn set_jwks(&self, jwks: &Value) {
        *self.state.jwks.lock().expect("lock") = jwks.to_string();
    }

    fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }
}

async fn serve(
    state: Arc<IdpState>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let respond = |status: StatusCode, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        Ok(resp)
    };
    match req.uri().path() {
        "/.well-known/openid-configuration" => {
            state.discovery_hits.fetch_add(1, Ordering::SeqCst);
            if state.down.load(Ordering::SeqCst) {
                return respond(StatusCode::SERVICE_UNAVAILABLE, String::new());
            }
            let issuer = state.issuer.lock().expect("lock").clone();
            let claimed = state
                .discovery_issuer
                .lock()
                .expect("lock")
                .clone()
                .unwrap_or_else(|| issuer.clone());
            respond(
                StatusCode::OK,
                json!({"issuer": claimed, "jwks_uri": format!("{issuer}/jwks")}).to_string(),
            )
        }
        "/jwks" => {
            state.jwks_hits.fetch_add(1, Ordering::SeqCst);
            let delay = state.jwks_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if state.down.load(Ordering::SeqCst) {
                return respond(StatusCode::SERVICE_UNAVAILABLE, String::new());
            }
            let body = state.jwks.lock().expect("lock").clone();
            respond(StatusCode::OK, body)
        }
        _ => respond(StatusCode::NOT_FOUND, String::new()),
    }
}

// ---- keys, tokens, config ---------------------------------------------------------------------

fn rsa_key(pem: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem")
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(EC1.as_bytes()).expect("ec pem")
}

fn public_jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, alg).expect("jwk");
    jwk.common.key_id = Some(kid.to_owned());
    let mut v = serde_json::to_value(jwk).expect("json");
    v["use"] = json!("sig");
    v
}

fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(issuer: &str) -> Value {
    json!({
        "iss": issuer,
        "sub": "alice",
        "aud": AUD,
        "exp": now() + 600,
        "iat": now(),
        "email": "alice@example.test",
        "groups": ["devs", "ops"],
    })
}

fn sign(claims: &Value, key: &EncodingKey, alg: Algorithm, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

fn rs256(claims: &Value, kid: &str) -> String {
    sign(claims, &rsa_key(RSA1), Algorithm::RS256, Some(kid))
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

fn issuer_config(name: &str, issuer: &str, extra: &Value) -> IssuerConfig {
    let mut v = json!({
        "name": name,
        "issuer": issuer,
        "audiences": [AUD],
        "jwks_refresh_min_interval_s": 30,
    });
    for (k, val) in extra.as_object().expect("object") {
        v[k] = val.clone();
    }
    serde_json::from_value(v).expect("issuer config")
}

struct Fixture {
    auth: Authenticator,
    counters: Arc<AuthCounters>,
    idp: TestIdp,
}

async fn fixture_with(keys: &[Value], extra: &Value) -> Fixture {
    let idp = TestIdp::start(&jwks(keys)).await;
    let config = AuthConfig {
        issuers: vec![issuer_config("corp", &idp.issuer, extra)],
        ..AuthConfig::default()
    };
    let counters = Arc::new(AuthCounters::default());
    let auth = Authenticator::new(&config, Arc::clone(&counters) as Arc<dyn AuthObserver>)
        .expect("authenticator");
    Fixture {
        auth,
        counters,
        idp,
    }
}

async fn fixture() -> Fixture {
    let f = fixture_with(
        &[public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1")],
        &json!({}),
    )
    .await;
    for report in f.auth.load_keys().await {
        report.result.expect("initial load");
    }
    f
}

async fn reason(auth: &Authenticator, token: &str) -> &'static str {
    auth.authenticate(token)
        .await
        .expect_err("must be denied")
        .reason()
}

// ---- tests ------------------------------------------------------------------------------------

#[tokio::test]
async fn valid_token_maps_identity_via_discovery() {
    let f = fixture().await;
    let signed = claims(&f.idp.issuer);
    let token = rs256(&signed, "k1");
    let id = f.auth.authenticate(&token).await.expect("valid");
    assert_eq!(id.kind, IdentityKind::User);
    assert_eq!(id.subject, "alice");
    assert_eq!(id.email.as_deref(), Some("alice@example.test"));
    assert_eq!(id.groups, ["devs", "ops"]);
    assert_eq!(id.issuer, f.idp.issuer);
    assert_eq!(id.issuer_name, "corp");
    assert_eq!(Value::Object(id.claims.clone()), signed, "all claims kept");
    assert!(id.workload.is_none());
    assert!(id.expires_at.is_some_and(|t| t > SystemTime::now()));
    assert_eq!(f.idp.state.discovery_hits.load(Ordering::SeqCst), 1);
    assert_eq!(f.idp.jwks_hits(), 1);
}

#[tokio::test]
async fn cache_hit_path() {
    let f = fixture().await;
    let token = rs256(&claims(&f.idp.issuer), "k1");
    let first = f.auth.authenticate(&token).await.expect("valid");
    let second = f.auth.authenticate(&token).await.expect("cached");
    let third = f.auth.authenticate_now(&token).expect("cached");
    assert!(
        Arc::ptr_eq(&first, &second) && Arc::ptr_eq(&first, &third),
        "served from the cache"
    );
    assert_eq!(f.counters.token_cache_misses.load(Ordering::SeqCst), 1);
    assert_eq!(f.counters.token_cache_hits.load(Ordering::SeqCst), 2);
    f.auth.clear_cache();
    let fourth = f.auth.authenticate_now(&token).expect("verified again");
    assert!(!Arc::ptr_eq(&first, &fourth));
    // A rejected token is never cached.
    let mut c = claims(&f.idp.issuer);
    c["aud"] = json!("https://other.test");
    let bad = rs256(&c, "k1");
    for _ in 0..2 {
        assert_eq!(reason(&f.auth, &bad).await, "token_bad_audience");
    }
    assert_eq!(f.counters.token_cache_hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn registered_claims() {
    let f = fixture().await;
    let iss = f.idp.issuer.clone();
    let with = |patch: Value| {
        let mut c = claims(&iss);
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        rs256(&c, "k1")
    };
    let t = now();
    let cases = [
        (json!({"exp": t - 120}), Err("token_expired")),
        // Inside the 30 s leeway.
        (json!({"exp": t - 10}), Ok(())),
        (json!({"nbf": t + 120}), Err("token_not_yet_valid")),
        (json!({"nbf": t + 10}), Ok(())),
        (json!({"nbf": t - 10}), Ok(())),
        // CVE-2026-25537: a mistyped nbf must not be skipped as absent.
        (json!({"nbf": "99999999999"}), Err("token_bad_claim")),
        (json!({"exp": null}), Err("token_missing_claim")),
        (json!({"exp": "never"}), Err("token_missing_claim")),
        (
            json!({"aud": "https://other.test"}),
            Err("token_bad_audience"),
        ),
        (json!({"aud": ["https://other.test", AUD]}), Ok(())),
        (
            json!({"aud": ["https://other.test"]}),
            Err("token_bad_audience"),
        ),
        (json!({"aud": null}), Err("token_missing_claim")),
        (
            json!({"iss": "https://evil.example"}),
            Err("token_bad_issuer"),
        ),
        (json!({"iss": null}), Err("token_bad_issuer")),
        (json!({"iss": [iss.clone()]}), Err("token_malformed")),
        (json!({"sub": null}), Err("token_missing_claim")),
        (json!({"sub": 42}), Err("token_bad_claim")),
        (json!({"groups": 42}), Err("token_bad_claim")),
    ];
    for (patch, want) in cases {
        let got = f
            .auth
            .authenticate(&with(patch.clone()))
            .await
            .map(|_| ())
            .map_err(|e| e.reason());
        assert_eq!(got, want, "{patch}");
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    let f = fixture().await;
    let payload = b64(&claims(&f.idp.issuer).to_string());
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"none","kid":"k1"}"#,
        r#"{"alg":"None"}"#,
    ] {
        for sig in ["", "c2ln"] {
            let token = format!("{}.{payload}.{sig}", b64(header));
            let err = f.auth.authenticate(&token).await.expect_err("none");
            assert_eq!(
                err.reason(),
                "token_alg_not_allowed",
                "{header} sig={sig:?}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    let f = fixture().await;
    let c = claims(&f.idp.issuer);
    // The classic key-confusion forgery: HMAC keyed with the issuer's public key, in each form an
    // attacker can get it (PEM text, DER-ish JWK JSON).
    let secrets = [
        RSA1_PUBLIC.to_owned(),
        public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1").to_string(),
    ];
    for secret in secrets {
        let forged = sign(
            &c,
            &EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
            Some("k1"),
        );
        assert_eq!(reason(&f.auth, &forged).await, "token_alg_not_allowed");
        let no_kid = sign(
            &c,
            &EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
            None,
        );
        assert_eq!(reason(&f.auth, &no_kid).await, "token_alg_not_allowed");
    }
    // No refetch was triggered by the forgeries.
    assert_eq!(f.idp.jwks_hits(), 1);
}

#[tokio::test]
async fn keys_named_by_the_token_itself_are_ignored() {
    let f = fixture().await;
    let attacker = rsa_key(RSA2);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".to_owned());
    // CVE-2018-0114 style: the token carries its own key (`jwk`) and a key URL (`jku`).
    header.jwk = Some(Jwk::from_encoding_key(&attacker, Algorithm::RS256).expect("jwk"));
    header.jku = Some("https://evil.example/jwks".to_owned());
    let forged = jsonwebtoken::encode(&header, &claims(&f.idp.issuer), &attacker).expect("sign");
    assert_eq!(reason(&f.auth, &forged).await, "token_bad_signature");
    header.kid = Some("attacker".to_owned());
    let forged = jsonwebtoken::encode(&header, &claims(&f.idp.issuer), &attacker).expect("sign");
    assert_eq!(reason(&f.auth, &forged).await, "token_unknown_kid");
}

#[tokio::test]
async fn key_must_fit_the_header_alg() {
    let rsa = public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1");
    let ec = public_jwk(&ec_key(), Algorithm::ES256, "e1");
    let f = fixture_with(&[rsa, ec], &json!({"algorithms": ["RS256", "ES256"]})).await;
    f.auth.load_keys().await;
    let c = claims(&f.idp.issuer);
    assert!(
        f.auth
            .authenticate(&sign(&c, &ec_key(), Algorithm::ES256, Some("e1")))
            .await
            .is_ok()
    );
    // ES256 header naming the RSA key's kid: refused before any crypto.
    let confused = sign(&c, &ec_key(), Algorithm::ES256, Some("k1"));
    let err = f.auth.authenticate(&confused).await.expect_err("mismatch");
    assert!(matches!(err, AuthError::KeyMismatch { .. }), "{err}");
    assert_eq!(err.reason(), "token_alg_not_allowed");
    // PS256 is RSA-family but not on this issuer's allow-list.
    let ps = sign(&c, &rsa_key(RSA1), Algorithm::PS256, Some("k1"));
    assert_eq!(reason(&f.auth, &ps).await, "token_alg_not_allowed");
}

#[tokio::test]
async fn es256_not_allowed_by_default() {
    let f = fixture().await;
    let token = sign(
        &claims(&f.idp.issuer),
        &ec_key(),
        Algorithm::ES256,
        Some("k1"),
    );
    assert_eq!(reason(&f.auth, &token).await, "token_alg_not_allowed");
}

#[tokio::test]
async fn missing_kid_needs_a_single_candidate() {
    let f = fixture().await;
    let c = claims(&f.idp.issuer);
    let token = sign(&c, &rsa_key(RSA1), Algorithm::RS256, None);
    assert!(
        f.auth.authenticate(&token).await.is_ok(),
        "one RS256 key: kid optional"
    );

    let two = fixture_with(
        &[
            public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1"),
            public_jwk(&rsa_key(RSA2), Algorithm::RS256, "k2"),
        ],
        &json!({}),
    )
    .await;
    two.auth.load_keys().await;
    let token = sign(
        &claims(&two.idp.issuer),
        &rsa_key(RSA1),
        Algorithm::RS256,
        None,
    );
    let err = two.auth.authenticate(&token).await.expect_err("ambiguous");
    assert!(
        matches!(err, AuthError::AmbiguousKey { candidates: 2, .. }),
        "{err}"
    );
    assert_eq!(err.reason(), "token_unknown_kid");
}

#[tokio::test]
async fn tampered_payload_fails_the_signature() {
    let f = fixture().await;
    let token = rs256(&claims(&f.idp.issuer), "k1");
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut c = claims(&f.idp.issuer);
    c["sub"] = json!("admin");
    c["groups"] = json!(["admins"]);
    parts[1] = b64(&c.to_string());
    assert_eq!(
        reason(&f.auth, &parts.join(".")).await,
        "token_bad_signature"
    );
    // Signature of another key under the same kid.
    let other = sign(
        &claims(&f.idp.issuer),
        &rsa_key(RSA2),
        Algorithm::RS256,
        Some("k1"),
    );
    assert_eq!(reason(&f.auth, &other).await, "token_bad_signature");
    // Truncated signature.
    let cut = &token[..token.len() - 4];
    assert_eq!(reason(&f.auth, cut).await, "token_bad_signature");
}

#[tokio::test]
async fn oversize_and_malformed_tokens() {
    let f = fixture().await;
    let big = "a".repeat(9 * 1024);
    let err = f.auth.authenticate(&big).await.expect_err("too large");
    assert_eq!(
        err,
        AuthError::TooLarge {
            len: 9 * 1024,
            max: 8 * 1024
        }
    );
    assert_eq!(err.reason(), "token_too_large");
    // Oversize tokens never reach the cache (no lookup counted).
    assert_eq!(f.counters.token_cache_misses.load(Ordering::SeqCst), 0);
    for junk in [
        "x",
        "a.b.c",
        "a.b.c.d.e",
        "Zm9v.YmFy.",
        "eyJ.eyJ.sig",
        "a b.c.d",
    ] {
        assert_eq!(reason(&f.auth, junk).await, "token_malformed", "{junk}");
    }
    assert_eq!(reason(&f.auth, "").await, "token_missing");
}

#[tokio::test]
async fn rotation_refetches_once_then_rate_limits() {
    let f = fixture().await;
    assert_eq!(f.idp.jwks_hits(), 1);
    let iss = f.idp.issuer.clone();
    // The IdP rotates: k2 is published and starts signing.
    f.idp.set_jwks(&jwks(&[
        public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1"),
        public_jwk(&rsa_key(RSA2), Algorithm::RS256, "k2"),
    ]));
    let rotated = sign(&claims(&iss), &rsa_key(RSA2), Algorithm::RS256, Some("k2"));
    let id = f
        .auth
        .authenticate(&rotated)
        .await
        .expect("found after refetch");
    assert_eq!(id.subject, "alice");
    assert_eq!(f.idp.jwks_hits(), 2);

    // A second unknown kid inside jwks_refresh_min_interval_s: denied without a fetch.
    let unknown = sign(&claims(&iss), &rsa_key(RSA2), Algorithm::RS256, Some("k3"));
    let err = f
        .auth
        .authenticate(&unknown)
        .await
        .expect_err("unknown kid");
    assert_eq!(err.reason(), "token_unknown_kid");
    assert_eq!(f.idp.jwks_hits(), 2);
    assert_eq!(
        f.counters.jwks_refetch_rate_limited.load(Ordering::SeqCst),
        1
    );
    // The old key still works.
    assert!(
        f.auth
            .authenticate(&rs256(&claims(&iss), "k1"))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unknown_kid_shares_one_fetch() {
    let f = Arc::new(fixture().await);
    f.idp
        .set_jwks(&jwks(&[public_jwk(&rsa_key(RSA2), Algorithm::RS256, "k2")]));
    // Slow JWKS so that every request arrives while the one fetch is in flight.
    f.idp.state.jwks_delay_ms.store(300, Ordering::SeqCst);
    let token = sign(
        &claims(&f.idp.issuer),
        &rsa_key(RSA2),
        Algorithm::RS256,
        Some("k2"),
    );
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let f = Arc::clone(&f);
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            f.auth.authenticate(&token).await.map(|_| ())
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("join").map_err(|e| e.reason()), Ok(()));
    }
    assert_eq!(
        f.idp.jwks_hits(),
        2,
        "one initial load + one shared refetch"
    );
    assert_eq!(
        f.counters.jwks_refetch_rate_limited.load(Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn jwks_down_keeps_stale_keys() {
    let f = fixture().await;
    f.idp.state.down.store(true, Ordering::SeqCst);
    // Forced reload against the dead endpoint fails...
    let err = f.auth.issuers[0].keys.reload().await.expect_err("down");
    assert!(err.to_string().contains("HTTP 503"), "{err}");
    assert_eq!(f.counters.jwks_fetch_failures.load(Ordering::SeqCst), 1);
    // ...and a fresh (uncached) token signed by a held key still verifies.
    let mut c = claims(&f.idp.issuer);
    c["sub"] = json!("bob");
    assert_eq!(
        f.auth
            .authenticate(&rs256(&c, "k1"))
            .await
            .expect("stale keys")
            .subject,
        "bob"
    );
    // An unknown kid while down: one refetch attempt, then the rate limit.
    let unknown = sign(&c, &rsa_key(RSA2), Algorithm::RS256, Some("k9"));
    assert_eq!(reason(&f.auth, &unknown).await, "token_unknown_kid");
    assert_eq!(reason(&f.auth, &unknown).await, "token_unknown_kid");
    assert_eq!(f.counters.jwks_fetch_failures.load(Ordering::SeqCst), 2);
    assert_eq!(
        f.counters.jwks_refetch_rate_limited.load(Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn issuer_unavailable_when_never_fetched() {
    let f = fixture_with(
        &[public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1")],
        &json!({}),
    )
    .await;
    f.idp.state.down.store(true, Ordering::SeqCst);
    let reports = f.auth.load_keys().await;
    assert!(reports[0].result.is_err());
    let token = rs256(&claims(&f.idp.issuer), "k1");
    let err = f.auth.authenticate(&token).await.expect_err("no keys");
    assert_eq!(err.reason(), "issuer_unavailable");
    assert_eq!(err.issuer(), Some("corp"));
    // Within the rate limit, requests do not hammer the IdP.
    let before = f.idp.state.discovery_hits.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(reason(&f.auth, &token).await, "issuer_unavailable");
    }
    assert_eq!(f.idp.state.discovery_hits.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn discovery_must_name_the_configured_issuer() {
    let f = fixture_with(
        &[public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1")],
        &json!({}),
    )
    .await;
    *f.idp.state.discovery_issuer.lock().expect("lock") = Some("https://evil.example".to_owned());
    let reports = f.auth.load_keys().await;
    let err = reports[0].result.as_ref().expect_err("mismatch");
    assert!(err.to_string().contains("names issuer"), "{err}");
    assert_eq!(f.idp.jwks_hits(), 0);
}

#[tokio::test]
async fn explicit_jwks_uri_skips_discovery() {
    let f = fixture_with(
        &[public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1")],
        &json!({}),
    )
    .await;
    let jwks_uri = format!("{}/jwks", f.idp.issuer);
    let config = AuthConfig {
        issuers: vec![issuer_config(
            "direct",
            &f.idp.issuer,
            &json!({ "jwks_uri": jwks_uri }),
        )],
        ..AuthConfig::default()
    };
    let auth = Authenticator::new(&config, Arc::new(NoopObserver)).expect("auth");
    auth.load_keys().await[0].result.as_ref().expect("loaded");
    assert!(
        auth.authenticate(&rs256(&claims(&f.idp.issuer), "k1"))
            .await
            .is_ok()
    );
    assert_eq!(f.idp.state.discovery_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn groups_as_string_or_array() {
    let f = fixture().await;
    let cases = [
        (json!(["a", "b", "c"]), vec!["a", "b", "c"]),
        (json!("a b c"), vec!["a", "b", "c"]),
        (json!("a,b, c"), vec!["a", "b", "c"]),
    ];
    for (groups, want) in cases {
        let mut c = claims(&f.idp.issuer);
        c["groups"] = groups.clone();
        let id = f.auth.authenticate(&rs256(&c, "k1")).await.expect("valid");
        assert_eq!(id.groups, want, "{groups}");
    }
}

#[tokio::test]
async fn custom_claim_mapping() {
    let f = fixture_with(
        &[public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1")],
        &json!({"claims": {"user": "preferred_username", "email": "mail", "groups": "/realm_access/roles"}, "kind": "workload"}),
    )
    .await;
    f.auth.load_keys().await;
    let mut c = claims(&f.idp.issuer);
    c["preferred_username"] = json!("svc-reporter");
    c["mail"] = json!("reporter@example.test");
    c["realm_access"] = json!({"roles": ["reader"]});
    let id = f.auth.authenticate(&rs256(&c, "k1")).await.expect("valid");
    assert_eq!(
        (
            id.kind,
            id.subject.as_str(),
            id.email.as_deref(),
            id.groups.as_slice()
        ),
        (
            IdentityKind::Workload,
            "svc-reporter",
            Some("reporter@example.test"),
            &["reader".to_owned()][..]
        )
    );
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ng-auth-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join("jwks.json")
}

#[tokio::test]
async fn kubernetes_service_account_token_from_jwks_file() {
    let path = temp_path("sa");
    std::fs::write(
        &path,
        jwks(&[public_jwk(&rsa_key(RSA1), Algorithm::RS256, "sa1")]).to_string(),
    )
    .expect("write");
    let cluster = "https://kubernetes.default.svc.cluster.local";
    let config = AuthConfig {
        issuers: vec![issuer_config(
            "cluster",
            cluster,
            &json!({"jwks_file": path, "kind": "kubernetes", "audiences": ["nodegate"]}),
        )],
        ..AuthConfig::default()
    };
    let auth = Authenticator::new(&config, Arc::new(NoopObserver)).expect("auth");
    assert_eq!(auth.load_keys().await[0].result.as_ref().ok(), Some(&1));

    let sa_claims = |pod: &str| {
        json!({
            "iss": cluster,
            "sub": "system:serviceaccount:shop:checkout",
            "aud": ["nodegate"],
            "exp": now() + 3600,
            "iat": now(),
            "nbf": now(),
            "kubernetes.io": {
                "namespace": "shop",
                "serviceaccount": {"name": "checkout", "uid": "0c7a5c0e-1111-2222-3333-444455556666"},
                "pod": {"name": pod, "uid": "9f1b2c3d-aaaa-bbbb-cccc-ddddeeeeffff"}
            }
        })
    };
    let token = sign(
        &sa_claims("checkout-6d4f9-x2x7k"),
        &rsa_key(RSA1),
        Algorithm::RS256,
        Some("sa1"),
    );
    let id = auth.authenticate(&token).await.expect("SA token");
    assert_eq!(id.kind, IdentityKind::Workload);
    assert_eq!(id.subject, "system:serviceaccount:shop:checkout");
    assert_eq!(
        id.workload,
        Some(WorkloadRef {
            namespace: "shop".into(),
            service_account: "checkout".into(),
            pod: Some("checkout-6d4f9-x2x7k".into())
        })
    );
    assert_eq!(
        id.groups,
        ["system:serviceaccounts", "system:serviceaccounts:shop"]
    );

    // `sub` and `kubernetes.io` disagreeing is refused.
    let mut forged = sa_claims("p");
    forged["kubernetes.io"]["namespace"] = json!("kube-system");
    let err = auth
        .authenticate(&sign(
            &forged,
            &rsa_key(RSA1),
            Algorithm::RS256,
            Some("sa1"),
        ))
        .await
        .expect_err("conflict");
    assert_eq!(err.reason(), "token_bad_claim");
    // A token for another audience (the API server's own) is refused.
    let mut api = sa_claims("p");
    api["aud"] = json!(["https://kubernetes.default.svc.cluster.local"]);
    assert_eq!(
        reason(
            &auth,
            &sign(&api, &rsa_key(RSA1), Algorithm::RS256, Some("sa1"))
        )
        .await,
        "token_bad_audience"
    );

    // The cluster rotates its signing key: rewrite the file, reload (SIGHUP), the new key verifies.
    std::fs::write(
        &path,
        jwks(&[public_jwk(&rsa_key(RSA2), Algorithm::RS256, "sa2")]).to_string(),
    )
    .expect("write");
    assert_eq!(auth.reload_files().await[0].result.as_ref().ok(), Some(&1));
    let rotated = sign(
        &sa_claims("p2"),
        &rsa_key(RSA2),
        Algorithm::RS256,
        Some("sa2"),
    );
    assert_eq!(
        auth.authenticate(&rotated)
            .await
            .expect("rotated")
            .workload
            .as_ref()
            .and_then(|w| w.pod.as_deref()),
        Some("p2")
    );
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[tokio::test]
async fn refresh_loop_reloads_on_max_age_and_file_change() {
    let f = fixture_with(
        &[public_jwk(&rsa_key(RSA1), Algorithm::RS256, "k1")],
        &json!({"jwks_max_age_s": 1, "jwks_refresh_min_interval_s": 1}),
    )
    .await;
    let path = temp_path("loop");
    std::fs::write(
        &path,
        jwks(&[public_jwk(&rsa_key(RSA1), Algorithm::RS256, "f1")]).to_string(),
    )
    .expect("write");
    let config = AuthConfig {
        issuers: vec![
            issuer_config(
                "corp",
                &f.idp.issuer,
                &json!({"jwks_max_age_s": 1, "jwks_refresh_min_interval_s": 1}),
            ),
            issuer_config("file", "https://file.example", &json!({"jwks_file": path})),
        ],
        ..AuthConfig::default()
    };
    let auth = Arc::new(Authenticator::new(&config, Arc::new(NoopObserver)).expect("auth"));
    auth.load_keys().await;
    assert_eq!(f.idp.jwks_hits(), 1);
    let upkeep = tokio::spawn({
        let auth = Arc::clone(&auth);
        async move { auth.refresh_loop(Duration::from_millis(50)).await }
    });
    // File change is picked up without a SIGHUP.
    std::fs::write(
        &path,
        jwks(&[public_jwk(&rsa_key(RSA2), Algorithm::RS256, "f2")]).to_string(),
    )
    .expect("write");
    let mut c = claims("https://file.example");
    c["iss"] = json!("https://file.example");
    let token = sign(&c, &rsa_key(RSA2), Algorithm::RS256, Some("f2"));
    let mut ok = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if auth.authenticate_now(&token).is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "file change reloaded");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    upkeep.abort();
    assert!(
        f.idp.jwks_hits() >= 2,
        "max-age refresh fetched again ({} fetches)",
        f.idp.jwks_hits()
    );
    let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
}

#[test]
fn bearer_header_parsing() {
    assert_eq!(parse_bearer("Bearer abc.def.ghi"), Ok("abc.def.ghi"));
    assert_eq!(parse_bearer("bearer  abc.def.ghi"), Ok("abc.def.ghi"));
    assert_eq!(
        parse_bearer("Bearer ").map_err(|e| e.reason()),
        Err("token_missing")
    );
    for bad in [
        "Basic YWxhZGRpbjpvcGVu",
        "Bearer",
        "Bearer a b",
        "Bearer a,Bearer b",
        "Bearerabc",
        "Bearer a\tb",
    ] {
        assert_eq!(
            parse_bearer(bad).map_err(|e| e.reason()),
            Err("token_malformed"),
            "{bad}"
        );
    }
}

#[test]
fn setup_errors_name_the_issuer() {
    let config = AuthConfig {
        issuers: vec![issuer_config(
            "corp",
            "https://idp.example",
            &json!({"algorithms": ["HS256"]}),
        )],
        ..AuthConfig::default()
    };
    let err = Authenticator::new(&config, Arc::new(NoopObserver)).expect_err("HS256");
    assert!(
        err.to_string().contains("`corp`") && err.to_string().contains("HS256"),
        "{err}"
    );
    let config = AuthConfig {
        issuers: vec![issuer_config(
            "corp",
            "https://idp.example",
            &json!({"ca_file": "/nonexistent/ca.pem"}),
        )],
        ..AuthConfig::default()
    };
    let err = Authenticator::new(&config, Arc::new(NoopObserver)).expect_err("ca");
    assert!(err.to_string().contains("`corp`: ca_file"), "{err}");
}
