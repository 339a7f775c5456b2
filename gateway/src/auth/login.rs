//! Browser login: the OIDC authorization code flow with PKCE, state and nonce, on
//! reserved paths of the protected host, ending in a sealed session cookie.
//!
//! The flow is framework-neutral: every entry point takes a [`RequestCtx`] (method, URI, headers
//! and whether the connection is TLS) and returns an [`http::Response`] or a [`LoginError`]
//! whose [`reason`](LoginError::reason) goes to the decision log. The HTTP proxy calls
//! [`LoginFlow::handle`] for the reserved paths, [`LoginFlow::authenticate`] on every other
//! request, and [`LoginFlow::challenge`] when a request has no usable identity.
//!
//! Flow state (state, nonce, PKCE verifier, return path, origin) travels in a sealed cookie
//! named after the state, so that logins started in several tabs at once each complete; the
//! cookie's path is the callback path, so it is sent nowhere else.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{
    ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST, HeaderMap, HeaderValue, LOCATION,
    REFERRER_POLICY, SET_COOKIE, WWW_AUTHENTICATE,
};
use http::{Method, StatusCode, Uri};
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreClaimName, CoreClaimType,
    CoreClientAuthMethod, CoreErrorResponseType, CoreGenderClaim, CoreGrantType, CoreJsonWebKey,
    CoreJweContentEncryptionAlgorithm, CoreJweKeyManagementAlgorithm, CoreJwsSigningAlgorithm,
    CoreResponseMode, CoreResponseType, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreSubjectIdentifierType, CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AdditionalProviderMetadata, AuthType, AuthorizationCode,
    ClaimsVerificationError, Client, CsrfToken, EmptyExtraTokenFields, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, ErrorResponseType, IdToken, IdTokenClaims, IdTokenFields,
    JsonWebKeySet, Nonce, OAuth2TokenResponse as _, PkceCodeChallenge, PkceCodeVerifier,
    ProviderMetadata, RedirectUrl, RequestTokenError, SignatureVerificationError,
    StandardErrorResponse, StandardTokenResponse, TokenResponse as _,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::time::Instant;
use url::Url;

use super::cookie::{self, CookieAttributes, CookieError, CookieKeys, Purpose};
use super::http_client::{HttpClientError, HttpClientOptions, OidcHttpClient};
use super::login_config::{LoginSettings, RequestHost};
use super::session::{
    self, Authenticated, RefreshError, Refresher, Session, SessionError, SessionId,
    SessionIdentity, Sessions,
};

/// How long a started login may take (provider login page, MFA, consent).
const FLOW_TTL: Duration = Duration::from_secs(600);
/// Callbacks remembered as used, at most; each is kept until its flow cookie has expired.
const MAX_USED_FLOWS: usize = 100_000;
/// A failed discovery is not retried sooner than this; requests meanwhile fail fast.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);
/// The provider's key set is fetched again for an unknown `kid` no more often than this, so
/// that forged tokens with random key ids cannot make the gateway hammer the provider.
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Longest return path kept; a longer one falls back to `/`.
const MAX_RETURN_PATH: usize = 2048;
/// Claims that identify the token rather than the user; left out of the session.
const TOKEN_PLUMBING_CLAIMS: &[&str] = &["sid", "jti", "nbf", "s_hash"];

/// The framework-neutral response type of the login flow.
pub type Response = http::Response<Bytes>;

/// What the login flow needs to know about a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestCtx<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// Whether the client connection is TLS: selects `https` for the redirect URI and the
    /// `Secure` cookie attribute.
    pub tls: bool,
}

impl<'a> RequestCtx<'a> {
    pub fn new<B>(request: &'a http::Request<B>, tls: bool) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
            tls,
        }
    }

    pub fn from_parts(parts: &'a http::request::Parts, tls: bool) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            headers: &parts.headers,
            tls,
        }
    }

    /// The host the client asked for: the single `Host` header, or the URI's authority
    /// (HTTP/2 `:authority`). Two hosts that disagree, or several `Host` headers, give `None`.
    fn authority(&self) -> Option<&'a str> {
        let mut hosts = self.headers.get_all(HOST).iter();
        let host = match (hosts.next(), hosts.next()) {
            (Some(h), None) => Some(h.to_str().ok()?),
            (None, _) => None,
            (Some(_), Some(_)) => return None,
        };
        match (host, self.uri.authority()) {
            (Some(h), Some(a)) if !h.eq_ignore_ascii_case(a.as_str()) => None,
            (Some(h), _) => Some(h),
            (None, Some(a)) => Some(a.as_str()),
            (None, None) => None,
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}

/// Claims of the ID token beyond the standard ones (groups, roles, custom claims).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ExtraClaims {
    #[serde(flatten)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl AdditionalClaims for ExtraClaims {}

/// Discovery fields that `openidconnect`'s core metadata does not model.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct ExtraProviderMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revocation_endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end_session_endpoint: Option<String>,
    /// RFC 9207: the provider adds `iss` to its authorization responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authorization_response_iss_parameter_supported: Option<bool>,
}

impl AdditionalProviderMetadata for ExtraProviderMetadata {}

type ProviderMeta = ProviderMetadata<
    ExtraProviderMetadata,
    CoreAuthDisplay,
    CoreClientAuthMethod,
    CoreClaimName,
    CoreClaimType,
    CoreGrantType,
    CoreJweContentEncryptionAlgorithm,
    CoreJweKeyManagementAlgorithm,
    CoreJsonWebKey,
    CoreResponseMode,
    CoreResponseType,
    CoreSubjectIdentifierType,
>;
type OidcIdToken = IdToken<
    ExtraClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type OidcIdTokenClaims = IdTokenClaims<ExtraClaims, CoreGenderClaim>;
type OidcTokenResponse = StandardTokenResponse<
    IdTokenFields<
        ExtraClaims,
        EmptyExtraTokenFields,
        CoreGenderClaim,
        CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    >,
    CoreTokenType,
