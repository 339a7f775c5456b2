//! Starting, watching and killing the processes of a simulated node.

use std::{
    fs::{self, File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::{Error, Result, Tools, io_err, status_text};

/// Poll period of every wait loop in the harness.
pub(crate) const POLL: Duration = Duration::from_millis(20);

/// State shared by a node and everything started in it: tools, the temp dir and the record of
/// every process started, which the node's drop kills.
pub(crate) struct Runtime {
    pub tools: Tools,
    pub dir: PathBuf,
    procs: Mutex<Vec<Arc<ProcInner>>>,
    seq: AtomicU32,
}

impl Runtime {
    pub fn new(tools: Tools, dir: PathBuf) -> Self {
        Self {
            tools,
            dir,
            procs: Mutex::new(Vec::new()),
            seq: AtomicU32::new(0),
        }
    }

    /// Kills and reaps every process this node started that is still running.
    pub fn kill_all(&self) {
        let procs = std::mem::take(&mut *lock(&self.procs));
        for proc in procs {
            proc.kill();
        }
    }

    /// Starts `cmd` in `netns` (a name under /run/netns) and cgroup `cgroup`, stdout and stderr
    /// to files `<dir>/<label>.<seq>.{stdout,stderr}`.
    pub fn spawn(
        &self,
        label: &str,
        netns: Option<&str>,
        cgroup: &Path,
        mut cmd: Command,
    ) -> Result<Proc> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let stdout = self.dir.join(format!("{label}.{seq}.stdout"));
        let stderr = self.dir.join(format!("{label}.{seq}.stderr"));
        let out = File::create(&stdout).map_err(io_err(format!("create {}", stdout.display())))?;
        let err = File::create(&stderr).map_err(io_err(format!("create {}", stderr.display())))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);

        // Opened before the fork (with O_CLOEXEC, so the program never inherits them); the
        // child only makes async-signal-safe syscalls on them.
        let netns_file = netns
            .map(|name| {
                let path = format!("/run/netns/{name}");
                File::open(&path).map_err(io_err(format!("open {path}")))
            })
            .transpose()?;
        let procs_path = cgroup.join("cgroup.procs");
        let procs_file = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .map_err(io_err(format!("open {}", procs_path.display())))?;
        let netns_fd = netns_file.as_ref().map(AsRawFd::as_raw_fd);
        let procs_fd = procs_file.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only calls setns(2), write(2) and
        // prctl(2) (async-signal-safe) on fds that stay open until `spawn` returns; building an
        // `io::Error` from errno does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                // Die with the thread that started us, so a killed test run leaves no
                // processes behind (they would keep cgroups busy and links pinned).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd.spawn().map_err(io_err(format!(
            "start {program} ({label}) in netns {} cgroup {}",
            netns.unwrap_or("<current>"),
            cgroup.display()
        )))?;
        drop((netns_file, procs_file));
        let inner = Arc::new(ProcInner {
            label: label.to_owned(),
            pid: child.id(),
            child: Mutex::new(Some(child)),
            status: Mutex::new(None),
            stdout,
            stderr,
        });
        lock(&self.procs).push(Arc::clone(&inner));
        Ok(Proc { inner })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct ProcInner {
    label: String,
    pid: u32,
    /// `Some` until reaped: a PID is only ever signalled while its child is unreaped, so a
    /// recycled PID is never hit.
    child: Mutex<Option<std::process::Child>>,
    status: Mutex<Option<ExitStatus>>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ProcInner {
    fn try_wait(&self) -> Option<ExitStatus> {
        let mut child = lock(&self.child);
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            *child = None;
            *lock(&self.status) = Some(status);
        }
        *lock(&self.status)
    }

    fn signal(&self, sig: libc::c_int) -> bool {
        let child = lock(&self.child);
        if child.is_none() {
            return false;
        }
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        // SAFETY: plain syscall; the PID is our unreaped child (the lock is held).
        unsafe { libc::kill(pid, sig) == 0 }
    }

    fn kill(&self) -> Option<ExitStatus> {
        let mut child = lock(&self.child);
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            if let Ok(status) = c.wait() {
                *lock(&self.status) = Some(status);
            }
        }
        drop(child);
        *lock(&self.status)
    }
}

