//! The decision log's sinks (stdout, the file), written off the request path by a flusher
//! thread, never losing a line silently.
//!
//! A request used to write its line to each sink itself, `write_all` + `flush` per sink under a
//! mutex: two write(2) calls per request, about 17% of the gateway's CPU under wrk (HTTP/1.1
//! keep-alive, ~25k req/s on one core). Now the request path only appends the formatted line to
//! a pending buffer (one mutex, no syscall, no wake-up per line), and the flusher thread
//! ([`FLUSHER_NAME`]) takes the whole buffer and writes it to each sink with one `write_all`
//! and one `flush` per batch, as Envoy's access-log flusher and ztunnel's non-blocking writer do:
//!
//! - A line is on its way to the sinks within [`Limits::interval`] (10 ms), sooner when the
//!   pending bytes cross [`Limits::high_water`]. A SIGKILL can lose at most that window (Envoy's
//!   access log has the same property); a graceful exit loses nothing: [`DecisionLog::flush`]
//!   writes everything pending first (`gateway run` calls it on every return).
//! - Backpressure, not loss: past [`Limits::cap`] bytes pending or being written (a stuck disk,
//!   a blocked stdout pipe), appenders wait for the flusher. Memory stays bounded and the
//!   request path slows down, as it did when it wrote itself. It is never silent: each wait
//!   counts in `nodegate_decision_log_waits_total`, `nodegate_decision_log_buffered_bytes`
//!   says how far behind the sinks are, and the flusher reports on stderr (at most every
//!   [`REPORT_EVERY`]) that requests waited and how long its last batch took.
//! - A failed write counts every line of the batch in `nodegate_decision_log_errors_total{sink}`
//!   and is reported on stderr (the first failure at once, then at most every
//!   [`REPORT_EVERY`] with the number of lines lost meanwhile). The other sinks still get the
//!   batch.
//! - Lines are appended whole, so they are never interleaved, and in the order they were
//!   appended.

use std::{
    io::{self, Write},
    mem,
    panic::{self, AssertUnwindSafe},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::{self, JoinHandle, ThreadId},
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tracing_subscriber::fmt::MakeWriter;

use super::Metrics;

const REPORT_EVERY: Duration = Duration::from_secs(10);

/// The flusher thread's name (as `top -H` and panics show it).
const FLUSHER_NAME: &str = "ng-decision-log";

/// The flusher keeps its buffers' capacity between batches (no reallocation per batch) up to
/// this much; a burst towards [`Limits::cap`] does not keep its memory for good.
const KEEP_CAPACITY: usize = 1 << 20;

/// When the flusher writes, and how much may wait.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// How long the flusher gathers lines after the first one of a batch arrived.
    pub interval: Duration,
    /// Pending bytes that make the flusher write at once (one wake-up when crossed).
    pub high_water: usize,
    /// Bytes pending and being written past which appenders wait.
    pub cap: usize,
}

impl Limits {
    /// The daemon's: 10 ms, 64 KiB, 8 MiB. At ~25k req/s of ~700-byte lines, a batch is the
    /// high-water mark every few milliseconds: a few hundred write(2) calls a second per sink
    /// instead of one per line.
    pub(super) const DAEMON: Self = Self {
        interval: Duration::from_millis(10),
        high_water: 64 << 10,
        cap: 8 << 20,
    };
}

/// One output of the decision log, owned by the flusher thread.
pub(super) struct Sink {
    name: &'static str,
    out: Box<dyn Write + Send>,
    errors: Counter,
    report: Report,
}

/// A count reported on stderr at most every [`REPORT_EVERY`] (not through tracing: a decision
/// line about the decision log would loop): what accumulated since the last report.
#[derive(Default)]
struct Report {
    last: Option<Instant>,
    since: u64,
}

impl Report {
    /// Adds `n`; when a report is due, `say` prints the accumulated count.
    fn add(&mut self, n: u64, say: impl FnOnce(u64)) {
        self.since += n;
        let now = Instant::now();
        if self
            .last
            .is_none_or(|last| now.duration_since(last) >= REPORT_EVERY)
        {
            say(self.since);
            self.last = Some(now);
            self.since = 0;
        }
    }
}

impl Sink {
    pub(super) fn new(name: &'static str, out: Box<dyn Write + Send>, metrics: &Metrics) -> Self {
        Self {
            name,
            out,
            errors: metrics.decision_log_errors(name),
            report: Report::default(),
        }
    }

