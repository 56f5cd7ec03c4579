//! `pipe()` / `Connection`: round trips and bad input.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::DEADLINE;
use multiproc::{pipe, CodecErrorKind, Connection, Error, Process};

/// A `Connection` whose peer is a raw socket we can write anything to.
fn raw_pair() -> (UnixStream, Connection) {
    let (a, b) = UnixStream::pair().unwrap();
    (a, Connection::from_fd(b.into()))
}

#[test]
fn round_trips_of_several_types() {
    let (mut a, mut b) = pipe().unwrap();
    a.send(&1u8).unwrap();
    a.send("text").unwrap();
    a.send(&vec![1.5f64, -2.0]).unwrap();
    a.send(&(Some(3u64), [1u16, 2, 3])).unwrap();
    a.send(&()).unwrap();
    assert_eq!(b.recv::<u8>().unwrap(), 1);
    assert_eq!(b.recv::<String>().unwrap(), "text");
    assert_eq!(b.recv::<Vec<f64>>().unwrap(), vec![1.5, -2.0]);
    assert_eq!(
        b.recv::<(Option<u64>, [u16; 3])>().unwrap(),
        (Some(3), [1, 2, 3])
    );
    b.recv::<()>().unwrap();
    // Duplex: the other way round too.
    b.send(&"back").unwrap();
    assert_eq!(a.recv::<String>().unwrap(), "back");
}

