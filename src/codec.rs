//! The wire format: length-prefixed serde frames.
//!
//! A frame is an 8-byte little-endian payload length followed by the payload,
//! a [postcard] encoding of one value. This is the only module that names the
//! serializer: swapping it touches this file alone. Both ends of every
//! channel are the same binary (a fork of one image), so the format never
//! needs to be compatible across versions of the crate.
//!
//! Decoding is defensive: a header announcing more than the reader's limit is
//! refused before anything is allocated, a stream that ends inside a frame is
//! [`CodecErrorKind::Truncated`], and a payload that is not exactly one value
//! of the expected type is [`CodecErrorKind::Invalid`] or
//! [`CodecErrorKind::TrailingBytes`].

use std::os::fd::BorrowedFd;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CodecError, CodecErrorKind, Error, Result};
use crate::sys;

pub(crate) mod fixed;

/// Bytes of the length header in front of every payload.
pub(crate) const HEADER_LEN: usize = 8;

/// The top bit of a header flags the frame (the rest is the length): a
/// [`Connection`](crate::Connection) marks a message whose value is in its
/// shared region, the payload being only where. Other readers ignore it.
pub(crate) const FLAGGED: u64 = 1 << 63;

/// The default limit on one frame's payload: 1 GiB.
pub const DEFAULT_MAX_FRAME_LEN: usize = 1 << 30;

/// Smallest read a greedy reader asks the kernel for.
const MIN_READ: usize = 64 * 1024;

/// A postcard output flavor that appends to a `Vec<u8>` slice by slice
/// (postcard's `to_extend` pushes byte by byte).
struct VecFlavor<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for VecFlavor<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // Varints and short strings without a call to memcpy.
        sys::extend_small(self.0, data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends one frame (header and payload) holding `value` to `out`.
pub(crate) fn encode_frame<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    if let Err(e) = postcard::serialize_with_flavor::<T, _, ()>(value, VecFlavor(out)) {
        out.truncate(start);
        return Err(CodecError::new(CodecErrorKind::Encode(e.to_string())).into());
    }
    close_frame(out, start);
    Ok(())
}

/// [`encode_frame`] for a value whose payload is shorter than `cap` bytes:
/// `Ok(false)`, with `out` as it was, once the payload reaches `cap` (one
/// pass for a small value, instead of a counting pass and an encode).
pub(crate) fn encode_frame_below<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
    cap: usize,
) -> Result<bool> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let flavor = CappedVec {
        limit: out.len().saturating_add(cap),
        out,
    };
    match postcard::serialize_with_flavor::<T, _, ()>(value, flavor) {
        Ok(()) => {
            close_frame(out, start);
            Ok(true)
        }
        Err(postcard::Error::SerializeBufferFull) => {
            out.truncate(start);
            Ok(false)
        }
        Err(e) => {
            out.truncate(start);
            Err(CodecError::new(CodecErrorKind::Encode(e.to_string())).into())
        }
    }
}

/// Writes the length of the frame that starts at `start` into its header.
fn close_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - HEADER_LEN) as u64;
    out[start..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
}

/// [`VecFlavor`] that stops (`SerializeBufferFull`) once `out` would reach
/// `limit` bytes.
struct CappedVec<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
}

impl postcard::ser_flavors::Flavor for CappedVec<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if self.out.len() + data.len() >= self.limit {
            return Err(postcard::Error::SerializeBufferFull);
        }
        sys::extend_small(self.out, data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        if self.out.len() + 1 >= self.limit {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.out.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A postcard flavor that only counts, and stops once `cap` is reached.
struct CappedSize {
    len: usize,
    cap: usize,
}

impl postcard::ser_flavors::Flavor for CappedSize {
    type Output = usize;

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.len += data.len();
        if self.len >= self.cap {
            return Err(postcard::Error::SerializeBufferFull);
        }
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, _: u8) -> postcard::Result<()> {
        self.len += 1;
        if self.len >= self.cap {
            return Err(postcard::Error::SerializeBufferFull);
        }
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.len)
    }
}

/// Whether `value` encodes to at least `cap` bytes, without encoding it (a
/// counting pass that stops at `cap`). A value that cannot be encoded
/// answers `false`: the caller's ordinary encode reports the error.
#[inline]
pub(crate) fn encodes_to_at_least<T: Serialize + ?Sized>(value: &T, cap: usize) -> bool {
    matches!(
        postcard::serialize_with_flavor::<T, _, usize>(value, CappedSize { len: 0, cap }),
        Err(postcard::Error::SerializeBufferFull)
    )
}

