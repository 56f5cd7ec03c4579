use super::*;
use crate::error::CodecErrorKind;
use serde::Deserialize;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Point {
    x: u64,
    y: u64,
}

/// A queue of `Point`s sharing its core with a queue of `String`s: what
/// another type's producer would leave in it.
fn twin() -> (Queue<String>, Queue<Point>) {
    let strings = Queue::<String>::new().unwrap();
    let points = Queue {
        shared: Arc::clone(&strings.shared),
        _type: PhantomData,
    };
    (strings, points)
}

#[test]
fn a_message_of_another_type_is_a_codec_error_and_is_consumed() {
    let (strings, points) = twin();
    strings.put(&"\u{ff}\u{ff}\u{ff}".repeat(7)).unwrap();
    points.put(&Point { x: 1, y: 2 }).unwrap();
    match points.get() {
        Err(Error::Codec(_)) => {}
        other => panic!("expected a codec error, got {other:?}"),
    }
    // The bad message is gone; the queue goes on.
    assert_eq!(points.get().unwrap(), Point { x: 1, y: 2 });
    // Decoding a Point as a String: wrong bytes for UTF-8 or left over.
    points.put(&Point { x: 0xffff, y: 0xff }).unwrap();
    assert!(matches!(
        strings.try_get(),
        Err(Error::Codec(_)) | Ok(Some(_))
    ));
    // An empty payload is not a Point either.
    let units = Queue::<()> {
        shared: Arc::clone(&strings.shared),
        _type: PhantomData,
    };
    units.put(&()).unwrap();
    assert!(matches!(points.try_get(), Err(Error::Codec(_))));
    assert!(points.is_empty());
}

#[test]
fn oversize_is_refused_before_it_is_put() {
    let q = Queue::<()>::new().unwrap();
    // A frame whose payload is over the limit, without allocating 1 GiB:
    // the core checks the length before it copies anything.
    let big = crate::codec::HEADER_LEN + crate::DEFAULT_MAX_FRAME_LEN + 1;
    assert!(q.shared.check_frame_len(big - 1).is_ok());
    let err = q.shared.check_frame_len(big).unwrap_err();
    match err {
        Error::Codec(e) => assert!(matches!(e.kind(), CodecErrorKind::Oversize { .. })),
        other => panic!("expected oversize, got {other:?}"),
    }
    assert!(q.is_empty());
}

#[test]
fn unfinished_counts_puts_and_task_done() {
    let q = JoinableQueue::<u8>::new().unwrap();
    for i in 0..5 {
        q.put(&i).unwrap();
    }
    assert_eq!(q.unfinished(), 5);
    for _ in 0..5 {
        q.get().unwrap();
        q.task_done().unwrap();
    }
    assert_eq!(q.unfinished(), 0);
    let e = q.task_done().unwrap_err();
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidInput);
    assert!(q.join_timeout(Duration::ZERO).unwrap());
}

#[test]
fn bounded_zero_is_invalid() {
    let e = Queue::<u8>::bounded(0).unwrap_err();
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::InvalidInput);
    assert!(JoinableQueue::<u8>::bounded(0).is_err());
}

#[test]
fn threads_share_a_queue() {
    let q = Queue::<(u32, u32)>::bounded(16).unwrap();
    let producers: Vec<_> = (0..3)
        .map(|p| {
            let q = q.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    q.put(&(p, i)).unwrap();
                }
            })
        })
        .collect();
    let mut next = [0u32; 3];
    for _ in 0..6000 {
        let (p, i) = q.get_timeout(Duration::from_secs(20)).unwrap().unwrap();
        assert_eq!(next[p as usize], i, "producer {p} out of order");
        next[p as usize] += 1;
    }
    for h in producers {
        h.join().unwrap();
    }
    assert!(q.is_empty());
}

#[test]
fn a_reentrant_serialize_gets_its_own_buffer() {
    struct Nested(Queue<u8>);
    impl Serialize for Nested {
        fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
            self.0.put(&9).unwrap();
            s.serialize_u8(5)
        }
    }
    let inner = Queue::<u8>::new().unwrap();
    let outer_core = Queue::<u8>::new().unwrap();
    with_buffer(|buf| {
        codec::encode_frame(&Nested(inner.clone()), buf).unwrap();
        outer_core
            .shared
            .put_frame(buf, shared::Wait::Forever)
            .unwrap();
    });
    assert_eq!(inner.get().unwrap(), 9);
    assert_eq!(outer_core.get().unwrap(), 5);
}

#[test]
fn handles_are_send_sync_and_clone_for_any_t() {
    fn check<Q: Send + Sync + Clone + fmt::Debug>() {}
    // Values cross as bytes, so even a `T` that is neither Send nor Sync
    // leaves the handle both.
    check::<Queue<std::rc::Rc<u8>>>();
    check::<JoinableQueue<std::cell::Cell<u8>>>();
}

#[test]
fn try_get_and_try_put_wait_for_a_copy_in_progress_not_for_messages() {
    let q = Queue::<u8>::bounded(2).unwrap();
    q.put(&1).unwrap();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let q = q.clone();
        std::thread::spawn(move || {
            let _guard = q.shared.hold_lock();
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv_timeout(Duration::from_secs(20));
        })
    };
    locked_rx.recv_timeout(Duration::from_secs(20)).unwrap();
    // A timed get gives up on the lock at its deadline...
    assert_eq!(q.get_timeout(Duration::from_millis(20)).unwrap(), None);
    // ...try_get waits for it, and finds the message.
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        release_tx.send(()).unwrap();
    });
    assert_eq!(q.try_get().unwrap(), Some(1));
    assert!(q.try_put(&2).unwrap());
    assert!(q.try_put(&3).unwrap());
    assert!(!q.try_put(&4).unwrap());
    assert_eq!(q.try_get().unwrap(), Some(2));
    holder.join().unwrap();
    releaser.join().unwrap();
}
