//! `pipe()` and [`Connection`]: a framed duplex channel (Python's
//! `multiprocessing.Pipe`).

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, Fill, FrameReader, DEFAULT_MAX_FRAME_LEN, FLAGGED, HEADER_LEN};
use crate::error::{CodecError, CodecErrorKind, Error, Result};
use crate::region::{Ranges, Region};
use crate::sys;

/// Values that encode to at least this many bytes go through the sending
/// end's shared region (over a Unix socket): encoded straight into it and
/// decoded straight out of it, instead of two more copies through the
/// socket's buffers.
const SHARED_MIN: usize = 256 * 1024;

/// Fds received ahead of their messages that an end keeps at most.
const MAX_QUEUED_FDS: usize = 8;

fn broken(what: &str) -> Error {
    CodecError::new(CodecErrorKind::Invalid(format!("connection: {what}"))).into()
}

/// A deadline so far away that it never passes (for overflowing timeouts).
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// Socket buffer size asked for each end of a [`pipe`] (the kernel caps it).
const SOCKET_BUFFER: usize = 4 << 20;

/// Creates a connected pair of [`Connection`]s: both ends of one Unix stream
/// socket pair, each able to send and receive.
///
/// Create the pair *before* forking and move one end into the child's
/// closure: the parent's copy of that end is closed when the closure is
/// dropped in the parent (right after the fork), so the parent sees end of
/// file once the child exits or drops its end.
///
/// The other way round is different, as in Python: a forked child inherits
/// a copy of *every* fd of the parent, the parent's end of the pair
/// included, and nothing in the child can name that copy to close it. So a
/// child does not see end of file when the parent drops its end; end a
/// conversation with an explicit message (an `Option::None`, an enum
/// variant) rather than with a hang-up.
///
/// ```
/// let (mut parent, mut child) = multiproc::pipe()?;
/// let mut p = multiproc::Process::new(move || {
///     let n: u64 = child.recv().unwrap();
///     child.send(&(n * 2)).unwrap();
/// });
/// p.start()?;
/// parent.send(&21u64)?;
/// assert_eq!(parent.recv::<u64>()?, 42);
/// assert_eq!(p.join()?, 0);
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// # Errors
/// [`Error::Io`] if the socket pair cannot be created (out of fds).
#[doc(alias = "Pipe")]
pub fn pipe() -> Result<(Connection, Connection)> {
    let (a, b) = sys::socket_pair(SOCKET_BUFFER)?;
    Ok((Connection::new(a, true), Connection::new(b, true)))
}

/// One end of a framed channel: sends and receives serde values.
///
/// Each message is one frame: an 8-byte length, then the value encoded with
/// the crate's codec. A frame whose announced length exceeds
/// [`max_frame_len`](Connection::max_frame_len) (1 GiB by default) is refused
/// before anything is allocated; a stream that ends inside a frame, or a
/// payload that does not decode as the requested type, is
/// [`Error::Codec`]; a peer that closed its end is an
/// [`Error::Io`] of kind `UnexpectedEof` (see [`Error::is_disconnected`]).
///
/// Over a Unix socket (every [`pipe`]), a value that encodes to 256 KiB or
/// more does not go through the socket: the sending end encodes it straight
/// into a shared memory region of its own (a memfd, handed to the peer with
/// the first such message) and the peer decodes it in place and frees the
/// space, so a 64 MiB message costs two copies instead of four. Each end's
/// region reserves 2 GiB of address space (nothing until written) and keeps
/// up to 128 MiB of freed pages for the next messages; when it is full,
/// values take the socket. An end is meant to be used by one process (move
/// it into the child): two processes sending on copies of the same end
/// would share one region.
///
/// A `Connection` never reads past the end of the message it is receiving,
/// so the fd stays readable while messages are pending and [`wait`](crate::wait)
/// or any poller (mio, tokio's `AsyncFd`) can watch it.
pub struct Connection {
    fd: OwnedFd,
    reader: FrameReader,
    wbuf: Vec<u8>,
    /// The fd is a Unix socket: a region's memfd can travel with a message.
    socket: bool,
    /// This end's region for large values it sends, and its memfd until
    /// the peer has it.
    tx: Option<(Arc<Region>, Option<OwnedFd>)>,
    /// The peer's region, mapped from the memfd its first large message
    /// brought.
    rx: Option<Arc<Region>>,
    /// Memfds received, not yet taken by their message.
    fds: VecDeque<OwnedFd>,
}

impl Connection {
    /// Wraps a connected stream fd (a socket or a pipe end) as a `Connection`.
    pub fn from_fd(fd: OwnedFd) -> Connection {
        let socket = sys::is_unix_socket(fd.as_fd());
        Connection::new(fd, socket)
    }

