//! `MAP_SHARED` mappings: anonymous ones (inherited through `fork`), and
//! mappings of a memfd or a POSIX shared memory object; `memfd_create`,
//! `shm_open`, `shm_unlink`, `ftruncate` and `fallocate`; copies out of a
//! mapping into uninitialized buffer space.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::fcntl::{fallocate, FallocateFlags};
use nix::libc;

/// A `MAP_SHARED`, read-write mapping, unmapped on drop.
///
/// Every process that maps the same memory (a forked child of the process
/// that created an anonymous mapping, or any process that maps the same memfd
/// or shm object) sees every write. The mapping is page-aligned.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory that no thread owns; the safe accessors
// are bounds-checked byte copies and atomics, so sharing a `&SharedMapping`
// between threads gives no more than a shared `&[AtomicU8]` would. It is
// unmapped once, by `Drop`, when no borrow is left.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl SharedMapping {
    /// Maps `len` zeroed bytes of anonymous shared memory (`len > 0`).
    pub(crate) fn anonymous(len: usize) -> io::Result<SharedMapping> {
        Self::map(None, len)
    }

    /// Maps the first `len` bytes of `fd` (a memfd or a shm object at least
    /// `len` bytes long; `len > 0`).
    pub(crate) fn from_fd(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedMapping> {
        Self::map(Some(fd), len)
    }

    fn map(fd: Option<BorrowedFd<'_>>, len: usize) -> io::Result<SharedMapping> {
        if len == 0 {
            return Err(invalid("cannot map zero bytes"));
        }
        if len > isize::MAX as usize {
            return Err(invalid("mapping too large"));
        }
        let (flags, raw) = match fd {
            Some(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
            None => (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a new mapping at an address of the kernel's choosing
        // touches no existing memory; `raw` is -1 or a borrowed, open fd; the
        // result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedMapping { ptr, len })
    }

    /// The mapping's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first byte of the mapping. Reads and writes through it are the
    /// caller's business (they race with every other process that maps it).
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(invalid("range out of bounds of the shared memory")),
        }
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    pub(crate) fn read_at(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: `offset..offset + buf.len()` is inside the mapping (checked
        // above), and `buf` is a distinct, writable buffer of that length (it
        // is `&mut`, so it cannot alias the mapping through a shared view of
        // ours). Another process may write the bytes concurrently: the copy
        // then sees some mix of old and new bytes, which is plain data (`u8`
        // has no invalid values); callers that need consistency use a lock.
        unsafe {
            ptr::copy_nonoverlapping(self.as_ptr().add(offset), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub(crate) fn write_at(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: as in `read_at`, with the roles of the buffers swapped; no
        // `&[u8]` into the mapping is ever handed out by the safe API, so
        // this write invalidates no reference.
        unsafe {
            ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len());
        }
        Ok(())
    }

    /// The `AtomicU32` at `offset`.
    ///
    /// # Panics
    /// On a misaligned or out-of-range offset: a bug of the crate.
    pub(crate) fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && self.check(offset, 4).is_ok(),
            "atomic u32 at {offset} in a mapping of {} bytes",
            self.len
        );
        // SAFETY: the range is inside the mapping and 4-aligned (the mapping
        // is page-aligned); zeroed or previously written memory is a valid
        // `AtomicU32`, which has interior mutability, and the mapping lives
        // as long as the returned borrow.
        unsafe { &*self.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    /// The `AtomicU64` at `offset`.
    ///
    /// # Panics
    /// On a misaligned or out-of-range offset: a bug of the crate.
    pub(crate) fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.is_multiple_of(8) && self.check(offset, 8).is_ok(),
            "atomic u64 at {offset} in a mapping of {} bytes",
            self.len
        );
        // SAFETY: as for `atomic_u32`, with 8-byte alignment.
        unsafe { &*self.as_ptr().add(offset).cast::<AtomicU64>() }
    }
}

impl SharedMapping {
    /// A shared view of `len` bytes at `offset`: bytes that the crate's
    /// allocators of large payloads handed to one writer, who finished
    /// writing them before publishing their range (a socket message, a
    /// lock). `Err` if the range is outside the mapping.
    ///
    /// Decoders read these bytes in place. A misbehaving process that maps
    /// the same memory (a worker that writes a range it gave away) can only
    /// change which values are read: every byte pattern is a valid `u8`, and
    /// decoding checks everything it reads.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> io::Result<&[u8]> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(&[]);
        }
        // SAFETY: the range is inside the mapping (checked), which lives as
        // long as `&self`; `u8` has no invalid values. See above for writers.
        Ok(unsafe { std::slice::from_raw_parts(self.as_ptr().add(offset), len) })
    }

    /// Runs `write` over `len` bytes at `offset`, which the caller owns
    /// alone: an allocation of one of the crate's payload allocators
    /// (`pool::payload`), which hand each range to one writer at a time and
    /// take it back only after every reader is done. `Err` if the range is
    /// outside the mapping.
    pub(crate) fn write_with<R>(
        &self,
        offset: usize,
        len: usize,
        write: impl FnOnce(&mut [u8]) -> R,
    ) -> io::Result<R> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(write(&mut []));
        }
        // SAFETY: the range is inside the mapping (checked), which outlives
        // the call; the allocators give this range to this writer alone
        // (see above), so no other reference to these bytes exists while
        // `write` runs.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(offset), len) };
        Ok(write(buf))
    }

    /// Gives the pages wholly inside `offset..offset + len` back to the
    /// system (`MADV_REMOVE`: a memfd or shm mapping frees them, and reads
    /// then see zeros). Best effort.
    pub(crate) fn discard(&self, offset: usize, len: usize) {
        let page = page_size();
        let start = offset.next_multiple_of(page);
        let end = offset.saturating_add(len).min(self.len) / page * page;
        if end <= start {
            return;
        }
        // SAFETY: the page-aligned range is inside our own mapping; removing
        // its pages changes only their contents (to zeros), which no
        // reference of ours borrows: the allocators call this on free ranges.
        unsafe {
            libc::madvise(
                self.as_ptr().add(start).cast(),
                end - start,
                libc::MADV_REMOVE,
            );
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: the pointer and length are those of our own mapping, and
        // every borrow handed out by the accessors ended with `&self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| invalid("name contains a nul byte"))
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new memfd named `name` (for `/proc/<pid>/fd` only), close-on-exec,
/// `len` bytes long.
pub(crate) fn memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let c = cstring(name)?;
    // SAFETY: `c` is a nul-terminated string that outlives the call.
    let fd = owned(unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) })?;
    set_len(fd.as_fd(), len)?;
    Ok(fd)
}

