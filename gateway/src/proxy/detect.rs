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

#[cfg(test)]
mod tests {
    use super::*;

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
