//! Signals and `prctl`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

pub(crate) use nix::sys::signal::Signal as Sig;

/// `kill(pid, sig)`.
pub(crate) fn send_signal(pid: Pid, sig: Signal) -> io::Result<()> {
    signal::kill(pid, sig).map_err(io::Error::from)
}

/// `kill(pid, 0)`: whether a process with this pid exists (zombies included).
#[allow(dead_code)] // for the pool, supervisor and daemon layers
pub(crate) fn pid_exists(pid: Pid) -> bool {
    !matches!(signal::kill(pid, None), Err(nix::errno::Errno::ESRCH))
}

/// `prctl(PR_SET_PDEATHSIG, sig)`: the calling process gets `sig` when the
/// *thread* that forked it ends.
pub(crate) fn set_parent_death_signal(sig: Signal) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(sig).map_err(io::Error::from)
}

/// `prctl(PR_SET_NAME)`: the name `ps` and `/proc/<pid>/comm` show, cut to
/// 15 bytes (at a UTF-8 boundary). Builds the C string on the stack: no
/// allocation.
pub(crate) fn set_os_name(name: &str) {
    let mut buf = [0u8; 16];
    let mut len = name.len().min(15);
    while !name.is_char_boundary(len) {
        len -= 1;
    }
    for (dst, &src) in buf.iter_mut().zip(&name.as_bytes()[..len]) {
        // An interior NUL would end the name early; replace it.
        *dst = if src == 0 { b'?' } else { src };
    }
    if let Ok(cstr) = std::ffi::CStr::from_bytes_until_nul(&buf) {
        let _ = nix::sys::prctl::set_name(cstr);
    }
}

/// Sets the disposition of `sig` to "ignore".
#[allow(dead_code)] // for the pool, supervisor and daemon layers
pub(crate) fn ignore_signal(sig: Signal) -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code, so no async-signal-safety
    // requirement applies.
    unsafe { signal::signal(sig, SigHandler::SigIgn) }
        .map(drop)
        .map_err(io::Error::from)
}

/// Sets the disposition of `sig` back to the default action.
#[allow(dead_code)] // for the pool, supervisor and daemon layers
pub(crate) fn default_signal(sig: Signal) -> io::Result<()> {
    // SAFETY: SIG_DFL installs no handler code.
    unsafe { signal::signal(sig, SigHandler::SigDfl) }
        .map(drop)
        .map_err(io::Error::from)
}

/// Installs `handler` for `sig` with `SA_RESTART`.
///
/// The handler must be async-signal-safe: it may only touch atomics and call
/// async-signal-safe functions such as `write(2)`. Every caller in this crate
/// passes a handler that stores to an atomic or writes one byte to a pipe.
#[allow(dead_code)] // for the pool, supervisor and daemon layers
pub(crate) fn install_handler(sig: Signal, handler: extern "C" fn(i32)) -> io::Result<()> {
    let action = signal::SigAction::new(
        SigHandler::Handler(handler),
        signal::SaFlags::SA_RESTART,
        signal::SigSet::empty(),
    );
    // SAFETY: the contract above: every handler passed here is
    // async-signal-safe (atomics and `write(2)` only).
    unsafe { signal::sigaction(sig, &action) }
        .map(drop)
        .map_err(io::Error::from)
}

/// Unblocks every signal in the calling thread (a forked child inherits the
/// mask of the thread that forked it).
pub(crate) fn unblock_all_signals() -> io::Result<()> {
    signal::sigprocmask(
        signal::SigmaskHow::SIG_SETMASK,
        Some(&signal::SigSet::empty()),
        None,
    )
    .map_err(io::Error::from)
}

/// `signals` blocked in the calling thread until the guard is dropped
/// (then the thread's previous mask is back). Held across a fork so that a
/// signal sent to the new child before it has reset its handlers stays
/// pending until it has, instead of running the parent's handler there.
#[derive(Debug)]
pub(crate) struct BlockedSignals(Option<signal::SigSet>);

impl BlockedSignals {
    pub(crate) fn block(signals: &[Signal]) -> BlockedSignals {
        let mut set = signal::SigSet::empty();
        for &sig in signals {
            set.add(sig);
        }
        BlockedSignals(set.thread_swap_mask(signal::SigmaskHow::SIG_BLOCK).ok())
    }

    /// In a child: keep the signals blocked (the child unblocks them itself
    /// once its handlers are reset); the guard does nothing on drop.
    pub(crate) fn forget(mut self) {
        self.0 = None;
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        if let Some(old) = self.0.take() {
            let _ = old.thread_set_mask();
        }
    }
}

