//! Per-process crate threads started lazily and lock-free
//! ([`per_process`]), and the fork thread that forks children which must
//! outlive the thread that asked for them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys;

/// Who is starting (or started, or failed to start) a per-process crate
/// thread: the pid in the high half, the state in the low half. Lock-free:
/// a forked child inherits its parent's word, sees a pid not its own, and
/// starts its own thread, where a `Mutex` would be inherited locked.
pub(crate) struct StartState(AtomicU64);

const START_NONE: u64 = 0;
const START_RUNNING: u64 = 1;
const START_DONE: u64 = 2;
const START_FAILED: u64 = 3;

impl StartState {
    pub(crate) const fn new() -> StartState {
        StartState(AtomicU64::new(START_NONE))
    }
}

fn start_word(pid: u32, state: u64) -> u64 {
    (u64::from(pid) << 32) | state
}

/// The value in `cell` that belongs to this process, made by `start` if
/// there is none yet: a forked child inherits its parent's value (the pid
/// says whose it is) but not the thread behind it.
///
/// One caller per process runs `start`; the others *wait* for it to finish
/// (they never go on without the value: a daemonic child forked on the
/// wrong thread would die with that thread). `None` only if `start` failed
/// (the next call tries again).
pub(crate) fn per_process<T>(
    cell: &'static sys::LeakedCell<(u32, T)>,
    state: &StartState,
    start: impl FnOnce() -> std::io::Result<T>,
) -> Option<&'static T> {
    let pid = sys::getpid().as_raw() as u32;
    let ours = || {
        cell.get()
            .filter(|(owner, _)| *owner == pid)
            .map(|(_, v)| v)
    };
    let mut start = Some(start);
    let mut waited = false;
    let mut spins = 0u32;
    loop {
        if let Some(v) = ours() {
            return Some(v);
        }
        let word = state.0.load(Ordering::Acquire);
        let (owner, st) = ((word >> 32) as u32, word & 0xffff_ffff);
        if owner == pid && st == START_RUNNING {
            // Another thread of ours is starting it: wait. Starting a thread
            // takes microseconds; back off from yields to short sleeps.
            waited = true;
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
            continue;
        }
        if owner == pid && st == START_FAILED && waited {
            // The start we waited for failed: report it rather than loop.
            return None;
        }
        if owner == pid && st == START_DONE {
            // Published before DONE: `ours()` above will see it.
            continue;
        }
        // Nobody of this process has it (none yet, a parent's value, or an
        // earlier failure): claim the start.
        if state
            .0
            .compare_exchange(
                word,
                start_word(pid, START_RUNNING),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            continue;
        }
        let start = start.take().expect("a caller claims the start once");
        return match start() {
            Ok(v) => {
                cell.set((pid, v));
                state
                    .0
                    .store(start_word(pid, START_DONE), Ordering::Release);
                ours()
            }
            Err(e) => {
                state
                    .0
                    .store(start_word(pid, START_FAILED), Ordering::Release);
                log::warn!("multiproc: cannot start a crate thread: {e}");
                None
            }
        };
    }
}

type ForkJob = Box<dyn FnOnce() + Send + 'static>;

/// The fork thread of this process: its pid (a forked child inherits the
/// value but not the thread, and must start its own) and its job queue.
/// Lock-free to read, so a child can look at it safely.
pub(super) static FORK_THREAD: sys::LeakedCell<(u32, crossbeam_channel::Sender<ForkJob>)> =
    sys::LeakedCell::new();
static FORK_THREAD_INIT: StartState = StartState::new();

/// Runs `job` on a thread that lives as long as the process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends,
/// not the process. A daemonic child (or pool worker) started from a
/// short-lived thread — a test, a thread-pool task, a lazy static's
/// initializer — would be killed as soon as that thread returned. So such
/// children are forked from this one long-lived thread instead; children
/// started from the main thread are forked right there.
///
/// # Errors
/// [`Error::Io`] if the fork thread cannot be started: forking here
/// instead would tie the child's life to the calling thread.
pub(crate) fn on_fork_thread<T: Send + 'static>(
    job: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let Some(tx) = per_process(&FORK_THREAD, &FORK_THREAD_INIT, start_fork_thread) else {
        return Err(Error::Io(std::io::Error::other(
            "cannot start the multiproc fork thread",
        )));
    };
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let job: ForkJob = Box::new(move || {
        let _ = done_tx.send(job());
    });
    tx.send(job).expect("the multiproc fork thread never exits");
    done_rx
        .recv()
        .expect("the multiproc fork thread answers every job")
}

/// Starts the fork thread; returns its job queue.
fn start_fork_thread() -> std::io::Result<crossbeam_channel::Sender<ForkJob>> {
    let (tx, rx) = crossbeam_channel::unbounded::<ForkJob>();
    std::thread::Builder::new()
        .name("multiproc-fork".into())
        .stack_size(8 << 20)
        .spawn(move || {
            // A thread inherits its creator's signal mask; children forked
            // here must not start with SIGTERM blocked.
            let _ = sys::unblock_all_signals();
            for job in rx {
                job();
            }
        })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Threads that find the start under way wait for it, however long it
    /// takes, and all get the one value (they used to give up after a
    /// bounded number of yields and go on without it).
    #[test]
    fn per_process_waits_for_a_slow_start() {
        static CELL: sys::LeakedCell<(u32, u64)> = sys::LeakedCell::new();
        static STATE: StartState = StartState::new();
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let go = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let go = Arc::clone(&go);
                std::thread::spawn(move || {
                    go.wait();
                    per_process(&CELL, &STATE, || {
                        STARTS.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(300));
                        Ok(42)
                    })
                    .copied()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), Some(42));
        }
        assert_eq!(STARTS.load(Ordering::SeqCst), 1);
    }

    /// A failed start is `None` for the caller and those that waited for
    /// it; a later call tries again.
    #[test]
    fn per_process_retries_after_a_failed_start() {
        static CELL: sys::LeakedCell<(u32, u64)> = sys::LeakedCell::new();
        static STATE: StartState = StartState::new();
        let failed = per_process(&CELL, &STATE, || Err(std::io::Error::other("no")));
        assert_eq!(failed, None);
        assert_eq!(per_process(&CELL, &STATE, || Ok(7)).copied(), Some(7));
        assert_eq!(per_process(&CELL, &STATE, || Ok(8)).copied(), Some(7));
    }
}
