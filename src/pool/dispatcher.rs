//! The dispatcher: the pool's one parent-side thread. It owns the workers
//! and runs the event loop described in the module docs of
//! [`pool`](super); the bookkeeping lives beside it: the jobs and their
//! queue in [`JobTable`], each worker's chunks in its [`Ledger`].

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

use super::jobs::JobTable;
use super::ledger::{self, Ledger};
use super::payload::{ArgsArena, Payload};
use super::protocol::{Command, JobMsg, PoolFailure, Wake};
use super::start::SharedFds;
use super::wire::{self, FromWorker};
use super::worker::{ArgsMap, WorkerSpec};
use crate::codec::{Fill, FrameReader, DEFAULT_MAX_FRAME_LEN};
use crate::error::{Error, Result};
use crate::popen::{self, Popen};
use crate::process::Process;
use crate::region::{Ranges, Region};
use crate::sys::{self, SharedProgress, Sig};

/// Socket buffer asked for each worker's socket pair.
const SOCKET_BUFFER: usize = 4 << 20;
/// Chunks in flight per worker while chunks take long; see [`DEEP`].
const SHALLOW: usize = 2;
/// Chunks in flight per worker once chunks are seen to finish in under
/// [`FAST_CHUNK`]: enough to hide the round trip behind tiny tasks.
const DEEP: usize = 32;
const FAST_CHUNK: f64 = 0.002;
/// No more chunks are queued on a worker whose unsent bytes exceed this.
const OUT_HIGH_WATER: usize = 16 << 20;
/// Consecutive workers that die before running anything, after which the
/// pool gives up (a crashing initializer would otherwise fork forever).
const MAX_STARTUP_DEATHS: u32 = 5;

/// What the pool was built with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) processes: usize,
    pub(crate) initializer: Option<fn()>,
    pub(crate) max_tasks_per_child: Option<usize>,
    pub(crate) task_timeout: Option<Duration>,
    pub(crate) start_method: crate::StartMethod,
    /// The pool's arena of large arguments (none: they cross the sockets).
    pub(crate) arena: Option<Arc<ArgsArena>>,
    /// Each worker gets a region for large results (else they cross the
    /// sockets).
    pub(crate) shared_results: bool,
}

/// Bytes queued for a worker's socket, written as it takes them.
#[derive(Default)]
struct Outbox {
    buf: Vec<u8>,
    pos: usize,
}

impl Outbox {
    fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Writes as much as the non-blocking socket takes.
    fn flush(&mut self, sock: &OwnedFd) {
        while self.pos < self.buf.len() {
            match sys::write_some(sock.as_fd(), &self.buf[self.pos..]) {
                Ok(n) => self.pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // The worker is gone; its sentinel will tell.
                    self.pos = self.buf.len();
                }
            }
        }
        self.buf.clear();
        self.pos = 0;
        if self.buf.capacity() > 4 * OUT_HIGH_WATER {
            self.buf = Vec::new();
        }
    }
}

/// Why a worker ends, once something decided it.
#[derive(Default)]
struct Fate {
    /// An exit frame was queued.
    exiting: bool,
    /// The item killed for its timeout (its sequence number).
    timed_out: Option<u64>,
    /// A protocol error: the worker was killed, the running item gets this.
    fault: Option<PoolFailure>,
}

struct Worker {
    process: Process,
    /// Its region of large results (dropped with the worker; unmapped
    /// once no caller holds a result in it).
    region: Option<Arc<Region>>,
    pid: u32,
    sock: OwnedFd,
    reader: FrameReader,
    out: Outbox,
    ledger: Ledger,
    /// Jobs whose context this worker holds.
    contexts: HashSet<u64>,
    fate: Fate,
    /// The socket reached end of file (or failed): stop reading it.
    eof: bool,
    /// The item being watched for the timeout: `(started counter, since)`.
    watch: (u64, Instant),
    /// When the last chunk finished (or the worker got work while idle).
    last_done: Instant,
    /// A result arrived from this worker.
    produced: bool,
}

