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
        let mut line = String::with_capacity(512);
        line.push('{');
        push_member(&mut line, "timestamp", &Value::String(timestamp));
        line.push(',');
        push_member(&mut line, "level", &Value::String(meta.level().to_string()));
        line.push(',');
        push_member(
            &mut line,
            "target",
            &Value::String(meta.target().to_owned()),
        );
        let mut visitor = Members { line: &mut line };
        event.record(&mut visitor);
        line.push('}');
        writeln!(writer, "{line}")
    }
}

fn push_member(line: &mut String, key: &str, value: &Value) {
    // Serializing a `Value` into a `String` cannot fail.
    let _ = write!(line, "{}:{}", Value::String(key.to_owned()), value);
}

struct Members<'a> {
    line: &'a mut String,
}

impl Members<'_> {
    fn push(&mut self, field: &Field, value: &Value) {
        self.line.push(',');
        push_member(self.line, field.name(), value);
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
        self.push(field, &Value::String(value.to_owned()));
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
        self.push(field, &Value::String(format!("{value:?}")));
    }
}
