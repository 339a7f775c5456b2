//! `cargo fuzz run sni`: the `ClientHello` SNI peek of TLS pass-through (`proxy::detect::sni`).
//!
//! Any bytes: never a panic, and a name only in the form the decision log expects (lower case,
//! 1-253 bytes of `[a-z0-9._-]`). When the input is a DNS name, a real `ClientHello` built by
//! rustls for it yields exactly that name; no strict prefix of the hello yields a name (a
//! hello cut short is never half read), and bytes after the record change nothing.

#![no_main]

use std::sync::{Arc, OnceLock};

use gateway::proxy::detect::sni;
use libfuzzer_sys::fuzz_target;
use rustls::{ClientConfig, ClientConnection, RootCertStore, pki_types::ServerName};

fn client_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

fn check_form(name: &str) {
    assert!(!name.is_empty() && name.len() <= 253, "{name:?}");
    assert!(
        name.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')),
        "{name:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Some(name) = sni(data) {
        check_form(&name);
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(server_name @ ServerName::DnsName(_)) = ServerName::try_from(text.to_owned()) else {
        return;
    };
    let mut conn = ClientConnection::new(client_config(), server_name)
        .expect("a client connection to a DNS name starts");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("writing to a Vec");

    // rustls sends the name without a trailing dot (RFC 6066 §3).
    let expected = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    assert_eq!(sni(&hello).as_deref(), Some(expected.as_str()), "{text:?}");
    for cut in 0..hello.len() {
        assert_eq!(
            sni(&hello[..cut]),
            None,
            "{text:?} cut at {cut} of {}",
            hello.len()
        );
    }
    let mut longer = hello.clone();
    longer.extend_from_slice(data);
    assert_eq!(
        sni(&longer).as_deref(),
        Some(expected.as_str()),
        "{text:?} + trailing bytes"
    );
});
