//! Protocol detection on a redirected connection to an HTTP service: the first bytes are
//! peeked (never consumed) and decide between a TLS `ClientHello` (passed through under the L4
//! rule), the HTTP/2 prior-knowledge preface (h2c) and HTTP/1.1.

use std::time::Duration;

use tokio::{net::TcpStream, time::Instant};

/// RFC 9113 §3.4.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Between two peeks of an incomplete prefix (a client that sends the preface in pieces).
const REPEEK: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Tls,
    Http1,
    Http2,
    /// The client closed before sending anything.
    Closed,
    /// Nothing decisive within the wait.
    TimedOut,
}

/// What the first bytes say, or `None` when more are needed.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    match bytes {
        // TLS record type handshake (22), protocol major version 3.
        [] | [0x16] => None,
        [0x16, 0x03, ..] => Some(Detected::Tls),
        _ => {
            let n = bytes.len().min(H2_PREFACE.len());
            if bytes[..n] != H2_PREFACE[..n] {
                Some(Detected::Http1)
            } else if n == H2_PREFACE.len() {
                Some(Detected::Http2)
            } else {
                None
            }
        }
    }
}

/// Peeks until the protocol is known, the peer closes, or `wait` passes.
pub async fn detect(stream: &TcpStream, wait: Duration) -> Detected {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 24];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Err(_) => return Detected::TimedOut,
            Ok(Err(_) | Ok(0)) => return Detected::Closed,
            Ok(Ok(n)) => n,
        };
        if let Some(found) = classify(&buf[..n]) {
            return found;
        }
        // Data is there but not enough of it: peek returns at once until more arrives.
        if Instant::now() + REPEEK >= deadline {
            return Detected::TimedOut;
        }
        tokio::time::sleep(REPEEK).await;
    }
}

/// Most bytes peeked for a `ClientHello`'s SNI (one that does not fit is not logged).
const MAX_HELLO_PEEK: usize = 4096;

/// The server name of the TLS `ClientHello` at the start of `stream`, if the first segment holds
/// it (for the log only: the connection passes through under the L4 rule either way).
pub async fn peek_sni(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; MAX_HELLO_PEEK];
    let n = tokio::time::timeout(Duration::from_millis(100), stream.peek(&mut buf))
        .await
        .ok()?
        .ok()?;
    sni(&buf[..n])
}

/// RFC 8446 §4.1.2 / RFC 6066 §3: record header, handshake header, `ClientHello` fields, then
/// the `server_name` extension's first `host_name`. Any inconsistency: `None`.
pub fn sni(record: &[u8]) -> Option<String> {
    struct Cursor<'a>(&'a [u8]);
    impl<'a> Cursor<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
            self.0 = rest;
            Some(head)
        }
        fn u8(&mut self) -> Option<usize> {
            self.take(1).map(|b| usize::from(b[0]))
        }
        fn u16(&mut self) -> Option<usize> {
            self.take(2)
                .map(|b| usize::from(b[0]) << 8 | usize::from(b[1]))
        }
        fn vec8(&mut self) -> Option<&'a [u8]> {
            let n = self.u8()?;
            self.take(n)
        }
        fn vec16(&mut self) -> Option<&'a [u8]> {
            let n = self.u16()?;
            self.take(n)
        }
    }
    let mut c = Cursor(record);
    if c.u8()? != 0x16 {
        return None;
    }
    c.take(2)?; // legacy record version
    let fragment = c.vec16().unwrap_or(c.0); // a hello split over records: what is there
    let mut h = Cursor(fragment);
    if h.u8()? != 0x01 {
        return None; // not a ClientHello
    }
    h.take(3)?; // handshake length
    h.take(2 + 32)?; // legacy version, random
    h.vec8()?; // session id
    h.vec16()?; // cipher suites
    h.vec8()?; // compression methods
    let mut ext = Cursor(h.vec16()?);
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let data = ext.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Cursor(Cursor(data).vec16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                let ok = !name.is_empty()
                    && name.len() <= 253
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
                return ok.then(|| name.to_ascii_lowercase());
            }
        }
        return None;
    }
    None
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A minimal `ClientHello` with `server_name: name`.
    pub(in crate::proxy) fn hello(name: &str) -> Vec<u8> {
        let n = u16::try_from(name.len()).unwrap();
        let mut sni = Vec::new();
        sni.extend_from_slice(&(n + 3).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&n.to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut exts = vec![0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]; // ec_point_formats, first
        exts.extend_from_slice(&[0x00, 0x00]);
        exts.extend_from_slice(&u16::try_from(sni.len()).unwrap().to_be_bytes());
        exts.extend_from_slice(&sni);
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.extend_from_slice(&[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![0x01, 0x00];
        hs.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn sni_of_a_client_hello() {
        assert_eq!(
            sni(&hello("Grafana.Example.com")).as_deref(),
            Some("grafana.example.com")
        );
        let h = hello("a.b");
        for cut in 0..h.len() {
            assert_eq!(sni(&h[..cut]), None, "cut at {cut}");
        }
        assert_eq!(sni(&hello("bad name")), None);
        assert_eq!(sni(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn classification() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(&[0x16]), None);
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Detected::Tls));
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(b"POST /"), Some(Detected::Http1));
    }
}
