//! [`Lock`]: a robust mutex shared between processes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::sys::{MutexKind, RobustGuard, RobustMutex};

/// A mutual-exclusion lock shared between processes and threads
/// (`multiprocessing.Lock`), robust against holders that die.
///
/// A `Lock` is a handle: clones, and copies inherited through `fork`, are
/// the same lock. It is held by one thread of one process at a time, and
/// released when its [`LockGuard`] is dropped.
///
/// When the holder dies holding it (killed by any signal, `abort`, `_exit`,
/// or a thread that exits), the next [`lock`](Lock::lock) takes it over at
/// once and its guard's [`owner_died`](LockGuard::owner_died) is `true`:
/// whatever the lock protected may be half-updated. Python's `Lock` stays
/// locked forever in that case.
///
/// Unlike Python's `Lock`, it is owned: only the thread that locked it
/// unlocks it (by dropping the guard), and a second `lock` from the holding
/// thread is an error instead of a deadlock. Use [`RLock`](crate::RLock) to
/// lock again from the holding thread.
///
/// ```
/// use multiproc::{Lock, Process};
///
/// let lock = Lock::new()?;
/// let child_lock = lock.clone();
/// let guard = lock.lock()?;
/// let mut child = Process::new(move || {
///     // Blocks until the parent drops its guard.
///     let _g = child_lock.lock().unwrap();
/// });
/// child.start()?;
/// drop(guard);
/// assert_eq!(child.join()?, 0);
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Clone)]
#[doc(alias = "Mutex")]
pub struct Lock {
    inner: Arc<RobustMutex>,
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock").finish_non_exhaustive()
    }
}

impl Lock {
    /// A new, unlocked lock in a fresh shared mapping.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the mapping or the mutex cannot
    /// be created.
    ///
    /// ```
    /// let lock = multiproc::Lock::new()?;
    /// drop(lock.lock()?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new() -> Result<Lock> {
        Ok(Lock {
            inner: Arc::new(RobustMutex::new(MutexKind::ErrorCheck, 1, 0)?),
        })
    }

    /// Takes the lock, waiting for as long as it takes.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`Deadlock`](std::io::ErrorKind::Deadlock) when the calling thread
    /// already holds it; of another kind when the lock is unrecoverable (a
    /// process died while taking it over from a dead holder).
    ///
    /// ```
    /// let lock = multiproc::Lock::new()?;
    /// let guard = lock.lock()?;
    /// assert!(!guard.owner_died());
    /// assert!(lock.lock().is_err()); // already held by this thread
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[inline]
    pub fn lock(&self) -> Result<LockGuard<'_>> {
        let raw = self.inner.lock(None)?;
        // Without a timeout, a lock call returns only once it holds the lock.
        Ok(LockGuard {
            raw: raw.ok_or_else(|| std::io::Error::other("lock returned without the lock"))?,
        })
    }

    /// Takes the lock if it is free: `Ok(None)` when another thread or
    /// process holds it, or the calling thread itself does.
    ///
    /// # Errors
    /// As for [`lock`](Lock::lock).
    ///
    /// ```
    /// let lock = multiproc::Lock::new()?;
    /// let guard = lock.try_lock()?;
    /// assert!(guard.is_some());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[inline]
    pub fn try_lock(&self) -> Result<Option<LockGuard<'_>>> {
        Ok(self.inner.try_lock()?.map(|raw| LockGuard { raw }))
    }

    /// Takes the lock, waiting at most `timeout`: `Ok(None)` when it was
    /// still held at the deadline.
    ///
    /// # Errors
    /// As for [`lock`](Lock::lock).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let lock = multiproc::Lock::new()?;
    /// let other = lock.clone();
    /// let _held = lock.lock()?;
    /// let got = std::thread::spawn(move || {
    ///     other.lock_timeout(Duration::from_millis(10)).map(|g| g.is_some())
    /// })
    /// .join()
    /// .unwrap()?;
    /// assert!(!got);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<LockGuard<'_>>> {
        Ok(self.inner.lock(Some(timeout))?.map(|raw| LockGuard { raw }))
    }
}

/// Holds a [`Lock`]; dropping it unlocks.
///
/// Not `Send`: the thread that locked is the one that unlocks.
///
/// ```
/// let lock = multiproc::Lock::new()?;
/// {
///     let _guard = lock.lock()?;
///     assert!(lock.try_lock()?.is_none() || true);
/// } // unlocked here
/// assert!(lock.try_lock()?.is_some());
/// # Ok::<(), multiproc::Error>(())
/// ```
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a> {
    raw: RobustGuard<'a>,
}

impl LockGuard<'_> {
    /// `true` when the previous holder died holding the lock and this guard
    /// took it over: the state the lock protects may be inconsistent.
    ///
    /// ```
    /// use multiproc::{Lock, Process};
    ///
    /// let lock = Lock::new()?;
    /// let l = lock.clone();
    /// let mut child = Process::new(move || {
    ///     let g = l.lock().unwrap();
    ///     std::mem::forget(g);
    ///     std::process::abort(); // dies holding the lock
    /// });
    /// child.start()?;
    /// assert_eq!(child.join()?, -6);
    /// let guard = lock.lock()?;
    /// assert!(guard.owner_died());
    /// drop(guard);
    /// assert!(!lock.lock()?.owner_died());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn owner_died(&self) -> bool {
        self.raw.owner_died()
    }
}

impl fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("owner_died", &self.owner_died())
            .finish()
    }
}
