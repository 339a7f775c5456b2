//! `cargo xtask`: set-up, test orchestration, demo and benchmarks for Nodegate.
//!
//! This crate builds on the machine's *default* toolchain (there is no root
//! `rust-toolchain.toml`: with `RUSTUP_AUTO_INSTALL=0` rustup would refuse to start before
//! any of this code could install the pinned one). It installs the pinned toolchains itself
//! and runs every workspace build through them (`cargo +1.99.1 ...`), so it must keep
//! compiling on an older stable: few dependencies, no aya.

mod bench;
mod bench_peers;
mod cmd;
mod daemonset;
mod demo;
mod fmt;
mod fuzz;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Nodegate developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install every prerequisite on Debian 12 (apt packages, pinned toolchains, bpf-linker)
    /// and check the kernel set-up (root, cgroup v2, bpffs). Idempotent.
    Setup,
    /// Set up, then run `cargo fmt --check`, `cargo clippy -D warnings`, build the gateway and
    /// run the whole test suite (root, real kernel). What CI runs.
    Test(test::Args),
    /// Set up, build, and walk through the gateway on a simulated node: an allowed connection,
    /// a denied one, a bypass attempt with the kernel counter moving.
    Demo,
    /// Set up, run the benchmarks (root, simulated node) and write docs/BENCHMARKS.md.
    Bench(bench::Args),
    /// Format the workspace with the pinned nightly's rustfmt, which also applies the
    /// nightly-only import options (`group_imports`, `imports_granularity`).
    Fmt(fmt::Args),
    /// Set up, build the fuzz targets of gateway/fuzz (cargo-fuzz, pinned nightly) and run
    /// each, or the one named, from its seeds for `--seconds` (the corpus grows in
    /// target/fuzz); `--ci`: exactly the step of `cargo xtask test`.
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::Test(args) => test::run(&args),
        Command::Demo => demo::run(),
        Command::Bench(args) => bench::run(&args),
        Command::Fmt(args) => fmt::run(&args),
        Command::Fuzz(args) => fuzz::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // A failed child process already printed its own diagnostics; when it is the
            // last step of `test`, its exit code is passed through without more output.
            if let Some(cmd::Failed {
                code, quiet: true, ..
            }) = err.downcast_ref()
            {
                return ExitCode::from(*code);
            }
            eprintln!("\nxtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
