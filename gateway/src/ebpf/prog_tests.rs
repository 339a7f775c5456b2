//! Privileged tests: load the real object and run `ng_ingress` on synthetic packets with
//! `BPF_PROG_TEST_RUN` (Cilium `bpf/tests` style). They need root and a mounted bpffs and
//! FAIL (never skip) without them: CI runs as root.
//!
//! Each test pins its maps in its own `/sys/fs/bpf/ng-unit-<pid>-<n>` directory, removed on
//! drop; directories left by an earlier killed run (their pid is gone) are removed first.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::CgroupSkb,
};
use gateway_common::{
    ACTION_DROPPED, ACTION_PASSED, Addr, BypassCount, BypassKey, DEST_KIND_ENDPOINT, DEST_KIND_VIP,
    DestKey, DestValue, MODE_AUDIT, MODE_ENFORCE, REASON_NOT_FROM_GATEWAY, STAT_INGRESS_DROPS,
};

use super::{events, inspect, loader, maps, sys};

const BPFFS_ROOT: &str = "/sys/fs/bpf";
const PREFIX: &str = "ng-unit-";

/// A unique pin directory, removed (with everything pinned in it) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert_eq!(
            sys::fs_magic(Path::new(BPFFS_ROOT)).ok(),
            Some(sys::BPF_FS_MAGIC),
            "this test needs root and bpffs at {BPFFS_ROOT}: run `mount -t bpf bpf {BPFFS_ROOT}` as root"
        );
        remove_leftovers();
        let dir = Path::new(BPFFS_ROOT).join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = inspect::detach(&dir);
        Self(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = inspect::detach(&self.0) {
            eprintln!("cleaning up {}: {e}", self.0.display());
        }
    }
}

/// Removes `ng-unit-<pid>-*` directories whose process no longer exists.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(BPFFS_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = inspect::detach(&entry.path());
        }
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> Addr {
    maps::addr_from_ip(s.parse::<IpAddr>().unwrap())
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&src_port.to_be_bytes());
    t.extend_from_slice(&dst_port.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

/// Ethernet + IPv4 + `l4` (the ethernet header is stripped by the kernel before the program
/// runs: `cgroup_skb` data starts at the network header).
fn ipv4(src: &str, dst: &str, proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (sa(src), sa(dst)) else {
        panic!("v4")
    };
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = u16::try_from(20 + l4.len()).unwrap();
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, proto, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(l4);
    // TCP ports: a packet built by `tcp()` carries them already; the socket addresses' ports
    // are only used by the callers for readability.
    p
}

/// Ethernet + IPv6 + a hop-by-hop header (8 bytes) + TCP.
fn ipv6_hbh(src: &str, dst: &str, l4: &[u8]) -> Vec<u8> {
    let (SocketAddr::V6(src), SocketAddr::V6(dst)) = (sa(src), sa(dst)) else {
        panic!("v6")
    };
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&u16::try_from(8 + l4.len()).unwrap().to_be_bytes());
    p.extend_from_slice(&[0 /* hop-by-hop */, 64]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&[6 /* next: TCP */, 0, 1, 4, 0, 0, 0, 0]); // PadN option
    p.extend_from_slice(l4);
    p
}

fn run(ebpf: &Ebpf, packet: &[u8]) -> u32 {
    let prog: &CgroupSkb = ebpf.program("ng_ingress").unwrap().try_into().unwrap();
    let fd = prog.fd().unwrap();
    sys::prog_test_run(fd.as_fd(), packet)
        .expect("BPF_PROG_TEST_RUN")
        .retval
}

