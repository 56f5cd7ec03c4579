//! The process pool: [`Pool`], [`PoolBuilder`], [`AsyncResult`], the imap
//! iterators.
//!
//! # Design
//!
//! Three parties: *callers* (any thread holding the `Pool`), one
//! *dispatcher* thread per pool, and the forked *workers*.
//!
//! ## Functions across `fork`
//!
//! A task is a plain `fn` pointer. Next to it travels the address of a
//! *trampoline*, `worker::tramp_map::<T, R>` (or `tramp_with::<C, T, R>`),
//! monomorphized in the caller: it decodes one `T`, calls the function under
//! `catch_unwind`, and appends the encoded result. Both addresses are valid
//! in a worker because it is a `fork` of the same image (no exec); the one
//! conversion back from an address is `sys::fn_from_addr`.
//!
//! ## Callers → dispatcher
//!
//! A crossbeam channel of [`protocol::Command`]s (`Job`, `Chunk`, `Seal`,
//! `EndJob`, `Close`, `Terminate`) plus a non-blocking wake pipe, written only
//! when the dispatcher was not already notified (one write per burst). Each
//! job has its own channel back: `Results{base, count, bytes}` (entries still
//! encoded: the caller decodes `R`), `Failed{index, error}`, `Abort(error)`.
//! Items are encoded by the caller into chunks (`T` back to back), so the
//! dispatcher only moves bytes and never knows `T` or `R`.
//!
//! ## Dispatcher ↔ worker (one Unix socket pair per worker)
//!
//! Every message is a codec frame (8-byte length, payload); a payload is a
//! tag byte and little-endian fields (`wire.rs`):
//!
//! | direction | message | fields |
//! | --- | --- | --- |
//! | → worker | `Chunk` | chunk id, job id, fn address, trampoline address, `start`, `end`, the chunk's items |
//! | → worker | `SharedChunk` | as `Chunk`, with the offset and length of its one large item in the pool's arena in place of the items |
//! | → worker | `Context` | job id, encoded context (`map_with`; once per worker and job) |
//! | → worker | `Forget` | job id (drop its context) |
//! | → worker | `Exit` | — (finish and exit: close, or `max_tasks_per_child`) |
//! | ← worker | `Results` | chunk id, first item, count, entries (status byte + encoded `R`, panic report or message) |
//! | ← worker | `InitFailed` | the initializer's panic message |
//!
//! ## Large payloads
//!
//! An item whose encoding reaches 64 KiB is encoded straight into the
//! pool's arena of arguments (a memfd mapped before the workers exist, so
//! they inherit it; the fork server's workers map its fd) and travels as a
//! chunk of its own: a `SharedChunk` carries its offset, the worker decodes
//! in place. A result of 64 KiB or more is encoded by the worker straight
//! into its own results region (another memfd, made with the worker and
//! dropped with it) and its entry names `(offset, length)` in a trailer of
//! the results frame; the caller decodes in place and frees the blocks
//! (also when the result is dropped unread). A worker that dies in the
//! middle of a result never reported it, and its replacement gets a fresh
//! region. When the arena or the region has no room, the payload crosses
//! the socket as a small one does. See `payload.rs`.
//!
//! A chunk sent again after a crash keeps its bytes: the worker decodes and
//! skips the first `start` items. A worker runs chunks in the order received
//! and reports results in order, each `Results` frame a contiguous range of
//! one chunk. It writes its buffered results when the chunk ends and no other
//! chunk is already buffered, when 1 ms passed since the last write, or past
//! 256 KiB: tiny tasks cost no system call each, slow ones stream at once.
//! Items run in batches inside the trampoline (`worker::Batch`): one
//! monomorphized loop decodes, calls and encodes item after item under one
//! `catch_unwind` (a panic fails its item and the loop goes on with the
//! next), and reads the coarse clock every item while items are slow, every
//! 2, 4, ... up to 64 items while they are faster than its tick.
//!
//! ## Which item was running
//!
//! Each worker has two counters in a `MAP_SHARED` page created before the
//! fork: items *started* and items *finished* in its life, stored (no system
//! call) before and after each item. The dispatcher numbers the items it
//! sends to a worker in the same sequence, so when the worker dies it knows:
//! `started > finished` means item `started - 1` was running: that item fails
//! with `Died{pid, exitcode}` (or `Timeout` if the dispatcher killed it for
//! that, or the protocol error that made it kill it). Every other item
//! without a reported result is queued again, in front: untouched items, and
//! the few that finished in the last flush interval but whose results had
//! not been written yet (they run a second time). Results already received
//! are never lost. The same counters drive `task_timeout`: an item whose
//! `started` value stays the same for longer than the timeout gets its
//! worker SIGKILLed.
//!
//! ## The dispatcher's loop
//!
//! State: the workers (socket, greedy `FrameReader`, unsent bytes, the chunks
//! in flight in order with how many results came back), the queue of
//! chunks, the jobs (result channel, function, context, live chunk count,
//! sealed/ended). Each turn: take every command; hand queued chunks to
//! workers round-robin up to the pipeline depth (2 chunks, 32 once chunks
//! are seen to take under 2 ms); write what the sockets take (non-blocking);
//! `poll` the wake pipe, each worker's socket (and for writing while bytes
//! are pending) and each worker's pidfd (its exit); read results, forward
//! them to their job, retire finished chunks; handle exits as above and fork
//! a replacement; check timeouts (the poll then wakes every tenth of the
//! timeout). A job is forgotten once sealed (or ended by its caller) with no
//! chunk left. `Close` lets the queue drain, then sends `Exit` to every
//! worker and ends when all are reaped; `Terminate` SIGKILLs and reaps them.
//!
//! Workers are forked as daemonic [`Process`](crate::Process)es (so they
//! get `PR_SET_PDEATHSIG(SIGKILL)` with the `getppid` check, and are forked
//! on the crate's fork thread when the caller is not the main thread), kept
//! out of the at-exit finalizer's registry, ignore `SIGINT`, and close the
//! inherited fds of the pool (the other workers' sockets and pidfds, the
//! wake pipe).

