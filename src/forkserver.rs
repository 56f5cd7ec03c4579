//! The fork server and [`StartMethod`]: safe and fast process starts from
//! programs with threads and big heaps.
//!
//! [`start`] forks a small, single-threaded *server* from the program while
//! it still has one thread (call it first in `main`). Later, a child asked
//! for with [`StartMethod::ForkServer`] is forked by the server, not by the
//! caller: from that clean image no lock that a caller's thread holds can be
//! held in the child, and the fork costs what forking a small process costs,
//! however big the caller's heap has grown (`fork` copies the caller's page
//! tables: about 37 ms from a 1 GiB parent).
//!
//! ```no_run
//! use multiproc::{Process, StartMethod};
//!
//! fn work(n: u64) {
//!     assert_eq!(n, 42);
//! }
//!
//! fn main() -> multiproc::Result<()> {
//!     multiproc::forkserver::start()?; // first, while main has one thread
//!     std::thread::spawn(|| loop { std::thread::park() }); // threads are fine from here on
//!     let mut p = Process::from_fn(work, 42).with_start_method(StartMethod::ForkServer);
//!     p.start()?;
//!     assert_eq!(p.join()?, 0);
//!     Ok(())
//! }
//! ```
//!
//! # What a child of the server sees
//!
//! The program *as it was at [`start`]*: globals, `static`s, the
//! [`register_after_fork`](crate::register_after_fork) hooks registered by
//! then (later ones are sent along), the stdout and stderr of that moment.
//! What the caller built later (a config it loaded, a connection, a cache)
//! reaches the child only through its argument, which is why a server child
//! runs a plain `fn` with a serde argument ([`Process::from_fn`]) and never
//! a closure. `parent_process()` in the child names the caller.
//!
//! # Its children are the caller's
//!
//! Pid, `join`/`join_timeout`, exit codes (`-signal` included),
//! `terminate`/`kill`, `is_alive`, `sentinel()`, [`active_children`], the
//! at-exit finalizer, daemonic children and pool workers dying with the
//! caller (even after `SIGKILL`), the pool's per-item fault isolation and
//! task timeouts: all as with [`StartMethod::Fork`].
//!
//! How, for the curious: the server forks the child and opens its pidfd
//! while the child is its own unreaped child (so the pidfd names exactly
//! that process), and passes the pidfd to the caller with `SCM_RIGHTS`.
//! The server reaps the child when it exits and writes the exit code on a
//! socket that belongs to that one child; that socket is the child's
//! `sentinel()`. Signals go through the pidfd (`pidfd_send_signal`), which
//! can never hit a recycled pid, even though the caller does not reap. The
//! server dies with the caller (`PR_SET_PDEATHSIG` and a `getppid` check);
//! daemonic children and pool workers die with the server in turn, so they
//! die with the caller; other children run on, as with `Fork`.
//!
//! # Limits
//!
//! A pool whose workers the server forks shares its progress counters with
//! them through a mapping made at [`start`]: at most 16 such pools at once,
//! of at most 256 workers each (more is an [`Error::ForkServer`]). The
//! server dies with its caller and cannot be started again once the caller
//! has threads: a server that was killed is an [`Error::ForkServer`] for
//! every later `ForkServer` start, and the status of its children that
//! were still running becomes [`exitcode::UNKNOWN`](crate::exitcode::UNKNOWN)
//! (they are still waited for, on their pidfds).
//!
//! The server knows no layer above it: a request names a *runner* (a plain
//! `fn` of the layer that asks, by address: the server is a fork of the
//! same image) and carries that layer's bytes and fds. The process layer's
//! runner builds the child from its child spec and runs the one bootstrap
//! every task child runs; the pool's makes a worker. So `process` and
//! `pool` use this module, and it uses neither.
//!
//! [`Process::from_fn`]: crate::Process::from_fn
//! [`active_children`]: crate::active_children

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::{self, DEFAULT_MAX_FRAME_LEN};
use crate::error::{Error, Result};
use crate::popen::Popen;
use crate::sys::{self, ServerRunner, SharedProgress, Sig};

/// How a child is created (Python's `multiprocessing.set_start_method`).
///
/// ```
/// use multiproc::StartMethod;
/// assert_eq!(StartMethod::default(), StartMethod::Fork);
/// multiproc::set_start_method(StartMethod::Fork);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartMethod {
    /// The caller forks the child: the child sees the caller's memory as it
    /// is at the start, and may run a closure. Fast from a small,
    /// single-threaded caller; see the "Fork safety" section of the crate
    /// docs for what breaks in a caller with threads.
    #[default]
    Fork,
    /// The fork server forks the child (see [`start`]): safe in a program
    /// with threads, and as fast from a big caller as from a small one. The
    /// child runs a plain `fn` with a serde argument, and sees the program
    /// as it was at [`start`].
    ForkServer,
}

