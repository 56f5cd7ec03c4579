//! The child spec: everything a child needs to become itself, as plain
//! data, so that it can be built in the parent and used in the child after
//! a fork, or sent as bytes to the fork server, which forks the child there.

use serde::{Deserialize, Serialize};

use super::identity::ProcessInfo;
use super::init::ChildInit;

/// Who the child will be and how it starts: its name (and the ident path
/// behind default names), whether it is daemonic, its parent as
/// `parent_process()` reports it, whether it is listed in the registry,
/// and the [`ChildInit`] (death signal, parent pid, after-fork hooks).
/// What it runs (a task or the program) is not data and travels beside it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChildSpec {
    /// `"1"`, `"1:2"`, …: the path of counters from the main process.
    pub(crate) ident: String,
    pub(crate) name: String,
    /// The name was given (`with_name`), not `Process-N`: the child shows it
    /// to `ps` (`PR_SET_NAME`).
    pub(crate) named: bool,
    pub(crate) daemon: bool,
    /// The process `parent_process()` names in the child.
    pub(crate) parent: ProcessInfo,
    /// What every child of the crate does first.
    pub(crate) init: ChildInit,
    /// Listed in the registry (see `Process::unregistered`).
    pub(crate) registered: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_round_trips_as_bytes() {
        let spec = ChildSpec {
            ident: "1:2".into(),
            name: "worker".into(),
            named: true,
            daemon: true,
            parent: crate::current_process(),
            init: ChildInit::prepare(Some(crate::sys::Sig::SIGKILL)),
            registered: false,
        };
        let mut bytes = Vec::new();
        crate::codec::encode_value(&spec, &mut bytes).unwrap();
        let back: ChildSpec = crate::codec::decode(&bytes).unwrap();
        assert_eq!(back.name, "worker");
        assert_eq!(back.ident, "1:2");
        assert!(back.daemon && back.named && !back.registered);
        assert_eq!(back.parent, spec.parent);
    }
}
