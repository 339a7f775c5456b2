//! `ngpeer`: the traffic helper the harness runs inside pods, the foreign node and the node.
//!
//! ```text
//! ngpeer serve --listen ADDR [--listen ADDR ...] [--name N] [--http11]
//! ngpeer connect ADDR [--send STR] [--timeout-ms N] [--half-close | --raw]
//! ```
//!
//! `serve` prints `listening ADDR` once per bound address, then one JSON line per connection
//! (`{"event":"conn","peer":..,"local":..,"read":..}`). For each connection it reads until a
//! newline or EOF and answers `N:<what it read>`; a request starting with an HTTP method (`GET `,
//! `HEAD `, `POST `, ...) is answered as HTTP/1.0 with `200` and the body `hello from N`
//! (`GET /bytes/SIZE`: SIZE bytes, streamed; `/headers`: a JSON echo of the request head,
//! `{"name","method","target","headers":[[name,value],...]}` with names as received). With
//! `--http11`, HTTP is answered as HTTP/1.1 with keep-alive: request after request on one
//! connection (each with its own `conn` line) until the client closes or sends
//! `Connection: close`.
//!
//! `connect` prints exactly one JSON line and exits 0 whatever happened on the wire:
//! `{"ok","connected","error","kind","errno","local","reply"}` where `kind` is one of `refused`,
//! `timeout`, `reset`, `unreachable`, `aborted`, `other` (null when `ok`). Without
//! `--half-close` a newline is appended to the message; with it the message is sent as is and
//! the write side is shut down, so the peer only answers once it has seen EOF. With `--raw` the
//! message is sent as is and the write side stays open (a raw HTTP request with
//! `Connection: close`: the reply is read until the server closes).

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use serde_json::json;

const USAGE: &str = "usage: ngpeer serve --listen ADDR [--listen ADDR ...] [--name N] [--http11]\n       \
                     ngpeer connect ADDR [--send STR] [--timeout-ms N] [--half-close | --raw]";

/// How long a served connection may stay silent before it is dropped.
const SERVE_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on what one served connection may send before the reply.
const SERVE_MAX_READ: usize = 64 * 1024;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => parse_serve(&args[1..]).and_then(|opts| serve(&opts)),
        Some("connect") => parse_connect(&args[1..]).map(|opts| connect(&opts)),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ngpeer: {message}");
            ExitCode::from(2)
        }
    }
}

struct ServeOpts {
    listen: Vec<SocketAddr>,
    name: String,
    http11: bool,
}

struct ConnectOpts {
    target: SocketAddr,
    send: String,
    timeout: Duration,
    half_close: bool,
    raw: bool,
}

fn value<'a>(args: &'a [String], i: usize, flag: &str) -> Result<&'a str, String> {
    args.get(i + 1)
        .map(String::as_str)
        .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|e| format!("`{s}` is not an ip:port address: {e}"))
}

fn parse_serve(args: &[String]) -> Result<ServeOpts, String> {
    let mut opts = ServeOpts {
        listen: Vec::new(),
        name: "peer".to_owned(),
        http11: false,
    };
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--listen" => opts.listen.push(parse_addr(value(args, i, "--listen")?)?),
            "--name" => value(args, i, "--name")?.clone_into(&mut opts.name),
            "--http11" => {
                opts.http11 = true;
                i += 1;
                continue;
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
        i += 2;
    }
    if opts.listen.is_empty() {
        return Err(format!("serve needs at least one --listen\n{USAGE}"));
    }
    Ok(opts)
}

fn parse_connect(args: &[String]) -> Result<ConnectOpts, String> {
    let target = parse_addr(args.first().ok_or_else(|| USAGE.to_owned())?)?;
    let mut opts = ConnectOpts {
        target,
        send: "hello".to_owned(),
        timeout: Duration::from_secs(2),
        half_close: false,
        raw: false,
    };
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--send" => {
                value(args, i, "--send")?.clone_into(&mut opts.send);
                i += 2;
            }
            "--timeout-ms" => {
                let ms: u64 = value(args, i, "--timeout-ms")?
                    .parse()
                    .map_err(|e| format!("--timeout-ms: {e}"))?;
                opts.timeout = Duration::from_millis(ms.max(1));
                i += 2;
            }
            "--half-close" => {
                opts.half_close = true;
                i += 1;
            }
            "--raw" => {
                opts.raw = true;
                i += 1;
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok(opts)
}

