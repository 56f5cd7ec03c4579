//! [`Imap`] and [`ImapUnordered`]: lazy iterators over a pool's results.

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::payload::{ArenaBlock, Payload};
use super::protocol::JobMsg;
use super::result::{decode_results, replicate, ItemFormat, JobHandle};
use crate::error::{Error, Result};

/// Largest chunk an adaptive `imap` builds.
const MAX_ADAPTIVE_CHUNK: usize = 4096;
/// Chunks (of the current size) in flight per worker for `imap`.
const WINDOW_PER_WORKER: usize = 4;
/// An adaptive chunk aims at this much work per worker.
const CHUNK_TARGET_SECS: f64 = 0.002;

/// Encodes up to `n` items into the buffer (or one large item into the
/// pool's arena).
type Produce<'a> = Box<dyn FnMut(&JobHandle, &mut Vec<u8>, usize) -> Produced + 'a>;

/// What one call of a [`Produce`] made.
struct Produced {
    /// Items encoded.
    count: u32,
    /// Their fixed-width kind (0: postcard).
    kind: u8,
    /// An item that could not be encoded, right after them.
    bad: Option<Error>,
    /// The input is exhausted.
    end: bool,
    /// The chunk is this one large item, not the buffer.
    block: Option<ArenaBlock>,
}

impl Produced {
    fn items(count: u32, kind: u8, bad: Option<Error>, end: bool) -> Produced {
        Produced {
            count,
            kind,
            bad,
            end,
            block: None,
        }
    }
}

/// Pulls the input lazily and keeps a bounded window of chunks in flight.
struct Feeder<'a> {
    job: Option<JobHandle>,
    produce: Produce<'a>,
    processes: usize,
    chunksize: Option<usize>,
    exhausted: bool,
    /// Items taken from the input (the next item's index).
    submitted: u64,
    /// Items whose result (or error) was handed out.
    yielded: u64,
    /// Items whose result (or error) arrived or was decided locally.
    received: u64,
    started: Instant,
}

