//! `counters`, `status` and `detach`: read (or remove) the pinned state, with or without a
//! running daemon. `--json` prints `ebpf::inspect::{Counters, Status}` as they are.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use serde::Serialize;

use super::{
    CliError,
    table::{Align, Table},
};
use crate::{ebpf::inspect, telemetry::decision::mode_str};

fn print(text: &str) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|e| CliError::Output(io::Error::other(e)))?;
    text.push('\n');
    print(&text)
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub(super) fn counters(bpffs: &Path, json: bool) -> Result<(), CliError> {
    let counters = inspect::counters(bpffs).map_err(CliError::ebpf(format!(
        "cannot read the bypass counters under {}",
        bpffs.display()
    )))?;
    if json {
        return print_json(&counters);
    }
    print(&render_counters(&counters))
}

fn render_counters(counters: &inspect::Counters) -> String {
    let mut out = String::new();
    let mut t = Table::new(&[
        ("SERVICE", Align::Left),
        ("SOURCE", Align::Left),
        ("REASON", Align::Left),
        ("ACTION", Align::Left),
        ("SYNS", Align::Right),
        ("PACKETS", Align::Right),
        ("BYTES", Align::Right),
    ]);
    for r in &counters.bypass {
        t.row(vec![
            r.service.clone(),
            r.source.to_string(),
            r.reason.to_owned(),
            r.action.to_owned(),
            r.syns.to_string(),
            r.packets.to_string(),
            r.bytes.to_string(),
        ]);
    }
    if t.is_empty() {
        out.push_str("no bypass attempts recorded\n");
    } else {
        out.push_str(&t.render());
    }
    if !counters.stats.is_empty() {
        let mut t = Table::new(&[("STAT", Align::Left), ("VALUE", Align::Right)]);
        for (name, value) in &counters.stats {
            t.row(vec![(*name).to_owned(), value.to_string()]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    if let Some(&n) = counters.stats.get("bypass_uncounted")
        && n > 0
    {
        let _ = writeln!(
            out,
            "\nwarning: {n} bypass packet(s) were dropped without a row above: the counter map \
             (NG_BYPASS, 65536 keys) is full, e.g. after a flood from many sources"
        );
    }
    out
}

pub(super) fn status(bpffs: &Path, json: bool, admin: SocketAddr) -> Result<(), CliError> {
    let status = inspect::status(bpffs).map_err(CliError::ebpf(format!(
        "cannot read the datapath status under {}",
        bpffs.display()
    )))?;
    // The pinned state is readable whether or not the daemon runs; its readiness and the
    // Kubernetes source's health only from the daemon itself.
    let daemon = daemon_status(admin);
    if json {
        let mut value =
            serde_json::to_value(&status).map_err(|e| CliError::Output(io::Error::other(e)))?;
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "daemon".into(),
                match &daemon {
                    Ok(v) => v.clone(),
                    Err(e) => serde_json::json!({ "reachable": false, "admin": admin.to_string(), "error": e }),
                },
            );
        }
        return print_json(&value);
    }
    let mut text = render_daemon(admin, &daemon);
    text.push_str(&render_status(&status));
    print(&text)
}

/// `GET /status` from the admin server, with a short deadline: the daemon may be dead.
fn daemon_status(admin: SocketAddr) -> Result<serde_json::Value, String> {
    use std::io::Read as _;
    let deadline = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&admin, deadline).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(deadline))
        .and_then(|()| stream.set_write_timeout(Some(deadline)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    stream
        .take(1 << 20)
        .read_to_end(&mut reply)
        .map_err(|e| e.to_string())?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| "not an HTTP reply".to_owned())?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or_default().to_owned());
    }
    let mut value: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("not the gateway's /status: {e}"))?;
    if let Some(map) = value.as_object_mut() {
        map.insert("reachable".into(), true.into());
        map.insert("admin".into(), admin.to_string().into());
    }
    Ok(value)
}

