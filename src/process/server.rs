//! Children of the fork server, on the process layer's side: the request
//! (the child spec and the job), the runner the server's child runs (the
//! same init and bootstrap as every task child), and the job of a
//! [`Process::from_fn`](crate::Process::from_fn) task.

use std::os::fd::{AsFd, OwnedFd};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::init::{bootstrap, Boot, Target};
use super::spec::ChildSpec;
use crate::codec;
use crate::error::Result;
use crate::forkserver;
use crate::popen::Popen;
use crate::sys::{self, JobMain};

/// What the server's child gets: who it is, and what makes its target.
#[derive(Debug, Serialize, Deserialize)]
struct ServerRequest {
    spec: ChildSpec,
    /// A [`JobMain`], by address.
    job_main: usize,
    job: Vec<u8>,
}

/// Asks the fork server for the child of `spec`, whose target `job_main`
/// makes from `job` and the fds (the child's channel first, then `extra`).
pub(crate) fn fork_via_server(
    spec: ChildSpec,
    job_main: JobMain,
    job: Vec<u8>,
    extra: Vec<OwnedFd>,
    arg: Option<Vec<u8>>,
) -> Result<Popen> {
    let mut payload = Vec::new();
    codec::encode_value(
        &ServerRequest {
            spec,
            job_main: sys::fn_addr(job_main),
            job,
        },
        &mut payload,
    )?;
    forkserver::fork_child(server_child_main, payload, extra, arg)
}

/// The runner of every child of the fork server that this layer asks for:
/// the crate's child-side settings, the target from the job, then the
/// one bootstrap, with the death signal tied to the server.
fn server_child_main(payload: &[u8], fds: Vec<OwnedFd>, server: u32) -> i32 {
    let Ok(req) = codec::decode::<ServerRequest>(payload) else {
        return crate::exitcode::SETUP_FAILED;
    };
    // What the caller sets before its forks, set here for the server's
    // image, which was forked before any (lock-free atomics).
    crate::finalize::set_children_finalizer(super::registry::finalize_children);
    super::init::set_describer();
    let mut spec = req.spec;
    spec.init.forked_by(server);
    let target: Target = sys::fn_from_addr::<sys::JobMain>(req.job_main)(&req.job, fds);
    bootstrap(None, Boot::new(spec), target)
}

/// A [`Process::from_fn`](crate::Process::from_fn) task: `tramp(f, arg)`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TaskJob {
    pub(crate) f: usize,
    pub(crate) tramp: usize,
}

/// The [`JobMain`] of a task: reads the argument from the channel, then
/// runs the trampoline; an unreadable argument is `SETUP_FAILED`.
pub(crate) fn task_job_main(job: &[u8], fds: Vec<OwnedFd>) -> Target {
    let job = codec::decode::<TaskJob>(job);
    let channel = fds.into_iter().next();
    Box::new(move || {
        let (Ok(job), Some(channel)) = (job, channel) else {
            crate::exit(crate::exitcode::SETUP_FAILED);
        };
        let Ok(arg) = forkserver::read_arg(channel.as_fd()) else {
            crate::exit(crate::exitcode::SETUP_FAILED);
        };
        drop(channel);
        let code = sys::fn_from_addr::<sys::TaskTrampoline>(job.tramp)(job.f, &arg);
        if code != 0 {
            crate::exit(code);
        }
    })
}

/// The trampoline of [`Process::from_fn`](crate::Process::from_fn) in a
/// child of the server: decodes the argument and runs `f`. A garbage
/// argument is `exitcode::SETUP_FAILED` after one line on stderr.
pub(crate) fn task_trampoline<A: DeserializeOwned>(f: usize, arg: &[u8]) -> i32 {
    match codec::decode::<A>(arg) {
        Ok(a) => {
            sys::fn_from_addr::<fn(A)>(f)(a);
            0
        }
        Err(e) => {
            sys::write_stderr_raw(
                format!("multiproc: cannot decode the argument: {e}\n").as_bytes(),
            );
            crate::exitcode::SETUP_FAILED
        }
    }
}
