//! Facts about the calling process: pids, threads, open fds.

use std::io;

use nix::libc;
use nix::unistd::Pid;

/// `getpid()`.
pub(crate) fn getpid() -> Pid {
    nix::unistd::getpid()
}

/// `getppid()`.
pub(crate) fn getppid() -> Pid {
    nix::unistd::getppid()
}

/// `true` on the process's main thread (its tid is its pid). In a forked
/// child the forking thread is the only one and always the main thread.
pub(crate) fn is_main_thread() -> bool {
    nix::unistd::gettid() == nix::unistd::getpid()
}

/// The number of threads of the calling process (`/proc/self/task`).
pub(crate) fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
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
