//! HTTP/1.1 framing checks that hyper does not make, on the bytes as they arrive.
//!
//! hyper (1.x) parses request heads with httparse and decides the body length itself, and a few
//! of its choices are lenient in ways that matter in front of another parser (request
//! smuggling):
//!
//! | input | httparse / hyper | here |
//! |---|---|---|
//! | bare LF as a line ending in the head | accepted by httparse | `framing_bare_lf` |
//! | both `Content-Length` and `Transfer-Encoding` | accepted: the length is dropped | `framing_cl_and_te` |
//! | two equal `Content-Length` | accepted (deduplicated) | `framing_duplicate_content_length` |
//! | two different `Content-Length` | rejected (400 from hyper) | `framing_duplicate_content_length` |
//! | `Transfer-Encoding: gzip, chunked`, `xchunked`, two TE headers | first accepted, others rejected or read to EOF | `framing_transfer_encoding` |
//! | `Content-Length: +5` / `5, 5` | rejected by hyper | `framing_invalid_content_length` |
//! | bare LF in a chunk-size line or trailer | accepted | `framing_bare_lf` |
//!
//! hyper drops the `Content-Length` of a message that also has `Transfer-Encoding` before the
//! request reaches the service, so these checks cannot be made on the parsed request: this
//! module wraps the connection's reader and follows the message framing itself (head, then a
//! fixed-length or chunked body, then the next head). A violation stops the byte stream *before*
//! the offending line ending is handed to hyper, so hyper never completes a head that contains
//! one; the connection then answers 400 and closes (see `super::serve_http1`).
//!
//! After a request that asks for an upgrade (or `CONNECT`), the rest of the stream is opaque.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest request head followed (hyper's own limit is larger; an honest client is far below).
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line (size plus extensions).
const MAX_CHUNK_LINE: usize = 1024;
/// Most headers httparse is asked to parse (hyper's default limit is 100).
const MAX_HEADERS: usize = 128;

/// Why a request's framing was refused; `code()` is the decision-log reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("a line of the request head ends in a bare LF (no CR)")]
    BareLf,
    #[error("the request has both Content-Length and Transfer-Encoding")]
    ContentLengthAndTransferEncoding,
    #[error("the request has more than one Content-Length")]
    DuplicateContentLength,
    #[error("Content-Length is not a decimal number")]
    InvalidContentLength,
    #[error("Transfer-Encoding is not exactly `chunked` (or appears twice)")]
    TransferEncoding,
    #[error("malformed chunked body")]
    Chunk,
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
}

impl FramingError {
    pub const fn code(self) -> &'static str {
        match self {
            Self::BareLf => "framing_bare_lf",
            Self::ContentLengthAndTransferEncoding => "framing_cl_and_te",
            Self::DuplicateContentLength => "framing_duplicate_content_length",
            Self::InvalidContentLength => "framing_invalid_content_length",
            Self::TransferEncoding => "framing_transfer_encoding",
            Self::Chunk => "framing_chunk",
            Self::HeadTooLarge => "framing_head_too_large",
        }
    }
}

/// What is known of the refused request, for its decision line and the 400 page.
#[derive(Debug, Clone, Default)]
pub struct Refused {
    pub error: Option<FramingError>,
    pub method: Option<String>,
    pub target: Option<String>,
    pub host: Option<String>,
    pub accept_html: bool,
}

/// Told once when the guard refuses a request (the connection handler).
pub trait OnRefused: Send + Sync {
    fn refused(&self, refused: Refused);
}

impl OnRefused for Mutex<Option<Refused>> {
    fn refused(&self, refused: Refused) {
        *self.lock().unwrap_or_else(PoisonError::into_inner) = Some(refused);
    }
}

#[derive(Debug)]
enum State {
    /// Collecting a request head in `line`.
    Head,
    Body {
        remaining: u64,
    },
    ChunkSize,
    ChunkData {
        remaining: u64,
    },
    /// Expecting the CRLF after a chunk's data; `seen_cr` after the CR.
    ChunkEnd {
        seen_cr: bool,
    },
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
    /// After an upgrade request: no more HTTP/1 framing to follow.
    Opaque,
}

/// The framing follower over a connection's reader; writes pass through.
pub struct FramingGuard<IO> {
    io: IO,
    state: State,
    /// The current head, chunk-size line or trailer section.
    line: Vec<u8>,
    on_refused: Arc<dyn OnRefused>,
    failed: bool,
}

