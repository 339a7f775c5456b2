//! `cargo xtask demo`.

use anyhow::Result;

pub fn run() -> Result<()> {
    anyhow::bail!("not implemented yet")
}