impl Worker {
    /// Records a protocol error and kills the worker; the item it was
    /// running (or its first unreported one) fails with it.
    fn fault(&mut self, f: PoolFailure) {
        if self.fate.fault.is_none() {
            self.fate.fault = Some(f);
            self.eof = true;
            let _ = self.process.kill();
        }
    }

    /// Takes no new chunk.
    fn closed_to_work(&self) -> bool {
        self.fate.exiting || self.eof || self.fate.fault.is_some()
    }
}

/// The dispatcher's state; [`Dispatcher::run`] is its thread's body.
pub(crate) struct Dispatcher {
    rx: Receiver<Command>,
    wake: Arc<Wake>,
    wake_r: OwnedFd,
    cfg: Config,
    progress: Arc<SharedProgress>,
    workers: Vec<Option<Worker>>,
    jobs: JobTable,
    next_name: usize,
    closing: bool,
    exit_sent: bool,
    /// Why the pool stopped working; new jobs are aborted with it.
    broken: Option<PoolFailure>,
    /// Moving average of a chunk's duration on a worker, seconds.
    chunk_secs: f64,
    startup_deaths: u32,
}

impl Dispatcher {
    /// Creates the dispatcher and forks the workers (on the calling thread,
    /// or on the crate's fork thread when that is not the main thread).
    pub(crate) fn new(cfg: Config, rx: Receiver<Command>) -> Result<(Dispatcher, Arc<Wake>)> {
        let (wake, wake_r) = Wake::new()?;
        let wake = Arc::new(wake);
        let n = cfg.processes;
        let mut d = Dispatcher {
            rx,
            wake: Arc::clone(&wake),
            wake_r,
            progress: super::start::progress_for(cfg.start_method, n)?,
            workers: (0..n).map(|_| None).collect(),
            cfg,
            jobs: JobTable::default(),
            next_name: 1,
            closing: false,
            exit_sent: false,
            broken: None,
            chunk_secs: 1.0,
            startup_deaths: 0,
        };
        for slot in 0..n {
            if let Err(e) = d.spawn(slot) {
                d.kill_all();
                return Err(e);
            }
        }
        Ok((d, wake))
    }

    /// Forks the worker of `slot`.
    fn spawn(&mut self, slot: usize) -> Result<()> {
        let p = self.progress.slot(slot);
        p.started.store(0, Ordering::Relaxed);
        p.finished.store(0, Ordering::Relaxed);
        let (parent_end, child_end) = sys::socket_pair(SOCKET_BUFFER)?;
        sys::set_nonblocking(parent_end.as_fd())?;
        let (region, region_fd) = if self.cfg.shared_results {
            let (r, fd) = Region::new()?;
            (Some(Arc::new(r)), Some(fd))
        } else {
            (None, None)
        };
        let mut close = vec![
            sys::raw(&parent_end),
            sys::raw(&self.wake_r),
            sys::raw(self.wake.fd()),
        ];
        // A forked worker has the mappings; the fds it inherits go.
        close.extend(self.cfg.arena.as_ref().map(|a| sys::raw_of(a.fd())));
        close.extend(region_fd.as_ref().map(sys::raw));
        for w in self.workers.iter().flatten() {
            close.push(sys::raw(&w.sock));
            if let Some(s) = w.process.sentinel() {
                close.push(sys::raw_of(s));
            }
        }
        let spec = WorkerSpec {
            sock: child_end,
            close,
            progress: Arc::clone(&self.progress),
            slot,
            initializer: self.cfg.initializer,
            args: self.cfg.arena.clone().map(ArgsMap::Inherited),
            region: region.clone(),
        };
        let fds = match self.cfg.start_method {
            crate::StartMethod::Fork => SharedFds {
                args: None,
                region: None,
            },
            crate::StartMethod::ForkServer => SharedFds {
                args: match &self.cfg.arena {
                    Some(a) => Some(a.fd().try_clone_to_owned()?),
                    None => None,
                },
                region: region_fd,
            },
        };
        let name = format!("PoolWorker-{}", self.next_name);
        self.next_name += 1;
        let process = super::start::start_worker(self.cfg.start_method, spec, name, fds)?;
        // The loop polls every worker's sentinel: open it now, so a worker
        // whose pidfd cannot be opened (the fd limit) fails to start rather
        // than leave an always-readable stand-in for the loop to spin on.
        if let Some(Err(e)) = process.popen().map(|p| p.sentinel_fd().map(drop)) {
            let _ = process.kill();
            let _ = process.join();
            return Err(e.into());
        }
        let pid = process.pid().expect("a started process has a pid");
        let now = Instant::now();
        self.workers[slot] = Some(Worker {
            process,
            region,
            pid,
            sock: parent_end,
            reader: FrameReader::new(DEFAULT_MAX_FRAME_LEN, true),
            out: Outbox::default(),
            ledger: Ledger::default(),
            contexts: HashSet::new(),
            fate: Fate::default(),
            eof: false,
            watch: (u64::MAX, now),
            last_done: now,
            produced: false,
        });
        Ok(())
    }

