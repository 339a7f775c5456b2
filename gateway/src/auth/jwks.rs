//! Per-issuer signing keys: JWKS parsing, the cached key set, and the fetch policy around it.
//!
//! - Parsing is per key and never fails the whole set for one odd key: unsupported `kty`,
//!   `use: enc`, symmetric (`oct`) keys, weak RSA moduli and malformed members are skipped and
//!   reported; a set with no usable key is an error, and the previous keys stay in place.
//! - The current [`KeySet`] sits behind an `ArcSwap`: the request path reads it lock-free.
//! - All fetches of one issuer run under one async mutex. That makes the unknown-`kid` refetch
//!   single-flight (waiters see the new generation and do not fetch again) and lets the rate limit
//!   be a plain timestamp.
//! - A failed fetch keeps the stale keys: an `IdP` outage must not turn into a gateway outage for
//!   tokens signed by keys we already hold.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Uri;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

use super::AuthObserver;
use super::config::{IssuerSettings, KeySource};
use super::discovery::{ClientError, DiscoveryError, FetchError, HttpFetcher, discover_jwks_uri};

/// Largest JWKS accepted, from HTTP or file (real ones are a few KiB).
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Keys kept from one JWKS; more is an `IdP` misconfiguration, and each key costs memory.
pub const MAX_KEYS: usize = 64;
/// RSA moduli below this are refused (NIST SP 800-131A); above the upper bound verification cost
/// becomes a denial-of-service lever.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// Why a key set could not be (re)loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("cannot read JWKS file {path:?}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("JWKS file {path:?} is over {MAX_JWKS_BYTES} bytes")]
    FileTooLarge { path: PathBuf },
    #[error("JWKS is not a JSON object with a `keys` array: {0}")]
    NotJwks(String),
    #[error("JWKS has no usable signing key ({skipped} skipped; see the warnings for why)")]
    NoUsableKeys { skipped: usize },
}

/// The key families a JWT algorithm can need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa { bits: usize },
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        match self {
            Self::Rsa { .. } => matches!(
                alg,
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ),
            Self::P256 => alg == Algorithm::ES256,
            Self::P384 => alg == Algorithm::ES384,
            Self::Ed25519 => alg == Algorithm::EdDSA,
        }
    }
}

/// One public verification key from a JWKS (`DecodingKey`'s `Debug` redacts the material).
#[derive(Debug)]
pub struct VerifyKey {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it pins one.
    pub alg: Option<Algorithm>,
    pub kind: KeyKind,
    pub key: DecodingKey,
}

impl VerifyKey {
    /// Key-confusion defence: only a key of the algorithm's own family (and of the JWK's pinned
    /// `alg`, if any) may verify. No key here is symmetric, so HS* never fits.
    #[must_use]
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }
}

/// The result of choosing a key for a token.
#[derive(Debug)]
pub enum Selected<'a> {
    Key(&'a VerifyKey),
    /// No key with that kid (or, without a kid, none of that algorithm): a refetch may help.
    Unknown,
    /// No kid, and more than one key fits.
    Ambiguous(usize),
    /// A key has that kid but cannot verify that algorithm.
    Mismatch,
}

/// An issuer's keys at one point in time.
#[derive(Debug)]
pub struct KeySet {
    pub keys: Vec<VerifyKey>,
    /// Increases with every successful load; 0 means "never loaded".
    pub generation: u64,
    pub loaded_at: Instant,
}

impl KeySet {
    #[must_use]
    pub fn select(&self, kid: Option<&str>, alg: Algorithm) -> Selected<'_> {
        if let Some(kid) = kid {
            let mut seen = false;
            for key in &self.keys {
                if key.kid.as_deref() == Some(kid) {
                    if key.fits(alg) {
                        return Selected::Key(key);
                    }
                    seen = true;
                }
            }
            return if seen {
                Selected::Mismatch
            } else {
                Selected::Unknown
            };
        }
        // No kid: acceptable only when exactly one key could have signed it.
        let mut fitting = self.keys.iter().filter(|k| k.fits(alg));
        match (fitting.next(), fitting.count()) {
            (None, _) => Selected::Unknown,
            (Some(key), 0) => Selected::Key(key),
            (Some(_), rest) => Selected::Ambiguous(rest + 1),
        }
    }
}

