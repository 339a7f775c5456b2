//! Bearer-token authentication: JWTs from configured OIDC issuers and Kubernetes `ServiceAccount`
//! tokens, turned into an [`Identity`] for policy and the decision log.
//!
//! Request path ([`Authenticator::authenticate`]):
//! 1. size cap, then the verified-token cache (SHA-256 of the token → `Arc<Identity>`);
//! 2. shape (three base64url segments), header (`alg` on the issuer's allow-list; never `none` or
//!    HS*), unverified `iss` → the issuer whose keys to try, `kid` → the key, which must fit `alg`;
//! 3. jsonwebtoken checks signature, `iss`, `aud`, `exp`, `nbf` (with leeway; `exp` required);
//! 4. claims → [`Identity`]; cache until min(`exp`, now + ttl).
//!
//! An unknown `kid` (or an issuer with no keys yet) triggers one rate-limited, single-flight JWKS
//! refetch; nothing else on the request path does I/O. Key upkeep (max-age refresh, JWKS file
//! changes) runs in [`Authenticator::refresh_loop`], spawned by the caller on the control runtime.

mod cache;
pub mod cert;
pub mod config;
pub mod cookie;
mod discovery;
pub mod http_client;
pub mod identity;
mod jwks;
pub mod jwt;
pub mod login;
pub mod login_config;
#[cfg(test)]
mod login_tests;
pub mod sa;
pub mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jsonwebtoken::{Algorithm, Validation};

pub use self::config::{AuthConfig, ConfigError, IssuerConfig, IssuerKind};
pub use self::discovery::{ClientError, DiscoveryError, FetchError};
pub use self::identity::{Identity, IdentityKind, WorkloadRef};
pub use self::jwks::JwksError;
pub use self::jwt::{AuthError, REASONS};

use self::cache::TokenCache;
use self::config::IssuerSettings;
use self::jwks::{IssuerKeys, Refetch, Selected};

/// Hooks for metrics on the control side of auth. Every method has a no-op default; the gateway's
/// telemetry implements what it exports. The JWKS hooks run on the control side (or in a
/// rate-limited refetch); `token_cache_lookup` runs on every request, so keep it to a counter.
pub trait AuthObserver: Send + Sync {
    /// A JWKS was loaded: `keys` usable, `skipped` refused.
    fn jwks_loaded(&self, _issuer: &str, _keys: usize, _skipped: usize) {}
    /// A discovery/JWKS load failed; `kept_stale_keys` tells whether older keys remain in use.
    fn jwks_fetch_failed(&self, _issuer: &str, _error: &JwksError, _kept_stale_keys: bool) {}
    /// An unknown-`kid` refetch was refused by `jwks_refresh_min_interval_s`.
    fn jwks_refetch_rate_limited(&self, _issuer: &str) {}
    /// A token cache lookup (one per well-sized token).
    fn token_cache_lookup(&self, _hit: bool) {}
}

/// An observer that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl AuthObserver for NoopObserver {}

/// Plain counters, for tests and for a telemetry module that prefers to read totals.
#[derive(Debug, Default)]
pub struct AuthCounters {
    pub jwks_loads: AtomicU64,
    pub jwks_keys_skipped: AtomicU64,
    pub jwks_fetch_failures: AtomicU64,
    pub jwks_refetch_rate_limited: AtomicU64,
    pub token_cache_hits: AtomicU64,
    pub token_cache_misses: AtomicU64,
}

impl AuthObserver for AuthCounters {
    fn jwks_loaded(&self, _issuer: &str, _keys: usize, skipped: usize) {
        self.jwks_loads.fetch_add(1, Ordering::Relaxed);
        self.jwks_keys_skipped
            .fetch_add(skipped as u64, Ordering::Relaxed);
    }

    fn jwks_fetch_failed(&self, _issuer: &str, _error: &JwksError, _kept_stale_keys: bool) {
        self.jwks_fetch_failures.fetch_add(1, Ordering::Relaxed);
    }

    fn jwks_refetch_rate_limited(&self, _issuer: &str) {
        self.jwks_refetch_rate_limited
            .fetch_add(1, Ordering::Relaxed);
    }

