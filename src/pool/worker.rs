//! The worker: the child side of the pool. Reads chunks, runs their items
//! through the job's trampoline, streams results back.

use std::any::Any;
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::payload::ArgsArena;
use super::wire::{self, Items, ResultsFrame, Sink, ToWorker};
use crate::codec::{self, Fill, FrameReader, DEFAULT_MAX_FRAME_LEN};
use crate::region::Region;
use crate::sys::{self, Progress, SharedMapping, SharedProgress, Sig, Trampoline};
use crate::unwind;

/// Results are written once this long has passed since the last write
/// (checked between items, on the coarse clock: so within one scheduler tick
/// of it, 1 to 4 ms), when the chunk ends with no other chunk queued, or
/// when this many bytes are buffered.
const FLUSH_INTERVAL_NS: u64 = 1_000_000;
const FLUSH_BYTES: usize = 256 * 1024;
/// The clock is read every this many items at most: after items too fast
/// for the coarse clock to move, the stride doubles up to this; a read that
/// sees time pass sets it back to 1 (so slow items still stream at once).
const MAX_CLOCK_STRIDE: u32 = 64;

/// Everything a worker needs, moved into the child at the fork.
pub(crate) struct WorkerSpec {
    /// The worker's end of its socket pair.
    pub(crate) sock: OwnedFd,
    /// Inherited fds of the pool that the worker must close (the parent's
    /// ends of every socket, the other workers' sentinels, the wake pipe).
    pub(crate) close: Vec<RawFd>,
    pub(crate) progress: Arc<SharedProgress>,
    pub(crate) slot: usize,
    pub(crate) initializer: Option<fn()>,
    /// The pool's arguments arena, as this worker sees it.
    pub(crate) args: Option<ArgsMap>,
    /// This worker's region for large results.
    pub(crate) region: Option<Arc<Region>>,
}

/// The pool's arguments arena in a worker: the parent's mapping, inherited
/// by the fork, or mapped from its fd (a child of the fork server).
pub(crate) enum ArgsMap {
    Inherited(Arc<ArgsArena>),
    Mapped(SharedMapping),
}

impl ArgsMap {
    fn mapping(&self) -> &SharedMapping {
        match self {
            ArgsMap::Inherited(a) => a.mapping(),
            ArgsMap::Mapped(m) => m,
        }
    }
}

/// Decodes the next item of a chunk: fixed-width of `kind`, or postcard.
#[inline(always)]
fn next_item<T: DeserializeOwned>(input: &mut &[u8], kind: u8) -> Result<T, String> {
    if kind == 0 {
        codec::take_value::<T>(input).map_err(|e| e.to_string())
    } else {
        codec::fixed::take::<T>(input, kind)
            .map_err(|_| "a fixed-width item does not decode".into())
    }
}

/// A run of a chunk's items for one call of a trampoline: where results
/// go, how many items it may run, and the worker's counters. The
/// trampoline runs items until the budget is spent or results are due to
/// be written (a full buffer, or the flush interval passed).
pub(crate) struct Batch<'a> {
    pub(crate) sink: Sink<'a>,
    /// Items this call may run.
    budget: u32,
    /// Items it ran (each with its entry appended).
    ran: u32,
    progress: &'a Progress,
    /// Items started in the worker's life.
    seq: &'a mut u64,
    clock: &'a mut Clock,
    last_flush: u64,
    /// The call stopped because results are due to be written.
    flush_due: bool,
    /// Where the running item's entry starts (a panic truncates to it).
    entry_at: usize,
    /// The running item is being decoded from postcard.
    decoding: bool,
}

