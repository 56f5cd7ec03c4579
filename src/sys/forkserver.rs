//! System calls of the fork server: `SOCK_SEQPACKET` pairs, messages with
//! fds (`SCM_RIGHTS`), `pidfd_send_signal`, and the addresses of plain
//! functions carried to the server (a fork of the same image).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::Signal;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};

/// The most fds one message carries.
pub(crate) const MAX_FDS: usize = 4;

/// A connected `AF_UNIX` `SOCK_SEQPACKET` pair with `SOCK_CLOEXEC`: message
/// boundaries are kept, so one request is one `recvmsg`.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Sends `data` and `fds` as one message (`MSG_NOSIGNAL`: a vanished peer
/// is `EPIPE`), retried on `EINTR`.
pub(crate) fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    loop {
        match socket::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message into `buf`: its length (0 at end of file) and the
/// fds it carried, owned and close-on-exec. A message longer than `buf` is
/// an error (`EMSGSIZE`), never a silent cut.
pub(crate) fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        match socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        for fd in raw {
                            // SAFETY: the kernel installed these fds in our
                            // table for this message; nothing else owns them.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
                let n = msg.bytes;
                if truncated {
                    return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
                }
                return Ok((n, fds));
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// `recv(MSG_DONTWAIT)`: `None` if nothing is there yet, else the bytes
/// read (0 at end of file).
pub(crate) fn recv_nonblocking(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match socket::recv(sock.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => return Ok(Some(n)),
            Err(Errno::EAGAIN) => return Ok(None),
            Err(Errno::EINTR) => {}
            // The server's end vanished with an error: as an end of file.
            Err(Errno::ECONNRESET) => return Ok(Some(0)),
            Err(e) => return Err(e.into()),
        }
    }
}

/// `pidfd_send_signal(pidfd, sig)`: signals exactly the process the pidfd
/// names. Once it has been reaped (by whoever), `ESRCH`: no recycled pid can
/// be hit.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: Signal) -> io::Result<()> {
    // SAFETY: the syscall reads only its integer arguments; `info` is NULL,
    // which the kernel documents as "like kill(2)".
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The address of a hook (`fn()`), to carry to the fork server.
pub(crate) fn hook_addr(f: fn()) -> usize {
    f as usize
}

/// The hook whose address is `addr`.
///
/// Contract (crate-private): `addr` comes from [`hook_addr`] in this process
/// or in a process of the same executable image this one is a `fork` of, or
/// that is a fork of this one (the fork server and its caller).
pub(crate) fn hook_from_addr(addr: usize) -> fn() {
    const { assert!(mem::size_of::<fn()>() == mem::size_of::<usize>()) };
    // SAFETY: by the contract, `addr` is the address of a `fn()` in the same
    // image mapped at the same addresses (fork, no exec), so it names the
    // same function here; it came from a fn pointer, so it is not null.
    unsafe { mem::transmute::<usize, fn()>(addr) }
}

/// The panic hook's describer (`unwind::set_describer`), from its address;
/// the contract of [`hook_from_addr`] (here: the same process, or a fork).
pub(crate) fn describer_from_addr(addr: usize) -> fn() -> (String, u32) {
    const { assert!(mem::size_of::<fn() -> (String, u32)>() == mem::size_of::<usize>()) };
    // SAFETY: as in `hook_from_addr`, for a `fn() -> (String, u32)`.
    unsafe { mem::transmute::<usize, fn() -> (String, u32)>(addr) }
}

/// The signature of a fork-server task's trampoline: `(the user's function
/// address, the encoded argument) -> exit code`.
pub(crate) type TaskTrampoline = fn(usize, &[u8]) -> i32;

/// The address of a task trampoline.
pub(crate) fn trampoline_addr(f: TaskTrampoline) -> usize {
    f as usize
}

/// The trampoline whose address is `addr`; the contract of [`hook_from_addr`].
pub(crate) fn trampoline_from_addr(addr: usize) -> TaskTrampoline {
    const { assert!(mem::size_of::<TaskTrampoline>() == mem::size_of::<usize>()) };
    // SAFETY: as in `hook_from_addr`, for a `TaskTrampoline`.
    unsafe { mem::transmute::<usize, TaskTrampoline>(addr) }
}

/// What a child of the fork server runs right after the fork: `(the
/// request's payload, its fds, the server's pid) -> exit code`. The layer
/// that asks for the child names it by address (the server is a fork of
/// the same image), so the server knows no layer above it.
pub(crate) type ServerRunner = fn(&[u8], Vec<OwnedFd>, u32) -> i32;

/// The address of a [`ServerRunner`].
pub(crate) fn runner_addr(f: ServerRunner) -> usize {
    f as usize
}

/// The runner whose address is `addr`; the contract of [`hook_from_addr`].
pub(crate) fn runner_from_addr(addr: usize) -> ServerRunner {
    const { assert!(mem::size_of::<ServerRunner>() == mem::size_of::<usize>()) };
    // SAFETY: as in `hook_from_addr`, for a `ServerRunner`.
    unsafe { mem::transmute::<usize, ServerRunner>(addr) }
}

/// Makes the target of a child of the fork server from its job's bytes and
/// fds (a task, a pool worker): `(job, fds) -> target`.
pub(crate) type JobMain = fn(&[u8], Vec<OwnedFd>) -> Box<dyn FnOnce() + Send + 'static>;

/// The address of a [`JobMain`].
pub(crate) fn job_main_addr(f: JobMain) -> usize {
    f as usize
}

/// The job main whose address is `addr`; the contract of [`hook_from_addr`].
pub(crate) fn job_main_from_addr(addr: usize) -> JobMain {
    const { assert!(mem::size_of::<JobMain>() == mem::size_of::<usize>()) };
    // SAFETY: as in `hook_from_addr`, for a `JobMain`.
    unsafe { mem::transmute::<usize, JobMain>(addr) }
}

/// The user's `fn(A)` of a task, from its address; the contract of
/// [`hook_from_addr`], for `fn(A)`.
pub(crate) fn task_fn_from_addr<A>(addr: usize) -> fn(A) {
    const { assert!(mem::size_of::<fn(A)>() == mem::size_of::<usize>()) };
    // SAFETY: as in `hook_from_addr`, for a `fn(A)` whose `A` the caller's
    // monomorphized trampoline names.
    unsafe { mem::transmute_copy::<usize, fn(A)>(&addr) }
}

/// `fn(A)` to its address.
pub(crate) fn task_fn_addr<A>(f: fn(A)) -> usize {
    f as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn hook() {}

    #[test]
    fn hook_address_round_trip() {
        let f = hook_from_addr(hook_addr(hook));
        f();
        assert_eq!(hook_addr(f), hook_addr(hook));
    }

    #[test]
    fn message_with_fds() {
        let (a, b) = seqpacket_pair().unwrap();
        let (r, w) = crate::sys::pipe().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[r.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        crate::sys::write_all(w.as_fd(), b"x").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(crate::sys::read(fds[0].as_fd(), &mut one).unwrap(), 1);
        drop(a);
        assert_eq!(recv_with_fds(b.as_fd(), &mut buf).unwrap().0, 0);
    }
}
