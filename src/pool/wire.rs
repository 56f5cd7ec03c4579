//! The frames between the dispatcher and a worker (see the module docs of
//! [`pool`](super) for the protocol). Pure functions: no I/O.
//!
//! Every message is one codec frame (8-byte length, payload). The payload
//! starts with a one-byte tag and fixed little-endian fields; the items and
//! results inside are codec values packed back to back, so a chunk of a
//! million `u64` is one frame of a few megabytes, not a million frames.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::payload::SHARED_MIN;
use crate::codec::{self, HEADER_LEN};
use crate::error::{CodecError, CodecErrorKind, Error, Result};
use crate::region::{Ranges, Region};
use crate::unwind::PanicReport;

const TAG_CHUNK: u8 = 1;
const TAG_CONTEXT: u8 = 2;
const TAG_FORGET: u8 = 3;
const TAG_EXIT: u8 = 4;
const TAG_CHUNK_SHARED: u8 = 5;

const TAG_RESULTS: u8 = 1;
const TAG_INIT_FAILED: u8 = 2;

/// Status byte of one result entry.
const ENTRY_PANICKED: u8 = 1;
const ENTRY_ENCODE_FAILED: u8 = 2;
const ENTRY_BAD_INPUT: u8 = 3;
/// A value in postcard inside a fixed-width frame (a value with no
/// fixed-width encoding after all): listed in the footer, decoded as `Ok`.
const ENTRY_VALUE: u8 = 4;
/// A large value in the worker's results region: a footer entry naming
/// the `u32` index of its range in the frame's shared trailer.
const ENTRY_SHARED: u8 = 5;

/// How a worker encodes the value entries of its current results frame,
/// decided by the first value: `VALUES_UNDECIDED`, `VALUES_POSTCARD`, or
/// the fixed-width kind (`codec::fixed::Kind`, 1 to 254) of the first value.
pub(crate) const VALUES_UNDECIDED: u8 = 0;
pub(crate) const VALUES_POSTCARD: u8 = 255;

/// Fixed bytes in front of a chunk's items.
pub(crate) const CHUNK_HEADER: usize = 1 + 8 * 4 + 4 * 2 + 1;
/// Fixed bytes in front of a results frame's entries.
const RESULTS_HEADER: usize = 1 + 8 + 4 + 4 + 1;

/// A message from the dispatcher to a worker.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ToWorker<'a> {
    /// Run items `start..end` of `items` (the first `start` are decoded and
    /// skipped: a chunk sent again after a crash keeps its bytes).
    Chunk {
        chunk: u64,
        job: u64,
        f: usize,
        tramp: usize,
        start: u32,
        end: u32,
        /// The items' fixed-width kind (`codec::fixed`), 0 for postcard.
        kind: u8,
        items: Items<'a>,
    },
    /// The encoded context of `job` (`map_with`), sent once per worker.
    Context { job: u64, ctx: &'a [u8] },
    /// `job` is over: drop its context.
    Forget { job: u64 },
    /// Finish and exit (the pool is closing or the worker retires).
    Exit,
}

/// Where a chunk's items are.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Items<'a> {
    /// In the frame.
    Inline(&'a [u8]),
    /// In the pool's arguments arena.
    Shared { offset: u64, len: u64 },
}

/// A message from a worker to the dispatcher.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromWorker<'a> {
    /// Results of items `start..start + count` of `chunk`, in order.
    Results {
        chunk: u64,
        start: u32,
        count: u32,
        /// The value entries' fixed-width kind, 0 for postcard.
        kind: u8,
        entries: &'a [u8],
    },
    /// The initializer panicked; the worker exits.
    InitFailed { message: String },
}

fn invalid(what: &str) -> Error {
    CodecError::new(CodecErrorKind::Invalid(format!("pool protocol: {what}"))).into()
}

/// Reads little-endian fields off the front of a payload.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(invalid("short message"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
}

/// Starts a frame in `out`; returns its start for [`end_frame`].
pub(crate) fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    start
}

/// Writes the length of the frame begun at `start`.
pub(crate) fn end_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - HEADER_LEN) as u64;
    out[start..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}

/// Appends a whole chunk frame.
#[allow(clippy::too_many_arguments)]
pub(crate) fn push_chunk(
    out: &mut Vec<u8>,
    chunk: u64,
    job: u64,
    f: usize,
    tramp: usize,
    start: u32,
    end: u32,
    kind: u8,
    items: Items<'_>,
) {
    let inline = match items {
        Items::Inline(b) => b,
        Items::Shared { .. } => &[],
    };
    out.reserve(HEADER_LEN + CHUNK_HEADER + 16 + inline.len());
    let s = begin_frame(out);
    out.push(match items {
        Items::Inline(_) => TAG_CHUNK,
        Items::Shared { .. } => TAG_CHUNK_SHARED,
    });
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&job.to_le_bytes());
    out.extend_from_slice(&(f as u64).to_le_bytes());
    out.extend_from_slice(&(tramp as u64).to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&end.to_le_bytes());
    out.push(kind);
    match items {
        Items::Inline(b) => out.extend_from_slice(b),
        Items::Shared { offset, len } => {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
    }
    end_frame(out, s);
}