/// Keys parsed from one JWKS document.
#[derive(Debug)]
pub struct ParsedJwks {
    pub keys: Vec<VerifyKey>,
    /// `(kid, reason)` of every key left out.
    pub skipped: Vec<(Option<String>, &'static str)>,
}

#[derive(Deserialize)]
struct JwksDoc {
    keys: Vec<Value>,
}

/// The JWK members this module reads; unknown members are ignored (RFC 7517 §4).
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(rename = "use", default)]
    use_: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    /// Only whether it is there matters.
    #[serde(default)]
    d: Option<serde::de::IgnoredAny>,
}

/// Parses a JWKS document. Never panics; a bad key is skipped with a reason.
///
/// # Errors
/// [`JwksError::NotJwks`] when the document is not an object with a `keys` array.
pub fn parse_jwks(bytes: &[u8]) -> Result<ParsedJwks, JwksError> {
    let doc: JwksDoc =
        serde_json::from_slice(bytes).map_err(|e| JwksError::NotJwks(e.to_string()))?;
    let mut out = ParsedJwks {
        keys: Vec::new(),
        skipped: Vec::new(),
    };
    for value in doc.keys {
        // Kept whole for matching; clipped only where it is logged.
        let kid = value.get("kid").and_then(Value::as_str).map(str::to_owned);
        let logged_kid = || kid.as_deref().map(super::jwt::clip);
        if out.keys.len() == MAX_KEYS {
            out.skipped
                .push((logged_kid(), "over the per-JWKS key limit"));
            continue;
        }
        match parse_key(value) {
            Ok(key) => out.keys.push(VerifyKey { kid, ..key }),
            Err(reason) => out.skipped.push((logged_kid(), reason)),
        }
    }
    Ok(out)
}

fn parse_key(value: Value) -> Result<VerifyKey, &'static str> {
    if value.get("kid").is_some_and(|k| !k.is_string()) {
        return Err("kid is not a string");
    }
    let jwk: RawJwk = serde_json::from_value(value)
        .map_err(|_| "not a JWK object (kty missing or a member of the wrong type)")?;
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err("use is not sig");
    }
    if jwk
        .key_ops
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|op| op == "verify"))
    {
        return Err("key_ops lacks verify");
    }
    if jwk.d.is_some() {
        // A published private key means anyone can sign: refuse it rather than trust it.
        return Err("contains private key material (d)");
    }
    let alg = match jwk.alg.as_deref() {
        None => None,
        Some(name) => match name.parse::<Algorithm>() {
            Ok(alg) if super::config::is_asymmetric(alg) => Some(alg),
            Ok(_) => return Err("alg is symmetric"),
            Err(_) => return Err("alg is not a supported signature algorithm"),
        },
    };
    let (kind, key) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => rsa_key(jwk.n.as_deref(), jwk.e.as_deref())?,
        ("EC", Some("P-256")) => (
            KeyKind::P256,
            ec_key(jwk.x.as_deref(), jwk.y.as_deref(), 32)?,
        ),
        ("EC", Some("P-384")) => (
            KeyKind::P384,
            ec_key(jwk.x.as_deref(), jwk.y.as_deref(), 48)?,
        ),
        ("EC", _) => return Err("unsupported EC curve"),
        ("OKP", Some("Ed25519")) => {
            let x = b64_field(jwk.x.as_deref())?;
            if x.len() != 32 {
                return Err("Ed25519 x is not 32 bytes");
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        ("OKP", _) => return Err("unsupported OKP curve"),
        ("oct", _) => return Err("symmetric key (kty oct) in a public JWKS"),
        _ => return Err("unsupported kty"),
    };
    if let Some(alg) = alg
        && !kind.fits(alg)
    {
        return Err("alg does not match the key type");
    }
    Ok(VerifyKey {
        kid: None,
        alg,
        kind,
        key,
    })
}

