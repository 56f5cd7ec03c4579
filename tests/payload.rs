//! Large arguments and results of the pool, which travel through shared
//! memory: exact round trips from 1 MiB to 256 MiB, a worker killed in the
//! middle of writing a large result, and flat fds and mappings across 1000
//! worker replacements.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{run_ignored, within};
use multiproc::{Error, Pool};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

const MIB: usize = 1 << 20;

/// `len` bytes that depend on `seed` and on their position: a pseudo-random
/// block of 4 KiB, repeated, each copy stamped with its index (cheap in a
/// debug build, and a shifted or stale block still shows).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let block: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut out = Vec::with_capacity(len);
    let mut i = 0u64;
    while out.len() < len {
        let n = (len - out.len()).min(4096);
        let at = out.len();
        out.extend_from_slice(&block[..n]);
        let stamp = (i ^ seed).to_le_bytes();
        let k = n.min(8);
        out[at..at + k].copy_from_slice(&stamp[..k]);
        i += 1;
    }
    out
}

/// A position-dependent checksum over 8-byte words (and the tail).
fn digest(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ b.len() as u64;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0100_0000_01b3);
        h = h.rotate_left(5);
    }
    for &x in words.remainder() {
        h = (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn digest_of(b: ByteBuf) -> (usize, u64) {
    (b.len(), digest(&b))
}

/// `(seed, len)` → the pattern.
fn make(spec: (u64, usize)) -> ByteBuf {
    ByteBuf::from(pattern(spec.0, spec.1))
}

/// Echoes its argument back: a large item in, the same large result out.
fn echo(b: ByteBuf) -> ByteBuf {
    b
}

fn round_trip(sizes: &[usize], every_front: bool) {
    let pool = Pool::new(2).unwrap();
    let items: Vec<ByteBuf> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| ByteBuf::from(pattern(i as u64 + 1, n)))
        .collect();
    let want: Vec<(usize, u64)> = items.iter().map(|b| (b.len(), digest(b))).collect();
    // Arguments.
    assert_eq!(pool.map(digest_of, items.clone()).unwrap(), want);
    // Results.
    let specs: Vec<(u64, usize)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (i as u64 + 1, n))
        .collect();
    let got = pool.map(make, specs).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((g.len(), digest(g)), *w);
    }
    drop(got);
    let back = pool.map(echo, items.clone()).unwrap();
    assert!(back == items, "echo changed a payload");
    drop(back);
    if !every_front {
        return;
    }
    // Both ways, through every front: map, imap, imap_unordered, apply.
    let lazy: Vec<ByteBuf> = pool.imap(echo, items.clone()).map(|r| r.unwrap()).collect();
    assert!(lazy == items);
    drop(lazy);
    let mut unordered: Vec<(usize, u64)> = pool
        .imap_unordered(digest_of, items.clone())
        .map(|r| r.unwrap())
        .collect();
    unordered.sort();
    let mut sorted = want.clone();
    sorted.sort();
    assert_eq!(unordered, sorted);
    let first = items[0].clone();
    assert!(pool.apply(echo, first).unwrap() == items[0]);
    pool.close();
    pool.join().unwrap();
}

#[test]
fn one_mib_payloads_round_trip_exactly() {
    within(120, || {
        round_trip(
            &[MIB, MIB + 1, 64 * 1024, 64 * 1024 - 1, MIB, 3 * MIB + 17],
            true,
        )
    });
}

#[test]
fn sixty_four_mib_payloads_round_trip_exactly() {
    within(180, || round_trip(&[64 * MIB, 64 * MIB - 3], true));
}

#[test]
fn two_hundred_fifty_six_mib_payloads_round_trip_exactly() {
    within(300, || round_trip(&[256 * MIB], false));
}

