//! The process pool (issue 3): `Pool`, `PoolBuilder`, `AsyncResult`, the imap iterators.
