//! The frames between the dispatcher and a worker (see the module docs of
//! [`pool`](super) for the protocol). Pure functions: no I/O.
//!
//! Every message is one codec frame (8-byte length, payload). The payload
//! starts with a one-byte tag and fixed little-endian fields; the items and
//! results inside are codec values packed back to back, so a chunk of a
//! million `u64` is one frame of a few megabytes, not a million frames.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, SeqDecoder, HEADER_LEN};
use crate::error::{CodecError, CodecErrorKind, Error, Result};
use crate::unwind::PanicReport;

const TAG_CHUNK: u8 = 1;
const TAG_CONTEXT: u8 = 2;
const TAG_FORGET: u8 = 3;
const TAG_EXIT: u8 = 4;

const TAG_RESULTS: u8 = 1;
const TAG_INIT_FAILED: u8 = 2;

/// Status byte of one result entry.
const ENTRY_OK: u8 = 0;
const ENTRY_PANICKED: u8 = 1;
const ENTRY_ENCODE_FAILED: u8 = 2;
const ENTRY_BAD_INPUT: u8 = 3;

/// Fixed bytes in front of a chunk's items.
pub(crate) const CHUNK_HEADER: usize = 1 + 8 * 4 + 4 * 2;
/// Fixed bytes in front of a results frame's entries.
const RESULTS_HEADER: usize = 1 + 8 + 4 + 4;

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
        items: &'a [u8],
    },
    /// The encoded context of `job` (`map_with`), sent once per worker.
    Context { job: u64, ctx: &'a [u8] },
    /// `job` is over: drop its context.
    Forget { job: u64 },
    /// Finish and exit (the pool is closing or the worker retires).
    Exit,
}