/// The write end of the graceful-stop pipe (-1: none), its owner's pid, and
/// whether a stop was requested: the state of [`on_stop`], lock-free.
static STOP_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);
static STOP_OWNER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The `SIGTERM` handler of a graceful stop: in the process that installed
/// it, sets the flag and writes one byte to the stop pipe. In a process
/// forked from it later (which inherits the handler but is not the one
/// asked to stop gracefully), it puts the default action back and raises
/// the signal again, so that child dies of `SIGTERM` as if nothing had been
/// installed. Only atomics, `getpid`, `write`, `sigaction` and `raise`: all
/// async-signal-safe; `errno` is saved and restored.
extern "C" fn on_stop(sig: libc::c_int) {
    let saved = nix::errno::Errno::last_raw();
    // SAFETY: getpid, write, signal and raise are async-signal-safe; the
    // buffer is one byte on this stack; a full pipe (EAGAIN on the
    // non-blocking fd) drops the byte, the pipe being readable already.
    unsafe {
        if libc::getpid() != STOP_OWNER.load(std::sync::atomic::Ordering::Relaxed) {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        } else {
            STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
            let fd = STOP_PIPE.load(std::sync::atomic::Ordering::Relaxed);
            if fd >= 0 {
                let byte = 1u8;
                libc::write(fd, (&byte as *const u8).cast(), 1);
            }
        }
    }
    nix::errno::Errno::set_raw(saved);
}

/// Makes `SIGTERM` request a graceful stop of the calling process: the
/// flag of [`stop_requested`] and a byte to `write_end` (a non-blocking
/// pipe that the caller keeps open for the life of the process).
pub(crate) fn install_stop_handler(write_end: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    STOP_OWNER.store(
        nix::unistd::getpid().as_raw(),
        std::sync::atomic::Ordering::Relaxed,
    );
    STOP_REQUESTED.store(false, std::sync::atomic::Ordering::SeqCst);
    STOP_PIPE.store(write_end.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
    install_handler(Signal::SIGTERM, on_stop)
}

/// Whether `SIGTERM` reached this process since [`install_stop_handler`].
pub(crate) fn stop_requested() -> bool {
    STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)
        && STOP_OWNER.load(std::sync::atomic::Ordering::Relaxed) == nix::unistd::getpid().as_raw()
}

/// The write end of the supervisor's signal pipe (-1: none).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// The signal handler of the supervisor: writes the signal number, one
/// byte, to the signal pipe. Only an atomic load and `write(2)`, both
/// async-signal-safe; `errno` is saved and restored.
extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    let saved = Errno::last_raw();
    let byte = sig as u8;
    // SAFETY: `write(2)` is async-signal-safe; the buffer is one byte on
    // this handler's stack; a full pipe (EAGAIN on the non-blocking fd) just
    // drops the byte, the signal being already pending in the pipe.
    unsafe {
        libc::write(fd, (&byte as *const u8).cast(), 1);
    }
    Errno::set_raw(saved);
}

/// The dispositions a supervisor replaced, to put back when it returns.
#[derive(Debug)]
pub(crate) struct SavedSignals(Vec<(Signal, SigAction)>);

/// Routes `signals` to the pipe whose write end is `write_end` (made
/// non-blocking here): each delivery writes the signal's number, one byte.
/// Returns the previous dispositions for [`restore_signals`].
pub(crate) fn route_signals_to_pipe(
    write_end: BorrowedFd<'_>,
    signals: &[Signal],
) -> io::Result<SavedSignals> {
    super::set_nonblocking(write_end)?;
    SIGNAL_PIPE.store(write_end.as_raw_fd(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let mut saved = SavedSignals(Vec::new());
    for &sig in signals {
        // SAFETY: `on_signal` is async-signal-safe (an atomic load and one
        // `write(2)`, errno preserved).
        match unsafe { signal::sigaction(sig, &action) } {
            Ok(old) => saved.0.push((sig, old)),
            Err(e) => {
                restore_signals(saved);
                return Err(e.into());
            }
        }
    }
    // A signal the caller had blocked would never reach the handler.
    let mut set = SigSet::empty();
    for &sig in signals {
        set.add(sig);
    }
    signal::sigprocmask(signal::SigmaskHow::SIG_UNBLOCK, Some(&set), None)?;
    Ok(saved)
}

/// Puts back the dispositions saved by [`route_signals_to_pipe`] and stops
/// writing to the pipe.
pub(crate) fn restore_signals(saved: SavedSignals) {
    for (sig, old) in saved.0 {
        // SAFETY: `old` is the disposition the process had before, as the
        // kernel reported it; reinstalling it restores the caller's contract.
        let _ = unsafe { signal::sigaction(sig, &old) };
    }
    SIGNAL_PIPE.store(-1, Ordering::Relaxed);
}

/// In a new child of the supervisor: stop routing signals to the parent's
/// pipe and give `signals` their default action back.
pub(crate) fn reset_signals_in_child(signals: &[Signal]) {
    SIGNAL_PIPE.store(-1, Ordering::Relaxed);
    for &sig in signals {
        let _ = super::default_signal(sig);
    }
    let _ = super::unblock_all_signals();
}

/// `pidfd_send_signal(pidfd, sig)`: signals exactly the process the pidfd
/// names. Once it has been reaped (by whoever), `ESRCH`: no recycled pid can
/// be hit.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: Signal) -> io::Result<()> {
    // SAFETY: the syscall reads only its integer arguments; `info` is NULL,
    // which the kernel documents as "like kill(2)".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
