//! Moving the bench process between cgroups: whether the hooks run depends only on the cgroup
//! of the process that calls `connect()`.

use std::{
    fs, io,
    path::{Path, PathBuf},
    process,
};

use nodegate_tests::harness::CGROUP2_ROOT;

/// Remembers the cgroup the process started in and moves it back there when dropped (the
/// node's cgroups can only be removed once nothing runs in them).
pub struct CgroupHome {
    home: PathBuf,
}

impl CgroupHome {
    pub fn new() -> io::Result<Self> {
        let text = fs::read_to_string("/proc/self/cgroup")?;
        // cgroup v2 line: `0::/path` relative to the v2 mount.
        let relative = text
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .ok_or_else(|| io::Error::other("no cgroup v2 entry in /proc/self/cgroup"))?;
        Ok(Self {
            home: Path::new(CGROUP2_ROOT).join(relative.trim_start_matches('/')),
        })
    }

    /// Moves the whole process (every thread) into `dir`.
    pub fn enter(dir: &Path) -> io::Result<()> {
        fs::write(dir.join("cgroup.procs"), process::id().to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("move into {}: {e}", dir.display())))
    }
}

impl Drop for CgroupHome {
    fn drop(&mut self) {
        if let Err(e) = Self::enter(&self.home) {
            eprintln!("bench: could not move back to {}: {e}", self.home.display());
        }
    }
}
