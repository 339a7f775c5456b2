//! TLS from the gateway to a service's backends (`upstream_tls:`): the backend certificate is
//! verified against `ca_file` (only that CA: an in-cluster backend is never trusted through the
//! public web roots) for `server_name`, or for the endpoint's IP address when none is given.
//! A backend that fails verification is a 502 with its own reason, never a plaintext retry.

use std::{
    error::Error as StdError,
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    Fingerprinted, Refresh, Reloadable, TlsError, absolute, certified_key, fingerprint, provider,
    read, roots,
};

/// The files and names of a service's `upstream_tls:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamTlsFiles {
    pub ca_file: PathBuf,
    /// The name the backend certificate must be valid for; default: the endpoint's IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// A client certificate for backends that require one (both or neither).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// TLS to a service's backends, loaded; its files are re-read when they change (the
/// [`super::watch`] loop), and new connections use what loaded last (pooled ones keep their
/// session).
pub struct UpstreamTls {
    files: UpstreamTlsFiles,
    server_name: Option<ServerName<'static>>,
    current: Reloadable<Loaded>,
}

/// One load of the files.
struct Loaded {
    connector: TlsConnector,
    fingerprint: u64,
}

impl Fingerprinted for Loaded {
    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Serialize for UpstreamTls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.files.serialize(s)
    }
}

impl UpstreamTls {
    pub fn load(files: UpstreamTlsFiles) -> Result<Self, TlsError> {
        for (field, path) in [
            ("ca_file", Some(&files.ca_file)),
            ("cert_file", files.cert_file.as_ref()),
            ("key_file", files.key_file.as_ref()),
        ] {
            absolute(field, path)?;
        }
        if files.cert_file.is_some() != files.key_file.is_some() {
            return Err(TlsError::Setting {
                field: if files.cert_file.is_some() {
                    "key_file"
                } else {
                    "cert_file"
                },
                why: "a client certificate needs both `cert_file` and `key_file`".into(),
            });
        }
        let server_name = files
            .server_name
            .as_deref()
            .map(|n| {
                ServerName::try_from(n.to_owned()).map_err(|_| TlsError::Setting {
                    field: "server_name",
                    why: format!("{n:?} is not a DNS name or an IP address"),
                })
            })
            .transpose()?;
        let (contents, fingerprint) = read_all(&files)?;
        let loaded = build(&files, &contents, fingerprint)?;
        Ok(Self {
            files,
            server_name,
            current: Reloadable::new(loaded),
        })
    }

    pub fn files(&self) -> &UpstreamTlsFiles {
        &self.files
    }

    /// Re-reads the files; swaps in new content that loads.
    pub fn refresh(&self) -> Refresh {
        self.current.refresh(
            || read_all(&self.files),
            |contents, fingerprint| build(&self.files, contents, fingerprint),
        )
    }

    /// The TLS handshake over a connected socket to `endpoint`.
    pub async fn connect(
        &self,
        endpoint: SocketAddr,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, UpstreamTlsFailure> {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(IpAddr::to_canonical(&endpoint.ip()).into()));
        let connector = self.current.load().connector.clone();
        connector
            .connect(name, stream)
            .await
            .map_err(|source| UpstreamTlsFailure { endpoint, source })
    }
}

/// The contents of the files (CA, then the client certificate and key if any) and their
/// fingerprint.
fn read_all(files: &UpstreamTlsFiles) -> Result<(Vec<Vec<u8>>, u64), TlsError> {
    let mut contents = vec![read("ca_file", &files.ca_file)?];
    if let (Some(cert), Some(key)) = (&files.cert_file, &files.key_file) {
        contents.push(read("cert_file", cert)?);
        contents.push(read("key_file", key)?);
    }
    let fingerprint = fingerprint(&contents);
    Ok((contents, fingerprint))
}

fn build(
    files: &UpstreamTlsFiles,
    contents: &[Vec<u8>],
    fingerprint: u64,
) -> Result<Loaded, TlsError> {
    let provider = provider();
    let roots = roots("ca_file", &files.ca_file, &contents[0])?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setting {
            field: "ca_file",
            why: e.to_string(),
        })?
        .with_root_certificates(roots);
    let mut config = match (&files.cert_file, &files.key_file, contents.get(1..3)) {
        (Some(cert), Some(key), Some([cert_pem, key_pem])) => {
            let certified = certified_key(
                &provider,
                (cert, cert_pem),
                (key, key_pem),
                ("cert_file", "key_file"),
            )?;
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                certified,
            )))
        }
        _ => builder.with_no_client_auth(),
    };
    // The pooled upstream client speaks HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Loaded {
        connector: TlsConnector::from(Arc::new(config)),
        fingerprint,
    })
}

/// A failed TLS handshake with a backend (carried through the pooled client's error).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with backend {endpoint} failed: {source}")]
pub struct UpstreamTlsFailure {
    pub endpoint: SocketAddr,
    #[source]
    pub source: io::Error,
}

impl UpstreamTlsFailure {
    /// `upstream_cert_invalid` when the backend certificate did not verify (unknown CA, wrong
    /// name, expired), else `upstream_tls_failed`.
    pub fn reason(&self) -> &'static str {
        match self
            .source
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(_)) => "upstream_cert_invalid",
            _ => "upstream_tls_failed",
        }
    }

    /// The failure somewhere in an error's chain (also inside an `io::Error`, whose `source()`
    /// skips the error it wraps).
    pub fn find<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a Self> {
        let mut next = Some(err);
        while let Some(e) = next {
            if let Some(found) = e.downcast_ref::<Self>() {
                return Some(found);
            }
            if let Some(found) = e
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Self>())
            {
                return Some(found);
            }
            next = e.source();
        }
        None
    }
}
