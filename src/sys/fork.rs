//! The crate's single fork site.

use std::io::{self, Write};
use std::mem;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::unistd::{ForkResult, Pid};

/// Set in a child right after `fork`, before anything else runs.
static IN_FORKED_CHILD: AtomicBool = AtomicBool::new(false);

/// `true` in a process that this crate forked (at any depth).
pub(crate) fn in_forked_child() -> bool {
    IN_FORKED_CHILD.load(Ordering::Relaxed)
}

/// Marks the calling process as a program of its own rather than a task
/// forked by this crate (the child of [`fork_returning`](super::fork_returning)):
/// `multiproc::exit` then runs the at-exit handlers, and panics go through
/// the usual hook.
pub(crate) fn mark_main_process() {
    IN_FORKED_CHILD.store(false, Ordering::Relaxed);
}

/// Flushes the std streams; errors (a closed stdout) are ignored on purpose.
pub(crate) fn flush_std_streams() {
    let _ = io::stdout().flush();
    let _ = io::stderr().flush();
}

/// Forks. The parent gets the child's pid; the child runs `child` and leaves
/// with `_exit(code)`: it never returns into the caller's stack.
///
/// Around the fork the parent holds the stdout and stderr locks, flushed: no
/// buffered text is duplicated into the child, and no other thread can be
/// inside `println!` at the instant of the fork, which would leave those locks
/// held forever in the child. Both sides release them right after the fork (in
/// the child the forking thread is their owner, so releasing is legal).
///
/// Whatever else `child` captured (a registry guard, the user's target) is
/// consumed in the child and dropped in the parent after the fork.
pub(crate) fn fork_child<F: FnOnce() -> i32>(child: F) -> io::Result<Pid> {
    let mut out = io::stdout().lock();
    let err = io::stderr().lock();
    let _ = out.flush();
    // SAFETY: the child arm runs `run_child`, whose type is `-> !`: it never
    // returns into the caller's frames and ends in `_exit`. Before the user's
    // code it takes no lock that another parent thread could hold (the std
    // stream locks are owned by this very thread across the fork).
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(e.into()),
        Ok(ForkResult::Parent { child: pid }) => {
            drop(err);
            drop(out);
            Ok(pid)
        }
        Ok(ForkResult::Child) => {
            IN_FORKED_CHILD.store(true, Ordering::Relaxed);
            drop(err);
            drop(out);
            run_child(child)
        }
    }
}

/// Leaves the process with `_exit(70)` if a panic unwinds through it: the
/// child must never unwind into the parent's copy of the stack.
struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        exit_immediately(70)
    }
}

fn run_child<F: FnOnce() -> i32>(f: F) -> ! {
    let guard = ExitOnUnwind;
    let code = f();
    mem::forget(guard);
    flush_std_streams();
    exit_immediately(code)
}

/// `_exit(code)`: no at-exit handlers, no destructors, no stdio flush.
pub(crate) fn exit_immediately(code: i32) -> ! {
    // SAFETY: `_exit` is async-signal-safe and always sound to call; skipping
    // destructors and atexit handlers is the point (they belong to the parent).
    unsafe { nix::libc::_exit(code) }
}

/// Registers `f` with `atexit(3)`.
pub(crate) fn register_atexit(f: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `f` is a plain `extern "C" fn()` with 'static lifetime, which is
    // exactly what atexit requires.
    let rc = unsafe { nix::libc::atexit(f) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::other("atexit registration failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;

    #[test]
    fn child_exit_code_and_no_return() {
        let pid = fork_child(|| 7).unwrap();
        assert_eq!(sys::wait_blocking(pid).unwrap(), 7);
    }

    #[test]
    fn stream_locks_usable_in_child() {
        // The child takes the std stream locks again: they were released after
        // the fork, so this cannot deadlock.
        let pid = fork_child(|| {
            let _o = io::stdout().lock();
            let _e = io::stderr().lock();
            0
        })
        .unwrap();
        assert_eq!(sys::wait_blocking(pid).unwrap(), 0);
    }

    #[test]
    fn unwinding_child_exits_70() {
        let pid = fork_child(|| -> i32 { std::panic::resume_unwind(Box::new("escape")) }).unwrap();
        assert_eq!(sys::wait_blocking(pid).unwrap(), 70);
    }
}
