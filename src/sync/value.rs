//! [`Value`] and [`Array`]: plain data in shared memory behind a robust lock.
//!
//! The lock and the data share one mapping: the robust lock (64 bytes),
//! then the bytes of the `T` (or of the `[T]`), aligned for `T`. The data is
//! only ever reached through a guard of that lock (`get`, `set` and `update`
//! take it too), so every access in every process is exclusive. `T: Pod`
//! makes any bytes a valid `T`: whatever a process that died half-way
//! through a write left behind is still a `T`, and the guard that takes the
//! lock over says so with `owner_died()`.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::mem;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use bytemuck::Pod;

use crate::error::Result;
use crate::sys::{MutexKind, RobustGuard, RobustMutex};

fn lock_or_panic<'a>(m: &'a RobustMutex, what: &str) -> RobustGuard<'a> {
    match m.lock(None) {
        Ok(Some(g)) => g,
        Ok(None) => unreachable!("a lock without a timeout returned without the lock"),
        Err(e) => panic!("{what}: {e} (use lock() to get this as an Err)"),
    }
}

/// One `T` in shared memory, behind a robust lock (`multiprocessing.Value`).
///
/// [`get`](Value::get), [`set`](Value::set) and [`update`](Value::update)
/// each take the lock for one access; [`lock`](Value::lock) holds it for
/// longer, with [`ValueGuard::owner_died`] when a holder died half-way.
/// A handle: clones and forked copies are the same value. Each `Value` is
/// one page of memory.
///
/// ```
/// use multiproc::{Process, Value};
///
/// let counter = Value::new(0u64)?;
/// let mut children = Vec::new();
/// for _ in 0..4 {
///     let c = counter.clone();
///     let mut p = Process::new(move || {
///         for _ in 0..100 {
///             c.update(|n| *n += 1);
///         }
///     });
///     p.start()?;
///     children.push(p);
/// }
/// for p in &children {
///     assert_eq!(p.join()?, 0);
/// }
/// assert_eq!(counter.get(), 400);
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// A pool task is a plain `fn`: it finds the value through a `static`
/// set before the pool forks its workers.
///
/// ```
/// use multiproc::{Pool, Value};
/// use std::sync::OnceLock;
///
/// static TOTAL: OnceLock<Value<u64>> = OnceLock::new();
///
/// fn add(x: u64) -> u64 {
///     TOTAL.get().expect("set before the pool").update(|t| *t += x);
///     x
/// }
///
/// TOTAL.set(Value::new(0)?).unwrap();
/// let pool = Pool::new(2)?;
/// pool.map(add, 1..=10u64)?;
/// assert_eq!(TOTAL.get().unwrap().get(), 55);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Value<T> {
    inner: Arc<RobustMutex>,
    _t: PhantomData<T>,
}

impl<T> Clone for Value<T> {
    fn clone(&self) -> Self {
        Value {
            inner: Arc::clone(&self.inner),
            _t: PhantomData,
        }
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for Value<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Value");
        match self.inner.try_lock() {
            Ok(Some(g)) => d.field("value", bytemuck::from_bytes::<T>(g.payload())),
            _ => d.field("value", &format_args!("<locked>")),
        };
        d.finish()
    }
}

