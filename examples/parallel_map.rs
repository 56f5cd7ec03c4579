//! A parallel map over real work: count the primes below 6 million, in
//! blocks, on a `Pool` with one worker per CPU, with a progress bar.
//!
//! One block deliberately crashes its worker with SIGSEGV: the pool reports
//! that block as `Died`, replaces the worker, and finishes the rest.
//!
//! ```text
//! cargo run --release --example parallel_map
//! ```

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use multiproc::{Error, Pool};

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

/// Like `count_block`, but block `CRASHING_BLOCK` segfaults its worker,
/// the way a buggy C library would.
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
    let t0 = Instant::now();
    let serial: Vec<(u64, u64)> = (0..BLOCKS).map(count_block).collect();
    let serial_time = t0.elapsed();
    let serial_total: u64 = serial.iter().map(|(_, c)| c).sum();
    println!(
        "serial:   {serial_total} primes below {} in {serial_time:.2?}",
        BLOCK * BLOCKS
    );

    let pool = Pool::new(0)?;
    let bar = ProgressBar::new(BLOCKS).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} blocks {elapsed_precise} {msg}")
            .expect("a valid template"),
    );
    let t0 = Instant::now();
    let mut total = 0;
    let mut done = vec![false; BLOCKS as usize];
    let mut failures = Vec::new();
    for r in pool.imap_unordered(count_block_or_crash, 0..BLOCKS) {
        match r {
            Ok((b, count)) => {
                total += count;
                done[b as usize] = true;
            }
            Err(e) => {
                bar.suspend(|| println!("a block failed: {e}"));
                failures.push(e);
            }
        }
        bar.inc(1);
    }
    let parallel_time = t0.elapsed();
    bar.finish_with_message("done");

    let missing: Vec<u64> = (0..BLOCKS).filter(|&b| !done[b as usize]).collect();
    let expected: u64 = serial
        .iter()
        .filter(|(b, _)| !missing.contains(b))
        .map(|(_, c)| c)
        .sum();
    println!(
        "parallel: {total} primes in {parallel_time:.2?} on {} workers (block(s) {missing:?} lost to the crash)",
        pool.processes()
    );
    assert_eq!(total, expected, "every other block must be counted");
    assert!(matches!(
        failures.as_slice(),
        [Error::Died { exitcode: -11, .. }]
    ));
    println!(
        "speed-up: {:.2}x over the serial run",
        serial_time.as_secs_f64() / parallel_time.as_secs_f64()
    );
    pool.close();
    pool.join()
}
