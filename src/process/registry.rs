//! The registry of our children and the reaper thread that reaps those
//! whose handles were dropped.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::fork_thread::{per_process, StartState};
use super::identity::ProcessInfo;
use crate::popen::Popen;
use crate::sys;

/// One child in the registry: shared by its [`Process`](super::Process) handle (if any is
/// left) and the registry, which keeps it until it has been reaped.
pub(crate) struct Child {
    pub(crate) popen: Popen,
    pub(crate) info: ProcessInfo,
}

/// Our live (or not yet reaped) children. Python's `_children`.
static REGISTRY: Mutex<Vec<Arc<Child>>> = Mutex::new(Vec::new());

pub(crate) fn registry() -> MutexGuard<'static, Vec<Arc<Child>>> {
    // A Vec of Arcs stays consistent whatever panicked while it was locked.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the registry lists any child (reaped or not).
#[inline]
pub(crate) fn has_children() -> bool {
    !registry().is_empty()
}

/// Reaps every finished child in the registry and drops it from there.
pub(crate) fn reap_finished() {
    registry().retain(|c| matches!(c.popen.poll(), Ok(None)));
}

pub(crate) fn forget_child(pid: u32) {
    registry().retain(|c| c.popen.pid() != pid);
}

/// The live children of the current process (started with [`Process`](crate::Process) or
/// [`spawn`](crate::spawn) and not yet finished). Reaps the finished ones on
/// the way, so a program that drops its handles leaves no zombie behind.
///
/// ```
/// let mut p = multiproc::Process::new(|| std::thread::sleep(std::time::Duration::from_secs(5)));
/// p.start()?;
/// assert!(multiproc::active_children().iter().any(|c| Some(c.pid()) == p.pid()));
/// p.kill()?;
/// p.join()?;
/// assert!(multiproc::active_children().iter().all(|c| Some(c.pid()) != p.pid()));
/// # Ok::<(), multiproc::Error>(())
/// ```
pub fn active_children() -> Vec<ProcessInfo> {
    let mut reg = registry();
    reg.retain(|c| matches!(c.popen.poll(), Ok(None)));
    reg.iter().map(|c| c.info.clone()).collect()
}

/// The reaper of this process: its pid (a forked child inherits the value
/// but not the thread) and the write end of its wake pipe.
pub(super) static REAPER: sys::LeakedCell<(u32, std::os::fd::OwnedFd)> = sys::LeakedCell::new();
static REAPER_INIT: StartState = StartState::new();
/// How long the reaper sleeps at most (a sentinel *pipe*, on kernels
/// without pidfds, can be held open by a sibling past the child's exit).
const REAPER_SLICE: Duration = Duration::from_secs(1);

/// Tells the reaper that a handle of a running child was dropped, starting
/// the reaper if this process has none yet.
pub(super) fn reaper_notify() {
    if let Some(wake) = per_process(&REAPER, &REAPER_INIT, start_reaper) {
        let _ = sys::write_all(std::os::fd::AsFd::as_fd(wake), &[1]);
    }
}

/// Starts the reaper thread; returns the write end of its wake pipe.
fn start_reaper() -> std::io::Result<std::os::fd::OwnedFd> {
    let (wake_r, wake_w) = sys::pipe()?;
    sys::set_nonblocking(std::os::fd::AsFd::as_fd(&wake_w))?;
    sys::set_nonblocking(std::os::fd::AsFd::as_fd(&wake_r))?;
    std::thread::Builder::new()
        .name("multiproc-reaper".into())
        .spawn(move || reaper_loop(wake_r))?;
    Ok(wake_w)
}

/// Sleeps on the sentinels of the children nobody holds a handle to (and
/// on the wake pipe), and reaps them as they exit.
fn reaper_loop(wake: std::os::fd::OwnedFd) {
    use std::os::fd::AsFd;
    let mut buf = [0u8; 64];
    loop {
        // Only the registry holds these: their handles were dropped.
        let orphans: Vec<Arc<Child>> = registry()
            .iter()
            .filter(|c| Arc::strong_count(c) == 1)
            .cloned()
            .collect();
        let mut fds = vec![wake.as_fd()];
        // A sentinel that cannot be opened now (the fd limit) is left out:
        // the slice below bounds the sleep, and the next turn tries again.
        fds.extend(orphans.iter().filter_map(|c| c.popen.sentinel_fd().ok()));
        let timeout = if orphans.is_empty() {
            None
        } else {
            Some(REAPER_SLICE)
        };
        if sys::poll_readable(&fds, timeout).is_err() {
            std::thread::sleep(REAPER_SLICE);
        }
        while matches!(sys::read(wake.as_fd(), &mut buf), Ok(n) if n > 0) {}
        drop(fds);
        drop(orphans);
        reap_finished();
    }
}

/// The finalizer of our children (what [`shutdown`](crate::shutdown)
/// runs): `SIGTERM` to every live daemonic child (then `SIGKILL` to those
/// still alive after [`DAEMON_GRACE`](crate::DAEMON_GRACE), one grace for
/// them all), then a wait for every other child.
pub(crate) fn finalize_children() {
    let children = {
        let mut reg = registry();
        if reg.is_empty() {
            // The common end of a child: nothing to stop, nothing to wait for.
            return;
        }
        reg.retain(|c| matches!(c.popen.poll(), Ok(None)));
        reg.clone()
    };
    // One grace for all the daemonic children, not one each.
    let daemonic: Vec<&Popen> = children
        .iter()
        .filter(|c| c.info.daemon())
        .map(|c| &c.popen)
        .collect();
    crate::popen::stop_all(&daemonic, sys::Sig::SIGTERM, crate::finalize::DAEMON_GRACE);
    for c in children.iter().filter(|c| !c.info.daemon()) {
        let _ = c.popen.wait(None);
    }
    reap_finished();
}
