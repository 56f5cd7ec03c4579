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

/// Bytes of the length header in front of every payload.
pub(crate) const HEADER_LEN: usize = 8;

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
    let len = (out.len() - start - HEADER_LEN) as u64;
    out[start..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(())
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

/// Decodes values packed back to back (the pool's result entries) with one
/// decoder across them, not one per value.
pub(crate) struct SeqDecoder<'a> {
    de: postcard::Deserializer<'a, postcard::de_flavors::Slice<'a>>,
}

impl<'a> SeqDecoder<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> SeqDecoder<'a> {
        SeqDecoder {
            de: postcard::Deserializer::from_bytes(bytes),
        }
    }

    /// Decodes the next value.
    #[inline]
    pub(crate) fn next<T: DeserializeOwned>(&mut self) -> Result<T> {
        T::deserialize(&mut self.de)
            .map_err(|e| CodecError::new(CodecErrorKind::Invalid(e.to_string())).into())
    }
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
fn payload_len(header: &[u8], limit: usize) -> Result<usize, CodecError> {
    let mut bytes = [0u8; HEADER_LEN];
    bytes.copy_from_slice(&header[..HEADER_LEN]);
    let len = u64::from_le_bytes(bytes);
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
        }
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
        let len = payload_len(&self.buf[self.start..self.end], self.limit)?;
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

    /// Decodes the next whole frame, if one is buffered.
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
    pub(crate) fn fill(&mut self, fd: BorrowedFd<'_>) -> Result<Fill> {
        let want = self.want()?;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < want {
            // Compact, then grow (zeroing only the new tail, once).
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end < want {
                self.buf.resize(self.end + want, 0);
            }
        }
        let upto = if self.greedy {
            self.buf.len()
        } else {
            self.end + want
        };
        let n = sys::read(fd, &mut self.buf[self.end..upto])?;
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
}
