//! Canonical request path: the one form of the path that policy sees and the proxy forwards.
//!
//! "Parse, don't validate": a [`CanonicalPath`] can only be obtained from
//! [`CanonicalPath::parse`], so any code holding one knows the path was decoded exactly once and is
//! unambiguous. Everything a backend might interpret differently from the gateway is rejected
//! (HTTP 400 before policy) instead of being "fixed up": normalising `/a/../admin` to `/admin` is
//! how path-confusion bypasses are born (the gateway normalises one way, the backend another).
//!
//! Percent-decoding is hand-rolled rather than taken from `percent-encoding`: that crate decodes
//! leniently by design (`%zz` passes through, `%2F` becomes `/`, no notion of double encoding),
//! and every one of those leniencies is a rejection reason here. The decoder below is a single
//! pass over the bytes with one decision per byte, which is easy to audit against the list of
//! [`PathError`] variants.
//!
//! Deliberately accepted, because they mean one thing on the Linux backends this gateway fronts:
//! segments of three or more dots (`...`), fullwidth or other look-alike characters (`．．／`),
//! trailing dots and spaces in a segment (`..%20`), `?` and `#` decoded from `%3F` / `%23`
//! (re-encoded on the way out). A Windows/IIS backend folds some of these; such a service needs
//! a stricter check in front of it.

use std::fmt;

/// Longest raw path (request target up to the `?`) accepted, in bytes.
///
/// 8 KiB is the common default request-line limit (nginx `large_client_header_buffers`, Envoy
/// `max_request_headers_kb` is larger but backends usually are not); a longer path is almost
/// certainly an attack or a bug and would be refused by the backend anyway.
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// Why a request target was refused. Every variant maps to a stable reason code
/// ([`PathError::reason_code`]) used in the decision log and on the deny page; codes are only
/// ever added, never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PathError {
    #[error("request target does not start with `/` (only origin-form targets carry a path)")]
    NotAbsolute,
    #[error("request target contains `#`: a fragment is never sent by a conforming client")]
    Fragment,
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    #[error(
        "path contains an encoded slash (%2F): backends disagree on whether it separates segments"
    )]
    EncodedSlash,
    #[error(
        "path contains an encoded backslash (%5C): some backends treat it as a segment separator"
    )]
    EncodedBackslash,
    #[error("path contains a backslash: some backends treat it as a segment separator")]
    Backslash,
    #[error("path contains a `.` or `..` segment (after percent-decoding)")]
    DotSegment,
    #[error(
        "path contains `;`: matrix/path parameters (`..;/`) are interpreted differently by backends"
    )]
    Semicolon,
    #[error("path contains a NUL byte (raw or %00)")]
    Nul,
    #[error("path contains a control character (raw or percent-encoded)")]
    ControlChar,
    #[error("path contains an empty segment (`//`)")]
    EmptySegment,
    #[error("path is double-encoded (%25 decodes to `%`, e.g. %252e)")]
    DoubleEncoding,
    #[error("path decodes to overlong UTF-8 (e.g. %c0%ae), a classic filter bypass")]
    OverlongUtf8,
    #[error("path does not decode to valid UTF-8")]
    InvalidUtf8,
    #[error("path contains a non-standard %u escape (IIS-style %uXXXX)")]
    PercentU,
    #[error("path contains a malformed percent escape (`%` not followed by two hex digits)")]
    MalformedPercent,
    #[error("request target contains a raw space")]
    RawSpace,
    #[error("query contains a control character, a raw space or invalid UTF-8")]
    InvalidQuery,
}

impl PathError {
    /// Every variant, for exhaustive tests and documentation.
    pub const ALL: [Self; 18] = [
        Self::NotAbsolute,
        Self::Fragment,
        Self::TooLong,
        Self::EncodedSlash,
        Self::EncodedBackslash,
        Self::Backslash,
        Self::DotSegment,
        Self::Semicolon,
        Self::Nul,
        Self::ControlChar,
        Self::EmptySegment,
        Self::DoubleEncoding,
        Self::OverlongUtf8,
        Self::InvalidUtf8,
        Self::PercentU,
        Self::MalformedPercent,
        Self::RawSpace,
        Self::InvalidQuery,
    ];

