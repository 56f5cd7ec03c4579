//! Robust, process-shared mutexes in `MAP_SHARED` memory: a lock whose
//! holder dies (any signal, `abort`, `_exit`, or a thread that exits) is
//! handed to the next locker at once, which learns that the owner died.
//!
//! # How: the kernel's robust futex list, shared with glibc
//!
//! Linux hands a dead holder's futex locks on through the per-thread
//! *robust list* (`set_robust_list(2)`): at thread exit, however it happens,
//! the kernel walks the list, marks each lock word that still holds the
//! thread's id `FUTEX_OWNER_DIED` and wakes one waiter. There is one list
//! head per thread, and glibc registers it for every thread it creates (its
//! robust `pthread_mutex_t`s link themselves into it). A crate-owned list
//! would need its own `set_robust_list`, which replaces glibc's and breaks
//! every robust pthread mutex of the program.
//!
//! So there are two implementations behind [`RobustMutex`]:
//!
//! - **`Futex`** (glibc on 64-bit targets, the default): our own futex lock
//!   whose 40-byte header has the layout of glibc's `pthread_mutex_t` where
//!   it matters to the list: the lock word at offset 0, the list's `prev`
//!   and `next` links at 24 and 32. The lock links itself into *glibc's*
//!   list with glibc's own doubly-linked protocol (`ENQUEUE_MUTEX_BOTH`,
//!   `DEQUEUE_MUTEX` in nptl's `descr.h`, with `list_op_pending` set around
//!   every change), so the two kinds of entries coexist: glibc unlinks its
//!   mutexes next to ours and the kernel walks both. The head is found with
//!   `get_robust_list(0)`, and its `futex_offset` is checked to be the one
//!   this layout needs (`-32`) before the first use. The uncontended path is
//!   one compare-and-swap and a few plain stores each way: 1.5 to 2 times
//!   `std::sync::Mutex` (`benches/shared.rs`), where glibc's generic robust
//!   path costs 3 to 5 times as much. The calling thread's id (the lock
//!   word's owner) is cached per thread and forgotten in the child of every
//!   `fork` (a `pthread_atfork` handler), where the thread has a new id.
//!   What this relies on beyond the kernel ABI: glibc's list protocol and
//!   its `robust_prev` link just before the head (both part of nptl since
//!   2.5, and tied to the frozen `pthread_mutex_t` layout); the unit tests
//!   check after random lock/unlock sequences of both kinds that the list
//!   holds exactly the held locks, and that a dying child's mixed list is
//!   walked by the kernel.
//! - **`Pthread`** (other C libraries, or a glibc whose list head does not
//!   look as expected): glibc's robust mutexes, `PTHREAD_PROCESS_SHARED` +
//!   `PTHREAD_MUTEX_ROBUST` (+ `ERRORCHECK` or `RECURSIVE`), with
//!   `pthread_mutex_consistent` on `EOWNERDEAD` and timeouts through
//!   `pthread_mutex_clocklock(CLOCK_MONOTONIC)` (glibc 2.30 and later) or
//!   `pthread_mutex_timedlock`.
//!
//! The choice is made once per process, before the first lock is created
//! (`MULTIPROC_PTHREAD_LOCKS=1` in the environment forces `Pthread`), and
//! recorded in each lock, so a lock and its copies in forked children always
//! use the same one.
//!
//! Error cases, all reported as `Err`, never a panic or a hang:
//! - `EDEADLK`: the calling thread already holds a non-recursive lock.
//! - `ENOTRECOVERABLE` (`Pthread` only): a process took a dead owner's lock
//!   over and died too before it could mark it consistent (a window of a
//!   few instructions); the lock is then unusable for good, as POSIX
//!   specifies. The `Futex` lock has no such state: it is handed on with
//!   `owner_died` again.
//! - `EAGAIN`: a recursive lock was taken more than `u32::MAX - 1` times.
//!
//! A lock still held when the last handle of this process drops (a guard
//! passed to `mem::forget`) keeps its mapping: the holder's robust list
//! (or another process) may still point into it.

use std::cell::Cell;
use std::io;
use std::marker::PhantomData;
use std::mem::{self, ManuallyDrop};
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicPtr, AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::libc;

