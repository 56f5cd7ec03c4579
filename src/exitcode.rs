//! The exit codes this crate itself gives a child, as [`Process::exitcode`],
//! [`Error::Died`] and the supervisor's logs report them.
//!
//! Exit codes follow Python: `n` for an exit status (0 to 255), `-s` for
//! death by signal `s`. The codes below are the ones a child ends with when
//! the crate, not the user's code, decides its status, plus [`UNKNOWN`], the
//! code of a child whose status nobody can know any more.
//!
//! ```
//! use multiproc::{exitcode, Process};
//! let mut p = Process::new(|| panic!("boom"));
//! p.start()?;
//! assert_eq!(p.join()?, exitcode::PANICKED);
//! # Ok::<(), multiproc::Error>(())
//! ```
//!
//! [`Process::exitcode`]: crate::Process::exitcode
//! [`Error::Died`]: crate::Error::Died

/// The child's target panicked (the panic was caught and reported on stderr
/// with one line naming the process).
pub const PANICKED: i32 = 1;

/// A panic unwound through the crate's own child code (outside the
/// target's `catch_unwind`, for example in a panicking `Drop` at exit): the
/// child left with `_exit` rather than unwind into its parent's stack
/// (`EX_SOFTWARE`).
pub const UNWOUND: i32 = 70;

/// The child could not be set up: `prctl(PR_SET_PDEATHSIG)` failed for a
/// child that must die with its parent (`EX_OSERR`).
pub const SETUP_FAILED: i32 = 71;

/// A pool worker read a frame it could not parse from its pool (the pool
/// killed or lost track of it): the worker ends rather than guess.
pub const WORKER_PROTOCOL_ERROR: i32 = 2;

/// A pool worker's initializer panicked; the pool reports the panic as a
/// setup error and stops forking workers.
pub const WORKER_INIT_FAILED: i32 = 3;

/// The child's status vanished: something else reaped it (a `waitpid(-1)`
/// elsewhere in the program, or `SIGCHLD` set to `SIG_IGN`, with which the
/// kernel reaps children itself). The child is gone, but how it ended is
/// unknown. Outside both ranges of real codes (0 to 255, and -1 to -64).
pub const UNKNOWN: i32 = -256;

/// A short description of `code` for messages: `"exit status 3"`,
/// `"signal 9 (SIGKILL)"`, `"an unknown status"`.
pub(crate) fn describe(code: i32) -> String {
    if code == UNKNOWN {
        "an unknown status (reaped elsewhere)".to_string()
    } else if code < 0 {
        match nix::sys::signal::Signal::try_from(-code) {
            Ok(sig) => format!("signal {} ({})", -code, sig.as_str()),
            Err(_) => format!("signal {}", -code),
        }
    } else {
        format!("exit status {code}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions() {
        assert_eq!(describe(0), "exit status 0");
        assert_eq!(describe(-9), "signal 9 (SIGKILL)");
        assert_eq!(describe(UNKNOWN), "an unknown status (reaped elsewhere)");
        assert_eq!(describe(-200), "signal 200");
    }
}