/// Sets the length of the file behind `fd` (`ftruncate`).
pub(crate) fn set_len(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| invalid("length too large"))?;
    // SAFETY: `fd` is a borrowed, open fd; ftruncate touches no memory of ours.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The length of the file behind `fd` (`fstat`).
pub(crate) fn file_len(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let st = nix::sys::stat::fstat(fd).map_err(io::Error::from)?;
    usize::try_from(st.st_size).map_err(|_| invalid("file length out of range"))
}

/// `shm_open(name, O_RDWR | O_CLOEXEC | extra, 0o600)`; `name` includes the
/// leading '/'.
pub(crate) fn shm_open(name: &str, create_exclusive: bool) -> io::Result<OwnedFd> {
    let c = cstring(name)?;
    let mut flags = libc::O_RDWR | libc::O_CLOEXEC;
    if create_exclusive {
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    // SAFETY: `c` is a nul-terminated string that outlives the call.
    owned(unsafe { libc::shm_open(c.as_ptr(), flags, 0o600) })
}

/// `shm_unlink(name)`; `name` includes the leading '/'.
pub(crate) fn shm_unlink(name: &str) -> io::Result<()> {
    let c = cstring(name)?;
    // SAFETY: `c` is a nul-terminated string that outlives the call.
    if unsafe { libc::shm_unlink(c.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The unsafe views of [`SharedMemory`](crate::SharedMemory) live here, with
/// every other `unsafe` line of the crate.
impl crate::shm::SharedMemory {
    /// The whole memory as a byte slice.
    ///
    /// # Safety
    /// While the slice lives, no process or thread may write the memory
    /// (through [`write_at`](crate::SharedMemory::write_at),
    /// [`as_mut_slice`](crate::SharedMemory::as_mut_slice), the pointer, or
    /// another process's mapping): Rust assumes a `&[u8]` does not change.
    /// Keep writers out with a lock or a protocol of your own.
    ///
    /// ```
    /// let shm = multiproc::SharedMemory::new(4)?;
    /// shm.write_at(0, &[1, 2, 3, 4])?;
    /// // SAFETY: no other process or thread has this memory.
    /// let bytes = unsafe { shm.as_slice() };
    /// assert_eq!(bytes, &[1, 2, 3, 4]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len()` readable bytes that live as long as
        // `&self`; the caller promises that no one writes them meanwhile.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// The whole memory as a mutable byte slice.
    ///
    /// # Safety
    /// While the slice lives, no other process or thread may read or write
    /// the memory, and this process holds no other view of it (another
    /// `as_slice`/`as_mut_slice`, a clone's): the slice must be the only way
    /// to the bytes, as for any `&mut`.
    ///
    /// ```
    /// let shm = multiproc::SharedMemory::new(4)?;
    /// // SAFETY: no other process or thread has this memory, and this is
    /// // the only view of it.
    /// unsafe { shm.as_mut_slice() }.copy_from_slice(b"abcd");
    /// let mut buf = [0u8; 4];
    /// shm.read_at(0, &mut buf)?;
    /// assert_eq!(&buf, b"abcd");
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[allow(clippy::mut_from_ref)] // the `# Safety` contract makes it exclusive
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as for `as_slice`; the caller promises exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.map.len()) }
    }
}

/// The progress of one worker: how many items it has started and finished
/// in its life. The worker stores, the parent loads; no system call.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Items started (the one running is `started - 1` while `started > finished`).
    pub(crate) started: AtomicU64,
    /// Items whose result is encoded in the worker's buffer.
    pub(crate) finished: AtomicU64,
}

