//! [`Popen`]: one forked child, polled with `waitpid(pid, WNOHANG)`.

use std::fmt;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::{self, Pid, Sig};
use crate::unwind;

/// Upper bound on one sleep while waiting on a sentinel *pipe* (the fallback
/// for kernels without pidfd): a sibling forked by another thread at the
/// wrong moment can hold a copy of the pipe's write end and delay its EOF.
const PIPE_SENTINEL_SLICE: Duration = Duration::from_millis(50);

/// One forked child: its pid, an fd that becomes readable when it exits (a
/// pidfd, or the read end of a pipe whose only writer is the child), and its
/// cached exit code once reaped.
///
/// The pidfd is opened on first use ([`sentinel`](Popen::sentinel), a
/// [`wait`](Popen::wait) with a timeout on a running child), not at the
/// fork: a child that is only ever joined costs no fd. It is opened while
/// the child is still unreaped (the pid cannot name another process then);
/// asked for after the child was reaped, the sentinel is an fd that is
/// always readable.
///
/// `Popen` is the low-level layer under [`Process`](crate::Process): it
/// forks, runs a closure in the child and leaves with `_exit` of the value
/// the closure returns (1 if it panics, after one line on stderr), and it
/// reaps *only its own pid*. It does not register the child with the at-exit
/// finalizer, name it, or redirect its stdin: use `Process` for that.
///
/// A `Popen` may also stand for a child of the
/// [fork server](crate::forkserver): the server reaps it and reports its
/// exit code, which `poll` and `wait` then return; signals go through the
/// child's pidfd. The methods behave the same for both kinds.
///
/// Like [`std::process::Child`], dropping a `Popen` neither kills nor reaps
/// the child. Exit codes follow Python: `n` for an exit status, `-s` for
/// death by signal `s`.
///
/// ```
/// use std::time::Duration;
/// let child = multiproc::Popen::fork(|| 3)?;
/// assert_eq!(child.wait(Some(Duration::from_secs(10)))?, Some(3));
/// assert_eq!(child.returncode(), Some(3));
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Popen {
    pid: Pid,
    /// Readable once the status can be taken: the pidfd or sentinel pipe of
    /// a direct child; for a child of the fork server, the socket on which
    /// the server reports its status. Empty until first asked for when it
    /// is a direct child's pidfd (see [`Popen::sentinel_fd`]); only set with
    /// `returncode` locked.
    sentinel: OnceLock<OwnedFd>,
    /// Whether `sentinel` is reliable (a pidfd, or the server's socket):
    /// else a pipe, which a grandchild can hold open past the child's exit.
    pidfd: bool,
    how: Seam,
    returncode: Mutex<Option<i32>>,
}

/// How the status of the child is taken: the small private wait seam under
/// every handle on a child.
enum Seam {
    /// Our own child: `waitpid(pid, WNOHANG)`, signals by pid (safe while
    /// unreaped, which the lock in [`Popen::send_signal`] guarantees).
    Direct,
    /// A child of the fork server. The server reaps it and writes its exit
    /// code (4 bytes, little-endian) on `sentinel`; signals go through
    /// `pidfd`, which names exactly this process, so a recycled pid can
    /// never be hit even though we do not reap. `server_gone` is set once
    /// the server closed the socket without a status (it died): the child
    /// is then waited for on its pidfd and its code is unknown.
    Server {
        pidfd: OwnedFd,
        server_gone: std::sync::atomic::AtomicBool,
    },
}

impl Popen {
    /// Forks a child that runs `child` and exits with the code it returns.
    ///
    /// Stdout and stderr are flushed first, so buffered text is not printed
    /// twice; the child flushes them again before its `_exit`. A panic in
    /// `child` is caught: one line on stderr, exit code 1.
    ///
    /// # Errors
    /// [`Error::Io`] if `fork` fails (`EAGAIN`: process limit, `ENOMEM`), or
    /// if the fds it needs before the fork cannot be opened (the sentinel
    /// pipe on kernels without pidfds; once per process, `/dev/null`). The
    /// pidfd itself is opened later, on first use (see
    /// [`sentinel`](Popen::sentinel)).
    pub fn fork<F: FnOnce() -> i32>(child: F) -> Result<Popen> {
        unwind::install_hook();
        Popen::fork_lazy(move || unwind::catch(child).unwrap_or(crate::exitcode::PANICKED))
    }

