//! Panics inside forked children: caught, reported with one raw `write(2)`.
//!
//! std's default panic hook takes the stderr lock and, with
//! `RUST_BACKTRACE`, the backtrace lock. In a forked child either may be held
//! forever by a parent thread that no longer exists. The hook installed here
//! (once, in the parent, before the first fork) keeps the previous hook for
//! every ordinary thread, and on the main thread of a child this crate forked
//! writes one line instead: the process name, pid, location and message.

use std::any::Any;
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

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

thread_local! {
    /// Location of the last panic on this thread, recorded by the hook.
    static LAST_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

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
            let me = crate::process::current_process();
            let line = format!(
                "process '{}' (pid {}) panicked at {}: {}\n",
                me.name(),
                me.pid(),
                location.as_deref().unwrap_or("<unknown>"),
                message
            );
            sys::write_stderr_raw(line.as_bytes());
            LAST_LOCATION.with(|l| *l.borrow_mut() = location);
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
    LAST_LOCATION.with(|l| l.borrow_mut().take());
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload_message(&*payload);
        // Dropping a payload can itself panic; never let that unwind.
        let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
        PanicReport {
            message,
            location: LAST_LOCATION.with(|l| l.borrow_mut().take()),
        }
    })
}
