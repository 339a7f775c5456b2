//! The L4 proxy. Connections redirected by connect4/6 land here; the original destination
//! comes from the kernel (`NG_ORIG`, by the client's address), the service and its rule from
//! the live [`Routes`] snapshot. One decision line per connection, written when it ends.
//!
//! A connection without a recorded original destination was dialed at the proxy port
//! directly: it is refused and never forwarded anywhere.

mod conn;
pub mod detect;
mod forward;
pub mod http;
pub mod routes;
#[cfg(test)]
mod tests;
pub mod tls;
mod upstream;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinSet,
};

pub use self::routes::{Routes, SharedRoutes};
use crate::{
    config::L4Rule,
    ebpf::{Mode, OrigDst, OrigDstTable},
    telemetry::{Decision, Metrics, Reason},
};

const LISTEN_BACKLOG: i32 = 1024;
/// After the drain timeout, how long aborted connections get to write their decision line.
const ABORT_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "cannot listen on {addr}: is the address configured on this node and the port free? \
         (proxy.listen / proxy.listen_v6)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot set SO_MARK {mark:#x} on upstream sockets: the gateway needs CAP_NET_ADMIN \
         (run as root or grant the capability)"
    )]
    Mark {
        mark: u32,
        #[source]
        source: io::Error,
    },
    #[error("proxy listener failed")]
    Listener(#[source] io::Error),
}

/// Where the proxy finds the original destination of an accepted connection. The kernel's
/// `OrigDstTable` in production; a fake in tests.
pub trait OrigDstLookup: Send + Sync + 'static {
    /// Look up and remove the entry for the peer (client) address.
    fn take(&self, peer: SocketAddr) -> Option<OrigDst>;
}

impl OrigDstLookup for OrigDstTable {
    fn take(&self, peer: SocketAddr) -> Option<OrigDst> {
        OrigDstTable::take(self, peer)
    }
}

/// State shared by every connection.
pub struct Shared {
    /// The node's name, shared with every decision line (no copy per request).
    pub node: Arc<str>,
    pub routes: SharedRoutes,
    pub orig: Box<dyn OrigDstLookup>,
    pub metrics: Arc<Metrics>,
    /// `SO_MARK` of upstream sockets (`None` only in unprivileged tests).
    pub mark: Option<u32>,
    /// Authentication, assertions and the upstream pool of HTTP services.
    pub http: http::HttpContext,
}

/// The L4 rule: allowed sources pass; others are denied, or in audit mode forwarded as
/// `would_deny`.
pub fn decide(rule: &L4Rule, mode: Mode, src: IpAddr) -> (Decision, Reason) {
    match (rule.allows(src), mode) {
        (true, _) => (Decision::Allow, Reason::SourceAllowed),
        (false, Mode::Enforce) => (Decision::Deny, Reason::SourceNotAllowed),
        (false, Mode::Audit) => (Decision::WouldDeny, Reason::SourceNotAllowed),
    }
}

/// Fail at start-up, with a clear message, when upstream sockets cannot carry the mark.
pub fn check_mark(mark: u32) -> Result<(), ProxyError> {
    Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .and_then(|s| s.set_mark(mark))
        .map_err(|source| ProxyError::Mark { mark, source })
}

/// Bind the listeners (blocking; before the runtime serves them).
pub fn bind(addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, ProxyError> {
    addrs
        .iter()
        .map(|&addr| bind_one(addr).map_err(|source| ProxyError::Bind { addr, source }))
        .collect()
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A restarted gateway must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Accept and handle connections until `shutdown` turns true; then stop accepting, let open
/// connections finish for up to `drain`, and close what is left (their lines are written).
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) -> Result<(), ProxyError> {
    // Every connection task holds a clone of `open_tx`; `recv` returns `None` once all are gone.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    let (abort_tx, abort_rx) = watch::channel(false);
    let mut accepting = JoinSet::new();
    for listener in listeners {
        let listener = TcpListener::from_std(listener).map_err(ProxyError::Listener)?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "proxy listening");
        }
        accepting.spawn(accept_loop(
            listener,
            shared.clone(),
            open_tx.clone(),
            shutdown.clone(),
            abort_rx.clone(),
        ));
    }
    drop(open_tx);
    // Certificate files of TLS services: new content for new handshakes.
    let tls_watch = tokio::spawn(tls::watch(
        shared.routes.clone(),
        shared.metrics.clone(),
        shutdown.clone(),
    ));
    tokio::select! {
        _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => {}
        Some(res) = accepting.join_next() => {
            // An accept loop only returns on a fatal listener error.
            accepting.abort_all();
            tls_watch.abort();
            return match res {
                Ok(Err(err)) => Err(ProxyError::Listener(err)),
                _ => Err(ProxyError::Listener(io::Error::other("accept loop ended"))),
            };
        }
    }
    accepting.abort_all();
    tls_watch.abort();
    while accepting.join_next().await.is_some() {}
    let open = shared.metrics.connections_active().get();
    tracing::info!(
        open,
        drain_ms = drain.as_millis(),
        "proxy stopped accepting; draining"
    );
    if tokio::time::timeout(drain, open_rx.recv()).await.is_err() {
        let open = shared.metrics.connections_active().get();
        tracing::warn!(open, "drain timeout: closing the remaining connections");
        let _ = abort_tx.send(true);
        let _ = tokio::time::timeout(ABORT_GRACE, open_rx.recv()).await;
    }
    tracing::info!("proxy drained");
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    open: mpsc::Sender<()>,
    draining: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
) -> io::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                let open = open.clone();
                let draining = draining.clone();
                let abort = abort.clone();
                tokio::spawn(async move {
                    conn::handle(stream, peer, shared, draining, abort).await;
                    drop(open);
                });
            }
            Err(err) if is_transient_accept_error(&err) => {
                tracing::debug!(error = %err, "accept: connection failed before it was accepted");
            }
            Err(err) if is_resource_exhaustion(&err) => {
                // Back off instead of spinning; the backlog holds the clients meanwhile.
                tracing::warn!(error = %err, "accept: out of resources; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(err),
        }
    }
}

fn is_transient_accept_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || matches!(err.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

fn is_resource_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