    /// Forks a child that runs `child`; the closure's value is the exit code.
    /// No panic handling: callers wrap `child` themselves. The pidfd is
    /// opened right after the fork (the fork server hands it on at once).
    pub(crate) fn fork_raw<F: FnOnce() -> i32>(child: F) -> Result<Popen> {
        Popen::fork_with(child, false)
    }

    /// As [`fork_raw`](Popen::fork_raw), but the pidfd is opened on first
    /// use: the fork path of [`Process`](crate::Process) and [`Popen::fork`].
    pub(crate) fn fork_lazy<F: FnOnce() -> i32>(child: F) -> Result<Popen> {
        Popen::fork_with(child, true)
    }

    fn fork_with<F: FnOnce() -> i32>(child: F, lazy: bool) -> Result<Popen> {
        let (use_pidfd, pipe_r, pipe_w) = sentinel_pipe()?;
        let lazy = lazy && use_pidfd;
        if lazy {
            // The last resort of `sentinel()` (see there), opened once per
            // process: it cannot be missing later for want of an fd.
            sys::prepare_dev_null()?;
        }
        let read_raw = pipe_r.as_ref().map(sys::raw);
        let pid = sys::fork_child(move || {
            // Child: keep the sentinel's write end open until `_exit` (its
            // closing is the signal), and drop our copy of the read end.
            if let Some(r) = read_raw {
                sys::close_raw(r);
            }
            mem::forget(pipe_w);
            child()
        })?;
        let sentinel = OnceLock::new();
        if !lazy {
            let _ = sentinel.set(sentinel_of(pid, pipe_r)?);
        }
        Ok(Popen {
            pid,
            sentinel,
            pidfd: use_pidfd,
            how: Seam::Direct,
            returncode: Mutex::new(None),
        })
    }

    /// A child the fork server forked: its pid, a pidfd the server opened
    /// while the child was its unreaped child (so it names this very
    /// process), and our end of the socket on which the server reports the
    /// exit code.
    pub(crate) fn through_server(pid: u32, pidfd: OwnedFd, status: OwnedFd) -> Popen {
        Popen {
            pid: Pid::from_raw(pid as i32),
            sentinel: OnceLock::from(status),
            pidfd: true,
            how: Seam::Server {
                pidfd,
                server_gone: std::sync::atomic::AtomicBool::new(false),
            },
            returncode: Mutex::new(None),
        }
    }

    /// Forks a child that *returns* into the caller and goes on running the
    /// program (see `sys::fork_returning`): `Ok(None)` in the child, the
    /// child's `Popen` in the parent. The supervisor's fork site.
    pub(crate) fn fork_program() -> Result<Option<Popen>> {
        let (use_pidfd, pipe_r, pipe_w) = sentinel_pipe()?;
        let Some(pid) = sys::fork_returning()? else {
            // Child: the sentinel's write end stays open until we exit.
            drop(pipe_r);
            mem::forget(pipe_w);
            return Ok(None);
        };
        drop(pipe_w);
        let sentinel = OnceLock::from(sentinel_of(pid, pipe_r)?);
        Ok(Some(Popen {
            pid,
            sentinel,
            pidfd: use_pidfd,
            how: Seam::Direct,
            returncode: Mutex::new(None),
        }))
    }

