//! The queue's shared core, free of `T`: the control block, the ring in a
//! memfd, the lock, and the sleeping and waking around them.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::codec::{self, DEFAULT_MAX_FRAME_LEN, HEADER_LEN};
use crate::error::Result;
use crate::sync::{Lock, LockGuard};
use crate::sys::{self, SharedMapping};

use super::ring::{self, Push, State, Store, INITIAL_CAP};

/// Address space reserved for the ring, largest first; the first one the
/// kernel grants is used (a process under a tight `RLIMIT_AS` gets a smaller
/// one, and a lower limit on one message). Only what the ring's capacity
/// covers is backed by memory.
const RESERVES: [u64; 4] = [1 << 33, 1 << 32, 1 << 31, 1 << 28];

/// The longest a waiter sleeps before it looks again on its own: a safety
/// net for the one wake-up that can be missed, that of a process killed
/// between its commit and its `futex_wake` (a few instructions).
const SLICE: Duration = Duration::from_millis(200);

/// How many times an empty `get` looks again, without sleeping, for a
/// message that is being put (a sleep and a wake-up cost far more).
const SPINS: u32 = 200;

/// How many times a locker tries the lock before it sleeps on it.
const LOCK_SPINS: u32 = 64;

// The control block: one page, anonymous and shared. `COMMIT` counts the
// commits; the live state is in slot `COMMIT & 1`, and a commit writes the
// other slot whole before it flips `COMMIT`.
const COMMIT: usize = 0;
const SLOTS: [usize; 2] = [64, 128];
// Futex words, counting the events the waiters sleep on: a message was
// put (getters wake), a message was taken (putters of a full queue wake),
// the unfinished count reached 0 (joiners wake).
const PUT_SEQ: usize = 192;
const GOT_SEQ: usize = 196;
const DONE_SEQ: usize = 200;
// How many sleep (or are about to) on each word. A process killed while
// asleep leaves its count behind: wakers then make a `futex_wake` call that
// finds no one, which costs time, never correctness.
const GETTERS: usize = 256;
const PUTTERS: usize = 260;
const JOINERS: usize = 264;
const CONTROL_LEN: usize = 4096;

/// The ring's bytes: a memfd mapped once, at creation, over an address
/// range larger than it will ever grow. Growing is a `fallocate` on the
/// memfd, which every process sees at once through its copy of the same
/// mapping (inherited by `fork`): no process ever needs to map it again,
/// so there is no per-process mapping to keep in step.
#[derive(Debug)]
struct RingStore {
    map: SharedMapping,
    fd: OwnedFd,
}

impl RingStore {
    fn new() -> Result<RingStore> {
        let fd = sys::memfd("multiproc-queue", 0)?;
        sys::allocate(fd.as_fd(), INITIAL_CAP)?;
        let mut last = None;
        for reserve in RESERVES {
            let Ok(reserve) = usize::try_from(reserve) else {
                continue;
            };
            match SharedMapping::from_fd(fd.as_fd(), reserve) {
                Ok(map) => return Ok(RingStore { map, fd }),
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| io::Error::other("no address space for the queue"))
            .into())
    }
}

impl Store for RingStore {
    fn read(&self, off: usize, buf: &mut [u8]) -> io::Result<()> {
        self.map.read_at(off, buf)
    }

    fn write(&self, off: usize, data: &[u8]) -> io::Result<()> {
        self.map.write_at(off, data)
    }

    fn read_append(&self, off: usize, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        sys::read_append(&self.map, off, len, out)
    }

    fn resize(&self, len: usize) -> io::Result<()> {
        // Neither touches the bytes below `len`. Allocating every page
        // now turns a lack of memory into an error here rather than a
        // SIGBUS at the first write into the page.
        sys::set_len(self.fd.as_fd(), len)?;
        sys::allocate(self.fd.as_fd(), len)
    }

    fn max_len(&self) -> usize {
        self.map.len()
    }
}

