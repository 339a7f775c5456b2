//! A decision-log sink that never loses a line silently: every failed write is counted in
//! `nodegate_decision_log_errors_total{sink}` and reported on stderr (the first failure at
//! once, then at most every [`REPORT_EVERY`] with the number of lines lost meanwhile).

use std::{
    io::{self, Write},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::fmt::MakeWriter;

use super::Metrics;

const REPORT_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(super) struct SinkWriter(Arc<Sink>);

struct Sink {
    name: &'static str,
    out: Mutex<Box<dyn Write + Send>>,
    errors: Counter,
    report: Mutex<Report>,
}

#[derive(Default)]
struct Report {
    last: Option<Instant>,
    lost_since: u64,
}

impl SinkWriter {
    pub(super) fn new(name: &'static str, out: Box<dyn Write + Send>, metrics: &Metrics) -> Self {
        Self(Arc::new(Sink {
            name,
            out: Mutex::new(out),
            errors: metrics.decision_log_errors(name),
            report: Mutex::new(Report::default()),
        }))
    }
}

impl Sink {
    /// Write one whole line (the fmt layer hands over a complete line per event).
    fn write_line(&self, line: &[u8]) {
        let result = {
            let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
            out.write_all(line).and_then(|()| out.flush())
        };
        if let Err(err) = result {
            self.errors.inc();
            self.report(&err);
        }
    }

    fn report(&self, err: &io::Error) {
        let mut report = self.report.lock().unwrap_or_else(PoisonError::into_inner);
        report.lost_since += 1;
        let now = Instant::now();
        if report
            .last
            .is_none_or(|last| now.duration_since(last) >= REPORT_EVERY)
        {
            // Not through tracing: this runs inside the subscriber.
            eprintln!(
                "error: decision log sink {}: {} line(s) lost since the last report: {err}",
                self.name, report.lost_since
            );
            report.last = Some(now);
            report.lost_since = 0;
        }
    }
}

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Errors are accounted for here; reporting them to the fmt layer would only print a
        // second, less useful message.
        self.0.write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MakeWriter<'_> for SinkWriter {
    type Writer = Self;

    fn make_writer(&self) -> Self::Writer {
        self.clone()
    }
}

/// Every decision sink (stdout, the file) behind one writer: a line is formatted once and the
/// same bytes go to each sink in turn, each with its own error accounting. (One fmt layer per
/// sink formatted every line twice: about a tenth of the gateway's CPU per request under load
/// went to the decision log, half of it to formatting.)
#[derive(Clone)]
pub(super) struct Sinks(Arc<[SinkWriter]>);

impl Sinks {
    pub(super) fn new(sinks: Vec<SinkWriter>) -> Self {
        Self(sinks.into())
    }
}

impl Write for Sinks {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for sink in self.0.iter() {
            sink.0.write_line(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MakeWriter<'_> for Sinks {
    type Writer = Self;

    fn make_writer(&self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Appends to a shared buffer.
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_sink_gets_each_line_and_counts_its_own_errors() {
        let metrics = Metrics::new(None);
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut sinks = Sinks::new(vec![
            SinkWriter::new("stdout", Box::new(Shared(out.clone())), &metrics),
            SinkWriter::new("file", Box::new(Broken), &metrics),
        ]);
        sinks.write_all(b"{\"a\":1}\n").unwrap();
        sinks.write_all(b"{\"b\":2}\n").unwrap();
        assert_eq!(&*out.lock().unwrap(), b"{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(metrics.decision_log_errors("file").get(), 2);
        assert_eq!(metrics.decision_log_errors("stdout").get(), 0);
    }

    #[test]
    fn failed_writes_are_counted() {
        let metrics = Metrics::new(None);
        let mut w = SinkWriter::new("file", Box::new(Broken), &metrics);
        w.write_all(b"{}\n").unwrap();
        w.write_all(b"{}\n").unwrap();
        assert_eq!(metrics.decision_log_errors("file").get(), 2);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("nodegate_decision_log_errors_total{sink=\"file\"} 2"),
            "{text}"
        );
    }
}
