//! TLS of HTTP services: termination with the service's certificate (SNI picks the service),
//! optional client certificates (mTLS) whose verified identity reaches policy and the log, and
//! TLS to the backend verified against a configured CA.
//!
//! ```text
//! accepted ─detect: ClientHello─▶ service has `tls`? ── no ─▶ L4 pass-through (SNI logged)
//!                                   │ yes
//!   ClientHello read (LazyConfigAcceptor) → SNI → the service whose names match, else the
//!   dialed one (its certificate is the default) → that service's L4 rule → handshake (client
//!   certificate verified against `client_ca_file`) → ALPN h2 | http/1.1 → the HTTP path
//! ```
//!
//! Certificates, keys and CAs (`tls` and `upstream_tls`) are read at config load (a bad file
//! is a config error naming the field) and again whenever their content changes ([`watch`],
//! polled every second like the config file): good new content is swapped in atomically for
//! new handshakes; bad content is logged and the running files kept. Established connections
//! (and pooled backend connections) keep what they were opened with. Everything goes through
//! rustls with the ring provider (the one TLS stack).

mod accept;
pub mod upstream;

#[cfg(test)]
mod tests;

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject as _,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use self::accept::TlsConn;
pub(super) use self::accept::serve;
pub use self::upstream::UpstreamTls;
use super::SharedRoutes;

/// How often certificate files are checked for new content.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);
/// ALPN protocols offered to clients, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A problem with a TLS file or setting; `field` is the key under `tls:` / `upstream_tls:`.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`){}", path.display(), detail(.why.as_ref()))]
    NoCertificate {
        field: &'static str,
        path: PathBuf,
        why: Option<String>,
    },
    #[error(
        "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1){}",
        path.display(),
        detail(.why.as_ref())
    )]
    NoKey {
        field: &'static str,
        path: PathBuf,
        why: Option<String>,
    },
    #[error("{}: the key cannot be used: {source}", path.display())]
    BadKey {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "{}: the key does not belong to the certificate in {} (replace both files together)",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        field: &'static str,
        key: PathBuf,
        cert: PathBuf,
    },
    #[error("{}: {why}", path.display())]
    Invalid {
        field: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("{why}")]
    Setting { field: &'static str, why: String },
}

fn detail(why: Option<&String>) -> String {
    why.map(|w| format!(": {w}")).unwrap_or_default()
}

impl TlsError {
    /// The key under the service's `tls:` / `upstream_tls:` that is wrong.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Read { field, .. }
            | Self::NoCertificate { field, .. }
            | Self::NoKey { field, .. }
            | Self::BadKey { field, .. }
            | Self::KeyMismatch { field, .. }
            | Self::Invalid { field, .. }
            | Self::Setting { field, .. } => field,
        }
    }
}

/// Whether clients must present a certificate (verified against `client_ca_file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    /// No certificate is asked for (no `client_ca_file`).
    None,
    /// Asked for; a client without one is served (no certificate identity), a client with one
    /// that does not verify is refused.
    Optional,
    /// The handshake fails without a certificate that verifies.
    Required,
}

/// The files of a service's `tls:` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerTlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Revoked client certificates: PEM CRLs of the CA(s) of `client_ca_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_crl_file: Option<PathBuf>,
    pub client_cert: ClientCertMode,
}

impl ServerTlsFiles {
    /// Checks the combination: `client_cert` and `client_crl_file` need `client_ca_file`,
    /// which defaults `client_cert` to `required`; paths are absolute.
    pub fn new(
        cert_file: PathBuf,
        key_file: PathBuf,
        client_ca_file: Option<PathBuf>,
        client_crl_file: Option<PathBuf>,
        client_cert: Option<ClientCertMode>,
    ) -> Result<Self, TlsError> {
        for (field, path) in [
            ("cert_file", Some(&cert_file)),
            ("key_file", Some(&key_file)),
            ("client_ca_file", client_ca_file.as_ref()),
            ("client_crl_file", client_crl_file.as_ref()),
        ] {
            absolute(field, path)?;
        }
        if client_crl_file.is_some() && client_ca_file.is_none() {
            return Err(TlsError::Setting {
                field: "client_crl_file",
                why: "needs `client_ca_file`: revocation lists are for the client certificates \
                      verified against it"
                    .into(),
            });
        }
        let client_cert = match (&client_ca_file, client_cert) {
            (None, None | Some(ClientCertMode::None)) => ClientCertMode::None,
            (None, Some(_)) => {
                return Err(TlsError::Setting {
                    field: "client_cert",
                    why: "needs `client_ca_file`: the CA that client certificates are verified \
                          against"
                        .into(),
                });
            }
            (Some(_), None) => ClientCertMode::Required,
            (Some(_), Some(ClientCertMode::None)) => {
                return Err(TlsError::Setting {
                    field: "client_cert",
                    why: "`none` with a `client_ca_file`: say `optional` or `required`, or drop \
                          the CA"
                        .into(),
                });
            }
            (Some(_), Some(mode)) => mode,
        };
        Ok(Self {
            cert_file,
            key_file,
            client_ca_file,
            client_crl_file,
            client_cert,
        })
    }
}

