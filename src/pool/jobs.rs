//! The dispatcher's table of jobs and its queue of chunks. It alone keeps
//! each job's count of live chunks (queued or in flight), so a job is
//! forgotten exactly when it is sealed (or ended by its caller) and its
//! last chunk left the pool.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::mailbox::MailSender;
use super::payload::Payload;
use super::protocol::{JobMsg, TaskRef};
use crate::error::Error;

/// A range `start..end` of one job's items, sharing the encoded bytes of
/// the chunk its caller sent (a piece re-queued after a crash keeps them;
/// the worker skips the first `start` items).
#[derive(Debug, Clone)]
pub(crate) struct Chunk {
    pub(crate) id: u64,
    pub(crate) job: u64,
    /// Job index of item 0 of `items`.
    pub(crate) base: u64,
    pub(crate) items: Arc<Payload>,
    pub(crate) start: u32,
    pub(crate) end: u32,
    /// The items' fixed-width kind (`codec::fixed`), 0 for postcard.
    pub(crate) kind: u8,
}

impl Chunk {
    pub(crate) fn len(&self) -> u32 {
        self.end - self.start
    }
}

struct Job {
    tx: MailSender<JobMsg>,
    task: TaskRef,
    ctx: Option<Arc<Vec<u8>>>,
    /// Chunks queued or in flight.
    chunks: usize,
    sealed: bool,
    ended: bool,
}

impl Job {
    fn done(&self) -> bool {
        (self.sealed || self.ended) && self.chunks == 0
    }
}

/// The jobs and the queue of their chunks waiting for a worker.
#[derive(Default)]
pub(crate) struct JobTable {
    jobs: HashMap<u64, Job>,
    pending: VecDeque<Chunk>,
    next_chunk: u64,
}

impl JobTable {
    pub(crate) fn add(
        &mut self,
        id: u64,
        tx: MailSender<JobMsg>,
        task: TaskRef,
        ctx: Option<Vec<u8>>,
    ) {
        self.jobs.insert(
            id,
            Job {
                tx,
                task,
                ctx: ctx.map(Arc::new),
                chunks: 0,
                sealed: false,
                ended: false,
            },
        );
    }

