//! Synchronization primitives shared between processes (and threads):
//! [`Lock`], [`RLock`], [`Semaphore`], [`Event`], [`Barrier`], [`Value`] and
//! [`Array`], as in Python's `multiprocessing`.
//!
//! Each handle owns (an `Arc` of) an anonymous `MAP_SHARED` mapping made when
//! the handle is created; a child forked afterwards maps the same pages, so a
//! clone captured by a [`Process`](crate::Process) closure, or a handle kept in
//! a `static` set before [`Pool::new`](crate::Pool::new), is the same object in
//! the parent and in every child. Every wait sleeps on a futex in that
//! mapping (no polling, no helper thread, no lock file), and every blocking
//! call has a variant with a timeout.
//!
//! The locks are *robust*: when a holder dies holding one (any signal,
//! `abort`, `_exit`), the next locker gets it at once and its guard reports
//! `owner_died()`, where Python's `multiprocessing.Lock` stays locked forever.
//!
//! Each object is a mapping of its own (one page, or more for a large
//! [`Array`]): fine for the tens or thousands of objects a program shares,
//! but the kernel limits a process to about 65 000 mappings
//! (`vm.max_map_count`), so keep many small values in one `Array` or
//! [`SharedMemory`](crate::SharedMemory) rather than in as many `Value`s.

mod barrier;
mod event;
mod lock;
mod rlock;
mod semaphore;
mod value;

pub use barrier::Barrier;
pub use event::Event;
pub use lock::{Lock, LockGuard};
pub use rlock::{RLock, RLockGuard};
pub use semaphore::Semaphore;
pub use value::{Array, ArrayGuard, Value, ValueGuard};

use std::time::{Duration, Instant};

/// The end of a wait: `None` for no limit (and for a timeout too large to
/// add to the clock).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Option<Instant>);

impl Deadline {
    pub(crate) fn after(timeout: Option<Duration>) -> Deadline {
        Deadline(timeout.and_then(|d| Instant::now().checked_add(d)))
    }

    /// What is left: `Some(None)` without a limit, `Some(Some(d))` with `d`
    /// left, `None` once the deadline passed.
    pub(crate) fn remaining(&self) -> Option<Option<Duration>> {
        match self.0 {
            None => Some(None),
            Some(end) => {
                let left = end.saturating_duration_since(Instant::now());
                (!left.is_zero()).then_some(Some(left))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines() {
        assert_eq!(Deadline::after(None).remaining(), Some(None));
        assert_eq!(Deadline::after(Some(Duration::MAX)).remaining(), Some(None));
        assert_eq!(Deadline::after(Some(Duration::ZERO)).remaining(), None);
        let left = Deadline::after(Some(Duration::from_secs(100)))
            .remaining()
            .unwrap()
            .unwrap();
        assert!(left <= Duration::from_secs(100) && left > Duration::from_secs(50));
    }
}
