//! `Queue` and `JoinableQueue` between processes: order, exactly-once
//! delivery, producers and consumers killed at the worst moments, sizes,
//! bounds, timeouts, task accounting.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{exit_code, start, DEADLINE};
use multiproc::{pipe, spawn, JoinableQueue, Queue};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

const MIB: usize = 1 << 20;

/// A cheap pseudo-random sequence (xorshift), seeded from the clock.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng(t ^ 0x9E37_79B9_7F4A_7C15 ^ (u64::from(std::process::id()) << 32))
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn one_producer_one_consumer_in_order() {
    const N: u64 = 20_000;
    let q = Queue::<(u64, String)>::new().unwrap();
    let tx = q.clone();
    let producer = start(move || {
        for i in 0..N {
            tx.put(&(i, format!("message {i}"))).unwrap();
        }
    });
    let rx = q.clone();
    // The consumer's verdict is its exit code: 0 if every message came
    // whole and in order.
    let consumer = start(move || {
        for i in 0..N {
            let (n, text) = rx.get_timeout(DEADLINE).unwrap().expect("no message");
            if n != i || text != format!("message {i}") {
                multiproc::exit(1);
            }
        }
        if rx.try_get().unwrap().is_some() {
            multiproc::exit(2);
        }
    });
    assert_eq!(exit_code(&producer), 0);
    assert_eq!(exit_code(&consumer), 0);
    assert!(q.is_empty());
}

