//! The test `OpenID` Connect provider itself, on a simulated node without a gateway: the identity
//! tests rely on what it issues (claims, audiences, kids, rotation), so that is pinned down here.

mod common;

use nodegate_tests::harness::{
    HttpRequest, OidcProvider, Signing, TokenSpec,
    oidc::{self, decode_unverified},
};
use serde_json::json;

use common::node;

#[test]
fn machine_tokens_carry_groups_audience_and_the_current_kid() {
    let node = node("oidcp", &["idp", "a"]);
    let idp = OidcProvider::start(&node, node.pod("idp")).expect("start the provider");
    let a = node.pod("a");
    assert!(
        idp.issuer()
            .starts_with(&format!("http://{}:", node.pod("idp").ipv4)),
        "{}",
        idp.info()
    );

    // Discovery and the JWKS are reachable from a pod.
    let discovery = a
        .http(&HttpRequest::get(&format!(
            "{}/.well-known/openid-configuration",
            idp.issuer()
        )))
        .expect("curl discovery");
    assert_eq!(discovery.status, 200, "{discovery:?}");
    let discovery = discovery.json().expect("json");
    assert_eq!(discovery["issuer"], idp.issuer());
    assert_eq!(discovery["jwks_uri"], idp.jwks_uri());

    let kid = idp.current_kid().expect("kid");
    let token = idp
        .client_credentials(a, "machine-ops", None)
        .expect("a machine-ops token");
    let (header, claims) = decode_unverified(&token).expect("a JWT access token");
    assert_eq!(header["alg"], "RS256", "{header}");
    assert_eq!(header["kid"], kid.as_str(), "{header}");
    assert_eq!(claims["iss"], idp.issuer(), "{claims}");
    assert_eq!(claims["aud"], idp.audience(), "{claims}");
    assert_eq!(claims["sub"], "machine-ops", "{claims}");
    assert_eq!(claims["groups"], json!(["ops", "machines"]), "{claims}");
    assert_eq!(claims["team"], "payments", "{claims}");
    assert!(claims["exp"].as_u64().is_some(), "{claims}");

    let other = idp
        .client_credentials(a, "machine-guest", Some("https://other.nodegate.test"))
        .expect("a machine-guest token for another audience");
    let (_, claims) = decode_unverified(&other).expect("JWT");
    assert_eq!(claims["aud"], "https://other.nodegate.test", "{claims}");
    assert_eq!(claims["groups"], json!(["guests"]), "{claims}");

    // Rotation: a new signing kid, both keys published, new tokens carry the new kid.
    let new_kid = idp.rotate().expect("rotate");
    assert_ne!(new_kid, kid);
    assert_eq!(idp.current_kid().expect("kid"), new_kid);
    let jwks = a
        .http(&HttpRequest::get(&idp.jwks_uri()))
        .expect("curl jwks")
        .json()
        .expect("json");
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids, [new_kid.as_str(), kid.as_str()], "{jwks}");
    let rotated = idp
        .client_credentials(a, "machine-ops", None)
        .expect("a token after the rotation");
    let (header, _) = decode_unverified(&rotated).expect("JWT");
    assert_eq!(header["kid"], new_kid.as_str(), "{header}");
}

#[test]
fn minted_tokens_use_the_providers_keys_as_asked() {
    let node = node("oidcm", &["idp"]);
    let idp = OidcProvider::start(&node, node.pod("idp")).expect("start the provider");
    let kid = idp.current_kid().expect("kid");
    let claims =
        json!({"iss": idp.issuer(), "sub": "x", "aud": idp.audience(), "exp": 4_102_444_800_u64});
    let tokens = idp
        .mint(&[
            TokenSpec::rs256(&kid, claims.clone()),
            TokenSpec::rs256(&kid, claims.clone())
                .header(json!({"alg": "none"}))
                .signing(Signing::None),
            TokenSpec::rs256(&kid, claims.clone())
                .header(json!({"alg": "HS256", "kid": kid}))
                .signing(Signing::Hs256WithPublicPem),
        ])
        .expect("mint");
    assert_eq!(tokens.len(), 3);
    let (header, decoded) = decode_unverified(&tokens[0]).expect("JWT");
    assert_eq!(header, json!({"alg": "RS256", "typ": "JWT", "kid": kid}));
    assert_eq!(decoded, claims);
    assert!(
        tokens[1].ends_with('.'),
        "alg none has no signature: {}",
        tokens[1]
    );
    assert_eq!(
        decode_unverified(&tokens[2]).expect("JWT").0["alg"],
        "HS256"
    );

    // A key of the test's own (a ServiceAccount issuer's), and its public JWKS.
    let private = node.dir().join("sa.private.json");
    let public = node.dir().join("sa.public.json");
    oidc::genkey("sa-1", &private, &public).expect("genkey");
    let jwks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&public).expect("read")).expect("json");
    assert_eq!(jwks["keys"][0]["kid"], "sa-1", "{jwks}");
    assert!(jwks["keys"][0].get("d").is_none(), "public only: {jwks}");
    let sa = oidc::mint(&private, &[TokenSpec::rs256("sa-1", json!({"sub": "y"}))]).expect("mint");
    assert_eq!(
        decode_unverified(&sa[0]).expect("JWT").1,
        json!({"sub": "y"})
    );
}
