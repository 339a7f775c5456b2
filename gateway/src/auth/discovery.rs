//! HTTP(S) fetching for the control side of auth: `OpenID` Connect discovery and JWKS downloads.
//!
//! One small hyper client per issuer (hyper-util's pooled client, rustls with the ring provider:
//! the gateway's single TLS stack). Every fetch is bounded in time and size, follows no redirects
//! and never runs on the request path except for the rate-limited unknown-`kid` refetch.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::config::{parse_http_url, url_transport_allowed};

/// Largest discovery document accepted (real ones are 2–10 KiB).
pub const MAX_DISCOVERY_BYTES: usize = 256 * 1024;

/// Why an HTTP fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {uri}: no answer within {secs} s (fetch_timeout_s)")]
    Timeout { uri: String, secs: u64 },
    #[error("GET {uri}: {reason}")]
    Transport { uri: String, reason: String },
    #[error("GET {uri}: HTTP {status} (expected 200; redirects are not followed)")]
    Status { uri: String, status: StatusCode },
    #[error("GET {uri}: response body over {limit} bytes")]
    TooLarge { uri: String, limit: usize },
}

/// Why discovery did not yield a usable `jwks_uri`.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(
        "discovery document at {uri} is not JSON with string `issuer` and `jwks_uri`: {reason}"
    )]
    Invalid { uri: String, reason: String },
    #[error(
        "discovery document at {uri} names issuer {found:?}, not the configured {expected:?} (OIDC Discovery §4.3)"
    )]
    IssuerMismatch {
        uri: String,
        expected: String,
        found: String,
    },
    #[error(
        "discovery document at {uri}: jwks_uri {jwks_uri:?} is not an https URL (plain http only to loopback, or with allow_http)"
    )]
    BadJwksUri { uri: String, jwks_uri: String },
}

/// Why building an issuer's HTTP client failed (only the CA bundle can be wrong).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read: {0}")]
    Read(#[from] std::io::Error),
    #[error("no PEM certificate in the file")]
    Empty,
    #[error("bad PEM certificate: {0}")]
    Pem(String),
    #[error("rejected by rustls: {0}")]
    Tls(#[from] rustls::Error),
}

/// A bounded HTTP(S) GET client for one issuer.
#[derive(Clone)]
pub struct HttpFetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for HttpFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFetcher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HttpFetcher {
    /// `ca_file`, when set, replaces the built-in Mozilla roots: an in-cluster issuer should be
    /// trusted through the cluster CA only, not through any public CA.
    ///
    /// # Errors
    /// An unreadable or certificate-less `ca_file`.
    pub fn new(ca_file: Option<&Path>, timeout: Duration) -> Result<Self, ClientError> {
        let pem = ca_file.map(std::fs::read).transpose()?;
        let tls = super::http_client::tls_client_config(pem.as_deref()).map_err(|e| match e {
            super::http_client::RootsError::Pem(e) => ClientError::Pem(e),
            super::http_client::RootsError::Empty => ClientError::Empty,
            super::http_client::RootsError::Tls(e) => ClientError::Tls(e),
        })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        // Plain http is reachable here only for URLs the config check allowed (loopback or
        // allow_http); discovered URLs go through the same check before use.
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build(https);
        Ok(Self { client, timeout })
    }

    /// GETs `uri`, expecting 200 and at most `limit` body bytes, all within the fetch timeout.
    ///
    /// # Errors
    /// Timeout, transport failure, a status other than 200, or an oversized body.
    pub async fn get(&self, uri: &Uri, limit: usize) -> Result<Bytes, FetchError> {
        let secs = self.timeout.as_secs();
        match tokio::time::timeout(self.timeout, self.get_inner(uri, limit)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                uri: uri.to_string(),
                secs,
            }),
        }
    }

    async fn get_inner(&self, uri: &Uri, limit: usize) -> Result<Bytes, FetchError> {
        let transport = |reason: String| FetchError::Transport {
            uri: uri.to_string(),
            reason,
        };
        let request = Request::get(uri.clone())
            .header(ACCEPT, "application/json, application/jwk-set+json")
            .header(USER_AGENT, concat!("nodegate/", env!("CARGO_PKG_VERSION")))
            .body(Empty::new())
            .map_err(|e| transport(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| transport(error_chain(&e)))?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status {
                uri: uri.to_string(),
                status: response.status(),
            });
        }
        match Limited::new(response.into_body(), limit).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e) if e.is::<LengthLimitError>() => Err(FetchError::TooLarge {
                uri: uri.to_string(),
                limit,
            }),
            Err(e) => Err(transport(error_chain(e.as_ref()))),
        }
    }
}

/// hyper's top-level errors say little ("client error (Connect)"); the cause chain says what.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[derive(Deserialize)]
struct DiscoveryDoc {
    issuer: String,
    jwks_uri: String,
}

/// Fetches the discovery document and returns its `jwks_uri`, after checking that it names the
/// configured issuer and that the JWKS URL is one the config would have accepted.
///
/// # Errors
/// The fetch failure, an invalid document, an issuer mismatch or an unacceptable `jwks_uri`.
pub async fn discover_jwks_uri(
    http: &HttpFetcher,
    well_known: &Uri,
    expected_issuer: &str,
    allow_http: bool,
) -> Result<Uri, DiscoveryError> {
    let body = http.get(well_known, MAX_DISCOVERY_BYTES).await?;
    let doc: DiscoveryDoc = serde_json::from_slice(&body).map_err(|e| DiscoveryError::Invalid {
        uri: well_known.to_string(),
        reason: e.to_string(),
    })?;
    if doc.issuer != expected_issuer {
        return Err(DiscoveryError::IssuerMismatch {
            uri: well_known.to_string(),
            expected: expected_issuer.to_owned(),
            found: super::jwt::clip(&doc.issuer),
        });
    }
    parse_http_url(&doc.jwks_uri)
        .filter(|uri| url_transport_allowed(uri, allow_http))
        .ok_or_else(|| DiscoveryError::BadJwksUri {
            uri: well_known.to_string(),
            jwks_uri: super::jwt::clip(&doc.jwks_uri),
        })
}