impl<T: Pod> Value<T> {
    /// A new value holding `v`, in a fresh shared mapping.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the mapping or its lock cannot be
    /// created (or `T` needs an alignment above 4096).
    ///
    /// ```
    /// let v = multiproc::Value::new(1.5f64)?;
    /// assert_eq!(v.get(), 1.5);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new(v: T) -> Result<Value<T>> {
        let inner = RobustMutex::new(
            MutexKind::ErrorCheck,
            mem::align_of::<T>(),
            mem::size_of::<T>(),
        )?;
        {
            let mut g = inner
                .try_lock()?
                .ok_or_else(|| io::Error::other("a new lock was held"))?;
            g.payload_mut().copy_from_slice(bytemuck::bytes_of(&v));
        }
        Ok(Value {
            inner: Arc::new(inner),
            _t: PhantomData,
        })
    }

    /// The value (a copy, read under the lock).
    ///
    /// # Panics
    /// When the lock cannot be taken: the calling thread holds this value's
    /// [`ValueGuard`] (use the guard instead), or the lock is unrecoverable
    /// (see [`Lock`](crate::Lock)). [`lock`](Value::lock) returns these as
    /// errors.
    ///
    /// ```
    /// let v = multiproc::Value::new(7i32)?;
    /// assert_eq!(v.get(), 7);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get(&self) -> T {
        let g = lock_or_panic(&self.inner, "Value::get");
        *bytemuck::from_bytes(g.payload())
    }

    /// Replaces the value (under the lock).
    ///
    /// # Panics
    /// As for [`get`](Value::get).
    ///
    /// ```
    /// let v = multiproc::Value::new(7i32)?;
    /// v.set(8);
    /// assert_eq!(v.get(), 8);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn set(&self, v: T) {
        let mut g = lock_or_panic(&self.inner, "Value::set");
        g.payload_mut().copy_from_slice(bytemuck::bytes_of(&v));
    }

    /// Runs `f` on the value under the lock: a read-modify-write that no
    /// other process or thread interleaves with.
    ///
    /// # Panics
    /// As for [`get`](Value::get), and when `f` panics (the lock is released
    /// on the way out).
    ///
    /// ```
    /// let v = multiproc::Value::new(1u32)?;
    /// v.update(|x| *x *= 10);
    /// assert_eq!(v.get(), 10);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn update(&self, f: impl FnOnce(&mut T)) {
        let mut g = lock_or_panic(&self.inner, "Value::update");
        f(bytemuck::from_bytes_mut(g.payload_mut()));
    }

    /// Takes the value's lock and gives access to the value until the guard
    /// is dropped.
    ///
    /// # Errors
    /// As for [`Lock::lock`](crate::Lock::lock): a second guard in the same
    /// thread is an error of kind [`Deadlock`](io::ErrorKind::Deadlock).
    ///
    /// ```
    /// let v = multiproc::Value::new([0u8; 4])?;
    /// {
    ///     let mut g = v.lock()?;
    ///     g[0] = 1;
    ///     g[3] = 4;
    /// }
    /// assert_eq!(v.get(), [1, 0, 0, 4]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn lock(&self) -> Result<ValueGuard<'_, T>> {
        let raw = self
            .inner
            .lock(None)?
            .ok_or_else(|| io::Error::other("lock returned without the lock"))?;
        Ok(ValueGuard {
            raw,
            _t: PhantomData,
        })
    }

    /// Takes the value's lock if it is free: `Ok(None)` when another thread
    /// or process holds it, or the calling thread itself does.
    ///
    /// # Errors
    /// As for [`lock`](Value::lock).
    ///
    /// ```
    /// let v = multiproc::Value::new(1u8)?;
    /// let g = v.try_lock()?.expect("free");
    /// assert!(v.try_lock()?.is_none());
    /// drop(g);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_lock(&self) -> Result<Option<ValueGuard<'_, T>>> {
        Ok(self.inner.try_lock()?.map(|raw| ValueGuard {
            raw,
            _t: PhantomData,
        }))
    }

    /// Takes the value's lock, waiting at most `timeout`: `Ok(None)` when it
    /// was still held at the deadline.
    ///
    /// # Errors
    /// As for [`lock`](Value::lock).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let v = multiproc::Value::new(1u8)?;
    /// let mut g = v.lock_timeout(Duration::from_secs(1))?.expect("free");
    /// *g = 2;
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<ValueGuard<'_, T>>> {
        Ok(self.inner.lock(Some(timeout))?.map(|raw| ValueGuard {
            raw,
            _t: PhantomData,
        }))
    }
}