fn b64_field(field: Option<&str>) -> Result<Vec<u8>, &'static str> {
    URL_SAFE_NO_PAD
        .decode(field.ok_or("missing key member")?)
        .map_err(|_| "key member is not base64url")
}

fn rsa_key(n: Option<&str>, e: Option<&str>) -> Result<(KeyKind, DecodingKey), &'static str> {
    let n = b64_field(n)?;
    let e = b64_field(e)?;
    let n_trim = trim_leading_zeros(&n);
    let bits = match n_trim.first() {
        Some(&top) => (n_trim.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    if bits < RSA_MIN_BITS {
        return Err("RSA modulus under 2048 bits");
    }
    if bits > RSA_MAX_BITS {
        return Err("RSA modulus over 8192 bits");
    }
    let e_trim = trim_leading_zeros(&e);
    // Public exponents are small odd numbers (65537 in practice); the backend caps them too.
    let e_ok = (1..=4).contains(&e_trim.len())
        && e_trim.last().is_some_and(|b| b & 1 == 1)
        && e_trim != [1];
    if !e_ok {
        return Err("RSA exponent is not a small odd number");
    }
    Ok((
        KeyKind::Rsa { bits },
        DecodingKey::from_rsa_raw_components(n_trim, e_trim),
    ))
}

fn ec_key(x: Option<&str>, y: Option<&str>, len: usize) -> Result<DecodingKey, &'static str> {
    let x = b64_field(x)?;
    let y = b64_field(y)?;
    if x.len() != len || y.len() != len {
        return Err("EC coordinates have the wrong length for the curve");
    }
    // SEC1 uncompressed point, the form the backend verifies with; an off-curve point fails there.
    let mut point = Vec::with_capacity(1 + 2 * len);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    Ok(DecodingKey::from_ec_der(&point))
}

fn trim_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

/// Where one issuer's keys come from at run time.
enum Source {
    Discovery { well_known: Uri, http: HttpFetcher },
    Uri { jwks_uri: Uri, http: HttpFetcher },
    File(PathBuf),
}

/// Identifies one version of a JWKS file (Kubernetes swaps mounted files by symlink, which changes
/// the inode; an in-place rewrite changes mtime or length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

/// Fetch bookkeeping; only touched under the issuer's fetch mutex.
#[derive(Default)]
struct FetchState {
    generation: u64,
    last_kid_refetch: Option<Instant>,
    jwks_uri: Option<(Uri, Instant)>,
    file_stamp: Option<FileStamp>,
    failures: u32,
    next_retry: Option<Instant>,
}

/// What an unknown-`kid` refetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refetch {
    /// New keys are in place (fetched now, or by a concurrent caller while this one waited).
    Updated,
    /// Another refetch happened less than `jwks_refresh_min_interval_s` ago.
    RateLimited,
    /// The fetch failed; the previous keys (if any) stay.
    Failed,
}

/// One issuer's key cache.
pub struct IssuerKeys {
    name: String,
    issuer: String,
    allow_http: bool,
    min_interval: Duration,
    max_age: Duration,
    source: Source,
    current: ArcSwapOption<KeySet>,
    state: tokio::sync::Mutex<FetchState>,
    observer: Arc<dyn AuthObserver>,
}

impl IssuerKeys {
    /// Prepares the source (the HTTP client for URL sources); fetches nothing.
    ///
    /// # Errors
    /// An unreadable or certificate-less `ca_file`.
    pub fn new(
        settings: &IssuerSettings,
        observer: Arc<dyn AuthObserver>,
    ) -> Result<Self, ClientError> {
        let http = || HttpFetcher::new(settings.ca_file.as_deref(), settings.fetch_timeout);
        let source = match &settings.source {
            KeySource::Discovery(well_known) => Source::Discovery {
                well_known: well_known.clone(),
                http: http()?,
            },
            KeySource::Uri(jwks_uri) => Source::Uri {
                jwks_uri: jwks_uri.clone(),
                http: http()?,
            },
            KeySource::File(path) => Source::File(path.clone()),
        };
        Ok(Self {
            name: settings.name.clone(),
            issuer: settings.issuer.clone(),
            allow_http: settings.allow_http,
            min_interval: settings.refresh_min_interval,
            max_age: settings.max_age,
            source,
            current: ArcSwapOption::empty(),
            state: tokio::sync::Mutex::new(FetchState::default()),
            observer,
        })
    }

