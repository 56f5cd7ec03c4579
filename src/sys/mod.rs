//! Every system call of the crate, and the only module allowed `unsafe` code.
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

mod daemon;
mod fd;
mod fork;
mod forkserver;
mod mem;
mod pool;
mod proc;
mod server;
mod signal;
mod wait;

#[allow(unused_imports)]
pub(crate) use daemon::*;
pub(crate) use fd::*;
pub(crate) use fork::*;
pub(crate) use forkserver::*;
pub(crate) use mem::*;
#[allow(unused_imports)]
pub(crate) use pool::*;
pub(crate) use proc::*;
#[allow(unused_imports)]
pub(crate) use server::*;
pub(crate) use signal::*;
pub(crate) use wait::*;

pub(crate) use nix::unistd::Pid;