    /// The thread's body: runs until the pool is terminated, or closed and
    /// drained.
    pub(crate) fn run(mut self) {
        let mut set = sys::PollSet::default();
        let mut index = Vec::new();
        loop {
            if !self.drain_commands() {
                self.kill_all();
                return;
            }
            self.assign();
            if self.closing && !self.exit_sent && self.idle() {
                self.exit_sent = true;
                for w in self.workers.iter_mut().flatten() {
                    if !w.fate.exiting {
                        wire::push_exit(&mut w.out.buf);
                        w.fate.exiting = true;
                    }
                }
            }
            for w in self.workers.iter_mut().flatten() {
                w.out.flush(&w.sock);
            }
            if self.exit_sent && self.workers.iter().all(Option::is_none) {
                return;
            }
            // Poll: the wake socket, then per worker its socket and sentinel.
            set.clear();
            index.clear();
            set.add(Some(self.wake_r.as_fd()), false);
            for (slot, w) in self.workers.iter().enumerate() {
                let Some(w) = w else { continue };
                let sock = (!w.eof).then(|| w.sock.as_fd());
                set.add(sock, w.out.pending() > 0);
                set.add(w.process.sentinel(), false);
                index.push(slot);
            }
            let timeout = self.tick();
            if let Err(e) = set.wait(timeout) {
                log::error!("multiproc: pool dispatcher poll failed: {e}");
                self.kill_all();
                return;
            }
            if set.readable(0) {
                // One byte per burst of commands (see `Wake`): a short read
                // empties the socket.
                let mut buf = [0u8; 64];
                while matches!(sys::read(self.wake_r.as_fd(), &mut buf), Ok(n) if n == buf.len()) {}
                self.wake.clear();
            }
            for (k, &slot) in index.iter().enumerate() {
                let (readable, writable) = (set.readable(1 + 2 * k), set.writable(1 + 2 * k));
                let exited = set.readable(2 + 2 * k);
                let Some(w) = self.workers[slot].as_mut() else {
                    continue;
                };
                if readable && !w.eof {
                    self.broken =
                        self.broken
                            .take()
                            .or(read_from(w, &mut self.jobs, &mut self.chunk_secs));
                }
                if writable {
                    w.out.flush(&w.sock);
                }
                // Anything but "still running" is an exit: a status reaped
                // elsewhere is `exitcode::UNKNOWN`, and an error here must
                // not keep a worker whose sentinel stays readable.
                if exited && !matches!(w.process.popen().map(|p| p.poll()), Some(Ok(None))) {
                    self.on_exit(slot);
                }
            }
            self.forget_finished_jobs();
            self.check_timeouts();
        }
    }

    /// How long `poll` may sleep: forever, unless a task timeout is
    /// configured and a worker is busy.
    fn tick(&self) -> Option<Duration> {
        let t = self.cfg.task_timeout?;
        let busy = self.workers.iter().flatten().any(|w| !w.ledger.is_empty());
        busy.then(|| (t / 10).clamp(Duration::from_millis(1), Duration::from_millis(50)))
    }

