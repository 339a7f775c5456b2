//! `cargo xtask fmt`: rustfmt from the pinned nightly, with the import options that stable
//! rustfmt ignores (`rustfmt.toml` keeps to stable options so that `cargo fmt --check` in CI
//! agrees with it).

use std::process::Command;

use anyhow::Result;

use crate::cmd::{self, EBPF_TOOLCHAIN};

const NIGHTLY_OPTIONS: &str = "group_imports=StdExternalCrate,imports_granularity=Crate";

#[derive(clap::Args)]
pub struct Args {
    /// Only report files that would change.
    #[arg(long)]
    check: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let rustup = cmd::rustup_tool("rustup");
    let listed = cmd::output(Command::new(&rustup).args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        EBPF_TOOLCHAIN,
    ]))
    .unwrap_or_default();
    if !listed.lines().any(|line| line.starts_with("rustfmt")) {
        cmd::run(
            Command::new(&rustup)
                .args(["component", "add", "rustfmt", "--toolchain", EBPF_TOOLCHAIN])
                .env_remove("RUSTUP_TOOLCHAIN"),
        )?;
    }
    let mut fmt = cmd::cargo_with(EBPF_TOOLCHAIN);
    fmt.args(["fmt", "--all", "--", "--config", NIGHTLY_OPTIONS]);
    if args.check {
        fmt.arg("--check");
    }
    cmd::run(&mut fmt)
}
