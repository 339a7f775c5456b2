//! `cgroup_skb/ingress` on the configured cgroup: the last hop before a packet is queued on
//! a socket of a process in that cgroup (a backend pod's server). A TCP packet to a
//! protected endpoint (or to a VIP, which should never receive packets) whose source is not
//! a gateway is counted per CPU in `NG_BYPASS`, reported once per SYN in `NG_EVENTS`, and
//! dropped (enforce) or passed (audit).
//!
//! Where this runs: `sk_filter()` on socket delivery
//! (<https://github.com/torvalds/linux/blob/v6.18/net/ipv4/tcp_ipv4.c>, `tcp_filter`), so
//! the packet data starts at the network header and IPv4/IPv6 fragments were already
//! reassembled by the IP layer. Fragment handling below is therefore defensive: a first
//! fragment (offset 0) is parsed like a whole packet; a non-first fragment carries no TCP
//! header, so its destination port is unknown and it passes — it cannot reach a socket
//! without its first fragment, which is matched and dropped.
//!
//! A packet that cannot be parsed far enough to know its TCP destination (truncated, not
//! TCP, unknown IPv6 extension header, too many extension headers) passes: the kernel's own
//! TCP receive path validated the headers before `sk_filter`, so such a packet cannot be a
//! TCP segment delivered to a protected endpoint's socket; dropping it would only break
//! unrelated traffic. Malformed packets to unprotected destinations always pass.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{__sk_buff, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
    macros::{cgroup_skb, map},
    maps::{HashMap, PerCpuHashMap, RingBuf},
    programs::SkBuffContext,
};
use gateway_common::{
    ACTION_DROPPED, ACTION_PASSED, Addr, BypassCount, BypassEvent, BypassKey, DestKey, MODE_AUDIT,
    REASON_NOT_FROM_GATEWAY, STAT_BYPASS_UNCOUNTED, STAT_INGRESS_DROPS, STAT_INGRESS_PACKETS,
    STAT_RINGBUF_FULL,
};

use crate::maps::{NG_DESTS, stat_inc};

/// Sources allowed to reach protected endpoints (the gateways' addresses). Written by
/// userspace; value is 1.
#[map]
static NG_GATEWAYS: HashMap<Addr, u32> = HashMap::pinned(1024, 0);

/// Bypass counters, per CPU (userspace sums). Also counts `connect4/6` refusals.
#[map]
pub static NG_BYPASS: PerCpuHashMap<BypassKey, BypassCount> = PerCpuHashMap::pinned(65536, 0);

/// One `BypassEvent` per bypassing SYN.
#[map]
static NG_EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

const PASS: i32 = 1;
const DROP: i32 = 0;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers walked before giving up (and passing).
const MAX_IPV6_EXT_HDRS: usize = 6;

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// What the program needs from a TCP packet.
struct Packet {
    src: Addr,
    dst: Addr,
    src_port: u16,
    dst_port: u16,
    /// SYN set and ACK clear: a connection attempt (retransmits included).
    syn: bool,
}

#[cgroup_skb(ingress)]
pub fn ng_ingress(ctx: SkBuffContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_ingress(ctx: &SkBuffContext) -> Result<i32, i32> {
    stat_inc(STAT_INGRESS_PACKETS);
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the program's context; `protocol` (the ethertype in network order) and
    // `ifindex` are readable 4-byte fields of `__sk_buff` in cgroup_skb programs.
    let (proto, ifindex) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*skb).protocol),
            core::ptr::read_volatile(&raw const (*skb).ifindex),
        )
    };
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the ethertype is the low 16 bits"
    )]
    let proto = u16::from_be(proto as u16);
    let packet = match proto {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        _ => None,
    };
    let Some(p) = packet else {
        return Ok(PASS);
    };
    let key = DestKey {
        addr: p.dst,
        port: p.dst_port,
        _pad: 0,
    };
    // SAFETY: values are copied out at once.
    let Some(dest) = (unsafe { NG_DESTS.get(&key) }).copied() else {
        return Ok(PASS);
    };
    // Both kinds are enforced: an endpoint is only reachable through the gateway, and a VIP
    // never legitimately receives a packet (connects to it are redirected).
    if unsafe { NG_GATEWAYS.get(&p.src) }.is_some() {
        return Ok(PASS);
    }
    // Anything but an explicit audit is enforced (fail closed on an unknown mode).
    let enforce = dest.mode != MODE_AUDIT;
    let bkey = BypassKey {
        service_id: dest.service_id,
        reason: REASON_NOT_FROM_GATEWAY,
        action: if enforce {
            ACTION_DROPPED
        } else {
            ACTION_PASSED
        },
        _pad: 0,
        src: p.src,
    };
    count(&bkey, p.syn, u64::from(ctx.len()));
    if p.syn {
        emit(&bkey, &p, ifindex);
    }
    if enforce {
        stat_inc(STAT_INGRESS_DROPS);
        return Ok(DROP);
    }
    Ok(PASS)
}