use super::futex::{futex_wait, futex_wake};
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

/// Which implementation a [`RobustMutex`] uses (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// Our futex lock on glibc's robust list.
    Futex,
    /// glibc's robust pthread mutex.
    Pthread,
}

/// Bytes before the payload: the lock (40 bytes either way on 64-bit
/// targets), padded to a cache line.
const HEADER: usize = 64;

/// The backend of every lock this process creates: `Futex` when the
/// calling thread's robust list head is glibc's and looks as expected
/// (and `MULTIPROC_PTHREAD_LOCKS` is not set to force the fallback).
pub(crate) fn default_backend() -> Backend {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        let forced = std::env::var_os("MULTIPROC_PTHREAD_LOCKS").is_some_and(|v| v != "0");
        if !forced && cfg!(all(target_env = "gnu", target_pointer_width = "64")) && me().is_ok() {
            Backend::Futex
        } else {
            Backend::Pthread
        }
    })
}

/// A robust, process-shared mutex at the start of its own anonymous
/// mapping, followed by a payload only its holder may touch.
#[derive(Debug)]
pub(crate) struct RobustMutex {
    map: ManuallyDrop<SharedMapping>,
    kind: MutexKind,
    backend: Backend,
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

/// How long a lock call may wait.
#[derive(Clone, Copy)]
enum Wait {
    /// Not at all (`try_lock`).
    No,
    /// Until the instant (`None`: no limit).
    Until(Option<Instant>),
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
        Self::with_backend(default_backend(), kind, payload_align, payload_len)
    }

    /// As [`new`](RobustMutex::new), with a chosen backend (tests mix them).
    pub(crate) fn with_backend(
        backend: Backend,
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
        let header = HEADER.max(mem::size_of::<libc::pthread_mutex_t>());
        let payload_offset = header.next_multiple_of(payload_align);
        let total = payload_offset
            .checked_add(payload_len)
            .ok_or_else(|| invalid("shared value too large"))?;
        let map = SharedMapping::anonymous(total)?;
        if backend == Backend::Futex {
            // Fail here rather than at the first lock.
            me()?;
        } else {
            init_pthread_mutex(map.as_ptr().cast(), kind)?;
        }
        // Zeroed memory is an unlocked `FutexLock`.
        Ok(RobustMutex {
            map: ManuallyDrop::new(map),
            kind,
            backend,
            payload_offset,
            payload_len,
        })
    }

