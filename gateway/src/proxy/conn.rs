//! One accepted connection, from the original-destination lookup to its decision line.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpStream, sync::watch};

use super::{
    OrigDst, Shared, decide,
    detect::{self, Detected},
    forward,
    http::{self, Protocol},
    tls, upstream,
};
use crate::{
    ebpf::Mode,
    telemetry::{ConnectionLine, Decision, Reason},
};

/// How long a client of an HTTP service may take to send its first bytes.
const DETECT_WAIT: Duration = Duration::from_secs(10);

/// Keeps `nodegate_connections_active` right on every exit path.
struct Active<'a>(&'a Shared);

impl<'a> Active<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.metrics.connections_active().inc();
        Self(shared)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.metrics.connections_active().dec();
    }
}

pub(super) async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    draining: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
) {
    let _active = Active::new(&shared);
    // Boxed, and over before an HTTP connection is served: the connection line, the route
    // table and protocol detection take no room in the task while the connection lives.
    let admitted = Box::pin(admit(
        client,
        peer,
        &shared,
        draining.clone(),
        abort.clone(),
    ))
    .await;
    if let Some((client, peer, orig, protocol)) = admitted {
        http::serve(
            client,
            peer,
            orig,
            protocol,
            None,
            shared.clone(),
            draining,
            abort,
        )
        .await;
    }
}

/// The connection up to the HTTP path: the original destination, the route, the L4 rule,
/// protocol detection; TLS and L4 connections are served here to their end. `Some` for a
/// plaintext connection to an HTTP service, with its detected protocol.
async fn admit(
    client: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    draining: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr, OrigDst, Protocol)> {
    let started = Instant::now();
    if let Err(err) = client.set_nodelay(true) {
        tracing::debug!(error = %err, "TCP_NODELAY on an accepted connection");
    }
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let mut line = ConnectionLine::new(&shared.node, peer);

    let Some(orig) = shared.orig.take(peer) else {
        // Dialed at the proxy port directly: refuse, forward nowhere.
        refuse(&client);
        line.duration = started.elapsed();
        line.emit(&shared.metrics);
        return None;
    };
    line.dst = Some(orig.dst);
    line.cgroup_id = Some(orig.cgroup_id);
    tracing::debug!(%peer, dst = %orig.dst, pid = orig.pid, kernel_service_id = orig.service_id, "accepted");

    // This connection keeps the table it started with, across reloads.
    let routes = shared.routes.load_full();
    line.src_workload = routes
        .workloads
        .lookup(Some(orig.cgroup_id), peer.ip())
        .map(|w| w.log("source"));
    let Some(route) = routes.resolve(orig.dst) else {
        line.reason = Reason::UnknownDestination;
        refuse(&client);
        line.duration = started.elapsed();
        line.emit(&shared.metrics);
        return None;
    };
    if route.service.id != orig.service_id {
        tracing::debug!(%peer, dst = %orig.dst, "the service changed since connect (config reload)");
    }
    line.service = Some(&route.service.name);
    line.mode = Some(route.service.mode);
    if route.service.http.is_some() {
        // An HTTP service: the L4 rule applies first when it lists sources, then every request
        // is authorized on its own. A TLS client passes through under the L4 rule alone.
        let rule = &route.service.rule;
        let l4 = (!rule.allow_sources.is_empty())
            .then(|| decide(rule, route.service.mode, peer.ip()))
            .filter(|(decision, _)| *decision != Decision::Allow);
        if let Some((Decision::Deny, reason)) = l4 {
            line.decision = Decision::Deny;
            line.reason = reason;
            refuse(&client);
            line.duration = started.elapsed();
            line.emit(&shared.metrics);
            return None;
        }
        let protocol = match detect::detect(&client, DETECT_WAIT).await {
            Detected::Http1 => Protocol::Http1,
            Detected::Http2 => Protocol::Http2,
            Detected::Tls if route.service.http.as_ref().is_some_and(|h| h.tls.is_some()) => {
                // The gateway holds this service's certificate: terminate, then HTTP. Boxed, as
                // the L4 path: see `the_connection_task_stays_small`.
                Box::pin(tls::serve(
                    client,
                    orig,
                    shared,
                    &routes,
                    route,
                    line,
                    started,
                    (draining, abort),
                ))
                .await;
                return None;
            }
            Detected::Tls => {
                line.sni = detect::peek_sni(&client).await;
                forward_l4(client, shared, &routes, route, line, started, abort).await;
                return None;
            }
            Detected::Closed => return None,
            Detected::TimedOut => {
                line.decision = Decision::Deny;
                line.reason = Reason::ProtocolTimeout;
                refuse(&client);
                line.duration = started.elapsed();
                line.emit(&shared.metrics);
                return None;
            }
        };
        if let Some((decision, reason)) = l4 {
            // Audit mode: the connection would have been refused at L4; its requests follow.
            line.decision = decision;
            line.reason = reason;
            line.duration = started.elapsed();
            line.emit(&shared.metrics);
        }
        let client = if route.service.http.as_ref().is_some_and(|h| h.tls.is_some()) {
            let mode = route.service.mode;
            Box::pin(plain_to_tls(client, protocol, mode, line, started, shared)).await?
        } else {
            client
        };
        return Some((client, peer, orig, protocol));
    }
    forward_l4(client, shared, &routes, route, line, started, abort).await;
    None
}