impl Batch<'_> {
    /// Runs items while the budget lasts: each decoded, passed to `call`
    /// under one `catch_unwind` for the whole run (a panic of the task or
    /// of its result's `Serialize` fails its item, appends its entry, and
    /// the run goes on with the next item), its entry appended.
    /// `Err(message)`: the next item does not decode, or its `Deserialize`
    /// panicked (then where the next item starts is unknown); its
    /// `started` count is stored, no entry appended.
    #[inline(always)]
    fn run<T: DeserializeOwned, R: Serialize + DeserializeOwned>(
        &mut self,
        input: &mut &[u8],
        kind: u8,
        mut call: impl FnMut(T) -> R,
    ) -> Result<(), String> {
        while self.ran < self.budget && !self.flush_due {
            let run = unwind::catch(|| -> Result<(), String> {
                while self.ran < self.budget {
                    if !(kind != 0 && self.fixed_run(input, kind, &mut call)?) {
                        self.item(input, kind, &mut call, kind == 0, wire::push_value)?;
                    }
                    if self.ran < self.budget
                        && (self.sink.out.len() >= FLUSH_BYTES
                            || self.clock.passed(self.last_flush, FLUSH_INTERVAL_NS))
                    {
                        self.flush_due = true;
                        break;
                    }
                }
                Ok(())
            });
            match run {
                Ok(r) => return r,
                Err(report) if self.decoding => {
                    return Err(format!(
                        "the item's Deserialize panicked: {}",
                        report.message
                    ));
                }
                Err(report) => {
                    // The task (or its result's `Serialize`) panicked: drop
                    // what the entry had written, and report the panic.
                    self.sink.out.truncate(self.entry_at);
                    wire::push_panic(self.sink.out, &report);
                    self.sink.frame.entry(false);
                    self.finished();
                }
            }
        }
        Ok(())
    }

    /// Runs one item: its `started` count, decode, `call`, its entry
    /// appended by `push`, its `finished` count. `Ok(true)` for a plain
    /// value entry (see [`wire::push_value`]); `Err(message)` if it does
    /// not decode. `postcard`: the item is postcard, whose reader may stop
    /// anywhere in it if its `Deserialize` panics (a fixed-width reader has
    /// moved past the item's bytes before the `Deserialize` sees them: a
    /// panic there fails the item alone, as a panic of the task does).
    #[inline(always)]
    fn item<T: DeserializeOwned, R: Serialize + DeserializeOwned>(
        &mut self,
        input: &mut &[u8],
        kind: u8,
        call: &mut impl FnMut(T) -> R,
        postcard: bool,
        push: impl FnOnce(&mut Sink<'_>, &R) -> bool,
    ) -> Result<bool, String> {
        self.progress
            .started
            .store(*self.seq + 1, Ordering::Relaxed);
        self.entry_at = self.sink.out.len();
        if postcard {
            self.decoding = true;
        }
        let item = next_item::<T>(input, kind)?;
        if postcard {
            self.decoding = false;
        }
        let r = call(item);
        let plain = push(&mut self.sink, &r);
        self.sink.frame.entry(plain);
        self.finished();
        Ok(plain)
    }

    /// Runs fixed-width items whose results have the frame's fixed-width
    /// kind, as many as can run before a flush check is due (the clock's
    /// stride, and room for results below `FLUSH_BYTES`), without the
    /// general loop's per-item flush checks: the same entries and counters,
    /// fewer instructions per tiny item. A result of another kind (a footer
    /// entry, perhaps large) ends the run. `Ok(true)` if it ran any item:
    /// the flush check is due next.
    #[inline(always)]
    fn fixed_run<T: DeserializeOwned, R: Serialize + DeserializeOwned>(
        &mut self,
        input: &mut &[u8],
        kind: u8,
        call: &mut impl FnMut(T) -> R,
    ) -> Result<bool, String> {
        let values = self.sink.frame.values;
        if values == wire::VALUES_UNDECIDED || values == wire::VALUES_POSTCARD {
            return Ok(false);
        }
        // A fixed-width result is at most 16 bytes.
        let room = FLUSH_BYTES.saturating_sub(self.sink.out.len()) / 16;
        let n = (self.budget - self.ran)
            .min(self.clock.left.saturating_sub(1))
            .min(u32::try_from(room).unwrap_or(u32::MAX));
        self.sink.out.reserve(16 * n as usize);
        // `item`'s steps with `wire::push_fixed_value` unrolled, the kinds
        // known: measured (callgrind, `benches/probe_w2.rs`), calling `item`
        // here costs a worker 61 to 64 instructions per tiny item, this 48.
        for _ in 0..n {
            self.progress
                .started
                .store(*self.seq + 1, Ordering::Relaxed);
            self.entry_at = self.sink.out.len();
            let item = next_item::<T>(input, kind)?;
            let r = call(item);
            // The clock's reads are counted as the general loop counts them.
            self.clock.left -= 1;
            if codec::fixed::encode(&r, self.sink.out) == Some(values) {
                self.sink.frame.entry(true);
                self.finished();
            } else {
                // Another kind: a footer entry, and the run ends.
                self.sink.out.truncate(self.entry_at);
                wire::push_footer_value(&mut self.sink, &r);
                self.sink.frame.entry(false);
                self.finished();
                break;
            }
        }
        Ok(n > 0)
    }

    #[inline(always)]
    fn finished(&mut self) {
        self.progress
            .finished
            .store(*self.seq + 1, Ordering::Relaxed);
        *self.seq += 1;
        self.ran += 1;
    }
}

/// The trampoline of `map`: runs a batch of items through `f` (or, with no
/// batch, decodes one item and drops it: skipped).
pub(crate) fn tramp_map<T: DeserializeOwned, R: Serialize + DeserializeOwned>(
    f: usize,
    _ctx: &mut Option<Box<dyn Any>>,
    _raw: Option<&[u8]>,
    input: &mut &[u8],
    kind: u8,
    batch: Option<&mut Batch<'_>>,
) -> Result<(), String> {
    let Some(batch) = batch else {
        return next_item::<T>(input, kind).map(drop);
    };
    let f: fn(T) -> R = sys::fn_from_addr(f);
    batch.run(input, kind, f)
}