static DEFAULT_METHOD: AtomicU8 = AtomicU8::new(0);

/// Sets the default start method of [`Process::from_fn`] processes and
/// pools built after the call. [`StartMethod::Fork`] until set;
/// [`start`] does not change it.
///
/// ```no_run
/// multiproc::forkserver::start()?;
/// multiproc::set_start_method(multiproc::StartMethod::ForkServer);
/// let pool = multiproc::Pool::new(2)?; // workers forked by the server
/// assert_eq!(pool.map(|x: u32| x * 2, 0..3u32)?, vec![0, 2, 4]);
/// # Ok::<(), multiproc::Error>(())
/// ```
///
/// [`Process::from_fn`]: crate::Process::from_fn
pub fn set_start_method(method: StartMethod) {
    DEFAULT_METHOD.store(method as u8, Ordering::Relaxed);
}

/// The default start method (see [`set_start_method`]).
pub(crate) fn default_start_method() -> StartMethod {
    match DEFAULT_METHOD.load(Ordering::Relaxed) {
        0 => StartMethod::Fork,
        _ => StartMethod::ForkServer,
    }
}

/// The caller's handle on its server.
struct Server {
    /// The process that started it: a child of that process inherits this
    /// value but may not use it (the replies would be mixed up).
    owner: u32,
    /// Requests and replies, one at a time.
    ctl: Mutex<OwnedFd>,
    /// Set when a reply did not come in time: a late one would be taken
    /// for the answer to the next request, so no more requests go out.
    broken: AtomicBool,
    /// The server itself, a direct child of the owner.
    popen: Popen,
}

static SERVER: sys::LeakedCell<Server> = sys::LeakedCell::new();

/// Pools whose workers the server forks share progress counters with them
/// through one of these mappings, made by [`start`] *before* the server is
/// forked, so the server and its children map them too. Kept with the pid
/// of the process whose [`start`] made it: a child that starts a server of
/// its own makes its own arena.
static ARENA: sys::LeakedCell<(u32, Vec<Arc<SharedProgress>>)> = sys::LeakedCell::new();
/// Pools with `ForkServer` alive at once. Each is one mapping (one VMA)
/// in the server, which every fork of the server copies: kept small.
const ARENA_POOLS: usize = 16;
/// Workers of one such pool at most.
pub(crate) const ARENA_SLOTS: usize = 256;

/// The most a request (child spec and job, not the argument) may take.
const REQUEST_MAX: usize = 64 * 1024;
/// How long the caller waits for the server's answer to one request.
const REPLY_DEADLINE: Duration = Duration::from_secs(60);
/// How often the server checks that its caller is still there (the death
/// signal is the main mechanism; this is the belt to its braces).
const PARENT_CHECK: Duration = Duration::from_secs(1);

