//! The callers' side of a job: submitting chunks, gathering results,
//! [`AsyncResult`].

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::mailbox::{mailbox, MailReceiver, RecvTimeoutError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::payload::{ArenaBlock, Payload, SHARED_MIN};
use super::protocol::{Command, JobMsg, TaskRef};
use super::wire;
use super::Inner;
use crate::codec;
use crate::error::{Error, Result};
use crate::region::Ranges;
use crate::sys::Slots;

/// One job seen from its caller: the channel its results arrive on.
/// Dropping it before the job finished cancels the job's queued chunks.
pub(crate) struct JobHandle {
    inner: Arc<Inner>,
    id: u64,
    pub(crate) rx: MailReceiver<JobMsg>,
    /// Every result arrived (the dispatcher forgot the job by itself).
    pub(crate) finished: bool,
}

impl JobHandle {
    /// Registers a job running `task` (and `ctx`) with the dispatcher.
    pub(crate) fn start(
        inner: &Arc<Inner>,
        task: TaskRef,
        ctx: Option<Vec<u8>>,
    ) -> Result<JobHandle> {
        if inner.is_closed() {
            return Err(Error::PoolClosed);
        }
        let id = inner.next_job();
        let (tx, rx) = mailbox();
        inner.send(Command::Job { id, tx, task, ctx })?;
        Ok(JobHandle {
            inner: Arc::clone(inner),
            id,
            rx,
            finished: false,
        })
    }

    /// Queues items `base..base + count`, encoded back to back in `items`
    /// (fixed-width of `kind`, or postcard for 0).
    pub(crate) fn submit(&self, base: u64, count: u32, kind: u8, items: Payload) -> Result<()> {
        self.inner.send(Command::Chunk {
            job: self.id,
            base,
            count,
            kind,
            items,
        })
    }

    /// `item`, encoded into the pool's arena, if it is large (and the pool
    /// has an arena with room): it then travels as a chunk of its own.
    #[inline]
    pub(crate) fn large_item<T: Serialize + DeserializeOwned>(
        &self,
        format: &mut ItemFormat,
        item: &T,
    ) -> Result<Option<ArenaBlock>> {
        // Items of a fixed-width kind are small: one test per item.
        if format.is_fixed() || self.inner.arena.is_none() || !format.is_postcard(item) {
            return Ok(None);
        }
        self.large_postcard_item(item)
    }

    #[inline(never)]
    fn large_postcard_item<T: Serialize>(&self, item: &T) -> Result<Option<ArenaBlock>> {
        let Some(arena) = &self.inner.arena else {
            return Ok(None);
        };
        if !codec::encodes_to_at_least(item, SHARED_MIN) {
            return Ok(None);
        }
        let len = codec::encoded_len(item)?;
        ArenaBlock::encode(arena, len, |buf| codec::encode_into(item, buf))
    }

    /// `bytes` in a block of the pool's arena, if they are large (and the
    /// arena has room).
    pub(crate) fn copy_to_arena(&self, bytes: &[u8]) -> Result<Option<ArenaBlock>> {
        match &self.inner.arena {
            Some(arena) if bytes.len() >= SHARED_MIN => {
                ArenaBlock::encode(arena, bytes.len(), |b| {
                    b.copy_from_slice(bytes);
                    Ok(bytes.len())
                })
            }
            _ => Ok(None),
        }
    }

    /// Tells the dispatcher no more chunks will come.
    pub(crate) fn seal(&self) -> Result<()> {
        self.inner.send(Command::Seal(self.id))
    }
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.inner.send(Command::EndJob(self.id));
        }
    }
}

/// How a job's items are encoded: fixed-width (`codec::fixed`) when the
/// first item has such an encoding that decodes back to itself, postcard
/// otherwise; a job whose items change kind falls back to postcard for
/// good, at a chunk boundary.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ItemFormat {
    /// 0: not decided yet; 255: postcard; else the fixed-width kind.
    state: u8,
}

const FORMAT_POSTCARD: u8 = 255;

impl ItemFormat {
    /// The kind for a chunk's header: 0 for postcard.
    pub(crate) fn kind(&self) -> u8 {
        match self.state {
            FORMAT_POSTCARD => 0,
            k => k,
        }
    }

    /// The format is a fixed-width kind.
    #[inline(always)]
    pub(crate) fn is_fixed(&self) -> bool {
        self.state != 0 && self.state != FORMAT_POSTCARD
    }

