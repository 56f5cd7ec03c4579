//! The one init every child of the crate runs after the fork: the
//! after-fork hooks, the death signal, and the bootstrap of a task.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::identity::{Identity, ProcessInfo, COUNTER, IDENTITY};
use super::registry::Child;
use super::spec::ChildSpec;
use crate::sys::{self, Sig};
use crate::unwind;

static AFTER_FORK: Mutex<Vec<fn()>> = Mutex::new(Vec::new());
/// How many hooks [`AFTER_FORK`] holds: a start with none takes no lock.
static AFTER_FORK_LEN: AtomicUsize = AtomicUsize::new(0);

/// Registers `hook` to run in every new child, before its target, in
/// registration order (Python's `os.register_at_fork(after_in_child=...)`).
///
/// The place to reseed a random number generator, reopen a log file or drop a
/// connection pool that must not be shared with the parent. A generator
/// seeded before the fork (for example `rand`'s `StdRng::seed_from_u64`, or
/// any PRNG state in a `static`) is *copied* into every child: without a
/// reseed here, all children draw the same numbers.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// static SEED: AtomicU64 = AtomicU64::new(0);
/// fn reseed() {
///     SEED.store(std::process::id() as u64, Ordering::Relaxed);
/// }
/// multiproc::register_after_fork(reseed);
/// let h = multiproc::spawn(|| SEED.load(Ordering::Relaxed))?;
/// let pid = h.pid() as u64;
/// assert_eq!(h.join()?, pid);
/// # Ok::<(), multiproc::Error>(())
/// ```
pub fn register_after_fork(hook: fn()) {
    let mut hooks = AFTER_FORK.lock().unwrap_or_else(|e| e.into_inner());
    hooks.push(hook);
    AFTER_FORK_LEN.store(hooks.len(), Ordering::Release);
}

/// Tells the panic hook how to name a child.
pub(super) fn set_describer() {
    unwind::set_describer(describe_for_panics);
}

/// The target of a child, boxed.
pub(crate) type Target = Box<dyn FnOnce() + Send + 'static>;

/// The part of a child's start that every child of this crate shares (a
/// `Process` or pool worker, a supervisor child, a daemon, a child of the
/// fork server), prepared in the parent before the fork and run in the
/// child right after it: the death signal with its check that the parent is
/// still there, then the [`register_after_fork`] hooks. The hooks are copied
/// out of their lock in the parent (the child takes no lock), as addresses:
/// the init is plain data that the fork server can receive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChildInit {
    /// Children that must die with their parent get `PR_SET_PDEATHSIG`.
    death_signal: Option<i32>,
    parent_pid: u32,
    after_fork: Vec<usize>,
}

impl ChildInit {
    /// In the parent, before the fork.
    pub(crate) fn prepare(death_signal: Option<Sig>) -> ChildInit {
        ChildInit::prepare_in(sys::getpid().as_raw() as u32, death_signal)
    }

