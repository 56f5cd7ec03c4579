//! [`Process`], the child bootstrap, and the registry of our children.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::popen::Popen;
use crate::sys::{self, Sig};
use crate::unwind;

/// The name, pid and daemon flag of a process: what [`current_process`],
/// [`parent_process`] and [`active_children`] report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    name: String,
    pid: u32,
    daemon: bool,
}

impl ProcessInfo {
    /// The process's name: `"MainProcess"` for the process that was not
    /// forked by this crate, `"Process-N"` (nested `"Process-1:2"`) or the
    /// name given with [`Process::with_name`].
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
struct Identity {
    /// `"1"`, `"1:2"`, …: the path of counters from the main process.
    ident: String,
    info: ProcessInfo,
    parent: ProcessInfo,
}

/// Empty in the main process; in a child, set once by the bootstrap before
/// any other thread can exist. Lock-free, so reading it after a fork is safe.
static IDENTITY: sys::LeakedCell<Identity> = sys::LeakedCell::new();

/// The next `N` of a default `Process-N` name; reset to 1 in every child.
static COUNTER: AtomicUsize = AtomicUsize::new(1);

fn identity() -> Option<&'static Identity> {
    IDENTITY.get()
}

/// The process this code runs in.
///
/// ```
/// assert_eq!(multiproc::current_process().name(), "MainProcess");
/// ```
pub fn current_process() -> ProcessInfo {
    match identity() {
        Some(id) => id.info.clone(),
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

/// One child in the registry: shared by its [`Process`] handle (if any is
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

/// Reaps every finished child in the registry and drops it from there.
pub(crate) fn reap_finished() {
    registry().retain(|c| matches!(c.popen.poll(), Ok(None)));
}

pub(crate) fn forget_child(pid: u32) {
    registry().retain(|c| c.popen.pid() != pid);
}

/// A snapshot of the registry.
pub(crate) fn children() -> Vec<Arc<Child>> {
    registry().clone()
}

/// The live children of the current process (started with [`Process`] or
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

static AFTER_FORK: Mutex<Vec<fn()>> = Mutex::new(Vec::new());

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
    AFTER_FORK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(hook);
}

/// The target of a child, boxed.
type Target = Box<dyn FnOnce() + Send + 'static>;

/// Everything the bootstrap needs, prepared in the parent: the child
/// allocates nothing on its way to the target (after a fork, every page it
/// writes is copied, and the parent waits for that in `join`).
struct ChildSpec {
    /// The child's identity, boxed in the parent, published by the child.
    identity: Box<Identity>,
    /// What every child of the crate does first (see [`ChildInit`]).
    init: ChildInit,
    /// Listed in the registry (see [`Process::unregistered`]).
    registered: bool,
}

/// The part of a child's start that every child of this crate shares (a
/// `Process` or pool worker, a supervisor child, a daemon), prepared in the
/// parent before the fork and run in the child right after it: the death
/// signal with its check that the parent is still there, then the
/// [`register_after_fork`] hooks. The hooks are copied out of their lock in
/// the parent: the child takes no lock.
pub(crate) struct ChildInit {
    /// Children that must die with this process get `PR_SET_PDEATHSIG`.
    death_signal: Option<Sig>,
    parent_pid: u32,
    after_fork: Vec<fn()>,
}

impl ChildInit {
    /// In the parent, before the fork.
    pub(crate) fn prepare(death_signal: Option<Sig>) -> ChildInit {
        ChildInit {
            death_signal,
            parent_pid: sys::getpid().as_raw() as u32,
            after_fork: AFTER_FORK.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// In the child: arranges the death signal. Returns the exit code to
    /// leave with if the child must not go on: [`exitcode::SETUP_FAILED`]
    /// if `prctl` failed, [`exitcode::PANICKED`]'s 1 after sending itself
    /// the death signal if the parent died before `prctl` ran.
    ///
    /// [`exitcode::SETUP_FAILED`]: crate::exitcode::SETUP_FAILED
    /// [`exitcode::PANICKED`]: crate::exitcode::PANICKED
    pub(crate) fn die_with_parent(&self) -> std::result::Result<(), i32> {
        if let Some(sig) = self.death_signal {
            if sys::set_parent_death_signal(sig).is_err() {
                return Err(crate::exitcode::SETUP_FAILED);
            }
            // The parent may have died before prctl ran: then no signal comes.
            if sys::getppid().as_raw() as u32 != self.parent_pid {
                let _ = sys::send_signal(sys::getpid(), sig);
                return Err(1);
            }
        }
        Ok(())
    }

    /// In the child, just before its target: the after-fork hooks, in
    /// registration order.
    pub(crate) fn run_hooks(self) {
        for hook in self.after_fork {
            hook();
        }
    }

    /// In a child that becomes the program (a supervisor child, a daemon):
    /// forget the parent's children (`registry` is the guard held across
    /// the fork, if any), become `MainProcess`, the death signal, the hooks.
    pub(crate) fn become_program(
        self,
        registry: Option<MutexGuard<'static, Vec<Arc<Child>>>>,
    ) -> std::result::Result<(), i32> {
        if let Some(mut r) = registry {
            r.clear();
        }
        become_main_process();
        self.die_with_parent()?;
        self.run_hooks();
        Ok(())
    }
}

/// A process running a closure, created with [`Process::new`] and started with
/// [`Process::start`] (Python's `multiprocessing.Process`).
///
/// The child is a `fork` of the caller: it sees a copy of the parent's memory
/// at the moment of `start`, runs the target, and leaves with `_exit` — it
/// never returns into the caller's stack and never runs the parent's
/// destructors or at-exit handlers. Its exit code is 0 when the target
/// returns, 1 when it panics (after one line on stderr naming the process and
/// the message), `n` after [`exit(n)`](crate::exit), and `-s` when a signal
/// `s` killed it.
///
/// Dropping a `Process` neither kills nor waits for the child. A child whose
/// handle was dropped while it ran is reaped as soon as it exits by a
/// background thread of this crate (`multiproc-reaper`, started on the
/// first such drop, sleeping on the children's pidfds): a fork-per-connection
/// server that drops its handles leaves no zombie, even when idle, without a
/// `SIGCHLD` handler. [`start`](Process::start) and [`active_children`] also
/// reap finished children. At the end of `main` the at-exit finalizer
/// terminates daemonic children and joins the others (see
/// [`shutdown`](crate::shutdown)).
///
/// ```
/// use multiproc::Process;
/// let mut p = Process::new(|| multiproc::exit(3)).with_name("worker");
/// p.start()?;
/// assert_eq!(p.join()?, 3);
/// assert_eq!(p.exitcode(), Some(3));
/// assert_eq!(p.name(), "worker");
/// # Ok::<(), multiproc::Error>(())
/// ```
pub struct Process {
    target: Option<Target>,
    ident: String,
    name: String,
    daemon: bool,
    /// Listed in the registry (`active_children`, the at-exit finalizer).
    /// Pool workers are not: decided before the fork, never undone.
    registered: bool,
    child: Option<Arc<Child>>,
}

impl Process {
    /// A process that will run `target` once started. Its default name is
    /// `Process-N`, numbered per parent (`Process-1:2` for the second child
    /// of `Process-1`).
    pub fn new(target: impl FnOnce() + Send + 'static) -> Process {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let ident = match identity() {
            Some(id) => format!("{}:{n}", id.ident),
            None => n.to_string(),
        };
        Process {
            target: Some(Box::new(target)),
            name: format!("Process-{ident}"),
            ident,
            daemon: false,
            registered: true,
            child: None,
        }
    }

    /// Keeps the child out of the registry: it is never listed by
    /// [`active_children`], signalled by the at-exit finalizer or reaped by
    /// the reaper thread. For children another part of the crate owns and
    /// reaps (pool workers).
    pub(crate) fn unregistered(mut self) -> Process {
        self.registered = false;
        self
    }

    /// Sets the process's name (shown by [`current_process`] in the child,
    /// and, cut to 15 bytes, by `ps`).
    pub fn with_name(mut self, name: impl Into<String>) -> Process {
        self.name = name.into();
        self
    }

    /// Makes the process daemonic: it is sent `SIGTERM` (then `SIGKILL` after
    /// a grace period) by the at-exit finalizer instead of being waited for,
    /// and it is killed if the parent process dies, even by `SIGKILL`.
    pub fn with_daemon(mut self, daemon: bool) -> Process {
        self.daemon = daemon;
        self
    }

    /// Forks the child and runs the target in it.
    ///
    /// Also reaps the children of this process that have finished (Python's
    /// `_cleanup`), so a program that starts processes and drops their
    /// handles leaves no zombies.
    ///
    /// # Errors
    /// [`Error::AlreadyStarted`] on a second call; [`Error::Io`] if the fork
    /// fails (`EAGAIN` at the process limit). A failed start consumes the
    /// target: a later call returns `AlreadyStarted`.
    pub fn start(&mut self) -> Result<()> {
        let Some(target) = self.target.take() else {
            return Err(Error::AlreadyStarted);
        };
        let parent = current_process();
        let spec = ChildSpec {
            identity: Box::new(Identity {
                ident: self.ident.clone(),
                info: ProcessInfo {
                    name: self.name.clone(),
                    pid: 0,
                    daemon: self.daemon,
                },
                parent,
            }),
            init: ChildInit::prepare(self.daemon.then_some(Sig::SIGKILL)),
            registered: self.registered,
        };
        let child = if spec.init.death_signal.is_some() && !sys::is_main_thread() {
            // A child that must die with the process, asked for from a thread
            // that may end before it: fork on the fork thread (see
            // `on_fork_thread`).
            on_fork_thread(move || fork_registered(spec, target))
        } else {
            fork_registered(spec, target)
        };
        self.child = Some(child?);
        Ok(())
    }

    fn child(&self) -> Result<&Child> {
        self.child.as_deref().ok_or(Error::NotStarted)
    }

    /// Waits for the child to exit and returns its exit code.
    ///
    /// # Errors
    /// [`Error::NotStarted`] before [`start`](Process::start); [`Error::Io`]
    /// if waiting fails. A child whose status something else reaped (a
    /// `waitpid(-1)` elsewhere, `SIGCHLD` ignored) gives
    /// [`exitcode::UNKNOWN`](crate::exitcode::UNKNOWN).
    pub fn join(&self) -> Result<i32> {
        let child = self.child()?;
        let code = child
            .popen
            .wait(None)?
            .expect("a wait without a deadline returns an exit code");
        forget_child(child.popen.pid());
        Ok(code)
    }

    /// Waits at most `timeout` for the child to exit: `Ok(None)` if it is
    /// still running.
    ///
    /// # Errors
    /// As [`join`](Process::join).
    pub fn join_timeout(&self, timeout: Duration) -> Result<Option<i32>> {
        let child = self.child()?;
        let code = child.popen.wait(Some(timeout))?;
        if code.is_some() {
            forget_child(child.popen.pid());
        }
        Ok(code)
    }

    /// Whether the child has been started and has not exited yet.
    pub fn is_alive(&self) -> bool {
        self.child
            .as_ref()
            .is_some_and(|c| matches!(c.popen.poll(), Ok(None)))
    }

    /// The exit code: `None` before start and while running; `n` for an exit
    /// status, `-s` for death by signal `s`.
    pub fn exitcode(&self) -> Option<i32> {
        self.child
            .as_ref()
            .and_then(|c| c.popen.poll().ok().flatten())
    }

    /// Sends `SIGTERM` to the child (nothing if it has already been reaped).
    ///
    /// # Errors
    /// [`Error::NotStarted`] before [`start`](Process::start); [`Error::Io`]
    /// if `kill(2)` fails.
    pub fn terminate(&self) -> Result<()> {
        self.child()?.popen.terminate()
    }

    /// Sends `SIGKILL` to the child (nothing if it has already been reaped).
    ///
    /// # Errors
    /// As [`terminate`](Process::terminate).
    pub fn kill(&self) -> Result<()> {
        self.child()?.popen.kill()
    }

    /// The child's pid, once started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.popen.pid())
    }

    /// The process's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the process is daemonic.
    pub fn daemon(&self) -> bool {
        self.daemon
    }

    /// An fd that polls readable once the child has exited (its pidfd, or a
    /// sentinel pipe on old kernels), for `poll`/epoll, mio or tokio's
    /// `AsyncFd`, or [`wait`](crate::wait). `None` before start.
    pub fn sentinel(&self) -> Option<BorrowedFd<'_>> {
        self.child.as_ref().map(|c| c.popen.sentinel())
    }

    /// The [`Popen`] under this process, once started.
    pub fn popen(&self) -> Option<&Popen> {
        self.child.as_ref().map(|c| &c.popen)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let running = child.popen.returncode().is_none();
            // Release our reference first: the reaper looks for children
            // that only the registry still holds.
            drop(child);
            if running {
                reaper_notify();
            }
        }
    }
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("daemon", &self.daemon)
            .field("pid", &self.pid())
            .field("exitcode", &self.exitcode())
            .finish()
    }
}

