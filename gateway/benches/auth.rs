//! Token verification cost: cold (header + key selection + signature + claims + identity mapping)
//! against a cache hit (SHA-256 of the token + sharded map lookup). Keys come from a JWKS file, so
//! no network is involved.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use gateway::auth::{AuthConfig, Authenticator, IssuerConfig, NoopObserver};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const RSA1: &str = include_str!("../src/auth/testdata/rsa1.pem");
const EC1: &str = include_str!("../src/auth/testdata/ec1.pem");
const ISSUER: &str = "https://login.example.com";

fn authenticator(jwks_path: &std::path::Path, cache_entries: usize) -> Authenticator {
    let issuer: IssuerConfig = serde_json::from_value(json!({
        "name": "corp",
        "issuer": ISSUER,
        "jwks_file": jwks_path,
        "audiences": ["https://gateway.test"],
        "algorithms": ["RS256", "ES256"],
    }))
    .expect("issuer config");
    let mut config = AuthConfig {
        issuers: vec![issuer],
        ..AuthConfig::default()
    };
    config.token_cache.max_entries = cache_entries;
    let auth = Authenticator::new(&config, Arc::new(NoopObserver)).expect("authenticator");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for report in rt.block_on(auth.load_keys()) {
        report.result.expect("keys");
    }
    auth
}

/// A token shaped like a real OIDC access token (~1 KiB once signed with RS256).
fn token(key: &EncodingKey, alg: Algorithm, kid: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({
        "iss": ISSUER,
        "sub": "248289761001",
        "aud": ["https://gateway.test", "https://api.example.com"],
        "exp": now + 3600,
        "iat": now,
        "nbf": now,
        "jti": "b9f2c1e0-6c4d-4d53-9a0b-5b8d1c2e7f11",
        "client_id": "web",
        "scope": "openid email profile api:read",
        "email": "jane.doe@example.com",
        "email_verified": true,
        "name": "Jane Doe",
        "groups": ["engineering", "oncall", "payments-readers", "k8s-prod-viewers"],
    });
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

fn bench(c: &mut Criterion) {
    let rsa = EncodingKey::from_rsa_pem(RSA1.as_bytes()).expect("rsa");
    let ec = EncodingKey::from_ec_pem(EC1.as_bytes()).expect("ec");
    let mut rsa_jwk =
        serde_json::to_value(Jwk::from_encoding_key(&rsa, Algorithm::RS256).expect("jwk"))
            .expect("json");
    rsa_jwk["kid"] = json!("rsa1");
    let mut ec_jwk =
        serde_json::to_value(Jwk::from_encoding_key(&ec, Algorithm::ES256).expect("jwk"))
            .expect("json");
    ec_jwk["kid"] = json!("ec1");
    let dir = std::env::temp_dir().join(format!("ng-auth-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("jwks.json");
    std::fs::write(&path, json!({ "keys": [rsa_jwk, ec_jwk] }).to_string()).expect("write");

    let rs256 = token(&rsa, Algorithm::RS256, "rsa1");
    let es256 = token(&ec, Algorithm::ES256, "ec1");
    eprintln!(
        "token sizes: RS256 {} B, ES256 {} B",
        rs256.len(),
        es256.len()
    );

    let cold = authenticator(&path, 0);
    let warm = authenticator(&path, 10_000);
    warm.authenticate_now(&rs256).expect("prime cache");

    let mut group = c.benchmark_group("verify");
    group.bench_function("cold_rs256", |b| {
        b.iter(|| cold.authenticate_now(black_box(&rs256)).expect("valid"));
    });
    group.bench_function("cold_es256", |b| {
        b.iter(|| cold.authenticate_now(black_box(&es256)).expect("valid"));
    });
    group.bench_function("cached_rs256", |b| {
        b.iter(|| warm.authenticate_now(black_box(&rs256)).expect("valid"));
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
