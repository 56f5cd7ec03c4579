//! File descriptors: pipes, socket pairs (stream and `SOCK_SEQPACKET`),
//! reads and writes (never a `SIGPIPE`), messages carrying fds
//! (`SCM_RIGHTS`), `O_NONBLOCK`, `/dev/null` and stdio redirection, closing
//! inherited fds, `flock`.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

/// `pipe2(O_CLOEXEC)`: `(read end, write end)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// An fd that is readable forever (at end of file, hung up): the read end
/// of a `pipe2(O_CLOEXEC)` whose write end is closed at once. The sentinel
/// of a child that was reaped before anyone asked for its sentinel; unlike a
/// regular file it can be registered with epoll (mio, tokio's `AsyncFd`).
pub(crate) fn ended_pipe() -> io::Result<OwnedFd> {
    let (r, w) = pipe()?;
    drop(w);
    Ok(r)
}

/// A connected `AF_UNIX` stream socket pair with `SOCK_CLOEXEC`, each end
/// asked for `buffer` bytes of send and receive buffer (the kernel caps it
/// at `wmem_max`/`rmem_max`; a failure to enlarge is ignored).
pub(crate) fn socket_pair(buffer: usize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    if buffer > 0 {
        for fd in [&a, &b] {
            let _ = socket::setsockopt(fd, socket::sockopt::SndBuf, &buffer);
            let _ = socket::setsockopt(fd, socket::sockopt::RcvBuf, &buffer);
        }
    }
    Ok((a, b))
}

/// `read(2)`, retried on `EINTR`. `Ok(0)` is end of file.
pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes all of `buf`, retrying on `EINTR` and short writes. A vanished
/// reader is an `EPIPE` error, never a `SIGPIPE`, whatever the program's
/// disposition of that signal (a CLI restores the default so that `| head`
/// works): sockets are written with `send(MSG_NOSIGNAL)`, other fds (pipes)
/// with `SIGPIPE` blocked in the calling thread for the write.
pub(crate) fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    use nix::sys::socket::{send, MsgFlags};
    while !buf.is_empty() {
        match send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::ENOTSOCK) => return write_all_without_sigpipe(fd, buf),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// `write(2)` until `buf` is written, with `SIGPIPE` blocked in this thread:
/// an `EPIPE` raises a `SIGPIPE` that stays pending instead of killing the
/// process; it is then taken off (unless one was pending before) and the
/// mask restored. Async-signal-safe, allocation-free.
fn write_all_without_sigpipe(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    // SAFETY: `sigset_t`s are plain data initialized by sigemptyset /
    // pthread_sigmask / sigpending before any read; every pointer passed
    // points to a live local; `sigtimedwait` with a zero timeout only takes
    // a pending SIGPIPE of this thread (blocked here) and never blocks.
    unsafe {
        let mut pipe_set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe_set);
        libc::sigaddset(&mut pipe_set, libc::SIGPIPE);
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe_set, &mut old);
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        let was_pending = libc::sigismember(&pending, libc::SIGPIPE) == 1;
        let mut result = Ok(());
        while !buf.is_empty() {
            match nix::unistd::write(fd, buf) {
                Ok(0) => {
                    result = Err(io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(n) => buf = &buf[n..],
                Err(Errno::EINTR) => {}
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        if !was_pending && libc::sigismember(&old, libc::SIGPIPE) == 0 {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            while libc::sigtimedwait(&pipe_set, std::ptr::null_mut(), &zero) == libc::SIGPIPE {}
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        result
    }
}

/// Writes `buf` to fd 2 with raw `write(2)` calls: no lock, no allocation.
/// Used for the child's panic line, which must not wait on std's stderr
/// lock (another parent thread may have held it at fork time).
pub(crate) fn write_stderr_raw(buf: &[u8]) {
    let _ = write_all(io::stderr().as_fd(), buf);
}

/// `close(fd)` for a raw fd inherited across `fork` that nothing owns in the
/// child (the owner lives in the parent's copy of the memory).
pub(crate) fn close_raw(fd: RawFd) {
    let _ = nix::unistd::close(fd);
}

/// A read-only `/dev/null` opened once (in the parent, before the first
/// fork), so that a child only needs one `dup2` to point stdin at it. A raw
/// number (-1: not open) rather than a `OnceLock`, so that a daemon that
/// closed every inherited fd can forget it ([`forget_dev_null`]).
static DEV_NULL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Opens the shared `/dev/null` if it is not open yet. Call before forking:
/// the child then finds it open.
#[inline]
pub(crate) fn prepare_dev_null() -> io::Result<()> {
    if DEV_NULL.load(std::sync::atomic::Ordering::Acquire) < 0 {
        open_dev_null()?;
    }
    Ok(())
}

/// The slow path of [`prepare_dev_null`], kept out of line: `open`'s path
/// conversion reserves a 1 KiB buffer on the stack, which inlined would
/// deepen every frame of the fork path (each page of stack the parent
/// writes after a fork is one more copy-on-write fault).
#[cold]
#[inline(never)]
fn open_dev_null() -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    use std::sync::atomic::Ordering;
    let null = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let raw = null.into_raw_fd();
    if DEV_NULL
        .compare_exchange(-1, raw, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Another thread won the race: ours is surplus.
        close_raw(raw);
    }
    Ok(())
}

/// Forgets the shared `/dev/null` fd after it was closed behind our back
/// (a daemon closes every inherited fd); the next use opens a new one.
pub(crate) fn forget_dev_null() {
    DEV_NULL.store(-1, std::sync::atomic::Ordering::Release);
}

/// The shared `/dev/null` fd ([`prepare_dev_null`]), opened if it is not
/// yet: `poll(2)` finds it readable at once. The last resort of a sentinel
/// when no fd of its own can be opened (the fd limit): a waiter then wakes,
/// finds the child still running and waits again.
pub(crate) fn dev_null() -> io::Result<BorrowedFd<'static>> {
    prepare_dev_null()?;
    let raw = DEV_NULL.load(std::sync::atomic::Ordering::Acquire);
    if raw < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: `raw` is the `/dev/null` fd opened by `prepare_dev_null`,
    // never handed out as owned. The only code of the crate that closes it
    // is `close_fds_except` (a daemon's setup, single-threaded, which then
    // forgets the number), as for `stdin_from_dev_null`'s borrow.
    Ok(unsafe { BorrowedFd::borrow_raw(raw) })
}

/// Points fd 0 at `/dev/null` (one `dup2` when [`prepare_dev_null`] ran).
pub(crate) fn stdin_from_dev_null() -> io::Result<()> {
    prepare_dev_null()?;
    let raw = DEV_NULL.load(std::sync::atomic::Ordering::Acquire);
    if raw >= 0 {
        // SAFETY: `raw` is the `/dev/null` fd opened above and never closed
        // by this crate (only forgotten, after something else closed it,
        // which resets the number first); borrowed for one `dup2`.
        let null = unsafe { BorrowedFd::borrow_raw(raw) };
        nix::unistd::dup2_stdin(null)?;
    }
    Ok(())
}

/// Points fd 1 or 2 at `fd` (`dup2`, which clears `O_CLOEXEC` on the copy).
#[allow(dead_code)] // for the pool, supervisor and daemon layers
pub(crate) fn redirect_stdio(target: i32, fd: BorrowedFd<'_>) -> io::Result<()> {
    match target {
        0 => nix::unistd::dup2_stdin(fd)?,
        1 => nix::unistd::dup2_stdout(fd)?,
        2 => nix::unistd::dup2_stderr(fd)?,
        _ => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
    }
    Ok(())
}

/// Sets `O_NONBLOCK` on `fd` (an open file description of our own).
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// One `send(2)` on a socket with `MSG_NOSIGNAL` (a vanished peer is an
/// `EPIPE` error, not a `SIGPIPE`): the number of bytes written;
/// `WouldBlock` on a full non-blocking socket; retried on `EINTR`.
pub(crate) fn write_some(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::{send, MsgFlags};
    loop {
        match send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Closes every fd of the process except `keep` (and fails only if the fd
/// table cannot be read).
pub(crate) fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut open = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        {
            open.push(fd);
        }
    }
    // The directory's own fd is already closed: closing it again is EBADF,
    // which `close_raw` ignores.
    for fd in open {
        if !keep.contains(&fd) {
            super::close_raw(fd);
        }
    }
    super::forget_dev_null();
    Ok(())
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(true)` if the lock was taken,
/// `Ok(false)` if another open file description holds it.
pub(crate) fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    loop {
        // SAFETY: flock takes an fd, borrowed and so open for the call, and
        // a flags word; it touches no memory of ours.
        let rc = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        match Errno::last() {
            Errno::EWOULDBLOCK => return Ok(false),
            Errno::EINTR => {}
            e => return Err(e.into()),
        }
    }
}

/// The raw number of an fd, for logs and for [`close_raw`] in a child.
pub(crate) fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

/// The raw number of a borrowed fd.
pub(crate) fn raw_of(fd: BorrowedFd<'_>) -> RawFd {
    fd.as_raw_fd()
}

/// The most fds one message carries.
pub(crate) const MAX_FDS: usize = 4;

/// A connected `AF_UNIX` `SOCK_SEQPACKET` pair with `SOCK_CLOEXEC`: message
/// boundaries are kept, so one request is one `recvmsg`.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Sends `data` and `fds` as one message (`MSG_NOSIGNAL`: a vanished peer
/// is `EPIPE`), retried on `EINTR`.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message into `buf`: its length (0 at end of file) and the
/// fds it carried, owned and close-on-exec. A message longer than `buf` is
/// an error (`EMSGSIZE`), never a silent cut.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        match socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel installed these fds in our
                            // table for this message; nothing else owns them.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                let n = msg.bytes;
                if truncated {
                    return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
                }
                return Ok((n, fds));
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Whether `fd` is a Unix domain socket (fds can travel with its bytes).
pub(crate) fn is_unix_socket(fd: BorrowedFd<'_>) -> bool {
    socket::getsockname::<socket::UnixAddr>(fd.as_raw_fd()).is_ok()
}

/// `recv(MSG_DONTWAIT)`: `None` if nothing is there yet, else the bytes
/// read (0 at end of file).
pub(crate) fn recv_nonblocking(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match socket::recv(sock.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EINTR) => {}
            // The server's end vanished with an error: as an end of file.
            Err(Errno::ECONNRESET) => return Ok(Some(0)),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_with_fds() {
        let (a, b) = seqpacket_pair().unwrap();
        let (r, w) = crate::sys::pipe().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[r.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        crate::sys::write_all(w.as_fd(), b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(crate::sys::read(fds[0].as_fd(), &mut one).unwrap(), 1);
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf).unwrap().0, 0);
    }
}