    /// One `write_all` and one `flush` for the whole batch; a failure loses (and counts) every
    /// line of it: part of it may have been written, but not which part. A writer that panics
    /// fails the same way (the panic hook has printed it), and the flusher goes on with the
    /// other sinks and the next batches.
    fn write_batch(&mut self, batch: &[u8]) {
        let out = &mut self.out;
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            out.write_all(batch).and_then(|()| out.flush())
        }))
        .unwrap_or_else(|_| Err(io::Error::other("the writer panicked")));
        if let Err(err) = result {
            let lines = count_lines(batch);
            self.errors.inc_by(lines);
            self.report(lines, &err);
        }
    }

    fn report(&mut self, lines: u64, err: &io::Error) {
        let name = self.name;
        self.report.add(lines, |lost| {
            eprintln!(
                "error: decision log sink {name}: {lost} line(s) lost since the last report: {err}"
            );
        });
    }
}

#[expect(
    clippy::naive_bytecount,
    reason = "runs only for a failed batch; not worth a dependency"
)]
fn count_lines(batch: &[u8]) -> u64 {
    let lines = batch.iter().filter(|&&b| b == b'\n').count();
    u64::try_from(lines).unwrap_or(u64::MAX)
}

fn gauge_bytes(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The decision log's writer for the fmt layer: every event's line is appended to the pending
/// buffer, which the flusher thread writes to every sink. Clones share the buffer; when the
/// last one is dropped, the flusher writes what is pending and stops.
#[derive(Clone)]
pub(super) struct DecisionLog(Arc<Owner>);

/// Stops the flusher when the last [`DecisionLog`] goes.
struct Owner {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    /// A flush from the flusher thread itself (a sink that panics, then the panic hook) would
    /// wait for itself.
    flusher_id: ThreadId,
}

struct Shared {
    state: Mutex<State>,
    /// The flusher waits here: for a first line when idle, for the end of the interval or
    /// something urgent when gathering a batch.
    wake: Condvar,
    /// Appenders past the cap and `flush` callers wait here for a batch to be written.
    drained: Condvar,
    limits: Limits,
    /// Each sink's error counter, for lines the flusher will not write: it stopped (a bug).
    lost: Box<[Counter]>,
    /// Appends that waited for room.
    waits: Counter,
    /// Bytes pending and in flight, as of the last batch (and of the last wait).
    buffered: Gauge,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// Bytes the flusher has taken and not written yet (they count against the cap).
    in_flight: usize,
    /// Batches taken and written so far: a flush waits for the batch that holds its lines.
    taken: u64,
    written: u64,
    /// The flusher waits on `wake` (only then is a notification worth a syscall).
    flusher_waiting: bool,
    /// Threads waiting in `flush`, and appenders waiting for room: the flusher takes what is
    /// pending at once while there are any, and wakes them after each batch.
    flushing: usize,
    blocked: usize,
    /// Appends that waited for room since the flusher last reported it.
    waited: u64,
    /// The last handle is gone: write what is pending and stop.
    shutdown: bool,
    /// The flusher has stopped (shut down, or a bug made it panic): nobody waits for it any
    /// more, and lines appended after are counted as lost.
    stopped: bool,
    /// How often the flusher woke up, to show that it sleeps when idle.
    #[cfg(test)]
    wakeups: u64,
}

impl State {
    fn buffered(&self) -> usize {
        self.pending.len() + self.in_flight
    }

    /// Write what is pending now rather than at the end of the interval.
    fn urgent(&self, limits: &Limits) -> bool {
        self.pending.len() >= limits.high_water
            || self.flushing > 0
            || self.blocked > 0
            || self.shutdown
    }
}

impl DecisionLog {
    /// Starts the flusher thread for `sinks`.
    pub(super) fn start(sinks: Vec<Sink>, limits: Limits, metrics: &Metrics) -> io::Result<Self> {
        let (waits, buffered) = metrics.decision_log_backpressure();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            drained: Condvar::new(),
            limits,
            lost: sinks.iter().map(|s| s.errors.clone()).collect(),
            waits,
            buffered,
        });
        let flusher = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(FLUSHER_NAME.to_owned())
                .spawn(move || shared.run_flusher(sinks))?
        };
        Ok(Self(Arc::new(Owner {
            shared,
            flusher_id: flusher.thread().id(),
            flusher: Some(flusher),
        })))
    }

    /// Appends one whole line (the fmt layer and `RequestLine::emit` hand over a complete line
    /// each). Waits while the buffer is past the cap.
    pub(super) fn append(&self, line: &[u8]) {
        let shared = &*self.0.shared;
        let limits = &shared.limits;
        let mut state = shared.lock();
        while state.buffered() >= limits.cap && !state.stopped {
            shared.waits.inc();
            shared.buffered.set(gauge_bytes(state.buffered()));
            state.waited += 1;
            state.blocked += 1;
            if state.flusher_waiting {
                shared.wake.notify_one();
            }
            state = shared
                .drained
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.blocked -= 1;
        }
        if state.stopped {
            drop(state);
            for counter in &shared.lost {
                counter.inc();
            }
            return;
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(line);
        // One wake-up per batch (the first line) and one on crossing the high-water mark.
        let wake = state.flusher_waiting
            && (before == 0
                || (before < limits.high_water && state.pending.len() >= limits.high_water));
        drop(state);
        if wake {
            shared.wake.notify_one();
        }
    }

    /// Waits until every line appended before the call is written to the sinks and they are
    /// flushed, or until `timeout`. Returns at once when nothing is pending. `false` when the
    /// lines may not all be written (timeout, the flusher stopped, called on the flusher).
    pub(super) fn flush(&self, timeout: Option<Duration>) -> bool {
        let owner = &*self.0;
        if thread::current().id() == owner.flusher_id {
            return false;
        }
        let shared = &*owner.shared;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = shared.lock();
        let target = state.taken + u64::from(!state.pending.is_empty());
        if state.written >= target {
            return true;
        }
        state.flushing += 1;
        if state.flusher_waiting {
            shared.wake.notify_one();
        }
        while state.written < target && !state.stopped {
            state = match deadline {
                None => shared
                    .drained
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    let (state, _) = shared
                        .drained
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner);
                    state
                }
            };
        }
        state.flushing -= 1;
        state.written >= target
    }

    /// What has not been written yet: whole lines waiting for the flusher, and the bytes of
    /// the batch it is writing.
    pub(super) fn unwritten(&self) -> (u64, usize) {
        let state = self.0.shared.lock();
        (count_lines(&state.pending), state.in_flight)
    }

    /// [`Self::flush`] before the process exits, bounded by `timeout` (a stdout pipe nobody
    /// reads would hold the exit for ever); what is left is said on `report` (stderr), never
    /// dropped silently. `false` when lines were left.
    pub(super) fn flush_for_exit(&self, timeout: Duration, report: &mut dyn Write) -> bool {
        if self.flush(Some(timeout)) {
            return true;
        }
        if thread::current().id() == self.0.flusher_id {
            // The flusher itself (panicking): its `Stopped` guard counts what it leaves.
            return false;
        }
        let (lines, in_flight) = self.unwritten();
        let _ = writeln!(
            report,
            "gateway: decision log: not everything was written within {timeout:?} at exit: \
             {lines} line(s) not yet taken and {in_flight} byte(s) being written are lost (a \
             sink does not accept writes)"
        );
        false
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(flusher) = self.flusher.take() {
            // A sink's panic was printed by the panic hook already.
            let _ = flusher.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The flusher thread: sleeps until a line arrives, gathers lines for one interval (less
    /// when urgent), writes them as one batch to every sink, and again.
    fn run_flusher(&self, mut sinks: Vec<Sink>) {
        /// Marks the flusher stopped however it ends (also by a panic, a bug), so that no
        /// appender or flush waits for it for ever, and counts what it leaves unwritten.
        struct Stopped<'a>(&'a Shared);
        impl Drop for Stopped<'_> {
            fn drop(&mut self) {
                let mut state = self.0.lock();
                state.stopped = true;
                state.in_flight = 0;
                let lost = count_lines(&mem::take(&mut state.pending));
                self.0.drained.notify_all();
                drop(state);
                if lost > 0 {
                    for counter in &self.0.lost {
                        counter.inc_by(lost);
                    }
                    eprintln!("error: the decision log's flusher stopped: {lost} line(s) lost");
                }
            }
        }
        let _stopped = Stopped(self);
        let limits = &self.limits;
        let mut batch = Vec::new();
        let mut waits = Report::default();
        let mut state = self.lock();
        loop {
            while state.pending.is_empty() {
                if state.shutdown {
                    return;
                }
                state = self.wait_flusher(state, None);
            }
            let deadline = Instant::now() + limits.interval;
            while !state.urgent(limits) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = self.wait_flusher(state, Some(left));
            }
            // The pending buffer becomes the batch and the last batch's (empty) buffer takes
            // its place: both keep their capacity.
            mem::swap(&mut state.pending, &mut batch);
            state.in_flight = batch.len();
            state.taken += 1;
            self.buffered.set(gauge_bytes(state.buffered()));
            drop(state);
            let started = Instant::now();
            for sink in &mut sinks {
                sink.write_batch(&batch);
            }
            let took = started.elapsed();
            batch.clear();
            batch.shrink_to(KEEP_CAPACITY);
            state = self.lock();
            state.in_flight = 0;
            state.written += 1;
            self.buffered.set(gauge_bytes(state.buffered()));
            if state.waited > 0 {
                // Writers waited for room: a slow or blocked sink.
                waits.add(mem::take(&mut state.waited), |waited| {
                    eprintln!(
                        "warning: decision log: {waited} line(s) waited since the last report: \
                         {} KiB were not yet written to its sinks (the last batch took {} ms); is \
                         stdout or the file blocked?",
                        limits.cap >> 10,
                        took.as_millis()
                    );
                });
            }
            if state.blocked > 0 || state.flushing > 0 {
                self.drained.notify_all();
            }
        }
    }

    fn wait_flusher<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        state.flusher_waiting = true;
        let mut state = match timeout {
            None => self
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
            Some(timeout) => {
                self.wake
                    .wait_timeout(state, timeout)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
        state.flusher_waiting = false;
        #[cfg(test)]
        {
            state.wakeups += 1;
        }
        state
    }
}

