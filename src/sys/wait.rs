//! Waiting for children: reaping (only ever a pid this crate forked, never
//! `waitpid(-1)`) and pidfds (an fd that polls readable once a child exited).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The Python-style exit code of a final wait status: `n` for an exit
/// status, `-s` for death by signal `s`; `None` for a non-final status.
pub(crate) fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(-(sig as i32)),
        _ => None,
    }
}

/// `waitpid(pid, WNOHANG)`: `Ok(None)` while the child runs, `Ok(Some(code))`
/// once it has been reaped by this call.
///
/// `ECHILD` (the status was taken by someone else: a `waitpid(-1)` elsewhere,
/// or `SIGCHLD` ignored, with which the kernel reaps by itself) means the
/// child is gone: `Ok(Some(exitcode::UNKNOWN))`, never an error to retry.
pub(crate) fn try_wait(pid: Pid) -> io::Result<Option<i32>> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    return Ok(Some(code));
                }
                // Stopped/continued: only reported with WUNTRACED/WCONTINUED,
                // which we do not pass; poll again.
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return Ok(Some(crate::exitcode::UNKNOWN)),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Blocking `waitpid(pid, 0)`, retried on `EINTR`; `ECHILD` as in [`try_wait`].
pub(crate) fn wait_blocking(pid: Pid) -> io::Result<i32> {
    loop {
        match waitpid(pid, None) {
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    return Ok(code);
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return Ok(crate::exitcode::UNKNOWN),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Blocks until `pid` has exited, *without reaping it*
/// (`waitid(P_PID, pid, WEXITED | WNOWAIT)`), retried on `EINTR`. The
/// caller then reaps with [`try_wait`] under its own lock, so the pid stays
/// a zombie (it cannot be recycled) until the exit code is recorded:
/// a thread that signals the child by pid meanwhile hits the zombie, never
/// another process. `ECHILD` (the status was taken elsewhere, or the child
/// is already reaped) returns at once: [`try_wait`] then says what became
/// of it.
///
/// No fd is needed, unlike a sleep on a pidfd. The pid must be an unreaped
/// child of ours when the call starts.
pub(crate) fn wait_exited(pid: Pid) -> io::Result<()> {
    use nix::sys::wait::{waitid, Id};
    loop {
        match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(_) | Err(Errno::ECHILD) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

const PIDFD_UNKNOWN: u8 = 0;

const PIDFD_YES: u8 = 1;

const PIDFD_NO: u8 = 2;

/// Whether `pidfd_open(2)` works here, probed once (tokio and std cache the
/// `ENOSYS` the same way).
static PIDFD: AtomicU8 = AtomicU8::new(PIDFD_UNKNOWN);

fn raw_pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new fd or
    // -1; it touches no memory of ours.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of pidfd_open is a new fd that nothing
    // else owns (it is opened with O_CLOEXEC by the kernel).
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// Whether pidfds can be used (`pidfd_open(2)`, Linux 5.3+). Probed once.
/// `MULTIPROC_NO_PIDFD=1` in the environment forces the sentinel-pipe
/// fallback (for tests, and to rule pidfds out when debugging).
pub(crate) fn pidfd_supported() -> bool {
    match PIDFD.load(Ordering::Relaxed) {
        PIDFD_YES => true,
        PIDFD_NO => false,
        _ => {
            let forced_off = std::env::var_os("MULTIPROC_NO_PIDFD").is_some_and(|v| v == "1");
            let ok = !forced_off && raw_pidfd_open(nix::unistd::getpid()).is_ok();
            PIDFD.store(if ok { PIDFD_YES } else { PIDFD_NO }, Ordering::Relaxed);
            ok
        }
    }
}

/// `pidfd_open(pid)`: an fd that polls readable once `pid` has exited.
/// The pid must be an unreaped child of ours, so it cannot have been recycled.
pub(crate) fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    raw_pidfd_open(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_codes() {
        let pid = Pid::from_raw(1);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 3)), Some(3));
        assert_eq!(
            exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(-9)
        );
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }
}
