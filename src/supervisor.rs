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
use crate::exitcode;
use crate::popen::{self, Popen};
use crate::process;
use crate::sys::{self, Sig};

/// The task id of this process (`usize::MAX`: not a supervised child).
static TASK_ID: AtomicUsize = AtomicUsize::new(usize::MAX);
/// Set by the first call of [`fork_processes`].
static FORK_PROCESSES_CALLED: AtomicBool = AtomicBool::new(false);

/// The signals the supervisor handles in the parent.
const HANDLED: [Sig; 3] = [Sig::SIGTERM, Sig::SIGINT, Sig::SIGHUP];
/// How often the supervisor looks at its children when a sentinel pipe
/// (kernels without pidfds) may not wake it.
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
            rolling: None,
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
    popen: Popen,
    /// Readable once the child is running and initialized (a byte, or end
    /// of file if it died first). Watched only during a rolling restart.
    ready: OwnedFd,
    started: Instant,
}

impl fmt::Debug for Running {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Running")
            .field("pid", &self.popen.pid())
            .finish()
    }
}

/// The step of a rolling restart under way: the replacement of task `id`
/// is starting (it is the slot's child); the old child serves on until the
/// replacement is ready, dies, or `deadline` passes.
struct Rolling {
    id: usize,
    old: Running,
    deadline: Instant,
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
    /// The roll's current step, if a replacement is starting.
    rolling: Option<Rolling>,
    /// Shutting down: the signal and when the grace ends.
    stopping: Option<(i32, Instant)>,
}

