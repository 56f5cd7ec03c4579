//! The at-exit finalizer, [`shutdown`] and [`exit`].

use std::sync::{Mutex, Once};
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sys;

/// How long a daemonic child gets between `SIGTERM` and `SIGKILL` at exit.
pub const DAEMON_GRACE: Duration = Duration::from_secs(2);

static REGISTERED: Once = Once::new();

/// Registers the finalizer with `atexit(3)` (once per process; called on the
/// first fork). Children inherit the registration but leave with `_exit`,
/// so it only runs in a child that calls `std::process::exit` itself, and
/// then finalizes that child's own children.
pub(crate) fn ensure_registered() {
    REGISTERED.call_once(|| {
        if let Err(e) = sys::register_atexit(run_at_exit) {
            log::warn!("multiproc: cannot register the at-exit finalizer: {e}");
        }
    });
}

/// Actions the finalizer runs at exit after [`shutdown`], in registration
/// order: layers above register here (the daemon removes its pid file), so
/// the finalizer depends on none of them.
static AT_EXIT_ACTIONS: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

/// Registers `action` to run at exit, after the children are finalized
/// (and registers the finalizer itself).
pub(crate) fn at_exit(action: fn()) {
    AT_EXIT_ACTIONS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(action);
    ensure_registered();
}

extern "C" fn run_at_exit() {
    // A panic must not cross the C boundary of atexit.
    let _ = std::panic::catch_unwind(|| {
        shutdown();
        // `try_lock`: a thread that holds it at exit (it only pushes) must
        // not hang the exit.
        let actions = match AT_EXIT_ACTIONS.try_lock() {
            Ok(a) => a.clone(),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().clone(),
            Err(std::sync::TryLockError::WouldBlock) => Vec::new(),
        };
        for action in actions {
            action();
        }
    });
}

/// The at-exit finalizer, callable early: sends `SIGTERM` to every live
/// daemonic child (then `SIGKILL` to those still alive after
/// [`DAEMON_GRACE`], one grace period for them all), then waits for every
/// other child of this process.
///
/// It runs by itself when `main` returns or `std::process::exit` is called
/// (registered with `atexit` on the first fork), and at the end of every
/// child this crate forks, for that child's own children. Like Python's, it
/// waits for non-daemonic children without a limit: a child that never ends
/// keeps the parent from exiting. Children of a [`Pool`](crate::Pool) are
/// the pool's business, not the finalizer's.
///
/// ```
/// let mut p = multiproc::Process::new(|| std::thread::sleep(std::time::Duration::from_secs(60)))
///     .with_daemon(true);
/// p.start()?;
/// multiproc::shutdown();
/// assert_eq!(p.exitcode(), Some(-15));
/// # Ok::<(), multiproc::Error>(())
/// ```
pub fn shutdown() {
    let f = FINALIZE_CHILDREN.load(Ordering::Acquire);
    if f != 0 {
        sys::fn_from_addr::<fn()>(f)();
    }
}

/// What [`shutdown`] runs: the process layer's finalizer of its children
/// (set on the first fork), as an address: lock-free, so a child can read
/// it whatever a parent thread held at the fork. Keeps this layer free of
/// the process layer.
static FINALIZE_CHILDREN: AtomicUsize = AtomicUsize::new(0);

/// Sets what [`shutdown`] runs (once per program; a child inherits it).
pub(crate) fn set_children_finalizer(f: fn()) {
    let f = sys::fn_addr(f);
    // Stored once: a write on every start would dirty the page again after
    // each fork (a copy-on-write fault in the parent).
    if FINALIZE_CHILDREN.load(Ordering::Acquire) != f {
        FINALIZE_CHILDREN.store(f, Ordering::Release);
    }
}

/// Ends the current process with `code`, as `sys.exit` does in a Python
/// child: in a process forked by this crate, finalizes its children, flushes
/// stdout and stderr and leaves with `_exit(code)` (no destructors, no
/// at-exit handlers of the parent); in the main process, calls
/// [`std::process::exit`], which runs the finalizer.
pub fn exit(code: i32) -> ! {
    if sys::in_forked_child() {
        shutdown();
        sys::flush_std_streams();
        sys::exit_immediately(code)
    }
    std::process::exit(code)
}
