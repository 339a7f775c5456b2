//! `gateway decisions`: read the decision log file, filter, show a table (or the JSON lines),
//! optionally following it as it grows.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Seek as _, SeekFrom},
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use super::{
    CliError,
    table::{Align, Table},
};

const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// The filters of one invocation.
#[derive(Debug, Default)]
pub(super) struct Filter {
    pub deny: bool,
    pub service: Option<String>,
    /// Unix seconds (with fraction): lines older than this are skipped.
    pub since: Option<f64>,
}

impl Filter {
    fn matches(&self, line: &Value) -> bool {
        if self.deny && !matches!(line["decision"].as_str(), Some("deny" | "would_deny")) {
            return false;
        }
        if let Some(service) = &self.service
            && line["service"].as_str() != Some(service)
        {
            return false;
        }
        if let Some(since) = self.since {
            match line["timestamp"].as_str().and_then(parse_rfc3339) {
                Some(t) if t >= since => {}
                _ => return false,
            }
        }
        true
    }
}

/// `--since`: RFC 3339 (`2026-11-23T14:00:00Z`, offsets allowed) or an age (`90s`, `10m`,
/// `1h`, `2d`).
pub(super) fn parse_since(value: &str, now: SystemTime) -> Result<f64, CliError> {
    if let Some(t) = parse_rfc3339(value) {
        return Ok(t);
    }
    let bad = || {
        CliError::Input(format!(
            "--since {value:?}: use RFC 3339 (2026-11-23T14:00:00Z) or an age like 90s, 10m, 1h, 2d"
        ))
    };
    let (digits, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(bad()),
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    #[expect(
        clippy::cast_precision_loss,
        reason = "an age in seconds is far below 2^52"
    )]
    Ok(now - secs as f64)
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` → Unix seconds.
#[expect(
    clippy::many_single_char_names,
    reason = "y, mo, d, h, mi: the date fields, as in the RFC"
)]
pub(super) fn parse_rfc3339(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d, h, mi, sec) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        frac = format!("0.{}", &r[..end]).parse().ok()?;
        rest = &r[end..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (oh, om) = rest[1..].split_once(':')?;
            let (oh, om): (i64, i64) = (oh.parse().ok()?, om.parse().ok()?);
            sign * (oh * 3600 + om * 60)
        }
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    #[expect(
        clippy::cast_precision_loss,
        reason = "Unix seconds are far below 2^52"
    )]
    Some(secs as f64 + frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Prints the matching lines of `file`, then (with `follow`) new ones as they are appended,
/// across rotations (as `tail -F`).
pub(super) fn show(file: &Path, filter: &Filter, follow: bool, json: bool) -> Result<(), CliError> {
    let mut log = Follow::open(file)?;
    let mut rows = Vec::new();
    log.poll(filter, &mut rows)?;
    print_rows(&rows, json, true);
    if !follow {
        if rows.is_empty() && !json {
            eprintln!("no matching decision lines in {}", file.display());
        }
        return Ok(());
    }
    loop {
        std::thread::sleep(FOLLOW_POLL);
        let mut rows = Vec::new();
        log.poll(filter, &mut rows)?;
        print_rows(&rows, json, false);
    }
}

/// The decision log file being read: where in it, and which file it is (device, inode), to
/// notice that the gateway has moved on to a new one at the path.
struct Follow {
    path: std::path::PathBuf,
    reader: BufReader<File>,
    id: Option<(u64, u64)>,
    pos: u64,
}

impl Follow {
    fn open(path: &Path) -> Result<Self, CliError> {
        let file = File::open(path).map_err(|e| {
            CliError::Input(format!(
                "cannot open the decision log {}: {e}",
                path.display()
            ))
        })?;
        let id = file.metadata().ok().map(|m| (m.dev(), m.ino()));
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::new(file),
            id,
            pos: 0,
        })
    }

    /// The complete lines appended since the last call. Rotated (moved away, a new file at
    /// the path): first the rest of the old file (what was written before the gateway moved
    /// on), then the new one from its start. Truncated: from the start again.
    fn poll(&mut self, filter: &Filter, out: &mut Vec<Row>) -> Result<(), CliError> {
        let at_path = std::fs::metadata(&self.path).ok();
        let moved = at_path
            .as_ref()
            .is_some_and(|m| Some((m.dev(), m.ino())) != self.id);
        let truncated = !moved && at_path.as_ref().is_some_and(|m| m.len() < self.pos);
        if !truncated {
            self.read(filter, out)?;
        }
        if moved || truncated {
            *self = Self::open(&self.path)?;
            self.read(filter, out)?;
        }
        Ok(())
    }

    fn read(&mut self, filter: &Filter, out: &mut Vec<Row>) -> Result<(), CliError> {
        self.reader
            .seek(SeekFrom::Start(self.pos))
            .map_err(CliError::Output)?;
        self.pos += read_lines(&mut self.reader, filter, out)?;
        Ok(())
    }
}

/// Reads complete lines to EOF; returns the bytes consumed (a partial last line is left for
/// the next read).
/// A matching line: parsed, and as written (what `--json` prints, key order and all).
type Row = (Value, String);

fn read_lines(
    reader: &mut BufReader<File>,
    filter: &Filter,
    out: &mut Vec<Row>,
) -> Result<u64, CliError> {
    let mut consumed = 0u64;
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).map_err(CliError::Output)?;
        if n == 0 || !buf.ends_with('\n') {
            return Ok(consumed);
        }
        consumed += n as u64;
        let Ok(line) = serde_json::from_str::<Value>(buf.trim_end()) else {
            continue;
        };
        if filter.matches(&line) {
            out.push((line, buf.trim_end().to_owned()));
        }
    }
}

fn print_rows(rows: &[Row], json: bool, with_header: bool) {
    if json {
        for (_, raw) in rows {
            println!("{raw}");
        }
        return;
    }
    if rows.is_empty() {
        return;
    }
    let values: Vec<Value> = rows.iter().map(|(v, _)| v.clone()).collect();
    let text = table(&values);
    if with_header {
        print!("{text}");
    } else {
        // Following: the header was printed with the first batch.
        print!("{}", text.split_once('\n').map_or("", |(_, rest)| rest));
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One row per line: connection, bypass and request lines share the columns.
pub(super) fn table(rows: &[Value]) -> String {
    let mut t = Table::new(&[
        ("TIME", Align::Left),
        ("KIND", Align::Left),
        ("SERVICE", Align::Left),
        ("DECISION", Align::Left),
        ("REASON", Align::Left),
        ("RULE", Align::Left),
        ("WHO", Align::Left),
        ("SRC", Align::Left),
        ("REQUEST", Align::Left),
        ("STATUS", Align::Right),
        ("ID", Align::Left),
    ]);
    for r in rows {
        let who = match (&r["identity"]["subject"], &r["workload"]) {
            (Value::String(sub), _) => sub.clone(),
            (_, Value::Object(w)) => format!("{}/{}", s(&w["namespace"]), s(&w["service_account"])),
            _ => r["identity"]["kind"].as_str().unwrap_or("-").to_owned(),
        };
        let request = match r["kind"].as_str() {
            Some("request") => format!("{} {}", s(&r["method"]), s(&r["path"])),
            _ => format!("-> {}", s(&r["dst"])),
        };
        let decision = match r["kind"].as_str() {
            Some("bypass") => s(&r["action"]),
            _ => s(&r["decision"]),
        };
        let time = r["timestamp"]
            .as_str()
            .map_or("-".into(), |t| t.chars().take(23).collect());
        let id: String = r["request_id"]
            .as_str()
            .unwrap_or("-")
            .chars()
            .take(12)
            .collect();
        t.row(vec![
            time,
            s(&r["kind"]),
            s(&r["service"]),
            decision,
            s(&r["reason"]),
            s(&r["rule"]),
            who,
            s(&r["src"]),
            request,
            s(&r["status"]),
            id,
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn following_reads_across_rotation_and_truncation() {
        let dir = std::env::temp_dir().join(format!("nodegate-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.log");
        let line = |i: u32| format!("{{\"kind\":\"request\",\"i\":{i}}}\n");
        let append = |path: &Path, text: &str| {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        let seen = |log: &mut Follow| {
            let mut rows = Vec::new();
            log.poll(&Filter::default(), &mut rows).unwrap();
            rows.iter()
                .map(|(v, _)| v["i"].as_u64().unwrap())
                .collect::<Vec<_>>()
        };
        append(&path, &line(1));
        let mut log = Follow::open(&path).unwrap();
        assert_eq!(seen(&mut log), [1]);
        // A partial line waits for its end.
        append(&path, &format!("{}{{\"kind\"", line(2)));
        assert_eq!(seen(&mut log), [2]);
        append(&path, ":\"request\",\"i\":3}\n");
        assert_eq!(seen(&mut log), [3]);
        // Rotated: the old file's last lines, then the new file's.
        append(&path, &line(4));
        std::fs::rename(&path, dir.join("decisions.log.1")).unwrap();
        append(&dir.join("decisions.log.1"), &line(5));
        append(&path, &line(6));
        assert_eq!(seen(&mut log), [4, 5, 6]);
        assert_eq!(seen(&mut log), [0u64; 0]);
        // Truncated (copytruncate): from the top again.
        std::fs::write(&path, "").unwrap();
        assert_eq!(seen(&mut log), [0u64; 0]);
        append(&path, &line(7));
        assert_eq!(seen(&mut log), [7]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rfc3339_and_ages() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_rfc3339("2026-11-23T14:00:00Z"), Some(1_795_442_400.0));
        assert_eq!(
            parse_rfc3339("2026-11-23T16:00:00+02:00"),
            Some(1_795_442_400.0)
        );
        assert_eq!(
            parse_rfc3339("2026-11-23T14:00:00.5Z"),
            Some(1_795_442_400.5)
        );
        assert_eq!(parse_rfc3339("2026-13-23T14:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(parse_since("10m", now).unwrap(), 9_400.0);
        assert_eq!(parse_since("1h", now).unwrap(), 6_400.0);
        assert!(parse_since("10x", now).is_err());
        assert!(parse_since("m", now).is_err());
    }

    #[test]
    fn filters_and_table() {
        let lines: Vec<Value> = [
            r#"{"timestamp":"2026-11-23T14:00:00.1Z","kind":"request","service":"web","decision":"allow","reason":"allowed_by_rule","rule":"devs","identity":{"kind":"user","subject":"alice"},"src":"10.0.0.1:5","method":"GET","path":"/app","status":200,"request_id":"0123456789abcdef0123456789abcdef"}"#,
            r#"{"timestamp":"2026-11-23T14:05:00Z","kind":"request","service":"web","decision":"deny","reason":"no_rule_matched","identity":{"kind":"anonymous"},"workload":{"namespace":"ci","service_account":"b"},"src":"10.0.0.2:5","method":"POST","path":"/x","status":401}"#,
            r#"{"timestamp":"2026-11-23T14:06:00Z","kind":"connection","service":"db","decision":"would_deny","reason":"source_not_allowed","src":"10.0.0.3:5","dst":"10.96.0.1:5432"}"#,
        ]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
        let count = |f: &Filter| lines.iter().filter(|l| f.matches(l)).count();
        assert_eq!(count(&Filter::default()), 3);
        assert_eq!(
            count(&Filter {
                deny: true,
                ..Filter::default()
            }),
            2
        );
        assert_eq!(
            count(&Filter {
                service: Some("web".into()),
                ..Filter::default()
            }),
            2
        );
        let since = parse_rfc3339("2026-11-23T14:04:00Z");
        assert_eq!(
            count(&Filter {
                since,
                ..Filter::default()
            }),
            2
        );
        let text = table(&lines);
        assert!(text.starts_with("TIME "), "{text}");
        assert!(
            text.contains("alice") && text.contains("ci/b") && text.contains("-> 10.96.0.1:5432"),
            "{text}"
        );
        assert!(
            text.contains("GET /app") && text.contains("0123456789ab\n"),
            "{text}"
        );
    }
}