/// The trampoline of `map_with`: as [`tramp_map`], with the job's context
/// decoded once per worker and kept for the job's later items.
pub(crate) fn tramp_with<
    C: DeserializeOwned + 'static,
    T: DeserializeOwned,
    R: Serialize + DeserializeOwned,
>(
    f: usize,
    ctx: &mut Option<Box<dyn Any>>,
    raw: Option<&[u8]>,
    input: &mut &[u8],
    kind: u8,
    batch: Option<&mut Batch<'_>>,
) -> Result<(), String> {
    let Some(batch) = batch else {
        return next_item::<T>(input, kind).map(drop);
    };
    if ctx.is_none() {
        let raw = raw.ok_or("the job's context was never received")?;
        let c: C = codec::decode(raw).map_err(|e| e.to_string())?;
        *ctx = Some(Box::new(c));
    }
    let c = ctx
        .as_ref()
        .and_then(|c| c.downcast_ref::<C>())
        .ok_or("the job's context has another type")?;
    let f: fn(&C, T) -> R = sys::fn_from_addr(f);
    batch.run(input, kind, |item| f(c, item))
}

/// A job's context in this worker: the bytes, and the value once decoded.
struct Context {
    raw: Vec<u8>,
    value: Option<Box<dyn Any>>,
}

/// The worker's life after the fork's bootstrap. Returns the exit code.
pub(crate) fn run(spec: WorkerSpec) -> i32 {
    let _ = sys::ignore_signal(Sig::SIGINT);
    for fd in &spec.close {
        sys::close_raw(*fd);
    }
    let sock = spec.sock;
    let progress = spec.progress.slot(spec.slot);
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    if let Some(init) = spec.initializer {
        if let Err(report) = unwind::catch(init) {
            wire::push_init_failed(&mut out, &report.message);
            let _ = sys::write_all(sock.as_fd(), &out);
            return crate::exitcode::WORKER_INIT_FAILED;
        }
    }
    let mut w = Worker {
        args: spec.args,
        region: spec.region,
        sock: sock.as_fd(),
        progress,
        seq: 0,
        out,
        last_flush: sys::coarse_now_ns(),
        frame: ResultsFrame::default(),
        clock: Clock {
            stride: 1,
            left: 1,
            seen: 0,
        },
    };
    let mut contexts: HashMap<u64, Context> = HashMap::new();
    let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN, true);
    loop {
        loop {
            // The message borrows the reader's buffer: no copy of the chunk.
            let frame = match reader.next_payload() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => return crate::exitcode::WORKER_PROTOCOL_ERROR,
            };
            let msg = match wire::parse_to_worker(frame) {
                Ok(m) => m,
                Err(_) => return crate::exitcode::WORKER_PROTOCOL_ERROR,
            };
            match msg {
                ToWorker::Chunk {
                    chunk,
                    job,
                    f,
                    tramp,
                    start,
                    end,
                    kind,
                    items,
                } => {
                    let tramp: Trampoline = sys::fn_from_addr(tramp);
                    let ctx = contexts.get_mut(&job);
                    let args = w.args.take();
                    let items = match items {
                        Items::Inline(b) => Some(b),
                        Items::Shared { offset, len } => args.as_ref().and_then(|a| {
                            let o = usize::try_from(offset).ok()?;
                            a.mapping().bytes(o, usize::try_from(len).ok()?).ok()
                        }),
                    };
                    let Some(items) = items else {
                        return crate::exitcode::WORKER_PROTOCOL_ERROR;
                    };
                    let go = w.run_chunk(ctx, chunk, f, tramp, start, end, kind, items);
                    w.args = args;
                    if !go {
                        return 0;
                    }
                    if !reader.has_frame() && !w.flush() {
                        return 0;
                    }
                }
                ToWorker::Context { job, ctx } => {
                    contexts.insert(
                        job,
                        Context {
                            raw: ctx.to_vec(),
                            value: None,
                        },
                    );
                }
                ToWorker::Forget { job } => {
                    contexts.remove(&job);
                }
                ToWorker::Exit => {
                    w.flush();
                    return 0;
                }
            }
        }
        if !w.flush() {
            return 0;
        }
        match reader.fill(sock.as_fd()) {
            Ok(Fill::Data) => w.last_flush = sys::coarse_now_ns(),
            // The parent is gone (or closed us): nothing left to do.
            Ok(Fill::Eof) | Err(_) => return 0,
        }
    }
}