/// The exact length of `value`'s encoding (a counting pass).
pub(crate) fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Result<usize> {
    postcard::experimental::serialized_size(value)
        .map_err(|e| CodecError::new(CodecErrorKind::Encode(e.to_string())).into())
}

/// Encodes `value` into the front of `buf`; the number of bytes written.
pub(crate) fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut [u8]) -> Result<usize> {
    postcard::to_slice(value, buf)
        .map(|b| b.len())
        .map_err(|e| CodecError::new(CodecErrorKind::Encode(e.to_string())).into())
}

/// Appends the encoding of `value` to `out`, without a frame header (the
/// pool packs many values into one frame).
pub(crate) fn encode_value<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    if let Err(e) = postcard::serialize_with_flavor::<T, _, ()>(value, VecFlavor(out)) {
        out.truncate(start);
        return Err(CodecError::new(CodecErrorKind::Encode(e.to_string())).into());
    }
    Ok(())
}

/// Decodes one `T` off the front of `input` and advances it past the value
/// (the pool's items, packed back to back).
#[inline]
pub(crate) fn take_value<T: DeserializeOwned>(input: &mut &[u8]) -> Result<T> {
    match postcard::take_from_bytes::<T>(input) {
        Ok((value, rest)) => {
            *input = rest;
            Ok(value)
        }
        Err(e) => Err(CodecError::new(CodecErrorKind::Invalid(e.to_string())).into()),
    }
}

/// Decodes a payload that must hold exactly one `T`.
pub(crate) fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(CodecError::new(CodecErrorKind::TrailingBytes(rest.len())).into()),
        Err(e) => Err(CodecError::new(CodecErrorKind::Invalid(e.to_string())).into()),
    }
}

/// The payload length announced by a complete header, checked against `limit`.
fn payload_len(header: &[u8], limit: usize, flags: bool) -> Result<usize, CodecError> {
    let mut bytes = [0u8; HEADER_LEN];
    bytes.copy_from_slice(&header[..HEADER_LEN]);
    let mut len = u64::from_le_bytes(bytes);
    if flags {
        len &= !FLAGGED;
    }
    if len > limit as u64 {
        return Err(CodecError::new(CodecErrorKind::Oversize { len, limit }));
    }
    Ok(len as usize)
}

/// What one [`FrameReader::fill`] call saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Bytes arrived.
    Data,
    /// End of file with nothing pending.
    Eof,
}

/// The read side of a framed stream: buffers bytes from an fd until whole
/// frames are available.
///
/// A *greedy* reader asks for as much as the kernel has (fewest system calls;
/// the pool's dispatcher uses it). An *exact* reader never reads past the end
/// of the current frame, so bytes of the next frame stay in the kernel and a
/// `poll` on the fd still reports them (the public
/// [`Connection`](crate::Connection) relies on this for [`wait`](crate::wait)).
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limit: usize,
    greedy: bool,
    /// The last `fill` got fewer bytes than it asked for: the fd had no
    /// more for now.
    drained: bool,
    /// Headers may be [`FLAGGED`] (a [`Connection`](crate::Connection)'s
    /// reader); elsewhere the top bit is part of the length (oversize).
    flags: bool,
}

