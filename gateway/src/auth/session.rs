//! Browser sessions: the sealed session cookie, its server-side revocation, and refresh.
//!
//! The cookie carries the whole session (identity, expiry, the provider's refresh token), sealed
//! with a key derived from the cookie secret. Any node that shares the secret can therefore
//! authenticate and refresh the session without a shared store; what is kept in memory is only
//! what must be: the ids of signed-out sessions (until the cookies they were in have expired)
//! and the in-flight refreshes, so that one session is refreshed once however many requests
//! arrive together.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderMap;
use http::header::HeaderValue;
use openidconnect::RefreshToken;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::cookie::{self, CookieAttributes, CookieError, CookieKeys, Purpose};

/// Signed-out sessions remembered at most; see [`RevocationList::insert`] for what happens
/// beyond. 24 bytes of payload each, so the bound is a few MiB.
const MAX_REVOKED: usize = 100_000;
/// Refresh results kept at most (one per session in its refresh window).
const MAX_REFRESH_SLOTS: usize = 65_536;
/// After a refresh failed because the provider could not be reached, requests keep using the
/// still-valid session and a new attempt is made no sooner than this.
const REFRESH_RETRY_AFTER: Duration = Duration::from_secs(10);

/// A session's random 128-bit id: the unit of revocation, and the id in the decision log.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId([u8; 16]);

impl SessionId {
    /// # Errors
    ///
    /// `Random` when the operating system has no randomness to give.
    pub fn generate() -> Result<Self, CookieError> {
        cookie::random_bytes().map(Self)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| serde::de::Error::custom("session id is not base64url"))?;
        <[u8; 16]>::try_from(bytes.as_slice())
            .map(Self)
            .map_err(|_| serde::de::Error::custom("session id is not 16 bytes"))
    }
}

/// Who the browser is, as established at login (and updated by refreshes).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SessionIdentity {
    pub session_id: SessionId,
    pub issuer: String,
    pub subject: String,
    pub email: Option<String>,
    pub email_verified: Option<bool>,
    pub name: Option<String>,
    pub preferred_username: Option<String>,
    pub groups: Vec<String>,
    /// The ID token's other claims (not the standard ones above, nor the token plumbing such as
    /// `aud`, `nonce` or `exp`), for policies that match on a claim.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// When the user logged in at the provider (`auth_time`, else when the session began).
    pub login_at: SystemTime,
    /// When this session stops being accepted unless refreshed.
    pub expires_at: SystemTime,
}

/// A session: the identity plus what is needed to refresh it.
#[derive(Clone, Debug)]
pub struct Session {
    pub identity: SessionIdentity,
    /// `RefreshToken`'s `Debug` prints `[redacted]`.
    refresh_token: Option<RefreshToken>,
}

impl Session {
    #[must_use]
    pub fn new(identity: SessionIdentity, refresh_token: Option<RefreshToken>) -> Self {
        Self {
            identity,
            refresh_token,
        }
    }

    #[must_use]
    pub fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
}

/// The sealed form. Short keys: the cookie must stay under ~4 KiB with all of a user's groups.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionWire {
    sid: SessionId,
    iss: String,
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    em: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ev: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pu: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    grp: Vec<String>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    clm: serde_json::Map<String, serde_json::Value>,
    lat: u64,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rt: Option<String>,
}

impl From<&Session> for SessionWire {
    fn from(s: &Session) -> Self {
        let i = &s.identity;
        Self {
            sid: i.session_id,
            iss: i.issuer.clone(),
            sub: i.subject.clone(),
            em: i.email.clone(),
            ev: i.email_verified,
            nm: i.name.clone(),
            pu: i.preferred_username.clone(),
            grp: i.groups.clone(),
            clm: i.claims.clone(),
            lat: unix(i.login_at),
            exp: unix(i.expires_at),
            rt: s.refresh_token.as_ref().map(|t| t.secret().clone()),
        }
    }
}

impl From<SessionWire> for Session {
    fn from(w: SessionWire) -> Self {
        Self {
            identity: SessionIdentity {
                session_id: w.sid,
                issuer: w.iss,
                subject: w.sub,
                email: w.em,
                email_verified: w.ev,
                name: w.nm,
                preferred_username: w.pu,
                groups: w.grp,
                claims: w.clm,
                login_at: from_unix(w.lat),
                expires_at: from_unix(w.exp),
            },
            refresh_token: w.rt.map(RefreshToken::new),
        }
    }
}

