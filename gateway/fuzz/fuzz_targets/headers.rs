//! `cargo fuzz run headers`: the request path's header rules (`proxy::http::headers`) on any
//! header block (`name: value` lines, names and values as hyper would accept them).
//!
//! - `strip_gateway_owned` leaves no header a client could pass off as the gateway's
//!   (`X-Nodegate-*`, `X-Request-Id`, with `_` for `-`), counts what it removed and touches
//!   nothing else; `is_gateway_owned` agrees with a plain model of that rule.
//! - `strip_hop_by_hop` removes exactly the fixed hop-by-hop set, `Connection`, `Upgrade` (kept
//!   only for an authorized upgrade) and every header `Connection` names except `Host` and
//!   `Authorization`; every other header keeps all its values in order.

#![no_main]

use std::collections::BTreeSet;

use gateway::proxy::http::headers::{
    is_gateway_owned, strip_gateway_owned, strip_hop_by_hop, wants_upgrade,
};
use http::{
    HeaderMap, HeaderName, HeaderValue,
    header::{AUTHORIZATION, CONNECTION, HOST, UPGRADE},
};
use libfuzzer_sys::fuzz_target;

const FIXED_HOP_BY_HOP: [&str; 7] = [
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-authorization",
    "proxy-authenticate",
    "keep-alive",
    "proxy-connection",
];

fn owned_model(name: &str) -> bool {
    let norm = name.to_ascii_lowercase().replace('_', "-");
    norm.starts_with("x-nodegate-") || norm == "x-request-id"
}

fn values(headers: &HeaderMap, name: &HeaderName) -> Vec<HeaderValue> {
    headers.get_all(name).iter().cloned().collect()
}

/// The names `Connection` lists, lower case: every comma-separated element of every value,
/// also in a value that has bytes outside visible ASCII (an element that is not a header name
/// names nothing).
fn connection_tokens(headers: &HeaderMap) -> BTreeSet<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|t| std::str::from_utf8(t.trim_ascii()).ok())
        .map(str::to_ascii_lowercase)
        .collect()
}

fn check_owned(headers: &HeaderMap) {
    for name in headers.keys() {
        assert_eq!(is_gateway_owned(name), owned_model(name.as_str()), "{name}");
    }
    let mut stripped = headers.clone();
    let removed = strip_gateway_owned(&mut stripped);
    assert_eq!(removed, headers.len() - stripped.len());
    for name in headers.keys() {
        if owned_model(name.as_str()) {
            assert!(!stripped.contains_key(name), "{name} kept");
        } else {
            assert_eq!(values(&stripped, name), values(headers, name), "{name}");
        }
    }
}

fn check_hop_by_hop(headers: &HeaderMap, keep_upgrade: bool) {
    let named = connection_tokens(headers);
    let mut stripped = headers.clone();
    strip_hop_by_hop(&mut stripped, keep_upgrade);
    for name in headers.keys() {
        let n = name.as_str();
        let removed = if *name == CONNECTION {
            !keep_upgrade
        } else if *name == UPGRADE {
            !keep_upgrade
        } else if *name == HOST || *name == AUTHORIZATION {
            false
        } else {
            FIXED_HOP_BY_HOP.contains(&n) || named.contains(n)
        };
        if removed {
            assert!(
                !stripped.contains_key(name),
                "{name} kept (keep_upgrade {keep_upgrade})"
            );
        } else if *name != CONNECTION {
            assert_eq!(values(&stripped, name), values(headers, name), "{name}");
        }
    }
    for name in stripped.keys() {
        assert!(
            headers.contains_key(name) || (keep_upgrade && *name == CONNECTION),
            "{name} added"
        );
    }
    if keep_upgrade {
        assert_eq!(
            values(&stripped, &CONNECTION),
            [HeaderValue::from_static("upgrade")]
        );
        assert_eq!(wants_upgrade(&stripped), headers.contains_key(UPGRADE));
    } else {
        assert!(!wants_upgrade(&stripped));
    }
}

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    check_owned(&headers);
    check_hop_by_hop(&headers, false);
    check_hop_by_hop(&headers, true);
});