    /// Takes the mutex: `Ok(None)` when `timeout` elapsed first (`None`: wait
    /// for as long as it takes).
    #[inline]
    pub(crate) fn lock(&self, timeout: Option<Duration>) -> io::Result<Option<RobustGuard<'_>>> {
        let wait = Wait::Until(timeout.and_then(|d| Instant::now().checked_add(d)));
        self.acquire(wait)
    }

    /// Takes the mutex if it is free: `Ok(None)` when another thread or
    /// process holds it, or (non-recursive) the calling thread does.
    #[inline]
    pub(crate) fn try_lock(&self) -> io::Result<Option<RobustGuard<'_>>> {
        self.acquire(Wait::No)
    }

    #[inline]
    fn acquire(&self, wait: Wait) -> io::Result<Option<RobustGuard<'_>>> {
        let got = match self.backend {
            Backend::Futex => self.futex_acquire(wait)?,
            Backend::Pthread => self.pthread_acquire(wait)?,
        };
        Ok(got.map(|owner_died| RobustGuard {
            mutex: self,
            owner_died,
            _not_send: PhantomData,
        }))
    }

    /// Undoes one acquisition by the calling thread (the guard's drop).
    #[inline]
    fn release(&self) {
        match self.backend {
            Backend::Futex => self.futex_release(),
            Backend::Pthread => self.pthread_release(),
        }
    }

    /// The payload's length in bytes.
    #[allow(dead_code)] // for the queue layer
    pub(crate) fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// The backend this mutex uses.
    #[allow(dead_code)] // tests
    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    // ---- Futex backend ------------------------------------------------

    #[inline]
    fn futex(&self) -> &FutexLock {
        // SAFETY: the mapping starts with HEADER (>= 40) bytes, page-aligned,
        // that only ever hold a `FutexLock` for this backend: zeroed (a valid
        // unlocked lock) or written through its atomics. Every field is an
        // atomic, so shared access from threads and processes is sound. The
        // mapping lives as long as `self`.
        unsafe { &*self.map.as_ptr().cast::<FutexLock>() }
    }

    #[inline]
    fn futex_acquire(&self, wait: Wait) -> io::Result<Option<bool>> {
        let me = me()?;
        let l = self.futex();
        let word = &l.word;
        let cur = word.load(Ordering::Relaxed);
        if cur & FUTEX_TID_MASK == me.tid {
            return match (self.kind, wait) {
                (MutexKind::ErrorCheck, Wait::No) => Ok(None),
                (MutexKind::ErrorCheck, _) => Err(mutex_error(libc::EDEADLK)),
                (MutexKind::Recursive, _) => {
                    let c = l.count.load(Ordering::Relaxed);
                    if c == u32::MAX {
                        return Err(mutex_error(libc::EAGAIN));
                    }
                    l.count.store(c + 1, Ordering::Relaxed);
                    Ok(Some(false))
                }
            };
        }
        // Uncontended fast path.
        if cur == 0 {
            me.set_pending(l);
            if word
                .compare_exchange(0, me.tid, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                if self.kind == MutexKind::Recursive {
                    l.count.store(1, Ordering::Relaxed);
                }
                me.enqueue(l);
                me.clear_pending();
                return Ok(Some(false));
            }
            me.clear_pending();
        }
        self.futex_acquire_slow(me, wait)
    }

    #[cold]
    fn futex_acquire_slow(&self, me: Me, wait: Wait) -> io::Result<Option<bool>> {
        let l = self.futex();
        let word = &l.word;
        me.set_pending(l);
        // Once we slept, there may be more sleepers: keep FUTEX_WAITERS set
        // when we take the lock, so that our unlock wakes the next one.
        let mut waiters = 0;
        let r = loop {
            let v = word.load(Ordering::Relaxed);
            if v & FUTEX_TID_MASK == 0 {
                // Free, or its owner died (FUTEX_OWNER_DIED, set by the kernel).
                let new = me.tid | (v & FUTEX_WAITERS) | waiters;
                if word
                    .compare_exchange(v, new, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    if self.kind == MutexKind::Recursive {
                        l.count.store(1, Ordering::Relaxed);
                    }
                    me.enqueue(l);
                    break Ok(Some(v & FUTEX_OWNER_DIED != 0));
                }
                continue;
            }
            let left = match wait {
                Wait::No => break Ok(None),
                Wait::Until(None) => None,
                Wait::Until(Some(end)) => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break Ok(None);
                    }
                    Some(left)
                }
            };
            if v & FUTEX_WAITERS == 0
                && word
                    .compare_exchange(v, v | FUTEX_WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            waiters = FUTEX_WAITERS;
            if let Err(e) = futex_wait(word, v | FUTEX_WAITERS, left) {
                break Err(e);
            }
        };
        me.clear_pending();
        r
    }

    #[inline]
    fn futex_release(&self) {
        let Ok(me) = me() else { return };
        let l = self.futex();
        let word = &l.word;
        if word.load(Ordering::Relaxed) & FUTEX_TID_MASK != me.tid {
            // Not ours: a guard copied into a forked child, dropped there.
            return;
        }
        if self.kind == MutexKind::Recursive {
            let c = l.count.load(Ordering::Relaxed);
            if c > 1 {
                l.count.store(c - 1, Ordering::Relaxed);
                return;
            }
        }
        me.set_pending(l);
        me.dequeue(l);
        let old = word.swap(0, Ordering::Release);
        if old & FUTEX_WAITERS != 0 {
            futex_wake(word, 1);
        }
        me.clear_pending();
    }

    // ---- Pthread backend ----------------------------------------------

    #[inline]
    fn raw(&self) -> *mut libc::pthread_mutex_t {
        self.map.as_ptr().cast()
    }

    fn pthread_acquire(&self, wait: Wait) -> io::Result<Option<bool>> {
        let code = match wait {
            // SAFETY: `raw()` is a mutex initialized in `with_backend` that
            // lives as long as `self`; locking an initialized process-shared
            // mutex is sound from any thread.
            Wait::No => match unsafe { libc::pthread_mutex_trylock(self.raw()) } {
                // Held by this very thread: "not free", as std's `try_lock` says.
                libc::EDEADLK => return Ok(None),
                code => code,
            },
            // SAFETY: as above.
            Wait::Until(None) => unsafe { libc::pthread_mutex_lock(self.raw()) },
            Wait::Until(Some(end)) => {
                let abs = abs_deadline(end.saturating_duration_since(Instant::now()));
                timed_lock(self.raw(), &abs)
            }
        };
        match code {
            0 => Ok(Some(false)),
            libc::EBUSY | libc::ETIMEDOUT => Ok(None),
            libc::EOWNERDEAD => {
                // We hold the lock; its last holder died holding it. Mark it
                // consistent so that our unlock leaves it usable.
                // SAFETY: the calling thread holds the mutex (EOWNERDEAD
                // acquires it), which pthread_mutex_consistent requires.
                let r = unsafe { libc::pthread_mutex_consistent(self.raw()) };
                if r != 0 {
                    self.pthread_release();
                    return Err(io::Error::from_raw_os_error(r));
                }
                Ok(Some(true))
            }
            code => Err(mutex_error(code)),
        }
    }

    fn pthread_release(&self) {
        // SAFETY: an initialized mutex; unlocking one this thread does not
        // hold is refused with EPERM (robust mutexes check the owner), which
        // is what a guard copied into a forked child gets.
        unsafe {
            libc::pthread_mutex_unlock(self.raw());
        }
    }

    /// Whether some thread of some process holds the mutex now.
    fn is_held(&self) -> bool {
        match self.backend {
            Backend::Futex => self.futex().word.load(Ordering::Relaxed) & FUTEX_TID_MASK != 0,
            Backend::Pthread => match self.pthread_acquire(Wait::No) {
                Ok(Some(_)) => {
                    self.pthread_release();
                    false
                }
                _ => true,
            },
        }
    }
}

