//! The queue's byte ring, as pure logic over a [`Store`].
//!
//! Messages are codec frames (an 8-byte little-endian length, then the
//! payload) laid back to back in a ring of `cap` bytes, which may wrap at
//! the end. Every operation reads a [`State`] and returns the next one
//! without changing the state itself: the caller publishes it in one step
//! (the commit). Until then nothing a reader could see has changed: a push
//! writes only into free space, a pop only reads, and a growth copies only
//! into bytes beyond the old capacity. A process killed in the middle of an
//! operation therefore leaves the last committed state intact and
//! consistent.
//!
//! The store is a memfd in the real queue and a `Vec<u8>` in the unit tests.

use std::io;

use crate::codec::HEADER_LEN;
use crate::error::{CodecError, CodecErrorKind, Error, Result};

/// The ring's capacity when created, and after it shrinks.
pub(crate) const INITIAL_CAP: usize = 64 * 1024;

/// An empty ring larger than this shrinks back to [`INITIAL_CAP`].
pub(crate) const SHRINK_ABOVE: usize = 64 * 1024 * 1024;

/// Capacities are multiples of this (the page size, so the memfd grows by
/// whole pages).
const GRAIN: usize = 4096;

/// The bytes a ring can hold, in some backing store.
pub(crate) trait Store {
    /// Copies `buf.len()` bytes at `off` into `buf`.
    fn read(&self, off: usize, buf: &mut [u8]) -> io::Result<()>;
    /// Copies `data` to `off`.
    fn write(&self, off: usize, data: &[u8]) -> io::Result<()>;
    /// Appends the `len` bytes at `off` to `out`.
    fn read_append(&self, off: usize, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let at = out.len();
        out.resize(at + len, 0);
        self.read(off, &mut out[at..])
    }
    /// Makes `len` bytes addressable (grows or shrinks the backing store).
    fn resize(&self, len: usize) -> io::Result<()>;
    /// The largest capacity the store can ever have.
    fn max_len(&self) -> usize;

    /// Copies `len` bytes from `src` to `dst`; the ranges do not overlap.
    fn copy(&self, src: usize, dst: usize, len: usize) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let mut tmp = vec![0u8; len.min(CHUNK)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.read(src + done, &mut tmp[..n])?;
            self.write(dst + done, &tmp[..n])?;
            done += n;
        }
        Ok(())
    }
}

/// What one commit publishes: the whole state of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct State {
    /// Bytes of the ring in use as its capacity (0: not yet initialized).
    pub(crate) cap: usize,
    /// Offset of the first frame.
    pub(crate) head: usize,
    /// Bytes of the frames in the ring.
    pub(crate) used: usize,
    /// Frames in the ring.
    pub(crate) count: usize,
    /// Frames put and not yet marked done (`JoinableQueue::task_done`).
    pub(crate) unfinished: usize,
}

impl State {
    /// A fresh, empty ring.
    pub(crate) fn new() -> State {
        State {
            cap: INITIAL_CAP,
            ..State::default()
        }
    }

    /// The offset just past the last frame.
    fn tail(&self) -> usize {
        (self.head + self.used) % self.cap
    }

    /// Checks the invariants; a state that breaks one is a bug or memory
    /// corruption, refused rather than followed.
    fn check(&self, store: &dyn Store) -> Result<()> {
        let ok = self.cap > 0
            && self.cap <= store.max_len()
            && self.head < self.cap
            && self.used <= self.cap
            && self.count <= self.used / HEADER_LEN;
        if ok {
            Ok(())
        } else {
            Err(corrupt(format!("inconsistent queue state {self:?}")))
        }
    }
}

fn corrupt(msg: String) -> Error {
    CodecError::new(CodecErrorKind::Invalid(msg)).into()
}

/// The outcome of [`push`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Push {
    /// The frame is written; commit this state.
    Done(State),
    /// No room now: wait until a consumer takes something.
    Full,
}

/// The capacity to grow to so that `needed` bytes fit, or `None` if the
/// store cannot hold them.
fn grown_cap(cap: usize, needed: usize, max: usize) -> Option<usize> {
    let want = needed.max(cap.saturating_mul(2));
    let want = want.checked_next_multiple_of(GRAIN)?;
    let new = want.min(max);
    (new >= needed).then_some(new)
}