/// Starts the fork server. Call it first in `main`, while the program has
/// one thread (before a logger, a runtime or a thread pool starts threads):
/// the server is forked from that clean image.
///
/// Calling it again in the same process does nothing. It does not change
/// the default start method (see [`set_start_method`]).
///
/// ```no_run
/// fn main() -> multiproc::Result<()> {
///     multiproc::forkserver::start()?;
///     // ... start threads, build big data structures ...
///     let pool = multiproc::Pool::builder()
///         .processes(2)
///         .start_method(multiproc::StartMethod::ForkServer)
///         .build()?;
///     assert_eq!(pool.map(|x: u64| x + 1, 0..4u64)?, vec![1, 2, 3, 4]);
///     Ok(())
/// }
/// ```
///
/// # Errors
/// [`Error::ForkServer`] when the program already has more than one thread
/// or the kernel lacks pidfds (Linux 5.3); [`Error::Io`] if a socket, the
/// shared mappings or the fork fail.
pub fn start() -> Result<()> {
    let me = sys::getpid().as_raw() as u32;
    if SERVER.get().is_some_and(|s| s.owner == me) {
        return Ok(());
    }
    let threads = sys::thread_count()?;
    if threads > 1 {
        return Err(Error::ForkServer {
            reason: format!(
                "forkserver::start() must run first in main, while the program has one thread; \
                 it has {threads}"
            ),
        });
    }
    if !sys::pidfd_supported() {
        return Err(Error::ForkServer {
            reason: "the fork server needs pidfds (linux 5.3 or later)".to_string(),
        });
    }
    crate::unwind::install_hook();
    sys::prepare_dev_null()?;
    if ARENA.get().is_none_or(|(owner, _)| *owner != me) {
        let arena = (0..ARENA_POOLS)
            .map(|_| SharedProgress::new(ARENA_SLOTS).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        ARENA.set((me, arena));
    }
    let (ours, theirs) = sys::seqpacket_pair()?;
    let ours_raw = sys::raw(&ours);
    let popen = Popen::fork_raw(move || serve(theirs, ours_raw, me))?;
    SERVER.set(Server {
        owner: me,
        ctl: Mutex::new(ours),
        broken: AtomicBool::new(false),
        popen,
    });
    Ok(())
}

/// The pid of this process's fork server, if [`start`] succeeded here and
/// the server still runs.
///
/// ```
/// // Not started in this doctest:
/// assert_eq!(multiproc::forkserver::server_pid(), None);
/// ```
pub fn server_pid() -> Option<u32> {
    server()
        .ok()
        .filter(|s| matches!(s.popen.poll(), Ok(None)))
        .map(|s| s.popen.pid())
}

fn server() -> Result<&'static Server> {
    let me = sys::getpid().as_raw() as u32;
    match SERVER.get() {
        Some(s) if s.owner == me => Ok(s),
        Some(_) => Err(Error::ForkServer {
            reason: "the fork server belongs to the process that called forkserver::start(); \
                     call it first in this process's main to use StartMethod::ForkServer here"
                .to_string(),
        }),
        None => Err(Error::ForkServer {
            reason: "StartMethod::ForkServer needs a fork server: call \
                     multiproc::forkserver::start() first in main"
                .to_string(),
        }),
    }
}

/// Errs (naming [`start`]) unless `method` can be used in this process.
pub(crate) fn check(method: StartMethod) -> Result<()> {
    match method {
        StartMethod::Fork => Ok(()),
        StartMethod::ForkServer => server().map(|_| ()),
    }
}

/// A request: which runner the child runs (an address in the one image),
/// and the bytes it gets. The fds ride along: the child's channel first,
/// then the extra ones.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    runner: usize,
    payload: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    /// The child's pid; its pidfd rides along.
    Forked(u32),
    /// Why the fork failed.
    Failed(String),
}

/// Asks the server for a child that runs `runner(payload, fds, server
/// pid)` (`fds`: the child's end of its channel, then `extra`), and writes
/// `arg` (a task's encoded argument), if any, on the channel for the child
/// to read with [`read_arg`]. The [`Popen`] waits through the server.
pub(crate) fn fork_child(
    runner: ServerRunner,
    payload: Vec<u8>,
    extra: Vec<OwnedFd>,
    arg: Option<Vec<u8>>,
) -> Result<Popen> {
    let server = server()?;
    if extra.len() + 1 > sys::MAX_FDS {
        return Err(Error::ForkServer {
            reason: format!("a fork server request carries at most {} fds", sys::MAX_FDS),
        });
    }
    let mut req = Vec::new();
    codec::encode_value(
        &Request {
            runner: sys::fn_addr(runner),
            payload,
        },
        &mut req,
    )?;
    if req.len() > REQUEST_MAX {
        return Err(Error::ForkServer {
            reason: format!(
                "a fork server request of {} bytes is over the limit of {REQUEST_MAX}",
                req.len()
            ),
        });
    }
    // The child's channel: the argument goes to the child on it, its exit
    // code comes back from the server on it.
    let (ours, theirs) = sys::socket_pair(0)?;
    let mut fds: Vec<BorrowedFd<'_>> = vec![theirs.as_fd()];
    fds.extend(extra.iter().map(|e| e.as_fd()));
    let mut buf = [0u8; 512];
    let (n, mut got) = {
        let ctl = server.ctl.lock().unwrap_or_else(|e| e.into_inner());
        if server.broken.load(Ordering::Relaxed) {
            return Err(Error::ForkServer {
                reason: "the fork server stopped answering".to_string(),
            });
        }
        sys::send_with_fds(ctl.as_fd(), &req, &fds).map_err(|e| {
            // A server that died: reap it (it is our child).
            let _ = server.popen.poll();
            gone(e)
        })?;
        if sys::poll_readable(&[ctl.as_fd()], Some(REPLY_DEADLINE))?.is_empty() {
            server.broken.store(true, Ordering::Relaxed);
            return Err(Error::ForkServer {
                reason: "the fork server did not answer".to_string(),
            });
        }
        sys::recv_with_fds(ctl.as_fd(), &mut buf).map_err(gone)?
    };
    drop(fds);
    drop(theirs);
    drop(extra);
    if n == 0 {
        return Err(gone(io::ErrorKind::UnexpectedEof.into()));
    }
    match codec::decode::<Reply>(&buf[..n])? {
        Reply::Forked(pid) => {
            let Some(pidfd) = got.pop() else {
                return Err(Error::ForkServer {
                    reason: "the fork server sent no pidfd".to_string(),
                });
            };
            if let Some(arg) = arg {
                let mut frame = Vec::with_capacity(8 + arg.len());
                frame.extend_from_slice(&(arg.len() as u64).to_le_bytes());
                frame.extend_from_slice(&arg);
                // A child that died before reading it: its status tells.
                let _ = sys::write_all(ours.as_fd(), &frame);
            }
            Ok(Popen::through_server(pid, pidfd, ours))
        }
        Reply::Failed(reason) => Err(Error::Io(io::Error::other(reason))),
    }
}