/// Appends a context frame.
pub(crate) fn push_context(out: &mut Vec<u8>, job: u64, ctx: &[u8]) {
    let s = begin_frame(out);
    out.push(TAG_CONTEXT);
    out.extend_from_slice(&job.to_le_bytes());
    out.extend_from_slice(ctx);
    end_frame(out, s);
}

/// Appends a forget frame.
pub(crate) fn push_forget(out: &mut Vec<u8>, job: u64) {
    let s = begin_frame(out);
    out.push(TAG_FORGET);
    out.extend_from_slice(&job.to_le_bytes());
    end_frame(out, s);
}

/// Appends an exit frame.
pub(crate) fn push_exit(out: &mut Vec<u8>) {
    let s = begin_frame(out);
    out.push(TAG_EXIT);
    end_frame(out, s);
}

/// Parses a payload sent to a worker.
pub(crate) fn parse_to_worker(payload: &[u8]) -> Result<ToWorker<'_>> {
    let mut p = Fields(payload);
    match p.u8()? {
        tag @ (TAG_CHUNK | TAG_CHUNK_SHARED) => {
            let chunk = p.u64()?;
            let job = p.u64()?;
            let f = p.u64()? as usize;
            let tramp = p.u64()? as usize;
            let start = p.u32()?;
            let end = p.u32()?;
            let kind = p.u8()?;
            if start > end {
                return Err(invalid("chunk range"));
            }
            let items = if tag == TAG_CHUNK {
                Items::Inline(p.0)
            } else {
                let (offset, len) = (p.u64()?, p.u64()?);
                if !p.0.is_empty() {
                    return Err(invalid("bytes after a shared chunk"));
                }
                Items::Shared { offset, len }
            };
            Ok(ToWorker::Chunk {
                chunk,
                job,
                f,
                tramp,
                start,
                end,
                kind,
                items,
            })
        }
        TAG_CONTEXT => Ok(ToWorker::Context {
            job: p.u64()?,
            ctx: p.0,
        }),
        TAG_FORGET => Ok(ToWorker::Forget { job: p.u64()? }),
        TAG_EXIT => Ok(ToWorker::Exit),
        _ => Err(invalid("unknown message to a worker")),
    }
}

/// A results frame being filled by a worker: begun for one chunk at one
/// item, entries appended (each counted with [`entry`](ResultsFrame::entry)),
/// closed by [`ResultsFrame::close`]. Reused from frame to frame.
///
/// A value entry is the encoded `R` alone; a failed item's entry is a status
/// byte and its report. The frame ends with a footer: the positions of the
/// failed items in the frame (`u32` each) and their number (`u32`). So a
/// frame of values carries no per-item overhead, and the parent decodes it
/// in a tight loop.
#[derive(Debug, Default)]
pub(crate) struct ResultsFrame {
    frame_start: usize,
    count: u32,
    failures: Vec<u32>,
    /// How value entries are encoded (`VALUES_*`); its tag says so.
    pub(crate) values: u8,
    /// `(offset, length)` of the large values in the worker's region that
    /// the frame's `ENTRY_SHARED` entries name, in order.
    shared: Vec<(u64, u64)>,
}

impl ResultsFrame {
    /// Begins a results frame for `chunk` from item `start` in `out`.
    pub(crate) fn begin(&mut self, out: &mut Vec<u8>, chunk: u64, start: u32) {
        self.frame_start = begin_frame(out);
        self.count = 0;
        self.failures.clear();
        self.shared.clear();
        self.values = VALUES_UNDECIDED;
        out.push(TAG_RESULTS);
        out.extend_from_slice(&chunk.to_le_bytes());
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.push(0);
    }

    /// Counts the entry just appended: a value (`ok`) or a failure.
    #[inline]
    pub(crate) fn entry(&mut self, ok: bool) {
        if !ok {
            self.failures.push(self.count);
        }
        self.count += 1;
    }

