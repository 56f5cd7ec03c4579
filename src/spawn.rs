//! [`spawn`]: a child process that returns a value.

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::Fill;
use crate::connection::{pipe, Connection};
use crate::error::{CodecError, CodecErrorKind, Error, Result};
use crate::process::Process;
use crate::sys;
use crate::unwind::{self, PanicReport};

/// What the child sends back: one frame, then it exits.
#[derive(Serialize, Deserialize)]
enum Outcome<T> {
    Value(T),
    Panicked(PanicReport),
    EncodeFailed(String),
}

/// Runs `f` in a forked child and returns a handle to its result.
///
/// The child runs `f` under `catch_unwind` and sends back `Ok(value)` or the
/// panic over a socket pair; [`JoinHandle::join`] gives the value,
/// [`Error::Panicked`] with the child's message, or [`Error::Died`] if the
/// child ended without a result (a signal, `abort`, [`exit`](crate::exit)).
/// The child is an ordinary, non-daemonic [`Process`] (named `Process-N`),
/// so the at-exit finalizer waits for it.
///
/// ```
/// let h = multiproc::spawn(|| (1..=10u64).product::<u64>())?;
/// assert_eq!(h.join()?, 3628800);
///
/// let h = multiproc::spawn(|| -> u64 { panic!("no luck") })?;
/// assert_eq!(h.join().unwrap_err().panic_message(), Some("no luck"));
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// The value crosses a process boundary, so it must be serializable:
///
/// ```compile_fail
/// struct NotSerde;
/// let h = multiproc::spawn(|| NotSerde);
/// ```
///
/// # Errors
/// [`Error::Io`] if the socket pair cannot be created or the fork fails.
pub fn spawn<F, T>(f: F) -> Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Serialize + DeserializeOwned,
{
    let (parent_end, mut child_end) = pipe()?;
    let mut process = Process::new(move || {
        let outcome = match unwind::catch(f) {
            Ok(value) => Outcome::Value(value),
            Err(report) => Outcome::Panicked(report),
        };
        let code = i32::from(matches!(outcome, Outcome::Panicked(_)));
        if let Err(e) = child_end.send(&outcome) {
            if matches!(e, Error::Codec(_)) {
                let _ = child_end.send(&Outcome::<T>::EncodeFailed(e.to_string()));
            }
        }
        drop(child_end);
        if code != 0 {
            crate::exit(code);
        }
    });
    process.start()?;
    Ok(JoinHandle {
        process,
        conn: parent_end,
        outcome: None,
        delivered: false,
        _marker: PhantomData,
    })
}

/// The handle of a child started with [`spawn`]: join it for its value.
///
/// Dropping the handle neither kills nor waits for the child; the at-exit
/// finalizer waits for it.
pub struct JoinHandle<T> {
    process: Process,
    conn: Connection,
    /// The child's result, once received (kept across `join_timeout` calls
    /// that time out while the child is still finishing).
    outcome: Option<Result<T>>,
    /// Set once the result (or the error) has been returned.
    delivered: bool,
    _marker: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> JoinHandle<T> {
    /// Waits for the child and returns its value.
    ///
    /// # Errors
    /// [`Error::Panicked`] if `f` panicked; [`Error::Died`] if the child ended
    /// without sending a result; [`Error::Codec`] if the result could not be
    /// encoded in the child or decoded here; [`Error::Io`] if waiting fails.
    pub fn join(mut self) -> Result<T> {
        match self.join_deadline(None)? {
            Some(v) => Ok(v),
            None => unreachable!("a join without a deadline cannot time out"),
        }
    }

    /// Waits at most `timeout`: `Ok(None)` if the child has not finished.
    /// A partly received result is kept for the next call.
    ///
    /// # Errors
    /// As [`join`](JoinHandle::join). Once a value or an error has been
    /// returned, later calls return an [`Error::Io`].
    pub fn join_timeout(&mut self, timeout: Duration) -> Result<Option<T>> {
        self.join_deadline(Some(
            Instant::now()
                .checked_add(timeout)
                .unwrap_or_else(crate::connection::far_future),
        ))
    }

    fn join_deadline(&mut self, deadline: Option<Instant>) -> Result<Option<T>> {
        if self.delivered {
            return Err(Error::Io(std::io::Error::other(
                "the child's result was already returned",
            )));
        }
        let popen = self.process.popen().ok_or(Error::NotStarted)?;
        while self.outcome.is_none() {
            if let Some(outcome) = self.conn.try_take::<Outcome<T>>()? {
                self.outcome = Some(outcome.into_result());
                break;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let ready = sys::poll_readable(&[self.conn.as_fd(), popen.sentinel()], left)?;
            if ready.is_empty() {
                return Ok(None);
            }
            if ready.contains(&0) {
                if self.conn.fill_once()? == Fill::Eof {
                    return self.died();
                }
            } else if popen.poll()?.is_some() {
                // The child is gone. Whatever it sent is in the socket buffer
                // (a sibling forked by another thread may hold a copy of its
                // end, so EOF may never come): drain what is readable now.
                while self.outcome.is_none() && self.conn.poll(Duration::ZERO)? {
                    if self.conn.fill_once()? == Fill::Eof {
                        break;
                    }
                    if let Some(outcome) = self.conn.try_take::<Outcome<T>>()? {
                        self.outcome = Some(outcome.into_result());
                    }
                }
                if self.outcome.is_none() {
                    return self.died();
                }
            }
        }
        // The child sends its result as its last act: wait for its exit.
        let popen = self.process.popen().ok_or(Error::NotStarted)?;
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if popen.wait(left)?.is_none() {
            return Ok(None);
        }
        crate::process::forget_child(popen.pid());
        self.delivered = true;
        self.outcome.take().expect("outcome set above").map(Some)
    }

    fn died(&mut self) -> Result<Option<T>> {
        self.delivered = true;
        let pid = self.pid();
        let exitcode = self.process.join()?;
        Err(Error::Died {
            pid,
            exitcode,
            rank: None,
        })
    }
}

impl<T> Outcome<T> {
    fn into_result(self) -> Result<T> {
        match self {
            Outcome::Value(v) => Ok(v),
            Outcome::Panicked(report) => Err(report.into()),
            Outcome::EncodeFailed(msg) => Err(CodecError::new(CodecErrorKind::Encode(msg)).into()),
        }
    }
}

impl<T> JoinHandle<T> {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.process
            .pid()
            .expect("a JoinHandle's process is started")
    }

    /// Sends `SIGKILL` to the child; [`join`](JoinHandle::join) then
    /// returns [`Error::Died`] with exit code -9.
    ///
    /// # Errors
    /// [`Error::Io`] if `kill(2)` fails.
    pub fn kill(&self) -> Result<()> {
        self.process.kill()
    }

    /// Sends `SIGTERM` to the child.
    ///
    /// # Errors
    /// [`Error::Io`] if `kill(2)` fails.
    pub fn terminate(&self) -> Result<()> {
        self.process.terminate()
    }

    /// Whether the child has exited.
    pub fn is_finished(&self) -> bool {
        !self.process.is_alive()
    }

    /// The child's exit code, once it has exited and been reaped.
    pub fn exitcode(&self) -> Option<i32> {
        self.process.exitcode()
    }

    /// The underlying [`Process`].
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// The child's sentinel (see [`Process::sentinel`]).
    pub fn sentinel(&self) -> BorrowedFd<'_> {
        self.process
            .sentinel()
            .expect("a JoinHandle's process is started")
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("process", &self.process)
            .finish()
    }
}
