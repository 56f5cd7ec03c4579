//! [`Queue`] and [`JoinableQueue`]: multi-producer, multi-consumer queues
//! between processes (and threads), as in Python's `multiprocessing`.
//!
//! # Design
//!
//! A queue is shared memory, not a pipe: a system call costs microseconds
//! here, a message through a ring in shared memory well under one.
//!
//! - **The ring**: a memfd holding the messages as codec frames (an 8-byte
//!   length, then the postcard payload) back to back, wrapping at the end
//!   (`ring.rs`, pure logic tested on a `Vec<u8>`). It is mapped once, when
//!   the queue is created, over an address range (8 GiB when the kernel
//!   grants it) larger than it ever grows; growing is a `fallocate` of the
//!   memfd, seen at once by every process through its inherited copy of the
//!   same mapping. No process ever maps it again, so there is no
//!   per-process view to keep in step, and nothing to fix up after `fork`.
//! - **The control block**: one anonymous shared page with the state
//!   (capacity, head, bytes used, message count, unfinished count), the
//!   futex words and the waiter counts.
//! - **The lock**: a robust [`Lock`](crate::Lock) guards the ring and the
//!   state. Every operation reads the state, works out the next one, and
//!   publishes it with **one store** (the commit): the state lives in two
//!   slots, a commit writes the idle slot whole and then flips the counter
//!   that names the live one. Before the commit, a put writes only into free
//!   space (a growth copies the wrapped part only past the old end), a get
//!   only reads. So a process killed anywhere in an operation leaves the
//!   last committed state whole and consistent: the next locker takes the
//!   lock over (`owner_died`) and carries on; there is nothing to repair.
//!   A producer killed in the middle of `put` leaves no partial message; a
//!   consumer killed in `get` leaves its message in the queue.
//! - **No feeder thread**: `put` encodes the value (into a reused
//!   thread-local buffer), then copies the frame into the ring under the
//!   lock. When it returns the message is in shared memory: the producer may
//!   exit or be killed, the message stays. Joining a producer never waits
//!   for a consumer (Python's feeder-thread deadlock does not exist).
//! - **Waiting**: getters sleep on a futex word that every put bumps,
//!   putters (bounded queue, or ring at its limit) on one that every get
//!   bumps, joiners on one bumped when the unfinished count reaches zero. A
//!   sleeper reads the word and registers in a waiter count *under the
//!   lock*, so the event it waits for comes after its read (no lost
//!   wake-up), and a waker makes the `futex_wake` call only when the count
//!   says someone sleeps: an uncontended put or get makes no system call. A
//!   getter that finds the queue empty first looks again a few hundred
//!   times without sleeping, and a locker tries the lock a few dozen times
//!   before it sleeps on it (it is held for one copy). A sleeper also looks again every 200 ms on its
//!   own, which covers the one wake-up that can go missing: that of a
//!   process killed between its commit and its `futex_wake`. (A waker that
//!   took the lock over from a dead holder wakes everyone; a getter woken
//!   for a message that leaves without one, its deadline past while another
//!   process held the lock, passes the wake-up on.) A process killed
//!   while asleep leaves its waiter count behind: wakers then make a
//!   `futex_wake` call that finds no one, a cost in time only.
//! - **Copies**: a put encodes outside the lock and copies the frame in
//!   under it; a get copies the payload out under the lock (into a reused
//!   buffer, without zero-filling it) and decodes outside. User code
//!   (`Serialize`, `Deserialize`) never runs under the lock.
//!
//! Measured (`benches/queue.rs` against `benches/python/queue.py`, same
//! sitting, 2 cores shared with other work; medians swing 2x between
//! sittings): 1 producer → 1 consumer, `u64`: 2.0 M msgs/s (Python 63 k);
//! 4 × 4 processes: 3.4 M msgs/s (Python 91 k); 1 MiB `serde_bytes`
//! messages: 2.2 GB/s (Python 0.37 GB/s). The last is bimodal: when the
//! producer runs ahead, the ring grows into fresh pages (allocated and
//! zeroed by the kernel) and the rate drops towards 0.7 GB/s.
//!
//! Limits: one message's payload is at most
//! [`DEFAULT_MAX_FRAME_LEN`](crate::DEFAULT_MAX_FRAME_LEN) (1 GiB); an
//! "unbounded" queue holds as many bytes as its address range (8 GiB, or
//! 4, 2 or 0.25 where `RLIMIT_AS` grants less, with a message limit to
//! match), and `put` waits past that, as on a bounded queue. Each queue
//! takes that much address space (not memory), one memfd and three
//! mappings. The ring's memory is the queue's own (a memfd, in RAM
//! or swap): a ring that grew past 64 MiB shrinks back to 64 KiB when the
//! queue empties.