fn bypass(ebpf: &Ebpf, service_id: u32, action: u8, src: &str) -> Option<(u64, u64, u64)> {
    let m: PerCpuHashMap<&MapData, BypassKey, BypassCount> =
        PerCpuHashMap::try_from(ebpf.map("NG_BYPASS").unwrap()).unwrap();
    let key = BypassKey {
        service_id,
        reason: REASON_NOT_FROM_GATEWAY,
        action,
        _pad: 0,
        src: addr(src),
    };
    let v = m.get(&key, 0).ok()?;
    Some(v.iter().fold((0, 0, 0), |a, c| {
        (a.0 + c.syns, a.1 + c.packets, a.2 + c.bytes)
    }))
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn ingress_drops_counts_and_reports_bypasses() {
    let dir = PinDir::new();
    let mut ebpf = loader::load_ingress_for_test(&dir.0).expect("load the eBPF object");
    {
        let mut dests: HashMap<&mut MapData, DestKey, DestValue> =
            HashMap::try_from(ebpf.map_mut("NG_DESTS").unwrap()).unwrap();
        let enforce = DestValue {
            service_id: 7,
            kind: DEST_KIND_ENDPOINT,
            mode: MODE_ENFORCE,
            _pad: 0,
        };
        let audit = DestValue {
            service_id: 8,
            kind: DEST_KIND_ENDPOINT,
            mode: MODE_AUDIT,
            _pad: 0,
        };
        let vip = DestValue {
            service_id: 7,
            kind: DEST_KIND_VIP,
            mode: MODE_ENFORCE,
            _pad: 0,
        };
        dests
            .insert(&maps::dest_key(sa("10.1.2.2:8080")), &enforce, 0)
            .unwrap();
        dests
            .insert(&maps::dest_key(sa("10.1.2.3:8080")), &audit, 0)
            .unwrap();
        dests
            .insert(&maps::dest_key(sa("[fd00::2:2]:8080")), &enforce, 0)
            .unwrap();
        dests
            .insert(&maps::dest_key(sa("10.96.0.10:80")), &vip, 0)
            .unwrap();
        let mut gws: HashMap<&mut MapData, Addr, u32> =
            HashMap::try_from(ebpf.map_mut("NG_GATEWAYS").unwrap()).unwrap();
        gws.insert(&addr("10.1.0.1"), &1, 0).unwrap();
    }

    let syn = tcp(50000, 8080, SYN);
    let ack = tcp(50000, 8080, ACK);
    let syn_len = u64::try_from(20 + syn.len()).unwrap();

    // Foreign SYN to a protected endpoint: dropped, counted, one event.
    assert_eq!(
        run(&ebpf, &ipv4("10.9.9.9:50000", "10.1.2.2:8080", 6, 0, &syn)),
        0
    );
    assert_eq!(
        bypass(&ebpf, 7, ACTION_DROPPED, "10.9.9.9"),
        Some((1, 1, syn_len))
    );
    // Its retransmit is another attempt; a non-SYN segment is a packet, not an attempt.
    assert_eq!(
        run(&ebpf, &ipv4("10.9.9.9:50000", "10.1.2.2:8080", 6, 0, &syn)),
        0
    );
    assert_eq!(
        run(&ebpf, &ipv4("10.9.9.9:50000", "10.1.2.2:8080", 6, 0, &ack)),
        0
    );
    assert_eq!(
        bypass(&ebpf, 7, ACTION_DROPPED, "10.9.9.9"),
        Some((2, 3, 3 * syn_len))
    );
    // A SYN to a VIP is a bypass too.
    assert_eq!(
        run(
            &ebpf,
            &ipv4(
                "10.9.9.9:50000",
                "10.96.0.10:80",
                6,
                0,
                &tcp(50000, 80, SYN)
            )
        ),
        0
    );

    // From a gateway: passes, not counted.
    assert_eq!(
        run(
            &ebpf,
            &ipv4(
                "10.1.0.1:40000",
                "10.1.2.2:8080",
                6,
                0,
                &tcp(40000, 8080, SYN)
            )
        ),
        1
    );
    assert_eq!(bypass(&ebpf, 7, ACTION_DROPPED, "10.1.0.1"), None);
    // Unprotected port / UDP to the protected port / non-first fragment / truncated: pass.
    assert_eq!(
        run(
            &ebpf,
            &ipv4("10.9.9.9:1", "10.1.2.2:9090", 6, 0, &tcp(1, 9090, SYN))
        ),
        1
    );
    let udp = [0xc3, 0x50, 0x1f, 0x90, 0, 8, 0, 0];
    assert_eq!(
        run(&ebpf, &ipv4("10.9.9.9:1", "10.1.2.2:8080", 17, 0, &udp)),
        1
    );
    assert_eq!(
        run(&ebpf, &ipv4("10.9.9.9:1", "10.1.2.2:8080", 6, 0x0010, &syn)),
        1
    );
    assert_eq!(
        run(
            &ebpf,
            &ipv4("10.9.9.9:1", "10.1.2.2:8080", 6, 0, &syn[..10])
        ),
        1
    );
    // A first fragment (MF set, offset 0) with its TCP header is matched.
    assert_eq!(
        run(
            &ebpf,
            &ipv4("10.9.9.8:50000", "10.1.2.2:8080", 6, 0x2000, &syn)
        ),
        0
    );

    // Audit: passes, counted as passed, reported.
    assert_eq!(
        run(&ebpf, &ipv4("10.9.9.9:50000", "10.1.2.3:8080", 6, 0, &syn)),
        1
    );
    assert_eq!(
        bypass(&ebpf, 8, ACTION_PASSED, "10.9.9.9"),
        Some((1, 1, syn_len))
    );

    // IPv6 behind a hop-by-hop header.
    assert_eq!(
        run(
            &ebpf,
            &ipv6_hbh("[fd00::9]:50000", "[fd00::2:2]:8080", &syn)
        ),
        0
    );
    assert_eq!(
        bypass(&ebpf, 7, ACTION_DROPPED, "fd00::9").map(|c| c.0),
        Some(1)
    );

    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map("NG_STATS").unwrap()).unwrap();
    let drops: u64 = stats.get(&STAT_INGRESS_DROPS, 0).unwrap().iter().sum();
    assert_eq!(drops, 6);

    // One event per SYN (retransmit included), none for the ACK or the passes from a gateway.
    let mut ring = RingBuf::try_from(ebpf.take_map("NG_EVENTS").unwrap()).unwrap();
    let mut got = Vec::new();
    while let Some(item) = ring.next() {
        got.push(events::decode(&item).expect("a full event"));
    }
    let summary: Vec<(SocketAddr, SocketAddr, &str)> =
        got.iter().map(|e| (e.src, e.dst, e.action)).collect();
    assert_eq!(
        summary,
        vec![
            (sa("10.9.9.9:50000"), sa("10.1.2.2:8080"), "dropped"),
            (sa("10.9.9.9:50000"), sa("10.1.2.2:8080"), "dropped"),
            (sa("10.9.9.9:50000"), sa("10.96.0.10:80"), "dropped"),
            (sa("10.9.9.8:50000"), sa("10.1.2.2:8080"), "dropped"),
            (sa("10.9.9.9:50000"), sa("10.1.2.3:8080"), "passed"),
            (sa("[fd00::9]:50000"), sa("[fd00::2:2]:8080"), "dropped"),
        ]
    );
    assert!(got.iter().all(|e| e.reason == "not_from_gateway"));
    assert_eq!(got[0].service_id, 7);
    assert_eq!(got[4].service_id, 8);
}

