//! Logs and metrics. Human logs go to stderr (`RUST_LOG`, default `info`); the decision log
//! is its own tracing target, [`DECISION_TARGET`], written as flattened JSON lines to stdout
//! and optionally appended to a file (created again when rotation moves it away). A failing
//! sink is counted and reported on stderr.
//!
//! The decision log is written off the request path (see `sink`): a line is appended to a
//! buffer that a flusher thread writes to the sinks within ~10 ms, in batches. A SIGKILL can
//! lose at most that window; a graceful exit loses nothing, as `gateway run` calls
//! [`flush_decision_log`] before it returns (and the panic hook does, briefly).

pub mod bypass;
pub mod decision;
pub mod format;
mod json;
mod logfile;
pub mod metrics;
mod sink;

use std::{
    io::{self, IsTerminal as _},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use tracing::Subscriber;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt as _, filter_fn},
    fmt::MakeWriter,
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

pub use self::{
    decision::{ConnectionLine, Decision, Reason, RequestLine},
    metrics::Metrics,
};

/// The tracing target of decision lines (ztunnel's `access`).
pub const DECISION_TARGET: &str = "decision";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot create the directory {} for the decision log", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot open the decision log file {} for appending", path.display())]
    OpenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the decision log's flusher thread")]
    Flusher(#[source] io::Error),
    #[error("a tracing subscriber is already installed")]
    AlreadyInitialised(#[source] tracing_subscriber::util::TryInitError),
}

/// The daemon's decision log, for [`flush_decision_log`].
static DECISION_LOG: OnceLock<sink::DecisionLog> = OnceLock::new();

/// The daemon's decision log, where request lines go directly (`RequestLine::emit`).
fn decision_log() -> Option<&'static sink::DecisionLog> {
    DECISION_LOG.get()
}

/// How long the panic hook waits for the decision log: a panicking thread should not hang on
/// a stuck sink.
const PANIC_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Human logs only, for the short-lived CLI commands.
pub fn init_cli(default_directive: &str) -> Result<(), TelemetryError> {
    tracing_subscriber::registry()
        .with(human_layer(default_directive))
        .try_init()
        .map_err(TelemetryError::AlreadyInitialised)
}

/// Human logs plus the decision log on stdout and, when set, `decisions_file`.
pub fn init_daemon(decisions_file: Option<&Path>, metrics: &Metrics) -> Result<(), TelemetryError> {
    init_daemon_sinks(true, decisions_file, metrics)
}

/// [`init_daemon`], with the stdout sink optional (`benches/request_path.rs` logs to a file
/// only, as stdout is criterion's).
pub fn init_daemon_sinks(
    stdout: bool,
    decisions_file: Option<&Path>,
    metrics: &Metrics,
) -> Result<(), TelemetryError> {
    let mut sinks = Vec::new();
    if stdout {
        sinks.push(sink::Sink::new("stdout", Box::new(io::stdout()), metrics));
    }
    if let Some(path) = decisions_file {
        let file = logfile::LogFile::open(path, logfile::CHECK_EVERY)?;
        sinks.push(sink::Sink::new("file", Box::new(file), metrics));
    }
    let log = sink::DecisionLog::start(sinks, sink::Limits::DAEMON, metrics)
        .map_err(TelemetryError::Flusher)?;
    // One layer for every sink: each line is formatted once, and the same bytes go to each.
    tracing_subscriber::registry()
        .with(human_layer("info"))
        .with(decision_layer(log.clone()))
        .try_init()
        .map_err(TelemetryError::AlreadyInitialised)?;
    if DECISION_LOG.set(log).is_ok() {
        // A panic that ends the process must not take the pending lines with it. Bounded: a
        // stuck sink must not hang the panicking thread. (Nothing panics while holding the
        // log's mutex, so the flush cannot wait for the panicking thread itself.)
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            if let Some(log) = DECISION_LOG.get() {
                log.flush_for_exit(PANIC_FLUSH_TIMEOUT, &mut io::stderr());
            }
        }));
    }
    Ok(())
}

/// How long the exit flush waits for the sinks to take the pending lines.
pub const EXIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes every decision line logged so far to the sinks and flushes them; returns when they
/// are written (at once when nothing is pending, or when [`init_daemon`] never ran), or after
/// [`EXIT_FLUSH_TIMEOUT`] with a line on stderr saying what is lost (a stdout pipe nobody
/// reads must not hold the exit for ever). Lines logged meanwhile by other threads may or may
/// not be included. Call it before the process exits: the flusher thread would not get to
/// them.
pub fn flush_decision_log() {
    if let Some(log) = DECISION_LOG.get() {
        log.flush_for_exit(EXIT_FLUSH_TIMEOUT, &mut io::stderr());
    }
}

/// Calls [`flush_decision_log`] when dropped: `gateway run` holds one, so that every way out
/// of it (a drain after SIGTERM/SIGINT, an error) writes what is pending.
#[must_use = "it flushes when dropped"]
pub struct FlushDecisionLogOnDrop;

impl Drop for FlushDecisionLogOnDrop {
    fn drop(&mut self) {
        flush_decision_log();
    }
}

fn open_append(path: &Path) -> Result<std::fs::File, TelemetryError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| TelemetryError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| TelemetryError::OpenFile {
            path: path.to_path_buf(),
            source,
        })
}

/// stderr, filtered by `RUST_LOG` (or `default_directive`), never decision lines.
fn human_layer<S>(default_directive: &str) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let env =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_directive));
    tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_filter(env.and(filter_fn(|meta| meta.target() != DECISION_TARGET)))
}

/// One flat JSON object per decision event ([`format::DecisionFormat`]); nothing else. Not
/// subject to `RUST_LOG`: the decision log cannot be switched off by a debug setting.
pub fn decision_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .event_format(format::DecisionFormat)
        .with_writer(writer)
        .log_internal_errors(false)
        .with_filter(filter_fn(|meta| {
            meta.target() == DECISION_TARGET && meta.is_event()
        }))
}
