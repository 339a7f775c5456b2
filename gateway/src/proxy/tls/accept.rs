//! The TLS side of an accepted connection to a service with `tls:`: the `ClientHello` is read
//! first (rustls' lazy acceptor), its SNI picks the service and so the certificate, the client
//! CA and the policy; then the handshake, then the decrypted stream goes to the HTTP path.
//!
//! SNI selection, as Envoy's filter-chain match and nginx's `server_name` do it:
//! 1. the SNI is one of the dialed service's names (`http.hosts`, else its certificate's DNS
//!    names): that service;
//! 2. it is another TLS service's name (exact names before `*.suffix` ones, config order among
//!    equals): that service, under its own L4 rule, policy and endpoints;
//! 3. no SNI, or an unknown one: the dialed service with its certificate as the default
//!    (a client that checks names then refuses it; `http.hosts` still answers a foreign `Host`
//!    with 421).

use std::{
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::LazyConfigAcceptor;

use super::super::{
    OrigDst, Routes, Shared, decide,
    http::{self, Protocol},
    routes::{Route, ServiceRoute},
};
use crate::{
    auth::cert::CertIdentity,
    telemetry::{ConnectionLine, Decision, Reason, decision::TlsLog},
};

/// How long a client may take from its first byte to the end of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP path knows about a connection the gateway terminated TLS for.
#[derive(Debug)]
pub struct TlsConn {
    /// Set when SNI chose another service than the dialed one: its id.
    pub service: Option<u32>,
    /// For the decision lines (SNI and the client certificate).
    pub log: Arc<TlsLog>,
}

impl TlsConn {
    pub fn client_cert(&self) -> Option<&CertIdentity> {
        self.log.client_cert.as_ref()
    }
}

/// The service whose certificate answers a `ClientHello` for `sni` on a connection to
/// `dialed`, and whether it is another service than the dialed one.
pub(crate) fn select<'r>(
    routes: &'r Routes,
    dialed: &'r Route,
    sni: Option<&str>,
) -> (&'r Arc<ServiceRoute>, bool) {
    let serves = |s: &ServiceRoute, sni: &str| {
        s.http
            .as_ref()
            .and_then(|h| h.tls.as_ref())
            .is_some_and(|t| t.serves_name(sni, false))
    };
    match sni {
        Some(sni) if !serves(&dialed.service, sni) => match routes.by_sni(sni) {
            Some(other) if other.id != dialed.service.id => (other, true),
            _ => (&dialed.service, false),
        },
        _ => (&dialed.service, false),
    }
}

/// Why a handshake failed, for the decision line.
fn handshake_reason(err: &io::Error) -> Reason {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => Reason::ClientCertRequired,
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
            Reason::ClientCertRevoked
        }
        Some(rustls::Error::InvalidCertificate(_)) => Reason::ClientCertInvalid,
        _ => Reason::TlsHandshakeFailed,
    }
}

/// Terminates TLS on `client` (a connection to `dialed`, a service with `tls:`) and serves the
/// decrypted stream as HTTP. A refused handshake gets one connection line.
#[expect(
    clippy::too_many_arguments,
    clippy::too_many_lines,
    reason = "the connection's state, handed over from conn::handle as it is; the steps in \
              the order they run"
)]
pub(in crate::proxy) async fn serve<'a>(
    client: TcpStream,
    orig: OrigDst,
    shared: &'a Arc<Shared>,
    routes: &'a Routes,
    dialed: &'a Route,
    mut line: ConnectionLine<'a>,
    started: Instant,
    (draining, abort): (watch::Receiver<bool>, watch::Receiver<bool>),
) {
    let peer = line.src;
    let fail = |mut line: ConnectionLine<'_>, reason: Reason, detail: Option<String>| {
        line.decision = Decision::Deny;
        line.reason = reason;
        line.detail = detail;
        line.duration = started.elapsed();
        line.emit(&shared.metrics);
    };
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client);
    let start = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(err)) => return fail(line, Reason::TlsHandshakeFailed, Some(err.to_string())),
        Err(_) => {
            return fail(
                line,
                Reason::TlsHandshakeFailed,
                Some("no ClientHello in time".into()),
            );
        }
    };
    let sni = start
        .client_hello()
        .server_name()
        .map(str::to_ascii_lowercase);
    line.sni.clone_from(&sni);
    let (service, switched) = select(routes, dialed, sni.as_deref());
    line.service = Some(&service.name);
    line.mode = Some(service.mode);
    let mut audit = None;
    if switched && !service.rule.allow_sources.is_empty() {
        // The chosen service's own L4 rule (the dialed one's was checked by the caller).
        match decide(&service.rule, service.mode, peer.ip()) {
            (Decision::Allow, _) => {}
            (Decision::Deny, reason) => return fail(line, reason, None),
            (decision, reason) => audit = Some((decision, reason)),
        }
    }
    let Some(tls) = service.http.as_ref().and_then(|h| h.tls.as_ref()) else {
        // `select` only returns services with `tls`, and the caller checked the dialed one.
        return fail(
            line,
            Reason::TlsHandshakeFailed,
            Some("no certificate".into()),
        );
    };
    let require_cert = tls.files().client_cert == super::ClientCertMode::Required;
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(tls.config()))
        .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            let reason = handshake_reason(&err);
            tracing::debug!(%peer, service = %service.name, error = %err, "TLS handshake refused");
            return fail(line, reason, Some(err.to_string()));
        }
        Err(_) => {
            return fail(
                line,
                Reason::TlsHandshakeFailed,
                Some("handshake not finished in time".into()),
            );
        }
    };
    let (_, session) = stream.get_ref();
    let protocol = if session.alpn_protocol() == Some(b"h2") {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    let client_cert = session
        .peer_certificates()
        .and_then(<[_]>::first)
        .and_then(CertIdentity::from_der);
    if require_cert && client_cert.is_none() {
        // rustls verified a certificate that webpki cannot read back: never let it through.
        return fail(
            line,
            Reason::ClientCertInvalid,
            Some("the verified certificate does not parse".into()),
        );
    }
    if let Some((decision, reason)) = audit {
        // Audit mode: the chosen service would have refused the source; its requests follow.
        line.decision = decision;
        line.reason = reason;
        line.duration = started.elapsed();
        line.emit(&shared.metrics);
    }
    let conn = TlsConn {
        service: switched.then_some(service.id),
        log: Arc::new(TlsLog { sni, client_cert }),
    };
    http::serve(
        stream,
        peer,
        orig,
        protocol,
        Some(Arc::new(conn)),
        shared.clone(),
        draining,
        abort,
    )
    .await;
}
