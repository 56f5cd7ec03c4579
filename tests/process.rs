//! `Process`: exit codes, timeouts, names, the child bootstrap.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use common::{Reaped, DEADLINE};
use multiproc::{pipe, Error, Process};

fn run(target: impl FnOnce() + Send + 'static) -> i32 {
    let mut p = Process::new(target);
    p.start().unwrap();
    let p = Reaped(p);
    p.join_timeout(DEADLINE)
        .unwrap()
        .expect("child did not exit in time")
}

#[test]
fn exit_code_zero_when_target_returns() {
    assert_eq!(run(|| {}), 0);
}

#[test]
fn exit_code_n_from_exit() {
    assert_eq!(run(|| multiproc::exit(42)), 42);
}

#[test]
fn exit_code_one_on_panic() {
    assert_eq!(run(|| panic!("deliberate")), 1);
}

#[test]
fn terminate_gives_minus_15_and_kill_minus_9() {
    for (kill, code) in [(false, -15), (true, -9)] {
        let (mut ready_tx, mut ready_rx) = pipe().unwrap();
        let mut p = Process::new(move || {
            ready_tx.send(&()).unwrap();
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        p.start().unwrap();
        let p = Reaped(p);
        ready_rx
            .recv_timeout::<()>(DEADLINE)
            .unwrap()
            .expect("child never got ready");
        assert!(p.is_alive());
        assert_eq!(p.exitcode(), None);
        if kill {
            p.kill().unwrap();
        } else {
            p.terminate().unwrap();
        }
        assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(code));
        assert_eq!(p.exitcode(), Some(code));
        assert!(!p.is_alive());
        // Signalling a reaped child is a no-op.
        p.terminate().unwrap();
    }
}

#[test]
fn join_timeout_on_a_live_child() {
    let (tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        // Lives until the parent says so.
        let mut rx_child = tx;
        let _ = rx_child.recv::<()>();
    });
    p.start().unwrap();
    let p = Reaped(p);
    let t0 = Instant::now();
    assert_eq!(p.join_timeout(Duration::from_millis(100)).unwrap(), None);
    assert!(t0.elapsed() >= Duration::from_millis(100));
    assert!(p.is_alive());
    rx.send(&()).unwrap();
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

#[test]
fn already_started_and_not_started() {
    let mut p = Process::new(|| {});
    assert!(matches!(p.join(), Err(Error::NotStarted)));
    assert!(matches!(
        p.join_timeout(Duration::ZERO),
        Err(Error::NotStarted)
    ));
    assert!(matches!(p.terminate(), Err(Error::NotStarted)));
    assert!(matches!(p.kill(), Err(Error::NotStarted)));
    assert!(!p.is_alive());
    assert_eq!(p.exitcode(), None);
    assert!(p.sentinel().is_none());
    p.start().unwrap();
    let mut p = Reaped(p);
    assert!(matches!(p.0.start(), Err(Error::AlreadyStarted)));
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
struct Seen {
    name: String,
    pid: u32,
    daemon: bool,
    parent_name: Option<String>,
    parent_pid: Option<u32>,
    nested_name: String,
    comm: String,
}

#[test]
fn name_and_parent_seen_from_inside() {
    let (mut tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        let me = multiproc::current_process();
        let parent = multiproc::parent_process();
        let nested = Process::new(|| {});
        tx.send(&Seen {
            name: me.name().to_string(),
            pid: me.pid(),
            daemon: me.daemon(),
            parent_name: parent.as_ref().map(|p| p.name().to_string()),
            parent_pid: parent.as_ref().map(|p| p.pid()),
            nested_name: nested.name().to_string(),
            comm: std::fs::read_to_string("/proc/self/comm").unwrap_or_default(),
        })
        .unwrap();
    })
    .with_name("a-rather-long-worker-name")
    .with_daemon(true);
    p.start().unwrap();
    let p = Reaped(p);
    let seen: Seen = rx.recv_timeout(DEADLINE).unwrap().expect("no report");
    assert_eq!(seen.name, "a-rather-long-worker-name");
    assert_eq!(Some(seen.pid), p.pid());
    assert!(seen.daemon);
    assert_eq!(seen.parent_name.as_deref(), Some("MainProcess"));
    assert_eq!(seen.parent_pid, Some(std::process::id()));
    // The OS-visible name is cut to 15 bytes.
    assert_eq!(seen.comm.trim_end(), "a-rather-long-w");
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
    assert!(p.daemon());
    assert_eq!(multiproc::current_process().name(), "MainProcess");
    assert!(multiproc::parent_process().is_none());
    // Nested default names: "<parent ident>:1", and the child's counter
    // starts again at 1. The parent here is a named process whose own
    // identity is "Process-N" style internally.
    assert!(
        seen.nested_name.starts_with("Process-") && seen.nested_name.ends_with(":1"),
        "{}",
        seen.nested_name
    );
}

#[test]
fn nested_default_names() {
    let (mut tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        let mut inner = Process::new(|| {});
        let first = inner.name().to_string();
        inner.start().unwrap();
        inner.join().unwrap();
        let second = Process::new(|| {}).name().to_string();
        tx.send(&(
            multiproc::current_process().name().to_string(),
            first,
            second,
        ))
        .unwrap();
    });
    p.start().unwrap();
    let p = Reaped(p);
    let (me, first, second): (String, String, String) =
        rx.recv_timeout(DEADLINE).unwrap().expect("no report");
    assert_eq!(me, p.name());
    assert_eq!(first, format!("{me}:1"));
    assert_eq!(second, format!("{me}:2"));
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

#[test]
fn stdin_is_at_eof_in_the_child() {
    let (mut tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        let mut buf = Vec::new();
        let n = std::io::stdin().read_to_end(&mut buf).unwrap();
        tx.send(&n).unwrap();
    });
    p.start().unwrap();
    let p = Reaped(p);
    assert_eq!(rx.recv_timeout::<usize>(DEADLINE).unwrap(), Some(0));
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

/// Writes the pid of whoever drops it to a pipe.
struct DropReporter(std::os::fd::OwnedFd);

impl Drop for DropReporter {
    fn drop(&mut self) {
        let line = format!("{}\n", std::process::id());
        let _ = nix::unistd::write(self.0.as_fd(), line.as_bytes());
    }
}

#[test]
fn parent_stack_guard_never_dropped_in_child() {
    let (r, w) = nix::unistd::pipe().unwrap();
    let child_pid;
    {
        let _guard = DropReporter(w);
        let mut p = Process::new(|| {});
        p.start().unwrap();
        let p = Reaped(p);
        child_pid = p.pid().unwrap();
        assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
        let mut p = Process::new(|| panic!("unwinds, but not into our stack"));
        p.start().unwrap();
        let p = Reaped(p);
        assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(1));
    }
    let mut out = String::new();
    std::fs::File::from(r).read_to_string(&mut out).unwrap();
    assert_eq!(out, format!("{}\n", std::process::id()));
    assert_ne!(child_pid, std::process::id());
}