impl<'a> Feeder<'a> {
    fn new<I, T>(
        job: Result<JobHandle>,
        items: I,
        processes: usize,
        chunksize: Option<usize>,
    ) -> (Feeder<'a>, Option<Error>)
    where
        I: Iterator<Item = T> + 'a,
        T: Serialize + DeserializeOwned,
    {
        let mut items = items;
        let mut format = ItemFormat::default();
        // An item that did not fit the last chunk's fixed-width kind, already
        // encoded in postcard: the next chunk's first (no `T` is kept, so
        // `T` need not outlive the iterator).
        let mut pending: Option<Vec<u8>> = None;
        // A large item met after others: the next chunk.
        let mut pending_block: Option<ArenaBlock> = None;
        let produce: Produce<'a> = Box::new(move |job: &JobHandle, buf: &mut Vec<u8>, n: usize| {
            if let Some(b) = pending_block.take() {
                return Produced {
                    block: Some(b),
                    ..Produced::items(1, 0, None, false)
                };
            }
            let mut count = 0u32;
            if let Some(first) = pending.take() {
                buf.extend_from_slice(&first);
                count = 1;
            }
            let mut kind = format.kind();
            while (count as usize) < n {
                let Some(item) = items.next() else {
                    return Produced::items(count, kind, None, true);
                };
                match job.large_item(&mut format, &item) {
                    Ok(Some(b)) if count == 0 => {
                        return Produced {
                            block: Some(b),
                            ..Produced::items(1, 0, None, false)
                        };
                    }
                    Ok(Some(b)) => {
                        pending_block = Some(b);
                        return Produced::items(count, kind, None, false);
                    }
                    Ok(None) => {}
                    Err(e) => return Produced::items(count, kind, Some(e), false),
                }
                match format.encode(&item, buf) {
                    Ok(true) => {}
                    Ok(false) => {
                        // Now postcard: this item starts the next chunk,
                        // or this one if it is still empty.
                        let mut alone = Vec::new();
                        if let Err(e) = format.encode(&item, &mut alone) {
                            return Produced::items(count, kind, Some(e), false);
                        }
                        if count > 0 {
                            pending = Some(alone);
                            return Produced::items(count, kind, None, false);
                        }
                        buf.extend_from_slice(&alone);
                    }
                    Err(e) => return Produced::items(count, kind, Some(e), false),
                }
                kind = format.kind();
                count += 1;
            }
            Produced::items(count, kind, None, false)
        });
        let (job, err) = match job {
            Ok(j) => (Some(j), None),
            Err(e) => (None, Some(e)),
        };
        let feeder = Feeder {
            exhausted: job.is_none(),
            job,
            produce,
            processes: processes.max(1),
            chunksize,
            submitted: 0,
            yielded: 0,
            received: 0,
            started: Instant::now(),
        };
        (feeder, err)
    }

    fn next_chunksize(&self) -> usize {
        if let Some(c) = self.chunksize {
            return c;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        if self.received == 0 || elapsed <= 0.0 {
            return 1;
        }
        let per_worker = self.received as f64 / elapsed / self.processes as f64;
        ((per_worker * CHUNK_TARGET_SECS) as usize).clamp(1, MAX_ADAPTIVE_CHUNK)
    }

    /// Submits chunks while the window has room. Items that could not be
    /// encoded are returned with their index; a pool that stopped taking
    /// work is reported as `Err`.
    fn fill(&mut self, local: &mut Vec<(u64, Error)>) -> Result<()> {
        while !self.exhausted {
            let size = self.next_chunksize();
            let window = (WINDOW_PER_WORKER * self.processes * size) as u64;
            if self.submitted - self.yielded >= window {
                break;
            }
            let job = self.job.as_ref().expect("a live feeder has a job");
            let mut buf = Vec::new();
            let Produced {
                count,
                kind,
                bad,
                end,
                block,
            } = (self.produce)(job, &mut buf, size);
            if count > 0 {
                let items = match block {
                    Some(b) => Payload::Arena(b),
                    None => buf.into(),
                };
                job.submit(self.submitted, count, kind, items)?;
                self.submitted += u64::from(count);
            }
            if let Some(e) = bad {
                local.push((self.submitted, e));
                self.submitted += 1;
                self.received += 1;
            }
            if end {
                self.exhausted = true;
                job.seal()?;
            }
        }
        Ok(())
    }

    /// Everything was submitted and has come back.
    fn drained(&self) -> bool {
        self.exhausted && self.received >= self.submitted
    }

    /// Waits for the job's next message and hands each result in it to
    /// `put(index, result)`. `Err` when the job was aborted (or the pool is
    /// gone): the caller fails what is still in flight.
    fn receive<R: DeserializeOwned>(&mut self, mut put: impl FnMut(u64, Result<R>)) -> Result<()> {
        let msg = self.job.as_ref().and_then(|job| job.rx.recv().ok());
        match msg {
            None => Err(Error::PoolClosed),
            Some(JobMsg::Results {
                base,
                count,
                kind,
                bytes,
                shared,
            }) => {
                self.received += u64::from(count);
                decode_results::<R>(base, count, kind, &bytes, shared.as_ref(), put);
                Ok(())
            }
            Some(JobMsg::Failed { index, error }) => {
                self.received += 1;
                put(index, Err(error));
                Ok(())
            }
            Some(JobMsg::Abort(e)) => Err(e),
        }
    }

    /// Stops feeding (the pool stopped); returns how many items are lost.
    fn stop(&mut self) -> u64 {
        self.exhausted = true;
        let lost = self.submitted - self.received;
        self.received = self.submitted;
        lost
    }

    fn note_done(&mut self) {
        if self.drained() {
            if let Some(job) = self.job.as_mut() {
                job.finished = true;
            }
        }
    }
}

/// The iterator of [`Pool::imap`](crate::Pool::imap): results in input
/// order, the input pulled lazily.
///
/// At most a few chunks per worker are in flight at any time, so an endless
/// input works and memory stays bounded. Each item yields its own `Result`:
/// a task that panicked, died or timed out is an `Err` for that item alone.
/// Dropping the iterator cancels the chunks not yet started.
pub struct Imap<'a, R> {
    feeder: Feeder<'a>,
    /// Results from index `next` on (`None`: not arrived yet).
    buffer: VecDeque<Option<Result<R>>>,
    next: u64,
    first_error: Option<Error>,
    local: Vec<(u64, Error)>,
}

impl<'a, R: DeserializeOwned> Imap<'a, R> {
    pub(crate) fn new<I, T>(
        job: Result<JobHandle>,
        items: I,
        processes: usize,
        chunksize: Option<usize>,
    ) -> Imap<'a, R>
    where
        I: Iterator<Item = T> + 'a,
        T: Serialize + DeserializeOwned,
    {
        let (feeder, first_error) = Feeder::new(job, items, processes, chunksize);
        Imap {
            feeder,
            buffer: VecDeque::new(),
            next: 0,
            first_error,
            local: Vec::new(),
        }
    }

