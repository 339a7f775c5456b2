//! Maps shared by several hooks (the others live next to the only program that writes them).
//! Sizes are part of the pinned-map contract: changing one makes the pins of an earlier
//! version incompatible (the loader then tells the operator to run `gateway detach`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use gateway_common::{DestKey, DestValue, OrigDst, ProxyConfig, STAT_MAX, ServiceMeta};

/// Protected destinations (service VIPs and backend endpoints). Written by userspace.
#[map]
pub static NG_DESTS: HashMap<DestKey, DestValue> = HashMap::pinned(65536, 0);

/// Where redirected connections go, and the gateway's socket mark. Written by userspace.
#[map]
pub static NG_PROXY: Array<ProxyConfig> = Array::pinned(1, 0);

/// Socket cookie → original destination, from `connect4/6` until `sock_ops` moves it to
/// `NG_ORIG` (LRU: a connect that never establishes leaves an entry that ages out).
#[map]
pub static NG_PENDING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);

/// Service id → name and mode. Only userspace reads and writes it; it is part of the object
/// so that it is created and pinned with the other maps and `gateway counters` can name the
/// services of pinned counters after the daemon died. Sized for 10,000 services and then some
/// (removed services keep their entry, marked removed); at 4096 a config with more services
/// than that failed to load (`cargo xtask bench scale`).
#[map]
pub static NG_SERVICE_META: HashMap<u32, ServiceMeta> = HashMap::pinned(16384, 0);

/// Program statistics, indexed by `STAT_*` (per CPU, summed by userspace).
#[map]
static NG_STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_MAX, 0);

/// Adds one to the `STAT_*` counter `idx` of this CPU.
#[inline(always)]
pub fn stat_inc(idx: u32) {
    if let Some(p) = NG_STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot of an array map: only this CPU writes it while the program runs
        // (programs are not preempted by themselves on one CPU: cgroup hooks run with
        // migration disabled).
        unsafe { *p += 1 };
    }
}
