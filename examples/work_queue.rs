//! Producers and consumers over a `JoinableQueue`, one consumer SIGKILLed
//! midway, nothing lost.
//!
//! Two producer processes put tasks and exit at once (no feeder thread to
//! wait for); three consumer processes take them, report each result on a
//! second queue and mark the task done. Once the first batch is done,
//! consumer 0 is killed while it waits in `get`; a second batch goes to
//! the two survivors. Every task is done exactly once.
//!
//! Run with `cargo run --release --example work_queue`.

use std::process::ExitCode;
use std::time::Duration;

use multiproc::{JoinableQueue, Process, Queue, Result};

const PRODUCERS: u32 = 2;
const CONSUMERS: u32 = 3;
const PER_BATCH: u32 = 1000;
const LIMIT: Duration = Duration::from_secs(60);

/// A task: which batch and producer made it, and its number.
type Task = (u32, u32, u32);

/// What a consumer reports: its own number, the task's id, the result.
type Report = (u32, u32, u64);

fn work(id: u32) -> u64 {
    (0..200u64).fold(u64::from(id), |acc, i| acc.wrapping_mul(31).wrapping_add(i))
}

fn produce(tasks: &JoinableQueue<Option<Task>>, batch: u32) -> Result<()> {
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let tasks = tasks.clone();
        let mut producer = Process::new(move || {
            for n in 0..PER_BATCH / PRODUCERS {
                tasks.put(&Some((batch, p, n))).unwrap();
            }
        })
        .with_name(format!("producer-{batch}-{p}"));
        producer.start()?;
        producers.push(producer);
    }
    // The producers are done as soon as their tasks are in the queue.
    for producer in &producers {
        let code = producer.join_timeout(LIMIT)?;
        assert_eq!(code, Some(0), "{} failed", producer.name());
    }
    Ok(())
}

fn task_id((batch, p, n): Task) -> u32 {
    batch * PER_BATCH + p * (PER_BATCH / PRODUCERS) + n
}

fn main() -> Result<ExitCode> {
    let tasks = JoinableQueue::<Option<Task>>::new()?;
    let reports = Queue::<Report>::new()?;

    let mut consumers = Vec::new();
    for c in 0..CONSUMERS {
        let (tasks, reports) = (tasks.clone(), reports.clone());
        let mut consumer = Process::new(move || {
            while let Some(task) = tasks.get().unwrap() {
                let id = task_id(task);
                reports.put(&(c, id, work(id))).unwrap();
                tasks.task_done().unwrap();
            }
            tasks.task_done().unwrap();
        })
        .with_name(format!("consumer-{c}"))
        // Should this program fail half-way, its consumers die with it.
        .with_daemon(true);
        consumer.start()?;
        consumers.push(consumer);
    }

    produce(&tasks, 0)?;
    if !tasks.join_timeout(LIMIT)? {
        println!("work_queue: batch 0 did not finish");
        return Ok(ExitCode::FAILURE);
    }
    // Every task of batch 0 is done: consumer 0 is waiting in `get`. Kill it.
    consumers[0].kill()?;
    let killed = consumers[0].join_timeout(LIMIT)?;

    produce(&tasks, 1)?;
    if !tasks.join_timeout(LIMIT)? {
        println!("work_queue: batch 1 did not finish");
        return Ok(ExitCode::FAILURE);
    }
    for _ in 1..CONSUMERS {
        tasks.put(&None)?;
    }
    let mut survivors_ok = true;
    for consumer in &consumers[1..] {
        survivors_ok &= consumer.join_timeout(LIMIT)? == Some(0);
    }

    let total = 2 * PER_BATCH;
    let mut times_done = vec![0u32; total as usize];
    let mut per_consumer = [0u32; CONSUMERS as usize];
    let mut wrong = 0;
    while let Some((c, id, result)) = reports.try_get()? {
        times_done[id as usize] += 1;
        per_consumer[c as usize] += 1;
        wrong += u32::from(result != work(id));
    }
    let done = times_done.iter().filter(|&&n| n > 0).count();
    let lost = times_done.iter().filter(|&&n| n == 0).count();
    let twice = times_done.iter().filter(|&&n| n > 1).count();
    println!(
        "work_queue: {total} tasks, {PRODUCERS} producers, {CONSUMERS} consumers \
         (consumer-0 killed midway, exit code {}); per consumer {per_consumer:?}; \
         {done} done, {lost} lost, {twice} twice, {wrong} wrong",
        killed.map_or("none".to_string(), |c| c.to_string()),
    );
    Ok(
        if lost == 0 && twice == 0 && wrong == 0 && killed == Some(-9) && survivors_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}
