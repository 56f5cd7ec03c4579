//! Hostile input on the public [`Connection`], tested by properties: bytes
//! written raw into the peer of a socket pair (arbitrary bytes, truncated
//! frames, random and huge length headers, valid frames of the wrong type)
//! give an `Err` in bounded time: never a panic, never a hang (the peer is
//! closed after writing, and every receive has a deadline), never an
//! allocation for bytes that did not arrive.
//!
//! Allocations are watched by a counting global allocator: it records the
//! largest single request made by the receiving thread.
//!
//! Cases per property: 2 000 in a debug build (`cargo test`), 100 000 with
//! `cargo test --release`; `PROPTEST_CASES` overrides both.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use multiproc::{CodecErrorKind, Connection, Error, DEFAULT_MAX_FRAME_LEN};
use proptest::collection::vec;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The system allocator, noting the largest request of each thread.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: no panic while the thread's locals are torn down.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size)
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; `note` neither allocates nor unwinds (a const
// thread-local `Cell` with no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest single allocation `f` made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) {
            2_000
        } else {
            100_000
        })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Failing cases become plain regression tests, not files.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A receive that has not completed within this is a hang.
const RECV_DEADLINE: Duration = Duration::from_secs(10);

/// Allocation allowed for the receive buffer beyond what was sent: one
/// read's worth of slack.
const SLACK: usize = 256 * 1024;

/// A `Connection` on one end of a socket pair whose other end got `bytes`
/// and was closed: everything the receiver will ever see is in its socket.
fn fed(bytes: &[u8], limit: usize) -> Connection {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    peer.write_all(bytes).unwrap();
    // A shutdown ends the stream even if a forked child held a copy of the fd.
    peer.shutdown(Shutdown::Write).unwrap();
    let mut conn = Connection::from_fd(ours.into());
    conn.set_max_frame_len(limit);
    conn
}

/// The frame `Connection::send` writes for `value`.
fn frame_of<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(RECV_DEADLINE)).unwrap();
    let mut conn = Connection::from_fd(ours.into());
    conn.send(value).unwrap();
    UnixStream::from(conn.into_fd())
        .shutdown(Shutdown::Write)
        .unwrap();
    let mut out = Vec::new();
    peer.read_to_end(&mut out).unwrap();
    out
}

/// A message type with most serde shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Unit,
    Num(u64),
    Signed(i32),
    Text(String),
    List(Vec<u32>),
    Pair(i16, Option<String>),
    Nested(Vec<Vec<u8>>),
    Map(BTreeMap<String, u64>),
    Float { x: f64, flag: bool, c: char },
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        Just(Msg::Unit),
        any::<u64>().prop_map(Msg::Num),
        any::<i32>().prop_map(Msg::Signed),
        ".{0,40}".prop_map(Msg::Text),
        vec(any::<u32>(), 0..20).prop_map(Msg::List),
        (any::<i16>(), proptest::option::of(".{0,10}")).prop_map(|(a, b)| Msg::Pair(a, b)),
        vec(vec(any::<u8>(), 0..8), 0..8).prop_map(Msg::Nested),
        proptest::collection::btree_map(".{0,6}", any::<u64>(), 0..6).prop_map(Msg::Map),
        (any::<f64>(), any::<bool>(), any::<char>()).prop_map(|(x, flag, c)| Msg::Float {
            x,
            flag,
            c
        }),
    ]
}

/// The types a receiver may expect.
const KINDS: u8 = 10;

/// One receive as the type `kind` names: `Ok(true)` for a value, `Ok(false)`
/// for none within [`RECV_DEADLINE`] (a hang: the peer is closed).
fn recv_as(conn: &mut Connection, kind: u8) -> multiproc::Result<bool> {
    fn one<T: DeserializeOwned>(conn: &mut Connection) -> multiproc::Result<bool> {
        Ok(conn.recv_timeout::<T>(RECV_DEADLINE)?.is_some())
    }
    match kind {
        0 => one::<u64>(conn),
        1 => one::<String>(conn),
        2 => one::<Vec<u8>>(conn),
        3 => one::<Msg>(conn),
        4 => one::<(u32, bool, char)>(conn),
        5 => one::<Vec<String>>(conn),
        6 => one::<Option<f64>>(conn),
        7 => one::<BTreeMap<u16, String>>(conn),
        8 => one::<()>(conn),
        _ => one::<Vec<Msg>>(conn),
    }
}