fn gone(e: io::Error) -> Error {
    Error::ForkServer {
        reason: format!("the fork server is gone ({e})"),
    }
}

/// A free mapping of the arena for a pool of `n` workers whose workers the
/// server forks.
pub(crate) fn progress_for_server(n: usize) -> Result<Arc<SharedProgress>> {
    server()?;
    if n > ARENA_SLOTS {
        return Err(Error::ForkServer {
            reason: format!(
                "a pool with StartMethod::ForkServer has at most {ARENA_SLOTS} workers"
            ),
        });
    }
    let (_, arena) = ARENA.get().expect("forkserver::start() maps the arena");
    // Free: only the arena holds it (its pool and workers are gone).
    // Lock-free claim: take a reference, keep it only if ours is the one
    // other (two threads that both took one both let go, and look on).
    arena
        .iter()
        .find_map(|p| {
            if Arc::strong_count(p) != 1 {
                return None;
            }
            let ours = Arc::clone(p);
            (Arc::strong_count(p) == 2).then_some(ours)
        })
        .ok_or_else(|| Error::ForkServer {
            reason: format!("at most {ARENA_POOLS} pools with StartMethod::ForkServer at once"),
        })
}

/// Where `progress` sits in the arena (what a child of the server maps).
pub(crate) fn arena_index(progress: &Arc<SharedProgress>) -> Option<usize> {
    ARENA
        .get()
        .and_then(|(_, a)| a.iter().position(|p| Arc::ptr_eq(p, progress)))
}

/// The arena's mapping `i`, in a child of the server.
pub(crate) fn arena(i: usize) -> Option<Arc<SharedProgress>> {
    ARENA.get().and_then(|(_, a)| a.get(i)).cloned()
}

/// A child of the server, as the server holds it.
struct Kid {
    popen: Popen,
    /// The server's end of the child's channel: the exit code goes there.
    status: OwnedFd,
}

/// The server's life: dies with `caller`, forks what it is asked, reaps
/// and reports. Single-threaded; never runs user code itself (only its
/// children do, after the fork).
fn serve(ctl: OwnedFd, caller_end: RawFd, caller: u32) -> i32 {
    sys::close_raw(caller_end);
    if sys::set_parent_death_signal(Sig::SIGKILL).is_err() {
        return crate::exitcode::SETUP_FAILED;
    }
    if sys::getppid().as_raw() as u32 != caller {
        return 0;
    }
    // Ctrl-C in a terminal is the caller's to handle; its children get
    // the default back before their code runs.
    let _ = sys::ignore_signal(Sig::SIGINT);
    sys::set_os_name("mp-forkserver");
    let me = sys::getpid().as_raw() as u32;
    let mut kids: Vec<Kid> = Vec::new();
    let mut buf = vec![0u8; REQUEST_MAX];
    loop {
        let ready = {
            let mut fds: Vec<BorrowedFd<'_>> = vec![ctl.as_fd()];
            fds.extend(kids.iter().map(|k| k.popen.sentinel()));
            sys::poll_readable(&fds, Some(PARENT_CHECK)).unwrap_or_default()
        };
        if sys::getppid().as_raw() as u32 != caller {
            return 0;
        }
        let exited: Vec<usize> = ready.iter().filter(|&&i| i > 0).map(|i| i - 1).collect();
        if !exited.is_empty() {
            let mut i = 0;
            kids.retain(|k| {
                let was = i;
                i += 1;
                if !exited.contains(&was) {
                    return true;
                }
                match k.popen.poll() {
                    Ok(Some(code)) => {
                        let _ = sys::write_all(k.status.as_fd(), &code.to_le_bytes());
                        false
                    }
                    _ => true,
                }
            });
        }
        if ready.first() == Some(&0) {
            match handle_request(&ctl, &mut buf, &kids, me) {
                Ok(Some(kid)) => kids.push(kid),
                Ok(None) => {}
                // The caller closed its end: nothing more will come.
                Err(()) => return 0,
            }
        }
    }
}

