//! `fallocate(2)`: backing pages for a memfd before they are written.

use std::io;
use std::os::fd::BorrowedFd;

use nix::fcntl::{fallocate, FallocateFlags};

/// Allocates the first `len` bytes of the file behind `fd` (a memfd),
/// growing it if shorter. A write into a memfd page that cannot be
/// allocated raises `SIGBUS`; allocating first turns that into an
/// `ENOSPC`/`ENOMEM` error here.
pub(crate) fn allocate(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
    let len = i64::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    fallocate(fd, FallocateFlags::empty(), 0, len)?;
    Ok(())
}