/// Large and small items mixed in one map keep their order and values.
#[test]
fn mixed_sizes_keep_their_order() {
    within(120, || {
        let pool = Pool::new(2).unwrap();
        let items: Vec<ByteBuf> = (0..200u64)
            .map(|i| {
                let n = if i % 7 == 3 {
                    200_000 + i as usize
                } else {
                    i as usize
                };
                ByteBuf::from(pattern(i, n))
            })
            .collect();
        let want: Vec<(usize, u64)> = items.iter().map(|b| (b.len(), digest(b))).collect();
        for chunksize in [1, 5, 64] {
            let got = pool
                .map_chunked(digest_of, items.clone(), chunksize)
                .unwrap();
            assert_eq!(got, want, "chunk size {chunksize}");
            let back = pool.map_chunked(echo, items.clone(), chunksize).unwrap();
            assert!(back == items, "chunk size {chunksize}");
        }
        // A large context, and large items, through map_with.
        let table = ByteBuf::from(pattern(99, 2 * MIB));
        let got = pool
            .map_with(
                &table,
                |t: &ByteBuf, b: ByteBuf| digest(t) ^ digest(&b),
                items[..20].to_vec(),
            )
            .unwrap();
        let want: Vec<u64> = items[..20]
            .iter()
            .map(|b| digest(&table) ^ digest(b))
            .collect();
        assert_eq!(got, want);
    });
}

/// Serializes as `n` blocks of 1 MiB; dies with SIGKILL halfway through a
/// pass that writes bytes out (not one that only counts them).
struct DiesWhileWritten {
    blocks: usize,
}

static WRITES: AtomicUsize = AtomicUsize::new(0);

impl Serialize for DiesWhileWritten {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let counting = std::any::type_name::<S>().contains("Size");
        let block = vec![0xA5u8; MIB];
        let mut seq = s.serialize_seq(Some(self.blocks))?;
        for i in 0..self.blocks {
            if !counting && i == self.blocks / 2 {
                WRITES.fetch_add(1, Ordering::SeqCst);
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            }
            seq.serialize_element(serde_bytes::Bytes::new(&block))?;
        }
        seq.end()
    }
}

/// The parent's view of a [`DiesWhileWritten`].
#[derive(Deserialize)]
struct Blocks(#[allow(dead_code)] Vec<ByteBuf>);

impl<'de> Deserialize<'de> for DiesWhileWritten {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let b = Blocks::deserialize(d)?;
        Ok(DiesWhileWritten { blocks: b.0.len() })
    }
}

fn dies_mid_result(blocks: usize) -> DiesWhileWritten {
    DiesWhileWritten { blocks }
}

#[test]
fn a_worker_killed_while_writing_a_large_result_fails_only_its_item() {
    within(120, || {
        let pool = Pool::new(1).unwrap();
        for round in 0..3 {
            match pool.apply(dies_mid_result, 16) {
                Err(Error::Died { exitcode: -9, .. }) => {}
                Err(e) => panic!("round {round}: {e}"),
                Ok(_) => panic!("round {round}: the worker lived"),
            }
            // The replacement's next large results are whole and right.
            let specs: Vec<(u64, usize)> = (0..6)
                .map(|i| (i + round * 10, 3 * MIB + i as usize))
                .collect();
            let got = pool.map(make, specs.clone()).unwrap();
            for (g, (seed, n)) in got.iter().zip(&specs) {
                assert_eq!(g.len(), *n);
                assert!(
                    g[..] == pattern(*seed, *n)[..],
                    "round {round}: a stale or torn result"
                );
            }
            let back = pool
                .apply(echo, ByteBuf::from(pattern(round, 5 * MIB)))
                .unwrap();
            assert!(back[..] == pattern(round, 5 * MIB)[..]);
        }
        pool.terminate();
        pool.join().unwrap();
    });
}

/// A task whose result kills the worker in the middle of writing it,
/// inside a map: that item fails, the rest arrive whole.
fn maybe_dies(i: usize) -> Option<DiesWhileWritten> {
    (i == 2).then_some(DiesWhileWritten { blocks: 8 })
}

#[test]
fn a_map_with_a_result_killed_mid_write_fails_only_that_item() {
    within(120, || {
        let pool = Pool::new(2).unwrap();
        let r: Vec<_> = pool.imap(maybe_dies, 0..6usize).collect();
        assert!(
            matches!(r[2], Err(Error::Died { exitcode: -9, .. })),
            "{:?}",
            r[2].as_ref().err()
        );
        for (i, x) in r.iter().enumerate() {
            if i != 2 {
                assert!(matches!(x, Ok(None)), "item {i}");
            }
        }
        let specs: Vec<(u64, usize)> = (0..8).map(|i| (i, MIB + 5)).collect();
        let got = pool.map(make, specs.clone()).unwrap();
        assert!(got
            .iter()
            .zip(&specs)
            .all(|(g, s)| g[..] == pattern(s.0, s.1)[..]));
    });
}

