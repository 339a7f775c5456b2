//! Idle keep-alive HTTP/1.1 connections without hyper's state.
//!
//! hyper keeps a served HTTP/1 connection's buffers for as long as the connection lives: an
//! 8 KiB read buffer (`proto::h1::io::Buffered::poll_read_from_io` reserves
//! `INIT_BUFFER_SIZE` before every read, and `max_buf_size` may not go below it), an 8 KiB
//! header write buffer (`WriteBuf::new`: `Vec::with_capacity(INIT_BUFFER_SIZE)`), the cached
//! header map and the connection state (~4.5 KB): with our own per-connection state, ~22 KB
//! per idle keep-alive connection that hyper's API cannot release. So once a connection has
//! waited [`RELEASE_AFTER`] for its next request, `super::serve_http1` asks hyper to close
//! it (`graceful_shutdown`, which closes an idle connection at once without writing
//! anything), keeps the socket (the [`IdleIo`] wrapper skips hyper's `shutdown`), takes back
//! the bytes hyper read but did not parse (`into_parts().read_buf`, normally none), and waits
//! for readability with nothing but the socket; the next request gets a new hyper connection.
//!
//! When is a connection idle? Exactly when hyper waits for a request head after having
//! answered one: hyper arms its header read timer ([`IdleTimer`]) when it starts waiting for a
//! head and drops it once the head is parsed; no byte has reached hyper since (else a head is
//! in progress); hyper's writes are flushed; no response body is in flight. The timer also
//! carries the header read deadline over to the next hyper connection, so a client has
//! [`super::HEADER_READ_TIMEOUT`] from the end of a response to the end of its next request
//! head, as with one hyper connection.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Instant,
};

/// How long a keep-alive connection waits for its next request before hyper's state for it is
/// dropped. Short enough that idle connections hold next to nothing, long enough that a busy
/// connection (a request every few ms) never pays for a new hyper connection.
pub(super) const RELEASE_AFTER: Duration = Duration::from_millis(100);