/// Forks the child described by `spec` on this thread and registers it.
fn fork_registered(spec: ChildSpec, target: Target) -> Result<Arc<Child>> {
    crate::finalize::ensure_registered();
    unwind::install_hook();
    warn_if_threaded();
    sys::prepare_dev_null()?;
    reap_finished();
    let info = spec.identity.info.clone();
    // Held across the fork: no other thread can hold it at that instant, so
    // the child's copy is owned by the forking thread and the bootstrap can
    // release it. In the parent the closure (and the guard) is dropped right
    // after the fork.
    let registered = spec.registered;
    let guard = registry();
    let popen = Popen::fork_raw(move || bootstrap(guard, spec, target))?;
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
    Ok(child)
}

/// The child's life, from the fork to the exit code: reset the registry and
/// counters, become `current_process()`, arrange to die with the parent if
/// asked, stdin from /dev/null, the after-fork hooks, the target under
/// `catch_unwind`, then finalize our own children.
fn bootstrap(
    mut registry: MutexGuard<'static, Vec<Arc<Child>>>,
    mut spec: ChildSpec,
    target: Target,
) -> i32 {
    registry.clear();
    drop(registry);
    COUNTER.store(1, Ordering::Relaxed);
    let me = sys::getpid().as_raw() as u32;
    if let Err(code) = spec.init.die_with_parent() {
        return code;
    }
    sys::set_os_name(&spec.identity.info.name);
    spec.identity.info.pid = me;
    IDENTITY.set_boxed(spec.identity);
    let _ = sys::stdin_from_dev_null();
    let init = spec.init;
    let code = match unwind::catch(move || {
        init.run_hooks();
        target()
    }) {
        Ok(()) => 0,
        Err(_) => crate::exitcode::PANICKED,
    };
    crate::finalize::shutdown();
    code
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
    if MULTI_THREAD_WARNED.load(Ordering::Relaxed) {
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
            log::warn!(
                "multiproc: forking a process with {} threads; only the forking thread \
                 exists in the child, and locks held by the others stay locked there \
                 (see the \"Fork safety\" section of the multiproc docs)",
                n - ours
            );
        }
    }
}