/// Mappings of the process: `(count, total bytes)`.
fn maps() -> (usize, u64) {
    let text = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut total = 0;
    let mut n = 0;
    for line in text.lines() {
        let range = line.split(' ').next().unwrap();
        let (a, b) = range.split_once('-').unwrap();
        total += u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap();
        n += 1;
    }
    (n, total)
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn large(i: u32) -> ByteBuf {
    ByteBuf::from(vec![i as u8; 100_000])
}

/// Run in a process of its own by the test below (fds and mappings are
/// process-wide, and other tests run on other threads).
#[test]
#[ignore = "run by replacements_leave_fds_and_mappings_flat in its own process"]
fn replacements_child() {
    // What the crate sets up once per process (its threads, the malloc
    // arenas of their stacks, /dev/null) is there before `before`.
    let warm = Pool::new(2).unwrap();
    assert_eq!(warm.map(large, 0..4).unwrap().len(), 4);
    warm.close();
    warm.join().unwrap();
    drop(warm);
    let before = (fds(), maps());
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(1)
        .build()
        .unwrap();
    let round = |n: u32| {
        let got = pool.map_chunked(large, 0..n, 1).unwrap();
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, b)| b.len() == 100_000 && b[0] == i as u8));
        let big: Vec<ByteBuf> = (0..4).map(|i| ByteBuf::from(vec![i; 200_000])).collect();
        assert_eq!(
            pool.map_chunked(|b: ByteBuf| b.len(), big, 1).unwrap(),
            vec![200_000; 4]
        );
    };
    round(50);
    let (fd0, (n0, bytes0)) = (fds(), maps());
    for _ in 0..19 {
        round(50);
    }
    // Workers retire and are replaced all the time: at any moment one slot
    // may be between a worker and its replacement, so the counts may differ
    // by one worker's fds and mappings (a socket, a pidfd, a 2 GiB region).
    // A leak would add one per replacement: 950 of them.
    let (fd1, (n1, bytes1)) = (fds(), maps());
    println!("during: fds {fd0} -> {fd1}, maps {n0} -> {n1}, mapped {bytes0} -> {bytes1}");
    assert!(fd1 <= fd0 + 3, "fds grew: {fd0} -> {fd1}");
    assert!(n1 <= n0 + 2, "mappings grew: {n0} -> {n1}");
    assert!(
        bytes1 <= bytes0 + (2u64 << 30) + (64 << 20),
        "mapped memory grew"
    );
    pool.close();
    pool.join().unwrap();
    drop(pool);
    // With the pool gone, exactly what was there before it.
    let back = || fds() <= before.0 && maps().0 <= before.1 .0 && maps().1 <= before.1 .1;
    let ok = common::eventually(common::DEADLINE, back);
    let (fd2, (n2, bytes2)) = (fds(), maps());
    println!(
        "after: fds {} -> {fd2}, maps {} -> {n2}, mapped {} -> {bytes2}",
        before.0, before.1 .0, before.1 .1
    );
    assert!(ok, "the pool left fds or mappings behind");
    println!("REPLACEMENTS OK");
}

#[test]
fn replacements_leave_fds_and_mappings_flat() {
    let (ok, out) = run_ignored("replacements_child", &[], 240);
    assert!(ok && out.contains("REPLACEMENTS OK"), "{out}");
}

/// A result whose `Serialize` panics (small or large) fails its own item
/// with `Panicked`; the items around it, in the same chunk, arrive whole.
struct PanicsOnEncode(usize);

impl Serialize for PanicsOnEncode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 % 5 == 3 {
            let mut seq = s.serialize_seq(Some(2))?;
            seq.serialize_element(&1u8)?;
            panic!("cannot encode {}", self.0);
        }
        s.serialize_u64(self.0 as u64 * 2)
    }
}

impl<'de> Deserialize<'de> for PanicsOnEncode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(PanicsOnEncode(u64::deserialize(d)? as usize / 2))
    }
}

#[test]
fn a_result_that_panics_while_encoded_fails_only_its_item() {
    within(60, || {
        let pool = Pool::new(2).unwrap();
        for chunksize in [1, 4, 100] {
            let r: Vec<_> = pool
                .imap_chunked(PanicsOnEncode, 0..40usize, chunksize)
                .collect();
            for (i, x) in r.iter().enumerate() {
                if i % 5 == 3 {
                    assert!(
                        matches!(x, Err(Error::Panicked { message, .. }) if message.contains("cannot encode")),
                        "item {i}: {:?}",
                        x.as_ref().err()
                    );
                } else {
                    assert_eq!(x.as_ref().unwrap().0, i, "item {i}");
                }
            }
            let r = pool.map_chunked(PanicsOnEncode, 0..40usize, chunksize);
            assert!(matches!(r, Err(Error::Panicked { .. })));
        }
    });
}

