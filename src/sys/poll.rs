//! `poll(2)`: one API over borrowed fds. [`poll_readable`] waits for any
//! of a few fds to be readable; [`PollSet`] is the event loop's reusable set
//! with read and write interest (the pool's dispatcher).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::poll::{PollFd, PollFlags, PollTimeout};

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

/// A reusable set of fds to poll, each with read interest and optionally
/// write interest, refilled every turn of an event loop: [`clear`], then
/// [`add`] each fd (its index is the order of the calls), [`wait`], then
/// [`readable`] / [`writable`] by index. An entry added as `None` is kept in
/// its place and never ready (so indices stay stable).
///
/// [`clear`]: PollSet::clear
/// [`add`]: PollSet::add
/// [`wait`]: PollSet::wait
/// [`readable`]: PollSet::readable
/// [`writable`]: PollSet::writable
#[derive(Debug, Default)]
pub(crate) struct PollSet {
    entries: Vec<libc::pollfd>,
}

impl PollSet {
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Adds `fd` with read interest, and write interest if `write`; returns
    /// its index.
    pub(crate) fn add(&mut self, fd: Option<BorrowedFd<'_>>, write: bool) -> usize {
        let mut events = libc::POLLIN;
        if write {
            events |= libc::POLLOUT;
        }
        self.entries.push(libc::pollfd {
            // poll(2) ignores negative fds (and reports them never ready).
            fd: fd.map_or(-1, |fd| fd.as_raw_fd()),
            events,
            revents: 0,
        });
        self.entries.len() - 1
    }

    /// Waits until an entry is ready or `timeout` passes (`None`: no
    /// limit). Returns the number of ready entries; 0 on timeout or on
    /// `EINTR` (the caller loops anyway).
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        let ms: libc::c_int = match timeout {
            None => -1,
            Some(d) => d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int,
        };
        // SAFETY: the pointer and length describe our own, exclusively
        // borrowed vector of `pollfd`, which the kernel only writes the
        // `revents` of. An fd closed since `add` is reported as `POLLNVAL`.
        let rc = unsafe {
            libc::poll(
                self.entries.as_mut_ptr(),
                self.entries.len() as libc::nfds_t,
                ms,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(rc as usize)
    }

    /// Entry `i` has data, end of file, a hang-up or an error to read.
    pub(crate) fn readable(&self, i: usize) -> bool {
        self.entries[i].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL)
            != 0
    }

    /// Entry `i` can be written (or has an error to report on write).
    pub(crate) fn writable(&self, i: usize) -> bool {
        self.entries[i].revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn poll_set_reports_by_index() {
        let (r1, w1) = crate::sys::pipe().unwrap();
        let (r2, _w2) = crate::sys::pipe().unwrap();
        let mut set = PollSet::default();
        set.add(Some(r1.as_fd()), false);
        set.add(None, true);
        set.add(Some(r2.as_fd()), false);
        set.add(Some(w1.as_fd()), true);
        crate::sys::write_all(w1.as_fd(), b"x").unwrap();
        assert!(set.wait(Some(Duration::from_secs(5))).unwrap() >= 1);
        assert!(set.readable(0));
        assert!(!set.readable(1) && !set.writable(1));
        assert!(!set.readable(2));
        assert!(set.writable(3));
        set.clear();
        set.add(Some(r2.as_fd()), false);
        assert_eq!(set.wait(Some(Duration::from_millis(10))).unwrap(), 0);
    }

    #[test]
    fn poll_times_out_and_sees_eof() {
        let (r, w) = crate::sys::pipe().unwrap();
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
