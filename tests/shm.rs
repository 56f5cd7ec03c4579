//! SharedMemory: anonymous through fork, and named POSIX shared memory.

mod common;

use std::io::ErrorKind;

use common::{exit_code, start};
use multiproc::SharedMemory;

fn kind(e: multiproc::Error) -> ErrorKind {
    std::io::Error::from(e).kind()
}

/// A name no other test (or test run) uses.
fn unique(tag: &str) -> String {
    format!("psm_multiproc_test_{}_{tag}", std::process::id())
}

/// Unlinks the name at the end of the test, even when an assertion failed.
struct Unlink(String);

impl Drop for Unlink {
    fn drop(&mut self) {
        if let Ok(m) = SharedMemory::open(&self.0) {
            let _ = m.unlink();
        }
    }
}

#[test]
fn anonymous_memory_is_shared_with_a_forked_child() {
    let shm = SharedMemory::new(8192).unwrap();
    shm.write_at(0, b"from parent").unwrap();
    let s = shm.clone();
    let child = start(move || {
        let mut buf = [0u8; 11];
        s.read_at(0, &mut buf).unwrap();
        s.write_at(8000, b"from child").unwrap();
        multiproc::exit(if &buf == b"from parent" { 0 } else { 1 });
    });
    assert_eq!(exit_code(&child), 0);
    let mut buf = [0u8; 10];
    shm.read_at(8000, &mut buf).unwrap();
    assert_eq!(&buf, b"from child");
    assert_eq!(shm.len(), 8192);
    assert_eq!(shm.name(), None);
    assert_eq!(kind(shm.unlink().unwrap_err()), ErrorKind::InvalidInput);
}

#[test]
fn named_memory_is_found_by_name_until_unlinked() {
    let name = unique("named");
    let _cleanup = Unlink(name.clone());
    let shm = SharedMemory::create(&name, 100).unwrap();
    assert_eq!(shm.name(), Some(name.as_str()));
    assert_eq!(shm.len(), 100);
    let n = name.clone();
    // The child opens it by name, as an unrelated process would.
    let child = start(move || {
        let m = SharedMemory::open(&n).unwrap();
        let ok = m.len() == 100 && m.name() == Some(n.as_str());
        m.write_at(90, b"0123456789").unwrap();
        multiproc::exit(if ok { 0 } else { 1 });
    });
    assert_eq!(exit_code(&child), 0);
    let mut buf = [0u8; 10];
    shm.read_at(90, &mut buf).unwrap();
    assert_eq!(&buf, b"0123456789");

    // A leading '/' is trimmed.
    let again = SharedMemory::open(&format!("/{name}")).unwrap();
    assert_eq!(again.name(), Some(name.as_str()));
    again.read_at(90, &mut buf).unwrap();
    assert_eq!(&buf, b"0123456789");

    shm.unlink().unwrap();
    assert_eq!(
        kind(SharedMemory::open(&name).unwrap_err()),
        ErrorKind::NotFound
    );
    assert_eq!(kind(shm.unlink().unwrap_err()), ErrorKind::NotFound);
    // Existing mappings live on.
    again.write_at(0, b"still here").unwrap();
    shm.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf, b"still here");
}

#[test]
fn open_of_a_missing_name_is_not_found() {
    let err = SharedMemory::open(&unique("missing")).unwrap_err();
    assert_eq!(kind(err), ErrorKind::NotFound);
}

#[test]
fn create_of_an_existing_name_is_already_exists() {
    let name = unique("exists");
    let _cleanup = Unlink(name.clone());
    let first = SharedMemory::create(&name, 10).unwrap();
    first.write_at(0, &[7]).unwrap();
    let err = SharedMemory::create(&format!("/{name}"), 20).unwrap_err();
    assert_eq!(kind(err), ErrorKind::AlreadyExists);
    // The existing object is untouched.
    let m = SharedMemory::open(&name).unwrap();
    assert_eq!(m.len(), 10);
    let mut b = [0u8];
    m.read_at(0, &mut b).unwrap();
    assert_eq!(b, [7]);
    first.unlink().unwrap();
}

#[test]
fn bad_sizes_names_and_ranges_are_errors() {
    assert_eq!(
        kind(SharedMemory::new(0).unwrap_err()),
        ErrorKind::InvalidInput
    );
    for bad in ["", "/", "a/b", "//x", &"x".repeat(300), "nul\0byte"] {
        assert_eq!(
            kind(SharedMemory::create(bad, 8).unwrap_err()),
            ErrorKind::InvalidInput,
            "create({bad:?})"
        );
        assert_eq!(
            kind(SharedMemory::open(bad).unwrap_err()),
            ErrorKind::InvalidInput,
            "open({bad:?})"
        );
    }
    let name = unique("zero");
    assert_eq!(
        kind(SharedMemory::create(&name, 0).unwrap_err()),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        kind(SharedMemory::open(&name).unwrap_err()),
        ErrorKind::NotFound
    );

    let shm = SharedMemory::new(16).unwrap();
    let mut buf = [0u8; 4];
    assert!(shm.read_at(12, &mut buf).is_ok());
    assert!(shm.write_at(12, &buf).is_ok());
    for offset in [13, 16, 17, usize::MAX - 1, usize::MAX] {
        assert_eq!(
            kind(shm.read_at(offset, &mut buf).unwrap_err()),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            kind(shm.write_at(offset, &buf).unwrap_err()),
            ErrorKind::InvalidInput
        );
    }
    assert!(shm.read_at(16, &mut []).is_ok());
    assert!(shm.write_at(17, &[]).is_err());
}

#[test]
fn unsafe_views_see_the_bytes() {
    let shm = SharedMemory::new(4).unwrap();
    // SAFETY: no other process or thread has this memory, and no other view
    // of it is alive.
    unsafe { shm.as_mut_slice() }.copy_from_slice(&[1, 2, 3, 4]);
    // SAFETY: as above; no writer while the slice lives.
    assert_eq!(unsafe { shm.as_slice() }, &[1, 2, 3, 4]);
}
