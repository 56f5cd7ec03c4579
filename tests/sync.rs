//! Locks, semaphores, events, barriers, values and arrays across processes.

mod common;

use std::time::{Duration, Instant};

use common::{exit_code, start, Reaped, DEADLINE};
use multiproc::{pipe, Array, Barrier, Connection, Event, Lock, RLock, Semaphore, Value};

/// Receives one message from the peer, within the deadline.
fn recv<T: serde::de::DeserializeOwned>(c: &mut Connection) -> T {
    c.recv_timeout(DEADLINE)
        .expect("recv")
        .expect("no message in time")
}

/// In a child: waits for the parent's go-ahead, or exits 99 after the deadline.
fn child_recv<T: serde::de::DeserializeOwned>(c: &mut Connection) -> T {
    match c.recv_timeout(DEADLINE) {
        Ok(Some(v)) => v,
        _ => multiproc::exit(99),
    }
}

#[test]
fn sigkilled_holder_hands_the_lock_to_a_blocked_waiter() {
    let lock = Lock::new().unwrap();
    let (mut ours, mut theirs) = pipe().unwrap();
    let l = lock.clone();
    let child = start(move || {
        let g = l.lock().unwrap();
        theirs.send(&"locked").unwrap();
        let _: Option<u8> = theirs.recv_timeout(DEADLINE).unwrap(); // killed before this ends
        drop(g);
    });
    assert_eq!(recv::<String>(&mut ours), "locked");
    assert!(lock.try_lock().unwrap().is_none());

    // A thread already asleep in lock() when the holder dies.
    let l = lock.clone();
    let waiter =
        std::thread::spawn(move || l.lock_timeout(DEADLINE).unwrap().map(|g| g.owner_died()));
    child.kill().unwrap();
    assert_eq!(exit_code(&child), -9);
    assert_eq!(waiter.join().unwrap(), Some(true));
    // The one after that finds a consistent lock.
    let g = lock
        .lock_timeout(Duration::from_secs(1))
        .unwrap()
        .expect("lock free within a second");
    assert!(!g.owner_died());
}

#[test]
fn aborted_holder_hands_the_lock_over_at_once() {
    let lock = Lock::new().unwrap();
    let l = lock.clone();
    let child = start(move || {
        std::mem::forget(l.lock().unwrap());
        std::process::abort();
    });
    assert_eq!(exit_code(&child), -6);
    let g = lock
        .lock_timeout(Duration::from_secs(1))
        .unwrap()
        .expect("lock free within a second");
    assert!(g.owner_died());
    drop(g);
    let g = lock.lock().unwrap();
    assert!(!g.owner_died());
}

#[test]
fn holder_that_exits_without_unlocking_hands_the_lock_over() {
    let rlock = RLock::new().unwrap();
    let value = Value::new(0u32).unwrap();
    let (r, v) = (rlock.clone(), value.clone());
    let child = start(move || {
        std::mem::forget(r.lock().unwrap());
        std::mem::forget(v.lock().unwrap());
        multiproc::exit(3);
    });
    assert_eq!(exit_code(&child), 3);
    assert!(rlock.lock().unwrap().owner_died());
    assert!(!rlock.lock().unwrap().owner_died());
    assert!(value.lock().unwrap().owner_died());
    assert_eq!(value.get(), 0);
}

fn cpu_time() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let us = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    us(u.user_time()) + us(u.system_time())
}

