//! Whole-program behaviour, each case in a fresh copy of this test binary
//! (re-run with one `#[ignore]`d test): stdout across fork, the at-exit
//! finalizer, a SIGKILLed parent, zombies, fd leaks, the multi-thread
//! warning. The outer tests check the subprocess's status and output.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{run_self, DEADLINE};
use multiproc::{Process, Result};

// ---------------------------------------------------------------- stdout

#[test]
fn stdout_is_not_duplicated_and_unterminated_print_appears() {
    let run = run_self("inner_stdout", &[], DEADLINE);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(
        run.stdout.matches("parent-before-fork").count(),
        1,
        "{run:?}"
    );
    assert_eq!(
        run.stdout.matches("child-unterminated").count(),
        1,
        "{run:?}"
    );
    assert!(run.stdout.contains("parent-after-join"), "{run:?}");
}

#[test]
#[ignore = "run by stdout_is_not_duplicated_and_unterminated_print_appears"]
fn inner_stdout() -> Result<()> {
    use std::io::Write;
    // Unterminated: still in stdout's line buffer when we fork.
    print!("parent-before-fork");
    let mut p = Process::new(|| print!("child-unterminated"));
    p.start()?;
    assert_eq!(p.join()?, 0);
    println!();
    println!("parent-after-join");
    std::io::stdout().flush()?;
    Ok(())
}

// -------------------------------------------------------- end of main

#[test]
fn at_exit_terminates_daemonic_and_joins_others() {
    let t0 = Instant::now();
    let run = run_self("inner_at_exit", &[], DEADLINE);
    assert!(run.status.success(), "{run:?}");
    // The non-daemonic child ran to its end before the parent exited.
    assert!(run.stdout.contains("worker-finished"), "{run:?}");
    let daemon_pid: u32 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("daemon-pid "))
        .expect("daemon pid printed")
        .parse()
        .unwrap();
    // The daemonic child was terminated (and reaped) by the finalizer: it is
    // gone the moment the parent is, well within its 60 s sleep.
    assert!(
        common::is_dead(daemon_pid),
        "daemonic child {daemon_pid} survived"
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
}

#[test]
#[ignore = "run by at_exit_terminates_daemonic_and_joins_others"]
fn inner_at_exit() -> Result<()> {
    let mut daemon = Process::new(|| std::thread::sleep(Duration::from_secs(60))).with_daemon(true);
    daemon.start()?;
    println!("daemon-pid {}", daemon.pid().unwrap());
    let (mut tx, mut rx) = multiproc::pipe()?;
    let mut worker = Process::new(move || {
        // Wait for the parent to be on its way out, then finish some work.
        let _: () = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        println!("worker-finished");
    });
    worker.start()?;
    tx.send(&())?;
    // Both handles are dropped here, neither joined: the finalizer does it.
    Ok(())
}

// ------------------------------------------------------ killed parent

/// Runs an inner test that prints `daemon-pid N`, SIGKILLs it once the line
/// is out, and checks that the daemonic child dies too.
fn killed_parent_takes_daemon_along(inner: &str) {
    let mut child = common::self_command(inner)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(pid) = line.strip_prefix("daemon-pid ") {
                let _ = tx.send(pid.parse::<u32>().unwrap());
            }
        }
    });
    let pid = rx.recv_timeout(DEADLINE);
    child.kill().unwrap();
    child.wait().unwrap();
    let pid = pid.expect("inner test never reported its daemon");
    assert!(
        common::eventually(DEADLINE, || common::is_dead(pid)),
        "daemonic child {pid} outlived its SIGKILLed parent"
    );
}

#[test]
fn sigkilled_parent_leaves_no_daemonic_child() {
    killed_parent_takes_daemon_along("inner_killed_parent");
}

#[test]
#[ignore = "run by sigkilled_parent_leaves_no_daemonic_child"]
fn inner_killed_parent() -> Result<()> {
    let mut daemon = Process::new(|| std::thread::sleep(Duration::from_secs(60))).with_daemon(true);
    daemon.start()?;
    println!("daemon-pid {}", daemon.pid().unwrap());
    std::thread::sleep(Duration::from_secs(30));
    Ok(())
}

#[test]
fn daemon_started_in_a_short_lived_thread_outlives_the_thread() {
    killed_parent_takes_daemon_along("inner_thread_daemon");
}

#[test]
#[ignore = "run by daemon_started_in_a_short_lived_thread_outlives_the_thread"]
fn inner_thread_daemon() -> Result<()> {
    let (mut tx, mut rx) = multiproc::pipe()?;
    let daemon = std::thread::spawn(move || {
        let mut daemon = Process::new(move || {
            // Answers pings for as long as it lives.
            while let Ok(()) = rx.recv::<()>() {
                rx.send(&()).unwrap();
            }
        })
        .with_daemon(true);
        daemon.start().unwrap();
        daemon
    })
    .join()
    .unwrap();
    // The thread that asked for the fork is gone; PR_SET_PDEATHSIG must not
    // have fired: the daemon still answers.
    std::thread::sleep(Duration::from_millis(100));
    tx.send(&())?;
    let pong: Option<()> = tx.recv_timeout(DEADLINE)?;
    assert!(pong.is_some() && daemon.is_alive());
    println!("daemon-pid {}", daemon.pid().unwrap());
    std::thread::sleep(Duration::from_secs(30));
    Ok(())
}

