//! Clocks.

use nix::libc;

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
