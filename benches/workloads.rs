//! The workloads of `../shared/anchors` (Python's multiprocessing and C
//! probes of the machine's limits), for side-by-side ratios.
//!
//! `cargo bench --bench workloads` prints one line per figure:
//! `<W> <name> <key>=<median> reps=<n> min=<min> max=<max>`, the median,
//! minimum and maximum over repetitions inside the run, with the same names
//! as the anchors so the outputs pair line by line. 2 worker processes.
//! An optional argument scales the repetitions (`-- 3`); workload names
//! select which run (`-- w1`, `-- w2 w4 3`; all of them when none is given).

mod common;

use common::emit;
use std::hint::black_box;
use std::time::{Duration, Instant};

use multiproc::{Pool, Process};
use serde_bytes::ByteBuf;

const MIB: usize = 1 << 20;

fn square(x: u64) -> u64 {
    x * x
}

fn length(b: ByteBuf) -> usize {
    b.len()
}

fn make_mib(_: u32) -> ByteBuf {
    ByteBuf::from(vec![0u8; MIB])
}

fn ident(x: u64) -> u64 {
    x
}

/// About `n` rounds of integer mixing: the CPU-bound task of W5.
fn burn(n: u64) -> u64 {
    let mut s = n;
    for i in 0..n {
        s = black_box((s.wrapping_add(i.wrapping_mul(i))) & 0xFFFF_FFFF);
    }
    s
}

fn w1(reps: usize) {
    const N: usize = 1000;
    let (mut per, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t0 = Instant::now();
        for _ in 0..N {
            let mut p = Process::new(|| {});
            p.start().unwrap();
            assert_eq!(p.join().unwrap(), 0);
        }
        per.push(t0.elapsed().as_secs_f64() / N as f64 * 1e6);
        // The C probe's loop (fork, `_exit(0)`, `waitpid`) from this same
        // process image, right after: the floor for this binary, whatever
        // the machine does from one minute to the next.
        let t0 = Instant::now();
        for _ in 0..N {
            common::bare_fork_wait();
        }
        raw.push(t0.elapsed().as_secs_f64() / N as f64 * 1e6);
    }
    emit("W1", "spawn", "us_per_process", &per, 1);
    emit("W1", "bare_fork_wait_same_process", "us_per_fork", &raw, 1);
}

fn w2(pool: &Pool, reps: usize) {
    pool.map(square, 0..1000u64).unwrap();
    let (mut big, mut one) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t0 = Instant::now();
        let r = pool.map(square, 0..1_000_000u64).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        assert!(r[999_999] == 999_999 * 999_999 && r.len() == 1_000_000);
        big.push(1e6 / dt);
    }
    for _ in 0..reps {
        let t0 = Instant::now();
        let r = pool.map_chunked(square, 0..100_000u64, 1).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(r[99_999], 99_999 * 99_999);
        one.push(1e5 / dt);
    }
    emit("W2", "map_tiny_default_chunk", "tasks_per_s", &big, 0);
    emit("W2", "map_tiny_chunksize1", "tasks_per_s", &one, 0);
}