/// `n` [`Progress`] slots in one anonymous `MAP_SHARED` mapping, created in
/// the parent before the workers are forked: a worker's stores are visible
/// to the parent, even after the worker died (the pages outlive it).
#[derive(Debug)]
pub(crate) struct SharedProgress {
    map: SharedMapping,
    len: usize,
}

impl SharedProgress {
    /// Maps `n` zeroed slots (zero is a valid `AtomicU64`).
    pub(crate) fn new(n: usize) -> io::Result<SharedProgress> {
        let len = n.max(1);
        let map = SharedMapping::anonymous(len * mem::size_of::<Progress>())?;
        Ok(SharedProgress { map, len })
    }

    /// Slot `i`.
    pub(crate) fn slot(&self, i: usize) -> &Progress {
        assert!(i < self.len, "progress slot {i} out of {}", self.len);
        // SAFETY: slot `i` lies inside the mapping (`len` slots were mapped),
        // which is page-aligned, so every slot is aligned for `Progress`;
        // the kernel zero-filled it, and all-zero atomics are a valid
        // `Progress`; only atomics are ever accessed through it, and the
        // mapping lives as long as `self`.
        unsafe { &*self.map.as_ptr().cast::<Progress>().add(i) }
    }
}

/// Allocates the first `len` bytes of the file behind `fd` (a memfd),
/// growing it if shorter. A write into a memfd page that cannot be
/// allocated raises `SIGBUS`; allocating first turns that into an
/// `ENOSPC`/`ENOMEM` error here.
pub(crate) fn allocate(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    let len = i64::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    fallocate(fd, FallocateFlags::empty(), 0, len)?;
    Ok(())
}

