//! Large payloads through shared memory: the pool's arena of arguments and
//! each worker's region of results. Only offsets cross the sockets.
//!
//! - **Arguments.** An item whose encoding reaches [`SHARED_MIN`] bytes is
//!   encoded straight into the pool's [`ArgsArena`] (a memfd mapped before
//!   the workers are forked; the fork server's children map it from the fd)
//!   and travels as a chunk of its own, an [`ArenaBlock`]. Workers only read
//!   it. The block returns to the arena when the chunk is retired (every
//!   result in, or the job dropped), so a chunk sent again after a crash
//!   still finds its bytes.
//! - **Results.** Each worker has a [`Region`](crate::region::Region) of its own (a memfd
//!   made with the worker, dropped with it): the worker alone allocates in
//!   it (a bitmap of blocks in the region's head), encodes a large result
//!   straight into it and reports `(offset, length)`; the caller decodes in
//!   place and frees the blocks ([`Ranges`](crate::region::Ranges), also on drop, so a result
//!   nobody reads does not leak). A worker that dies in the middle of a
//!   result never reported it; its region goes with it, and its replacement
//!   gets a fresh one, so no one ever reads half-written bytes.
//!
//! Both keep the pages they used for the next payload (the copy into hot
//! pages is what makes this fast) up to a bound, and give back the pages
//! above it as soon as they are free.

use std::collections::BTreeMap;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use crate::sys::{self, SharedMapping};

/// Items and results whose encoding reaches this many bytes travel through
/// shared memory. Below it, the socket copy costs less than the allocation.
pub(crate) const SHARED_MIN: usize = 64 * 1024;

/// The arguments arena's address space: sparse, only pages written count.
pub(crate) const ARGS_LEN: usize = 8 << 30;
/// Pages of the arguments arena kept for reuse once free.
const ARGS_KEEP: usize = 512 << 20;
/// Allocation granularity of the arena (a page).
const ARGS_ALIGN: usize = 4096;

/// The pool's shared arena of large arguments, written by callers, read by
/// workers.
#[derive(Debug)]
pub(crate) struct ArgsArena {
    fd: OwnedFd,
    map: SharedMapping,
    /// Free extents: offset → length, coalesced.
    free: Mutex<BTreeMap<usize, usize>>,
}

impl ArgsArena {
    pub(crate) fn new() -> io::Result<ArgsArena> {
        let fd = sys::memfd("multiproc-pool-args", ARGS_LEN)?;
        let map = SharedMapping::from_fd(fd.as_fd(), ARGS_LEN)?;
        Ok(ArgsArena {
            fd,
            map,
            free: Mutex::new(BTreeMap::from([(0, ARGS_LEN)])),
        })
    }

    /// The arena's memfd (for children of the fork server).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn mapping(&self) -> &SharedMapping {
        &self.map
    }

    /// Takes `len` bytes, lowest free address first (the pages most likely
    /// still in memory). `None` when no free extent is long enough.
    fn alloc(&self, len: usize) -> Option<(usize, usize)> {
        let cap = len.max(1).next_multiple_of(ARGS_ALIGN);
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let (&at, &n) = free.iter().find(|(_, &n)| n >= cap)?;
        free.remove(&at);
        if n > cap {
            free.insert(at + cap, n - cap);
        }
        Some((at, cap))
    }

    fn release(&self, at: usize, cap: usize) {
        // Pages above the bound go back to the system before anyone can
        // reuse the range.
        if at + cap > ARGS_KEEP {
            let from = at.max(ARGS_KEEP);
            self.map.discard(from, at + cap - from);
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let (mut start, mut len) = (at, cap);
        if let Some((&p, &pn)) = free.range(..at).next_back() {
            if p + pn == at {
                free.remove(&p);
                start = p;
                len += pn;
            }
        }
        if let Some(&nn) = free.get(&(at + cap)) {
            free.remove(&(at + cap));
            len += nn;
        }
        free.insert(start, len);
    }

    /// Free bytes (tests).
    #[cfg(test)]
    fn free_bytes(&self) -> usize {
        self.free.lock().unwrap().values().sum()
    }
}

/// An allocation of the [`ArgsArena`] holding one encoded item; back to
/// the arena on drop.
#[derive(Debug)]
pub(crate) struct ArenaBlock {
    arena: Arc<ArgsArena>,
    offset: usize,
    len: usize,
    cap: usize,
}

impl ArenaBlock {
    /// Encodes with `encode` (which writes exactly `len` bytes into the
    /// slice it gets and returns the count written) into a new block.
    /// `Ok(None)` when the arena has no room: the caller keeps the socket
    /// path.
    pub(crate) fn encode(
        arena: &Arc<ArgsArena>,
        len: usize,
        encode: impl FnOnce(&mut [u8]) -> crate::Result<usize>,
    ) -> crate::Result<Option<ArenaBlock>> {
        let Some((offset, cap)) = arena.alloc(len) else {
            return Ok(None);
        };
        let block = ArenaBlock {
            arena: Arc::clone(arena),
            offset,
            len,
            cap,
        };
        let written = arena.map.write_with(offset, len, encode)??;
        if written != len {
            return Err(
                crate::error::CodecError::new(crate::error::CodecErrorKind::Encode(format!(
                    "an item's size changed while it was encoded ({len} then {written} bytes)"
                )))
                .into(),
            );
        }
        Ok(Some(block))
    }

    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.arena
            .map
            .bytes(self.offset, self.len)
            .expect("a block lies inside its arena")
    }
}

impl Drop for ArenaBlock {
    fn drop(&mut self) {
        self.arena.release(self.offset, self.cap);
    }
}

/// A chunk's encoded items: inline bytes that cross the worker's socket,
/// or one large item in the pool's arena, of which only the offset does.
#[derive(Debug)]
pub(crate) enum Payload {
    Inline(Vec<u8>),
    Arena(ArenaBlock),
}

impl Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Inline(v) => v,
            Payload::Arena(b) => b.bytes(),
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::Inline(v)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_reuses_the_lowest_free_range_and_coalesces() {
        let arena = Arc::new(ArgsArena::new().unwrap());
        let put = |n: usize| {
            ArenaBlock::encode(&arena, n, |b| {
                b.fill(7);
                Ok(b.len())
            })
            .unwrap()
            .unwrap()
        };
        let a = put(100_000);
        let b = put(5000);
        assert_eq!(a.offset(), 0);
        assert_eq!(b.offset(), 100_000usize.next_multiple_of(ARGS_ALIGN));
        assert!(b.bytes().iter().all(|&x| x == 7));
        drop(a);
        let c = put(4096);
        assert_eq!(c.offset(), 0, "the lowest free range first");
        drop((b, c));
        assert_eq!(arena.free_bytes(), ARGS_LEN);
        assert_eq!(arena.free.lock().unwrap().len(), 1, "coalesced");
        assert!(ArenaBlock::encode(&arena, ARGS_LEN + 1, |_| Ok(0))
            .unwrap()
            .is_none());
        // A size that changes while encoding is an error, and frees.
        assert!(ArenaBlock::encode(&arena, 10, |_| Ok(9)).is_err());
        assert_eq!(arena.free_bytes(), ARGS_LEN);
    }
}
