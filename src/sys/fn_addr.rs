//! Function addresses carried across `fork`: a forked child runs the same
//! image at the same addresses, so a plain `fn` pointer's address names the
//! same function there. The pool sends its task functions and trampolines
//! to its workers this way, and the fork server's callers (a fork of the
//! same image, or the image it is a fork of) name the code its children run.

use std::any::Any;
use std::mem;
use std::os::fd::OwnedFd;

/// The signature of the pool's monomorphized trampolines: `(the user's
/// function address, the decoded context, the raw context, the chunk's
/// remaining item bytes, their fixed-width kind (0: postcard), the batch
/// to run (where result entries go, how many items, the worker's counters),
/// or `None` to decode and skip one item)` -> `Err(message)` when an input
/// item cannot be decoded. Defined here because its address crosses `fork`
/// (see [`fn_from_addr`]); its one argument of the pool's own type is the
/// batch.
pub(crate) type Trampoline = fn(
    usize,
    &mut Option<Box<dyn Any>>,
    Option<&[u8]>,
    &mut &[u8],
    u8,
    Option<&mut crate::pool::Batch<'_>>,
) -> Result<(), String>;

/// The signature of a fork-server task's trampoline: `(the user's function
/// address, the encoded argument) -> exit code`.
pub(crate) type TaskTrampoline = fn(usize, &[u8]) -> i32;

/// What a child of the fork server runs right after the fork: `(the
/// request's payload, its fds, the server's pid) -> exit code`. The layer
/// that asks for the child names it by address (the server is a fork of
/// the same image), so the server knows no layer above it.
pub(crate) type ServerRunner = fn(&[u8], Vec<OwnedFd>, u32) -> i32;

/// Makes the target of a child of the fork server from its job's bytes and
/// fds (a task, a pool worker): `(job, fds) -> target`.
pub(crate) type JobMain = fn(&[u8], Vec<OwnedFd>) -> Box<dyn FnOnce() + Send + 'static>;

mod sealed {
    pub(crate) trait Sealed {}
}

/// Function pointer types whose address may be sent to a forked worker.
/// Only plain `fn` pointers implement it: they are pointer-sized and point at
/// code, which a fork shares with its parent.
pub(crate) trait FnPointer: Copy + sealed::Sealed {}

impl<R> sealed::Sealed for fn() -> R {}
impl<R> FnPointer for fn() -> R {}
impl<A, R> sealed::Sealed for fn(A) -> R {}
impl<A, R> FnPointer for fn(A) -> R {}
impl<C, A, R> sealed::Sealed for fn(&C, A) -> R {}
impl<C, A, R> FnPointer for fn(&C, A) -> R {}
impl sealed::Sealed for Trampoline {}
impl FnPointer for Trampoline {}
impl sealed::Sealed for TaskTrampoline {}
impl FnPointer for TaskTrampoline {}
impl sealed::Sealed for ServerRunner {}
impl FnPointer for ServerRunner {}
impl sealed::Sealed for JobMain {}
impl FnPointer for JobMain {}

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
/// same `F`, either in this process or in a process of the same image that
/// this one is a `fork` of or that is a `fork` of this one (no exec between:
/// the fork server and its caller), or on another MPI rank, as an offset
/// from `mpi::image`'s anchor function that `mpi::image::addr_of` turned
/// back into an address here, checked to lie in the executable's code, the
/// ranks' executables being byte-identical (the handshake's checksum). The
/// crate sends such addresses and offsets only over its private channels:
/// the pool's dispatcher to its workers, a caller to its fork server, rank 0
/// to the worker ranks.
pub(crate) fn fn_from_addr<F: FnPointer>(addr: usize) -> F {
    const { assert!(mem::size_of::<F>() == mem::size_of::<usize>()) };
    // SAFETY: by the contract above `addr` is the address of a function of
    // type `F` in a process that shares our image through fork (no exec),
    // which runs the same executable mapped at the same addresses, or the
    // same function's offset from a common anchor in a byte-identical
    // executable, added to the anchor's address here: either way it names
    // the same function here. fn pointers are never null, and `addr` came
    // from one.
    unsafe { mem::transmute_copy::<usize, F>(&addr) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(x: u64) -> u64 {
        x * 2
    }

    #[test]
    fn fn_address_round_trip() {
        let addr = fn_addr(double as fn(u64) -> u64);
        let f: fn(u64) -> u64 = fn_from_addr(addr);
        assert_eq!(f(21), 42);
    }
}