    /// Whether the sentinel is a pidfd (else a pipe, which a grandchild can
    /// hold open past the child's exit).
    pub(crate) fn has_pidfd(&self) -> bool {
        self.pidfd
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// The exit code if the child has been reaped, without a system call.
    pub fn returncode(&self) -> Option<i32> {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<i32>> {
        // The guarded value is a plain Option<i32>: a panic elsewhere cannot
        // leave it inconsistent, so poisoning is ignored.
        self.returncode.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `waitpid(pid, WNOHANG)`: `Ok(None)` while the child runs, its exit
    /// code once it has exited (reaping it on the first such call).
    ///
    /// A child whose status something else took (a `waitpid(-1)` elsewhere
    /// in the program, or `SIGCHLD` set to `SIG_IGN`) counts as exited with
    /// [`exitcode::UNKNOWN`](crate::exitcode::UNKNOWN).
    ///
    /// # Errors
    /// [`Error::Io`] if `waitpid` fails for another reason (it should not).
    pub fn poll(&self) -> Result<Option<i32>> {
        let mut rc = self.lock();
        if rc.is_none() {
            *rc = match &self.how {
                Seam::Direct => sys::try_wait(self.pid)?,
                Seam::Server { pidfd, server_gone } => {
                    self.server_status(pidfd.as_fd(), server_gone)?
                }
            };
        }
        Ok(*rc)
    }

    /// The status the fork server reported, if it has (without blocking).
    fn server_status(
        &self,
        pidfd: BorrowedFd<'_>,
        server_gone: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<i32>> {
        use std::sync::atomic::Ordering;
        if !server_gone.load(Ordering::Relaxed) {
            let mut code = [0u8; 4];
            // Set at creation (the server's channel): `sentinel_fd` would
            // take the status lock, which the caller holds.
            let channel = self
                .sentinel
                .get()
                .expect("a fork-server child has its channel");
            match sys::recv_nonblocking(channel.as_fd(), &mut code)? {
                Some(4) => return Ok(Some(i32::from_le_bytes(code))),
                None => return Ok(None),
                // End of file (or a torn report): the server is gone
                // without reaping the child.
                Some(_) => server_gone.store(true, Ordering::Relaxed),
            }
        }
        // No server to report: the pidfd still says whether it exited.
        if sys::poll_readable(&[pidfd], Some(Duration::ZERO))?.is_empty() {
            Ok(None)
        } else {
            Ok(Some(crate::exitcode::UNKNOWN))
        }
    }

    /// The fd to sleep on until the status can be taken; an error if it
    /// must be opened now and cannot be (the fd limit).
    fn wait_fd(&self) -> std::io::Result<BorrowedFd<'_>> {
        match &self.how {
            Seam::Server { pidfd, server_gone }
                if server_gone.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                Ok(pidfd.as_fd())
            }
            _ => self.sentinel_fd(),
        }
    }

    /// Whether sleeping on [`wait_fd`](Popen::wait_fd) is enough: else the
    /// sleep is cut into [`PIPE_SENTINEL_SLICE`]s (a sentinel pipe can be
    /// held open past the exit by a grandchild; no fd could be opened).
    fn sentinel_reliable(&self) -> bool {
        self.pidfd && (self.sentinel.get().is_some() || !matches!(self.how, Seam::Direct))
    }

    /// Waits for the child to exit, at most `timeout` (`None`: no limit).
    /// Returns its exit code, or `None` on timeout. No busy polling: without
    /// a timeout it blocks in `waitid(2)` (no fd needed); with one it sleeps
    /// on the child's pidfd (or sentinel pipe).
    ///
    /// # Errors
    /// As [`poll`](Popen::poll).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<i32>> {
        if let Some(code) = self.returncode() {
            return Ok(Some(code));
        }
        if timeout.is_none() && matches!(self.how, Seam::Direct) {
            // Block until it has exited without reaping it, then reap
            // under the lock: one `waitid` and one `waitpid`. A plain
            // blocking `waitpid` would reap outside the lock, and a signal
            // sent meanwhile by another thread could hit a recycled pid
            // (see `sys::wait_exited`).
            loop {
                sys::wait_exited(self.pid)?;
                if let Some(code) = self.poll()? {
                    return Ok(Some(code));
                }
            }
        }
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            // Reap first (a child that has exited needs no sentinel), then
            // sleep on the sentinel: one `waitpid` and one `poll` a turn.
            if let Some(code) = self.poll()? {
                return Ok(Some(code));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            let mut left = deadline.map(|d| d - now);
            match self.wait_fd() {
                Ok(fd) => {
                    if !self.sentinel_reliable() {
                        left =
                            Some(left.map_or(PIPE_SENTINEL_SLICE, |l| l.min(PIPE_SENTINEL_SLICE)));
                    }
                    sys::poll_readable(&[fd], left)?;
                }
                // No fd left for the pidfd: look again in a while.
                Err(_) => std::thread::sleep(
                    left.map_or(PIPE_SENTINEL_SLICE, |l| l.min(PIPE_SENTINEL_SLICE)),
                ),
            }
        }
    }

    /// Sends `SIGTERM`. Does nothing once the child has been reaped (its pid
    /// may belong to another process by then).
    ///
    /// # Errors
    /// [`Error::Io`] if `kill(2)` fails for another reason than a vanished pid.
    pub fn terminate(&self) -> Result<()> {
        self.send_signal(Sig::SIGTERM)
    }

    /// Sends `SIGKILL`; see [`terminate`](Popen::terminate).
    ///
    /// # Errors
    /// As [`terminate`](Popen::terminate).
    pub fn kill(&self) -> Result<()> {
        self.send_signal(Sig::SIGKILL)
    }

    /// Sends `signal` (a raw signal number, as `libc::SIGUSR1`) to the child,
    /// unless it has been reaped already.
    ///
    /// # Errors
    /// [`Error::Io`] for an invalid signal number or a failing `kill(2)`.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let sig = Sig::try_from(signal).map_err(|e| Error::Io(e.into()))?;
        self.send_signal(sig)
    }

