//! The pre-fork supervisor: [`fork_processes`] and [`task_id`] (tornado's
//! `tornado.process`), built on [`Supervisor`], which adds what a production
//! pre-fork server needs: signal forwarding with a grace period, a rolling
//! restart on `SIGHUP`, and a restart back-off.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::process;
use crate::sys::{self, Pid, Sig};

/// The task id of this process (`usize::MAX`: not a supervised child).
static TASK_ID: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Set by the first call of [`fork_processes`].
static FORK_PROCESSES_CALLED: AtomicBool = AtomicBool::new(false);

/// The signals the supervisor handles in the parent.
const HANDLED: [Sig; 3] = [Sig::SIGTERM, Sig::SIGINT, Sig::SIGHUP];
/// How often the supervisor looks at its children when nothing wakes it
/// (a kernel without pidfds has nothing to wake it).
const TICK: Duration = Duration::from_millis(100);

/// The task id of this process: `Some(id)` in a child started by
/// [`fork_processes`] or a [`Supervisor`], `None` elsewhere.
///
/// ```
/// assert_eq!(multiproc::task_id(), None);
/// ```
pub fn task_id() -> Option<usize> {
    match TASK_ID.load(Ordering::Relaxed) {
        usize::MAX => None,
        id => Some(id),
    }
}

/// Starts `num_processes` children (0: [`cpu_count`](crate::cpu_count)) and
/// supervises them, as tornado's `fork_processes` does.
///
/// In each child it returns `Ok(task_id)`, a number in `0..n`: the child
/// goes on running the program from there (this is the pre-fork model: bind
/// the listening socket first, then fork, then serve). The parent never
/// returns `Ok`: it waits for exactly its own children, logs (through `log`)
/// why each one ended, restarts one that died by a signal or with a non-zero
/// status under the same task id, and leaves one that exited with 0. Once
/// every child has exited with 0 the parent exits the process with status 0.
/// `SIGTERM` or `SIGINT` to the parent are forwarded to the children as
/// `SIGTERM`; after the grace period (30 s) the survivors get `SIGKILL`,
/// and then the parent exits with status 0. `SIGHUP` restarts the children
/// one at a time. Children die with the parent (`PR_SET_PDEATHSIG`).
///
/// [`Supervisor`] is the same with every knob: a grace period, the back-off,
/// and returning to the caller instead of exiting.
///
/// # Errors
/// [`Error::TooManyRestarts`] once more than `max_restarts` (default 100)
/// restarts were needed (the remaining children are stopped first: no
/// orphan); [`Error::AlreadyStarted`] on a second call in the same process
/// (tornado asserts the same); [`Error::Io`] if a fork or the signal setup
/// fails.
pub fn fork_processes(num_processes: usize, max_restarts: Option<usize>) -> Result<usize> {
    if FORK_PROCESSES_CALLED.swap(true, Ordering::SeqCst) {
        return Err(Error::AlreadyStarted);
    }
    let outcome = Supervisor::new(num_processes)
        .max_restarts(max_restarts.or(Some(100)))
        .run()?;
    match outcome {
        Role::Child(id) => Ok(id),
        Role::Parent(_) => {
            sys::flush_std_streams();
            std::process::exit(0)
        }
    }
}

/// What [`Supervisor::run`] returns: in each child, its task id; in the
/// parent, once it stopped supervising, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This process is a child with this task id: serve.
    Child(usize),
    /// This process is the supervisor, and every child is gone.
    Parent(Stopped),
}

/// Why a [`Supervisor`] returned in the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// Every child exited with status 0.
    AllExited,
    /// A signal (`SIGTERM` or `SIGINT`, its number here) asked for a
    /// shutdown; the children were stopped and reaped.
    Signal(i32),
}