/// IPv4: fixed header in one load, then the TCP header after the options.
#[inline(always)]
fn parse_ipv4(ctx: &SkBuffContext) -> Option<Packet> {
    // Words in memory order: the addresses stay in network order (the `Addr` form).
    let h: [u32; 5] = ctx.load(0).ok()?;
    let b0 = h[0].to_ne_bytes();
    if b0[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(b0[0] & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    // Bytes 4..8: id, flags + fragment offset (13 bits); a non-first fragment has no TCP
    // header.
    let b1 = h[1].to_ne_bytes();
    if u16::from_be_bytes([b1[2], b1[3]]) & 0x1fff != 0 {
        return None;
    }
    // Bytes 8..12: ttl, protocol, checksum.
    if h[2].to_ne_bytes()[1] != IPPROTO_TCP {
        return None;
    }
    parse_tcp(ctx, ihl, Addr::from_v4_raw(h[3]), Addr::from_v4_raw(h[4]))
}

/// IPv6: fixed header in one load, then up to `MAX_IPV6_EXT_HDRS` extension headers.
#[inline(always)]
fn parse_ipv6(ctx: &SkBuffContext) -> Option<Packet> {
    let h: [u32; 10] = ctx.load(0).ok()?;
    if h[0].to_ne_bytes()[0] >> 4 != 6 {
        return None;
    }
    let src = Addr {
        words: [h[2], h[3], h[4], h[5]],
    };
    let dst = Addr {
        words: [h[6], h[7], h[8], h[9]],
    };
    let mut next = h[1].to_ne_bytes()[2];
    let mut off = 40usize;
    for _ in 0..MAX_IPV6_EXT_HDRS {
        match next {
            IPPROTO_TCP => return parse_tcp(ctx, off, src, dst),
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let e: [u8; 2] = ctx.load(off).ok()?;
                next = e[0];
                off += (usize::from(e[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let e: [u8; 2] = ctx.load(off).ok()?;
                next = e[0];
                off += (usize::from(e[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let e: [u8; 4] = ctx.load(off).ok()?;
                // Offset: the upper 13 bits of bytes 2..4; non-zero = no TCP header here.
                if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = e[0];
                off += 8;
            }
            _ => return None,
        }
    }
    None
}

/// Ports and flags from the TCP header at `off`.
#[inline(always)]
fn parse_tcp(ctx: &SkBuffContext, off: usize, src: Addr, dst: Addr) -> Option<Packet> {
    let t: [u8; 14] = ctx.load(off).ok()?;
    let flags = t[13];
    Some(Packet {
        src,
        dst,
        src_port: u16::from_be_bytes([t[0], t[1]]),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
        syn: flags & TCP_SYN != 0 && flags & TCP_ACK == 0,
    })
}

/// Adds the packet to this CPU's slot of the counter.
#[inline(always)]
fn count(key: &BypassKey, syn: bool, bytes: u64) {
    count_bypass(
        key,
        &BypassCount {
            syns: u64::from(syn),
            packets: 1,
            bytes,
        },
    );
}

/// Adds `delta` to this CPU's slot of `key`'s counter, creating it. A full map cannot take a
/// new key: that is counted in `STAT_BYPASS_UNCOUNTED` (the drop itself stands), so that a
/// source flood filling the map is seen, not silently uncounted.
#[inline(always)]
pub fn count_bypass(key: &BypassKey, delta: &BypassCount) {
    if add(key, delta) {
        return;
    }
    // A concurrent first packet on another CPU may have created the key in between (EEXIST):
    // add to our slot of that entry instead.
    if NG_BYPASS
        .insert(key, delta, u64::from(BPF_NOEXIST))
        .is_err()
        && !add(key, delta)
    {
        stat_inc(STAT_BYPASS_UNCOUNTED);
    }
}

#[inline(always)]
fn add(key: &BypassKey, delta: &BypassCount) -> bool {
    let Some(c) = NG_BYPASS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: this CPU's slot of a per-CPU hash value; nothing else writes it meanwhile.
    unsafe {
        (*c).syns += delta.syns;
        (*c).packets += delta.packets;
        (*c).bytes += delta.bytes;
    }
    true
}

#[inline(always)]
fn emit(key: &BypassKey, p: &Packet, ifindex: u32) {
    let Some(mut entry) = NG_EVENTS.reserve::<BypassEvent>(0) else {
        stat_inc(STAT_RINGBUF_FULL);
        return;
    };
    entry.write(BypassEvent {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        service_id: key.service_id,
        reason: key.reason,
        action: key.action,
        _pad: 0,
        src: p.src,
        dst: p.dst,
        src_port: p.src_port,
        dst_port: p.dst_port,
        ifindex,
    });
    entry.submit(0);
}