mod ring;
mod shared;

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec;
use crate::error::{Error, Result};
use shared::{Shared, Wait};

/// Buffers kept between calls for encoding and decoding, per thread; one
/// grown past this is freed after use.
const KEEP_BUFFER: usize = 4 << 20;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's reusable buffer (a fresh one if it is in
/// use further up the stack: a `Serialize` impl that puts to a queue).
fn with_buffer<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    BUFFER.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let r = f(&mut buf);
            if buf.capacity() > KEEP_BUFFER {
                *buf = Vec::new();
            }
            r
        }
        Err(_) => f(&mut Vec::new()),
    })
}

/// A multi-producer, multi-consumer FIFO queue between processes and
/// threads (`multiprocessing.Queue`).
///
/// Values travel encoded (serde, the crate's codec), so `T` needs
/// `Serialize + DeserializeOwned`; the queue is `Clone + Send + Sync` for
/// every `T`. A clone is the same queue; so is the copy a child inherits
/// through `fork`: create the queue first, then start the processes that
/// share it.
///
/// What it promises:
/// - each message reaches exactly one consumer, whole, and the messages of
///   one producer come out in the order it put them;
/// - a message is in the queue when [`put`](Queue::put) returns: its
///   producer may exit or be killed right after, and joining a producer
///   never waits for a consumer;
/// - a producer killed in the middle of `put` leaves no partial message and
///   blocks nobody; a consumer killed while it waits in [`get`](Queue::get)
///   loses nothing;
/// - messages of any size up to [`DEFAULT_MAX_FRAME_LEN`](crate::DEFAULT_MAX_FRAME_LEN)
///   (1 GiB); for byte payloads use `serde_bytes` (a plain `Vec<u8>` goes
///   through serde byte by byte).
///
/// How: the messages sit in a ring in shared memory (a memfd mapped once,
/// before any fork), guarded by a robust [`Lock`](crate::Lock). Every put or
/// get publishes the queue's new state with one store after its copy, so a
/// process killed anywhere leaves the last published state whole, and the
/// next process to take the lock carries on. Waiters sleep on futexes; an
/// uncontended put or get makes no system call. An unbounded queue holds up
/// to 8 GiB of encoded messages (less where `RLIMIT_AS` grants less address
/// space); `put` waits past that. Each queue holds one file descriptor (its
/// memfd) in every process that has it.
///
/// ```
/// use multiproc::{Process, Queue};
/// use std::time::Duration;
///
/// let q: Queue<(u32, String)> = Queue::new()?;
/// let tx = q.clone();
/// let mut producer = Process::new(move || {
///     for i in 0..3 {
///         tx.put(&(i, format!("job {i}"))).unwrap();
///     }
/// });
/// producer.start()?;
/// // The producer is done as soon as its messages are in the queue.
/// assert_eq!(producer.join_timeout(Duration::from_secs(10))?, Some(0));
/// for i in 0..3 {
///     assert_eq!(q.get()?, (i, format!("job {i}")));
/// }
/// assert!(q.is_empty());
/// # Ok::<(), multiproc::Error>(())
/// ```
#[doc(alias = "SimpleQueue")]
pub struct Queue<T> {
    shared: Arc<Shared>,
    _type: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            shared: Arc::clone(&self.shared),
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("len", &self.shared.len())
            .field("maxsize", &self.shared.maxsize())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// A new, empty, unbounded queue.
    ///
    /// # Errors
    /// [`Error::Io`] when the shared memory or its lock cannot be created.
    ///
    /// ```
    /// let q = multiproc::Queue::<u64>::new()?;
    /// q.put(&7)?;
    /// assert_eq!(q.get()?, 7);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new() -> Result<Queue<T>> {
        Ok(Queue {
            shared: Arc::new(Shared::new(None)?),
            _type: PhantomData,
        })
    }

    /// A new, empty queue holding at most `maxsize` messages: [`put`](Queue::put)
    /// waits while it is full.
    ///
    /// # Errors
    /// [`Error::Io`] of kind [`InvalidInput`](io::ErrorKind::InvalidInput)
    /// when `maxsize` is 0 (use [`new`](Queue::new) for an unbounded queue);
    /// [`Error::Io`] when the shared memory cannot be created.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let q = multiproc::Queue::bounded(1)?;
    /// q.put(&1u8)?;
    /// assert!(!q.put_timeout(&2, Duration::from_millis(10))?); // full
    /// assert_eq!(q.get()?, 1);
    /// assert!(q.put_timeout(&2, Duration::from_millis(10))?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn bounded(maxsize: usize) -> Result<Queue<T>> {
        if maxsize == 0 {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a bounded queue needs a maxsize of at least 1",
            )));
        }
        Ok(Queue {
            shared: Arc::new(Shared::new(Some(maxsize))?),
            _type: PhantomData,
        })
    }

    /// Encodes `value` into a frame and hands it to `f`.
    fn with_frame<R>(value: &T, f: impl FnOnce(&[u8]) -> Result<R>) -> Result<R> {
        with_buffer(|buf| {
            codec::encode_frame(value, buf)?;
            f(buf)
        })
    }

    /// Puts `value` at the end of the queue; on a full bounded queue, waits
    /// for room. When it returns, the message is in the queue.
    ///
    /// # Errors
    /// [`Error::Codec`] when `value` cannot be encoded or its encoding is
    /// larger than [`DEFAULT_MAX_FRAME_LEN`](crate::DEFAULT_MAX_FRAME_LEN);
    /// [`Error::Io`] when the queue's memory cannot grow (`ENOMEM`,
    /// `ENOSPC`) or a wait fails.
    ///
    /// ```
    /// let q = multiproc::Queue::new()?;
    /// q.put(&"hello".to_string())?;
    /// assert_eq!(q.get()?, "hello");
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn put(&self, value: &T) -> Result<()> {
        Self::with_frame(value, |frame| self.shared.put_frame(frame, Wait::Forever)).map(drop)
    }

    /// Puts `value`, waiting at most `timeout` for room: `Ok(false)` if the
    /// queue was still full at the deadline (the value is not put).
    ///
    /// # Errors
    /// As for [`put`](Queue::put).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let q = multiproc::Queue::bounded(2)?;
    /// assert!(q.put_timeout(&1u32, Duration::from_millis(10))?);
    /// assert!(q.put_timeout(&2u32, Duration::from_millis(10))?);
    /// assert!(!q.put_timeout(&3u32, Duration::from_millis(10))?);
    /// assert_eq!(q.len(), 2);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn put_timeout(&self, value: &T, timeout: Duration) -> Result<bool> {
        let wait = Wait::after(timeout);
        Self::with_frame(value, |frame| self.shared.put_frame(frame, wait))
    }

    /// Puts `value` if there is room now: `Ok(false)` on a full queue
    /// (`put_nowait` in Python, without the exception). It does not wait for
    /// room, but it may wait for another process that is copying a message
    /// in or out to finish (Python's would report a full queue then).
    ///
    /// # Errors
    /// As for [`put`](Queue::put).
    ///
    /// ```
    /// let q = multiproc::Queue::bounded(1)?;
    /// assert!(q.try_put(&'a')?);
    /// assert!(!q.try_put(&'b')?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[doc(alias = "put_nowait")]
    pub fn try_put(&self, value: &T) -> Result<bool> {
        Self::with_frame(value, |frame| self.shared.put_frame(frame, Wait::No))
    }

    /// Decodes a payload taken from the queue.
    fn decode(found: bool, payload: &[u8]) -> Result<Option<T>> {
        if found {
            codec::decode(payload).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Takes the first message, waiting for as long as it takes.
    ///
    /// # Errors
    /// [`Error::Codec`] when the message is not a valid encoding of `T` (it
    /// is taken off the queue all the same); [`Error::Io`] when a wait
    /// fails.
    ///
    /// ```
    /// use multiproc::{Queue, Process};
    ///
    /// let q = Queue::new()?;
    /// let tx = q.clone();
    /// let mut p = Process::new(move || tx.put(&42u64).unwrap());
    /// p.start()?;
    /// assert_eq!(q.get()?, 42); // waits for the child's message
    /// p.join()?;
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get(&self) -> Result<T> {
        with_buffer(|buf| {
            let found = self.shared.get_frame(buf, Wait::Forever)?;
            Self::decode(found, buf)
        })?
        .ok_or_else(|| Error::Io(io::Error::other("get returned without a message")))
    }

    /// Takes the first message, waiting at most `timeout`: `Ok(None)` if
    /// none came in time.
    ///
    /// # Errors
    /// As for [`get`](Queue::get).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let q = multiproc::Queue::<u8>::new()?;
    /// assert_eq!(q.get_timeout(Duration::from_millis(10))?, None);
    /// q.put(&3)?;
    /// assert_eq!(q.get_timeout(Duration::from_millis(10))?, Some(3));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get_timeout(&self, timeout: Duration) -> Result<Option<T>> {
        let wait = Wait::after(timeout);
        with_buffer(|buf| {
            let found = self.shared.get_frame(buf, wait)?;
            Self::decode(found, buf)
        })
    }

    /// Takes the first message if there is one now (`get_nowait` in
    /// Python, without the exception). It does not wait for a message, but
    /// it may wait for another process that is copying a message in or out
    /// to finish (Python's would report an empty queue then), so draining
    /// with it sees every message already put.
    ///
    /// # Errors
    /// As for [`get`](Queue::get).
    ///
    /// ```
    /// let q = multiproc::Queue::new()?;
    /// assert_eq!(q.try_get()?, None);
    /// q.put(&1i32)?;
    /// assert_eq!(q.try_get()?, Some(1));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[doc(alias = "get_nowait")]
    pub fn try_get(&self) -> Result<Option<T>> {
        with_buffer(|buf| {
            let found = self.shared.get_frame(buf, Wait::No)?;
            Self::decode(found, buf)
        })
    }
}