#[test]
fn a_waiter_sleeps_instead_of_spinning() {
    let lock = Lock::new().unwrap();
    let guard = lock.lock().unwrap();
    let (mut ours, mut theirs) = pipe().unwrap();
    let l = lock.clone();
    let child = start(move || {
        theirs.send(&"waiting").unwrap();
        let (t0, cpu0) = (Instant::now(), cpu_time());
        let g = l.lock().unwrap();
        let (wall, cpu) = (t0.elapsed(), cpu_time() - cpu0);
        drop(g);
        theirs
            .send(&(wall.as_micros() as u64, cpu.as_micros() as u64))
            .unwrap();
    });
    assert_eq!(recv::<String>(&mut ours), "waiting");
    // Elapsed time is what this test measures: hold the lock for a second.
    std::thread::sleep(Duration::from_secs(1));
    drop(guard);
    let (wall_us, cpu_us): (u64, u64) = recv(&mut ours);
    assert_eq!(exit_code(&child), 0);
    assert!(wall_us >= 200_000, "the child waited only {wall_us} us");
    assert!(
        cpu_us * 20 < wall_us,
        "waiting {wall_us} us cost {cpu_us} us of CPU (5 % allowed)"
    );
}

#[test]
fn value_update_is_mutually_exclusive_across_processes() {
    const PROCS: u64 = 4;
    const N: u64 = 2000;
    let total = Value::new(0u64).unwrap();
    // A non-atomic read-modify-write through the guard, too.
    let pair = Value::new([0u64; 2]).unwrap();
    let children: Vec<Reaped> = (0..PROCS)
        .map(|_| {
            let (t, p) = (total.clone(), pair.clone());
            start(move || {
                for i in 0..N {
                    t.update(|x| *x += 1);
                    let mut g = p.lock().unwrap();
                    let a = g[0];
                    if i % 64 == 0 {
                        std::thread::yield_now();
                    }
                    *g = [a + 1, g[1] + 2];
                }
            })
        })
        .collect();
    for c in &children {
        assert_eq!(exit_code(c), 0);
    }
    assert_eq!(total.get(), PROCS * N);
    assert_eq!(pair.get(), [PROCS * N, 2 * PROCS * N]);
}

#[test]
fn timeouts_of_every_wait() {
    let lock = Lock::new().unwrap();
    let rlock = RLock::new().unwrap();
    let (mut ours, mut theirs) = pipe().unwrap();
    let (l, r) = (lock.clone(), rlock.clone());
    let child = start(move || {
        let _a = l.lock().unwrap();
        let _b = r.lock().unwrap();
        theirs.send(&"held").unwrap();
        let _: () = child_recv(&mut theirs);
    });
    assert_eq!(recv::<String>(&mut ours), "held");
    assert!(lock.try_lock().unwrap().is_none());
    assert!(lock
        .lock_timeout(Duration::from_millis(50))
        .unwrap()
        .is_none());
    assert!(rlock.try_lock().unwrap().is_none());
    assert!(rlock
        .lock_timeout(Duration::from_millis(50))
        .unwrap()
        .is_none());
    ours.send(&()).unwrap();
    assert_eq!(exit_code(&child), 0);
    assert!(!lock.lock_timeout(DEADLINE).unwrap().unwrap().owner_died());
    assert!(rlock.try_lock().unwrap().is_some());

    let s = Semaphore::new(0).unwrap();
    assert!(!s.try_acquire().unwrap());
    assert!(!s.acquire_timeout(Duration::from_millis(50)).unwrap());
    let e = Event::new().unwrap();
    assert!(!e.wait(Some(Duration::from_millis(50))).unwrap());
    let b = Barrier::new(2).unwrap();
    assert_eq!(b.wait_timeout(Duration::from_millis(50)).unwrap(), None);
    // A zero timeout polls.
    assert!(lock.lock_timeout(Duration::ZERO).unwrap().is_some());
    assert!(!s.acquire_timeout(Duration::ZERO).unwrap());
    assert!(!e.wait(Some(Duration::ZERO)).unwrap());
}

#[test]
fn lock_relock_by_the_holder_is_an_error_not_a_deadlock() {
    let lock = Lock::new().unwrap();
    let _g = lock.lock().unwrap();
    let err = lock.lock().unwrap_err();
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::Deadlock
    );
    assert!(lock.try_lock().unwrap().is_none());
    assert!(lock.lock_timeout(DEADLINE).is_err());
    let v = Value::new(1u8).unwrap();
    let _vg = v.lock().unwrap();
    assert!(v.lock().is_err());
}