    /// No queued or running work and no live job.
    fn idle(&self) -> bool {
        self.jobs.all_submitted() && self.workers.iter().flatten().all(|w| w.ledger.is_empty())
    }

    /// Takes every queued command. `false` once the pool must stop now.
    fn drain_commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Terminate) => return false,
                Ok(cmd) => self.command(cmd),
                Err(TryRecvError::Empty) => {
                    self.forget_finished_jobs();
                    return true;
                }
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Job { id, tx, task, ctx } => {
                if let Some(b) = &self.broken {
                    tx.send(JobMsg::Abort(b.clone().into()));
                } else {
                    self.jobs.add(id, tx, task, ctx);
                }
            }
            Command::Chunk {
                job,
                base,
                count,
                kind,
                items,
            } => self.jobs.queue(job, base, count, kind, items),
            Command::Seal(job) => self.jobs.seal(job),
            Command::EndJob(job) => self.jobs.end(job),
            Command::Close => self.closing = true,
            Command::Terminate => unreachable!("handled by drain_commands"),
        }
    }

    /// Drops the jobs that are over, and tells the workers to forget their
    /// contexts.
    fn forget_finished_jobs(&mut self) {
        for job in self.jobs.take_finished() {
            for w in self.workers.iter_mut().flatten() {
                if w.contexts.remove(&job) && !w.fate.exiting {
                    wire::push_forget(&mut w.out.buf, job);
                }
            }
        }
    }

    /// Hands queued chunks to workers, round-robin, up to the pipeline
    /// depth of each; retires workers that reached `max_tasks_per_child`.
    fn assign(&mut self) {
        if self.exit_sent || self.broken.is_some() {
            return;
        }
        let depth = if self.chunk_secs < FAST_CHUNK {
            DEEP
        } else {
            SHALLOW
        };
        let now = Instant::now();
        for level in 1..=depth {
            if !self.jobs.has_queued() {
                break;
            }
            for w in self.workers.iter_mut().flatten() {
                if w.closed_to_work() || w.ledger.len() >= level || w.out.pending() > OUT_HIGH_WATER
                {
                    continue;
                }
                let left = match self.cfg.max_tasks_per_child {
                    Some(m) => (m as u64).saturating_sub(w.ledger.assigned()),
                    None => u64::MAX,
                };
                if left == 0 {
                    continue;
                }
                let Some(mut chunk) = self.jobs.pop() else {
                    break;
                };
                // At most the worker's remaining allowance.
                self.jobs
                    .split(&mut chunk, u32::try_from(left).unwrap_or(u32::MAX));
                let (task, ctx) = self.jobs.task(chunk.job).expect("pop keeps live jobs");
                if let Some(ctx) = ctx {
                    if w.contexts.insert(chunk.job) {
                        wire::push_context(&mut w.out.buf, chunk.job, ctx);
                    }
                }
                wire::push_chunk(
                    &mut w.out.buf,
                    chunk.id,
                    chunk.job,
                    task.f,
                    task.tramp,
                    chunk.start,
                    chunk.end,
                    chunk.kind,
                    match &*chunk.items {
                        Payload::Inline(b) => wire::Items::Inline(b),
                        Payload::Arena(b) => wire::Items::Shared {
                            offset: b.offset() as u64,
                            len: b.len() as u64,
                        },
                    },
                );
                if w.ledger.is_empty() {
                    w.last_done = now;
                }
                w.ledger.push(chunk);
            }
        }
        if let Some(m) = self.cfg.max_tasks_per_child {
            for w in self.workers.iter_mut().flatten() {
                if w.ledger.assigned() >= m as u64 && w.ledger.is_empty() && !w.fate.exiting {
                    wire::push_exit(&mut w.out.buf);
                    w.fate.exiting = true;
                }
            }
        }
    }

    /// A worker exited: fail the item it was running, queue the rest of its
    /// chunks again, and replace it.
    fn on_exit(&mut self, slot: usize) {
        let mut w = self.workers[slot].take().expect("a worker in the slot");
        // Results it wrote before dying are still in the socket.
        if !w.eof {
            while let Ok(Fill::Data) = w.reader.fill(w.sock.as_fd()) {
                self.broken =
                    self.broken
                        .take()
                        .or(frames(&mut w, &mut self.jobs, &mut self.chunk_secs));
                if w.fate.fault.is_some() {
                    break;
                }
            }
        }
        let exitcode = w
            .process
            .popen()
            .and_then(|p| p.returncode())
            .unwrap_or(crate::exitcode::UNKNOWN);
        let p = self.progress.slot(slot);
        let started = p.started.load(Ordering::Relaxed);
        let finished = p.finished.load(Ordering::Relaxed);
        log::debug!(
            "multiproc: pool worker {} exited with code {exitcode} (started {started}, finished {finished})",
            w.pid
        );
        let held = w.ledger.drain();
        for inf in &held {
            self.jobs.retire(inf.chunk.job);
        }
        let running = (started > finished).then(|| started - 1);
        let mut fault = w.fate.fault.take();
        let settlement = ledger::settle(held, running, fault.is_some());
        for (job, index, seq) in settlement.failed {
            let error = if w.fate.timed_out == Some(seq) {
                Error::Timeout
            } else if let Some(f) = fault.take() {
                f.into()
            } else {
                Error::Died {
                    pid: w.pid,
                    exitcode,
                    rank: None,
                }
            };
            self.jobs.send(job, JobMsg::Failed { index, error });
        }
        self.jobs.requeue(settlement.again);
        // A worker that dies before running anything, unasked, counts
        // towards giving up.
        if started == 0 && !w.produced && !w.fate.exiting && w.fate.timed_out.is_none() {
            self.startup_deaths += 1;
            if self.startup_deaths >= MAX_STARTUP_DEATHS && self.broken.is_none() {
                self.broken = Some(PoolFailure::Setup {
                    step: "pool worker start",
                    message: format!(
                        "{} workers in a row died before running a task (last: pid {}, exit code {})",
                        self.startup_deaths, w.pid, exitcode
                    ),
                });
            }
        } else {
            self.startup_deaths = 0;
        }
        drop(w);
        if let Some(b) = self.broken.clone() {
            self.abort_all(b);
        }
        if self.exit_sent || self.broken.is_some() {
            return;
        }
        if let Err(e) = self.spawn(slot) {
            log::error!("multiproc: cannot replace a pool worker: {e}");
            if self.workers.iter().all(Option::is_none) {
                let b = PoolFailure::Setup {
                    step: "pool worker start",
                    message: e.to_string(),
                };
                self.broken = Some(b.clone());
                self.abort_all(b);
            }
        }
    }

    /// Fails every job and drops the queue (the pool is broken).
    fn abort_all(&mut self, why: PoolFailure) {
        self.jobs.abort_all(|| why.clone().into());
        for w in self.workers.iter_mut().flatten() {
            w.ledger.drain();
        }
    }

    /// Kills the worker holding an item that has run past the task timeout.
    fn check_timeouts(&mut self) {
        let Some(limit) = self.cfg.task_timeout else {
            return;
        };
        let now = Instant::now();
        for (slot, w) in self.workers.iter_mut().enumerate() {
            let Some(w) = w else { continue };
            if w.ledger.is_empty() || w.fate.timed_out.is_some() || w.fate.fault.is_some() {
                continue;
            }
            let p = self.progress.slot(slot);
            let started = p.started.load(Ordering::Relaxed);
            let finished = p.finished.load(Ordering::Relaxed);
            if started <= finished {
                w.watch = (u64::MAX, now);
            } else if w.watch.0 != started {
                w.watch = (started, now);
            } else if now.duration_since(w.watch.1) >= limit {
                w.fate.timed_out = Some(started - 1);
                let _ = w.process.kill();
            }
        }
    }

    /// SIGKILLs and reaps every worker; jobs see the pool closed.
    fn kill_all(&mut self) {
        let popens: Vec<&Popen> = self
            .workers
            .iter()
            .flatten()
            .filter_map(|w| w.process.popen())
            .collect();
        popen::stop_all(&popens, Sig::SIGKILL, Duration::ZERO);
        self.workers.iter_mut().for_each(|w| *w = None);
        self.jobs.abort_all(|| Error::PoolClosed);
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        // Only reached with workers left if the thread could not start or
        // unwound: never leave a worker behind.
        if self.workers.iter().any(Option::is_some) {
            self.kill_all();
        }
    }
}

