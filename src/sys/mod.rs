//! Every system call of the crate, and the only module allowed `unsafe` code.
//!
//! Laid out by kernel facility, as nix is: [`fork`](fork) (the fork sites),
//! [`wait`](wait) (reaping, pidfds), [`signal`](signal) (dispositions,
//! masks, the supervisor's self-pipe, the graceful stop), [`fd`](fd) (pipes,
//! sockets, reads and writes, stdio), [`poll`](poll), [`proc`](proc) (ids,
//! threads, session, umask), [`mman`](mman) (shared mappings, memfd, POSIX
//! shm: the base of the shared state), [`futex`](futex), [`robust`](robust)
//! (robust process-shared mutexes), [`mem`](mem), [`time`](time), and
//! [`fn_addr`](fn_addr) (function addresses across `fork`).
//!
//! Each function here wraps one system call (or one short, fixed sequence of
//! them) behind a safe signature. Upper layers never see a raw pid or a raw fd
//! they must close by hand: pids are [`Pid`], fds are [`OwnedFd`] right after
//! the call that created them. Every `unsafe` block carries a `// SAFETY:`
//! comment naming the invariant it relies on.
//!
//! [`Pid`]: nix::unistd::Pid
//! [`OwnedFd`]: std::os::fd::OwnedFd
#![allow(unsafe_code)]

mod fd;
mod fn_addr;
mod fork;
mod futex;
mod mem;
mod mman;
#[cfg(feature = "mpi")]
mod mpi_send;
mod poll;
mod proc;
mod robust;
#[cfg(feature = "mpi")]
mod sched;
mod signal;
mod time;
mod wait;

pub(crate) use fd::*;
pub(crate) use fn_addr::*;
pub(crate) use fork::*;
pub(crate) use futex::*;
pub(crate) use mem::*;
pub(crate) use mman::*;
#[cfg(feature = "mpi")]
pub(crate) use mpi_send::*;
pub(crate) use poll::*;
pub(crate) use proc::*;
pub(crate) use robust::*;
#[cfg(feature = "mpi")]
pub(crate) use sched::*;
pub(crate) use signal::*;
pub(crate) use time::*;
pub(crate) use wait::*;

pub(crate) use nix::unistd::Pid;
