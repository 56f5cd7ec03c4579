//! Copies out of a [`SharedMapping`] into uninitialized buffer space: the
//! queue's hot path for large messages, where zero-filling a buffer first
//! costs as much as the copy.

use std::io;
use std::ptr;

use super::SharedMapping;

/// Appends the `len` bytes at `offset` of `map` to `out`, without
/// zero-filling `out`'s new space first.
pub(crate) fn read_append(
    map: &SharedMapping,
    offset: usize,
    len: usize,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= map.len() => {}
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range out of bounds of the shared memory",
            ))
        }
    }
    out.reserve(len);
    let at = out.len();
    // SAFETY: `offset..offset + len` is inside the mapping (checked above),
    // which stays mapped while `map` is borrowed. `reserve(len)` guarantees
    // `len` bytes of spare capacity after `at`, so the destination is inside
    // `out`'s allocation, which cannot overlap the mapping (it is our own
    // heap memory). After the copy `at..at + len` is initialized with plain
    // bytes (`u8` has no invalid values, whatever another process wrote
    // concurrently), so the new length is valid.
    unsafe {
        ptr::copy_nonoverlapping(map.as_ptr().add(offset), out.as_mut_ptr().add(at), len);
        out.set_len(at + len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_exactly_the_range_and_checks_bounds() {
        let m = SharedMapping::anonymous(64).unwrap();
        m.write_at(10, b"abcdef").unwrap();
        let mut out = b"xy".to_vec();
        read_append(&m, 11, 4, &mut out).unwrap();
        assert_eq!(out, b"xybcde");
        read_append(&m, 64, 0, &mut out).unwrap();
        assert_eq!(out.len(), 6);
        assert!(read_append(&m, 61, 4, &mut out).is_err());
        assert!(read_append(&m, usize::MAX, 2, &mut out).is_err());
        assert_eq!(out, b"xybcde");
    }
}
