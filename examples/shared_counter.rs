//! Shared state across processes: a counter (`Value<u64>`), a histogram
//! (`Array<u64>`) and a `Barrier`, updated in place by four worker
//! processes; one of them is SIGKILLed while it holds the histogram's lock,
//! and the next locker takes the lock over at once (`owner_died()`), where
//! Python's `multiprocessing.Lock` would stay locked forever.
//!
//! ```text
//! cargo run --release --example shared_counter
//! ```

use std::time::Duration;

use multiproc::{Array, Barrier, Event, Process, Value};

const WORKERS: usize = 4;
const ROUNDS: u64 = 10_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counter = Value::new(0u64)?;
    let histogram = Array::<u64>::new(WORKERS)?;
    let start = Barrier::new(WORKERS)?;
    let holding = Event::new()?;

    let mut workers = Vec::new();
    for id in 0..WORKERS {
        let (counter, histogram, start) = (counter.clone(), histogram.clone(), start.clone());
        let mut p = Process::new(move || {
            // Everyone starts at once: distinct arrival indices 0..WORKERS.
            let arrival = start.wait().expect("barrier");
            for _ in 0..ROUNDS {
                counter.update(|c| *c += 1);
            }
            let mut h = histogram.lock().expect("lock");
            h[id] = ROUNDS + arrival as u64;
        });
        p.start()?;
        workers.push(p);
    }
    for p in &workers {
        assert_eq!(p.join()?, 0);
    }
    println!(
        "counter = {} (expected {})",
        counter.get(),
        WORKERS as u64 * ROUNDS
    );

    // A process dies holding the histogram's lock.
    let (victim_hist, victim_holding) = (histogram.clone(), holding.clone());
    let mut victim = Process::new(move || {
        let mut h = victim_hist.lock().expect("lock");
        h[0] = 0;
        victim_holding.set();
        std::thread::sleep(Duration::from_secs(60));
    });
    victim.start()?;
    holding.wait(Some(Duration::from_secs(10)))?;
    victim.kill()?;
    println!("victim exit code: {}", victim.join()?);
    let guard = histogram
        .lock_timeout(Duration::from_secs(5))?
        .expect("the lock is handed over, not lost");
    println!(
        "taken over at once: owner_died = {}, histogram = {:?}",
        guard.owner_died(),
        &*guard
    );
    Ok(())
}
