//! Pinned cgroup links: attach once, then swap programs into the same links on every start.
//!
//! A link pinned at `<bpffs>/links/<name>` keeps its program attached while no process holds
//! it (fail closed while the daemon is dead). On start:
//! - pinned and targeting the configured cgroup with the expected attach type →
//!   `BPF_LINK_UPDATE` the new program into it (never a second attachment);
//! - pinned but targeting another (or a removed) cgroup → attach a new link, pin it under a
//!   temporary name (`<name>_new`) and `rename(2)` it over the old pin, so the path always names a link; the
//!   old link detaches when its last reference (our fd) closes;
//! - not pinned → attach and pin.

use std::{
    fs::File,
    io,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::programs::links::FdLink;

use super::{EbpfError, sys};

/// The four hooks, their pin names, program names and attach types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    /// Pin name under `<bpffs>/links/`.
    pub name: &'static str,
    /// Program (function) name in the object.
    pub program: &'static str,
    pub attach_type: u32,
}

pub const CONNECT4: Hook = Hook {
    name: "connect4",
    program: "ng_connect4",
    attach_type: sys::attach::CGROUP_INET4_CONNECT,
};
pub const CONNECT6: Hook = Hook {
    name: "connect6",
    program: "ng_connect6",
    attach_type: sys::attach::CGROUP_INET6_CONNECT,
};
pub const SOCKOPS: Hook = Hook {
    name: "sockops",
    program: "ng_sockops",
    attach_type: sys::attach::CGROUP_SOCK_OPS,
};
pub const INGRESS: Hook = Hook {
    name: "ingress",
    program: "ng_ingress",
    attach_type: sys::attach::CGROUP_INET_INGRESS,
};

pub const HOOKS: [Hook; 4] = [CONNECT4, CONNECT6, SOCKOPS, INGRESS];

pub const LINKS_DIR: &str = "links";

pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join(LINKS_DIR)
}

/// What [`attach_or_update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// No pin existed: a new link was attached and pinned.
    Created { link_id: u32 },
    /// The pinned link was re-used (`BPF_LINK_UPDATE`).
    Updated { link_id: u32, old_prog_id: u32 },
    /// The pinned link targeted another cgroup (or attach type): replaced.
    Replaced { link_id: u32, old_cgroup_id: u64 },
}

/// The cgroup a hook attaches to.
pub struct Cgroup<'a> {
    pub path: &'a Path,
    pub file: &'a File,
    /// cgroup v2 id (the directory's inode number: kernfs node id).
    pub id: u64,
}

/// Attaches `prog` for `hook` on `cgroup`, re-using its pinned link when there is one.
/// `attach` creates a fresh link (through aya).
pub fn attach_or_update(
    hook: Hook,
    bpffs: &Path,
    cgroup: &Cgroup<'_>,
    prog: BorrowedFd<'_>,
    attach: impl FnOnce() -> Result<FdLink, EbpfError>,
) -> Result<Attached, EbpfError> {
    let dir = links_dir(bpffs);
    let path = dir.join(hook.name);
    let existing = match sys::obj_get(&path) {
        Ok(fd) => Some(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(EbpfError::PinnedLink { path, source }),
    };
    let Some(old) = existing else {
        let link = attach()?;
        pin(link, &path)?;
        let link_id = pinned_link_id(&path)?;
        return Ok(Attached::Created { link_id });
    };
    let info = sys::link_info(old.as_fd()).map_err(|source| EbpfError::PinnedLink {
        path: path.clone(),
        source,
    })?;
    if info.link_type == sys::LINK_TYPE_CGROUP
        && info.cgroup_id == cgroup.id
        && info.attach_type == hook.attach_type
    {
        sys::link_update(old.as_fd(), prog).map_err(|source| EbpfError::Syscall {
            context: format!("BPF_LINK_UPDATE of the pinned link {}", path.display()),
            source,
        })?;
        return Ok(Attached::Updated {
            link_id: info.id,
            old_prog_id: info.prog_id,
        });
    }
    // Replace: the new link is attached before the old one goes, so the cgroup is never
    // unprotected in between.
    let tmp = dir.join(replacement_name(hook));
    remove_stale(&tmp)?;
    let link = attach()?;
    pin(link, &tmp)?;
    std::fs::rename(&tmp, &path).map_err(|source| EbpfError::Io {
        context: format!(
            "replacing the pinned link {} (rename from {})",
            path.display(),
            tmp.display()
        ),
        source,
    })?;
    drop(old);
    let link_id = pinned_link_id(&path)?;
    Ok(Attached::Replaced {
        link_id,
        old_cgroup_id: info.cgroup_id,
    })
}

/// Temporary pin name of a replacement link (bpffs rejects names with a dot).
pub fn replacement_name(hook: Hook) -> String {
    format!("{}_new", hook.name)
}

fn pin(link: FdLink, path: &Path) -> Result<(), EbpfError> {
    link.pin(path).map(drop).map_err(|e| EbpfError::Pin {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

fn pinned_link_id(path: &Path) -> Result<u32, EbpfError> {
    let fd = sys::obj_get(path).map_err(|source| EbpfError::PinnedLink {
        path: path.to_path_buf(),
        source,
    })?;
    sys::link_info(fd.as_fd())
        .map(|i| i.id)
        .map_err(|source| EbpfError::PinnedLink {
            path: path.to_path_buf(),
            source,
        })
}

fn remove_stale(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(EbpfError::Io {
            context: format!("removing the leftover {}", path.display()),
            source: e,
        }),
        _ => Ok(()),
    }
}