/// The shared core of a queue.
#[derive(Debug)]
pub(crate) struct Shared {
    lock: Lock,
    ctl: SharedMapping,
    ring: RingStore,
    maxsize: Option<usize>,
}

/// A locked queue; dropping it unlocks, then wakes whoever must be woken.
struct Locked<'a> {
    shared: &'a Shared,
    guard: Option<LockGuard<'a>>,
    /// The previous holder died: wake everyone after unlocking, in case it
    /// died between its commit and its wake-up.
    died: bool,
    /// (word offset, how many) to wake after unlocking.
    wakes: [(usize, u32); 2],
}

impl Locked<'_> {
    fn state(&self) -> State {
        self.shared.state()
    }

    /// Publishes `st` in one store.
    fn commit(&mut self, st: State) {
        let ctl = &self.shared.ctl;
        let n = ctl.atomic_u64(COMMIT).load(Ordering::Relaxed);
        let slot = SLOTS[(n.wrapping_add(1) & 1) as usize];
        let fields = [st.cap, st.head, st.used, st.count, st.unfinished];
        for (i, v) in fields.into_iter().enumerate() {
            ctl.atomic_u64(slot + 8 * i)
                .store(v as u64, Ordering::Relaxed);
        }
        ctl.atomic_u64(COMMIT)
            .store(n.wrapping_add(1), Ordering::Release);
    }

    /// Counts an event on `seq`; once unlocked, wakes `n` of its sleepers,
    /// if `waiters` says there are any.
    fn signal(&mut self, seq: usize, waiters: usize, n: u32) {
        let ctl = &self.shared.ctl;
        ctl.atomic_u32(seq).fetch_add(1, Ordering::Release);
        if ctl.atomic_u32(waiters).load(Ordering::Acquire) > 0 {
            let slot = if self.wakes[0].1 == 0 { 0 } else { 1 };
            self.wakes[slot] = (seq, n);
        }
    }

    /// Unlocks, then sleeps until `seq` moves on (or `deadline`, or the
    /// safety slice). The caller found nothing to do under the lock.
    fn sleep(mut self, seq: usize, waiters: usize, deadline: Option<Instant>) -> Result<()> {
        let ctl = &self.shared.ctl;
        let word: &AtomicU32 = ctl.atomic_u32(seq);
        let seen = word.load(Ordering::Acquire);
        let count = ctl.atomic_u32(waiters);
        count.fetch_add(1, Ordering::AcqRel);
        self.unlock();
        let slice = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(SLICE),
            None => SLICE,
        };
        let r = sys::futex_wait(word, seen, Some(slice));
        count.fetch_sub(1, Ordering::AcqRel);
        r?;
        Ok(())
    }

    fn unlock(&mut self) {
        drop(self.guard.take());
        let ctl = &self.shared.ctl;
        if self.died {
            self.died = false;
            for seq in [PUT_SEQ, GOT_SEQ, DONE_SEQ] {
                ctl.atomic_u32(seq).fetch_add(1, Ordering::Release);
                sys::futex_wake(ctl.atomic_u32(seq), u32::MAX);
            }
        }
        for (seq, n) in std::mem::take(&mut self.wakes) {
            if n > 0 {
                sys::futex_wake(ctl.atomic_u32(seq), n);
            }
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.unlock();
    }
}

/// How long an operation may wait for a message, for room, or for the
/// unfinished count to reach zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// For as long as it takes.
    Forever,
    /// Until this instant (the lock too is waited for only until then).
    Until(Instant),
    /// Not at all; only for the lock, which is held for one copy at most
    /// (or taken over at once from a dead holder).
    No,
}

impl Wait {
    /// `Until(now + timeout)`; `Forever` for a timeout too far to represent.
    pub(crate) fn after(timeout: Duration) -> Wait {
        Instant::now()
            .checked_add(timeout)
            .map_or(Wait::Forever, Wait::Until)
    }