    /// Whether `item` is encoded in postcard (deciding the format with the
    /// first item): items of a fixed-width kind are never large.
    #[inline]
    pub(crate) fn is_postcard<T: Serialize + DeserializeOwned>(&mut self, item: &T) -> bool {
        if self.state == 0 {
            self.state = codec::fixed::round_trip_kind(item).unwrap_or(FORMAT_POSTCARD);
        }
        self.state == FORMAT_POSTCARD
    }

    /// Appends `item` to `buf` if it has the format's fixed-width kind
    /// (`false`, with `buf` unchanged, if not: [`encode`](Self::encode)
    /// then decides).
    #[inline(always)]
    pub(crate) fn encode_fixed<T: Serialize>(&self, item: &T, buf: &mut Vec<u8>) -> bool {
        let at = buf.len();
        if codec::fixed::encode(item, buf) == Some(self.state) {
            return true;
        }
        buf.truncate(at);
        false
    }

    /// Appends `item` to the chunk in `buf`. `Ok(false)`: the item does not
    /// fit the chunk's fixed-width kind; the format is now postcard, and the
    /// caller submits the chunk so far (if any) and pushes the item again.
    #[inline]
    pub(crate) fn encode<T: Serialize + DeserializeOwned>(
        &mut self,
        item: &T,
        buf: &mut Vec<u8>,
    ) -> Result<bool> {
        match self.state {
            FORMAT_POSTCARD => codec::encode_value(item, buf).map(|()| true),
            0 => {
                self.is_postcard(item);
                self.encode(item, buf)
            }
            _ => {
                if self.encode_fixed(item, buf) {
                    return Ok(true);
                }
                self.state = FORMAT_POSTCARD;
                Ok(false)
            }
        }
    }
}

/// Packs items into chunks of `chunksize` and submits them.
pub(crate) struct Chunker {
    chunksize: usize,
    buf: Vec<u8>,
    count: u32,
    base: u64,
    format: ItemFormat,
    /// The format of the items in `buf`.
    kind: u8,
}

impl Chunker {
    pub(crate) fn new(chunksize: usize) -> Chunker {
        Chunker {
            chunksize: chunksize.clamp(1, u32::MAX as usize),
            buf: Vec::new(),
            count: 0,
            base: 0,
            format: ItemFormat::default(),
            kind: 0,
        }
    }

    /// Index of the next item pushed.
    pub(crate) fn next_index(&self) -> u64 {
        self.base + u64::from(self.count)
    }

    /// Encodes one item; a full chunk is submitted. An item that cannot be
    /// encoded is an `Err` (and takes no index).
    #[inline(always)]
    pub(crate) fn push<T: Serialize + DeserializeOwned>(
        &mut self,
        job: &JobHandle,
        item: &T,
    ) -> Result<()> {
        // The tiny-item path: one test and the item's bytes.
        if !(self.format.is_fixed() && self.format.encode_fixed(item, &mut self.buf)) {
            if let Some(block) = job.large_item(&mut self.format, item)? {
                // A chunk of its own, after the items before it.
                self.flush(job)?;
                let base = self.base;
                self.base += 1;
                return job.submit(base, 1, 0, Payload::Arena(block));
            }
            if !self.format.encode(item, &mut self.buf)? {
                self.flush(job)?;
                self.format.encode(item, &mut self.buf)?;
            }
            self.kind = self.format.kind();
        }
        self.count += 1;
        if self.count as usize >= self.chunksize {
            self.flush(job)?;
        }
        Ok(())
    }

    /// Submits the partial chunk, if any.
    #[inline(never)]
    pub(crate) fn flush(&mut self, job: &JobHandle) -> Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let count = self.count;
        let base = self.base;
        self.base += u64::from(count);
        self.count = 0;
        // A large chunk of small items is copied into the arena (the
        // buffer stays, warm, for the next chunk): one copy here instead
        // of the dispatcher's and the socket's two.
        let items = match job.copy_to_arena(&self.buf)? {
            Some(block) => {
                self.buf.clear();
                Payload::Arena(block)
            }
            None => {
                let items = std::mem::take(&mut self.buf);
                self.buf = Vec::with_capacity(items.len());
                Payload::Inline(items)
            }
        };
        job.submit(base, count, self.kind, items)
    }
}

