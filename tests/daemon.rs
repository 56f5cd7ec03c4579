//! `Daemon`: each scenario re-runs this test binary as a launcher; the
//! daemon it leaves behind is observed from outside through /proc, its pid
//! file and its output files, and told to stop by a file appearing.

mod common;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use multiproc::{Daemon, Error};

fn dir_from_env() -> PathBuf {
    PathBuf::from(std::env::var("MP_DIR").expect("MP_DIR"))
}

/// In the daemon: waits (at most 20 s) for `dir/stop`.
fn wait_for_stop(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("stop").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
#[ignore]
fn prog_daemon() {
    let dir = dir_from_env();
    let pid_file = std::env::var("MP_PIDFILE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.join("d.pid"));
    let r = Daemon::new()
        .pid_file(&pid_file)
        .working_directory(&dir)
        .umask(0o027)
        .stdout(dir.join("out.log"))
        .stderr(dir.join("err.log"))
        .start();
    if let Err(e) = r {
        // In the launcher.
        match &e {
            Error::AlreadyRunning { pid, path } => {
                eprintln!("ERR AlreadyRunning pid={pid} path={}", path.display())
            }
            other => eprintln!("ERR {other}"),
        }
        std::process::exit(3);
    }
    // In the daemon: stdout goes to out.log.
    println!("hello from the daemon {}", std::process::id());
    append_line(&dir.join("ready"), "ready");
    wait_for_stop(&dir);
    multiproc::exit(0)
}

fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Stops a daemon left by a test, whatever happened to the test.
struct StopDaemon(PathBuf, Option<u32>);

impl Drop for StopDaemon {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("stop"), "");
        if let Some(pid) = self.1 {
            if !eventually(Duration::from_secs(5), || is_dead(pid)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn daemon_detaches_locks_its_pid_file_and_refuses_a_second_instance() {
    let dir = temp_dir("daemon");
    let mut guard = StopDaemon(dir.clone(), None);
    let env = [("MP_DIR", dir.to_str().unwrap())];
    let launcher = run_self("prog_daemon", &env, DEADLINE);
    assert_eq!(launcher.status.code(), Some(0), "{launcher:?}");
    let pid_file = dir.join("d.pid");
    let pid = read_pid_file(&pid_file).expect("the pid file names the daemon");
    guard.1 = Some(pid);
    assert!(eventually(DEADLINE, || dir.join("ready").exists()));

    // A new session, but not its leader: getsid(0) != pid.
    let sid: u32 = stat_fields(pid).unwrap()[3].parse().unwrap();
    let my_sid: u32 = stat_fields(std::process::id()).unwrap()[3].parse().unwrap();
    assert_ne!(sid, pid, "the daemon is not a session leader");
    assert_ne!(sid, my_sid, "the daemon left the launcher's session");

    // cwd and umask.
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, dir.canonicalize().unwrap());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Umask:\t0027"), "{status}");

    // Only 0, 1, 2 and the pid file are open.
    let mut fds: Vec<(u32, PathBuf)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().parse().unwrap(),
                std::fs::read_link(e.path()).unwrap(),
            )
        })
        .collect();
    fds.sort();
    let canon = dir.canonicalize().unwrap();
    assert_eq!(fds.len(), 4, "{fds:?}");
    assert_eq!(fds[0], (0, PathBuf::from("/dev/null")));
    assert_eq!(fds[1], (1, canon.join("out.log")));
    assert_eq!(fds[2], (2, canon.join("err.log")));
    assert_eq!(fds[3].1, canon.join("d.pid"));

    // The pid file is locked.
    let f = OpenOptions::new().read(true).open(&pid_file).unwrap();
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_) => panic!("the pid file is not locked"),
        Err((_, errno)) => assert_eq!(errno, nix::errno::Errno::EWOULDBLOCK),
    }

    // stdout went to the file.
    assert!(eventually(DEADLINE, || {
        std::fs::read_to_string(dir.join("out.log"))
            .unwrap_or_default()
            .contains(&format!("hello from the daemon {pid}"))
    }));

    // A second instance is refused, and says which pid runs.
    let second = run_self("prog_daemon", &env, DEADLINE);
    assert_eq!(second.status.code(), Some(3), "{second:?}");
    assert!(
        second
            .stderr
            .contains(&format!("ERR AlreadyRunning pid={pid}")),
        "{second:?}"
    );
    assert_eq!(
        read_pid_file(&pid_file),
        Some(pid),
        "the pid file is untouched"
    );

    // A clean exit removes the pid file.
    std::fs::write(dir.join("stop"), "").unwrap();
    assert!(eventually(DEADLINE, || is_dead(pid)));
    assert!(
        eventually(DEADLINE, || !pid_file.exists()),
        "pid file removed"
    );
}

#[test]
fn a_setup_error_reaches_the_launcher() {
    let dir = temp_dir("daemon-err");
    let _guard = StopDaemon(dir.clone(), None);
    let missing = dir.join("no-such-dir").join("d.pid");
    let run = run_self(
        "prog_daemon",
        &[
            ("MP_DIR", dir.to_str().unwrap()),
            ("MP_PIDFILE", missing.to_str().unwrap()),
        ],
        DEADLINE,
    );
    assert_eq!(run.status.code(), Some(3), "{run:?}");
    assert!(run.stderr.contains("ERR"), "{run:?}");
    assert!(run.stderr.contains("pid file"), "names the step: {run:?}");
    assert!(
        run.stderr.contains("No such file or directory"),
        "gives the OS error: {run:?}"
    );
    assert!(!dir.join("ready").exists(), "no daemon runs");
}