    /// Stable machine-readable code for logs, metrics and the deny page.
    #[must_use]
    pub const fn reason_code(self) -> &'static str {
        match self {
            Self::NotAbsolute => "path_not_absolute",
            Self::Fragment => "path_fragment",
            Self::TooLong => "path_too_long",
            Self::EncodedSlash => "path_encoded_slash",
            Self::EncodedBackslash => "path_encoded_backslash",
            Self::Backslash => "path_backslash",
            Self::DotSegment => "path_dot_segment",
            Self::Semicolon => "path_semicolon",
            Self::Nul => "path_nul",
            Self::ControlChar => "path_control_char",
            Self::EmptySegment => "path_empty_segment",
            Self::DoubleEncoding => "path_double_encoding",
            Self::OverlongUtf8 => "path_overlong_utf8",
            Self::InvalidUtf8 => "path_invalid_utf8",
            Self::PercentU => "path_percent_u",
            Self::MalformedPercent => "path_malformed_percent",
            Self::RawSpace => "path_raw_space",
            Self::InvalidQuery => "path_invalid_query",
        }
    }
}

/// A request path that was percent-decoded exactly once and is free of every construct that
/// backends interpret inconsistently.
///
/// Invariants (established by [`CanonicalPath::parse`], relied on by the matcher):
/// - starts with `/`; valid UTF-8; no control characters (C0, DEL, C1);
/// - no `\`, `;` or `%` anywhere; `/` only as a separator;
/// - no empty segment except a trailing one (`/a/` is allowed, `//` and `/a//b` are not);
/// - no `.` or `..` segment.
///
/// The query is kept verbatim (never decoded, never matched) so that exactly what was evaluated
/// can be forwarded.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CanonicalPath {
    path: Box<str>,
    query: Option<Box<str>>,
}

impl CanonicalPath {
    /// Parses an origin-form request target (`/path?query`, the bytes between method and
    /// version on the request line, or `:path` in HTTP/2).
    ///
    /// # Errors
    /// A [`PathError`] naming the first ambiguity found, in byte order. Byte-level problems
    /// (escapes, forbidden characters) are reported before segment-level ones (`//`, `..`).
    pub fn parse(target: &[u8]) -> Result<Self, PathError> {
        // RFC 9112 §3.2: a request-target never carries a fragment. Checked over the whole target
        // so that `/a#/../b` cannot smuggle anything through the query split either.
        if target.contains(&b'#') {
            return Err(PathError::Fragment);
        }
        let (raw_path, raw_query) = match target.iter().position(|&b| b == b'?') {
            Some(q) => (&target[..q], Some(&target[q + 1..])),
            None => (target, None),
        };
        if raw_path.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        // Checked on the raw bytes: `%2F...` must not become an absolute path by decoding.
        if raw_path.first() != Some(&b'/') {
            return Err(PathError::NotAbsolute);
        }
        let decoded = decode_once(raw_path)?;
        // Overlong forms are checked before the general UTF-8 check only to give them their own
        // reason code; `from_utf8` rejects them too.
        if has_overlong_utf8(&decoded) {
            return Err(PathError::OverlongUtf8);
        }
        let path = String::from_utf8(decoded).map_err(|_| PathError::InvalidUtf8)?;
        // ASCII controls were refused byte by byte; this catches C1 controls (U+0080..U+009F),
        // which some logging and terminal stacks interpret.
        if path.chars().any(char::is_control) {
            return Err(PathError::ControlChar);
        }
        check_segments(&path)?;
        let query = match raw_query {
            Some(q) => Some(parse_query(q)?),
            None => None,
        };
        Ok(Self {
            path: path.into_boxed_str(),
            query,
        })
    }

