//! Who a process is: [`ProcessInfo`], [`current_process`], [`parent_process`].

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::sys;

/// The name, pid and daemon flag of a process: what [`current_process`],
/// [`parent_process`] and [`active_children`](crate::active_children) report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    pub(super) name: String,
    pub(super) pid: u32,
    pub(super) daemon: bool,
}

impl ProcessInfo {
    /// The process's name: `"MainProcess"` for the process that was not
    /// forked by this crate, `"Process-N"` (nested `"Process-1:2"`) or the
    /// name given with [`Process::with_name`](crate::Process::with_name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is daemonic.
    pub fn daemon(&self) -> bool {
        self.daemon
    }
}

/// Who the current process is, set once in each child right after the fork.
pub(super) struct Identity {
    /// `"1"`, `"1:2"`, …: the path of counters from the main process.
    pub(super) ident: String,
    /// Name and daemon flag; the pid is read when asked for (`getpid`), so
    /// the child makes no system call for it at start.
    pub(super) info: ProcessInfo,
    pub(super) parent: ProcessInfo,
}

/// Empty in the main process; in a child, set once by the bootstrap before
/// any other thread can exist. Lock-free, so reading it after a fork is safe.
pub(super) static IDENTITY: sys::LeakedCell<Identity> = sys::LeakedCell::new();

/// The next `N` of a default `Process-N` name; reset to 1 in every child.
pub(super) static COUNTER: AtomicUsize = AtomicUsize::new(1);

pub(super) fn identity() -> Option<&'static Identity> {
    IDENTITY.get()
}

/// The process this code runs in.
///
/// ```
/// assert_eq!(multiproc::current_process().name(), "MainProcess");
/// ```
pub fn current_process() -> ProcessInfo {
    match identity() {
        Some(id) => ProcessInfo {
            name: id.info.name.clone(),
            pid: sys::getpid().as_raw() as u32,
            daemon: id.info.daemon,
        },
        None => ProcessInfo {
            name: "MainProcess".to_string(),
            pid: sys::getpid().as_raw() as u32,
            daemon: false,
        },
    }
}

/// Makes the calling process a main process of its own: a child of the
/// supervisor or a daemon, which goes on running the program. It is
/// `MainProcess` with its own pid, without a parent process, and without
/// the children of the process it was forked from.
pub(crate) fn become_main_process() {
    IDENTITY.clear();
    COUNTER.store(1, Ordering::Relaxed);
}

/// The process that forked this one, if this crate forked it (`None` in the
/// main process).
pub fn parent_process() -> Option<ProcessInfo> {
    identity().map(|id| id.parent.clone())
}

/// The number of CPUs available to this process.
pub fn cpu_count() -> usize {
    num_cpus::get()
}