#[test]
fn counters_and_detach_read_the_pins() {
    let dir = PinDir::new();
    let ebpf = loader::load_ingress_for_test(&dir.0).expect("load the eBPF object");
    {
        let mut dests: HashMap<MapData, DestKey, DestValue> = HashMap::try_from(
            aya::maps::Map::from_map_data(MapData::from_pin(dir.0.join("NG_DESTS")).unwrap())
                .unwrap(),
        )
        .unwrap();
        let v = DestValue {
            service_id: 9,
            kind: DEST_KIND_ENDPOINT,
            mode: MODE_ENFORCE,
            _pad: 0,
        };
        dests
            .insert(&maps::dest_key(sa("10.1.2.2:8080")), &v, 0)
            .unwrap();
    }
    assert_eq!(
        run(
            &ebpf,
            &ipv4(
                "10.9.9.9:50000",
                "10.1.2.2:8080",
                6,
                0,
                &tcp(50000, 8080, SYN)
            )
        ),
        0
    );
    drop(ebpf);

    let c = inspect::counters(&dir.0).unwrap();
    assert_eq!(c.bypass.len(), 1);
    let row = &c.bypass[0];
    assert_eq!(
        (row.service.as_str(), row.source, row.reason, row.action),
        (
            "id:9",
            "10.9.9.9".parse::<IpAddr>().unwrap(),
            "not_from_gateway",
            "dropped"
        )
    );
    assert_eq!((row.syns, row.packets), (1, 1));
    assert_eq!(c.stats.get("ingress_drops"), Some(&1));

    let report = inspect::detach(&dir.0).unwrap();
    assert_eq!(report.maps_removed.len(), maps::ALL_MAPS.len());
    assert_eq!(report.links_removed, Vec::<String>::new());
    assert!(!dir.0.exists());
    assert_eq!(
        inspect::detach(&dir.0).unwrap(),
        inspect::DetachReport::default()
    );
    assert!(matches!(
        inspect::counters(&dir.0),
        Err(super::EbpfError::NotPinned { .. })
    ));
}

