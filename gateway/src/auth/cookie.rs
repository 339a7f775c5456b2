//! Sealed cookies: authenticated encryption of small payloads that the gateway hands to the
//! browser and reads back, plus the `Cookie` / `Set-Cookie` header plumbing around them.
//!
//! A sealed value is `base64url(version || nonce || ciphertext)`. XChaCha20-Poly1305 is used
//! because its 192-bit nonce can be drawn at random for every cookie without a counter shared
//! between nodes (a random 96-bit AES-GCM nonce would put a birthday bound on the number of
//! cookies per key). Each purpose (login flow, session) has its own key derived from the
//! operator's secret with HKDF-SHA256, and the version and purpose are also authenticated as
//! associated data, so a flow cookie can never be replayed as a session cookie or the reverse.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use http::HeaderMap;
use http::header::{COOKIE, HeaderValue};
use rand_core::OsRng;
use rand_core::RngCore as _;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Format version, the first byte of every sealed value. Bumped when the layout or the key
/// derivation changes; a value of another version is rejected, never guessed at.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// HKDF salt: fixed and public, it only separates these keys from any other use of the secret.
const HKDF_SALT: &[u8] = b"nodegate/cookie-keys/v1";

/// Shortest cookie secret accepted: 256 bits.
pub const MIN_SECRET_LEN: usize = 32;

/// Longest cookie value (after base64) that is sealed or opened. Browsers keep at most about
/// 4096 bytes per cookie including its name and attributes; anything longer than this is
/// rejected before any decoding or decryption work is done.
pub const MAX_VALUE_LEN: usize = 3900;

/// How many cookies of one name are tried before giving up. Cookies from a parent domain or
/// another path can shadow ours; the bound keeps the decryption work per request small.
const MAX_CANDIDATES: usize = 4;

/// What a sealed value is for. Each purpose has its own key and associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// The short-lived cookie that carries state, nonce and PKCE verifier through a login.
    Flow,
    /// The session cookie.
    Session,
}

impl Purpose {
    fn hkdf_info(self) -> &'static [u8] {
        match self {
            Self::Flow => b"nodegate/flow-cookie/v1",
            Self::Session => b"nodegate/session-cookie/v1",
        }
    }

    fn aad(self) -> [u8; 2] {
        match self {
            Self::Flow => [VERSION, b'F'],
            Self::Session => [VERSION, b'S'],
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CookieError {
    #[error(
        "the cookie secret is {len} bytes; at least {MIN_SECRET_LEN} random bytes are required \
         (e.g. `head -c 32 /dev/urandom > FILE`)"
    )]
    SecretTooShort { len: usize },
    #[error(
        "the sealed cookie would be {len} bytes, more than the {MAX_VALUE_LEN} a browser keeps"
    )]
    TooLarge { len: usize },
    #[error("the cookie is not a sealed value (bad length or encoding)")]
    Malformed,
    #[error("the cookie has format version {0}, this gateway reads version {VERSION}")]
    UnknownVersion(u8),
    #[error("the cookie does not authenticate: tampered with, or sealed with another secret")]
    Unauthentic,
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// The cookie secret as configured, kept only long enough to derive the keys.
pub struct CookieSecret(Zeroizing<Vec<u8>>);

impl CookieSecret {
    /// # Errors
    ///
    /// `SecretTooShort` when fewer than 32 bytes are given.
    pub fn new(bytes: Vec<u8>) -> Result<Self, CookieError> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(CookieError::SecretTooShort { len: bytes.len() });
        }
        Ok(Self(Zeroizing::new(bytes)))
    }

    /// A fresh random secret, for a gateway started without a secret file.
    ///
    /// # Errors
    ///
    /// `Random` when the operating system has no randomness to give.
    pub fn generate() -> Result<Self, CookieError> {
        Ok(Self(Zeroizing::new(
            random_bytes::<MIN_SECRET_LEN>()?.to_vec(),
        )))
    }
}

impl fmt::Debug for CookieSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieSecret([redacted])")
    }
}

/// The per-purpose AEAD keys derived from the cookie secret.
pub struct CookieKeys {
    flow: XChaCha20Poly1305,
    session: XChaCha20Poly1305,
}

