//! The crate's fork sites: [`fork_child`] for tasks, [`fork_returning`] for
//! a child that becomes the program; both on [`fork_with_std_locks`].

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
/// Only stdout holds a buffer: std's stderr is unbuffered, and flushing it
/// would only take and release its lock.
pub(crate) fn flush_std_streams() {
    let _ = io::stdout().flush();
}

/// `fork` with the stdout and stderr locks held (stdout flushed) across it:
/// no buffered text is duplicated into the child, and no other thread can be
/// inside `println!` at the instant of the fork, which would leave those
/// locks held forever in the child. Both sides release them right after the
/// fork (in the child the forking thread is their owner, so releasing is
/// legal). `Some(pid)` in the parent, `None` in the child.
///
/// In a process that has one thread (see [`single_threaded`]) no other
/// thread can hold either lock or write to stdout between a flush and the
/// fork, and none can appear before the fork: stdout is flushed and
/// neither lock is held across. Each lock released after the fork is a page
/// written on both sides, a copy-on-write fault (two of the ten more faults
/// a `Process` took than a bare fork, with `perf record -e page-faults -d`).
///
/// # Safety
/// In the child, the caller must either never return into frames that
/// belong to the parent's program (end in `_exit`, as [`fork_child`] does)
/// or be a documented point where the child becomes the program (as
/// [`fork_returning`](super::fork_returning) is). Before user code, the
/// child must take no lock another thread of the parent could have held.
///
/// `#[inline]`, as the child's bootstrap: the code a child runs after the
/// fork then sits with its caller's (a child maps every 64 KiB of code it
/// runs with a page fault of its own; the parent's mappings of code are not
/// copied by `fork`).
#[inline]
unsafe fn fork_with_std_locks() -> io::Result<Option<Pid>> {
    let (out, err) = if single_threaded() {
        let _ = io::stdout().flush();
        (None, None)
    } else {
        let mut out = io::stdout().lock();
        let _ = out.flush();
        (Some(out), Some(io::stderr().lock()))
    };
    // SAFETY: the caller upholds this function's contract for the child;
    // the only locks this code holds across the fork are the std stream
    // locks, released on both sides below.
    let forked = unsafe { nix::unistd::fork() };
    drop(err);
    drop(out);
    match forked {
        Err(e) => Err(e.into()),
        Ok(ForkResult::Parent { child }) => Ok(Some(child)),
        Ok(ForkResult::Child) => Ok(None),
    }
}

/// glibc's `__libc_single_threaded` (2.32 and later), looked up once with
/// `dlsym` (so that the crate still links and runs where it is missing:
/// musl, older glibc); null when it is missing.
static SINGLE_THREADED: std::sync::atomic::AtomicPtr<u8> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static SINGLE_THREADED_LOOKED_UP: std::sync::Once = std::sync::Once::new();

/// `true` only if the process has exactly one thread, the caller: glibc
/// sets `__libc_single_threaded` to false when a second thread is created
/// (`pthread_create`, which every std thread goes through). When it is
/// true, no other thread exists, and only the caller could start one.
/// `false` when it cannot be known.
pub(crate) fn single_threaded() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    SINGLE_THREADED_LOOKED_UP.call_once(|| {
        // SAFETY: `dlsym` with `RTLD_DEFAULT` and a NUL-terminated name only
        // looks a symbol up; it returns its address or null.
        let p = unsafe {
            nix::libc::dlsym(nix::libc::RTLD_DEFAULT, c"__libc_single_threaded".as_ptr())
        };
        SINGLE_THREADED.store(p.cast(), Ordering::Release);
    });
    let p = SINGLE_THREADED.load(Ordering::Acquire);
    if p.is_null() {
        return false;
    }
    // SAFETY: `p` is the address of glibc's `char __libc_single_threaded`,
    // a variable that lives as long as the process. glibc writes it with
    // plain stores when threads are created; it documents it for reading
    // by any code, and a byte read through an atomic is never torn.
    unsafe { AtomicU8::from_ptr(p) }.load(Ordering::Relaxed) != 0
}

/// Forks. The parent gets the child's pid; the child runs `child` and leaves
/// with `_exit(code)`: it never returns into the caller's stack.
///
/// Stdout and stderr are handled as [`fork_with_std_locks`] says. Whatever
/// else `child` captured (a registry guard, the user's target) is consumed
/// in the child and dropped in the parent after the fork.
pub(crate) fn fork_child<F: FnOnce() -> i32>(child: F) -> io::Result<Pid> {
    // SAFETY: the child arm runs `run_child`, whose type is `-> !`: it never
    // returns into the caller's frames and ends in `_exit`. Before the user's
    // code it takes no lock that another parent thread could hold.
    match unsafe { fork_with_std_locks() }? {
        Some(pid) => Ok(pid),
        None => {
            IN_FORKED_CHILD.store(true, Ordering::Relaxed);
            run_child(child)
        }
    }
}

/// Forks a child that *returns* into the caller and goes on running the
/// program: `Ok(None)` in the child, `Ok(Some(pid))` in the parent. This is
/// the pre-fork model (`fork_processes` returns a task id in each child) and
/// the daemon's (`Daemon::start` returns in the daemon), where the child is
/// the program from then on, not a task that must end in `_exit`.
///
/// Stdout and stderr are handled as [`fork_with_std_locks`] says. The child
/// is marked as a main process (see [`mark_main_process`]):
/// `multiproc::exit` there ends the process with `std::process::exit`,
/// running its at-exit handlers.
pub(crate) fn fork_returning() -> io::Result<Option<Pid>> {
    // SAFETY: the child returns into the caller's stack on purpose: the
    // callers (the supervisor and the daemon) document that from here on the
    // child *is* the program; a multi-threaded caller is warned about.
    let forked = unsafe { fork_with_std_locks() }?;
    if forked.is_none() {
        mark_main_process();
    }
    Ok(forked)
}

/// Leaves the process with `_exit(exitcode::UNWOUND)` if a panic unwinds through it: the
/// child must never unwind into the parent's copy of the stack.
struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        exit_immediately(crate::exitcode::UNWOUND)
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
    fn single_threaded_is_false_beside_another_thread() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        assert!(!single_threaded());
        // A child of a multi-threaded parent keeps glibc's `false` (it
        // cannot know the other threads are gone): the locks are taken
        // there, and released, as before.
        let pid = fork_child(|| {
            let _o = io::stdout().lock();
            let _e = io::stderr().lock();
            0
        })
        .unwrap();
        assert_eq!(sys::wait_blocking(pid).unwrap(), 0);
        drop(tx);
        let _ = other.join();
    }

    #[test]
    fn unwinding_child_exits_70() {
        let pid = fork_child(|| -> i32 { std::panic::resume_unwind(Box::new("escape")) }).unwrap();
        assert_eq!(sys::wait_blocking(pid).unwrap(), crate::exitcode::UNWOUND);
    }
}
