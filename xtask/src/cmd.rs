//! Running the tools xtask drives: every command is printed before it runs, and a failure
//! names the command and its exit status.

use std::{
    env,
    ffi::OsStr,
    fmt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// The stable toolchain the workspace builds with (aya 0.16 needs rustc >= 1.98).
pub const STABLE: &str = "1.99.1";
/// The nightly that builds the eBPF crate (`-Z build-std=core`); its LLVM major (22) must equal
/// bpf-linker's. Same name as `EBPF_TOOLCHAIN` in `gateway/build.rs` and
/// `gateway-ebpf/rust-toolchain.toml`.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-06-15";

/// A command exited unsuccessfully.
#[derive(Debug)]
pub struct Failed {
    pub command: String,
    pub code: u8,
    /// Pass the exit code through without printing anything more (the command's own output
    /// must stay the last thing printed).
    pub quiet: bool,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed (exit code {})", self.command, self.code)
    }
}

impl std::error::Error for Failed {}

/// The workspace root (xtask lives one level below it).
pub fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// The cargo target directory of the workspace.
pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(
        || project_root().join("target"),
        |dir| project_root().join(dir),
    )
}

/// `$CARGO_HOME/bin`, where rustup's proxies and `cargo install` binaries live.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// A rustup-managed tool: rustup's proxy in `$CARGO_HOME/bin` when it is there, so that a
/// `+toolchain` argument is honoured, else whatever `PATH` finds.
pub fn rustup_tool(name: &str) -> PathBuf {
    cargo_bin_dir()
        .map(|dir| dir.join(name))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `cargo +<toolchain>` in the workspace root, cleaned of what the outer `cargo run` (on the
/// default toolchain) put in the environment.
pub fn cargo_with(toolchain: &str) -> Command {
    let mut cmd = Command::new(rustup_tool("cargo"));
    cmd.arg(format!("+{toolchain}"))
        .current_dir(project_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTUP_TOOLCHAIN_SOURCE")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .stdin(Stdio::null());
    cmd
}

/// `cargo +1.99.1` in the workspace root.
pub fn cargo() -> Command {
    cargo_with(STABLE)
}

/// The command line as a person would type it (with the environment it sets).
pub fn display(cmd: &Command) -> String {
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| {
            value.map(|value| format!("{}={}", key.to_string_lossy(), value.to_string_lossy()))
        })
        .collect();
    let program = Path::new(cmd.get_program());
    // rustup's proxies are printed by name: `cargo`, not `/root/.cargo/bin/cargo`.
    let program = match program.file_name() {
        Some(name) if cargo_bin_dir().is_some_and(|dir| program.starts_with(dir)) => {
            name.to_string_lossy()
        }
        _ => program.as_os_str().to_string_lossy(),
    };
    words.push(program.into_owned());
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=+./:,@%".contains(c))
    {
        arg.into_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Prints the command, runs it with inherited stdout/stderr, and fails if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    run_inner(cmd, false)
}

/// Like [`run`], but a failure is reported by the exit code alone: for the last step, whose
/// own output must end the log.
pub fn run_last(cmd: &mut Command) -> Result<()> {
    run_inner(cmd, true)
}

fn run_inner(cmd: &mut Command, quiet: bool) -> Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if status.success() {
        return Ok(());
    }
    let code = status
        .code()
        .and_then(|code| u8::try_from(code).ok())
        .filter(|&code| code != 0)
        .unwrap_or(1);
    Err(Failed {
        command: line,
        code,
        quiet,
    }
    .into())
}

/// Runs the command quietly and returns its stdout, or `None` when it cannot start or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prints a section header.
pub fn section(title: &str) {
    println!("\n==> {title}");
}

/// A list of finished steps and how long each took, for the summary.
#[derive(Default)]
pub struct Steps(Vec<(String, Duration)>);

impl Steps {
    /// Runs `step`, recording its duration under `name` when it succeeds.
    pub fn run<T>(&mut self, name: &str, step: impl FnOnce() -> Result<T>) -> Result<T> {
        section(name);
        let start = Instant::now();
        let value = step().with_context(|| format!("step `{name}`"))?;
        self.0.push((name.to_owned(), start.elapsed()));
        Ok(value)
    }

    pub fn print_summary(&self, title: &str) {
        println!("\n==> {title}");
        for (name, elapsed) in &self.0 {
            println!("  ok  {:>6.1}s  {name}", elapsed.as_secs_f64());
        }
    }
}