impl Write for DecisionLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Write errors are the flusher's to count and report; the fmt layer would only print
        // a second, less useful message.
        self.append(buf);
        Ok(buf.len())
    }

    /// Nothing: a flush per line is what the flusher is there to avoid ([`DecisionLog::flush`]
    /// is the real one).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl MakeWriter<'_> for DecisionLog {
    type Writer = Self;

    fn make_writer(&self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    };

    use super::*;

    /// Everything written, and how many `write` calls it took.
    #[derive(Clone, Default)]
    struct Recorder {
        out: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicUsize>,
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.out.lock().unwrap().clone()).unwrap()
        }

        fn writes(&self) -> usize {
            self.writes.load(Ordering::SeqCst)
        }
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.out.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A writer bug: the flusher counts it as a failed write and goes on.
    struct Panicky;

    impl Write for Panicky {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            panic!("a writer bug");
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stuck sink: every write waits for a message, or for the sender to be dropped.
    struct Gate {
        open: mpsc::Receiver<()>,
        out: Recorder,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.open.recv();
            self.out.write(buf)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Nothing is written before a flush or the high-water mark.
    const SLOW: Limits = Limits {
        interval: Duration::from_secs(10),
        high_water: 1 << 20,
        cap: 8 << 20,
    };

    fn start(
        metrics: &Metrics,
        outs: Vec<(&'static str, Box<dyn Write + Send>)>,
        limits: Limits,
    ) -> DecisionLog {
        let sinks = outs
            .into_iter()
            .map(|(name, out)| Sink::new(name, out, metrics))
            .collect();
        DecisionLog::start(sinks, limits, metrics).unwrap()
    }

    fn recorded(limits: Limits) -> (DecisionLog, Recorder) {
        let out = Recorder::default();
        let log = start(
            &Metrics::new(None),
            vec![("stdout", Box::new(out.clone()))],
            limits,
        );
        (log, out)
    }

    fn wakeups(log: &DecisionLog) -> u64 {
        log.0.shared.lock().wakeups
    }

    /// Polls `f` for up to a second.
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            thread::sleep(Duration::from_millis(1));
        }
        f()
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_order() {
        // Small limits: many batches, early writes and appenders waiting for room.
        let limits = Limits {
            interval: Duration::from_millis(1),
            high_water: 4 << 10,
            cap: 16 << 10,
        };
        let (log, out) = recorded(limits);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let mut log = log.clone();
                thread::spawn(move || {
                    for i in 0..1000 {
                        let line = format!(
                            "{{\"t\":{t},\"i\":{i},\"pad\":\"{}\"}}\n",
                            "x".repeat(i % 97)
                        );
                        log.write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(log.flush(None));
        let mut next = [0_u64; 8];
        for line in out.text().lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let t = usize::try_from(v["t"].as_u64().unwrap()).unwrap();
            assert_eq!(v["i"].as_u64().unwrap(), next[t], "thread {t} out of order");
            next[t] += 1;
        }
        assert_eq!(next, [1000; 8]);
    }

    #[test]
    fn nothing_is_written_before_the_interval_and_everything_after_flush() {
        let (mut log, out) = recorded(SLOW);
        for line in ["{\"a\":1}\n", "{\"b\":2}\n", "{\"c\":3}\n"] {
            log.write_all(line.as_bytes()).unwrap();
        }
        thread::sleep(Duration::from_millis(50));
        assert_eq!(out.writes(), 0);
        assert!(log.flush(None));
        assert_eq!(out.text(), "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
        assert_eq!(out.writes(), 1, "one write per batch");
    }

    #[test]
    fn a_line_is_written_within_the_interval() {
        let (mut log, out) = recorded(Limits::DAEMON);
        let started = Instant::now();
        log.write_all(b"{\"a\":1}\n").unwrap();
        assert!(eventually(|| out.writes() > 0));
        assert!(started.elapsed() >= Limits::DAEMON.interval);
        assert_eq!(out.text(), "{\"a\":1}\n");
    }

    #[test]
    fn the_high_water_mark_writes_early() {
        let limits = Limits {
            high_water: 1024,
            ..SLOW
        };
        let (mut log, out) = recorded(limits);
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(53));
        assert_eq!(line.len(), 64);
        for _ in 0..20 {
            log.write_all(line.as_bytes()).unwrap();
        }
        // Long before the 10 s interval.
        assert!(eventually(|| out.text().len() >= 1024));
        let text = out.text();
        assert!(
            line.repeat(20).starts_with(&text) && text.ends_with('\n'),
            "{text}"
        );
    }

    /// A 32-byte line.
    fn numbered(i: usize) -> String {
        format!("{{\"i\":{i:>25}}}\n")
    }

    #[test]
    fn appenders_past_the_cap_wait_and_lose_nothing() {
        let limits = Limits {
            interval: Duration::from_millis(1),
            high_water: 64,
            cap: 256,
        };
        let (open, gate) = mpsc::channel();
        let out = Recorder::default();
        let metrics = Metrics::new(None);
        let log = start(
            &metrics,
            vec![(
                "file",
                Box::new(Gate {
                    open: gate,
                    out: out.clone(),
                }),
            )],
            limits,
        );
        // Dropped before `log` (whose drop waits for the flusher) if an assertion fails.
        let open = open;
        let progress = Arc::new(AtomicUsize::new(0));
        let appender = {
            let (mut log, progress) = (log.clone(), progress.clone());
            thread::spawn(move || {
                for i in 0..100 {
                    log.write_all(numbered(i).as_bytes()).unwrap();
                    progress.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        thread::sleep(Duration::from_millis(100));
        assert!(!appender.is_finished());
        assert_eq!(numbered(99).len(), 32);
        // pending and in-flight bytes stop at the cap plus one line.
        let waiting = progress.load(Ordering::SeqCst);
        assert!(waiting * 32 < limits.cap + 32, "{waiting} lines appended");
        assert_eq!(out.writes(), 0);
        // The wait is visible while it lasts: counted, and the bytes behind at the cap.
        let (waits, buffered) = metrics.decision_log_backpressure();
        assert!(waits.get() >= 1);
        assert!(
            usize::try_from(buffered.get()).unwrap() >= limits.cap,
            "{}",
            buffered.get()
        );
        let text = metrics.encode().unwrap();
        let exported: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("nodegate_decision_log_waits_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        assert!(exported >= 1, "{text}");
        drop(open);
        appender.join().unwrap();
        assert!(log.flush(None));
        assert_eq!(out.text(), (0..100).map(numbered).collect::<String>());
        assert_eq!(metrics.decision_log_errors("file").get(), 0);
        assert_eq!(buffered.get(), 0, "nothing behind once written");
        assert!(
            metrics
                .encode()
                .unwrap()
                .contains("nodegate_decision_log_buffered_bytes 0"),
        );
    }

    #[test]
    fn a_failing_sink_counts_each_line_of_the_batch_and_the_other_gets_them() {
        let failing: [fn() -> Box<dyn Write + Send>; 2] =
            [|| Box::new(Broken), || Box::new(Panicky)];
        for failing in failing {
            let metrics = Metrics::new(None);
            let out = Recorder::default();
            // The failing sink first: the one after it still gets every batch.
            let mut log = start(
                &metrics,
                vec![("file", failing()), ("stdout", Box::new(out.clone()))],
                SLOW,
            );
            log.write_all(b"{\"a\":1}\n{\"b\":2}\n").unwrap();
            log.write_all(b"{\"c\":3}\n").unwrap();
            assert!(log.flush(None));
            assert_eq!(metrics.decision_log_errors("file").get(), 3);
            log.write_all(b"{\"d\":4}\n").unwrap();
            assert!(log.flush(None));
            assert_eq!(out.text(), "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n{\"d\":4}\n");
            assert_eq!(metrics.decision_log_errors("stdout").get(), 0);
            let text = metrics.encode().unwrap();
            assert!(
                text.contains("nodegate_decision_log_errors_total{sink=\"file\"} 4"),
                "{text}"
            );
        }
    }

    #[test]
    fn flush_with_nothing_pending_returns_at_once() {
        // Without a daemon log (`init_daemon` never ran in the unit tests).
        super::super::flush_decision_log();
        let (mut log, out) = recorded(SLOW);
        let started = Instant::now();
        assert!(log.flush(None));
        log.write_all(b"{\"a\":1}\n").unwrap();
        assert!(log.flush(None));
        assert!(log.flush(None));
        assert!(log.flush(Some(Duration::ZERO)));
        // The 10 s interval was never waited for; the second flush found nothing to write.
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_eq!(out.writes(), 1);
    }

    #[test]
    fn the_flusher_sleeps_when_idle() {
        let (mut log, out) = recorded(Limits::DAEMON);
        thread::sleep(Duration::from_millis(100));
        assert_eq!((out.writes(), wakeups(&log)), (0, 0));
        log.write_all(b"{\"a\":1}\n").unwrap();
        assert!(log.flush(None));
        let (writes, woken) = (out.writes(), wakeups(&log));
        thread::sleep(Duration::from_millis(100));
        assert_eq!((out.writes(), wakeups(&log)), (writes, woken));
    }

    #[test]
    fn the_exit_flush_gives_up_on_a_stuck_sink_and_says_what_is_lost() {
        let (open, gate) = mpsc::channel();
        let out = Recorder::default();
        let mut log = start(
            &Metrics::new(None),
            vec![(
                "stdout",
                Box::new(Gate {
                    open: gate,
                    out: out.clone(),
                }),
            )],
            SLOW,
        );
        // Dropped before `log` (whose drop waits for the flusher) if an assertion fails.
        let open = open;
        log.write_all(b"{\"a\":1}\n").unwrap();
        // The first batch is taken and its write waits at the gate; two more lines wait.
        assert!(!log.flush(Some(Duration::from_millis(50))));
        log.write_all(b"{\"b\":2}\n{\"c\":3}\n").unwrap();
        let mut report = Vec::new();
        let started = Instant::now();
        assert!(!log.flush_for_exit(Duration::from_millis(100), &mut report));
        assert!(started.elapsed() < Duration::from_secs(5));
        let report = String::from_utf8(report).unwrap();
        assert!(
            report.contains("2 line(s) not yet taken and 8 byte(s) being written are lost"),
            "{report}"
        );
        // Once the sink moves again, everything arrives and the exit flush says nothing.
        drop(open);
        let mut report = Vec::new();
        assert!(log.flush_for_exit(Duration::from_secs(5), &mut report));
        assert_eq!(String::from_utf8(report).unwrap(), "");
        assert_eq!(out.text(), "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
    }

    #[test]
    fn dropping_the_log_writes_what_is_pending() {
        let (mut log, out) = recorded(SLOW);
        log.write_all(b"{\"a\":1}\n").unwrap();
        drop(log);
        assert_eq!(out.text(), "{\"a\":1}\n");
    }
}
