//! Scheduling attributes of the calling thread.

use std::io;
use std::time::Duration;

/// Sets the calling thread's timer slack (`PR_SET_TIMERSLACK`): how late
/// the kernel may wake it from a sleep to batch wake-ups (50 µs by
/// default). A thread that polls with sleeps of a few microseconds sets
/// it low, or each sleep lasts the slack.
pub(crate) fn set_timer_slack(slack: Duration) -> io::Result<()> {
    let ns = u64::try_from(slack.as_nanos()).unwrap_or(u64::MAX).max(1);
    nix::sys::prctl::set_timerslack(ns as _).map_err(io::Error::from)
}
