//! [`RLock`]: a robust, re-entrant lock shared between processes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::sys::{MutexKind, RobustGuard, RobustMutex};

/// A re-entrant lock shared between processes and threads
/// (`multiprocessing.RLock`), robust against holders that die.
///
/// The thread that holds it may lock it again; it is released when the last
/// of that thread's guards is dropped. Everything else is as for
/// [`Lock`](crate::Lock): a handle (clones and forked copies are the same
/// lock), taken over at once when its holder dies, with
/// [`owner_died`](RLockGuard::owner_died) on the guard that took it over.
///
/// ```
/// use multiproc::{Process, RLock};
///
/// let rlock = RLock::new()?;
/// let outer = rlock.lock()?;
/// let inner = rlock.lock()?; // the same thread: no deadlock
/// let r = rlock.clone();
/// let mut child = Process::new(move || {
///     // Another process waits until both guards are gone.
///     let _g = r.lock().unwrap();
/// });
/// child.start()?;
/// drop(inner);
/// drop(outer);
/// assert_eq!(child.join()?, 0);
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone)]
pub struct RLock {
    inner: Arc<RobustMutex>,
}

impl fmt::Debug for RLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLock").finish_non_exhaustive()
    }
}

impl RLock {
    /// A new, unlocked re-entrant lock in a fresh shared mapping.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the mapping or the mutex cannot
    /// be created.
    ///
    /// ```
    /// let rlock = multiproc::RLock::new()?;
    /// drop(rlock.lock()?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new() -> Result<RLock> {
        Ok(RLock {
            inner: Arc::new(RobustMutex::new(MutexKind::Recursive, 1, 0)?),
        })
    }

    /// Takes the lock (again, if this thread holds it), waiting for as long
    /// as it takes.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the lock is unrecoverable (a
    /// process died while taking it over from a dead holder) or was taken
    /// recursively more than 2^31 times.
    ///
    /// ```
    /// let rlock = multiproc::RLock::new()?;
    /// let a = rlock.lock()?;
    /// let b = rlock.lock()?;
    /// assert!(!a.owner_died() && !b.owner_died());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn lock(&self) -> Result<RLockGuard<'_>> {
        let raw = self.inner.lock(None)?;
        Ok(RLockGuard {
            raw: raw.ok_or_else(|| std::io::Error::other("lock returned without the lock"))?,
        })
    }

    /// Takes the lock if it is free or held by this thread: `Ok(None)` when
    /// another thread or process holds it.
    ///
    /// # Errors
    /// As for [`lock`](RLock::lock).
    ///
    /// ```
    /// let rlock = multiproc::RLock::new()?;
    /// let _a = rlock.lock()?;
    /// assert!(rlock.try_lock()?.is_some());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_lock(&self) -> Result<Option<RLockGuard<'_>>> {
        Ok(self.inner.try_lock()?.map(|raw| RLockGuard { raw }))
    }

    /// Takes the lock, waiting at most `timeout`: `Ok(None)` when another
    /// thread or process still held it at the deadline.
    ///
    /// # Errors
    /// As for [`lock`](RLock::lock).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let rlock = multiproc::RLock::new()?;
    /// let other = rlock.clone();
    /// let _held = rlock.lock()?;
    /// let got = std::thread::spawn(move || {
    ///     other.lock_timeout(Duration::from_millis(10)).map(|g| g.is_some())
    /// })
    /// .join()
    /// .unwrap()?;
    /// assert!(!got);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<RLockGuard<'_>>> {
        Ok(self
            .inner
            .lock(Some(timeout))?
            .map(|raw| RLockGuard { raw }))
    }
}

/// Holds an [`RLock`] once; dropping it undoes that one lock.
///
/// Not `Send`: the thread that locked is the one that unlocks.
///
/// ```
/// let rlock = multiproc::RLock::new()?;
/// let guard = rlock.lock()?;
/// assert!(!guard.owner_died());
/// # Ok::<(), multiproc::Error>(())
/// ```
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct RLockGuard<'a> {
    raw: RobustGuard<'a>,
}

impl RLockGuard<'_> {
    /// `true` when the previous holder died holding the lock and this guard
    /// took it over: the state the lock protects may be inconsistent.
    ///
    /// ```
    /// use multiproc::{Process, RLock};
    ///
    /// let rlock = RLock::new()?;
    /// let r = rlock.clone();
    /// let mut child = Process::new(move || {
    ///     std::mem::forget(r.lock().unwrap());
    ///     std::process::abort(); // dies holding the lock
    /// });
    /// child.start()?;
    /// assert_eq!(child.join()?, -6);
    /// assert!(rlock.lock()?.owner_died());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn owner_died(&self) -> bool {
        self.raw.owner_died()
    }
}

impl fmt::Debug for RLockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLockGuard")
            .field("owner_died", &self.owner_died())
            .finish()
    }
}
