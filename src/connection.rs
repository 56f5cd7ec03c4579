//! `pipe()` and [`Connection`]: a framed duplex channel (Python's
//! `multiprocessing.Pipe`).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, Fill, FrameReader, DEFAULT_MAX_FRAME_LEN, HEADER_LEN};
use crate::error::{Error, Result};
use crate::sys;

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
    Ok((Connection::from_fd(a), Connection::from_fd(b)))
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
/// A `Connection` never reads past the end of the message it is receiving,
/// so the fd stays readable while messages are pending and [`wait`](crate::wait)
/// or any poller (mio, tokio's `AsyncFd`) can watch it.
pub struct Connection {
    fd: OwnedFd,
    reader: FrameReader,
    wbuf: Vec<u8>,
}

impl Connection {
    /// Wraps a connected stream fd (a socket or a pipe end) as a `Connection`.
    pub fn from_fd(fd: OwnedFd) -> Connection {
        Connection {
            fd,
            reader: FrameReader::new(DEFAULT_MAX_FRAME_LEN, false),
            wbuf: Vec::new(),
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
        codec::encode_frame(value, &mut self.wbuf)?;
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
            if let Some(v) = self.reader.next_value()? {
                return Ok(Some(v));
            }
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if sys::poll_readable(&[self.fd.as_fd()], Some(left))?.is_empty() {
                    return Ok(None);
                }
            }
            if self.reader.fill(self.fd.as_fd())? == Fill::Eof {
                return Err(Error::disconnected());
            }
        }
    }

    /// Reads whatever is available without blocking past one `read(2)` of a
    /// readable fd; used by callers that poll the fd themselves.
    pub(crate) fn fill_once(&mut self) -> Result<Fill> {
        self.reader.fill(self.fd.as_fd())
    }

    /// Decodes a message if one is buffered whole.
    pub(crate) fn try_take<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        self.reader.next_value()
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