/// Seconds since the epoch; a time before it (a broken clock) counts as 0.
#[must_use]
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The time `secs` after the epoch. One past what `SystemTime` holds (only a sealed value of
/// our own could carry it) is the epoch itself: as an expiry it has passed, so it fails closed
/// instead of panicking.
#[must_use]
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH)
}

/// Why a session cookie was not accepted. The reason codes go to the decision log.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error(
        "the session cookie is not valid ({0}); it was tampered with, or sealed with another cookie secret"
    )]
    Invalid(&'static str),
    #[error("the session expired at {} (unix seconds)", unix(*.0))]
    Expired(SystemTime),
    #[error("session {0} was signed out; the cookie is no longer accepted")]
    Revoked(SessionId),
    #[error("the identity provider refused to refresh the session: {0}")]
    RefreshRejected(String),
}

impl SessionError {
    /// A stable reason code for logs and deny pages.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "session_invalid",
            Self::Expired(_) => "session_expired",
            Self::Revoked(_) => "session_revoked",
            Self::RefreshRejected(_) => "session_refresh_failed",
        }
    }
}

/// The outcome of a refresh attempt, as the refresher reports it.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The provider answered and said no (`invalid_grant`: token revoked, user disabled), or
    /// its answer failed verification. The session must not be used any more.
    #[error("{0}")]
    Rejected(String),
    /// The provider could not be asked (network, timeout, 5xx). The session stays usable until
    /// it expires, and the refresh is retried.
    #[error("{0}")]
    Unavailable(String),
}

/// Exchanges a session's refresh token for a renewed session. Implemented by the login flow;
/// a trait so that the session logic can be tested without a provider.
pub trait Refresher: Sync {
    fn refresh(
        &self,
        session: &Session,
        now: SystemTime,
    ) -> impl Future<Output = Result<Session, RefreshError>> + Send;
}

/// An authenticated request.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub identity: SessionIdentity,
    /// A renewed session cookie to add to the response (`Set-Cookie`), after a refresh.
    pub set_cookie: Option<HeaderValue>,
}

#[derive(Clone)]
enum RefreshOutcome {
    Refreshed {
        session: Arc<Session>,
        sealed: Arc<str>,
    },
    Rejected(Arc<str>),
    /// The provider could not be reached; the reason was logged when it happened.
    Unavailable,
}

/// One refresh of one session cookie: every request carrying that cookie while the refresh
/// runs waits for it, and requests that still carry the old cookie afterwards (sent before the
/// browser stored the new one) get the same result instead of spending the refresh token
/// again, which a provider that rotates refresh tokens would refuse.
struct RefreshSlot {
    outcome: OnceCell<RefreshOutcome>,
    created: SystemTime,
}

/// Sessions signed out on this node, until the cookies that could carry them have expired.
#[derive(Default)]
struct RevocationList {
    until: HashMap<SessionId, u64>,
}

impl RevocationList {
    fn insert(&mut self, id: SessionId, until: u64, now: u64) {
        if self.until.len() >= MAX_REVOKED {
            self.until.retain(|_, u| *u > now);
        }
        if self.until.len() >= MAX_REVOKED {
            // Still full of live entries. Forget the one that expires first: its cookie is the
            // nearest to being refused anyway. Refusing the sign-out instead would leave the
            // user unable to end their session.
            if let Some(oldest) = self
                .until
                .iter()
                .min_by_key(|(_, u)| **u)
                .map(|(id, _)| *id)
            {
                self.until.remove(&oldest);
                tracing::warn!(
                    max = MAX_REVOKED,
                    "revocation list full; the signed-out session expiring first is forgotten"
                );
            }
        }
        self.until.insert(id, until);
    }

    fn contains(&self, id: &SessionId, now: u64) -> bool {
        self.until.get(id).is_some_and(|u| *u > now)
    }
}