    fn expired(self) -> bool {
        match self {
            Wait::Forever => false,
            Wait::Until(d) => Instant::now() >= d,
            Wait::No => true,
        }
    }

    fn deadline(self) -> Option<Instant> {
        match self {
            Wait::Until(d) => Some(d),
            Wait::Forever | Wait::No => None,
        }
    }
}

impl Shared {
    /// A new, empty queue; `maxsize` bounds the number of messages.
    pub(crate) fn new(maxsize: Option<usize>) -> Result<Shared> {
        let ctl = SharedMapping::anonymous(CONTROL_LEN)?;
        let shared = Shared {
            lock: Lock::new()?,
            ctl,
            ring: RingStore::new()?,
            maxsize,
        };
        let first = State::new();
        // Not yet shared with anyone: write slot 0 directly.
        let fields = [
            first.cap,
            first.head,
            first.used,
            first.count,
            first.unfinished,
        ];
        for (i, v) in fields.into_iter().enumerate() {
            shared
                .ctl
                .atomic_u64(SLOTS[0] + 8 * i)
                .store(v as u64, Ordering::Relaxed);
        }
        shared.ctl.atomic_u64(COMMIT).store(0, Ordering::Release);
        Ok(shared)
    }

    pub(crate) fn maxsize(&self) -> Option<usize> {
        self.maxsize
    }

    /// The last committed state (exact under the lock, a recent one
    /// without).
    fn state(&self) -> State {
        let n = self.ctl.atomic_u64(COMMIT).load(Ordering::Acquire);
        let slot = SLOTS[(n & 1) as usize];
        let f = |i: usize| self.ctl.atomic_u64(slot + 8 * i).load(Ordering::Relaxed) as usize;
        State {
            cap: f(0),
            head: f(1),
            used: f(2),
            count: f(3),
            unfinished: f(4),
        }
    }

    /// Messages in the queue, approximately.
    pub(crate) fn len(&self) -> usize {
        self.state().count
    }