impl Drop for RobustMutex {
    fn drop(&mut self) {
        if self.is_held() {
            // A forgotten guard (or another process) holds it: the holder's
            // robust list may still link into the mapping, so keep it mapped.
            return;
        }
        // SAFETY: dropped once, here; no guard can outlive `self`.
        unsafe { ManuallyDrop::drop(&mut self.map) }
    }
}

fn init_pthread_mutex(m: *mut libc::pthread_mutex_t, kind: MutexKind) -> io::Result<()> {
    let ty = match kind {
        MutexKind::ErrorCheck => libc::PTHREAD_MUTEX_ERRORCHECK,
        MutexKind::Recursive => libc::PTHREAD_MUTEX_RECURSIVE,
    };
    // SAFETY: `attr` is initialized by pthread_mutexattr_init before any
    // other use and destroyed once. `m` points to the first bytes of a fresh
    // page-aligned mapping (aligned for and as large as a pthread_mutex_t)
    // that no one else can see yet, so initializing it once here is the
    // required "init before use, exactly once".
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
        r
    }
}

fn abs_deadline(d: Duration) -> libc::timespec {
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
    let mut sec = now
        .tv_sec
        .saturating_add(libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX));
    let mut nsec = now.tv_nsec + d.subsec_nanos() as libc::c_long;
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
    // `pthread_acquire`), `abs` a valid timespec on CLOCK_MONOTONIC.
    unsafe { pthread_mutex_clocklock(m, libc::CLOCK_MONOTONIC, abs) }
}

#[cfg(not(target_env = "gnu"))]
fn timed_lock(m: *mut libc::pthread_mutex_t, abs: &libc::timespec) -> libc::c_int {
    // SAFETY: `m` is an initialized mutex that outlives the call (see
    // `pthread_acquire`), `abs` a valid timespec on CLOCK_REALTIME.
    unsafe { libc::pthread_mutex_timedlock(m, abs) }
}