    fn token_cache_lookup(&self, hit: bool) {
        let counter = if hit {
            &self.token_cache_hits
        } else {
            &self.token_cache_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The outcome of loading one issuer's keys, for the start-up log and `check-config`.
#[derive(Debug)]
pub struct LoadReport {
    pub issuer: String,
    pub result: Result<usize, JwksError>,
}

/// Why an [`Authenticator`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("auth issuer `{issuer}`: ca_file: {source}")]
    Client { issuer: String, source: ClientError },
}

struct Issuer {
    settings: IssuerSettings,
    /// One prepared validation per allowed algorithm (jsonwebtoken insists that all algorithms
    /// of a validation share the key's family, so one per algorithm is the simple form).
    validations: Vec<(Algorithm, Validation)>,
    keys: IssuerKeys,
}

impl Issuer {
    fn validation(&self, alg: Algorithm) -> Option<&Validation> {
        self.validations
            .iter()
            .find_map(|(a, v)| (*a == alg).then_some(v))
    }
}

/// A failed attempt, and whether fetching keys could change the answer.
struct Failure {
    error: AuthError,
    /// `(issuer index, key generation seen)` when a refetch may help.
    refetch: Option<(usize, u64)>,
}

impl From<AuthError> for Failure {
    fn from(error: AuthError) -> Self {
        Self {
            error,
            refetch: None,
        }
    }
}

/// Verifies bearer tokens against the configured issuers. Build one per config version and share
/// it behind an `Arc`; on hot reload build the new one, `load_keys().await` it, then swap, so that
/// requests never meet an issuer without keys. The token cache goes with the old value, which is
/// what a changed audience or issuer list requires.
pub struct Authenticator {
    issuers: Vec<Issuer>,
    cache: TokenCache,
    max_token_bytes: usize,
    observer: Arc<dyn AuthObserver>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "issuers",
                &self
                    .issuers
                    .iter()
                    .map(|i| &i.settings.name)
                    .collect::<Vec<_>>(),
            )
            .field("max_token_bytes", &self.max_token_bytes)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Validates the config and prepares every issuer. Loads no keys: call [`Self::load_keys`].
    ///
    /// # Errors
    /// An invalid config, or an unreadable `ca_file`; the message names the issuer.
    pub fn new(config: &AuthConfig, observer: Arc<dyn AuthObserver>) -> Result<Self, SetupError> {
        let settings = config::validate(config)?;
        let mut issuers = Vec::with_capacity(settings.len());
        for settings in settings {
            let keys = IssuerKeys::new(&settings, Arc::clone(&observer)).map_err(|source| {
                SetupError::Client {
                    issuer: settings.name.clone(),
                    source,
                }
            })?;
            let validations = settings
                .algorithms
                .iter()
                .map(|&alg| (alg, jwt::validation_for(&settings, alg)))
                .collect();
            issuers.push(Issuer {
                settings,
                validations,
                keys,
            });
        }
        Ok(Self {
            issuers,
            cache: TokenCache::new(
                config.token_cache.max_entries,
                Duration::from_secs(config.token_cache.ttl_s),
            ),
            max_token_bytes: config.max_token_bytes,
            observer,
        })
    }

    /// The validated issuers, for logging the effective config.
    pub fn issuers(&self) -> impl Iterator<Item = &IssuerSettings> {
        self.issuers.iter().map(|i| &i.settings)
    }

    /// Loads every issuer's keys once (start-up). Failures are reported, not fatal: such an issuer
    /// answers `issuer_unavailable` until a later fetch succeeds.
    pub async fn load_keys(&self) -> Vec<LoadReport> {
        let mut out = Vec::with_capacity(self.issuers.len());
        for issuer in &self.issuers {
            out.push(LoadReport {
                issuer: issuer.settings.name.clone(),
                result: issuer.keys.reload().await,
            });
        }
        out
    }

    /// Re-reads every `jwks_file` now (SIGHUP).
    pub async fn reload_files(&self) -> Vec<LoadReport> {
        let mut out = Vec::new();
        for issuer in self.issuers.iter().filter(|i| i.keys.is_file()) {
            out.push(LoadReport {
                issuer: issuer.settings.name.clone(),
                result: issuer.keys.reload().await,
            });
        }
        out
    }

    /// Key upkeep, forever: every `tick`, refresh keys older than `jwks_max_age_s` and reload
    /// changed JWKS files (with backoff after failures). Spawn it on the control runtime and
    /// abort the task on shutdown; it holds no state that needs draining.
    pub async fn refresh_loop(&self, tick: Duration) {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            for issuer in &self.issuers {
                issuer.keys.refresh_if_due().await;
            }
        }
    }