/// Reads one request, forks the child, replies. `Err` at end of file.
fn handle_request(
    ctl: &OwnedFd,
    buf: &mut [u8],
    kids: &[Kid],
    me: u32,
) -> std::result::Result<Option<Kid>, ()> {
    let reply = |r: &Reply, fd: Option<BorrowedFd<'_>>| {
        let mut out = Vec::new();
        if codec::encode_value(r, &mut out).is_ok() {
            let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
            let _ = sys::send_with_fds(ctl.as_fd(), &out, &fds);
        }
    };
    let (n, mut fds) = match sys::recv_with_fds(ctl.as_fd(), buf) {
        Ok((0, _)) => return Err(()),
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => {
            reply(
                &Reply::Failed(format!("bad fork server request: {e}")),
                None,
            );
            return Ok(None);
        }
    };
    let req = match codec::decode::<Request>(&buf[..n]) {
        Ok(r) => r,
        Err(e) => {
            reply(
                &Reply::Failed(format!("bad fork server request: {e}")),
                None,
            );
            return Ok(None);
        }
    };
    if fds.is_empty() {
        reply(
            &Reply::Failed("fork server request without a channel".to_string()),
            None,
        );
        return Ok(None);
    }
    let status = fds.remove(0);
    let child_status = match status.try_clone() {
        Ok(s) => s,
        Err(e) => {
            reply(&Reply::Failed(e.to_string()), None);
            return Ok(None);
        }
    };
    // Everything of the server's the child must not keep.
    let mut close: Vec<RawFd> = vec![sys::raw(ctl), sys::raw(&status)];
    for k in kids {
        close.push(sys::raw_of(k.popen.sentinel()));
        close.push(sys::raw(&k.status));
    }
    let runner = sys::fn_from_addr::<sys::ServerRunner>(req.runner);
    let payload = req.payload;
    let forked = Popen::fork_raw(move || {
        for fd in close {
            sys::close_raw(fd);
        }
        // The server ignores it; the child's code gets the default back.
        let _ = sys::default_signal(Sig::SIGINT);
        let mut child_fds = vec![child_status];
        child_fds.extend(fds);
        runner(&payload, child_fds, me)
    });
    match forked {
        Ok(popen) => {
            reply(&Reply::Forked(popen.pid()), Some(popen.sentinel()));
            Ok(Some(Kid { popen, status }))
        }
        Err(e) => {
            reply(&Reply::Failed(format!("fork failed: {e}")), None);
            Ok(None)
        }
    }
}

/// In a child of the server: reads the argument [`fork_child`] wrote on
/// the child's channel (a little-endian `u64` length, then the bytes).
pub(crate) fn read_arg(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    read_exact(fd, &mut len)?;
    let len = u64::from_le_bytes(len);
    if len > DEFAULT_MAX_FRAME_LEN as u64 {
        return Err(io::Error::other("oversize argument"));
    }
    let mut arg = vec![0u8; len as usize];
    read_exact(fd, &mut arg)?;
    Ok(arg)
}

fn read_exact(fd: BorrowedFd<'_>, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match sys::read(fd, buf)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_start_fork_server_is_an_error_naming_start() {
        let e = check(StartMethod::ForkServer).unwrap_err();
        assert!(e.is_fork_server());
        assert!(e.to_string().contains("forkserver::start()"), "{e}");
        assert!(check(StartMethod::Fork).is_ok());
    }

    #[test]
    fn start_refuses_a_threaded_program() {
        // Another thread of our own makes the process multi-threaded
        // whatever the harness does.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = rx.recv();
        });
        let e = start().unwrap_err();
        drop(tx);
        t.join().unwrap();
        assert!(e.is_fork_server(), "{e:?}");
        assert!(e.to_string().contains("one thread"), "{e}");
        assert!(e.to_string().contains("forkserver::start()"), "{e}");
    }
}