// ---- The futex lock and glibc's robust list -----------------------------

const FUTEX_WAITERS: u32 = 0x8000_0000;
const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// A futex lock laid out as glibc's 64-bit `pthread_mutex_t` where the
/// robust list reads it: the word at 0 (the kernel marks it on the owner's
/// death), the list links at 24 (`prev`, which glibc's unlinking writes) and
/// 32 (`next`, which the list points at and the kernel follows).
#[repr(C)]
struct FutexLock {
    /// The holder's thread id, `| FUTEX_WAITERS` when someone sleeps on it,
    /// or `FUTEX_OWNER_DIED` (with no id) after the holder died.
    word: AtomicU32,
    /// Recursion depth of a recursive lock, touched by the holder only.
    count: AtomicU32,
    /// pthread_mutex_t's `__owner`, `__nusers`, `__kind`, `__spins`: unused.
    _reserved: [AtomicU32; 4],
    prev: AtomicPtr<u8>,
    next: AtomicPtr<u8>,
}

const NEXT_OFFSET: usize = 32;
const _: () = assert!(mem::size_of::<FutexLock>() == 40);
const _: () = assert!(mem::offset_of!(FutexLock, next) == NEXT_OFFSET);
const _: () = assert!(mem::offset_of!(FutexLock, prev) == NEXT_OFFSET - 8);

/// The kernel's `struct robust_list_head`, as glibc embeds it in its
/// thread descriptor (right after the `robust_prev` link its list uses).
#[repr(C)]
struct RobustListHead {
    list: *mut u8,
    futex_offset: libc::c_long,
    list_op_pending: *mut u8,
}

/// The calling thread: its kernel id and its robust list head.
#[derive(Clone, Copy)]
struct Me {
    tid: u32,
    head: *mut RobustListHead,
}

thread_local! {
    /// `(tid, head)` of this thread; `(0, 0)` until looked up, and again in
    /// the child of a fork.
    static ME: Cell<(u32, usize)> = const { Cell::new((0, 0)) };
}

/// Runs in the child of every `fork`, in its only thread: that thread has a
/// new id there.
extern "C" fn forget_me_in_child() {
    let _ = ME.try_with(|m| m.set((0, 0)));
}

#[inline]
fn me() -> io::Result<Me> {
    let (tid, head) = ME.with(Cell::get);
    if tid != 0 {
        return Ok(Me {
            tid,
            head: head as *mut RobustListHead,
        });
    }
    me_slow()
}

#[cold]
fn me_slow() -> io::Result<Me> {
    let unsupported = |what: &str| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("robust futex list unavailable: {what}"),
        )
    };
    static ATFORK: OnceLock<libc::c_int> = OnceLock::new();
    // SAFETY: registers a handler that only resets a thread-local `Cell`
    // (async-signal-safe work), once per process.
    let r = *ATFORK
        .get_or_init(|| unsafe { libc::pthread_atfork(None, None, Some(forget_me_in_child)) });
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let tid = u32::try_from(tid)
        .ok()
        .filter(|&t| t != 0 && t & !FUTEX_TID_MASK == 0)
        .ok_or_else(|| unsupported("thread id out of range"))?;
    let mut head: *mut RobustListHead = ptr::null_mut();
    let mut len: libc::size_t = 0;
    // SAFETY: get_robust_list(0, ..) writes the calling thread's head pointer
    // and its length into the two valid, writable locals.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0 as libc::c_long,
            &mut head as *mut *mut RobustListHead,
            &mut len as *mut libc::size_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if head.is_null() || len != mem::size_of::<RobustListHead>() {
        return Err(unsupported("no list head registered for this thread"));
    }
    // SAFETY: the kernel returned the head glibc registered for this thread:
    // a live `robust_list_head` in the thread's descriptor.
    let (list, offset) = unsafe { ((*head).list, (*head).futex_offset) };
    if list.is_null() || offset != -(NEXT_OFFSET as libc::c_long) {
        return Err(unsupported("unexpected list head layout"));
    }
    ME.with(|m| m.set((tid, head as usize)));
    Ok(Me { tid, head })
}

