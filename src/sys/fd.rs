//! File descriptors: pipes, socket pairs, pidfds, `poll` with deadlines.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;

/// `pipe2(O_CLOEXEC)`: `(read end, write end)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
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
pub(crate) fn prepare_dev_null() -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    use std::sync::atomic::Ordering;
    if DEV_NULL.load(Ordering::Acquire) < 0 {
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
    }
    Ok(())
}

/// Forgets the shared `/dev/null` fd after it was closed behind our back
/// (a daemon closes every inherited fd); the next use opens a new one.
pub(crate) fn forget_dev_null() {
    DEV_NULL.store(-1, std::sync::atomic::Ordering::Release);
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

const PIDFD_UNKNOWN: u8 = 0;
const PIDFD_YES: u8 = 1;
const PIDFD_NO: u8 = 2;
/// Whether `pidfd_open(2)` works here, probed once (tokio and std cache the
/// `ENOSYS` the same way).
static PIDFD: AtomicU8 = AtomicU8::new(PIDFD_UNKNOWN);

fn raw_pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word and returns a new fd or
    // -1; it touches no memory of ours.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of pidfd_open is a new fd that nothing
    // else owns (it is opened with O_CLOEXEC by the kernel).
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// Whether pidfds can be used (`pidfd_open(2)`, Linux 5.3+). Probed once.
/// `MULTIPROC_NO_PIDFD=1` in the environment forces the sentinel-pipe
/// fallback (for tests, and to rule pidfds out when debugging).
pub(crate) fn pidfd_supported() -> bool {
    match PIDFD.load(Ordering::Relaxed) {
        PIDFD_YES => true,
        PIDFD_NO => false,
        _ => {
            let forced_off = std::env::var_os("MULTIPROC_NO_PIDFD").is_some_and(|v| v == "1");
            let ok = !forced_off && raw_pidfd_open(nix::unistd::getpid()).is_ok();
            PIDFD.store(if ok { PIDFD_YES } else { PIDFD_NO }, Ordering::Relaxed);
            ok
        }
    }
}

/// `pidfd_open(pid)`: an fd that polls readable once `pid` has exited.
/// The pid must be an unreaped child of ours, so it cannot have been recycled.
pub(crate) fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    raw_pidfd_open(pid)
}

/// Waits until at least one of `fds` is readable (data, end of file, hang-up
/// or error all count), or until `timeout` passes (`None`: no limit).
/// Returns the indices of the ready fds, empty on timeout. Retries on `EINTR`
/// with the time that remains.
pub(crate) fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Vec<usize>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut pollfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    loop {
        let wait = match deadline {
            None => PollTimeout::NONE,
            Some(d) => timeout_ms(d.saturating_duration_since(Instant::now())),
        };
        match nix::poll::poll(&mut pollfds, wait) {
            Ok(0) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(Vec::new());
                }
            }
            Ok(_) => {
                return Ok(pollfds
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(i, _)| i)
                    .collect());
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A poll timeout in whole milliseconds, rounded up so that a deadline is
/// never reported early.
fn timeout_ms(d: Duration) -> PollTimeout {
    let ms = d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

/// The raw number of an fd, for logs and for [`close_raw`] in a child.
pub(crate) fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_times_out_and_sees_eof() {
        let (r, w) = pipe().unwrap();
        let t0 = Instant::now();
        assert!(poll_readable(&[r.as_fd()], Some(Duration::from_millis(30)))
            .unwrap()
            .is_empty());
        assert!(t0.elapsed() >= Duration::from_millis(30));
        drop(w);
        assert_eq!(
            poll_readable(&[r.as_fd()], Some(Duration::from_secs(5))).unwrap(),
            vec![0]
        );
    }

    #[test]
    fn timeout_rounds_up() {
        assert_eq!(i32::from(timeout_ms(Duration::from_micros(1))), 1);
        assert_eq!(i32::from(timeout_ms(Duration::ZERO)), 0);
    }
}