#[test]
fn rlock_is_reentrant_for_its_holder_only() {
    let rlock = RLock::new().unwrap();
    let (mut ours, mut theirs) = pipe().unwrap();
    let r = rlock.clone();
    let child = start(move || {
        let outer = r.lock().unwrap();
        let inner = r.try_lock().unwrap().expect("re-entry");
        let innermost = r
            .lock_timeout(Duration::from_millis(1))
            .unwrap()
            .expect("re-entry");
        theirs.send(&3u8).unwrap();
        let _: () = child_recv(&mut theirs);
        drop(innermost);
        drop(inner);
        theirs.send(&1u8).unwrap();
        let _: () = child_recv(&mut theirs);
        drop(outer);
        theirs.send(&0u8).unwrap();
    });
    assert_eq!(recv::<u8>(&mut ours), 3);
    assert!(rlock.try_lock().unwrap().is_none());
    ours.send(&()).unwrap();
    assert_eq!(recv::<u8>(&mut ours), 1);
    assert!(rlock.try_lock().unwrap().is_none());
    ours.send(&()).unwrap();
    assert_eq!(recv::<u8>(&mut ours), 0);
    assert!(rlock.try_lock().unwrap().is_some());
    assert_eq!(exit_code(&child), 0);
}

#[test]
fn semaphore_counts_across_processes() {
    let sem = Semaphore::new(2).unwrap();
    // [inside now, most inside at once]
    let inside = Value::new([0u32; 2]).unwrap();
    let children: Vec<Reaped> = (0..4)
        .map(|_| {
            let (s, v) = (sem.clone(), inside.clone());
            start(move || {
                for _ in 0..50 {
                    if !s.acquire_timeout(DEADLINE).unwrap() {
                        multiproc::exit(98);
                    }
                    v.update(|c| {
                        c[0] += 1;
                        c[1] = c[1].max(c[0]);
                    });
                    std::thread::yield_now();
                    v.update(|c| c[0] -= 1);
                    s.release().unwrap();
                }
            })
        })
        .collect();
    for c in &children {
        assert_eq!(exit_code(c), 0);
    }
    assert_eq!(sem.value(), 2);
    let [now, most] = inside.get();
    assert_eq!(now, 0);
    assert!((1..=2).contains(&most), "{most} inside at once");

    // A release in another process wakes a sleeper here.
    let empty = Semaphore::new(0).unwrap();
    let (mut ours, mut theirs) = pipe().unwrap();
    let s = empty.clone();
    let child = start(move || {
        let _: () = child_recv(&mut theirs);
        s.release().unwrap();
        s.release().unwrap();
    });
    ours.send(&()).unwrap();
    assert!(empty.acquire_timeout(DEADLINE).unwrap());
    assert!(empty.acquire_timeout(DEADLINE).unwrap());
    assert_eq!(exit_code(&child), 0);
    assert_eq!(empty.value(), 0);
    assert!(Semaphore::new(usize::MAX).is_err());
}

#[test]
fn event_wakes_waiters_in_other_processes() {
    let event = Event::new().unwrap();
    let (mut ours, theirs) = pipe().unwrap();
    let children: Vec<Reaped> = (0..3)
        .map(|_| {
            let e = event.clone();
            let mut t = Connection::from_fd(
                std::os::fd::AsFd::as_fd(&theirs)
                    .try_clone_to_owned()
                    .unwrap(),
            );
            start(move || {
                t.send(&"waiting").unwrap();
                let set = e.wait(Some(DEADLINE)).unwrap();
                multiproc::exit(if set { 0 } else { 1 });
            })
        })
        .collect();
    for _ in 0..3 {
        assert_eq!(recv::<String>(&mut ours), "waiting");
    }
    event.set();
    for c in &children {
        assert_eq!(exit_code(c), 0);
    }
    assert!(event.is_set());
    event.clear();
    assert!(!event.is_set());
}

