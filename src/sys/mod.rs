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
mod fallocate;
mod fd;
mod fork;
mod futex;
mod mem;
mod mman;
mod pool;
mod proc;
mod robust;
mod server;
mod signal;
mod view;
mod wait;

#[allow(unused_imports)]
pub(crate) use daemon::*;
pub(crate) use fallocate::*;
pub(crate) use fd::*;
pub(crate) use fork::*;
pub(crate) use futex::*;
pub(crate) use mem::*;
pub(crate) use mman::*;
#[allow(unused_imports)]
pub(crate) use pool::*;
pub(crate) use proc::*;
pub(crate) use robust::*;
#[allow(unused_imports)]
pub(crate) use server::*;
pub(crate) use signal::*;
pub(crate) use view::*;
pub(crate) use wait::*;

pub(crate) use nix::unistd::Pid;
