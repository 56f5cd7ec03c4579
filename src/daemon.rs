//! [`Daemon`]: detach into the background, the way a Unix daemon does.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{Error, Result};
use crate::process;
use crate::sys;

/// Detaches the program into the background: a double `fork` with `setsid`
/// between, `chdir`, `umask`, stdin from `/dev/null`, stdout and stderr to
/// files (or `/dev/null`), every other inherited fd closed, and a pid file
/// written atomically and held under an exclusive lock for the daemon's
/// life.
///
/// Setup runs in the daemon itself (the grandchild), and its outcome is
/// reported back to the launching process through a pipe: when the pid
/// file's directory is missing, permission is denied, or another instance
/// holds the pid file, [`start`](Daemon::start) returns that error *in the
/// launcher* (which can print it and exit non-zero) instead of the launcher
/// exiting 0 while the daemon silently failed.
///
/// Every fd but 0, 1, 2, the pid file and those passed to
/// [`keep_fd`](Daemon::keep_fd) is closed in the daemon: a `File`, socket
/// or `Pool` of the launcher that owned one must not be used there (its fd
/// number may be reused by the next `open`). Build such things after
/// `start` returns, or keep their fds.
///
/// The pid file is the truth only while it is locked: a second start against
/// it fails with [`Error::AlreadyRunning`] (with the pid in it); a stale file
/// left by a daemon that was killed is unlocked, and the next start replaces
/// it. On a clean exit (the end of `main`, `std::process::exit`,
/// [`multiproc::exit`](crate::exit)) the daemon removes its pid file. A
/// daemon killed by a signal leaves it behind, unlocked.
///
/// The launcher waits for the setup report at most
/// [`setup_timeout`](Daemon::setup_timeout) (30 s by default): a setup stuck
/// on a dead mount or a FIFO with no reader gives [`Error::Timeout`], and the
/// stuck daemon is killed.
///
/// ```no_run
/// use multiproc::Daemon;
///
/// fn main() -> multiproc::Result<()> {
///     // The launcher exits 0 here once the daemon is up, or gets the Err.
///     Daemon::new()
///         .pid_file("/run/myserver.pid")
///         .stdout("/var/log/myserver.log")
///         .stderr("/var/log/myserver.log")
///         .start()?;
///     // Only the daemon gets here.
///     loop {
///         std::thread::sleep(std::time::Duration::from_secs(60));
///     }
/// }
/// ```
#[derive(Clone)]
pub struct Daemon {
    pid_file: Option<PathBuf>,
    working_directory: PathBuf,
    umask: u32,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
    keep_fds: Vec<RawFd>,
    setup_timeout: Duration,
}

impl fmt::Debug for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Daemon")
            .field("pid_file", &self.pid_file)
            .field("working_directory", &self.working_directory)
            .field("umask", &format_args!("{:#o}", self.umask))
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .field("keep_fds", &self.keep_fds)
            .field("setup_timeout", &self.setup_timeout)
            .finish()
    }
}

impl Default for Daemon {
    fn default() -> Self {
        Daemon::new()
    }
}

/// What the daemon reports to its launcher once setup is done.
#[derive(Debug, Serialize, Deserialize)]
enum Report {
    /// Up and running, with this pid.
    Up(u32),
    /// Setup failed at `step` with this OS error (or message).
    Failed {
        step: String,
        errno: Option<i32>,
        message: String,
    },
    /// Another instance holds the pid file.
    AlreadyRunning(u32),
}

/// The pid file of this process, removed at exit if it still names us.
static PID_FILE: sys::LeakedCell<(u32, PathBuf)> = sys::LeakedCell::new();

impl Daemon {
    /// How long the launcher waits for the daemon's setup report unless
    /// [`setup_timeout`](Daemon::setup_timeout) says otherwise: 30 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// assert_eq!(multiproc::Daemon::DEFAULT_SETUP_TIMEOUT, Duration::from_secs(30));
    /// ```
    pub const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

    /// A daemon with no pid file, working directory `/`, umask `0o022`,
    /// stdout and stderr to `/dev/null`, a setup timeout of
    /// [`DEFAULT_SETUP_TIMEOUT`](Daemon::DEFAULT_SETUP_TIMEOUT).
    pub fn new() -> Daemon {
        Daemon {
            pid_file: None,
            working_directory: PathBuf::from("/"),
            umask: 0o022,
            stdout: None,
            stderr: None,
            keep_fds: Vec::new(),
            setup_timeout: Daemon::DEFAULT_SETUP_TIMEOUT,
        }
    }

