//! The authentication step of the request path, and the seam for browser login.
//!
//! In order: a bearer token (`Authorization: Bearer`, verified by [`Authenticator`]) → a
//! session cookie (the login module, when configured) → anonymous. A token that is present but
//! refused is a denial with its reason code, never a fallback to anonymous: otherwise an expired
//! admin token would quietly become whatever anonymous callers may do.

use std::{future::Future, pin::Pin, sync::Arc};

use arc_swap::ArcSwap;
use hyper::{HeaderMap, Method, Response, header};

use super::response::ProxyBody;
use crate::{
    auth::{self, AuthError, Authenticator, Identity, IdentityKind},
    policy,
};

/// The live authenticator; swapped whole when the `auth` section changes.
pub type SharedAuth = Arc<ArcSwap<Authenticator>>;

/// The answer of the login seam (a login started, a reserved path served), as a future.
pub type LoginFuture<'a> = Pin<Box<dyn Future<Output = LoginAnswer> + Send + 'a>>;
/// The session lookup of the login seam (async: a session may be refreshed at the `IdP`).
pub type SessionFuture<'a> = Pin<Box<dyn Future<Output = SessionLookup> + Send + 'a>>;

/// What a request's session cookie says.
#[derive(Debug)]
pub enum SessionLookup {
    /// No session cookie.
    NoSession,
    /// A valid session; `response_headers` (e.g. a refreshed `Set-Cookie`) are appended to
    /// whatever response the request gets.
    Valid {
        identity: Arc<Identity>,
        response_headers: HeaderMap,
    },
    /// A session cookie that is present but refused (tampered, expired, logged out): the
    /// request is treated as unauthenticated (a new login) and `reason` is logged;
    /// `response_headers` may clear the cookie.
    Refused {
        reason: &'static str,
        response_headers: HeaderMap,
    },
}

/// Paths on every protected host that belong to the gateway, not the backend.
pub const CALLBACK_PATH: &str = "/.nodegate/callback";
pub const LOGOUT_PATH: &str = "/.nodegate/logout";
/// Starts a login explicitly (`?rd=<same-origin path>`).
pub const LOGIN_PATH: &str = "/.nodegate/login";
/// Prefix of the reserved paths: never forwarded.
pub const RESERVED_PREFIX: &str = "/.nodegate/";

/// A request as the login seam sees it: canonicalized, its `Host` checked against the
/// service, gateway-owned headers removed.
#[derive(Debug, Clone, Copy)]
pub struct LoginRequest<'a> {
    pub service: &'a str,
    pub method: &'a Method,
    /// The request's host (`Host`, or the authority of an absolute or HTTP/2 target).
    pub host: Option<&'a str>,
    /// The canonical origin-form target: path (re-encoded) and query.
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// For the deny page of a refused login step.
    pub request_id: &'a str,
    pub html: bool,
    /// The client connection is TLS (terminated by the gateway): `https` redirects, `Secure`
    /// cookies.
    pub tls: bool,
}

/// What the login seam answered, and what the decision line says about it.
#[derive(Debug)]
pub struct LoginAnswer {
    pub response: Response<ProxyBody>,
    /// `true` for a login step that went through (`login_start`, `login_callback`,
    /// `login_logout`); `false` for a refused one (its `login_*` reason code, a 404 for an
    /// unknown reserved path).
    pub allowed: bool,
    pub reason: &'static str,
    /// Who logged in (callback) or out (logout), for the decision line.
    pub identity: Option<Arc<Identity>>,
}