    /// `socket`: `fd` is a Unix socket (`pipe()` knows; `from_fd` asks).
    fn new(fd: OwnedFd, socket: bool) -> Connection {
        Connection {
            socket,
            fd,
            reader: FrameReader::new(DEFAULT_MAX_FRAME_LEN, false).with_flags(),
            wbuf: Vec::new(),
            tx: None,
            rx: None,
            fds: VecDeque::new(),
        }
    }

    /// Gives back the fd; bytes already buffered by a partial receive are lost.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The largest payload this end accepts or sends, in bytes.
    pub fn max_frame_len(&self) -> usize {
        self.reader.limit()
    }

    /// Sets the largest payload this end accepts or sends (default 1 GiB).
    pub fn set_max_frame_len(&mut self, limit: usize) {
        self.reader.set_limit(limit);
    }

    /// Sends one value.
    ///
    /// Blocks while the peer's buffer is full.
    ///
    /// # Errors
    /// [`Error::Codec`] if the value cannot be encoded or encodes to more
    /// than [`max_frame_len`](Connection::max_frame_len) bytes; [`Error::Io`]
    /// if the write fails (`BrokenPipe` once the peer closed its end).
    pub fn send<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.wbuf.clear();
        // Over a socket, a value of `SHARED_MIN` bytes or more goes through
        // this end's region (when it has room): the encode stops there.
        let cap = if self.socket { SHARED_MIN } else { usize::MAX };
        if !codec::encode_frame_below(value, &mut self.wbuf, cap)? {
            if let Some(sent) = self.send_shared(value) {
                return sent;
            }
            codec::encode_frame(value, &mut self.wbuf)?;
        }
        let len = self.wbuf.len() - HEADER_LEN;
        if len > self.reader.limit() {
            return Err(codec::oversize_on_send(len, self.reader.limit()));
        }
        let res = sys::write_all(self.fd.as_fd(), &self.wbuf);
        if self.wbuf.capacity() > 1 << 20 {
            self.wbuf = Vec::new();
        }
        res.map_err(Error::from)
    }

    /// Sends a large value through this end's region: `None` when it has
    /// no room (or cannot be made), and the value goes in the stream.
    fn send_shared<T: Serialize + ?Sized>(&mut self, value: &T) -> Option<Result<()>> {
        let len = match codec::encoded_len(value) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        if len > self.reader.limit() {
            return Some(Err(codec::oversize_on_send(len, self.reader.limit())));
        }
        if self.tx.is_none() {
            let (region, fd) = Region::new().ok()?;
            self.tx = Some((Arc::new(region), Some(fd)));
        }
        let (region, memfd) = self.tx.as_mut()?;
        let offset = region.alloc(len)?;
        match region
            .mapping()
            .write_with(offset, len, |b| codec::encode_into(value, b))
        {
            Ok(Ok(n)) if n == len => {}
            Ok(Err(e)) => {
                region.unalloc(offset, len);
                return Some(Err(e));
            }
            _ => {
                region.unalloc(offset, len);
                return None;
            }
        }
        let mut frame = [0u8; HEADER_LEN + 16];
        frame[..8].copy_from_slice(&(16 | FLAGGED).to_le_bytes());
        frame[8..16].copy_from_slice(&(offset as u64).to_le_bytes());
        frame[16..].copy_from_slice(&(len as u64).to_le_bytes());
        let sent = match memfd.take() {
            Some(fd) => sys::send_with_fds(self.fd.as_fd(), &frame, &[fd.as_fd()]),
            None => sys::write_all(self.fd.as_fd(), &frame),
        };
        if sent.is_err() {
            region.unalloc(offset, len);
        }
        Some(sent.map_err(Error::from))
    }

    /// One read of the stream; over a socket, memfds that come with it are
    /// queued for their messages.
    fn fill(&mut self) -> Result<Fill> {
        if !self.socket {
            return self.reader.fill(self.fd.as_fd());
        }
        let (fd, fds) = (self.fd.as_fd(), &mut self.fds);
        self.reader.fill_from(|buf| {
            let (n, got) = sys::recv_with_fds(fd, buf)?;
            if fds.len() + got.len() > MAX_QUEUED_FDS {
                return Err(std::io::Error::other("too many fds sent on a connection"));
            }
            fds.extend(got);
            Ok(n)
        })
    }

    /// The next whole message, if one is buffered: decoded from the stream,
    /// or from the peer's region (then freed there).
    fn take<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        let (offset, len) = match self.reader.next_flagged()? {
            None => return Ok(None),
            Some((false, payload)) => return codec::decode(payload).map(Some),
            Some((true, p)) if p.len() == 16 => (
                u64::from_le_bytes(p[..8].try_into().expect("8 bytes")),
                u64::from_le_bytes(p[8..].try_into().expect("8 bytes")),
            ),
            Some((true, _)) => return Err(broken("a shared message of the wrong size")),
        };
        if let Some(fd) = self.fds.pop_front() {
            self.rx = Some(Arc::new(Region::from_fd(fd.as_fd())?));
        }
        let region = self
            .rx
            .clone()
            .ok_or_else(|| broken("a shared message before its region"))?;
        if !region.check(offset, len) || len > self.reader.limit() as u64 {
            return Err(broken("a shared message outside its region"));
        }
        let shared = Ranges::new(region, vec![(offset as usize, len as usize)]);
        let bytes = shared.get(0).ok_or_else(|| broken("range"))?;
        codec::decode(bytes).map(Some)
    }

    /// Receives one value, blocking until it has arrived whole.
    ///
    /// # Errors
    /// [`Error::Io`] of kind `UnexpectedEof` if the peer closed its end
    /// between messages; [`Error::Codec`] for a truncated, oversize or
    /// undecodable frame.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T> {
        match self.recv_deadline(None)? {
            Some(v) => Ok(v),
            None => unreachable!("a receive without a deadline cannot time out"),
        }
    }

    /// Receives one value, or `Ok(None)` if none arrived whole within
    /// `timeout`. A partly received message is kept and completed by the
    /// next call.
    ///
    /// # Errors
    /// As [`recv`](Connection::recv).
    pub fn recv_timeout<T: DeserializeOwned>(&mut self, timeout: Duration) -> Result<Option<T>> {
        self.recv_deadline(Some(
            Instant::now()
                .checked_add(timeout)
                .unwrap_or_else(far_future),
        ))
    }

    pub(crate) fn recv_deadline<T: DeserializeOwned>(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<T>> {
        loop {
            if let Some(v) = self.take()? {
                return Ok(Some(v));
            }
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if sys::poll_readable(&[self.fd.as_fd()], Some(left))?.is_empty() {
                    return Ok(None);
                }
            }
            if self.fill()? == Fill::Eof {
                return Err(Error::disconnected());
            }
        }
    }

    /// Reads whatever is available without blocking past one `read(2)` of a
    /// readable fd; used by callers that poll the fd themselves.
    pub(crate) fn fill_once(&mut self) -> Result<Fill> {
        self.fill()
    }

    /// Decodes a message if one is buffered whole.
    pub(crate) fn try_take<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        self.take()
    }

    /// Bytes of a partly received message held in this end's buffer.
    #[allow(dead_code)] // for the pool layer
    pub(crate) fn pending(&self) -> usize {
        self.reader.pending()
    }

    /// Whether a message (or end of file) can be received without waiting,
    /// waiting up to `timeout` for one.
    ///
    /// # Errors
    /// [`Error::Io`] if `poll(2)` fails.
    pub fn poll(&self, timeout: Duration) -> Result<bool> {
        if self.reader.has_frame() {
            return Ok(true);
        }
        Ok(!sys::poll_readable(&[self.fd.as_fd()], Some(timeout))?.is_empty())
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("fd", &self.fd.as_raw_fd())
            .field("pending", &self.reader.pending())
            .finish()
    }
}

