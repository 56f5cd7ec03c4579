//! [`Barrier`]: a rendezvous of a fixed number of parties, reusable.
//!
//! The state is one `AtomicU64`, changed only by compare-and-swap:
//! `broken` (bit 63), the round number (bits 32..63) and the arrivals of
//! the current round (bits 0..32). The last arrival of a round swaps in the
//! next round with no arrivals; so a process that arrives late (more
//! processes than parties) counts towards the next round, as in Python.
//! Waiters sleep on a separate 32-bit sequence number that every change they
//! wait for (end of the round, break) increments before waking them all:
//! read the number, check the state, sleep while the number is unchanged.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use super::Deadline;
use crate::error::{Error, Result};
use crate::sys::{futex_wait, futex_wake, SharedMapping};

const STATE: usize = 0;
const SEQ: usize = 8;

const BROKEN: u64 = 1 << 63;
const ROUND_MASK: u64 = (1 << 31) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    broken: bool,
    round: u64,
    arrived: u64,
}

impl State {
    fn unpack(s: u64) -> State {
        State {
            broken: s & BROKEN != 0,
            round: (s >> 32) & ROUND_MASK,
            arrived: s & u64::from(u32::MAX),
        }
    }

    fn pack(self) -> u64 {
        (if self.broken { BROKEN } else { 0 }) | ((self.round & ROUND_MASK) << 32) | self.arrived
    }
}

/// A rendezvous point for a fixed number of parties, in any processes and
/// threads (`multiprocessing.Barrier`); reusable round after round.
///
/// Each [`wait`](Barrier::wait) returns once `parties` calls arrived in the
/// round, with an arrival index: the indices of one round are `0..parties`,
/// each given once (Python's return value). A [`wait_timeout`] that times
/// out *breaks* the barrier: the others waiting in that round, and every
/// later wait, get [`Error::BrokenBarrier`], as Python's
/// `BrokenBarrierError`.
///
/// A party that dies in the barrier does not break it; the others wait for
/// it until their timeouts.
///
/// [`wait_timeout`]: Barrier::wait_timeout
///
/// ```
/// use multiproc::{Barrier, Process};
///
/// let barrier = Barrier::new(2)?;
/// let b = barrier.clone();
/// let mut child = Process::new(move || {
///     b.wait().unwrap();
/// });
/// child.start()?;
/// let index = barrier.wait()?; // returns once the child arrived too
/// assert!(index < 2);
/// assert_eq!(child.join()?, 0);
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone)]
pub struct Barrier {
    map: Arc<SharedMapping>,
    parties: u64,
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("parties", &self.parties)
            .field("n_waiting", &self.n_waiting())
            .field("broken", &self.is_broken())
            .finish()
    }
}