/// Browser login (OIDC authorization code + PKCE, encrypted session cookies): implemented by
/// `proxy::http::login` over the login module (`auth::login`, `auth::session`), handed to the
/// proxy when the config has a `login:` section. Only services with `http.login: true` use it
/// for sessions and login redirects; its cookies are removed from every forwarded request.
pub trait LoginFlow: Send + Sync + 'static {
    /// The session of a request without a bearer token, from its cookies; `tls`: the client
    /// connection is TLS (a renewed cookie is then `Secure`).
    fn session<'a>(
        &'a self,
        service: &'a str,
        headers: &'a HeaderMap,
        tls: bool,
    ) -> SessionFuture<'a>;

    /// The response that starts a login for a browser request that policy denied for lack of
    /// an identity: normally a 302 to the identity provider that comes back to `req.target`.
    fn start<'a>(&'a self, req: LoginRequest<'a>) -> LoginFuture<'a>;

    /// Serves every path under [`RESERVED_PREFIX`] of a service with `login: true`:
    /// [`CALLBACK_PATH`], [`LOGOUT_PATH`], [`LOGIN_PATH`], and a 404 for anything else. Without
    /// a login module (or for a service without `login`), the proxy answers 404 itself.
    fn reserved<'a>(&'a self, req: LoginRequest<'a>) -> LoginFuture<'a>;

    /// Removes the gateway's own cookies (session, login flow) from a request before it is
    /// forwarded: they are the gateway's credentials, not the backend's.
    fn strip_cookies(&self, headers: &mut HeaderMap);
}

/// The outcome of authentication.
#[derive(Debug, Clone)]
pub enum Authn {
    /// `via`: `bearer` or `session`.
    Authenticated {
        identity: Arc<Identity>,
        via: &'static str,
    },
    /// No credential. `session_refused`: a session cookie was there but refused.
    Anonymous {
        session_refused: Option<&'static str>,
    },
    /// A bearer token was presented and refused.
    Refused(AuthError),
}

impl Authn {
    pub fn identity(&self) -> Option<&Identity> {
        self.shared_identity().map(AsRef::as_ref)
    }

    /// The identity as the request holds it (shared, e.g. with its decision line).
    pub fn shared_identity(&self) -> Option<&Arc<Identity>> {
        match self {
            Self::Authenticated { identity, .. } => Some(identity),
            _ => None,
        }
    }
}

/// Runs the chain on a request's headers (one `Authorization` at most: checked before).
/// Returns the outcome and the headers the login module wants on the response.
pub async fn authenticate(
    auth: &Authenticator,
    login: Option<&dyn LoginFlow>,
    service: &str,
    headers: &HeaderMap,
    tls: bool,
) -> (Authn, HeaderMap) {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let token = value
            .to_str()
            .map_err(|_| AuthError::Malformed {
                why: "Authorization is not visible ASCII",
            })
            .and_then(auth::parse_bearer);
        let result = match token {
            Ok(token) => auth.authenticate(token).await,
            Err(err) => Err(err),
        };
        let authn = match result {
            Ok(identity) => Authn::Authenticated {
                identity,
                via: "bearer",
            },
            Err(err) => Authn::Refused(err),
        };
        return (authn, HeaderMap::new());
    }
    if let Some(login) = login {
        match login.session(service, headers, tls).await {
            SessionLookup::NoSession => {}
            SessionLookup::Valid {
                identity,
                response_headers,
            } => {
                let authn = Authn::Authenticated {
                    identity,
                    via: "session",
                };
                return (authn, response_headers);
            }
            SessionLookup::Refused {
                reason,
                response_headers,
            } => {
                let authn = Authn::Anonymous {
                    session_refused: Some(reason),
                };
                return (authn, response_headers);
            }
        }
    }
    let authn = Authn::Anonymous {
        session_refused: None,
    };
    (authn, HeaderMap::new())
}

/// The policy's view of an authenticated identity (or anonymous), borrowed from it: a cached
/// token's identity is read in place, not copied for every request.
pub fn policy_identity(identity: Option<&Identity>) -> policy::IdentityRef<'_> {
    let Some(id) = identity else {
        return policy::IdentityRef::anonymous();
    };
    policy::IdentityRef {
        kind: match id.kind {
            IdentityKind::User => policy::IdentityKind::User,
            IdentityKind::Workload => policy::IdentityKind::Workload,
            IdentityKind::Anonymous => policy::IdentityKind::Anonymous,
        },
        subject: (!id.subject.is_empty()).then_some(id.subject.as_str()),
        email: id.email.as_deref(),
        groups: &id.groups,
        issuer: (!id.issuer.is_empty()).then_some(id.issuer.as_str()),
        claims: &id.claims,
    }
}
