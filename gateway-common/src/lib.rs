//! Types shared by the eBPF programs (`gateway-ebpf`) and the userspace gateway.
//!
//! Rules (aya, Cilium): every type is `#[repr(C)]` with explicit padding so that
//! keys are fully initialised; no `bool`, no `usize`; sizes are asserted at
//! compile time; codes are only ever added, never renumbered (counters pinned
//! in bpffs outlive the binary that wrote them).
//!
//! Addresses: IPv4 and IPv6 share one 16-byte form. An IPv4 address is stored
//! IPv4-mapped (`::ffff:a.b.c.d`), exactly as the kernel hands it to a
//! dual-stack socket, so one map serves both families. The bytes are in network
//! order; `Addr::words` is the same memory viewed as four `u32`s (what the
//! kernel's `bpf_sock_addr.user_ip6` / `bpf_sock_ops.local_ip6` expose).
//! Ports are stored in HOST byte order.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields are public so both sides build fully initialised keys with struct literals"
)]

/// An IPv4-mapped or native IPv6 address: 16 bytes in network order.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct Addr {
    /// The address as four 32-bit words, each in network byte order in memory.
    pub words: [u32; 4],
}

impl Addr {
    /// The mapped prefix word `0x0000ffff` as it sits in memory (network order).
    pub const V4_MAPPED_WORD2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

    /// IPv4 address (raw `u32` in network order, as the kernel hands it out) to the mapped form.
    #[inline(always)]
    #[expect(
        clippy::inline_always,
        reason = "used on the eBPF hot path, where every call should be inlined"
    )]
    pub const fn from_v4_raw(ip: u32) -> Self {
        Self {
            words: [0, 0, Self::V4_MAPPED_WORD2, ip],
        }
    }

    /// True if this is an IPv4-mapped address.
    #[inline(always)]
    #[expect(
        clippy::inline_always,
        reason = "used on the eBPF hot path, where every call should be inlined"
    )]
    pub const fn is_v4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == Self::V4_MAPPED_WORD2
    }
}

/// Key of `NG_DESTS`: a protected destination (a service VIP:port or a backend endpoint ip:port).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct DestKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// `DestValue::kind`: the destination is a service VIP (only ever reached through the proxy).
pub const DEST_KIND_VIP: u8 = 1;
/// `DestValue::kind`: the destination is a backend endpoint (pod ip:port): redirected on
/// connect and enforced at packet level.
pub const DEST_KIND_ENDPOINT: u8 = 2;

/// `DestValue::mode` and `ServiceMeta::mode`: drop what bypasses the gateway.
pub const MODE_ENFORCE: u8 = 1;
/// `DestValue::mode` and `ServiceMeta::mode`: count and report bypasses, let them through.
pub const MODE_AUDIT: u8 = 2;

/// Value of `NG_DESTS`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DestValue {
    /// Stable service id (see `service_id` in the userspace config module).
    pub service_id: u32,
    /// `DEST_KIND_*`.
    pub kind: u8,
    /// `MODE_*`.
    pub mode: u8,
    pub _pad: u16,
}

/// Value of the single-entry `NG_PROXY` array: where redirected connections go.
/// A zero port for a family means "no proxy for this family": protected connects
/// of that family are refused (fail closed), never let through.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ProxyConfig {
    /// IPv4 proxy address, raw network-order `u32`.
    pub v4_addr: u32,
    /// IPv4 proxy port, host order; 0 = none.
    pub v4_port: u16,
    /// IPv6 proxy port, host order; 0 = none.
    pub v6_port: u16,
    /// IPv6 proxy address.
    pub v6_addr: Addr,
    /// Socket mark (`SO_MARK`) that identifies the gateway's own upstream sockets:
    /// connects from sockets carrying it are never redirected.
    pub mark: u32,
    /// Non-zero once userspace has written a complete configuration.
    pub ready: u32,
}