impl FrameReader {
    pub(crate) fn new(limit: usize, greedy: bool) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            limit,
            greedy,
            drained: false,
            flags: false,
        }
    }

    /// A reader that accepts [`FLAGGED`] headers (see
    /// [`next_flagged`](FrameReader::next_flagged)).
    pub(crate) fn with_flags(mut self) -> FrameReader {
        self.flags = true;
        self
    }

    pub(crate) fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes buffered but not yet returned as a frame.
    pub(crate) fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Total bytes (header included) the frame at the front needs, once its
    /// header is complete.
    fn frame_len(&self) -> Result<Option<usize>, CodecError> {
        if self.pending() < HEADER_LEN {
            return Ok(None);
        }
        let len = payload_len(&self.buf[self.start..self.end], self.limit, self.flags)?;
        Ok(Some(HEADER_LEN + len))
    }

    /// `true` if a whole frame is buffered.
    pub(crate) fn has_frame(&self) -> bool {
        matches!(self.frame_len(), Ok(Some(n)) if self.pending() >= n) || self.frame_len().is_err()
    }

    /// The next whole frame's payload, consumed from the buffer; `None` if
    /// more bytes are needed.
    pub(crate) fn next_payload(&mut self) -> Result<Option<&[u8]>> {
        let Some(total) = self.frame_len()? else {
            return Ok(None);
        };
        if self.pending() < total {
            return Ok(None);
        }
        let payload = self.start + HEADER_LEN..self.start + total;
        self.start += total;
        if self.start == self.end {
            // Everything consumed: the next fill starts at the front again.
            // The payload slice stays valid: the bytes are not overwritten
            // before the next `fill`, which needs `&mut self`.
            let (s, e) = (payload.start, payload.end);
            self.start = 0;
            self.end = 0;
            return Ok(Some(&self.buf[s..e]));
        }
        Ok(Some(&self.buf[payload]))
    }

    /// The next whole frame's payload, and whether its header is
    /// [`FLAGGED`].
    pub(crate) fn next_flagged(&mut self) -> Result<Option<(bool, &[u8])>> {
        let flagged = self.flags
            && self.pending() >= HEADER_LEN
            && self.buf[self.start + HEADER_LEN - 1] & 0x80 != 0;
        Ok(self.next_payload()?.map(|p| (flagged, p)))
    }

    /// Decodes the next whole frame, if one is buffered.
    #[cfg(test)]
    pub(crate) fn next_value<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        match self.next_payload()? {
            Some(payload) => decode(payload).map(Some),
            None => Ok(None),
        }
    }

    /// How many bytes the next read may take.
    fn want(&self) -> Result<usize, CodecError> {
        let needed = match self.frame_len()? {
            None => HEADER_LEN - self.pending(),
            Some(total) => total - self.pending(),
        };
        Ok(if self.greedy {
            needed.max(MIN_READ)
        } else {
            needed.max(1)
        })
    }

    /// Whether the last [`fill`](FrameReader::fill) read less than it asked
    /// for, so that another read now would most likely find nothing (a
    /// stream socket or pipe returns what it has).
    pub(crate) fn drained(&self) -> bool {
        self.drained
    }

    /// One `read(2)` from `fd` into the buffer. A header over the limit is
    /// reported here, before the buffer grows for it.
    ///
    /// The buffer grows with the bytes that arrive, not with the length a
    /// header announces: one read gets room for at most as many bytes as
    /// are pending (at least [`MIN_READ`]), so a large frame doubles the
    /// buffer read by read, and a peer's 8-byte header alone cannot make
    /// the reader allocate (and zero) the whole limit.
    pub(crate) fn fill(&mut self, fd: BorrowedFd<'_>) -> Result<Fill> {
        self.fill_from(|buf| sys::read(fd, buf))
    }

    /// [`fill`](FrameReader::fill) with `read` in place of `read(2)`.
    pub(crate) fn fill_from(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> Result<Fill> {
        let want = self.want()?;
        let room = want.min(self.pending().max(MIN_READ));
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < room {
            // Compact, then grow (zeroing only the new tail, once).
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < room {
                self.buf.resize(self.end + room, 0);
            }
        }
        let upto = if self.greedy {
            self.buf.len()
        } else {
            self.end + want.min(self.buf.len() - self.end)
        };
        let n = read(&mut self.buf[self.end..upto])?;
        if n == 0 {
            return if self.pending() == 0 {
                Ok(Fill::Eof)
            } else {
                Err(self.truncated())
            };
        }
        self.drained = n < upto - self.end;
        self.end += n;
        Ok(Fill::Data)
    }

    /// The error for an end of file in the middle of a frame.
    pub(crate) fn truncated(&self) -> Error {
        let expected = match self.frame_len() {
            Ok(Some(total)) => total,
            _ => HEADER_LEN,
        };
        CodecError::new(CodecErrorKind::Truncated {
            got: self.pending(),
            expected,
        })
        .into()
    }

    /// Forgets buffered bytes and releases a large buffer.
    #[allow(dead_code)] // for the pool layer
    pub(crate) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
        if self.buf.len() > 4 * MIN_READ {
            self.buf = Vec::new();
        }
    }
}

