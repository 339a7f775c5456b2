//! Builds `gateway-ebpf` for `bpfel-unknown-none` with the pinned nightly and puts the
//! object in `OUT_DIR`, where `src/ebpf` embeds it (`include_bytes_aligned!`): the
//! object can never be stale and there is no separate build step.
use anyhow::{Context as _, anyhow};

/// Must match `gateway-ebpf/rust-toolchain.toml` and `xtask` (`EBPF_TOOLCHAIN`).
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-15";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "gateway-ebpf")
        .ok_or_else(|| anyhow!("gateway-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent directory for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
        .context("building the eBPF programs (run `cargo xtask setup` if bpf-linker or the nightly is missing)")
}