impl<IO> FramingGuard<IO> {
    pub fn new(io: IO, on_refused: Arc<dyn OnRefused>) -> Self {
        Self {
            io,
            state: State::Head,
            line: Vec::with_capacity(1024),
            on_refused,
            failed: false,
        }
    }

    /// Follows `bytes`; returns how many may be handed on, and the error at that point.
    fn scan(&mut self, bytes: &[u8]) -> (usize, Option<Refused>) {
        let mut i = 0;
        while i < bytes.len() {
            match &mut self.state {
                State::Opaque => return (bytes.len(), None),
                State::Body { remaining } | State::ChunkData { remaining } => {
                    let take = usize::try_from(*remaining)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len() - i);
                    i += take;
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        self.state = match self.state {
                            State::ChunkData { .. } => State::ChunkEnd { seen_cr: false },
                            _ => State::Head,
                        };
                    }
                }
                State::ChunkEnd { seen_cr } => {
                    let b = bytes[i];
                    match (b, *seen_cr) {
                        (b'\r', false) => *seen_cr = true,
                        (b'\n', true) => self.state = State::ChunkSize,
                        (b'\n', false) => return (i, Some(refused(FramingError::BareLf))),
                        _ => return (i, Some(refused(FramingError::Chunk))),
                    }
                    i += 1;
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let (limit, too_long) = match self.state {
                        State::ChunkSize => (MAX_CHUNK_LINE, FramingError::Chunk),
                        _ => (MAX_HEAD, FramingError::HeadTooLarge),
                    };
                    // Everything before the next LF is line content, taken in one piece; the
                    // byte that would pass the limit is where the stream stops.
                    let rest = &bytes[i..];
                    let lf = memchr::memchr(b'\n', rest);
                    let run = lf.unwrap_or(rest.len());
                    let room = limit.saturating_sub(self.line.len());
                    if run > room {
                        return (i + room, Some(refused(too_long)));
                    }
                    self.line.extend_from_slice(&rest[..run]);
                    i += run;
                    if lf.is_none() {
                        break;
                    }
                    // The LF at `i`.
                    if self.line.last() != Some(&b'\r') {
                        let mut r = self.head_info();
                        r.error = Some(FramingError::BareLf);
                        return (i, Some(r));
                    }
                    self.line.push(b'\n');
                    if self.line.len() > limit {
                        return (i, Some(refused(too_long)));
                    }
                    if let Err(r) = self.line_done() {
                        // Hold back the line ending: hyper never sees the line complete.
                        return (i, Some(r));
                    }
                    i += 1;
                }
            }
        }
        (bytes.len(), None)
    }

    /// A CRLF-terminated line (or head) was added to `line`.
    fn line_done(&mut self) -> Result<(), Refused> {
        match self.state {
            State::Head => {
                if self.line == b"\r\n" {
                    // RFC 9112 §2.2: an empty line before the request line is ignored.
                    self.line.clear();
                    return Ok(());
                }
                if !self.line.ends_with(b"\r\n\r\n") {
                    return Ok(());
                }
                let next = self.head_complete()?;
                self.line.clear();
                self.state = next;
            }
            State::ChunkSize => {
                let size =
                    parse_chunk_size(&self.line).ok_or_else(|| refused(FramingError::Chunk))?;
                self.line.clear();
                self.state = if size == 0 {
                    State::Trailers
                } else {
                    State::ChunkData { remaining: size }
                };
            }
            State::Trailers if self.line.ends_with(b"\r\n\r\n") || self.line == b"\r\n" => {
                self.line.clear();
                self.state = State::Head;
            }
            _ => {}
        }
        Ok(())
    }

    /// Method, target, host and Accept of the head collected so far (best effort).
    fn head_info(&self) -> Refused {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let _ = req.parse(&self.line);
        let mut out = Refused {
            method: req.method.map(str::to_owned),
            target: req.path.map(str::to_owned),
            ..Refused::default()
        };
        for h in req.headers.iter().filter(|h| !h.name.is_empty()) {
            if h.name.eq_ignore_ascii_case("host") {
                out.host = Some(String::from_utf8_lossy(h.value).into_owned());
            } else if h.name.eq_ignore_ascii_case("accept") {
                out.accept_html |= super::response::accepts_html(h.value);
            }
        }
        out
    }

    /// Checks a complete head and returns the state for what follows it.
    fn head_complete(&self) -> Result<State, Refused> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&self.line), Ok(httparse::Status::Complete(_))) {
            // hyper parses the same bytes and answers 400 / 431 itself.
            return Ok(State::Head);
        }
        let fail = |error| {
            let mut r = self.head_info();
            r.error = Some(error);
            r
        };
        let mut content_length: Option<u64> = None;
        let mut cl_count = 0;
        let mut te_count = 0;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                cl_count += 1;
                let digits = h.value;
                if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit)
                {
                    return Err(fail(FramingError::InvalidContentLength));
                }
                // 19 decimal digits always fit a u64.
                content_length = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|s| s.parse().ok());
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te_count += 1;
                if !h.value.eq_ignore_ascii_case(b"chunked") {
                    return Err(fail(FramingError::TransferEncoding));
                }
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if cl_count > 0 && te_count > 0 {
            return Err(fail(FramingError::ContentLengthAndTransferEncoding));
        }
        if cl_count > 1 {
            return Err(fail(FramingError::DuplicateContentLength));
        }
        if te_count > 1 || (te_count == 1 && req.version == Some(0)) {
            return Err(fail(FramingError::TransferEncoding));
        }
        Ok(if te_count == 1 {
            // An upgrade request with a body: follow the body, then stop (rare; refused by
            // most servers anyway).
            State::ChunkSize
        } else if let Some(n) = content_length.filter(|n| *n > 0) {
            State::Body { remaining: n }
        } else if upgrade {
            State::Opaque
        } else {
            State::Head
        })
    }
}

