//! The pre-fork supervisor (`fork_processes`, `Supervisor`) and the
//! fork-per-connection server. Each scenario is a whole program: an
//! `#[ignore]`d test re-run as a subprocess, observed from outside through
//! files, its stdout, its exit status and /proc.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use multiproc::{fork_processes, task_id, Error, Role, Stopped, Supervisor};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn dir_from_env() -> PathBuf {
    PathBuf::from(std::env::var("MP_DIR").expect("MP_DIR"))
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// Ends a supervised child of a re-run test binary: the harness thread it
/// returned into is the only thread left, so leave explicitly.
fn child_exit(code: i32) -> ! {
    std::process::exit(code)
}

// ---------------------------------------------------------------------------
// Restart with the same id, task_id(), the parent's end once all exit 0.

#[test]
#[ignore]
fn prog_restart() {
    let dir = dir_from_env();
    let role = Supervisor::new(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .max_restarts(Some(5))
        .run()
        .unwrap();
    match role {
        Role::Child(id) => {
            append_line(
                &dir.join("log"),
                &format!("start {id} {} {:?}", std::process::id(), task_id()),
            );
            // Default SIGHUP/SIGINT/SIGTERM, none blocked (/proc/self/status).
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let mask = |field: &str| -> u64 {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                    .unwrap()
            };
            let ours: u64 = (1 << (1 - 1)) | (1 << (2 - 1)) | (1 << (15 - 1));
            for field in ["SigBlk:", "SigIgn:", "SigCgt:"] {
                if mask(field) & ours != 0 {
                    append_line(&dir.join("signals"), &format!("{field} {:x}", mask(field)));
                }
            }
            let me = multiproc::current_process();
            if me.pid() != std::process::id() || multiproc::parent_process().is_some() {
                append_line(&dir.join("identity"), &format!("{me:?}"));
            }
            if id == 0
                && std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join("crashed"))
                    .is_ok()
            {
                std::process::abort();
            }
            child_exit(0)
        }
        Role::Parent(why) => {
            println!(
                "PARENT {why:?} live={}",
                live_children_of(std::process::id()).len()
            );
        }
    }
}

