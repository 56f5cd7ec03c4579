//! Facts about the calling process: pids, threads, open fds.

use std::io;

use nix::unistd::Pid;

/// `getpid()`.
pub(crate) fn getpid() -> Pid {
    nix::unistd::getpid()
}

/// `getppid()`.
pub(crate) fn getppid() -> Pid {
    nix::unistd::getppid()
}

/// `true` on the process's main thread (its tid is its pid). In a forked
/// child the forking thread is the only one and always the main thread.
pub(crate) fn is_main_thread() -> bool {
    nix::unistd::gettid() == nix::unistd::getpid()
}

/// The number of threads of the calling process (`/proc/self/task`).
pub(crate) fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
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
