//! The bench's own request/response protocol and the sockets the client side uses.
//!
//! Every request is [`REQUEST_SIZE`] bytes. `R...` asks for a [`RESPONSE_SIZE`]-byte response;
//! `B` + a little-endian u64 length announces that many bytes of upload, answered with the
//! 8-byte count once they are all in.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

pub const REQUEST_SIZE: usize = 64;
pub const RESPONSE_SIZE: usize = 256;
pub const KIND_REQUEST: u8 = b'R';
pub const KIND_BULK: u8 = b'B';
const BULK_CHUNK: usize = 64 * 1024;

/// What [`timed_connect`] saw.
pub enum Connected {
    Open(TcpStream),
    /// The handshake completed but the peer reset the connection before `connect(2)` returned
    /// (the proxy refusing a connection that was not redirected can be that quick).
    Reset,
}

/// Opens a TCP socket and connects it to `addr`, timing the `connect(2)` call alone (socket
/// creation excluded): the call the cgroup/connect4 hook runs in.
pub fn timed_connect(addr: SocketAddrV4) -> io::Result<(Connected, Duration)> {
    // SAFETY: plain syscall; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).map_err(io::Error::other)?,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len =
        libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).map_err(io::Error::other)?;
    let start = Instant::now();
    // SAFETY: `sin` is a valid sockaddr_in of `len` bytes for the duration of the call.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const sin).cast(), len) };
    let elapsed = start.elapsed();
    if rc != 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::ConnectionReset {
            Ok((Connected::Reset, elapsed))
        } else {
            Err(err)
        };
    }
    let stream = TcpStream::from(fd);
    stream.set_nodelay(true)?;
    Ok((Connected::Open(stream), elapsed))
}

/// Connects to `addr` (untimed).
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// Closes with an RST (`SO_LINGER` 0): the client leaves no `TIME_WAIT` behind, so hundreds of
/// thousands of connections in a row do not run out of ephemeral ports.
pub fn abort(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(size_of::<libc::linger>()).unwrap_or(8),
        );
    }
    drop(stream);
}

/// Reads until the peer closes or resets the connection (or 5 s pass).
pub fn wait_closed(stream: &mut TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 512];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// One small request and its response.
pub fn round_trip(stream: &mut TcpStream) -> io::Result<()> {
    let mut request = [0u8; REQUEST_SIZE];
    request[0] = KIND_REQUEST;
    stream.write_all(&request)?;
    let mut response = [0u8; RESPONSE_SIZE];
    stream.read_exact(&mut response)
}

/// Uploads `bytes` and waits for the server's count.
pub fn upload(stream: &mut TcpStream, bytes: u64) -> io::Result<()> {
    let mut header = [0u8; REQUEST_SIZE];
    header[0] = KIND_BULK;
    header[1..9].copy_from_slice(&bytes.to_le_bytes());
    stream.write_all(&header)?;
    let chunk = vec![0x5au8; BULK_CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(BULK_CHUNK, |l| l.min(BULK_CHUNK));
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    let mut count = [0u8; 8];
    stream.read_exact(&mut count)?;
    if u64::from_le_bytes(count) == bytes {
        Ok(())
    } else {
        Err(io::Error::other(
            "the server counted a different number of bytes",
        ))
    }
}

/// Serves one connection until the client closes it.
pub fn serve_connection(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let response = [0x42u8; RESPONSE_SIZE];
    let mut sink = vec![0u8; BULK_CHUNK];
    loop {
        let mut request = [0u8; REQUEST_SIZE];
        match stream.read_exact(&mut request) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        match request[0] {
            KIND_REQUEST => stream.write_all(&response)?,
            KIND_BULK => {
                let mut length = [0u8; 8];
                length.copy_from_slice(&request[1..9]);
                let total = u64::from_le_bytes(length);
                let mut left = total;
                while left > 0 {
                    let want = usize::try_from(left).map_or(sink.len(), |l| l.min(sink.len()));
                    let n = stream.read(&mut sink[..want])?;
                    if n == 0 {
                        return Ok(());
                    }
                    left -= n as u64;
                }
                stream.write_all(&total.to_le_bytes())?;
            }
            other => return Err(io::Error::other(format!("unknown request kind {other:#x}"))),
        }
    }
}
