//! A nonblocking MPI send that owns its buffer (cargo feature `mpi`).
//!
//! rsmpi's `immediate_send` borrows its buffer for the request's scope; a
//! dispatcher that keeps sends in flight across loop turns needs the
//! buffer to live exactly as long as the request. [`PendingSend`] holds
//! both: the bytes are moved to the heap and freed only once MPI says the
//! send completed (or never, if it is dropped before that).

use std::ptr::NonNull;

use ::mpi::point_to_point::Destination;
use ::mpi::request::{Request, StaticScope};
use ::mpi::topology::{Communicator, SimpleCommunicator};

/// A send in flight and the bytes it reads.
pub(crate) struct PendingSend {
    req: Option<Request<'static, [u8]>>,
    /// From `Box::into_raw`; freed once `req` completed.
    buf: NonNull<[u8]>,
}

impl PendingSend {
    /// Starts sending `data` to `rank` of `comm` with `tag` (`MPI_Isend`).
    pub(crate) fn start(comm: &SimpleCommunicator, rank: i32, tag: i32, data: Vec<u8>) -> Self {
        let buf = NonNull::from(Box::leak(data.into_boxed_slice()));
        // SAFETY: `buf` points at a live heap allocation that nothing else
        // references; it is freed only in `test` after the request that reads
        // it completed, or leaked (never freed) when `self` is dropped with
        // the request in flight, so the `'static` borrow stays valid for as
        // long as MPI may read it. Nothing writes through `buf` meanwhile.
        let bytes: &'static [u8] = unsafe { buf.as_ref() };
        let req = comm
            .process_at_rank(rank)
            .immediate_send_with_tag(StaticScope, bytes, tag);
        PendingSend {
            req: Some(req),
            buf,
        }
    }

    /// `true` once the send completed (`MPI_Test`); its buffer is then freed.
    pub(crate) fn test(&mut self) -> bool {
        let Some(req) = self.req.take() else {
            return true;
        };
        match req.test() {
            Ok(_) => {
                // SAFETY: `buf` came from `Box::into_raw` (via `Box::leak`) in
                // `start`; the only borrow of it, held by the request, ended
                // when the request completed just now, and `req` is `None`
                // from here on, so it is freed exactly once.
                drop(unsafe { Box::from_raw(self.buf.as_ptr()) });
                true
            }
            Err(req) => {
                self.req = Some(req);
                false
            }
        }
    }
}

impl Drop for PendingSend {
    fn drop(&mut self) {
        // A send still in flight keeps its buffer: MPI may read it until the
        // process ends. rsmpi panics on dropping an incomplete request, so
        // it is forgotten (a small leak on an abnormal shutdown only).
        if let Some(req) = self.req.take() {
            std::mem::forget(req);
        }
    }
}

impl std::fmt::Debug for PendingSend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSend")
            .field("len", &self.buf.len())
            .field("done", &self.req.is_none())
            .finish()
    }
}
