//! Raw `bpf(2)` calls aya 0.16 does not expose, and file-system checks.
//!
//! - link info with the cgroup id and attach type (aya's `LinkInfo` only has ids),
//! - `BPF_OBJ_GET` / `BPF_LINK_UPDATE` on a pinned link (aya's `FdLink` hides its fd, and only
//!   `CgroupSockAddr` has `attach_to_link`; this is uniform for all four links),
//! - `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (one atomic syscall for the proxy's take),
//! - `BPF_PROG_TEST_RUN` (tests).
//!
//! Attribute layouts follow `union bpf_attr` in
//! <https://github.com/torvalds/linux/blob/v6.18/include/uapi/linux/bpf.h>; every struct is
//! zero-initialised and only the leading members a command reads are declared (the kernel
//! accepts a shorter `bpf_attr` and zero-fills the rest).

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

// `enum bpf_cmd`.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

/// `enum bpf_attach_type` values of the four hooks.
pub mod attach {
    pub const CGROUP_INET_INGRESS: u32 = 0;
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let size = libc::c_uint::try_from(size_of::<T>())
        .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    // SAFETY: `attr` is a live, properly sized `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd`; pointers inside it (if any) are valid for the duration of the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// `BPF_OBJ_GET`: opens a pinned object.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c = c_path(path)?;
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    let fd =
        i32::try_from(fd).map_err(|_| io::Error::other("BPF_OBJ_GET returned an invalid fd"))?;
    // SAFETY: the kernel just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_UPDATE`: atomically swaps the program of a link.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: fd_u32(link),
        new_prog_fd: fd_u32(prog),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    // A `BorrowedFd` is never negative.
    fd.as_raw_fd().cast_unsigned()
}

/// What `BPF_OBJ_GET_INFO_BY_FD` reports about a link (the cgroup members of its union).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For a cgroup link: the cgroup's id (0 once the cgroup was removed).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // `struct bpf_link_info`: the union starts at offset 16 (8-byte aligned).
    #[repr(C)]
    struct Raw {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        cgroup_id: u64,
        attach_type: u32,
        _rest: [u32; 9],
    }
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut raw = Raw {
        link_type: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        cgroup_id: 0,
        attach_type: 0,
        _rest: [0; 9],
    };
    let mut attr = Attr {
        bpf_fd: fd_u32(link),
        info_len: u32::try_from(size_of::<Raw>()).unwrap_or(u32::MAX),
        info: std::ptr::from_mut(&mut raw) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        link_type: raw.link_type,
        id: raw.id,
        prog_id: raw.prog_id,
        cgroup_id: raw.cgroup_id,
        attach_type: raw.attach_type,
    })
}

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM`: `Ok(None)` when the key is absent.
pub fn map_lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> io::Result<Option<V>> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let mut attr = Attr {
        map_fd: fd_u32(map),
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        // SAFETY: the kernel wrote a full value; `V: Pod` accepts every bit pattern.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Result of [`prog_test_run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    pub retval: u32,
    pub duration_ns: u32,
}

/// `BPF_PROG_TEST_RUN` with `data` as packet (for skb programs: starting at the L2 header
/// the kernel strips; see the caller).
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "used by the privileged program tests")
)]
pub fn prog_test_run(prog: BorrowedFd<'_>, data: &[u8]) -> io::Result<TestRun> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let mut attr = Attr {
        prog_fd: fd_u32(prog),
        retval: 0,
        data_size_in: u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "packet too large"))?,
        data_size_out: 0,
        data_in: data.as_ptr() as u64,
        data_out: 0,
        repeat: 1,
        duration: 0,
        ctx_size_in: 0,
        ctx_size_out: 0,
        ctx_in: 0,
        ctx_out: 0,
        flags: 0,
        cpu: 0,
        batch_size: 0,
        _pad: 0,
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok(TestRun {
        retval: attr.retval,
        duration_ns: attr.duration,
    })
}

/// `statfs(2)` file-system magic of `path`.
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = c_path(path)?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path, `st` a writable `statfs`.
    let ret = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `statfs` succeeded and filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_type)
}

/// `BPF_FS_MAGIC`.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC`.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Raises `RLIMIT_MEMLOCK` (kernels before 5.11 charge BPF memory to it; newer ones use
/// memcg accounting and ignore it).
pub fn raise_memlock_rlimit() -> io::Result<()> {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const rlim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
