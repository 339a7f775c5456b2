//! The idle-connection holder: this same executable started in the client pod with
//! [`ROLE_ENV`] = `addr,count`. It opens `count` connections one after the other, sends one
//! request on each ([`REQUEST_ENV`]) and reads its answer, keeps them all open and idle, prints
//! `holding N`, and sleeps until it is killed (which closes them all).

use std::{
    env,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    process::ExitCode,
    thread,
    time::Duration,
};

pub const ROLE_ENV: &str = "NODEGATE_PEERS_HOLD";
pub const REQUEST_ENV: &str = "NODEGATE_PEERS_REQUEST";

pub fn run(spec: &str) -> ExitCode {
    match hold(spec) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hold: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hold(spec: &str) -> io::Result<()> {
    let (addr, count) = spec
        .split_once(',')
        .ok_or_else(|| io::Error::other("expected addr,count"))?;
    let addr: SocketAddr = addr.parse().map_err(io::Error::other)?;
    let count: usize = count.parse().map_err(io::Error::other)?;
    let request = env::var(REQUEST_ENV).map_err(io::Error::other)?;
    crate::procfs::raise_nofile()?;
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| io::Error::other(format!("connection {i}: {e}")))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request.as_bytes())?;
        read_response(&mut stream).map_err(|e| io::Error::other(format!("connection {i}: {e}")))?;
        held.push(stream);
    }
    println!("holding {}", held.len());
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body; fails unless it is a 200.
fn read_response(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("closed before the response ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(io::Error::other(format!("not a 200: {head}")));
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| io::Error::other(format!("no content-length: {head}")))?;
        if buf.len() >= end + 4 + length {
            return Ok(());
        }
    }
}