>;
type OidcClient = Client<
    ExtraClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    OidcTokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// Why a login step failed. Messages say what an operator (or user) can do about it.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(
        "host {0:?} is not in login.hosts; add it (and register its callback URL at the \
         identity provider) to allow browser login there"
    )]
    HostNotAllowed(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(Method),
    #[error("malformed callback: {0}")]
    CallbackInvalid(&'static str),
    #[error("the identity provider returned an error: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    ProviderError {
        error: String,
        description: Option<String>,
    },
    #[error(
        "no login in progress in this browser (no flow cookie): cookies are blocked, the \
         login was started on another host, or the callback URL was opened directly"
    )]
    FlowMissing,
    #[error(
        "the login flow cookie is not valid: tampered with, or sealed with another cookie secret"
    )]
    FlowInvalid,
    #[error("the login took longer than {} seconds; start again", FLOW_TTL.as_secs())]
    FlowExpired,
    #[error(
        "the callback's state does not match the login in progress (forged callback, or a stale tab)"
    )]
    StateMismatch,
    #[error("this login was already completed; a callback can be used once only")]
    FlowReplayed,
    #[error("the login started on {expected} but the callback came to {actual}")]
    HostMismatch { expected: String, actual: String },
    #[error(
        "the callback names issuer {0:?}, not the configured one: the response comes from \
         another identity provider (mix-up attack) or login.issuer is wrong"
    )]
    IssuerMismatch(String),
    #[error("the identity provider at {issuer} is unavailable: {detail}")]
    ProviderUnavailable { issuer: String, detail: String },
    #[error("exchanging the authorization code failed: {0}")]
    CodeExchangeFailed(String),
    #[error("the ID token was rejected: {0}")]
    IdTokenInvalid(String),
    #[error(
        "the session of {subject:?} does not fit in a cookie ({detail}); have the identity \
         provider put fewer groups or claims in the ID token"
    )]
    SessionTooLarge { subject: String, detail: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl LoginError {
    /// A stable reason code for the decision log and the deny page.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::HostNotAllowed(_) => "login_host_not_allowed",
            Self::MethodNotAllowed(_) => "login_method_not_allowed",
            Self::CallbackInvalid(_) => "login_callback_invalid",
            Self::ProviderError { .. } => "login_provider_error",
            Self::FlowMissing => "login_flow_missing",
            Self::FlowInvalid => "login_flow_invalid",
            Self::FlowExpired => "login_flow_expired",
            Self::StateMismatch => "login_state_mismatch",
            Self::FlowReplayed => "login_flow_replayed",
            Self::HostMismatch { .. } => "login_host_mismatch",
            Self::IssuerMismatch(_) => "login_issuer_mismatch",
            Self::ProviderUnavailable { .. } => "login_provider_unavailable",
            Self::CodeExchangeFailed(_) => "login_code_exchange_failed",
            Self::IdTokenInvalid(_) => "login_id_token_invalid",
            Self::SessionTooLarge { .. } => "login_session_too_large",
            Self::Internal(_) => "login_internal",
        }
    }

    /// The HTTP status for the deny page.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::ProviderError { .. } => StatusCode::FORBIDDEN,
            Self::ProviderUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::CodeExchangeFailed(_) | Self::IdTokenInvalid(_) => StatusCode::BAD_GATEWAY,
            Self::SessionTooLarge { .. } | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::HostNotAllowed(_)
            | Self::CallbackInvalid(_)
            | Self::FlowMissing
            | Self::FlowInvalid
            | Self::FlowExpired
            | Self::StateMismatch
            | Self::FlowReplayed
            | Self::HostMismatch { .. }
            | Self::IssuerMismatch(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Which reserved path a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservedPath {
    Login,
    Callback,
    Logout,
}

/// What happened on a reserved path, for the decision log, and the response to send.
#[derive(Debug)]
pub struct Handled {
    pub event: LoginEvent,
    pub response: Response,
}

#[derive(Debug)]
pub enum LoginEvent {
    /// Redirected to the provider.
    Started,
    /// The callback completed: a new session.
    LoggedIn(Box<SessionIdentity>),
    /// Signed out; the session, when the request had one.
    LoggedOut(Option<Box<SessionIdentity>>),
}

/// The login flow's cookie payload. Short keys keep the cookie small.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlowWire {
    /// state
    st: String,
    /// nonce
    nn: String,
    /// PKCE verifier
    pv: String,
    /// Where to send the browser afterwards (already checked to be a same-origin path).
    rt: String,
    /// Origin (`scheme://host[:port]`) the login started on: the redirect URI's origin.
    or: String,
    /// Expiry, unix seconds.
    exp: u64,
}

/// The discovered provider: metadata, the client built from it and what the flow needs of it.
struct Provider {
    metadata: ProviderMeta,
    client: OidcClient,
    /// RFC 7009 endpoint, to revoke a signed-out session's refresh token.
    revocation: Option<Url>,
    /// Whether the client authenticates with HTTP Basic (else in the request body).
    basic_auth: bool,
    end_session: Option<Url>,
    iss_parameter: bool,
    id_token_algs: Vec<CoreJwsSigningAlgorithm>,
    jwks_fetched: Instant,
}

impl Provider {
    fn build(metadata: ProviderMeta, settings: &LoginSettings) -> Result<Self, String> {
        if metadata.token_endpoint().is_none() {
            return Err("the discovery document has no token_endpoint".into());
        }
        // ID tokens signed with a public key only: an HMAC-signed ID token would be verified
        // with the client secret, which turns any leak of that secret into forged logins.
        let id_token_algs: Vec<_> = metadata
            .id_token_signing_alg_values_supported()
            .iter()
            .filter(|alg| is_asymmetric(alg))
            .cloned()
            .collect();
        if id_token_algs.is_empty() {
            return Err(
                "the provider signs ID tokens with no public-key algorithm (only HMAC or none)"
                    .into(),
            );
        }
        let basic_ok = metadata
            .token_endpoint_auth_methods_supported()
            .is_none_or(|m| m.contains(&CoreClientAuthMethod::ClientSecretBasic));
        let extra = metadata.additional_metadata().clone();
        let mut client = OidcClient::from_provider_metadata(
            metadata.clone(),
            settings.client_id.clone(),
            Some(settings.client_secret.clone()),
        );
        if !basic_ok {
            client = client.set_auth_type(AuthType::RequestBody);
        }
        let revocation = extra
            .revocation_endpoint
            .as_deref()
            .and_then(|u| Url::parse(u).ok())
            .filter(|u| matches!(u.scheme(), "https" | "http"));
        let end_session = extra
            .end_session_endpoint
            .as_deref()
            .and_then(|u| Url::parse(u).ok())
            .filter(|u| matches!(u.scheme(), "https" | "http"));
        Ok(Self {
            metadata,
            client,
            revocation,
            basic_auth: basic_ok,
            end_session,
            iss_parameter: extra
                .authorization_response_iss_parameter_supported
                .unwrap_or(false),
            id_token_algs,
            jwks_fetched: Instant::now(),
        })
    }

