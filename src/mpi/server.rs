//! A worker rank: it runs what rank 0 sends in its local fork
//! [`Pool`](crate::Pool), through the pool's raw jobs (one per job of rank
//! 0, fed with the chunks as they arrive), and sends the raw results back.

use std::collections::HashMap;
use std::time::Instant;

use mpi::topology::SimpleCommunicator;

use super::image;
use super::link::{self, Backoff, MAX_SLEEP};
use super::wire::{self, FromRank, ToRank, WireError};
use crate::error::Error;
use crate::pool::backend::{JobMsg, Mail, RawJob, TaskRef};
use crate::Pool;

pub(crate) struct Server {
    world: SimpleCommunicator,
    pool: Pool,
    jobs: HashMap<u64, Local>,
}

/// A job of rank 0 as this rank runs it.
struct Local {
    raw: RawJob,
    /// Items submitted whose result or failure has not come back yet.
    outstanding: u64,
}

impl Server {
    pub(crate) fn new(pool: Pool) -> Server {
        Server {
            world: SimpleCommunicator::world(),
            pool,
            jobs: HashMap::new(),
        }
    }

    /// Serves until rank 0 closes the pool; the local pool is closed (or
    /// terminated) and rank 0 told so on the way out.
    pub(crate) fn run(mut self) {
        let mut backoff = Backoff::for_this_thread();
        let now = loop {
            let mut progress = false;
            let mut close = None;
            while let Some(bytes) = link::try_recv_from(&self.world, 0) {
                progress = true;
                close = self.on_message(bytes);
                if close.is_some() {
                    break;
                }
            }
            if let Some(now) = close {
                break now;
            }
            progress |= self.forward();
            if progress {
                backoff.reset();
            } else if !self.wait_busy() {
                // Idle here: poll MPI as the back-off says.
                backoff.wait(MAX_SLEEP);
            }
        };
        self.jobs.clear();
        if now {
            self.pool.terminate();
        } else {
            self.pool.close();
            let _ = self.pool.join();
        }
        self.send(&FromRank::Bye, Vec::new());
    }

    /// Handles one message from rank 0: `Some(now)` for `Close`.
    fn on_message(&mut self, bytes: Vec<u8>) -> Option<bool> {
        let (header, body) = match wire::decode_owned::<ToRank>(bytes) {
            Ok(m) => m,
            Err(e) => {
                log::error!("multiproc: mpi: a message from rank 0 does not decode: {e}");
                return None;
            }
        };
        match header {
            ToRank::Job { job, f, tramp, ctx } => {
                let started = image::addr_of(f, "task function")
                    .and_then(|f| Ok((f, image::addr_of(tramp, "task trampoline")?)))
                    .and_then(|(f, tramp)| {
                        self.pool.raw_job(TaskRef { f, tramp }, ctx.then_some(body))
                    });
                match started {
                    Ok(raw) => {
                        self.jobs.insert(
                            job,
                            Local {
                                raw,
                                outstanding: 0,
                            },
                        );
                    }
                    Err(e) => self.abort(job, &e),
                }
            }
            ToRank::Chunk {
                job,
                base,
                count,
                kind,
            } => {
                // A job aborted here already told rank 0 so: drop its chunks.
                if let Some(local) = self.jobs.get_mut(&job) {
                    match local.raw.submit(base, count, kind, body) {
                        Ok(()) => local.outstanding += u64::from(count),
                        Err(e) => {
                            self.jobs.remove(&job);
                            self.abort(job, &e);
                        }
                    }
                }
            }
            ToRank::End { job } => {
                self.jobs.remove(&job);
            }
            ToRank::Close { now } => return Some(now),
            other => log::error!("multiproc: mpi: unexpected message from rank 0: {other:?}"),
        }
        None
    }

    fn abort(&self, job: u64, e: &Error) {
        self.send(
            &FromRank::Abort {
                job,
                error: WireError::from_error(e),
            },
            Vec::new(),
        );
    }

    /// While tasks run here, waits on their mailbox up to [`MAX_SLEEP`]
    /// (their results leave as soon as they come; rank 0 keeps enough
    /// chunks queued here that a new one noticed a little late costs
    /// nothing) and returns `true`; `false` when nothing runs here.
    fn wait_busy(&mut self) -> bool {
        let busy = self
            .jobs
            .iter_mut()
            .find(|(_, l)| l.outstanding > 0)
            .map(|(&job, l)| (job, l));
        let Some((job, local)) = busy else {
            return false;
        };
        match local.raw.recv_deadline(Instant::now() + MAX_SLEEP) {
            Mail::Msg(msg) => {
                local.outstanding = local.outstanding.saturating_sub(msg.items());
                forward_one(&self.world, job, msg);
            }
            Mail::Empty => {}
            Mail::Closed => {
                self.jobs.remove(&job);
            }
        }
        true
    }

    /// Sends rank 0 what the local pool produced; `true` if anything.
    fn forward(&mut self) -> bool {
        let mut progress = false;
        let mut gone = Vec::new();
        for (&job, local) in &mut self.jobs {
            loop {
                match local.raw.try_recv() {
                    Mail::Msg(msg) => {
                        progress = true;
                        local.outstanding = local.outstanding.saturating_sub(msg.items());
                        forward_one(&self.world, job, msg);
                    }
                    Mail::Empty => break,
                    Mail::Closed => {
                        gone.push(job);
                        break;
                    }
                }
            }
        }
        for job in gone {
            self.jobs.remove(&job);
        }
        progress
    }

    fn send(&self, header: &FromRank, body: Vec<u8>) {
        send(&self.world, header, body);
    }
}

fn forward_one(world: &SimpleCommunicator, job: u64, msg: JobMsg) {
    match msg {
        JobMsg::Results {
            base,
            count,
            kind,
            bytes,
            shared: _,
        } => send(
            world,
            &FromRank::Results {
                job,
                base,
                count,
                kind,
            },
            bytes,
        ),
        JobMsg::Failed { index, error } => send(
            world,
            &FromRank::Failed {
                job,
                index,
                error: WireError::from_error(&error),
            },
            Vec::new(),
        ),
        JobMsg::Abort(error) => send(
            world,
            &FromRank::Abort {
                job,
                error: WireError::from_error(&error),
            },
            Vec::new(),
        ),
    }
}

/// Sends `header` after `body` (given away: not copied) to rank 0.
fn send(world: &SimpleCommunicator, header: &FromRank, body: Vec<u8>) {
    match wire::encode_owned(header, body) {
        Ok(m) => link::send(world, 0, &m),
        Err(e) => log::error!("multiproc: mpi: cannot encode a message to rank 0: {e}"),
    }
}