impl fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieKeys { .. }")
    }
}

impl CookieKeys {
    /// # Panics
    ///
    /// Never: HKDF-SHA256 can always produce a 32-byte key.
    #[must_use]
    pub fn new(secret: &CookieSecret) -> Self {
        let hkdf = Hkdf::<Sha256>::new(Some(HKDF_SALT), &secret.0);
        let derive = |purpose: Purpose| {
            let mut key = Zeroizing::new([0_u8; 32]);
            // Invariant: 32 bytes is far below HKDF-SHA256's 255 * 32 byte output limit.
            hkdf.expand(purpose.hkdf_info(), key.as_mut())
                .expect("HKDF-SHA256 can always produce 32 bytes");
            XChaCha20Poly1305::new(key.as_ref().into())
        };
        Self {
            flow: derive(Purpose::Flow),
            session: derive(Purpose::Session),
        }
    }

    fn cipher(&self, purpose: Purpose) -> &XChaCha20Poly1305 {
        match purpose {
            Purpose::Flow => &self.flow,
            Purpose::Session => &self.session,
        }
    }

    /// Encrypts and authenticates `plaintext` into a cookie-safe string.
    ///
    /// # Errors
    ///
    /// `TooLarge` when the sealed value would not fit in a cookie; `Random` when no nonce can be drawn.
    pub fn seal(&self, purpose: Purpose, plaintext: &[u8]) -> Result<String, CookieError> {
        let sealed_len = base64_len(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        if sealed_len > MAX_VALUE_LEN {
            return Err(CookieError::TooLarge { len: sealed_len });
        }
        let nonce = random_bytes::<NONCE_LEN>()?;
        let aad = purpose.aad();
        let ciphertext = self
            .cipher(purpose)
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            // Encryption only fails for inputs larger than the cipher's limit (256 GiB).
            .map_err(|_| CookieError::TooLarge { len: sealed_len })?;
        let mut raw = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        raw.push(VERSION);
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&ciphertext);
        Ok(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Decrypts a value produced by [`seal`](Self::seal) for the same purpose. Any input, however
    /// malformed, yields an error and never a panic.
    ///
    /// # Errors
    ///
    /// `Malformed`, `UnknownVersion` or `Unauthentic` for anything that is not a value sealed by these keys for `purpose`.
    pub fn open(&self, purpose: Purpose, value: &str) -> Result<Zeroizing<Vec<u8>>, CookieError> {
        if value.len() > MAX_VALUE_LEN {
            return Err(CookieError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| CookieError::Malformed)?;
        let (&version, rest) = raw.split_first().ok_or(CookieError::Malformed)?;
        if version != VERSION {
            return Err(CookieError::UnknownVersion(version));
        }
        if rest.len() < NONCE_LEN + TAG_LEN {
            return Err(CookieError::Malformed);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CookieError::Malformed)?;
        let aad = purpose.aad();
        self.cipher(purpose)
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CookieError::Unauthentic)
    }

    /// Opens the first cookie named `name` in `headers` that authenticates.
    ///
    /// Several cookies of one name can reach us (a parent domain or another path may set one);
    /// only a value sealed by us can authenticate, so taking the first that does is safe. Returns
    /// `Ok(None)` when no cookie of that name is present, and the last error when some are but
    /// none opens.
    ///
    /// # Errors
    ///
    /// The error of the last candidate when cookies named `name` exist but none opens.
    pub fn open_named(
        &self,
        purpose: Purpose,
        headers: &HeaderMap,
        name: &str,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, CookieError> {
        let mut last_error = None;
        for value in cookie_values(headers, name).take(MAX_CANDIDATES) {
            match self.open(purpose, value) {
                Ok(plaintext) => return Ok(Some(plaintext)),
                Err(e) => last_error = Some(e),
            }
        }
        last_error.map_or(Ok(None), Err)
    }
}

/// Length of `raw` bytes in unpadded base64.
fn base64_len(raw: usize) -> usize {
    (raw * 4).div_ceil(3)
}

/// Random bytes from the operating system.
///
/// # Errors
///
/// `Random` when the operating system has no randomness to give.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], CookieError> {
    let mut bytes = [0_u8; N];
    OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| CookieError::Random(e.to_string()))?;
    Ok(bytes)
}

/// Every `name=value` pair of the request's `Cookie` headers, in order. HTTP/2 clients may send
/// one `Cookie` header per cookie, so all of them are read. A header that is not visible ASCII is
/// skipped as a whole: cookie values we set never contain such bytes.
pub fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|h| h.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let value = value.trim();
            // RFC 6265 allows a value in double quotes; the quotes are not part of it.
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            Some((name.trim(), value))
        })
}

