//! JSON written by hand for the decision log's lines: what `serde_json` writes, byte for byte
//! (the unit tests hold them to it), without its per-field and per-byte overhead on the request
//! path. Used by the request line (`decision::RequestLine`) and the tracing layer's format
//! (`format::DecisionFormat`) alike.

use std::net::SocketAddr;

/// The members of an object, written one after the other with the commas between them.
pub(super) struct Members<'a> {
    pub(super) buf: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Members<'a> {
    /// More members of an object whose earlier ones are in `buf` already.
    pub(super) const fn after(buf: &'a mut Vec<u8>) -> Self {
        Self { buf, first: false }
    }

    /// `"name":`, after a comma unless it is the object's first member (names are the
    /// gateway's own: nothing to escape).
    pub(super) fn key(&mut self, name: &'static str) {
        if !std::mem::take(&mut self.first) {
            self.buf.push(b',');
        }
        self.buf.push(b'"');
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b"\":");
    }

    pub(super) fn str(&mut self, name: &'static str, value: &str) {
        self.key(name);
        string(self.buf, value);
    }

    pub(super) fn opt_str(&mut self, name: &'static str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(name, value);
        }
    }

    pub(super) fn u64(&mut self, name: &'static str, value: u64) {
        self.key(name);
        let (digits, from) = decimal(value);
        self.buf.extend_from_slice(&digits[from..]);
    }

    pub(super) fn addr(&mut self, name: &'static str, addr: &SocketAddr) {
        self.key(name);
        self.buf.push(b'"');
        match addr {
            SocketAddr::V4(v4) => {
                let mut text = [0u8; V4_ADDR_LEN];
                let len = write_v4(&mut text, *v4);
                self.buf.extend_from_slice(&text[..len]);
            }
            // Hex digits, `[`, `]`, `:`, `%` and a scope id: nothing to escape.
            SocketAddr::V6(_) => {
                use std::io::Write as _;
                let _ = write!(self.buf, "{addr}");
            }
        }
        self.buf.push(b'"');
    }

    /// A nested object as the value of `name`; [`Self::end`] closes it.
    pub(super) fn object(&mut self, name: &'static str) -> Members<'_> {
        self.key(name);
        self.buf.push(b'{');
        Members {
            buf: self.buf,
            first: true,
        }
    }

    pub(super) fn end(self) {
        self.buf.push(b'}');
    }
}

/// `n` in decimal: the digits are `.0[.1..]`.
fn decimal(n: u64) -> ([u8; 20], usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        // `n % 10` < 10: the cast cannot truncate.
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return (digits, i);
        }
    }
}

/// The longest IPv4 socket address: `255.255.255.255:65535`.
pub(super) const V4_ADDR_LEN: usize = 21;

/// Writes `a.b.c.d:port` into `buf` as `Display` writes it, returns its length. IPv4 addresses
/// (every request line has two or three) are written digit by digit: `core::fmt`'s
/// padding-aware path per octet was ~4% of a request's instructions (callgrind,
/// `benches/request_path.rs`).
pub(super) fn write_v4(buf: &mut [u8; V4_ADDR_LEN], addr: std::net::SocketAddrV4) -> usize {
    let mut at = 0;
    let mut push = |n: u16, after: Option<u8>| {
        let (digits, from) = decimal(u64::from(n));
        for &d in &digits[from..] {
            buf[at] = d;
            at += 1;
        }
        if let Some(sep) = after {
            buf[at] = sep;
            at += 1;
        }
    };
    let [a, b, c, d] = addr.ip().octets();
    push(a.into(), Some(b'.'));
    push(b.into(), Some(b'.'));
    push(c.into(), Some(b'.'));
    push(d.into(), Some(b':'));
    push(addr.port(), None);
    at
}

/// Whether `serde_json` escapes `b`: `"`, `\` and the control characters below 0x20.
pub(super) const fn escaped(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// `s` as a JSON string, escaped as `serde_json` escapes it (short forms for `\b \f \n
/// \r \t`, `\u00xx` in lowercase hex for the other control characters, everything else
/// as is). Checked 8 bytes at a time ([`word_needs_escape`]): strings in a line rarely need
/// an escape at all, and then they are copied as they are.
pub(super) fn string(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    buf.reserve(bytes.len() + 2);
    buf.push(b'"');
    let mut done = 0;
    let (words, rest) = bytes.as_chunks::<8>();
    let mut at = 0;
    for word in words {
        if word_needs_escape(u64::from_le_bytes(*word)) {
            done = escape_from(buf, bytes, done, at, at + 8);
        }
        at += 8;
    }
    // The last 0-7 bytes, in a copy padded with a plain byte.
    let mut w = [b'a'; 8];
    w[..rest.len()].copy_from_slice(rest);
    if word_needs_escape(u64::from_le_bytes(w)) {
        done = escape_from(buf, bytes, done, at, bytes.len());
    }
    buf.extend_from_slice(&bytes[done..]);
    buf.push(b'"');
}

/// Whether any of the 8 bytes in `x` is one that `serde_json` escapes: below 0x20, `"` or
/// `\`. The exact tests "has a byte less than n" and "has a zero byte" of Bit Twiddling
/// Hacks (a byte of 0x80 or more never matches: its high bit is masked by `!x`).
pub(super) const fn word_needs_escape(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const fn has_zero(v: u64) -> u64 {
        v.wrapping_sub(ONES) & !v & HIGH
    }
    let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
    let quote = has_zero(x ^ (ONES * b'"' as u64));
    let backslash = has_zero(x ^ (ONES * b'\\' as u64));
    control | quote | backslash != 0
}

/// Escapes the bytes of `bytes[from..to]` that need it, copying what lies between `done`
/// and each of them first; returns how far `bytes` is written.
fn escape_from(buf: &mut Vec<u8>, bytes: &[u8], mut done: usize, from: usize, to: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, &b) in bytes[from..to].iter().enumerate() {
        if !escaped(b) {
            continue;
        }
        buf.extend_from_slice(&bytes[done..from + i]);
        done = from + i + 1;
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            0x08 => buf.extend_from_slice(b"\\b"),
            0x0c => buf.extend_from_slice(b"\\f"),
            _ => buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
    }
    done
}