/// Holds a [`Value`]'s lock; derefs to the value. Dropping it unlocks.
///
/// ```
/// let v = multiproc::Value::new(5u64)?;
/// let mut g = v.lock()?;
/// *g += 1;
/// assert_eq!(*g, 6);
/// assert!(!g.owner_died());
/// # Ok::<(), multiproc::Error>(())
/// ```
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ValueGuard<'a, T> {
    raw: RobustGuard<'a>,
    _t: PhantomData<&'a mut T>,
}

impl<T> ValueGuard<'_, T> {
    /// `true` when the previous holder died holding the lock: the value may
    /// be half-written (still a valid `T`, since `T: Pod`).
    ///
    /// ```
    /// use multiproc::{Process, Value};
    ///
    /// let v = Value::new(0u64)?;
    /// let c = v.clone();
    /// let mut child = Process::new(move || {
    ///     let mut g = c.lock().unwrap();
    ///     *g = 42;
    ///     std::process::abort(); // dies holding the lock
    /// });
    /// child.start()?;
    /// assert_eq!(child.join()?, -6);
    /// let g = v.lock()?;
    /// assert!(g.owner_died());
    /// assert_eq!(*g, 42);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn owner_died(&self) -> bool {
        self.raw.owner_died()
    }
}

impl<T: Pod> Deref for ValueGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        bytemuck::from_bytes(self.raw.payload())
    }
}

impl<T: Pod> DerefMut for ValueGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        bytemuck::from_bytes_mut(self.raw.payload_mut())
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ValueGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValueGuard")
            .field("value", &**self)
            .field("owner_died", &self.owner_died())
            .finish()
    }
}