/// Writes `data` at ring offset `off`, wrapping at `cap`.
fn write_wrapped(store: &dyn Store, cap: usize, off: usize, data: &[u8]) -> io::Result<()> {
    let first = data.len().min(cap - off);
    store.write(off, &data[..first])?;
    if first < data.len() {
        store.write(0, &data[first..])?;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at ring offset `off`, wrapping at `cap`.
fn read_wrapped(store: &dyn Store, cap: usize, off: usize, buf: &mut [u8]) -> io::Result<()> {
    let first = buf.len().min(cap - off);
    store.read(off, &mut buf[..first])?;
    if first < buf.len() {
        store.read(0, &mut buf[first..])?;
    }
    Ok(())
}

/// Grows the ring of `st` so that a frame of `len` more bytes fits, moving
/// the wrapped part so that the frames stay in order. Until the commit, the
/// frames of `st` must read back unchanged: the moves and the new frame's
/// bytes land only outside them. `None` if it cannot grow enough.
fn grow(store: &dyn Store, st: State, len: usize) -> Result<Option<State>> {
    let max = store.max_len();
    let end = st.head + st.used;
    let mut next = st;
    if end <= st.cap {
        // Not wrapped: the frames stay where they are, and the free space
        // of the grown ring is free in the old one as well.
        let Some(new_cap) = grown_cap(st.cap, st.used + len, max) else {
            return Ok(None);
        };
        store.resize(new_cap)?;
        next.cap = new_cap;
        return Ok(Some(next));
    }
    // Wrapped: frames at [head, cap) and [0, w).
    let w = end - st.cap;
    // The new frame goes right after them, so the grown ring must hold
    // cap + w + len bytes. (Were there room in the old ring's gap instead,
    // no growth would be needed.)
    let Some(new_cap) = grown_cap(st.cap, st.cap + w + len, max) else {
        return Ok(None);
    };
    // Append the front part after the old end: frames at [head, cap + w).
    store.resize(new_cap)?;
    store.copy(0, st.cap, w)?;
    next.cap = new_cap;
    Ok(Some(next))
}

/// Appends `frame` (a whole codec frame) after the last one, growing the
/// ring if needed. `max_count` bounds the number of frames (a bounded
/// queue).
pub(crate) fn push(
    store: &dyn Store,
    st: State,
    frame: &[u8],
    max_count: Option<usize>,
) -> Result<Push> {
    st.check(store)?;
    if max_count.is_some_and(|m| st.count >= m) {
        return Ok(Push::Full);
    }
    let mut st = st;
    if st.cap - st.used < frame.len() {
        match grow(store, st, frame.len())? {
            Some(grown) => st = grown,
            None => return Ok(Push::Full),
        }
    }
    write_wrapped(store, st.cap, st.tail(), frame)?;
    st.used += frame.len();
    st.count += 1;
    st.unfinished += 1;
    Ok(Push::Done(st))
}

/// Whether a frame of `len` bytes could ever fit in the store.
pub(crate) fn fits_ever(store: &dyn Store, len: usize) -> bool {
    len <= store.max_len()
}

/// The outcome of [`pop`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Pop {
    /// Commit this state.
    pub(crate) state: State,
    /// After the commit, shrink the store to the new capacity.
    pub(crate) shrink: bool,
}

/// Copies the first frame's payload into `out` (replacing its contents)
/// and returns the state without it; `None` if the ring is empty.
pub(crate) fn pop(store: &dyn Store, st: State, out: &mut Vec<u8>) -> Result<Option<Pop>> {
    st.check(store)?;
    if st.count == 0 {
        return Ok(None);
    }
    let mut header = [0u8; HEADER_LEN];
    read_wrapped(store, st.cap, st.head, &mut header)?;
    let len = u64::from_le_bytes(header);
    let total = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(HEADER_LEN))
        .filter(|&t| t <= st.used)
        .ok_or_else(|| {
            corrupt(format!(
                "frame of {len} bytes in a ring holding {}",
                st.used
            ))
        })?;
    out.clear();
    let off = (st.head + HEADER_LEN) % st.cap;
    let len = total - HEADER_LEN;
    let first = len.min(st.cap - off);
    store.read_append(off, first, out)?;
    store.read_append(0, len - first, out)?;
    let mut next = st;
    next.head = (st.head + total) % st.cap;
    next.used -= total;
    next.count -= 1;
    let mut shrink = false;
    if next.count == 0 {
        // Empty: start again at the front, and give back a big ring.
        next.head = 0;
        if next.cap > SHRINK_ABOVE {
            next.cap = INITIAL_CAP;
            shrink = true;
        }
    }
    Ok(Some(Pop {
        state: next,
        shrink,
    }))
}

