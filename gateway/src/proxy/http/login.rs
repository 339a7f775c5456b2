//! The login seam ([`authn::LoginFlow`]) over the browser-login module (`auth::login`): sessions
//! from cookies, the login redirect, and the reserved paths, with decision-log reason codes.
//!
//! The proxy hands over canonical targets only: the reserved-path match and the post-login
//! return path are computed from the path that policy saw, never from the raw request line.
//! Cookies are `Secure` and redirect URIs `https` when the gateway terminated TLS for the
//! request (`LoginRequest::tls`), plain otherwise.

use std::{sync::Arc, time::SystemTime};

use hyper::{
    HeaderMap, StatusCode, Uri,
    header::{self, HeaderValue},
};

use super::{
    authn::{self, LoginAnswer, LoginFuture, LoginRequest, SessionFuture, SessionLookup},
    response::{self, ProxyBody, Refusal, refusal},
};
use crate::auth::{
    Identity, IdentityKind,
    login::{self, Handled, LoginError, LoginEvent, RequestCtx},
    session::SessionIdentity,
};

/// `issuer_name` of session identities (logs, metrics).
const ISSUER_NAME: &str = "login";

/// The browser-login module behind the proxy's login seam.
pub struct BrowserLogin {
    flow: login::LoginFlow,
}

impl BrowserLogin {
    pub fn new(flow: login::LoginFlow) -> Self {
        Self { flow }
    }

    /// Discovery now, so that an unreachable provider shows up in the log at start (requests
    /// retry it on their own).
    pub async fn discover(&self) {
        match self.flow.discover().await {
            Ok(()) => {
                tracing::info!(issuer = %self.flow.settings().issuer(), "login provider discovered");
            }
            Err(err) => tracing::warn!(
                issuer = %self.flow.settings().issuer(),
                reason = err.reason(),
                error = %err,
                "login provider not reachable yet; browser logins fail until it is"
            ),
        }
    }

    fn clear_cookie(&self, tls: bool) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(clear) = self.flow.sessions().clear_cookie(tls) {
            headers.append(header::SET_COOKIE, clear);
        }
        headers
    }
}

/// The absolute URI of a request (`http://host/target`), so that the login module sees the
/// host the proxy checked even for HTTP/2, where it is not in a `Host` header.
fn request_uri(req: &LoginRequest<'_>) -> Uri {
    req.host
        .and_then(|h| {
            let scheme = if req.tls { "https" } else { "http" };
            format!("{scheme}://{h}{}", req.target).parse().ok()
        })
        .or_else(|| req.target.parse().ok())
        .unwrap_or_else(|| Uri::from_static("/"))
}

/// A verified session as the proxy's identity.
fn identity(session: &SessionIdentity) -> Identity {
    Identity {
        kind: IdentityKind::User,
        subject: session.subject.clone(),
        email: session.email.clone(),
        groups: session.groups.clone(),
        issuer: session.issuer.clone(),
        issuer_name: ISSUER_NAME.to_owned(),
        claims: session.claims.clone(),
        workload: None,
        expires_at: Some(session.expires_at),
    }
}

fn answer(response: login::Response) -> hyper::Response<ProxyBody> {
    response.map(response::full)
}

/// A refused login step: its deny page and reason code.
fn refused(req: &LoginRequest<'_>, err: &LoginError) -> LoginAnswer {
    let reason = err.reason();
    match err {
        LoginError::ProviderUnavailable { .. }
        | LoginError::HostNotAllowed(_)
        | LoginError::CodeExchangeFailed(_)
        | LoginError::IdTokenInvalid(_)
        | LoginError::IssuerMismatch(_)
        | LoginError::SessionTooLarge { .. }
        | LoginError::Internal(_) => {
            // Something an operator has to fix (or know about).
            tracing::warn!(service = req.service, reason, error = %err, "browser login refused");
        }
        _ => tracing::info!(service = req.service, reason, error = %err, "browser login refused"),
    }
    LoginAnswer {
        response: refusal(Refusal {
            status: err.status(),
            reason,
            request_id: req.request_id,
            html: req.html,
        }),
        allowed: false,
        reason,
        identity: None,
    }
}

impl authn::LoginFlow for BrowserLogin {
    fn session<'a>(
        &'a self,
        _service: &'a str,
        headers: &'a HeaderMap,
        tls: bool,
    ) -> SessionFuture<'a> {
        Box::pin(async move {
            let method = hyper::Method::GET;
            let uri = Uri::from_static("/");
            let ctx = RequestCtx {
                method: &method,
                uri: &uri,
                headers,
                tls,
            };
            match self.flow.authenticate(&ctx, SystemTime::now()).await {
                Ok(None) => SessionLookup::NoSession,
                Ok(Some(auth)) => {
                    let mut response_headers = HeaderMap::new();
                    if let Some(cookie) = auth.set_cookie {
                        response_headers.append(header::SET_COOKIE, cookie);
                    }
                    SessionLookup::Valid {
                        identity: Arc::new(identity(&auth.identity)),
                        response_headers,
                    }
                }
                Err(err) => {
                    tracing::debug!(reason = err.reason(), error = %err, "session cookie refused");
                    SessionLookup::Refused {
                        reason: err.reason(),
                        response_headers: self.clear_cookie(tls),
                    }
                }
            }
        })
    }

    fn start<'a>(&'a self, req: LoginRequest<'a>) -> LoginFuture<'a> {
        Box::pin(async move {
            let uri = request_uri(&req);
            let ctx = RequestCtx {
                method: req.method,
                uri: &uri,
                headers: req.headers,
                tls: req.tls,
            };
            match self.flow.start(&ctx, req.target, SystemTime::now()).await {
                Ok(response) => LoginAnswer {
                    response: answer(response),
                    allowed: true,
                    reason: "login_start",
                    identity: None,
                },
                Err(err) => refused(&req, &err),
            }
        })
    }

    fn reserved<'a>(&'a self, req: LoginRequest<'a>) -> LoginFuture<'a> {
        Box::pin(async move {
            let uri = request_uri(&req);
            let ctx = RequestCtx {
                method: req.method,
                uri: &uri,
                headers: req.headers,
                tls: req.tls,
            };
            match self.flow.handle(&ctx, SystemTime::now()).await {
                None => LoginAnswer {
                    response: refusal(Refusal {
                        status: StatusCode::NOT_FOUND,
                        reason: "reserved_path",
                        request_id: req.request_id,
                        html: req.html,
                    }),
                    allowed: false,
                    reason: "reserved_path",
                    identity: None,
                },
                Some(Ok(Handled { event, response })) => {
                    let (reason, who) = match event {
                        LoginEvent::Started => ("login_start", None),
                        LoginEvent::LoggedIn(id) => ("login_callback", Some(id)),
                        LoginEvent::LoggedOut(id) => ("login_logout", id),
                    };
                    let mut response = answer(response);
                    // Never cached, never framed: these answers carry cookies and redirects.
                    response
                        .headers_mut()
                        .entry(header::CACHE_CONTROL)
                        .or_insert(HeaderValue::from_static("no-store"));
                    LoginAnswer {
                        response,
                        allowed: true,
                        reason,
                        identity: who.map(|id| Arc::new(identity(&id))),
                    }
                }
                Some(Err(err)) => refused(&req, &err),
            }
        })
    }

    fn strip_cookies(&self, headers: &mut HeaderMap) {
        self.flow.strip_cookies(headers);
    }
}
