//! `cargo xtask demo`: set up, build the gateway and the demo, and run it.
//!
//! The demo itself is `tests/examples/demo.rs`: it uses the simulated-node harness of the
//! tests crate, which needs the pinned toolchain, so it cannot live in xtask.

use std::process::Command;

use anyhow::Result;

use crate::{
    cmd::{self, Steps},
    setup,
    test::{self, GATEWAY_BIN_ENV},
};

pub fn run() -> Result<()> {
    let mut steps = Steps::default();
    steps.run("setup", setup::run)?;
    steps.run(
        "build the gateway (and its eBPF object)",
        test::build_gateway,
    )?;
    steps.run("build the demo and its traffic helper", || {
        cmd::run(cmd::cargo().args([
            "build",
            "-p",
            "nodegate-tests",
            "--bins",
            "--example",
            "demo",
        ]))
    })?;
    steps.print_summary("ready");
    let demo = cmd::target_dir()
        .join("debug")
        .join("examples")
        .join("demo");
    cmd::section("demo");
    cmd::run(Command::new(demo).env(GATEWAY_BIN_ENV, test::gateway_bin()))
}