pub(crate) fn absolute(field: &'static str, path: Option<&PathBuf>) -> Result<(), TlsError> {
    match path {
        Some(p) if !p.is_absolute() => Err(TlsError::Setting {
            field,
            why: format!("{:?} must be an absolute path", p.display()),
        }),
        _ => Ok(()),
    }
}

/// The ring provider, explicitly (the one crypto provider of the gateway's rustls).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A file's bytes, with the field it was configured under in the error.
fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of a PEM file (at least one).
pub(crate) fn certificates(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NoCertificate {
            field,
            path: path.to_path_buf(),
            why: Some(e.to_string()),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            field,
            path: path.to_path_buf(),
            why: None,
        });
    }
    Ok(certs)
}

/// Every CRL of a PEM file (at least one).
fn crls(path: &Path, pem: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let invalid = |why: String| TlsError::Invalid {
        field: "client_crl_file",
        path: path.to_path_buf(),
        why,
    };
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(e.to_string()))?;
    if crls.is_empty() {
        return Err(invalid("holds no PEM `X509 CRL`".into()));
    }
    Ok(crls)
}

/// A trust store of the certificates in a PEM file.
pub(crate) fn roots(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(field, path, pem)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            field,
            path: path.to_path_buf(),
            why: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// A certificate chain and its key, checked to belong together.
pub(crate) fn certified_key(
    provider: &CryptoProvider,
    (cert_path, cert_pem): (&Path, &[u8]),
    (key_path, key_pem): (&Path, &[u8]),
    fields: (&'static str, &'static str),
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(fields.0, cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::NoKey {
        field: fields.1,
        path: key_path.to_path_buf(),
        why: match e {
            rustls_pki_types::pem::Error::NoItemsFound => None,
            other => Some(other.to_string()),
        },
    })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            field: fields.1,
            path: key_path.to_path_buf(),
            source,
        })?;
    webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| TlsError::Invalid {
        field: fields.0,
        path: cert_path.to_path_buf(),
        why: format!("the first certificate does not parse: {e}"),
    })?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|_| TlsError::KeyMismatch {
        field: fields.1,
        key: key_path.to_path_buf(),
        cert: cert_path.to_path_buf(),
    })?;
    Ok(certified)
}

/// A service's TLS termination: its files and the rustls configuration built from their
/// current content.
pub struct ServerTls {
    files: ServerTlsFiles,
    /// The service's `http.hosts`: the SNI names it answers to when set.
    hosts: Vec<String>,
    current: Reloadable<Loaded>,
}

/// One load of the files.
struct Loaded {
    config: Arc<ServerConfig>,
    /// Lower-case names (`*.suffix` allowed) that select this service by SNI.
    names: Vec<String>,
    /// When the certificate expires (Unix seconds), for the metric.
    not_after: Option<i64>,
    fingerprint: u64,
}

impl Fingerprinted for Loaded {
    fn fingerprint(&self) -> u64 {
        self.fingerprint
    }
}

/// What a re-read of the files found.
#[derive(Debug)]
pub enum Refresh {
    Unchanged,
    Reloaded,
    /// New content that does not load: the running certificate is kept.
    Failed(TlsError),
}

/// What one load of a section's files made, with the fingerprint of their content.
trait Fingerprinted {
    fn fingerprint(&self) -> u64;
}

/// A TLS section's files, loaded, and reloaded when their content changes: the current load
/// (swapped atomically for new handshakes) and the fingerprint of new content that did not
/// load (reported once, retried when the content changes again).
struct Reloadable<L> {
    current: ArcSwap<L>,
    failed: Mutex<Option<u64>>,
}

