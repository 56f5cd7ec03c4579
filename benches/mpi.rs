//! `MpiPool` figures (cargo feature `mpi`): `cargo bench --features mpi --bench mpi`.
//!
//! Run by cargo, this program measures the local `Pool` references (W2,
//! W4 with 2 workers) and re-launches itself under `mpiexec.hydra` twice:
//! `-np 2` for raw rsmpi ping-pong (M0), `-np 3` with one worker per
//! worker rank for the pool (M2, M3, M4, and rank 0's CPU over a map of
//! sleeping tasks). Every line is `<id> <name> <key>=<median> reps= min= max=`.

#[path = "common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::emit;
use multiproc::mpi::MpiPool;
use multiproc::Pool;
use serde_bytes::ByteBuf;

const REPS: usize = 5;
const MIB: usize = 1 << 20;

fn main() {
    // `cargo bench` passes `--bench`; a filter would be the next argument.
    match std::env::var("MP_MPI_BENCH").as_deref() {
        Ok("pingpong") => return pingpong(),
        Ok("pool") => return pool(),
        _ => {}
    }
    let local = Pool::new(2).unwrap();
    local_w2(&local);
    local_w4(&local);
    local.terminate();
    drop(local);
    let exe = std::env::current_exe().unwrap();
    for (np, what) in [(2, "pingpong"), (3, "pool")] {
        let out = Command::new("timeout")
            .args(["-k", "5", "600", "mpiexec.hydra", "-np", &np.to_string()])
            .arg(&exe)
            .env("MP_MPI_BENCH", what)
            .output()
            .expect("mpiexec.hydra runs");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            panic!("mpiexec {what}: {:?}", out.status);
        }
    }
}

fn square(x: u64) -> u64 {
    x * x
}

fn ident(x: u64) -> u64 {
    x
}

fn length(b: ByteBuf) -> usize {
    b.len()
}

fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn local_w2(pool: &Pool) {
    let v = tiny_map_rates(|items| pool.map(square, items));
    emit("W2", "local_map_tiny_default_chunk", "tasks_per_s", &v, 0);
}

fn local_w4(pool: &Pool) {
    let v = apply_roundtrips_us(|i| pool.apply(ident, i));
    emit("W4", "local_apply_roundtrip", "us_per_call", &v, 1);
}

/// Tasks per second of `map(square)` over 1 M `u64`s, after a warm-up: W2
/// and M2.
fn tiny_map_rates(map: impl Fn(std::ops::Range<u64>) -> multiproc::Result<Vec<u64>>) -> Vec<f64> {
    map(0..1000).unwrap();
    let mut v = Vec::new();
    for _ in 0..REPS {
        let t0 = Instant::now();
        let r = map(0..1_000_000).unwrap();
        v.push(1e6 / t0.elapsed().as_secs_f64());
        assert_eq!(r[999_999], 999_999 * 999_999);
    }
    v
}

/// µs per round trip of `apply(ident, i)`, after 200 to warm up: W4 and M4.
fn apply_roundtrips_us(apply: impl Fn(u64) -> multiproc::Result<u64>) -> Vec<f64> {
    for i in 0..200 {
        apply(i).unwrap();
    }
    let mut v = Vec::new();
    for _ in 0..REPS {
        let t0 = Instant::now();
        for i in 0..2000 {
            assert_eq!(apply(i).unwrap(), i);
        }
        v.push(t0.elapsed().as_secs_f64() / 2000.0 * 1e6);
    }
    v
}

/// M0: 8 bytes there and back between ranks 0 and 1 with rsmpi's blocking
/// send and receive (the round trip, in µs).
fn pingpong() {
    use mpi::point_to_point::{Destination, Source};
    use mpi::topology::Communicator;
    const N: usize = 20_000;
    let universe = mpi::initialize().unwrap();
    let world = universe.world();
    let rank = world.rank();
    let mut buf = [0u8; 8];
    let mut v = Vec::new();
    for _ in 0..REPS {
        let t0 = Instant::now();
        for _ in 0..N {
            if rank == 0 {
                world.process_at_rank(1).send(&buf[..]);
                world.process_at_rank(1).receive_into(&mut buf[..]);
            } else {
                world.process_at_rank(0).receive_into(&mut buf[..]);
                world.process_at_rank(0).send(&buf[..]);
            }
        }
        v.push(t0.elapsed().as_secs_f64() / N as f64 * 1e6);
    }
    if rank == 0 {
        emit("M0", "mpi_raw_pingpong_us", "us_per_roundtrip", &v, 2);
    }
}

fn cpu_secs() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn pool() {
    let pool = MpiPool::builder().workers_per_rank(1).start().unwrap();
    // `MP_MPI_ONLY=M4` (say) runs one figure, with any number of ranks.
    let only = std::env::var("MP_MPI_ONLY").ok();
    let want = |id: &str| only.as_deref().is_none_or(|o| o == id);
    if only.is_none() {
        assert_eq!(pool.processes(), 2);
    }
    if want("M2") {
        m2(&pool);
    }
    if want("M3") {
        m3(&pool);
    }
    if want("M4") {
        m4(&pool);
    }
    if want("M5") {
        m5(&pool);
    }
    pool.close().unwrap();
}

fn m2(pool: &MpiPool) {
    // M2: 1 M tiny tasks, the default chunk size.
    let v = tiny_map_rates(|items| pool.map(square, items));
    emit("M2", "mpi_map_tiny_default_chunk", "tasks_per_s", &v, 0);
}

fn m3(pool: &MpiPool) {
    // M3: 256 distinct 1 MiB arguments.
    const N: usize = 256;
    let distinct: Vec<ByteBuf> = (0..N).map(|i| ByteBuf::from(vec![i as u8; MIB])).collect();
    pool.map(length, distinct[..8].to_vec()).unwrap();
    let mut v = Vec::new();
    for _ in 0..REPS {
        let input = distinct.clone();
        let t0 = Instant::now();
        let r = pool.map(length, input).unwrap();
        v.push((N * MIB) as f64 / 1e6 / t0.elapsed().as_secs_f64());
        assert!(r.iter().all(|&n| n == MIB));
    }
    emit("M3", "mpi_map_payload_args_distinct", "MB_per_s", &v, 1);
}

fn m4(pool: &MpiPool) {
    // M4: apply round trips.
    let v = apply_roundtrips_us(|i| pool.apply(ident, i));
    emit("M4", "mpi_apply_roundtrip", "us_per_call", &v, 1);
}

fn m5(pool: &MpiPool) {
    // Rank 0's CPU while the workers sleep: 2 workers × 20 tasks of 50 ms.
    let mut v = Vec::new();
    for _ in 0..3 {
        let (c0, t0) = (cpu_secs(), Instant::now());
        pool.map_chunked(sleep_ms, vec![50u64; 40], 1).unwrap();
        v.push((cpu_secs() - c0) / t0.elapsed().as_secs_f64() * 100.0);
    }
    emit("M5", "mpi_rank0_cpu_sleeping_map", "cpu_percent", &v, 2);
}