#[test]
fn barrier_indices_are_distinct_in_every_round_across_processes() {
    const PARTIES: usize = 3;
    const ROUNDS: usize = 20;
    let barrier = Barrier::new(PARTIES).unwrap();
    let seen = Array::<u32>::new(PARTIES * ROUNDS).unwrap();
    let children: Vec<Reaped> = (0..PARTIES)
        .map(|p| {
            let (b, s) = (barrier.clone(), seen.clone());
            start(move || {
                for round in 0..ROUNDS {
                    let i = b.wait_timeout(DEADLINE).unwrap().expect("round filled");
                    s.lock().unwrap()[round * PARTIES + p] = i as u32;
                }
            })
        })
        .collect();
    for c in &children {
        assert_eq!(exit_code(c), 0);
    }
    let seen = seen.to_vec();
    for round in seen.chunks(PARTIES) {
        let mut r = round.to_vec();
        r.sort();
        assert_eq!(r, [0, 1, 2]);
    }
    assert!(!barrier.is_broken());
    assert_eq!(barrier.n_waiting(), 0);
}

#[test]
fn barrier_timeout_breaks_it_for_the_others() {
    let barrier = Barrier::new(3).unwrap();
    let b = barrier.clone();
    let child = start(move || {
        let r = b.wait();
        multiproc::exit(match r {
            Err(e) if e.is_broken_barrier() => 0,
            _ => 1,
        });
    });
    assert!(common::eventually(DEADLINE, || barrier.n_waiting() == 1));
    assert_eq!(
        barrier.wait_timeout(Duration::from_millis(100)).unwrap(),
        None
    );
    assert_eq!(exit_code(&child), 0);
    assert!(barrier.is_broken());
    assert!(barrier.wait().unwrap_err().is_broken_barrier());
    assert!(barrier
        .wait_timeout(DEADLINE)
        .unwrap_err()
        .is_broken_barrier());
    assert_eq!(barrier.wait().unwrap_err().to_string(), "barrier is broken");
}

#[test]
fn barrier_of_zero_parties_is_an_error() {
    let err = Barrier::new(0).unwrap_err();
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert!(Barrier::new(usize::MAX).is_err());
}

#[test]
fn array_is_shared_with_children() {
    let array = Array::from_slice(&[1i32, 2, 3, 4]).unwrap();
    let (mut ours, mut theirs) = pipe().unwrap();
    let a = array.clone();
    let child = start(move || {
        {
            let mut g = a.lock().unwrap();
            for x in g.iter_mut() {
                *x *= 10;
            }
        }
        theirs.send(&()).unwrap();
        let _: () = child_recv(&mut theirs);
        let ok = a.to_vec() == [-1, -2, -3, -4];
        multiproc::exit(if ok { 0 } else { 1 });
    });
    let () = recv(&mut ours);
    assert_eq!(array.to_vec(), [10, 20, 30, 40]);
    array.lock().unwrap().copy_from_slice(&[-1, -2, -3, -4]);
    ours.send(&()).unwrap();
    assert_eq!(exit_code(&child), 0);
    assert_eq!(array.len(), 4);
    assert!(Array::<u64>::new(usize::MAX).is_err());
    assert!(Array::<u8>::new(0).unwrap().to_vec().is_empty());
}

#[test]
fn handles_are_send_sync_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Lock>();
    check::<RLock>();
    check::<Semaphore>();
    check::<Event>();
    check::<Barrier>();
    check::<Value<u64>>();
    check::<Array<f32>>();
    check::<multiproc::SharedMemory>();
}

