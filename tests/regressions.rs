//! Regression tests for bugs found in review (issue 9): each failed before
//! its fix. Most are whole programs (an `#[ignore]`d test re-run as a
//! subprocess), because they change process-wide state (signal
//! dispositions, the at-exit finalizer, the crate's fork thread).

mod common;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use multiproc::{exitcode, Error, Pool, Process, Role, Supervisor};
use nix::sys::signal::{kill, raise, signal, SigHandler, Signal};
use nix::unistd::Pid;

fn dir_from_env() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("MP_DIR").expect("MP_DIR"))
}

/// A pipe whose read end the test waits on with a deadline: the children
/// write one byte each once they are ready.
fn ready_pipe() -> (std::fs::File, std::os::fd::OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (std::fs::File::from(r), w)
}

fn read_bytes(r: &mut std::fs::File, n: usize, deadline: Duration) -> bool {
    use std::io::Read;
    let start = Instant::now();
    let mut got = 0;
    let mut buf = [0u8; 64];
    while got < n && start.elapsed() < deadline {
        let pfd = [nix::poll::PollFd::new(
            r.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let mut pfd = pfd;
        let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(100u16));
        if pfd[0]
            .revents()
            .is_some_and(|e| e.contains(nix::poll::PollFlags::POLLIN))
        {
            match r.read(&mut buf[..(n - got).min(64)]) {
                Ok(0) | Err(_) => return false,
                Ok(k) => got += k,
            }
        }
    }
    got == n
}

// ---------------------------------------------------------------------------
// 1. The finalizer gives daemonic children one shared grace, not one each.

#[test]
#[ignore]
fn prog_one_grace_for_all() {
    let (mut r, w) = ready_pipe();
    let w = Arc::new(w);
    let mut kids = Vec::new();
    for _ in 0..3 {
        let w = Arc::clone(&w);
        let mut p = Process::new(move || {
            // SAFETY-free: ignoring a signal in our own child.
            unsafe { signal(Signal::SIGTERM, SigHandler::SigIgn) }.unwrap();
            nix::unistd::write(w.as_fd(), &[1]).unwrap();
            std::thread::sleep(Duration::from_secs(60));
        })
        .with_daemon(true);
        p.start().unwrap();
        kids.push(p);
    }
    assert!(read_bytes(&mut r, 3, DEADLINE), "children ready");
    let t0 = Instant::now();
    multiproc::shutdown();
    let took = t0.elapsed();
    let codes: Vec<_> = kids.iter().map(|p| p.exitcode()).collect();
    println!("SHUTDOWN ms={} codes={codes:?}", took.as_millis());
}

#[test]
fn finalizer_grace_is_shared_by_all_daemonic_children() {
    let run = run_self("prog_one_grace_for_all", &[], DEADLINE);
    assert!(run.status.success(), "{run:?}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("SHUTDOWN"))
        .unwrap_or_else(|| panic!("{run:?}"));
    assert!(
        line.contains("codes=[Some(-9), Some(-9), Some(-9)]"),
        "{line}"
    );
    let ms: u64 = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ms="))
        .unwrap()
        .parse()
        .unwrap();
    let grace = multiproc::DAEMON_GRACE.as_millis() as u64;
    // One grace (2 s) for the three, not three graces (6 s).
    assert!(ms >= grace, "{line}");
    assert!(ms < 2 * grace, "one shared grace: {line}");
}

// ---------------------------------------------------------------------------
// 2. The pool survives a program that lets the kernel reap its children.

fn die(_: u32) -> u32 {
    let _ = raise(Signal::SIGKILL);
    0
}

fn triple(x: u32) -> u32 {
    x * 3
}

#[test]
#[ignore]
fn prog_pool_with_sigchld_ignored() {
    // SAFETY-free: the program's own disposition.
    unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }.unwrap();
    let pool = Pool::new(2).unwrap();
    assert_eq!(pool.apply(triple, 2).unwrap(), 6);
    let r = pool.apply_async(die, 1);
    assert!(r.wait(Duration::from_secs(10)), "the crashed task resolves");
    match r.get() {
        Err(Error::Died { exitcode, .. }) => println!("DIED {exitcode}"),
        other => println!("OTHER {other:?}"),
    }
    // The worker was replaced: the pool goes on.
    assert_eq!(
        pool.map(triple, 0..100u32).unwrap(),
        (0..100u32).map(triple).collect::<Vec<_>>()
    );
    // And the dispatcher does not spin: a second of idle costs little CPU.
    let before = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let after = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let cpu = |u: &nix::sys::resource::Usage| {
        let t = u.user_time() + u.system_time();
        t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6
    };
    println!("IDLE_CPU {:.3}", cpu(&after) - cpu(&before));
    pool.terminate();
    println!("DONE");
}

#[test]
fn pool_with_sigchld_ignored_fails_the_item_and_goes_on() {
    let run = run_self("prog_pool_with_sigchld_ignored", &[], DEADLINE);
    assert!(run.status.success(), "{run:?}");
    assert!(
        run.stdout.contains(&format!("DIED {}", exitcode::UNKNOWN)),
        "{run:?}"
    );
    let idle: f64 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("IDLE_CPU "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        idle < 0.3,
        "an idle pool does not spin: {idle} s of CPU in 1 s"
    );
    assert!(run.stdout.contains("DONE"), "{run:?}");
}

// ---------------------------------------------------------------------------
// 3. Sending to a closed peer is an error even with SIGPIPE at its default.

#[test]
#[ignore]
fn prog_send_with_default_sigpipe() {
    // SAFETY-free: the program's own disposition (a CLI that wants `| head`).
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.unwrap();
    let (mut a, b) = multiproc::pipe().unwrap();
    drop(b);
    let big = vec![7u8; 1 << 20];
    match a.send(&big) {
        Err(Error::Io(e)) => println!("ERR {:?}", e.kind()),
        other => println!("OTHER {other:?}"),
    }
}

#[test]
fn send_to_a_closed_peer_with_default_sigpipe_is_broken_pipe() {
    let run = run_self("prog_send_with_default_sigpipe", &[], DEADLINE);
    assert!(run.status.success(), "killed by SIGPIPE? {run:?}");
    assert!(run.stdout.contains("ERR BrokenPipe"), "{run:?}");
}

// ---------------------------------------------------------------------------
// 4. Daemonic children started from many short-lived threads at once are
// all forked on the long-lived fork thread: none dies with its thread.

#[test]
#[ignore]
fn prog_many_threads_start_daemons() {
    const N: usize = 48;
    let (mut r, w) = ready_pipe();
    let w = Arc::new(w);
    let go = Arc::new(std::sync::Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|_| {
            let (w, go) = (Arc::clone(&w), Arc::clone(&go));
            std::thread::spawn(move || {
                go.wait();
                let mut p = Process::new(move || {
                    nix::unistd::write(w.as_fd(), &[1]).unwrap();
                    std::thread::sleep(Duration::from_secs(60));
                })
                .with_daemon(true);
                p.start().unwrap();
                p
            })
        })
        .collect();
    let kids: Vec<Process> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(read_bytes(&mut r, N, DEADLINE), "children ready");
    // Every starting thread has ended: a child forked on one of them got
    // its death signal then. Watch all their sentinels for 300 ms at once.
    let sentinels: Vec<_> = kids.iter().map(|p| p.sentinel().unwrap()).collect();
    let dead = multiproc::wait(&sentinels, Some(Duration::from_millis(300))).unwrap();
    println!("DEAD {}", dead.len());
    for p in &kids {
        let _ = p.kill();
        let _ = p.join_timeout(DEADLINE);
    }
}

#[test]
fn daemonic_children_of_many_short_threads_outlive_them() {
    // The start race itself is pinned deterministically by the unit test
    // `per_process_waits_for_a_slow_start`; this is the whole path.
    let run = run_self("prog_many_threads_start_daemons", &[], DEADLINE);
    assert!(run.status.success(), "{run:?}");
    assert!(run.stdout.contains("DEAD 0"), "{run:?}");
}

// ---------------------------------------------------------------------------
// 5. A rolling restart does not block the supervisor: while a replacement
// is slow to start, a crashed sibling is restarted and signals are served.

fn slow_on_roll(id: usize) {
    let dir = dir_from_env();
    if id == 0 && dir.join("slow").exists() {
        std::thread::sleep(Duration::from_secs(25));
    }
    append_line(&dir.join("log"), &format!("up {id} {}", std::process::id()));
}

#[test]
#[ignore]
fn prog_roll_with_slow_replacement() {
    let role = Supervisor::new(2)
        .grace(Duration::from_secs(30))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .initializer(slow_on_roll)
        .run()
        .unwrap();
    match role {
        Role::Child(_) => {
            std::thread::sleep(Duration::from_secs(60));
            std::process::exit(0)
        }
        Role::Parent(why) => println!("STOPPED {why:?}"),
    }
}

#[test]
fn a_slow_replacement_does_not_block_the_supervisor() {
    let dir = temp_dir("reg-roll");
    let mut cmd = self_command("prog_roll_with_slow_replacement");
    cmd.env("MP_DIR", &dir);
    let mut sup = ReapedChild(cmd.spawn().unwrap());
    let log = dir.join("log");
    assert!(eventually(DEADLINE, || read_lines(&log).len() >= 2));
    let pid_of = |id: usize| -> Vec<u32> {
        read_lines(&log)
            .iter()
            .filter(|l| l.starts_with(&format!("up {id} ")))
            .map(|l| l.split(' ').nth(2).unwrap().parse().unwrap())
            .collect()
    };
    let one = pid_of(1)[0];
    std::fs::write(dir.join("slow"), b"").unwrap();
    kill(Pid::from_raw(sup.0.id() as i32), Signal::SIGHUP).unwrap();
    // The roll starts with task 0, whose replacement now takes 25 s to
    // start. Meanwhile task 1 crashes: it must be restarted promptly.
    std::thread::sleep(Duration::from_millis(200));
    kill(Pid::from_raw(one as i32), Signal::SIGKILL).unwrap();
    let restarted = eventually(Duration::from_secs(5), || pid_of(1).len() >= 2);
    // And a SIGTERM is served at once, not after the roll.
    let t0 = Instant::now();
    kill(Pid::from_raw(sup.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_child(&mut sup.0, DEADLINE);
    let took = t0.elapsed();
    assert!(
        restarted,
        "task 1 restarted during the roll: {:?}",
        read_lines(&log)
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------
// 6. Pool workers never show up as the user's children.

#[test]
fn pool_workers_never_appear_in_active_children() {
    within(60, || {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let watcher = {
            let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let n = multiproc::active_children()
                        .iter()
                        .filter(|c| c.name().starts_with("PoolWorker"))
                        .count();
                    seen.fetch_add(n as u64, Ordering::Relaxed);
                }
            })
        };
        let t0 = Instant::now();
        let mut pools = 0;
        while t0.elapsed() < Duration::from_secs(2) {
            let pool = Pool::new(2).unwrap();
            drop(pool);
            pools += 1;
        }
        stop.store(true, Ordering::Relaxed);
        watcher.join().unwrap();
        assert_eq!(
            seen.load(Ordering::Relaxed),
            0,
            "a pool worker was listed by active_children ({pools} pools)"
        );
    });
}

// ---------------------------------------------------------------------------
// register_after_fork hooks run in every new child: pool workers,
// supervisor children, daemons.

static HOOKED: AtomicU64 = AtomicU64::new(0);

fn mark_hooked() {
    HOOKED.store(u64::from(std::process::id()), Ordering::Relaxed);
}

fn hooked_pid(_: u32) -> (u64, u64) {
    (
        HOOKED.load(Ordering::Relaxed),
        u64::from(std::process::id()),
    )
}

#[test]
#[ignore]
fn prog_after_fork_everywhere() {
    multiproc::register_after_fork(mark_hooked);
    let pool = Pool::new(1).unwrap();
    let (hooked, pid) = pool.apply(hooked_pid, 0).unwrap();
    println!("POOL {}", hooked == pid);
    drop(pool);
    let dir = dir_from_env();
    match Supervisor::new(1).run().unwrap() {
        Role::Child(_) => {
            let (hooked, pid) = hooked_pid(0);
            append_line(&dir.join("sup"), &format!("SUP {}", hooked == pid));
            std::process::exit(0)
        }
        Role::Parent(_) => {}
    }
    println!("{}", read_lines(&dir.join("sup")).join("\n"));
    let out = dir.join("daemon");
    let daemon = multiproc::Daemon::new()
        .working_directory(&dir)
        .spawn(move || {
            let (hooked, pid) = hooked_pid(0);
            std::fs::write(&out, format!("DAEMON {}", hooked == pid)).unwrap();
        })
        .unwrap();
    assert!(wait_gone(daemon, DEADLINE));
    println!(
        "{}",
        std::fs::read_to_string(dir.join("daemon")).unwrap_or_default()
    );
}

#[test]
fn after_fork_hooks_run_in_pool_supervisor_and_daemon_children() {
    let dir = temp_dir("reg-hooks");
    let run = run_self(
        "prog_after_fork_everywhere",
        &[("MP_DIR", dir.to_str().unwrap())],
        DEADLINE,
    );
    assert!(run.status.success(), "{run:?}");
    for want in ["POOL true", "SUP true", "DAEMON true"] {
        assert!(run.stdout.contains(want), "{want}: {run:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}
