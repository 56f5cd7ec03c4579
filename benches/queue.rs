//! `Queue` throughput, against `benches/python/queue.py` (Python's
//! `multiprocessing.Queue`, fork context) run in the same sitting.
//!
//! `cargo bench --bench queue` prints, as `../shared/anchors` does:
//! - `Q1 queue_small_msgs queue_small_msgs_per_s=`: 1 producer process →
//!   the parent, 1 M `u64`;
//! - `Q2 queue_4x4 queue_4x4_msgs_per_s=`: 4 producer processes → 4
//!   consumer processes, 1 M `u64` in all;
//! - `Q3 queue_1MiB queue_1MiB_MB_per_s=`: 1 producer process → the parent,
//!   256 messages of 1 MiB (`serde_bytes::ByteBuf`), MB/s (10^6 bytes).
//!
//! An optional argument sets the repetitions (`-- 5`; default 3); names
//! pick figures (`-- Q3 5`).

mod common;

use common::emit;
use std::time::{Duration, Instant};

use multiproc::{Process, Queue};
use serde_bytes::ByteBuf;

const MIB: usize = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

fn started(f: impl FnOnce() + Send + 'static) -> Process {
    let mut p = Process::new(f);
    p.start().unwrap();
    p
}

fn joined(p: &Process) {
    assert_eq!(p.join_timeout(LONG).unwrap(), Some(0));
}

fn q1(reps: usize) {
    const N: u64 = 1_000_000;
    let mut rates = Vec::new();
    for _ in 0..reps {
        let q = Queue::<u64>::new().unwrap();
        let t0 = Instant::now();
        let tx = q.clone();
        let p = started(move || {
            for i in 0..N {
                tx.put(&i).unwrap();
            }
        });
        for i in 0..N {
            assert_eq!(q.get().unwrap(), i);
        }
        let dt = t0.elapsed().as_secs_f64();
        joined(&p);
        rates.push(N as f64 / dt);
    }
    emit(
        "Q1",
        "queue_small_msgs",
        "queue_small_msgs_per_s",
        &rates,
        0,
    );
}

fn q2(reps: usize) {
    const N: u64 = 1_000_000;
    const K: u64 = 4;
    let mut rates = Vec::new();
    for _ in 0..reps {
        // `None` tells a consumer to stop; each reports its count.
        let q = Queue::<Option<u64>>::new().unwrap();
        let out = Queue::<u64>::new().unwrap();
        let t0 = Instant::now();
        let consumers: Vec<_> = (0..K)
            .map(|_| {
                let (q, out) = (q.clone(), out.clone());
                started(move || {
                    let mut got = 0;
                    while q.get().unwrap().is_some() {
                        got += 1;
                    }
                    out.put(&got).unwrap();
                })
            })
            .collect();
        let producers: Vec<_> = (0..K)
            .map(|j| {
                let q = q.clone();
                started(move || {
                    for i in j * (N / K)..(j + 1) * (N / K) {
                        q.put(&Some(i)).unwrap();
                    }
                })
            })
            .collect();
        producers.iter().for_each(joined);
        for _ in 0..K {
            q.put(&None).unwrap();
        }
        let total: u64 = (0..K).map(|_| out.get().unwrap()).sum();
        let dt = t0.elapsed().as_secs_f64();
        consumers.iter().for_each(joined);
        assert_eq!(total, N);
        rates.push(N as f64 / dt);
    }
    emit("Q2", "queue_4x4", "queue_4x4_msgs_per_s", &rates, 0);
}

fn q3(reps: usize) {
    const N: usize = 256;
    let mut rates = Vec::new();
    for _ in 0..reps {
        let q = Queue::<ByteBuf>::new().unwrap();
        let t0 = Instant::now();
        let tx = q.clone();
        let p = started(move || {
            let payload = ByteBuf::from(vec![0u8; MIB]);
            for _ in 0..N {
                tx.put(&payload).unwrap();
            }
        });
        for _ in 0..N {
            assert_eq!(q.get().unwrap().len(), MIB);
        }
        let dt = t0.elapsed().as_secs_f64();
        joined(&p);
        rates.push((N * MIB) as f64 / 1e6 / dt);
    }
    emit("Q3", "queue_1MiB", "queue_1MiB_MB_per_s", &rates, 1);
}

fn main() {
    // `cargo bench` passes `--bench`; a number sets the repetitions.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3);
    // Names (`Q1`, `Q3`) pick figures; none: all of them.
    let picked = |id: &str| {
        let named: Vec<&String> = args.iter().filter(|a| a.starts_with('Q')).collect();
        named.is_empty() || named.iter().any(|a| a.as_str() == id)
    };
    if picked("Q1") {
        q1(reps);
    }
    if picked("Q2") {
        q2(reps);
    }
    if picked("Q3") {
        q3(reps);
    }
}
