//! `futex(2)` waits and wakes on a 32-bit word in shared memory.
//!
//! The words live in `MAP_SHARED` mappings used by several processes, so
//! both calls use the *shared* futex operations (no `FUTEX_PRIVATE_FLAG`):
//! the kernel keys the wait queue on the backing page, not on the address
//! in one process.

use std::io;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use nix::libc;

/// Sleeps while `word` holds `expected`, at most `timeout` (`None`: no limit).
///
/// Returns `Ok(false)` only when the timeout elapsed; `Ok(true)` when woken,
/// when the word did not hold `expected` (`EAGAIN`) or on a signal (`EINTR`).
/// A wake-up may be spurious: callers loop and re-check their condition
/// against their own deadline.
pub(crate) fn futex_wait(
    word: &AtomicU32,
    expected: u32,
    timeout: Option<Duration>,
) -> io::Result<bool> {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: d.subsec_nanos() as _,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned 32-bit word for the duration of the
    // call (it is borrowed); FUTEX_WAIT only reads it. `ts_ptr` is null or
    // points to a timespec that outlives the call; the timeout is relative
    // (CLOCK_MONOTONIC), as FUTEX_WAIT defines it. The unused arguments are 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ETIMEDOUT) => Ok(false),
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(true),
        _ => Err(e),
    }
}

/// Wakes at most `n` waiters of `word` (`u32::MAX`: all of them); returns
/// how many were woken.
pub(crate) fn futex_wake(word: &AtomicU32, n: u32) -> usize {
    let n = n.min(i32::MAX as u32) as i32;
    // SAFETY: `word` is a valid, aligned 32-bit word for the duration of the
    // call; FUTEX_WAKE neither reads nor writes it, it only names the queue.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    // FUTEX_WAKE fails only on a bad address or operation, which a borrowed
    // atomic and a constant operation rule out.
    usize::try_from(r).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn wait_on_another_value_returns_at_once() {
        let w = AtomicU32::new(1);
        assert!(futex_wait(&w, 0, Some(Duration::from_secs(10))).unwrap());
    }

    #[test]
    fn wait_times_out() {
        let w = AtomicU32::new(0);
        let t0 = Instant::now();
        assert!(!futex_wait(&w, 0, Some(Duration::from_millis(20))).unwrap());
        assert!(t0.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn wake_releases_a_waiter() {
        let w = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&w);
        let t = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while w2.load(Ordering::SeqCst) == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                futex_wait(&w2, 0, Some(left)).unwrap();
            }
            true
        });
        w.store(1, Ordering::SeqCst);
        futex_wake(&w, u32::MAX);
        assert!(t.join().unwrap());
        assert_eq!(futex_wake(&w, 1), 0);
    }
}