fn w2_lifecycle(reps: usize) {
    let mut life = Vec::new();
    for _ in 0..reps * 2 {
        let t0 = Instant::now();
        let p = Pool::new(2).unwrap();
        p.close();
        p.join().unwrap();
        life.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    emit("W2", "pool_start_close_join", "ms", &life, 2);
}

fn w3(pool: &Pool, reps: usize) {
    const N: usize = 256;
    let payload_mb = (N * MIB) as f64 / 1e6;
    let distinct: Vec<ByteBuf> = (0..N).map(|i| ByteBuf::from(vec![i as u8; MIB])).collect();
    pool.map(length, distinct[..8].to_vec()).unwrap();
    let (mut args, mut back) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let input = distinct.clone();
        let t0 = Instant::now();
        let r = pool.map(length, input).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        assert!(r.iter().all(|&n| n == MIB));
        args.push(payload_mb / dt);
    }
    for _ in 0..reps {
        let t0 = Instant::now();
        let r = pool.map(make_mib, 0..N as u32).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        assert!(r.len() == N && r.iter().all(|b| b.len() == MIB));
        drop(r);
        back.push(payload_mb / dt);
    }
    // The ceiling for owned results in this process: 256 copies of 1 MiB
    // into freshly allocated buffers, all freed after, as a map's results
    // are (no IPC at all). On a VM whose page faults are slow this, not the
    // transport, bounds `map_payload_results`.
    let src = vec![7u8; MIB];
    let mut fresh = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let v: Vec<ByteBuf> = (0..N).map(|_| ByteBuf::from(src.to_vec())).collect();
        let dt = t0.elapsed().as_secs_f64();
        black_box(&v);
        drop(v);
        fresh.push(payload_mb / dt);
    }
    emit("W3", "map_payload_args_distinct", "MB_per_s", &args, 1);
    emit("W3", "map_payload_results", "MB_per_s", &back, 1);
    emit("W3", "owned_copy_fresh_1MiB", "MB_per_s", &fresh, 1);
    // 8 arguments of 64 MiB, distinct.
    const BIG: usize = 64 * MIB;
    let big: Vec<ByteBuf> = (0..8).map(|i| ByteBuf::from(vec![i as u8; BIG])).collect();
    let mut args64 = Vec::new();
    for _ in 0..reps {
        let input = big.clone();
        let t0 = Instant::now();
        let r = pool.map(length, input).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        assert!(r.iter().all(|&n| n == BIG));
        args64.push((8 * BIG) as f64 / 1e6 / dt);
    }
    emit(
        "W3",
        "map_payload_args_distinct_64MiB",
        "MB_per_s",
        &args64,
        1,
    );
    // One 64 MiB message each way between two processes over `pipe()`.
    let (mut here, mut there) = multiproc::pipe().unwrap();
    let mut echo = Process::new(move || {
        while let Some(b) = there.recv::<Option<ByteBuf>>().unwrap() {
            there.send(&b).unwrap();
        }
    });
    echo.start().unwrap();
    let msg = Some(big[0].clone());
    let mut conn = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        here.send(&msg).unwrap();
        let back: ByteBuf = here.recv().unwrap();
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(back.len(), BIG);
        conn.push((2 * BIG) as f64 / 1e6 / dt);
    }
    here.send(&None::<ByteBuf>).unwrap();
    echo.join().unwrap();
    emit("W3", "connection_roundtrip_64MiB", "MB_per_s", &conn, 1);
}

fn w4(pool: &Pool, reps: usize) {
    const N: u64 = 10_000;
    for i in 0..200 {
        pool.apply(ident, i).unwrap();
    }
    let mut per = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        for i in 0..N {
            assert_eq!(pool.apply(ident, i).unwrap(), i);
        }
        per.push(t0.elapsed().as_secs_f64() / N as f64 * 1e6);
    }
    emit("W4", "apply_roundtrip", "us_per_call", &per, 1);
}

fn w5(reps: usize) {
    const TASKS: usize = 64;
    // Calibrate the loop to about 20 ms of CPU here.
    let mut n = 1_000_000u64;
    loop {
        let t0 = Instant::now();
        black_box(burn(n));
        let dt = t0.elapsed();
        if dt > Duration::from_millis(5) {
            n = (n as f64 * 0.020 / dt.as_secs_f64()) as u64;
            break;
        }
        n *= 4;
    }
    let pools = [Pool::new(1).unwrap(), Pool::new(2).unwrap()];
    for p in &pools {
        p.map_chunked(burn, vec![n / 10; 4], 1).unwrap();
    }
    let expect: Vec<u64> = (0..TASKS as u64).map(|i| burn(n + i)).collect();
    let mut sp = Vec::new();
    for _ in 0..reps {
        let mut times = [0.0; 2];
        for (k, p) in pools.iter().enumerate() {
            let t0 = Instant::now();
            let r = p
                .map_chunked(burn, (0..TASKS as u64).map(|i| n + i), 1)
                .unwrap();
            times[k] = t0.elapsed().as_secs_f64();
            assert_eq!(r, expect);
        }
        sp.push(times[0] / times[1]);
    }
    emit("W5", "cpu_scaling", "speedup", &sp, 3);
}

fn main() {
    // `cargo bench` passes `--bench`; a number scales the repetitions;
    // `w1`..`w5` pick workloads (all when none is named).
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5);
    let picked: Vec<String> = args
        .iter()
        .map(|a| a.to_ascii_lowercase())
        .filter(|a| a.len() == 2 && a.starts_with('w'))
        .collect();
    let run = |w: &str| picked.is_empty() || picked.iter().any(|p| p == w);
    if run("w1") {
        w1(reps);
    }
    if run("w2") || run("w3") || run("w4") {
        let pool = Pool::new(2).unwrap();
        if run("w2") {
            w2(&pool, reps);
            w2_lifecycle(reps);
        }
        if run("w3") {
            w3(&pool, reps);
        }
        if run("w4") {
            w4(&pool, reps);
        }
    }
    if run("w5") {
        w5(reps.clamp(1, 3));
    }
}