/// The values of the cookies named exactly `name` (names are case-sensitive).
pub fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> {
    cookie_pairs(headers).filter_map(move |(n, v)| (n == name).then_some(v))
}

/// Removes the cookies whose name satisfies `drop` from the request's `Cookie` headers, merging
/// the rest into one header (RFC 9113 §8.2.3 joins split cookies with "; " the same way). Used
/// to keep the gateway's own cookies away from the upstream service.
pub fn remove_cookies(headers: &mut HeaderMap, drop: impl Fn(&str) -> bool) {
    if !headers.contains_key(COOKIE) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|h| h.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n).trim();
            !drop(name)
        })
        .map(str::to_owned)
        .collect();
    headers.remove(COOKIE);
    if kept.is_empty() {
        return;
    }
    // Invariant: every piece came out of a valid header value and "; " is visible ASCII.
    if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
        headers.insert(COOKIE, value);
    }
}

/// The attributes of a cookie that the gateway sets.
#[derive(Clone, Copy, Debug)]
pub struct CookieAttributes<'a> {
    pub path: &'a str,
    /// `Secure`: set when the request came over TLS, so that the browser never sends the
    /// cookie in clear; left off on plain HTTP where the browser would drop such a cookie.
    pub secure: bool,
    /// `Max-Age` in seconds; `None` makes a browser-session cookie.
    pub max_age: Option<u64>,
}

/// A `Set-Cookie` header value: always `HttpOnly` (no script access) and `SameSite=Lax` (sent on
/// top-level navigations, which the provider's redirect back to the callback is, and not on
/// cross-site subresource requests or form posts).
///
/// # Errors
///
/// When `name`, `value` or `path` contain bytes not allowed in a header.
pub fn set_cookie(
    name: &str,
    value: &str,
    attrs: CookieAttributes<'_>,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    let max_age = attrs
        .max_age
        .map(|s| format!("; Max-Age={s}"))
        .unwrap_or_default();
    let secure = if attrs.secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={}; HttpOnly; SameSite=Lax{max_age}{secure}",
        attrs.path
    ))
}

/// A `Set-Cookie` header value that deletes the cookie (same name and path, `Max-Age=0`).
///
/// # Errors
///
/// When `name` or `path` contain bytes not allowed in a header.
pub fn clear_cookie(
    name: &str,
    path: &str,
    secure: bool,
) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    set_cookie(
        name,
        "",
        CookieAttributes {
            path,
            secure,
            max_age: Some(0),
        },
    )
}

