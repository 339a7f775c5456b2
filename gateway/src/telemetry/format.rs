//! The decision log's line format: one flat JSON object per event, `timestamp`, `level`,
//! `target`, then the event's fields in the order they were written.
//!
//! tracing field values are scalars, and request lines need objects and arrays (`identity`,
//! `workload`, `identity.groups`). An event therefore may carry one reserved field,
//! [`OBJECT_FIELD`], holding a serialized JSON object whose members are spliced into the line
//! at that position. Only the gateway's own code writes it (never request data as a key), so
//! the line stays one flat, well-formed object.

use std::fmt;

use serde_json::Value;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    registry::LookupSpan,
};

use super::json::{self, timestamp};

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
        let meta = event.metadata();
        let mut line = Vec::with_capacity(1024);
        line.extend_from_slice(b"{\"timestamp\":\"");
        timestamp::write(&mut line, std::time::SystemTime::now());
        line.push(b'"');
        line.push(b',');
        push_str_member(&mut line, "level", meta.level().as_str());
        line.push(b',');
        push_str_member(&mut line, "target", meta.target());
        let mut visitor = Members { line: &mut line };
        event.record(&mut visitor);
        line.push(b'}');
        // Whole strings and ASCII escapes between them: always UTF-8.
        writeln!(writer, "{}", String::from_utf8_lossy(&line))
    }
}

fn push_member(line: &mut Vec<u8>, key: &str, value: &Value) {
    json::string(line, key);
    line.push(b':');
    // Serializing a `Value` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *line, value);
}

/// `"key":"value"`, both escaped as JSON strings.
fn push_str_member(line: &mut Vec<u8>, key: &str, value: &str) {
    json::string(line, key);
    line.push(b':');
    json::string(line, value);
}

struct Members<'a> {
    line: &'a mut Vec<u8>,
}

impl Members<'_> {
    fn push(&mut self, field: &Field, value: &Value) {
        self.line.push(b',');
        push_member(self.line, field.name(), value);
    }

    fn push_str(&mut self, field: &Field, value: &str) {
        self.line.push(b',');
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
                    self.line.push(b',');
                    self.line.extend_from_slice(body.as_bytes());
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
