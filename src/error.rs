//! The crate's error type.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The result type of every fallible operation in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when forking, talking to or supervising a child.
///
/// The enum is `#[non_exhaustive]`: match the variants you care about and keep
/// a wildcard arm. Predicates such as [`Error::is_died`] and
/// [`Error::is_timeout`] cover the common branches.
///
/// `Error` converts into [`std::io::Error`] (keeping the `kind()` of an I/O
/// error), so functions returning `io::Result` can use `?` on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error(transparent)]
    Io(#[from] io::Error),

    /// A frame on a [`Connection`](crate::Connection) could not be read or
    /// written: truncated, oversize, or not a valid encoding of the expected type.
    #[error(transparent)]
    Codec(#[from] CodecError),

    /// The child's code panicked; the panic was caught in the child.
    #[error("task panicked: {message}")]
    Panicked {
        /// The panic message (the `&str` or `String` payload; a placeholder otherwise).
        message: String,
        /// `file:line:column` of the panic, when the child could record it.
        location: Option<String>,
    },

    /// A child exited without delivering its result.
    #[error("process {pid}{} died with exit code {exitcode}{}", on_rank(*rank), signal_suffix(*exitcode))]
    Died {
        /// The child's pid (on its rank's host, for an `MpiPool`).
        pid: u32,
        /// Its exit code: `n` for an exit status, `-s` for death by signal `s`.
        exitcode: i32,
        /// The MPI rank whose worker it was (an `MpiPool`, cargo feature
        /// `mpi`); `None` for a child of this process.
        rank: Option<usize>,
    },

    /// A deadline passed before the operation completed.
    #[error("operation timed out")]
    Timeout,

    /// The pool no longer takes work: it was closed or terminated.
    #[error("pool is closed")]
    PoolClosed,

    /// The process has not been started yet.
    #[error("process has not been started")]
    NotStarted,

    /// The process (or the once-per-process operation) was already started.
    #[error("process was already started")]
    AlreadyStarted,

    /// A supervisor restarted its children more often than its limit allows.
    #[error("too many child restarts ({restarts}, limit {limit})")]
    TooManyRestarts {
        /// Restarts performed so far.
        restarts: usize,
        /// The configured limit.
        limit: usize,
    },

    /// Another live process holds the lock on the pid file.
    #[error("already running as pid {pid} (pid file {})", path.display())]
    AlreadyRunning {
        /// The pid read from the pid file (0 if it could not be read).
        pid: u32,
        /// The pid file.
        path: PathBuf,
    },

    /// A step of setting up a child (daemon, worker) failed inside the child,
    /// which reported it back before exiting.
    #[error("{step} failed in the child: {source}")]
    Setup {
        /// What the child was doing (`"chdir"`, `"open pid file"`, …).
        step: String,
        /// The child's error.
        #[source]
        source: io::Error,
    },

    /// A [`Barrier`](crate::Barrier) was broken: a party timed out or
    /// aborted it while others waited (Python's `BrokenBarrierError`).
    #[error("barrier is broken")]
    BrokenBarrier,

    /// The fork server cannot create this child: it was not started
    /// ([`forkserver::start`](crate::forkserver::start) first in `main`),
    /// it could not start (other threads already ran), it belongs to
    /// another process, or the target is a closure, which cannot cross to
    /// it. The message says which.
    #[error("{reason}")]
    ForkServer {
        /// What is wrong, naming the fix.
        reason: String,
    },

    /// The MPI job cannot run the pool or this task: the ranks run
    /// different binaries, a task function lies outside the executable, MPI
    /// was initialized without the threading it needs. The message says which.
    #[error("{reason}")]
    Mpi {
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// `true` for [`Error::Died`].
    pub fn is_died(&self) -> bool {
        matches!(self, Error::Died { .. })
    }

    /// `true` for [`Error::Panicked`].
    pub fn is_panicked(&self) -> bool {
        matches!(self, Error::Panicked { .. })
    }

    /// `true` for [`Error::Timeout`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout)
    }

    /// `true` when the peer of a [`Connection`](crate::Connection) closed it
    /// (end of file with no partial frame pending).
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof)
    }

    /// `true` for [`Error::BrokenBarrier`].
    pub fn is_broken_barrier(&self) -> bool {
        matches!(self, Error::BrokenBarrier)
    }

    /// `true` for [`Error::ForkServer`].
    pub fn is_fork_server(&self) -> bool {
        matches!(self, Error::ForkServer { .. })
    }

    /// `true` for [`Error::Mpi`].
    pub fn is_mpi(&self) -> bool {
        matches!(self, Error::Mpi { .. })
    }

    /// The panic message, for [`Error::Panicked`].
    pub fn panic_message(&self) -> Option<&str> {
        match self {
            Error::Panicked { message, .. } => Some(message),
            _ => None,
        }
    }

    pub(crate) fn disconnected() -> Error {
        Error::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the connection",
        ))
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::Io(e.into())
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            Error::Timeout => io::Error::new(io::ErrorKind::TimedOut, e),
            Error::Codec(_) => io::Error::new(io::ErrorKind::InvalidData, e),
            Error::AlreadyRunning { .. } | Error::AlreadyStarted => {
                io::Error::new(io::ErrorKind::AlreadyExists, e)
            }
            other => io::Error::other(other),
        }
    }
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecErrorKind {
    /// The stream ended inside a frame: `got` of `expected` bytes arrived.
    Truncated {
        /// Bytes of the frame (header included) that arrived.
        got: usize,
        /// Bytes the frame needed.
        expected: usize,
    },
    /// The header announced a frame larger than the connection's limit; it was
    /// refused before any allocation.
    Oversize {
        /// The announced payload length.
        len: u64,
        /// The limit in force.
        limit: usize,
    },
    /// The payload is not a valid encoding of the expected type.
    Invalid(String),
    /// The payload decoded, but bytes were left over: the peer sent another type.
    TrailingBytes(usize),
    /// The value could not be serialized.
    Encode(String),
}

