//! Header rules of the request path: the headers the gateway owns (stripped from clients in
//! any spelling), hop-by-hop headers (never forwarded), request ids.

use std::{cell::RefCell, fmt};

use hyper::{
    HeaderMap,
    header::{self, HeaderName, HeaderValue},
};
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore as _, SeedableRng as _};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_NODEGATE_ASSERTION: HeaderName = HeaderName::from_static("x-nodegate-assertion");
pub const X_NODEGATE_USER: HeaderName = HeaderName::from_static("x-nodegate-user");
pub const X_NODEGATE_EMAIL: HeaderName = HeaderName::from_static("x-nodegate-email");
pub const X_NODEGATE_GROUPS: HeaderName = HeaderName::from_static("x-nodegate-groups");

thread_local! {
    /// Request ids come from a ChaCha20 stream per thread keyed from the OS (a CSPRNG: the ids
    /// are as unpredictable as the OS's own randomness) rather than a getrandom(2) call per
    /// request.
    static ID_RNG: RefCell<ChaCha20Rng> = RefCell::new(
        ChaCha20Rng::from_rng(OsRng).expect("the OS random source works"),
    );
}

/// A random 128-bit request id: 32 lower-case hex digits, held without an allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId([u8; 32]);

impl RequestId {
    pub fn new() -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut bytes = [0u8; 16];
        ID_RNG.with(|rng| rng.borrow_mut().fill_bytes(&mut bytes));
        let mut out = [0u8; 32];
        for (pair, b) in out.as_chunks_mut::<2>().0.iter_mut().zip(bytes) {
            *pair = [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0x0f)]];
        }
        Self(out)
    }

    /// A fixed id, for tests that compare whole lines.
    #[cfg(test)]
    pub(crate) const fn fixed(digits: &[u8; 32]) -> Self {
        Self(*digits)
    }

    pub fn as_str(&self) -> &str {
        // Hex digits only.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl AsRef<[u8]> for RequestId {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the gateway owns a header of this name: `X-Nodegate-*` and `X-Request-Id`, in any
/// case and with `_` for `-` (some servers, CGI and nginx among them, fold `_` into `-`, so a
/// client's `X_Nodegate_User` could reach a backend as the gateway's header).
pub fn is_gateway_owned(name: &HeaderName) -> bool {
    // `HeaderName`s are stored in lower case.
    let n = name.as_str().as_bytes();
    let norm = |b: u8| if b == b'_' { b'-' } else { b };
    let starts = |prefix: &[u8]| {
        n.len() >= prefix.len() && n.iter().zip(prefix).all(|(&a, &b)| norm(a) == b)
    };
    starts(b"x-nodegate-") || (n.len() == b"x-request-id".len() && starts(b"x-request-id"))
}

/// Removes every gateway-owned header; returns how many were removed.
pub fn strip_gateway_owned(headers: &mut HeaderMap) -> usize {
    let owned: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_gateway_owned(n))
        .cloned()
        .collect();
    let mut removed = 0;
    for name in owned {
        removed += headers.get_all(&name).iter().count();
        headers.remove(&name);
    }
    removed
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// Hop-by-hop whatever `Connection` says (`Connection` and `Upgrade` themselves aside).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): those named by `Connection`, and the fixed
/// set. `keep_upgrade` keeps `Connection: upgrade` + `Upgrade` for an authorized upgrade.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds what there is to remove: most messages carry none of the
    // fixed set, and a removal is a hash lookup each (twice a request, nine names).
    let mut fixed = 0u8;
    let (mut connection, mut upgrade) = (false, false);
    for name in headers.keys() {
        if *name == header::CONNECTION {
            connection = true;
        } else if *name == header::UPGRADE {
            upgrade = true;
        } else if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            fixed |= 1 << i;
        }
    }
    if connection {
        // Only the named headers that are there are removed, so only those need a
        // `HeaderName` (one for a token like `keep-alive` would be allocated on every message).
        // Read element by element on the bytes: a value with an obs-text byte (not visible
        // ASCII, so `to_str` refuses it) still names the headers its other elements name.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|t| std::str::from_utf8(t.trim_ascii()).ok())
            .filter(|t| headers.contains_key(*t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            if keep_upgrade && name == header::UPGRADE {
                continue;
            }
            // A client must not get an end-to-end header of the gateway's removed this way.
            if name != header::HOST && name != header::AUTHORIZATION {
                headers.remove(&name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if fixed & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Whether the request asks to switch protocols (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_headers_in_every_spelling() {
        for (name, owned) in [
            ("x-nodegate-user", true),
            ("X-Nodegate-Email", true),
            ("x_nodegate_groups", true),
            ("X_NODEGATE-assertion", true),
            ("x-nodegate-anything-new", true),
            ("x-request-id", true),
            ("X_Request_Id", true),
            ("x-request-idx", false),
            ("x-nodegatex", false),
            ("x-forwarded-for", false),
            ("authorization", false),
        ] {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(is_gateway_owned(&name), owned, "{name}");
        }
        let mut h = HeaderMap::new();
        h.append("x-nodegate-user", HeaderValue::from_static("root"));
        h.append("x-nodegate-user", HeaderValue::from_static("admin"));
        h.append("x_nodegate_groups", HeaderValue::from_static("admins"));
        h.append("accept", HeaderValue::from_static("*/*"));
        assert_eq!(strip_gateway_owned(&mut h), 3);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret, upgrade"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("X-Other ,absent, bad name"),
        );
        h.insert("x-other", HeaderValue::from_static("1"));
        let mut up = h.clone();
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(
            h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-end-to-end"]
        );
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up[header::CONNECTION], "upgrade");
        assert_eq!(up[header::UPGRADE], "websocket");
        assert!(!up.contains_key("x-secret"));
        assert!(!up.contains_key("x-other"));
        // Never the gateway's own end-to-end headers, whatever `Connection` names.
        let mut keep = HeaderMap::new();
        keep.insert(
            header::CONNECTION,
            HeaderValue::from_static("Host, authorization"),
        );
        keep.insert(header::HOST, HeaderValue::from_static("a"));
        keep.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        strip_hop_by_hop(&mut keep, false);
        assert_eq!(keep.len(), 2);
        // The fixed set goes without being named.
        let mut fixed = HeaderMap::new();
        for name in HOP_BY_HOP.iter().chain([&header::UPGRADE]) {
            fixed.insert(name, HeaderValue::from_static("1"));
        }
        fixed.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut fixed, false);
        assert_eq!(
            fixed.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-end-to-end"]
        );
        // A value with a byte outside visible ASCII (found by the `headers` fuzz target) still
        // names the headers its other elements name.
        let mut obs = HeaderMap::new();
        obs.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-secret, caf\xe9").expect("obs-text is a valid value"),
        );
        obs.insert("x-secret", HeaderValue::from_static("1"));
        obs.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut obs, false);
        assert_eq!(
            obs.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["x-end-to-end"]
        );
    }

    #[test]
    fn request_ids_are_128_bit_hex() {
        let (a, b) = (RequestId::new(), RequestId::new());
        assert_eq!(a.as_str().len(), 32);
        assert!(
            a.as_str()
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        // Every digit value turns up (the nibbles are all used), and threads do not repeat
        // each other's ids.
        let ids: Vec<String> = (0..64).map(|_| RequestId::new().to_string()).collect();
        for digit in "0123456789abcdef".chars() {
            assert!(ids.iter().any(|id| id.contains(digit)), "{digit}");
        }
        let other = std::thread::spawn(|| RequestId::new().to_string())
            .join()
            .unwrap();
        assert!(!ids.contains(&other));
    }
}
