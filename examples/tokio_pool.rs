//! A multi-threaded tokio program that sends CPU-bound and crash-prone work
//! to a pool whose workers the fork server forks.
//!
//! `forkserver::start()` runs first, before the runtime starts its threads
//! (so not under `#[tokio::main]`, whose runtime exists before the body
//! runs). From then on the program may have as many threads as it likes:
//! the workers are forked from the clean, single-threaded server, never
//! from this process, so no lock a runtime thread holds can be inherited.
//! The blocking pool calls go to `spawn_blocking`, so the runtime's worker
//! threads keep serving other tasks (the ticker below keeps ticking).
//!
//! `cargo run --example tokio_pool`

use std::sync::Arc;
use std::time::{Duration, Instant};

use multiproc::{forkserver, Pool, StartMethod};

/// CPU-bound: the steps of the Collatz sequence from `n` to 1.
fn collatz_steps(n: u64) -> u64 {
    let (mut n, mut steps) = (n, 0);
    while n != 1 {
        n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
        steps += 1;
    }
    steps
}

/// Crash-prone: stands for a parser in a C library that aborts on bad
/// input. In a thread it would take the whole server down; in a pool
/// worker it fails one item.
fn parse_untrusted(input: String) -> usize {
    if input.contains("crash") {
        std::process::abort();
    }
    input.split_whitespace().count()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First, while the program has one thread.
    forkserver::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    runtime.block_on(serve())
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let pool = Arc::new(
        Pool::builder()
            .processes(2)
            .start_method(StartMethod::ForkServer)
            .task_timeout(Duration::from_secs(10))
            .build()?,
    );

    // The runtime stays responsive while the pool works.
    let ticker = tokio::spawn(async {
        let mut ticks = 0u32;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ticks += 1;
        }
        ticks
    });

    // CPU-bound work, off the runtime's threads.
    let p = Arc::clone(&pool);
    let steps = tokio::task::spawn_blocking(move || p.map(collatz_steps, 1..=200_000u64)).await??;
    let (at, most) = steps
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| **s)
        .map(|(i, s)| (i + 1, *s))
        .unwrap_or_default();
    println!("longest Collatz chain below 200000: {at} ({most} steps)");

    // Crash-prone requests, concurrently: one of them kills its worker.
    let requests = ["hello world", "crash this parser", "one two three", "fine"];
    let handles: Vec<_> = requests
        .iter()
        .map(|input| {
            let p = Arc::clone(&pool);
            let input = input.to_string();
            tokio::spawn(async move {
                let shown = input.clone();
                let r = tokio::task::spawn_blocking(move || p.apply(parse_untrusted, input)).await;
                (shown, r)
            })
        })
        .collect();
    for h in handles {
        let (input, r) = h.await?;
        match r? {
            Ok(words) => println!("{input:?}: {words} words"),
            Err(e) if e.is_died() => {
                println!("{input:?}: the parser crashed ({e}); the pool lives on")
            }
            Err(e) => return Err(e.into()),
        }
    }

    println!("the runtime ticked {} times meanwhile", ticker.await?);
    let p = Arc::clone(&pool);
    assert_eq!(
        tokio::task::spawn_blocking(move || p.apply(collatz_steps, 27)).await??,
        111
    );
    Ok(())
}