impl<T> Queue<T> {
    /// The number of messages in the queue. Approximate, like Python's
    /// `qsize()`: other processes may put and take at the same time.
    ///
    /// ```
    /// let q = multiproc::Queue::new()?;
    /// q.put(&1u8)?;
    /// q.put(&2u8)?;
    /// assert_eq!(q.len(), 2);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[doc(alias = "qsize")]
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    /// Whether the queue is empty; approximate, as [`len`](Queue::len).
    ///
    /// ```
    /// let q = multiproc::Queue::<u8>::new()?;
    /// assert!(q.is_empty());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    #[doc(alias = "empty")]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound given to [`bounded`](Queue::bounded); `None` for an
    /// unbounded queue.
    ///
    /// ```
    /// assert_eq!(multiproc::Queue::<u8>::bounded(4)?.maxsize(), Some(4));
    /// assert_eq!(multiproc::Queue::<u8>::new()?.maxsize(), None);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn maxsize(&self) -> Option<usize> {
        self.shared.maxsize()
    }
}

/// A [`Queue`] that also counts unfinished tasks
/// (`multiprocessing.JoinableQueue`): every message put is a task, a
/// consumer calls [`task_done`](JoinableQueue::task_done) when it has
/// finished one, and [`join`](JoinableQueue::join) waits until every task
/// put so far is done.
///
/// A consumer that dies after taking a message and before its `task_done`
/// leaves that task unfinished for good: use
/// [`join_timeout`](JoinableQueue::join_timeout) where that can happen.
///
/// ```
/// use multiproc::{JoinableQueue, Process};
/// use std::time::Duration;
///
/// let q = JoinableQueue::<u64>::new()?;
/// let worker_q = q.clone();
/// let mut worker = Process::new(move || loop {
///     let n = worker_q.get().unwrap();
///     // ... work on n ...
///     worker_q.task_done().unwrap();
///     if n == 9 {
///         break;
///     }
/// });
/// worker.start()?;
/// for n in 0..10 {
///     q.put(&n)?;
/// }
/// assert!(q.join_timeout(Duration::from_secs(10))?); // all 10 done
/// assert_eq!(worker.join()?, 0);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct JoinableQueue<T> {
    queue: Queue<T>,
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue")
            .field("len", &self.queue.shared.len())
            .field("unfinished", &self.queue.shared.unfinished())
            .field("maxsize", &self.queue.shared.maxsize())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> JoinableQueue<T> {
    /// A new, empty, unbounded queue; see [`Queue::new`].
    ///
    /// # Errors
    /// As for [`Queue::new`].
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::<u8>::new()?;
    /// assert!(q.is_empty());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn new() -> Result<JoinableQueue<T>> {
        Ok(JoinableQueue {
            queue: Queue::new()?,
        })
    }

    /// A new, empty queue of at most `maxsize` messages; see
    /// [`Queue::bounded`].
    ///
    /// # Errors
    /// As for [`Queue::bounded`].
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::<u8>::bounded(1)?;
    /// assert!(q.try_put(&1)?);
    /// assert!(!q.try_put(&2)?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn bounded(maxsize: usize) -> Result<JoinableQueue<T>> {
        Ok(JoinableQueue {
            queue: Queue::bounded(maxsize)?,
        })
    }

    /// Puts a message, one more unfinished task; see [`Queue::put`].
    ///
    /// # Errors
    /// As for [`Queue::put`].
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::new()?;
    /// q.put(&1u8)?;
    /// assert_eq!(q.get()?, 1);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn put(&self, value: &T) -> Result<()> {
        self.queue.put(value)
    }

    /// See [`Queue::put_timeout`].
    ///
    /// # Errors
    /// As for [`Queue::put`].
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let q = multiproc::JoinableQueue::bounded(1)?;
    /// assert!(q.put_timeout(&1u8, Duration::from_millis(10))?);
    /// assert!(!q.put_timeout(&2u8, Duration::from_millis(10))?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn put_timeout(&self, value: &T, timeout: Duration) -> Result<bool> {
        self.queue.put_timeout(value, timeout)
    }

    /// See [`Queue::try_put`].
    ///
    /// # Errors
    /// As for [`Queue::put`].
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::new()?;
    /// assert!(q.try_put(&1u8)?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_put(&self, value: &T) -> Result<bool> {
        self.queue.try_put(value)
    }

    /// See [`Queue::get`].
    ///
    /// # Errors
    /// As for [`Queue::get`].
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::new()?;
    /// q.put(&"x".to_string())?;
    /// assert_eq!(q.get()?, "x");
    /// q.task_done()?;
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get(&self) -> Result<T> {
        self.queue.get()
    }

    /// See [`Queue::get_timeout`].
    ///
    /// # Errors
    /// As for [`Queue::get`].
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let q = multiproc::JoinableQueue::<u8>::new()?;
    /// assert_eq!(q.get_timeout(Duration::from_millis(10))?, None);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn get_timeout(&self, timeout: Duration) -> Result<Option<T>> {
        self.queue.get_timeout(timeout)
    }

    /// See [`Queue::try_get`].
    ///
    /// # Errors
    /// As for [`Queue::get`].
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::<u8>::new()?;
    /// assert_eq!(q.try_get()?, None);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn try_get(&self) -> Result<Option<T>> {
        self.queue.try_get()
    }
}

