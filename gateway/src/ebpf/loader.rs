//! `Datapath::start`: environment checks, loading the embedded object with its maps pinned
//! (or re-used) under the pin directory, and attaching the four programs through pinned links.

use std::{
    error::Error as StdError,
    fs::File,
    io,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapError,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SockOps,
        links::FdLink,
    },
};

use super::{
    EbpfError,
    links::{self, Attached, Cgroup, Hook},
    sys,
};

/// The eBPF object built by `gateway/build.rs` (aya-build) from `gateway-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));

/// True if `err` or any of its sources is an `EPERM`/`EACCES`.
pub fn is_permission_error(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cur = e.source();
    }
    false
}

/// `bpffs` must be on a mounted bpffs: checked on the nearest existing ancestor (the
/// directory itself is created afterwards), then the pin and links directories are created.
pub fn prepare_bpffs(bpffs: &Path) -> Result<(), EbpfError> {
    let mut probe: PathBuf = bpffs.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    match sys::fs_magic(&probe) {
        Ok(sys::BPF_FS_MAGIC) => {}
        Ok(_) => {
            return Err(EbpfError::BpffsNotMounted {
                path: bpffs.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(EbpfError::Io {
                context: format!("statfs {}", probe.display()),
                source,
            });
        }
    }
    // bpffs reserves names with a dot (`bpf_lookup` answers EPERM), which would otherwise
    // look like missing privileges.
    if bpffs
        .strip_prefix(&probe)
        .is_ok_and(|rest| rest.to_string_lossy().contains('.'))
    {
        return Err(EbpfError::BpffsName {
            path: bpffs.to_path_buf(),
        });
    }
    let links = links::links_dir(bpffs);
    std::fs::create_dir_all(&links).map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            EbpfError::NotPermitted {
                action: format!("creating {}", links.display()),
                source,
            }
        } else {
            EbpfError::Io {
                context: format!("creating {}", links.display()),
                source,
            }
        }
    })
}

/// The exclusive claim of one gateway on its pin directory: a `flock` on the directory, held
/// for as long as this value lives (the kernel releases it when the process dies, however it
/// dies). `gateway run` takes it before anything else; `gateway detach` takes it too, so that
/// it never pulls the programs out from under a running gateway.
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
    path: PathBuf,
}

impl PinLock {
    /// Prepares `bpffs` ([`prepare_bpffs`]) and locks it, or says which process holds it.
    pub fn acquire(bpffs: &Path) -> Result<Self, EbpfError> {
        prepare_bpffs(bpffs)?;
        let dir = File::open(bpffs).map_err(|source| EbpfError::Io {
            context: format!("opening {}", bpffs.display()),
            source,
        })?;
        match dir.try_lock() {
            Ok(()) => Ok(Self {
                _dir: dir,
                path: bpffs.to_path_buf(),
            }),
            Err(std::fs::TryLockError::WouldBlock) => Err(EbpfError::PinsInUse {
                path: bpffs.to_path_buf(),
                holder: lock_holder(&dir),
            }),
            Err(std::fs::TryLockError::Error(source)) => Err(EbpfError::Io {
                context: format!("locking {}", bpffs.display()),
                source,
            }),
        }
    }
}

impl PinLock {
    /// The pin directory (prepared: on a bpffs, with its links directory).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The process holding the `flock` on `dir`, from `/proc/locks` (best effort: `None` when it is
/// not listed, e.g. in another PID namespace).
fn lock_holder(dir: &File) -> Option<u32> {
    let meta = dir.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// `/proc/locks` lines: `1: FLOCK  ADVISORY  WRITE 1234 00:1e:5678 0 EOF` (major:minor in hex).
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let mut f = line.split_whitespace();
        // A lock others wait for is listed after the holder with `->`.
        if f.nth(1)? != "FLOCK" {
            return None;
        }
        let pid = f.nth(2)?.parse().ok()?;
        let mut id = f.next()?.split(':');
        let (ma, mi, i) = (id.next()?, id.next()?, id.next()?);
        let same = u32::from_str_radix(ma, 16).ok()? == major
            && u32::from_str_radix(mi, 16).ok()? == minor
            && i.parse::<u64>().ok()? == ino;
        same.then_some(pid)
    })
}