/// A pre-fork supervisor: forks `n` children, each with a task id, and keeps
/// them running. What [`fork_processes`] is built on, with its knobs.
///
/// - A child that dies by a signal or with a non-zero status is restarted
///   under the same task id after a back-off that doubles with each
///   consecutive failure of that id (0.1 s up to 5 s by default) and resets
///   once the child has run for `backoff_reset` (10 s): a child that crashes
///   at start does not spin the CPU. A child that exits with 0 is left.
/// - `SIGTERM` or `SIGINT` to the parent: forwarded to every child as
///   `SIGTERM`; children still alive after [`grace`](Supervisor::grace)
///   (default 30 s, as gunicorn's graceful timeout) get `SIGKILL`; once all
///   are reaped, [`run`](Supervisor::run) returns `Role::Parent`.
/// - `SIGHUP` to the parent: a rolling restart. Child by child, the
///   replacement (same task id) is started first, then the old one gets
///   `SIGTERM` and is waited for (grace, then `SIGKILL`): at least `n - 1`
///   children serve throughout.
/// - Children die with the parent (`PR_SET_PDEATHSIG`, `SIGKILL`), get the
///   default dispositions of `SIGTERM`, `SIGINT` and `SIGHUP` and an empty
///   signal mask before `run` returns in them.
///
/// The parent's handlers for those three signals are installed while `run`
/// supervises and the previous ones are put back when it returns. Only the
/// pids it forked are waited for: other children of the process keep their
/// statuses.
///
/// ```no_run
/// use std::time::Duration;
/// use multiproc::{Role, Supervisor};
///
/// let listener = std::net::TcpListener::bind("127.0.0.1:8080")?;
/// match Supervisor::new(4).grace(Duration::from_secs(10)).run()? {
///     Role::Child(id) => {
///         for conn in listener.incoming() {
///             // serve `conn` as worker `id`
///             # let _ = (conn, id);
///         }
///     }
///     Role::Parent(why) => println!("all children stopped: {why:?}"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Supervisor {
    processes: usize,
    max_restarts: Option<usize>,
    grace: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
    backoff_reset: Duration,
    initializer: Option<fn(usize)>,
}

impl Supervisor {
    /// A supervisor of `processes` children (0: [`cpu_count`](crate::cpu_count)),
    /// at most 100 restarts, 30 s of grace, back-off from 0.1 s to 5 s.
    pub fn new(processes: usize) -> Supervisor {
        Supervisor {
            processes,
            max_restarts: Some(100),
            grace: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            backoff_reset: Duration::from_secs(10),
            initializer: None,
        }
    }

    /// Runs `init(task_id)` in every new child before [`run`](Supervisor::run)
    /// returns there: per-child setup (open a database connection, warm a
    /// cache, reseed a generator). A child counts as started once it
    /// returned; in a rolling restart the old child is only stopped after
    /// its replacement's `init` is done (or the grace period passed). A
    /// panic in `init` ends the child with status 1, which is restarted
    /// with the back-off like any crash.
    pub fn initializer(mut self, init: fn(usize)) -> Supervisor {
        self.initializer = Some(init);
        self
    }

    /// The most restarts allowed in the supervisor's life (`None`: no limit).
    pub fn max_restarts(mut self, limit: Option<usize>) -> Supervisor {
        self.max_restarts = limit;
        self
    }

    /// How long a child gets between `SIGTERM` and `SIGKILL` when the
    /// supervisor stops it.
    pub fn grace(mut self, grace: Duration) -> Supervisor {
        self.grace = grace;
        self
    }

    /// The restart back-off: `initial` after a first failure of a task id,
    /// doubling with each consecutive one, at most `max`.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Supervisor {
        self.backoff_initial = initial;
        self.backoff_max = max.max(initial);
        self
    }

    /// How long a child must have run for its task id's failures to be
    /// forgotten (the back-off starts over).
    pub fn backoff_reset(mut self, after: Duration) -> Supervisor {
        self.backoff_reset = after;
        self
    }

    /// Forks the children and supervises them (see [`Supervisor`]).
    /// Returns `Role::Child(id)` in each child and `Role::Parent` in the
    /// parent once every child is gone.
    ///
    /// # Errors
    /// [`Error::TooManyRestarts`] past the limit (the other children are
    /// stopped and reaped first); [`Error::Io`] if a fork or the signal
    /// setup fails (children already started are stopped and reaped).
    pub fn run(self) -> Result<Role> {
        let n = if self.processes == 0 {
            process::cpu_count()
        } else {
            self.processes
        };
        crate::unwind::install_hook();
        process::warn_if_threaded();
        let (sig_r, sig_w) = sys::pipe()?;
        sys::set_nonblocking(sig_r.as_fd())?;
        let saved = sys::route_signals_to_pipe(sig_w.as_fd(), &HANDLED)?;
        let mut state = State {
            cfg: self,
            sig_r,
            _sig_w: sig_w,
            children: (0..n).map(|_| Slot::default()).collect(),
            retiring: Vec::new(),
            restarts: 0,
            roll: VecDeque::new(),
            stopping: None,
        };
        let result = state.supervise();
        if matches!(result, Ok(Role::Child(_))) {
            // In a child: the parent's handlers and pipe are not ours.
            std::mem::forget(saved);
        } else {
            sys::restore_signals(saved);
        }
        result
    }
}