// The seam for other backends (MPI); unused without them.
#[cfg_attr(not(feature = "mpi"), allow(dead_code, unused_imports))]
pub(crate) mod backend;
mod dispatcher;
mod iter;
mod jobs;
mod ledger;
mod mailbox;
mod payload;
mod protocol;
mod result;
mod start;
mod wire;
mod worker;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crossbeam_channel::Sender;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::sys::{self, Trampoline};
use dispatcher::{Config, Dispatcher};
pub use iter::{Imap, ImapUnordered};
use protocol::{Command, TaskRef, Wake};
pub use result::AsyncResult;
use result::{All, Chunker, Gather, JobHandle, One};
pub(crate) use worker::Batch;

/// What the pool's handles share with each other and with the iterators.
pub(crate) struct Inner {
    tx: Sender<Command>,
    wake: Arc<Wake>,
    closed: AtomicBool,
    next_job: AtomicU64,
    processes: usize,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
    /// Where large items are encoded (see `payload`).
    arena: Option<Arc<payload::ArgsArena>>,
}

impl Inner {
    fn send(&self, cmd: Command) -> Result<()> {
        self.tx.send(cmd).map_err(|_| Error::PoolClosed)?;
        self.wake.notify();
        Ok(())
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn next_job(&self) -> u64 {
        self.next_job.fetch_add(1, Ordering::Relaxed)
    }
}

/// A pool of forked worker processes running `fn` tasks (Python's
/// `multiprocessing.Pool`).
///
/// Workers are forked once, when the pool is built, and reused. A task is a
/// plain `fn` pointer — a function item or a closure that captures nothing
/// — with serde arguments and results. What Python's pool gets wrong, this
/// one does not: a worker killed by a signal, `abort` or the OOM killer fails
/// only the item it was running with [`Error::Died`] and is replaced; the
/// rest of its chunk runs elsewhere; a panicking task is
/// [`Error::Panicked`] and its worker lives on; `imap` pulls its input
/// lazily; `terminate` (and `Drop`) returns promptly with every worker
/// reaped.
///
/// ```
/// use multiproc::Pool;
///
/// let pool = Pool::new(2)?;
/// assert_eq!(pool.map(|x: u64| x * x, 0..5u64)?, vec![0, 1, 4, 9, 16]);
/// assert_eq!(pool.apply(|s: String| s.len(), "four".to_string())?, 4);
///
/// // A crash fails its own item only.
/// let results: Vec<_> = pool
///     .imap(|x: u32| if x == 2 { std::process::abort() } else { x }, 0..4u32)
///     .collect();
/// assert!(matches!(results[2], Err(multiproc::Error::Died { exitcode: -6, .. })));
/// assert_eq!(results[3].as_ref().ok(), Some(&3));
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// The function must not capture anything: it runs in another process,
/// which only shares the program's code with this one. A capturing closure
/// does not compile; pass the data as the argument, or once per worker with
/// [`map_with`](Pool::map_with):
///
/// ```compile_fail
/// let pool = multiproc::Pool::new(2)?;
/// let k = 3u64;
/// let v = pool.map(move |x: u64| x * k, 0..10u64)?; // error: expected fn pointer, found closure
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// ```
/// let pool = multiproc::Pool::new(2)?;
/// let k = 3u64;
/// assert_eq!(pool.map_with(&k, |k: &u64, x: u64| x * k, 0..4u64)?, vec![0, 3, 6, 9]);
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// `Pool` is `Send + Sync`: threads may submit work at the same time.
/// Dropping it terminates and reaps the workers; [`close`](Pool::close) then
/// [`join`](Pool::join) lets queued work finish first. See the crate's
/// "Fork safety" section: workers are forks of the process as it is when the
/// pool is built (and when a worker is replaced).
#[doc(alias = "multiprocessing.Pool")]
pub struct Pool {
    inner: Arc<Inner>,
}

/// Builds a [`Pool`] with options (Python's `Pool(processes, initializer,
/// maxtasksperchild)`, plus a per-task timeout).
///
/// ```
/// use std::time::Duration;
/// fn setup() { /* open a log, reseed an RNG... */ }
/// let pool = multiproc::Pool::builder()
///     .processes(2)
///     .initializer(setup)
///     .max_tasks_per_child(1000)
///     .task_timeout(Duration::from_secs(30))
///     .build()?;
/// assert_eq!(pool.processes(), 2);
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct PoolBuilder {
    processes: usize,
    initializer: Option<fn()>,
    max_tasks_per_child: Option<usize>,
    task_timeout: Option<Duration>,
    start_method: Option<crate::StartMethod>,
    /// Results always cross the workers' sockets (no results regions): for
    /// a caller that forwards the raw result bytes elsewhere (MPI).
    inline_results: bool,
}

impl PoolBuilder {
    /// The number of worker processes; 0 (the default) means
    /// [`cpu_count()`](crate::cpu_count).
    pub fn processes(mut self, n: usize) -> PoolBuilder {
        self.processes = n;
        self
    }