/// Appends the `len` bytes at `offset` of `map` to `out`, without
/// zero-filling `out`'s new space first.
pub(crate) fn read_append(
    map: &SharedMapping,
    offset: usize,
    len: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= map.len() => {}
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range out of bounds of the shared memory",
            ))
        }
    }
    out.reserve(len);
    let at = out.len();
    // SAFETY: `offset..offset + len` is inside the mapping (checked above),
    // which stays mapped while `map` is borrowed. `reserve(len)` guarantees
    // `len` bytes of spare capacity after `at`, so the destination is inside
    // `out`'s allocation, which cannot overlap the mapping (it is our own
    // heap memory). After the copy `at..at + len` is initialized with plain
    // bytes (`u8` has no invalid values, whatever another process wrote
    // concurrently), so the new length is valid.
    unsafe {
        ptr::copy_nonoverlapping(map.as_ptr().add(offset), out.as_mut_ptr().add(at), len);
        out.set_len(at + len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn progress_is_shared_with_a_fork() {
        let shared = SharedProgress::new(2).unwrap();
        let pid = crate::sys::fork_child(|| {
            shared.slot(1).started.store(7, Ordering::Relaxed);
            0
        })
        .unwrap();
        assert_eq!(crate::sys::wait_blocking(pid).unwrap(), 0);
        assert_eq!(shared.slot(1).started.load(Ordering::Relaxed), 7);
        assert_eq!(shared.slot(0).started.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn anonymous_is_zeroed_and_bounds_checked() {
        let m = SharedMapping::anonymous(100).unwrap();
        assert_eq!(m.len(), 100);
        let mut buf = [1u8; 100];
        m.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 100]);
        m.write_at(98, &[7, 8]).unwrap();
        let mut two = [0u8; 2];
        m.read_at(98, &mut two).unwrap();
        assert_eq!(two, [7, 8]);
        assert_eq!(
            m.write_at(99, &[1, 2]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(m.read_at(usize::MAX, &mut two).is_err());
        assert!(m.read_at(100, &mut []).is_ok());
        assert!(m.read_at(101, &mut []).is_err());
        assert!(SharedMapping::anonymous(0).is_err());
    }

    #[test]
    fn atomics_alias_the_bytes() {
        let m = SharedMapping::anonymous(16).unwrap();
        m.atomic_u32(4).store(0x01020304, Ordering::SeqCst);
        m.atomic_u64(8).store(u64::MAX, Ordering::SeqCst);
        let mut b = [0u8; 16];
        m.read_at(0, &mut b).unwrap();
        assert_eq!(&b[4..8], &0x01020304u32.to_ne_bytes());
        assert_eq!(&b[8..], &[0xff; 8]);
    }

    #[test]
    #[should_panic(expected = "atomic u32")]
    fn misaligned_atomic_panics() {
        SharedMapping::anonymous(16).unwrap().atomic_u32(2);
    }

    #[test]
    fn memfd_mappings_share_memory() {
        let fd = memfd("multiproc-test", 4096).unwrap();
        assert_eq!(file_len(fd.as_fd()).unwrap(), 4096);
        let a = SharedMapping::from_fd(fd.as_fd(), 4096).unwrap();
        let b = SharedMapping::from_fd(fd.as_fd(), 4096).unwrap();
        a.write_at(10, b"hello").unwrap();
        let mut s = [0u8; 5];
        b.read_at(10, &mut s).unwrap();
        assert_eq!(&s, b"hello");
        set_len(fd.as_fd(), 8192).unwrap();
        assert_eq!(file_len(fd.as_fd()).unwrap(), 8192);
    }

    #[test]
    fn appends_exactly_the_range_and_checks_bounds() {
        let m = SharedMapping::anonymous(64).unwrap();
        m.write_at(10, b"abcdef").unwrap();
        let mut out = b"xy".to_vec();
        read_append(&m, 11, 4, &mut out).unwrap();
        assert_eq!(out, b"xybcde");
        read_append(&m, 64, 0, &mut out).unwrap();
        assert_eq!(out.len(), 6);
        assert!(read_append(&m, 61, 4, &mut out).is_err());
        assert!(read_append(&m, usize::MAX, 2, &mut out).is_err());
        assert_eq!(out, b"xybcde");
    }
}