    /// Verifies an ID token's signature, issuer, audience, expiry and nonce at time `now`.
    fn verify(
        &self,
        id_token: &OidcIdToken,
        nonce: ExpectNonce<'_>,
        now: SystemTime,
    ) -> Result<OidcIdTokenClaims, ClaimsVerificationError> {
        let now = chrono::DateTime::<chrono::Utc>::from(now);
        let verifier = self
            .client
            .id_token_verifier()
            .set_allowed_algs(self.id_token_algs.clone())
            .set_time_fn(move || now);
        match nonce {
            ExpectNonce::Exactly(nonce) => id_token.claims(&verifier, nonce).cloned(),
            // A refresh response's ID token need not carry a nonce (OIDC Core 12.2).
            ExpectNonce::Any => id_token
                .claims(&verifier, |_: Option<&Nonce>| Ok(()))
                .cloned(),
        }
    }
}

fn is_asymmetric(alg: &CoreJwsSigningAlgorithm) -> bool {
    use CoreJwsSigningAlgorithm as A;
    matches!(
        alg,
        A::RsaSsaPkcs1V15Sha256
            | A::RsaSsaPkcs1V15Sha384
            | A::RsaSsaPkcs1V15Sha512
            | A::RsaSsaPssSha256
            | A::RsaSsaPssSha384
            | A::RsaSsaPssSha512
            | A::EcdsaP256Sha256
            | A::EcdsaP384Sha384
            | A::EcdsaP521Sha512
            | A::EdDsa
    )
}

#[derive(Clone, Copy)]
enum ExpectNonce<'a> {
    Exactly(&'a Nonce),
    Any,
}

#[derive(Default)]
struct DiscoveryState {
    last_attempt: Option<Instant>,
    last_error: String,
}

/// Callbacks already completed, by a hash of their state, until their flow cookie expires.
#[derive(Default)]
struct UsedFlows {
    until: HashMap<[u8; 32], u64>,
}

impl UsedFlows {
    /// Marks a flow used; false if it already was.
    fn consume(&mut self, state: &str, until: u64, now: u64) -> bool {
        let key: [u8; 32] = Sha256::digest(state.as_bytes()).into();
        if self.until.get(&key).is_some_and(|u| *u > now) {
            return false;
        }
        if self.until.len() >= MAX_USED_FLOWS {
            self.until.retain(|_, u| *u > now);
        }
        if self.until.len() >= MAX_USED_FLOWS {
            // Full of live entries: someone is completing logins very fast. Forgetting the
            // oldest only re-opens a replay of that one callback, whose authorization code the
            // provider has already redeemed and will refuse.
            if let Some(oldest) = self.until.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k) {
                self.until.remove(&oldest);
                tracing::warn!(
                    max = MAX_USED_FLOWS,
                    "used-login list full; the oldest entry is forgotten"
                );
            }
        }
        self.until.insert(key, until);
        true
    }
}

/// The browser login flow and the sessions it creates.
pub struct LoginFlow {
    settings: LoginSettings,
    keys: Arc<CookieKeys>,
    sessions: Sessions,
    http: OidcHttpClient,
    provider: RwLock<Option<Arc<Provider>>>,
    /// Serializes discovery and key-set refetches (one request to the provider at a time).
    discovery: tokio::sync::Mutex<DiscoveryState>,
    used_flows: Mutex<UsedFlows>,
}

impl fmt::Debug for LoginFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginFlow")
            .field("settings", &self.settings)
            .field("sessions", &self.sessions)
            .finish_non_exhaustive()
    }
}

impl LoginFlow {
    /// Builds the flow. The provider is not contacted here: discovery happens on first use
    /// (or with [`discover`](Self::discover)), so that a gateway can start while its identity
    /// provider is still coming up.
    ///
    /// # Errors
    ///
    /// When the HTTP client for the provider cannot be built (bad CA bundle).
    pub fn new(settings: LoginSettings) -> Result<Self, HttpClientError> {
        let http = OidcHttpClient::new(&HttpClientOptions {
            ca_pem: settings.ca_pem.clone(),
            allow_http: settings.allow_http,
            timeout: settings.http_timeout,
        })?;
        if settings.cookie_secret_generated {
            tracing::warn!(
                "login.cookie_secret_file is not set: a random cookie secret was generated; \
                 sessions will not survive a restart and are not valid on other nodes"
            );
        }
        let keys = Arc::new(CookieKeys::new(&settings.cookie_secret));
        let sessions = Sessions::new(
            Arc::clone(&keys),
            settings.cookie_name.clone(),
            settings.issuer.as_str().to_owned(),
            settings.session_ttl,
            settings.refresh_skew,
        );
        Ok(Self {
            settings,
            keys,
            sessions,
            http,
            provider: RwLock::new(None),
            discovery: tokio::sync::Mutex::new(DiscoveryState::default()),
            used_flows: Mutex::new(UsedFlows::default()),
        })
    }

