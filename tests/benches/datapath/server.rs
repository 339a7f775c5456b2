//! The backend the benchmarks talk to: this same executable, started by the harness inside a
//! pod (or the node) with [`ROLE_ENV`] set to the addresses to listen on.

use std::{
    io::{self, Write},
    net::{SocketAddr, TcpListener},
    process::ExitCode,
    thread,
};

use crate::wire;

/// Comma-separated listen addresses; when set, the executable is a server and nothing else.
pub const ROLE_ENV: &str = "NODEGATE_BENCH_SERVER";
/// Accepting threads per listener: a connection is served by the thread that accepted it, so
/// no thread is spawned per connection (that would be measured too).
const THREADS_PER_LISTENER: usize = 8;

pub fn run(addrs: &str) -> ExitCode {
    match serve(addrs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(addrs: &str) -> io::Result<()> {
    let mut threads = Vec::new();
    let mut stdout = io::stdout().lock();
    for addr in addrs.split(',') {
        let addr: SocketAddr = addr.parse().map_err(io::Error::other)?;
        let listener = TcpListener::bind(addr)?;
        for _ in 0..THREADS_PER_LISTENER {
            let listener = listener.try_clone()?;
            threads.push(thread::spawn(move || {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Err(e) = wire::serve_connection(stream) {
                                eprintln!("bench server: {e}");
                            }
                        }
                        Err(e) => eprintln!("bench server: accept: {e}"),
                    }
                }
            }));
        }
        writeln!(stdout, "listening {addr}")?;
    }
    stdout.flush()?;
    drop(stdout);
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}