/// Opens the cgroup v2 directory and returns it with its id (the directory's inode number:
/// on cgroup2 that is the kernfs node id the kernel reports as cgroup id).
pub fn open_cgroup(path: &Path) -> Result<(File, u64), EbpfError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(EbpfError::CgroupMissing {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(EbpfError::Io {
                context: format!("stat {}", path.display()),
                source,
            });
        }
    };
    let magic = sys::fs_magic(path).map_err(|source| EbpfError::Io {
        context: format!("statfs {}", path.display()),
        source,
    })?;
    if !meta.is_dir() || magic != sys::CGROUP2_SUPER_MAGIC {
        return Err(EbpfError::NotCgroup2 {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(|source| EbpfError::Io {
        context: format!("opening {}", path.display()),
        source,
    })?;
    Ok((file, meta.ino()))
}

/// Loads the object; maps are created and pinned under `bpffs`, or re-used if pinned.
pub fn load_object(bpffs: &Path) -> Result<Ebpf, EbpfError> {
    EbpfLoader::new()
        .default_map_pin_directory(bpffs)
        .load(OBJECT)
        .map_err(|e| match e {
            aya::EbpfError::MapError(MapError::IncompatiblePinnedMap {
                name,
                property,
                expected,
                actual,
            }) => EbpfError::PinnedMapIncompatible {
                name,
                bpffs: bpffs.to_path_buf(),
                property,
                expected,
                actual,
            },
            e if is_permission_error(&e) => EbpfError::NotPermitted {
                action: format!("creating or opening the pinned maps in {}", bpffs.display()),
                source: io::Error::from_raw_os_error(libc::EPERM),
            },
            e => EbpfError::Load(Box::new(e)),
        })
}

fn load_error(program: &'static str, e: ProgramError) -> EbpfError {
    match e {
        // The verifier reports most rejections as EACCES (or EPERM, EINVAL) *with* a log;
        // missing privileges fail before it runs, with an empty log.
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } if !format!("{verifier_log:?}").trim().is_empty()
            || !matches!(io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
        {
            EbpfError::VerifierRejected {
                program,
                log: format!("{verifier_log:?}"),
                source: io_error,
            }
        }
        e if is_permission_error(&e) => EbpfError::NotPermitted {
            action: format!("loading program {program}"),
            source: io::Error::from_raw_os_error(libc::EPERM),
        },
        e => EbpfError::Program {
            context: format!("loading program {program}"),
            source: Box::new(e),
        },
    }
}

fn attach_error(hook: Hook, cgroup: &Path) -> impl FnOnce(ProgramError) -> EbpfError {
    move |e| {
        let action = format!("attaching {} to {}", hook.name, cgroup.display());
        if is_permission_error(&e) {
            EbpfError::NotPermitted {
                action,
                source: io::Error::from_raw_os_error(libc::EPERM),
            }
        } else {
            EbpfError::Program {
                context: action,
                source: Box::new(e),
            }
        }
    }
}

fn to_fd_link<L>(hook: Hook, link: L) -> Result<FdLink, EbpfError>
where
    FdLink: TryFrom<L, Error = aya::programs::links::LinkError>,
{
    FdLink::try_from(link).map_err(|e| EbpfError::Program {
        context: format!(
            "{}: the kernel gave a legacy attachment instead of a link (needs Linux >= 5.7)",
            hook.name
        ),
        source: Box::new(ProgramError::from(e)),
    })
}

fn missing(name: &'static str) -> EbpfError {
    EbpfError::MissingFromObject {
        kind: "program",
        name,
    }
}

/// The program `name` of the object as its concrete type.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| missing(name))?
        .try_into()
        .map_err(|e| EbpfError::Program {
            context: format!("program {name}"),
            source: Box::new(e),
        })
}

/// Loads `$prog` (a `&mut` concrete program) and attaches it for `$hook` with `$attach`
/// (an expression using `$prog` that returns aya's link id) unless its pinned link is re-used.
macro_rules! load_and_attach {
    ($hook:expr, $prog:ident, $bpffs:expr, $cgroup:expr, $attach:expr) => {{
        let hook: Hook = $hook;
        $prog.load().map_err(|e| load_error(hook.program, e))?;
        let fd = $prog
            .fd()
            .map_err(|e| EbpfError::Program {
                context: hook.program.into(),
                source: Box::new(e),
            })?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| EbpfError::Io {
                context: format!("duplicating the fd of {}", hook.program),
                source,
            })?;
        let done = links::attach_or_update(hook, $bpffs, $cgroup, fd.as_fd(), || {
            let id = $attach.map_err(attach_error(hook, $cgroup.path))?;
            let link = $prog
                .take_link(id)
                .map_err(attach_error(hook, $cgroup.path))?;
            to_fd_link(hook, link)
        })?;
        (hook, done)
    }};
}