    /// The decoded path, e.g. `/files/a b`.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The raw (still percent-encoded) query without the `?`, if the target had one.
    #[must_use]
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// The segments between `/` separators: `/` yields `[""]`, `/a/b/` yields `["a", "b", ""]`.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.body().split('/')
    }

    /// The first segment (`""` for `/`): the key the compiled matcher indexes path rules by.
    #[must_use]
    pub fn first_segment(&self) -> &str {
        let body = self.body();
        body.split_once('/').map_or(body, |(first, _)| first)
    }

    /// The path without its leading `/`.
    pub(crate) fn body(&self) -> &str {
        // Invariant: `parse` only builds paths that start with the ASCII byte `/`.
        self.path.get(1..).unwrap_or("")
    }

    /// Re-encodes path and query into an origin-form target to forward upstream. Parsing the
    /// result yields `self` again (tested), so the backend receives exactly what was evaluated.
    #[must_use]
    pub fn to_origin_form(&self) -> String {
        let mut out = String::with_capacity(self.path.len() + 16);
        for &b in self.path.as_bytes() {
            if is_path_safe(b) {
                out.push(char::from(b));
            } else {
                push_pct(&mut out, b);
            }
        }
        if let Some(q) = &self.query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

impl fmt::Debug for CanonicalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CanonicalPath")
            .field("path", &self.path)
            .field("query", &self.query)
            .finish()
    }
}

impl fmt::Display for CanonicalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// Single pass percent-decoder that refuses instead of passing through.
fn decode_once(raw: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        let byte = if b == b'%' {
            let hi = raw.get(i + 1).copied();
            let lo = raw.get(i + 2).copied();
            // `%u002e` is IIS's UTF-16 escape. Checked before hex parsing so it gets its own code
            // (`u` is not a hex digit, so it would otherwise be "malformed").
            if matches!(hi, Some(b'u' | b'U')) {
                return Err(PathError::PercentU);
            }
            let (Some(hi), Some(lo)) = (hi.and_then(hex_val), lo.and_then(hex_val)) else {
                return Err(PathError::MalformedPercent);
            };
            let d = (hi << 4) | lo;
            match d {
                b'/' => return Err(PathError::EncodedSlash),
                b'\\' => return Err(PathError::EncodedBackslash),
                // A `%` produced by decoding means the client encoded twice; a backend that
                // decodes again would see a different path than policy did.
                b'%' => return Err(PathError::DoubleEncoding),
                _ => {}
            }
            check_plain_byte(d)?;
            i += 3;
            d
        } else {
            if b == b' ' {
                return Err(PathError::RawSpace);
            }
            check_plain_byte(b)?;
            i += 1;
            b
        };
        out.push(byte);
    }
    Ok(out)
}