    pub fn settings(&self) -> &LoginSettings {
        &self.settings
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// Runs discovery now; for a start-up check that logs an unreachable provider early.
    ///
    /// # Errors
    ///
    /// `ProviderUnavailable` when discovery fails.
    pub async fn discover(&self) -> Result<(), LoginError> {
        self.provider().await.map(|_| ())
    }

    /// Which reserved path `uri` is, if any. Exact match on the path: the proxy should
    /// canonicalize first and keep the whole `/.nodegate/` prefix away from upstreams.
    pub fn reserved_path(&self, uri: &Uri) -> Option<ReservedPath> {
        let path = uri.path();
        if path == self.settings.redirect_path {
            Some(ReservedPath::Callback)
        } else if path == self.settings.logout_path {
            Some(ReservedPath::Logout)
        } else if path == self.settings.login_path {
            Some(ReservedPath::Login)
        } else {
            None
        }
    }

    /// Serves a reserved path; `None` if the request is not for one.
    pub async fn handle(
        &self,
        ctx: &RequestCtx<'_>,
        now: SystemTime,
    ) -> Option<Result<Handled, LoginError>> {
        let reserved = self.reserved_path(ctx.uri)?;
        Some(match reserved {
            ReservedPath::Login => self.login_page(ctx, now).await,
            ReservedPath::Callback => {
                self.callback(ctx, now)
                    .await
                    .map(|(identity, response)| Handled {
                        event: LoginEvent::LoggedIn(Box::new(identity)),
                        response,
                    })
            }
            ReservedPath::Logout => {
                self.logout(ctx, now)
                    .await
                    .map(|(identity, response)| Handled {
                        event: LoginEvent::LoggedOut(identity.map(Box::new)),
                        response,
                    })
            }
        })
    }

    /// The identity of the request's session, refreshing it first when it is about to expire.
    /// `Ok(None)` when the request carries no session cookie.
    ///
    /// # Errors
    ///
    /// When the request has a session cookie that is not acceptable: see [`SessionError::reason`].
    pub async fn authenticate(
        &self,
        ctx: &RequestCtx<'_>,
        now: SystemTime,
    ) -> Result<Option<Authenticated>, SessionError> {
        self.sessions
            .authenticate(ctx.headers, ctx.tls, now, self)
            .await
    }

    /// The answer to a request without a usable identity: a browser navigation (GET or HEAD
    /// accepting `text/html`) is sent to the provider's login and brought back to the same
    /// URL; anything else (API clients, XHR, forms whose body a redirect would lose) gets 401
    /// with `WWW-Authenticate`.
    ///
    /// # Errors
    ///
    /// When a login cannot be started: see [`start`](Self::start).
    pub async fn challenge(
        &self,
        ctx: &RequestCtx<'_>,
        now: SystemTime,
    ) -> Result<Response, LoginError> {
        if is_browser_navigation(ctx.method, ctx.headers) {
            let back_to = ctx.uri.path_and_query().map_or("/", |pq| pq.as_str());
            self.start(ctx, back_to, now).await
        } else {
            Ok(unauthorized())
        }
    }

    /// Removes the gateway's cookies from a request before it is forwarded upstream: the
    /// session cookie carries the user's refresh token (sealed, but still not the upstream's).
    pub fn strip_cookies(&self, headers: &mut HeaderMap) {
        let name = self.settings.cookie_name.as_str();
        let flow_prefix = flow_cookie_prefix(name);
        cookie::remove_cookies(headers, |n| n == name || n.starts_with(&flow_prefix));
    }

    /// `GET login_path?rd=/path`: start a login explicitly.
    async fn login_page(
        &self,
        ctx: &RequestCtx<'_>,
        now: SystemTime,
    ) -> Result<Handled, LoginError> {
        if !matches!(*ctx.method, Method::GET | Method::HEAD) {
            return Err(LoginError::MethodNotAllowed(ctx.method.clone()));
        }
        let mut rd = None;
        for (k, v) in url::form_urlencoded::parse(ctx.uri.query().unwrap_or("").as_bytes()) {
            if k == "rd" {
                // Two `rd` parameters: no guessing which one a filter in front of us checked.
                rd = if rd.is_none() {
                    Some(v)
                } else {
                    Some(Cow::Borrowed("/"))
                };
            }
        }
        let response = self.start(ctx, rd.as_deref().unwrap_or("/"), now).await?;
        Ok(Handled {
            event: LoginEvent::Started,
            response,
        })
    }

    /// Starts a login: a 302 to the provider's authorization endpoint, with a flow cookie.
    /// `return_to` is where the browser goes after the login; anything but a same-origin
    /// relative path is replaced by `/`.
    ///
    /// # Errors
    ///
    /// `HostNotAllowed` for a host not in `login.hosts`; `ProviderUnavailable` when discovery fails.
    pub async fn start(
        &self,
        ctx: &RequestCtx<'_>,
        return_to: &str,
        now: SystemTime,
    ) -> Result<Response, LoginError> {
        let host = self.request_host(ctx)?;
        let provider = self.provider().await?;
        let origin = format!("{}://{}", ctx.scheme(), host.authority());
        let redirect_url = RedirectUrl::new(format!("{origin}{}", self.settings.redirect_path))
            .map_err(|e| LoginError::Internal(format!("redirect URL: {e}")))?;

        let state = random_token()?;
        let nonce = random_token()?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (auth_url, _, _) = provider
            .client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                {
                    let state = state.clone();
                    move || CsrfToken::new(state)
                },
                {
                    let nonce = nonce.clone();
                    move || Nonce::new(nonce)
                },
            )
            .add_scopes(self.settings.scopes.iter().cloned())
            .set_pkce_challenge(challenge)
            .set_redirect_uri(Cow::Owned(redirect_url))
            .url();

        let flow = FlowWire {
            st: state,
            nn: nonce,
            pv: verifier.secret().clone(),
            rt: safe_return_path(return_to),
            or: origin,
            exp: session::unix(now) + FLOW_TTL.as_secs(),
        };
        // The plaintext holds the PKCE verifier: wiped once sealed.
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(&flow).map_err(|e| LoginError::Internal(e.to_string()))?,
        );
        let sealed = self
            .keys
            .seal(Purpose::Flow, &json)
            .map_err(|e| LoginError::Internal(format!("flow cookie: {e}")))?;
        let set_cookie = cookie::set_cookie(
            &flow_cookie_name(&self.settings.cookie_name, &flow.st),
            &sealed,
            CookieAttributes {
                path: &self.settings.redirect_path,
                secure: ctx.tls,
                max_age: Some(FLOW_TTL.as_secs()),
            },
        )
        .map_err(|e| LoginError::Internal(format!("flow cookie header: {e}")))?;
        redirect(auth_url.as_str(), [set_cookie])
    }

    /// Completes a login on the callback path: checks the flow, exchanges the code, verifies
    /// the ID token and issues the session cookie with a 302 back to where the login began.
    ///
    /// # Errors
    ///
    /// Every check that fails has its own variant and reason code: see [`LoginError`].
    pub async fn callback(
        &self,
        ctx: &RequestCtx<'_>,
        now: SystemTime,
    ) -> Result<(SessionIdentity, Response), LoginError> {
        if *ctx.method != Method::GET {
            return Err(LoginError::MethodNotAllowed(ctx.method.clone()));
        }
        let host = self.request_host(ctx)?;
        let params = CallbackParams::parse(ctx.uri.query().unwrap_or(""))?;
        if let Some(error) = params.error {
            return Err(LoginError::ProviderError {
                error: printable(&error),
                description: params.error_description.as_deref().map(printable),
            });
        }
        let state = params
            .state
            .ok_or(LoginError::CallbackInvalid("no state parameter"))?;
        let code = params
            .code
            .ok_or(LoginError::CallbackInvalid("no code parameter"))?;

        let flow = self.open_flow(ctx.headers, &state)?;
        let now_s = session::unix(now);
        if flow.exp <= now_s {
            return Err(LoginError::FlowExpired);
        }
        // Constant time: the state is a secret shared only with the browser that began the
        // login, and the comparison must not tell an attacker how much of a guess was right.
        if !bool::from(flow.st.as_bytes().ct_eq(state.as_bytes())) {
            return Err(LoginError::StateMismatch);
        }
        let origin = format!("{}://{}", ctx.scheme(), host.authority());
        if origin != flow.or {
            return Err(LoginError::HostMismatch {
                expected: flow.or,
                actual: origin,
            });
        }

        let provider = self.provider().await?;
        // RFC 9207: when the provider names itself in the response, it must be our provider.
        match params.iss.as_deref() {
            Some(iss) if iss != self.settings.issuer.as_str() => {
                return Err(LoginError::IssuerMismatch(printable(iss)));
            }
            None if provider.iss_parameter => {
                return Err(LoginError::IssuerMismatch(String::new()));
            }
            _ => {}
        }

        // Consumed before the code is redeemed, so that two copies of one callback racing each
        // other cannot both get a session.
        if !self
            .used_flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .consume(&flow.st, flow.exp, now_s)
        {
            return Err(LoginError::FlowReplayed);
        }

        let redirect_url = RedirectUrl::new(format!("{origin}{}", self.settings.redirect_path))
            .map_err(|e| LoginError::Internal(format!("redirect URL: {e}")))?;
        let token_response = provider
            .client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| LoginError::CodeExchangeFailed(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(flow.pv.clone()))
            .set_redirect_uri(Cow::Owned(redirect_url))
            .request_async(&self.http)
            .await
            .map_err(|e| LoginError::CodeExchangeFailed(describe_token_error(&e)))?;
        let id_token = token_response.id_token().ok_or_else(|| {
            LoginError::IdTokenInvalid("the token response has no id_token".into())
        })?;
        let nonce = Nonce::new(flow.nn.clone());
        let claims = self
            .verify_id_token(provider, id_token, ExpectNonce::Exactly(&nonce), now)
            .await?;
        // The access token is not used by the gateway, so its `at_hash` binding is not checked.

        let session_id = SessionId::generate().map_err(|e| LoginError::Internal(e.to_string()))?;
        let identity = self.identity_from_claims(&claims, session_id, None, now);
        let session = Session::new(identity, token_response.refresh_token().cloned());
        let sealed = self.sessions.seal(&session).map_err(|e| match e {
            CookieError::TooLarge { .. } => LoginError::SessionTooLarge {
                subject: session.identity.subject.clone(),
                detail: e.to_string(),
            },
            other => LoginError::Internal(other.to_string()),
        })?;
        let session_cookie = self
            .sessions
            .set_cookie(&sealed, ctx.tls, &session, now)
            .ok_or_else(|| LoginError::Internal("session cookie header".into()))?;
        let clear_flow = cookie::clear_cookie(
            &flow_cookie_name(&self.settings.cookie_name, &flow.st),
            &self.settings.redirect_path,
            ctx.tls,
        )
        .map_err(|e| LoginError::Internal(e.to_string()))?;
        tracing::info!(
            session = %session.identity.session_id,
            subject = %session.identity.subject,
            host = %host.authority(),
            refreshable = session.refresh_token().is_some(),
            "browser login completed"
        );
        let response = redirect(&flow.rt, [session_cookie, clear_flow])?;
        Ok((session.identity, response))
    }

    /// Signs out (GET or POST on the logout path): revokes the session on this gateway so a
    /// copy of the cookie is refused from now on, revokes the refresh token at the provider
    /// when it has a revocation endpoint, and deletes the cookie.
    ///
    /// # Errors
    ///
    /// `MethodNotAllowed` for methods other than GET and POST.
    pub async fn logout(
        &self,
        ctx: &RequestCtx<'_>,
        now: SystemTime,
    ) -> Result<(Option<SessionIdentity>, Response), LoginError> {
        if !matches!(*ctx.method, Method::GET | Method::POST) {
            return Err(LoginError::MethodNotAllowed(ctx.method.clone()));
        }
        let session = self.sessions.peek(ctx.headers);
        if let Some(session) = &session {
            self.sessions.revoke(session.identity.session_id, now);
            tracing::info!(
                session = %session.identity.session_id,
                subject = %session.identity.subject,
                "signed out"
            );
            if let Some(token) = session.refresh_token() {
                self.revoke_at_provider(token).await;
            }
        }
        let provider = self
            .provider
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let end_session = provider
            .as_ref()
            .and_then(|p| p.end_session.clone())
            .map(|mut u| {
                u.query_pairs_mut()
                    .append_pair("client_id", self.settings.client_id.as_str());
                u
            });
        let mut builder = http::Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, "text/html; charset=utf-8")
            .header(CACHE_CONTROL, "no-store")
            .header(REFERRER_POLICY, "no-referrer");
        if let Some(clear) = self.sessions.clear_cookie(ctx.tls) {
            builder = builder.header(SET_COOKIE, clear);
        }
        let response = builder
            .body(Bytes::from(signed_out_page(end_session.as_ref())))
            .map_err(|e| LoginError::Internal(e.to_string()))?;
        Ok((session.map(|s| s.identity), response))
    }

    /// Revokes a refresh token at the provider (RFC 7009), best effort: the gateway's own
    /// revocation already refuses the session; this ends the provider's grant too.
    ///
    /// Sent by hand rather than through `openidconnect`: its revocation request refuses any
    /// non-https endpoint, even for a provider that was deliberately configured as plain http
    /// (tests, a trusted in-cluster link), and the request is one small form POST.
    async fn revoke_at_provider(&self, token: &openidconnect::RefreshToken) {
        let Ok(provider) = self.provider().await else {
            return;
        };
        let Some(endpoint) = &provider.revocation else {
            return;
        };
        let client_id = self.settings.client_id.as_str();
        let client_secret = self.settings.client_secret.secret();
        let mut pairs = vec![
            ("token", token.secret().as_str()),
            ("token_type_hint", "refresh_token"),
        ];
        let mut request = http::Request::post(endpoint.as_str())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json");
        if provider.basic_auth {
            // RFC 6749 2.3.1: id and secret are form-encoded before they are joined.
            let encode =
                |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let credentials = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                encode(client_id),
                encode(client_secret)
            ));
            request = request.header(AUTHORIZATION, format!("Basic {credentials}"));
        } else {
            pairs.push(("client_id", client_id));
            pairs.push(("client_secret", client_secret));
        }
        // The serializer is not `Send` (an encoding-override hook): built and gone here, so
        // that the logout future can run on the proxy's multi-threaded runtime.
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
            .into_bytes();
        let result = match request.body(body) {
            Ok(request) => match self.http.send(request).await {
                Ok(response) if response.status().is_success() => Ok(()),
                Ok(response) => Err(format!("the provider answered {}", response.status())),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "revoking the refresh token at the identity provider failed");
        }
    }

    fn request_host(&self, ctx: &RequestCtx<'_>) -> Result<RequestHost, LoginError> {
        let authority = ctx.authority().unwrap_or_default();
        self.settings
            .hosts
            .check(authority, ctx.tls)
            .ok_or_else(|| LoginError::HostNotAllowed(printable(authority)))
    }

    fn open_flow(&self, headers: &HeaderMap, state: &str) -> Result<FlowWire, LoginError> {
        let prefix = flow_cookie_prefix(&self.settings.cookie_name);
        let any_flow = || cookie::cookie_pairs(headers).any(|(n, _)| n.starts_with(&prefix));
        if !is_token(state) {
            return Err(if any_flow() {
                LoginError::StateMismatch
            } else {
                LoginError::FlowMissing
            });
        }
        let name = flow_cookie_name(&self.settings.cookie_name, state);
        match self.keys.open_named(Purpose::Flow, headers, &name) {
            Ok(Some(plaintext)) => {
                serde_json::from_slice(&plaintext).map_err(|_| LoginError::FlowInvalid)
            }
            Ok(None) if any_flow() => Err(LoginError::StateMismatch),
            Ok(None) => Err(LoginError::FlowMissing),
            Err(_) => Err(LoginError::FlowInvalid),
        }
    }

    async fn provider(&self) -> Result<Arc<Provider>, LoginError> {
        if let Some(p) = self
            .provider
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Ok(p);
        }
        let mut state = self.discovery.lock().await;
        if let Some(p) = self
            .provider
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Ok(p);
        }
        let unavailable = |detail: String| LoginError::ProviderUnavailable {
            issuer: self.settings.issuer.as_str().to_owned(),
            detail,
        };
        if state
            .last_attempt
            .is_some_and(|t| t.elapsed() < DISCOVERY_RETRY)
        {
            return Err(unavailable(state.last_error.clone()));
        }
        state.last_attempt = Some(Instant::now());
        let result = ProviderMeta::discover_async(self.settings.issuer.clone(), &self.http)
            .await
            .map_err(|e| format!("discovery failed: {}", error_chain(&e)))
            .and_then(|metadata| Provider::build(metadata, &self.settings));
        match result {
            Ok(provider) => {
                let provider = Arc::new(provider);
                *self
                    .provider
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&provider));
                tracing::info!(issuer = %self.settings.issuer.as_str(), "identity provider discovered");
                Ok(provider)
            }
            Err(detail) => {
                tracing::warn!(issuer = %self.settings.issuer.as_str(), %detail, "identity provider discovery failed");
                state.last_error.clone_from(&detail);
                Err(unavailable(detail))
            }
        }
    }

    /// Fetches the key set again after a token named a key we do not have (key rotation).
    /// Returns the provider to retry with, or `None` when nothing new can be had.
    async fn refetch_jwks(&self, stale: &Arc<Provider>) -> Option<Arc<Provider>> {
        let _serialized = self.discovery.lock().await;
        let current = self
            .provider
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        if !Arc::ptr_eq(&current, stale) {
            return Some(current);
        }
        if current.jwks_fetched.elapsed() < JWKS_REFETCH_INTERVAL {
            return None;
        }
        let jwks = match JsonWebKeySet::fetch_async(current.metadata.jwks_uri(), &self.http).await {
            Ok(jwks) => jwks,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "refetching the identity provider's keys failed");
                return None;
            }
        };
        let metadata = current.metadata.clone().set_jwks(jwks);
        let provider = Arc::new(Provider::build(metadata, &self.settings).ok()?);
        *self
            .provider
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&provider));
        tracing::info!("identity provider keys refetched");
        Some(provider)
    }

    async fn verify_id_token(
        &self,
        provider: Arc<Provider>,
        id_token: &OidcIdToken,
        nonce: ExpectNonce<'_>,
        now: SystemTime,
    ) -> Result<OidcIdTokenClaims, LoginError> {
        let invalid = |e: ClaimsVerificationError| LoginError::IdTokenInvalid(error_chain(&e));
        match provider.verify(id_token, nonce, now) {
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) => match self.refetch_jwks(&provider).await {
                Some(fresh) => fresh.verify(id_token, nonce, now).map_err(invalid),
                None => Err(LoginError::IdTokenInvalid(
                    "signed with a key the provider does not publish".into(),
                )),
            },
            result => result.map_err(invalid),
        }
    }

    fn identity_from_claims(
        &self,
        claims: &OidcIdTokenClaims,
        session_id: SessionId,
        previous_login: Option<SystemTime>,
        now: SystemTime,
    ) -> SessionIdentity {
        let mut extra = claims.additional_claims().claims.clone();
        let groups = match extra.remove(&self.settings.groups_claim) {
            Some(serde_json::Value::Array(items)) => items
                .into_iter()
                .filter_map(|v| match v {
                    serde_json::Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s],
            _ => Vec::new(),
        };
        for name in TOKEN_PLUMBING_CLAIMS {
            extra.remove(*name);
        }
        SessionIdentity {
            session_id,
            issuer: self.settings.issuer.as_str().to_owned(),
            subject: claims.subject().as_str().to_owned(),
            email: claims.email().map(|e| e.as_str().to_owned()),
            email_verified: claims.email_verified(),
            name: claims
                .name()
                .and_then(|n| n.get(None))
                .map(|n| n.as_str().to_owned()),
            preferred_username: claims.preferred_username().map(|u| u.as_str().to_owned()),
            groups,
            claims: extra,
            login_at: claims
                .auth_time()
                .map(SystemTime::from)
                .or(previous_login)
                .map_or_else(|| whole_seconds(now), whole_seconds),
            expires_at: whole_seconds(now + self.settings.session_ttl),
        }
    }
}

