//! Upstream connections. `SO_MARK` is set before `connect()` so that connect4/6 recognise the
//! gateway's own socket and never redirect it back to the proxy.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Try `candidates` in order; the first that connects wins. On failure, the last address
/// tried (if any) for the decision line.
pub(super) async fn connect(
    candidates: &[SocketAddr],
    mark: Option<u32>,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), Option<SocketAddr>> {
    let mut last = None;
    for &addr in candidates {
        last = Some(addr);
        match connect_one(addr, mark, timeout).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(err) => {
                tracing::warn!(upstream = %addr, error = %err, "upstream connect failed");
            }
        }
    }
    Err(last)
}

pub(crate) async fn connect_one(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.set_tcp_nodelay(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(res) => res,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no connection within {}ms", timeout.as_millis()),
        )),
    }
}
