//! `cargo fuzz run session_cookie`: the browser session and login-flow cookies
//! (`auth::cookie`, `auth::session`).
//!
//! - The input as `Cookie` headers (one per line): nothing in them opens as a session or a flow
//!   (no value was sealed with these keys), the session is neither read nor peeked, and
//!   `remove_cookies` drops exactly the session cookies and keeps every other pair as it was.
//! - The input as a plaintext: sealed, it opens to itself for its purpose only, under these keys
//!   only, and with any one character changed it no longer opens. A session whose subject is the
//!   input reads back unchanged from the `Cookie` header.

#![no_main]

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, SystemTime},
};

use gateway::auth::{
    cookie::{
        CookieAttributes, CookieError, CookieKeys, CookieSecret, MAX_VALUE_LEN, Purpose,
        cookie_pairs, remove_cookies, set_cookie,
    },
    session::{Session, SessionId, SessionIdentity, Sessions, from_unix},
};
use http::{HeaderMap, HeaderValue, header::COOKIE};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "__Host-nodegate";
const ISSUER: &str = "https://login.example.com";
/// 2024-01-01T12:00:00Z: sessions are judged at this instant.
const NOW: u64 = 1_704_110_400;

struct Fixture {
    keys: Arc<CookieKeys>,
    other_keys: CookieKeys,
    sessions: Sessions,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let secret = |byte: u8| CookieSecret::new(vec![byte; 32]).expect("32 bytes");
        let keys = Arc::new(CookieKeys::new(&secret(0x5a)));
        let sessions = Sessions::new(
            keys.clone(),
            NAME.to_owned(),
            ISSUER.to_owned(),
            Duration::from_secs(8 * 3600),
            Duration::from_secs(60),
        );
        Fixture {
            keys,
            other_keys: CookieKeys::new(&secret(0xa5)),
            sessions,
        }
    })
}

fn now() -> SystemTime {
    from_unix(NOW)
}

fn forged(f: &Fixture, data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        if let Ok(value) = HeaderValue::from_bytes(line) {
            headers.append(COOKIE, value);
        }
    }
    assert!(
        !matches!(f.sessions.read(&headers, now()), Ok(Some(_))),
        "a forged session was accepted"
    );
    assert!(
        f.sessions.peek(&headers).is_none(),
        "a forged session was peeked"
    );
    for purpose in [Purpose::Session, Purpose::Flow] {
        assert!(
            !matches!(f.keys.open_named(purpose, &headers, NAME), Ok(Some(_))),
            "{purpose:?}"
        );
    }
    for (name, value) in cookie_pairs(&headers) {
        assert!(
            f.keys.open(Purpose::Session, value).is_err(),
            "{name}={value}"
        );
        assert!(f.keys.open(Purpose::Flow, value).is_err(), "{name}={value}");
    }

    let kept: Vec<(String, String)> = cookie_pairs(&headers)
        .filter(|(name, _)| *name != NAME)
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    let mut stripped = headers.clone();
    remove_cookies(&mut stripped, |name| name == NAME);
    let after: Vec<(String, String)> = cookie_pairs(&stripped)
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(after, kept, "remove_cookies changed other cookies");
}

fn sealed(f: &Fixture, data: &[u8]) {
    let sealed = match f.keys.seal(Purpose::Session, data) {
        Ok(sealed) => sealed,
        Err(CookieError::TooLarge { .. }) => return,
        Err(e) => panic!("seal: {e}"),
    };
    assert!(sealed.len() <= MAX_VALUE_LEN);
    let opened = f.keys.open(Purpose::Session, &sealed).expect("opens");
    assert_eq!(opened.as_slice(), data);
    assert_eq!(
        f.keys.open(Purpose::Flow, &sealed),
        Err(CookieError::Unauthentic)
    );
    assert_eq!(
        f.other_keys.open(Purpose::Session, &sealed),
        Err(CookieError::Unauthentic)
    );

    // Any one character changed (to another base64url character): never opens.
    let mut tampered = sealed.clone().into_bytes();
    let at = data.len().wrapping_mul(31) % tampered.len();
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("base64url is ASCII");
    assert!(
        f.keys.open(Purpose::Session, &tampered).is_err(),
        "{sealed} -> {tampered}"
    );

    let cookie = set_cookie(
        NAME,
        &sealed,
        CookieAttributes {
            path: "/",
            secure: true,
            max_age: None,
        },
    );
    assert!(
        cookie.is_ok(),
        "a sealed value is not a valid Set-Cookie value"
    );
}

fn session_round_trip(f: &Fixture, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let identity = SessionIdentity {
        session_id: SessionId::generate().expect("OS randomness"),
        issuer: ISSUER.to_owned(),
        subject: text.clone().into_owned(),
        email: Some(format!("{text}@example.com")),
        email_verified: Some(true),
        name: None,
        preferred_username: None,
        groups: text.split(',').map(str::to_owned).collect(),
        claims: serde_json::Map::new(),
        login_at: from_unix(NOW - 60),
        expires_at: from_unix(NOW + 3600),
    };
    let session = Session::new(identity, None);
    let Ok(sealed) = f.sessions.seal(&session) else {
        return; // too large for a cookie
    };
    let mut headers = HeaderMap::new();
    let value = format!("other=1; {NAME}={sealed}");
    headers.insert(COOKIE, HeaderValue::from_str(&value).expect("ASCII"));
    let read = f
        .sessions
        .read(&headers, now())
        .expect("a fresh session is valid");
    let read = read.expect("the session cookie is there");
    assert_eq!(read.identity, session.identity);
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    forged(f, data);
    sealed(f, data);
    session_round_trip(f, data);
});
