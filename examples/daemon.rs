//! A small daemon with a pid file and log files, built on
//! [`multiproc::Daemon`]: `start` detaches it (the launcher exits 0 once the
//! daemon's setup succeeded), a second `start` is refused while it runs,
//! `status` tells whether it runs, and `stop` sends it `SIGTERM` and waits
//! for it to exit. On `SIGTERM` (or `SIGINT`) the daemon logs a last line
//! and returns from `main`: the at-exit finalizer removes its pid file.
//!
//! ```text
//! cargo run --example daemon -- start          # files under $TMPDIR/multiproc-daemon-example
//! cargo run --example daemon -- start          # daemon: cannot start: already running as pid 41803 (...)
//! cargo run --example daemon -- status         # running as pid 41803
//! cargo run --example daemon -- stop           # stopped pid 41803
//! cargo run --example daemon -- --dir /var/tmp/d start
//! ```
//!
//! The directory holds `daemon.pid`, `daemon.log` (stdout) and
//! `daemon.err` (stderr); it comes from `--dir`, else from
//! `MULTIPROC_DAEMON_DIR`, else a folder in the temporary directory. Exit
//! codes: 0 done; 1 refused or failed (the reason on stderr); 3 for
//! `status` and `stop` when no daemon runs.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use multiproc::Daemon;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::unistd::Pid;

/// How long `stop` waits for the daemon to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the daemon writes a heartbeat line to its log.
const HEARTBEAT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let mut dir = std::env::var_os("MULTIPROC_DAEMON_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("multiproc-daemon-example"));
    let mut command = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => match args.next() {
                Some(d) => dir = PathBuf::from(d),
                None => return usage("--dir needs a value"),
            },
            "start" | "stop" | "status" if command.is_none() => command = Some(a),
            other => return usage(&format!("unexpected argument {other}")),
        }
    }
    let pid_file = dir.join("daemon.pid");
    let result = match command.as_deref() {
        Some("start") => start(&dir, &pid_file),
        Some("stop") => stop(&pid_file),
        Some("status") => status(&pid_file),
        _ => return usage("no command"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("daemon: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("daemon: {problem}\nusage: daemon [--dir DIR] start|stop|status");
    ExitCode::from(2)
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Detaches; only the daemon returns from `Daemon::start` (the launcher
/// exits 0 in it, or gets the daemon's setup error).
fn start(dir: &Path, pid_file: &Path) -> Result<ExitCode> {
    std::fs::create_dir_all(dir)?;
    // Block the stop signals *before* detaching: the daemon inherits the
    // mask, so a `stop` that comes right after `start` cannot kill it
    // before it listens (which would leave its pid file behind). The
    // launcher ignores them too while it waits for the setup report, at
    // most the setup timeout.
    let signals = stop_signals();
    signals.thread_block()?;
    let started = Daemon::new()
        .pid_file(pid_file)
        .working_directory(dir)
        .umask(0o027)
        .stdout(dir.join("daemon.log"))
        .stderr(dir.join("daemon.err"))
        .setup_timeout(Duration::from_secs(10))
        .start();
    if let Err(e) = started {
        return Err(format!("cannot start: {e}").into());
    }
    // The daemon: stdout is daemon.log.
    run_daemon(&signals)?;
    // Returning from `main` runs the at-exit finalizer: the pid file goes.
    Ok(ExitCode::SUCCESS)
}

/// The daemon's loop: a heartbeat line now and then, until a stop signal.
fn run_daemon(signals: &SigSet) -> Result<()> {
    let pid = std::process::id();
    let sigfd = SignalFd::new(signals)?;
    println!("daemon {pid}: up");
    let mut beats = 0u64;
    loop {
        if multiproc::wait(&[sigfd.as_fd()], Some(HEARTBEAT))?.is_empty() {
            // The work of a real daemon goes here.
            beats += 1;
            println!("daemon {pid}: heartbeat {beats}");
            continue;
        }
        if let Some(info) = sigfd.read_signal()? {
            let name = Signal::try_from(info.ssi_signo as i32)
                .map(|s| s.as_str())
                .unwrap_or("a signal");
            println!("daemon {pid}: {name}, stopping");
            return Ok(());
        }
    }
}

/// Sends `SIGTERM` to the daemon named by the pid file and waits until it
/// is gone.
fn stop(pid_file: &Path) -> Result<ExitCode> {
    let Some(pid) = running_pid(pid_file)? else {
        eprintln!("daemon: not running");
        return Ok(ExitCode::from(3));
    };
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
    let deadline = Instant::now() + STOP_TIMEOUT;
    while !is_gone(pid) {
        if Instant::now() >= deadline {
            return Err(format!("pid {pid} still runs {STOP_TIMEOUT:?} after SIGTERM").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("stopped pid {pid}");
    Ok(ExitCode::SUCCESS)
}

fn status(pid_file: &Path) -> Result<ExitCode> {
    Ok(match running_pid(pid_file)? {
        Some(pid) => {
            println!("running as pid {pid}");
            ExitCode::SUCCESS
        }
        None => {
            println!("not running");
            ExitCode::from(3)
        }
    })
}

/// The pid of the running daemon: the pid file names it only while the
/// daemon holds its lock (a daemon killed by `SIGKILL` leaves an unlocked,
/// stale file, whose pid may belong to another process by now).
fn running_pid(pid_file: &Path) -> Result<Option<u32>> {
    let file = match OpenOptions::new().read(true).open(pid_file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if is_unlocked(file) {
        return Ok(None);
    }
    let pid = std::fs::read_to_string(pid_file)?.trim().parse()?;
    Ok(Some(pid))
}

/// Whether nobody holds the lock on `file` (we take it and let it go).
fn is_unlocked(file: File) -> bool {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok()
}

/// Whether `pid` has exited (gone, or a zombie its new parent has not
/// reaped yet).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}