/// A process started by the harness. Dropping it kills it (SIGKILL) and reaps it; the node's
/// drop does the same for every process still running.
pub struct Proc {
    inner: Arc<ProcInner>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    pub fn label(&self) -> &str {
        &self.inner.label
    }

    pub fn stdout_path(&self) -> &Path {
        &self.inner.stdout
    }

    pub fn stderr_path(&self) -> &Path {
        &self.inner.stderr
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.inner.stdout).unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.inner.stderr).unwrap_or_default()
    }

    /// The exit status if it has exited (reaps it).
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.inner.try_wait()
    }

    pub fn is_running(&self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// Sends `sig` if the process has not been reaped yet; true if it was delivered.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        self.inner.signal(sig)
    }

    /// SIGKILL and reap.
    pub fn kill(&self) -> Option<ExitStatus> {
        self.inner.kill()
    }

    /// Waits until stdout contains `needle`; fails early if the process exits.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait() {
                return Err(Error::Command {
                    command: self.inner.label.clone(),
                    status: status.to_string(),
                    stderr: format!(
                        "exited before printing `{needle}`; stderr: {}",
                        self.stderr()
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "{} to print `{needle}` (stderr: {})",
                        self.inner.label,
                        self.stderr()
                    ),
                    seconds: timeout.as_secs_f64(),
                });
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.inner.kill();
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.inner.label)
            .field("pid", &self.inner.pid)
            .finish()
    }
}

/// Result of a command run to completion (or killed at its deadline).
#[derive(Debug, Clone)]
pub struct Output {
    pub command: String,
    /// `None` if it was killed at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }

    /// `Ok(self)` if it exited 0, else a [`Error::Command`] with its stderr.
    pub fn ok(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            Err(Error::Command {
                command: self.command,
                status: status_text(self.status),
                stderr: format!("{}{}", self.stderr, self.stdout),
            })
        }
    }

    /// stdout parsed as one JSON document.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(self.stdout.trim()).map_err(|e| Error::Parse {
            what: self.command.clone(),
            detail: format!("{e}; stdout: {}; stderr: {}", self.stdout, self.stderr),
        })
    }
}

/// Waits for `proc` until `timeout`, kills it at the deadline, and collects its output.
pub(crate) fn finish(proc: &Proc, command: String, timeout: Duration) -> Output {
    let status = proc.wait_timeout(timeout);
    if status.is_none() {
        proc.kill();
    }
    Output {
        command,
        status,
        stdout: proc.stdout(),
        stderr: proc.stderr(),
    }
}

/// Runs `cmd` in the test's own namespaces with a deadline (for `ip`, `bpftool`, the gateway
/// CLI). Output is captured through pipes; the child is killed at the deadline.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let command = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io_err(format!("start `{command}`")))?;
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("stdout and stderr were set to piped");
    };
    // Readers on their own threads so a chatty child cannot block on a full pipe.
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok(Output {
        command,
        status,
        stdout,
        stderr,
    })
}

/// `prog arg arg` for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// What `ngpeer connect` reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReply {
    /// Connected, sent, and read the reply to EOF without error.
    pub ok: bool,
    pub connected: bool,
    pub error: Option<String>,
    /// `refused`, `timeout`, `reset`, `unreachable`, `aborted`, `other`.
    pub kind: Option<String>,
    pub errno: Option<i32>,
    /// The client's own address, as the server (or the proxy) sees it.
    pub local: Option<std::net::SocketAddr>,
    pub reply: String,
    /// The raw JSON line.
    pub raw: String,
}

impl PeerReply {
    pub(crate) fn parse(out: &Output) -> Result<Self> {
        let line = out.stdout.lines().last().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::Parse {
            what: out.command.clone(),
            detail: format!(
                "{e}; exit {}; stdout: {}; stderr: {}",
                status_text(out.status),
                out.stdout,
                out.stderr
            ),
        })?;
        let text = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        Ok(Self {
            ok: v
                .get("ok")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            connected: v
                .get("connected")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            error: text("error"),
            kind: text("kind"),
            errno: v
                .get("errno")
                .and_then(serde_json::Value::as_i64)
                .and_then(|e| i32::try_from(e).ok()),
            local: text("local").and_then(|s| s.parse().ok()),
            reply: text("reply").unwrap_or_default(),
            raw: line.to_owned(),
        })
    }

    /// The error kind, or `""` when there was none.
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("")
    }
}