    /// The pid file: written atomically with the daemon's pid, held under an
    /// exclusive `flock` for its life, removed on a clean exit. A relative
    /// path is taken from the launcher's working directory.
    pub fn pid_file(mut self, path: impl AsRef<Path>) -> Daemon {
        self.pid_file = Some(absolute(path.as_ref()));
        self
    }

    /// The daemon's working directory (default `/`, so that it does not
    /// keep a mounted file system busy).
    pub fn working_directory(mut self, path: impl AsRef<Path>) -> Daemon {
        self.working_directory = absolute(path.as_ref());
        self
    }

    /// The daemon's file mode creation mask (default `0o022`).
    pub fn umask(mut self, mask: u32) -> Daemon {
        self.umask = mask & 0o777;
        self
    }

    /// Appends the daemon's stdout to this file (created if needed).
    pub fn stdout(mut self, path: impl AsRef<Path>) -> Daemon {
        self.stdout = Some(absolute(path.as_ref()));
        self
    }

    /// Appends the daemon's stderr to this file (created if needed).
    pub fn stderr(mut self, path: impl AsRef<Path>) -> Daemon {
        self.stderr = Some(absolute(path.as_ref()));
        self
    }

    /// Keeps `fd` open in the daemon (python-daemon's `files_preserve`):
    /// a listening socket bound before detaching, a pipe to a supervisor.
    /// Every other inherited fd but 0, 1, 2 and the pid file is closed.
    pub fn keep_fd(mut self, fd: impl AsRawFd) -> Daemon {
        self.keep_fds.push(fd.as_raw_fd());
        self
    }

    /// How long the launcher waits for the daemon's setup report (default
    /// [`DEFAULT_SETUP_TIMEOUT`](Daemon::DEFAULT_SETUP_TIMEOUT), 30 s).
    ///
    /// Setup (`chdir`, the pid file, opening stdout and stderr) can block
    /// for good: a working directory or log file on a dead network mount, a
    /// FIFO with no reader as a log file. Past this timeout the launcher
    /// gets [`Error::Timeout`] and the stuck daemon is killed with
    /// `SIGKILL` (with its whole process group, which it has not left
    /// yet), so nothing is left running. [`Duration::MAX`] waits without
    /// a bound.
    ///
    /// ```
    /// use std::time::Duration;
    /// let d = multiproc::Daemon::new().setup_timeout(Duration::from_secs(5));
    /// assert!(format!("{d:?}").contains("setup_timeout: 5s"));
    /// ```
    pub fn setup_timeout(mut self, timeout: Duration) -> Daemon {
        self.setup_timeout = timeout;
        self
    }

    /// Becomes a daemon. Returns `Ok(())` in the daemon; the launching
    /// process exits with status 0 once the daemon reported that its setup
    /// succeeded.
    ///
    /// # Errors
    /// In the launcher: [`Error::AlreadyRunning`] if another daemon holds
    /// the pid file, [`Error::Setup`] naming the step that failed in the
    /// daemon (`"chdir"`, `"pid file"`, `"stdout"`, ...) with its OS
    /// error, [`Error::Timeout`] if the daemon did not report its setup
    /// within [`setup_timeout`](Daemon::setup_timeout) (it was killed),
    /// [`Error::Io`] if a fork fails.
    pub fn start(self) -> Result<()> {
        match self.launch()? {
            Launched::Daemon => Ok(()),
            Launched::Launcher(_) => {
                sys::flush_std_streams();
                std::process::exit(0)
            }
        }
    }

    /// Runs `f` as a daemon and returns its pid to the caller, which goes
    /// on. The daemon leaves with `_exit` after `f` (its pid file removed,
    /// its own children finalized): it never returns into the caller's
    /// stack.
    ///
    /// # Errors
    /// As [`start`](Daemon::start), returned to the caller.
    pub fn spawn(self, f: impl FnOnce()) -> Result<u32> {
        match self.launch()? {
            Launched::Launcher(pid) => Ok(pid),
            Launched::Daemon => {
                let code = match crate::unwind::catch(f) {
                    Ok(()) => 0,
                    Err(_) => crate::exitcode::PANICKED,
                };
                crate::finalize::shutdown();
                remove_pid_file();
                sys::flush_std_streams();
                sys::exit_immediately(code)
            }
        }
    }