#[test]
fn active_children_lists_live_children_and_reaps() {
    let (tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        let mut tx = tx;
        let _ = tx.recv::<()>();
    })
    .with_name("listed");
    p.start().unwrap();
    let p = Reaped(p);
    let pid = p.pid().unwrap();
    let listed = multiproc::active_children();
    let me = listed
        .iter()
        .find(|c| c.pid() == pid)
        .expect("live child listed");
    assert_eq!(me.name(), "listed");
    rx.send(&()).unwrap();
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
    assert!(multiproc::active_children().iter().all(|c| c.pid() != pid));
}

#[test]
fn dropped_handle_is_reaped_by_active_children() {
    let (mut tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || tx.send(&multiproc::current_process().pid()).unwrap());
    p.start().unwrap();
    drop(p);
    let pid: u32 = rx.recv_timeout(DEADLINE).unwrap().expect("child ran");
    // The child exits right after sending; it is reaped (not a zombie) and
    // left out once it is gone.
    assert!(common::eventually(DEADLINE, || {
        multiproc::active_children().iter().all(|c| c.pid() != pid)
    }));
    assert!(common::is_dead(pid) && !common::zombies_of(std::process::id()).contains(&pid));
}

#[test]
fn after_fork_hooks_run_in_order_before_the_target() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static TRACE: AtomicUsize = AtomicUsize::new(0);
    fn first() {
        TRACE.store(TRACE.load(Ordering::Relaxed) * 10 + 1, Ordering::Relaxed);
    }
    fn second() {
        TRACE.store(TRACE.load(Ordering::Relaxed) * 10 + 2, Ordering::Relaxed);
    }
    multiproc::register_after_fork(first);
    multiproc::register_after_fork(second);
    let (mut tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || tx.send(&TRACE.load(Ordering::Relaxed)).unwrap());
    p.start().unwrap();
    let p = Reaped(p);
    // Other tests' hooks do not exist: this test binary registers only these.
    assert_eq!(rx.recv_timeout::<usize>(DEADLINE).unwrap(), Some(12));
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
    assert_eq!(TRACE.load(Ordering::Relaxed), 0, "hooks ran in the parent");
}