/// A cgroup v2 directory `ng-k-unit-<pid>-<n>` under the cgroup2 mount, removed on drop.
struct CgroupDir(PathBuf);

impl CgroupDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = cgroup2_root();
        remove_leftover_cgroups(&root);
        let dir = root.join(format!(
            "ng-k-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("mkdir {}: {e} (needs root)", dir.display()));
        Self(dir)
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir(&self.0) {
            eprintln!("removing {}: {e}", self.0.display());
        }
    }
}

fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fs) = (f.next()?, f.next()?, f.next()?);
            (fs == "cgroup2").then(|| PathBuf::from(dir))
        })
        .expect("this test needs a cgroup2 mount (mount -t cgroup2 none /sys/fs/cgroup)")
}

fn remove_leftover_cgroups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("ng-k-unit-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next() else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

/// Runs `bash -c script` as a child moved into `cgroup` before it execs.
fn spawn_in_cgroup(cgroup: &Path, script: &str) -> std::process::Child {
    use std::os::unix::process::CommandExt as _;
    let procs = std::ffi::CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        .arg(script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    cmd.spawn().expect("spawn bash in the test cgroup")
}

/// Accepts one connection within 5 s.
fn accept(listener: &std::net::TcpListener) -> (std::net::TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match listener.accept() {
            Ok(c) => return c,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("no redirected connection reached the proxy: {e}"),
        }
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn datapath_redirects_records_and_reuses_links() {
    use std::{io::Write as _, os::unix::fs::MetadataExt as _};

    use super::{Datapath, DesiredService, DesiredState, Mode, PinLock};

    let pins = PinDir::new();
    let cgroup = CgroupDir::new();
    let cgroup_id = std::fs::metadata(&cgroup.0).unwrap().ino();
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let Ok(SocketAddr::V4(proxy_addr)) = proxy.local_addr() else {
        panic!("v4 listener")
    };
    let lock = || PinLock::acquire(&pins.0).expect("lock the pin directory");

    let mut dp = Datapath::start(&cgroup.0, lock()).expect("start the datapath");
    let first: Vec<_> = dp.links().to_vec();
    assert_eq!(
        first.iter().map(|l| (l.name, l.how)).collect::<Vec<_>>(),
        [
            ("connect4", "created"),
            ("connect6", "created"),
            ("sockops", "created"),
            ("ingress", "created")
        ]
    );
    assert_eq!(dp.cgroup_id(), cgroup_id);
    let desired = DesiredState {
        proxy_v4: Some(proxy_addr),
        proxy_v6: None,
        mark: 0x4e47,
        gateways: vec!["127.0.0.1".parse().unwrap()],
        services: vec![
            DesiredService {
                id: 7,
                name: "web".into(),
                mode: Mode::Enforce,
                vips: vec![sa("10.255.77.1:80"), sa("[fd00:ff::1]:80")],
                endpoints: vec![],
            },
            DesiredService {
                id: 8,
                name: "preview".into(),
                mode: Mode::Enforce,
                vips: vec![sa("10.255.77.2:80")],
                endpoints: vec![],
            },
        ],
    };
    let report = dp.sync(&desired).unwrap();
    assert_eq!((report.dests_added, report.gateways_added), (3, 1));
    assert_eq!(
        dp.sync(&desired).unwrap(),
        super::SyncReport::default(),
        "a second sync changes nothing"
    );

    // IPv4 socket → VIP: redirected to the proxy, original destination found by peer address.
    // Then a dual-stack socket dialing the v4-mapped VIP: caught by connect6.
    for host in ["10.255.77.1", "::ffff:10.255.77.1"] {
        let child = spawn_in_cgroup(&cgroup.0, &format!("exec 3<>/dev/tcp/{host}/80 && cat <&3"));
        let (mut conn, peer) = accept(&proxy);
        let orig = dp
            .orig_dst()
            .take(peer)
            .unwrap_or_else(|| panic!("no NG_ORIG entry for {peer} ({host})"));
        assert_eq!(orig.dst, sa("10.255.77.1:80"), "{host}");
        assert_eq!(
            (orig.service_id, orig.cgroup_id, orig.pid),
            (7, cgroup_id, child.id()),
            "{host}"
        );
        assert_eq!(dp.orig_dst().take(peer), None, "take removes the entry");
        conn.write_all(b"hello\n").unwrap();
        drop(conn);
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n", "{host}");
    }

    // No IPv6 proxy configured: a connect to the IPv6 VIP fails closed (EPERM).
    let out = spawn_in_cgroup(&cgroup.0, "exec 3<>/dev/tcp/fd00:ff::1/80")
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not permitted"),
        "{out:?}"
    );

    // Removing the services removes their destinations. web keeps its name (a counter of its
    // own, the refused IPv6 connect, needs it); preview's name, which nothing needs, is pruned.
    let report = dp
        .sync(&DesiredState {
            services: vec![],
            ..desired.clone()
        })
        .unwrap();
    assert_eq!((report.dests_removed, report.names_pruned), (3, 1));
    let status = inspect::status(&pins.0).unwrap();
    assert_eq!(status.services.len(), 1);
    assert_eq!(status.services[0].name, "web");
    assert!(status.services[0].removed);
    assert_eq!(status.destinations, []);
    assert_eq!(status.proxy_v4, Some(proxy_addr));
    let counters = inspect::counters(&pins.0).unwrap();
    let refused: Vec<_> = counters
        .bypass
        .iter()
        .map(|r| (r.service.as_str(), r.reason, r.syns))
        .collect();
    assert_eq!(refused, [("web", "no_proxy", 1)]);
    assert_eq!(counters.stats.get("connect_redirects"), Some(&2));
    assert_eq!(counters.stats.get("sockops_recorded"), Some(&2));
    drop(dp);

    // Restart: the same four links get the new programs (no second attachment).
    let dp = Datapath::start(&cgroup.0, lock()).expect("restart the datapath");
    for (before, after) in first.iter().zip(dp.links()) {
        assert_eq!(
            (after.name, after.how, after.link_id),
            (before.name, "updated", before.link_id)
        );
    }
    let status = inspect::status(&pins.0).unwrap();
    for link in &status.links {
        assert!(link.pinned, "{}", link.name);
        assert_eq!(link.cgroup_id, Some(cgroup_id), "{}", link.name);
        assert!(
            link.prog_name
                .as_deref()
                .is_some_and(|n| n.starts_with("ng_")),
            "{link:?}"
        );
    }
    drop(dp);

    // Another cgroup: the pinned links are replaced, not added to.
    let other = CgroupDir::new();
    let dp = Datapath::start(&other.0, lock()).unwrap();
    assert!(
        dp.links().iter().all(|l| l.how == "replaced"),
        "{:?}",
        dp.links()
    );
    drop(dp);
    let report = inspect::detach(&pins.0).unwrap();
    assert_eq!(
        report.links_removed,
        ["connect4", "connect6", "sockops", "ingress"]
    );
}