// ------------------------------------------------------------ zombies

#[test]
fn dropped_children_leave_no_zombie() {
    let run = run_self("inner_no_zombies", &[], Duration::from_secs(120));
    assert!(run.status.success(), "{run:?}");
}

#[test]
#[ignore = "run by dropped_children_leave_no_zombie"]
fn inner_no_zombies() -> Result<()> {
    for _ in 0..200 {
        let mut p = Process::new(|| {});
        p.start()?;
        // Dropped without join.
    }
    let me = std::process::id();
    assert!(common::eventually(DEADLINE, || multiproc::active_children(
    )
    .is_empty()));
    assert_eq!(common::zombies_of(me), Vec::<u32>::new());
    Ok(())
}

// ------------------------------------------------------------ fd leaks

#[test]
fn no_fd_leak_over_400_cycles() {
    let run = run_self("inner_fd_count", &[], Duration::from_secs(120));
    assert!(run.status.success(), "{run:?}");
}

#[test]
#[ignore = "run by no_fd_leak_over_400_cycles"]
fn inner_fd_count() -> Result<()> {
    // Warm up: one-time probes (pidfd support) and lazy statics.
    let mut p = Process::new(|| {});
    p.start()?;
    p.join()?;
    multiproc::spawn(|| 1u64)?.join()?;
    let before = common::fd_count();
    for _ in 0..200 {
        let mut p = Process::new(|| {});
        p.start()?;
        assert_eq!(p.join()?, 0);
    }
    for i in 0..200u64 {
        assert_eq!(multiproc::spawn(move || i)?.join()?, i);
    }
    assert_eq!(common::fd_count(), before);
    Ok(())
}

// --------------------------------------------------- foreign children

#[test]
fn command_children_stay_waitable() {
    let mut foreign = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
    // Give the shell time to exit, then fork, join and reap our own children:
    // none of this may reap the shell's pid.
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..5 {
        let mut p = Process::new(|| {});
        p.start().unwrap();
        p.join().unwrap();
        let _ = multiproc::active_children();
    }
    multiproc::shutdown();
    let status = foreign.wait().unwrap();
    assert_eq!(status.code(), Some(7));
}

// --------------------------------------------- multi-threaded warning

#[test]
fn multi_threaded_parent_is_warned_once() {
    let run = run_self("inner_thread_warning", &[], DEADLINE);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(
        run.stderr
            .matches("WARN multiproc: forking a process with")
            .count(),
        1,
        "{run:?}"
    );
    assert!(run.stderr.contains("Fork safety"), "{run:?}");
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        eprintln!("{} {}", record.level(), record.args());
    }
    fn flush(&self) {}
}

#[test]
#[ignore = "run by multi_threaded_parent_is_warned_once"]
fn inner_thread_warning() -> Result<()> {
    log::set_logger(&StderrLogger).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || stop_rx.recv());
    for _ in 0..3 {
        let mut p = Process::new(|| {});
        p.start()?;
        p.join()?;
    }
    stop_tx.send(()).unwrap();
    let _ = t.join();
    Ok(())
}

// ------------------------------------------------ sentinel-pipe fallback

#[test]
fn sentinel_pipe_fallback_works_without_pidfd() {
    let run = run_self(
        "inner_no_pidfd",
        &[("MULTIPROC_NO_PIDFD", "1")],
        Duration::from_secs(60),
    );
    assert!(run.status.success(), "{run:?}");
}

#[test]
#[ignore = "run by sentinel_pipe_fallback_works_without_pidfd"]
fn inner_no_pidfd() -> Result<()> {
    use std::os::fd::AsRawFd;
    let mut p = Process::new(|| multiproc::exit(4));
    p.start()?;
    // Not a pidfd: /proc/self/fd/N of a pipe reads "pipe:[...]".
    let fd = p.sentinel().unwrap().as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))?;
    assert!(link.to_string_lossy().starts_with("pipe:"), "{link:?}");
    assert_eq!(p.join()?, 4);

    let mut slow = Process::new(|| std::thread::sleep(Duration::from_secs(30)));
    slow.start()?;
    assert_eq!(slow.join_timeout(Duration::from_millis(50))?, None);
    slow.kill()?;
    assert_eq!(slow.join_timeout(DEADLINE)?, Some(-9));

    let big = multiproc::spawn(|| serde_bytes::ByteBuf::from(vec![7u8; 4 << 20]))?.join()?;
    assert_eq!(big.len(), 4 << 20);
    let died = multiproc::spawn(|| -> u8 { std::process::abort() })?.join();
    assert!(
        matches!(died, Err(multiproc::Error::Died { exitcode: -6, .. })),
        "{died:?}"
    );
    Ok(())
}
