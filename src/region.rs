//! A shared memory region with one writer and readers that free: a memfd
//! of [`REGION_LEN`] bytes of address space (only pages written count),
//! whose head is a bitmap of 64 KiB blocks. The writer alone
//! allocates (a pool worker for its large results, a
//! [`Connection`](crate::Connection) end for its large messages), encodes
//! a value straight in and publishes `(offset, length)`; the reader decodes
//! in place and frees the blocks through [`Ranges`] (also on drop, so a
//! value nobody reads does not leak). Freed pages above 128 MiB go
//! back to the system at once.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::sys::{self, SharedMapping};

/// A region's address space: sparse, only pages written count.
pub(crate) const REGION_LEN: usize = 2 << 30;
/// Pages of a region kept for reuse once free.
const REGION_KEEP: usize = 128 << 20;
/// A region's allocation unit.
const BLOCK: usize = 64 * 1024;
/// Blocks of a region (the first ones hold the bitmap).
const BLOCKS: usize = REGION_LEN / BLOCK;
/// Bytes of the bitmap: one bit per block.
const BITMAP_BYTES: usize = BLOCKS / 8;
/// Blocks taken by the bitmap itself.
const HEAD_BLOCKS: usize = BITMAP_BYTES.div_ceil(BLOCK);

/// A region: its writer allocates and writes, its readers read and free.
#[derive(Debug)]
pub(crate) struct Region {
    map: SharedMapping,
}

impl Region {
    /// A new region and its memfd, for the reader to map (a forked reader
    /// inherits the mapping instead).
    pub(crate) fn new() -> io::Result<(Region, OwnedFd)> {
        let fd = sys::memfd("multiproc-region", REGION_LEN)?;
        let map = SharedMapping::from_fd(fd.as_fd(), REGION_LEN)?;
        Ok((Region { map }, fd))
    }

    /// Maps the region of `fd` (a fork-server worker, a connection's peer).
    pub(crate) fn from_fd(fd: BorrowedFd<'_>) -> io::Result<Region> {
        if sys::file_len(fd)? != REGION_LEN {
            return Err(io::Error::other("a region of the wrong size"));
        }
        Ok(Region {
            map: SharedMapping::from_fd(fd, REGION_LEN)?,
        })
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        self.map.atomic_u64(i * 8)
    }

    fn is_free(&self, block: usize) -> bool {
        self.word(block / 64).load(Ordering::Acquire) & (1 << (block % 64)) == 0
    }

    /// In the writer (the only allocator): the offset of `len` free bytes,
    /// lowest first, now taken. `None` when no run of free blocks is long
    /// enough (the value then crosses the socket).
    pub(crate) fn alloc(&self, len: usize) -> Option<usize> {
        let n = len.max(1).div_ceil(BLOCK);
        let (mut run, mut block) = (0, HEAD_BLOCKS);
        while block < BLOCKS {
            // Whole taken words at a time.
            if block % 64 == 0 && self.word(block / 64).load(Ordering::Acquire) == u64::MAX {
                run = 0;
                block += 64;
                continue;
            }
            if self.is_free(block) {
                run += 1;
                if run == n {
                    let first = block + 1 - n;
                    self.set(first, n, true);
                    return Some(first * BLOCK);
                }
            } else {
                run = 0;
            }
            block += 1;
        }
        None
    }

    fn set(&self, first: usize, n: usize, taken: bool) {
        let mut b = first;
        while b < first + n {
            let bit = b % 64;
            let k = (64 - bit).min(first + n - b);
            let mask = if k == 64 {
                u64::MAX
            } else {
                ((1u64 << k) - 1) << bit
            };
            if taken {
                self.word(b / 64).fetch_or(mask, Ordering::AcqRel);
            } else {
                self.word(b / 64).fetch_and(!mask, Ordering::AcqRel);
            }
            b += k;
        }
    }

    /// Checks that `offset..offset + len` is a range the writer may name.
    pub(crate) fn check(&self, offset: u64, len: u64) -> bool {
        let (o, l) = (offset as usize, len as usize);
        o.is_multiple_of(BLOCK)
            && o >= HEAD_BLOCKS * BLOCK
            && o.checked_add(l).is_some_and(|end| end <= REGION_LEN)
    }

    /// In the writer: gives back a range it took but did not name (its
    /// encode failed, or its message was never sent).
    pub(crate) fn unalloc(&self, offset: usize, len: usize) {
        self.free(offset, len);
    }

    /// Gives a range back (a caller done with a result).
    fn free(&self, offset: usize, len: usize) {
        let cap = len.max(1).next_multiple_of(BLOCK);
        if offset + cap > REGION_KEEP {
            let from = offset.max(REGION_KEEP);
            self.map.discard(from, offset + cap - from);
        }
        self.set(offset / BLOCK, cap / BLOCK, false);
    }

    pub(crate) fn mapping(&self) -> &SharedMapping {
        &self.map
    }
}

/// Ranges of a region that a reader holds (the large values of one
/// message): read in place, freed on drop.
#[derive(Debug)]
pub(crate) struct Ranges {
    region: Arc<Region>,
    /// `(offset, length)`, in the order the message's entries name them.
    blocks: Vec<(usize, usize)>,
}

impl Ranges {
    /// Checked ranges of `region` (see [`Region::check`]).
    pub(crate) fn new(region: Arc<Region>, blocks: Vec<(usize, usize)>) -> Ranges {
        Ranges { region, blocks }
    }

    /// The bytes of the `k`-th large result of the message.
    pub(crate) fn get(&self, k: usize) -> Option<&[u8]> {
        let &(o, l) = self.blocks.get(k)?;
        self.region.map.bytes(o, l).ok()
    }
}

impl Drop for Ranges {
    fn drop(&mut self) {
        for &(o, l) in &self.blocks {
            self.region.free(o, l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_allocates_runs_and_frees_them() {
        let (region, _fd) = Region::new().unwrap();
        let region = Arc::new(region);
        let a = region.alloc(1).unwrap();
        assert_eq!(a, HEAD_BLOCKS * BLOCK);
        let b = region.alloc(3 * BLOCK + 1).unwrap();
        assert_eq!(b, a + BLOCK);
        let c = region.alloc(BLOCK).unwrap();
        assert_eq!(c, b + 4 * BLOCK);
        assert!(region.check(b as u64, 3 * BLOCK as u64 + 1));
        assert!(!region.check(1, 10));
        assert!(!region.check(0, 10), "the bitmap is not a result");
        assert!(!region.check(b as u64, REGION_LEN as u64));
        // Freed through the guard: the run is taken again.
        drop(Ranges::new(Arc::clone(&region), vec![(b, 3 * BLOCK + 1)]));
        assert_eq!(region.alloc(2 * BLOCK), Some(b));
        // A run across bitmap words.
        let big = region.alloc(200 * BLOCK).unwrap();
        assert!(big > c);
        drop(Ranges::new(Arc::clone(&region), vec![(big, 200 * BLOCK)]));
        assert_eq!(region.alloc(200 * BLOCK), Some(big));
        // Too large for the region.
        assert_eq!(region.alloc(REGION_LEN), None);
    }
}