    /// Queues items `base..base + count` of `job` (dropped if the job is
    /// unknown or ended).
    pub(crate) fn queue(&mut self, job: u64, base: u64, count: u32, kind: u8, items: Payload) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        if j.ended || count == 0 {
            return;
        }
        j.chunks += 1;
        let id = self.next_id();
        self.pending.push_back(Chunk {
            id,
            job,
            base,
            items: Arc::new(items),
            start: 0,
            end: count,
            kind,
        });
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_chunk;
        self.next_chunk += 1;
        id
    }

    /// No more chunks will come for `job`.
    pub(crate) fn seal(&mut self, job: u64) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.sealed = true;
        }
    }

    /// The caller of `job` lost interest: its queued chunks are dropped,
    /// those in flight finish (their results go nowhere).
    pub(crate) fn end(&mut self, job: u64) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.ended = true;
            let before = self.pending.len();
            self.pending.retain(|c| c.job != job);
            j.chunks -= before - self.pending.len();
        }
    }

    /// The first queued chunk whose job still wants it, for a worker (it
    /// stays counted: it moves into flight). Chunks of ended jobs are
    /// dropped on the way.
    pub(crate) fn pop(&mut self) -> Option<Chunk> {
        while let Some(c) = self.pending.pop_front() {
            match self.jobs.get_mut(&c.job) {
                Some(j) if !j.ended => return Some(c),
                Some(j) => j.chunks -= 1,
                None => {}
            }
        }
        None
    }

    /// Cuts `chunk` to its first `keep` items and queues the rest in front,
    /// as a chunk of its own.
    pub(crate) fn split(&mut self, chunk: &mut Chunk, keep: u32) {
        if keep >= chunk.len() {
            return;
        }
        let mut rest = chunk.clone();
        rest.id = self.next_id();
        chunk.end = chunk.start + keep;
        rest.start = chunk.end;
        if let Some(j) = self.jobs.get_mut(&rest.job) {
            j.chunks += 1;
        }
        self.pending.push_front(rest);
    }

    /// A chunk of `job` left the pool: all its results came, or its worker
    /// died (what is left of it comes back through [`requeue`](Self::requeue)).
    pub(crate) fn retire(&mut self, job: u64) {
        if let Some(j) = self.jobs.get_mut(&job) {
            j.chunks -= 1;
        }
    }

    /// Queues `pieces` in front, in their order, with new ids (the pieces of
    /// a dead worker's chunks that must run again); those of ended jobs are
    /// dropped.
    pub(crate) fn requeue(&mut self, pieces: Vec<Chunk>) {
        for mut piece in pieces.into_iter().rev() {
            let id = self.next_id();
            if let Some(j) = self.jobs.get_mut(&piece.job) {
                if !j.ended {
                    j.chunks += 1;
                    piece.id = id;
                    self.pending.push_front(piece);
                }
            }
        }
    }

    /// How a worker runs `job`'s items, and its context, while the job lives.
    pub(crate) fn task(&self, job: u64) -> Option<(TaskRef, Option<&Arc<Vec<u8>>>)> {
        self.jobs.get(&job).map(|j| (j.task, j.ctx.as_ref()))
    }

    /// Sends `msg` to `job`'s caller, if the job still lives.
    pub(crate) fn send(&self, job: u64, msg: JobMsg) {
        if let Some(j) = self.jobs.get(&job) {
            j.tx.send(msg);
        }
    }

    /// Forgets the jobs that are sealed or ended with no chunk left and
    /// returns their ids (the workers drop their contexts).
    pub(crate) fn take_finished(&mut self) -> Vec<u64> {
        let done: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.done())
            .map(|(&id, _)| id)
            .collect();
        for id in &done {
            self.jobs.remove(id);
        }
        done
    }

    /// Fails every job with `error()` and drops the queue.
    pub(crate) fn abort_all(&mut self, error: impl Fn() -> Error) {
        self.pending.clear();
        for (_, j) in self.jobs.drain() {
            j.tx.send(JobMsg::Abort(error()));
        }
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Nothing queued, and every job sealed or ended (more work may still
    /// be in flight).
    pub(crate) fn all_submitted(&self) -> bool {
        self.pending.is_empty() && self.jobs.values().all(|j| j.ended || j.sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::mailbox::mailbox;
    use super::*;

    const TASK: TaskRef = TaskRef { f: 1, tramp: 2 };

    fn table_with_job(id: u64) -> (JobTable, super::super::mailbox::MailReceiver<JobMsg>) {
        let mut t = JobTable::default();
        let (tx, rx) = mailbox();
        t.add(id, tx, TASK, None);
        (t, rx)
    }

    #[test]
    fn a_job_is_finished_once_sealed_with_no_chunk_left() {
        let (mut t, _rx) = table_with_job(7);
        t.queue(7, 0, 10, 0, vec![0; 10].into());
        t.queue(7, 10, 5, 0, vec![0; 5].into());
        t.seal(7);
        assert!(t.take_finished().is_empty());
        let a = t.pop().unwrap();
        let b = t.pop().unwrap();
        assert_eq!((a.base, a.len(), b.base, b.len()), (0, 10, 10, 5));
        assert!(t.pop().is_none());
        t.retire(7);
        assert!(t.take_finished().is_empty(), "one chunk still in flight");
        t.retire(7);
        assert_eq!(t.take_finished(), vec![7]);
        assert!(t.task(7).is_none());
    }

    #[test]
    fn split_and_requeue_keep_the_count() {
        let (mut t, _rx) = table_with_job(1);
        t.queue(1, 0, 10, 0, vec![0; 10].into());
        t.seal(1);
        let mut c = t.pop().unwrap();
        t.split(&mut c, 4);
        assert_eq!((c.start, c.end), (0, 4));
        let rest = t.pop().unwrap();
        assert_eq!((rest.start, rest.end), (4, 10));
        assert_ne!(rest.id, c.id);
        // The worker holding `c` died after item 1: items 2 and 3 again.
        t.retire(1);
        let mut piece = c.clone();
        piece.start = 2;
        t.requeue(vec![piece]);
        let again = t.pop().unwrap();
        assert_eq!((again.start, again.end), (2, 4));
        t.retire(1);
        assert!(t.take_finished().is_empty(), "`rest` is in flight");
        t.retire(1);
        assert_eq!(t.take_finished(), vec![1]);
    }

    #[test]
    fn ending_a_job_drops_its_queue_and_abort_fails_all() {
        let (mut t, _rx) = table_with_job(1);
        let (tx2, rx2) = mailbox();
        t.add(2, tx2, TASK, Some(vec![9]));
        t.queue(1, 0, 3, 0, vec![0; 3].into());
        t.queue(2, 0, 3, 0, vec![0; 3].into());
        let in_flight = t.pop().unwrap();
        assert_eq!(in_flight.job, 1);
        t.end(2);
        assert!(!t.has_queued());
        assert!(t.take_finished().contains(&2));
        t.end(1);
        assert!(t.take_finished().is_empty(), "job 1's chunk is in flight");
        t.requeue(vec![in_flight]);
        assert!(!t.has_queued(), "an ended job's pieces are dropped");
        t.retire(1);
        assert_eq!(t.take_finished(), vec![1]);
        let (tx3, rx3) = mailbox();
        t.add(3, tx3, TASK, None);
        t.abort_all(|| Error::PoolClosed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        assert!(matches!(
            rx3.recv_deadline(deadline),
            Ok(JobMsg::Abort(Error::PoolClosed))
        ));
        drop(rx2);
    }
}
