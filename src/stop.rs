//! [`StopSignal`]: graceful stop of a supervised child (gunicorn's graceful
//! worker shutdown).

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::error::{Error, Result};
use crate::process::{per_process, StartState};
use crate::sys;

/// This process's stop pipe: (owner pid, (read end, write end)).
static STOP: sys::LeakedCell<(u32, (OwnedFd, OwnedFd))> = sys::LeakedCell::new();
static STOP_INIT: StartState = StartState::new();

/// A graceful stop for a child of a [`Supervisor`](crate::Supervisor) or
/// [`fork_processes`](crate::fork_processes): once installed, `SIGTERM` no
/// longer kills the process; it sets [`requested`](StopSignal::requested)
/// and makes the `StopSignal`'s fd readable, so a server polls it together
/// with its listener, stops accepting, finishes the connections it holds
/// and exits with status 0.
///
/// The supervisor's grace period still bounds every stop: a child that
/// ignores the request is `SIGKILL`ed when it ends. A child that exits 0
/// after a stop request is not restarted. With it, rolling restarts
/// (`SIGHUP`) and shutdowns fail no request already accepted. A child that
/// never installs it keeps the default: `SIGTERM` ends it at once.
///
/// The handler is per process: a process forked after `install` (a
/// [`Process`](crate::Process) of the server) dies of `SIGTERM` as usual.
/// Only `SIGTERM` is taken over (the supervisor forwards `SIGINT` to its
/// children as `SIGTERM`).
///
/// ```no_run
/// use std::net::TcpListener;
/// use std::os::fd::AsFd;
/// use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
/// # fn serve(_: std::net::TcpStream) {}
///
/// let listener = TcpListener::bind("127.0.0.1:8080")?;
/// listener.set_nonblocking(true)?;
/// let _id = multiproc::fork_processes(4, None)?;
/// let stop = multiproc::StopSignal::install()?;
/// while !stop.requested() {
///     let mut fds = [
///         PollFd::new(listener.as_fd(), PollFlags::POLLIN),
///         PollFd::new(stop.as_fd(), PollFlags::POLLIN),
///     ];
///     poll(&mut fds, PollTimeout::NONE)?;
///     if let Ok((conn, _)) = listener.accept() {
///         serve(conn); // finish it even if a stop comes meanwhile
///     }
/// }
/// std::process::exit(0);
/// # #[allow(unreachable_code)]
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy)]
pub struct StopSignal {
    read: &'static OwnedFd,
}

impl StopSignal {
    /// Takes over `SIGTERM` for a graceful stop (once per process: later
    /// calls return the same signal).
    ///
    /// # Errors
    /// [`Error::Io`] if the pipe or the handler cannot be set up.
    pub fn install() -> Result<StopSignal> {
        let (read, _write) = per_process(&STOP, &STOP_INIT, || {
            let (r, w) = sys::pipe()?;
            sys::set_nonblocking(r.as_fd())?;
            sys::set_nonblocking(w.as_fd())?;
            sys::install_stop_handler(w.as_fd())?;
            Ok((r, w))
        })
        .ok_or_else(|| {
            Error::Io(std::io::Error::other(
                "cannot install the graceful stop handler",
            ))
        })?;
        Ok(StopSignal { read })
    }

    /// Whether a stop was requested (`SIGTERM` came) since
    /// [`install`](StopSignal::install).
    pub fn requested(&self) -> bool {
        sys::stop_requested()
    }
}

impl AsFd for StopSignal {
    /// Readable once a stop was requested (and from then on).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl fmt::Debug for StopSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StopSignal")
            .field("requested", &self.requested())
            .finish()
    }
}
