//! `Daemon` (issue 4): detach into the background.