impl Me {
    /// A link field of glibc's list, as an atomic (only this thread writes
    /// it; the kernel reads it when the thread dies, so program order is
    /// what matters, kept with compiler fences).
    ///
    /// # Safety
    /// `p` points to a live, aligned pointer-sized link: a `FutexLock`'s
    /// `prev`/`next`, a glibc mutex's `__list` links, or the head's fields or
    /// `robust_prev`, all of which are on this thread's list.
    #[inline]
    unsafe fn link<'a>(p: *mut *mut u8) -> &'a AtomicPtr<u8> {
        // SAFETY: per the contract; AtomicPtr has the layout of *mut u8.
        unsafe { AtomicPtr::from_ptr(p) }
    }

    #[inline]
    fn head_field(&self, f: fn(*mut RobustListHead) -> *mut *mut u8) -> &AtomicPtr<u8> {
        // SAFETY: `head` is this thread's live list head (checked in
        // `me_slow`; the cache is reset in a forked child, and a thread's
        // descriptor lives as long as the thread).
        unsafe { Self::link(f(self.head)) }
    }

    #[inline]
    fn set_pending(&self, l: &FutexLock) {
        self.head_field(field_pending)
            .store(l.next.as_ptr().cast(), Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }

    #[inline]
    fn clear_pending(&self) {
        compiler_fence(Ordering::SeqCst);
        self.head_field(field_pending)
            .store(ptr::null_mut(), Ordering::Relaxed);
    }

    /// glibc's `ENQUEUE_MUTEX_BOTH(l, 0)`: links `l` first in the list.
    #[inline]
    fn enqueue(&self, l: &FutexLock) {
        let list = self.head_field(field_list);
        let first = list.load(Ordering::Relaxed);
        let me_link: *mut u8 = l.next.as_ptr().cast();
        // SAFETY: `first` points at the `next` link of the first entry, or at
        // the head itself when the list is empty; 8 bytes before it is that
        // entry's `prev` link, or glibc's `robust_prev` before the head. Both
        // are live links of this thread's list.
        unsafe { Self::link(((first as usize & !1) - 8) as *mut *mut u8) }
            .store(me_link, Ordering::Relaxed);
        l.next.store(first, Ordering::Relaxed);
        l.prev.store(self.head.cast(), Ordering::Relaxed);
        // The entry is complete before the kernel can see it.
        compiler_fence(Ordering::SeqCst);
        list.store(me_link, Ordering::Relaxed);
    }

    /// glibc's `DEQUEUE_MUTEX(l)`: unlinks `l`, which this thread holds.
    #[inline]
    fn dequeue(&self, l: &FutexLock) {
        let next = l.next.load(Ordering::Relaxed);
        let prev = l.prev.load(Ordering::Relaxed);
        // SAFETY: `l` is linked in this thread's list (it was enqueued when
        // taken and the thread still holds it), so `next` points at the next
        // entry's `next` link (8 bytes after its `prev` link) or at the head
        // (8 bytes after `robust_prev`), and `prev` at the previous entry's
        // `next` link or at the head's `list`: all live links.
        unsafe {
            Self::link(((next as usize & !1) - 8) as *mut *mut u8).store(prev, Ordering::Relaxed);
            Self::link((prev as usize & !1) as *mut *mut u8).store(next, Ordering::Relaxed);
        }
        // Out of the list before its links are cleared.
        compiler_fence(Ordering::SeqCst);
        l.prev.store(ptr::null_mut(), Ordering::Relaxed);
        l.next.store(ptr::null_mut(), Ordering::Relaxed);
    }
}

fn field_list(h: *mut RobustListHead) -> *mut *mut u8 {
    // SAFETY: only computes a field address (no read, no reference); `h` is
    // a live head when the result is used (see `Me::head_field`).
    unsafe { ptr::addr_of_mut!((*h).list) }
}

fn field_pending(h: *mut RobustListHead) -> *mut *mut u8 {
    // SAFETY: as for `field_list`.
    unsafe { ptr::addr_of_mut!((*h).list_op_pending) }
}

/// Proof that the calling thread holds a [`RobustMutex`]; unlocks on drop.
/// Not `Send`: a lock is unlocked by the thread that locked it.
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
        // SAFETY: the payload range lies inside the mapping (see
        // `with_backend`). The calling thread holds the mutex, and every
        // access to the payload in every process goes through a guard of
        // this mutex; a recursive mutex (where one thread may hold two
        // guards) has an empty payload. So no one writes these bytes while
        // this borrow of the guard lives.
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
        self.mutex.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{fork_child, wait_blocking};
    use std::sync::Arc;

