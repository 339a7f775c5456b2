//! `sock_ops`: when a redirected connection is established (`ACTIVE_ESTABLISHED_CB`, the
//! client side, before the proxy's `accept()` can return it), move its original
//! destination from `NG_PENDING` (keyed by socket cookie, all `connect4/6` could know) to
//! `NG_ORIG`, keyed by the client's (local ip, local port): exactly the peer address the
//! proxy sees after `accept()`.
//!
//! Key form: an `AF_INET` socket's address is stored IPv4-mapped; an `AF_INET6` socket's
//! `local_ip6` is taken as is, which for a dual-stack socket talking IPv4 is already the
//! mapped form (`sk_v6_rcv_saddr`), so both meet the proxy's canonical peer key.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, bpf_sock_ops},
    helpers::bpf_get_socket_cookie,
    macros::{map, sock_ops},
    maps::LruHashMap,
    programs::SockOpsContext,
};
use gateway_common::{Addr, OrigDst, STAT_SOCKOPS_MISSED, STAT_SOCKOPS_RECORDED, SockKey};

use crate::maps::{NG_PENDING, stat_inc};

const AF_INET: u32 = 2;

/// Client (ip, port) → original destination. Read and deleted by the proxy after `accept()`.
#[map]
static NG_ORIG: LruHashMap<SockKey, OrigDst> = LruHashMap::pinned(65536, 0);

// Not named `sockops`: a function with its section's name clashes in the object.
#[sock_ops]
pub fn ng_sockops(ctx: SockOpsContext) -> u32 {
    match try_sockops(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sockops(ctx: &SockOpsContext) -> Result<u32, u32> {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(1);
    }
    // SAFETY: helper available to sock_ops programs, called with the context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(orig) = (unsafe { NG_PENDING.get(&cookie) }).copied() else {
        return Ok(1);
    };
    let ops = ctx.ops;
    // Both forms are read unconditionally and selected afterwards: reading them in the
    // branches lets LLVM turn the two loads into one from `ctx + selected offset`, which the
    // verifier rejects ("dereference of modified ctx ptr"). Volatile reads are never merged
    // or moved. Reading `local_ip6` of an AF_INET socket is valid (it reads `sock_common`).
    // SAFETY: the program's context; 4-byte reads of fields readable in sock_ops (the
    // verifier rejects wider ones, so `local_ip6` is read word by word).
    let (ip4, ip6) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            local_ip6(ops),
        )
    };
    let addr = if ctx.family() == AF_INET {
        Addr::from_v4_raw(ip4)
    } else {
        Addr { words: ip6 }
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "local_port is a port in host order"
    )]
    let port = ctx.local_port() as u16;
    let key = SockKey {
        addr,
        port,
        _pad: 0,
    };
    if NG_ORIG.insert(&key, &orig, u64::from(BPF_ANY)).is_ok() {
        stat_inc(STAT_SOCKOPS_RECORDED);
    } else {
        stat_inc(STAT_SOCKOPS_MISSED);
    }
    let _ = NG_PENDING.remove(&cookie);
    Ok(1)
}

/// # Safety
/// `ops` must be the program's context.
#[inline(always)]
unsafe fn local_ip6(ops: *mut bpf_sock_ops) -> [u32; 4] {
    // SAFETY: see the caller.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
            core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
            core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
            core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
        ]
    }
}
