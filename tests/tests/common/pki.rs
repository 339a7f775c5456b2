//! Test certificates from rcgen, written as PEM files for the gateway, curl and openssl.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A CA writing PEM files.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// `<dir>/<name>.crt` and `.key`: a leaf for `cn` with `sans`.
    pub fn leaf(
        &self,
        dir: &Path,
        name: &str,
        cn: &str,
        sans: Vec<SanType>,
        client: bool,
        expired: bool,
    ) {
        self.numbered_leaf(dir, name, cn, sans, client, expired, None);
    }

    /// [`Self::leaf`] with a serial number (for a CRL to name).
    #[expect(
        clippy::too_many_arguments,
        reason = "the leaf's fields, as a test names them"
    )]
    pub fn numbered_leaf(
        &self,
        dir: &Path,
        name: &str,
        cn: &str,
        sans: Vec<SanType>,
        client: bool,
        expired: bool,
        serial: Option<u64>,
    ) {
        let mut params = CertificateParams::default();
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        // Key first: a watcher that sees the new key with the old certificate keeps the old pair.
        write(&dir.join(format!("{name}.key")), &key.serialize_pem());
        write(&dir.join(format!("{name}.crt")), &cert.pem());
    }

    /// `path`: this CA's CRL (PEM) revoking the certificates with the `revoked` serials.
    pub fn crl(&self, path: &Path, revoked: &[u64]) {
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2025, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*serial),
                    revocation_time: rcgen::date_time_ymd(2026, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .expect("CRL");
        write(path, &crl.pem().expect("CRL PEM"));
    }
}

/// Replaces a file atomically (a reader never sees half of it).
pub fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

pub fn dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("DNS name"))
}

pub fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().expect("URI"))
}