/// Kills its worker on item 70 001, panics on item 150 002, squares the
/// rest (tiny fixed-width items, in chunks large enough for the arena).
fn square_or_fail(x: u64) -> u64 {
    match x {
        70_001 => {
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            0
        }
        150_002 => panic!("item {x}"),
        _ => x.wrapping_mul(x),
    }
}

#[test]
fn large_chunks_of_small_items_survive_a_killed_worker_and_a_panic() {
    within(120, || {
        const N: u64 = 200_000;
        let pool = Pool::new(2).unwrap();
        // 100 000 items of 8 bytes: each chunk goes through the arena.
        let got: Vec<_> = pool.imap_chunked(square_or_fail, 0..N, 100_000).collect();
        assert_eq!(got.len(), N as usize);
        for (i, r) in got.iter().enumerate() {
            match (i, r) {
                (70_001, Err(Error::Died { exitcode: -9, .. })) => {}
                (150_002, Err(Error::Panicked { message, .. })) => {
                    assert_eq!(message, "item 150002")
                }
                (i, Ok(v)) if i != 70_001 && i != 150_002 => {
                    assert_eq!(*v, (i as u64).wrapping_mul(i as u64), "item {i}")
                }
                (i, r) => panic!("item {i}: unexpected {r:?}"),
            }
        }
        // map: the first failure; then a clean map on the replacement.
        assert!(pool.map(square_or_fail, 0..N).is_err());
        let clean: Vec<u64> = (0..N).map(|x| x + 200_000).collect();
        let want: Vec<u64> = clean.iter().map(|x| x * x).collect();
        assert_eq!(pool.map(square_or_fail, clean).unwrap(), want);
        pool.terminate();
        pool.join().unwrap();
    });
}

#[test]
fn large_chunks_split_by_max_tasks_per_child_and_of_changing_kinds() {
    within(120, || {
        let pool = Pool::builder()
            .processes(2)
            .max_tasks_per_child(30_000)
            .build()
            .unwrap();
        // Chunks of 100 000 in the arena, split at each worker's allowance.
        let want: Vec<u64> = (0..200_000u64).map(|x| x * x).collect();
        assert_eq!(
            pool.map_chunked(square_or_fail, 200_000..400_000u64, 100_000)
                .unwrap(),
            (200_000..400_000u64).map(|x| x * x).collect::<Vec<_>>()
        );
        let small: Vec<u64> = (0..200_000u64)
            .map(|x| if x == 70_001 || x == 150_002 { 1 } else { x })
            .collect();
        let mut want = want;
        want[70_001] = 1;
        want[150_002] = 1;
        assert_eq!(pool.map(square_or_fail, small).unwrap(), want);
        // Items and results whose encoding changes kind (a `u8` below
        // 128, a `u64` above) in large chunks: postcard for the items, and
        // footer entries among the fixed-width results.
        let items: Vec<Shifty> = (0..100_000u64)
            .map(|i| Shifty(if i % 7 == 0 { (1 << 40) + i } else { i % 100 }))
            .collect();
        let want: Vec<Shifty> = items.iter().map(|s| shifty(*s)).collect();
        assert_eq!(pool.map(shifty, items.clone()).unwrap(), want);
        // Chunks of 50 000 such items (about 85 KB of postcard): the arena.
        assert_eq!(pool.map_chunked(shifty, items, 50_000).unwrap(), want);
        pool.close();
        pool.join().unwrap();
    });
}

/// A value written as a `u8` below 128 and as a `u64` otherwise, read back
/// as a `u64`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Shifty(u64);

impl Serialize for Shifty {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match u8::try_from(self.0) {
            Ok(small) if small < 128 => s.serialize_u8(small),
            _ => s.serialize_u64(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Shifty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Shifty, D::Error> {
        u64::deserialize(d).map(Shifty)
    }
}

/// Big values stay big; small ones stay small but change.
fn shifty(x: Shifty) -> Shifty {
    Shifty(if x.0 >= 128 { x.0 + 1 } else { 127 - x.0 })
}