impl<L: Fingerprinted> Reloadable<L> {
    fn new(loaded: L) -> Self {
        Self {
            current: ArcSwap::from_pointee(loaded),
            failed: Mutex::new(None),
        }
    }

    fn load(&self) -> arc_swap::Guard<Arc<L>> {
        self.current.load()
    }

    /// Re-reads the files (`read`: their contents and fingerprint) and swaps in what `build`
    /// makes of new content.
    fn refresh(
        &self,
        read: impl FnOnce() -> Result<(Vec<Vec<u8>>, u64), TlsError>,
        build: impl FnOnce(&[Vec<u8>], u64) -> Result<L, TlsError>,
    ) -> Refresh {
        let result = read().and_then(|(contents, fingerprint)| {
            let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
            if fingerprint == self.current.load().fingerprint() {
                *failed = None;
                return Ok(None);
            }
            if *failed == Some(fingerprint) {
                return Ok(None);
            }
            match build(&contents, fingerprint) {
                Ok(loaded) => {
                    *failed = None;
                    Ok(Some(loaded))
                }
                Err(err) => {
                    *failed = Some(fingerprint);
                    Err(err)
                }
            }
        });
        match result {
            Ok(None) => Refresh::Unchanged,
            Ok(Some(loaded)) => {
                self.current.store(Arc::new(loaded));
                Refresh::Reloaded
            }
            // An unreadable file (mid-replacement, or removed) is retried every poll but
            // reported once.
            Err(err @ TlsError::Read { .. }) => {
                let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
                if *failed == Some(0) {
                    Refresh::Unchanged
                } else {
                    *failed = Some(0);
                    Refresh::Failed(err)
                }
            }
            Err(err) => Refresh::Failed(err),
        }
    }
}

/// The fingerprint of files' contents (in a fixed order).
fn fingerprint(contents: &[Vec<u8>]) -> u64 {
    let mut h = DefaultHasher::new();
    contents.hash(&mut h);
    h.finish()
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("names", &self.current.load().names)
            .finish_non_exhaustive()
    }
}

impl Serialize for ServerTls {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.files.serialize(s)
    }
}

/// The contents of the files, in a fixed order, and their fingerprint.
fn read_all(files: &ServerTlsFiles) -> Result<(Vec<Vec<u8>>, u64), TlsError> {
    let mut contents = vec![
        read("cert_file", &files.cert_file)?,
        read("key_file", &files.key_file)?,
    ];
    if let Some(ca) = &files.client_ca_file {
        contents.push(read("client_ca_file", ca)?);
        if let Some(crl) = &files.client_crl_file {
            contents.push(read("client_crl_file", crl)?);
        }
    }
    let fingerprint = fingerprint(&contents);
    Ok((contents, fingerprint))
}

/// Always the one certificate (SNI has chosen the service before the handshake).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ServerTls {
    /// Reads and checks the files; `hosts` are the service's `http.hosts` (lower case).
    pub fn load(files: ServerTlsFiles, hosts: Vec<String>) -> Result<Self, TlsError> {
        let (contents, fingerprint) = read_all(&files)?;
        let loaded = build(&files, &hosts, &contents, fingerprint)?;
        Ok(Self {
            files,
            hosts,
            current: Reloadable::new(loaded),
        })
    }

    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// When the certificate in use expires (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        self.current.load().not_after
    }

    /// The configuration for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load().config.clone()
    }

    /// Whether this service answers to `sni` (lower case): an exact name, else `*.suffix`
    /// for exactly one more label. `exact_only` skips the wildcards.
    pub fn serves_name(&self, sni: &str, exact_only: bool) -> bool {
        self.current
            .load()
            .names
            .iter()
            .any(|n| match n.strip_prefix("*.") {
                Some(suffix) => {
                    !exact_only
                        && sni
                            .strip_suffix(suffix)
                            .and_then(|head| head.strip_suffix('.'))
                            .is_some_and(|label| !label.is_empty() && !label.contains('.'))
                }
                None => n == sni,
            })
    }

    /// Re-reads the files; swaps in new content that loads.
    pub fn refresh(&self) -> Refresh {
        self.current.refresh(
            || read_all(&self.files),
            |contents, fingerprint| build(&self.files, &self.hosts, contents, fingerprint),
        )
    }
}