    /// Drops every cached verification (e.g. after a key was revoked out of band).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// Authenticates a bearer token, refetching the issuer's JWKS once (rate-limited,
    /// single-flight) when the token names a key not yet known.
    ///
    /// # Errors
    /// Why the token is refused; [`AuthError::reason`] is the decision-log code.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
        let failure = match self.attempt(token) {
            Ok(identity) => return Ok(identity),
            Err(failure) => failure,
        };
        let Some((index, generation)) = failure.refetch else {
            return Err(failure.error);
        };
        let Some(issuer) = self.issuers.get(index) else {
            return Err(failure.error);
        };
        // Boxed: the fetch (an HTTP client request) is rare, and its state would otherwise be
        // part of every request's future (hyper keeps one per connection).
        match Box::pin(issuer.keys.refetch_unknown_kid(generation)).await {
            Refetch::Updated => self.attempt(token).map_err(|f| f.error),
            Refetch::RateLimited | Refetch::Failed => Err(failure.error),
        }
    }

    /// Authenticates with the keys held now; never does I/O (`gateway explain`, benches).
    ///
    /// # Errors
    /// As [`Self::authenticate`], without the refetch on an unknown `kid`.
    pub fn authenticate_now(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
        self.attempt(token).map_err(|f| f.error)
    }

    /// Maps claims the way a verified token of the issuer their `iss` names would be mapped,
    /// **without any verification** (`gateway explain --claims`, a dry run). `Ok(None)` when no
    /// configured issuer has that `iss`. Never used on the request path.
    ///
    /// # Errors
    /// The claim-mapping errors of [`Identity`] (missing or mistyped user/groups claims).
    pub fn map_unverified_claims(
        &self,
        claims: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<Identity>, AuthError> {
        let Some(iss) = claims.get("iss").and_then(serde_json::Value::as_str) else {
            return Ok(None);
        };
        let Some(issuer) = self.issuers.iter().find(|i| i.settings.issuer == iss) else {
            return Ok(None);
        };
        let exp = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        Identity::from_verified(&issuer.settings, claims, exp).map(Some)
    }

    fn attempt(&self, token: &str) -> Result<Arc<Identity>, Failure> {
        if token.is_empty() {
            return Err(AuthError::Missing.into());
        }
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLarge {
                len: token.len(),
                max: self.max_token_bytes,
            }
            .into());
        }
        if let Some(identity) = self.cache.get(token) {
            self.observer.token_cache_lookup(true);
            return Ok(identity);
        }
        self.observer.token_cache_lookup(false);

        let compact = jwt::split_compact(token)?;
        let header = jwt::parse_header(compact.header)?;
        let iss = jwt::peek_issuer(compact.payload)?;
        let Some((index, issuer)) = self
            .issuers
            .iter()
            .enumerate()
            .find(|(_, i)| i.settings.issuer == iss)
        else {
            return Err(AuthError::UnknownIssuer {
                iss: jwt::clip(&iss),
            }
            .into());
        };
        let name = &issuer.settings.name;
        let Some(validation) = issuer.validation(header.alg) else {
            return Err(AuthError::AlgNotAllowed {
                alg: format!("{:?}", header.alg),
                issuer: Some(name.clone()),
            }
            .into());
        };
        let Some(keys) = issuer.keys.current() else {
            return Err(Failure {
                error: AuthError::IssuerUnavailable {
                    issuer: name.clone(),
                },
                refetch: Some((index, 0)),
            });
        };
        let key = match keys.select(header.kid.as_deref(), header.alg) {
            Selected::Key(key) => key,
            Selected::Unknown => {
                return Err(Failure {
                    error: AuthError::UnknownKid {
                        issuer: name.clone(),
                        kid: header.kid.as_deref().map(jwt::clip),
                    },
                    refetch: Some((index, keys.generation)),
                });
            }
            Selected::Ambiguous(candidates) => {
                return Err(AuthError::AmbiguousKey {
                    issuer: name.clone(),
                    alg: header.alg,
                    candidates,
                }
                .into());
            }
            Selected::Mismatch => {
                return Err(AuthError::KeyMismatch {
                    issuer: name.clone(),
                    kid: header.kid.as_deref().map(jwt::clip).unwrap_or_default(),
                    alg: header.alg,
                }
                .into());
            }
        };
        let (claims, exp) = jwt::verify_signed(token, &key.key, validation, name)?;
        let identity = Arc::new(Identity::from_verified(&issuer.settings, claims, exp)?);
        self.cache.insert(token, &identity, exp);
        Ok(identity)
    }
}

/// Extracts the token from an `Authorization` header value: `Bearer` (any case), one or more
/// spaces, then the token (RFC 6750 §2.1). Anything else is malformed, never guessed at.
///
/// # Errors
/// [`AuthError::Missing`] for an empty token, [`AuthError::Malformed`] for anything else.
pub fn parse_bearer(header: &str) -> Result<&str, AuthError> {
    let malformed = AuthError::Malformed {
        why: "Authorization is not `Bearer <token>`",
    };
    let (scheme, rest) = header.split_once(' ').ok_or_else(|| malformed.clone())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed);
    }
    let token = rest.trim_start_matches(' ');
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    // A byte search (a token is ~1 KB and this runs on every request): these are ASCII, so
    // no UTF-8 sequence contains their bytes.
    if memchr::memchr3(b' ', b'\t', b',', token.as_bytes()).is_some() {
        return Err(malformed);
    }
    Ok(token)
}

#[cfg(test)]
mod tests;
