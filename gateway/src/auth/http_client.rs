//! The HTTP client that `openidconnect` uses to reach the identity provider (discovery, JWKS,
//! token and revocation endpoints).
//!
//! hyper 1 with hyper-rustls (ring provider) rather than reqwest: the gateway already builds
//! hyper, hyper-util and tokio for its proxy, so this adds only the TLS connector, where reqwest
//! would add its own stack of middleware crates on top of the same hyper. It also keeps the
//! client's behaviour explicit: no redirects are followed (a redirect from a provider endpoint
//! could point the gateway at an internal address: SSRF), every exchange has a deadline, and
//! response bodies are capped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use openidconnect::{AsyncHttpClient, HttpRequest, HttpResponse};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// Largest response body read from the provider. Discovery documents and key sets are a few
/// KiB; the cap keeps a misbehaving endpoint from making the gateway buffer without bound.
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error("the CA bundle contains no usable PEM certificate: {0}")]
    CaBundle(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why [`tls_client_config`] failed.
#[derive(Debug)]
pub(crate) enum RootsError {
    Pem(String),
    Empty,
    Tls(rustls::Error),
}

/// The rustls client configuration shared by every outbound client of `auth` (issuer discovery
/// and JWKS, the login provider): `ca_pem`, when given, replaces the built-in Mozilla roots (an
/// in-cluster issuer is trusted through its CA only). The ring provider is passed explicitly
/// instead of installed process-wide, so nothing else in the process is affected.
pub(crate) fn tls_client_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, RootsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| RootsError::Pem(e.to_string()))?;
                roots.add(cert).map_err(RootsError::Tls)?;
            }
            if roots.is_empty() {
                return Err(RootsError::Empty);
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(RootsError::Tls)?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// An error of one exchange with the provider.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("no response from {uri} within {timeout:?}")]
    Timeout { uri: String, timeout: Duration },
    #[error("request to {uri} failed: {message}")]
    Request { uri: String, message: String },
    #[error("response body from {uri} could not be read or is larger than {MAX_BODY} bytes")]
    Body { uri: String },
}

/// What the client trusts and how long it waits.
#[derive(Clone, Debug)]
pub struct HttpClientOptions {
    /// PEM certificates to trust instead of the public web roots (a provider behind a private
    /// CA). `None` trusts the Mozilla root set compiled in from webpki-roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Whether `http://` URLs may be used at all; when false the connector refuses them, so a
    /// discovery document cannot downgrade the token endpoint to plain text.
    pub allow_http: bool,
    /// Deadline for one whole exchange (connect, request, response body).
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct OidcHttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for OidcHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcHttpClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl OidcHttpClient {
    /// # Errors
    ///
    /// When the CA bundle holds no usable certificate or TLS cannot be set up.
    pub fn new(options: &HttpClientOptions) -> Result<Self, HttpClientError> {
        let tls = tls_client_config(options.ca_pem.as_deref()).map_err(|e| match e {
            RootsError::Tls(e) => HttpClientError::Tls(e),
            RootsError::Pem(e) => HttpClientError::CaBundle(e),
            RootsError::Empty => HttpClientError::CaBundle("no CERTIFICATE block".into()),
        })?;

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(options.timeout));
        http.set_nodelay(true);
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
        let connector = if options.allow_http {
            builder.https_or_http().enable_http1().wrap_connector(http)
        } else {
            builder.https_only().enable_http1().wrap_connector(http)
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            timeout: options.timeout,
        })
    }

    /// Sends one request and reads the whole response. Redirects are returned, not followed.
    ///
    /// # Errors
    ///
    /// On connection failure, timeout, or a body over the size cap.
    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let uri = redact_query(request.uri());
        let timeout = self.timeout;
        let exchange = async {
            let (parts, body) = request.into_parts();
            let mut request = http::Request::from_parts(parts, Full::new(Bytes::from(body)));
            request.headers_mut().insert(
                http::header::USER_AGENT,
                http::HeaderValue::from_static("nodegate"),
            );
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| HttpError::Request {
                    uri: uri.clone(),
                    message: error_chain(&e),
                })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|_| HttpError::Body { uri: uri.clone() })?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body.to_vec()))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout {
                uri: uri.clone(),
                timeout,
            })?
    }
}

impl<'c> AsyncHttpClient<'c> for OidcHttpClient {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.send(request))
    }
}

/// The URI without its query, for error messages: queries to the provider can carry codes.
fn redact_query(uri: &http::Uri) -> String {
    let mut out = String::new();
    if let Some(scheme) = uri.scheme_str() {
        out.push_str(scheme);
        out.push_str("://");
    }
    if let Some(authority) = uri.authority() {
        out.push_str(authority.as_str());
    }
    out.push_str(uri.path());
    out
}

/// hyper's errors say "client error (Connect)" and keep the cause in the source chain.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_bundle_must_hold_a_certificate() {
        let options = HttpClientOptions {
            ca_pem: Some(b"not a pem".to_vec()),
            allow_http: false,
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(
            OidcHttpClient::new(&options),
            Err(HttpClientError::CaBundle(_))
        ));
    }

    #[tokio::test]
    async fn http_is_refused_unless_allowed() {
        let options = HttpClientOptions {
            ca_pem: None,
            allow_http: false,
            timeout: Duration::from_secs(2),
        };
        let client = OidcHttpClient::new(&options).unwrap();
        let request = http::Request::get("http://127.0.0.1:9/x?code=secret")
            .body(Vec::new())
            .unwrap();
        let err = client.send(request).await.unwrap_err();
        let message = err.to_string();
        assert!(message.contains("http://127.0.0.1:9/x"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
}