#[test]
#[ignore]
fn prog_spawn() {
    let dir = dir_from_env();
    let d2 = dir.clone();
    let pid = Daemon::new()
        .pid_file(dir.join("s.pid"))
        .spawn(move || {
            append_line(&d2.join("spawned"), &std::process::id().to_string());
            wait_for_stop(&d2);
        })
        .unwrap();
    println!("SPAWNED {pid}");
    println!("CALLER GOES ON {}", std::process::id());
}

#[test]
fn spawn_returns_the_daemon_pid_and_the_caller_goes_on() {
    let dir = temp_dir("daemon-spawn");
    let mut guard = StopDaemon(dir.clone(), None);
    let run = run_self("prog_spawn", &[("MP_DIR", dir.to_str().unwrap())], DEADLINE);
    assert!(run.status.success(), "{run:?}");
    let pid: u32 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("SPAWNED "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{run:?}"));
    guard.1 = Some(pid);
    assert!(run.stdout.contains("CALLER GOES ON"), "{run:?}");
    assert!(eventually(DEADLINE, || read_lines(&dir.join("spawned"))
        == [pid.to_string()]));
    assert_eq!(read_pid_file(&dir.join("s.pid")), Some(pid));
    std::fs::write(dir.join("stop"), "").unwrap();
    assert!(eventually(DEADLINE, || is_dead(pid)));
    assert!(eventually(DEADLINE, || !dir.join("s.pid").exists()));
}

#[test]
fn builder_debug_shows_the_settings() {
    let d = Daemon::new().umask(0o077).pid_file("/tmp/x.pid");
    let s = format!("{d:?}");
    assert!(s.contains("0o77") && s.contains("/tmp/x.pid"), "{s}");
}

#[test]
fn racing_starts_make_exactly_one_daemon() {
    let dir = temp_dir("daemon-race");
    let mut guard = StopDaemon(dir.clone(), None);
    let starters: Vec<_> = (0..4)
        .map(|_| {
            let d = dir.clone();
            std::thread::spawn(move || {
                let d2 = d.clone();
                Daemon::new()
                    .pid_file(d.join("r.pid"))
                    .spawn(move || wait_for_stop(&d2))
            })
        })
        .collect();
    let results: Vec<_> = starters.into_iter().map(|h| h.join().unwrap()).collect();
    let winners: Vec<u32> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let pid = winners[0];
    guard.1 = Some(pid);
    for r in &results {
        match r {
            Ok(p) => assert_eq!(*p, pid),
            Err(Error::AlreadyRunning { pid: p, .. }) => assert_eq!(*p, pid, "{results:?}"),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(read_pid_file(&dir.join("r.pid")), Some(pid));
}

#[test]
fn a_kept_fd_stays_open_in_the_daemon() {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let dir = temp_dir("daemon-keep");
    let mut guard = StopDaemon(dir.clone(), None);
    let (r, w) = std::io::pipe().unwrap();
    let d2 = dir.clone();
    let pid = Daemon::new()
        .keep_fd(w.as_raw_fd())
        .spawn(move || {
            use std::io::Write;
            let mut w = w;
            let _ = writeln!(w, "kept {}", std::process::id());
            drop(w);
            wait_for_stop(&d2);
        })
        .unwrap();
    guard.1 = Some(pid);
    // The daemon writes through the fd it kept (a closed one would give
    // EBADF there and nothing here).
    let mut got = String::new();
    std::io::BufReader::new(r).read_line(&mut got).unwrap();
    assert_eq!(got, format!("kept {pid}\n"));
}

/// The pid of a live process whose working directory is `dir`.
fn process_in(dir: &Path) -> Option<u32> {
    let dir = dir.canonicalize().ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
        (cwd == dir && pid_alive(pid)).then_some(pid)
    })
}

#[test]
fn a_stuck_setup_times_out_and_the_stuck_daemon_is_killed() {
    let dir = temp_dir("daemon-stuck");
    let mut guard = StopDaemon(dir.clone(), None);
    // Opening a FIFO with no reader for writing blocks: the daemon's setup
    // hangs on its stdout, as it would on a dead mount.
    let fifo = dir.join("out.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let d2 = dir.clone();
    let launcher = std::thread::spawn(move || {
        Daemon::new()
            .working_directory(&d2)
            .stdout(&fifo)
            .setup_timeout(Duration::from_secs(5))
            .spawn(|| {})
    });
    // The daemon is found by its working directory (its first setup step),
    // stuck before it could report.
    let mut stuck = None;
    assert!(
        eventually(DEADLINE, || {
            stuck = process_in(&dir);
            stuck.is_some()
        }),
        "no daemon in its setup"
    );
    let pid = stuck.unwrap();
    guard.1 = Some(pid);
    let started = Instant::now();
    let result = launcher.join().unwrap();
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
    assert!(started.elapsed() < DEADLINE);
    assert!(wait_gone(pid, DEADLINE), "the stuck daemon was killed");
    assert!(process_in(&dir).is_none(), "nothing is left running");
}

#[test]
fn the_setup_timeout_is_a_builder_setting() {
    let d = Daemon::new();
    assert!(format!("{d:?}").contains("setup_timeout: 30s"), "{d:?}");
    assert_eq!(Daemon::DEFAULT_SETUP_TIMEOUT, Duration::from_secs(30));
    let d = d.setup_timeout(Duration::from_millis(250));
    assert!(format!("{d:?}").contains("setup_timeout: 250ms"), "{d:?}");
}