/// A copy of a pool-side error, for each item an abort fails.
pub(crate) fn replicate(e: &Error) -> Error {
    match e {
        Error::PoolClosed => Error::PoolClosed,
        Error::Timeout => Error::Timeout,
        Error::Died {
            pid,
            exitcode,
            rank,
        } => Error::Died {
            pid: *pid,
            exitcode: *exitcode,
            rank: *rank,
        },
        Error::Setup { step, source } => Error::Setup {
            step: step.clone(),
            source: io::Error::new(source.kind(), source.to_string()),
        },
        Error::Codec(c) => Error::Codec(c.clone()),
        Error::Panicked { message, location } => Error::Panicked {
            message: message.clone(),
            location: location.clone(),
        },
        other => Error::Io(io::Error::other(other.to_string())),
    }
}

/// Decodes the entries of a results message, handing each `(index,
/// result)` to `put`. A broken entry fails its item and the rest of the
/// message.
pub(crate) fn decode_results<R: DeserializeOwned>(
    base: u64,
    count: u32,
    kind: u8,
    bytes: &[u8],
    shared: Option<&Ranges>,
    mut put: impl FnMut(u64, Result<R>),
) {
    let mut entries = match wire::Entries::new(bytes, kind, shared) {
        Ok(e) => e,
        Err(e) => {
            for j in 0..u64::from(count) {
                put(base + j, Err(replicate(&e)));
            }
            return;
        }
    };
    // Decoded first, handed out once the frame checked out whole: entries
    // that do not decode to exactly their bytes (a width mismatch) fail
    // every item of the frame rather than hand out misread values.
    let mut got = Vec::with_capacity(count as usize);
    for _ in 0..count {
        match entries.next::<R>() {
            Ok(r) => got.push(r),
            Err(e) => {
                let n = got.len() as u64;
                for (k, r) in got.into_iter().enumerate() {
                    put(base + k as u64, r);
                }
                for j in n..u64::from(count) {
                    put(base + j, Err(replicate(&e)));
                }
                return;
            }
        }
    }
    if let Err(e) = entries.finish() {
        for j in 0..u64::from(count) {
            put(base + j, Err(replicate(&e)));
        }
        return;
    }
    for (k, r) in got.into_iter().enumerate() {
        put(base + k as u64, r);
    }
}

/// Collects the results of a job of known size (`map`, `apply`, and their
/// async forms). Stops at the first error.
///
/// Each result is decoded straight into its final slot of the output (see
/// [`Slots`]): no per-item `Option`, no second pass over the output.
pub(crate) struct Gather<R> {
    job: Option<JobHandle>,
    slots: Slots<R>,
    error: Option<Error>,
}

impl<R: DeserializeOwned> Gather<R> {
    pub(crate) fn new(job: JobHandle, total: usize) -> Gather<R> {
        Gather {
            job: Some(job),
            slots: Slots::new(total),
            error: None,
        }
    }

    /// A gather that already failed.
    pub(crate) fn failed(error: Error) -> Gather<R> {
        Gather {
            job: None,
            slots: Slots::new(0),
            error: Some(error),
        }
    }

    pub(crate) fn fail(&mut self, error: Error) {
        if self.error.is_none() {
            self.error = Some(error);
        }
    }

    fn complete(&self) -> bool {
        self.error.is_some() || self.slots.is_full()
    }

    /// Takes messages until every result arrived or one failed (`true`), or
    /// until `deadline` (`false`).
    pub(crate) fn pump(&mut self, deadline: Option<Instant>) -> bool {
        while !self.complete() {
            let Some(job) = self.job.as_ref() else {
                self.fail(Error::PoolClosed);
                break;
            };
            let msg = match deadline {
                None => job.rx.recv(),
                Some(d) => job.rx.recv_deadline(d),
            };
            match msg {
                Ok(m) => self.absorb(m),
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => self.fail(Error::PoolClosed),
            }
        }
        if self.error.is_none() {
            if let Some(job) = self.job.as_mut() {
                job.finished = true;
            }
        }
        true
    }

