//! Reaping: only ever a pid this crate forked, never `waitpid(-1)`.

use std::io;

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
