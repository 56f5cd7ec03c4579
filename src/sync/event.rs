//! [`Event`]: a flag that processes can wait for.

use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use super::Deadline;
use crate::error::Result;
use crate::sys::{futex_wait, futex_wake, SharedMapping};

/// The futex word: bit 0 is the flag; the bits above count the `set`s that
/// raised it (wrapping), so that a waiter woken by a `set` returns `true`
/// even if a `clear` came before it ran (as Python's `Event.wait` does).
const WORD: usize = 0;
const WAITERS: usize = 4;
const FLAG: u32 = 1;

/// A flag shared between processes and threads that they can wait for
/// (`multiprocessing.Event`).
///
/// [`set`](Event::set) raises it and wakes every waiter, in every process;
/// [`clear`](Event::clear) lowers it. A handle: clones and forked copies are
/// the same event.
///
/// ```
/// use multiproc::{Event, Process};
/// use std::time::Duration;
///
/// let go = Event::new()?;
/// let g = go.clone();
/// let mut child = Process::new(move || {
///     let started = g.wait(Some(Duration::from_secs(10))).unwrap();
///     multiproc::exit(if started { 0 } else { 1 });
/// });
/// child.start()?;
/// go.set();
/// assert_eq!(child.join()?, 0);
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone)]
pub struct Event {
    map: Arc<SharedMapping>,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("is_set", &self.is_set())
            .finish()
    }
}

impl Event {
    /// A new event, not set.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the mapping cannot be created.
    ///
    /// ```
    /// let e = multiproc::Event::new()?;
    /// assert!(!e.is_set());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new() -> Result<Event> {
        Ok(Event {
            map: Arc::new(SharedMapping::anonymous(8)?),
        })
    }

    fn word(&self) -> &AtomicU32 {
        self.map.atomic_u32(WORD)
    }

    fn waiters(&self) -> &AtomicU32 {
        self.map.atomic_u32(WAITERS)
    }

    /// Raises the flag and wakes every waiter.
    ///
    /// ```
    /// let e = multiproc::Event::new()?;
    /// e.set();
    /// assert!(e.is_set());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn set(&self) {
        let raised = self
            .word()
            .fetch_update(SeqCst, SeqCst, |w| {
                (w & FLAG == 0).then(|| (w | FLAG).wrapping_add(2))
            })
            .is_ok();
        if raised && self.waiters().load(SeqCst) > 0 {
            futex_wake(self.word(), u32::MAX);
        }
    }

    /// Lowers the flag: later [`wait`](Event::wait)s sleep until the next
    /// [`set`](Event::set).
    ///
    /// ```
    /// let e = multiproc::Event::new()?;
    /// e.set();
    /// e.clear();
    /// assert!(!e.is_set());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn clear(&self) {
        self.word().fetch_and(!FLAG, SeqCst);
    }

    /// Whether the flag is raised.
    ///
    /// ```
    /// let e = multiproc::Event::new()?;
    /// assert!(!e.is_set());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn is_set(&self) -> bool {
        self.word().load(SeqCst) & FLAG != 0
    }

    /// Sleeps until the flag is raised, at most `timeout` (`None`: no
    /// limit). Returns whether it is raised: `false` only on a timeout.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) if the futex wait fails (it does not,
    /// short of a kernel bug).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let e = multiproc::Event::new()?;
    /// assert!(!e.wait(Some(Duration::from_millis(10)))?);
    /// e.set();
    /// assert!(e.wait(None)?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        let deadline = Deadline::after(timeout);
        let start = self.word().load(SeqCst);
        if start & FLAG != 0 {
            return Ok(true);
        }
        loop {
            let Some(left) = deadline.remaining() else {
                return Ok(self.is_set());
            };
            // Announce the sleep, then sleep only while the word is still
            // `start`: a `set` in between either sees the waiter or fails the
            // futex's value check.
            self.waiters().fetch_add(1, SeqCst);
            let r = futex_wait(self.word(), start, left);
            self.waiters().fetch_sub(1, SeqCst);
            r?;
            let now = self.word().load(SeqCst);
            // Raised now, or raised (and maybe cleared) since we started.
            if now & FLAG != 0 || now >> 1 != start >> 1 {
                return Ok(true);
            }
        }
    }
}
