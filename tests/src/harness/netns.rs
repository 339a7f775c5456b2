//! Sockets opened inside another network namespace from the test process itself.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so a short-lived
//! thread switches and opens the socket; the socket keeps its namespace after the thread exits
//! and is then used from the caller's thread.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

use super::{Error, Result, io_err};

/// Connects to `addr` from inside the named netns (`/run/netns/<netns>`).
pub fn tcp_connect_in_netns(netns: &str, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    in_netns(netns, &format!("connect to {addr}"), || {
        TcpStream::connect_timeout(&addr, timeout)
    })
}

/// Runs `f` on a short-lived thread inside the named netns and returns what it returns: a
/// socket opened there stays in that namespace.
pub fn in_netns<T: Send>(
    netns: &str,
    what: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    let ns = File::open(&path).map_err(io_err(format!("open {path}")))?;
    let done = thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: plain syscall on a valid fd; it affects this short-lived thread only.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                f()
            })
            .join()
    });
    match done {
        Ok(result) => result.map_err(io_err(format!("{what} in netns {netns}"))),
        Err(_) => Err(Error::Io {
            what: format!("{what} in netns {netns}"),
            source: std::io::Error::other("thread panicked"),
        }),
    }
}

/// A listening TCP socket at `addr` inside the named netns.
pub fn tcp_listen_in_netns(netns: &str, addr: SocketAddr) -> Result<TcpListener> {
    in_netns(netns, &format!("listen on {addr}"), || {
        TcpListener::bind(addr)
    })
}

/// Writes sysctls (`("net/ipv4/ip_forward", "1")`, paths under `/proc/sys`) inside the named
/// netns: `/proc/sys/net` shows the namespace of the thread that opens it, so no `sysctl`
/// binary (procps) is needed.
pub fn sysctl_in_netns(netns: &str, settings: &[(&str, &str)]) -> Result<()> {
    in_netns(netns, "sysctl", || {
        for (key, value) in settings {
            let file = format!("/proc/sys/{key}");
            std::fs::write(&file, value).map_err(|e| {
                std::io::Error::new(e.kind(), format!("write {value} to {file}: {e}"))
            })?;
        }
        Ok(())
    })
}

/// `GET path` over HTTP/1.0 inside the named netns; returns the status code and the body.
pub fn http_get_in_netns(
    netns: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let mut stream = tcp_connect_in_netns(netns, addr, timeout)?;
    let what = || format!("GET http://{addr}{path} in netns {netns}");
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io_err(what()))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io_err(what()))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io_err(what()))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(io_err(what()))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Parse {
            what: what(),
            detail: format!("no status line in {head:?}"),
        })?;
    Ok((code, body.to_owned()))
}
