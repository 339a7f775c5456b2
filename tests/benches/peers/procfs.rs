//! What `/proc` tells about a process and the CPUs: CPU time (utime + stime), resident memory,
//! per-CPU busy time, CPU affinity of the calling thread.

use std::{fs, io};

/// User + system CPU time of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("no ')' in /proc/PID/stat"))?;
    // After ')': field 3 (state) is index 0, utime (field 14) index 11, stime (15) index 12.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("short /proc/PID/stat"))
    };
    #[expect(clippy::cast_precision_loss, reason = "tick counts far below 2^52")]
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[expect(clippy::cast_precision_loss, reason = "a small constant")]
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// Resident set size (`VmRSS`) in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other("no VmRSS in /proc/PID/status"))
}

/// Busy and total jiffies of each CPU (`cpuN` lines of `/proc/stat`).
pub fn cpu_times() -> Vec<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle + iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Busy share (0..1) of each CPU between two [`cpu_times`] readings.
pub fn busy_between(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(&(b0, t0), &(b1, t1))| {
            let total = t1.saturating_sub(t0);
            #[expect(clippy::cast_precision_loss, reason = "jiffy counts far below 2^52")]
            if total == 0 {
                0.0
            } else {
                b1.saturating_sub(b0) as f64 / total as f64
            }
        })
        .collect()
}

/// Pins the calling thread to `cpus` (children started from it inherit the mask); returns the
/// previous mask, for [`restore_affinity`].
pub fn pin_thread(cpus: &[usize]) -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is a plain bit set; zeroed is the empty set.
    let mut previous: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size; pid 0 = the calling thread.
    if unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut previous) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: cpu < CPU_SETSIZE on any machine this runs on.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    restore_affinity(&set)?;
    Ok(previous)
}

pub fn restore_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: valid pointer and size; pid 0 = the calling thread.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit of open files to the hard limit (10,000 idle connections need it);
/// children inherit it.
pub fn raise_nofile() -> io::Result<u64> {
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(lim.rlim_cur)
    }
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