/// Issues, reads, revokes and refreshes session cookies.
pub struct Sessions {
    keys: Arc<CookieKeys>,
    cookie_name: String,
    issuer: String,
    ttl: Duration,
    refresh_skew: Duration,
    revoked: Mutex<RevocationList>,
    refreshing: Mutex<HashMap<(SessionId, u64), Arc<RefreshSlot>>>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("cookie_name", &self.cookie_name)
            .field("issuer", &self.issuer)
            .field("ttl", &self.ttl)
            .field("refresh_skew", &self.refresh_skew)
            .finish_non_exhaustive()
    }
}

impl Sessions {
    #[must_use]
    pub fn new(
        keys: Arc<CookieKeys>,
        cookie_name: String,
        issuer: String,
        ttl: Duration,
        refresh_skew: Duration,
    ) -> Self {
        Self {
            keys,
            cookie_name,
            issuer,
            ttl,
            refresh_skew,
            revoked: Mutex::new(RevocationList::default()),
            refreshing: Mutex::new(HashMap::new()),
        }
    }

    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// How long a new or refreshed session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Seals `session` into a cookie value.
    ///
    /// # Errors
    ///
    /// `TooLarge` when the session does not fit in a cookie.
    ///
    /// # Panics
    ///
    /// Never: the session holds only strings, numbers and JSON values.
    pub fn seal(&self, session: &Session) -> Result<String, CookieError> {
        // Invariant: SessionWire holds strings, numbers and JSON values only, which serde_json
        // always serializes.
        // The plaintext holds the refresh token: wiped once sealed.
        let json = zeroize::Zeroizing::new(
            serde_json::to_vec(&SessionWire::from(session))
                .expect("a session always serializes to JSON"),
        );
        self.keys.seal(Purpose::Session, &json)
    }

    /// The `Set-Cookie` value for a sealed session. The cookie lives as long as the session.
    pub fn set_cookie(
        &self,
        sealed: &str,
        tls: bool,
        session: &Session,
        now: SystemTime,
    ) -> Option<HeaderValue> {
        let max_age = unix(session.identity.expires_at).saturating_sub(unix(now));
        cookie::set_cookie(
            &self.cookie_name,
            sealed,
            CookieAttributes {
                path: "/",
                secure: tls,
                max_age: Some(max_age),
            },
        )
        .ok()
    }

    /// The `Set-Cookie` value that deletes the session cookie.
    pub fn clear_cookie(&self, tls: bool) -> Option<HeaderValue> {
        cookie::clear_cookie(&self.cookie_name, "/", tls).ok()
    }

    /// Decrypts the session cookie without judging it (expired and revoked sessions included):
    /// for sign-out, which must work on any session this gateway issued.
    pub fn peek(&self, headers: &HeaderMap) -> Option<Session> {
        let plaintext = self
            .keys
            .open_named(Purpose::Session, headers, &self.cookie_name)
            .ok()??;
        serde_json::from_slice::<SessionWire>(&plaintext)
            .ok()
            .map(Session::from)
    }

    /// The request's session if it has a valid one; `Ok(None)` when it has no session cookie.
    ///
    /// # Errors
    ///
    /// When a session cookie is present but not acceptable: see [`SessionError`].
    pub fn read(
        &self,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> Result<Option<Session>, SessionError> {
        let plaintext = match self
            .keys
            .open_named(Purpose::Session, headers, &self.cookie_name)
        {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(CookieError::UnknownVersion(_)) => {
                return Err(SessionError::Invalid("sealed in an unknown format version"));
            }
            Err(_) => return Err(SessionError::Invalid("does not decrypt")),
        };
        let session = Session::from(
            serde_json::from_slice::<SessionWire>(&plaintext)
                .map_err(|_| SessionError::Invalid("unexpected content"))?,
        );
        // The same secret may outlive a change of provider; a session from the old one is not
        // an identity of the new one.
        if session.identity.issuer != self.issuer {
            return Err(SessionError::Invalid(
                "issued for another identity provider",
            ));
        }
        let now_s = unix(now);
        if self.is_revoked(&session.identity.session_id, now) {
            return Err(SessionError::Revoked(session.identity.session_id));
        }
        if unix(session.identity.expires_at) <= now_s {
            return Err(SessionError::Expired(session.identity.expires_at));
        }
        Ok(Some(session))
    }

    /// Signs a session out on this node: its cookie is refused from now on, and a refresh can
    /// no longer revive it.
    pub fn revoke(&self, id: SessionId, now: SystemTime) {
        // Any cookie carrying `id` was issued at or before `now`, so it expires by now + ttl.
        // The minute on top covers clock differences between nodes.
        let until = unix(now) + self.ttl.as_secs() + 60;
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, until, unix(now));
    }

