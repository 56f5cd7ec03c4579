//! [`Process`] and the pipeline that creates every child of the crate.
//!
//! - `identity`: who a process is ([`current_process`], [`parent_process`]);
//! - `registry`: our children ([`active_children`]) and the reaper thread;
//! - `spec`: the child spec, plain data (what the fork server receives);
//! - `init`: the one init every child runs after the fork, the bootstrap;
//! - `fork`: the fork path of tasks, and the multi-threaded-parent check;
//! - `fork_thread`: per-process crate threads and the fork thread;
//! - `server`: children of the fork server (the request, the runner).
//!
//! Children that become the program (supervisor children, daemons) take
//! `fork_program` and [`ChildInit::become_program`]; children of the fork
//! server take `server`'s request, then the same `init::bootstrap`.

mod fork;
mod fork_thread;
mod identity;
mod init;
mod registry;
mod server;
mod spec;

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use fork::{adopt, fork_program, prepare_parent_for, warn_if_threaded};
pub(crate) use fork_thread::{on_fork_thread, per_process, StartState};
pub(crate) use identity::become_main_process;
pub use identity::{cpu_count, current_process, parent_process, ProcessInfo};
pub use init::register_after_fork;
pub(crate) use init::{ChildInit, Target};
pub use registry::active_children;
pub(crate) use registry::{forget_child, Child};
pub(crate) use server::task_job_main;
pub(crate) use spec::ChildSpec;

use std::any::Any;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::forkserver::{self, StartMethod};
use crate::popen::Popen;
use crate::sys::{self, Sig};
use identity::{identity, COUNTER};
use registry::reaper_notify;

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
    /// What the child runs; `None` once started.
    what: Option<What>,
    /// `None` for a closure ([`Process::new`]): always forked here.
    start_method: Option<StartMethod>,
    ident: String,
    name: String,
    /// The name was given with [`with_name`](Process::with_name).
    named: bool,
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
            what: Some(What::Closure(Box::new(target))),
            start_method: None,
            name: format!("Process-{ident}"),
            ident,
            named: false,
            daemon: false,
            registered: true,
            child: None,
        }
    }

    /// A process that will run `f(arg)` once started, with the default start
    /// method (see [`set_start_method`](crate::set_start_method)) or the one
    /// given with [`with_start_method`](Process::with_start_method). Unlike
    /// a closure, a plain `fn` and a serde argument can cross to the fork
    /// server: this is the process that [`StartMethod::ForkServer`] starts.
    /// Named as [`Process::new`] names.
    ///
    /// ```
    /// use multiproc::{Process, StartMethod};
    /// fn work(code: i32) {
    ///     multiproc::exit(code)
    /// }
    /// let mut p = Process::from_fn(work, 7).with_start_method(StartMethod::Fork);
    /// p.start()?;
    /// assert_eq!(p.join()?, 7);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn from_fn<A>(f: fn(A), arg: A) -> Process
    where
        A: Serialize + DeserializeOwned + Send + 'static,
    {
        let mut p = Process::new(|| {});
        p.what = Some(What::Fn(FnTask {
            f: sys::fn_addr(f),
            tramp: sys::fn_addr(server::task_trampoline::<A> as sys::TaskTrampoline),
            arg: Box::new(arg),
            encode: encode_arg::<A>,
            run: run_arg::<A>,
        }));
        p.start_method = Some(forkserver::default_start_method());
        p
    }

    /// Sets how the child is created (see [`StartMethod`]). A process made
    /// with [`Process::new`] runs a closure, which cannot cross to the fork
    /// server: its [`start`](Process::start) with
    /// [`StartMethod::ForkServer`] is an [`Error::ForkServer`].
    ///
    /// ```no_run
    /// use multiproc::{Process, StartMethod};
    /// fn hello(name: String) {
    ///     println!("hello, {name}");
    /// }
    /// multiproc::forkserver::start()?;
    /// let mut p = Process::from_fn(hello, "server child".to_string())
    ///     .with_start_method(StartMethod::ForkServer);
    /// p.start()?;
    /// assert_eq!(p.join()?, 0);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn with_start_method(mut self, method: StartMethod) -> Process {
        self.start_method = Some(method);
        self
    }

    /// The start method: [`StartMethod::Fork`] for a closure.
    pub fn start_method(&self) -> StartMethod {
        self.start_method.unwrap_or(StartMethod::Fork)
    }

    /// Replaces the target with a closure (crate use: pool workers).
    pub(crate) fn with_target(mut self, target: Target) -> Process {
        self.what = Some(What::Closure(target));
        self
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
    /// and, cut to 15 bytes, by `ps`). A process left with its default name
    /// `Process-N` keeps its parent's command name in `ps`, as in Python
    /// (setting it costs the child a system call at start).
    pub fn with_name(mut self, name: impl Into<String>) -> Process {
        self.name = name.into();
        self.named = true;
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
        let Some(what) = self.what.take() else {
            return Err(Error::AlreadyStarted);
        };
        let target: Target = match (what, self.start_method()) {
            (What::Closure(target), StartMethod::Fork) => target,
            (What::Fn(task), StartMethod::Fork) => Box::new(move || (task.run)(task.f, task.arg)),
            (What::Closure(_), StartMethod::ForkServer) => {
                return Err(Error::ForkServer {
                    reason: "a closure cannot cross to the fork server: use Process::from_fn \
                             with StartMethod::ForkServer"
                        .to_string(),
                })
            }
            (What::Fn(task), StartMethod::ForkServer) => {
                forkserver::check(StartMethod::ForkServer)?;
                let arg = (task.encode)(&*task.arg)?;
                let mut job = Vec::new();
                crate::codec::encode_value(
                    &server::TaskJob {
                        f: task.f,
                        tramp: task.tramp,
                    },
                    &mut job,
                )?;
                return self.start_in_server(task_job_main, job, Vec::new(), Some(arg));
            }
        };
        let spec = self.spec();
        let child = if self.daemon && !sys::is_main_thread() {
            // A child that must die with the process, asked for from a thread
            // that may end before it: fork on the fork thread (see
            // `on_fork_thread`).
            on_fork_thread(move || fork::fork_registered(spec, target))
        } else {
            fork::fork_registered(spec, target)
        };
        self.child = Some(child?);
        Ok(())
    }

    /// Asks the fork server for the child, whose target `job_main` makes
    /// from `job` and the fds (its channel, then `extra`) in the child, with
    /// `arg` to read from the channel; adopts it as ours.
    pub(crate) fn start_in_server(
        &mut self,
        job_main: sys::JobMain,
        job: Vec<u8>,
        extra: Vec<std::os::fd::OwnedFd>,
        arg: Option<Vec<u8>>,
    ) -> Result<()> {
        self.what = None;
        prepare_parent_for(false)?;
        let spec = self.spec();
        let info = ProcessInfo {
            name: self.name.clone(),
            pid: 0,
            daemon: self.daemon,
        };
        let popen = server::fork_via_server(spec, job_main, job, extra, arg)?;
        self.child = Some(adopt(popen, info, self.registered));
        Ok(())
    }

    /// The spec of this process's child, prepared in the parent.
    pub(crate) fn spec(&self) -> ChildSpec {
        let parent = current_process();
        ChildSpec {
            ident: self.ident.clone(),
            name: self.name.clone(),
            named: self.named,
            daemon: self.daemon,
            init: ChildInit::prepare_in(parent.pid, self.daemon.then_some(Sig::SIGKILL)),
            parent,
            registered: self.registered,
        }
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
    ///
    /// The pidfd is opened by the first call, not by
    /// [`start`](Process::start): a process that is only joined costs no fd.
    /// After the child was reaped (joined), the sentinel is an fd that is
    /// readable at once. See [`Popen::sentinel`] for the fd limit.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut p = multiproc::Process::new(|| {});
    /// p.start()?;
    /// let ready = multiproc::wait(&[p.sentinel().unwrap()], Some(Duration::from_secs(10)))?;
    /// assert_eq!(ready, vec![0]);
    /// assert_eq!(p.join()?, 0);
    /// # Ok::<(), multiproc::Error>(())
    /// ```
    pub fn sentinel(&self) -> Option<BorrowedFd<'_>> {
        self.child.as_ref().map(|c| c.popen.sentinel())
    }

    /// The [`Popen`] under this process, once started.
    pub fn popen(&self) -> Option<&Popen> {
        self.child.as_ref().map(|c| &c.popen)
    }
}