struct Worker<'a> {
    args: Option<ArgsMap>,
    region: Option<Arc<Region>>,
    sock: BorrowedFd<'a>,
    progress: &'a Progress,
    /// Items started in this worker's life.
    seq: u64,
    out: Vec<u8>,
    /// [`sys::coarse_now_ns`] at the last write (or wake-up).
    last_flush: u64,
    /// The results frame being filled (reused).
    frame: ResultsFrame,
    clock: Clock,
}

/// Reads of the coarse clock, spaced out while items are fast.
struct Clock {
    /// Items between two reads, and items left until the next.
    stride: u32,
    left: u32,
    /// The clock at its last read.
    seen: u64,
}

impl Clock {
    /// Whether `interval` passed since `since`, reading the clock only
    /// every `stride` items.
    #[inline]
    fn passed(&mut self, since: u64, interval: u64) -> bool {
        self.left -= 1;
        if self.left > 0 {
            return false;
        }
        let now = sys::coarse_now_ns();
        self.stride = if now == self.seen {
            (self.stride * 2).min(MAX_CLOCK_STRIDE)
        } else {
            1
        };
        self.seen = now;
        self.left = self.stride;
        now.wrapping_sub(since) >= interval
    }
}

impl Worker<'_> {
    /// Runs items `start..end` of a chunk. `false` if the parent is gone.
    #[allow(clippy::too_many_arguments)]
    fn run_chunk(
        &mut self,
        ctx: Option<&mut Context>,
        chunk: u64,
        f: usize,
        tramp: Trampoline,
        start: u32,
        end: u32,
        kind: u8,
        items: &[u8],
    ) -> bool {
        let mut items: &[u8] = items;
        let mut no_ctx = None;
        let (value, raw) = match ctx {
            Some(c) => (&mut c.value, Some(c.raw.as_slice())),
            None => (&mut no_ctx, None),
        };
        let mut bad: Option<String> = None;
        for _ in 0..start {
            if let Err(e) = tramp(f, value, raw, &mut items, kind, None) {
                bad = Some(e);
                break;
            }
        }
        let frame = &mut self.frame;
        frame.begin(&mut self.out, chunk, start);
        let mut i = start;
        while i < end {
            let due = match &bad {
                // Items after one that did not decode cannot be found.
                Some(msg) => {
                    self.progress.started.store(self.seq + 1, Ordering::Relaxed);
                    bad_input(&mut self.out, frame, self.progress, &mut self.seq, msg);
                    i += 1;
                    self.out.len() >= FLUSH_BYTES
                        || self.clock.passed(self.last_flush, FLUSH_INTERVAL_NS)
                }
                None => {
                    let mut batch = Batch {
                        sink: Sink {
                            out: &mut self.out,
                            frame,
                            region: self.region.as_deref(),
                        },
                        budget: end - i,
                        ran: 0,
                        progress: self.progress,
                        seq: &mut self.seq,
                        clock: &mut self.clock,
                        last_flush: self.last_flush,
                        flush_due: false,
                        entry_at: 0,
                        decoding: false,
                    };
                    let r = tramp(f, value, raw, &mut items, kind, Some(&mut batch));
                    let (ran, due) = (batch.ran, batch.flush_due);
                    i += ran;
                    if let Err(e) = r {
                        // Its `started` count is stored: the entry and
                        // `finished` complete it.
                        bad_input(&mut self.out, frame, self.progress, &mut self.seq, &e);
                        i += 1;
                        bad = Some(e);
                    }
                    due
                }
            };
            if due && i < end {
                frame.close(&mut self.out);
                if !flush(self.sock, &mut self.out, &mut self.last_flush) {
                    return false;
                }
                frame.begin(&mut self.out, chunk, i);
            }
        }
        frame.close(&mut self.out);
        true
    }

    /// Writes buffered results. `false` if the parent is gone.
    fn flush(&mut self) -> bool {
        flush(self.sock, &mut self.out, &mut self.last_flush)
    }
}

/// Completes an item (its `started` count stored) whose input did not
/// decode: its entry, and its `finished` count.
fn bad_input(
    out: &mut Vec<u8>,
    frame: &mut ResultsFrame,
    progress: &Progress,
    seq: &mut u64,
    msg: &str,
) {
    wire::push_bad_input(out, msg);
    frame.entry(false);
    progress.finished.store(*seq + 1, Ordering::Relaxed);
    *seq += 1;
}

/// Writes the buffered results `out` (the frames in it are closed) and
/// notes the time. `false` if the parent is gone.
fn flush(sock: BorrowedFd<'_>, out: &mut Vec<u8>, last_flush: &mut u64) -> bool {
    *last_flush = sys::coarse_now_ns();
    if out.is_empty() {
        return true;
    }
    let ok = sys::write_all(sock, out).is_ok();
    out.clear();
    if out.capacity() > 4 * FLUSH_BYTES {
        *out = Vec::with_capacity(64 * 1024);
    }
    ok
}