/// Receives until the first error, which it returns, with the number of
/// values received before it. Fails on a hang, on more values than the
/// bytes could hold (one frame is at least a header), and on a receive that
/// allocated more than `alloc_bound`.
fn drain(
    conn: &mut Connection,
    kind: u8,
    sent: usize,
    alloc_bound: usize,
) -> Result<(usize, Error), TestCaseError> {
    let mut values = 0;
    loop {
        let (got, largest) = largest_allocation(|| recv_as(conn, kind));
        prop_assert!(
            largest <= alloc_bound,
            "a receive allocated {largest} bytes (bound {alloc_bound})"
        );
        match got {
            Ok(true) => values += 1,
            Ok(false) => return Err(TestCaseError::fail("a receive hung on a closed peer")),
            Err(e) => return Ok((values, e)),
        }
        prop_assert!(values <= sent / 8, "{values} values from {sent} bytes");
    }
}

fn codec_kind(e: &Error) -> Option<&CodecErrorKind> {
    match e {
        Error::Codec(c) => Some(c.kind()),
        _ => None,
    }
}

/// Limits to receive under: tiny ones, and the default.
fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..64, 64usize..4096, Just(DEFAULT_MAX_FRAME_LEN)]
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes: values or errors, and always an error at the end.
    #[test]
    fn arbitrary_bytes(bytes in vec(any::<u8>(), 0..512), kind in 0..KINDS, limit in limit()) {
        let mut conn = fed(&bytes, limit);
        let (_, err) = drain(&mut conn, kind, bytes.len(), SLACK + 4 * bytes.len())?;
        prop_assert!(err.is_disconnected() || codec_kind(&err).is_some(), "{err:?}");
    }

    /// Arbitrary bytes behind a header that announces them exactly.
    #[test]
    fn arbitrary_payloads(payload in vec(any::<u8>(), 0..512), kind in 0..KINDS) {
        let mut bytes = (payload.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        let mut conn = fed(&bytes, DEFAULT_MAX_FRAME_LEN);
        let (values, err) = drain(&mut conn, kind, bytes.len(), SLACK + 4 * bytes.len())?;
        prop_assert!(values <= 1);
        if values == 1 {
            prop_assert!(err.is_disconnected(), "{err:?}");
        } else {
            prop_assert!(
                matches!(
                    codec_kind(&err),
                    Some(CodecErrorKind::Invalid(_) | CodecErrorKind::TrailingBytes(_))
                ),
                "{err:?}"
            );
        }
    }

    /// A valid frame cut anywhere: end of file at a frame boundary is a
    /// disconnection, anywhere else a truncated frame, with the counts.
    #[test]
    fn truncated_frames(value in msg(), cut in any::<prop::sample::Index>(), kind in 0..KINDS) {
        let frame = frame_of(&value);
        let k = cut.index(frame.len());
        let mut conn = fed(&frame[..k], DEFAULT_MAX_FRAME_LEN);
        let (values, err) = drain(&mut conn, kind, k, SLACK + 4 * frame.len())?;
        prop_assert_eq!(values, 0);
        if k == 0 {
            prop_assert!(err.is_disconnected(), "{err:?}");
        } else {
            let expected = if k < 8 { 8 } else { frame.len() };
            prop_assert_eq!(
                codec_kind(&err),
                Some(&CodecErrorKind::Truncated { got: k, expected })
            );
        }
    }

    /// A header over the limit is refused before anything is allocated for
    /// it, whatever follows.
    #[test]
    fn oversize_headers(
        limit in limit(),
        over in any::<u64>(),
        tail in vec(any::<u8>(), 0..64),
        kind in 0..KINDS,
    ) {
        let len = (limit as u64).saturating_add(1).max(over);
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        let mut conn = fed(&bytes, limit);
        let (values, err) = drain(&mut conn, kind, bytes.len(), 4096)?;
        prop_assert_eq!(values, 0);
        if len >> 63 == 0 {
            prop_assert_eq!(codec_kind(&err), Some(&CodecErrorKind::Oversize { len, limit }));
        } else {
            // The top bit flags a message in the peer's shared region (the
            // rest is its length): a broken one, or one over the limit.
            let masked = len & !(1 << 63);
            prop_assert!(
                matches!(
                    codec_kind(&err),
                    Some(CodecErrorKind::Invalid(_)) | Some(CodecErrorKind::Truncated { .. })
                ) || codec_kind(&err) == Some(&CodecErrorKind::Oversize { len: masked, limit }),
                "{:?}",
                err
            );
        }
    }

    /// A header within the limit that announces more than arrives: a
    /// truncated frame, and no buffer sized by the announcement (the
    /// default limit is 1 GiB; a peer's 8 bytes must not cost that).
    #[test]
    fn headers_announcing_more_than_arrives(
        limit in limit().prop_filter("room for a byte", |l| *l > 0),
        sent in any::<prop::sample::Index>(),
        missing in any::<prop::sample::Index>(),
        seed in vec(any::<u8>(), 64),
        kind in 0..KINDS,
    ) {
        // `tail` bytes of a payload of `len` (at most `limit`) arrive.
        let tail = &seed[..sent.index(limit.min(64))];
        let len = (tail.len() + 1 + missing.index(limit - tail.len())) as u64;
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(tail);
        let mut conn = fed(&bytes, limit);
        let (values, err) = drain(&mut conn, kind, bytes.len(), SLACK)?;
        prop_assert_eq!(values, 0);
        prop_assert_eq!(
            codec_kind(&err),
            Some(&CodecErrorKind::Truncated { got: bytes.len(), expected: 8 + len as usize })
        );
    }

    /// Valid frames of another type than the receiver expects: a value or
    /// an error, never a panic; after the frames, a disconnection.
    #[test]
    fn frames_of_the_wrong_type(values in vec(msg(), 1..4), kind in 0..KINDS) {
        let bytes: Vec<u8> = values.iter().flat_map(frame_of).collect();
        let mut conn = fed(&bytes, DEFAULT_MAX_FRAME_LEN);
        let (got, err) = drain(&mut conn, kind, bytes.len(), SLACK + 4 * bytes.len())?;
        prop_assert!(got <= values.len());
        if got == values.len() {
            prop_assert!(err.is_disconnected(), "{err:?}");
        } else {
            prop_assert!(
                matches!(
                    codec_kind(&err),
                    Some(CodecErrorKind::Invalid(_) | CodecErrorKind::TrailingBytes(_))
                ),
                "{err:?}"
            );
        }
    }

    /// A frame whose payload is not empty is never a `()`: the error says
    /// how many bytes were left.
    #[test]
    fn a_unit_refuses_any_payload(value in msg().prop_filter("non-empty", |m| *m != Msg::Unit)) {
        let frame = frame_of(&value);
        let mut conn = fed(&frame, DEFAULT_MAX_FRAME_LEN);
        let err = conn.recv_timeout::<()>(RECV_DEADLINE).unwrap_err();
        prop_assert_eq!(codec_kind(&err), Some(&CodecErrorKind::TrailingBytes(frame.len() - 8)));
    }

    /// The round trip holds for every message, frame after frame, with the
    /// same receiver that saw nothing hostile.
    #[test]
    fn valid_frames_round_trip(values in vec(msg(), 0..4)) {
        let bytes: Vec<u8> = values.iter().flat_map(frame_of).collect();
        let mut conn = fed(&bytes, DEFAULT_MAX_FRAME_LEN);
        for v in &values {
            let got: Msg = conn.recv_timeout(RECV_DEADLINE).unwrap().expect("no hang");
            // NaN != NaN: compare the encodings.
            prop_assert_eq!(frame_of(&got), frame_of(v));
        }
        prop_assert!(conn.recv_timeout::<Msg>(RECV_DEADLINE).unwrap_err().is_disconnected());
    }
}

/// The allocation watch works: a receive of a 1 MiB value allocates it.
#[test]
fn the_allocation_watch_sees_a_large_receive() {
    let value = vec![7u8; 1 << 20];
    // The frame by hand: the length, then the varint 2^20 and the bytes.
    let mut frame = ((1u64 << 20) + 3).to_le_bytes().to_vec();
    frame.extend_from_slice(&[0x80, 0x80, 0x40]);
    frame.extend_from_slice(&value);
    let (ours, mut peer) = UnixStream::pair().unwrap();
    let writer = std::thread::spawn(move || {
        peer.write_all(&frame).unwrap();
    });
    let mut conn = Connection::from_fd(ours.into());
    let (got, largest) = largest_allocation(|| conn.recv_timeout::<Vec<u8>>(RECV_DEADLINE));
    writer.join().unwrap();
    assert_eq!(got.unwrap().unwrap(), value);
    assert!(largest >= 1 << 20, "{largest}");
}
