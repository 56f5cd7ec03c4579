//! Rank 0's backend: the thread behind the [`Pool`](crate::Pool) front end
//! of an [`MpiPool`](super::MpiPool). It takes the front end's commands,
//! keeps the jobs and their queue of chunks in the pool's own
//! [`JobTable`], hands chunks to the worker ranks (a window of several in
//! flight per rank, so MPI's latency hides behind work) and forwards what
//! the ranks send back to each job's mailbox, as the local dispatcher does
//! with its workers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use mpi::topology::SimpleCommunicator;

use super::image;
use super::link::{self, Backoff, Pause, MAX_SLEEP};
use super::wire::{self, FromRank, ToRank};
use crate::error::{Error, Result};
use crate::pool::backend::{Chunk, Command, JobMsg, JobTable, Payload, TaskRef};
use crate::sys::PendingSend;

/// The longest sleep while sends are in flight (MPI moves a large message's
/// bytes only while both ends call into it).
const SENDING_SLEEP: Duration = Duration::from_micros(20);
/// Rank 0 yields between polls (rather than sleeping) while at most this
/// many items are in flight.
const SPIN_ITEMS: u64 = 64;
/// How long closing waits for the last sends to be taken.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// A chunk a rank holds.
#[derive(Debug)]
struct InFlight {
    job: u64,
    base: u64,
    count: u64,
    /// Items without a result or failure yet.
    left: u64,
}

#[derive(Debug, Default)]
struct Rank {
    inflight: Vec<InFlight>,
    /// Jobs this rank was told about (`ToRank::Job`) and not yet told to end.
    known: HashSet<u64>,
    /// Chunks in flight allowed.
    window: usize,
}

/// The chunks in flight per rank for a rank of `workers` workers: two per
/// worker (one running, one waiting) plus two to cover the round trip.
pub(crate) fn window_for(workers: usize) -> usize {
    2 * workers.max(1) + 2
}

pub(crate) struct Leader {
    world: SimpleCommunicator,
    rx: Receiver<Command>,
    jobs: JobTable,
    /// Indexed by rank; rank 0's entry is unused.
    ranks: Vec<Rank>,
    sends: Vec<PendingSend>,
    closing: bool,
    next_rank: usize,
}

impl Leader {
    /// The backend of a job whose rank `r` runs `workers[r]` workers.
    pub(crate) fn new(rx: Receiver<Command>, workers: &[usize]) -> Leader {
        Leader {
            world: SimpleCommunicator::world(),
            rx,
            jobs: JobTable::default(),
            ranks: workers
                .iter()
                .map(|&w| Rank {
                    window: window_for(w),
                    ..Rank::default()
                })
                .collect(),
            sends: Vec::new(),
            closing: false,
            next_rank: 1,
        }
    }

    /// The thread's body: serves until closed and idle, or terminated.
    pub(crate) fn run(mut self) {
        let mut backoff = Backoff::for_this_thread();
        loop {
            let mut progress = false;
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => {
                        progress = true;
                        if !self.command(cmd) {
                            return self.stop(true);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return self.stop(true),
                }
            }
            progress |= self.assign();
            self.sends.retain_mut(|s| !s.test());
            while let Some((src, bytes)) = link::try_recv_any(&self.world) {
                progress = true;
                self.on_message(src, bytes);
            }
            self.forget_finished();
            if self.closing && self.idle() {
                return self.stop(false);
            }
            if progress {
                backoff.reset();
                continue;
            }
            let cap = if self.sends.is_empty() {
                MAX_SLEEP
            } else {
                SENDING_SLEEP
            };
            // Yield while hot only when little is in flight (an `apply`
            // waits for its one reply); a stream of results sleeps briefly
            // between polls, leaving the CPU to the work.
            let spin = self.inflight_items() <= SPIN_ITEMS;
            let d = match backoff.next_or_sleep(cap, spin) {
                Pause::Yield => {
                    std::thread::yield_now();
                    continue;
                }
                Pause::Sleep(d) => d,
            };
            // Sleeps on the command channel: a new command wakes it.
            match self.rx.recv_timeout(d) {
                Ok(cmd) => {
                    backoff.reset();
                    if !self.command(cmd) {
                        return self.stop(true);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.stop(true),
            }
        }
    }

    /// Handles one command; `false` for `Terminate`.
    fn command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Job { id, tx, task, ctx } => match offsets(task) {
                Ok(_) => self.jobs.add(id, tx, task, ctx),
                // Not added: its chunks, seal and end are ignored.
                Err(e) => tx.send(JobMsg::Abort(e)),
            },
            Command::Chunk {
                job,
                base,
                count,
                kind,
                items,
            } => self.jobs.queue(job, base, count, kind, items),
            Command::Seal(job) => self.jobs.seal(job),
            Command::EndJob(job) => self.jobs.end(job),
            Command::Close => self.closing = true,
            Command::Terminate => return false,
        }
        true
    }