/// One task id's current child and history.
#[derive(Default)]
struct Slot {
    child: Option<Running>,
    /// Consecutive abnormal exits.
    failures: u32,
    /// When to start it again (after an abnormal exit).
    restart_at: Option<Instant>,
    /// Exited with 0: done.
    done: bool,
}

/// A live child.
struct Running {
    pid: Pid,
    /// Its pidfd (`None` on kernels without pidfds: then the tick polls).
    pidfd: Option<OwnedFd>,
    /// Readable once the child is running and initialized (a byte, or end
    /// of file if it died first); `None` once seen.
    ready: Option<OwnedFd>,
    started: Instant,
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running").field("pid", &self.pid).finish()
    }
}

struct State {
    cfg: Supervisor,
    sig_r: OwnedFd,
    /// The handler's end of the signal pipe, open while we supervise.
    _sig_w: OwnedFd,
    children: Vec<Slot>,
    /// Old children of a rolling restart: SIGTERMed, with their SIGKILL time.
    retiring: Vec<(Running, Instant)>,
    restarts: usize,
    /// Task ids still to roll (SIGHUP).
    roll: VecDeque<usize>,
    /// Shutting down: the signal and when the grace ends.
    stopping: Option<(i32, Instant)>,
}

impl State {
    fn supervise(&mut self) -> Result<Role> {
        for id in 0..self.children.len() {
            if let Some(role) = self.start(id)? {
                return Ok(role);
            }
        }
        loop {
            self.wait_for_event()?;
            self.drain_signals();
            self.reap()?;
            if let Some(role) = self.advance()? {
                return Ok(role);
            }
        }
    }

    /// Forks the child of task `id`. `Some(Role::Child)` in the child.
    fn start(&mut self, id: usize) -> Result<Option<Role>> {
        let parent = sys::getpid();
        // The child closes (or writes to) its end once it is running and
        // its initializer returned: the parent's "started" signal.
        let (ready_r, ready_w) = match sys::pipe() {
            Ok(p) => p,
            Err(e) => {
                self.abort_all();
                return Err(e.into());
            }
        };
        // Held across the fork: the child clears its copy (the parent's
        // Process children are not the child's).
        let mut registry = process::registry();
        let forked = sys::fork_returning();
        match forked {
            Err(e) => {
                drop(registry);
                self.abort_all();
                Err(e.into())
            }
            Ok(None) => {
                registry.clear();
                drop(registry);
                process::become_main_process();
                drop(ready_r);
                // The supervisor's fds (signal pipe, siblings' pidfds) are
                // closed when its state is dropped on the way out of `run`.
                sys::reset_signals_in_child(&HANDLED);
                if sys::set_parent_death_signal(Sig::SIGKILL).is_ok() && sys::getppid() != parent {
                    // The supervisor died before prctl: no signal will come.
                    sys::exit_immediately(1);
                }
                TASK_ID.store(id, Ordering::Relaxed);
                if let Some(init) = self.cfg.initializer {
                    if crate::unwind::catch(move || init(id)).is_err() {
                        sys::flush_std_streams();
                        sys::exit_immediately(1);
                    }
                }
                let _ = sys::write_all(ready_w.as_fd(), &[1]);
                drop(ready_w);
                Ok(Some(Role::Child(id)))
            }
            Ok(Some(pid)) => {
                drop(registry);
                drop(ready_w);
                let pidfd = if sys::pidfd_supported() {
                    sys::pidfd_open(pid).ok()
                } else {
                    None
                };
                log::info!("multiproc: started child {id} (pid {pid})");
                let slot = &mut self.children[id];
                slot.child = Some(Running {
                    pid,
                    pidfd,
                    ready: Some(ready_r),
                    started: Instant::now(),
                });
                slot.restart_at = None;
                Ok(None)
            }
        }
    }

