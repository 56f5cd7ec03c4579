//! Point-to-point messages over the world communicator, and the back-off
//! that lets a rank wait for them without spinning a core.
//!
//! MPICH's blocking calls poll in a busy loop; a rank that waits for long
//! (rank 0 while the workers compute, a worker rank between jobs) must not
//! burn a core doing so. Both loops poll nonblocking (`MPI_Iprobe`). For a
//! while after the last message ([`HOT`]) they yield between polls, so a
//! reply that comes at once (an `apply`) is seen without a wake-up; then
//! they sleep, with a delay that doubles up to [`MAX_SLEEP`] (the thread's
//! timer slack lowered so that short sleeps stay short). While they sleep
//! they wait on what can wake them (the command channel on rank 0, a local
//! job's mailbox on a worker rank), so only MPI's side is polled.
//!
//! Measured on a busy 2-core machine (`benches/mpi.rs`, alternating runs):
//! yielding in the hot phase took an `apply` round trip from 640–1060 µs
//! (sleeping 15 µs between polls) to 240–390 µs, and rank 0 still used
//! about 5 % of a core over a map of sleeping tasks either way.

use std::time::{Duration, Instant};

use ::mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use ::mpi::topology::{Communicator, SimpleCommunicator};

use super::wire::TAG;
use crate::error::{Error, Result};

/// How long a loop keeps yielding, not sleeping, after its last message.
const HOT: Duration = Duration::from_millis(1);
/// The first sleep once cold.
const MIN_SLEEP: Duration = Duration::from_micros(15);
/// The longest sleep: the worst latency added to a message that arrives
/// while a rank is idle, and about a thousand cheap wake-ups a second.
pub(crate) const MAX_SLEEP: Duration = Duration::from_millis(1);

/// What to do before the next poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pause {
    /// Yield the CPU and poll again.
    Yield,
    /// Wait this long (on whatever can wake the loop).
    Sleep(Duration),
}

/// When to poll next.
#[derive(Debug)]
pub(crate) struct Backoff {
    last: Instant,
    sleep: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            last: Instant::now(),
            sleep: MIN_SLEEP,
        }
    }
}

impl Backoff {
    /// For the polling thread: lowers its timer slack so that short
    /// sleeps are short (best effort).
    pub(crate) fn for_this_thread() -> Backoff {
        let _ = crate::sys::set_timer_slack(Duration::from_micros(1));
        Backoff::default()
    }

    /// Something happened: poll eagerly again.
    pub(crate) fn reset(&mut self) {
        self.last = Instant::now();
        self.sleep = MIN_SLEEP;
    }

    /// What to do before the next poll; a sleep lasts at most `cap`.
    pub(crate) fn next(&mut self, cap: Duration) -> Pause {
        self.next_or_sleep(cap, true)
    }

    /// As [`next`](Backoff::next); without `spin`, the hot phase sleeps
    /// [`MIN_SLEEP`] instead of yielding (a stream of results that keeps
    /// the loop hot must not cost a core).
    pub(crate) fn next_or_sleep(&mut self, cap: Duration, spin: bool) -> Pause {
        if self.last.elapsed() < HOT {
            return if spin {
                Pause::Yield
            } else {
                Pause::Sleep(MIN_SLEEP.min(cap))
            };
        }
        let d = self.sleep.min(cap);
        self.sleep = (self.sleep * 2).min(MAX_SLEEP);
        Pause::Sleep(d)
    }

    /// Yields or sleeps as [`next`](Backoff::next) says.
    pub(crate) fn wait(&mut self, cap: Duration) {
        match self.next(cap) {
            Pause::Yield => std::thread::yield_now(),
            Pause::Sleep(d) => std::thread::sleep(d),
        }
    }
}

/// A message from any rank, if one is there: `(source rank, bytes)`.
pub(crate) fn try_recv_any(world: &SimpleCommunicator) -> Option<(usize, Vec<u8>)> {
    let probed = world.any_process().immediate_matched_probe_with_tag(TAG)?;
    let (bytes, status) = probed.matched_receive_vec::<u8>();
    Some((status.source_rank() as usize, bytes))
}

/// A message from `rank`, if one is there.
pub(crate) fn try_recv_from(world: &SimpleCommunicator, rank: usize) -> Option<Vec<u8>> {
    let probed = world
        .process_at_rank(rank as i32)
        .immediate_matched_probe_with_tag(TAG)?;
    Some(probed.matched_receive_vec::<u8>().0)
}

/// The next message from `rank`, waiting (without spinning) until
/// `deadline`.
///
/// # Errors
/// [`Error::Mpi`] naming `what` when nothing came in time.
pub(crate) fn recv_from(
    world: &SimpleCommunicator,
    rank: usize,
    deadline: Instant,
    what: &str,
) -> Result<Vec<u8>> {
    let mut backoff = Backoff::default();
    loop {
        if let Some(m) = try_recv_from(world, rank) {
            return Ok(m);
        }
        if Instant::now() >= deadline {
            return Err(Error::Mpi {
                reason: format!("rank {rank} sent no {what} in time"),
            });
        }
        backoff.wait(MAX_SLEEP);
    }
}

/// Sends `bytes` to `rank`, blocking until MPI has taken them (worker
/// ranks, and the handshake; rank 0's dispatcher never blocks in a send,
/// so two ranks never wait on each other's sends).
pub(crate) fn send(world: &SimpleCommunicator, rank: usize, bytes: &[u8]) {
    world.process_at_rank(rank as i32).send_with_tag(bytes, TAG);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_yields_then_sleeps_longer_up_to_the_cap() {
        let mut b = Backoff::default();
        assert_eq!(b.next(MAX_SLEEP), Pause::Yield);
        b.last = Instant::now() - 2 * HOT;
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            let Pause::Sleep(d) = b.next(MAX_SLEEP) else {
                panic!("sleeps once cold");
            };
            assert!(d >= last && d <= MAX_SLEEP);
            last = d;
        }
        assert_eq!(last, MAX_SLEEP);
        assert_eq!(
            b.next(Duration::from_micros(5)),
            Pause::Sleep(Duration::from_micros(5))
        );
        b.reset();
        assert_eq!(b.next(MAX_SLEEP), Pause::Yield);
        assert_eq!(b.next_or_sleep(MAX_SLEEP, false), Pause::Sleep(MIN_SLEEP));
    }
}
