//! The pool's API across the ranks of an MPI job (cargo feature `mpi`):
//! [`MpiPool`], in the spirit of `mpi4py.futures.MPIPoolExecutor`.
//!
//! Every rank runs the same program and calls [`MpiPool::start`] first in
//! `main`. Rank 0 gets the pool and its `map`s; every other rank becomes a
//! server: it forks a local [`Pool`] of `workers_per_rank` processes, runs
//! the chunks rank 0 sends in it, and exits the process with status 0 when
//! rank 0 closes the pool (`start` never returns there).
//!
//! ```no_run
//! // mpiexec -n 4 target/release/examples/mpi_map
//! use multiproc::mpi::MpiPool;
//!
//! let pool = MpiPool::start()?; // worker ranks serve here and exit
//! let squares = pool.map(|x: u64| x * x, 0..1000u64)?;
//! assert_eq!(squares[999], 998_001);
//! pool.close()?;
//! # Ok::<(), multiproc::Error>(())
//! ```
//!
//! # How it works
//!
//! - **Reuse of the local pool.** An `MpiPool` on rank 0 is a [`Pool`]
//!   front end (the same result gathering, [`AsyncResult`], [`Imap`] and
//!   [`ImapUnordered`]) over another backend: a thread that sends the
//!   chunks to the worker ranks instead of local workers, and forwards
//!   their results, still encoded, to the caller that decodes them. A
//!   worker rank feeds what it receives, as raw bytes, to its local pool.
//! - **Functions across ranks.** A task is a plain `fn` pointer, as in
//!   [`Pool`]. Each rank maps the binary at its own address (ASLR), so a
//!   function crosses as its offset from a function of this crate, checked
//!   on both sides to lie in the executable's code. At start, every rank
//!   sends rank 0 a checksum of its executable file: ranks that run
//!   another build make `start` an [`Error::Mpi`] on rank 0 (those ranks
//!   exit with status 1). A function from outside the executable (one of a
//!   shared library cast to `fn`) fails its call with [`Error::Mpi`].
//! - **Failures.** A task that panics is [`Error::Panicked`]; one that
//!   crashes its worker process fails only its item, with
//!   [`Error::Died`] naming the rank (`rank: Some(r)`) and the pid, and the worker is
//!   replaced; `task_timeout` works as in [`Pool`]. A *rank* that dies ends
//!   the job, as MPI does: `mpiexec` kills the other ranks and exits with a
//!   non-zero status.
//! - **Waiting.** MPICH's blocking calls poll in a busy loop, so the ranks
//!   never block in MPI while idle: they poll with `MPI_Iprobe`, yield
//!   between polls for a millisecond after a message (rank 0 only while a
//!   reply is due soon; with many items in flight it sleeps 15 µs), then
//!   sleep with a back-off up to 1 ms. Rank 0 keeps a window of chunks in
//!   flight per rank (two per worker, plus two) so the round trip hides
//!   behind work. After the handshake, rank 0's MPI calls run on the pool's
//!   backend thread (MPI is initialized with `MPI_THREAD_SERIALIZED`), and
//!   `MPI_Finalize` on the thread that closes the pool; forked workers never
//!   call MPI and leave with `_exit`.
//!
//! With one rank (a program run without `mpiexec`), rank 0 runs the tasks
//! in a local pool.

mod image;
mod leader;
mod link;
mod server;
mod wire;

use std::fmt;
use std::time::{Duration, Instant};

use ::mpi::environment::Universe;
use ::mpi::topology::Communicator;
use ::mpi::Threading;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::{AsyncResult, Imap, ImapUnordered, Pool};
use wire::{FromRank, ToRank};

/// How long the handshake waits for a rank (checksumming a large debug
/// binary on a busy machine takes a while).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);

/// The pool's API across the ranks of an MPI job; see the [module
/// docs](self).
///
/// ```no_run
/// use multiproc::mpi::MpiPool;
///
/// let pool = MpiPool::builder().workers_per_rank(2).start()?;
/// println!("{} ranks, {} workers", pool.ranks(), pool.processes());
/// let lens = pool.map(|s: String| s.len(), ["a", "bb"].map(String::from))?;
/// assert_eq!(lens, vec![1, 2]);
/// pool.close()?;
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// `MpiPool` is `Send`: it may move to another thread, and be used from
/// one thread at a time. Dropping it closes it as [`close`](MpiPool::close)
/// does.
#[doc(alias = "MPIPoolExecutor")]
pub struct MpiPool {
    pool: Option<Pool>,
    ranks: usize,
    /// Finalizes MPI when dropped, after the pool is closed.
    universe: Option<Universe>,
}