impl<T> JoinableQueue<T> {
    /// Marks one task as finished: one message taken with `get` has been
    /// dealt with.
    ///
    /// # Errors
    /// [`Error::Io`] of kind [`InvalidInput`](io::ErrorKind::InvalidInput)
    /// when called more times than messages were put (Python's
    /// `ValueError`); [`Error::Io`] when the queue's lock fails.
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::new()?;
    /// q.put(&1u8)?;
    /// q.get()?;
    /// q.task_done()?;
    /// assert!(q.task_done().is_err()); // one put, two task_done
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn task_done(&self) -> Result<()> {
        if self.queue.shared.task_done()? {
            Ok(())
        } else {
            Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "task_done called more times than messages were put",
            )))
        }
    }

    /// Waits until every message put so far is marked done with
    /// [`task_done`](JoinableQueue::task_done).
    ///
    /// # Errors
    /// [`Error::Io`] when the queue's lock or a wait fails.
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::<u8>::new()?;
    /// q.join()?; // nothing put: returns at once
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn join(&self) -> Result<()> {
        self.queue.shared.join(Wait::Forever).map(drop)
    }

    /// Waits at most `timeout` until every message put so far is marked
    /// done: `Ok(false)` if some were still unfinished at the deadline.
    ///
    /// # Errors
    /// As for [`join`](JoinableQueue::join).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let q = multiproc::JoinableQueue::new()?;
    /// q.put(&1u8)?;
    /// assert!(!q.join_timeout(Duration::from_millis(10))?);
    /// q.get()?;
    /// q.task_done()?;
    /// assert!(q.join_timeout(Duration::from_millis(10))?);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn join_timeout(&self, timeout: Duration) -> Result<bool> {
        self.queue.shared.join(Wait::after(timeout))
    }

    /// The number of messages in the queue, approximately; see
    /// [`Queue::len`].
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::new()?;
    /// q.put(&1u8)?;
    /// assert_eq!(q.len(), 1);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether the queue is empty, approximately; see [`Queue::is_empty`].
    ///
    /// ```
    /// assert!(multiproc::JoinableQueue::<u8>::new()?.is_empty());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The number of tasks put and not yet marked done, approximately.
    ///
    /// ```
    /// let q = multiproc::JoinableQueue::new()?;
    /// q.put(&1u8)?;
    /// q.get()?;
    /// assert_eq!(q.unfinished(), 1); // taken, not yet done
    /// q.task_done()?;
    /// assert_eq!(q.unfinished(), 0);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn unfinished(&self) -> usize {
        self.queue.shared.unfinished()
    }

    /// See [`Queue::maxsize`].
    ///
    /// ```
    /// assert_eq!(multiproc::JoinableQueue::<u8>::new()?.maxsize(), None);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn maxsize(&self) -> Option<usize> {
        self.queue.maxsize()
    }
}

#[cfg(test)]
mod tests;