    pub(crate) fn send_signal(&self, sig: Sig) -> Result<()> {
        // Holding the lock, nobody reaps between the check and the kill: an
        // unreaped child's pid cannot be recycled (std's pid-reuse guard).
        let rc = self.lock();
        if rc.is_some() {
            return Ok(());
        }
        let sent = match &self.how {
            Seam::Direct => sys::send_signal(self.pid, sig),
            Seam::Server { pidfd, .. } => sys::pidfd_send_signal(pidfd.as_fd(), sig),
        };
        match sent {
            Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => Ok(()),
            other => other.map_err(Error::from),
        }
    }

    /// An fd that polls readable once the child has exited: its pidfd, or the
    /// read end of a sentinel pipe on kernels without pidfd. For `poll`,
    /// epoll, mio or tokio's `AsyncFd`; see also [`wait`](crate::wait).
    ///
    /// The pidfd is opened by the first call (while the child is unreaped),
    /// then kept. Asked for once the child has been reaped, the sentinel is
    /// a fresh fd that is always readable (a pipe at end of file). If no fd
    /// can be opened (the process is at its fd limit), this call returns a
    /// shared `/dev/null` fd, which `poll` finds readable at once: a waiter
    /// then finds the child running with [`poll`](Popen::poll) and waits
    /// again (a later call tries the pidfd again).
    ///
    /// # Panics
    /// Only if not even `/dev/null` can be opened (at the fd limit, in a
    /// daemon that closed the one this crate keeps).
    ///
    /// ```
    /// use std::time::Duration;
    /// let child = multiproc::Popen::fork(|| 0)?;
    /// assert_eq!(child.wait(None)?, Some(0));
    /// // Reaped: the sentinel is readable at once.
    /// let ready = multiproc::wait(&[child.sentinel()], Some(Duration::from_secs(10)))?;
    /// assert_eq!(ready, vec![0]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn sentinel(&self) -> BorrowedFd<'_> {
        match self.sentinel_fd() {
            Ok(fd) => fd,
            Err(_) => sys::dev_null()
                .expect("multiproc: no file descriptor left for a sentinel, not even /dev/null"),
        }
    }

    /// The sentinel, opened now if it was left for later (see
    /// [`sentinel`](Popen::sentinel)): the pidfd of a child not yet reaped,
    /// else an ended pipe. The lock on the exit code is held meanwhile, so
    /// nobody reaps the child (and frees its pid) between the check and
    /// `pidfd_open`.
    ///
    /// # Errors
    /// If no fd can be opened (`EMFILE`, `ENFILE`, `ENOMEM`); nothing is
    /// kept then, so a later call tries again.
    pub(crate) fn sentinel_fd(&self) -> std::io::Result<BorrowedFd<'_>> {
        if let Some(fd) = self.sentinel.get() {
            return Ok(fd.as_fd());
        }
        let rc = self.lock();
        if self.sentinel.get().is_none() {
            let fd = if rc.is_none() {
                match sys::pidfd_open(self.pid) {
                    Ok(fd) => fd,
                    // Gone already: reaped behind our back (a `waitpid(-1)`
                    // elsewhere, `SIGCHLD` ignored). `poll` will say so.
                    Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => sys::ended_pipe()?,
                    Err(e) => return Err(e),
                }
            } else {
                sys::ended_pipe()?
            };
            let _ = self.sentinel.set(fd);
        }
        drop(rc);
        Ok(self
            .sentinel
            .get()
            .expect("the sentinel was set above, under the lock")
            .as_fd())
    }
}

