//! `cargo xtask fuzz`: the cargo-fuzz targets of `gateway/fuzz` (parsers of attacker-controlled
//! input), built with the pinned nightly and run from the seed corpus committed in
//! `gateway/fuzz/seeds/<target>/`. `cargo xtask test` runs each target briefly; this command
//! runs them longer, keeping what they find in `target/fuzz/corpus`.
//!
//! The targets are safe Rust: no sanitizer (`--sanitizer none`, several times faster than ASAN),
//! with debug assertions and overflow checks on (`--dev`, whose profile in
//! `gateway/fuzz/Cargo.toml` still optimizes a little). Nothing is written into the source tree:
//! build, corpus copies and crash inputs live under `target/fuzz`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{self, EBPF_TOOLCHAIN},
    setup,
};

/// The fuzz crate (a workspace of its own), relative to the project root.
const FUZZ_DIR: &str = "gateway/fuzz";
/// The host triple cargo-fuzz builds for (its default): RUSTFLAGS, with the coverage
/// instrumentation, then apply to the targets only, never to build scripts, so the gateway's
/// build script and the eBPF build it starts (aya-build, its own `CARGO_ENCODED_RUSTFLAGS`)
/// are not instrumented.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// What `cargo xtask test` runs of each target: a fixed number of inputs from a fixed seed,
/// the same on every run, so that CI fails on what the code does and not on what one run
/// happened to try (a time limit with libFuzzer's random seed made two clean-clone runs of
/// the same commit disagree: the second found the `path` input the first had not reached).
/// About 10 s each on the 2-vCPU VM (counts measured with 16 s runs there, taken at ~60%).
const CI_RUNS: &[(&str, u64)] = &[
    ("bearer", 1_300_000),
    ("config_yaml", 60_000),
    ("explain_query", 500_000),
    ("framing", 900_000),
    ("headers", 400_000),
    ("path", 650_000),
    ("policy_yaml", 400_000),
    ("session_cookie", 45_000),
    ("sni", 1_000_000),
];
/// Inputs for a target missing from [`CI_RUNS`] (a new one).
const CI_RUNS_DEFAULT: u64 = 50_000;
/// The seed of the CI runs.
const CI_SEED: u32 = 1;
/// An upper bound on each CI run however slow the machine: it stops there (having tried a
/// prefix of the same inputs) rather than holding CI.
const CI_MAX_SECONDS: u32 = 60;
/// An input that takes longer than this is reported as a hang (libFuzzer's default: 20 minutes).
const INPUT_TIMEOUT_S: u32 = 10;

#[derive(clap::Args)]
pub struct Args {
    /// One target (`cargo fuzz list` in gateway/fuzz); default: all of them, one after another.
    target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 300)]
    seconds: u32,
    /// Run exactly what `cargo xtask test` runs (every target, its fixed seed and inputs).
    #[arg(long, conflicts_with_all = ["target", "seconds"])]
    ci: bool,
}

/// `cargo xtask fuzz [target] [--seconds N]`: set up, build, run; the corpus grows across runs.
pub fn run(args: &Args) -> Result<()> {
    setup::run()?;
    if args.ci {
        cmd::section("fuzz: what cargo xtask test runs");
        return ci();
    }
    let all = targets()?;
    let targets = match &args.target {
        Some(target) if all.contains(target) => vec![target.clone()],
        Some(target) => bail!("no fuzz target {target:?}; the targets: {}", all.join(", ")),
        None => all,
    };
    cmd::section("fuzz: build");
    build()?;
    for target in &targets {
        cmd::section(&format!("fuzz: {target} for {} s", args.seconds));
        let corpus = fuzz_dir().join("corpus").join(target);
        copy_seeds(target, &corpus, false)?;
        run_target(
            target,
            &corpus,
            &[format!("-max_total_time={}", args.seconds)],
        )?;
    }
    Ok(())
}