    /// [`prepare`](ChildInit::prepare) in the parent whose pid is `parent_pid`.
    pub(crate) fn prepare_in(parent_pid: u32, death_signal: Option<Sig>) -> ChildInit {
        set_describer();
        let after_fork = if AFTER_FORK_LEN.load(Ordering::Acquire) == 0 {
            Vec::new()
        } else {
            AFTER_FORK
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|h| sys::fn_addr(*h))
                .collect()
        };
        ChildInit {
            death_signal: death_signal.map(|s| s as i32),
            parent_pid,
            after_fork,
        }
    }

    /// The fork server forks the child: the death signal then ties the
    /// child to the server (which dies with the caller), so the check after
    /// `prctl` looks for the server as the parent.
    pub(crate) fn forked_by(&mut self, pid: u32) {
        self.parent_pid = pid;
    }

    /// In the child: arranges the death signal. Returns the exit code to
    /// leave with if the child must not go on: [`exitcode::SETUP_FAILED`]
    /// if `prctl` failed, [`exitcode::PANICKED`]'s 1 after sending itself
    /// the death signal if the parent died before `prctl` ran.
    ///
    /// [`exitcode::SETUP_FAILED`]: crate::exitcode::SETUP_FAILED
    /// [`exitcode::PANICKED`]: crate::exitcode::PANICKED
    ///
    /// Inlined, so that a child without a death signal runs no code of it
    /// on a page of its own (a page fault in every such child).
    #[inline]
    pub(crate) fn die_with_parent(&self) -> std::result::Result<(), i32> {
        match self.death_signal {
            None => Ok(()),
            Some(sig) => self.arrange_death_signal(sig),
        }
    }

    #[inline(never)]
    fn arrange_death_signal(&self, sig: i32) -> std::result::Result<(), i32> {
        let Ok(sig) = Sig::try_from(sig) else {
            return Err(crate::exitcode::SETUP_FAILED);
        };
        if sys::set_parent_death_signal(sig).is_err() {
            return Err(crate::exitcode::SETUP_FAILED);
        }
        // The parent may have died before prctl ran: then no signal comes.
        if sys::getppid().as_raw() as u32 != self.parent_pid {
            let _ = sys::send_signal(sys::getpid(), sig);
            return Err(1);
        }
        Ok(())
    }

    /// In the child, just before its target: the after-fork hooks, in
    /// registration order.
    pub(crate) fn run_hooks(self) {
        for hook in self.after_fork {
            sys::fn_from_addr::<fn()>(hook)();
        }
    }

    /// In a child that becomes the program (a supervisor child), after
    /// [`fork_program`](super::fork_program): the death signal, the hooks.
    pub(crate) fn become_program(self) -> std::result::Result<(), i32> {
        self.die_with_parent()?;
        self.run_hooks();
        Ok(())
    }
}

/// A [`ChildSpec`] made ready for [`bootstrap`] before the fork: the
/// child's identity already boxed, so the child allocates nothing for it.
pub(crate) struct Boot {
    identity: Box<Identity>,
    /// Whether `ps` shows the name (given with `with_name`).
    os_name: bool,
    init: ChildInit,
}

impl Boot {
    pub(crate) fn new(spec: ChildSpec) -> Boot {
        Boot {
            identity: Box::new(Identity {
                ident: spec.ident,
                info: ProcessInfo {
                    name: spec.name,
                    // Read when asked for (see `Identity::info`).
                    pid: 0,
                    daemon: spec.daemon,
                },
                parent: spec.parent,
            }),
            os_name: spec.named,
            init: spec.init,
        }
    }
}

/// The child's life, from the fork to the exit code: reset the registry
/// (`registry` is the guard the forking thread held across the fork, if
/// any) and counters, arrange to die with the parent if asked, become
/// `current_process()`, stdin from /dev/null, the after-fork hooks, the
/// target under `catch_unwind`, then finalize our own children. Every task
/// child runs it: forked by the caller or by the fork server.
#[inline]
pub(crate) fn bootstrap(
    registry: Option<MutexGuard<'static, Vec<Arc<Child>>>>,
    boot: Boot,
    target: Target,
) -> i32 {
    if let Some(mut r) = registry {
        r.clear();
    }
    COUNTER.store(1, Ordering::Relaxed);
    if let Err(code) = boot.init.die_with_parent() {
        return code;
    }
    if boot.os_name {
        sys::set_os_name(&boot.identity.info.name);
    }
    IDENTITY.set_boxed(boot.identity);
    let _ = sys::stdin_from_dev_null();
    let init = boot.init;
    let code = match unwind::catch(move || {
        init.run_hooks();
        target()
    }) {
        Ok(()) => 0,
        Err(_) => crate::exitcode::PANICKED,
    };
    // Most children have none: then finalizing is skipped without a call
    // into code the child has not touched yet (a page fault each).
    if super::registry::has_children() {
        crate::finalize::shutdown();
    }
    code
}

/// How the panic line of a child names it: `(name, pid)`.
pub(super) fn describe_for_panics() -> (String, u32) {
    let me = super::current_process();
    (me.name().to_string(), me.pid())
}