/// A stream the HTTP/1.1 path serves.
pub(in crate::proxy) trait IdleStream:
    AsyncRead + AsyncWrite + Unpin + Send + 'static
{
    /// Whether the stream can wait for readability on its own, so that an idle connection
    /// needs no hyper connection (and no buffers).
    const RELEASE_IDLE: bool;

    /// Ready once bytes (or the end of the stream) can be read. Only used when
    /// [`Self::RELEASE_IDLE`].
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl IdleStream for TcpStream {
    const RELEASE_IDLE: bool = true;

    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

/// A TLS connection keeps its hyper connection between requests: rustls holds buffers of its
/// own, and readability of the socket says nothing about the plaintext rustls may hold.
impl IdleStream for tokio_rustls::server::TlsStream<TcpStream> {
    const RELEASE_IDLE: bool = false;

    fn poll_readable(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The connection's stream with the bytes a released hyper connection had read but not parsed
/// (the start of a pipelined request): they are read again first.
pub(super) struct Rewind<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Rewind<S> {
    pub(super) fn new(io: S) -> Self {
        Self {
            prefix: Bytes::new(),
            io,
        }
    }

    pub(super) fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// `bytes` are read again before the rest.
    pub(super) fn rewind(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.prefix = if self.prefix.is_empty() {
            bytes
        } else {
            let mut joined = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            joined.extend_from_slice(&bytes);
            joined.extend_from_slice(&self.prefix);
            joined.freeze()
        };
    }

    pub(super) fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
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

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What one hyper connection tells about its idleness, through its timer and its stream.
pub(super) struct Idle {
    base: Instant,
    /// When hyper started waiting for the current request head (µs since `base`, plus one),
    /// 0 when it does not wait for one, or a head is in progress.
    waiting_since: AtomicU64,
    /// Head waits begun: the first one when the connection starts, one after each answered
    /// request (hyper keeps the connection alive only then).
    waits: AtomicU32,
    /// hyper wrote bytes it has not flushed yet.
    unflushed: AtomicBool,
    /// The connection is being released: hyper's `shutdown` of the stream is skipped.
    releasing: AtomicBool,
    /// The deadline of the first head wait (carried over from the previous hyper connection).
    first_deadline: Mutex<Option<Instant>>,
}

impl Idle {
    pub(super) fn new(first_deadline: Option<Instant>) -> Self {
        Self {
            base: Instant::now(),
            waiting_since: AtomicU64::new(0),
            waits: AtomicU32::new(0),
            unflushed: AtomicBool::new(false),
            releasing: AtomicBool::new(false),
            first_deadline: Mutex::new(first_deadline),
        }
    }

    fn head_wait_started(&self) {
        let micros = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.waiting_since.store(micros + 1, Ordering::Relaxed);
        self.waits.fetch_add(1, Ordering::Relaxed);
    }

    fn busy(&self) {
        self.waiting_since.store(0, Ordering::Relaxed);
    }

    /// Since when hyper has waited, with nothing read, for the next request after having
    /// answered one, all of it written; `None` when the connection is not idle.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        let since = self.waiting_since.load(Ordering::Relaxed);
        (since != 0
            && self.waits.load(Ordering::Relaxed) >= 2
            && !self.unflushed.load(Ordering::Relaxed))
        .then(|| self.base + Duration::from_micros(since - 1))
    }

    /// From now on, hyper's `shutdown` of the stream does nothing.
    pub(super) fn release(&self) {
        self.releasing.store(true, Ordering::Relaxed);
    }

    /// Resolves once the connection has been idle for [`RELEASE_AFTER`], with since when it has
    /// waited for its next request. Pending without a
    /// wake-up while it is busy: it is polled with hyper's connection, in the same task, so it
    /// looks again whenever hyper has run.
    pub(super) fn released<'a>(
        &'a self,
        in_flight: &'a std::sync::atomic::AtomicUsize,
    ) -> impl Future<Output = Instant> + Send + 'a {
        let mut timer = Box::pin(tokio::time::sleep(RELEASE_AFTER));
        std::future::poll_fn(move |cx| {
            loop {
                let Some(since) = self.idle_since() else {
                    return Poll::Pending;
                };
                if in_flight.load(Ordering::Acquire) > 0 {
                    return Poll::Pending;
                }
                let due = since + RELEASE_AFTER;
                if Instant::now() >= due {
                    return Poll::Ready(since);
                }
                // Reset only when needed: a timer set for an earlier wait fires early, and the
                // loop sets it again, so that a busy connection does not touch the timer wheel
                // on every request.
                if timer.is_elapsed() || timer.deadline() > due {
                    timer.as_mut().reset(due);
                }
                ready!(timer.as_mut().poll(cx));
            }
        })
    }
}

/// hyper's timer for one connection (hyper's HTTP/1 server uses it for the header read timeout
/// only): a head wait begins when hyper sets it, and ends when hyper drops it.
#[derive(Clone)]
pub(super) struct IdleTimer(pub(super) std::sync::Arc<Idle>);

impl hyper::rt::Timer for IdleTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            inner: tokio::time::sleep(duration),
            idle: None,
        })
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let carried = self
            .0
            .first_deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.0.head_wait_started();
        Box::pin(HeadSleep {
            inner: tokio::time::sleep_until(carried.unwrap_or_else(|| deadline.into())),
            idle: Some(self.0.clone()),
        })
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        if let Some(sleep) = sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            if let Some(idle) = &sleep.idle {
                idle.head_wait_started();
            }
            sleep.project().inner.reset(new_deadline.into());
        } else {
            *sleep = self.sleep_until(new_deadline);
        }
    }
}