/// A fixed-length array of `T` in shared memory, behind a robust lock
/// (`multiprocessing.Array`).
///
/// A handle: clones and forked copies are the same array.
///
/// ```
/// use multiproc::{Array, Process};
///
/// let squares = Array::<u32>::new(8)?;
/// let a = squares.clone();
/// let mut child = Process::new(move || {
///     let mut g = a.lock().unwrap();
///     for (i, x) in g.iter_mut().enumerate() {
///         *x = (i * i) as u32;
///     }
/// });
/// child.start()?;
/// assert_eq!(child.join()?, 0);
/// assert_eq!(squares.to_vec(), [0, 1, 4, 9, 16, 25, 36, 49]);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Array<T> {
    inner: Arc<RobustMutex>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for Array<T> {
    fn clone(&self) -> Self {
        Array {
            inner: Arc::clone(&self.inner),
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Array<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<T: Pod> Array<T> {
    /// An array of `len` zeroed elements, in a fresh shared mapping.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) of kind
    /// [`InvalidInput`](io::ErrorKind::InvalidInput) when `T` is zero-sized
    /// or the size overflows; of another kind when the mapping cannot be
    /// created.
    ///
    /// ```
    /// let a = multiproc::Array::<f64>::new(3)?;
    /// assert_eq!(a.to_vec(), [0.0, 0.0, 0.0]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new(len: usize) -> Result<Array<T>> {
        let invalid = |m| io::Error::new(io::ErrorKind::InvalidInput, m);
        if mem::size_of::<T>() == 0 {
            return Err(invalid("array of a zero-sized type").into());
        }
        let bytes = len
            .checked_mul(mem::size_of::<T>())
            .filter(|&b| b <= isize::MAX as usize / 2)
            .ok_or_else(|| invalid("array too large"))?;
        let inner = RobustMutex::new(MutexKind::ErrorCheck, mem::align_of::<T>(), bytes)?;
        Ok(Array {
            inner: Arc::new(inner),
            len,
            _t: PhantomData,
        })
    }

    /// An array holding a copy of `items`.
    ///
    /// # Errors
    /// As for [`new`](Array::new).
    ///
    /// ```
    /// let a = multiproc::Array::from_slice(&[1u8, 2, 3])?;
    /// assert_eq!(a.len(), 3);
    /// assert_eq!(a.to_vec(), [1, 2, 3]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn from_slice(items: &[T]) -> Result<Array<T>> {
        let a = Array::new(items.len())?;
        a.lock()?.copy_from_slice(items);
        Ok(a)
    }

    /// The number of elements.
    ///
    /// ```
    /// assert_eq!(multiproc::Array::<u16>::new(5)?.len(), 5);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the array has no elements.
    ///
    /// ```
    /// assert!(multiproc::Array::<u16>::new(0)?.is_empty());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the elements, read under the lock.
    ///
    /// # Panics
    /// As for [`Value::get`]: when the calling thread holds this array's
    /// [`ArrayGuard`], or the lock is unrecoverable.
    ///
    /// ```
    /// let a = multiproc::Array::from_slice(&[4i64, 5])?;
    /// assert_eq!(a.to_vec(), vec![4, 5]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn to_vec(&self) -> Vec<T> {
        let g = lock_or_panic(&self.inner, "Array::to_vec");
        bytemuck::cast_slice(g.payload()).to_vec()
    }

    /// Takes the array's lock and gives access to the elements until the
    /// guard is dropped.
    ///
    /// # Errors
    /// As for [`Value::lock`].
    ///
    /// ```
    /// let a = multiproc::Array::<u8>::new(4)?;
    /// a.lock()?.fill(9);
    /// assert_eq!(a.to_vec(), [9, 9, 9, 9]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn lock(&self) -> Result<ArrayGuard<'_, T>> {
        let raw = self
            .inner
            .lock(None)?
            .ok_or_else(|| io::Error::other("lock returned without the lock"))?;
        Ok(ArrayGuard {
            raw,
            _t: PhantomData,
        })
    }

    /// Takes the array's lock if it is free: `Ok(None)` when another thread
    /// or process holds it, or the calling thread itself does.
    ///
    /// # Errors
    /// As for [`Value::lock`].
    ///
    /// ```
    /// let a = multiproc::Array::<u8>::new(2)?;
    /// let g = a.try_lock()?.expect("free");
    /// assert!(a.try_lock()?.is_none());
    /// drop(g);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_lock(&self) -> Result<Option<ArrayGuard<'_, T>>> {
        Ok(self.inner.try_lock()?.map(|raw| ArrayGuard {
            raw,
            _t: PhantomData,
        }))
    }

    /// Takes the array's lock, waiting at most `timeout`: `Ok(None)` when it
    /// was still held at the deadline.
    ///
    /// # Errors
    /// As for [`Value::lock`].
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let a = multiproc::Array::<u8>::new(2)?;
    /// a.lock_timeout(Duration::from_secs(1))?.expect("free")[1] = 5;
    /// assert_eq!(a.to_vec(), [0, 5]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn lock_timeout(&self, timeout: Duration) -> Result<Option<ArrayGuard<'_, T>>> {
        Ok(self.inner.lock(Some(timeout))?.map(|raw| ArrayGuard {
            raw,
            _t: PhantomData,
        }))
    }
}

/// Holds an [`Array`]'s lock; derefs to the slice of elements. Dropping it
/// unlocks.
///
/// ```
/// let a = multiproc::Array::from_slice(&[1u32, 2, 3])?;
/// let mut g = a.lock()?;
/// g.reverse();
/// assert_eq!(&*g, &[3, 2, 1]);
/// assert!(!g.owner_died());
/// # Ok::<(), multiproc::Error>(())
/// ```
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct ArrayGuard<'a, T> {
    raw: RobustGuard<'a>,
    _t: PhantomData<&'a mut [T]>,
}

impl<T> ArrayGuard<'_, T> {
    /// `true` when the previous holder died holding the lock: the elements
    /// may be half-written (still valid `T`s, since `T: Pod`).
    ///
    /// ```
    /// let a = multiproc::Array::<u8>::new(1)?;
    /// assert!(!a.lock()?.owner_died());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn owner_died(&self) -> bool {
        self.raw.owner_died()
    }
}

impl<T: Pod> Deref for ArrayGuard<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(self.raw.payload())
    }
}

impl<T: Pod> DerefMut for ArrayGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.raw.payload_mut())
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for ArrayGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArrayGuard")
            .field("elements", &&**self)
            .field("owner_died", &self.owner_died())
            .finish()
    }
}