impl Refresher for LoginFlow {
    async fn refresh(&self, session: &Session, now: SystemTime) -> Result<Session, RefreshError> {
        let token = session
            .refresh_token()
            .ok_or_else(|| RefreshError::Rejected("the session has no refresh token".into()))?;
        let provider = self
            .provider()
            .await
            .map_err(|e| RefreshError::Unavailable(e.to_string()))?;
        let response = provider
            .client
            .exchange_refresh_token(token)
            .map_err(|e| RefreshError::Rejected(e.to_string()))?
            .request_async(&self.http)
            .await
            .map_err(|e| match &e {
                RequestTokenError::ServerResponse(r) if !is_transient(r.error()) => {
                    RefreshError::Rejected(describe_token_error(&e))
                }
                _ => RefreshError::Unavailable(describe_token_error(&e)),
            })?;
        let old = &session.identity;
        let mut identity = match response.id_token() {
            Some(id_token) => {
                let claims = self
                    .verify_id_token(provider, id_token, ExpectNonce::Any, now)
                    .await
                    .map_err(|e| RefreshError::Rejected(e.to_string()))?;
                // OIDC Core 12.2: the refreshed ID token must be about the same user.
                if claims.subject().as_str() != old.subject {
                    return Err(RefreshError::Rejected(
                        "the refreshed ID token is for another subject".into(),
                    ));
                }
                self.identity_from_claims(&claims, old.session_id, Some(old.login_at), now)
            }
            None => old.clone(),
        };
        identity.expires_at = whole_seconds(now + self.settings.session_ttl);
        // Providers that rotate refresh tokens return a new one; others keep the old valid.
        let token = response
            .refresh_token()
            .cloned()
            .unwrap_or_else(|| token.clone());
        Ok(Session::new(identity, Some(token)))
    }
}