    fn lock_until(&self, wait: Wait) -> Result<Option<Locked<'_>>> {
        // The lock is held for one copy, most often of a few bytes: try it
        // a few times before sleeping on it (a sleep and its wake-up cost
        // two system calls and far more than the copy).
        // A short spin only, no `sched_yield`: a holder copying a big
        // message keeps the lock for long, and is better slept on.
        let mut guard = None;
        for _ in 0..LOCK_SPINS {
            guard = self.lock.try_lock()?;
            if guard.is_some() {
                break;
            }
            std::hint::spin_loop();
        }
        let guard = match (guard, wait.deadline()) {
            (Some(g), _) => Some(g),
            (None, None) => Some(self.lock.lock()?),
            (None, Some(d)) => self
                .lock
                .lock_timeout(d.saturating_duration_since(Instant::now()))?,
        };
        Ok(guard.map(|g| Locked {
            shared: self,
            died: g.owner_died(),
            guard: Some(g),
            wakes: [(0, 0); 2],
        }))
    }

    /// Puts one encoded frame; `Ok(false)` if still full when `wait` ends.
    pub(crate) fn put_frame(&self, frame: &[u8], wait: Wait) -> Result<bool> {
        self.check_frame_len(frame.len())?;
        loop {
            let Some(mut locked) = self.lock_until(wait)? else {
                return Ok(false);
            };
            match ring::push(&self.ring, locked.state(), frame, self.maxsize)? {
                Push::Done(next) => {
                    locked.commit(next);
                    locked.signal(PUT_SEQ, GETTERS, 1);
                    return Ok(true);
                }
                Push::Full if wait.expired() => return Ok(false),
                Push::Full => locked.sleep(GOT_SEQ, PUTTERS, wait.deadline())?,
            }
        }
    }

    /// Refuses a frame over the codec's limit, or one the ring could never
    /// hold.
    pub(crate) fn check_frame_len(&self, frame_len: usize) -> Result<()> {
        let payload = frame_len.saturating_sub(HEADER_LEN);
        let limit = DEFAULT_MAX_FRAME_LEN.min(self.ring.max_len() - HEADER_LEN);
        if payload > limit || !ring::fits_ever(&self.ring, frame_len) {
            return Err(codec::oversize_on_send(payload, limit));
        }
        Ok(())
    }

    /// Spins a little while the queue looks empty.
    fn spin_while_empty(&self) {
        for i in 0..SPINS {
            if self.len() > 0 {
                return;
            }
            if i < SPINS / 2 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Takes the first frame's payload into `out`; `Ok(false)` if none came
    /// before `wait` ends.
    pub(crate) fn get_frame(&self, out: &mut Vec<u8>, wait: Wait) -> Result<bool> {
        let mut slept = false;
        let got = self.get_frame_inner(out, wait, &mut slept);
        if slept && !matches!(got, Ok(true)) {
            // A put wakes one getter. If that was us and we leave without
            // a message (our deadline passed while another process held
            // the lock), pass the wake-up on: the message is for another.
            self.ctl.atomic_u32(PUT_SEQ).fetch_add(1, Ordering::Release);
            if self.ctl.atomic_u32(GETTERS).load(Ordering::Acquire) > 0 {
                sys::futex_wake(self.ctl.atomic_u32(PUT_SEQ), 1);
            }
        }
        got
    }

    fn get_frame_inner(&self, out: &mut Vec<u8>, wait: Wait, slept: &mut bool) -> Result<bool> {
        loop {
            if !wait.expired() {
                self.spin_while_empty();
            }
            let Some(mut locked) = self.lock_until(wait)? else {
                return Ok(false);
            };
            if let Some(p) = ring::pop(&self.ring, locked.state(), out)? {
                locked.commit(p.state);
                if p.shrink {
                    // The bytes past the new capacity are free; if the
                    // shrink fails they stay allocated, nothing worse.
                    let _ = self.ring.resize(p.state.cap);
                }
                locked.signal(GOT_SEQ, PUTTERS, u32::MAX);
                if p.state.count > 0 {
                    // More to take: pass a wake-up on to another getter.
                    locked.signal(PUT_SEQ, GETTERS, 1);
                }
                return Ok(true);
            }
            if wait.expired() {
                return Ok(false);
            }
            *slept = true;
            locked.sleep(PUT_SEQ, GETTERS, wait.deadline())?;
        }
    }

    /// Marks one message done; `Ok(false)` if none was unfinished.
    pub(crate) fn task_done(&self) -> Result<bool> {
        let Some(mut locked) = self.lock_until(Wait::Forever)? else {
            return Ok(false);
        };
        let Some(next) = ring::task_done(locked.state()) else {
            return Ok(false);
        };
        locked.commit(next);
        if next.unfinished == 0 {
            locked.signal(DONE_SEQ, JOINERS, u32::MAX);
        }
        Ok(true)
    }

    /// Waits until every message put was marked done; `Ok(false)` at
    /// when `wait` ends.
    pub(crate) fn join(&self, wait: Wait) -> Result<bool> {
        loop {
            let Some(locked) = self.lock_until(wait)? else {
                return Ok(false);
            };
            if locked.state().unfinished == 0 {
                return Ok(true);
            }
            if wait.expired() {
                return Ok(false);
            }
            locked.sleep(DONE_SEQ, JOINERS, wait.deadline())?;
        }
    }

    /// Takes the queue's lock, as a put or get in progress holds it.
    #[cfg(test)]
    pub(crate) fn hold_lock(&self) -> LockGuard<'_> {
        self.lock.lock().unwrap()
    }

    /// Messages put and not yet marked done, approximately.
    pub(crate) fn unfinished(&self) -> usize {
        self.state().unfinished
    }
}
