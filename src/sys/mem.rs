//! Memory: small copies without `memcpy` for the codec's hot path,
//! [`LeakedCell`] (a lock-free, leaked, once-published value, readable after
//! a fork), [`Slots`] (results decoded straight into their final place).

use std::mem;
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

/// A write-rarely cell of leaked values: `set` leaks a box and publishes it,
/// `get` reads the latest one. Values are never freed, so a reference
/// handed out stays valid for the life of the process, whatever `set` does
/// later. Lock-free: safe to use right after `fork`.
pub(crate) struct LeakedCell<T: 'static>(std::sync::atomic::AtomicPtr<T>);

impl<T: 'static> LeakedCell<T> {
    pub(crate) const fn new() -> Self {
        LeakedCell(std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()))
    }

    pub(crate) fn get(&self) -> Option<&'static T> {
        let p = self.0.load(std::sync::atomic::Ordering::Acquire);
        // SAFETY: the only non-null values stored are from `Box::leak` in
        // `set`, published with Release and never freed, so the pointee is
        // initialized and lives for the rest of the process.
        unsafe { p.as_ref() }
    }

    /// Forgets the value (it stays leaked: references handed out stay
    /// valid).
    pub(crate) fn clear(&self) {
        self.0
            .store(std::ptr::null_mut(), std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn set(&self, value: T) {
        self.set_boxed(Box::new(value));
    }

    /// Publishes an already boxed value (no allocation: usable right after
    /// a fork with the box built before it).
    pub(crate) fn set_boxed(&self, value: Box<T>) {
        let p: *mut T = Box::leak(value);
        self.0.store(p, std::sync::atomic::Ordering::Release);
    }
}

/// The bitmap words and masks of bits `start..end`.
fn bit_masks(start: usize, end: usize) -> impl Iterator<Item = (usize, u64)> {
    let words = if start < end {
        start / 64..(end - 1) / 64 + 1
    } else {
        0..0
    };
    words.map(move |w| {
        let lo = start.max(w * 64) - w * 64;
        let hi = end.min(w * 64 + 64) - w * 64;
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w, mask)
    })
}

/// A fixed number of result slots filled in any order, each exactly once,
/// then turned into a `Vec<R>` in place: the pool decodes every result
/// straight into its final position (no `Option` per item, no second copy
/// of the output). A bitmap records which slots hold a value.
pub(crate) struct Slots<R> {
    buf: Vec<mem::MaybeUninit<R>>,
    filled: Vec<u64>,
    count: usize,
}

impl<R> Slots<R> {
    /// `n` empty slots. The memory is reserved, not touched.
    pub(crate) fn new(n: usize) -> Slots<R> {
        let mut buf = Vec::with_capacity(n);
        // SAFETY: the capacity is at least `n`, and `MaybeUninit<R>` needs no
        // initialization: every bit pattern, including none, is a valid one.
        unsafe { buf.set_len(n) };
        Slots {
            buf,
            filled: vec![0u64; n.div_ceil(64)],
            count: 0,
        }
    }

    /// Whether every slot holds a value.
    pub(crate) fn is_full(&self) -> bool {
        self.count == self.buf.len()
    }

    /// Puts `value` in slot `i`; gives it back if `i` is out of range or the
    /// slot is taken.
    #[inline]
    pub(crate) fn put(&mut self, i: usize, value: R) -> std::result::Result<(), R> {
        if i >= self.buf.len() {
            return Err(value);
        }
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.filled[word] & bit != 0 {
            return Err(value);
        }
        self.buf[i].write(value);
        self.filled[word] |= bit;
        self.count += 1;
        Ok(())
    }

