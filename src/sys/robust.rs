//! Robust, process-shared mutexes: a glibc `pthread_mutex_t` in a
//! `MAP_SHARED` mapping, initialized `PTHREAD_PROCESS_SHARED` and
//! `PTHREAD_MUTEX_ROBUST`.
//!
//! # Why pthread robust mutexes and not our own robust futex list
//!
//! Linux hands a dead holder's futex locks to the next locker through the
//! per-thread *robust list* (`set_robust_list(2)`): at thread exit, however it
//! happens (`SIGKILL`, `abort`, `_exit`), the kernel walks the list, marks each
//! held lock word `FUTEX_OWNER_DIED` and wakes one waiter. There is one list
//! head per thread, and glibc already registers it for every thread it
//! creates; a second, crate-owned list would replace glibc's and break every
//! robust pthread mutex of the program. So the locks are glibc's robust
//! mutexes, which put themselves on that list: the next `lock` gets
//! `EOWNERDEAD` at once, we call `pthread_mutex_consistent`, and the guard
//! reports `owner_died()`. The uncontended path is one atomic compare and
//! swap in user space; a contended one sleeps in the kernel on the lock word.
//!
//! Timeouts use `pthread_mutex_clocklock(CLOCK_MONOTONIC)` (glibc 2.30 and
//! later), so a jump of the wall clock does not shorten or stretch a wait;
//! other C libraries fall back on `pthread_mutex_timedlock` (`CLOCK_REALTIME`).
//!
//! Error cases, all reported as `Err`, never a panic or a hang:
//! - `EDEADLK`: the calling thread already holds a non-recursive lock
//!   (the mutexes are `PTHREAD_MUTEX_ERRORCHECK`, so the relock is detected).
//! - `ENOTRECOVERABLE`: a process took a dead owner's lock over and died too
//!   before it could mark it consistent (a window of a few instructions); the
//!   lock is then unusable for good, as POSIX specifies.
//! - `EAGAIN`: a recursive lock was taken more than 2^31 times.

use std::io;
use std::marker::PhantomData;
use std::mem;
use std::time::Duration;

use nix::libc;

use super::mman::SharedMapping;

#[cfg(target_env = "gnu")]
extern "C" {
    // glibc >= 2.30; not (yet) declared by the libc crate.
    fn pthread_mutex_clocklock(
        mutex: *mut libc::pthread_mutex_t,
        clockid: libc::clockid_t,
        abstime: *const libc::timespec,
    ) -> libc::c_int;
}

/// The kind of a [`RobustMutex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MutexKind {
    /// A relock by the holding thread is `EDEADLK`.
    ErrorCheck,
    /// The holding thread may lock again; it unlocks as often.
    Recursive,
}

/// A robust, process-shared mutex at the start of its own anonymous
/// mapping, followed by a payload only its holder may touch.
#[derive(Debug)]
pub(crate) struct RobustMutex {
    map: SharedMapping,
    payload_offset: usize,
    payload_len: usize,
}

fn mutex_error(code: libc::c_int) -> io::Error {
    match code {
        libc::EDEADLK => io::Error::new(
            io::ErrorKind::Deadlock,
            "the lock is already held by this thread",
        ),
        libc::ENOTRECOVERABLE => io::Error::other(
            "the lock is not recoverable: a process died while taking it over from a dead holder",
        ),
        libc::EAGAIN => io::Error::other("the lock was taken recursively too many times"),
        code => io::Error::from_raw_os_error(code),
    }
}

fn check(code: libc::c_int) -> io::Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(code))
    }
}

