//! Panics inside forked children: caught, reported with one raw `write(2)`.
//!
//! std's default panic hook takes the stderr lock and, with
//! `RUST_BACKTRACE`, the backtrace lock. In a forked child either may be held
//! forever by a parent thread that no longer exists. The hook installed here
//! (once, in the parent, before the first fork) keeps the previous hook for
//! every ordinary thread, and on the main thread of a child this crate forked
//! writes one line instead: the process name, pid, location and message.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use crate::sys;

/// A panic caught in a child.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct PanicReport {
    pub(crate) message: String,
    pub(crate) location: Option<String>,
}

impl From<PanicReport> for crate::Error {
    fn from(p: PanicReport) -> crate::Error {
        crate::Error::Panicked {
            message: p.message,
            location: p.location,
        }
    }
}

/// Location of the last panic on the main thread of a forked child, written
/// by the hook. Only that one thread ever locks it (the hook records nothing
/// for other threads), so no other thread can hold it at a fork. A static
/// rather than a thread-local: a thread-local with a destructor would be
/// registered (and a page written) in every child, panic or not.
static LAST_LOCATION: Mutex<Option<String>> = Mutex::new(None);

fn last_location() -> std::sync::MutexGuard<'static, Option<String>> {
    LAST_LOCATION.lock().unwrap_or_else(|e| e.into_inner())
}

static HOOK: Once = Once::new();

/// How the hook names the process that panicked: set by the process layer
/// (which knows names), as an address: lock-free, and no import of it here.
static DESCRIBER: AtomicUsize = AtomicUsize::new(0);

/// Sets how panics in children name their process: `(name, pid)`.
/// Stored once: a write on every start would dirty the page again after
/// each fork (a copy-on-write fault in the parent).
pub(crate) fn set_describer(f: fn() -> (String, u32)) {
    let f = sys::fn_addr(f);
    if DESCRIBER.load(Ordering::Acquire) != f {
        DESCRIBER.store(f, Ordering::Release);
    }
}

fn describe() -> (String, u32) {
    match DESCRIBER.load(Ordering::Acquire) {
        0 => ("MainProcess".to_string(), std::process::id()),
        f => sys::fn_from_addr::<fn() -> (String, u32)>(f)(),
    }
}

/// Installs the crate's panic hook (once), chaining to the hook in place.
pub(crate) fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !(sys::in_forked_child() && sys::is_main_thread()) {
                return previous(info);
            }
            let location = info.location().map(|l| l.to_string());
            let message = payload_message(info.payload());
            let (name, pid) = describe();
            let line = format!(
                "process '{}' (pid {}) panicked at {}: {}\n",
                name,
                pid,
                location.as_deref().unwrap_or("<unknown>"),
                message
            );
            sys::write_stderr_raw(line.as_bytes());
            *last_location() = location;
        }));
    });
}

/// The message of a panic payload.
pub(crate) fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_string()
    }
}

/// Runs `f`, catching a panic as a [`PanicReport`].
pub(crate) fn catch<R>(f: impl FnOnce() -> R) -> Result<R, PanicReport> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload_message(&*payload);
        // Dropping a payload can itself panic; never let that unwind.
        let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
        PanicReport {
            message,
            // Set by the hook for this very panic (it runs before unwinding).
            location: last_location().take(),
        }
    })
}