#[test]
fn contended_lock_across_threads_and_processes_loses_no_wakeup() {
    const PROCS: usize = 3;
    const THREADS: usize = 3;
    const N: u64 = 2000;
    let lock = Lock::new().unwrap();
    let count = Value::new(0u64).unwrap();
    let rlock = RLock::new().unwrap();
    let work = move |lock: Lock, count: Value<u64>, rlock: RLock| {
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (l, c, r) = (lock.clone(), count.clone(), rlock.clone());
                std::thread::spawn(move || {
                    for i in 0..N {
                        let Some(_g) = l.lock_timeout(DEADLINE).unwrap() else {
                            return false;
                        };
                        if i % 16 == 0 {
                            // Let the others pile up behind the lock.
                            std::thread::yield_now();
                        }
                        let Some(mut v) = c.lock_timeout(DEADLINE).unwrap() else {
                            return false;
                        };
                        *v += 1;
                        drop(v);
                        let Some(_r1) = r.lock_timeout(DEADLINE).unwrap() else {
                            return false;
                        };
                        let _r2 = r.try_lock().unwrap().expect("re-entry");
                    }
                    true
                })
            })
            .collect();
        threads.into_iter().all(|t| t.join().unwrap())
    };
    let children: Vec<Reaped> = (0..PROCS)
        .map(|_| {
            let (l, c, r) = (lock.clone(), count.clone(), rlock.clone());
            start(move || multiproc::exit(if work(l, c, r) { 0 } else { 1 }))
        })
        .collect();
    assert!(work(lock.clone(), count.clone(), rlock.clone()));
    for c in &children {
        assert_eq!(exit_code(c), 0);
    }
    assert_eq!(count.get(), (PROCS as u64 + 1) * THREADS as u64 * N);
    assert!(!lock.try_lock().unwrap().unwrap().owner_died());
}

#[test]
fn event_set_then_clear_still_releases_the_waiters_of_that_set() {
    let event = Event::new().unwrap();
    let (mut ours, mut theirs) = pipe().unwrap();
    let e = event.clone();
    let child = start(move || {
        theirs.send(&"waiting").unwrap();
        let set = e.wait(Some(DEADLINE)).unwrap();
        multiproc::exit(if set { 0 } else { 1 });
    });
    assert_eq!(recv::<String>(&mut ours), "waiting");
    // Let the child go to sleep; a child that checks the flag after the
    // clear must still see that a set happened since it started waiting.
    assert!(common::eventually(DEADLINE, || {
        common::stat_fields(child.pid().unwrap())
            .is_some_and(|f| f.first().is_some_and(|s| s == "S"))
    }));
    event.set();
    event.clear();
    assert_eq!(exit_code(&child), 0);
    assert!(!event.is_set());
}

/// Every other test of this file again, in a subprocess whose locks use the
/// fallback backend (glibc's robust pthread mutexes).
#[test]
fn the_pthread_fallback_passes_the_same_tests() {
    if std::env::var_os("MULTIPROC_PTHREAD_LOCKS").is_some() {
        return; // already the fallback run
    }
    let out = common::temp_dir("pthread-locks").join("out.txt");
    let file = std::fs::File::create(&out).unwrap();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["-q", "--test-threads=4"])
        .env("MULTIPROC_PTHREAD_LOCKS", "1")
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file);
    let mut child = common::ReapedChild(cmd.spawn().unwrap());
    let status = common::wait_child(&mut child.0, Duration::from_secs(60))
        .expect("the fallback run did not finish in time");
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
    assert!(status.success(), "fallback run failed:\n{text}");
    assert!(text.contains("test result: ok"), "{text}");
}

/// The shared-state example runs as a user would: exact counter, and the
/// histogram's lock taken over from the SIGKILLed holder.
#[test]
fn shared_counter_example() {
    use std::io::Read;
    let mut child = common::ReapedChild(
        std::process::Command::new(common::example_binary("shared_counter"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = common::wait_child(&mut child.0, DEADLINE).expect("the example ends in time");
    let mut text = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("counter = 40000 (expected 40000)"), "{text}");
    assert!(text.contains("victim exit code: -9"), "{text}");
    assert!(text.contains("owner_died = true"), "{text}");
}