fn serve(opts: &ServeOpts) -> Result<(), String> {
    let mut listeners = Vec::new();
    for addr in &opts.listen {
        let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        listeners.push(listener);
    }
    {
        let mut out = io::stdout().lock();
        for listener in &listeners {
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            writeln!(out, "listening {addr}").map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            let name = opts.name.clone();
            let http11 = opts.http11;
            thread::spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(stream) => {
                            let name = name.clone();
                            thread::spawn(move || handle(stream, &name, http11));
                        }
                        Err(e) => eprintln!("ngpeer: accept: {e}"),
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        // A listener thread only ends by panicking; report it rather than hide it.
        handle
            .join()
            .map_err(|_| "listener thread panicked".to_owned())?;
    }
    Ok(())
}

/// Reads one request (a line, everything up to EOF, or an HTTP request head) and answers it
/// (HTTP with `http11`: every request of the connection).
fn handle(mut stream: TcpStream, name: &str, http11: bool) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let _ = stream.set_read_timeout(Some(SERVE_READ_TIMEOUT));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut error = None;
    loop {
        if is_http(&buf) {
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        } else if buf.contains(&b'\n') {
            break;
        }
        if buf.len() >= SERVE_MAX_READ {
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    if http11 && error.is_none() && is_http(&buf) {
        serve_http11(stream, buf, name, &peer, &local);
        return;
    }
    let read = String::from_utf8_lossy(&buf).into_owned();
    let written = if is_http(&buf) {
        answer_http(&mut stream, &read, name, false)
    } else {
        stream.write_all(format!("{name}:{read}").as_bytes())
    }
    .and_then(|()| stream.flush());
    let _ = stream.shutdown(Shutdown::Write);
    let line = json!({
        "event": "conn",
        "peer": peer,
        "local": local,
        "read": read,
        "error": error.or_else(|| written.err().map(|e| e.to_string())),
    });
    println!("{line}");
    // Drain until the client closes so that our close is a FIN, not an RST.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = io::copy(&mut stream, &mut io::sink());
}

/// Answers one HTTP request (`read`: its head): HTTP/1.0 and close, or HTTP/1.1 keep-alive.
fn answer_http(stream: &mut TcpStream, read: &str, name: &str, http11: bool) -> io::Result<()> {
    let head = |len: usize, content_type: &str| {
        let (version, connection) = if http11 {
            ("HTTP/1.1", "keep-alive")
        } else {
            ("HTTP/1.0", "close")
        };
        format!(
            "{version} 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\nConnection: {connection}\r\n\r\n"
        )
    };
    if let Some(len) = http_bytes_path(read) {
        stream.write_all(head(len, "text/plain").as_bytes())?;
        return write_pattern(stream, len);
    }
    let (body, content_type) = match http_echo(read, name) {
        Some(echo) => (echo, "application/json"),
        None => (format!("hello from {name}"), "text/plain"),
    };
    let head = head(body.len(), content_type);
    if read.starts_with("HEAD ") {
        stream.write_all(head.as_bytes())
    } else {
        stream.write_all(format!("{head}{body}").as_bytes())
    }
}

/// HTTP/1.1 keep-alive: `buf` holds at least the first request head. Answers each request
/// (its `Content-Length` body is read and dropped) until EOF, an error or `Connection: close`.
fn serve_http11(mut stream: TcpStream, mut buf: Vec<u8>, name: &str, peer: &str, local: &str) {
    let mut chunk = [0u8; 4096];
    let mut fill = |stream: &mut TcpStream, buf: &mut Vec<u8>, want: &dyn Fn(&[u8]) -> bool| {
        while !want(buf) {
            if buf.len() >= SERVE_MAX_READ * 16 {
                return Err("request too large".to_owned());
            }
            match stream.read(&mut chunk) {
                Ok(0) => return Err(String::new()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    };
    let head_end = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    loop {
        if let Err(e) = fill(&mut stream, &mut buf, &|b| head_end(b).is_some()) {
            if !e.is_empty() {
                eprintln!("ngpeer: {peer}: {e}");
            }
            break;
        }
        let end = head_end(&buf).unwrap_or(buf.len());
        let read = String::from_utf8_lossy(&buf[..end]).into_owned();
        let header = |name: &str| {
            read.split("\r\n").skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let body_read = fill(&mut stream, &mut buf, &|b| b.len() >= end + length);
        let rest = buf.split_off((end + length).min(buf.len()));
        buf = rest;
        let written = answer_http(&mut stream, &read, name, true).and_then(|()| stream.flush());
        println!(
            "{}",
            json!({
                "event": "conn",
                "peer": peer,
                "local": local,
                "read": read,
                "error": body_read.err().filter(|e| !e.is_empty()).or_else(|| written.as_ref().err().map(ToString::to_string)),
            })
        );
        if close || written.is_err() {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = io::copy(&mut stream, &mut io::sink());
}

/// `GET /bytes/N` asks for a body of N bytes (streamed, for large transfers).
fn http_bytes_path(request: &str) -> Option<usize> {
    let path = request.strip_prefix("GET ")?.split_whitespace().next()?;
    path.strip_prefix("/bytes/")?.parse().ok()
}

/// Writes `len` bytes of a repeating pattern in 64 KiB chunks.
fn write_pattern(stream: &mut TcpStream, mut len: usize) -> io::Result<()> {
    let chunk: Vec<u8> = (0..64 * 1024)
        .map(|i| b'a' + u8::try_from(i % 26).unwrap_or(0))
        .collect();
    while len > 0 {
        let n = len.min(chunk.len());
        stream.write_all(&chunk[..n])?;
        len -= n;
    }
    Ok(())
}

/// For a request to `/headers` (any method, any query): its head as JSON.
fn http_echo(request: &str, name: &str) -> Option<String> {
    let head = request.split("\r\n\r\n").next()?;
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let (method, target) = (request_line.next()?, request_line.next()?);
    if target.split('?').next() != Some("/headers") {
        return None;
    }
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k, v.trim()))
        .collect();
    Some(json!({"name": name, "method": method, "target": target, "headers": headers}).to_string())
}

/// Methods whose requests are answered as HTTP.
const HTTP_METHODS: [&[u8]; 7] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"PATCH ",
    b"OPTIONS ",
];

fn is_http(buf: &[u8]) -> bool {
    HTTP_METHODS.iter().any(|m| buf.starts_with(m))
}

fn connect(opts: &ConnectOpts) {
    let deadline = Instant::now() + opts.timeout;
    let result = match TcpStream::connect_timeout(&opts.target, opts.timeout) {
        Err(e) => json!({
            "ok": false,
            "connected": false,
            "error": e.to_string(),
            "kind": kind(&e),
            "errno": e.raw_os_error(),
            "local": null,
            "reply": null,
        }),
        Ok(stream) => {
            let local = stream.local_addr().ok().map(|a| a.to_string());
            let (reply, err) = exchange(stream, opts, deadline);
            json!({
                "ok": err.is_none(),
                "connected": true,
                "error": err.as_ref().map(ToString::to_string),
                "kind": err.as_ref().map(kind),
                "errno": err.as_ref().and_then(io::Error::raw_os_error),
                "local": local,
                "reply": String::from_utf8_lossy(&reply),
            })
        }
    };
    println!("{result}");
}

/// Sends the message, then reads the reply until EOF or the deadline.
fn exchange(
    mut stream: TcpStream,
    opts: &ConnectOpts,
    deadline: Instant,
) -> (Vec<u8>, Option<io::Error>) {
    let mut reply = Vec::new();
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let sent = (|| {
        stream.set_write_timeout(Some(remaining()))?;
        stream.write_all(opts.send.as_bytes())?;
        if opts.half_close {
            stream.shutdown(Shutdown::Write)?;
        } else if !opts.raw {
            stream.write_all(b"\n")?;
        }
        Ok::<(), io::Error>(())
    })();
    if let Err(e) = sent {
        return (reply, Some(e));
    }
    let mut chunk = [0u8; 4096];
    loop {
        if let Err(e) = stream.set_read_timeout(Some(remaining())) {
            return (reply, Some(e));
        }
        match stream.read(&mut chunk) {
            Ok(0) => return (reply, None),
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (reply, Some(e)),
        }
    }
}

fn kind(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => "unreachable",
        io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => "aborted",
        _ => "other",
    }
}
