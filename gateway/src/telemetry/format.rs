//! The decision log's line format: one flat JSON object per event, `timestamp`, `level`,
//! `target`, then the event's fields in the order they were written.
//!
//! tracing field values are scalars, and request lines need objects and arrays (`identity`,
//! `workload`, `identity.groups`). An event therefore may carry one reserved field,
//! [`OBJECT_FIELD`], holding a serialized JSON object whose members are spliced into the line
//! at that position. Only the gateway's own code writes it (never request data as a key), so
//! the line stays one flat, well-formed object.

use std::fmt::{self, Write as _};

use serde_json::Value;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::Writer,
        time::{FormatTime as _, SystemTime},
    },
    registry::LookupSpan,
};

/// The field whose value (a JSON object, as text) is spliced into the line.
pub const OBJECT_FIELD: &str = "object";

#[derive(Debug, Default, Clone, Copy)]
pub struct DecisionFormat;

impl<S, N> FormatEvent<S, N> for DecisionFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut timestamp = String::with_capacity(32);
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let meta = event.metadata();
        let mut line = String::with_capacity(1024);
        line.push('{');
        push_str_member(&mut line, "timestamp", &timestamp);
        line.push(',');
        push_str_member(&mut line, "level", meta.level().as_str());
        line.push(',');
        push_str_member(&mut line, "target", meta.target());
        let mut visitor = Members { line: &mut line };
        event.record(&mut visitor);
        line.push('}');
        writeln!(writer, "{line}")
    }
}

fn push_member(line: &mut String, key: &str, value: &Value) {
    push_json_str(line, key);
    // Serializing a `Value` into a `String` cannot fail.
    let _ = write!(line, ":{value}");
}

/// `"key":"value"`, both escaped as JSON strings.
fn push_str_member(line: &mut String, key: &str, value: &str) {
    push_json_str(line, key);
    line.push(':');
    push_json_str(line, value);
}

/// `s` as a JSON string, escaped exactly as `serde_json` escapes it (`"`, `\`, and control
/// characters; everything else as is), without building a `Value` (an allocation per member
/// per line otherwise).
fn push_json_str(line: &mut String, s: &str) {
    line.push('"');
    let mut rest = s;
    while let Some(i) = rest.find(|c: char| c == '"' || c == '\\' || c < ' ') {
        line.push_str(&rest[..i]);
        let c = rest[i..].chars().next().unwrap_or(' ');
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            '\u{8}' => line.push_str("\\b"),
            '\u{c}' => line.push_str("\\f"),
            c => {
                let _ = write!(line, "\\u{:04x}", u32::from(c));
            }
        }
        rest = &rest[i + c.len_utf8()..];
    }
    line.push_str(rest);
    line.push('"');
}

struct Members<'a> {
    line: &'a mut String,
}

impl Members<'_> {
    fn push(&mut self, field: &Field, value: &Value) {
        self.line.push(',');
        push_member(self.line, field.name(), value);
    }

    fn push_str(&mut self, field: &Field, value: &str) {
        self.line.push(',');
        push_str_member(self.line, field.name(), value);
    }
}

impl Visit for Members<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == OBJECT_FIELD {
            // Spliced as members when it is an object (it always is: only our code writes it).
            if let Some(body) = value
                .trim()
                .strip_prefix('{')
                .and_then(|v| v.strip_suffix('}'))
            {
                if !body.trim().is_empty() {
                    self.line.push(',');
                    self.line.push_str(body);
                }
                return;
            }
        }
        self.push_str(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, &Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, &Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, &Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, &Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `message` is never part of a decision line (every field is named).
        if field.name() == "message" {
            return;
        }
        self.push_str(field, &format!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        for s in [
            "",
            "plain",
            "quote \" and backslash \\",
            "lines\nand\rtabs\t",
            "\u{0}\u{1}\u{8}\u{c}\u{1f}\u{7f}",
            "é ü 漢字 🦀",
            "/a%2Fb?x=\"y\"",
        ] {
            let mut line = String::new();
            push_json_str(&mut line, s);
            assert_eq!(line, Value::String(s.to_owned()).to_string(), "{s:?}");
        }
    }
}