fn render_daemon(admin: SocketAddr, daemon: &Result<serde_json::Value, String>) -> String {
    let mut out = String::new();
    let v = match daemon {
        Ok(v) => v,
        Err(e) => {
            let _ = writeln!(
                out,
                "daemon:   not reachable at {admin} ({e}); the pinned state below is in force\n"
            );
            return out;
        }
    };
    let missing: Vec<&str> = v["missing"]
        .as_array()
        .map(|m| m.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    if missing.is_empty() {
        let _ = writeln!(out, "daemon:   ready ({admin})");
    } else {
        let _ = writeln!(out, "daemon:   not ready: {}", missing.join("; "));
    }
    let k = &v["kubernetes"];
    if !k.is_null() {
        let state = if k["ready"].as_bool() == Some(true) {
            "in sync".to_owned()
        } else {
            format!("NOT in sync: {}", k["error"].as_str().unwrap_or("?"))
        };
        let _ = writeln!(
            out,
            "kubernetes: {state}; snapshot revision {}, last sync {}",
            k["revision"],
            k["last_sync"].as_str().unwrap_or("never")
        );
        let mut t = Table::new(&[
            ("RESOURCE", Align::Left),
            ("SYNCED", Align::Left),
            ("LAST SYNC", Align::Left),
            ("FAILURES", Align::Right),
            ("RELISTS", Align::Right),
            ("ERROR", Align::Left),
        ]);
        for w in k["watchers"].as_array().into_iter().flatten() {
            t.row(vec![
                w["resource"].as_str().unwrap_or("?").to_owned(),
                if w["synced"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
                .to_owned(),
                w["last_sync"].as_str().unwrap_or("-").to_owned(),
                w["failures"].to_string(),
                w["relists"].to_string(),
                w["error"].as_str().unwrap_or("-").to_owned(),
            ]);
        }
        out.push_str(&t.render());
    }
    out.push('\n');
    out
}

fn render_status(s: &inspect::Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "bpffs:    {}", s.bpffs.display());
    let _ = writeln!(
        out,
        "proxy:    v4 {}, v6 {}",
        opt(s.proxy_v4),
        opt(s.proxy_v6)
    );
    let gateways: Vec<String> = s.gateways.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "gateways: {}",
        if gateways.is_empty() {
            "-".to_owned()
        } else {
            gateways.join(", ")
        }
    );

    let mut t = Table::new(&[
        ("PROGRAM", Align::Left),
        ("PINNED", Align::Left),
        ("LINK", Align::Right),
        ("PROG", Align::Right),
        ("PROG NAME", Align::Left),
        ("CGROUP", Align::Right),
    ]);
    for l in &s.links {
        t.row(vec![
            l.name.clone(),
            if l.pinned { "yes" } else { "no" }.to_owned(),
            opt(l.link_id),
            opt(l.prog_id),
            opt(l.prog_name.as_deref()),
            opt(l.cgroup_id),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());

    let mut t = Table::new(&[
        ("SERVICE", Align::Left),
        ("ID", Align::Left),
        ("MODE", Align::Left),
        ("STATE", Align::Left),
    ]);
    for svc in &s.services {
        t.row(vec![
            svc.name.clone(),
            format!("{:#010x}", svc.id),
            mode_str(svc.mode).to_owned(),
            if svc.removed { "removed" } else { "active" }.to_owned(),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());

    let mut t = Table::new(&[
        ("DESTINATION", Align::Left),
        ("KIND", Align::Left),
        ("SERVICE", Align::Left),
        ("MODE", Align::Left),
    ]);
    for d in &s.destinations {
        t.row(vec![
            d.addr.to_string(),
            d.kind.to_owned(),
            d.service.clone(),
            mode_str(d.mode).to_owned(),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());

    let mut t = Table::new(&[("MAP", Align::Left), ("ENTRIES", Align::Right)]);
    for (map, n) in &s.map_entries {
        t.row(vec![(*map).to_owned(), n.to_string()]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

pub(super) fn detach(bpffs: &Path) -> Result<(), CliError> {
    let report = inspect::detach(bpffs).map_err(CliError::ebpf(format!(
        "cannot detach the programs pinned under {}",
        bpffs.display()
    )))?;
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(", ")
        }
    };
    print(&format!(
        "detached: links removed: {}; maps removed: {}\n",
        list(&report.links_removed),
        list(&report.maps_removed)
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ebpf::Mode;

    #[test]
    fn counters_table() {
        let c = inspect::Counters {
            bypass: vec![inspect::CounterRow {
                service: "grafana".into(),
                service_id: 1,
                source: "10.88.0.2".parse().unwrap(),
                reason: "not_from_gateway",
                action: "dropped",
                syns: 3,
                packets: 5,
                bytes: 300,
            }],
            stats: BTreeMap::from([("ingress_drops", 5), ("bypass_uncounted", 0)]),
        };
        let text = render_counters(&c);
        assert!(!text.contains("warning"), "{text}");
        assert!(
            text.starts_with(
                "SERVICE  SOURCE     REASON            ACTION   SYNS  PACKETS  BYTES\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("grafana  10.88.0.2  not_from_gateway  dropped     3        5    300\n"),
            "{text}"
        );
        assert!(text.contains("ingress_drops         5"), "{text}");
        let full = inspect::Counters {
            stats: BTreeMap::from([("bypass_uncounted", 7)]),
            ..c
        };
        assert!(
            render_counters(&full)
                .contains("warning: 7 bypass packet(s) were dropped without a row above"),
            "{}",
            render_counters(&full)
        );
        let empty = inspect::Counters {
            bypass: vec![],
            stats: BTreeMap::new(),
        };
        assert_eq!(render_counters(&empty), "no bypass attempts recorded\n");
    }

    #[test]
    fn status_tables() {
        let s = inspect::Status {
            bpffs: "/sys/fs/bpf/t".into(),
            links: vec![inspect::LinkStatus {
                name: "connect4".into(),
                pinned: true,
                link_id: Some(7),
                prog_id: Some(42),
                prog_name: Some("ng_connect4".into()),
                cgroup_id: Some(1234),
            }],
            destinations: vec![inspect::DestStatus {
                addr: "10.96.0.10:80".parse().unwrap(),
                service: "grafana".into(),
                service_id: 1,
                kind: "vip",
                mode: Mode::Audit,
            }],
            gateways: vec!["10.77.0.1".parse().unwrap()],
            services: vec![inspect::ServiceStatus {
                id: 1,
                name: "grafana".into(),
                mode: Mode::Audit,
                removed: false,
            }],
            proxy_v4: Some("10.77.0.1:15001".parse().unwrap()),
            proxy_v6: None,
            map_entries: BTreeMap::from([("NG_DESTS", 1)]),
        };
        let text = render_status(&s);
        assert!(
            text.contains("proxy:    v4 10.77.0.1:15001, v6 -\n"),
            "{text}"
        );
        assert!(
            text.contains("connect4  yes        7    42  ng_connect4    1234"),
            "{text}"
        );
        assert!(
            text.contains("10.96.0.10:80  vip   grafana  audit"),
            "{text}"
        );
        assert!(
            text.contains("grafana  0x00000001  audit  active"),
            "{text}"
        );
    }
}