    pub fn is_revoked(&self, id: &SessionId, now: SystemTime) -> bool {
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id, unix(now))
    }

    /// Authenticates a request by its session cookie.
    ///
    /// `Ok(None)`: no session cookie, the request is anonymous. In the last `refresh_skew`
    /// before expiry, a session with a refresh token is refreshed first (once per session, see
    /// [`RefreshSlot`]) and the renewed cookie is returned for the response. `tls` says whether
    /// the request came over TLS (the renewed cookie is then `Secure`).
    ///
    /// # Errors
    ///
    /// When a session cookie is present but not acceptable, or its refresh was refused.
    pub async fn authenticate<R: Refresher>(
        &self,
        headers: &HeaderMap,
        tls: bool,
        now: SystemTime,
        refresher: &R,
    ) -> Result<Option<Authenticated>, SessionError> {
        let Some(session) = self.read(headers, now)? else {
            return Ok(None);
        };
        let expires = unix(session.identity.expires_at);
        let in_window = unix(now).saturating_add(self.refresh_skew.as_secs()) >= expires;
        if !in_window || session.refresh_token.is_none() {
            return Ok(Some(Authenticated {
                identity: session.identity,
                set_cookie: None,
            }));
        }

        let key = (session.identity.session_id, expires);
        let slot = self.refresh_slot(key, now);
        let outcome = slot
            .outcome
            .get_or_init(|| self.run_refresh(&session, now, refresher))
            .await
            .clone();
        match outcome {
            RefreshOutcome::Refreshed { session, sealed } => Ok(Some(Authenticated {
                set_cookie: self.set_cookie(&sealed, tls, &session, now),
                identity: session.identity.clone(),
            })),
            RefreshOutcome::Rejected(why) => Err(SessionError::RefreshRejected(why.to_string())),
            RefreshOutcome::Unavailable => {
                if now
                    .duration_since(slot.created)
                    .is_ok_and(|age| age >= REFRESH_RETRY_AFTER)
                {
                    let mut slots = self
                        .refreshing
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    if slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                        slots.remove(&key);
                    }
                }
                Ok(Some(Authenticated {
                    identity: session.identity,
                    set_cookie: None,
                }))
            }
        }
    }

    fn refresh_slot(&self, key: (SessionId, u64), now: SystemTime) -> Arc<RefreshSlot> {
        let mut slots = self
            .refreshing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(&key) {
            return Arc::clone(slot);
        }
        let fresh = Arc::new(RefreshSlot {
            outcome: OnceCell::new(),
            created: now,
        });
        if slots.len() >= MAX_REFRESH_SLOTS {
            // A slot is useless once the cookie it was for has expired.
            let now_s = unix(now);
            slots.retain(|(_, expires), _| *expires > now_s);
        }
        if slots.len() < MAX_REFRESH_SLOTS {
            slots.insert(key, Arc::clone(&fresh));
        } else {
            tracing::warn!(
                max = MAX_REFRESH_SLOTS,
                "too many sessions refreshing at once; this refresh is not shared"
            );
        }
        fresh
    }

    async fn run_refresh<R: Refresher>(
        &self,
        session: &Session,
        now: SystemTime,
        refresher: &R,
    ) -> RefreshOutcome {
        let id = session.identity.session_id;
        match refresher.refresh(session, now).await {
            Ok(renewed) => {
                if renewed.identity.session_id != id
                    || renewed.identity.subject != session.identity.subject
                    || renewed.identity.issuer != session.identity.issuer
                {
                    return RefreshOutcome::Rejected(
                        "the refreshed session is for another user".into(),
                    );
                }
                match self.seal(&renewed) {
                    Ok(sealed) => {
                        tracing::debug!(session = %id, "session refreshed");
                        RefreshOutcome::Refreshed {
                            session: Arc::new(renewed),
                            sealed: sealed.into(),
                        }
                    }
                    Err(e) => RefreshOutcome::Rejected(e.to_string().into()),
                }
            }
            Err(RefreshError::Rejected(why)) => {
                tracing::info!(session = %id, %why, "session refresh refused");
                RefreshOutcome::Rejected(why.into())
            }
            Err(RefreshError::Unavailable(why)) => {
                tracing::warn!(session = %id, %why, "session refresh failed; the session is kept until it expires");
                RefreshOutcome::Unavailable
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::header::COOKIE;

    use super::*;
    use cookie::CookieSecret;

    const ISS: &str = "https://idp.example.com";
    const T0: u64 = 1_800_000_000;

    fn sessions(secret: u8) -> Sessions {
        let keys = CookieKeys::new(&CookieSecret::new(vec![secret; 32]).unwrap());
        Sessions::new(
            Arc::new(keys),
            "_ng".into(),
            ISS.into(),
            Duration::from_secs(600),
            Duration::from_secs(60),
        )
    }

    fn session(refresh: bool) -> Session {
        Session::new(
            SessionIdentity {
                session_id: SessionId::generate().unwrap(),
                issuer: ISS.into(),
                subject: "alice".into(),
                email: Some("alice@example.test".into()),
                email_verified: Some(true),
                name: None,
                preferred_username: None,
                groups: vec!["devs".into()],
                claims: serde_json::Map::new(),
                login_at: from_unix(T0),
                expires_at: from_unix(T0 + 600),
            },
            refresh.then(|| RefreshToken::new("rt-1".into())),
        )
    }

    fn cookie_headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("_ng={value}")).unwrap(),
        );
        h
    }

    /// Counts calls; renews with a new expiry unless told to fail.
    struct FakeRefresher {
        calls: AtomicUsize,
        fail: Option<bool>,
    }

    impl Refresher for FakeRefresher {
        async fn refresh(
            &self,
            session: &Session,
            now: SystemTime,
        ) -> Result<Session, RefreshError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            // Let concurrent callers pile up on the slot.
            tokio::time::sleep(Duration::from_millis(20)).await;
            match self.fail {
                Some(true) => Err(RefreshError::Rejected("invalid_grant".into())),
                Some(false) => Err(RefreshError::Unavailable("timeout".into())),
                None => {
                    let mut renewed = session.clone();
                    renewed.identity.expires_at = now + Duration::from_secs(600);
                    renewed.refresh_token = Some(RefreshToken::new("rt-2".into()));
                    Ok(renewed)
                }
            }
        }
    }

    fn refresher(fail: Option<bool>) -> FakeRefresher {
        FakeRefresher {
            calls: AtomicUsize::new(0),
            fail,
        }
    }

    #[tokio::test]
    async fn valid_expired_revoked() {
        let s = sessions(1);
        let sess = session(false);
        let h = cookie_headers(&s.seal(&sess).unwrap());
        let r = refresher(None);
        let ok = s
            .authenticate(&h, false, from_unix(T0 + 10), &r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ok.identity, sess.identity);
        assert!(ok.set_cookie.is_none());
        assert_eq!(
            s.authenticate(&h, false, from_unix(T0 + 600), &r)
                .await
                .unwrap_err()
                .reason(),
            "session_expired"
        );
        s.revoke(sess.identity.session_id, from_unix(T0 + 20));
        assert_eq!(
            s.authenticate(&h, false, from_unix(T0 + 30), &r)
                .await
                .unwrap_err()
                .reason(),
            "session_revoked"
        );
        // Without a refresh token, the window changes nothing.
        assert_eq!(r.calls.load(Ordering::SeqCst), 0);
        assert!(
            s.authenticate(&HeaderMap::new(), false, from_unix(T0), &r)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn invalid_cookies() {
        let s = sessions(1);
        let sealed = s.seal(&session(false)).unwrap();
        let other = sessions(2);
        let r = refresher(None);
        let now = from_unix(T0);
        for value in [
            "",
            "x",
            &sealed[..sealed.len() - 1],
            &format!("{sealed}A"),
            &other.seal(&session(false)).unwrap(),
        ] {
            let err = s
                .authenticate(&cookie_headers(value), false, now, &r)
                .await
                .unwrap_err();
            assert_eq!(err.reason(), "session_invalid", "{value:?}");
        }
        let foreign = Sessions::new(
            Arc::clone(&s.keys),
            "_ng".into(),
            "https://other.example.com".into(),
            Duration::from_secs(600),
            Duration::from_secs(60),
        );
        let err = foreign
            .authenticate(&cookie_headers(&sealed), false, now, &r)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            SessionError::Invalid("issued for another identity provider")
        );
    }

    #[tokio::test]
    async fn refresh_is_single_flight_and_reused_by_stale_cookies() {
        let s = Arc::new(sessions(1));
        let sess = session(true);
        let h = cookie_headers(&s.seal(&sess).unwrap());
        let r = Arc::new(refresher(None));
        let now = from_unix(T0 + 570);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (s, h, r) = (Arc::clone(&s), h.clone(), Arc::clone(&r));
            tasks.push(tokio::spawn(async move {
                s.authenticate(&h, true, now, &*r).await.unwrap().unwrap()
            }));
        }
        for t in tasks {
            let a = t.await.unwrap();
            assert_eq!(a.identity.expires_at, from_unix(T0 + 570 + 600));
            let cookie = a.set_cookie.unwrap();
            let cookie = cookie.to_str().unwrap();
            assert!(cookie.starts_with("_ng="), "{cookie}");
            assert!(
                cookie.ends_with("; Path=/; HttpOnly; SameSite=Lax; Max-Age=600; Secure"),
                "{cookie}"
            );
        }
        // A request sent with the old cookie after the refresh gets the same renewal.
        let late = s
            .authenticate(&h, false, from_unix(T0 + 580), &*r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(late.identity.expires_at, from_unix(T0 + 570 + 600));
        assert_eq!(r.calls.load(Ordering::SeqCst), 1);
        // The renewed cookie carries the rotated refresh token.
        let renewed_value = late
            .set_cookie
            .unwrap()
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()[4..]
            .to_owned();
        let renewed = s
            .read(&cookie_headers(&renewed_value), from_unix(T0 + 580))
            .unwrap()
            .unwrap();
        assert_eq!(renewed.refresh_token().unwrap().secret(), "rt-2");
    }

    #[tokio::test]
    async fn refresh_rejected_ends_the_session_unavailable_keeps_it() {
        let s = sessions(1);
        let h = cookie_headers(&s.seal(&session(true)).unwrap());
        let now = from_unix(T0 + 570);
        let err = s
            .authenticate(&h, false, now, &refresher(Some(true)))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "session_refresh_failed");

        let s = sessions(1);
        let h = cookie_headers(&s.seal(&session(true)).unwrap());
        let r = refresher(Some(false));
        let a = s.authenticate(&h, false, now, &r).await.unwrap().unwrap();
        assert!(a.set_cookie.is_none());
        // Within the back-off the failure is reused; after it, the refresh is tried again.
        s.authenticate(&h, false, from_unix(T0 + 575), &r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.calls.load(Ordering::SeqCst), 1);
        s.authenticate(&h, false, from_unix(T0 + 585), &r)
            .await
            .unwrap()
            .unwrap();
        s.authenticate(&h, false, from_unix(T0 + 586), &r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn revocation_list_is_bounded() {
        let mut list = RevocationList::default();
        let ids: Vec<_> = (0..=MAX_REVOKED)
            .map(|_| SessionId::generate().unwrap())
            .collect();
        for (i, id) in ids.iter().enumerate() {
            list.insert(*id, 1_000 + i as u64, 0);
        }
        assert_eq!(list.until.len(), MAX_REVOKED);
        assert!(
            !list.contains(&ids[0], 0),
            "the entry expiring first is dropped"
        );
        assert!(list.contains(&ids[MAX_REVOKED], 0));
        // Expired entries are pruned before anything live is dropped.
        list.insert(SessionId::generate().unwrap(), 5_000_000, 2_000_000);
        assert_eq!(list.until.len(), 1);
    }

    #[test]
    fn times_past_what_systemtime_holds_are_the_epoch_not_a_panic() {
        assert_eq!(from_unix(u64::MAX), UNIX_EPOCH);
        assert_eq!(unix(from_unix(T0)), T0);
    }

    #[test]
    fn session_id_serde() {
        let id = SessionId::generate().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SessionId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SessionId>("\"AAAA\"").is_err());
    }
}