#[test]
fn four_producers_four_consumers_exactly_once() {
    const P: u32 = 4;
    const PER: u32 = 25_000;
    let q = Queue::<Option<(u32, u32)>>::new().unwrap();
    // Each consumer returns what it got and whether each producer's
    // messages came to it in order.
    let mut consumers: Vec<_> = (0..4)
        .map(|_| {
            let q = q.clone();
            spawn(move || {
                let mut got = Vec::new();
                let mut last = [None::<u32>; P as usize];
                let mut in_order = true;
                while let Some((p, seq)) = q.get_timeout(DEADLINE).unwrap().expect("starved") {
                    let prev = &mut last[p as usize];
                    in_order &= prev.is_none_or(|l| l < seq);
                    *prev = Some(seq);
                    got.push(p * PER + seq);
                }
                (got, in_order)
            })
            .unwrap()
        })
        .collect();
    let producers: Vec<_> = (0..P)
        .map(|p| {
            let q = q.clone();
            start(move || {
                for seq in 0..PER {
                    q.put(&Some((p, seq))).unwrap();
                }
            })
        })
        .collect();
    for p in &producers {
        assert_eq!(exit_code(p), 0);
    }
    for _ in 0..4 {
        q.put(&None).unwrap();
    }
    let mut seen = vec![0u8; (P * PER) as usize];
    for c in &mut consumers {
        let (got, in_order) = c
            .join_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("consumer did not finish");
        assert!(in_order, "a producer's messages came out of order");
        for id in got {
            seen[id as usize] += 1;
        }
    }
    let wrong: Vec<_> = seen.iter().enumerate().filter(|(_, &n)| n != 1).collect();
    assert!(
        wrong.is_empty(),
        "not delivered exactly once: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    assert!(q.is_empty());
}

#[derive(Serialize, Deserialize)]
struct Big {
    seq: u64,
    data: ByteBuf,
}

impl Big {
    fn new(seq: u64, len: usize) -> Big {
        Big {
            seq,
            data: ByteBuf::from(vec![(seq % 251) as u8; len]),
        }
    }
    fn is_whole(&self, len: usize) -> bool {
        self.data.len() == len && self.data.iter().all(|&b| b == (self.seq % 251) as u8)
    }
}

#[test]
fn producer_killed_mid_put_corrupts_nothing() {
    const LEN: usize = 8 * MIB;
    let q = Queue::<Big>::bounded(3).unwrap();
    let mut rng = Rng::new();
    let mut received = 0;
    for round in 0..6u64 {
        let tx = q.clone();
        let producer = start(move || {
            for i in 0.. {
                tx.put(&Big::new(round * 1_000_000 + i, LEN)).unwrap();
            }
        });
        // Take a few, then kill it at a random moment: right after a get
        // freed a slot, it is most likely copying a message in.
        let mut last = None;
        for _ in 0..2 + rng.below(3) {
            let m = q.get_timeout(DEADLINE).unwrap().expect("producer stalled");
            assert!(m.is_whole(LEN), "message {} torn", m.seq);
            assert!(last.is_none_or(|l| l < m.seq));
            last = Some(m.seq);
            received += 1;
        }
        std::thread::sleep(Duration::from_micros(rng.below(4000)));
        producer.kill().unwrap();
        assert_eq!(exit_code(&producer), -9);
        // Whatever it left is whole, in order, and takes no waiting.
        while let Some(m) = q.try_get().unwrap() {
            assert!(m.is_whole(LEN), "message {} torn", m.seq);
            assert!(last.is_none_or(|l| l < m.seq));
            last = Some(m.seq);
            received += 1;
        }
    }
    assert!(received >= 12);
    // The queue still works, for puts and gets.
    q.put(&Big::new(7, 10)).unwrap();
    assert!(q.get_timeout(DEADLINE).unwrap().unwrap().is_whole(10));
    assert!(q.is_empty());
}

#[test]
fn consumer_killed_mid_get_leaves_the_rest_whole() {
    // A consumer of big messages killed at a random moment, maybe in the
    // middle of copying one out: every message is then either reported by
    // it, or still in the queue, whole, except at most the one it had taken
    // and not yet reported.
    const LEN: usize = 8 * MIB;
    const N: u64 = 12;
    let mut rng = Rng::new();
    for _round in 0..3 {
        let q = Queue::<Big>::new().unwrap();
        for seq in 0..N {
            q.put(&Big::new(seq, LEN)).unwrap();
        }
        let (mut tx, mut rx) = pipe().unwrap();
        let cq = q.clone();
        let consumer = start(move || {
            tx.send(&u64::MAX).unwrap();
            while let Some(m) = cq.try_get().unwrap() {
                tx.send(&if m.is_whole(LEN) { m.seq } else { u64::MAX - 1 })
                    .unwrap();
            }
        });
        assert_eq!(rx.recv_timeout::<u64>(DEADLINE).unwrap(), Some(u64::MAX));
        std::thread::sleep(Duration::from_micros(rng.below(100_000)));
        consumer.kill().unwrap();
        exit_code(&consumer);
        let mut seen = vec![0u32; N as usize];
        // Its reports, up to the end of the pipe (it is dead).
        loop {
            let seq = match rx.recv_timeout::<u64>(DEADLINE) {
                Ok(Some(seq)) => seq,
                Err(e) if e.is_disconnected() => break,
                other => panic!("unexpected {other:?}"),
            };
            assert_ne!(seq, u64::MAX - 1, "the consumer got a torn message");
            seen[seq as usize] += 1;
        }
        while let Some(m) = q.get_timeout(Duration::from_secs(5)).unwrap() {
            assert!(m.is_whole(LEN), "message {} torn", m.seq);
            seen[m.seq as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n <= 1), "delivered twice: {seen:?}");
        assert!(
            seen.iter().filter(|&&n| n == 0).count() <= 1,
            "lost more than the one in hand: {seen:?}"
        );
        // The killed consumer's lock is taken over: the queue goes on.
        q.put(&Big::new(1, 1)).unwrap();
        assert!(q.try_get().unwrap().unwrap().is_whole(1));
    }
}

/// Waits until `pid` sleeps (state `S`): a consumer in `get` on an empty
/// queue sleeps on a futex.
fn wait_until_sleeping(pid: u32) {
    assert!(
        common::eventually(DEADLINE, || common::stat_fields(pid)
            .is_some_and(|f| f[0] == "S")),
        "child never went to sleep"
    );
}

#[test]
fn consumer_killed_while_waiting_loses_nothing() {
    let q = Queue::<u32>::new().unwrap();
    let mut victims = Vec::new();
    for _ in 0..3 {
        let (mut ready_tx, mut ready_rx) = pipe().unwrap();
        let rx = q.clone();
        let p = start(move || {
            ready_tx.send(&()).unwrap();
            // Got a message: that would be a loss; say so in the exit code.
            if rx.get().is_ok() {
                multiproc::exit(3);
            }
        });
        ready_rx
            .recv_timeout::<()>(DEADLINE)
            .unwrap()
            .expect("child never got ready");
        victims.push(p);
    }
    for p in &victims {
        wait_until_sleeping(p.pid().unwrap());
        p.kill().unwrap();
        assert_eq!(exit_code(p), -9);
    }
    for i in 0..10 {
        q.put(&i).unwrap();
    }
    for i in 0..10 {
        assert_eq!(q.get_timeout(DEADLINE).unwrap(), Some(i));
    }
    // A live consumer still gets woken by a put from another process.
    let (mut ready_tx, mut ready_rx) = pipe().unwrap();
    let rx = q.clone();
    let consumer = start(move || {
        ready_tx.send(&()).unwrap();
        let v = rx.get_timeout(DEADLINE).unwrap();
        multiproc::exit(if v == Some(99) { 0 } else { 1 });
    });
    ready_rx.recv_timeout::<()>(DEADLINE).unwrap().unwrap();
    wait_until_sleeping(consumer.pid().unwrap());
    let tx = q.clone();
    let producer = start(move || tx.put(&99).unwrap());
    assert_eq!(exit_code(&producer), 0);
    assert_eq!(exit_code(&consumer), 0);
}

#[test]
fn a_producer_that_exits_right_after_put_is_delivered() {
    let q = Queue::<String>::new().unwrap();
    let tx = q.clone();
    let producer = start(move || tx.put(&"last words".to_string()).unwrap());
    // Joined before anyone reads: the message is already in the queue.
    assert_eq!(exit_code(&producer), 0);
    assert_eq!(q.try_get().unwrap().as_deref(), Some("last words"));

    let tx = q.clone();
    let producer = start(move || {
        tx.put(&"killed right after".to_string()).unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
    });
    assert_eq!(exit_code(&producer), -9);
    assert_eq!(q.try_get().unwrap().as_deref(), Some("killed right after"));
}

#[test]
fn joining_a_producer_never_waits_for_a_consumer() {
    // 64 MiB with no consumer at all: Python's feeder thread would make
    // this join wait for a reader; here the producer exits at once.
    let q = Queue::<ByteBuf>::new().unwrap();
    let tx = q.clone();
    let producer = start(move || {
        for i in 0..256u32 {
            tx.put(&ByteBuf::from(vec![i as u8; 256 * 1024])).unwrap();
        }
    });
    assert_eq!(exit_code(&producer), 0);
    assert_eq!(q.len(), 256);
    for i in 0..256u32 {
        let b = q.try_get().unwrap().expect("message missing");
        assert!(b.len() == 256 * 1024 && b.iter().all(|&x| x == i as u8));
    }
    assert!(q.is_empty());
}

#[test]
fn messages_of_0_bytes_1_mib_and_64_mib() {
    let units = Queue::<()>::new().unwrap();
    let tx = units.clone();
    let p = start(move || {
        for _ in 0..1000 {
            tx.put(&()).unwrap();
        }
    });
    assert_eq!(exit_code(&p), 0);
    assert_eq!(units.len(), 1000);
    for _ in 0..1000 {
        units.try_get().unwrap().expect("unit missing");
    }
    assert_eq!(units.try_get().unwrap(), None);

    let q = Queue::<Big>::new().unwrap();
    let tx = q.clone();
    let p = start(move || {
        for (seq, len) in [(1, MIB), (2, 64 * MIB), (3, MIB), (4, 0)] {
            tx.put(&Big::new(seq, len)).unwrap();
        }
    });
    for (seq, len) in [(1, MIB), (2, 64 * MIB), (3, MIB), (4, 0)] {
        let m = q.get_timeout(DEADLINE).unwrap().expect("message missing");
        assert_eq!(m.seq, seq);
        assert!(m.is_whole(len), "message {seq} not whole");
    }
    assert_eq!(exit_code(&p), 0);
    // The emptied big ring shrank and still works.
    q.put(&Big::new(5, 100)).unwrap();
    assert!(q.get().unwrap().is_whole(100));
}

#[test]
fn bounded_blocks_while_full_and_unblocks_on_get() {
    let q = Queue::<u32>::bounded(2).unwrap();
    assert_eq!(q.maxsize(), Some(2));
    q.put(&1).unwrap();
    q.put(&2).unwrap();
    assert!(!q.put_timeout(&3, Duration::from_millis(50)).unwrap());
    assert!(!q.try_put(&3).unwrap());
    assert_eq!(q.len(), 2);
    // A child blocks in put until the parent takes one.
    let (mut ready_tx, mut ready_rx) = pipe().unwrap();
    let tx = q.clone();
    let producer = start(move || {
        ready_tx.send(&()).unwrap();
        tx.put(&3).unwrap();
    });
    ready_rx.recv_timeout::<()>(DEADLINE).unwrap().unwrap();
    wait_until_sleeping(producer.pid().unwrap());
    assert!(producer.is_alive(), "put returned on a full queue");
    assert_eq!(q.get().unwrap(), 1);
    assert_eq!(exit_code(&producer), 0);
    assert_eq!(q.get().unwrap(), 2);
    assert_eq!(q.get().unwrap(), 3);
    assert!(q.put_timeout(&4, Duration::from_millis(50)).unwrap());
}

#[test]
fn timeouts_try_get_len_and_is_empty() {
    let q = Queue::<u8>::new().unwrap();
    assert!(q.is_empty());
    assert_eq!(q.len(), 0);
    let t0 = Instant::now();
    assert_eq!(q.get_timeout(Duration::from_millis(30)).unwrap(), None);
    assert!(t0.elapsed() >= Duration::from_millis(30));
    assert_eq!(q.try_get().unwrap(), None);
    q.put(&1).unwrap();
    q.put(&2).unwrap();
    assert_eq!(q.len(), 2);
    assert!(!q.is_empty());
    assert_eq!(q.try_get().unwrap(), Some(1));
    assert_eq!(q.get_timeout(Duration::ZERO).unwrap(), Some(2));
    assert!(q.is_empty());
    // A get waiting in a child is served by the parent's put.
    let rx = q.clone();
    let consumer = start(move || {
        let v = rx.get_timeout(DEADLINE).unwrap();
        multiproc::exit(i32::from(v.unwrap_or(0)));
    });
    q.put(&42).unwrap();
    assert_eq!(exit_code(&consumer), 42);
    assert!(format!("{q:?}").contains("Queue"));
}

#[test]
fn joinable_queue_across_processes() {
    const N: u32 = 300;
    let q = JoinableQueue::<Option<u32>>::new().unwrap();
    assert!(q.join_timeout(Duration::ZERO).unwrap());
    for i in 0..N {
        q.put(&Some(i)).unwrap();
    }
    assert_eq!(q.unfinished(), N as usize);
    assert!(!q.join_timeout(Duration::from_millis(20)).unwrap());
    let done = Queue::<u32>::new().unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (q, done) = (q.clone(), done.clone());
            start(move || {
                while let Some(i) = q.get_timeout(DEADLINE).unwrap().flatten() {
                    done.put(&i).unwrap();
                    q.task_done().unwrap();
                }
                q.task_done().unwrap(); // the `None`
            })
        })
        .collect();
    // join returns once every task is done, before the workers stop.
    assert!(q.join_timeout(DEADLINE).unwrap());
    assert_eq!(q.unfinished(), 0);
    assert_eq!(done.len(), N as usize);
    q.put(&None).unwrap();
    q.put(&None).unwrap();
    for w in &workers {
        assert_eq!(exit_code(w), 0);
    }
    q.join().unwrap();
    let mut got: Vec<u32> = (0..N).map(|_| done.try_get().unwrap().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    // One task_done too many is an error, and changes nothing.
    let e = q.task_done().unwrap_err();
    assert_eq!(
        std::io::Error::from(e).kind(),
        std::io::ErrorKind::InvalidInput
    );
    assert!(q.join_timeout(Duration::ZERO).unwrap());
}