    const BOTH: [Backend; 2] = [Backend::Futex, Backend::Pthread];

    fn new(b: Backend, kind: MutexKind, len: usize) -> RobustMutex {
        RobustMutex::with_backend(b, kind, 8, len).unwrap()
    }

    #[test]
    fn this_glibc_gets_the_futex_backend() {
        if std::env::var_os("MULTIPROC_PTHREAD_LOCKS").is_none() {
            assert_eq!(default_backend(), Backend::Futex);
        }
    }

    #[test]
    fn errorcheck_relock_is_deadlock_error() {
        for b in BOTH {
            let m = new(b, MutexKind::ErrorCheck, 8);
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
    }

    #[test]
    fn recursive_relocks() {
        for b in BOTH {
            let m = Arc::new(new(b, MutexKind::Recursive, 0));
            let a = m.lock(None).unwrap().unwrap();
            let b2 = m.try_lock().unwrap().unwrap();
            let c = m.lock(Some(Duration::from_millis(1))).unwrap().unwrap();
            let m2 = Arc::clone(&m);
            let other = move || m2.try_lock().unwrap().is_some();
            drop(c);
            drop(a);
            assert!(!std::thread::spawn(other.clone()).join().unwrap());
            drop(b2);
            assert!(std::thread::spawn(other).join().unwrap());
            assert!(RobustMutex::with_backend(b, MutexKind::Recursive, 1, 8).is_err());
        }
    }

    #[test]
    fn timeout_from_another_thread() {
        for b in BOTH {
            let m = Arc::new(new(b, MutexKind::ErrorCheck, 0));
            let g = m.lock(None).unwrap().unwrap();
            let m2 = Arc::clone(&m);
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

    #[test]
    fn a_thread_that_exits_holding_hands_over() {
        for b in BOTH {
            let m = Arc::new(new(b, MutexKind::ErrorCheck, 0));
            let m2 = Arc::clone(&m);
            std::thread::spawn(move || mem::forget(m2.lock(None).unwrap().unwrap()))
                .join()
                .unwrap();
            let g = m.lock(Some(Duration::from_secs(10))).unwrap().unwrap();
            assert!(g.owner_died());
            drop(g);
            assert!(!m.lock(None).unwrap().unwrap().owner_died());
        }
    }

    /// Futex and pthread locks on one robust list, linked and unlinked in
    /// every order, then a child that dies holding some of them: the kernel
    /// must find exactly those.
    #[test]
    fn futex_and_glibc_locks_share_the_robust_list() {
        let locks: Vec<RobustMutex> = (0..8)
            .map(|i| new(BOTH[i % 2], MutexKind::ErrorCheck, 0))
            .collect();
        // Interleaved lock and unlock orders in this thread.
        for order in [[0, 1, 2, 3, 4, 5, 6, 7], [7, 5, 3, 1, 6, 4, 2, 0]] {
            let mut held: Vec<Option<RobustGuard<'_>>> = (0..8).map(|_| None).collect();
            for &i in &order {
                held[i] = Some(locks[i].lock(None).unwrap().unwrap());
            }
            for i in [3, 0, 7, 4, 1, 6, 2, 5] {
                held[i] = None;
                if i % 3 == 0 {
                    // Relink one while its neighbours are still held.
                    held[i] = Some(locks[i].lock(None).unwrap().unwrap());
                    held[i] = None;
                }
            }
        }
        // Every entry was unlinked: the list is empty again.
        let me = me().unwrap();
        // SAFETY: this thread's live list head.
        assert_eq!(unsafe { (*me.head).list }, me.head.cast::<u8>());
        // The child takes all eight, gives back 2, 3, 6 and 7 (one of each
        // kind between the others), dies.
        let pid = fork_child(|| {
            let held: Vec<_> = locks
                .iter()
                .map(|l| l.lock(None).unwrap().unwrap())
                .collect();
            for (i, g) in held.into_iter().enumerate() {
                if i % 4 < 2 {
                    mem::forget(g);
                }
            }
            // Still usable after the unlinks.
            let extra = new(Backend::Futex, MutexKind::ErrorCheck, 0);
            drop(extra.lock(None).unwrap().unwrap());
            std::process::abort()
        })
        .unwrap();
        assert_eq!(wait_blocking(pid).unwrap(), -6);
        for (i, l) in locks.iter().enumerate() {
            let g = l.lock(Some(Duration::from_secs(10))).unwrap().unwrap();
            assert_eq!(g.owner_died(), i % 4 < 2, "lock {i}");
        }
    }

    /// The `next` links on this thread's robust list, in list order.
    fn robust_list() -> Vec<usize> {
        let me = me().unwrap();
        let mut links = Vec::new();
        // SAFETY: walks this thread's live list, as the kernel would.
        unsafe {
            let mut p = (*me.head).list;
            while p != me.head.cast::<u8>() {
                links.push(p as usize & !1);
                p = *(p as *mut *mut u8);
                assert!(links.len() < 1000, "the robust list loops");
            }
        }
        links
    }

    #[test]
    fn the_robust_list_holds_exactly_the_held_locks() {
        let locks: Vec<RobustMutex> = (0..6)
            .map(|i| new(BOTH[i % 2], MutexKind::ErrorCheck, 0))
            .collect();
        let link = |i: usize| locks[i].map.as_ptr() as usize + NEXT_OFFSET;
        let mut held: Vec<Option<RobustGuard<'_>>> = (0..6).map(|_| None).collect();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for step in 0..3000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let i = (rng % 6) as usize;
            held[i] = match held[i].take() {
                Some(g) => {
                    drop(g);
                    None
                }
                None => Some(locks[i].lock(None).unwrap().unwrap()),
            };
            let mut want: Vec<usize> = (0..6).filter(|&j| held[j].is_some()).map(link).collect();
            let mut got = robust_list();
            want.sort();
            got.sort();
            assert_eq!(got, want, "step {step}");
        }
        held.clear();
        assert!(robust_list().is_empty());
    }

    #[test]
    fn a_forked_child_locks_with_its_own_thread_id() {
        let m = new(Backend::Futex, MutexKind::ErrorCheck, 0);
        drop(m.lock(None).unwrap().unwrap()); // caches this thread's id
        let pid = fork_child(|| {
            mem::forget(m.lock(None).unwrap().unwrap());
            0 // _exit holding it
        })
        .unwrap();
        assert_eq!(wait_blocking(pid).unwrap(), 0);
        let g = m.lock(Some(Duration::from_secs(10))).unwrap().unwrap();
        assert!(g.owner_died());
    }

    #[test]
    fn a_guard_dropped_in_a_forked_child_does_not_unlock() {
        for b in BOTH {
            let m = new(b, MutexKind::ErrorCheck, 0);
            let g = m.lock(None).unwrap().unwrap();
            let g_ptr: *const RobustGuard<'_> = &g;
            let pid = fork_child(|| {
                // SAFETY: the child's copy of the parent's guard, read once
                // and dropped once, in the child only (which then _exits).
                drop(unsafe { std::ptr::read(g_ptr) });
                i32::from(m.try_lock().unwrap().is_some())
            })
            .unwrap();
            assert_eq!(wait_blocking(pid).unwrap(), 0);
            drop(g);
        }
    }

    #[test]
    fn dropping_a_lock_held_by_a_forgotten_guard_keeps_the_list_sound() {
        for b in BOTH {
            let m = new(b, MutexKind::ErrorCheck, 0);
            mem::forget(m.lock(None).unwrap().unwrap());
            drop(m); // stays mapped: this thread's list links into it
            for b2 in BOTH {
                let other = new(b2, MutexKind::ErrorCheck, 0);
                drop(other.lock(None).unwrap().unwrap());
            }
        }
    }
}