    /// Waits until the new child of task `id` is running and initialized
    /// (or died, or the grace period passed, or a signal came in).
    fn wait_started(&mut self, id: usize) -> Result<()> {
        let deadline = Instant::now() + self.cfg.grace;
        let Some(ready) = self.children[id]
            .child
            .as_mut()
            .and_then(|r| r.ready.take())
        else {
            return Ok(());
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let fds = [ready.as_fd(), self.sig_r.as_fd()];
            let got = sys::poll_readable(&fds, Some(left))?;
            if got.is_empty() || got.contains(&0) || got.contains(&1) {
                return Ok(());
            }
        }
    }

    /// Every live child: the current one of each task id, and the old ones
    /// of a rolling restart.
    fn running(&self) -> impl Iterator<Item = &Running> {
        self.children
            .iter()
            .filter_map(|s| s.child.as_ref())
            .chain(self.retiring.iter().map(|(r, _)| r))
    }

    fn pidfds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.running()
            .filter_map(|r| r.pidfd.as_ref().map(|fd| fd.as_fd()))
    }

    /// How long to sleep at most without a deadline: forever when every
    /// child has a pidfd to wake us, else the polling tick.
    fn idle_timeout(&self) -> Option<Duration> {
        self.running().any(|r| r.pidfd.is_none()).then_some(TICK)
    }

    /// Sleeps until a signal, a child's exit, or the next deadline.
    fn wait_for_event(&self) -> Result<()> {
        let now = Instant::now();
        let mut timeout = self.idle_timeout();
        let deadlines = self
            .children
            .iter()
            .filter_map(|s| s.restart_at)
            .chain(self.retiring.iter().map(|(_, kill_at)| *kill_at))
            .chain(self.stopping.map(|(_, kill_at)| kill_at));
        for d in deadlines {
            let left = d.saturating_duration_since(now);
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
        }
        let mut fds: Vec<BorrowedFd<'_>> = vec![self.sig_r.as_fd()];
        fds.extend(self.pidfds());
        sys::poll_readable(&fds, timeout)?;
        Ok(())
    }

    /// Reads the signal pipe and acts on each signal.
    fn drain_signals(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            // Non-blocking: WouldBlock once drained.
            let n = match sys::read(self.sig_r.as_fd(), &mut buf) {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            for &b in &buf[..n] {
                let sig = i32::from(b);
                if sig == Sig::SIGHUP as i32 {
                    if self.stopping.is_none() {
                        log::info!("multiproc: SIGHUP, restarting the children one by one");
                        self.roll = (0..self.children.len())
                            .filter(|&id| self.children[id].child.is_some())
                            .collect();
                    }
                } else if self.stopping.is_none() {
                    log::info!(
                        "multiproc: signal {sig}, stopping the children (grace {:?})",
                        self.cfg.grace
                    );
                    self.stop_all(sig);
                }
            }
        }
    }

    /// SIGTERM to every child, SIGKILL after the grace.
    fn stop_all(&mut self, sig: i32) {
        self.stopping = Some((sig, Instant::now() + self.cfg.grace));
        self.roll.clear();
        for slot in &mut self.children {
            slot.restart_at = None;
            if let Some(r) = &slot.child {
                let _ = sys::send_signal(r.pid, Sig::SIGTERM);
            }
        }
        for (r, kill_at) in &mut self.retiring {
            let _ = sys::send_signal(r.pid, Sig::SIGTERM);
            *kill_at = (*kill_at).min(Instant::now() + self.cfg.grace);
        }
    }

    /// Reaps the children that exited; schedules restarts.
    fn reap(&mut self) -> Result<()> {
        self.retiring.retain(|(r, _)| match sys::try_wait(r.pid) {
            Ok(None) => true,
            Ok(Some(code)) => {
                log::info!("multiproc: old child (pid {}) ended with {code}", r.pid);
                false
            }
            Err(_) => false,
        });
        for id in 0..self.children.len() {
            let Some(r) = &self.children[id].child else {
                continue;
            };
            let code = match sys::try_wait(r.pid) {
                Ok(None) => continue,
                Ok(Some(code)) => code,
                // ECHILD: someone reaped it behind our back; count it as
                // a failure rather than wait forever.
                Err(_) => -1,
            };
            let ran = r.started.elapsed();
            let pid = r.pid;
            let slot = &mut self.children[id];
            slot.child = None;
            if self.stopping.is_some() {
                log::info!("multiproc: child {id} (pid {pid}) stopped with {code}");
                continue;
            }
            if code == 0 {
                log::info!("multiproc: child {id} (pid {pid}) exited normally");
                slot.done = true;
                continue;
            }
            if code < 0 {
                log::warn!(
                    "multiproc: child {id} (pid {pid}) killed by signal {}",
                    -code
                );
            } else {
                log::warn!("multiproc: child {id} (pid {pid}) exited with status {code}");
            }
            self.restarts += 1;
            if let Some(limit) = self.cfg.max_restarts {
                if self.restarts > limit {
                    log::error!(
                        "multiproc: too many restarts ({}), giving up",
                        self.restarts
                    );
                    self.abort_all();
                    return Err(Error::TooManyRestarts {
                        restarts: self.restarts,
                        limit,
                    });
                }
            }
            if ran >= self.cfg.backoff_reset {
                slot.failures = 0;
            }
            let delay = self
                .cfg
                .backoff_initial
                .saturating_mul(1u32 << slot.failures.min(20))
                .min(self.cfg.backoff_max);
            slot.failures += 1;
            slot.restart_at = Some(Instant::now() + delay);
        }
        Ok(())
    }

    /// Restarts due children, moves the rolling restart on, enforces the
    /// grace; `Some` when supervision is over.
    fn advance(&mut self) -> Result<Option<Role>> {
        let now = Instant::now();
        if let Some((sig, kill_at)) = self.stopping {
            let live: Vec<Pid> = self.live_pids().collect();
            if live.is_empty() {
                return Ok(Some(Role::Parent(Stopped::Signal(sig))));
            }
            if now >= kill_at {
                for pid in live {
                    let _ = sys::send_signal(pid, Sig::SIGKILL);
                }
            }
            return Ok(None);
        }
        for id in 0..self.children.len() {
            if self.children[id].restart_at.is_some_and(|t| now >= t) {
                log::info!("multiproc: restarting child {id}");
                if let Some(role) = self.start(id)? {
                    return Ok(Some(role));
                }
            }
        }
        for (r, kill_at) in &self.retiring {
            if now >= *kill_at {
                let _ = sys::send_signal(r.pid, Sig::SIGKILL);
            }
        }
        // Rolling restart: one old child at a time.
        if self.retiring.is_empty() {
            while let Some(id) = self.roll.pop_front() {
                let Some(old) = self.children[id].child.take() else {
                    continue;
                };
                if let Some(role) = self.start(id)? {
                    return Ok(Some(role));
                }
                self.wait_started(id)?;
                let _ = sys::send_signal(old.pid, Sig::SIGTERM);
                self.retiring.push((old, Instant::now() + self.cfg.grace));
                break;
            }
        }
        let idle = self
            .children
            .iter()
            .all(|s| s.child.is_none() && s.restart_at.is_none())
            && self.retiring.is_empty();
        if idle && self.children.iter().all(|s| s.done) {
            return Ok(Some(Role::Parent(Stopped::AllExited)));
        }
        Ok(None)
    }

    fn live_pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.running().map(|r| r.pid)
    }

    /// Stops every child (SIGTERM, the grace, SIGKILL) and reaps them all.
    fn abort_all(&mut self) {
        let pids: Vec<Pid> = self.live_pids().collect();
        for &pid in &pids {
            let _ = sys::send_signal(pid, Sig::SIGTERM);
        }
        let deadline = Instant::now() + self.cfg.grace;
        let mut left = pids;
        loop {
            left.retain(|&pid| matches!(sys::try_wait(pid), Ok(None)));
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for &pid in &left {
                    let _ = sys::send_signal(pid, Sig::SIGKILL);
                    let _ = sys::wait_blocking(pid);
                }
                break;
            }
            // Sleep on the pidfds (and the tick without them).
            let until = deadline.saturating_duration_since(Instant::now());
            // Only the unreaped ones: a reaped child's pidfd stays readable.
            let fds: Vec<BorrowedFd<'_>> = self
                .running()
                .filter(|r| left.contains(&r.pid))
                .filter_map(|r| r.pidfd.as_ref().map(|fd| fd.as_fd()))
                .collect();
            let _ = sys::poll_readable(
                &fds,
                Some(self.idle_timeout().map_or(until, |t| t.min(until))),
            );
        }
        for slot in &mut self.children {
            slot.child = None;
            slot.restart_at = None;
        }
        self.retiring.clear();
    }
}