/// The step of `cargo xtask test`: builds every target and runs each for its [`CI_RUNS`] from
/// a fresh copy of its seeds. A crash fails the step, naming the input that caused it.
pub fn ci() -> Result<()> {
    build()?;
    for target in targets()? {
        let corpus = fuzz_dir().join("ci-corpus").join(&target);
        copy_seeds(&target, &corpus, true)?;
        let runs = CI_RUNS
            .iter()
            .find(|(name, _)| *name == target)
            .map_or(CI_RUNS_DEFAULT, |(_, runs)| *runs);
        run_target(
            &target,
            &corpus,
            &[
                format!("-seed={CI_SEED}"),
                format!("-runs={runs}"),
                format!("-max_total_time={CI_MAX_SECONDS}"),
            ],
        )?;
    }
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    cmd::target_dir().join("fuzz")
}

fn cargo_fuzz() -> Command {
    let mut cargo = cmd::cargo_with(EBPF_TOOLCHAIN);
    cargo
        .current_dir(cmd::project_root().join(FUZZ_DIR))
        // Ours, appended by cargo-fuzz to its own flags, would only get in the way.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cargo
}

/// The targets, as `cargo fuzz list` reads them from the fuzz crate's manifest.
fn targets() -> Result<Vec<String>> {
    let listed = cmd::output(cargo_fuzz().args(["fuzz", "list"]))
        .context("`cargo fuzz list` failed in gateway/fuzz (is cargo-fuzz installed?)")?;
    let targets: Vec<String> = listed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if targets.is_empty() {
        bail!("`cargo fuzz list` in {FUZZ_DIR} lists no targets");
    }
    Ok(targets)
}

fn build() -> Result<()> {
    cmd::run(
        cargo_fuzz()
            .args([
                "fuzz",
                "build",
                "--dev",
                "--sanitizer",
                "none",
                "--target",
                TRIPLE,
            ])
            .arg("--target-dir")
            .arg(fuzz_dir().join("build")),
    )
}

fn binary(target: &str) -> PathBuf {
    fuzz_dir()
        .join("build")
        .join(TRIPLE)
        .join("debug")
        .join(target)
}

/// Copies `gateway/fuzz/seeds/<target>/` into `corpus` (emptied first when `fresh`), so that
/// the fuzzer never writes into the source tree.
fn copy_seeds(target: &str, corpus: &Path, fresh: bool) -> Result<()> {
    let seeds = cmd::project_root()
        .join(FUZZ_DIR)
        .join("seeds")
        .join(target);
    if fresh && corpus.exists() {
        fs::remove_dir_all(corpus).with_context(|| format!("removing {}", corpus.display()))?;
    }
    fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let entries =
        fs::read_dir(&seeds).with_context(|| format!("no seed corpus {}", seeds.display()))?;
    for entry in entries {
        let entry = entry?;
        fs::copy(entry.path(), corpus.join(entry.file_name()))
            .with_context(|| format!("copying {}", entry.path().display()))?;
    }
    Ok(())
}

/// Runs the built target with libFuzzer's `limits` (time, runs, seed). On a crash, a failed
/// assertion or a hang, names the saved input and how to reproduce it.
fn run_target(target: &str, corpus: &Path, limits: &[String]) -> Result<()> {
    let artifacts = fuzz_dir().join("artifacts").join(target);
    fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    let (start, started) = (Instant::now(), SystemTime::now());
    let mut fuzz = Command::new(binary(target));
    fuzz.arg(corpus)
        .args(limits)
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .env("RUST_BACKTRACE", "1")
        .stdin(std::process::Stdio::null());
    let result = cmd::run(&mut fuzz);
    let Err(err) = result else {
        println!(
            "  ok  {target}: {:.0} s, no crash",
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    };
    let found: Vec<PathBuf> = fs::read_dir(&artifacts)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| {
                    e.metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|modified| modified >= started)
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    if found.is_empty() {
        return Err(err.context(format!(
            "fuzz target {target} failed without saving an input"
        )));
    }
    for input in &found {
        eprintln!("\nfuzz target {target} failed on: {}", input.display());
        eprintln!(
            "  reproduce: {} {}",
            binary(target).display(),
            input.display()
        );
        eprintln!(
            "  (or: cd {FUZZ_DIR} && cargo +{EBPF_TOOLCHAIN} fuzz run --dev --sanitizer none {target} {})",
            input.display()
        );
    }
    Err(err.context(format!(
        "fuzz target {target} failed on {}",
        found
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}
