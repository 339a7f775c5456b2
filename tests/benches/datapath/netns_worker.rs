//! A thread that lives in another network namespace and runs jobs there.
//!
//! `setns(CLONE_NEWNET)` moves only the calling thread, and a socket keeps the namespace it
//! was created in; so the measured loops run on a worker that entered the pod's namespace once,
//! instead of paying a thread and a `setns` per connection.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    sync::mpsc,
    thread::{self, JoinHandle},
};

type Job = Box<dyn FnOnce() + Send>;

pub struct NetnsWorker {
    netns: String,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl NetnsWorker {
    /// Starts a thread in `/run/netns/<netns>`.
    pub fn new(netns: &str) -> io::Result<Self> {
        let file = File::open(format!("/run/netns/{netns}"))?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("netns-{netns}"))
            .spawn(move || {
                // SAFETY: plain syscall on a valid fd; it affects this thread only.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                let result = if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = result.is_ok();
                let _ = entered_tx.send(result);
                if ok {
                    for job in queue {
                        job();
                    }
                }
            })?;
        entered
            .recv()
            .map_err(|_| io::Error::other("netns worker exited before entering the namespace"))??;
        Ok(Self {
            netns: netns.to_owned(),
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Runs `job` on the worker and returns its result. A panic in the job is re-raised here.
    pub fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> T {
        let (done_tx, done) = mpsc::sync_channel(1);
        let sent = self.jobs.as_ref().is_some_and(|jobs| {
            jobs.send(Box::new(move || {
                let _ = done_tx.send(job());
            }))
            .is_ok()
        });
        assert!(sent, "the worker in netns {} is gone", self.netns);
        done.recv()
            .unwrap_or_else(|_| panic!("a job on the worker in netns {} panicked", self.netns))
    }
}

impl Drop for NetnsWorker {
    fn drop(&mut self) {
        // Closing the queue ends the worker's loop.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
