//! The proxy's runtime, sized to the CPUs the gateway may run on (or to `proxy.threads`).
//!
//! With one CPU (a pod limited to one core, or `taskset`), tokio's work-stealing scheduler
//! only adds cost: every wake-up and spawn goes through its atomics and idle bookkeeping, with
//! no second worker to ever steal. There the proxy runs on a current-thread runtime, driven by a
//! thread of its own, as linkerd2-proxy does with one core. With more, the multi-thread
//! runtime, one worker per CPU.

use std::{io, num::NonZeroUsize, thread, time::Duration};

use tokio::{
    runtime::{Builder, Handle, Runtime},
    sync::oneshot,
};

/// The thread name of the proxy's workers.
const THREAD_NAME: &str = "ng-proxy";
/// The single-threaded runtime's blocking pool (file reads of certificate reloads): named apart
/// so that `ng-proxy` is the one thread that serves connections.
const BLOCKING_NAME: &str = "ng-proxy-block";

/// How the proxy's runtime runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flavor {
    /// A current-thread runtime on a thread of its own.
    OneThread,
    /// The multi-thread runtime with this many workers.
    Workers(usize),
}

impl Flavor {
    /// One worker per CPU this process may run on (its affinity and cgroup quota, as
    /// `std::thread::available_parallelism` reads them); one CPU gets [`Flavor::OneThread`].
    pub(super) fn for_cpus(cpus: usize) -> Self {
        if cpus <= 1 {
            Self::OneThread
        } else {
            Self::Workers(cpus)
        }
    }

    /// `proxy.threads` when set, else one worker per CPU available.
    pub(super) fn configured(threads: Option<NonZeroUsize>) -> Self {
        let cpus = threads.or_else(|| thread::available_parallelism().ok());
        Self::for_cpus(cpus.map_or(1, usize::from))
    }
}

/// The proxy's runtime: spawn onto it through [`Dataplane::handle`], stop it with
/// [`Dataplane::shutdown`].
pub(super) struct Dataplane {
    handle: Handle,
    inner: Inner,
}

enum Inner {
    Workers(Runtime),
    OneThread {
        /// Ends the driving thread's `block_on`.
        stop: oneshot::Sender<Duration>,
        thread: thread::JoinHandle<()>,
    },
}

impl Dataplane {
    pub(super) fn start(flavor: Flavor) -> io::Result<Self> {
        match flavor {
            Flavor::Workers(workers) => {
                let runtime = Builder::new_multi_thread()
                    .worker_threads(workers)
                    .thread_name(THREAD_NAME)
                    .enable_all()
                    .build()?;
                Ok(Self {
                    handle: runtime.handle().clone(),
                    inner: Inner::Workers(runtime),
                })
            }
            Flavor::OneThread => {
                let runtime = Builder::new_current_thread()
                    .thread_name(BLOCKING_NAME)
                    .enable_all()
                    .build()?;
                let handle = runtime.handle().clone();
                let (stop, stopped) = oneshot::channel::<Duration>();
                let thread =
                    thread::Builder::new()
                        .name(THREAD_NAME.to_owned())
                        .spawn(move || {
                            // A dropped sender (the owner gone without `shutdown`) stops it as well.
                            let timeout =
                                runtime.block_on(stopped).unwrap_or(Duration::from_secs(1));
                            runtime.shutdown_timeout(timeout);
                        })?;
                Ok(Self {
                    handle,
                    inner: Inner::OneThread { stop, thread },
                })
            }
        }
    }

    /// Where the proxy's tasks are spawned.
    pub(super) const fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stops the runtime: tasks still running are dropped, blocking tasks get `timeout`.
    pub(super) fn shutdown(self, timeout: Duration) {
        match self.inner {
            Inner::Workers(runtime) => runtime.shutdown_timeout(timeout),
            Inner::OneThread { stop, thread } => {
                let _ = stop.send(timeout);
                if thread.join().is_err() {
                    tracing::warn!("the proxy's runtime thread panicked");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cpu_runs_on_one_thread() {
        assert_eq!(Flavor::for_cpus(0), Flavor::OneThread);
        assert_eq!(Flavor::for_cpus(1), Flavor::OneThread);
        assert_eq!(Flavor::for_cpus(2), Flavor::Workers(2));
        assert_eq!(Flavor::for_cpus(16), Flavor::Workers(16));
    }

    /// Both flavors run what is spawned from outside (tasks spawning tasks included), on the
    /// proxy's threads, and stop when asked.
    #[test]
    fn runs_spawned_tasks_and_stops() {
        for flavor in [Flavor::OneThread, Flavor::Workers(2)] {
            let dataplane = Dataplane::start(flavor).expect("runtime");
            let task = dataplane.handle().spawn(async {
                let inner = tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    thread::current().name().map(str::to_owned)
                });
                inner.await.expect("inner task")
            });
            let name = futures::executor::block_on(task).expect("task");
            assert_eq!(name.as_deref(), Some(THREAD_NAME), "{flavor:?}");
            // A task that never ends does not hold up the stop.
            let forever = dataplane.handle().spawn(std::future::pending::<()>());
            dataplane.shutdown(Duration::from_millis(100));
            let err = futures::executor::block_on(forever).expect_err("cancelled");
            assert!(err.is_cancelled(), "{flavor:?}: {err}");
        }
    }
}