/// Follows a whole client byte stream; the first refusal, if any (fuzzing, tests).
pub fn check_stream(bytes: &[u8]) -> Result<(), FramingError> {
    let mut guard = FramingGuard::new((), Arc::new(Mutex::new(None::<Refused>)));
    match guard.scan(bytes) {
        (n, Some(r)) => {
            debug_assert!(n <= bytes.len());
            Err(r.error.unwrap_or(FramingError::Chunk))
        }
        (_, None) => Ok(()),
    }
}

fn refused(error: FramingError) -> Refused {
    Refused {
        error: Some(error),
        ..Refused::default()
    }
}

/// `1a;ext=v\r\n` → 26. Hex digits only (no sign, no whitespace), at most 15 of them.
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let digits = match line.iter().position(|&b| b == b';') {
        Some(p) => &line[..p],
        None => line,
    };
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            // The connection handler answers and closes; hyper just stops reading.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        let (ok, refused) = this.scan(&buf.filled()[before..]);
        if let Some(refused) = refused {
            buf.set_filled(before + ok);
            this.failed = true;
            this.on_refused.refused(refused);
            if ok == 0 {
                // Pending without a waker: the handler polls the connection again after
                // asking it to shut down.
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            // The handler still writes the 400 on this connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> Arc<dyn OnRefused> {
        Arc::new(Mutex::new(None::<Refused>))
    }

    fn run(input: &[u8]) -> Result<(), FramingError> {
        let mut g = FramingGuard::new((), slot());
        // Byte by byte and whole: the verdict must not depend on how reads split the stream.
        let (n, r) = g.scan(input);
        let mut g2 = FramingGuard::new((), slot());
        let mut split = Ok(());
        for (i, b) in input.iter().enumerate() {
            let (k, r2) = g2.scan(std::slice::from_ref(b));
            if let Some(r2) = r2 {
                assert_eq!(k, 0);
                split = Err((i, r2.error.unwrap()));
                break;
            }
        }
        match r {
            None => {
                assert_eq!(n, input.len());
                assert!(split.is_ok(), "{split:?}");
                Ok(())
            }
            Some(r) => {
                let e = r.error.unwrap();
                assert_eq!(split, Err((n, e)), "split verdict differs");
                Err(e)
            }
        }
    }

    #[test]
    fn framing_table() {
        use FramingError::*;
        let cases: &[(&[u8], Result<(), FramingError>)] = &[
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Ok(())),
            (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", Ok(())),
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", Err(BareLf)),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", Err(BareLf)),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\n", Err(BareLf)),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n", Ok(())),
            // Body bytes are not a head: a LF inside them is data.
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\na\nbGET / HTTP/1.1\r\n\r\n", Ok(())),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\n\r\n", Err(BareLf)),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", Err(ContentLengthAndTransferEncoding)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", Err(ContentLengthAndTransferEncoding)),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", Err(DuplicateContentLength)),
            (b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 4\r\n\r\n", Err(DuplicateContentLength)),
            (b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", Err(InvalidContentLength)),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", Err(InvalidContentLength)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Err(TransferEncoding)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", Err(TransferEncoding)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", Err(TransferEncoding)),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Err(TransferEncoding)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\nGET / HTTP/1.1\r\n\r\n", Ok(())),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n", Err(BareLf)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", Err(Chunk)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\n", Err(Chunk)),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: v\n\r\n", Err(BareLf)),
            // After an upgrade request the stream is opaque.
            (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\n\n\x00", Ok(())),
        ];
        for (input, want) in cases {
            assert_eq!(run(input), *want, "{}", String::from_utf8_lossy(input));
        }
    }

    /// What a scan reported, comparably.
    fn outcome(r: (usize, Option<Refused>)) -> (usize, Option<(FramingError, Option<String>)>) {
        (r.0, r.1.map(|r| (r.error.unwrap(), r.method)))
    }

    #[test]
    fn verdict_does_not_depend_on_how_reads_split_the_stream() {
        // Pieces of streams: good and bad line endings, heads with each framing, chunk lines
        // (some too long), body bytes, long runs without a line end (some past the limits).
        let long_header = format!("X-Long: {}\r\n", "a".repeat(MAX_HEAD / 2));
        let long_chunk_ext = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        let pieces: Vec<Vec<u8>> = [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"5\r\n",
            b"0\r\n",
            b"3;ext=1\r\n",
            b"abcde",
            b"\r\n",
            b"\n",
            b"\r",
            b"T: v\r\n",
            b"Accept: text/html\r\n",
            long_header.as_bytes(),
            long_chunk_ext.as_bytes(),
        ]
        .iter()
        .map(|p| p.to_vec())
        .collect();
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut stream = Vec::new();
            for _ in 0..(next() % 12) {
                let piece = usize::try_from(next()).unwrap() % pieces.len();
                stream.extend_from_slice(&pieces[piece]);
            }
            // Byte by byte (each line end met on its own), whole, and in reads of random sizes.
            let mut want = (stream.len(), None);
            let mut bytewise = FramingGuard::new((), slot());
            for (i, b) in stream.iter().enumerate() {
                if let (_, Some(r)) = bytewise.scan(std::slice::from_ref(b)) {
                    want = outcome((i, Some(r)));
                    break;
                }
            }
            let mut whole = FramingGuard::new((), slot());
            assert_eq!(outcome(whole.scan(&stream)), want);
            let mut split = FramingGuard::new((), slot());
            let mut at = 0;
            let mut got = (stream.len(), None);
            while at < stream.len() {
                let len = 1 + usize::try_from(next() % 2000).unwrap();
                let end = (at + len).min(stream.len());
                let (n, r) = split.scan(&stream[at..end]);
                if r.is_some() {
                    got = outcome((at + n, r));
                    break;
                }
                assert_eq!(n, end - at);
                at = end;
            }
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&stream));
        }
    }

    #[test]
    fn limits_stop_at_the_byte_past_them() {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(MAX_HEAD + 10, b'a');
        assert_eq!(run(&head), Err(FramingError::HeadTooLarge));
        let (n, _) = FramingGuard::new((), slot()).scan(&head);
        assert_eq!(n, MAX_HEAD);
        // A line end one byte past the limit is refused too (it would complete the line).
        head.truncate(MAX_HEAD - 1);
        head.push(b'\r');
        head.push(b'\n');
        let (n, r) = FramingGuard::new((), slot()).scan(&head);
        assert_eq!(
            (n, r.and_then(|r| r.error)),
            (MAX_HEAD, Some(FramingError::HeadTooLarge))
        );

        let mut chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let start = chunked.len();
        chunked.extend_from_slice(b"1;");
        chunked.resize(start + MAX_CHUNK_LINE + 5, b'e');
        assert_eq!(run(&chunked), Err(FramingError::Chunk));
        let (n, _) = FramingGuard::new((), slot()).scan(&chunked);
        assert_eq!(n, start + MAX_CHUNK_LINE);
    }

    #[test]
    fn refused_head_carries_what_is_known() {
        let mut g = FramingGuard::new((), slot());
        let (n, r) = g.scan(
            b"POST /x HTTP/1.1\r\nHost: A\r\nAccept: text/html\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let r = r.unwrap();
        assert_eq!(
            r.error,
            Some(FramingError::ContentLengthAndTransferEncoding)
        );
        assert_eq!(r.method.as_deref(), Some("POST"));
        assert_eq!(r.target.as_deref(), Some("/x"));
        assert_eq!(r.host.as_deref(), Some("A"));
        assert!(r.accept_html);
        // The final LF is held back.
        assert!(n > 0 && n < 100);
    }
}