/// Whether `name` is a valid cookie name (an RFC 9110 token), so that it can be used as is.
#[must_use]
pub fn is_valid_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(byte: u8) -> CookieKeys {
        CookieKeys::new(&CookieSecret::new(vec![byte; 32]).unwrap())
    }

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    #[test]
    fn seal_open_round_trip() {
        let k = keys(7);
        let sealed = k.seal(Purpose::Session, b"hello").unwrap();
        assert_eq!(&**k.open(Purpose::Session, &sealed).unwrap(), b"hello");
        assert_eq!(sealed.len(), base64_len(1 + NONCE_LEN + 5 + TAG_LEN));
        // A fresh nonce each time: the same plaintext never seals to the same value.
        assert_ne!(sealed, k.seal(Purpose::Session, b"hello").unwrap());
    }

    #[test]
    fn short_secret_is_refused() {
        assert_eq!(
            CookieSecret::new(vec![1; 31]).unwrap_err(),
            CookieError::SecretTooShort { len: 31 }
        );
    }

    #[test]
    fn purposes_and_secrets_do_not_mix() {
        let k = keys(7);
        let flow = k.seal(Purpose::Flow, b"x").unwrap();
        assert_eq!(
            k.open(Purpose::Session, &flow).unwrap_err(),
            CookieError::Unauthentic
        );
        let session = k.seal(Purpose::Session, b"x").unwrap();
        assert_eq!(
            keys(8).open(Purpose::Session, &session).unwrap_err(),
            CookieError::Unauthentic
        );
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let k = keys(7);
        let sealed = k.seal(Purpose::Session, b"identity").unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        for i in 0..raw.len() {
            for bit in 0..8 {
                let mut t = raw.clone();
                t[i] ^= 1 << bit;
                let tampered = URL_SAFE_NO_PAD.encode(&t);
                assert!(
                    k.open(Purpose::Session, &tampered).is_err(),
                    "byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let k = keys(7);
        let long = "A".repeat(MAX_VALUE_LEN + 1);
        for value in [
            "",
            "=",
            "%%%%",
            "AQ",
            "AA",
            "not base64 at all!",
            "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "AQ==",
            "ü",
            long.as_str(),
        ] {
            assert!(k.open(Purpose::Session, value).is_err(), "{value:?}");
        }
        let v2 = URL_SAFE_NO_PAD.encode([2_u8; 64]);
        assert_eq!(
            k.open(Purpose::Session, &v2).unwrap_err(),
            CookieError::UnknownVersion(2)
        );
    }

    #[test]
    fn oversized_plaintext_is_refused() {
        let k = keys(7);
        let err = k.seal(Purpose::Session, &[0; 4000]).unwrap_err();
        assert!(matches!(err, CookieError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn cookie_header_parsing() {
        let h = headers(&["a=1; _ng=\"v1\" ;b=2", "_ng=v2", "junk; =x; _ng"]);
        let values: Vec<_> = cookie_values(&h, "_ng").collect();
        assert_eq!(values, ["v1", "v2"]);
        assert_eq!(cookie_values(&h, "_NG").count(), 0);
        let mut bad = headers(&["_ng=ok"]);
        bad.append(COOKIE, HeaderValue::from_bytes(b"_ng=\xff").unwrap());
        assert_eq!(cookie_values(&bad, "_ng").collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn open_named_takes_the_first_authentic_value() {
        let k = keys(7);
        let good = k.seal(Purpose::Session, b"me").unwrap();
        let h = headers(&["_ng=forged", &format!("_ng={good}")]);
        assert_eq!(
            &**k.open_named(Purpose::Session, &h, "_ng").unwrap().unwrap(),
            b"me"
        );
        let h = headers(&["_ng=forged"]);
        assert_eq!(
            k.open_named(Purpose::Session, &h, "_ng").unwrap_err(),
            CookieError::Malformed
        );
        assert_eq!(k.open_named(Purpose::Session, &h, "other").unwrap(), None);
    }

    #[test]
    fn remove_cookies_keeps_the_others() {
        let mut h = headers(&["a=1; _ng=x", "_ng_flow_abc=y; b=2"]);
        remove_cookies(&mut h, |n| n == "_ng" || n.starts_with("_ng_flow_"));
        assert_eq!(h.get_all(COOKIE).iter().count(), 1);
        assert_eq!(h.get(COOKIE).unwrap(), "a=1; b=2");
        let mut h = headers(&["_ng=x"]);
        remove_cookies(&mut h, |n| n == "_ng");
        assert!(!h.contains_key(COOKIE));
    }

    #[test]
    fn set_cookie_attributes() {
        let attrs = CookieAttributes {
            path: "/",
            secure: true,
            max_age: Some(60),
        };
        assert_eq!(
            set_cookie("_ng", "v", attrs).unwrap(),
            "_ng=v; Path=/; HttpOnly; SameSite=Lax; Max-Age=60; Secure"
        );
        assert_eq!(
            clear_cookie("_ng", "/cb", false).unwrap(),
            "_ng=; Path=/cb; HttpOnly; SameSite=Lax; Max-Age=0"
        );
    }

    #[test]
    fn cookie_names() {
        assert!(is_valid_cookie_name("_nodegate"));
        assert!(is_valid_cookie_name("__Host-ng"));
        for bad in ["", "a b", "a;b", "a=b", "ä", "a,b"] {
            assert!(!is_valid_cookie_name(bad), "{bad:?}");
        }
    }
}