/// Errors the provider reports as temporary; the session is kept and the refresh retried.
fn is_transient(error: &CoreErrorResponseType) -> bool {
    matches!(error, CoreErrorResponseType::Extension(e) if e == "server_error" || e == "temporarily_unavailable")
}

fn describe_token_error<RE, T>(e: &RequestTokenError<RE, StandardErrorResponse<T>>) -> String
where
    RE: std::error::Error + 'static,
    T: ErrorResponseType + AsRef<str> + fmt::Display + 'static,
{
    match e {
        RequestTokenError::ServerResponse(r) => {
            let error = printable(r.error().as_ref());
            match r.error_description() {
                Some(d) => format!("the provider answered {error} ({})", printable(d)),
                None => format!("the provider answered {error}"),
            }
        }
        RequestTokenError::Request(inner) => error_chain(inner),
        RequestTokenError::Parse(inner, _) => format!("unreadable token response: {inner}"),
        RequestTokenError::Other(s) => printable(s),
    }
}

/// The query parameters of a callback. Each may appear once: a repeated parameter means the
/// URL was tampered with, and which copy counts would depend on the parser.
#[derive(Default)]
struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    iss: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

impl CallbackParams {
    fn parse(query: &str) -> Result<Self, LoginError> {
        let mut p = Self::default();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*k {
                "code" => &mut p.code,
                "state" => &mut p.state,
                "iss" => &mut p.iss,
                "error" => &mut p.error,
                "error_description" => &mut p.error_description,
                _ => continue,
            };
            if slot.replace(v.into_owned()).is_some() {
                return Err(LoginError::CallbackInvalid(
                    "a parameter appears more than once",
                ));
            }
        }
        Ok(p)
    }
}