/// Builds an [`MpiPool`] with options.
///
/// ```no_run
/// use std::time::Duration;
/// fn setup() { /* runs once in each worker process */ }
/// let pool = multiproc::mpi::MpiPool::builder()
///     .workers_per_rank(4)
///     .initializer(setup)
///     .task_timeout(Duration::from_secs(60))
///     .start()?;
/// pool.close()?;
/// # Ok::<(), multiproc::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct MpiPoolBuilder {
    workers_per_rank: usize,
    initializer: Option<fn()>,
    task_timeout: Option<Duration>,
}

impl MpiPoolBuilder {
    /// Worker processes on each worker rank; 0 (the default) means the
    /// CPUs of the rank's host divided by the ranks on that host, at least
    /// one. Each rank applies its own builder's value (they run the same
    /// code, so it is the same everywhere).
    pub fn workers_per_rank(mut self, n: usize) -> MpiPoolBuilder {
        self.workers_per_rank = n;
        self
    }

    /// A function each worker process runs once when it starts, as
    /// [`PoolBuilder::initializer`](crate::PoolBuilder::initializer).
    pub fn initializer(mut self, f: fn()) -> MpiPoolBuilder {
        self.initializer = Some(f);
        self
    }

    /// Kills the worker of a task that runs longer than `timeout`; the task
    /// fails with [`Error::Timeout`], as
    /// [`PoolBuilder::task_timeout`](crate::PoolBuilder::task_timeout).
    pub fn task_timeout(mut self, timeout: Duration) -> MpiPoolBuilder {
        self.task_timeout = Some(timeout);
        self
    }

    /// Initializes MPI and starts the pool. On rank 0 it returns the pool;
    /// on every other rank it serves tasks until rank 0 closes the pool,
    /// then finalizes MPI and exits the process with status 0 (it never
    /// returns there, except with an `Err` when MPI cannot start).
    ///
    /// # Errors
    /// [`Error::AlreadyStarted`] if MPI was already initialized (call this
    /// first in `main`, once); [`Error::Mpi`] if MPI lacks the threading
    /// level it needs, if the ranks run different binaries, or a rank does
    /// not answer the handshake in time; [`Error::Setup`] if a worker rank's
    /// local pool cannot start; as [`PoolBuilder::build`](crate::PoolBuilder::build)
    /// for the local pool of a single rank.
    pub fn start(self) -> Result<MpiPool> {
        // A worker rank (and a program run without a launcher, which will be
        // rank 0 of one) forks its local pool before MPI starts its threads
        // and installs its signal handlers, so the workers are forks of a
        // clean, single-threaded image that holds no MPI state.
        let launched = launcher_rank();
        let early = match launched {
            Some(0) => None,
            Some(_) => Some(self.local_pool(self.default_workers(launcher_local_ranks()))),
            None => Some(self.local_pool(self.default_workers(1))),
        };
        let (universe, threading) =
            ::mpi::initialize_with_threading(Threading::Serialized).ok_or(Error::AlreadyStarted)?;
        if threading < Threading::Serialized {
            return Err(Error::Mpi {
                reason: format!(
                    "the MPI library provides {threading:?} threading; the pool needs Serialized"
                ),
            });
        }
        let world = universe.world();
        let ranks = world.size() as usize;
        if world.rank() != 0 {
            serve(self, universe, early);
        }
        if ranks == 1 {
            let pool = match early {
                Some(p) => p?,
                None => self.local_pool(self.default_workers(1))?,
            };
            return Ok(MpiPool {
                pool: Some(pool),
                ranks,
                universe: Some(universe),
            });
        }
        drop(early);
        let workers = lead_handshake(&self, ranks)?;
        let processes = workers.iter().sum();
        let pool = Pool::with_backend(processes, "multiproc-mpi", move |rx| {
            leader::Leader::new(rx, &workers).run()
        })?;
        Ok(MpiPool {
            pool: Some(pool),
            ranks,
            universe: Some(universe),
        })
    }

    /// Workers for a rank whose host has `ranks_on_host` ranks.
    fn default_workers(&self, ranks_on_host: usize) -> usize {
        if self.workers_per_rank > 0 {
            self.workers_per_rank
        } else {
            (crate::cpu_count() / ranks_on_host.max(1)).max(1)
        }
    }

