//! `cargo xtask test`: what CI runs (`.ci/run`). Set-up, formatting, lints, build, a short run of
//! every fuzz target, then the whole test suite as root on the real kernel. The last thing
//! printed is `cargo test`'s own output, result lines included: CI reads them.

use std::ffi::OsString;

use anyhow::Result;

use crate::{
    cmd::{self, Steps},
    daemonset, fuzz, setup,
};

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and `cargo clippy` (quicker local iterations; CI runs them).
    #[arg(long)]
    no_lint: bool,
    /// Passed on to `cargo test`: `cargo xtask test -- redirect` runs the tests whose name
    /// contains `redirect`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    cargo_test_args: Vec<OsString>,
}

/// The variable the end-to-end tests read to find the gateway binary.
pub const GATEWAY_BIN_ENV: &str = "NODEGATE_GATEWAY_BIN";

pub fn run(args: &Args) -> Result<()> {
    let mut steps = Steps::default();
    steps.run("setup", setup::run)?;
    if !args.no_lint {
        steps.run("cargo fmt --check", || {
            cmd::run(cmd::cargo().args(["fmt", "--all", "--", "--check"]))
        })?;
        steps.run("cargo clippy -D warnings", || {
            cmd::run(cmd::cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "gateway-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
    }
    steps.run("build the gateway (and its eBPF object)", build_gateway)?;
    steps.run("build the tests", || {
        cmd::run(test_command().arg("--no-run").args(&args.cargo_test_args))
    })?;
    steps.run(
        "validate daemonset/ (kubernetes-validate --strict, CRD schema, examples)",
        daemonset::validate,
    )?;
    steps.run(
        "fuzz targets (gateway/fuzz: a fixed seed and number of inputs each, from its seeds)",
        fuzz::ci,
    )?;
    steps.print_summary("cargo xtask test: checks passed");
    let gateway = gateway_bin();
    println!(
        "  running the test suite with {GATEWAY_BIN_ENV}={}",
        gateway.display()
    );
    println!("  (cargo test's result lines end this output)\n");
    cmd::run_last(
        test_command()
            .env(GATEWAY_BIN_ENV, &gateway)
            .args(&args.cargo_test_args),
    )
}

/// `cargo build -p gateway --bins`: the binary the tests, the demo and the benchmarks run.
/// Its build script compiles the eBPF programs with the pinned nightly.
pub fn build_gateway() -> Result<()> {
    cmd::run(cmd::cargo().args(["build", "-p", "gateway", "--bins"]))
}

/// Where [`build_gateway`] puts the binary.
pub fn gateway_bin() -> std::path::PathBuf {
    cmd::target_dir().join("debug").join("gateway")
}

fn test_command() -> std::process::Command {
    let mut cmd = cmd::cargo();
    cmd.args(["test", "--workspace", "--exclude", "gateway-ebpf"]);
    cmd
}
