//! A connection's stream, shared between hyper and the handler that answers a refused request
//! after hyper has let go of it (a TLS stream cannot be duplicated like a socket descriptor).
//! Only one side uses it at a time: hyper while it serves, the handler once hyper is dropped,
//! so the lock is never contended.

use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(super) struct SharedIo<S>(Arc<Mutex<S>>);

impl<S> SharedIo<S> {
    /// The stream for hyper, and a handle to take it back with [`reclaim`].
    pub(super) fn new(stream: S) -> (Self, Arc<Mutex<S>>) {
        let shared = Arc::new(Mutex::new(stream));
        (Self(shared.clone()), shared)
    }

    fn lock(&self) -> MutexGuard<'_, S> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The stream, once every [`SharedIo`] is gone (`None` while hyper still holds one, e.g. after
/// an upgrade).
pub(super) fn reclaim<S>(handle: Arc<Mutex<S>>) -> Option<S> {
    Arc::into_inner(handle).map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
}

impl<S: AsyncRead + Unpin> AsyncRead for SharedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SharedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.lock().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}