    /// Hands queued chunks to ranks, one at a time round-robin, while their
    /// windows have room. `true` if it sent any.
    fn assign(&mut self) -> bool {
        let n = self.ranks.len();
        let mut sent = false;
        while self.jobs.has_queued() {
            let mut any = false;
            for _ in 1..n {
                let r = self.next_rank;
                self.next_rank = if r + 1 >= n { 1 } else { r + 1 };
                if self.ranks[r].inflight.len() >= self.ranks[r].window {
                    continue;
                }
                let Some(chunk) = self.jobs.pop() else {
                    break;
                };
                self.send_chunk(r, chunk);
                any = true;
            }
            if !any {
                break;
            }
            sent = true;
        }
        sent
    }

    fn send_chunk(&mut self, r: usize, chunk: Chunk) {
        let Some((task, ctx)) = self.jobs.task(chunk.job) else {
            return;
        };
        if !self.ranks[r].known.contains(&chunk.job) {
            let (f, tramp) = offsets(task).expect("checked when the job was added");
            let header = ToRank::Job {
                job: chunk.job,
                f,
                tramp,
                ctx: ctx.is_some(),
            };
            let body: &[u8] = ctx.map(|c| &c[..]).unwrap_or(&[]);
            match wire::encode(&header, body) {
                Ok(m) => self.isend(r, m),
                Err(e) => return self.abort_chunk(chunk.job, e),
            }
            self.ranks[r].known.insert(chunk.job);
        }
        // The front end's chunks are never split here: `start` is 0.
        debug_assert_eq!(chunk.start, 0);
        let header = ToRank::Chunk {
            job: chunk.job,
            base: chunk.base,
            count: chunk.len(),
            kind: chunk.kind,
        };
        let (job, base, count) = (chunk.job, chunk.base, u64::from(chunk.len()));
        // The items are the front end's own (no arena, never split here):
        // given to the message, not copied, when nothing else holds them.
        let msg = match Arc::try_unwrap(chunk.items) {
            Ok(Payload::Inline(items)) => wire::encode_owned(&header, items),
            Ok(other) => wire::encode(&header, &other[..]),
            Err(shared) => wire::encode(&header, &shared[..]),
        };
        match msg {
            Ok(m) => {
                self.isend(r, m);
                self.ranks[r].inflight.push(InFlight {
                    job,
                    base,
                    count,
                    left: count,
                });
            }
            Err(e) => self.abort_chunk(job, e),
        }
    }

    /// A chunk of `job` cannot be sent (`e`): the job ends with `e`.
    fn abort_chunk(&mut self, job: u64, e: Error) {
        self.jobs.send(job, JobMsg::Abort(e));
        self.jobs.retire(job);
        self.jobs.end(job);
    }

    fn isend(&mut self, r: usize, bytes: Vec<u8>) {
        let mut s = PendingSend::start(&self.world, r as i32, wire::TAG, bytes);
        if !s.test() {
            self.sends.push(s);
        }
    }

    fn on_message(&mut self, src: usize, bytes: Vec<u8>) {
        if let Some((header, body)) = decode_from(src, bytes) {
            self.handle(src, header, body);
        }
    }