    /// Writes the footer, the count and the length; an empty frame is
    /// removed.
    pub(crate) fn close(&mut self, out: &mut Vec<u8>) {
        if self.count == 0 {
            out.truncate(self.frame_start);
            return;
        }
        for f in &self.failures {
            out.extend_from_slice(&f.to_le_bytes());
        }
        out.extend_from_slice(&(self.failures.len() as u32).to_le_bytes());
        for (o, l) in &self.shared {
            out.extend_from_slice(&o.to_le_bytes());
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend_from_slice(&(self.shared.len() as u32).to_le_bytes());
        let at = self.frame_start + HEADER_LEN + 1 + 8 + 4;
        out[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        if self.values != VALUES_POSTCARD {
            out[at + 4] = self.values;
        }
        end_frame(out, self.frame_start);
        self.count = 0;
        self.failures.clear();
        self.shared.clear();
    }
}

/// `(offset, length)` of a large value in a worker's results region.
pub(crate) type Range = (u64, u64);

/// Splits the shared trailer off the entries of a results message: the
/// entries (footer included) and the `(offset, length)` ranges they name.
pub(crate) fn split_shared(entries: &[u8]) -> Result<(&[u8], Vec<Range>)> {
    let (head, records) = split_counted(entries, 16, "results trailer")?;
    let mut f = Fields(records);
    let mut shared = Vec::with_capacity(records.len() / 16);
    while !f.0.is_empty() {
        shared.push((f.u64()?, f.u64()?));
    }
    Ok((head, shared))
}

/// Splits a counted table off the end of `bytes`: `k` records of `size`
/// bytes, then `k` as a `u32`. Returns what precedes the table and the
/// records; `Err` (naming `what`) if the count is missing or too large.
fn split_counted<'a>(bytes: &'a [u8], size: usize, what: &str) -> Result<(&'a [u8], &'a [u8])> {
    let n = bytes.len();
    let k = bytes
        .get(n.wrapping_sub(4)..)
        .filter(|_| n >= 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or_else(|| invalid(what))?;
    let table = k
        .checked_mul(size)
        .and_then(|t| t.checked_add(4))
        .filter(|&t| t <= n)
        .ok_or_else(|| invalid(what))?;
    Ok((&bytes[..n - table], &bytes[n - table..n - 4]))
}

/// Where a worker's trampoline appends a result entry: the frame's bytes,
/// and for large values the worker's results region.
pub(crate) struct Sink<'a> {
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) frame: &'a mut ResultsFrame,
    pub(crate) region: Option<&'a Region>,
}

/// Appends an init-failed frame.
pub(crate) fn push_init_failed(out: &mut Vec<u8>, message: &str) {
    let s = begin_frame(out);
    out.push(TAG_INIT_FAILED);
    out.extend_from_slice(message.as_bytes());
    end_frame(out, s);
}

/// Parses a payload sent by a worker.
pub(crate) fn parse_from_worker(payload: &[u8]) -> Result<FromWorker<'_>> {
    let mut p = Fields(payload);
    match p.u8()? {
        TAG_RESULTS => {
            if payload.len() < RESULTS_HEADER {
                return Err(invalid("short results"));
            }
            let chunk = p.u64()?;
            let start = p.u32()?;
            let count = p.u32()?;
            let kind = p.u8()?;
            Ok(FromWorker::Results {
                chunk,
                start,
                count,
                kind,
                entries: p.0,
            })
        }
        TAG_INIT_FAILED => Ok(FromWorker::InitFailed {
            message: String::from_utf8_lossy(p.0).into_owned(),
        }),
        _ => Err(invalid("unknown message from a worker")),
    }
}

/// Appends the entry of a task that returned `value` or, if it cannot be
/// encoded, the entry of an encoding failure. `true` for a value entry.
#[inline]
pub(crate) fn push_ok<R: Serialize>(out: &mut Vec<u8>, value: &R) -> bool {
    match codec::encode_value(value, out) {
        Ok(()) => true,
        Err(e) => {
            push_message(out, ENTRY_ENCODE_FAILED, &e.to_string());
            false
        }
    }
}

/// Appends the entry of a task that returned `value`, in the frame's value
/// encoding (`values`, decided here by the first value: fixed-width if
/// `value` has such an encoding that decodes back as an `R`, as the parent
/// will decode it). `true` for a plain value entry; a value
/// that has no fixed-width encoding in a fixed frame is a footer entry
/// (`false`), in postcard, still a value for the parent.
/// Always inlined: a value of the frame's fixed-width kind, the tiny-item
/// path, costs its bytes and one test; the other cases are calls.
#[inline(always)]
pub(crate) fn push_value<R: Serialize + DeserializeOwned>(sink: &mut Sink<'_>, value: &R) -> bool {
    match sink.frame.values {
        VALUES_POSTCARD => push_large_or_ok(sink, value),
        VALUES_UNDECIDED => push_first_value(sink, value),
        kind => push_fixed_value(sink, value, kind),
    }
}

/// [`push_value`] in a frame whose values are fixed-width of `kind`: its
/// bytes if `value` has that kind (`true`), else a footer entry.
#[inline(always)]
pub(crate) fn push_fixed_value<R: Serialize>(sink: &mut Sink<'_>, value: &R, kind: u8) -> bool {
    let at = sink.out.len();
    if codec::fixed::encode(value, sink.out) == Some(kind) {
        return true;
    }
    sink.out.truncate(at);
    push_footer_value(sink, value)
}

