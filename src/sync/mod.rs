//! Synchronization primitives shared between processes (and threads):
//! [`Lock`], [`RLock`], [`Semaphore`], [`Event`], [`Barrier`], [`Value`] and
//! [`Array`], as in Python's `multiprocessing`.
//!
//! Each handle owns (an `Arc` of) an anonymous `MAP_SHARED` mapping made when
//! the handle is created; a child forked afterwards maps the same pages, so a
//! clone captured by a [`Process`](crate::Process) closure, or a handle kept in
//! a `static` set before [`Pool::new`](crate::Pool::new), is the same object in
//! the parent and in every child. Every wait sleeps on a futex in that
//! mapping (no polling, no helper thread, no lock file), and every blocking
//! call has a variant with a timeout.
//!
//! The locks are *robust*: when a holder dies holding one (any signal,
//! `abort`, `_exit`), the next locker gets it at once and its guard reports
//! `owner_died()`, where Python's `multiprocessing.Lock` stays locked forever.

mod lock;

pub use lock::{Lock, LockGuard};