pin_project_lite::pin_project! {
    /// The header read timer; its drop ends the head wait.
    struct HeadSleep {
        #[pin]
        inner: tokio::time::Sleep,
        idle: Option<std::sync::Arc<Idle>>,
    }

    impl PinnedDrop for HeadSleep {
        fn drop(this: Pin<&mut Self>) {
            if let Some(idle) = &this.idle {
                idle.busy();
            }
        }
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.project().inner.poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

/// The stream as hyper sees it: reads and flushes tell [`Idle`] whether hyper is busy; a
/// released connection's `shutdown` is skipped.
pub(super) struct IdleIo<IO> {
    io: IO,
    idle: std::sync::Arc<Idle>,
}

impl<IO> IdleIo<IO> {
    pub(super) fn new(io: IO, idle: std::sync::Arc<Idle>) -> Self {
        Self { io, idle }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for IdleIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.idle.busy();
        }
        res
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for IdleIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.idle.unflushed.store(true, Ordering::Relaxed);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.idle.unflushed.store(true, Ordering::Relaxed);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_flush(cx);
        if matches!(res, Poll::Ready(Ok(()))) {
            this.idle.unflushed.store(false, Ordering::Relaxed);
        }
        res
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.idle.releasing.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hyper::rt::Timer as _;
    use tokio::io::AsyncReadExt as _;

    use super::*;

    #[tokio::test]
    async fn the_header_deadline_carries_over_to_the_first_head_only() {
        let carried = Instant::now() + Duration::from_millis(200);
        let idle = Arc::new(Idle::new(Some(carried)));
        let timer = IdleTimer(idle.clone());
        let hyper_deadline = || (Instant::now() + Duration::from_secs(30)).into_std();

        // The first head wait of a new hyper connection ends at the carried deadline.
        let first = timer.sleep_until(hyper_deadline());
        assert!(
            idle.idle_since().is_none(),
            "not idle before a request was answered"
        );
        tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .expect("the carried deadline");
        assert!(Instant::now() >= carried);
        // The next ones at hyper's own.
        let before = Instant::now();
        let second = timer.sleep_until(hyper_deadline());
        let since = idle
            .idle_since()
            .expect("waiting after an answered request");
        assert!(since >= before - Duration::from_millis(1) && since <= Instant::now());
        assert!(
            tokio::time::timeout(Duration::from_millis(300), second)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn idle_means_waiting_with_nothing_read_and_everything_flushed() {
        let idle = Arc::new(Idle::new(None));
        let timer = IdleTimer(idle.clone());
        let deadline = || (Instant::now() + Duration::from_secs(30)).into_std();
        drop(timer.sleep_until(deadline())); // the first request's head was parsed
        let (client, server) = tokio::io::duplex(64);
        let mut io = IdleIo::new(server, idle.clone());
        let wait = timer.sleep_until(deadline());
        assert!(idle.idle_since().is_some());

        // Written but not flushed: not idle.
        tokio::io::AsyncWriteExt::write_all(&mut io, b"HTTP/1.1 200 OK\r\n")
            .await
            .unwrap();
        assert!(idle.idle_since().is_none());
        tokio::io::AsyncWriteExt::flush(&mut io).await.unwrap();
        assert!(idle.idle_since().is_some());

        // Released only after RELEASE_AFTER, and not while a response is in flight.
        let in_flight = std::sync::atomic::AtomicUsize::new(1);
        assert!(
            tokio::time::timeout(RELEASE_AFTER * 2, idle.released(&in_flight))
                .await
                .is_err()
        );
        in_flight.store(0, Ordering::Relaxed);
        let started = Instant::now();
        idle.released(&in_flight).await;
        assert!(started.elapsed() <= RELEASE_AFTER + Duration::from_millis(50));

        // A byte of the next head: busy until hyper waits for another head.
        let mut client = client;
        tokio::io::AsyncWriteExt::write_all(&mut client, b"G")
            .await
            .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        assert!(idle.idle_since().is_none());
        drop(wait);
        assert!(idle.idle_since().is_none());
    }

    #[tokio::test]
    async fn rewound_bytes_are_read_first() {
        let (mut client, server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b" rest")
            .await
            .unwrap();
        drop(client);
        let mut stream = Rewind::new(server);
        stream.rewind(Bytes::from_static(b"head"));
        stream.rewind(Bytes::from_static(b"the "));
        assert!(stream.has_prefix());
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "the head rest");
    }
}