    /// The double fork. In the launcher: waits for the report.
    fn launch(&self) -> Result<Launched> {
        crate::unwind::install_hook();
        process::warn_if_threaded();
        let (report_r, report_w) = sys::pipe()?;
        // The after-fork hooks, copied out of their lock before the fork;
        // no death signal: a daemon outlives its launcher.
        let init = process::ChildInit::prepare(None);
        // The middle child forgets the launcher's `Process` children and
        // becomes a main process (see `process::fork_program`).
        let forked = process::fork_program();
        match forked? {
            Some(middle) => {
                drop(report_w);
                let deadline = Instant::now().checked_add(self.setup_timeout);
                let report = read_report(report_r, deadline);
                if matches!(report, Err(Error::Timeout)) {
                    // The middle child made a new session and process group
                    // with its own pid, which the daemon has not left yet
                    // (setup never changes it). The middle child is not
                    // reaped yet, so that number still names this group and
                    // no other.
                    let group = sys::Pid::from_raw(-(middle.pid() as i32));
                    let _ = sys::send_signal(group, sys::Sig::SIGKILL);
                    let _ = middle.kill();
                }
                // The middle child exits right after the second fork.
                let _ = middle.wait(None);
                match report? {
                    Report::Up(pid) => Ok(Launched::Launcher(pid)),
                    Report::AlreadyRunning(pid) => Err(Error::AlreadyRunning {
                        pid,
                        path: self.pid_file.clone().unwrap_or_default(),
                    }),
                    Report::Failed {
                        step,
                        errno,
                        message,
                    } => Err(Error::Setup {
                        step,
                        source: match errno {
                            Some(n) => io::Error::from_raw_os_error(n),
                            None => io::Error::other(message),
                        },
                    }),
                }
            }
            None => {
                // The middle child (the daemon runs the hooks, below).
                drop(report_r);
                // The middle child: a new session, then fork again so that
                // the daemon is not a session leader and can never acquire a
                // controlling terminal.
                if let Err(e) = sys::new_session() {
                    send_report(&report_w, &failed("setsid", &e));
                    sys::exit_immediately(1);
                }
                match process::fork_program() {
                    Err(e) => {
                        send_report(&report_w, &failed("fork", &io::Error::from(e)));
                        sys::exit_immediately(1)
                    }
                    Ok(Some(_)) => sys::exit_immediately(0),
                    Ok(None) => {}
                }
                // The daemon.
                match self.setup(&report_w) {
                    Ok(()) => {
                        send_report(&report_w, &Report::Up(std::process::id()));
                        drop(report_w);
                        init.run_hooks();
                        Ok(Launched::Daemon)
                    }
                    Err(report) => {
                        send_report(&report_w, &report);
                        sys::exit_immediately(1)
                    }
                }
            }
        }
    }

    /// The daemon's setup, in order; the first failure is reported.
    fn setup(&self, report: &OwnedFd) -> std::result::Result<(), Report> {
        std::env::set_current_dir(&self.working_directory).map_err(|e| failed("chdir", &e))?;
        sys::set_umask(self.umask);
        let pid_fd = match &self.pid_file {
            Some(path) => Some(lock_pid_file(path)?),
            None => None,
        };
        sys::stdin_from_dev_null().map_err(|e| failed("stdin", &e))?;
        for (target, path, step) in [(1, &self.stdout, "stdout"), (2, &self.stderr, "stderr")] {
            let file = match path {
                Some(p) => OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o666)
                    .open(p),
                None => OpenOptions::new().write(true).open("/dev/null"),
            }
            .map_err(|e| failed(step, &e))?;
            sys::redirect_stdio(target, file.as_fd()).map_err(|e| failed(step, &e))?;
        }
        let mut keep = vec![0, 1, 2, report.as_raw_fd()];
        keep.extend_from_slice(&self.keep_fds);
        if let Some(fd) = &pid_fd {
            keep.push(fd.as_raw_fd());
        }
        sys::close_fds_except(&keep).map_err(|e| failed("close fds", &e))?;
        if let (Some(fd), Some(path)) = (pid_fd, &self.pid_file) {
            // Held (and locked) for the daemon's life.
            std::mem::forget(fd);
            PID_FILE.set((std::process::id(), path.clone()));
            crate::finalize::at_exit(remove_pid_file);
        }
        Ok(())
    }
}