/// Rules shared by raw and decoded bytes.
fn check_plain_byte(b: u8) -> Result<(), PathError> {
    match b {
        0 => Err(PathError::Nul),
        b'\\' => Err(PathError::Backslash),
        b';' => Err(PathError::Semicolon),
        c if c.is_ascii_control() => Err(PathError::ControlChar),
        _ => Ok(()),
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Overlong UTF-8: a code point encoded with more bytes than needed (`C0 AE` for `.`). Such
/// sequences are invalid UTF-8, but old decoders accepted them, so they get a dedicated code.
fn has_overlong_utf8(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| match (w[0], w[1]) {
        (0xC0 | 0xC1, _) => true,
        (0xE0, b) => (0x80..0xA0).contains(&b),
        (0xF0, b) => (0x80..0x90).contains(&b),
        _ => false,
    }) || matches!(bytes.last(), Some(0xC0 | 0xC1))
}

fn check_segments(path: &str) -> Result<(), PathError> {
    let body = path.get(1..).unwrap_or("");
    let mut segments = body.split('/').peekable();
    while let Some(seg) = segments.next() {
        let is_last = segments.peek().is_none();
        // A trailing empty segment (`/dir/`) is meaningful and unambiguous; any other empty
        // segment is `//`, which backends collapse (or not) differently.
        if seg.is_empty() && !is_last {
            return Err(PathError::EmptySegment);
        }
        if seg == "." || seg == ".." {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

/// The query is forwarded verbatim and never matched, so it is only checked for what could break
/// framing or logs: controls, raw spaces, non-UTF-8.
fn parse_query(raw: &[u8]) -> Result<Box<str>, PathError> {
    if raw.iter().any(|&b| b == b' ' || b.is_ascii_control()) {
        return Err(PathError::InvalidQuery);
    }
    let q = std::str::from_utf8(raw).map_err(|_| PathError::InvalidQuery)?;
    if q.chars().any(char::is_control) {
        return Err(PathError::InvalidQuery);
    }
    Ok(q.into())
}

/// RFC 3986 `pchar` minus `%` and `;`, plus `/`: bytes that can appear raw in a re-encoded path.
fn is_path_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

fn push_pct(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0x0F)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        match CanonicalPath::parse(raw.as_bytes()) {
            Ok(p) => p.as_str().to_owned(),
            Err(e) => panic!("{raw:?} rejected: {e}"),
        }
    }

    fn err(raw: &[u8]) -> PathError {
        match CanonicalPath::parse(raw) {
            Ok(p) => panic!("{:?} accepted as {p:?}", String::from_utf8_lossy(raw)),
            Err(e) => e,
        }
    }

    #[test]
    fn accepts_and_decodes_once() {
        let cases: &[(&str, &str)] = &[
            ("/", "/"),
            ("/admin", "/admin"),
            ("/admin/", "/admin/"),
            ("/a/b/c", "/a/b/c"),
            ("/a%20b", "/a b"),
            ("/%41%62c", "/Abc"),
            ("/%7e/%7E", "/~/~"),
            ("/caf%C3%A9", "/café"),
            ("/café", "/café"),
            ("/%E2%82%AC", "/€"),
            ("/%F0%9F%98%80", "/😀"),
            ("/...", "/..."),
            ("/.../x", "/.../x"),
            ("/.hidden", "/.hidden"),
            ("/a.", "/a."),
            ("/..a", "/..a"),
            ("/a..b", "/a..b"),
            ("/%2ea", "/.a"),
            ("/a%3Fb", "/a?b"),
            ("/a%23b", "/a#b"),
            ("/a?b", "/a"),
            ("/a?", "/a"),
            ("/a?x=%2e%2e/../;", "/a"),
            ("/a?x=1&y=%00", "/a"),
            ("/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
            ("/%3a", "/:"),
            ("/%2B", "/+"),
            ("/a/b/", "/a/b/"),
        ];
        for (raw, want) in cases {
            assert_eq!(ok(raw), *want, "input {raw:?}");
        }
    }

    #[test]
    fn query_is_kept_verbatim_and_never_decoded() {
        let p = CanonicalPath::parse(b"/a%20b?x=%2e%2e&y=/..//;").unwrap();
        assert_eq!(p.as_str(), "/a b");
        assert_eq!(p.query(), Some("x=%2e%2e&y=/..//;"));
        assert_eq!(p.to_origin_form(), "/a%20b?x=%2e%2e&y=/..//;");
        assert_eq!(CanonicalPath::parse(b"/a").unwrap().query(), None);
        assert_eq!(CanonicalPath::parse(b"/a?").unwrap().query(), Some(""));
    }

    /// Table of (input, expected error). Each `PathError` variant appears at least once (checked).
    const REJECT: &[(&[u8], PathError)] = &[
        // Not origin-form.
        (b"", PathError::NotAbsolute),
        (b"admin", PathError::NotAbsolute),
        (b"*", PathError::NotAbsolute),
        (b"http://evil/admin", PathError::NotAbsolute),
        (b"%2Fadmin", PathError::NotAbsolute),
        (b"?x=1", PathError::NotAbsolute),
        (b"../admin", PathError::NotAbsolute),
        // Fragment.
        (b"/a#b", PathError::Fragment),
        (b"/a?x#y", PathError::Fragment),
        (b"#", PathError::Fragment),
        // Encoded separators.
        (b"/a%2fb", PathError::EncodedSlash),
        (b"/a%2Fb", PathError::EncodedSlash),
        (b"/..%2fadmin", PathError::EncodedSlash),
        (b"/a%5cb", PathError::EncodedBackslash),
        (b"/a%5Cb", PathError::EncodedBackslash),
        (b"/a\\b", PathError::Backslash),
        (b"/\\evil", PathError::Backslash),
        (b"/..\\admin", PathError::Backslash),
        // Dot segments, raw and encoded in every mix.
        (b"/.", PathError::DotSegment),
        (b"/..", PathError::DotSegment),
        (b"/./", PathError::DotSegment),
        (b"/a/./b", PathError::DotSegment),
        (b"/a/../admin", PathError::DotSegment),
        (b"/admin/..", PathError::DotSegment),
        (b"/%2e", PathError::DotSegment),
        (b"/%2E%2E", PathError::DotSegment),
        (b"/%2e%2e/admin", PathError::DotSegment),
        (b"/.%2e/admin", PathError::DotSegment),
        (b"/%2e./admin", PathError::DotSegment),
        (b"/a/%2e/b", PathError::DotSegment),
        (b"/a/..?x", PathError::DotSegment),
        // Matrix parameters.
        (b"/a;b", PathError::Semicolon),
        (b"/..;/admin", PathError::Semicolon),
        (b"/admin;jsessionid=1", PathError::Semicolon),
        (b"/a%3bb", PathError::Semicolon),
        (b"/a%3B/b", PathError::Semicolon),
        // NUL and controls.
        (b"/a\0b", PathError::Nul),
        (b"/a%00b", PathError::Nul),
        (b"/admin%00.html", PathError::Nul),
        (b"/a\rb", PathError::ControlChar),
        (b"/a\nb", PathError::ControlChar),
        (b"/a\tb", PathError::ControlChar),
        (b"/a%0d%0aSet-Cookie:x", PathError::ControlChar),
        (b"/a%09", PathError::ControlChar),
        (b"/a%7f", PathError::ControlChar),
        (b"/a\x7f", PathError::ControlChar),
        (b"/a%C2%85", PathError::ControlChar),
        (b"/a%c2%9f", PathError::ControlChar),
        // Empty segments.
        (b"//", PathError::EmptySegment),
        (b"//admin", PathError::EmptySegment),
        (b"/a//b", PathError::EmptySegment),
        (b"/a///", PathError::EmptySegment),
        (b"//evil.example/", PathError::EmptySegment),
        // Double encoding.
        (b"/%25", PathError::DoubleEncoding),
        (b"/%252e%252e/admin", PathError::DoubleEncoding),
        (b"/a%252fb", PathError::DoubleEncoding),
        (b"/%25%32%65", PathError::DoubleEncoding),
        // Overlong and invalid UTF-8.
        (b"/%c0%ae%c0%ae/admin", PathError::OverlongUtf8),
        (b"/%c0%af", PathError::OverlongUtf8),
        (b"/%C1%9C", PathError::OverlongUtf8),
        (b"/%e0%80%ae", PathError::OverlongUtf8),
        (b"/%f0%80%80%ae", PathError::OverlongUtf8),
        (b"/%c0", PathError::OverlongUtf8),
        (b"/\xc0\xae", PathError::OverlongUtf8),
        (b"/%ff", PathError::InvalidUtf8),
        (b"/%80", PathError::InvalidUtf8),
        (b"/%c3", PathError::InvalidUtf8),
        (b"/%c3%28", PathError::InvalidUtf8),
        (b"/%ed%a0%80", PathError::InvalidUtf8),
        (b"/%f4%90%80%80", PathError::InvalidUtf8),
        (b"/\xff", PathError::InvalidUtf8),
        // IIS %u escapes.
        (b"/%u002e%u002e/admin", PathError::PercentU),
        (b"/%U2215", PathError::PercentU),
        (b"/%u", PathError::PercentU),
        // Malformed escapes.
        (b"/%", PathError::MalformedPercent),
        (b"/%4", PathError::MalformedPercent),
        (b"/%zz", PathError::MalformedPercent),
        (b"/%g0", PathError::MalformedPercent),
        (b"/%0g", PathError::MalformedPercent),
        (b"/%%30", PathError::MalformedPercent),
        (b"/a%?", PathError::MalformedPercent),
        (b"/%+2e", PathError::MalformedPercent),
        // Raw space, query garbage.
        (b"/a b", PathError::RawSpace),
        (b"/a?b c", PathError::InvalidQuery),
        (b"/a?b\0", PathError::InvalidQuery),
        (b"/a?b\r\nX: y", PathError::InvalidQuery),
        (b"/a?\xff", PathError::InvalidQuery),
    ];

    #[test]
    fn rejects_ambiguous_targets() {
        for (raw, want) in REJECT {
            let got = err(raw);
            assert_eq!(got, *want, "input {:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn too_long_is_rejected_and_limit_is_inclusive() {
        let mut at_limit = vec![b'a'; MAX_PATH_LEN];
        at_limit[0] = b'/';
        assert!(CanonicalPath::parse(&at_limit).is_ok());
        at_limit.push(b'a');
        assert_eq!(err(&at_limit), PathError::TooLong);
        // The query does not count towards the path limit.
        let mut long_query = b"/a?".to_vec();
        long_query.extend(std::iter::repeat_n(b'q', MAX_PATH_LEN * 2));
        assert!(CanonicalPath::parse(&long_query).is_ok());
    }

    #[test]
    fn every_variant_is_exercised_and_codes_are_unique() {
        let mut seen: Vec<PathError> = REJECT.iter().map(|(_, e)| *e).collect();
        seen.push(PathError::TooLong);
        for v in PathError::ALL {
            assert!(seen.contains(&v), "{v:?} has no test case");
        }
        let mut codes: Vec<&str> = PathError::ALL.iter().map(|e| e.reason_code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), PathError::ALL.len());
        assert!(codes.iter().all(|c| c.starts_with("path_")));
    }

    #[test]
    fn segments_and_first_segment() {
        let p = CanonicalPath::parse(b"/a/b/").unwrap();
        assert_eq!(p.segments().collect::<Vec<_>>(), ["a", "b", ""]);
        assert_eq!(p.first_segment(), "a");
        let root = CanonicalPath::parse(b"/").unwrap();
        assert_eq!(root.segments().collect::<Vec<_>>(), [""]);
        assert_eq!(root.first_segment(), "");
        assert_eq!(
            CanonicalPath::parse(b"/only").unwrap().first_segment(),
            "only"
        );
    }

    #[test]
    fn origin_form_round_trips() {
        for raw in [
            "/",
            "/a%20b",
            "/a%3Fb%23c",
            "/caf%C3%A9/%E2%82%AC",
            "/x?y=%2e",
            "/a:b@c!$&'()*+,=",
            "/%22%3C%3E%60%7B%7D%7C%5E",
        ] {
            let p = CanonicalPath::parse(raw.as_bytes()).unwrap();
            let again = CanonicalPath::parse(p.to_origin_form().as_bytes()).unwrap();
            assert_eq!(p, again, "{raw}");
        }
        let p = CanonicalPath::parse(b"/a%3Fb").unwrap();
        assert_eq!(p.to_origin_form(), "/a%3Fb");
    }

    /// Checks the invariants every accepted path must hold, independent of how it was produced.
    fn assert_canonical(p: &CanonicalPath, input: &[u8]) {
        let s = p.as_str();
        let ctx = String::from_utf8_lossy(input);
        assert!(s.starts_with('/'), "{ctx:?} -> {s:?}");
        assert!(!s.contains('\\'), "{ctx:?} -> {s:?}");
        assert!(!s.contains(';'), "{ctx:?} -> {s:?}");
        assert!(!s.contains('%'), "{ctx:?} -> {s:?}");
        assert!(!s.chars().any(char::is_control), "{ctx:?} -> {s:?}");
        assert!(!s.contains("//"), "{ctx:?} -> {s:?}");
        for seg in p.segments() {
            assert!(seg != "." && seg != "..", "{ctx:?} -> {s:?}");
        }
        let again = CanonicalPath::parse(p.to_origin_form().as_bytes())
            .unwrap_or_else(|e| panic!("{ctx:?}: re-encoded form rejected: {e}"));
        assert_eq!(&again, p, "{ctx:?}: not idempotent");
        assert_eq!(again.to_origin_form(), p.to_origin_form());
    }

    /// Hand-written traversal and encoding attacks (the classic wfuzz/dotdotpwn families), each
    /// prefixed three ways. None may produce a path with `..`, `//` or `\`.
    #[test]
    fn traversal_corpus_never_yields_traversal() {
        const CORPUS: &[&str] = &[
            "../../../../etc/passwd",
            "..%2f..%2f..%2fetc%2fpasswd",
            "..%2F..%2F..%2Fetc%2Fpasswd",
            "%2e%2e/%2e%2e/etc/passwd",
            "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            "%252e%252e%252fetc%252fpasswd",
            "%252e%252e/etc/passwd",
            "..%252f..%252fetc/passwd",
            "%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
            "%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
            "%c1%1c%c1%1cetc/passwd",
            "%e0%80%ae%e0%80%ae/etc/passwd",
            "%f0%80%80%ae%f0%80%80%ae/etc/passwd",
            "%uff0e%uff0e/etc/passwd",
            "%u002e%u002e/etc/passwd",
            "..%u2215..%u2215etc/passwd",
            "..\\..\\..\\windows\\win.ini",
            "..%5c..%5cwindows%5cwin.ini",
            "..%255c..%255cwindows",
            "..;/..;/admin",
            "..;/admin",
            "/..;/admin",
            ";/admin",
            "admin;/../secret",
            "%2e%2e;/admin",
            "....//....//etc/passwd",
            "..//..//etc/passwd",
            ".//.//etc/passwd",
            "./.././../etc/passwd",
            "..%00/etc/passwd",
            "etc/passwd%00.html",
            "%00../../etc/passwd",
            "..%0d%0a/etc/passwd",
            "..%09/etc/passwd",
            ".%2e/.%2e/etc/passwd",
            "%2e./%2e./etc/passwd",
            "..%2e/etc/passwd",
            "%%32%65%%32%65/etc/passwd",
            "%25%32%65%25%32%65/etc/passwd",
            "..%c0%af..%c0%afetc/passwd",
            "..%c1%9c..%c1%9cwindows",
            "..%ef%bc%8f..%ef%bc%8fetc/passwd",
            "/%2e%2e/%2e%2e/etc/passwd",
            "//evil.example/%2e%2e",
            "/\\evil.example",
            "/admin/..%2f",
            "/admin/%2e%2e/",
            "/admin/./",
            "/admin/.%00/",
            "admin#/../../etc/passwd",
            "admin?/../../etc/passwd",
        ];
        let mut accepted = 0;
        for attack in CORPUS {
            for prefix in ["", "/", "/app/"] {
                let input = format!("{prefix}{attack}");
                if let Ok(p) = CanonicalPath::parse(input.as_bytes()) {
                    assert_canonical(&p, input.as_bytes());
                    accepted += 1;
                }
            }
        }
        // Only benign readings survive: e.g. `....//` is rejected for `//`, `/admin?/../..`
        // leaves `..` in the query. Keep the number visible so a regression shows up.
        assert!(accepted <= 12, "{accepted} attack inputs accepted");
    }

    /// The wordlists shipped by Debian's `wfuzz` package (GPL, so read in place rather than
    /// vendored). Not silently skipped: ignored by default with the reason stated, and it fails
    /// loudly when asked to run without the lists.
    #[test]
    #[ignore = "needs Debian package wfuzz (apt-get install -y wfuzz); run with --ignored"]
    fn wfuzz_wordlists_never_yield_traversal() {
        const ROOT: &str = "/usr/share/wfuzz/wordlist";
        let mut files = vec![
            format!("{ROOT}/Injections/Traversal.txt"),
            format!("{ROOT}/Injections/All_attack.txt"),
            format!("{ROOT}/stress/uri_hex.txt"),
            format!("{ROOT}/stress/doble_uri_hex.txt"),
        ];
        let vulns = std::fs::read_dir(format!("{ROOT}/vulns"))
            .unwrap_or_else(|e| panic!("{ROOT}/vulns: {e}; install the wfuzz package"));
        for entry in vulns.flatten() {
            files.push(entry.path().display().to_string());
        }
        let (mut lines, mut accepted) = (0usize, 0usize);
        for file in &files {
            let data = std::fs::read(file).unwrap_or_else(|e| panic!("{file}: {e}"));
            for line in data.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                for prefix in [&b""[..], b"/", b"/app/"] {
                    let input = [prefix, line].concat();
                    lines += 1;
                    if let Ok(p) = CanonicalPath::parse(&input) {
                        assert_canonical(&p, &input);
                        accepted += 1;
                    }
                }
            }
        }
        assert!(lines > 20_000, "only {lines} inputs read");
        eprintln!("wfuzz: {lines} inputs, {accepted} accepted, all canonical");
    }

    /// Small deterministic PRNG (xorshift64*): no dev-dependency needed for a property test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % (n as u64)).unwrap_or(0)
        }
    }

    /// Property: for random byte strings `parse` never panics, and every accepted path holds the
    /// invariants and re-encodes to itself. Inputs are drawn from an alphabet biased towards the
    /// interesting bytes (`%`, hex digits, `.`, `/`, `;`, `\`, high bytes) so the rejection
    /// branches are all reached, plus fully random bytes.
    #[test]
    fn property_random_inputs_never_panic_and_ok_is_idempotent() {
        const ALPHABET: &[u8] =
            b"%%%%..//;\\?#0123456789abcdefABCDEFuUxz \0\t\x7f\xc0\xae\xc3\xa9\xe2\x82\xac\xff";
        const ESCAPES: &[&str] = &[
            "%2e",
            "%2E",
            "%2f",
            "%5c",
            "%25",
            "%00",
            "%c0%ae",
            "%c3%a9",
            "%3b",
            "%3f",
            "%23",
            "%20",
            "%u002e",
            "%e2%82%ac",
            "%41",
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut ok_count, mut total) = (0u32, 0u32);
        for round in 0..200_000u32 {
            let len = rng.below(24);
            let mut input = Vec::with_capacity(len + 1);
            if round % 4 != 0 {
                input.push(b'/');
            }
            for _ in 0..len {
                match rng.below(10) {
                    0..=4 => input.push(ALPHABET[rng.below(ALPHABET.len())]),
                    5..=6 => input.extend_from_slice(ESCAPES[rng.below(ESCAPES.len())].as_bytes()),
                    7 => input.push(b'/'),
                    8 => input.push(b'a' + u8::try_from(rng.below(26)).unwrap_or(0)),
                    _ => input.push(u8::try_from(rng.next() & 0xFF).unwrap_or(0)),
                }
            }
            total += 1;
            if let Ok(p) = CanonicalPath::parse(&input) {
                ok_count += 1;
                assert_canonical(&p, &input);
            }
        }
        // Make sure the generator exercises both outcomes meaningfully.
        assert!(ok_count > 1_000, "only {ok_count}/{total} accepted");
        assert!(ok_count < total / 2, "{ok_count}/{total} accepted");
    }
}