#[test]
fn crashed_child_restarts_with_the_same_id_and_all_exit_0_ends_supervision() {
    let dir = temp_dir("sup-restart");
    let run = run_self(
        "prog_restart",
        &[("MP_DIR", dir.to_str().unwrap())],
        DEADLINE,
    );
    assert!(run.status.success(), "{run:?}");
    assert!(run.stdout.contains("PARENT AllExited live=0"), "{run:?}");
    let log = read_lines(&dir.join("log"));
    let starts = |id: usize| -> Vec<String> {
        log.iter()
            .filter(|l| l.starts_with(&format!("start {id} ")))
            .cloned()
            .collect()
    };
    let zero = starts(0);
    let one = starts(1);
    assert_eq!(zero.len(), 2, "task 0 crashed once and restarted: {log:?}");
    assert_eq!(one.len(), 1, "task 1 exited 0 and was left: {log:?}");
    assert_ne!(zero[0], zero[1], "a new pid for the restart");
    assert!(zero.iter().all(|l| l.ends_with("Some(0)")), "{log:?}");
    assert!(one[0].ends_with("Some(1)"), "{log:?}");
    assert_eq!(task_id(), None);
    assert!(
        read_lines(&dir.join("signals")).is_empty(),
        "children start with default SIGHUP/SIGINT/SIGTERM, unblocked: {:?}",
        read_lines(&dir.join("signals"))
    );
    assert!(
        read_lines(&dir.join("identity")).is_empty(),
        "current_process() in a child is the child itself: {:?}",
        read_lines(&dir.join("identity"))
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// fork_processes: task ids, exit status 0, a second call is an error.

#[test]
#[ignore]
fn prog_fork_processes() {
    let dir = dir_from_env();
    let id = fork_processes(3, None).unwrap();
    let second = match fork_processes(1, None) {
        Err(Error::AlreadyStarted) => "AlreadyStarted".to_string(),
        other => format!("{other:?}"),
    };
    append_line(
        &dir.join("log"),
        &format!("child {id} {:?} second={second}", task_id()),
    );
    child_exit(0)
}

#[test]
fn fork_processes_gives_each_child_its_id_and_the_parent_exits_0() {
    let dir = temp_dir("fork-processes");
    let run = run_self(
        "prog_fork_processes",
        &[("MP_DIR", dir.to_str().unwrap())],
        DEADLINE,
    );
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let mut log = read_lines(&dir.join("log"));
    log.sort();
    assert_eq!(
        log,
        [
            "child 0 Some(0) second=AlreadyStarted",
            "child 1 Some(1) second=AlreadyStarted",
            "child 2 Some(2) second=AlreadyStarted",
        ]
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// TooManyRestarts.

#[test]
#[ignore]
fn prog_crash_loop() {
    let started = Instant::now();
    let r = Supervisor::new(2)
        .max_restarts(Some(3))
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .grace(Duration::from_secs(5))
        .run();
    match r {
        Ok(Role::Child(id)) => {
            if id == 0 {
                child_exit(3)
            }
            // Task 1 would serve forever: the supervisor must stop it.
            std::thread::sleep(Duration::from_secs(30));
            child_exit(0)
        }
        Err(Error::TooManyRestarts { restarts, limit }) => println!(
            "ERR restarts={restarts} limit={limit} live={} ms={}",
            live_children_of(std::process::id()).len(),
            started.elapsed().as_millis()
        ),
        other => println!("UNEXPECTED {other:?}"),
    }
}

#[test]
fn a_crash_loop_ends_in_too_many_restarts_with_no_child_left() {
    let run = run_self("prog_crash_loop", &[], DEADLINE);
    assert!(run.status.success(), "{run:?}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("ERR") || l.starts_with("UNEXPECTED"))
        .unwrap_or_else(|| panic!("{run:?}"));
    assert!(
        line.starts_with("ERR restarts=4 limit=3 live=0"),
        "{line} / {}",
        run.stderr
    );
}

// ---------------------------------------------------------------------------
// SIGTERM: forwarded, a grace period, then SIGKILL; the parent returns.

#[test]
#[ignore]
fn prog_grace() {
    let dir = dir_from_env();
    let role = Supervisor::new(2)
        .grace(Duration::from_millis(400))
        .run()
        .unwrap();
    match role {
        Role::Child(id) => {
            if id == 0 {
                // Block SIGTERM: this child will not go without SIGKILL.
                let mut set = nix::sys::signal::SigSet::empty();
                set.add(Signal::SIGTERM);
                set.thread_block().unwrap();
            }
            append_line(
                &dir.join("log"),
                &format!("ready {id} {}", std::process::id()),
            );
            std::thread::sleep(Duration::from_secs(30));
            child_exit(0)
        }
        Role::Parent(why) => {
            println!(
                "STOPPED {why:?} live={}",
                live_children_of(std::process::id()).len()
            );
        }
    }
}

/// Starts the supervisor program `name` (an ignored test of this binary)
/// with `dir` as its `MP_DIR`.
fn start_prog(name: &str, dir: &std::path::Path) -> ReapedChild {
    let mut cmd = self_command(name);
    cmd.env("MP_DIR", dir);
    ReapedChild(cmd.spawn().unwrap())
}

/// Waits for `n` lines `<word> <id> <pid>` in `log`; their pids.
fn logged_pids(log: &std::path::Path, n: usize) -> Vec<u32> {
    assert!(
        eventually(DEADLINE, || read_lines(log).len() >= n),
        "{:?}",
        read_lines(log)
    );
    read_lines(log)[..n]
        .iter()
        .map(|l| l.split(' ').nth(2).unwrap().parse().unwrap())
        .collect()
}

fn stop_with(sig: Signal) {
    let dir = temp_dir("sup-grace");
    let mut child = start_prog("prog_grace", &dir);
    let parent = child.0.id();
    let log = dir.join("log");
    let pids = logged_pids(&log, 2);
    let t0 = Instant::now();
    signal(parent, sig);
    let status = wait_child(&mut child.0, DEADLINE).expect("the supervisor returned");
    let took = t0.elapsed();
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "{status} {out}");
    assert!(
        out.contains(&format!("STOPPED Signal({}) live=0", sig as i32)),
        "{out}"
    );
    assert!(
        took >= Duration::from_millis(400),
        "the stubborn child had its grace period: {took:?}"
    );
    assert!(pids.iter().all(|&p| is_dead(p)), "no child left: {pids:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_is_forwarded_and_a_stubborn_child_is_killed_after_the_grace() {
    stop_with(Signal::SIGTERM);
}

#[test]
fn sigint_is_forwarded_the_same_way() {
    stop_with(Signal::SIGINT);
}

// ---------------------------------------------------------------------------
// SIGHUP: a rolling restart keeps at least N-1 children serving.

/// Runs in each new child before it counts as started: the moment it
/// serves.
fn log_up(id: usize) {
    append_line(
        &dir_from_env().join("log"),
        &format!("up {id} {}", std::process::id()),
    );
}

#[test]
#[ignore]
fn prog_roll() {
    let dir = dir_from_env();
    let role = Supervisor::new(3)
        .grace(Duration::from_secs(5))
        .initializer(log_up)
        .run()
        .unwrap();
    match role {
        Role::Child(id) => {
            // Take SIGTERM synchronously, to log the moment this child stops
            // serving; the supervisor (or, if it dies, PR_SET_PDEATHSIG's
            // SIGKILL) ends the wait.
            let mut set = nix::sys::signal::SigSet::empty();
            set.add(Signal::SIGTERM);
            set.thread_block().unwrap();
            let _ = set.wait();
            append_line(
                &dir.join("log"),
                &format!("down {id} {}", std::process::id()),
            );
            child_exit(0)
        }
        Role::Parent(why) => println!("STOPPED {why:?}"),
    }
}

#[test]
fn sighup_rolls_the_children_one_by_one() {
    let dir = temp_dir("sup-roll");
    let mut child = start_prog("prog_roll", &dir);
    let parent = child.0.id();
    let log = dir.join("log");
    let old = logged_pids(&log, 3);
    signal(parent, Signal::SIGHUP);
    // Three new children up, three old ones down and gone.
    let rolled = eventually(DEADLINE, || {
        read_lines(&log).len() == 9 && old.iter().all(|&p| is_dead(p))
    });
    let lines = read_lines(&log);
    assert!(rolled, "{lines:?}");
    // Replay the log (O_APPEND keeps the real order): the number of
    // serving children never falls below N-1 = 2.
    let mut serving = 0i32;
    let mut min = i32::MAX;
    for (k, l) in lines.iter().enumerate() {
        serving += if l.starts_with("up ") { 1 } else { -1 };
        if k >= 2 {
            min = min.min(serving);
        }
    }
    assert!(
        min >= 2,
        "at least N-1 children serve throughout: {lines:?}"
    );
    let mut ids: Vec<&str> = lines[3..]
        .iter()
        .filter(|l| l.starts_with("up "))
        .map(|l| l.split(' ').nth(1).unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["0", "1", "2"], "each task id replaced once");
    assert_eq!(live_children_of(parent).len(), 3);

    signal(parent, Signal::SIGTERM);
    let status = wait_child(&mut child.0, DEADLINE).expect("the supervisor returned");
    assert!(status.success());
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// The pre-fork example serves concurrent clients from several pids.

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// `listening on 127.0.0.1:PORT (... pid PID)` -> (PORT, PID).
fn parse_listening(line: &str) -> (u16, u32) {
    let port = line
        .split(':')
        .nth(1)
        .and_then(|p| p.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let pid = line
        .trim_end()
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    (port, pid)
}

#[test]
fn prefork_example_serves_concurrent_clients_from_several_pids() {
    let mut cmd = Command::new(example_binary("prefork_server"));
    cmd.args(["--port", "0", "--processes", "3"]);
    let (mut server, line) = spawn_with_first_line(cmd);
    let (port, supervisor) = parse_listening(&line);
    assert_eq!(supervisor, server.0.id());
    let clients: Vec<_> = (0..12)
        .map(|_| std::thread::spawn(move || http_get(port, "/slow")))
        .collect();
    let mut pids = std::collections::BTreeSet::new();
    for c in clients {
        let body = c.join().unwrap();
        assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
        let last = body.lines().last().unwrap().to_string();
        // "task <id> pid <pid>"
        let words: Vec<&str> = last.split(' ').collect();
        assert_eq!((words[0], words[2]), ("task", "pid"), "{last}");
        assert!(words[1].parse::<usize>().unwrap() < 3);
        pids.insert(words[3].parse::<u32>().unwrap());
    }
    assert!(pids.len() >= 2, "served by {pids:?}");
    signal(supervisor, Signal::SIGTERM);
    let status = wait_child(&mut server.0, DEADLINE).expect("the supervisor exits");
    assert_eq!(status.code(), Some(0));
    assert!(pids.iter().all(|&p| is_dead(p)));
}

// ---------------------------------------------------------------------------
// Fork per connection: 200 connections, 20 at a time, no zombie, no fd leak.

fn echo(port: u16, n: usize) {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    (&s).write_all(format!("hello {n}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(
        line.starts_with("pid ") && line.ends_with(&format!(": hello {n}\n")),
        "{line:?}"
    );
}

fn batch(port: u16, from: usize, count: usize) {
    let clients: Vec<_> = (from..from + count)
        .map(|n| std::thread::spawn(move || echo(port, n)))
        .collect();
    for c in clients {
        c.join().unwrap();
    }
}

#[test]
fn fork_server_leaves_no_zombie_and_no_fd_behind() {
    let mut cmd = Command::new(example_binary("fork_server"));
    cmd.args(["--port", "0"]);
    let (server, line) = spawn_with_first_line(cmd);
    let (port, pid) = parse_listening(&line);
    assert_eq!(pid, server.0.id());
    // Warm up (the crate opens /dev/null and starts its reaper once).
    batch(port, 0, 20);
    assert!(
        eventually(DEADLINE, || zombies_of(pid).is_empty()
            && live_children_of(pid).is_empty()),
        "warm-up children reaped"
    );
    let fds = fd_count_of(pid);
    for b in 0..10 {
        batch(port, 20 + b * 20, 20);
    }
    // The server is idle now: nothing but the reaper collects the last ones.
    let settled = eventually(DEADLINE, || {
        zombies_of(pid).is_empty() && live_children_of(pid).is_empty() && fd_count_of(pid) == fds
    });
    assert!(
        settled,
        "zombies {:?}, live {:?}, fds {} -> {}",
        zombies_of(pid),
        live_children_of(pid),
        fds,
        fd_count_of(pid)
    );
}

#[test]
fn stopped_reason_is_comparable() {
    // The parent-side outcome is a plain value a caller can match on.
    assert_ne!(Role::Parent(Stopped::AllExited), Role::Child(0));
    assert_eq!(
        Role::Parent(Stopped::Signal(15)),
        Role::Parent(Stopped::Signal(15))
    );
}

#[test]
fn children_die_with_a_killed_supervisor() {
    let dir = temp_dir("sup-killed");
    let mut child = start_prog("prog_roll", &dir);
    let log = dir.join("log");
    let pids = logged_pids(&log, 3);
    signal(child.0.id(), Signal::SIGKILL);
    wait_child(&mut child.0, DEADLINE).expect("the supervisor is gone");
    assert!(
        eventually(DEADLINE, || pids.iter().all(|&p| is_dead(p))),
        "PR_SET_PDEATHSIG took the children: {pids:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
