//! System calls of the server layers (the pre-fork supervisor and the
//! daemon): the supervisor's signal self-pipe, and what a fresh program
//! needs from the process (session, umask, fds, a lock). Their fork site,
//! `fork_returning`, is in `fork.rs` next to the crate's other one.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};

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

/// `setsid()`: a new session and process group led by the caller.
pub(crate) fn new_session() -> io::Result<()> {
    nix::unistd::setsid().map(drop).map_err(io::Error::from)
}

/// `umask(mask)`; returns the previous mask.
pub(crate) fn set_umask(mask: u32) -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        mask as libc::mode_t,
    ));
    old.bits() as u32
}

/// Closes every fd of the process except `keep` (and fails only if the fd
/// table cannot be read).
pub(crate) fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut open = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        if let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        {
            open.push(fd);
        }
    }
    // The directory's own fd is already closed: closing it again is EBADF,
    // which `close_raw` ignores.
    for fd in open {
        if !keep.contains(&fd) {
            super::close_raw(fd);
        }
    }
    super::forget_dev_null();
    Ok(())
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(true)` if the lock was taken,
/// `Ok(false)` if another open file description holds it.
pub(crate) fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    loop {
        // SAFETY: flock takes an fd, borrowed and so open for the call, and
        // a flags word; it touches no memory of ours.
        let rc = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        match Errno::last() {
            Errno::EWOULDBLOCK => return Ok(false),
            Errno::EINTR => {}
            e => return Err(e.into()),
        }
    }
}