    /// The keys in use now (lock-free).
    #[must_use]
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.load_full()
    }

    /// Unconditional (re)load: the initial load and SIGHUP. Not rate-limited.
    ///
    /// # Errors
    /// The fetch or parse failure; the previous keys stay in use.
    pub async fn reload(&self) -> Result<usize, JwksError> {
        let mut state = self.state.lock().await;
        self.load(&mut state).await
    }

    /// True for issuers whose keys come from a file.
    pub fn is_file(&self) -> bool {
        matches!(self.source, Source::File(_))
    }

    /// Called when a token names a key this issuer does not have (or when it has no keys at
    /// all). `seen_generation` is the generation the caller looked at.
    pub async fn refetch_unknown_kid(&self, seen_generation: u64) -> Refetch {
        let mut state = self.state.lock().await;
        if state.generation != seen_generation {
            // Someone loaded new keys while this caller waited for the lock: that is the
            // single-flight result, retry against it without another fetch.
            return Refetch::Updated;
        }
        let now = Instant::now();
        if state
            .last_kid_refetch
            .is_some_and(|t| now.duration_since(t) < self.min_interval)
        {
            self.observer.jwks_refetch_rate_limited(&self.name);
            return Refetch::RateLimited;
        }
        state.last_kid_refetch = Some(now);
        match self.load(&mut state).await {
            Ok(_) => Refetch::Updated,
            Err(_) => Refetch::Failed,
        }
    }

    /// Periodic upkeep: reload when the keys are older than `jwks_max_age_s` or the JWKS file
    /// changed, with exponential backoff after failures.
    pub async fn refresh_if_due(&self) {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if state.next_retry.is_some_and(|t| now < t) {
            return;
        }
        let age = self
            .current
            .load()
            .as_ref()
            .map(|k| now.duration_since(k.loaded_at));
        let too_old = age.is_none_or(|age| age >= self.max_age);
        let file_changed = match &self.source {
            Source::File(path) => file_stamp(path).await.ok() != state.file_stamp,
            Source::Discovery { .. } | Source::Uri { .. } => false,
        };
        if too_old || file_changed {
            // The outcome is logged and counted inside `load`.
            let _ = self.load(&mut state).await;
        }
    }

    async fn load(&self, state: &mut FetchState) -> Result<usize, JwksError> {
        let result = self.fetch_and_parse(state).await;
        let now = Instant::now();
        match result {
            Ok((parsed, stamp)) => {
                for (kid, reason) in &parsed.skipped {
                    tracing::warn!(issuer = %self.name, kid = kid.as_deref().unwrap_or("-"), reason, "jwks: key skipped");
                }
                let count = parsed.keys.len();
                state.generation += 1;
                state.failures = 0;
                state.next_retry = None;
                state.file_stamp = stamp;
                self.current.store(Some(Arc::new(KeySet {
                    keys: parsed.keys,
                    generation: state.generation,
                    loaded_at: now,
                })));
                tracing::info!(issuer = %self.name, keys = count, skipped = parsed.skipped.len(), generation = state.generation, "jwks: keys loaded");
                self.observer
                    .jwks_loaded(&self.name, count, parsed.skipped.len());
                Ok(count)
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                // min_interval · 2^(failures-1), capped by max_age: quick first retries, no
                // hammering of an IdP that is down for long.
                let backoff = self
                    .min_interval
                    .saturating_mul(1 << state.failures.min(16).saturating_sub(1))
                    .min(self.max_age);
                state.next_retry = Some(now + backoff);
                if matches!(
                    error,
                    JwksError::Fetch(_) | JwksError::NotJwks(_) | JwksError::NoUsableKeys { .. }
                ) {
                    // The JWKS URL itself may have moved: rediscover next time.
                    state.jwks_uri = None;
                }
                let kept = self.current.load().is_some();
                tracing::warn!(issuer = %self.name, %error, keeping_stale_keys = kept, retry_in_s = backoff.as_secs(), "jwks: load failed");
                self.observer.jwks_fetch_failed(&self.name, &error, kept);
                Err(error)
            }
        }
    }

    async fn fetch_and_parse(
        &self,
        state: &mut FetchState,
    ) -> Result<(ParsedJwks, Option<FileStamp>), JwksError> {
        let (bytes, stamp) = match &self.source {
            Source::File(path) => {
                let (bytes, stamp) = read_jwks_file(path).await?;
                (bytes, Some(stamp))
            }
            Source::Uri { jwks_uri, http } => {
                (http.get(jwks_uri, MAX_JWKS_BYTES).await?.to_vec(), None)
            }
            Source::Discovery { well_known, http } => {
                let now = Instant::now();
                let jwks_uri = match &state.jwks_uri {
                    Some((uri, at)) if now.duration_since(*at) < self.max_age => uri.clone(),
                    _ => {
                        let uri =
                            discover_jwks_uri(http, well_known, &self.issuer, self.allow_http)
                                .await?;
                        state.jwks_uri = Some((uri.clone(), now));
                        uri
                    }
                };
                (http.get(&jwks_uri, MAX_JWKS_BYTES).await?.to_vec(), None)
            }
        };
        let parsed = parse_jwks(&bytes)?;
        if parsed.keys.is_empty() {
            return Err(JwksError::NoUsableKeys {
                skipped: parsed.skipped.len(),
            });
        }
        Ok((parsed, stamp))
    }
}