#[test]
fn join_in_a_child_waits_for_the_parent_s_task_done() {
    let q = JoinableQueue::<u8>::new().unwrap();
    q.put(&1).unwrap();
    let (mut ready_tx, mut ready_rx) = pipe().unwrap();
    let jq = q.clone();
    let joiner = start(move || {
        ready_tx.send(&()).unwrap();
        let ok = jq.join_timeout(DEADLINE).unwrap();
        multiproc::exit(if ok { 0 } else { 1 });
    });
    ready_rx.recv_timeout::<()>(DEADLINE).unwrap().unwrap();
    wait_until_sleeping(joiner.pid().unwrap());
    assert_eq!(q.get().unwrap(), 1);
    q.task_done().unwrap();
    assert_eq!(exit_code(&joiner), 0);
}

#[test]
fn a_tight_address_space_limit_gets_a_smaller_queue() {
    // In a child: address space for what it has plus 1.5 GiB, so the 8, 4 and
    // 2 GiB reserves are refused and the queue falls back to 256 MiB.
    let p = start(|| {
        use nix::sys::resource::{setrlimit, Resource};
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        let limit = vm_kib * 1024 + (3 << 29);
        setrlimit(Resource::RLIMIT_AS, limit, limit).unwrap();
        let q = Queue::<ByteBuf>::new().unwrap();
        q.put(&ByteBuf::from(vec![7u8; 1000])).unwrap();
        let ok = q.get().unwrap().iter().all(|&b| b == 7);
        // More than the small reserve holds: refused, not a crash.
        let big = ByteBuf::from(vec![0u8; 300 * MIB]);
        let refused = matches!(q.put(&big), Err(multiproc::Error::Codec(_)));
        multiproc::exit(if ok && refused { 0 } else { 1 });
    });
    assert_eq!(exit_code(&p), 0);
}