/// The error for a frame refused on the sending side (over the limit).
pub(crate) fn oversize_on_send(len: usize, limit: usize) -> Error {
    CodecError::new(CodecErrorKind::Oversize {
        len: len as u64,
        limit,
    })
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_frame_is_the_frame_or_nothing() {
        let small = vec![7u8; 100];
        let (mut a, mut b) = (vec![1, 2], vec![1, 2]);
        encode_frame(&small, &mut a).unwrap();
        assert!(encode_frame_below(&small, &mut b, 1000).unwrap());
        assert_eq!(a, b);
        // 100 bytes and their varint length: 101 bytes reach a cap of 101.
        let mut c = vec![1, 2];
        assert!(!encode_frame_below(&small, &mut c, 101).unwrap());
        assert_eq!(c, [1, 2]);
        assert!(encode_frame_below(&small, &mut c, 102).unwrap());
        assert_eq!(c, a);
        assert!(encode_frame_below(&small, &mut c, usize::MAX).unwrap());
    }
    use std::os::fd::AsFd;

    #[test]
    fn round_trip_in_memory() {
        let mut out = Vec::new();
        encode_frame(&(1u64, "two".to_string()), &mut out).unwrap();
        encode_frame(&vec![3u8; 5], &mut out).unwrap();
        let len = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
        let (a, rest) = out[8..].split_at(len);
        assert_eq!(decode::<(u64, String)>(a).unwrap(), (1, "two".into()));
        assert_eq!(decode::<Vec<u8>>(&rest[8..]).unwrap(), vec![3u8; 5]);
    }

    #[test]
    fn trailing_bytes_and_garbage() {
        let mut out = Vec::new();
        encode_frame(&(7u32, 8u32), &mut out).unwrap();
        match decode::<u32>(&out[8..]) {
            Err(Error::Codec(e)) => assert_eq!(e.kind(), &CodecErrorKind::TrailingBytes(1)),
            other => panic!("expected trailing bytes, got {other:?}"),
        }
        assert!(matches!(
            decode::<String>(&[5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]),
            Err(Error::Codec(_))
        ));
        assert!(matches!(decode::<u64>(&[]), Err(Error::Codec(_))));
    }

    #[test]
    fn reader_exact_and_greedy() {
        for greedy in [false, true] {
            let (r, w) = sys::pipe().unwrap();
            let mut out = Vec::new();
            for i in 0..10u32 {
                encode_frame(&i, &mut out).unwrap();
            }
            sys::write_all(w.as_fd(), &out).unwrap();
            drop(w);
            let mut reader = FrameReader::new(1024, greedy);
            let mut got = Vec::new();
            loop {
                while let Some(v) = reader.next_value::<u32>().unwrap() {
                    got.push(v);
                }
                if reader.fill(r.as_fd()).unwrap() == Fill::Eof {
                    break;
                }
            }
            assert_eq!(got, (0..10).collect::<Vec<_>>());
        }
    }

    #[test]
    fn oversize_header_refused_before_allocation() {
        let (r, w) = sys::pipe().unwrap();
        sys::write_all(w.as_fd(), &(u64::MAX).to_le_bytes()).unwrap();
        let mut reader = FrameReader::new(1 << 20, false);
        reader.fill(r.as_fd()).unwrap();
        match reader.next_payload() {
            Err(Error::Codec(e)) => assert!(matches!(e.kind(), CodecErrorKind::Oversize { .. })),
            other => panic!("expected oversize, got {other:?}"),
        }
        assert!(reader.buf.len() < 1 << 20);
    }

    /// Regression (found by `tests/hostile.rs`): a header announcing a
    /// frame within the limit made the reader allocate and zero the whole
    /// announced length before a byte of it arrived (1 GiB for 8 bytes
    /// under the default limit).
    #[test]
    fn announced_length_is_not_allocated_before_it_arrives() {
        use std::io::Write;
        use std::net::Shutdown;
        use std::os::unix::net::UnixStream;
        for greedy in [false, true] {
            // End of file by a shutdown, not a close: a sibling test's child
            // may hold a copy of the fd.
            let (r, mut w) = UnixStream::pair().unwrap();
            let mut bytes = ((DEFAULT_MAX_FRAME_LEN - 1) as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(b"a few bytes");
            w.write_all(&bytes).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
            let mut reader = FrameReader::new(DEFAULT_MAX_FRAME_LEN, greedy);
            loop {
                match reader.fill(r.as_fd()) {
                    Ok(Fill::Data) => {
                        assert!(reader.buf.len() <= 2 * MIN_READ, "{}", reader.buf.len());
                        assert!(reader.next_payload().unwrap().is_none());
                    }
                    Ok(Fill::Eof) => panic!("end of file inside a frame is an error"),
                    Err(Error::Codec(e)) => {
                        assert!(matches!(
                            e.kind(),
                            CodecErrorKind::Truncated { got: 19, .. }
                        ));
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }
}

/// Hostile input by properties: arbitrary bytes, cut frames and random
/// headers never panic, never loop, never grow a buffer past what arrived.
/// 2 000 cases per property in a debug build, 100 000 in a release build
/// (`cargo test --release`); `PROPTEST_CASES` overrides both.
#[cfg(test)]
pub(crate) mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::os::fd::AsFd;

    /// The proptest configuration of the crate's property tests.
    pub(crate) fn config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if cfg!(debug_assertions) {
                2_000
            } else {
                100_000
            });
        ProptestConfig {
            cases,
            // Failing cases become plain regression tests, not files.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// Decodes `bytes` as the type `kind` names; `true` for a value.
    fn decode_as(kind: u8, bytes: &[u8]) -> bool {
        match kind {
            0 => decode::<u64>(bytes).is_ok(),
            1 => decode::<String>(bytes).is_ok(),
            2 => decode::<Vec<u8>>(bytes).is_ok(),
            3 => decode::<(i32, Option<String>, bool)>(bytes).is_ok(),
            4 => decode::<Vec<Vec<u64>>>(bytes).is_ok(),
            5 => decode::<BTreeMap<String, f64>>(bytes).is_ok(),
            6 => decode::<char>(bytes).is_ok(),
            7 => decode::<crate::unwind::PanicReport>(bytes).is_ok(),
            _ => decode::<()>(bytes).is_ok(),
        }
    }

    /// The next value of a sequence, as a type that takes at least one
    /// byte; `true` for a value.
    fn next_as(kind: u8, dec: &mut &[u8]) -> bool {
        match kind % 4 {
            0 => take_value::<u64>(dec).is_ok(),
            1 => take_value::<String>(dec).is_ok(),
            2 => take_value::<Vec<u16>>(dec).is_ok(),
            _ => take_value::<Option<(u8, char)>>(dec).is_ok(),
        }
    }

    /// What a reader made of a whole stream.
    #[derive(Debug)]
    struct Outcome {
        payloads: Vec<Vec<u8>>,
        end: Result<()>,
        largest_buffer: usize,
    }

    /// Feeds `bytes` (then end of file) through a socket to a reader, reading
    /// every frame, until end of file or an error; fails if it loops.
    fn read_stream(bytes: &[u8], limit: usize, greedy: bool) -> Outcome {
        use std::io::Write;
        // End of file by a shutdown, not a close: a sibling test's child
        // may hold a copy of the fd, and end of file must come all the same.
        let (r, mut w) = std::os::unix::net::UnixStream::pair().unwrap();
        w.write_all(bytes).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reader = FrameReader::new(limit, greedy);
        let mut out = Outcome {
            payloads: Vec::new(),
            end: Ok(()),
            largest_buffer: 0,
        };
        // Each round reads at least one byte or ends.
        for _ in 0..bytes.len() + 2 {
            loop {
                match reader.next_payload() {
                    Ok(Some(p)) => out.payloads.push(p.to_vec()),
                    Ok(None) => break,
                    Err(e) => {
                        out.end = Err(e);
                        return out;
                    }
                }
            }
            let fill = reader.fill(r.as_fd());
            out.largest_buffer = out.largest_buffer.max(reader.buf.len());
            match fill {
                Ok(Fill::Data) => {}
                Ok(Fill::Eof) => return out,
                Err(e) => {
                    out.end = Err(e);
                    return out;
                }
            }
        }
        panic!("the reader looped on {} bytes", bytes.len());
    }

    fn codec_kind(r: &Result<()>) -> Option<&CodecErrorKind> {
        match r {
            Err(Error::Codec(e)) => Some(e.kind()),
            _ => None,
        }
    }

    fn limit() -> impl Strategy<Value = usize> {
        prop_oneof![0usize..64, 64usize..4096, Just(DEFAULT_MAX_FRAME_LEN)]
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn decode_never_panics(bytes in vec(any::<u8>(), 0..256), kind in 0u8..9) {
            decode_as(kind, &bytes);
        }

        /// Every value taken off a sequence consumes a byte: arbitrary
        /// bytes end in an error, in at most one call per byte.
        #[test]
        fn a_sequence_of_garbage_ends(bytes in vec(any::<u8>(), 0..256), kinds in vec(0u8..4, 1..8)) {
            let mut dec: &[u8] = &bytes;
            let mut calls = 0;
            while next_as(kinds[calls % kinds.len()], &mut dec) {
                calls += 1;
                prop_assert!(calls <= bytes.len(), "{calls} values from {} bytes", bytes.len());
            }
        }

        /// Any stream: whole frames, then end of file or an error; no
        /// buffer beyond one read's room past the bytes that arrived.
        #[test]
        fn a_reader_on_any_stream(
            bytes in vec(any::<u8>(), 0..1024),
            limit in limit(),
            greedy in any::<bool>(),
        ) {
            let out = read_stream(&bytes, limit, greedy);
            prop_assert!(out.largest_buffer <= 2 * MIN_READ + bytes.len(), "{out:?}");
            let framed: usize = out.payloads.iter().map(|p| HEADER_LEN + p.len()).sum();
            prop_assert!(framed <= bytes.len());
            prop_assert!(out.payloads.iter().all(|p| p.len() <= limit));
            match &out.end {
                Ok(()) => prop_assert_eq!(framed, bytes.len()),
                Err(Error::Codec(_)) => {}
                Err(e) => prop_assert!(false, "not a codec error: {e}"),
            }
        }

        /// Valid frames cut anywhere: the whole frames before the cut,
        /// then a truncated frame with the exact counts (or a clean end at
        /// a frame boundary).
        #[test]
        fn frames_cut_anywhere(
            values in vec(vec(".{0,12}", 0..6), 1..5),
            cut in any::<prop::sample::Index>(),
            greedy in any::<bool>(),
        ) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            for v in &values {
                encode_frame(v, &mut bytes).unwrap();
                ends.push(bytes.len());
            }
            let k = cut.index(bytes.len() + 1);
            let out = read_stream(&bytes[..k], DEFAULT_MAX_FRAME_LEN, greedy);
            let whole = ends.iter().filter(|&&e| e <= k).count();
            prop_assert_eq!(out.payloads.len(), whole);
            for (p, v) in out.payloads.iter().zip(&values) {
                prop_assert_eq!(&decode::<Vec<String>>(p).unwrap(), v);
            }
            let begin = if whole == 0 { 0 } else { ends[whole - 1] };
            if begin == k {
                prop_assert!(out.end.is_ok());
            } else {
                let got = k - begin;
                let expected = if got < HEADER_LEN { HEADER_LEN } else { ends[whole] - begin };
                prop_assert_eq!(
                    codec_kind(&out.end),
                    Some(&CodecErrorKind::Truncated { got, expected })
                );
            }
        }

        /// A header over the limit is refused before its frame is buffered;
        /// one within the limit gets room as its bytes arrive, not before.
        #[test]
        fn random_headers(
            len in prop_oneof![any::<u64>(), 0u64..4096, Just(DEFAULT_MAX_FRAME_LEN as u64)],
            limit in limit(),
            tail in vec(any::<u8>(), 0..64),
            greedy in any::<bool>(),
        ) {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&tail);
            let out = read_stream(&bytes, limit, greedy);
            prop_assert!(out.largest_buffer <= 2 * MIN_READ, "{out:?}");
            if len > limit as u64 {
                prop_assert!(out.payloads.is_empty());
                prop_assert_eq!(
                    codec_kind(&out.end),
                    Some(&CodecErrorKind::Oversize { len, limit })
                );
            } else if len as usize <= tail.len() {
                prop_assert_eq!(&out.payloads[0][..], &tail[..len as usize]);
            } else {
                prop_assert_eq!(
                    codec_kind(&out.end),
                    Some(&CodecErrorKind::Truncated {
                        got: bytes.len(),
                        expected: HEADER_LEN + len as usize
                    })
                );
            }
        }
    }
}
