//! The prime count of `parallel_map`, across the ranks of an MPI job: count
//! the primes below 6 million, in blocks, on an `MpiPool`.
//!
//! One block deliberately crashes its worker with SIGSEGV: the pool reports
//! that block as `Died` (naming the rank and the pid), the rank's local
//! pool replaces the worker, and the job finishes the rest.
//!
//! ```text
//! cargo build --release --features mpi --example mpi_map
//! mpiexec -n 4 target/release/examples/mpi_map
//! ```

use std::time::Instant;

use multiproc::mpi::MpiPool;
use multiproc::Error;

const BLOCK: u64 = 30_000;
const BLOCKS: u64 = 200;
/// The block whose task crashes its worker.
const CRASHING_BLOCK: u64 = 137;

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Counts the primes of block `b`: `(b, count)`.
fn count_block(b: u64) -> (u64, u64) {
    let count = (b * BLOCK..(b + 1) * BLOCK)
        .filter(|&n| is_prime(n))
        .count() as u64;
    (b, count)
}

/// Like `count_block`, but block `CRASHING_BLOCK` segfaults its worker.
fn count_block_or_crash(b: u64) -> (u64, u64) {
    if b == CRASHING_BLOCK {
        // The first SIGSEGV meets std's stack-overflow handler, which puts
        // the default action back; the second one kills the process.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
    }
    count_block(b)
}

fn main() -> Result<(), Error> {
    // Every rank starts here; only rank 0 comes back with the pool.
    let pool = MpiPool::start()?;
    println!(
        "{} ranks, {} worker processes on the worker ranks",
        pool.ranks(),
        pool.processes()
    );

    let t0 = Instant::now();
    let serial: u64 = (0..BLOCKS).map(|b| count_block(b).1).sum();
    let serial_time = t0.elapsed();
    println!(
        "serial:   {serial} primes below {} in {serial_time:.2?}",
        BLOCK * BLOCKS
    );

    let t0 = Instant::now();
    let mut total = 0;
    let mut failures = Vec::new();
    for r in pool.imap_unordered(count_block_or_crash, 0..BLOCKS) {
        match r {
            Ok((_, count)) => total += count,
            Err(e) => {
                println!("a block failed: {e}");
                failures.push(e);
            }
        }
    }
    let parallel_time = t0.elapsed();
    let lost = count_block(CRASHING_BLOCK).1;
    println!(
        "parallel: {total} primes in {parallel_time:.2?} (block {CRASHING_BLOCK} lost to the crash)"
    );
    assert_eq!(total + lost, serial, "every other block must be counted");
    assert!(matches!(
        failures.as_slice(),
        // `rank` names the worker rank; `None` when run as one rank,
        // whose local pool runs the tasks.
        [Error::Died { exitcode: -11, .. }]
    ));
    // A second map on the same pool works.
    let again: u64 = pool.map(count_block, 0..10)?.iter().map(|(_, c)| c).sum();
    println!("first 10 blocks again: {again} primes");
    println!(
        "speed-up: {:.2}x over the serial run",
        serial_time.as_secs_f64() / parallel_time.as_secs_f64()
    );
    pool.close()
}