/// The state after one `task_done`; `None` if no task is unfinished.
pub(crate) fn task_done(st: State) -> Option<State> {
    let mut next = st;
    next.unfinished = st.unfinished.checked_sub(1)?;
    Some(next)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A `Vec<u8>` store; bytes past `len` are unreachable, as in a memfd.
    pub(crate) struct VecStore {
        pub(crate) bytes: RefCell<Vec<u8>>,
        pub(crate) max: usize,
    }

    impl VecStore {
        pub(crate) fn new(max: usize) -> VecStore {
            VecStore {
                bytes: RefCell::new(vec![0xAA; INITIAL_CAP]),
                max,
            }
        }
    }

    fn oob() -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, "out of bounds")
    }

    impl Store for VecStore {
        fn read(&self, off: usize, buf: &mut [u8]) -> io::Result<()> {
            let b = self.bytes.borrow();
            buf.copy_from_slice(b.get(off..off + buf.len()).ok_or_else(oob)?);
            Ok(())
        }
        fn write(&self, off: usize, data: &[u8]) -> io::Result<()> {
            let mut b = self.bytes.borrow_mut();
            b.get_mut(off..off + data.len())
                .ok_or_else(oob)?
                .copy_from_slice(data);
            Ok(())
        }
        fn resize(&self, len: usize) -> io::Result<()> {
            self.bytes.borrow_mut().resize(len, 0xAA);
            Ok(())
        }
        fn max_len(&self) -> usize {
            self.max
        }
    }

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        let mut f = (n as u64).to_le_bytes().to_vec();
        f.extend(std::iter::repeat_n(fill, n));
        f
    }

    fn push_ok(s: &VecStore, st: State, f: &[u8]) -> State {
        match push(s, st, f, None).unwrap() {
            Push::Done(st) => st,
            Push::Full => panic!("unexpectedly full"),
        }
    }

    fn pop_ok(s: &VecStore, st: State) -> (State, Vec<u8>) {
        let mut out = Vec::new();
        let p = pop(s, st, &mut out).unwrap().expect("empty");
        (p.state, out)
    }

    #[test]
    fn fifo_with_wrap() {
        let s = VecStore::new(INITIAL_CAP);
        let mut st = State::new();
        // Fill most of the ring, drain half, then wrap around.
        for i in 0..100u8 {
            st = push_ok(&s, st, &frame(500, i));
        }
        for i in 0..60u8 {
            let (n, out) = pop_ok(&s, st);
            st = n;
            assert_eq!(out, vec![i; 500]);
        }
        for i in 100..150u8 {
            st = push_ok(&s, st, &frame(500, i));
        }
        assert!(st.head + st.used > st.cap, "the test must wrap");
        for i in 60..150u8 {
            let (n, out) = pop_ok(&s, st);
            st = n;
            assert_eq!(out, vec![i; 500]);
        }
        assert_eq!(st.count, 0);
        assert_eq!(st.used, 0);
        assert_eq!(st.head, 0);
        assert_eq!(st.unfinished, 150);
        assert_eq!(pop(&s, st, &mut Vec::new()).unwrap(), None);
    }

    #[test]
    fn grows_keeping_order_when_wrapped() {
        // Grow while wrapped, with a small and with a big front part.
        for (drain, refill) in [(120usize, 20usize), (20, 120)] {
            let s = VecStore::new(1 << 30);
            let mut st = State::new();
            let mut next_in = 0u32;
            let mut next_out = 0u32;
            let f = |i: u32| frame(400, (i % 251) as u8);
            for _ in 0..150 {
                st = push_ok(&s, st, &f(next_in));
                next_in += 1;
            }
            for _ in 0..drain {
                let (n, out) = pop_ok(&s, st);
                st = n;
                assert_eq!(out, f(next_out)[8..]);
                next_out += 1;
            }
            for _ in 0..refill {
                st = push_ok(&s, st, &f(next_in));
                next_in += 1;
            }
            // Now grow while wrapped.
            let cap_before = st.cap;
            for _ in 0..200 {
                st = push_ok(&s, st, &f(next_in));
                next_in += 1;
            }
            assert!(st.cap > cap_before);
            while st.count > 0 {
                let (n, out) = pop_ok(&s, st);
                st = n;
                assert_eq!(out, f(next_out)[8..], "frame {next_out}");
                next_out += 1;
            }
            assert_eq!(next_in, next_out);
        }
    }

    /// Pops every frame of `st`, checking each is `len` bytes of its index.
    fn drain_expect(s: &VecStore, mut st: State, first: u8, len: usize) {
        let mut i = first;
        while st.count > 0 {
            let (n, out) = pop_ok(s, st);
            st = n;
            assert_eq!(out, vec![i; len], "frame {i}");
            i = i.wrapping_add(1);
        }
    }

    #[test]
    fn a_push_never_touches_committed_frames() {
        // A producer killed after writing, before its commit: the old state
        // must still read back exactly, whatever the push wrote. Try pushes
        // of every size class on a wrapped ring, an unwrapped ring with a
        // gap at the front, and a full one.
        for (keep, drain) in [(30u8, 20u8), (60, 60), (50, 5)] {
            for big in [10usize, 3000, 70_000, 300_000] {
                let s = VecStore::new(1 << 24);
                let mut st = State::new();
                for i in 0..keep {
                    st = push_ok(&s, st, &frame(1000, i));
                }
                for _ in 0..drain {
                    st = pop_ok(&s, st).0;
                }
                for i in keep..keep + 40 {
                    st = push_ok(&s, st, &frame(1000, i));
                }
                let committed = st;
                if let Push::Done(lost) = push(&s, st, &frame(big, 0xEE), None).unwrap() {
                    assert_eq!(lost.count, committed.count + 1);
                }
                drain_expect(&s, committed, drain, 1000);
            }
        }
    }

    #[test]
    fn bounded_by_count_and_by_store() {
        let s = VecStore::new(INITIAL_CAP);
        let st = State::new();
        let st = push_ok(&s, st, &frame(0, 0));
        assert_eq!(push(&s, st, &frame(0, 0), Some(1)).unwrap(), Push::Full);
        assert!(matches!(
            push(&s, st, &frame(0, 0), Some(2)).unwrap(),
            Push::Done(_)
        ));
        // The store cannot grow past its maximum.
        assert_eq!(
            push(&s, st, &frame(INITIAL_CAP, 1), None).unwrap(),
            Push::Full
        );
        assert!(fits_ever(&s, INITIAL_CAP));
        assert!(!fits_ever(&s, INITIAL_CAP + 1));
        let (st, out) = pop_ok(&s, st);
        assert!(out.is_empty());
        assert_eq!(st.count, 0);
    }

    #[test]
    fn big_empty_ring_shrinks() {
        let s = VecStore::new(1 << 30);
        let st = push_ok(&s, State::new(), &frame(SHRINK_ABOVE, 7));
        assert!(st.cap > SHRINK_ABOVE);
        let mut out = Vec::new();
        let p = pop(&s, st, &mut out).unwrap().unwrap();
        assert!(p.shrink);
        assert_eq!(p.state.cap, INITIAL_CAP);
        assert_eq!(out.len(), SHRINK_ABOVE);
    }

    #[test]
    fn corrupt_state_and_frames_are_errors() {
        let s = VecStore::new(INITIAL_CAP);
        let bad = State {
            cap: INITIAL_CAP,
            head: INITIAL_CAP,
            ..State::default()
        };
        assert!(matches!(
            push(&s, bad, &frame(1, 1), None),
            Err(Error::Codec(_))
        ));
        // A header announcing more bytes than the ring holds.
        let st = push_ok(&s, State::new(), &frame(4, 1));
        s.write(0, &u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(pop(&s, st, &mut Vec::new()), Err(Error::Codec(_))));
    }

    #[test]
    fn task_done_counts_down_to_zero_only() {
        let st = State {
            unfinished: 1,
            ..State::new()
        };
        let st = task_done(st).unwrap();
        assert_eq!(st.unfinished, 0);
        assert_eq!(task_done(st), None);
    }

    #[test]
    fn grown_cap_rounds_and_clamps() {
        assert_eq!(grown_cap(4096, 5000, 1 << 20), Some(8192));
        assert_eq!(grown_cap(4096, 100_000, 1 << 20), Some(102_400));
        assert_eq!(grown_cap(1 << 20, (1 << 20) + 1, 1 << 20), None);
        assert_eq!(grown_cap(600_000, 700_000, 1 << 20), Some(1 << 20));
    }
}
