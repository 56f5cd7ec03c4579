//! System calls used only by the pool layer: the progress counters shared
//! with forked workers, function addresses carried across `fork`,
//! non-blocking sockets and `poll(2)` with read and write interest.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::libc;

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
    ptr: NonNull<Progress>,
    len: usize,
}

// SAFETY: the mapping is only ever accessed through `&Progress`, whose fields
// are atomics; it is unmapped once, by `Drop`, when no reference is left.
unsafe impl Send for SharedProgress {}
// SAFETY: as above: shared access is atomic loads and stores only.
unsafe impl Sync for SharedProgress {}

impl SharedProgress {
    /// Maps `n` zeroed slots (zero is a valid `AtomicU64`).
    pub(crate) fn new(n: usize) -> io::Result<SharedProgress> {
        let len = n.max(1);
        let bytes = len * mem::size_of::<Progress>();
        // SAFETY: an anonymous mapping at an address of the kernel's choosing
        // touches no existing memory; the result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<Progress>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(SharedProgress { ptr, len })
    }

    /// Slot `i`.
    pub(crate) fn slot(&self, i: usize) -> &Progress {
        assert!(i < self.len, "progress slot {i} out of {}", self.len);
        // SAFETY: `i` is in bounds of the mapping, which is page-aligned (so
        // every slot is aligned), zero-initialized by the kernel (a valid
        // `Progress`), and lives as long as `self`.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }
}

impl Drop for SharedProgress {
    fn drop(&mut self) {
        // SAFETY: the pointer and length are those of our own mapping, and no
        // `&Progress` can outlive `self`.
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().cast(),
                self.len * mem::size_of::<Progress>(),
            );
        }
    }
}

/// The signature of the pool's monomorphized trampolines: `(the user's
/// function address, the decoded context, the raw context, the decoder
/// over the chunk's items, the output buffer or `None` to skip the item)
/// -> `Ok(true)` for a value entry, `Ok(false)` for a failure entry (a
/// panic), `Err(message)` when an input item cannot be decoded. Defined here because its address crosses `fork` (see
/// [`fn_from_addr`]).
pub(crate) type Trampoline = fn(
    usize,
    &mut Option<Box<dyn std::any::Any>>,
    Option<&[u8]>,
    &mut crate::codec::SeqDecoder<'_>,
    Option<&mut Vec<u8>>,
) -> Result<bool, String>;

mod sealed {
    pub(crate) trait Sealed {}
}

/// Function pointer types whose address may be sent to a forked worker.
/// Only plain `fn` pointers implement it: they are pointer-sized and point at
/// code, which a fork shares with its parent.
pub(crate) trait FnPointer: Copy + sealed::Sealed {}
impl<A, R> sealed::Sealed for fn(A) -> R {}
impl<A, R> FnPointer for fn(A) -> R {}
impl<C, A, R> sealed::Sealed for fn(&C, A) -> R {}
impl<C, A, R> FnPointer for fn(&C, A) -> R {}
impl sealed::Sealed for Trampoline {}
impl FnPointer for Trampoline {}

/// The address of a function pointer, to send to a forked worker.
pub(crate) fn fn_addr<F: FnPointer>(f: F) -> usize {
    const { assert!(mem::size_of::<F>() == mem::size_of::<usize>()) };
    // SAFETY: `F` is a plain fn pointer (sealed trait), which has the size
    // (checked above) and representation of an address.
    unsafe { mem::transmute_copy::<F, usize>(&f) }
}

/// The function pointer of type `F` whose address is `addr`.
///
/// Contract (crate-private): `addr` must come from [`fn_addr::<F>`] with the
/// same `F`, in this process or in an ancestor this process is a `fork` of.
/// The pool sends such addresses only over the private socket between its
/// dispatcher and its own forked workers.
pub(crate) fn fn_from_addr<F: FnPointer>(addr: usize) -> F {
    const { assert!(mem::size_of::<F>() == mem::size_of::<usize>()) };
    // SAFETY: by the contract above `addr` is the address of a function of
    // type `F` in the parent. A worker is a fork of the parent (no exec): it
    // runs the same executable image mapped at the same addresses, so the
    // address names the same function here. fn pointers are never null,
    // and `addr` came from one.
    unsafe { mem::transmute_copy::<usize, F>(&addr) }
}

