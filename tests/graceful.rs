//! Graceful stop (`StopSignal`): rolling restarts and shutdowns under load
//! fail no request already accepted. Each server is a whole program (an
//! `#[ignore]`d test re-run as a subprocess) with a bounded load client of
//! our own on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use multiproc::{Role, StopSignal, Supervisor};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn dir_from_env() -> PathBuf {
    PathBuf::from(std::env::var("MP_DIR").expect("MP_DIR"))
}

fn signal(pid: u32, sig: Signal) {
    kill(Pid::from_raw(pid as i32), sig).unwrap();
}

/// Runs in each new child before it counts as started: takes over SIGTERM
/// (so a roll never stops a child that is not yet able to stop gracefully)
/// and logs `up <id> <pid>`.
fn install_and_log_up(id: usize) {
    StopSignal::install().unwrap();
    append_line(
        &dir_from_env().join("log"),
        &format!("up {id} {}", std::process::id()),
    );
}

/// One request: a line in, 200 ms of work, the pid out.
fn handle(mut conn: TcpStream, log: &Path) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while !got.contains(&b'\n') {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    append_line(log, &format!("accepted {}", std::process::id()));
    std::thread::sleep(Duration::from_millis(200));
    let _ = conn.write_all(format!("{}\n", std::process::id()).as_bytes());
}

/// The child's server: accept until a stop is requested, a thread per
/// connection, then finish them all and exit 0.
fn serve(listener: &TcpListener, stop: StopSignal, log: &Path) -> ! {
    let mut handlers = Vec::new();
    while !stop.requested() {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        let _ = poll(&mut fds, PollTimeout::from(1000u16));
        if stop.requested() {
            break;
        }
        if let Ok((conn, _)) = listener.accept() {
            conn.set_nonblocking(false).unwrap();
            let log = log.to_path_buf();
            handlers.push(std::thread::spawn(move || handle(conn, &log)));
        }
    }
    for h in handlers {
        let _ = h.join();
    }
    std::process::exit(0)
}

#[test]
#[ignore]
fn prog_graceful_server() {
    let dir = dir_from_env();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::fs::write(dir.join("port.tmp"), port.to_string()).unwrap();
    std::fs::rename(dir.join("port.tmp"), dir.join("port")).unwrap();
    let role = Supervisor::new(2)
        .grace(Duration::from_secs(10))
        .initializer(install_and_log_up)
        .run()
        .unwrap();
    match role {
        Role::Child(_) => serve(&listener, StopSignal::install().unwrap(), &dir.join("log")),
        Role::Parent(why) => println!("STOPPED {why:?}"),
    }
}

/// One request against `port`: the answering pid, or `None` if the
/// connection failed or the answer was cut.
fn request(port: u16) -> Option<u32> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(DEADLINE)).ok()?;
    s.write_all(b"req\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.trim().parse().ok()
}

fn ups(log: &Path) -> Vec<u32> {
    read_lines(log)
        .iter()
        .filter(|l| l.starts_with("up "))
        .map(|l| l.split(' ').nth(2).unwrap().parse().unwrap())
        .collect()
}

fn accepted(log: &Path) -> usize {
    read_lines(log)
        .iter()
        .filter(|l| l.starts_with("accepted "))
        .count()
}