/// The reaper of this process: its pid (a forked child inherits the value
/// but not the thread) and the write end of its wake pipe.
static REAPER: sys::LeakedCell<(u32, std::os::fd::OwnedFd)> = sys::LeakedCell::new();
static REAPER_INIT: StartState = StartState::new();
/// How long the reaper sleeps at most (a sentinel *pipe*, on kernels
/// without pidfds, can be held open by a sibling past the child's exit).
const REAPER_SLICE: Duration = Duration::from_secs(1);

/// Tells the reaper that a handle of a running child was dropped, starting
/// the reaper if this process has none yet.
fn reaper_notify() {
    if let Some(wake) = per_process(&REAPER, &REAPER_INIT, start_reaper) {
        let _ = sys::write_all(std::os::fd::AsFd::as_fd(wake), &[1]);
    }
}

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
        fds.extend(orphans.iter().map(|c| c.popen.sentinel()));
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

type ForkJob = Box<dyn FnOnce() + Send + 'static>;

/// The fork thread of this process: its pid (a forked child inherits the
/// value but not the thread, and must start its own) and its job queue.
/// Lock-free to read, so a child can look at it safely.
static FORK_THREAD: sys::LeakedCell<(u32, crossbeam_channel::Sender<ForkJob>)> =
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

    #[test]
    fn names_are_numbered() {
        let a = Process::new(|| {});
        let b = Process::new(|| {});
        let na: usize = a.name().strip_prefix("Process-").unwrap().parse().unwrap();
        let nb: usize = b.name().strip_prefix("Process-").unwrap().parse().unwrap();
        assert!(nb > na);
        assert!(!a.daemon());
        assert_eq!(a.pid(), None);
        assert!(matches!(a.join(), Err(Error::NotStarted)));
    }

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
