//! The pool's backend seam: the front end ([`Pool`]'s methods, result
//! gathering, [`AsyncResult`](super::AsyncResult), the imap iterators)
//! talks to whatever runs its work only through [`Command`]s and per-job
//! [`JobMsg`] mailboxes. The local dispatcher is one backend; this module
//! lets another layer be one too, and lets it drive a local pool with raw
//! jobs:
//!
//! - [`Pool::with_backend`]: a `Pool` front end whose commands go to a
//!   backend thread given here (MPI's rank 0 answers them from other
//!   machines), reusing [`JobTable`] for its jobs and queue.
//! - [`Pool::raw_job`] and [`RawJob`]: submit a job as a task reference and
//!   chunks of already-encoded items, and take its raw [`JobMsg`]s back
//!   (an MPI worker rank runs what rank 0 sent in its local fork pool).
//!
//! Item and result bytes are only read through `&x[..]`. A backend's front
//! end has no arena (items arrive inline), and
//! a pool that serves raw jobs is built with
//! [`PoolBuilder::inline_results`](super::PoolBuilder::inline_results), so
//! result bytes never name a worker's shared region.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use crossbeam_channel::Receiver;

use super::mailbox::RecvTimeoutError;
use super::protocol::Wake;
use super::result::JobHandle;
use super::{Inner, Pool};
use crate::error::Result;

pub(crate) use super::jobs::{Chunk, JobTable};
pub(crate) use super::payload::Payload;
pub(crate) use super::protocol::{Command, JobMsg, TaskRef};

impl Pool {
    /// A pool front end of `processes` workers whose commands are served by
    /// `run`, on a thread of its own named `name`: it takes [`Command`]s from
    /// the receiver and answers each job on the mailbox given in its
    /// `Command::Job`. It must return after `Close` once every job is done,
    /// or at once after `Terminate` or when the receiver disconnects;
    /// [`Pool::join`] waits for it.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) if the thread (or the unused wake-up
    /// socket the front end writes to) cannot be created.
    pub(crate) fn with_backend(
        processes: usize,
        name: &str,
        run: impl FnOnce(Receiver<Command>) + Send + 'static,
    ) -> Result<Pool> {
        let (tx, rx) = crossbeam_channel::unbounded();
        // The front end notifies a wake-up socket after each command; a
        // backend that waits on the channel itself does not read it, so
        // only the first notification writes (see `Wake`).
        let (wake, _unread) = Wake::new()?;
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || run(rx))?;
        Ok(Pool {
            inner: Arc::new(Inner {
                tx,
                wake: Arc::new(wake),
                closed: AtomicBool::new(false),
                next_job: AtomicU64::new(1),
                processes,
                thread: Mutex::new(Some(thread)),
                // Large items cross to this backend as inline bytes.
                arena: None,
            }),
        })
    }

    /// Starts a job running `task` (with the encoded context `ctx`) on this
    /// pool's workers, fed with raw chunks.
    ///
    /// # Errors
    /// [`Error::PoolClosed`](crate::Error::PoolClosed) once the pool is
    /// closed.
    pub(crate) fn raw_job(&self, task: TaskRef, ctx: Option<Vec<u8>>) -> Result<RawJob> {
        JobHandle::start(&self.inner, task, ctx).map(RawJob)
    }
}

/// A job submitted as bytes; its results come back as the raw messages the
/// pool's callers decode. Dropping it ends the job (queued chunks dropped).
pub(crate) struct RawJob(JobHandle);

/// What [`RawJob::try_recv`] found.
#[derive(Debug)]
pub(crate) enum Mail {
    Msg(JobMsg),
    Empty,
    /// The pool forgot the job (ended, or aborted): nothing more comes.
    Closed,
}

impl RawJob {
    /// Queues items `base..base + count` (job indices), encoded back to back
    /// as the front end encodes them (fixed-width of `kind`, or postcard for
    /// 0). Results carry the same indices.
    ///
    /// # Errors
    /// [`Error::PoolClosed`](crate::Error::PoolClosed) once the pool stopped.
    pub(crate) fn submit(&self, base: u64, count: u32, kind: u8, items: Vec<u8>) -> Result<()> {
        self.0.submit(base, count, kind, Payload::Inline(items))
    }