/// The `timestamp` of a decision line: RFC 3339 in UTC with microseconds
/// (`2026-12-06T16:40:00.123456Z`), as `tracing-subscriber`'s `SystemTime` writes it.
pub(super) mod timestamp {
    use std::{
        cell::Cell,
        time::{SystemTime, UNIX_EPOCH},
    };

    /// `YYYY-MM-DDTHH:MM:SS`
    const SECOND_LEN: usize = 19;

    thread_local! {
        /// The last second this thread formatted, and its text: a date is computed once a
        /// second, not once a line.
        static SECOND: Cell<(u64, [u8; SECOND_LEN])> = const { Cell::new((u64::MAX, [0; SECOND_LEN])) };
    }

    pub(in crate::telemetry) fn write(buf: &mut Vec<u8>, now: SystemTime) {
        // Before 1970 (a clock set wrong) the line says 1970: a timestamp is never left out.
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (cached, text) = SECOND.get();
        let text = if cached == secs {
            text
        } else {
            let text = second_text(secs);
            SECOND.set((secs, text));
            text
        };
        buf.extend_from_slice(&text);
        buf.push(b'.');
        let mut micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        for d in digits.iter_mut().rev() {
            // `micros % 10` < 10: the cast cannot truncate.
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        buf.extend_from_slice(&digits);
        buf.push(b'Z');
    }

    fn second_text(secs: u64) -> [u8; SECOND_LEN] {
        let mut text = [b'0'; SECOND_LEN];
        let time = i64::try_from(secs)
            .ok()
            .and_then(|s| chrono::DateTime::<chrono::Utc>::from_timestamp(s, 0))
            .unwrap_or_default();
        let formatted = time.format("%Y-%m-%dT%H:%M:%S").to_string();
        if formatted.len() == SECOND_LEN {
            text.copy_from_slice(formatted.as_bytes());
        }
        text
    }

    #[cfg(test)]
    mod tests {
        use std::time::Duration;

        use super::*;

        #[test]
        fn timestamps_are_rfc3339_utc_with_microseconds_as_chrono_writes_them() {
            let mut buf = Vec::new();
            for (secs, nanos) in [
                (0, 0),
                (1, 999_999_999),
                (951_782_400, 1_000),       // 2000-02-29
                (1_798_761_599, 123_456),   // 2026-12-31T23:59:59
                (1_798_761_600, 7_000_000), // 2027-01-01
                (4_102_444_800, 500),       // 2100-01-01
                (1_798_761_599, 999_999),
            ] {
                let at = UNIX_EPOCH + Duration::new(secs, nanos);
                // Twice: computed, then from the cached second.
                for _ in 0..2 {
                    buf.clear();
                    write(&mut buf, at);
                    let want = chrono::DateTime::<chrono::Utc>::from(at)
                        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                    assert_eq!(String::from_utf8_lossy(&buf), want, "{secs}.{nanos:09}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written strings and numbers are `serde_json`'s, byte for byte: every byte that
    /// is escaped, at every position around the 8-byte words, and UTF-8 beside them.
    #[test]
    fn hand_written_json_is_serde_jsons() {
        let mut corpus: Vec<String> = vec![
            String::new(),
            "plain".to_owned(),
            "é ü 漢字 🦀 \u{7f}".to_owned(),
            "\"\\".repeat(20),
            "quote \" and backslash \\".to_owned(),
            "lines\nand\rtabs\t".to_owned(),
            "\u{0}\u{1}\u{8}\u{c}\u{1f}\u{7f}".to_owned(),
            "/a%2Fb?x=\"y\"".to_owned(),
        ];
        for b in (0u8..0x20).chain([b'"', b'\\', 0x7f]) {
            for at in [0, 1, 6, 7, 8, 9, 14, 15, 16, 17, 23, 24, 31, 32, 40] {
                let mut text = "a".repeat(at);
                text.push(char::from(b));
                text.push_str("é-tail-0123456789");
                corpus.push(text);
            }
        }
        for text in corpus {
            let mut buf = Vec::new();
            string(&mut buf, &text);
            assert_eq!(buf, serde_json::to_vec(&text).unwrap(), "{text:?}");
        }
        // Every byte in every position of a word, beside plain and non-ASCII bytes.
        for b in 0..=255u8 {
            for at in 0..8 {
                for fill in [b'a', 0x80, 0xff] {
                    let mut w = [fill; 8];
                    w[at] = b;
                    assert_eq!(
                        word_needs_escape(u64::from_le_bytes(w)),
                        escaped(b),
                        "{b:#x} at {at} among {fill:#x}"
                    );
                }
            }
        }
        for n in [0, 1, 9, 10, 99, 100, 123_456, u64::MAX] {
            let mut buf = Vec::new();
            Members::after(&mut buf).u64("n", n);
            assert_eq!(String::from_utf8(buf).unwrap(), format!(",\"n\":{n}"));
        }
    }
}