/// A frame that could not be encoded or decoded; see [`CodecErrorKind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodecError {
    kind: CodecErrorKind,
}

impl CodecError {
    pub(crate) fn new(kind: CodecErrorKind) -> CodecError {
        CodecError { kind }
    }

    /// What went wrong.
    pub fn kind(&self) -> &CodecErrorKind {
        &self.kind
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            CodecErrorKind::Truncated { got, expected } => {
                write!(f, "truncated frame: {got} of {expected} bytes")
            }
            CodecErrorKind::Oversize { len, limit } => {
                write!(f, "frame of {len} bytes exceeds the limit of {limit} bytes")
            }
            CodecErrorKind::Invalid(msg) => write!(f, "invalid frame: {msg}"),
            CodecErrorKind::TrailingBytes(n) => {
                write!(f, "invalid frame: {n} bytes left after the value")
            }
            CodecErrorKind::Encode(msg) => write!(f, "cannot encode value: {msg}"),
        }
    }
}

impl std::error::Error for CodecError {}

/// `" (SIGKILL)"` for a negative exit code that names a signal.
/// `" on rank r"` for a [`Error::Died`] of an MPI rank's worker.
fn on_rank(rank: Option<usize>) -> String {
    rank.map(|r| format!(" on rank {r}")).unwrap_or_default()
}

pub(crate) fn signal_suffix(exitcode: i32) -> String {
    if exitcode == crate::exitcode::UNKNOWN {
        " (unknown: its status was reaped elsewhere)".to_string()
    } else if exitcode < 0 {
        match nix::sys::signal::Signal::try_from(-exitcode) {
            Ok(sig) => format!(" ({})", sig.as_str()),
            Err(_) => String::new(),
        }
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_strings() {
        assert_eq!(
            Error::Died {
                pid: 42,
                exitcode: -9,
                rank: None
            }
            .to_string(),
            "process 42 died with exit code -9 (SIGKILL)"
        );
        assert_eq!(
            Error::Died {
                pid: 42,
                exitcode: 3,
                rank: None
            }
            .to_string(),
            "process 42 died with exit code 3"
        );
        assert_eq!(
            Error::Panicked {
                message: "boom".into(),
                location: None
            }
            .to_string(),
            "task panicked: boom"
        );
        assert_eq!(Error::Timeout.to_string(), "operation timed out");
        assert_eq!(
            Error::from(CodecError::new(CodecErrorKind::Oversize {
                len: 10,
                limit: 5
            }))
            .to_string(),
            "frame of 10 bytes exceeds the limit of 5 bytes"
        );
    }

    #[test]
    fn into_io_error_keeps_kind() {
        let e = Error::Io(io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            io::Error::from(Error::Timeout).kind(),
            io::ErrorKind::TimedOut
        );
        assert!(Error::disconnected().is_disconnected());
    }
}
