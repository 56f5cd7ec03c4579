//! [`Semaphore`]: a counting semaphore on a futex in shared memory.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use super::Deadline;
use crate::error::Result;
use crate::sys::{futex_wait, futex_wake, SharedMapping};

const COUNT: usize = 0;
const WAITERS: usize = 4;

/// A counting semaphore shared between processes and threads
/// (`multiprocessing.Semaphore`).
///
/// [`acquire`](Semaphore::acquire) takes one unit, sleeping on a futex
/// while the count is zero; [`release`](Semaphore::release) gives one back
/// and wakes one sleeper. Any thread of any process may release, as in
/// Python. A handle: clones and forked copies share the count.
///
/// A process killed while it holds units does not give them back (a
/// semaphore has no owner), unlike a [`Lock`](crate::Lock). Nor does one
/// killed in the instant between being woken by a `release` and taking the
/// unit pass the wake-up on: another sleeper then waits for the next
/// `release` or its timeout (POSIX semaphores, under Python's, behave alike).
///
/// ```
/// use multiproc::{Process, Semaphore};
///
/// let ready = Semaphore::new(0)?;
/// let r = ready.clone();
/// let mut child = Process::new(move || r.release().unwrap());
/// child.start()?;
/// ready.acquire()?; // returns once the child released
/// assert_eq!(child.join()?, 0);
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone)]
pub struct Semaphore {
    map: Arc<SharedMapping>,
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("value", &self.value())
            .finish()
    }
}

impl Semaphore {
    /// A semaphore whose count starts at `value` (at most `u32::MAX`).
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) for a `value` above
    /// `u32::MAX`; of another kind when the mapping cannot be created.
    ///
    /// ```
    /// let s = multiproc::Semaphore::new(2)?;
    /// assert_eq!(s.value(), 2);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new(value: usize) -> Result<Semaphore> {
        let value = u32::try_from(value).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "semaphore value larger than u32::MAX",
            )
        })?;
        let map = SharedMapping::anonymous(8)?;
        map.atomic_u32(COUNT).store(value, SeqCst);
        Ok(Semaphore { map: Arc::new(map) })
    }

    fn count(&self) -> &AtomicU32 {
        self.map.atomic_u32(COUNT)
    }

    fn waiters(&self) -> &AtomicU32 {
        self.map.atomic_u32(WAITERS)
    }

    /// Takes one unit, sleeping while the count is zero.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) if the futex wait fails (it does not,
    /// short of a kernel bug).
    ///
    /// ```
    /// let s = multiproc::Semaphore::new(1)?;
    /// s.acquire()?;
    /// assert_eq!(s.value(), 0);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn acquire(&self) -> Result<()> {
        self.acquire_until(Deadline::after(None)).map(|_| ())
    }

    /// Takes one unit if the count is above zero; `Ok(false)` otherwise.
    ///
    /// # Errors
    /// None today; the `Result` leaves room for a shared state that turned
    /// out unusable.
    ///
    /// ```
    /// let s = multiproc::Semaphore::new(1)?;
    /// assert!(s.try_acquire()?);
    /// assert!(!s.try_acquire()?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_acquire(&self) -> Result<bool> {
        Ok(self.take_one())
    }

    fn take_one(&self) -> bool {
        self.count()
            .fetch_update(SeqCst, SeqCst, |c| c.checked_sub(1))
            .is_ok()
    }

    /// Takes one unit, sleeping at most `timeout` while the count is zero:
    /// `Ok(false)` when none came in time.
    ///
    /// # Errors
    /// As for [`acquire`](Semaphore::acquire).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let s = multiproc::Semaphore::new(0)?;
    /// assert!(!s.acquire_timeout(Duration::from_millis(10))?);
    /// s.release()?;
    /// assert!(s.acquire_timeout(Duration::from_millis(10))?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<bool> {
        self.acquire_until(Deadline::after(Some(timeout)))
    }

    fn acquire_until(&self, deadline: Deadline) -> Result<bool> {
        loop {
            if self.take_one() {
                return Ok(true);
            }
            let Some(left) = deadline.remaining() else {
                return Ok(false);
            };
            // Announce the sleep before re-reading the count (inside the
            // futex call): a release that adds a unit either sees the waiter
            // and wakes it, or the futex sees the unit and returns at once.
            self.waiters().fetch_add(1, SeqCst);
            let r = futex_wait(self.count(), 0, left);
            self.waiters().fetch_sub(1, SeqCst);
            r?;
        }
    }

    /// Gives one unit back and wakes one sleeper.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) when the count is
    /// already `u32::MAX`.
    ///
    /// ```
    /// let s = multiproc::Semaphore::new(0)?;
    /// s.release()?;
    /// assert_eq!(s.value(), 1);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn release(&self) -> Result<()> {
        self.count()
            .fetch_update(SeqCst, SeqCst, |c| c.checked_add(1))
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "semaphore released too many times",
                )
            })?;
        if self.waiters().load(SeqCst) > 0 {
            futex_wake(self.count(), 1);
        }
        Ok(())
    }

    /// The current count (a snapshot: other processes may change it at once).
    ///
    /// ```
    /// let s = multiproc::Semaphore::new(3)?;
    /// s.acquire()?;
    /// assert_eq!(s.value(), 2);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn value(&self) -> usize {
        self.count().load(SeqCst) as usize
    }
}
