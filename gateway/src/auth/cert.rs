//! The identity in a client certificate that the TLS handshake verified (mTLS): its subject,
//! DNS and URI SANs, and the SPIFFE ID. Only ever built from the peer certificate rustls
//! verified against the service's `client_ca_file`, never from request headers.
//!
//! SANs come from rustls-webpki (the parser rustls verified the certificate with); the subject
//! is decoded here from the raw DER name webpki hands out, as RFC 4514 text.

use rustls_pki_types::CertificateDer;
use serde::Serialize;

use crate::policy::spiffe;

/// Most SANs of one kind kept (for the log and policy); a certificate with more is unusual.
const MAX_SANS: usize = 32;

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct CertIdentity {
    /// RFC 4514 form, most specific attribute first (`CN=builder,O=Example`).
    pub subject: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_sans: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub uri_sans: Vec<String>,
    /// The one `spiffe://` URI SAN, when it is a valid SPIFFE ID (an X.509-SVID has exactly one
    /// URI SAN; a certificate with several `spiffe://` SANs has no SPIFFE ID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
}

impl CertIdentity {
    /// The identity of a verified end-entity certificate; `None` if it does not parse (rustls
    /// parsed it already, so only for a certificate it did not verify).
    pub fn from_der(der: &CertificateDer<'_>) -> Option<Self> {
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        let dns_sans: Vec<String> = cert
            .valid_dns_names()
            .take(MAX_SANS)
            .map(str::to_ascii_lowercase)
            .collect();
        let uri_sans: Vec<String> = cert
            .valid_uri_names()
            .take(MAX_SANS)
            .map(str::to_owned)
            .collect();
        let mut spiffe_uris = uri_sans.iter().filter(|u| {
            u.get(..9)
                .is_some_and(|s| s.eq_ignore_ascii_case("spiffe://"))
        });
        let spiffe_id = match (spiffe_uris.next(), spiffe_uris.next()) {
            (Some(id), None) if spiffe::check_id(id).is_ok() => Some(id.clone()),
            _ => None,
        };
        Some(Self {
            subject: subject_text(cert.subject()),
            dns_sans,
            uri_sans,
            spiffe_id,
        })
    }
}

/// When a certificate stops being valid (`notAfter`), in Unix seconds; `None` if it does not
/// parse. Read from the DER with [`tlv`] like the subject: `TBSCertificate` is `[0] version`
/// (optional), serial, signature algorithm, issuer, validity (`notBefore`, `notAfter`).
pub fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, mut tbs, _) = tlv(cert)? else {
        return None;
    };
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    // Serial, signature algorithm, issuer.
    for want in [0x02, 0x30, 0x30] {
        let (tag, _, rest) = tlv(tbs)?;
        if tag != want {
            return None;
        }
        tbs = rest;
    }
    let (0x30, validity, _) = tlv(tbs)? else {
        return None;
    };
    let (_, _, rest) = tlv(validity)?;
    let (tag, time, _) = tlv(rest)?;
    let time = std::str::from_utf8(time).ok()?;
    // UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or GeneralizedTime (YYYYMMDDHHMMSSZ).
    let full = match (tag, time.len()) {
        (0x17, 13) => {
            let yy: u32 = time.get(..2)?.parse().ok()?;
            format!("{}{time}", if yy >= 50 { "19" } else { "20" })
        }
        (0x18, 15) => time.to_owned(),
        _ => return None,
    };
    chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%SZ")
        .ok()
        .map(|t| t.and_utc().timestamp())
}

/// One DER TLV: tag, contents, the rest. Definite lengths up to 4 bytes only.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// RFC 4514 text of a DER `Name` (the contents of its outer SEQUENCE): relative distinguished
/// names in reverse order, attributes of one RDN joined with `+`. Unknown attribute types are
/// written as dotted OIDs, values that are not strings as `#hex`.
fn subject_text(mut name: &[u8]) -> String {
    let mut rdns = Vec::new();
    while let Some((0x31, mut set, rest)) = tlv(name) {
        name = rest;
        let mut attrs = Vec::new();
        while let Some((0x30, atv, more)) = tlv(set) {
            set = more;
            let Some((0x06, oid, value)) = tlv(atv) else {
                continue;
            };
            let Some((tag, value, _)) = tlv(value) else {
                continue;
            };
            let text = match tag {
                // UTF8String, PrintableString, TeletexString (as Latin-1 subset), IA5String
                0x0c | 0x13 | 0x14 | 0x16 => String::from_utf8_lossy(value).into_owned(),
                _ => format!("#{}", hex(value)),
            };
            attrs.push(format!("{}={}", attribute_name(oid), escape(&text)));
        }
        rdns.push(attrs.join("+"));
    }
    rdns.reverse();
    rdns.join(",")
}

fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x05] => "serialNumber".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress".into(),
        other => dotted(other),
    }
}

/// X.690 §8.19: the first byte holds the first two arcs, then base-128 arcs.
fn dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for &b in oid {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first);
                arcs.push(acc - first * 40);
            } else {
                arcs.push(acc);
            }
            acc = 0;
        }
    }
    arcs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// RFC 4514 §2.4 escaping, and control characters as `\XX` so that a log line stays one line.
fn escape(value: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\{b:02x}");
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    #[test]
    fn not_after_is_read_in_both_time_forms() {
        for (year, form) in [
            (2031, "UTCTime"),
            (2055, "GeneralizedTime"),
            (1999, "UTCTime"),
        ] {
            let mut params = CertificateParams::default();
            params.not_before = rcgen::date_time_ymd(1990, 1, 1);
            params.not_after = rcgen::date_time_ymd(year, 5, 6);
            let der = params
                .self_signed(&KeyPair::generate().unwrap())
                .unwrap()
                .der()
                .clone();
            let want = chrono::NaiveDate::from_ymd_opt(year, 5, 6)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp();
            assert_eq!(not_after(&der), Some(want), "{year} ({form})");
        }
        for bad in [
            &b""[..],
            b"\x30\x00",
            b"\x30\x03\x30\x01\x00",
            b"\x04\x02ab",
        ] {
            assert_eq!(not_after(&CertificateDer::from(bad.to_vec())), None);
        }
    }

    fn cert(subject: &[(DnType, &str)], sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn subject_sans_and_spiffe_id() {
        let der = cert(
            &[
                (DnType::OrganizationName, "Example, Inc"),
                (DnType::CommonName, "builder"),
            ],
            vec![
                SanType::DnsName("Builder.CI.example.test".try_into().unwrap()),
                SanType::URI("spiffe://td.test/ns/ci/sa/builder".try_into().unwrap()),
                SanType::URI("https://example.test/x".try_into().unwrap()),
            ],
        );
        let id = CertIdentity::from_der(&der).unwrap();
        assert_eq!(id.subject, "CN=builder,O=Example\\, Inc");
        assert_eq!(id.dns_sans, ["builder.ci.example.test"]);
        assert_eq!(
            id.uri_sans,
            [
                "spiffe://td.test/ns/ci/sa/builder",
                "https://example.test/x"
            ]
        );
        assert_eq!(
            id.spiffe_id.as_deref(),
            Some("spiffe://td.test/ns/ci/sa/builder")
        );
    }

    #[test]
    fn two_or_invalid_spiffe_uris_are_no_spiffe_id() {
        let two = cert(
            &[(DnType::CommonName, "x")],
            vec![
                SanType::URI("spiffe://td.test/a".try_into().unwrap()),
                SanType::URI("spiffe://td.test/b".try_into().unwrap()),
            ],
        );
        assert_eq!(CertIdentity::from_der(&two).unwrap().spiffe_id, None);
        let bad = cert(
            &[(DnType::CommonName, "x")],
            vec![SanType::URI("spiffe://TD.test/../a".try_into().unwrap())],
        );
        let id = CertIdentity::from_der(&bad).unwrap();
        assert_eq!(id.spiffe_id, None);
        assert_eq!(id.uri_sans.len(), 1);
    }

    #[test]
    fn subject_escaping_and_unknown_attributes() {
        let der = cert(
            &[
                (DnType::CustomDnType(vec![2, 5, 4, 42]), "Ann"),
                (DnType::CommonName, " #a+b=c\n"),
            ],
            vec![],
        );
        let id = CertIdentity::from_der(&der).unwrap();
        assert_eq!(id.subject, "CN=\\ #a\\+b\\=c\\0a,2.5.4.42=Ann");
        assert_eq!(
            dotted(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            "1.2.840.113549"
        );
    }
}