    fn absorb(&mut self, msg: JobMsg) {
        match msg {
            JobMsg::Results {
                base,
                count,
                kind,
                bytes,
                shared,
            } => {
                if self.error.is_some() {
                    return;
                }
                let mut entries = match wire::Entries::new(&bytes, kind, shared.as_ref()) {
                    Ok(e) => e,
                    Err(e) => return self.fail(e),
                };
                if entries.all_plain() {
                    // A frame of fixed-width values: one tight loop.
                    let at = usize::try_from(base).unwrap_or(usize::MAX);
                    let put = self
                        .slots
                        .put_run(at, count as usize, || entries.next_plain::<R>());
                    return match put.map(|()| entries.finish()) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) | Err(Some(e)) => self.fail(e),
                        Err(None) => self.fail(protocol_error("result index")),
                    };
                }
                for k in 0..u64::from(count) {
                    match entries.next::<R>() {
                        Ok(Ok(v)) => {
                            let i = usize::try_from(base + k).unwrap_or(usize::MAX);
                            if self.slots.put(i, v).is_err() {
                                return self.fail(protocol_error("result index"));
                            }
                        }
                        Ok(Err(e)) | Err(e) => return self.fail(e),
                    }
                }
                if let Err(e) = entries.finish() {
                    self.fail(e);
                }
            }
            JobMsg::Failed { error, .. } | JobMsg::Abort(error) => self.fail(error),
        }
    }

    /// The results in input order, or the first error.
    pub(crate) fn finish(mut self) -> Result<Vec<R>> {
        self.pump(None);
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let slots = std::mem::replace(&mut self.slots, Slots::new(0));
        slots
            .into_vec()
            .ok_or_else(|| protocol_error("missing results"))
    }
}

fn protocol_error(what: &str) -> Error {
    Error::Io(io::Error::other(format!("pool protocol: {what}")))
}

/// The boxed state behind an [`AsyncResult`].
pub(crate) trait Pending<R>: Send {
    fn pump(&mut self, deadline: Option<Instant>) -> bool;
    fn take(self: Box<Self>) -> Result<R>;
}

/// `apply_async`: one result.
pub(crate) struct One<R>(pub(crate) Gather<R>);
/// `map_async`: all of them.
pub(crate) struct All<R>(pub(crate) Gather<R>);

impl<R: DeserializeOwned + Send> Pending<R> for One<R> {
    fn pump(&mut self, deadline: Option<Instant>) -> bool {
        self.0.pump(deadline)
    }
    fn take(self: Box<Self>) -> Result<R> {
        let mut v = self.0.finish()?;
        v.pop().ok_or(Error::PoolClosed)
    }
}

impl<R: DeserializeOwned + Send> Pending<Vec<R>> for All<R> {
    fn pump(&mut self, deadline: Option<Instant>) -> bool {
        self.0.pump(deadline)
    }
    fn take(self: Box<Self>) -> Result<Vec<R>> {
        self.0.finish()
    }
}

/// The result of [`Pool::apply_async`](crate::Pool::apply_async) or
/// [`Pool::map_async`](crate::Pool::map_async), arriving in the background
/// (Python's `AsyncResult`).
///
/// The work runs whether or not the result is ever asked for; dropping the
/// `AsyncResult` cancels what has not started yet.
///
/// ```
/// use std::time::Duration;
/// let pool = multiproc::Pool::new(2)?;
/// let r = pool.apply_async(|x: u64| x + 1, 41);
/// assert!(r.wait(Duration::from_secs(10)));
/// assert!(r.ready());
/// assert_eq!(r.get()?, 42);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct AsyncResult<R> {
    inner: Mutex<Box<dyn Pending<R>>>,
}

impl<R> AsyncResult<R> {
    pub(crate) fn new(p: impl Pending<R> + 'static) -> AsyncResult<R> {
        AsyncResult {
            inner: Mutex::new(Box::new(p)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Pending<R>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the result (or the error) has arrived. Never blocks.
    pub fn ready(&self) -> bool {
        self.lock().pump(Some(Instant::now()))
    }

    /// Waits at most `timeout` for the result; `true` once it has arrived.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now()
            .checked_add(timeout)
            .unwrap_or_else(crate::connection::far_future);
        self.lock().pump(Some(deadline))
    }

    /// Waits for the result and returns it.
    ///
    /// # Errors
    /// The task's failure: [`Error::Panicked`], [`Error::Died`] (its
    /// worker was killed), [`Error::Timeout`] (past the pool's
    /// `task_timeout`), [`Error::Codec`] (a value that does not
    /// serialize); for `map_async` the first error of any item.
    /// [`Error::PoolClosed`] if the pool was closed before the task was
    /// submitted or terminated before it finished.
    pub fn get(self) -> Result<R> {
        let mut p = self.inner.into_inner().unwrap_or_else(|e| e.into_inner());
        p.pump(None);
        p.take()
    }
}

impl<R> fmt::Debug for AsyncResult<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult").finish_non_exhaustive()
    }
}
