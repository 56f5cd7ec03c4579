//! Python's `multiprocessing` model for Rust, built on `fork`.
//!
//! `multiproc` gives Rust programs real OS processes where threads are the
//! wrong tool: crash isolation (a segfaulting C library, an `abort`, a leak),
//! a hard kill of a runaway task, a parallel job whose items must not share a
//! heap. Children are created with `fork(2)`, supervised from the parent
//! with `waitpid(pid, WNOHANG)` and pidfds, and talk to it over Unix sockets
//! with serde-encoded frames.
//!
//! # Tour
//!
//! A [`Process`] runs a closure in a child; its exit code follows Python:
//! `0` when the closure returns, `1` when it panics, `n` after
//! [`exit(n)`](exit), `-s` when signal `s` killed it.
//!
//! ```
//! use multiproc::Process;
//! use std::time::Duration;
//!
//! let mut ok = Process::new(|| println!("hello from the child")).with_name("greeter");
//! ok.start()?;
//! assert_eq!(ok.join()?, 0);
//!
//! let mut stuck = Process::new(|| loop { std::thread::sleep(Duration::from_secs(1)) });
//! stuck.start()?;
//! assert_eq!(stuck.join_timeout(Duration::from_millis(50))?, None);
//! stuck.terminate()?;
//! assert_eq!(stuck.join()?, -15);
//! # Ok::<(), multiproc::Error>(())
//! ```
//!
//! [`spawn`] runs a closure in a child and brings its return value back;
//! a panic or a crash of the child is an [`Error`], not a crash of yours:
//!
//! ```
//! let h = multiproc::spawn(|| vec![1u32, 2, 3].iter().sum::<u32>())?;
//! assert_eq!(h.join()?, 6);
//!
//! let h = multiproc::spawn(|| -> u32 { std::process::abort() })?;
//! assert!(matches!(h.join(), Err(multiproc::Error::Died { exitcode: -6, .. })));
//! # Ok::<(), multiproc::Error>(())
//! ```
//!
//! [`pipe`] gives a framed duplex [`Connection`] for any serde value, and
//! [`wait`] waits on several connections and process sentinels at once.
//! [`current_process`], [`parent_process`] and [`active_children`] tell a
//! process who it is and who its children are; [`register_after_fork`] runs
//! hooks in every new child.
//!
//! At the end of `main` (and on [`shutdown`]) the finalizer sends `SIGTERM`
//! to daemonic children and waits for the others, as Python does. Daemonic
//! children also die with their parent if it is killed.
//!
//! A [`Pool`] maps plain `fn`s over items in forked workers, and survives a
//! worker that crashes: only the item it was running fails.
//!
//! ```
//! let pool = multiproc::Pool::new(2)?;
//! assert_eq!(pool.map(|x: u64| x + 1, 0..4u64)?, vec![1, 2, 3, 4]);
//! # Ok::<(), multiproc::Error>(())
//! ```
//!
//! Shared state works between processes as between threads: [`Lock`],
//! [`RLock`], [`Semaphore`], [`Event`], [`Barrier`], [`Value`] and [`Array`]
//! live in shared memory made before the fork, wait on futexes, and have a
//! timeout variant of every wait. The locks are robust: when a holder dies
//! holding one, the next locker takes it over at once and its guard says
//! [`owner_died`](LockGuard::owner_died). [`SharedMemory`] is a block of bytes
//! shared through `fork` or by name (POSIX shared memory).
//!
//! ```
//! use multiproc::{Process, Value};
//!
//! let hits = Value::new(0u32)?;
//! let h = hits.clone();
//! let mut child = Process::new(move || h.update(|n| *n += 1));
//! child.start()?;
//! child.join()?;
//! assert_eq!(hits.get(), 1);
//! # Ok::<(), multiproc::Error>(())
//! ```
//!
//! A [`Queue`] carries serde values between any number of producer and
//! consumer processes through shared memory; a [`JoinableQueue`] also
//! counts unfinished tasks. A message is in the queue when `put` returns,
//! and producers or consumers that are killed lose or tear nothing.
//!
//! ```
//! let q = multiproc::Queue::<String>::new()?;
//! let tx = q.clone();
//! let h = multiproc::spawn(move || tx.put(&"from the child".to_string()).is_ok())?;
//! assert!(h.join()?);
//! assert_eq!(q.get()?, "from the child");
//! # Ok::<(), multiproc::Error>(())
//! ```
//!
//! A program with threads (a tokio runtime, a logger, rayon) or a big heap
//! starts its children from a fork server instead: call
//! [`forkserver::start`] first in `main`, then ask for
//! [`StartMethod::ForkServer`] ([`Process::from_fn`],
//! [`PoolBuilder::start_method`], or [`set_start_method`] for both). The
//! children are forked from the small, single-threaded image the program
//! had at `start()`, so no lock a thread of yours holds is held in them, and
//! a start costs the same from a 4 GiB program as from a small one.
//!
//! For servers: [`fork_processes`] and [`task_id`] (tornado's pre-fork
//! model) on a [`Supervisor`] with signal forwarding, rolling restarts and a
//! back-off; [`Daemon`] to detach into the background with a locked pid
//! file. In those two, unlike everywhere else in the crate, the child
//! *returns* into the caller: from the fork on, the child is the program
//! (a server child, the daemon).
//!
//! Across machines, with the cargo feature `mpi`: `mpi::MpiPool` offers the
//! pool's `map`s on the ranks of an MPI job (`mpiexec -n 4 ./program`);
//! every rank calls `MpiPool::start()` first in `main`, rank 0 gets the
//! pool, the other ranks run its tasks in local pools.
//!
//! # Fork safety
//!
//! After `fork` the child holds a copy of the parent's memory but only *one*
//! thread: the one that called `fork`. Any lock that another thread held at
//! that instant is locked forever in the child, with no thread to release it.
//!
//! What this crate does about it:
//! - Its own code between the fork and your closure takes no lock another
//!   thread could hold: the locks it needs (its child registry, the stdout
//!   and stderr locks) are taken *before* the fork by the forking thread and
//!   released on both sides after it.
//! - Stdout and stderr are flushed before every fork (no text printed twice)
//!   and again before the child's `_exit` (a trailing `print!` still shows).
//! - A panic in the child is reported with one raw `write(2)`, not through
//!   std's panic hook, which takes the stderr and backtrace locks.
//! - The child ends with `_exit`: it never returns into your stack (a test
//!   harness, a server loop) and never runs your destructors twice.
//! - Forking from a process with several threads gives one warning, through
//!   the `log` crate, or as one line on stderr when no logger is installed.
//!
//! What is fine in the child: allocation (glibc's malloc has fork handlers),
//! `println!`, files, sockets, anything your own single thread set up.
//! What breaks: a `Mutex` (yours or a library's) that another thread held at
//! fork time, a thread pool or async runtime started before the fork (its
//! threads do not exist in the child), a logger whose background thread
//! flushes for you.
//!
//! What to do: call [`forkserver::start`] first in `main` and use
//! [`StartMethod::ForkServer`] (the cure: children then come from a clean,
//! single-threaded image); otherwise fork before starting threads where you
//! can; create pools at the start of `main`; do not use a runtime inherited from the parent in
//! the child (build a new one there); reseed random generators in a
//! [`register_after_fork`] hook. This is the same contract as Python's
//! `fork` start method, made explicit.
//!
//! # Caveats
//! - Dropping a [`Process`] or [`JoinHandle`] does not kill or wait for the
//!   child; a background thread of the crate (`multiproc-reaper`, started by
//!   the first such drop) reaps it when it exits, and [`Process::start`],
//!   [`active_children`] and the finalizer reap too. The crate only ever waits for pids it
//!   forked (never `waitpid(-1)`): children of [`std::process::Command`] or
//!   other libraries keep their statuses.
//! - `PR_SET_PDEATHSIG` (used for daemonic children) fires when the *thread*
//!   that forked the child exits. Daemonic children started from a thread
//!   other than the main one are therefore forked by a dedicated, long-lived
//!   thread of this crate, so they live as long as the process.
//! - With `panic = "abort"` a panicking child aborts (exit code `-6`).
//!
//! # Platform support
//! Linux (pidfds from 5.3, with a sentinel-pipe fallback on older kernels).
#![deny(unsafe_code)]
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_debug_implementations)]
#![doc(test(attr(deny(warnings))))]