/// Sets `O_NONBLOCK` on `fd` (an open file description of our own).
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// One `send(2)` on a socket with `MSG_NOSIGNAL` (a vanished peer is an
/// `EPIPE` error, not a `SIGPIPE`): the number of bytes written;
/// `WouldBlock` on a full non-blocking socket; retried on `EINTR`.
pub(crate) fn write_some(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::{send, MsgFlags};
    loop {
        match send(fd.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A `pollfd` entry: `fd` with read interest, and write interest if `write`.
pub(crate) fn poll_entry(fd: RawFd, write: bool) -> libc::pollfd {
    let mut events = libc::POLLIN;
    if write {
        events |= libc::POLLOUT;
    }
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// What `poll` reported for one entry.
pub(crate) fn poll_ready(entry: &libc::pollfd) -> (bool, bool) {
    let r = entry.revents;
    let readable = r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
    let writable = r & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0;
    (readable, writable)
}

/// `poll(2)` on `entries` for at most `timeout` (`None`: no limit). Returns
/// the number of ready entries; 0 on timeout or on `EINTR` (the caller
/// loops anyway).
pub(crate) fn poll_entries(
    entries: &mut [libc::pollfd],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    let ms: libc::c_int = match timeout {
        None => -1,
        Some(d) => d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: the pointer and length describe a valid, exclusively borrowed
    // slice of `pollfd`, which the kernel only writes `revents` of.
    let rc = unsafe { libc::poll(entries.as_mut_ptr(), entries.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(rc as usize)
}

/// The raw number of a borrowed fd.
pub(crate) fn raw_of(fd: BorrowedFd<'_>) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn double(x: u64) -> u64 {
        x * 2
    }

    #[test]
    fn fn_address_round_trip() {
        let addr = fn_addr(double as fn(u64) -> u64);
        let f: fn(u64) -> u64 = fn_from_addr(addr);
        assert_eq!(f(21), 42);
    }

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
}

/// A monotonic clock in nanoseconds that costs a memory read, not a
/// system call or a TSC read: `CLOCK_MONOTONIC_COARSE` (through the vDSO),
/// which advances once per scheduler tick (1 to 4 ms). For deciding when to
/// flush a worker's buffered results between items. 0 if the clock is
/// unavailable (then only the other flush rules apply).
#[inline]
pub(crate) fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the
    // call; the clock id is a constant the kernel knows (or rejects with
    // EINVAL, leaving `ts` zeroed).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// A fixed number of result slots filled in any order, each exactly once,
/// then turned into a `Vec<R>` in place: the pool decodes every result
/// straight into its final position (no `Option` per item, no second copy
/// of the output). A bitmap records which slots hold a value.
pub(crate) struct Slots<R> {
    buf: Vec<mem::MaybeUninit<R>>,
    filled: Vec<u64>,
    count: usize,
}

impl<R> Slots<R> {
    /// `n` empty slots. The memory is reserved, not touched.
    pub(crate) fn new(n: usize) -> Slots<R> {
        let mut buf = Vec::with_capacity(n);
        // SAFETY: the capacity is at least `n`, and `MaybeUninit<R>` needs no
        // initialization: every bit pattern, including none, is a valid one.
        unsafe { buf.set_len(n) };
        Slots {
            buf,
            filled: vec![0u64; n.div_ceil(64)],
            count: 0,
        }
    }

    /// Whether every slot holds a value.
    pub(crate) fn is_full(&self) -> bool {
        self.count == self.buf.len()
    }

    /// Puts `value` in slot `i`; gives it back if `i` is out of range or the
    /// slot is taken.
    #[inline]
    pub(crate) fn put(&mut self, i: usize, value: R) -> std::result::Result<(), R> {
        if i >= self.buf.len() {
            return Err(value);
        }
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.filled[word] & bit != 0 {
            return Err(value);
        }
        self.buf[i].write(value);
        self.filled[word] |= bit;
        self.count += 1;
        Ok(())
    }

    /// The values in slot order, if every slot holds one.
    pub(crate) fn into_vec(self) -> Option<Vec<R>> {
        if !self.is_full() {
            return None;
        }
        let mut this = mem::ManuallyDrop::new(self);
        let mut buf = mem::ManuallyDrop::new(mem::take(&mut this.buf));
        // SAFETY: the bitmap is dropped with `this`'s other fields below;
        // every slot of `buf` has been written exactly once (`count` equals
        // the length and `put` refuses a second write), so its elements are
        // initialized `R`s. `MaybeUninit<R>` has the size and alignment of
        // `R`, so the pointer, length and capacity describe a valid
        // `Vec<R>` allocation, which `buf` (never dropped) no longer owns.
        let out =
            unsafe { Vec::from_raw_parts(buf.as_mut_ptr().cast::<R>(), buf.len(), buf.capacity()) };
        drop(mem::take(&mut this.filled));
        Some(out)
    }
}

impl<R> Drop for Slots<R> {
    fn drop(&mut self) {
        if !mem::needs_drop::<R>() {
            return;
        }
        for (i, slot) in self.buf.iter_mut().enumerate() {
            if self.filled[i / 64] & (1u64 << (i % 64)) != 0 {
                // SAFETY: the bit says slot `i` was written by `put` and not
                // moved out since (`into_vec` empties `buf` before it could
                // be dropped here), so it holds an initialized `R`, dropped
                // exactly once.
                unsafe { slot.assume_init_drop() };
            }
        }
    }
}

impl<R> std::fmt::Debug for Slots<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("len", &self.buf.len())
            .field("filled", &self.count)
            .finish()
    }
}

#[cfg(test)]
mod slots_tests {
    use super::Slots;
    use std::rc::Rc;

    #[test]
    fn out_of_order_fill_gives_the_values_in_slot_order() {
        let mut s = Slots::new(130);
        for i in (0..130).rev() {
            s.put(i, i * 2).unwrap();
        }
        assert_eq!(s.put(5, 0), Err(0), "a second write is refused");
        assert_eq!(s.put(130, 0), Err(0), "out of range is refused");
        let v = s.into_vec().unwrap();
        assert_eq!(v, (0..130).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn partial_slots_drop_exactly_the_values_they_hold() {
        let tracker = Rc::new(());
        let mut s = Slots::new(100);
        for i in (0..100).step_by(3) {
            s.put(i, Rc::clone(&tracker)).unwrap();
        }
        assert!(!s.is_full());
        assert_eq!(Rc::strong_count(&tracker), 35);
        drop(s);
        assert_eq!(Rc::strong_count(&tracker), 1);
        let mut s = Slots::new(2);
        s.put(0, Rc::clone(&tracker)).unwrap();
        assert!(s.into_vec().is_none(), "not full");
        assert_eq!(Rc::strong_count(&tracker), 1);
    }

    #[test]
    fn empty_slots_make_an_empty_vec() {
        let s: Slots<String> = Slots::new(0);
        assert_eq!(s.into_vec().unwrap(), Vec::<String>::new());
    }
}