    fn place(&mut self, index: u64, r: Result<R>) {
        place(&mut self.buffer, self.next, index, r);
    }

    fn abort(&mut self, e: &Error) {
        self.feeder.stop();
        for i in self.next..self.feeder.submitted {
            let off = (i - self.next) as usize;
            if self.buffer.get(off).is_none_or(Option::is_none) {
                self.place(i, Err(replicate(e)));
            }
        }
    }
}

impl<R: DeserializeOwned> Iterator for Imap<'_, R> {
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        if let Some(e) = self.first_error.take() {
            return Some(Err(e));
        }
        loop {
            if matches!(self.buffer.front(), Some(Some(_))) {
                let r = self.buffer.pop_front().flatten().expect("checked above");
                self.next += 1;
                self.feeder.yielded += 1;
                self.feeder.note_done();
                return Some(r);
            }
            if let Err(e) = self.feeder.fill(&mut self.local) {
                self.abort(&e);
            }
            for (i, e) in std::mem::take(&mut self.local) {
                self.place(i, Err(e));
            }
            if matches!(self.buffer.front(), Some(Some(_))) {
                continue;
            }
            if self.next >= self.feeder.submitted && self.feeder.exhausted {
                return None;
            }
            let (buffer, next) = (&mut self.buffer, self.next);
            if let Err(e) = self.feeder.receive(|i, r| place(buffer, next, i, r)) {
                self.abort(&e);
            }
        }
    }
}

/// Puts result `index` in `buffer`, which holds the results from index
/// `next` on (the first copy of a result wins).
fn place<R>(buffer: &mut VecDeque<Option<Result<R>>>, next: u64, index: u64, r: Result<R>) {
    let Some(off) = index.checked_sub(next) else {
        return;
    };
    let off = off as usize;
    if buffer.len() <= off {
        buffer.resize_with(off + 1, || None);
    }
    if buffer[off].is_none() {
        buffer[off] = Some(r);
    }
}

/// The iterator of [`Pool::imap_unordered`](crate::Pool::imap_unordered):
/// results in completion order, the input pulled lazily (see [`Imap`]).
pub struct ImapUnordered<'a, R> {
    feeder: Feeder<'a>,
    ready: VecDeque<Result<R>>,
    local: Vec<(u64, Error)>,
    _marker: PhantomData<fn() -> R>,
}

impl<'a, R: DeserializeOwned> ImapUnordered<'a, R> {
    pub(crate) fn new<I, T>(
        job: Result<JobHandle>,
        items: I,
        processes: usize,
        chunksize: Option<usize>,
    ) -> ImapUnordered<'a, R>
    where
        I: Iterator<Item = T> + 'a,
        T: Serialize + DeserializeOwned,
    {
        let (feeder, first_error) = Feeder::new(job, items, processes, chunksize);
        ImapUnordered {
            feeder,
            ready: first_error.map(Err).into_iter().collect(),
            local: Vec::new(),
            _marker: PhantomData,
        }
    }

    fn abort(&mut self, e: &Error) {
        for _ in 0..self.feeder.stop() {
            self.ready.push_back(Err(replicate(e)));
        }
    }
}

impl<R: DeserializeOwned> Iterator for ImapUnordered<'_, R> {
    type Item = Result<R>;

    fn next(&mut self) -> Option<Result<R>> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                self.feeder.yielded += 1;
                self.feeder.note_done();
                return Some(r);
            }
            if let Err(e) = self.feeder.fill(&mut self.local) {
                self.abort(&e);
            }
            for (_, e) in std::mem::take(&mut self.local) {
                self.ready.push_back(Err(e));
            }
            if !self.ready.is_empty() {
                continue;
            }
            if self.feeder.drained() {
                return None;
            }
            let ready = &mut self.ready;
            if let Err(e) = self.feeder.receive(|_, r| ready.push_back(r)) {
                self.abort(&e);
            }
        }
    }
}

impl<R> fmt::Debug for Imap<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Imap")
            .field("next", &self.next)
            .field("submitted", &self.feeder.submitted)
            .finish_non_exhaustive()
    }
}

impl<R> fmt::Debug for ImapUnordered<'_, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapUnordered")
            .field("submitted", &self.feeder.submitted)
            .field("received", &self.feeder.received)
            .finish_non_exhaustive()
    }
}