fn flow_cookie_prefix(cookie_name: &str) -> String {
    format!("{cookie_name}_flow_")
}

/// The flow cookie's name carries the first 16 characters (96 bits) of the state, so each
/// login in progress has its own cookie and the callback finds it by the state it brings.
fn flow_cookie_name(cookie_name: &str, state: &str) -> String {
    let tag = state.get(..16).unwrap_or(state);
    format!("{}{tag}", flow_cookie_prefix(cookie_name))
}

/// `t` without its fraction of a second: the cookie keeps whole seconds, and the identity
/// handed out at login must be the one read back from the cookie.
fn whole_seconds(t: SystemTime) -> SystemTime {
    session::from_unix(session::unix(t))
}

/// 256 random bits, base64url: states and nonces.
fn random_token() -> Result<String, LoginError> {
    let bytes = cookie::random_bytes::<32>().map_err(|e| LoginError::Internal(e.to_string()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether `s` looks like a token we generated (base64url, 43 characters).
fn is_token(s: &str) -> bool {
    s.len() == 43
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Untrusted text made safe to log and show: visible ASCII and spaces, at most 200 chars.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect()
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn redirect(
    location: &str,
    cookies: impl IntoIterator<Item = HeaderValue>,
) -> Result<Response, LoginError> {
    let mut builder = http::Response::builder()
        .status(StatusCode::FOUND)
        .header(LOCATION, location)
        .header(CACHE_CONTROL, "no-store")
        .header(REFERRER_POLICY, "no-referrer");
    for c in cookies {
        builder = builder.header(SET_COOKIE, c);
    }
    builder
        .body(Bytes::new())
        .map_err(|e| LoginError::Internal(format!("redirect response: {e}")))
}

/// 401 for clients that cannot follow a login redirect.
pub fn unauthorized() -> Response {
    let mut response = http::Response::new(Bytes::from_static(b"authentication required\n"));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    let headers = response.headers_mut();
    headers.insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"nodegate\""),
    );
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Whether a request is a browser navigation that a login redirect can serve: GET or HEAD,
/// with an `Accept` that lists `text/html` (with a non-zero q). `fetch()` and XHR send `*/*`
/// by default and so get a 401 they can handle, rather than a redirect to a login page they
/// cannot display.
pub fn is_browser_navigation(method: &Method, headers: &HeaderMap) -> bool {
    if !matches!(*method, Method::GET | Method::HEAD) {
        return false;
    }
    headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            media.eq_ignore_ascii_case("text/html")
                && parts.all(|p| {
                    let p = p.trim();
                    !p.get(..2).is_some_and(|k| k.eq_ignore_ascii_case("q="))
                        || p[2..].trim().parse::<f32>().is_ok_and(|q| q > 0.0)
                })
        })
}

/// `candidate` if it is a same-origin relative path, else `/`.
///
/// Accepted: `/` alone, or `/` followed by anything but `/` or `\`, in visible ASCII, and the
/// same still holds after each round of percent-decoding (a backend or browser that decodes
/// `/%2f%2fevil` would otherwise see `//evil`, a protocol-relative URL). As a last check the
/// path, resolved against a placeholder origin, must stay on that origin.
#[must_use]
pub fn safe_return_path(candidate: &str) -> String {
    if candidate.len() <= MAX_RETURN_PATH && is_safe_return_path(candidate) {
        candidate.to_owned()
    } else {
        "/".to_owned()
    }
}

fn is_safe_return_path(s: &str) -> bool {
    fn starts_single_slash(s: &str) -> bool {
        let b = s.as_bytes();
        b.first() == Some(&b'/') && !matches!(b.get(1), Some(b'/' | b'\\'))
    }
    if !starts_single_slash(s) || !s.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
        return false;
    }
    let mut current = Cow::Borrowed(s);
    for _ in 0..3 {
        let decoded = percent_encoding::percent_decode_str(&current)
            .decode_utf8_lossy()
            .into_owned();
        if decoded == *current {
            break;
        }
        if !starts_single_slash(&decoded) || decoded.chars().any(|c| c.is_control() || c == '\\') {
            return false;
        }
        current = Cow::Owned(decoded);
    }
    let Ok(base) = Url::parse("https://nodegate.invalid/") else {
        return false;
    };
    base.join(s).is_ok_and(|u| u.origin() == base.origin())
}