    fn local_pool(&self, workers: usize) -> Result<Pool> {
        // Results leave as bytes for rank 0: none in a local region.
        let mut b = Pool::builder().processes(workers).inline_results();
        if let Some(f) = self.initializer {
            b = b.initializer(f);
        }
        if let Some(t) = self.task_timeout {
            b = b.task_timeout(t);
        }
        b.build()
    }
}

/// This process's rank as its launcher announces it in the environment
/// (MPICH's Hydra, Open MPI, PMIx), before MPI is initialized.
fn launcher_rank() -> Option<usize> {
    ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The ranks on this host, as the launcher announces them (1 if unknown).
fn launcher_local_ranks() -> usize {
    ["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

/// The processor name MPI reports for this rank's host.
fn host_name() -> String {
    ::mpi::environment::processor_name().unwrap_or_default()
}

/// Rank 0's side of the handshake: every rank's checksum must be rank 0's;
/// each rank is told how many workers to run and answers once its pool
/// runs. Returns the workers of each rank (0 for rank 0).
fn lead_handshake(b: &MpiPoolBuilder, ranks: usize) -> Result<Vec<usize>> {
    let world = ::mpi::topology::SimpleCommunicator::world();
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mine = image::checksum()?;
    let mut hellos = Vec::with_capacity(ranks);
    hellos.push(Hello {
        checksum: mine,
        host: host_name(),
        cpus: crate::cpu_count(),
    });
    let planned = collect_hellos(&world, ranks, deadline, &mut hellos)
        .and_then(|()| plan_workers(&hellos, b.workers_per_rank));
    let plan = match planned {
        Ok(p) => p,
        // Every rank is told, so none waits for a pool that will not come.
        Err(e) => {
            let refuse = wire::encode(
                &ToRank::Refuse {
                    reason: e.to_string(),
                },
                &[],
            )?;
            for r in 1..ranks {
                link::send(&world, r, &refuse);
            }
            return Err(e);
        }
    };
    for (r, &w) in plan.iter().enumerate().skip(1) {
        link::send(
            &world,
            r,
            &wire::encode(&ToRank::Welcome { workers: w as u32 }, &[])?,
        );
    }
    let mut workers = vec![0; ranks];
    let mut failed = None;
    for (r, slot) in workers.iter_mut().enumerate().skip(1) {
        let m = link::recv_from(&world, r, deadline, "answer to the handshake")?;
        match wire::decode::<FromRank>(&m)?.0 {
            FromRank::Ready { workers } => *slot = workers as usize,
            FromRank::SetupFailed { message } => {
                failed.get_or_insert(Error::Setup {
                    step: format!("local pool on rank {r}"),
                    source: std::io::Error::other(message),
                });
            }
            other => {
                failed.get_or_insert(Error::Mpi {
                    reason: format!("rank {r} answered the handshake with {other:?}"),
                });
            }
        }
    }
    if let Some(e) = failed {
        // The ranks whose pool started wait for a close; the others too.
        let close = wire::encode(&ToRank::Close { now: true }, &[])?;
        for r in 1..ranks {
            link::send(&world, r, &close);
        }
        // One deadline for all of them.
        let deadline = Instant::now() + Duration::from_secs(30);
        for r in 1..ranks {
            let _ = link::recv_from(&world, r, deadline, "goodbye");
        }
        return Err(e);
    }
    Ok(workers)
}

/// Receives the hello of every worker rank, in rank order.
fn collect_hellos(
    world: &::mpi::topology::SimpleCommunicator,
    ranks: usize,
    deadline: Instant,
    hellos: &mut Vec<Hello>,
) -> Result<()> {
    for r in 1..ranks {
        let m = link::recv_from(world, r, deadline, "handshake")?;
        match wire::decode::<FromRank>(&m)?.0 {
            FromRank::Hello {
                checksum,
                host,
                cpus,
            } => hellos.push(Hello {
                checksum,
                host,
                cpus: cpus as usize,
            }),
            other => {
                return Err(Error::Mpi {
                    reason: format!("rank {r} answered the handshake with {other:?}"),
                })
            }
        }
    }
    Ok(())
}

/// What a rank says in the handshake.
#[derive(Debug, Clone)]
pub(crate) struct Hello {
    pub(crate) checksum: u64,
    pub(crate) host: String,
    pub(crate) cpus: usize,
}

/// The workers of each rank (index = rank; rank 0 runs none) from the
/// ranks' hellos: `workers_per_rank`, or else the CPUs of the host divided
/// by the ranks on it, at least 1.
///
/// # Errors
/// [`Error::Mpi`] if a rank's checksum differs from rank 0's.
pub(crate) fn plan_workers(hellos: &[Hello], workers_per_rank: usize) -> Result<Vec<usize>> {
    let Some(first) = hellos.first() else {
        return Ok(Vec::new());
    };
    let odd: Vec<usize> = hellos
        .iter()
        .enumerate()
        .filter(|(_, h)| h.checksum != first.checksum)
        .map(|(r, _)| r)
        .collect();
    if !odd.is_empty() {
        return Err(Error::Mpi {
            reason: format!(
                "ranks {odd:?} run another build of the program than rank 0 (executable checksum {:#018x} differs from {:#018x}): every rank must run the same binary",
                hellos[odd[0]].checksum, first.checksum
            ),
        });
    }
    let mut per_host = std::collections::HashMap::new();
    for h in hellos {
        *per_host.entry(h.host.as_str()).or_insert(0usize) += 1;
    }
    Ok(hellos
        .iter()
        .enumerate()
        .map(|(r, h)| match r {
            0 => 0,
            _ if workers_per_rank > 0 => workers_per_rank,
            _ => (h.cpus / per_host[h.host.as_str()]).max(1),
        })
        .collect())
}

/// A worker rank: the handshake, then serving until rank 0 closes; then
/// MPI is finalized and the process exits (1 if the handshake refused it).
fn serve(b: MpiPoolBuilder, universe: Universe, early: Option<Result<Pool>>) -> ! {
    let world = universe.world();
    let code = match serve_inner(&b, &world, early) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("multiproc: mpi rank {}: {e}", world.rank());
            1
        }
    };
    drop(universe);
    std::process::exit(code)
}

fn serve_inner(
    b: &MpiPoolBuilder,
    world: &::mpi::topology::SimpleCommunicator,
    early: Option<Result<Pool>>,
) -> Result<()> {
    let hello = FromRank::Hello {
        checksum: image::checksum().unwrap_or(0),
        host: host_name(),
        cpus: crate::cpu_count() as u32,
    };
    link::send(world, 0, &wire::encode(&hello, &[])?);
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let m = link::recv_from(world, 0, far, "handshake")?;
    let workers = match wire::decode::<ToRank>(&m)?.0 {
        ToRank::Welcome { workers } => workers as usize,
        ToRank::Refuse { reason } => return Err(Error::Mpi { reason }),
        other => {
            return Err(Error::Mpi {
                reason: format!("rank 0 answered the handshake with {other:?}"),
            })
        }
    };
    // The pool forked before MPI started (`start` forks it on every rank
    // its launcher did not name rank 0); one now, of the size rank 0
    // planned, only if the launcher's variables named this rank 0 while MPI
    // made it another.
    let pool = match early {
        Some(p) => p,
        None => b.local_pool(workers),
    };
    match pool {
        Ok(pool) => {
            let ready = FromRank::Ready {
                workers: pool.processes() as u32,
            };
            link::send(world, 0, &wire::encode(&ready, &[])?);
            server::Server::new(pool).run();
            Ok(())
        }
        Err(e) => {
            let failed = FromRank::SetupFailed {
                message: e.to_string(),
            };
            link::send(world, 0, &wire::encode(&failed, &[])?);
            // Rank 0 answers with a close; say goodbye.
            let _ = link::recv_from(world, 0, far, "close")?;
            link::send(world, 0, &wire::encode(&FromRank::Bye, &[])?);
            Err(e)
        }
    }
}

impl MpiPool {
    /// [`MpiPool::builder`]`().start()`: every rank calls it first in
    /// `main`; see [`MpiPoolBuilder::start`].
    ///
    /// ```no_run
    /// let pool = multiproc::mpi::MpiPool::start()?;
    /// assert_eq!(pool.apply(|x: u32| x + 1, 1)?, 2);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`MpiPoolBuilder::start`].
    pub fn start() -> Result<MpiPool> {
        MpiPool::builder().start()
    }

    /// An [`MpiPoolBuilder`] for the options.
    pub fn builder() -> MpiPoolBuilder {
        MpiPoolBuilder::default()
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("the pool lives until close")
    }

    /// Every rank of the job, rank 0 included.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// The worker processes that run tasks, on all worker ranks together
    /// (with one rank: the local pool's).
    pub fn processes(&self) -> usize {
        self.pool().processes()
    }

    /// As [`Pool::map`], across the ranks.
    ///
    /// # Errors
    /// As [`Pool::map`]; a crashed worker is [`Error::Died`] naming its rank;
    /// [`Error::Mpi`] for a function from outside the executable.
    pub fn map<T, R>(&self, f: fn(T) -> R, items: impl IntoIterator<Item = T>) -> Result<Vec<R>>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.pool().map(f, items)
    }

    /// As [`Pool::map_chunked`], across the ranks.
    ///
    /// # Errors
    /// As [`map`](MpiPool::map).
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
        self.pool().map_chunked(f, items, chunksize)
    }

    /// As [`Pool::map_with`]: the context crosses to each worker rank once
    /// per call.
    ///
    /// # Errors
    /// As [`map`](MpiPool::map); [`Error::Codec`] if `ctx` does not
    /// serialize.
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
        self.pool().map_with(ctx, f, items)
    }

    /// As [`Pool::imap`]: lazy, ordered, a bounded window in flight.
    ///
    /// Errors are yielded per item, as for [`Pool::imap`].
    pub fn imap<'a, T, R, I>(&self, f: fn(T) -> R, items: I) -> Imap<'a, R>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.pool().imap(f, items)
    }

    /// As [`Pool::imap_unordered`].
    ///
    /// Errors are yielded per item, as for [`Pool::imap`].
    pub fn imap_unordered<'a, T, R, I>(&self, f: fn(T) -> R, items: I) -> ImapUnordered<'a, R>
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.pool().imap_unordered(f, items)
    }

    /// As [`Pool::apply`]: runs `f(arg)` on a worker rank.
    ///
    /// # Errors
    /// As [`map`](MpiPool::map), for the one task.
    pub fn apply<T, R>(&self, f: fn(T) -> R, arg: T) -> Result<R>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.pool().apply(f, arg)
    }

    /// As [`Pool::apply_async`].
    pub fn apply_async<T, R>(&self, f: fn(T) -> R, arg: T) -> AsyncResult<R>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        self.pool().apply_async(f, arg)
    }

    /// As [`Pool::map_async`].
    pub fn map_async<T, R>(
        &self,
        f: fn(T) -> R,
        items: impl IntoIterator<Item = T>,
    ) -> AsyncResult<Vec<R>>
    where
        T: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        self.pool().map_async(f, items)
    }

    /// Lets the work submitted finish, closes every worker rank (they exit
    /// with status 0) and finalizes MPI. `Drop` does the same.
    ///
    /// # Errors
    /// [`Error::Io`] if the pool's backend thread panicked.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let mut r = Ok(());
        if let Some(pool) = self.pool.take() {
            pool.close();
            r = pool.join();
        }
        drop(self.universe.take());
        r
    }
}

