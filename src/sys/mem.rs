//! Memory helpers of the codec's hot path: the few spots where safe code
//! costs a call to `memcpy` per encoded integer.

use std::ptr;

/// Appends `data` (at most 16 bytes: a varint, a short string) to `out`
/// with fixed-size moves instead of a call to `memcpy`, which costs more
/// than the copy itself at these sizes (encoding a `u64` was half byte loop).
#[inline(always)]
pub(crate) fn extend_small(out: &mut Vec<u8>, data: &[u8]) {
    let n = data.len();
    if n > 16 {
        out.extend_from_slice(data);
        return;
    }
    out.reserve(16);
    let len = out.len();
    let src = data.as_ptr();
    // SAFETY: `reserve(16)` guarantees room for 16 bytes after `len`, and
    // `n <= 16`, so every write below lands in `out`'s allocation at
    // `len..len + n`; every read is inside `data` (`0..n`). The two moves of
    // each branch overlap when `n` is not a power of two, which is fine for
    // `copy_nonoverlapping` because source and destination are different
    // buffers (`data` is not borrowed from `out`: `out` is `&mut`). Then
    // `len..len + n` is initialized, so the new length is valid.
    unsafe {
        let dst = out.as_mut_ptr().add(len);
        if n >= 8 {
            ptr::copy_nonoverlapping(src, dst, 8);
            ptr::copy_nonoverlapping(src.add(n - 8), dst.add(n - 8), 8);
        } else if n >= 4 {
            ptr::copy_nonoverlapping(src, dst, 4);
            ptr::copy_nonoverlapping(src.add(n - 4), dst.add(n - 4), 4);
        } else if n > 0 {
            // 1 to 3 bytes: first, middle, last (some the same byte).
            *dst = *src;
            *dst.add(n / 2) = *src.add(n / 2);
            *dst.add(n - 1) = *src.add(n - 1);
        }
        out.set_len(len + n);
    }
}

#[cfg(test)]
mod tests {
    use super::extend_small;

    #[test]
    fn every_small_length_appends_exactly_its_bytes() {
        for n in 0..=40usize {
            let data: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(37) ^ 0x5a).collect();
            let mut out = vec![1u8, 2, 3];
            extend_small(&mut out, &data);
            assert_eq!(&out[..3], &[1, 2, 3]);
            assert_eq!(&out[3..], &data[..], "length {n}");
        }
    }

    #[test]
    fn appends_at_a_full_capacity() {
        let mut out = Vec::with_capacity(4);
        out.extend_from_slice(&[9, 9, 9, 9]);
        extend_small(&mut out, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(out, [9, 9, 9, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    }
}
