//! `cargo fuzz run bearer`: any `Authorization` value and any token is refused or mapped without
//! panicking (header parsing, compact JWS splitting, header and `iss` peeking).

#![no_main]

use std::sync::{Arc, OnceLock};

use gateway::auth::{AuthConfig, Authenticator, IssuerConfig, NoopObserver, parse_bearer};
use libfuzzer_sys::fuzz_target;

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let issuer: IssuerConfig = serde_json::from_value(serde_json::json!({
            "name": "fuzz",
            "issuer": "https://idp.fuzz",
            "jwks_uri": "http://127.0.0.1:1/jwks",
            "audiences": ["nodegate"],
            "algorithms": ["RS256", "ES256"],
        }))
        .expect("issuer");
        let config = AuthConfig {
            issuers: vec![issuer],
            ..AuthConfig::default()
        };
        Authenticator::new(&config, Arc::new(NoopObserver)).expect("authenticator")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let token = parse_bearer(header).unwrap_or(header);
    // No keys are loaded: every token is refused, after the parsing this target is about.
    assert!(authenticator().authenticate_now(token).is_err());
});