/// Original destination of a redirected connection, recorded at `connect()` time.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct OrigDst {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
    /// `bpf_get_current_cgroup_id()` of the connecting task.
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()` of the connecting task.
    pub pid_tgid: u64,
    /// `bpf_ktime_get_ns()` at connect.
    pub ts_ns: u64,
}

/// Key of `NG_ORIG`: the client's socket address (its local ip, local port) as the
/// proxy sees it as the peer address after `accept()`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct SockKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Why a packet to a protected endpoint was counted as a bypass. Never renumber.
/// The packet's source is not an authorized gateway address.
pub const REASON_NOT_FROM_GATEWAY: u16 = 1;
/// A connect to a protected destination had no usable proxy address (daemon never
/// configured the family): refused in `connect4/6`.
pub const REASON_NO_PROXY: u16 = 2;

/// What was done with a counted packet. Never renumber.
pub const ACTION_DROPPED: u8 = 1;
/// Audit mode: counted, passed.
pub const ACTION_PASSED: u8 = 2;

/// Key of the per-CPU `NG_BYPASS` counters.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct BypassKey {
    pub service_id: u32,
    /// `REASON_*`.
    pub reason: u16,
    /// `ACTION_*`.
    pub action: u8,
    pub _pad: u8,
    pub src: Addr,
}

/// Value of `NG_BYPASS` (per CPU; userspace sums).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BypassCount {
    /// Connection attempts: TCP segments with SYN set and ACK clear (retransmits included).
    pub syns: u64,
    /// All packets (SYNs included).
    pub packets: u64,
    pub bytes: u64,
}

/// One ring-buffer event per connection attempt (SYN) that bypassed the gateway.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BypassEvent {
    pub ts_ns: u64,
    pub service_id: u32,
    pub reason: u16,
    pub action: u8,
    pub _pad: u8,
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub ifindex: u32,
}

/// Longest service name stored in `NG_SERVICE_META` (bytes, NUL padded).
pub const SERVICE_NAME_LEN: usize = 64;

/// Value of `NG_SERVICE_META` (key: service id): lets `gateway counters` name the
/// services of pinned counters without the config, also after the daemon died.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ServiceMeta {
    pub name: [u8; SERVICE_NAME_LEN],
    /// `MODE_*`.
    pub mode: u8,
    /// Non-zero when the service is no longer in the config (its counters are kept).
    pub removed: u8,
    pub _pad: [u8; 6],
}

/// Indices in the per-CPU `NG_STATS` array. Never renumber.
pub const STAT_CONNECT_CALLS: u32 = 0;
pub const STAT_CONNECT_REDIRECTS: u32 = 1;
pub const STAT_CONNECT_REFUSED: u32 = 2;
pub const STAT_SOCKOPS_RECORDED: u32 = 3;
pub const STAT_SOCKOPS_MISSED: u32 = 4;
pub const STAT_INGRESS_PACKETS: u32 = 5;
pub const STAT_INGRESS_DROPS: u32 = 6;
pub const STAT_RINGBUF_FULL: u32 = 7;
/// Bypass packets (and refused connects) whose counter key could not be created: `NG_BYPASS`
/// is full. The packet is still dropped; only its per-source count is missing.
pub const STAT_BYPASS_UNCOUNTED: u32 = 8;
pub const STAT_MAX: u32 = 16;

const _: () = assert!(size_of::<Addr>() == 16);
const _: () = assert!(size_of::<DestKey>() == 20);
const _: () = assert!(size_of::<DestValue>() == 8);
const _: () = assert!(size_of::<ProxyConfig>() == 32);
const _: () = assert!(size_of::<OrigDst>() == 48);
const _: () = assert!(size_of::<SockKey>() == 20);
const _: () = assert!(size_of::<BypassKey>() == 24);
const _: () = assert!(size_of::<BypassCount>() == 24);
const _: () = assert!(size_of::<BypassEvent>() == 56);
const _: () = assert!(size_of::<ServiceMeta>() == 72);

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): `#[repr(C)]`, only integer fields, explicit padding
    // (size asserts above), so every bit pattern is valid and there is no
    // uninitialised padding.
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::DestKey {}
    unsafe impl aya::Pod for super::DestValue {}
    unsafe impl aya::Pod for super::ProxyConfig {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::BypassKey {}
    unsafe impl aya::Pod for super::BypassCount {}
    unsafe impl aya::Pod for super::BypassEvent {}
    unsafe impl aya::Pod for super::ServiceMeta {}
}