    /// Puts the values `next` gives in slots `start..start + n`, in order:
    /// `Err(None)` (nothing written) if the range is out of bounds or a slot
    /// in it is taken; `Err(Some(e))` if `next` fails, the values before it
    /// kept.
    #[inline]
    pub(crate) fn put_run<E>(
        &mut self,
        start: usize,
        n: usize,
        mut next: impl FnMut() -> std::result::Result<R, E>,
    ) -> std::result::Result<(), Option<E>> {
        let end = start.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(None);
        };
        if bit_masks(start, end).any(|(w, m)| self.filled[w] & m != 0) {
            return Err(None);
        }
        let mut failed = None;
        let mut i = start;
        for slot in &mut self.buf[start..end] {
            match next() {
                Ok(v) => {
                    slot.write(v);
                    i += 1;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        for (w, m) in bit_masks(start, i) {
            self.filled[w] |= m;
        }
        self.count += i - start;
        match failed {
            None => Ok(()),
            e => Err(e),
        }
    }

    /// The values in slot order, if every slot holds one.
    pub(crate) fn into_vec(self) -> Option<Vec<R>> {
        if !self.is_full() {
            return None;
        }
        let mut this = mem::ManuallyDrop::new(self);
        let mut buf = mem::ManuallyDrop::new(mem::take(&mut this.buf));
        // SAFETY: the bitmap is dropped with `this`'s other fields below;
        // every slot of `buf` has been written exactly once (`count` equals
        // the length and `put` refuses a second write), so its elements are
        // initialized `R`s. `MaybeUninit<R>` has the size and alignment of
        // `R`, so the pointer, length and capacity describe a valid
        // `Vec<R>` allocation, which `buf` (never dropped) no longer owns.
        let out =
            unsafe { Vec::from_raw_parts(buf.as_mut_ptr().cast::<R>(), buf.len(), buf.capacity()) };
        drop(mem::take(&mut this.filled));
        Some(out)
    }
}

impl<R> Drop for Slots<R> {
    fn drop(&mut self) {
        if !mem::needs_drop::<R>() {
            return;
        }
        for (i, slot) in self.buf.iter_mut().enumerate() {
            if self.filled[i / 64] & (1u64 << (i % 64)) != 0 {
                // SAFETY: the bit says slot `i` was written by `put` and not
                // moved out since (`into_vec` empties `buf` before it could
                // be dropped here), so it holds an initialized `R`, dropped
                // exactly once.
                unsafe { slot.assume_init_drop() };
            }
        }
    }
}

impl<R> std::fmt::Debug for Slots<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("len", &self.buf.len())
            .field("filled", &self.count)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::{extend_small, Slots};

    #[test]
    fn runs_of_slots_fill_once_and_keep_what_came_before_a_failure() {
        let mut s: Slots<String> = Slots::new(200);
        let mut k = 0;
        let mut next = || -> Result<String, &str> {
            k += 1;
            Ok(k.to_string())
        };
        assert!(s.put_run(60, 100, &mut next).is_ok());
        // Overlapping, out of range: refused, nothing written.
        assert!(matches!(s.put_run(150, 20, &mut next), Err(None)));
        assert!(matches!(s.put_run(190, 20, &mut next), Err(None)));
        assert!(s.put(100, "x".into()).is_err());
        // A failure keeps the values before it (dropped with the slots).
        let mut n = 0;
        let r = s.put_run(0, 60, || {
            n += 1;
            if n == 30 {
                Err("bad")
            } else {
                Ok(String::from("y"))
            }
        });
        assert!(matches!(r, Err(Some("bad"))));
        assert!(s.put(28, "z".into()).is_err(), "kept");
        assert!(s.put(29, "z".into()).is_ok(), "not written");
        for i in (30..60).chain(160..200) {
            s.put(i, "w".into()).unwrap();
        }
        assert!(matches!(
            s.put_run(0, 28, || Ok::<_, ()>(String::new())),
            Err(None)
        ));
        let v = s.into_vec().expect("every slot holds a value");
        assert_eq!(v.len(), 200);
        assert_eq!((&*v[60], &*v[159]), ("1", "100"));
        assert_eq!((&*v[28], &*v[29]), ("y", "z"));
    }

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

#[cfg(test)]
mod slots_tests {
    use super::Slots;
    use std::rc::Rc;

    #[test]
    fn out_of_order_fill_gives_the_values_in_slot_order() {
        let mut s = Slots::new(130);
        for i in (0..130).rev() {
            s.put(i, i * 2).unwrap();
        }
        assert_eq!(s.put(5, 0), Err(0), "a second write is refused");
        assert_eq!(s.put(130, 0), Err(0), "out of range is refused");
        let v = s.into_vec().unwrap();
        assert_eq!(v, (0..130).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn partial_slots_drop_exactly_the_values_they_hold() {
        let tracker = Rc::new(());
        let mut s = Slots::new(100);
        for i in (0..100).step_by(3) {
            s.put(i, Rc::clone(&tracker)).unwrap();
        }
        assert!(!s.is_full());
        assert_eq!(Rc::strong_count(&tracker), 35);
        drop(s);
        assert_eq!(Rc::strong_count(&tracker), 1);
        let mut s = Slots::new(2);
        s.put(0, Rc::clone(&tracker)).unwrap();
        assert!(s.into_vec().is_none(), "not full");
        assert_eq!(Rc::strong_count(&tracker), 1);
    }

    #[test]
    fn empty_slots_make_an_empty_vec() {
        let s: Slots<String> = Slots::new(0);
        assert_eq!(s.into_vec().unwrap(), Vec::<String>::new());
    }
}