    /// A function each worker runs once, right after it starts. If it
    /// panics, the pool stops: every task fails with [`Error::Setup`].
    pub fn initializer(mut self, f: fn()) -> PoolBuilder {
        self.initializer = Some(f);
        self
    }

    /// Replaces a worker by a fresh one after it has run `n` tasks (items);
    /// bounds what a leaking task can take. 0 means no limit.
    #[doc(alias = "maxtasksperchild")]
    pub fn max_tasks_per_child(mut self, n: usize) -> PoolBuilder {
        self.max_tasks_per_child = (n > 0).then_some(n);
        self
    }

    /// Kills the worker of a task that runs longer than `timeout`; the task
    /// fails with [`Error::Timeout`] and the worker is replaced. Checked
    /// every tenth of the timeout (at least every 1 ms, at most every 50 ms),
    /// so a task is killed between `timeout` and `timeout` plus that tick.
    pub fn task_timeout(mut self, timeout: Duration) -> PoolBuilder {
        self.task_timeout = Some(timeout);
        self
    }

    /// How the workers are created (see [`StartMethod`](crate::StartMethod));
    /// by default the one set with
    /// [`set_start_method`](crate::set_start_method) when the pool is built.
    /// With `ForkServer` (after [`forkserver::start`](crate::forkserver::start))
    /// the fork server forks them: safe in a program with threads, and fast
    /// whatever the size of the caller's heap (at most 16 such pools at
    /// once, of at most 256 workers; see the [`forkserver`](crate::forkserver)
    /// docs).
    ///
    /// ```
    /// use multiproc::{Pool, StartMethod};
    /// let pool = Pool::builder().processes(1).start_method(StartMethod::Fork).build()?;
    /// assert_eq!(pool.apply(|x: u8| x + 1, 1)?, 2);
    /// // Without forkserver::start(), ForkServer is an error that says so:
    /// let e = Pool::builder().start_method(StartMethod::ForkServer).build().unwrap_err();
    /// assert!(e.to_string().contains("forkserver::start()"));
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn start_method(mut self, method: crate::StartMethod) -> PoolBuilder {
        self.start_method = Some(method);
        self
    }

    /// Results cross the sockets whatever their size, so a raw job's result
    /// bytes hold every value (see `backend`).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    pub(crate) fn inline_results(mut self) -> PoolBuilder {
        self.inline_results = true;
        self
    }

