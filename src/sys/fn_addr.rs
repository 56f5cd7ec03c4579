//! Function addresses carried across `fork`: a forked child runs the same
//! image at the same addresses, so a plain `fn` pointer's address names the
//! same function there. The pool sends its task functions and trampolines
//! to its workers this way.

use std::any::Any;
use std::mem;

/// The signature of the pool's monomorphized trampolines: `(the user's
/// function address, the decoded context, the raw context, the chunk's
/// remaining item bytes, their fixed-width kind (0: postcard), the output
/// buffer and its frame's value encoding, or `None` to skip the item)` ->
/// `Ok(true)` for a plain value entry, `Ok(false)` for a footer entry (a
/// panic, or a value outside the frame's encoding), `Err(message)` when an
/// input item cannot be decoded. Defined here because its address crosses
/// `fork` (see [`fn_from_addr`]); it names no type of the layers above.
pub(crate) type Trampoline = fn(
    usize,
    &mut Option<Box<dyn Any>>,
    Option<&[u8]>,
    &mut &[u8],
    u8,
    Option<(&mut Vec<u8>, &mut u8)>,
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
