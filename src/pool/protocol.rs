//! The callers' side of the dispatcher: the commands callers send, the
//! messages a job's caller receives, the wake-up, the task reference, and
//! the pool's internal failures.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use super::mailbox::MailSender;
use super::payload::Payload;
use crate::error::{CodecError, CodecErrorKind, Error};
use crate::region::Ranges;
use crate::sys;

/// What a worker runs for a job: the task function and the trampoline that
/// decodes its items, calls it and encodes its results. Addresses, valid in
/// a worker because it is a fork of the same image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TaskRef {
    pub(crate) f: usize,
    pub(crate) tramp: usize,
}

/// A request from the callers' side.
pub(crate) enum Command {
    /// A new job: where its results go and how its items run.
    Job {
        id: u64,
        tx: MailSender<JobMsg>,
        task: TaskRef,
        ctx: Option<Vec<u8>>,
    },
    /// Items `base..base + count` of a job, encoded back to back
    /// (fixed-width of `kind`, or postcard for 0); one large item may sit
    /// in the pool's arena instead.
    Chunk {
        job: u64,
        base: u64,
        count: u32,
        kind: u8,
        items: Payload,
    },
    /// No more chunks will come for this job.
    Seal(u64),
    /// The caller lost interest: drop the job's queued chunks.
    EndJob(u64),
    /// Finish the queued work, then stop the workers and the dispatcher.
    Close,
    /// Kill the workers now.
    Terminate,
}

/// What a job's caller receives.
#[derive(Debug)]
pub(crate) enum JobMsg {
    /// Result entries of items `base..base + count` (values fixed-width
    /// of `kind`, or postcard for 0).
    Results {
        base: u64,
        count: u32,
        kind: u8,
        bytes: Vec<u8>,
        /// The large results these entries name, in the worker's region.
        shared: Option<Ranges>,
    },
    /// One item failed without a result entry (its worker died or timed out).
    Failed { index: u64, error: Error },
    /// The pool cannot run this job: every item without a result fails.
    Abort(Error),
}

impl JobMsg {
    /// The items this message accounts for (`u64::MAX`: all that are left).
    #[cfg(any(test, feature = "mpi"))]
    pub(crate) fn items(&self) -> u64 {
        match self {
            JobMsg::Results { count, .. } => u64::from(*count),
            JobMsg::Failed { .. } => 1,
            JobMsg::Abort(_) => u64::MAX,
        }
    }
}

/// Wakes the dispatcher out of `poll`: a non-blocking socket, written only
/// when `notified` was clear, so bursts of commands cost one write.
#[derive(Debug)]
pub(crate) struct Wake {
    w: OwnedFd,
    notified: AtomicBool,
}

impl Wake {
    /// The wake-up and the dispatcher's end to poll.
    pub(crate) fn new() -> io::Result<(Wake, OwnedFd)> {
        // A socket pair rather than a pipe: its write is one `send` with
        // `MSG_NOSIGNAL` (no SIGPIPE once the dispatcher is gone).
        let (r, w) = sys::socket_pair(0)?;
        sys::set_nonblocking(r.as_fd())?;
        sys::set_nonblocking(w.as_fd())?;
        Ok((
            Wake {
                w,
                notified: AtomicBool::new(false),
            },
            r,
        ))
    }

    pub(crate) fn notify(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            let _ = sys::write_all(self.w.as_fd(), &[1]);
        }
    }

    /// The dispatcher read the wake-ups: the next command writes again.
    pub(crate) fn clear(&self) {
        self.notified.store(false, Ordering::Release);
    }

    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.w
    }
}

/// Why the pool, or one worker, failed: the pool's own failures, turned
/// into the public [`Error`] where they reach a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PoolFailure {
    /// The pool cannot work: a step of starting workers failed (the
    /// initializer panicked, workers die before running anything, no
    /// replacement can be forked). New jobs are aborted with it.
    Setup { step: &'static str, message: String },
    /// A worker sent something the protocol does not allow; it is killed
    /// and the item it was running fails with this.
    Protocol(String),
}

impl PoolFailure {
    pub(crate) fn protocol(what: &str) -> PoolFailure {
        PoolFailure::Protocol(what.to_string())
    }
}

impl From<PoolFailure> for Error {
    fn from(f: PoolFailure) -> Error {
        match f {
            PoolFailure::Setup { step, message } => Error::Setup {
                step: step.to_string(),
                source: io::Error::other(message),
            },
            PoolFailure::Protocol(what) => {
                CodecError::new(CodecErrorKind::Invalid(format!("pool protocol: {what}"))).into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_become_public_errors() {
        let e: Error = PoolFailure::Setup {
            step: "pool initializer",
            message: "no database".into(),
        }
        .into();
        assert!(
            matches!(&e, Error::Setup { step, source } if step == "pool initializer" && source.to_string() == "no database"),
            "{e:?}"
        );
        let e: Error = PoolFailure::protocol("results out of order").into();
        assert!(
            e.to_string()
                .contains("pool protocol: results out of order"),
            "{e}"
        );
        assert!(matches!(e, Error::Codec(_)));
    }
}