/// [`push_value`] of a frame's first value, which decides its encoding.
#[inline]
fn push_first_value<R: Serialize + DeserializeOwned>(sink: &mut Sink<'_>, value: &R) -> bool {
    // Encode in place and check that it decodes back to exactly those
    // bytes, as the parent will decode it (no allocation: with chunk size 1
    // this runs for every item).
    let out = &mut *sink.out;
    let at = out.len();
    if let Some(kind) = codec::fixed::encode(value, out) {
        let mut written = &out[at..];
        if codec::fixed::take::<R>(&mut written, kind).is_ok() && written.is_empty() {
            sink.frame.values = kind;
            return true;
        }
        out.truncate(at);
    }
    sink.frame.values = VALUES_POSTCARD;
    push_large_or_ok(sink, value)
}

/// [`push_value`] of a value without the fixed-width kind of its frame: a
/// footer entry (`false`).
#[inline(never)]
pub(crate) fn push_footer_value<R: Serialize>(sink: &mut Sink<'_>, value: &R) -> bool {
    if push_large(sink, value) {
        return false;
    }
    let out = &mut *sink.out;
    let at = out.len();
    out.push(ENTRY_VALUE);
    if codec::encode_value(value, out).is_err() {
        out.truncate(at);
        push_ok(out, value);
    }
    false
}

/// A postcard value entry, or a shared one for a large value.
#[inline]
fn push_large_or_ok<R: Serialize>(sink: &mut Sink<'_>, value: &R) -> bool {
    if push_large(sink, value) {
        // A footer entry: still a value for the parent.
        return false;
    }
    push_ok(sink.out, value)
}

/// Writes `value` into the worker's region and appends its shared entry,
/// if it is large and the region has room. `false`: nothing was appended.
#[inline]
fn push_large<R: Serialize>(sink: &mut Sink<'_>, value: &R) -> bool {
    let Some(region) = sink.region else {
        return false;
    };
    if !codec::encodes_to_at_least(value, SHARED_MIN) {
        return false;
    }
    let Ok(len) = codec::encoded_len(value) else {
        return false;
    };
    let Some(offset) = region.alloc(len) else {
        return false;
    };
    let written = region
        .mapping()
        .write_with(offset, len, |b| codec::encode_into(value, b));
    if !matches!(written, Ok(Ok(n)) if n == len) {
        region.unalloc(offset, len);
        return false;
    }
    let k = sink.frame.shared.len() as u32;
    sink.frame.shared.push((offset as u64, len as u64));
    sink.out.push(ENTRY_SHARED);
    sink.out.extend_from_slice(&k.to_le_bytes());
    true
}

/// Appends the entry of a task that panicked (a failure entry).
pub(crate) fn push_panic(out: &mut Vec<u8>, report: &PanicReport) {
    let at = out.len();
    out.push(ENTRY_PANICKED);
    if codec::encode_value(report, out).is_err() {
        out.truncate(at);
        push_message(out, ENTRY_ENCODE_FAILED, "panic report");
    }
}

/// Appends the entry of an item whose input could not be decoded (a
/// failure entry).
pub(crate) fn push_bad_input(out: &mut Vec<u8>, message: &str) {
    push_message(out, ENTRY_BAD_INPUT, message);
}

fn push_message(out: &mut Vec<u8>, status: u8, message: &str) {
    out.push(status);
    codec::encode_value(message, out).expect("a str always encodes");
}

/// Reads the entries of a results message, footer first (see
/// [`ResultsFrame`]).
pub(crate) struct Entries<'a> {
    /// The entries not read yet.
    rest: &'a [u8],
    /// The value entries' fixed-width kind, 0 for postcard.
    kind: u8,
    /// The positions of the failed entries still ahead, `u32` LE each.
    failures: &'a [u8],
    index: u32,
    /// The large values the message's shared entries name.
    shared: Option<&'a Ranges>,
}

