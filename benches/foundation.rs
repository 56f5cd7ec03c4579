//! Foundation latencies (release build): one `Popen` fork+wait, one
//! `Process` start+join and one `spawn(|| 1u64)` round trip, each timed
//! individually 1000 times; then the W1 loop (`Process` start+join, 1000
//! times a repetition) back to back with the same loop on a bare
//! `fork`+`_exit`+`waitpid` in this very process: the floor for a Rust
//! program of this size, which the C probe of `../shared/anchors/l1_fork.c`
//! does not pay (fewer mappings to copy at each fork).
//!
//! Run with `cargo bench --bench foundation`. One line per figure, in the
//! form of `../shared/anchors`: `<id> <name> <key>=<median> reps=<n> min=<min> max=<max>`.
//! A number scales the repetitions (`-- 200`); `loops` runs only the
//! back-to-back loops (`-- loops`); `bare` or `process` only that one loop
//! (for `perf stat` and `strace -c` of one kind of child).

mod common;

use common::{bare_fork_wait, emit};
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

/// Microseconds per turn of `n` turns of `op`.
fn per_turn(n: usize, mut op: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        op();
    }
    t0.elapsed().as_secs_f64() / n as f64 * 1e6
}

fn process_start_join() {
    let mut p = Process::new(|| {});
    p.start().unwrap();
    assert_eq!(p.join().unwrap(), 0);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps = args.iter().find_map(|a| a.parse().ok()).unwrap_or(1000);
    let has = |w: &str| args.iter().any(|a| a == w);
    let only_one = has("bare") || has("process");
    let only_loops = has("loops") || only_one;
    // Warm up lazy statics, the pidfd probe and the page cache.
    for _ in 0..20 {
        process_start_join();
        spawn(|| 1u64).unwrap().join().unwrap();
    }
    if !only_loops {
        let popen = time_each(reps, || {
            let p = Popen::fork(|| 0).unwrap();
            assert_eq!(p.wait(None).unwrap(), Some(0));
        });
        emit("F0", "popen_fork_wait", "us", &popen, 1);
        let process = time_each(reps, process_start_join);
        emit("F1", "process_start_join", "us", &process, 1);
        let spawned = time_each(reps, || {
            assert_eq!(spawn(|| 1u64).unwrap().join().unwrap(), 1);
        });
        emit("F2", "spawn_roundtrip_u64", "us", &spawned, 1);
    }
    const N: usize = 1000;
    if only_one {
        let (name, op): (&str, fn()) = if has("bare") {
            ("bare_fork_wait_loop", bare_fork_wait)
        } else {
            ("process_start_join_loop", process_start_join)
        };
        let per: Vec<f64> = (0..(reps / 100).max(3)).map(|_| per_turn(N, op)).collect();
        emit("F3", name, "us", &per, 1);
        return;
    }
    // The loops, alternated so that both see the same machine.
    let (mut bare, mut ours, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..(reps / 100).max(3) {
        let b = per_turn(N, bare_fork_wait);
        let o = per_turn(N, process_start_join);
        bare.push(b);
        ours.push(o);
        ratio.push(o / b);
    }
    emit("F3", "bare_fork_wait_loop", "us_per_fork", &bare, 1);
    emit("F3", "process_start_join_loop", "us_per_process", &ours, 1);
    emit("F3", "process_over_bare", "ratio", &ratio, 3);
}