#[test]
fn rolls_and_a_shutdown_under_load_fail_no_request() {
    let dir = temp_dir("graceful");
    let log = dir.join("log");
    let mut cmd = self_command("prog_graceful_server");
    cmd.env("MP_DIR", &dir);
    let mut sup = ReapedChild(cmd.spawn().unwrap());
    let sup_pid = sup.0.id();
    assert!(eventually(DEADLINE, || dir.join("port").exists()
        && ups(&log).len() >= 2));
    let port: u16 = std::fs::read_to_string(dir.join("port"))
        .unwrap()
        .parse()
        .unwrap();

    // 4 clients, back to back, for 5 s; two rolls meanwhile.
    let t0 = Instant::now();
    let answers = Arc::new(Mutex::new(Vec::<(Duration, Option<u32>)>::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let answers = Arc::clone(&answers);
            std::thread::spawn(move || {
                while t0.elapsed() < Duration::from_secs(5) {
                    let r = request(port);
                    answers.lock().unwrap().push((t0.elapsed(), r));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    signal(sup_pid, Signal::SIGHUP);
    assert!(eventually(DEADLINE, || ups(&log).len() >= 4), "first roll");
    std::thread::sleep(Duration::from_millis(800));
    signal(sup_pid, Signal::SIGHUP);
    assert!(eventually(DEADLINE, || ups(&log).len() >= 6), "second roll");
    let rolled_at = t0.elapsed();
    for c in clients {
        c.join().unwrap();
    }
    let all_ups = ups(&log);
    let newest: Vec<u32> = all_ups[4..].to_vec();
    let answers = answers.lock().unwrap().clone();
    let failed = answers.iter().filter(|(_, r)| r.is_none()).count();
    assert_eq!(failed, 0, "failed requests: {answers:?}");
    assert!(answers.len() >= 20, "{} requests", answers.len());
    // Requests sent a second after the second roll are served by the new
    // children only.
    let late: Vec<u32> = answers
        .iter()
        .filter(|(t, _)| *t > rolled_at + Duration::from_secs(1))
        .filter_map(|(_, r)| *r)
        .collect();
    assert!(
        late.iter().all(|p| newest.contains(p)),
        "late answers {late:?} from new pids {newest:?}"
    );

    // SIGTERM with 4 requests in flight: all 4 answered in full.
    let before = accepted(&log);
    let inflight: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || request(port)))
        .collect();
    assert!(
        eventually(DEADLINE, || accepted(&log) >= before + 4),
        "4 requests accepted"
    );
    signal(sup_pid, Signal::SIGTERM);
    let results: Vec<Option<u32>> = inflight.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(results.iter().all(Option::is_some), "{results:?}");
    let status = wait_child(&mut sup.0, DEADLINE).expect("the supervisor exits");
    assert!(status.success(), "{status}");
    assert!(
        all_ups.iter().all(|&p| wait_gone(p, DEADLINE)),
        "no child left: {all_ups:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// A child that installs StopSignal and ignores it is SIGKILLed after the
// grace; a child that does not install it dies at once on SIGTERM.

#[test]
#[ignore]
fn prog_stop_policy() {
    let dir = dir_from_env();
    let install = std::env::var("MP_INSTALL").is_ok();
    let role = Supervisor::new(1)
        .grace(Duration::from_millis(if install { 600 } else { 10_000 }))
        .run()
        .unwrap();
    match role {
        Role::Child(id) => {
            if install {
                StopSignal::install().unwrap();
            }
            append_line(&dir.join("log"), &format!("up {id} {}", std::process::id()));
            // Ignores any stop request.
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(0)
        }
        Role::Parent(why) => println!("STOPPED {why:?}"),
    }
}

fn stop_took(install: bool) -> Duration {
    let dir = temp_dir("stop-policy");
    let mut cmd = self_command("prog_stop_policy");
    cmd.env("MP_DIR", &dir);
    if install {
        cmd.env("MP_INSTALL", "1");
    }
    let mut sup = ReapedChild(cmd.spawn().unwrap());
    assert!(eventually(DEADLINE, || ups(&dir.join("log")).len() == 1));
    let child = ups(&dir.join("log"))[0];
    let t0 = Instant::now();
    signal(sup.0.id(), Signal::SIGTERM);
    let status = wait_child(&mut sup.0, DEADLINE).expect("the supervisor exits");
    let took = t0.elapsed();
    assert!(status.success());
    assert!(is_dead(child));
    let _ = std::fs::remove_dir_all(dir);
    took
}

#[test]
fn an_installed_but_ignored_stop_ends_in_sigkill_after_the_grace() {
    let took = stop_took(true);
    assert!(took >= Duration::from_millis(600), "{took:?}");
    assert!(took < Duration::from_secs(8), "{took:?}");
}

#[test]
fn without_stop_signal_sigterm_ends_the_child_at_once() {
    let took = stop_took(false);
    assert!(took < Duration::from_secs(5), "grace is 10 s: {took:?}");
}

// ---------------------------------------------------------------------------
// A stop signal that reaches a child forked a moment ago (SIGHUP, then
// SIGTERM a millisecond or two later) is not lost.

#[test]
#[ignore]
fn prog_hup_then_term() {
    let dir = dir_from_env();
    let role = Supervisor::new(2)
        .grace(Duration::from_secs(15))
        .run()
        .unwrap();
    match role {
        Role::Child(id) => {
            append_line(&dir.join("log"), &format!("up {id} {}", std::process::id()));
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(0)
        }
        Role::Parent(why) => println!("STOPPED {why:?}"),
    }
}

#[test]
fn sigterm_right_after_sighup_stops_every_child_before_the_grace() {
    // CPU load for the duration of the trials.
    let busy = Arc::new(AtomicBool::new(true));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let busy = Arc::clone(&busy);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while busy.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();
    let mut slow = Vec::new();
    for trial in 0..30 {
        let dir = temp_dir("hup-term");
        let mut cmd = self_command("prog_hup_then_term");
        cmd.env("MP_DIR", &dir);
        let mut sup = ReapedChild(cmd.spawn().unwrap());
        assert!(eventually(DEADLINE, || ups(&dir.join("log")).len() >= 2));
        signal(sup.0.id(), Signal::SIGHUP);
        std::thread::sleep(Duration::from_micros(500 + 100 * (trial % 20)));
        let t0 = Instant::now();
        signal(sup.0.id(), Signal::SIGTERM);
        let status = wait_child(&mut sup.0, Duration::from_secs(30));
        let took = t0.elapsed();
        assert!(
            status.is_some_and(|s| s.success()),
            "trial {trial}: {status:?}"
        );
        if took > Duration::from_secs(5) {
            slow.push((trial, took));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
    busy.store(false, Ordering::Relaxed);
    for b in burners {
        let _ = b.join();
    }
    assert!(
        slow.is_empty(),
        "trials that waited for the grace: {slow:?}"
    );
}