impl<'a> Entries<'a> {
    /// Splits the footer off the entries of a results message.
    pub(crate) fn new(
        bytes: &'a [u8],
        kind: u8,
        shared: Option<&'a Ranges>,
    ) -> Result<Entries<'a>> {
        let (rest, failures) = split_counted(bytes, 4, "results footer")?;
        Ok(Entries {
            rest,
            kind,
            failures,
            index: 0,
            shared,
        })
    }

    /// Decodes the next entry. The outer `Err` is a broken stream; the
    /// inner one is the task's failure.
    #[inline]
    pub(crate) fn next<R: DeserializeOwned>(&mut self) -> Result<Result<R>> {
        let i = self.index;
        self.index += 1;
        match self.failures.first_chunk::<4>() {
            Some(f) if u32::from_le_bytes(*f) == i => {
                self.failures = &self.failures[4..];
                self.failure()
            }
            _ if self.kind != 0 => codec::fixed::take::<R>(&mut self.rest, self.kind)
                .map(Ok)
                .map_err(|_| invalid("fixed-width result entry")),
            _ => codec::take_value::<R>(&mut self.rest).map(Ok),
        }
    }

    /// Whether every entry left is a plain fixed-width value (no footer
    /// entry ahead): they can be read with [`next_plain`](Self::next_plain).
    pub(crate) fn all_plain(&self) -> bool {
        self.kind != 0 && self.failures.is_empty()
    }

    /// The next entry, known plain (see [`all_plain`](Self::all_plain)).
    #[inline(always)]
    pub(crate) fn next_plain<R: DeserializeOwned>(&mut self) -> Result<R> {
        codec::fixed::take::<R>(&mut self.rest, self.kind)
            .map_err(|_| invalid("fixed-width result entry"))
    }

    /// `Err` unless every byte of the entries was read: a frame whose
    /// entries do not decode to exactly their bytes (a width mismatch) is
    /// broken, not silently misread.
    pub(crate) fn finish(&self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(invalid("bytes left after the result entries"))
        }
    }

    /// Decodes a failure entry: a status byte (which is also how postcard
    /// encodes a `u8`) and its report.
    /// Decodes a footer entry: a status byte and a postcard value (its
    /// report, or for `ENTRY_VALUE` the task's value).
    fn failure<R: DeserializeOwned>(&mut self) -> Result<Result<R>> {
        let (&status, rest) = self
            .rest
            .split_first()
            .ok_or_else(|| invalid("missing result entry"))?;
        self.rest = rest;
        let r = &mut self.rest;
        Ok(Err(match status {
            ENTRY_VALUE => return codec::take_value::<R>(r).map(Ok),
            ENTRY_SHARED => {
                let k = Fields(r.get(..4).ok_or_else(|| invalid("shared entry"))?).u32()?;
                *r = &r[4..];
                let bytes = self
                    .shared
                    .and_then(|s| s.get(k as usize))
                    .ok_or_else(|| invalid("a shared entry without its range"))?;
                return codec::decode::<R>(bytes).map(Ok);
            }
            ENTRY_PANICKED => codec::take_value::<PanicReport>(r)?.into(),
            ENTRY_ENCODE_FAILED => {
                CodecError::new(CodecErrorKind::Encode(codec::take_value::<String>(r)?)).into()
            }
            ENTRY_BAD_INPUT => {
                CodecError::new(CodecErrorKind::Invalid(codec::take_value::<String>(r)?)).into()
            }
            _ => return Err(invalid("unknown result status")),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &[u8]) -> &[u8] {
        let len = u64::from_le_bytes(frame[..8].try_into().unwrap()) as usize;
        assert_eq!(frame.len(), 8 + len);
        &frame[8..]
    }

    #[test]
    fn to_worker_round_trip() {
        let mut out = Vec::new();
        push_chunk(
            &mut out,
            7,
            3,
            0x1000,
            0x2000,
            1,
            4,
            10,
            Items::Inline(b"abcd"),
        );
        assert_eq!(
            parse_to_worker(payload(&out)).unwrap(),
            ToWorker::Chunk {
                chunk: 7,
                job: 3,
                f: 0x1000,
                tramp: 0x2000,
                start: 1,
                end: 4,
                kind: 10,
                items: Items::Inline(b"abcd")
            }
        );
        for (push, want) in [
            (
                Box::new(|o: &mut Vec<u8>| push_context(o, 9, b"xy")) as Box<dyn Fn(&mut Vec<u8>)>,
                ToWorker::Context { job: 9, ctx: b"xy" },
            ),
            (Box::new(|o| push_forget(o, 9)), ToWorker::Forget { job: 9 }),
            (Box::new(push_exit), ToWorker::Exit),
        ] {
            let mut out = Vec::new();
            push(&mut out);
            assert_eq!(parse_to_worker(payload(&out)).unwrap(), want);
        }
    }

    #[test]
    fn results_round_trip() {
        let mut out = Vec::new();
        let mut frame = ResultsFrame::default();
        frame.begin(&mut out, 5, 2);
        assert!(push_ok(&mut out, &42u64));
        frame.entry(true);
        push_panic(
            &mut out,
            &PanicReport {
                message: "boom".into(),
                location: None,
            },
        );
        frame.entry(false);
        push_bad_input(&mut out, "bad");
        frame.entry(false);
        assert!(push_ok(&mut out, &7u64));
        frame.entry(true);
        frame.close(&mut out);
        let FromWorker::Results {
            chunk,
            start,
            count,
            kind,
            entries,
        } = parse_from_worker(payload(&out)).unwrap()
        else {
            panic!("not results")
        };
        assert_eq!((chunk, start, count, kind), (5, 2, 4, 0));
        let (entries, shared) = split_shared(entries).unwrap();
        assert!(shared.is_empty());
        let mut e = Entries::new(entries, kind, None).unwrap();
        assert_eq!(e.next::<u64>().unwrap().unwrap(), 42);
        let err = e.next::<u64>().unwrap().unwrap_err();
        assert_eq!(err.panic_message(), Some("boom"));
        assert!(matches!(e.next::<u64>().unwrap(), Err(Error::Codec(_))));
        assert_eq!(e.next::<u64>().unwrap().unwrap(), 7);
        assert!(e.next::<u64>().is_err(), "nothing left");
        assert!(e.finish().is_ok());
        // An empty frame vanishes.
        let mut out = Vec::new();
        frame.begin(&mut out, 1, 0);
        frame.close(&mut out);
        assert!(out.is_empty());
    }

    fn sink<'a>(out: &'a mut Vec<u8>, frame: &'a mut ResultsFrame) -> Sink<'a> {
        Sink {
            out,
            frame,
            region: None,
        }
    }

    /// Values in the frame's fixed-width kind are plain entries; a value of
    /// another kind goes in postcard as a footer entry and still decodes.
    #[test]
    fn fixed_width_results_round_trip() {
        let mut out = Vec::new();
        let mut frame = ResultsFrame::default();
        frame.begin(&mut out, 1, 0);
        let ok = push_value(&mut sink(&mut out, &mut frame), &42u64);
        frame.entry(ok);
        let ok = push_value(&mut sink(&mut out, &mut frame), &u64::MAX);
        frame.entry(ok);
        // Another kind (a u32): in postcard, listed in the footer.
        let ok = push_value(&mut sink(&mut out, &mut frame), &7u32);
        assert!(!ok);
        frame.entry(ok);
        frame.close(&mut out);
        let FromWorker::Results {
            count,
            kind,
            entries,
            ..
        } = parse_from_worker(payload(&out)).unwrap()
        else {
            panic!("not results")
        };
        assert_eq!(count, 3);
        assert_ne!(kind, 0, "a fixed-width frame");
        let (entries, _) = split_shared(entries).unwrap();
        assert_eq!(entries.len(), 8 + 8 + 2 + 4 + 4, "no per-value overhead");
        let mut e = Entries::new(entries, kind, None).unwrap();
        assert_eq!(e.next::<u64>().unwrap().unwrap(), 42);
        assert_eq!(e.next::<u64>().unwrap().unwrap(), u64::MAX);
        assert_eq!(e.next::<u64>().unwrap().unwrap(), 7);
        assert!(e.finish().is_ok());
        // Read as another type than written: an error, never a misread.
        let mut e = Entries::new(entries, kind, None).unwrap();
        assert!(e.next::<u32>().is_err());
        // A frame whose entries are not all read is not whole.
        let mut e = Entries::new(entries, kind, None).unwrap();
        e.next::<u64>().unwrap().unwrap();
        assert!(e.finish().is_err());
    }

    /// A large value goes to the worker's region, a small one stays in the
    /// frame; the parent reads the large one in place and frees it.
    #[test]
    fn large_results_go_through_the_region() {
        use crate::region::{Ranges, Region};
        use std::sync::Arc;
        let (region, _fd) = Region::new().unwrap();
        let region = Arc::new(region);
        let big = vec![7u8; 3 * SHARED_MIN];
        let mut out = Vec::new();
        let mut frame = ResultsFrame::default();
        frame.begin(&mut out, 1, 0);
        for v in [&b"small".to_vec(), &big, &big] {
            let mut s = Sink {
                out: &mut out,
                frame: &mut frame,
                region: Some(&region),
            };
            let ok = push_value(&mut s, v);
            frame.entry(ok);
        }
        frame.close(&mut out);
        assert!(out.len() < 100, "only offsets in the frame: {}", out.len());
        let FromWorker::Results {
            count,
            kind,
            entries,
            ..
        } = parse_from_worker(payload(&out)).unwrap()
        else {
            panic!("not results")
        };
        let (entries, ranges) = split_shared(entries).unwrap();
        assert_eq!(ranges.len(), 2);
        assert!(ranges.iter().all(|&(o, l)| region.check(o, l)));
        let ranges: Vec<_> = ranges
            .iter()
            .map(|&(o, l)| (o as usize, l as usize))
            .collect();
        let first = ranges[0].0;
        let shared = Ranges::new(Arc::clone(&region), ranges);
        let mut e = Entries::new(entries, kind, Some(&shared)).unwrap();
        assert_eq!(count, 3);
        assert_eq!(e.next::<Vec<u8>>().unwrap().unwrap(), b"small");
        assert_eq!(e.next::<Vec<u8>>().unwrap().unwrap(), big);
        assert_eq!(e.next::<Vec<u8>>().unwrap().unwrap(), big);
        assert!(e.finish().is_ok());
        // Without its ranges, a shared entry is an error, not a misread.
        let mut e = Entries::new(entries, kind, None).unwrap();
        e.next::<Vec<u8>>().unwrap().unwrap();
        assert!(e.next::<Vec<u8>>().is_err());
        // Freed on drop: the worker takes the same range again.
        drop(shared);
        assert_eq!(region.alloc(10), Some(first));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_from_worker(&[]).is_err());
        assert!(parse_from_worker(&[9, 1, 2]).is_err());
        assert!(parse_from_worker(&[TAG_RESULTS, 1]).is_err());
        assert!(parse_to_worker(&[TAG_CHUNK, 0]).is_err());
        // No footer, a footer longer than the message, an unknown status.
        assert!(Entries::new(&[], 0, None).is_err());
        assert!(Entries::new(&[0, 0, 0], 0, None).is_err());
        assert!(Entries::new(&[9, 0, 0, 0], 0, None).is_err());
        let mut e = Entries::new(&[77, 0, 0, 0, 0, 1, 0, 0, 0], 0, None).unwrap();
        assert!(e.next::<u64>().is_err());
        // A value cut short.
        let mut e = Entries::new(&[0x80, 0, 0, 0, 0], 0, None).unwrap();
        assert!(e.next::<u64>().is_err());
    }
}

/// Hostile frames by properties, through the decoding functions of the
/// worker's reader ([`parse_to_worker`]) and the dispatcher's
/// ([`parse_from_worker`], [`Entries`], `decode_results`): arbitrary,
/// truncated and mutated payloads give an `Err` (or a value), never a panic
/// or a loop. Case counts as in [`crate::codec::proptests::config`].
#[cfg(test)]
mod proptests {
    use super::*;
    use crate::codec::proptests::config;
    use crate::pool::result::decode_results;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// One entry of a results frame: a value or a failure.
    #[derive(Debug, Clone)]
    enum Entry {
        Value(String),
        Panic(String),
        BadInput(String),
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            3 => ".{0,16}".prop_map(Entry::Value),
            1 => ".{0,16}".prop_map(Entry::Panic),
            1 => ".{0,16}".prop_map(Entry::BadInput),
        ]
    }

    /// The payload of a results frame holding `entries`.
    fn results_payload(chunk: u64, start: u32, entries: &[Entry]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut frame = ResultsFrame::default();
        frame.begin(&mut out, chunk, start);
        for e in entries {
            let ok = match e {
                Entry::Value(v) => push_ok(&mut out, v),
                Entry::Panic(m) => {
                    push_panic(
                        &mut out,
                        &PanicReport {
                            message: m.clone(),
                            location: None,
                        },
                    );
                    false
                }
                Entry::BadInput(m) => {
                    push_bad_input(&mut out, m);
                    false
                }
            };
            frame.entry(ok);
        }
        frame.close(&mut out);
        out.split_off(HEADER_LEN.min(out.len()))
    }

    /// Decodes a results payload as the dispatcher and the collector do,
    /// with the dispatcher's bound on the count (the chunk's size, here
    /// `max_count`): the result of every index, each exactly once, in order.
    fn collect(payload: &[u8], max_count: u32) -> Result<Vec<Result<String>>> {
        let FromWorker::Results {
            start,
            count,
            kind,
            entries,
            ..
        } = parse_from_worker(payload)?
        else {
            return Err(invalid("not results"));
        };
        if u64::from(start) + u64::from(count) > u64::from(max_count) {
            return Err(invalid("results out of order"));
        }
        let (entries, shared) = split_shared(entries)?;
        if !shared.is_empty() {
            return Err(invalid("a large result outside the region"));
        }
        let mut got = Vec::new();
        decode_results::<String>(u64::from(start), count, kind, entries, None, |i, r| {
            assert_eq!(i, u64::from(start) + got.len() as u64, "in order, once");
            got.push(r);
        });
        assert_eq!(got.len(), count as usize);
        Ok(got)
    }

    proptest! {
        #![proptest_config(config())]

        /// Whatever a worker reads: an error, or a message whose parts lie
        /// inside the payload.
        #[test]
        fn to_worker_on_any_payload(payload in vec(any::<u8>(), 0..96)) {
            match parse_to_worker(&payload) {
                Ok(ToWorker::Chunk { start, end, items, .. }) => {
                    prop_assert!(start <= end);
                    match items {
                        Items::Inline(b) => prop_assert_eq!(b.len(), payload.len() - CHUNK_HEADER),
                        Items::Shared { .. } => prop_assert_eq!(payload.len(), CHUNK_HEADER + 16),
                    }
                }
                Ok(ToWorker::Context { ctx, .. }) => prop_assert_eq!(ctx.len(), payload.len() - 9),
                Ok(ToWorker::Forget { .. }) => prop_assert!(payload.len() >= 9),
                Ok(ToWorker::Exit) | Err(_) => {}
            }
        }

        /// A chunk round-trips, and any cut inside its fixed fields is an
        /// error.
        #[test]
        fn chunks_round_trip_and_cut(
            (chunk, job, f, tramp) in (any::<u64>(), any::<u64>(), any::<usize>(), any::<usize>()),
            (a, b) in (any::<u32>(), any::<u32>()),
            items in vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
            kind in any::<u8>(),
        ) {
            let (start, end) = (a.min(b), a.max(b));
            let mut out = Vec::new();
            push_chunk(&mut out, chunk, job, f, tramp, start, end, kind, Items::Inline(&items));
            let payload = &out[HEADER_LEN..];
            prop_assert_eq!(
                parse_to_worker(payload).unwrap(),
                ToWorker::Chunk { chunk, job, f, tramp, start, end, kind, items: Items::Inline(&items) }
            );
            let k = cut.index(CHUNK_HEADER);
            prop_assert!(parse_to_worker(&payload[..k]).is_err());
            // A reversed range is refused.
            if start < end {
                let mut out = Vec::new();
                push_chunk(&mut out, chunk, job, f, tramp, end, start, kind, Items::Inline(&items));
                prop_assert!(parse_to_worker(&out[HEADER_LEN..]).is_err());
            }
        }

        /// Whatever the dispatcher reads: an error, or a message whose parts
        /// lie inside the payload.
        #[test]
        fn from_worker_on_any_payload(payload in vec(any::<u8>(), 0..96)) {
            match parse_from_worker(&payload) {
                Ok(FromWorker::Results { entries, .. }) => {
                    prop_assert_eq!(entries.len(), payload.len() - RESULTS_HEADER)
                }
                Ok(FromWorker::InitFailed { message }) => {
                    prop_assert!(message.len() <= 3 * payload.len())
                }
                Err(_) => {}
            }
        }

        /// Entries of arbitrary bytes: each call consumes a failure position
        /// or at least one byte, so an error comes within that many calls.
        #[test]
        fn entries_on_any_bytes(
            bytes in vec(any::<u8>(), 0..128),
            as_bytes in any::<bool>(),
            kind in any::<u8>(),
        ) {
            let Ok(mut entries) = Entries::new(&bytes, kind, None) else { return Ok(()) };
            let bound = bytes.len() + bytes.len() / 4 + 1;
            for _ in 0..=bound {
                let next = if as_bytes {
                    entries.next::<Vec<u8>>().map(drop)
                } else {
                    entries.next::<u64>().map(drop)
                };
                if next.is_err() {
                    return Ok(());
                }
            }
            prop_assert!(false, "no error after {bound} entries of {} bytes", bytes.len());
        }

        /// A frame for the other side (a worker's message read by a worker,
        /// the dispatcher's read by the dispatcher): an error or a message,
        /// and its entries decode to errors or values, never a panic.
        #[test]
        fn frames_for_the_other_side(
            entries in vec(entry(), 1..6),
            (chunk, job, f, tramp) in (any::<u64>(), any::<u64>(), any::<usize>(), any::<usize>()),
            items in vec(any::<u8>(), 0..48),
            which in 0u8..4,
        ) {
            let mut out = Vec::new();
            match which {
                0 => push_chunk(&mut out, chunk, job, f, tramp, 0, 3, 0, Items::Inline(&items)),
                1 => push_context(&mut out, job, &items),
                2 => push_forget(&mut out, job),
                _ => push_exit(&mut out),
            }
            let _ = collect(&out[HEADER_LEN..], 64);
            let _ = parse_to_worker(&results_payload(chunk, 0, &entries));
            let mut out = Vec::new();
            push_init_failed(&mut out, "initializer");
            let crossed = parse_to_worker(&out[HEADER_LEN..]);
            let context_or_error = matches!(crossed, Ok(ToWorker::Context { .. }) | Err(_));
            prop_assert!(context_or_error, "{:?}", crossed);
        }

        /// Results frames round-trip; cut or with one byte changed, they
        /// give errors or values for every index, never a panic.
        #[test]
        fn results_round_trip_cut_and_mutated(
            entries in vec(entry(), 0..8),
            (chunk, start) in (any::<u64>(), 0u32..4),
            cut in any::<prop::sample::Index>(),
            flip in (any::<prop::sample::Index>(), 1u8..=255),
        ) {
            let payload = results_payload(chunk, start, &entries);
            let max_count = start + entries.len() as u32;
            if entries.is_empty() {
                prop_assert!(payload.is_empty(), "an empty frame vanishes");
            } else {
                let got = collect(&payload, max_count).unwrap();
                prop_assert_eq!(got.len(), entries.len());
                for (g, e) in got.iter().zip(&entries) {
                    match (g, e) {
                        (Ok(v), Entry::Value(w)) => prop_assert_eq!(v, w),
                        (Err(err), Entry::Panic(m)) => prop_assert_eq!(err.panic_message(), Some(m.as_str())),
                        (Err(Error::Codec(c)), Entry::BadInput(m)) => {
                            prop_assert_eq!(c.kind(), &CodecErrorKind::Invalid(m.clone()))
                        }
                        other => prop_assert!(false, "{other:?}"),
                    }
                }
            }
            let _ = collect(&payload[..cut.index(payload.len() + 1)], max_count);
            if !payload.is_empty() {
                let mut mutated = payload.clone();
                mutated[flip.0.index(payload.len())] ^= flip.1;
                let _ = collect(&mutated, max_count);
            }
        }
    }
}
