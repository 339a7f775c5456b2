//! `gateway`: the Nodegate daemon and its CLI. See docs/ARCHITECTURE.md.

mod admin;
mod cli;
mod config;
mod ebpf;
mod proxy;
mod telemetry;

fn main() -> std::process::ExitCode {
    cli::main()
}