impl Barrier {
    /// A barrier for `parties` parties (at least 1, at most `u32::MAX`).
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) for `0` or more than
    /// `u32::MAX` parties; of another kind when the mapping cannot be created.
    ///
    /// ```
    /// assert!(multiproc::Barrier::new(0).is_err());
    /// let b = multiproc::Barrier::new(1)?;
    /// assert_eq!(b.wait()?, 0);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new(parties: usize) -> Result<Barrier> {
        if parties == 0 || parties > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a barrier needs between 1 and u32::MAX parties",
            )
            .into());
        }
        Ok(Barrier {
            map: Arc::new(SharedMapping::anonymous(16)?),
            parties: parties as u64,
        })
    }

    fn state(&self) -> &AtomicU64 {
        self.map.atomic_u64(STATE)
    }

    fn seq(&self) -> &AtomicU32 {
        self.map.atomic_u32(SEQ)
    }

    fn wake_all(&self) {
        self.seq().fetch_add(1, SeqCst);
        futex_wake(self.seq(), u32::MAX);
    }

    /// Waits until `parties` calls arrived in this round; returns this
    /// call's arrival index (`0..parties`, distinct within a round).
    ///
    /// # Errors
    /// [`Error::BrokenBarrier`] when the barrier is or gets broken while
    /// waiting; [`Error::Io`](crate::Error::Io) if the futex wait fails.
    ///
    /// ```
    /// let b = multiproc::Barrier::new(1)?;
    /// assert_eq!(b.wait()?, 0);
    /// assert_eq!(b.wait()?, 0); // a new round
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn wait(&self) -> Result<usize> {
        let index = self.wait_until(Deadline::after(None))?;
        // Without a deadline a wait ends by passing or by an Err.
        index.ok_or(Error::Timeout)
    }

    /// Waits at most `timeout` for the round to fill: `Ok(Some(index))` as
    /// for [`wait`](Barrier::wait), `Ok(None)` on a timeout, which breaks
    /// the barrier for the others waiting and for every later wait.
    ///
    /// # Errors
    /// As for [`wait`](Barrier::wait).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let b = multiproc::Barrier::new(2)?;
    /// assert_eq!(b.wait_timeout(Duration::from_millis(10))?, None);
    /// assert!(b.is_broken());
    /// assert!(b.wait().unwrap_err().is_broken_barrier());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<usize>> {
        self.wait_until(Deadline::after(Some(timeout)))
    }

    fn wait_until(&self, deadline: Deadline) -> Result<Option<usize>> {
        // Arrive.
        let (round, index) = loop {
            let raw = self.state().load(SeqCst);
            let s = State::unpack(raw);
            if s.broken {
                return Err(Error::BrokenBarrier);
            }
            let last = s.arrived + 1 == self.parties;
            let next = if last {
                State {
                    broken: false,
                    round: (s.round + 1) & ROUND_MASK,
                    arrived: 0,
                }
            } else {
                State {
                    arrived: s.arrived + 1,
                    ..s
                }
            };
            if self
                .state()
                .compare_exchange(raw, next.pack(), SeqCst, SeqCst)
                .is_ok()
            {
                if last {
                    self.wake_all();
                    return Ok(Some(s.arrived as usize));
                }
                break (s.round, s.arrived as usize);
            }
        };
        // Wait for the end of our round (or a break).
        loop {
            let seq = self.seq().load(SeqCst);
            let raw = self.state().load(SeqCst);
            let s = State::unpack(raw);
            if s.round != round {
                return Ok(Some(index));
            }
            if s.broken {
                return Err(Error::BrokenBarrier);
            }
            let Some(left) = deadline.remaining() else {
                // Time is up: break the round, unless it just ended.
                let broken = State { broken: true, ..s };
                if self
                    .state()
                    .compare_exchange(raw, broken.pack(), SeqCst, SeqCst)
                    .is_ok()
                {
                    self.wake_all();
                    return Ok(None);
                }
                continue;
            };
            futex_wait(self.seq(), seq, left)?;
        }
    }

    /// Breaks the barrier (Python's `abort`): every party waiting now, and
    /// every later wait, gets [`Error::BrokenBarrier`].
    ///
    /// ```
    /// let b = multiproc::Barrier::new(3)?;
    /// b.abort();
    /// assert!(b.wait().unwrap_err().is_broken_barrier());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn abort(&self) {
        self.state().fetch_or(BROKEN, SeqCst);
        self.wake_all();
    }

    /// Whether the barrier is broken.
    ///
    /// ```
    /// let b = multiproc::Barrier::new(2)?;
    /// assert!(!b.is_broken());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn is_broken(&self) -> bool {
        State::unpack(self.state().load(SeqCst)).broken
    }

    /// The number of parties a round needs.
    ///
    /// ```
    /// assert_eq!(multiproc::Barrier::new(4)?.parties(), 4);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn parties(&self) -> usize {
        self.parties as usize
    }

    /// The parties waiting in the current round (a snapshot).
    ///
    /// ```
    /// assert_eq!(multiproc::Barrier::new(4)?.n_waiting(), 0);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn n_waiting(&self) -> usize {
        State::unpack(self.state().load(SeqCst)).arrived as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips() {
        for s in [
            State {
                broken: false,
                round: 0,
                arrived: 0,
            },
            State {
                broken: true,
                round: ROUND_MASK,
                arrived: u64::from(u32::MAX),
            },
            State {
                broken: false,
                round: 12345,
                arrived: 7,
            },
        ] {
            assert_eq!(State::unpack(s.pack()), s);
        }
    }

    #[test]
    fn threads_get_distinct_indices_each_round() {
        let b = Barrier::new(3).unwrap();
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|_| b.wait_timeout(Duration::from_secs(20)).unwrap().unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Vec<usize>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for round in 0..50 {
            let mut idx: Vec<usize> = all.iter().map(|v| v[round]).collect();
            idx.sort();
            assert_eq!(idx, vec![0, 1, 2], "round {round}");
        }
    }
}