impl RobustMutex {
    /// A new, unlocked mutex of `kind` with a zeroed payload of `payload_len`
    /// bytes aligned to `payload_align` (a power of two). A recursive mutex
    /// has no payload: two guards of one thread would alias it.
    pub(crate) fn new(
        kind: MutexKind,
        payload_align: usize,
        payload_len: usize,
    ) -> io::Result<RobustMutex> {
        let invalid = |m| io::Error::new(io::ErrorKind::InvalidInput, m);
        if kind == MutexKind::Recursive && payload_len != 0 {
            return Err(invalid("a recursive mutex has no payload"));
        }
        if !payload_align.is_power_of_two() || payload_align > 4096 {
            return Err(invalid("unsupported alignment"));
        }
        let header = mem::size_of::<libc::pthread_mutex_t>();
        let payload_offset = header.next_multiple_of(payload_align);
        let total = payload_offset
            .checked_add(payload_len)
            .ok_or_else(|| invalid("shared value too large"))?;
        let map = SharedMapping::anonymous(total)?;
        let m = map.as_ptr().cast::<libc::pthread_mutex_t>();
        let ty = match kind {
            MutexKind::ErrorCheck => libc::PTHREAD_MUTEX_ERRORCHECK,
            MutexKind::Recursive => libc::PTHREAD_MUTEX_RECURSIVE,
        };
        // SAFETY: `attr` is initialized by pthread_mutexattr_init before any
        // other use and destroyed once. `m` points to the first bytes of a
        // fresh page-aligned mapping (aligned for and as large as a
        // pthread_mutex_t) that no one else can see yet, so initializing it
        // once here is the required "init before use, exactly once".
        unsafe {
            let mut attr = mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
            check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let a = attr.as_mut_ptr();
            let r = (|| {
                check(libc::pthread_mutexattr_settype(a, ty))?;
                check(libc::pthread_mutexattr_setpshared(
                    a,
                    libc::PTHREAD_PROCESS_SHARED,
                ))?;
                check(libc::pthread_mutexattr_setrobust(
                    a,
                    libc::PTHREAD_MUTEX_ROBUST,
                ))?;
                check(libc::pthread_mutex_init(m, a))
            })();
            libc::pthread_mutexattr_destroy(a);
            r?;
        }
        Ok(RobustMutex {
            map,
            payload_offset,
            payload_len,
        })
    }

    #[inline]
    fn raw(&self) -> *mut libc::pthread_mutex_t {
        self.map.as_ptr().cast()
    }

    /// Takes the mutex: `Ok(None)` when `timeout` elapsed first (`None`: wait
    /// for as long as it takes).
    #[inline]
    pub(crate) fn lock(&self, timeout: Option<Duration>) -> io::Result<Option<RobustGuard<'_>>> {
        let code = match timeout {
            // SAFETY: `raw()` is a mutex initialized in `new` that lives as
            // long as `self`; pthread_mutex_lock is sound on any initialized
            // process-shared mutex.
            None => unsafe { libc::pthread_mutex_lock(self.raw()) },
            Some(d) => {
                let abs = deadline(d);
                timed_lock(self.raw(), &abs)
            }
        };
        self.finish(code)
    }

    /// Takes the mutex if it is free: `Ok(None)` when another thread or
    /// process holds it, or (non-recursive) the calling thread does.
    #[inline]
    pub(crate) fn try_lock(&self) -> io::Result<Option<RobustGuard<'_>>> {
        // SAFETY: as in `lock`.
        let code = unsafe { libc::pthread_mutex_trylock(self.raw()) };
        if code == libc::EDEADLK {
            // Held by this very thread: "not free", as std's `try_lock` says.
            return Ok(None);
        }
        self.finish(code)
    }

    #[inline]
    fn finish(&self, code: libc::c_int) -> io::Result<Option<RobustGuard<'_>>> {
        let guard = |owner_died| RobustGuard {
            mutex: self,
            owner_died,
            _not_send: PhantomData,
        };
        match code {
            0 => Ok(Some(guard(false))),
            libc::EBUSY | libc::ETIMEDOUT => Ok(None),
            libc::EOWNERDEAD => {
                // We hold the lock; its last holder died holding it. Mark it
                // consistent so that our unlock leaves it usable.
                // SAFETY: the calling thread holds the mutex (EOWNERDEAD
                // acquires it), which pthread_mutex_consistent requires.
                let r = unsafe { libc::pthread_mutex_consistent(self.raw()) };
                let g = guard(true);
                check(r)?; // the guard unlocks on the way out
                Ok(Some(g))
            }
            code => Err(mutex_error(code)),
        }
    }

    /// The payload's length in bytes.
    #[allow(dead_code)] // for the fork server / queue
    pub(crate) fn payload_len(&self) -> usize {
        self.payload_len
    }
}

fn deadline(d: Duration) -> libc::timespec {
    let clock = if cfg!(target_env = "gnu") {
        libc::CLOCK_MONOTONIC
    } else {
        libc::CLOCK_REALTIME
    };
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; clock_gettime cannot fail
    // for CLOCK_MONOTONIC or CLOCK_REALTIME.
    unsafe { libc::clock_gettime(clock, &mut now) };
    let now = (now.tv_sec, now.tv_nsec);
    let mut sec = now
        .0
        .saturating_add(libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX));
    let mut nsec = now.1 + d.subsec_nanos() as libc::c_long;
    if nsec >= 1_000_000_000 {
        nsec -= 1_000_000_000;
        sec = sec.saturating_add(1);
    }
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