/// Loads the four programs and attaches each through its pinned link.
pub fn attach_all(
    ebpf: &mut Ebpf,
    bpffs: &Path,
    cgroup: &Cgroup<'_>,
) -> Result<Vec<(Hook, Attached)>, EbpfError> {
    let mut out = Vec::with_capacity(links::HOOKS.len());
    for hook in [links::CONNECT4, links::CONNECT6] {
        let prog: &mut CgroupSockAddr = program(ebpf, hook.program)?;
        out.push(load_and_attach!(
            hook,
            prog,
            bpffs,
            cgroup,
            prog.attach(cgroup.file, CgroupAttachMode::Single)
        ));
    }
    let prog: &mut SockOps = program(ebpf, links::SOCKOPS.program)?;
    out.push(load_and_attach!(
        links::SOCKOPS,
        prog,
        bpffs,
        cgroup,
        prog.attach(cgroup.file, CgroupAttachMode::Single)
    ));
    let prog: &mut CgroupSkb = program(ebpf, links::INGRESS.program)?;
    out.push(load_and_attach!(
        links::INGRESS,
        prog,
        bpffs,
        cgroup,
        prog.attach(
            cgroup.file,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single
        )
    ));
    Ok(out)
}

/// Loads the object without attaching anything (tests run programs with `BPF_PROG_TEST_RUN`).
#[cfg(test)]
pub fn load_ingress_for_test(bpffs: &Path) -> Result<Ebpf, EbpfError> {
    prepare_bpffs(bpffs)?;
    let mut ebpf = load_object(bpffs)?;
    let prog: &mut CgroupSkb = program(&mut ebpf, links::INGRESS.program)?;
    prog.load()
        .map_err(|e| load_error(links::INGRESS.program, e))?;
    Ok(ebpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_errors_name_the_fix() {
        let err = prepare_bpffs(Path::new("/tmp/ng-unit-not-bpffs/pins")).unwrap_err();
        assert!(matches!(err, EbpfError::BpffsNotMounted { .. }), "{err:?}");
        assert!(
            err.to_string().contains("mount -t bpf bpf /sys/fs/bpf"),
            "{err}"
        );

        let err = open_cgroup(Path::new("/nonexistent/ng-unit-cgroup")).unwrap_err();
        assert!(matches!(err, EbpfError::CgroupMissing { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("mkdir -p /nonexistent/ng-unit-cgroup"),
            "{err}"
        );

        let err = open_cgroup(Path::new("/tmp")).unwrap_err();
        assert!(matches!(err, EbpfError::NotCgroup2 { .. }), "{err:?}");
    }

    #[test]
    fn one_gateway_per_pin_directory() {
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = PathBuf::from(format!("/sys/fs/bpf/ng-unit-lock-{}", std::process::id()));
        // Left by a killed run of this test.
        let _ = std::fs::remove_dir_all(&dir);
        let _cleanup = Remove(dir.clone());
        let first = PinLock::acquire(&dir).unwrap_or_else(|e| panic!("{e}"));
        let err = PinLock::acquire(&dir).unwrap_err();
        let EbpfError::PinsInUse { holder, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*holder, Some(std::process::id()), "{err}");
        assert!(
            err.to_string().contains(&format!(
                "another gateway is running on the pin directory {} (pid {})",
                dir.display(),
                std::process::id()
            )),
            "{err}"
        );
        drop(first);
        let _again = PinLock::acquire(&dir).unwrap_or_else(|e| panic!("released: {e}"));
        assert!(matches!(
            PinLock::acquire(Path::new("/tmp/ng-unit-not-bpffs/pins")),
            Err(EbpfError::BpffsNotMounted { .. })
        ));
    }

    #[test]
    fn lock_holders_are_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 00:1e:42 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:1e:5678 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 999 00:1e:5678 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 4321 fd:01:5678 0 EOF\n";
        assert_eq!(holder_in(locks, libc::makedev(0, 0x1e), 5678), Some(1234));
        assert_eq!(holder_in(locks, libc::makedev(0xfd, 1), 5678), Some(4321));
        assert_eq!(
            holder_in(locks, libc::makedev(0, 0x1e), 42),
            None,
            "POSIX lock"
        );
        assert_eq!(holder_in(locks, libc::makedev(0, 0x1f), 5678), None);
        assert_eq!(holder_in("garbage\n1: FLOCK\n", 0, 0), None);
    }

    #[test]
    fn permission_errors_are_found_in_the_source_chain() {
        let inner = io::Error::from_raw_os_error(libc::EPERM);
        let err = MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_create",
            io_error: inner,
        });
        assert!(is_permission_error(&err));
        let other = MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_create",
            io_error: io::Error::from_raw_os_error(libc::EINVAL),
        });
        assert!(!is_permission_error(&other));
    }
}