/// A message from a worker to the dispatcher.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FromWorker<'a> {
    /// Results of items `start..start + count` of `chunk`, in order.
    Results {
        chunk: u64,
        start: u32,
        count: u32,
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
    items: &[u8],
) {
    out.reserve(HEADER_LEN + CHUNK_HEADER + items.len());
    let s = begin_frame(out);
    out.push(TAG_CHUNK);
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&job.to_le_bytes());
    out.extend_from_slice(&(f as u64).to_le_bytes());
    out.extend_from_slice(&(tramp as u64).to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&end.to_le_bytes());
    out.extend_from_slice(items);
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
        TAG_CHUNK => {
            let chunk = p.u64()?;
            let job = p.u64()?;
            let f = p.u64()? as usize;
            let tramp = p.u64()? as usize;
            let start = p.u32()?;
            let end = p.u32()?;
            if start > end {
                return Err(invalid("chunk range"));
            }
            Ok(ToWorker::Chunk {
                chunk,
                job,
                f,
                tramp,
                start,
                end,
                items: p.0,
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
/// item, entries appended, closed by [`ResultsFrame::close`].
#[derive(Debug)]
pub(crate) struct ResultsFrame {
    frame_start: usize,
    pub(crate) count: u32,
}

impl ResultsFrame {
    /// Begins a results frame for `chunk` from item `start` in `out`.
    pub(crate) fn begin(out: &mut Vec<u8>, chunk: u64, start: u32) -> ResultsFrame {
        let frame_start = begin_frame(out);
        out.push(TAG_RESULTS);
        out.extend_from_slice(&chunk.to_le_bytes());
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        ResultsFrame {
            frame_start,
            count: 0,
        }
    }

    /// Writes the count and the length; an empty frame is removed.
    pub(crate) fn close(self, out: &mut Vec<u8>) {
        if self.count == 0 {
            out.truncate(self.frame_start);
            return;
        }
        let at = self.frame_start + HEADER_LEN + 1 + 8 + 4;
        out[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        end_frame(out, self.frame_start);
    }
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
            Ok(FromWorker::Results {
                chunk,
                start,
                count,
                entries: p.0,
            })
        }
        TAG_INIT_FAILED => Ok(FromWorker::InitFailed {
            message: String::from_utf8_lossy(p.0).into_owned(),
        }),
        _ => Err(invalid("unknown message from a worker")),
    }
}

/// Appends the entry of a task that returned `value` (or, if it cannot be
/// encoded, the entry of an encoding failure).
pub(crate) fn push_ok<R: Serialize>(out: &mut Vec<u8>, value: &R) {
    let at = out.len();
    out.push(ENTRY_OK);
    if let Err(e) = codec::encode_value(value, out) {
        out.truncate(at);
        push_message(out, ENTRY_ENCODE_FAILED, &e.to_string());
    }
}

/// Appends the entry of a task that panicked.
pub(crate) fn push_panic(out: &mut Vec<u8>, report: &PanicReport) {
    let at = out.len();
    out.push(ENTRY_PANICKED);
    if codec::encode_value(report, out).is_err() {
        out.truncate(at);
        push_message(out, ENTRY_ENCODE_FAILED, "panic report");
    }
}

/// Appends the entry of an item whose input could not be decoded.
pub(crate) fn push_bad_input(out: &mut Vec<u8>, message: &str) {
    push_message(out, ENTRY_BAD_INPUT, message);
}

fn push_message(out: &mut Vec<u8>, status: u8, message: &str) {
    out.push(status);
    codec::encode_value(message, out).expect("a str always encodes");
}

/// Decodes the next entry of a results message. The outer `Err` is a broken
/// stream; the inner one is the task's failure. (A status is one byte, which
/// is also how postcard encodes a `u8`.)
#[inline]
pub(crate) fn next_entry<R: DeserializeOwned>(dec: &mut SeqDecoder<'_>) -> Result<Result<R>> {
    let status: u8 = dec.next().map_err(|_| invalid("missing result entry"))?;
    match status {
        ENTRY_OK => Ok(Ok(dec.next::<R>()?)),
        ENTRY_PANICKED => Ok(Err(dec.next::<PanicReport>()?.into())),
        ENTRY_ENCODE_FAILED => Ok(Err(CodecError::new(CodecErrorKind::Encode(
            dec.next::<String>()?,
        ))
        .into())),
        ENTRY_BAD_INPUT => Ok(Err(CodecError::new(CodecErrorKind::Invalid(
            dec.next::<String>()?,
        ))
        .into())),
        _ => Err(invalid("unknown result status")),
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
        push_chunk(&mut out, 7, 3, 0x1000, 0x2000, 1, 4, b"abcd");
        assert_eq!(
            parse_to_worker(payload(&out)).unwrap(),
            ToWorker::Chunk {
                chunk: 7,
                job: 3,
                f: 0x1000,
                tramp: 0x2000,
                start: 1,
                end: 4,
                items: b"abcd"
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
        let frame = ResultsFrame::begin(&mut out, 5, 2);
        let mut frame = frame;
        push_ok(&mut out, &42u64);
        frame.count += 1;
        push_panic(
            &mut out,
            &PanicReport {
                message: "boom".into(),
                location: None,
            },
        );
        frame.count += 1;
        push_bad_input(&mut out, "bad");
        frame.count += 1;
        frame.close(&mut out);
        let FromWorker::Results {
            chunk,
            start,
            count,
            entries,
        } = parse_from_worker(payload(&out)).unwrap()
        else {
            panic!("not results")
        };
        assert_eq!((chunk, start, count), (5, 2, 3));
        let mut dec = SeqDecoder::new(entries);
        assert_eq!(next_entry::<u64>(&mut dec).unwrap().unwrap(), 42);
        let e = next_entry::<u64>(&mut dec).unwrap().unwrap_err();
        assert_eq!(e.panic_message(), Some("boom"));
        assert!(matches!(
            next_entry::<u64>(&mut dec).unwrap(),
            Err(Error::Codec(_))
        ));
        assert!(next_entry::<u64>(&mut dec).is_err(), "nothing left");
        // An empty frame vanishes.
        let mut out = Vec::new();
        ResultsFrame::begin(&mut out, 1, 0).close(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_from_worker(&[]).is_err());
        assert!(parse_from_worker(&[9, 1, 2]).is_err());
        assert!(parse_from_worker(&[TAG_RESULTS, 1]).is_err());
        assert!(parse_to_worker(&[TAG_CHUNK, 0]).is_err());
        let mut dec = SeqDecoder::new(&[77, 1, 2]);
        assert!(next_entry::<u64>(&mut dec).is_err());
        let mut dec = SeqDecoder::new(&[ENTRY_OK]);
        assert!(next_entry::<u64>(&mut dec).is_err());
    }
}