    /// Forks the workers and starts the dispatcher thread.
    ///
    /// # Errors
    /// [`Error::Io`] if a socket pair, the shared progress page, a fork or
    /// the dispatcher thread cannot be created (the workers already forked
    /// are killed and reaped first); [`Error::ForkServer`] for
    /// `StartMethod::ForkServer` without a running fork server.
    pub fn build(self) -> Result<Pool> {
        let processes = if self.processes == 0 {
            crate::cpu_count()
        } else {
            self.processes
        };
        let arena = Some(Arc::new(payload::ArgsArena::new()?));
        let cfg = Config {
            arena: arena.clone(),
            shared_results: !self.inline_results,
            processes,
            initializer: self.initializer,
            max_tasks_per_child: self.max_tasks_per_child,
            task_timeout: self.task_timeout,
            start_method: self
                .start_method
                .unwrap_or_else(crate::forkserver::default_start_method),
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let (dispatcher, wake) = Dispatcher::new(cfg, rx)?;
        let thread = thread::Builder::new()
            .name("multiproc-pool".into())
            .spawn(move || dispatcher.run())?;
        Ok(Pool {
            inner: Arc::new(Inner {
                tx,
                wake,
                closed: AtomicBool::new(false),
                next_job: AtomicU64::new(1),
                processes,
                thread: Mutex::new(Some(thread)),
                arena,
            }),
        })
    }
}

/// Python's default chunk size for `map`: ceil(len / (4 × processes)).
pub(crate) fn default_chunksize(len: usize, processes: usize) -> usize {
    len.div_ceil(4 * processes.max(1)).max(1)
}

/// The addresses a worker needs to run `f` over items: `f` itself and the
/// trampoline monomorphized for `(T, R)`.
fn map_task<T: DeserializeOwned, R: Serialize + DeserializeOwned>(f: fn(T) -> R) -> TaskRef {
    let tramp: Trampoline = worker::tramp_map::<T, R>;
    TaskRef {
        f: sys::fn_addr(f),
        tramp: sys::fn_addr(tramp),
    }
}

impl Pool {
    /// A pool of `processes` workers (0: [`cpu_count()`](crate::cpu_count)).
    ///
    /// # Errors
    /// As [`PoolBuilder::build`].
    pub fn new(processes: usize) -> Result<Pool> {
        Pool::builder().processes(processes).build()
    }

    /// A [`PoolBuilder`] for the other options.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of worker processes.
    pub fn processes(&self) -> usize {
        self.inner.processes
    }

    /// Runs `f` on every item, in the workers, and returns the results in
    /// input order. Items travel in chunks of ceil(len / (4 × processes)).
    ///
    /// ```
    /// let pool = multiproc::Pool::new(2)?;
    /// let lens = pool.map(|s: String| s.len(), ["a", "bb", "ccc"].map(String::from))?;
    /// assert_eq!(lens, vec![1, 2, 3]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    ///
    /// # Errors
    /// The first failure to arrive (Python's semantics), after which the
    /// items not started yet are dropped: [`Error::Panicked`],
    /// [`Error::Died`], [`Error::Timeout`], [`Error::Codec`] (an item or a
    /// result that does not serialize); [`Error::PoolClosed`] after
    /// [`close`](Pool::close) or [`terminate`](Pool::terminate);
    /// [`Error::Setup`] if the workers cannot start (a panicking
    /// initializer).
    pub fn map<T, R>(&self, f: fn(T) -> R, items: impl IntoIterator<Item = T>) -> Result<Vec<R>>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.map_chunked(f, items, 0)
    }

