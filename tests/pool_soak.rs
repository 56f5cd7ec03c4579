//! Soak test of the pool: random tasks, 1% of them panicking and 0.5%
//! SIGKILLing their own worker. Every result must be the right value or the
//! right error for that item, nothing may hang, and the fd count and the
//! number of live workers must be the same at the end as at the start.
//!
//! Runs for 3 seconds by default; the acceptance run is 30 seconds:
//!
//! ```text
//! MULTIPROC_SOAK_SECS=30 cargo test --release --test pool_soak -- --nocapture
//! ```
//!
//! This binary holds a single test, so nothing else opens fds or forks
//! while it counts them.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{children_of_self, fd_count, within};
use multiproc::{Error, Pool};

const WORKERS: usize = 3;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Value,
    Panic,
    Kill,
}

fn kind(seed: u64) -> Kind {
    match splitmix(seed) % 1000 {
        0..=9 => Kind::Panic,
        10..=14 => Kind::Kill,
        _ => Kind::Value,
    }
}

/// The value a healthy task returns.
fn value(seed: u64) -> u64 {
    let r = splitmix(seed);
    let mut acc = r;
    for i in 0..(r % 500) {
        acc = splitmix(acc ^ i);
    }
    acc
}

fn task(seed: u64) -> u64 {
    match kind(seed) {
        Kind::Panic => panic!("soak panic {seed}"),
        Kind::Kill => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            unreachable!("SIGKILL returned")
        }
        Kind::Value => {
            if splitmix(seed).is_multiple_of(100) {
                std::thread::sleep(Duration::from_micros(splitmix(seed) % 2000));
            }
            value(seed)
        }
    }
}

/// Checks one result against what the item should give.
fn check(seed: u64, r: &Result<u64, Error>, seen: &mut HashMap<Kind, usize>) {
    let k = kind(seed);
    *seen.entry(k).or_default() += 1;
    match (k, r) {
        (Kind::Value, Ok(v)) => assert_eq!(*v, value(seed), "seed {seed}"),
        (Kind::Panic, Err(Error::Panicked { message, .. })) => {
            assert_eq!(message, &format!("soak panic {seed}"))
        }
        (Kind::Kill, Err(Error::Died { exitcode: -9, .. })) => {}
        (k, r) => panic!("seed {seed} ({k:?}): unexpected {r:?}"),
    }
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn ident(x: u64) -> u64 {
    x
}

#[test]
fn soak() {
    let secs: u64 = std::env::var("MULTIPROC_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    within(secs + 240, move || run(secs));
}

fn run(secs: u64) {
    let pool = Pool::new(WORKERS).unwrap();
    // Warm up, then take the reference counts.
    assert_eq!(pool.map(ident, 0..100u64).unwrap().len(), 100);
    let fds_before = fd_count();
    let (live_before, zombies_before) = children_of_self();
    assert_eq!((live_before, zombies_before), (WORKERS, 0));

    // imap keeps memory flat on a long input.
    let n: u64 = if secs >= 30 { 10_000_000 } else { 1_000_000 };
    let mut rss_mid = 0;
    let mut count = 0u64;
    for (i, r) in pool.imap(ident, 0..n).enumerate() {
        assert_eq!(r.unwrap(), i as u64);
        count += 1;
        if count == n / 10 {
            rss_mid = vm_rss_kib();
        }
    }
    assert_eq!(count, n);
    let rss_end = vm_rss_kib();
    assert!(
        rss_end < rss_mid + 32 * 1024,
        "imap memory grew from {rss_mid} KiB to {rss_end} KiB"
    );

    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut seen: HashMap<Kind, usize> = HashMap::new();
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        let base = splitmix(round) >> 16;
        let len = 100 + splitmix(round ^ 1) % 1500;
        let seeds: Vec<u64> = (base..base + len).collect();
        match round % 4 {
            0 => {
                for (s, r) in seeds.iter().zip(pool.imap(task, seeds.clone())) {
                    check(*s, &r, &mut seen);
                }
            }
            1 => {
                let cs = 1 + (splitmix(round) % 64) as usize;
                for (s, r) in seeds.iter().zip(pool.imap_chunked(task, seeds.clone(), cs)) {
                    check(*s, &r, &mut seen);
                }
            }
            2 => {
                // Completion order: match values back by multiset.
                let mut errors = 0;
                let mut values = Vec::new();
                for r in pool.imap_unordered(task, seeds.clone()) {
                    match r {
                        Ok(v) => values.push(v),
                        Err(Error::Panicked { .. }) | Err(Error::Died { exitcode: -9, .. }) => {
                            errors += 1
                        }
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
                let mut want: Vec<u64> = seeds
                    .iter()
                    .filter(|s| kind(**s) == Kind::Value)
                    .map(|s| value(*s))
                    .collect();
                values.sort_unstable();
                want.sort_unstable();
                assert_eq!(values, want);
                assert_eq!(errors, seeds.len() - want.len());
            }
            _ => {
                // map: all values, or the error of one faulty item.
                let faulty = seeds.iter().any(|s| kind(*s) != Kind::Value);
                match pool.map(task, seeds.clone()) {
                    Ok(v) => {
                        assert!(!faulty);
                        for (s, v) in seeds.iter().zip(v) {
                            assert_eq!(v, value(*s));
                        }
                    }
                    Err(Error::Panicked { .. }) | Err(Error::Died { exitcode: -9, .. }) => {
                        assert!(faulty)
                    }
                    Err(e) => panic!("unexpected {e:?}"),
                }
                let a = pool.apply_async(task, base);
                check(base, &a.get(), &mut seen);
            }
        }
    }
    println!("soak: {round} rounds, {secs} s, results checked: {seen:?}");
    assert!(seen.get(&Kind::Kill).copied().unwrap_or(0) > 0 || secs < 3);

    // The same fds and live workers as at the start, no zombie (a worker
    // replaced just now may still be on its way: allow a moment).
    let settle = Instant::now() + Duration::from_secs(10);
    loop {
        let now = (fd_count(), children_of_self());
        if now == (fds_before, (WORKERS, 0)) {
            break;
        }
        assert!(
            Instant::now() < settle,
            "fds {} -> {}, children {:?} -> {:?}",
            fds_before,
            now.0,
            (live_before, zombies_before),
            now.1
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pool.close();
    pool.join().unwrap();
    assert_eq!(children_of_self(), (0, 0));
}
