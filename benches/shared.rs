//! Shared-state latencies (release build), beside Python's
//! `multiprocessing.Lock` (`benches/python/lock.py`, same line format) and
//! the C pipe ping-pong of `../shared/anchors` (`L4`).
//!
//! - `S1 lock_uncontended ns=`: one `Lock::lock` + guard drop in one
//!   process, no contention (the median of 21 runs of 1 000 000 pairs,
//!   interleaved with the std runs);
//!   `S1 std_mutex_uncontended ns=` is the same loop on `std::sync::Mutex`.
//! - `S2 lock_pingpong us=`: one round trip of a lock handoff between two
//!   processes. Two processes pass the turn with three robust locks and no
//!   other channel: the parent starts holding locks 0 and 1, the child lock
//!   2; at step `s` the parent unlocks `s % 3` and locks `(s + 2) % 3`, the
//!   child locks `s % 3` and unlocks `(s + 2) % 3`. Each lock taken waits
//!   for the other process's unlock of it, so one step of both is two
//!   handoffs (parent → child, child → parent): the same two wake-ups as one
//!   round trip of `L4`'s 1-byte pipe ping-pong. 20 000 steps per run, the
//!   median of 11 runs.
//!
//! Run with `cargo bench --bench shared`.

mod common;

use common::emit;
use std::hint::black_box;
use std::time::{Duration, Instant};

use multiproc::{pipe, Lock, LockGuard, Process};

const PAIRS: u32 = 1_000_000;
const STEPS: usize = 20_000;

fn uncontended_lock() -> f64 {
    let lock = Lock::new().unwrap();
    let t0 = Instant::now();
    for _ in 0..PAIRS {
        drop(black_box(lock.lock().unwrap()));
    }
    t0.elapsed().as_nanos() as f64 / f64::from(PAIRS)
}

fn uncontended_std() -> f64 {
    let m = std::sync::Mutex::new(());
    let t0 = Instant::now();
    for _ in 0..PAIRS {
        drop(black_box(m.lock().unwrap()));
    }
    t0.elapsed().as_nanos() as f64 / f64::from(PAIRS)
}

/// Microseconds per round trip (two handoffs), over `STEPS` steps.
fn pingpong() -> f64 {
    let locks = [
        Lock::new().unwrap(),
        Lock::new().unwrap(),
        Lock::new().unwrap(),
    ];
    let (mut ours, mut theirs) = pipe().unwrap();
    let mut held: [Option<LockGuard<'_>>; 3] = [None, None, None];
    held[0] = Some(locks[0].lock().unwrap());
    held[1] = Some(locks[1].lock().unwrap());
    let child_locks = locks.clone();
    let mut child = Process::new(move || {
        let l = child_locks;
        let mut held: [Option<LockGuard<'_>>; 3] = [None, None, None];
        held[2] = Some(l[2].lock().unwrap());
        theirs.send(&()).unwrap();
        for s in 0..STEPS {
            held[s % 3] = Some(l[s % 3].lock().unwrap());
            held[(s + 2) % 3] = None;
        }
    });
    child.start().unwrap();
    let () = ours
        .recv_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("child ready");
    let t0 = Instant::now();
    for s in 0..STEPS {
        held[s % 3] = None;
        held[(s + 2) % 3] = Some(locks[(s + 2) % 3].lock().unwrap());
    }
    let dt = t0.elapsed();
    drop(held);
    assert_eq!(
        child.join_timeout(Duration::from_secs(30)).unwrap(),
        Some(0)
    );
    dt.as_secs_f64() * 1e6 / STEPS as f64
}

fn main() {
    // Warm up the mapping, the fork path and the caches.
    uncontended_lock();
    uncontended_std();
    pingpong();
    // Interleaved, so that both loops see the same machine load.
    let (ours, std): (Vec<f64>, Vec<f64>) = (0..21)
        .map(|_| (uncontended_lock(), uncontended_std()))
        .unzip();
    emit("S1", "lock_uncontended", "ns", &ours, 1);
    emit("S1", "std_mutex_uncontended", "ns", &std, 1);
    let pp: Vec<f64> = (0..11).map(|_| pingpong()).collect();
    emit("S2", "lock_pingpong", "us", &pp, 2);
}