    /// The next message of the job, without waiting.
    pub(crate) fn try_recv(&self) -> Mail {
        self.recv_deadline(Instant::now())
    }

    /// The next message of the job, waiting until `deadline` at most.
    pub(crate) fn recv_deadline(&self, deadline: Instant) -> Mail {
        match self.0.rx.recv_deadline(deadline) {
            Ok(m) => Mail::Msg(m),
            Err(RecvTimeoutError::Timeout) => Mail::Empty,
            Err(RecvTimeoutError::Disconnected) => Mail::Closed,
        }
    }
}

impl std::fmt::Debug for RawJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawJob").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::pool::mailbox::MailSender;

    fn square(x: u64) -> u64 {
        x * x
    }

    fn crash_on_3(x: u32) -> u32 {
        if x == 3 {
            std::process::abort();
        }
        x
    }

    /// A backend that forwards every job to a local pool as a raw job and
    /// its messages back: what the MPI backend does, without MPI.
    fn proxy(local: Pool, rx: Receiver<Command>) {
        struct Proxied {
            raw: RawJob,
            tx: MailSender<JobMsg>,
            /// Items submitted and not yet answered.
            left: u64,
            sealed: bool,
        }
        let mut jobs: HashMap<u64, Proxied> = HashMap::new();
        let mut closing = false;
        loop {
            match rx.recv_timeout(Duration::from_millis(1)) {
                Ok(Command::Job { id, tx, task, ctx }) => match local.raw_job(task, ctx) {
                    Ok(raw) => {
                        let p = Proxied {
                            raw,
                            tx,
                            left: 0,
                            sealed: false,
                        };
                        jobs.insert(id, p);
                    }
                    Err(e) => tx.send(JobMsg::Abort(e)),
                },
                Ok(Command::Chunk {
                    job,
                    base,
                    count,
                    kind,
                    items,
                }) => {
                    if let Some(p) = jobs.get_mut(&job) {
                        p.raw.submit(base, count, kind, items[..].to_vec()).unwrap();
                        p.left += u64::from(count);
                    }
                }
                Ok(Command::Seal(job)) => {
                    if let Some(p) = jobs.get_mut(&job) {
                        p.sealed = true;
                    }
                }
                Ok(Command::EndJob(job)) => {
                    jobs.remove(&job);
                }
                Ok(Command::Close) => closing = true,
                Ok(Command::Terminate) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            }
            // Forward what came; a job is over once sealed and answered.
            jobs.retain(|_, p| loop {
                match p.raw.try_recv() {
                    Mail::Msg(m) => {
                        p.left = p.left.saturating_sub(m.items());
                        p.tx.send(m);
                    }
                    Mail::Empty => return !(p.sealed && p.left == 0),
                    Mail::Closed => return false,
                }
            });
            if closing && jobs.is_empty() {
                return;
            }
        }
    }

    #[test]
    fn a_front_end_over_another_backend_gathers_raw_results() {
        let local = Pool::new(2).unwrap();
        let pool = Pool::with_backend(2, "test-proxy", move |rx| proxy(local, rx)).unwrap();
        assert_eq!(pool.processes(), 2);
        let want: Vec<u64> = (0..1000u64).map(square).collect();
        assert_eq!(pool.map(square, 0..1000u64).unwrap(), want);
        assert_eq!(pool.map_chunked(square, 0..1000u64, 7).unwrap(), want);
        let got: Vec<u64> = pool.imap(square, 0..500u64).collect::<Result<_>>().unwrap();
        assert_eq!(got, want[..500]);
        assert_eq!(pool.apply(square, 12).unwrap(), 144);
        // A crash fails its item only, through the seam.
        let r: Vec<_> = pool.imap(crash_on_3, 0..6u32).collect();
        assert!(r[3].as_ref().unwrap_err().is_died(), "{:?}", r[3]);
        assert_eq!(r[5].as_ref().ok(), Some(&5));
        pool.close();
        pool.join().unwrap();
    }
}