impl State {
    /// The event loop. Nothing in it blocks but the one `poll` of
    /// [`wait_for_event`](State::wait_for_event): every child, every signal
    /// and every deadline is served in each turn, during a roll too.
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
        // The child closes (or writes to) its end once it is running and
        // its initializer returned: the parent's "started" signal.
        let (ready_r, ready_w) = match sys::pipe() {
            Ok(p) => p,
            Err(e) => {
                self.abort_all();
                return Err(e.into());
            }
        };
        let init = process::ChildInit::prepare(Some(Sig::SIGKILL));
        // Blocked across the fork: a stop signal sent to the new child
        // before it has reset its handlers waits for the reset, instead of
        // running our handler there (which writes to *our* signal pipe:
        // the child would never see the stop).
        let blocked = sys::BlockedSignals::block(&HANDLED);
        // The child forgets the parent's `Process` children and becomes a
        // main process (see `process::fork_program`).
        let forked = process::fork_program();
        match forked {
            Err(e) => {
                drop(blocked);
                self.abort_all();
                Err(e)
            }
            Ok(None) => {
                blocked.forget();
                drop(ready_r);
                // Default dispositions, then every signal unblocked: a stop
                // that came meanwhile is delivered now, with its default
                // action. The supervisor's fds (signal pipe, siblings'
                // sentinels) are closed when its state is dropped on the way
                // out of `run`.
                sys::reset_signals_in_child(&HANDLED);
                if let Err(code) = init.become_program() {
                    sys::exit_immediately(code);
                }
                TASK_ID.store(id, Ordering::Relaxed);
                if let Some(user_init) = self.cfg.initializer {
                    if crate::unwind::catch(move || user_init(id)).is_err() {
                        sys::flush_std_streams();
                        sys::exit_immediately(crate::exitcode::PANICKED);
                    }
                }
                let _ = sys::write_all(ready_w.as_fd(), &[1]);
                drop(ready_w);
                Ok(Some(Role::Child(id)))
            }
            Ok(Some(popen)) => {
                drop(blocked);
                drop(ready_w);
                log::info!("multiproc: started child {id} (pid {})", popen.pid());
                let slot = &mut self.children[id];
                slot.child = Some(Running {
                    popen,
                    ready: ready_r,
                    started: Instant::now(),
                });
                slot.restart_at = None;
                Ok(None)
            }
        }
    }

    /// Every live child: the current one of each task id, the old one of
    /// the roll's step, and the old ones of a rolling restart.
    fn running(&self) -> impl Iterator<Item = &Running> {
        self.children
            .iter()
            .filter_map(|s| s.child.as_ref())
            .chain(self.rolling.iter().map(|r| &r.old))
            .chain(self.retiring.iter().map(|(r, _)| r))
    }

    /// Sleeps until a signal, a child's exit, the roll's replacement being
    /// ready, or the next deadline.
    fn wait_for_event(&self) -> Result<()> {
        let now = Instant::now();
        let mut timeout = None;
        let deadlines = self
            .children
            .iter()
            .filter_map(|s| s.restart_at)
            .chain(self.retiring.iter().map(|(_, kill_at)| *kill_at))
            .chain(self.rolling.as_ref().map(|r| r.deadline))
            .chain(self.stopping.map(|(_, kill_at)| kill_at));
        for d in deadlines {
            let left = d.saturating_duration_since(now);
            timeout = Some(timeout.map_or(left, |t: Duration| t.min(left)));
        }
        let mut fds: Vec<BorrowedFd<'_>> = vec![self.sig_r.as_fd()];
        fds.extend(self.running().map(|r| r.popen.sentinel()));
        if let Some(r) = self.replacement() {
            fds.push(r.ready.as_fd());
        }
        if self.running().any(|r| !r.popen.has_pidfd()) {
            // A sentinel pipe can be held past the exit by a grandchild.
            timeout = Some(timeout.map_or(TICK, |t| t.min(TICK)));
        }
        sys::poll_readable(&fds, timeout)?;
        Ok(())
    }

    /// The replacement of the roll's current step, while it is starting.
    fn replacement(&self) -> Option<&Running> {
        let r = self.rolling.as_ref()?;
        self.children[r.id].child.as_ref()
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
                            .filter(|&id| self.rolling.as_ref().is_none_or(|r| r.id != id))
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
        let kill_at = Instant::now() + self.cfg.grace;
        self.stopping = Some((sig, kill_at));
        self.roll.clear();
        if let Some(r) = self.rolling.take() {
            self.retiring.push((r.old, kill_at));
        }
        for slot in &mut self.children {
            slot.restart_at = None;
        }
        for (_, at) in &mut self.retiring {
            *at = (*at).min(kill_at);
        }
        for r in self.running() {
            let _ = r.popen.terminate();
        }
    }

    /// Reaps the children that exited; schedules restarts.
    fn reap(&mut self) -> Result<()> {
        self.retiring.retain(|(r, _)| match r.popen.poll() {
            Ok(None) => true,
            Ok(Some(code)) => {
                log::info!(
                    "multiproc: old child (pid {}) ended with {}",
                    r.popen.pid(),
                    exitcode::describe(code)
                );
                false
            }
            Err(_) => false,
        });
        if let Some(r) = &self.rolling {
            if !matches!(r.old.popen.poll(), Ok(None)) {
                // The old child of the roll's step ended by itself; its
                // replacement carries on starting.
                log::info!("multiproc: old child (pid {}) ended", r.old.popen.pid());
                self.rolling = None;
            }
        }
        for id in 0..self.children.len() {
            let Some(r) = &self.children[id].child else {
                continue;
            };
            let code = match r.popen.poll() {
                Ok(None) => continue,
                Ok(Some(code)) => code,
                Err(_) => exitcode::UNKNOWN,
            };
            let ran = r.started.elapsed();
            let pid = r.popen.pid();
            let slot = &mut self.children[id];
            slot.child = None;
            if self.stopping.is_some() {
                log::info!(
                    "multiproc: child {id} (pid {pid}) stopped with {}",
                    exitcode::describe(code)
                );
                continue;
            }
            if let Some(rolling) = self.rolling.take_if(|r| r.id == id) {
                // The replacement died before it was ready: the old child
                // serves on, and the roll moves to the next task id.
                log::warn!(
                    "multiproc: replacement of child {id} (pid {pid}) ended with {} before it \
                     was ready; keeping the old one (pid {})",
                    exitcode::describe(code),
                    rolling.old.popen.pid()
                );
                slot.child = Some(rolling.old);
                self.restarts += 1;
                self.check_restart_limit()?;
                continue;
            }
            if code == 0 {
                log::info!("multiproc: child {id} (pid {pid}) exited normally");
                slot.done = true;
                continue;
            }
            log::warn!(
                "multiproc: child {id} (pid {pid}) ended with {}",
                exitcode::describe(code)
            );
            self.restarts += 1;
            self.check_restart_limit()?;
            let slot = &mut self.children[id];
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

    /// `Err(TooManyRestarts)` (with every child stopped) past the limit.
    fn check_restart_limit(&mut self) -> Result<()> {
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
        Ok(())
    }

    /// Restarts due children, moves the rolling restart on, enforces the
    /// grace; `Some` when supervision is over.
    fn advance(&mut self) -> Result<Option<Role>> {
        let now = Instant::now();
        if let Some((sig, kill_at)) = self.stopping {
            if self.running().next().is_none() {
                return Ok(Some(Role::Parent(Stopped::Signal(sig))));
            }
            if now >= kill_at {
                for r in self.running() {
                    let _ = r.popen.kill();
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
                let _ = r.popen.kill();
            }
        }
        // The roll's step: once the replacement is ready (or the grace for
        // its start passed), the old child gets SIGTERM and retires.
        if let Some(r) = &self.rolling {
            let ready = self.replacement().is_none_or(|rep| {
                sys::poll_readable(&[rep.ready.as_fd()], Some(Duration::ZERO))
                    .is_ok_and(|got| !got.is_empty())
            });
            if ready || now >= r.deadline {
                let r = self.rolling.take().expect("checked above");
                let _ = r.old.popen.terminate();
                self.retiring.push((r.old, now + self.cfg.grace));
            }
        }
        // Rolling restart: one old child at a time.
        if self.rolling.is_none() && self.retiring.is_empty() {
            while let Some(id) = self.roll.pop_front() {
                let Some(old) = self.children[id].child.take() else {
                    continue;
                };
                if let Some(role) = self.start(id)? {
                    return Ok(Some(role));
                }
                self.rolling = Some(Rolling {
                    id,
                    old,
                    deadline: now + self.cfg.grace,
                });
                break;
            }
        }
        let idle = self
            .children
            .iter()
            .all(|s| s.child.is_none() && s.restart_at.is_none())
            && self.rolling.is_none()
            && self.retiring.is_empty();
        if idle && self.children.iter().all(|s| s.done) {
            return Ok(Some(Role::Parent(Stopped::AllExited)));
        }
        Ok(None)
    }

    /// Stops every child (SIGTERM, one grace for all, SIGKILL) and reaps
    /// them all.
    fn abort_all(&mut self) {
        let popens: Vec<&Popen> = self.running().map(|r| &r.popen).collect();
        popen::stop_all(&popens, Sig::SIGTERM, self.cfg.grace);
        for slot in &mut self.children {
            slot.child = None;
            slot.restart_at = None;
        }
        self.rolling = None;
        self.retiring.clear();
    }
}
