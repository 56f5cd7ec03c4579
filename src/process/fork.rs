//! The fork path of tasks: prepare in the parent, fork on the right thread,
//! register; and the check for a multi-threaded parent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::fork_thread::FORK_THREAD;
use super::identity::ProcessInfo;
use super::init::{bootstrap, Boot, Target};
use super::registry::{reap_finished, registry, Child, REAPER};
use super::spec::ChildSpec;
use crate::error::Result;
use crate::popen::Popen;
use crate::sys;
use crate::unwind;

/// Forks the child described by `spec` on this thread and registers it.
pub(super) fn fork_registered(spec: ChildSpec, target: Target) -> Result<Arc<Child>> {
    prepare_parent()?;
    let info = ProcessInfo {
        name: spec.name.clone(),
        pid: 0,
        daemon: spec.daemon,
    };
    // Held across the fork: no other thread can hold it at that instant, so
    // the child's copy is owned by the forking thread and the bootstrap can
    // release it. In the parent the closure (and the guard) is dropped right
    // after the fork.
    let registered = spec.registered;
    let boot = Boot::new(spec);
    let guard = registry();
    let popen = Popen::fork_lazy(move || bootstrap(Some(guard), boot, target))?;
    Ok(adopt(popen, info, registered))
}

/// The fork path of children that *become the program* (a supervisor
/// child, a daemon), as [`fork_registered`] is the one of tasks: the
/// registry is held across the fork (no other thread can hold it at that
/// instant); in the child it is cleared (the parent's `Process` children are
/// not the child's) and the child becomes `MainProcess`. `Ok(None)` in the
/// child, which returns into the caller and goes on as the program; the
/// child's [`Popen`] in the parent. The caller runs its [`ChildInit`]
/// (`super::ChildInit`) in the child when it is ready to.
pub(crate) fn fork_program() -> Result<Option<Popen>> {
    unwind::install_hook();
    let guard = registry();
    match Popen::fork_program() {
        Ok(None) => {
            let mut guard = guard;
            guard.clear();
            drop(guard);
            super::become_main_process();
            Ok(None)
        }
        other => {
            drop(guard);
            other
        }
    }
}

/// What the parent does before any task child is created, forked here or
/// by the fork server: the at-exit finalizer, the panic hook, the thread
/// check (`warn` when the fork happens here), /dev/null for the child's
/// stdin, and reaping the children that finished.
pub(crate) fn prepare_parent_for(fork_here: bool) -> Result<()> {
    crate::finalize::set_children_finalizer(super::registry::finalize_children);
    crate::finalize::ensure_registered();
    super::init::set_describer();
    unwind::install_hook();
    if fork_here {
        warn_if_threaded();
    }
    sys::prepare_dev_null()?;
    reap_finished();
    Ok(())
}

fn prepare_parent() -> Result<()> {
    prepare_parent_for(true)
}

/// Makes `popen` a child of ours: its [`Child`] entry, in the registry if
/// `registered`. For children forked here and by the fork server alike.
pub(crate) fn adopt(popen: Popen, info: ProcessInfo, registered: bool) -> Arc<Child> {
    let child = Arc::new(Child {
        info: ProcessInfo {
            pid: popen.pid(),
            ..info
        },
        popen,
    });
    if registered {
        registry().push(Arc::clone(&child));
    }
    child
}

static MULTI_THREAD_WARNED: AtomicBool = AtomicBool::new(false);
/// When the thread count was last read, in ms since `CHECK_EPOCH`.
static LAST_THREAD_CHECK_MS: AtomicU64 = AtomicU64::new(u64::MAX);
static CHECK_EPOCH: OnceLock<Instant> = OnceLock::new();
/// Reading `/proc/self/task` costs five system calls: do it on the first
/// fork and then at most this often.
const THREAD_CHECK_INTERVAL_MS: u64 = 250;

/// Warns once, through `log`, when a fork happens in a multi-threaded parent.
pub(crate) fn warn_if_threaded() {
    if MULTI_THREAD_WARNED.load(Ordering::Relaxed) || sys::single_threaded() {
        return;
    }
    let now = CHECK_EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64;
    let last = LAST_THREAD_CHECK_MS.load(Ordering::Relaxed);
    if last != u64::MAX && now.saturating_sub(last) < THREAD_CHECK_INTERVAL_MS {
        return;
    }
    LAST_THREAD_CHECK_MS.store(now, Ordering::Relaxed);
    let me = sys::getpid().as_raw() as u32;
    // The crate's own threads (the fork thread, the reaper) do not count.
    let ours = usize::from(FORK_THREAD.get().is_some_and(|(owner, _)| *owner == me))
        + usize::from(REAPER.get().is_some_and(|(owner, _)| *owner == me));
    if let Ok(n) = sys::thread_count() {
        if n > 1 + ours && !MULTI_THREAD_WARNED.swap(true, Ordering::Relaxed) {
            let message = threaded_fork_message(n - ours);
            if log::max_level() == log::LevelFilter::Off {
                // No logger: the user must still hear of it, once.
                sys::write_stderr_raw(format!("{message}\n").as_bytes());
            } else {
                log::warn!("{message}");
            }
        }
    }
}

/// The one warning about a fork from a multi-threaded process, naming the
/// fix.
pub(crate) fn threaded_fork_message(threads: usize) -> String {
    format!(
        "multiproc: forking a process with {threads} threads; only the forking thread \
         exists in the child, and locks held by the others stay locked there: call \
         multiproc::forkserver::start() first in main and use StartMethod::ForkServer \
         (see the \"Fork safety\" section of the multiproc docs)"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_threaded_fork_warning_names_the_fix() {
        let m = super::threaded_fork_message(3);
        assert!(m.contains("with 3 threads"), "{m}");
        assert!(m.contains("StartMethod::ForkServer"), "{m}");
        assert!(m.contains("forkserver::start()"), "{m}");
    }
}