    /// [`map`](Pool::map) with an explicit chunk size (0: the default).
    /// Larger chunks cost less per item; smaller ones balance uneven tasks.
    ///
    /// # Errors
    /// As [`map`](Pool::map).
    pub fn map_chunked<T, R>(
        &self,
        f: fn(T) -> R,
        items: impl IntoIterator<Item = T>,
        chunksize: usize,
    ) -> Result<Vec<R>>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.gather(map_task(f), None, items, chunksize)?.finish()
    }

    /// [`map`](Pool::map) with a shared context: `ctx` is encoded once and
    /// sent once to each worker that runs items of this call (not once per
    /// item), which decodes it once and passes it by reference to every
    /// call of `f`. The way to give tasks a large table, a configuration,
    /// or anything a closure would have captured.
    ///
    /// ```
    /// let pool = multiproc::Pool::new(2)?;
    /// let words = vec!["zero".to_string(), "one".into(), "two".into()];
    /// let picked = pool.map_with(&words, |w: &Vec<String>, i: usize| w[i].clone(), [2, 0])?;
    /// assert_eq!(picked, ["two", "zero"]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`map`](Pool::map); [`Error::Codec`] if `ctx` does not serialize.
    pub fn map_with<C, T, R>(
        &self,
        ctx: &C,
        f: fn(&C, T) -> R,
        items: impl IntoIterator<Item = T>,
    ) -> Result<Vec<R>>
    where
        C: Serialize + DeserializeOwned + 'static,
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let mut raw = Vec::new();
        crate::codec::encode_value(ctx, &mut raw)?;
        let tramp: Trampoline = worker::tramp_with::<C, T, R>;
        let task = TaskRef {
            f: sys::fn_addr(f),
            tramp: sys::fn_addr(tramp),
        };
        self.gather(task, Some(raw), items, 0)?.finish()
    }

    /// Starts a job of known length and submits all its chunks.
    fn gather<T: Serialize + DeserializeOwned, R: DeserializeOwned>(
        &self,
        task: TaskRef,
        ctx: Option<Vec<u8>>,
        items: impl IntoIterator<Item = T>,
        chunksize: usize,
    ) -> Result<Gather<R>> {
        let iter = items.into_iter();
        let (lo, hi) = iter.size_hint();
        if Some(lo) == hi {
            self.gather_exact(task, ctx, lo, iter, chunksize)
        } else {
            let v: Vec<T> = iter.collect();
            self.gather_exact(task, ctx, v.len(), v.into_iter(), chunksize)
        }
    }

    /// [`gather`](Pool::gather) of an iterator of `len` items (each kind of
    /// iterator its own loop: no dynamic call per item).
    fn gather_exact<T: Serialize + DeserializeOwned, R: DeserializeOwned>(
        &self,
        task: TaskRef,
        ctx: Option<Vec<u8>>,
        len: usize,
        iter: impl Iterator<Item = T>,
        chunksize: usize,
    ) -> Result<Gather<R>> {
        let job = JobHandle::start(&self.inner, task, ctx)?;
        let chunksize = if chunksize == 0 {
            default_chunksize(len, self.inner.processes)
        } else {
            chunksize
        };
        let mut chunker = Chunker::new(chunksize);
        for item in iter {
            if let Err(e) = chunker.push(&job, &item) {
                return Ok(Gather::failed(e));
            }
        }
        chunker.flush(&job)?;
        job.seal()?;
        Ok(Gather::new(job, chunker.next_index() as usize))
    }

    /// Like [`map`](Pool::map), but returns an iterator that pulls the input
    /// lazily and yields the results in input order, each its own `Result`:
    /// one failing item does not end the iteration. Works on endless inputs;
    /// at most a few chunks per worker are in flight. The chunk size starts
    /// at 1 and grows while tasks are fast (up to 4096 items, about 2 ms of
    /// work per chunk).
    ///
    /// ```
    /// let pool = multiproc::Pool::new(2)?;
    /// let first: Vec<u64> = pool
    ///     .imap(|x: u64| x * 2, 0u64..) // endless input
    ///     .take(5)
    ///     .collect::<Result<_, _>>()?;
    /// assert_eq!(first, vec![0, 2, 4, 6, 8]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    ///
    /// Errors are yielded per item (see [`map`](Pool::map) for the kinds);
    /// a closed pool yields one [`Error::PoolClosed`].
    pub fn imap<'a, T, R, I>(&self, f: fn(T) -> R, items: I) -> Imap<'a, R>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let job = JobHandle::start(&self.inner, map_task(f), None);
        Imap::new(job, items.into_iter(), self.inner.processes, None)
    }

    /// [`imap`](Pool::imap) with a fixed chunk size instead of the
    /// adaptive one (at least 1).
    ///
    /// Errors are yielded per item, as for [`imap`](Pool::imap).
    pub fn imap_chunked<'a, T, R, I>(
        &self,
        f: fn(T) -> R,
        items: I,
        chunksize: usize,
    ) -> Imap<'a, R>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let job = JobHandle::start(&self.inner, map_task(f), None);
        Imap::new(
            job,
            items.into_iter(),
            self.inner.processes,
            Some(chunksize.max(1)),
        )
    }

    /// Like [`imap`](Pool::imap), but yields results as they complete.
    ///
    /// ```
    /// let pool = multiproc::Pool::new(2)?;
    /// let mut squares: Vec<u64> = pool
    ///     .imap_unordered(|x: u64| x * x, 0..10u64)
    ///     .collect::<Result<_, _>>()?;
    /// squares.sort();
    /// assert_eq!(squares, (0..10u64).map(|x| x * x).collect::<Vec<_>>());
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    ///
    /// Errors are yielded per item, as for [`imap`](Pool::imap).
    pub fn imap_unordered<'a, T, R, I>(&self, f: fn(T) -> R, items: I) -> ImapUnordered<'a, R>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let job = JobHandle::start(&self.inner, map_task(f), None);
        ImapUnordered::new(job, items.into_iter(), self.inner.processes, None)
    }

    /// Runs `f(arg)` in a worker and returns its result.
    ///
    /// ```
    /// let pool = multiproc::Pool::new(1)?;
    /// assert_eq!(pool.apply(|(a, b): (u32, u32)| a + b, (2, 3))?, 5);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`map`](Pool::map), for the one task.
    pub fn apply<T, R>(&self, f: fn(T) -> R, arg: T) -> Result<R>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let mut v = self.map_chunked(f, std::iter::once(arg), 1)?;
        v.pop().ok_or(Error::PoolClosed)
    }

    /// Starts `f(arg)` in a worker; the [`AsyncResult`] gives its result.
    /// Submission errors (a closed pool) show up in
    /// [`AsyncResult::get`].
    pub fn apply_async<T, R>(&self, f: fn(T) -> R, arg: T) -> AsyncResult<R>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let task = map_task(f);
        let g = self
            .gather(task, None, std::iter::once(arg), 1)
            .unwrap_or_else(Gather::failed);
        AsyncResult::new(One(g))
    }

    /// Starts [`map`](Pool::map) in the background; the [`AsyncResult`]
    /// gives the results in input order (or the first error).
    ///
    /// ```
    /// let pool = multiproc::Pool::new(2)?;
    /// let r = pool.map_async(|x: i32| -x, vec![1, 2, 3]);
    /// assert_eq!(r.get()?, vec![-1, -2, -3]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn map_async<T, R>(
        &self,
        f: fn(T) -> R,
        items: impl IntoIterator<Item = T>,
    ) -> AsyncResult<Vec<R>>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let task = map_task(f);
        let g = self
            .gather(task, None, items, 0)
            .unwrap_or_else(Gather::failed);
        AsyncResult::new(All(g))
    }

    /// Stops taking new work: later submissions fail with
    /// [`Error::PoolClosed`]. Work already submitted (including the rest of
    /// a running `imap`) still runs; then the workers exit. Use
    /// [`join`](Pool::join) to wait for that.
    pub fn close(&self) {
        if !self.inner.closed.swap(true, Ordering::AcqRel) {
            let _ = self.inner.send(Command::Close);
        }
    }

    /// Waits until the workers have exited and been reaped, after
    /// [`close`](Pool::close) (queued work finishes first) or
    /// [`terminate`](Pool::terminate).
    ///
    /// ```
    /// let pool = multiproc::Pool::new(2)?;
    /// let r = pool.map_async(|x: u8| x, vec![1, 2]);
    /// pool.close();
    /// pool.join()?;
    /// assert_eq!(r.get()?, vec![1, 2]);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] of kind `InvalidInput` if the pool was neither closed
    /// nor terminated (it would wait forever), or if the dispatcher thread
    /// panicked.
    pub fn join(&self) -> Result<()> {
        if !self.inner.is_closed() {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Pool::join called before close() or terminate()",
            )));
        }
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            h.join().map_err(|_| {
                Error::Io(io::Error::other("the pool's dispatcher thread panicked"))
            })?;
        }
        Ok(())
    }

    /// Kills the workers now (`SIGKILL`) and reaps them; returns once they
    /// are gone. Unfinished tasks fail with [`Error::PoolClosed`]. `Drop`
    /// does the same.
    pub fn terminate(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let _ = self.inner.send(Command::Terminate);
        let _ = self.join();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.terminate();
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.inner.processes)
            .field("closed", &self.inner.is_closed())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_default_chunksize() {
        assert_eq!(default_chunksize(1_000_000, 2), 125_000);
        assert_eq!(default_chunksize(10, 2), 2);
        assert_eq!(default_chunksize(9, 2), 2);
        assert_eq!(default_chunksize(1, 8), 1);
        assert_eq!(default_chunksize(0, 2), 1);
    }

    #[test]
    fn pool_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Pool>();
        check::<AsyncResult<u64>>();
    }
}
