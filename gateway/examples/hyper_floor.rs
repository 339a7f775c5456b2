//! The floor of an HTTP/1.1 proxy built on hyper, for the side-by-side benchmark
//! (`cargo xtask bench http`, target `hyper_floor`): hyper's server on the client side and
//! hyper's client on the backend side, the request and the response passed through unchanged,
//! with none of the gateway's own work (no framing guard, no canonical path, no
//! authentication, no policy, no decision line, no identity assertion, no pool: each client
//! connection gets one backend connection of its own, the cheapest pairing there is).
//!
//! The gateway's HTTP path is this plus its own work, so the distance between the two is what
//! the gateway adds, and the distance between this and nginx is what building on hyper costs.
//!
//! `hyper_floor <listen addr> <backend addr>`: one current-thread runtime (the gateway's
//! data plane has one worker when pinned to one core).

use std::{env, net::SocketAddr, process::ExitCode};

use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::{
    Request, body::Incoming, client::conn::http1 as client, server::conn::http1 as server,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Body = BoxBody<bytes::Bytes, hyper::Error>;

fn main() -> ExitCode {
    let mut args = env::args().skip(1);
    let (Some(listen), Some(backend)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper_floor <listen addr> <backend addr>");
        return ExitCode::from(64);
    };
    let (Ok(listen), Ok(backend)) = (listen.parse::<SocketAddr>(), backend.parse::<SocketAddr>())
    else {
        eprintln!("hyper_floor: addresses must be ip:port");
        return ExitCode::from(64);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hyper_floor: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(listen, backend)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyper_floor: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(listen: SocketAddr, backend: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(e) = connection(stream, backend).await {
                eprintln!("hyper_floor: connection: {e}");
            }
        });
    }
}

async fn connection(stream: TcpStream, backend: SocketAddr) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let upstream = TcpStream::connect(backend)
        .await
        .map_err(|e| format!("connect {backend}: {e}"))?;
    upstream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = client::handshake::<_, Body>(TokioIo::new(upstream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // hyper calls the service for one request at a time per connection (HTTP/1.1): the
    // lock is never contended, it only lets the `Fn` service reach the sender.
    let sender = std::sync::Arc::new(tokio::sync::Mutex::new(sender));
    let service = service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            sender.ready().await?;
            let response = sender.send_request(req.map(BodyExt::boxed)).await?;
            Ok::<_, hyper::Error>(response.map(BodyExt::boxed))
        }
    });
    server::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(|e| e.to_string())
}