/// The L4 path: the service's source rule, then bytes copied both ways. Boxed: its future
/// (~1.7 KB) would otherwise size the task of every connection (see
/// `the_connection_task_stays_small`).
fn forward_l4<'a>(
    client: TcpStream,
    shared: &'a Shared,
    routes: &'a super::Routes,
    route: &'a super::routes::Route,
    mut line: ConnectionLine<'a>,
    started: Instant,
    abort: watch::Receiver<bool>,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        let peer = line.src;
        let (decision, reason) = decide(&route.service.rule, route.service.mode, peer.ip());
        line.decision = decision;
        line.reason = reason;
        if decision == Decision::Deny {
            refuse(&client);
            line.duration = started.elapsed();
            line.emit(&shared.metrics);
            return;
        }

        let upstream =
            upstream::connect(&route.candidates(), shared.mark, routes.connect_timeout).await;
        let (server, addr) = match upstream {
            Ok(connected) => connected,
            Err(last_tried) => {
                line.decision = Decision::Deny;
                line.reason = Reason::UpstreamUnavailable;
                line.upstream = last_tried;
                refuse(&client);
                line.duration = started.elapsed();
                line.emit(&shared.metrics);
                return;
            }
        };
        line.upstream = Some(addr);
        let transferred = forward::bidirectional(client, server, abort).await;
        line.bytes_up = transferred.up;
        line.bytes_down = transferred.down;
        if let Some(err) = &transferred.error {
            tracing::debug!(%peer, upstream = %addr, error = %err, "connection ended with an error");
        }
        line.duration = started.elapsed();
        line.emit(&shared.metrics);
    })
}

/// Close with a reset: the client learns at once that it was refused, and no `TIME_WAIT`
/// is left behind by a flood of refused connections.
/// Plain HTTP (`protocol`) to a service that terminates TLS would skip the handshake, and with
/// it a required client certificate: refused (HTTP/1.1 gets a 400), with a connection line;
/// audit mode logs it and hands the connection on (`Some`).
async fn plain_to_tls(
    mut client: TcpStream,
    protocol: Protocol,
    mode: Mode,
    mut line: ConnectionLine<'_>,
    started: Instant,
    shared: &Shared,
) -> Option<TcpStream> {
    line.reason = Reason::PlainHttpToTls;
    line.decision = match mode {
        Mode::Enforce => Decision::Deny,
        Mode::Audit => Decision::WouldDeny,
    };
    line.duration = started.elapsed();
    line.emit(&shared.metrics);
    if line.decision == Decision::WouldDeny {
        return Some(client);
    }
    match protocol {
        Protocol::Http1 => {
            // nginx's words for it, as a refusal of the gateway's.
            let answer = http::response::raw_refusal(
                "The plain HTTP request was sent to an HTTPS port",
                Reason::PlainHttpToTls.as_str(),
                http::headers::RequestId::new().as_str(),
                false,
            );
            http::answer_and_close(&mut client, &answer).await;
        }
        Protocol::Http2 => refuse(&client),
    }
    None
}

fn refuse(client: &TcpStream) {
    if let Err(err) = client.set_zero_linger() {
        tracing::debug!(error = %err, "SO_LINGER on a refused connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of `F`, the future of an async fn taking `A..E`.
    fn future_size<A, B, C, D, E, F: Future>(_: &impl Fn(A, B, C, D, E) -> F) -> usize {
        size_of::<F>()
    }

    /// Every connection's task is as large as the largest state of [`handle`], for as long as
    /// the connection lives (an idle keep-alive one too): admission, the TLS handshake, the L4
    /// path and hyper's connection are boxed, so that they do not size it.
    #[test]
    fn the_connection_task_stays_small() {
        let size = future_size(&handle);
        assert!(size <= 1536, "conn::handle's future is {size} bytes");
    }
}