fn signed_out_page(end_session: Option<&Url>) -> String {
    let provider_link = end_session.map_or_else(String::new, |u| {
        format!(
            "<p><a href=\"{}\">Also sign out of the identity provider</a></p>",
            html_escape(u.as_str())
        )
    });
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Signed out</title></head>\
         <body><h1>Signed out</h1><p>Your session has ended.</p>{provider_link}</body></html>\n"
    )
}

/// Escapes text for HTML element content and quoted attribute values (the signed-out page here,
/// the deny pages in `proxy::http::response`).
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_paths() {
        let safe = [
            "/",
            "/app",
            "/app/page?x=1&y=%2F",
            "/a/b#frag",
            "/a//b",
            "/a/%2f%2fb",
            "/%41",
        ];
        for p in safe {
            assert_eq!(safe_return_path(p), p, "{p:?} should be kept");
        }
        let evil = [
            "",
            "//evil.example",
            "/\\evil.example",
            "\\\\evil.example",
            "\\/evil.example",
            "http://evil.example",
            "https://evil.example/",
            "https:evil.example",
            "javascript:alert(1)",
            "evil.example",
            "/%2f%2fevil.example",
            "/%2F%2Fevil.example",
            "/%5cevil.example",
            "/%252f%252fevil.example",
            "/%25252f%25252fevil.example",
            "/\tevil",
            "/ evil",
            "/a\r\nSet-Cookie: x=y",
            "/%0d%0aSet-Cookie:%20x=y",
            "/\u{7f}",
            "/é",
            "/a\\b",
            "///evil.example",
        ];
        for p in evil {
            assert_eq!(safe_return_path(p), "/", "{p:?} must fall back to /");
        }
        assert_eq!(
            safe_return_path(&format!("/{}", "a".repeat(MAX_RETURN_PATH))),
            "/"
        );
    }

    #[test]
    fn browser_detection() {
        let cases: &[(&Method, &[&str], bool)] = &[
            (
                &Method::GET,
                &["text/html,application/xhtml+xml,*/*;q=0.8"],
                true,
            ),
            (&Method::HEAD, &["TEXT/HTML"], true),
            (&Method::GET, &["application/json", "text/html;q=0.5"], true),
            (&Method::GET, &["text/html;q=0"], false),
            (&Method::GET, &["text/html; q=0.0"], false),
            (&Method::GET, &["*/*"], false),
            (&Method::GET, &["application/json"], false),
            (&Method::GET, &["text/htmlx"], false),
            (&Method::GET, &[], false),
            (&Method::POST, &["text/html"], false),
        ];
        for (method, accepts, expected) in cases {
            let mut h = HeaderMap::new();
            for a in *accepts {
                h.append(ACCEPT, HeaderValue::from_str(a).unwrap());
            }
            assert_eq!(
                is_browser_navigation(method, &h),
                *expected,
                "{method} {accepts:?}"
            );
        }
    }

    #[test]
    fn unauthorized_response() {
        let r = unauthorized();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[WWW_AUTHENTICATE], "Bearer realm=\"nodegate\"");
    }

    #[test]
    fn callback_params() {
        let p = CallbackParams::parse("code=c&state=s&iss=https%3A%2F%2Fidp&other=1").unwrap();
        assert_eq!(p.code.as_deref(), Some("c"));
        assert_eq!(p.iss.as_deref(), Some("https://idp"));
        let err = CallbackParams::parse("code=a&state=s&code=b")
            .err()
            .unwrap();
        assert_eq!(err.reason(), "login_callback_invalid");
    }

    #[test]
    fn request_authority() {
        let uri: Uri = "/x".parse().unwrap();
        let mut h = HeaderMap::new();
        let ctx = |h: &HeaderMap, uri: &Uri| {
            RequestCtx {
                method: &Method::GET,
                uri,
                headers: h,
                tls: false,
            }
            .authority()
            .map(str::to_owned)
        };
        assert_eq!(ctx(&h, &uri), None);
        h.insert(HOST, HeaderValue::from_static("a.example"));
        assert_eq!(ctx(&h, &uri).as_deref(), Some("a.example"));
        let abs: Uri = "http://A.example/x".parse().unwrap();
        assert_eq!(ctx(&h, &abs).as_deref(), Some("a.example"));
        let other: Uri = "http://b.example/x".parse().unwrap();
        assert_eq!(ctx(&h, &other), None);
        h.append(HOST, HeaderValue::from_static("a.example"));
        assert_eq!(ctx(&h, &uri), None);
    }

    #[test]
    fn used_flows_are_single_use() {
        let mut used = UsedFlows::default();
        assert!(used.consume("s1", 100, 0));
        assert!(!used.consume("s1", 100, 50));
        assert!(used.consume("s2", 100, 50));
        // After its flow cookie expired the entry no longer matters (the cookie is refused).
        assert!(used.consume("s1", 300, 150));
    }

    #[test]
    fn flow_cookie_names() {
        let state = "abcdefghijklmnopqrstuvwxyz0123456789-_ABCDE";
        assert!(is_token(state));
        assert_eq!(flow_cookie_name("_ng", state), "_ng_flow_abcdefghijklmnop");
        assert!(cookie::is_valid_cookie_name(&flow_cookie_name(
            "_ng", state
        )));
        assert!(!is_token("short"));
        assert!(!is_token(&format!("{}!", "a".repeat(42))));
    }

    #[test]
    fn signed_out_page_escapes_the_link() {
        let u = Url::parse("https://idp.example/end?x=\"><script>").unwrap();
        let page = signed_out_page(Some(&u));
        assert!(!page.contains("<script>"), "{page}");
    }
}