#[test]
fn sentinel_and_wait() {
    let (tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        let mut tx = tx;
        let _ = tx.recv::<()>();
    });
    p.start().unwrap();
    let p = Reaped(p);
    let sentinel = p.sentinel().unwrap();
    assert!(
        multiproc::wait(&[sentinel], Some(Duration::from_millis(50)))
            .unwrap()
            .is_empty()
    );
    rx.send(&()).unwrap();
    let (idle, _idle_peer) = pipe().unwrap();
    assert_eq!(
        multiproc::wait(&[idle.as_fd(), sentinel], Some(DEADLINE)).unwrap(),
        vec![1]
    );
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

#[test]
fn panic_line_names_the_process() {
    // The child's stderr goes to a file: one line, naming process and message.
    let path = std::env::temp_dir().join(format!("multiproc-panic-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let mut p = Process::new(move || {
        nix::unistd::dup2_stderr(&file).unwrap();
        panic!("the message");
    })
    .with_name("panicker");
    p.start().unwrap();
    let p = Reaped(p);
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(1));
    let text = std::fs::read_to_string(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    let pid = p.pid().unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with(&format!(
            "process 'panicker' (pid {pid}) panicked at tests/process.rs:"
        )),
        "{text}"
    );
    assert!(text.trim_end().ends_with(": the message"), "{text}");
}

#[test]
fn process_is_send() {
    fn send<T: Send>() {}
    send::<Process>();
    send::<multiproc::JoinHandle<u64>>();
    send::<multiproc::Connection>();
    send::<multiproc::Popen>();
}

#[test]
fn child_starts_a_daemon_from_a_short_lived_thread() {
    // The child inherits the parent's fork-thread record but not the thread:
    // it must start its own, or its daemonic grandchild would die with the
    // short-lived thread that asked for it (PR_SET_PDEATHSIG).
    let (mut report_tx, mut report_rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        let (mut ping, mut pong) = pipe().unwrap();
        let grandchild = std::thread::spawn(move || {
            let mut g = Process::new(move || {
                while let Ok(()) = pong.recv::<()>() {
                    pong.send(&()).unwrap();
                }
            })
            .with_daemon(true);
            g.start().unwrap();
            g
        })
        .join()
        .unwrap();
        // The thread is gone; the grandchild must still answer.
        let mut alive = true;
        for _ in 0..3 {
            ping.send(&()).unwrap();
            alive &= matches!(ping.recv_timeout::<()>(DEADLINE), Ok(Some(())));
        }
        report_tx.send(&(alive, grandchild.is_alive())).unwrap();
        // The finalizer terminates the daemonic grandchild on the way out.
    });
    p.start().unwrap();
    let p = Reaped(p);
    assert_eq!(
        report_rx.recv_timeout::<(bool, bool)>(DEADLINE).unwrap(),
        Some((true, true))
    );
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

// ------------------------------------------------ the sentinel, opened lazily

/// The fds of this process that are pidfds of `pid` (`Pid:` in fdinfo).
fn pidfds_of(pid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fdinfo") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| info.lines().any(|l| l == format!("Pid:\t{pid}")))
        .count()
}

#[test]
fn no_pidfd_until_the_sentinel_is_asked_for() {
    let (tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        let mut tx = tx;
        let _ = tx.recv::<()>();
    });
    p.start().unwrap();
    let p = Reaped(p);
    let pid = p.pid().unwrap();
    // Asking whether it runs, or for its code without waiting, opens nothing.
    assert!(p.is_alive());
    assert_eq!(p.exitcode(), None);
    assert_eq!(p.join_timeout(Duration::ZERO).unwrap(), None);
    assert_eq!(pidfds_of(pid), 0);
    // The sentinel is the pidfd, opened now, and the same fd every time.
    let first = p.sentinel().unwrap().as_raw_fd();
    assert_eq!(p.sentinel().unwrap().as_raw_fd(), first);
    assert_eq!(pidfds_of(pid), 1);
    assert!(
        multiproc::wait(&[p.sentinel().unwrap()], Some(Duration::from_millis(20)))
            .unwrap()
            .is_empty()
    );
    rx.send(&()).unwrap();
    assert_eq!(
        multiproc::wait(&[p.sentinel().unwrap()], Some(DEADLINE)).unwrap(),
        vec![0]
    );
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

#[test]
fn sentinel_after_the_child_was_reaped_is_readable() {
    common::within(60, sentinel_after_reaped_body);
}

fn sentinel_after_reaped_body() {
    let mut p = Process::new(|| multiproc::exit(3));
    p.start().unwrap();
    let p = Reaped(p);
    assert_eq!(p.join().unwrap(), 3);
    // No pidfd can name a reaped child: an fd that is readable at once.
    let sentinel = p.sentinel().unwrap();
    let raw = sentinel.as_raw_fd();
    assert_eq!(
        multiproc::wait(&[sentinel], Some(DEADLINE)).unwrap(),
        vec![0]
    );
    assert_eq!(p.sentinel().unwrap().as_raw_fd(), raw);
    assert_eq!(p.exitcode(), Some(3));
    assert!(!p.is_alive());
}