enum Launched {
    Launcher(u32),
    Daemon,
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn failed(step: &str, e: &io::Error) -> Report {
    Report::Failed {
        step: step.to_string(),
        errno: e.raw_os_error(),
        message: e.to_string(),
    }
}

fn send_report(fd: &OwnedFd, report: &Report) {
    let mut out = Vec::new();
    if codec::encode_frame(report, &mut out).is_ok() {
        let _ = sys::write_all(fd.as_fd(), &out);
    }
}

/// The largest report a daemon sends (a step name and an OS message).
const MAX_REPORT: usize = 64 * 1024;

/// Reads the daemon's one report frame, waiting until `deadline` (`None`:
/// no limit) at most. Stops at the frame's end rather than at end of file:
/// another thread of the launcher may fork meanwhile, and its child would
/// hold the pipe's write end open.
fn read_report(fd: OwnedFd, deadline: Option<Instant>) -> Result<Report> {
    let broken = |kind: io::ErrorKind, what: &str| Error::Setup {
        step: "report".into(),
        source: io::Error::new(kind, what.to_string()),
    };
    let mut header = [0u8; codec::HEADER_LEN];
    match read_exact_until(&fd, &mut header, deadline) {
        Ok(true) => {}
        Ok(false) => {
            return Err(broken(
                io::ErrorKind::UnexpectedEof,
                "the daemon exited before reporting its setup",
            ))
        }
        Err(e) => return Err(e),
    }
    let len = usize::try_from(u64::from_le_bytes(header))
        .ok()
        .filter(|&n| n <= MAX_REPORT)
        .ok_or_else(|| broken(io::ErrorKind::InvalidData, "an oversize setup report"))?;
    let mut payload = vec![0u8; len];
    match read_exact_until(&fd, &mut payload, deadline) {
        Ok(true) => codec::decode(&payload),
        Ok(false) => Err(broken(
            io::ErrorKind::InvalidData,
            "a truncated setup report",
        )),
        Err(e) => Err(e),
    }
}

/// Fills `buf` from `fd`, waiting until `deadline` at most: `Ok(false)` at
/// an end of file before `buf` is full, [`Error::Timeout`] past the
/// deadline.
fn read_exact_until(fd: &OwnedFd, buf: &mut [u8], deadline: Option<Instant>) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if sys::poll_readable(&[fd.as_fd()], Some(left))?.is_empty() {
                return Err(Error::Timeout);
            }
        }
        match sys::read(fd.as_fd(), &mut buf[got..])? {
            0 => return Ok(false),
            n => got += n,
        }
    }
    Ok(true)
}

/// Takes the pid file: locks what is there (refusing a running instance),
/// then puts a new, already locked file with our pid in its place with one
/// `rename`, so a reader sees the old content or the new, never a partial
/// one. Returns the open, locked pid file.
fn lock_pid_file(path: &Path) -> std::result::Result<OwnedFd, Report> {
    let step = |e: io::Error| failed("pid file", &e);
    // Whoever holds the current file's lock is a running instance. The file
    // may be replaced (a starting instance renames its own over it) between
    // our open and our lock: then the lock is on a dead inode, and we retry.
    let mut attempts = 0;
    let current = loop {
        let current = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(step)?;
        if !sys::try_lock_exclusive(current.as_fd()).map_err(step)? {
            return Err(Report::AlreadyRunning(running_pid(path)));
        }
        if same_file(&current, path) {
            break current;
        }
        attempts += 1;
        if attempts == 100 {
            return Err(step(io::Error::other("the pid file keeps being replaced")));
        }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut new = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        if !sys::try_lock_exclusive(new.as_fd())? {
            return Err(io::Error::other("cannot lock a new pid file"));
        }
        writeln!(new, "{}", std::process::id())?;
        new.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(OwnedFd::from(new))
    })();
    // The old file's lock is released with `current`: it is unlinked now (or
    // it was the file we just replaced).
    drop(current);
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        step(e)
    })
}

/// Whether `file` is (still) the file at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The pid of the running instance that holds `path`'s lock. It may be
/// between its lock and its rename, when the file still names a process
/// that is gone: read again for up to 2 s while the pid names nobody.
fn running_pid(path: &Path) -> u32 {
    let mut pid = 0;
    for _ in 0..200 {
        pid = read_pid(path);
        if pid != 0 && sys::pid_exists(sys::Pid::from_raw(pid as i32)) {
            return pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    pid
}

fn read_pid(path: &Path) -> u32 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Removes this process's pid file if it still names this process (called
/// at exit by the finalizer).
pub(crate) fn remove_pid_file() {
    if let Some((pid, path)) = PID_FILE.get() {
        if *pid == std::process::id() && read_pid(path) == *pid {
            let _ = fs::remove_file(path);
        }
    }
}