    fn handle(&mut self, src: usize, header: FromRank, body: Vec<u8>) {
        match header {
            FromRank::Results {
                job,
                base,
                count,
                kind,
            } => {
                self.jobs.send(
                    job,
                    JobMsg::Results {
                        base,
                        count,
                        kind,
                        bytes: body,
                        // Worker ranks send every value inline.
                        shared: None,
                    },
                );
                self.account(src, job, base, u64::from(count));
            }
            FromRank::Failed { job, index, error } => {
                self.jobs.send(
                    job,
                    JobMsg::Failed {
                        index,
                        error: error.into_error(src),
                    },
                );
                self.account(src, job, index, 1);
            }
            FromRank::Abort { job, error } => {
                self.jobs.send(job, JobMsg::Abort(error.into_error(src)));
                let jobs = &mut self.jobs;
                self.ranks[src].inflight.retain(|c| {
                    if c.job == job {
                        jobs.retire(job);
                    }
                    c.job != job
                });
                self.jobs.end(job);
            }
            other => log::error!("multiproc: mpi: unexpected message from rank {src}: {other:?}"),
        }
    }

    /// `n` items from `index` of `job` came back from rank `src`: the chunk
    /// holding them leaves the window once all its items did.
    fn account(&mut self, src: usize, job: u64, index: u64, n: u64) {
        let Some(rank) = self.ranks.get_mut(src) else {
            return;
        };
        let Some(k) = rank
            .inflight
            .iter()
            .position(|c| c.job == job && c.base <= index && index < c.base + c.count)
        else {
            return;
        };
        let c = &mut rank.inflight[k];
        c.left = c.left.saturating_sub(n);
        if c.left == 0 {
            rank.inflight.remove(k);
            self.jobs.retire(job);
        }
    }

    /// Forgets finished jobs; the ranks that knew them drop them too.
    fn forget_finished(&mut self) {
        for job in self.jobs.take_finished() {
            for r in 1..self.ranks.len() {
                if self.ranks[r].known.remove(&job) {
                    if let Ok(m) = wire::encode(&ToRank::End { job }, &[]) {
                        self.isend(r, m);
                    }
                }
            }
        }
    }

    /// Items on the ranks without a result yet.
    fn inflight_items(&self) -> u64 {
        self.ranks
            .iter()
            .flat_map(|r| &r.inflight)
            .map(|c| c.left)
            .sum()
    }

    fn idle(&self) -> bool {
        self.jobs.all_submitted() && self.ranks.iter().all(|r| r.inflight.is_empty())
    }

    /// Tells every rank to close (`now`: drop its work), and waits
    /// (bounded) until every rank said goodbye, so none is still sending
    /// when rank 0 finalizes MPI; fails what is left.
    fn stop(mut self, now: bool) {
        for r in 1..self.ranks.len() {
            if let Ok(m) = wire::encode(&ToRank::Close { now }, &[]) {
                self.isend(r, m);
            }
        }
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let mut backoff = Backoff::default();
        let mut left = self.ranks.len().saturating_sub(1);
        while (left > 0 || !self.sends.is_empty()) && Instant::now() < deadline {
            self.sends.retain_mut(|s| !s.test());
            let mut got = false;
            while let Some((src, bytes)) = link::try_recv_any(&self.world) {
                got = true;
                match decode_from(src, bytes) {
                    Some((FromRank::Bye, _)) => left -= 1,
                    Some((header, body)) if !now => self.handle(src, header, body),
                    _ => {}
                }
            }
            if got {
                backoff.reset();
            }
            backoff.wait(SENDING_SLEEP);
        }
        if left > 0 {
            log::error!("multiproc: mpi: {left} ranks did not answer the close in time");
        }
        self.jobs.abort_all(|| Error::PoolClosed);
    }
}

/// A message from rank `src`, decoded (logged when it does not decode).
fn decode_from(src: usize, bytes: Vec<u8>) -> Option<(FromRank, Vec<u8>)> {
    match wire::decode_owned::<FromRank>(bytes) {
        Ok(m) => Some(m),
        Err(e) => {
            log::error!("multiproc: mpi: a message from rank {src} does not decode: {e}");
            None
        }
    }
}

/// The task's two functions as offsets, checked to be in the executable.
fn offsets(task: TaskRef) -> Result<(u64, u64)> {
    Ok((
        image::offset_of(task.f, "task function")?,
        image::offset_of(task.tramp, "task trampoline")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_covers_workers_and_the_round_trip() {
        assert_eq!(window_for(0), 4);
        assert_eq!(window_for(1), 4);
        assert_eq!(window_for(4), 10);
    }
}
