//! Foundation latencies (release build): one `Popen` fork+wait, one
//! `Process` start+join and one `spawn(|| 1u64)` round trip, each timed
//! individually 1000 times.
//!
//! Run with `cargo bench --bench foundation`. One line per figure, in the
//! form of `../shared/anchors`: `<id> <name> <key>=<median> reps=<n> min=<min> max=<max>`.

mod common;

use common::emit;
use std::time::Instant;

use multiproc::{spawn, Popen, Process};

fn time_each(reps: usize, mut op: impl FnMut()) -> Vec<f64> {
    (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            op();
            t0.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn main() {
    let reps = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    // Warm up lazy statics, the pidfd probe and the page cache.
    for _ in 0..20 {
        let mut p = Process::new(|| {});
        p.start().unwrap();
        p.join().unwrap();
        spawn(|| 1u64).unwrap().join().unwrap();
    }
    let popen = time_each(reps, || {
        let p = Popen::fork(|| 0).unwrap();
        assert_eq!(p.wait(None).unwrap(), Some(0));
    });
    emit("F0", "popen_fork_wait", "us", &popen, 1);
    let process = time_each(reps, || {
        let mut p = Process::new(|| {});
        p.start().unwrap();
        assert_eq!(p.join().unwrap(), 0);
    });
    emit("F1", "process_start_join", "us", &process, 1);
    let spawned = time_each(reps, || {
        assert_eq!(spawn(|| 1u64).unwrap().join().unwrap(), 1);
    });
    emit("F2", "spawn_roundtrip_u64", "us", &spawned, 1);
}
