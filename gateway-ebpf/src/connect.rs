//! `cgroup/connect4` and `cgroup/connect6`: a TCP connect to a protected destination (a
//! service VIP or a backend endpoint, both in `NG_DESTS`) is rewritten to the proxy's
//! address, and the original destination is recorded in `NG_PENDING` under the socket
//! cookie (`sock_ops` re-keys it by the client's address once established).
//!
//! Return value of a `cgroup/connect*` program: 1 lets the (possibly rewritten) connect
//! proceed, 0 fails it with `EPERM`.
//!
//! The gateway's own upstream sockets carry `SO_MARK == ProxyConfig::mark` and are never
//! redirected. The mark is read from the socket itself (`ctx->sk->mark`): `bpf_sock_addr.sk`
//! is a `PTR_TO_SOCKET` and `bpf_sock.mark` is readable through it in every program type
//! that has one (see `bpf_sock_is_valid_access` / `bpf_sock_convert_ctx_access`,
//! <https://github.com/torvalds/linux/blob/v6.18/net/core/filter.c>). The mark is set with
//! `setsockopt(SO_MARK)` (needs `CAP_NET_ADMIN`) before `connect()`, so a process in a pod
//! cannot forge it without that capability in the node's network namespace. A configured
//! mark of 0 matches nothing (every socket has mark 0 by default).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, bpf_sock_addr},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie,
        bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use gateway_common::{
    ACTION_DROPPED, Addr, BypassCount, BypassKey, DestKey, DestValue, OrigDst, ProxyConfig,
    REASON_NO_PROXY, STAT_CONNECT_CALLS, STAT_CONNECT_REDIRECTS, STAT_CONNECT_REFUSED,
};

use crate::{
    ingress::count_bypass,
    maps::{NG_DESTS, NG_PENDING, NG_PROXY, stat_inc},
};

const IPPROTO_TCP: u32 = 6;
/// Let the connect proceed (possibly rewritten).
const ALLOW: i32 = 1;
/// Fail the connect with `EPERM`.
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn ng_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn ng_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY (all ctx reads and writes below): `sa` is the program's context, valid for the
    // whole run; every access is a 4-byte access to a field the verifier allows for
    // `cgroup/connect4`.
    if unsafe { (*sa).protocol } != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    stat_inc(STAT_CONNECT_CALLS);
    let ip = unsafe { (*sa).user_ip4 };
    let port = user_port(sa);
    let key = DestKey {
        addr: Addr::from_v4_raw(ip),
        port,
        _pad: 0,
    };
    // The only cost for an unprotected destination: one hash lookup.
    let Some(dest) = (unsafe { NG_DESTS.get(&key) }).copied() else {
        return Ok(ALLOW);
    };
    let cfg = proxy_config()?;
    if is_gateway_socket(sa, &cfg) {
        return Ok(ALLOW);
    }
    if cfg.ready == 0 || cfg.v4_port == 0 {
        return Err(refuse(&dest));
    }
    record(ctx, &key, &dest);
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip4, cfg.v4_addr);
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(cfg.v4_port.to_be()));
    }
    stat_inc(STAT_CONNECT_REDIRECTS);
    Ok(ALLOW)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    // SAFETY: as in `try_connect4`. `user_ip6` is read and written one 4-byte word at a time:
    // the verifier rejects 8-byte reads of it (`bpf_ctx_narrow_access_ok`).
    if unsafe { (*sa).protocol } != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    stat_inc(STAT_CONNECT_CALLS);
    let words = unsafe {
        [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    };
    let port = user_port(sa);
    // An IPv4 destination dialed from a dual-stack socket (`::ffff:a.b.c.d`) is exactly the
    // key of the IPv4 entry (IPv4 is stored mapped), so it is caught here: connect4 never
    // runs for it.
    let key = DestKey {
        addr: Addr { words },
        port,
        _pad: 0,
    };
    let Some(dest) = (unsafe { NG_DESTS.get(&key) }).copied() else {
        return Ok(ALLOW);
    };
    let cfg = proxy_config()?;
    if is_gateway_socket(sa, &cfg) {
        return Ok(ALLOW);
    }
    let (proxy, proxy_port) = if key.addr.is_v4() {
        // The socket talks IPv4 on the wire: send it to the v4 proxy, mapped.
        (Addr::from_v4_raw(cfg.v4_addr), cfg.v4_port)
    } else {
        (cfg.v6_addr, cfg.v6_port)
    };
    if cfg.ready == 0 || proxy_port == 0 {
        return Err(refuse(&dest));
    }
    record(ctx, &key, &dest);
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], proxy.words[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], proxy.words[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], proxy.words[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], proxy.words[3]);
        core::ptr::write_volatile(&raw mut (*sa).user_port, u32::from(proxy_port.to_be()));
    }
    stat_inc(STAT_CONNECT_REDIRECTS);
    Ok(ALLOW)
}

/// Destination port in host order (`user_port` holds the network-order port in its low
/// 16 bits).
#[inline(always)]
fn user_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: see `try_connect4`.
    let raw = unsafe { core::ptr::read_volatile(&raw const (*sa).user_port) };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the port is the low 16 bits"
    )]
    u16::from_be(raw as u16)
}

/// The proxy configuration; a missing entry (cannot happen for an array) refuses.
#[inline(always)]
fn proxy_config() -> Result<ProxyConfig, i32> {
    NG_PROXY.get(0).copied().ok_or(REFUSE)
}

#[inline(always)]
fn is_gateway_socket(sa: *mut bpf_sock_addr, cfg: &ProxyConfig) -> bool {
    if cfg.mark == 0 {
        return false;
    }
    // SAFETY: `sk` is a `PTR_TO_SOCKET` (never null) in `cgroup/connect*` programs, and
    // `mark` is a readable 4-byte field of `bpf_sock`.
    let mark = unsafe {
        let sk = (*sa).__bindgen_anon_1.sk;
        core::ptr::read_volatile(&raw const (*sk).mark)
    };
    mark == cfg.mark
}

/// Records the original destination under the socket cookie.
#[inline(always)]
fn record(ctx: &SockAddrContext, key: &DestKey, dest: &DestValue) {
    // SAFETY: helpers available to `cgroup/connect*` programs; they take the context pointer
    // or nothing.
    let (cookie, cgroup_id, pid_tgid, ts_ns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_current_cgroup_id(),
            bpf_get_current_pid_tgid(),
            bpf_ktime_get_ns(),
        )
    };
    let orig = OrigDst {
        addr: key.addr,
        port: key.port,
        _pad: 0,
        service_id: dest.service_id,
        cgroup_id,
        pid_tgid,
        ts_ns,
    };
    // An LRU insert only fails under memory pressure; the proxy then finds no original
    // destination and refuses the connection (fail closed), so there is nothing to undo.
    let _ = NG_PENDING.insert(&cookie, &orig, u64::from(BPF_ANY));
}

/// Counts a connect refused because the family has no proxy (daemon never configured it)
/// and returns the verdict. The source is unknown at connect time: it is counted as the
/// unspecified address.
#[inline(always)]
fn refuse(dest: &DestValue) -> i32 {
    stat_inc(STAT_CONNECT_REFUSED);
    let key = BypassKey {
        service_id: dest.service_id,
        reason: REASON_NO_PROXY,
        action: ACTION_DROPPED,
        _pad: 0,
        src: Addr::default(),
    };
    count_bypass(
        &key,
        &BypassCount {
            syns: 1,
            packets: 0,
            bytes: 0,
        },
    );
    REFUSE
}