/// Before a fork: whether the child's sentinel will be a pidfd, else the
/// two ends of its sentinel pipe (kernels without pidfds; the child keeps
/// the write end open until it exits).
#[allow(clippy::type_complexity)]
fn sentinel_pipe() -> Result<(bool, Option<OwnedFd>, Option<OwnedFd>)> {
    if sys::pidfd_supported() {
        return Ok((true, None, None));
    }
    let (r, w) = sys::pipe()?;
    Ok((false, Some(r), Some(w)))
}

/// The sentinel of a child just forked: the read end of its pipe (kernels
/// without pidfds), or its pidfd. If no pidfd can be opened the child is
/// killed and reaped before the error is returned: no zombie.
fn sentinel_of(pid: Pid, pipe_r: Option<OwnedFd>) -> Result<OwnedFd> {
    match pipe_r {
        Some(r) => Ok(r),
        None => sys::pidfd_open(pid).map_err(|e| {
            let _ = sys::send_signal(pid, Sig::SIGKILL);
            let _ = sys::wait_blocking(pid);
            e.into()
        }),
    }
}

/// Stops `children` together: sends each `first` (not to those already
/// reaped), waits for them all until *one* deadline `grace` from now,
/// sleeping on their sentinels, then sends `SIGKILL` to those still alive
/// and reaps them. With `first = SIGKILL` and no grace it kills and reaps.
/// The at-exit finalizer, the supervisor and the pool all stop their
/// children with it.
pub(crate) fn stop_all(children: &[&Popen], first: Sig, grace: Duration) {
    for c in children {
        let _ = c.send_signal(first);
    }
    let deadline = Instant::now().checked_add(grace);
    let mut left: Vec<&Popen> = children.to_vec();
    loop {
        left.retain(|c| matches!(c.poll(), Ok(None)));
        if left.is_empty() {
            return;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        let mut timeout = deadline.map(|d| d - now);
        let fds: Vec<BorrowedFd<'_>> = left.iter().filter_map(|c| c.wait_fd().ok()).collect();
        if fds.len() < left.len() || left.iter().any(|c| !c.sentinel_reliable()) {
            timeout = Some(timeout.map_or(PIPE_SENTINEL_SLICE, |t| t.min(PIPE_SENTINEL_SLICE)));
        }
        if fds.is_empty() {
            std::thread::sleep(timeout.unwrap_or(PIPE_SENTINEL_SLICE));
        } else if sys::poll_readable(&fds, timeout).is_err() {
            break;
        }
    }
    for c in &left {
        let _ = c.kill();
    }
    for c in &left {
        let _ = c.wait(None);
    }
}

impl fmt::Debug for Popen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Popen")
            .field("pid", &self.pid.as_raw())
            .field("sentinel", &self.sentinel.get().map(|s| s.as_raw_fd()))
            .field("returncode", &self.returncode())
            .field("through_server", &matches!(self.how, Seam::Server { .. }))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Option<Duration> = Some(Duration::from_secs(10));

    #[test]
    fn exit_code_and_cached_status() {
        let p = Popen::fork(|| 5).unwrap();
        assert_eq!(p.wait(T).unwrap(), Some(5));
        assert_eq!(p.poll().unwrap(), Some(5));
        // Signalling a reaped child is a no-op, not an error.
        p.kill().unwrap();
    }

    /// A child "through the server", without a server: the test plays the
    /// server's part (it forked the child, it writes the report).
    fn through_fake_server() -> (Popen, OwnedFd, OwnedFd, Pid) {
        let (r, w) = sys::pipe().unwrap();
        let w_raw = sys::raw(&w);
        let pid = sys::fork_child(move || {
            // Our copy of the write end: the read below ends when the test
            // drops its own.
            sys::close_raw(w_raw);
            let mut b = [0u8; 1];
            let _ = sys::read(r.as_fd(), &mut b);
            0
        })
        .unwrap();
        let pidfd = sys::pidfd_open(pid).unwrap();
        let (ours, server_end) = sys::socket_pair(0).unwrap();
        (
            Popen::through_server(pid.as_raw() as u32, pidfd, ours),
            server_end,
            w,
            pid,
        )
    }

    #[test]
    fn the_server_seam_takes_the_reported_code() {
        if !sys::pidfd_supported() {
            return;
        }
        let (p, server_end, release, pid) = through_fake_server();
        assert_eq!(p.poll().unwrap(), None);
        assert_eq!(p.wait(Some(Duration::from_millis(20))).unwrap(), None);
        // Signals go through the pidfd, to the live child.
        p.terminate().unwrap();
        assert_eq!(sys::wait_blocking(pid).unwrap(), -15);
        // Reaped by "the server", which reports: the code is the report.
        sys::write_all(server_end.as_fd(), &(-15i32).to_le_bytes()).unwrap();
        assert_eq!(p.wait(T).unwrap(), Some(-15));
        assert_eq!(p.returncode(), Some(-15));
        // Signalling a reported child is a no-op.
        p.kill().unwrap();
        drop(release);
    }

    #[test]
    fn a_vanished_server_is_an_unknown_code_once_the_child_exits() {
        if !sys::pidfd_supported() {
            return;
        }
        let (p, server_end, release, pid) = through_fake_server();
        drop(server_end);
        // No report can come; the child still runs: still running.
        assert_eq!(p.poll().unwrap(), None);
        assert_eq!(p.wait(Some(Duration::from_millis(20))).unwrap(), None);
        drop(release);
        // Waited for on its pidfd (bounded), then reaped by "the server".
        assert_eq!(p.wait(T).unwrap(), Some(crate::exitcode::UNKNOWN));
        assert_eq!(sys::wait_blocking(pid).unwrap(), 0);
    }

    #[test]
    fn the_lazy_sentinel_of_a_zombie_is_its_pidfd() {
        if !sys::pidfd_supported() {
            return;
        }
        let p = Popen::fork(|| 6).unwrap();
        assert!(p.sentinel.get().is_none());
        // Exited, not reaped: the pidfd still names it, and is readable.
        sys::wait_exited(p.pid).unwrap();
        let fd = p.sentinel_fd().unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(link.to_string_lossy().contains("pidfd"), "{link:?}");
        assert_eq!(
            sys::poll_readable(&[fd], Some(Duration::ZERO)).unwrap(),
            vec![0]
        );
        assert_eq!(p.poll().unwrap(), Some(6));
    }

    #[test]
    fn a_sentinel_asked_for_after_the_reap_is_an_ended_pipe() {
        let p = Popen::fork(|| 0).unwrap();
        assert_eq!(p.wait(None).unwrap(), Some(0));
        let fd = p.sentinel();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(
            link.to_string_lossy().starts_with("pipe:") || !sys::pidfd_supported(),
            "{link:?}"
        );
        assert_eq!(
            sys::poll_readable(&[fd], Some(Duration::ZERO)).unwrap(),
            vec![0]
        );
        let mut b = [0u8; 1];
        assert_eq!(sys::read(fd, &mut b).unwrap(), 0);
    }

    #[test]
    fn killed_by_signal_is_negative() {
        let (r, w) = sys::pipe().unwrap();
        let p = Popen::fork(move || {
            let mut b = [0u8; 1];
            let _ = sys::read(r.as_fd(), &mut b);
            0
        })
        .unwrap();
        assert_eq!(p.wait(Some(Duration::from_millis(20))).unwrap(), None);
        p.terminate().unwrap();
        assert_eq!(p.wait(T).unwrap(), Some(-15));
        drop(w);
    }
}