impl Drop for MpiPool {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

impl fmt::Debug for MpiPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiPool")
            .field("ranks", &self.ranks)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(checksum: u64, host: &str, cpus: usize) -> Hello {
        Hello {
            checksum,
            host: host.into(),
            cpus,
        }
    }

    #[test]
    fn a_forged_checksum_fails_the_handshake() {
        let hs = [hello(7, "a", 4), hello(7, "a", 4), hello(8, "b", 4)];
        let e = plan_workers(&hs, 0).unwrap_err();
        assert!(e.is_mpi());
        assert!(e.to_string().contains("ranks [2] run another build"), "{e}");
    }

    #[test]
    fn default_workers_share_a_host() {
        let hs = [
            hello(1, "a", 8),
            hello(1, "a", 8),
            hello(1, "a", 8),
            hello(1, "b", 2),
            hello(1, "a", 8),
        ];
        // Host a: 4 ranks on 8 CPUs; host b: one rank on 2.
        assert_eq!(plan_workers(&hs, 0).unwrap(), vec![0, 2, 2, 2, 2]);
        assert_eq!(plan_workers(&hs[..2], 3).unwrap(), vec![0, 3]);
        let small = [hello(1, "a", 2), hello(1, "a", 2), hello(1, "a", 2)];
        assert_eq!(plan_workers(&small, 0).unwrap(), vec![0, 1, 1]);
    }

    #[test]
    fn mpi_pool_is_send() {
        fn check<T: Send>() {}
        check::<MpiPool>();
    }
}
