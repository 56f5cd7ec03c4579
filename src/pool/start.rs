//! How a worker is started: forked by the pool's dispatcher (`Fork`) or by
//! the fork server (`ForkServer`), which then runs [`worker::run`] in the
//! child from the job below. The dispatcher holds either kind as a
//! [`Process`]: its sentinel and exit code come through the same `Popen`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::payload::ARGS_LEN;
use super::worker::{self, ArgsMap, WorkerSpec};
use crate::codec;
use crate::error::{Error, Result};
use crate::forkserver::{self, StartMethod};
use crate::process::{Process, Target};
use crate::region::Region;
use crate::sys::{self, SharedMapping, SharedProgress};

/// The progress counters of a pool of `n` workers started with `method`:
/// a mapping of the fork server's arena for `ForkServer` (made before the
/// server was forked, so its children map it too).
pub(crate) fn progress_for(method: StartMethod, n: usize) -> Result<Arc<SharedProgress>> {
    match method {
        StartMethod::Fork => Ok(Arc::new(SharedProgress::new(n)?)),
        StartMethod::ForkServer => forkserver::progress_for_server(n),
    }
}

/// A pool worker's job for the fork server (its socket rides as an fd).
#[derive(Debug, Serialize, Deserialize)]
struct WorkerJob {
    slot: usize,
    /// Which arena mapping holds the pool's counters.
    arena: usize,
    initializer: Option<usize>,
    /// The pool's arguments arena rides as the next fd.
    args: bool,
    /// The worker's results region rides as the next fd.
    region: bool,
}

/// The memfds a child of the fork server maps: the pool's arguments arena
/// and the worker's results region (a forked worker inherits the mappings).
pub(crate) struct SharedFds {
    pub(crate) args: Option<OwnedFd>,
    pub(crate) region: Option<OwnedFd>,
}

/// Starts the worker of `spec`, named `name`, with `method`.
pub(crate) fn start_worker(
    method: StartMethod,
    spec: WorkerSpec,
    name: String,
    fds: SharedFds,
) -> Result<Process> {
    let process = Process::new(|| {})
        .with_name(name)
        .with_daemon(true)
        // The pool reaps its own workers: they are never listed by
        // `active_children` nor signalled by the at-exit finalizer.
        .unregistered();
    match method {
        StartMethod::Fork => {
            let mut process = process.with_target(Box::new(move || {
                let code = worker::run(spec);
                if code != 0 {
                    crate::exit(code);
                }
            }));
            process.start()?;
            Ok(process)
        }
        StartMethod::ForkServer => {
            let arena =
                forkserver::arena_index(&spec.progress).ok_or_else(|| Error::ForkServer {
                    reason: "a pool worker's counters are not in the fork server's arena"
                        .to_string(),
                })?;
            let mut job = Vec::new();
            codec::encode_value(
                &WorkerJob {
                    slot: spec.slot,
                    arena,
                    initializer: spec.initializer.map(sys::fn_addr::<fn()>),
                    args: fds.args.is_some(),
                    region: fds.region.is_some(),
                },
                &mut job,
            )?;
            let mut extra = vec![spec.sock];
            extra.extend(fds.args);
            extra.extend(fds.region);
            let mut process = process;
            process.start_in_server(worker_job_main, job, extra, None)?;
            Ok(process)
        }
    }
}

/// In a child of the fork server: the worker's target, from its job and
/// fds (the channel, which it does not need, then its socket, then the
/// arguments arena and the results region if the job says so).
fn worker_job_main(job: &[u8], fds: Vec<OwnedFd>) -> Target {
    let job = codec::decode::<WorkerJob>(job);
    let mut fds = fds.into_iter().skip(1);
    let sock = fds.next();
    let (args, region) = match &job {
        Ok(j) => (
            if j.args { fds.next() } else { None },
            if j.region { fds.next() } else { None },
        ),
        Err(_) => (None, None),
    };
    Box::new(move || {
        let progress = job.as_ref().ok().and_then(|j| forkserver::arena(j.arena));
        let (Ok(job), Some(sock), Some(progress)) = (job, sock, progress) else {
            crate::exit(crate::exitcode::SETUP_FAILED);
        };
        // The maps are made in the child, so the server maps nothing.
        let args = match args.map(|fd| SharedMapping::from_fd(fd.as_fd(), ARGS_LEN)) {
            Some(Ok(m)) => Some(ArgsMap::Mapped(m)),
            Some(Err(_)) => crate::exit(crate::exitcode::SETUP_FAILED),
            None => None,
        };
        let region = match region.map(|fd| Region::from_fd(fd.as_fd())) {
            Some(Ok(r)) => Some(Arc::new(r)),
            Some(Err(_)) => crate::exit(crate::exitcode::SETUP_FAILED),
            None => None,
        };
        let code = worker::run(WorkerSpec {
            sock,
            close: Vec::new(),
            progress,
            slot: job.slot,
            initializer: job.initializer.map(sys::fn_from_addr::<fn()>),
            args,
            region,
        });
        if code != 0 {
            crate::exit(code);
        }
    })
}