#[cfg(target_env = "gnu")]
fn timed_lock(m: *mut libc::pthread_mutex_t, abs: &libc::timespec) -> libc::c_int {
    // SAFETY: `m` is an initialized mutex that outlives the call (see
    // `RobustMutex::lock`), `abs` a valid timespec on CLOCK_MONOTONIC.
    unsafe { pthread_mutex_clocklock(m, libc::CLOCK_MONOTONIC, abs) }
}

#[cfg(not(target_env = "gnu"))]
fn timed_lock(m: *mut libc::pthread_mutex_t, abs: &libc::timespec) -> libc::c_int {
    // SAFETY: `m` is an initialized mutex that outlives the call (see
    // `RobustMutex::lock`), `abs` a valid timespec on CLOCK_REALTIME.
    unsafe { libc::pthread_mutex_timedlock(m, abs) }
}

/// Proof that the calling thread holds a [`RobustMutex`]; unlocks on drop.
/// Not `Send`: a pthread mutex is unlocked by the thread that locked it.
#[derive(Debug)]
pub(crate) struct RobustGuard<'a> {
    mutex: &'a RobustMutex,
    owner_died: bool,
    _not_send: PhantomData<std::sync::MutexGuard<'static, ()>>,
}

impl RobustGuard<'_> {
    /// The previous holder died holding the mutex; this guard took it over.
    pub(crate) fn owner_died(&self) -> bool {
        self.owner_died
    }

    /// The payload, read-only.
    pub(crate) fn payload(&self) -> &[u8] {
        let m = self.mutex;
        // SAFETY: the payload range lies inside the mapping (see `new`). The
        // calling thread holds the mutex, and every access to the payload in
        // every process goes through a guard of this mutex; a recursive mutex
        // (where one thread may hold two guards) has an empty payload. So no
        // one writes these bytes while this borrow of the guard lives.
        unsafe { std::slice::from_raw_parts(m.map.as_ptr().add(m.payload_offset), m.payload_len) }
    }

    /// The payload, writable.
    pub(crate) fn payload_mut(&mut self) -> &mut [u8] {
        let m = self.mutex;
        // SAFETY: as in `payload`; `&mut self` makes this the only borrow of
        // the payload in this thread, and the mutex excludes every other.
        unsafe {
            std::slice::from_raw_parts_mut(m.map.as_ptr().add(m.payload_offset), m.payload_len)
        }
    }
}

impl Drop for RobustGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: this thread holds the mutex (the guard's invariant), so
        // unlocking it is valid; it cannot fail for a held robust mutex.
        unsafe {
            libc::pthread_mutex_unlock(self.mutex.raw());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errorcheck_relock_is_deadlock_error() {
        let m = RobustMutex::new(MutexKind::ErrorCheck, 8, 8).unwrap();
        let mut g = m.lock(None).unwrap().unwrap();
        assert!(!g.owner_died());
        g.payload_mut().copy_from_slice(&7u64.to_ne_bytes());
        assert_eq!(m.lock(None).unwrap_err().kind(), io::ErrorKind::Deadlock);
        assert_eq!(
            m.lock(Some(Duration::from_millis(1))).unwrap_err().kind(),
            io::ErrorKind::Deadlock
        );
        assert!(m.try_lock().unwrap().is_none());
        drop(g);
        let g = m.try_lock().unwrap().unwrap();
        assert_eq!(g.payload(), &7u64.to_ne_bytes());
    }

    #[test]
    fn recursive_relocks() {
        let m = RobustMutex::new(MutexKind::Recursive, 1, 0).unwrap();
        let a = m.lock(None).unwrap().unwrap();
        let b = m.try_lock().unwrap().unwrap();
        let c = m.lock(Some(Duration::from_millis(1))).unwrap().unwrap();
        drop((a, b, c));
        assert!(RobustMutex::new(MutexKind::Recursive, 1, 8).is_err());
    }

    #[test]
    fn timeout_from_another_thread() {
        let m = std::sync::Arc::new(RobustMutex::new(MutexKind::ErrorCheck, 8, 0).unwrap());
        let g = m.lock(None).unwrap().unwrap();
        let m2 = std::sync::Arc::clone(&m);
        let r = std::thread::spawn(move || {
            (
                m2.try_lock().unwrap().is_none(),
                m2.lock(Some(Duration::from_millis(20))).unwrap().is_none(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(r, (true, true));
        drop(g);
    }
}
