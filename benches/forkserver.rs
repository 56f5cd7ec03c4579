//! W6 of `../shared/anchors`: process starts from a big parent, `Fork`
//! against `ForkServer` (the server started while the program was small).
//!
//! `cargo bench --bench forkserver` prints, in the anchors' form:
//! - `W6 {fork,forkserver}_start_join_parent_<N>MiB us=`: `Process::from_fn`
//!   start + join, with the parent holding N MiB (allocated and touched
//!   after `forkserver::start()`), N = 0 and 4096;
//! - `W6 pool_new_{fork,forkserver}_parent_<N>MiB ms=`: `Pool` of 2 built,
//!   closed and joined (W2's `pool_start_close_join`), N = 0 and 4096.
//!
//! An optional argument scales the repetitions (`-- 3`); a second one sets
//! the big size in MiB (`-- 1 1024`).

mod common;

use common::emit;
use std::time::Instant;

use multiproc::{forkserver, Pool, Process, StartMethod};

fn noop(_: ()) {}

fn start_join(method: StartMethod, n: usize) -> f64 {
    let t0 = Instant::now();
    for _ in 0..n {
        let mut p = Process::from_fn(noop, ()).with_start_method(method);
        p.start().unwrap();
        assert_eq!(p.join().unwrap(), 0);
    }
    t0.elapsed().as_secs_f64() / n as f64 * 1e6
}

fn pool_life(method: StartMethod) -> f64 {
    let t0 = Instant::now();
    let p = Pool::builder()
        .processes(2)
        .start_method(method)
        .build()
        .unwrap();
    p.close();
    p.join().unwrap();
    t0.elapsed().as_secs_f64() * 1e3
}

fn name(method: StartMethod) -> &'static str {
    match method {
        StartMethod::Fork => "fork",
        _ => "forkserver",
    }
}

/// Start+join and pool lifecycles with both methods; `starts` per rep.
fn round(mib: usize, reps: usize, fork_starts: usize) {
    for method in [StartMethod::Fork, StartMethod::ForkServer] {
        let starts = if method == StartMethod::Fork {
            fork_starts
        } else {
            200
        };
        let per: Vec<f64> = (0..reps).map(|_| start_join(method, starts)).collect();
        emit(
            "W6",
            &format!("{}_start_join_parent_{mib}MiB", name(method)),
            "us",
            &per,
            1,
        );
    }
    for method in [StartMethod::Fork, StartMethod::ForkServer] {
        let life: Vec<f64> = (0..reps).map(|_| pool_life(method)).collect();
        emit(
            "W6",
            &format!("pool_new_{}_parent_{mib}MiB", name(method)),
            "ms",
            &life,
            2,
        );
    }
}

fn main() {
    // First, while the bench has one thread and a small heap.
    forkserver::start().unwrap();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let scale: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1);
    let big: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4096);
    let reps = 5 * scale;
    round(0, reps, 200);
    // The big heap, touched page by page so that it is resident.
    let mut heap = vec![0u8; big << 20];
    for page in heap.chunks_mut(4096) {
        page[0] = 1;
    }
    round(big, reps, 4);
    std::hint::black_box(&heap);
}