async fn file_stamp(path: &Path) -> std::io::Result<FileStamp> {
    let meta = tokio::fs::metadata(path).await?;
    Ok(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        ino: meta.ino(),
    })
}

async fn read_jwks_file(path: &Path) -> Result<(Vec<u8>, FileStamp), JwksError> {
    let io = |source| JwksError::File {
        path: path.to_owned(),
        source,
    };
    let stamp = file_stamp(path).await.map_err(io)?;
    if stamp.len > MAX_JWKS_BYTES as u64 {
        return Err(JwksError::FileTooLarge {
            path: path.to_owned(),
        });
    }
    let bytes = tokio::fs::read(path).await.map_err(io)?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(JwksError::FileTooLarge {
            path: path.to_owned(),
        });
    }
    Ok((bytes, stamp))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn rsa_jwk(bits: usize) -> Value {
        let mut n = vec![0xffu8; bits / 8];
        n[0] = 0xc1;
        json!({"kty": "RSA", "kid": format!("rsa{bits}"), "n": b64(&n), "e": "AQAB"})
    }

    fn ec_jwk(kid: &str) -> Value {
        json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(&[1; 32]), "y": b64(&[2; 32])})
    }

    #[test]
    fn skips_what_it_cannot_use_and_keeps_the_rest() {
        let doc = json!({"keys": [
            rsa_jwk(2048),
            rsa_jwk(1024),
            rsa_jwk(16384),
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": rsa_jwk(2048)["n"], "e": "AQAB"},
            {"kty": "RSA", "kid": "ops", "key_ops": ["encrypt"], "n": rsa_jwk(2048)["n"], "e": "AQAB"},
            {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": rsa_jwk(2048)["n"], "e": "AQAB"},
            {"kty": "RSA", "kid": "hs", "alg": "HS256", "n": rsa_jwk(2048)["n"], "e": "AQAB"},
            {"kty": "RSA", "kid": "priv", "n": rsa_jwk(2048)["n"], "e": "AQAB", "d": "AAAA"},
            {"kty": "RSA", "kid": "e1", "n": rsa_jwk(2048)["n"], "e": "AQ"},
            {"kty": "RSA", "kid": "mixed", "alg": "ES256", "n": rsa_jwk(2048)["n"], "e": "AQAB"},
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"},
            {"kty": "EC", "crv": "P-256", "kid": "short", "x": b64(&[1; 31]), "y": b64(&[2; 32])},
            {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": b64(&[1; 32])},
            {"kty": "RSA", "kid": "nobase64", "n": "!!", "e": "AQAB"},
            {"kty": "RSA", "kid": 7, "n": rsa_jwk(2048)["n"], "e": "AQAB"},
            {"kid": "nokty"},
            "not an object",
            ec_jwk("ec1"),
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": b64(&[3; 32]), "alg": "EdDSA"},
        ]});
        let parsed = parse_jwks(doc.to_string().as_bytes()).expect("jwks");
        let kids: Vec<_> = parsed
            .keys
            .iter()
            .map(|k| k.kid.clone().unwrap_or_default())
            .collect();
        assert_eq!(kids, ["rsa2048", "ec1", "ed"]);
        assert_eq!(parsed.skipped.len(), 17, "{:?}", parsed.skipped);
        assert_eq!(parsed.keys[0].kind, KeyKind::Rsa { bits: 2048 });
    }

    #[test]
    fn long_kids_match_exactly() {
        let kid = "k".repeat(200);
        let doc = json!({ "keys": [ec_jwk(&kid)] });
        let set = KeySet {
            keys: parse_jwks(doc.to_string().as_bytes()).expect("jwks").keys,
            generation: 1,
            loaded_at: Instant::now(),
        };
        assert!(matches!(
            set.select(Some(&kid), Algorithm::ES256),
            Selected::Key(_)
        ));
        assert!(matches!(
            set.select(Some(&kid[..64]), Algorithm::ES256),
            Selected::Unknown
        ));
    }

    #[test]
    fn not_a_jwks() {
        for bad in [&b"{}"[..], b"[]", b"{\"keys\": {}}", b"\xff", b""] {
            assert!(matches!(parse_jwks(bad), Err(JwksError::NotJwks(_))));
        }
    }

    #[test]
    fn key_limit() {
        let keys: Vec<Value> = (0..MAX_KEYS + 3)
            .map(|i| ec_jwk(&format!("k{i}")))
            .collect();
        let parsed = parse_jwks(json!({ "keys": keys }).to_string().as_bytes()).expect("jwks");
        assert_eq!((parsed.keys.len(), parsed.skipped.len()), (MAX_KEYS, 3));
    }

    #[test]
    fn selection() {
        let doc = json!({"keys": [rsa_jwk(2048), ec_jwk("ec1"), ec_jwk("ec2"), {
            "kty": "RSA", "kid": "ps", "alg": "PS256", "n": rsa_jwk(2048)["n"], "e": "AQAB"
        }]});
        let set = KeySet {
            keys: parse_jwks(doc.to_string().as_bytes()).expect("jwks").keys,
            generation: 1,
            loaded_at: Instant::now(),
        };
        let kid_of = |s: Selected<'_>| match s {
            Selected::Key(k) => k.kid.clone().unwrap_or_default(),
            other => format!("{other:?}"),
        };
        assert_eq!(
            kid_of(set.select(Some("rsa2048"), Algorithm::RS256)),
            "rsa2048"
        );
        assert_eq!(
            kid_of(set.select(Some("rsa2048"), Algorithm::PS512)),
            "rsa2048"
        );
        assert_eq!(
            kid_of(set.select(Some("rsa2048"), Algorithm::ES256)),
            "Mismatch"
        );
        assert_eq!(
            kid_of(set.select(Some("rsa2048"), Algorithm::HS256)),
            "Mismatch"
        );
        assert_eq!(kid_of(set.select(Some("ps"), Algorithm::RS256)), "Mismatch");
        assert_eq!(
            kid_of(set.select(Some("nope"), Algorithm::RS256)),
            "Unknown"
        );
        assert_eq!(kid_of(set.select(None, Algorithm::ES256)), "Ambiguous(2)");
        assert_eq!(kid_of(set.select(None, Algorithm::RS384)), "rsa2048");
        assert_eq!(kid_of(set.select(None, Algorithm::EdDSA)), "Unknown");
    }
}