/// A queue that pool tasks (plain `fn`s) reach through a static, set
/// before the pool forks its workers.
static RESULTS: std::sync::OnceLock<Queue<u64>> = std::sync::OnceLock::new();

fn square_into_queue(x: u64) -> u64 {
    RESULTS.get().unwrap().put(&(x * x)).unwrap();
    x
}

#[test]
fn pool_workers_put_through_a_static_queue() {
    RESULTS.set(Queue::new().unwrap()).unwrap();
    let pool = multiproc::Pool::new(2).unwrap();
    let echoed = pool.map(square_into_queue, 0..100u64).unwrap();
    assert_eq!(echoed, (0..100).collect::<Vec<_>>());
    let q = RESULTS.get().unwrap();
    let mut got: Vec<u64> = (0..100).map(|_| q.try_get().unwrap().unwrap()).collect();
    got.sort_unstable();
    assert_eq!(got, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
    assert!(q.is_empty());
}

#[test]
fn work_queue_example_loses_nothing() {
    let bin = common::example_binary("work_queue");
    let mut child = common::ReapedChild(
        std::process::Command::new(bin)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let status = common::wait_child(&mut child.0, Duration::from_secs(120))
        .expect("example ran past its deadline");
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "example failed: {out}");
    let counts: HashMap<&str, &str> = out
        .split([',', ';', ':'])
        .filter_map(|part| {
            let mut w = part.split_whitespace();
            let n = w.next()?;
            Some((w.next()?, n))
        })
        .collect();
    assert_eq!(counts.get("lost"), Some(&"0"), "{out}");
    assert_eq!(counts.get("twice"), Some(&"0"), "{out}");
}
