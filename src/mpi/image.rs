//! The executable image as other ranks see it: task functions cross ranks
//! as offsets from a known function of this crate (ASLR maps the binary at
//! a different address on each rank), checked against the executable's
//! code mappings on both sides; the handshake compares a checksum of the
//! executable file so every rank runs the same build.

use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::sys;

/// The known function whose address every offset is taken from.
fn anchor() {}

fn anchor_addr() -> usize {
    sys::fn_addr(anchor as fn())
}

/// The address ranges of the executable file's code mappings (read from
/// `/proc/self/maps` once).
fn text_ranges() -> &'static [Range<usize>] {
    static RANGES: OnceLock<Vec<Range<usize>>> = OnceLock::new();
    RANGES.get_or_init(|| {
        let exe = std::fs::read_link("/proc/self/exe").ok();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let exe = exe
            .as_ref()
            .and_then(|p| p.to_str())
            .map(|s| s.trim_end_matches(" (deleted)"));
        parse_maps(&maps, exe)
    })
}

/// The executable ranges of `maps` (the text of `/proc/self/maps`) that map
/// the file `exe`.
pub(crate) fn parse_maps(maps: &str, exe: Option<&str>) -> Vec<Range<usize>> {
    let Some(exe) = exe else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut f = line.splitn(6, ' ');
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(3).map(str::trim).unwrap_or("");
        if !perms.contains('x') || path.trim_end_matches(" (deleted)") != exe {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
            out.push(a..b);
        }
    }
    out
}

fn in_text(addr: usize) -> bool {
    text_ranges().iter().any(|r| r.contains(&addr))
}

/// The offset to send for the function at `addr`, which must lie in the
/// executable's code.
///
/// # Errors
/// [`Error::Mpi`] for an address outside the executable (a function of a
/// shared library, or garbage).
pub(crate) fn offset_of(addr: usize, what: &str) -> Result<u64> {
    if !in_text(addr) {
        return Err(outside(addr, what));
    }
    Ok(addr.wrapping_sub(anchor_addr()) as u64)
}

/// The address here of the function at `offset` from the anchor, checked
/// to lie in the executable's code.
///
/// # Errors
/// [`Error::Mpi`] if it does not.
pub(crate) fn addr_of(offset: u64, what: &str) -> Result<usize> {
    let addr = anchor_addr().wrapping_add(offset as usize);
    if !in_text(addr) {
        return Err(outside(addr, what));
    }
    Ok(addr)
}

fn outside(addr: usize, what: &str) -> Error {
    Error::Mpi {
        reason: format!(
            "the {what} at {addr:#x} is not in the executable's code: only functions of the program itself can run on other ranks"
        ),
    }
}

/// A checksum of the executable file (computed once): equal on two ranks
/// when they run the same build.
pub(crate) fn checksum() -> Result<u64> {
    static SUM: OnceLock<std::result::Result<u64, String>> = OnceLock::new();
    SUM.get_or_init(|| {
        File::open("/proc/self/exe")
            .and_then(hash_reader)
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(|e| Error::Mpi {
        reason: format!("cannot read the executable to checksum it: {e}"),
    })
}

/// A 64-bit hash of everything `r` yields (not cryptographic: it tells
/// builds apart, it does not resist forgery).
pub(crate) fn hash_reader(mut r: impl Read) -> io::Result<u64> {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    let mut len: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        len += n as u64;
        let (words, tail) = buf[..n].split_at(n / 8 * 8);
        for w in words.chunks_exact(8) {
            h = mix(h ^ u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        for &b in tail {
            h = mix(h ^ u64::from(b));
        }
    }
    Ok(mix(h ^ len))
}

#[inline]
fn mix(x: u64) -> u64 {
    let x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x: u64) -> u64 {
        x * x
    }

    #[test]
    fn own_functions_round_trip_through_offsets() {
        let f = sys::fn_addr(square as fn(u64) -> u64);
        let off = offset_of(f, "task function").unwrap();
        assert_eq!(addr_of(off, "task function").unwrap(), f);
    }

    #[test]
    fn a_library_function_is_refused() {
        let libc_fn = nix::libc::getpid as *const () as usize;
        let e = offset_of(libc_fn, "task function").unwrap_err();
        assert!(e.is_mpi(), "{e:?}");
        assert!(
            e.to_string().contains("not in the executable's code"),
            "{e}"
        );
        assert!(addr_of(u64::MAX / 2, "task function").is_err());
    }

    #[test]
    fn maps_parsing() {
        let maps = "\
55d0c0a00000-55d0c0a10000 r--p 00000000 08:01 42   /bin/prog
55d0c0a10000-55d0c0a80000 r-xp 00010000 08:01 42   /bin/prog
7f0000000000-7f0000100000 r-xp 00000000 08:01 43   /lib/libc.so.6
7f0000200000-7f0000300000 r-xp 00000000 00:00 0 
";
        assert_eq!(
            parse_maps(maps, Some("/bin/prog")),
            vec![0x55d0c0a10000..0x55d0c0a80000]
        );
        assert!(parse_maps(maps, None).is_empty());
    }

    #[test]
    fn checksum_tells_contents_apart() {
        let a = hash_reader(&b"same build"[..]).unwrap();
        assert_eq!(a, hash_reader(&b"same build"[..]).unwrap());
        assert_ne!(a, hash_reader(&b"same build!"[..]).unwrap());
        assert_ne!(
            hash_reader(&[0u8; 9][..]).unwrap(),
            hash_reader(&[0u8; 8][..]).unwrap()
        );
        assert_eq!(checksum().unwrap(), checksum().unwrap());
    }
}