mod codec;
mod connection;
mod daemon;
mod error;
pub mod exitcode;
mod finalize;
pub mod forkserver;
#[cfg(feature = "mpi")]
pub mod mpi;
mod pool;
mod popen;
mod process;
mod queue;
mod region;
mod shm;
mod spawn;
mod stop;
mod supervisor;
mod sync;
mod sys;
mod unwind;

pub use codec::DEFAULT_MAX_FRAME_LEN;
pub use connection::{pipe, wait, Connection};
pub use error::{CodecError, CodecErrorKind, Error, Result};
pub use finalize::{exit, shutdown, DAEMON_GRACE};
pub use forkserver::{set_start_method, StartMethod};
pub use popen::Popen;
pub use process::{
    active_children, cpu_count, current_process, parent_process, register_after_fork, Process,
    ProcessInfo,
};
pub use spawn::{spawn, JoinHandle};
pub use stop::StopSignal;

// Re-exports of the pool layer (issue 3).
pub use pool::{AsyncResult, Imap, ImapUnordered, Pool, PoolBuilder};

// The supervisor layer.
pub use supervisor::{fork_processes, task_id, Role, Stopped, Supervisor};

// The daemon layer.
pub use daemon::Daemon;

// Shared state (issue 10).
pub use shm::SharedMemory;
pub use sync::{
    Array, ArrayGuard, Barrier, Event, Lock, LockGuard, RLock, RLockGuard, Semaphore, Value,
    ValueGuard,
};

// Re-exports of the queue layer (issue 10).
pub use queue::{JoinableQueue, Queue};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