#[test]
fn join_timeout_of_an_exited_child_needs_no_sentinel() {
    let (mut tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || tx.send(&()).unwrap());
    p.start().unwrap();
    let p = Reaped(p);
    let pid = p.pid().unwrap();
    rx.recv_timeout::<()>(DEADLINE).unwrap().expect("child ran");
    // Once it is gone (a zombie), a timed join reaps it without a pidfd.
    assert!(common::eventually(DEADLINE, || common::is_dead(pid)));
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
    assert_eq!(p.exitcode(), Some(0));
    let debug = format!("{:?}", p.popen().unwrap());
    assert!(debug.contains("sentinel: None"), "{debug}");
}

#[test]
fn join_while_another_thread_reaps() {
    common::within(120, join_while_another_thread_reaps_body);
}

fn join_while_another_thread_reaps_body() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    // `active_children` reaps finished children from another thread while
    // `join` blocks: whoever reaps, join returns the child's code.
    for _ in 0..20 {
        let stop = Arc::new(AtomicBool::new(false));
        let reaper = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed) && t0.elapsed() < DEADLINE {
                    let _ = multiproc::active_children();
                }
            })
        };
        let mut p = Process::new(|| multiproc::exit(5));
        p.start().unwrap();
        let p = Reaped(p);
        let code = p.join();
        stop.store(true, Ordering::Relaxed);
        reaper.join().unwrap();
        assert_eq!(code.unwrap(), 5);
    }
}

#[test]
fn a_default_name_leaves_the_os_name_alone() {
    let (mut tx, mut rx) = pipe().unwrap();
    let mut p = Process::new(move || {
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
        tx.send(&(multiproc::current_process().name().to_string(), comm))
            .unwrap();
    });
    p.start().unwrap();
    let p = Reaped(p);
    let (name, comm): (String, String) = rx.recv_timeout(DEADLINE).unwrap().expect("no report");
    assert_eq!(name, p.name());
    // `ps` shows what it showed for the parent's thread that forked.
    let ours =
        std::fs::read_to_string(format!("/proc/self/task/{}/comm", nix::unistd::gettid())).unwrap();
    assert_eq!(comm, ours);
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

#[test]
fn no_fd_leaked_across_1000_starts() {
    // Counted in a child of its own: it has one thread, so the other tests
    // of this binary cannot open or close fds meanwhile.
    let mut h = multiproc::spawn(|| {
        let before = common::fd_count();
        for i in 0..1000 {
            let mut p = Process::new(|| {});
            p.start().unwrap();
            match i % 4 {
                0 => assert_eq!(p.join().unwrap(), 0),
                1 => assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0)),
                2 => {
                    let _ = p.sentinel();
                    assert_eq!(p.join().unwrap(), 0);
                    let _ = p.sentinel();
                }
                _ => {
                    let t0 = Instant::now();
                    while p.is_alive() && t0.elapsed() < DEADLINE {
                        std::thread::yield_now();
                    }
                    assert_eq!(p.exitcode(), Some(0));
                }
            }
        }
        (
            before,
            common::fd_count(),
            multiproc::active_children().len(),
        )
    })
    .unwrap();
    let (before, after, live) = h
        .join_timeout(Duration::from_secs(120))
        .unwrap()
        .expect("1000 starts did not end in time");
    assert_eq!((after, live), (before, 0));
}

#[test]
fn at_the_fd_limit_the_sentinel_degrades_to_always_readable() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    // In a child of its own: the fd limit and the fds filling it up to the
    // limit must not reach the other tests of this binary.
    let mut h = multiproc::spawn(|| {
        let (tx, mut rx) = pipe().unwrap();
        let mut p = Process::new(move || {
            let mut tx = tx;
            let _ = tx.recv::<()>();
        });
        p.start().unwrap();
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, common::fd_count() as u64 + 4, hard).unwrap();
        let mut filler = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            filler.push(f);
        }
        // No fd left for the pidfd: a sentinel that polls readable (a
        // spurious wake-up), and waits that neither fail nor spin forever.
        let sentinel = p.sentinel().expect("started").as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{sentinel}")).unwrap();
        let timed = p.join_timeout(Duration::from_millis(120)).unwrap();
        let alive = p.is_alive();
        drop(filler);
        rx.send(&()).unwrap();
        let code = p.join_timeout(DEADLINE).unwrap();
        (link.to_string_lossy().into_owned(), timed, alive, code)
    })
    .unwrap();
    let (link, timed, alive, code) = h
        .join_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("the child did not end in time");
    assert_eq!(link, "/dev/null");
    assert_eq!(timed, None);
    assert!(alive);
    assert_eq!(code, Some(0));
}