#[test]
fn round_trip_across_fork_with_large_messages() {
    let (mut parent, mut child) = pipe().unwrap();
    let mut p = Process::new(move || {
        // The child holds a copy of the parent's end: no EOF ever comes, so
        // the parent ends the conversation with `None`.
        while let Some(buf) = child.recv::<Option<serde_bytes::ByteBuf>>().unwrap() {
            let sum: u64 = buf.iter().map(|&b| b as u64).sum();
            child.send(&(buf.len(), sum)).unwrap();
        }
    });
    p.start().unwrap();
    let p = common::Reaped(p);
    for size in [0usize, 1, 4095, 1 << 20, 5 << 20] {
        let buf = serde_bytes::ByteBuf::from(vec![3u8; size]);
        parent.send(&Some(buf)).unwrap();
        let (len, sum): (usize, u64) = parent.recv_timeout(DEADLINE).unwrap().expect("reply");
        assert_eq!((len, sum), (size, 3 * size as u64));
    }
    parent.send(&None::<serde_bytes::ByteBuf>).unwrap();
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

#[test]
fn garbage_frame_is_a_codec_error() {
    let (mut raw, mut conn) = raw_pair();
    // A valid header announcing 4 bytes, then bytes that are not a String
    // (length 200 with only 3 bytes following).
    raw.write_all(&4u64.to_le_bytes()).unwrap();
    raw.write_all(&[200, 1, 2, 3]).unwrap();
    match conn.recv::<String>() {
        Err(Error::Codec(e)) => assert!(matches!(e.kind(), CodecErrorKind::Invalid(_))),
        other => panic!("expected a codec error, got {other:?}"),
    }
}

#[test]
fn wrong_type_is_a_codec_error() {
    let (mut a, mut b) = pipe().unwrap();
    a.send(&(1u32, 2u32)).unwrap();
    assert!(matches!(b.recv::<u32>(), Err(Error::Codec(_))));
}

#[test]
fn truncated_frame_is_a_codec_error() {
    let (mut raw, mut conn) = raw_pair();
    raw.write_all(&100u64.to_le_bytes()).unwrap();
    raw.write_all(&[0u8; 10]).unwrap();
    drop(raw);
    match conn.recv::<Vec<u8>>() {
        Err(Error::Codec(e)) => assert_eq!(
            e.kind(),
            &CodecErrorKind::Truncated {
                got: 18,
                expected: 108
            }
        ),
        other => panic!("expected truncated, got {other:?}"),
    }
}

#[test]
fn truncated_header_is_a_codec_error() {
    let (mut raw, mut conn) = raw_pair();
    raw.write_all(&[1, 2, 3]).unwrap();
    drop(raw);
    assert!(matches!(conn.recv::<u8>(), Err(Error::Codec(_))));
}

#[test]
fn oversize_header_is_refused_before_allocation() {
    let (mut raw, mut conn) = raw_pair();
    conn.set_max_frame_len(1 << 20);
    // 2 GiB announced, nothing sent: refused at once, no allocation, no hang.
    raw.write_all(&(2u64 << 30).to_le_bytes()).unwrap();
    match conn.recv_timeout::<Vec<u8>>(DEADLINE) {
        Err(Error::Codec(e)) => assert_eq!(
            e.kind(),
            &CodecErrorKind::Oversize {
                len: 2 << 30,
                limit: 1 << 20
            }
        ),
        other => panic!("expected oversize, got {other:?}"),
    }
    // The default limit is 1 GiB.
    let (mut raw, mut conn) = raw_pair();
    raw.write_all(&u64::MAX.to_le_bytes()).unwrap();
    assert!(matches!(conn.recv::<u8>(), Err(Error::Codec(_))));
}

#[test]
fn eof_between_messages_is_disconnected() {
    let (a, mut b) = pipe().unwrap();
    drop(a);
    let err = b.recv::<u8>().unwrap_err();
    assert!(err.is_disconnected(), "{err:?}");
    assert!(!matches!(err, Error::Codec(_)));
}

#[test]
fn send_to_a_closed_peer_is_an_error() {
    let (mut a, b) = pipe().unwrap();
    drop(b);
    // Rust programs ignore SIGPIPE at startup, so the write fails with
    // EPIPE. A child forked meanwhile by another test's thread holds a copy
    // of `b` until it exits (fork copies every fd): until then a send still
    // succeeds, so retry within the deadline.
    let start = std::time::Instant::now();
    let err = loop {
        match a.send(&vec![0u8; 64]) {
            Err(e) => break e,
            Ok(()) => {
                assert!(start.elapsed() < common::DEADLINE, "sends never failed");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    };
    assert!(
        matches!(err, Error::Io(ref e) if e.kind() == std::io::ErrorKind::BrokenPipe),
        "{err:?}"
    );
}

#[test]
fn recv_timeout_and_poll() {
    let (mut a, mut b) = pipe().unwrap();
    assert_eq!(
        b.recv_timeout::<u8>(Duration::from_millis(20)).unwrap(),
        None
    );
    assert!(!b.poll(Duration::ZERO).unwrap());
    a.send(&9u8).unwrap();
    assert!(b.poll(DEADLINE).unwrap());
    assert_eq!(
        multiproc::wait(&[a.as_fd(), b.as_fd()], Some(DEADLINE)).unwrap(),
        vec![1]
    );
    assert_eq!(b.recv_timeout::<u8>(DEADLINE).unwrap(), Some(9));
}

#[test]
fn partial_message_is_completed_by_the_next_receive() {
    let (mut raw, mut conn) = raw_pair();
    let mut frame = 5u64.to_le_bytes().to_vec();
    frame.extend_from_slice(&[4, b'a', b'b', b'c', b'd']);
    raw.write_all(&frame[..6]).unwrap();
    assert_eq!(
        conn.recv_timeout::<String>(Duration::from_millis(20))
            .unwrap(),
        None
    );
    raw.write_all(&frame[6..]).unwrap();
    assert_eq!(
        conn.recv_timeout::<String>(DEADLINE).unwrap().as_deref(),
        Some("abcd")
    );
}

#[test]
fn never_reads_past_the_current_message() {
    // Two messages in the socket: after the first recv the fd must still be
    // readable, so a poller waiting on it sees the second.
    let (mut a, mut b) = pipe().unwrap();
    a.send(&1u8).unwrap();
    a.send(&2u8).unwrap();
    assert_eq!(b.recv::<u8>().unwrap(), 1);
    assert_eq!(
        multiproc::wait(&[b.as_fd()], Some(Duration::ZERO)).unwrap(),
        vec![0]
    );
    assert_eq!(b.recv::<u8>().unwrap(), 2);
}

/// Large messages: exact round trips up to 64 MiB across a fork, then fds
/// and mappings flat.
#[test]
fn large_messages_through_memfds_round_trip_and_leak_nothing() {
    let (mut parent, mut child) = pipe().unwrap();
    let mut p = Process::new(move || {
        while let Some(buf) = child.recv::<Option<serde_bytes::ByteBuf>>().unwrap() {
            child.send(&buf).unwrap();
        }
    });
    p.start().unwrap();
    let p = common::Reaped(p);
    for (i, size) in [(1usize << 20) - 1, 1 << 20, 3 << 20, 64 << 20]
        .into_iter()
        .enumerate()
    {
        let buf: Vec<u8> = (0..size).map(|k| (k % 251) as u8 ^ i as u8).collect();
        parent
            .send(&Some(serde_bytes::ByteBuf::from(buf.clone())))
            .unwrap();
        let back: serde_bytes::ByteBuf = parent.recv_timeout(DEADLINE).unwrap().expect("echo");
        assert!(back[..] == buf[..], "size {size}");
    }
    let fds = common::fd_count();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count();
    for _ in 0..50 {
        parent
            .send(&Some(serde_bytes::ByteBuf::from(vec![7u8; 2 << 20])))
            .unwrap();
        let back: serde_bytes::ByteBuf = parent.recv_timeout(DEADLINE).unwrap().expect("echo");
        assert_eq!(back.len(), 2 << 20);
    }
    // Other tests' threads open fds too: allow them a little slack.
    assert!(
        common::fd_count() <= fds + 8,
        "fds {fds} -> {}",
        common::fd_count()
    );
    let after = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count();
    assert!(after <= maps + 16, "mappings {maps} -> {after}");
    parent.send(&None::<serde_bytes::ByteBuf>).unwrap();
    assert_eq!(p.join_timeout(DEADLINE).unwrap(), Some(0));
}

/// A `Connection` over a plain pipe carries large messages too.
#[test]
fn large_messages_over_a_plain_pipe_take_the_stream() {
    let (r, w) = nix::unistd::pipe().unwrap();
    let (mut rx, mut tx) = (Connection::from_fd(r), Connection::from_fd(w));
    let buf = serde_bytes::ByteBuf::from(vec![5u8; 3 << 20]);
    let sender = std::thread::spawn(move || tx.send(&buf).map(|()| tx));
    let got: serde_bytes::ByteBuf = rx.recv_timeout(DEADLINE).unwrap().expect("message");
    assert!(got.iter().all(|&b| b == 5) && got.len() == 3 << 20);
    sender.join().unwrap().unwrap();
}

/// Small and large messages interleaved, both ways: each arrives whole, in
/// order (large ones through the sending end's region, small ones in the
/// stream), and a large message nobody reads yet does not block the next.
#[test]
fn small_and_large_messages_keep_their_order() {
    let (mut a, mut b) = pipe().unwrap();
    let sizes = [
        10usize,
        300_000,
        5,
        1 << 20,
        0,
        2 << 20,
        7,
        256 * 1024,
        256 * 1024 - 1,
    ];
    for (i, &n) in sizes.iter().enumerate() {
        a.send(&serde_bytes::ByteBuf::from(vec![i as u8; n]))
            .unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        let got: serde_bytes::ByteBuf = b.recv_timeout(DEADLINE).unwrap().expect("message");
        assert_eq!(got.len(), n, "message {i}");
        assert!(got.iter().all(|&x| x == i as u8), "message {i}");
    }
    b.send(&serde_bytes::ByteBuf::from(vec![9u8; 3 << 20]))
        .unwrap();
    b.send("after").unwrap();
    let big: serde_bytes::ByteBuf = a.recv_timeout(DEADLINE).unwrap().expect("message");
    assert_eq!(big.len(), 3 << 20);
    let after: String = a.recv_timeout(DEADLINE).unwrap().expect("message");
    assert_eq!(after, "after");
}

/// A peer that sends a region message with no region, a range outside the
/// region, or a region message of the wrong size: a codec error each time,
/// never a hang or a read out of bounds.
#[test]
fn broken_region_messages_are_errors() {
    let flagged = |payload: &[u8]| {
        let mut f = ((payload.len() as u64) | (1u64 << 63))
            .to_le_bytes()
            .to_vec();
        f.extend_from_slice(payload);
        f
    };
    let range = |o: u64, l: u64| [o.to_le_bytes(), l.to_le_bytes()].concat();
    // No region was ever sent.
    let (mut raw, mut conn) = raw_pair();
    raw.write_all(&flagged(&range(65536, 10))).unwrap();
    assert!(matches!(
        conn.recv_timeout::<Vec<u8>>(DEADLINE),
        Err(Error::Codec(_))
    ));
    // A wrong size.
    let (mut raw, mut conn) = raw_pair();
    raw.write_all(&flagged(b"abc")).unwrap();
    assert!(matches!(
        conn.recv_timeout::<Vec<u8>>(DEADLINE),
        Err(Error::Codec(_))
    ));
    // A real region (from a real large message), then a range outside it.
    let (mut a, mut b) = pipe().unwrap();
    a.send(&serde_bytes::ByteBuf::from(vec![1u8; 1 << 20]))
        .unwrap();
    let first: serde_bytes::ByteBuf = b.recv_timeout(DEADLINE).unwrap().expect("message");
    assert_eq!(first.len(), 1 << 20);
    let fd = a.into_fd();
    let mut raw = UnixStream::from(fd);
    raw.write_all(&flagged(&range(1 << 40, 10))).unwrap();
    assert!(matches!(
        b.recv_timeout::<Vec<u8>>(DEADLINE),
        Err(Error::Codec(_))
    ));
    raw.write_all(&flagged(&range(65536 + 1, 10))).unwrap();
    assert!(matches!(
        b.recv_timeout::<Vec<u8>>(DEADLINE),
        Err(Error::Codec(_))
    ));
}
