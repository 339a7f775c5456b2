//! `daemonset/validate.sh` in `cargo xtask test`: the manifests validated offline against the
//! Kubernetes `OpenAPI` schemas (`kubernetes-validate --strict` from `PyPI`, which ships the
//! schemas) and the `AccessPolicy` examples against the CRD's schema (`jsonschema`, `pyyaml`).
//!
//! The Python tools go into a venv of their own under the target directory, at pinned
//! versions; like every setup step it looks first, so a second run only asks the venv's `pip`
//! what it has. `kubectl` (for `kubectl kustomize`) comes with the machine image here
//! (google-cloud-cli); on a bare Debian 12 it is installed from apt (`kubernetes-client`).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// What validate.sh imports or runs, at the versions it was checked with.
const REQUIREMENTS: &[(&str, &str)] = &[
    ("kubernetes-validate", "1.37.0"),
    ("jsonschema", "4.26.0"),
    ("pyyaml", "6.0.3"),
];

/// The venv: `<target>/daemonset-venv`.
fn venv() -> PathBuf {
    cmd::target_dir().join("daemonset-venv")
}

/// Creates the venv and installs [`REQUIREMENTS`] unless they are there already. Returns the
/// venv's `bin` directory.
pub fn python_tools() -> Result<PathBuf> {
    let venv = venv();
    let bin = venv.join("bin");
    let python = bin.join("python3");
    let wanted: Vec<String> = REQUIREMENTS
        .iter()
        .map(|(name, version)| format!("{name}=={version}"))
        .collect();
    if python.exists() {
        let frozen = cmd::output(Command::new(&python).args([
            "-m",
            "pip",
            "freeze",
            "--disable-pip-version-check",
        ]))
        .unwrap_or_default()
        .to_lowercase();
        if wanted
            .iter()
            .all(|w| frozen.lines().any(|line| line == w.to_lowercase()))
        {
            println!("  ok  {} in {}", wanted.join(" "), venv.display());
            return Ok(bin);
        }
    } else {
        println!("  install  python venv {}", venv.display());
        if cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).is_err() {
            // Debian's python3 has no ensurepip without python3-venv.
            println!("  install  python3-venv (apt) and try again");
            let _ = std::fs::remove_dir_all(&venv);
            cmd::run(
                Command::new("apt-get")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdin(std::process::Stdio::null())
                    .args(["install", "-y", "-q", "python3-venv"]),
            )?;
            cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
    }
    println!("  install  {} (pip, PyPI)", wanted.join(" "));
    cmd::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(&wanted),
    )
    .context("installing the daemonset/ validation tools from PyPI")?;
    Ok(bin)
}

/// Runs `daemonset/validate.sh` with the venv first on `PATH`; fails when it does.
pub fn validate() -> Result<()> {
    if cmd::output(Command::new("kubectl").args(["version", "--client"])).is_none() {
        // A bare Debian 12: its kubernetes-client (kubectl 1.20, kustomize built in) renders
        // daemonset/ as well (the kustomization sticks to what that kustomize knows).
        println!("  install  kubernetes-client (apt: kubectl for `kubectl kustomize`)");
        cmd::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(std::process::Stdio::null())
                .args(["install", "-y", "-q", "kubernetes-client"]),
        )?;
        if cmd::output(Command::new("kubectl").args(["version", "--client"])).is_none() {
            bail!("kubectl not found even after installing kubernetes-client");
        }
    }
    let bin = python_tools()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .context("PATH with the venv")?;
    cmd::run(
        Command::new("bash")
            .arg(cmd::project_root().join("daemonset").join("validate.sh"))
            .env("PATH", path)
            .stdin(std::process::Stdio::null()),
    )
}