fn build(
    files: &ServerTlsFiles,
    hosts: &[String],
    contents: &[Vec<u8>],
    fingerprint: u64,
) -> Result<Loaded, TlsError> {
    let provider = provider();
    let certified = certified_key(
        &provider,
        (&files.cert_file, &contents[0]),
        (&files.key_file, &contents[1]),
        ("cert_file", "key_file"),
    )?;
    let not_after = crate::auth::cert::not_after(&certified.cert[0]);
    let names = if hosts.is_empty() {
        // `certified_key` parsed the end-entity certificate already.
        webpki::EndEntityCert::try_from(&certified.cert[0])
            .map(|c| c.valid_dns_names().map(str::to_ascii_lowercase).collect())
            .unwrap_or_default()
    } else {
        hosts.to_vec()
    };
    let verifier = match (&files.client_ca_file, contents.get(2)) {
        (Some(path), Some(pem)) => {
            let roots = roots("client_ca_file", path, pem)?;
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if files.client_cert == ClientCertMode::Optional {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            let builder = match (&files.client_crl_file, contents.get(3)) {
                // The end-entity certificate is checked; one whose issuer has no list here is
                // refused (unknown status), never let through.
                (Some(crl_path), Some(pem)) => builder
                    .with_crls(crls(crl_path, pem)?)
                    .only_check_end_entity_revocation(),
                _ => builder,
            };
            builder.build().map_err(|e| match e {
                rustls::server::VerifierBuilderError::InvalidCrl(why) => TlsError::Invalid {
                    field: "client_crl_file",
                    path: files.client_crl_file.clone().unwrap_or_default(),
                    why: format!("{why:?}"),
                },
                e => TlsError::Invalid {
                    field: "client_ca_file",
                    path: path.clone(),
                    why: e.to_string(),
                },
            })?
        }
        _ => WebPkiClientVerifier::no_client_auth(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setting {
            field: "cert_file",
            why: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Loaded {
        config: Arc::new(config),
        names,
        not_after,
        fingerprint,
    })
}

/// Serializes an optional shared value as the value itself (serde's `serialize_with` passes
/// the field by reference).
pub fn serialize_opt<S: serde::Serializer, T: Serialize>(
    v: &Option<Arc<T>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => T::serialize(v, s),
        None => s.serialize_none(),
    }
}

/// Re-reads every HTTP service's TLS files (`tls` and `upstream_tls`) once per [`RELOAD_POLL`]
/// and swaps in what changed,
/// until `shutdown`. The live route table is read on each round, so services added by a config
/// reload are watched too.
pub async fn watch(
    routes: SharedRoutes,
    metrics: Arc<crate::telemetry::Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(RELOAD_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let table = routes.load_full();
        let metrics = metrics.clone();
        // Small files, but still file I/O: off the proxy's worker threads.
        let checked = tokio::task::spawn_blocking(move || {
            for service in table.services() {
                let Some(http) = service.http.as_ref() else {
                    continue;
                };
                if let Some(tls) = &http.tls {
                    report(&service.name, "tls", &tls.files().cert_file, tls.refresh());
                }
                if let Some(upstream) = &http.upstream_tls {
                    let ca = &upstream.files().ca_file;
                    report(&service.name, "upstream_tls", ca, upstream.refresh());
                }
            }
            metrics.tls_certificates(
                table
                    .tls_services()
                    .iter()
                    .filter_map(|s| {
                        let tls = s.http.as_ref()?.tls.as_ref()?;
                        Some((s.name.clone(), tls.not_after()?))
                    })
                    .collect(),
            );
        })
        .await;
        if let Err(err) = checked {
            tracing::warn!(error = %err, "TLS file check failed");
        }
    }
}

/// Logs what a re-read of a service's `section` (`tls`, `upstream_tls`) found.
fn report(service: &str, section: &'static str, file: &Path, refresh: Refresh) {
    match refresh {
        Refresh::Unchanged => {}
        Refresh::Reloaded => tracing::info!(
            service,
            section,
            file = %file.display(),
            "TLS files reloaded: new connections use them, open and pooled ones keep theirs"
        ),
        Refresh::Failed(err) => tracing::warn!(
            service,
            section,
            field = err.field(),
            error = %err,
            "TLS files changed but do not load: keeping the running ones"
        ),
    }
}