/// What a [`Process`] runs.
enum What {
    /// A closure ([`Process::new`]): forked here only.
    Closure(Target),
    /// `f(arg)` ([`Process::from_fn`]): forked here or by the fork server.
    Fn(FnTask),
}

/// `f(arg)` with its type erased: the addresses of `f` and of the
/// trampoline that decodes `A` in a child of the server, the argument, and
/// the monomorphized functions that encode it or run `f` on it here.
struct FnTask {
    f: usize,
    tramp: usize,
    arg: Box<dyn Any + Send>,
    encode: fn(&dyn Any) -> Result<Vec<u8>>,
    run: fn(usize, Box<dyn Any + Send>),
}

fn encode_arg<A: Serialize + 'static>(arg: &dyn Any) -> Result<Vec<u8>> {
    let arg = arg
        .downcast_ref::<A>()
        .expect("an FnTask's argument has the type its encoder was made for");
    let mut out = Vec::new();
    crate::codec::encode_value(arg, &mut out)?;
    Ok(out)
}

fn run_arg<A: 'static>(f: usize, arg: Box<dyn Any + Send>) {
    let arg = arg
        .downcast::<A>()
        .expect("an FnTask's argument has the type its runner was made for");
    sys::fn_from_addr::<fn(A)>(f)(*arg)
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
            .field("start_method", &self.start_method())
            .field("pid", &self.pid())
            .field("exitcode", &self.exitcode())
            .finish()
    }
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
}