/// Reads what the worker sent (a bounded number of reads) and handles
/// every whole frame. `Some` if the pool broke (the initializer failed).
fn read_from(w: &mut Worker, jobs: &mut JobTable, chunk_secs: &mut f64) -> Option<PoolFailure> {
    let mut broken = None;
    for _ in 0..8 {
        match w.reader.fill(w.sock.as_fd()) {
            Ok(Fill::Data) => {
                broken = broken.or(frames(w, jobs, chunk_secs));
                // A short read took all there was: poll says when more
                // comes, no need for a read that fails with EAGAIN.
                if w.reader.drained() {
                    break;
                }
            }
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(Error::Codec(e)) => {
                w.fault(PoolFailure::Protocol(e.to_string()));
                break;
            }
            // End of file, or a reset (the worker exited with bytes
            // unread): a worker closes its socket only by exiting. Its
            // sentinel reports the exit.
            Ok(Fill::Eof) | Err(_) => {
                w.eof = true;
                if !w.fate.exiting {
                    let _ = w.process.kill();
                }
                break;
            }
        }
        if w.fate.fault.is_some() {
            break;
        }
    }
    broken
}

/// Handles the whole frames buffered from `w`: results go to their job,
/// and finished chunks leave the worker's ledger and the job's count.
/// `Some` if the worker reported that the initializer failed.
fn frames(w: &mut Worker, jobs: &mut JobTable, chunk_secs: &mut f64) -> Option<PoolFailure> {
    loop {
        let payload = match w.reader.next_payload() {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(e) => {
                w.fault(PoolFailure::Protocol(e.to_string()));
                return None;
            }
        };
        let msg = match wire::parse_from_worker(payload) {
            Ok(m) => m,
            Err(e) => {
                w.fault(PoolFailure::Protocol(e.to_string()));
                return None;
            }
        };
        match msg {
            FromWorker::InitFailed { message } => {
                return Some(PoolFailure::Setup {
                    step: "pool initializer",
                    message,
                });
            }
            FromWorker::Results {
                chunk,
                start,
                count,
                kind,
                entries,
            } => {
                let (entries, ranges) = match wire::split_shared(entries) {
                    Ok(s) => s,
                    Err(e) => {
                        w.fault(PoolFailure::Protocol(e.to_string()));
                        return None;
                    }
                };
                let shared = match (&w.region, ranges.is_empty()) {
                    (_, true) => None,
                    (Some(region), false) if ranges.iter().all(|&(o, l)| region.check(o, l)) => {
                        let ranges = ranges.iter().map(|&(o, l)| (o as usize, l as usize));
                        Some(Ranges::new(Arc::clone(region), ranges.collect()))
                    }
                    _ => {
                        w.fault(PoolFailure::protocol("a large result outside the region"));
                        return None;
                    }
                };
                let r = match w.ledger.report(chunk, start, count) {
                    Ok(r) => r,
                    Err(what) => {
                        w.fault(PoolFailure::protocol(what));
                        return None;
                    }
                };
                w.produced = true;
                jobs.send(
                    r.job,
                    JobMsg::Results {
                        base: r.index,
                        count,
                        kind,
                        bytes: entries.to_vec(),
                        shared,
                    },
                );
                if r.completes {
                    let now = Instant::now();
                    let dt = now.duration_since(w.last_done).as_secs_f64();
                    w.last_done = now;
                    *chunk_secs = 0.7 * *chunk_secs + 0.3 * dt;
                    jobs.retire(r.job);
                }
            }
        }
    }
}
