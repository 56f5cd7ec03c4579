//! `spawn`: values, panics and crashes of children that return something.

mod common;

use std::time::Duration;

use common::DEADLINE;
use multiproc::{spawn, Error, JoinHandle};
use serde::{Deserialize, Serialize};

fn join<T: serde::de::DeserializeOwned>(mut h: JoinHandle<T>) -> multiproc::Result<T> {
    match h.join_timeout(DEADLINE) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => {
            let _ = h.kill();
            panic!("child {} did not finish in time", h.pid());
        }
        Err(e) => Err(e),
    }
}

#[test]
fn returns_a_u64() {
    assert_eq!(join(spawn(|| 6u64 * 7).unwrap()).unwrap(), 42);
}

#[test]
fn returns_a_string() {
    let h = spawn(|| format!("pid {}", std::process::id())).unwrap();
    let pid = h.pid();
    assert_eq!(join(h).unwrap(), format!("pid {pid}"));
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Report {
    id: u32,
    tags: Vec<String>,
    score: Option<f64>,
    nested: (i8, bool),
}

#[test]
fn returns_a_struct() {
    let expected = Report {
        id: 7,
        tags: vec!["a".into(), "bc".into()],
        score: Some(0.5),
        nested: (-3, true),
    };
    let h = spawn(|| Report {
        id: 7,
        tags: vec!["a".into(), "bc".into()],
        score: Some(0.5),
        nested: (-3, true),
    })
    .unwrap();
    assert_eq!(join(h).unwrap(), expected);
}

#[test]
fn returns_8_mib() {
    // Larger than any socket buffer: the parent must read while the child writes.
    let h = spawn(|| {
        serde_bytes::ByteBuf::from((0..8 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
    })
    .unwrap();
    let v = join(h).unwrap().into_vec();
    assert_eq!(v.len(), 8 << 20);
    assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
}

#[test]
fn panic_becomes_panicked() {
    let h = spawn(|| -> u64 { panic!("bad input: {}", 3) }).unwrap();
    match join(h) {
        Err(Error::Panicked { message, location }) => {
            assert_eq!(message, "bad input: 3");
            assert!(location.unwrap().starts_with("tests/spawn.rs:"));
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
}

#[test]
fn self_sigkill_becomes_died() {
    let h = spawn(|| -> u64 {
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
        unreachable!()
    })
    .unwrap();
    let pid = h.pid();
    match join(h) {
        Err(Error::Died {
            pid: p, exitcode, ..
        }) => {
            assert_eq!(p, pid);
            assert_eq!(exitcode, -9);
        }
        other => panic!("expected Died, got {other:?}"),
    }
}

#[test]
fn exit_without_result_becomes_died_with_its_code() {
    let h = spawn(|| -> u64 { multiproc::exit(3) }).unwrap();
    assert!(matches!(join(h), Err(Error::Died { exitcode: 3, .. })));
}

#[test]
fn kill_from_the_parent() {
    let mut h = spawn(|| -> u64 {
        std::thread::sleep(Duration::from_secs(60));
        0
    })
    .unwrap();
    assert!(h.join_timeout(Duration::from_millis(50)).unwrap().is_none());
    assert!(!h.is_finished());
    h.kill().unwrap();
    assert!(matches!(join(h), Err(Error::Died { exitcode: -9, .. })));
}

#[test]
fn result_survives_a_timed_out_join() {
    // A slow child: the first join times out, the second gets the value.
    let (mut go_tx, mut go_rx) = multiproc::pipe().unwrap();
    let mut h = spawn(move || {
        let _: () = go_rx.recv().unwrap();
        String::from("late")
    })
    .unwrap();
    assert_eq!(h.join_timeout(Duration::from_millis(30)).unwrap(), None);
    go_tx.send(&()).unwrap();
    assert_eq!(h.join_timeout(DEADLINE).unwrap().as_deref(), Some("late"));
    // The result was delivered: asking again is an error, not a hang.
    assert!(h.join_timeout(Duration::ZERO).is_err());
}

#[test]
fn unencodable_result_is_a_codec_error() {
    // postcard needs sequence lengths up front: an iterator-backed sequence
    // without one cannot be encoded.
    struct Unsized;
    impl Serialize for Unsized {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(std::iter::from_fn(|| Some(1u8)).take(3).filter(|_| true))
        }
    }
    impl<'de> Deserialize<'de> for Unsized {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            Vec::<u8>::deserialize(d).map(|_| Unsized)
        }
    }
    let h = spawn(|| Unsized).unwrap();
    assert!(matches!(join(h), Err(Error::Codec(_))));
}