/// Waits until at least one of `objects` is ready and returns the indices of
/// the ready ones; an empty `Vec` if `timeout` (`None`: no limit) passed
/// first (Python's `multiprocessing.connection.wait`).
///
/// Ready means: a [`Process::sentinel`](crate::Process::sentinel) whose child
/// exited, a [`Connection`] with data or a closed peer, or any other fd that
/// polls readable.
///
/// ```
/// use std::os::fd::AsFd;
/// use std::time::Duration;
/// let (mut a, b) = multiproc::pipe()?;
/// let mut p = multiproc::Process::new(|| {});
/// p.start()?;
/// let ready = multiproc::wait(&[b.as_fd(), p.sentinel().unwrap()], Some(Duration::from_secs(10)))?;
/// assert_eq!(ready, vec![1]); // the child exited; nothing was sent on `b`
/// a.send(&1u8)?;
/// assert_eq!(multiproc::wait(&[b.as_fd()], Some(Duration::from_secs(10)))?, vec![0]);
/// p.join()?;
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// # Errors
/// [`Error::Io`] if `poll(2)` fails (an invalid fd).
pub fn wait(objects: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Result<Vec<usize>> {
    Ok(sys::poll_readable(objects, timeout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_sees_a_message_and_eof() {
        let (mut a, mut b) = pipe().unwrap();
        assert!(!b.poll(Duration::from_millis(10)).unwrap());
        a.send("hello").unwrap();
        assert!(b.poll(Duration::from_secs(5)).unwrap());
        assert_eq!(b.recv::<String>().unwrap(), "hello");
        drop(a);
        assert!(b.poll(Duration::from_secs(5)).unwrap());
        assert!(b.recv::<String>().unwrap_err().is_disconnected());
    }

    #[test]
    fn send_refuses_oversize() {
        let (mut a, _b) = pipe().unwrap();
        a.set_max_frame_len(4);
        assert!(matches!(a.send(&[0u8; 16]), Err(Error::Codec(_))));
    }
}
