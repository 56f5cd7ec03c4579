//! The dispatcher: the pool's one parent-side thread. It owns the workers,
//! the queue of chunks and the table of jobs, and runs the event loop
//! described in the module docs of [`pool`](super).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

use super::mailbox::MailSender;

use super::wire::{self, FromWorker};
use super::worker::WorkerSpec;
use crate::codec::{Fill, FrameReader, DEFAULT_MAX_FRAME_LEN};
use crate::error::{Error, Result};
use crate::popen::{self, Popen};
use crate::process::Process;
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
}

/// Wakes the dispatcher out of `poll`: a non-blocking socket, written only
/// when `notified` was clear, so bursts of commands cost one write.
#[derive(Debug)]
pub(crate) struct Wake {
    w: OwnedFd,
    notified: AtomicBool,
}

impl Wake {
    pub(crate) fn notify(&self) {
        if !self.notified.swap(true, Ordering::AcqRel) {
            let _ = sys::write_all(self.w.as_fd(), &[1]);
        }
    }
}

/// A request from the callers' side.
pub(crate) enum Command {
    /// A new job: where its results go and how its items run.
    Job {
        id: u64,
        tx: MailSender<JobMsg>,
        f: usize,
        tramp: usize,
        ctx: Option<Vec<u8>>,
    },
    /// Items `base..base + count` of a job, encoded back to back.
    Chunk {
        job: u64,
        base: u64,
        count: u32,
        items: Vec<u8>,
    },
    /// No more chunks will come for this job.
    Seal(u64),
    /// The caller lost interest: drop the job's queued chunks.
    EndJob(u64),
    /// Finish the queued work, then stop the workers and the dispatcher.
    Close,
    /// Kill the workers now.
    Terminate,
}

/// What a job's caller receives.
#[derive(Debug)]
pub(crate) enum JobMsg {
    /// Result entries of items `base..base + count`.
    Results {
        base: u64,
        count: u32,
        bytes: Vec<u8>,
    },
    /// One item failed without a result entry (its worker died or timed out).
    Failed { index: u64, error: Error },
    /// The pool cannot run this job: every item without a result fails.
    Abort(Error),
}

/// A range of one job's items, sharing the encoded bytes of the chunk the
/// caller sent.
#[derive(Debug, Clone)]
struct Chunk {
    id: u64,
    job: u64,
    /// Job index of item 0 of `items`.
    base: u64,
    items: Arc<Vec<u8>>,
    start: u32,
    end: u32,
}

#[derive(Debug)]
struct InFlight {
    chunk: Chunk,
    /// The worker-life sequence number of item `chunk.start`.
    seq_base: u64,
    /// Items whose results arrived, from `chunk.start`.
    reported: u32,
}

struct Job {
    tx: MailSender<JobMsg>,
    f: usize,
    tramp: usize,
    ctx: Option<Arc<Vec<u8>>>,
    /// Chunks queued or in flight.
    chunks: usize,
    sealed: bool,
    ended: bool,
}

struct Worker {
    process: Process,
    pid: u32,
    sock: OwnedFd,
    reader: FrameReader,
    out: Vec<u8>,
    out_pos: usize,
    inflight: VecDeque<InFlight>,
    seq_next: u64,
    assigned: u64,
    contexts: HashSet<u64>,
    /// An exit frame was queued.
    exiting: bool,
    /// The socket reached end of file (or failed): stop reading it.
    eof: bool,
    /// The item being watched for the timeout: `(started counter, since)`.
    watch: (u64, Instant),
    /// The item that was killed for its timeout.
    timed_out: Option<u64>,
    /// A protocol error: the worker was killed, the running item gets this.
    fault: Option<Error>,
    /// When the last chunk finished (or the worker got work while idle).
    last_done: Instant,
    /// A result arrived from this worker.
    produced: bool,
}

/// The dispatcher's state; [`Dispatcher::run`] is its thread's body.
pub(crate) struct Dispatcher {
    rx: Receiver<Command>,
    wake: Arc<Wake>,
    wake_r: OwnedFd,
    cfg: Config,
    progress: Arc<SharedProgress>,
    workers: Vec<Option<Worker>>,
    pending: VecDeque<Chunk>,
    jobs: HashMap<u64, Job>,
    next_chunk: u64,
    next_name: usize,
    closing: bool,
    exit_sent: bool,
    /// Why the pool stopped working (a failing initializer); new jobs are
    /// aborted with it.
    broken: Option<(String, String)>,
    /// Moving average of a chunk's duration on a worker, seconds.
    chunk_secs: f64,
    startup_deaths: u32,
}

impl Dispatcher {
    /// Creates the dispatcher and forks the workers (on the calling thread,
    /// or on the crate's fork thread when that is not the main thread).
    pub(crate) fn new(cfg: Config, rx: Receiver<Command>) -> Result<(Dispatcher, Arc<Wake>)> {
        // A socket pair rather than a pipe: its write is one `send` with
        // `MSG_NOSIGNAL` (no SIGPIPE once the dispatcher is gone).
        let (wake_r, wake_w) = sys::socket_pair(0)?;
        sys::set_nonblocking(wake_r.as_fd())?;
        sys::set_nonblocking(wake_w.as_fd())?;
        let wake = Arc::new(Wake {
            w: wake_w,
            notified: AtomicBool::new(false),
        });
        let n = cfg.processes;
        let mut d = Dispatcher {
            rx,
            wake: Arc::clone(&wake),
            wake_r,
            progress: super::start::progress_for(cfg.start_method, n)?,
            workers: (0..n).map(|_| None).collect(),
            cfg,
            pending: VecDeque::new(),
            jobs: HashMap::new(),
            next_chunk: 0,
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
        let mut close = vec![
            sys::raw(&parent_end),
            sys::raw(&self.wake_r),
            sys::raw(&self.wake.w),
        ];
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
        };
        let name = format!("PoolWorker-{}", self.next_name);
        self.next_name += 1;
        let process = super::start::start_worker(self.cfg.start_method, spec, name)?;
        let pid = process.pid().expect("a started process has a pid");
        let now = Instant::now();
        self.workers[slot] = Some(Worker {
            process,
            pid,
            sock: parent_end,
            reader: FrameReader::new(DEFAULT_MAX_FRAME_LEN, true),
            out: Vec::new(),
            out_pos: 0,
            inflight: VecDeque::new(),
            seq_next: 0,
            assigned: 0,
            contexts: HashSet::new(),
            exiting: false,
            eof: false,
            watch: (u64::MAX, now),
            timed_out: None,
            fault: None,
            last_done: now,
            produced: false,
        });
        Ok(())
    }

    /// The thread's body: runs until the pool is terminated, or closed and
    /// drained.
    pub(crate) fn run(mut self) {
        let mut entries = Vec::new();
        loop {
            if !self.drain_commands() {
                self.kill_all();
                return;
            }
            self.assign();
            if self.closing && !self.exit_sent && self.idle() {
                self.exit_sent = true;
                for w in self.workers.iter_mut().flatten() {
                    if !w.exiting {
                        wire::push_exit(&mut w.out);
                        w.exiting = true;
                    }
                }
            }
            for w in self.workers.iter_mut().flatten() {
                write_out(w);
            }
            if self.exit_sent && self.workers.iter().all(Option::is_none) {
                return;
            }
            // Poll: the wake pipe, then per worker its socket and sentinel.
            entries.clear();
            entries.push(sys::poll_entry(sys::raw(&self.wake_r), false));
            let mut index = Vec::new();
            for (slot, w) in self.workers.iter().enumerate() {
                let Some(w) = w else { continue };
                let sock_fd = if w.eof { -1 } else { sys::raw(&w.sock) };
                entries.push(sys::poll_entry(sock_fd, w.out_pos < w.out.len()));
                let sentinel = w.process.sentinel().map_or(-1, sys::raw_of);
                entries.push(sys::poll_entry(sentinel, false));
                index.push(slot);
            }
            let timeout = self.tick();
            if let Err(e) = sys::poll_entries(&mut entries, timeout) {
                log::error!("multiproc: pool dispatcher poll failed: {e}");
                self.kill_all();
                return;
            }
            if sys::poll_ready(&entries[0]).0 {
                // One byte per burst of commands (see `Wake`): a short read
                // empties the pipe.
                let mut buf = [0u8; 64];
                while matches!(sys::read(self.wake_r.as_fd(), &mut buf), Ok(n) if n == buf.len()) {}
                self.wake.notified.store(false, Ordering::Release);
            }
            for (k, &slot) in index.iter().enumerate() {
                let (readable, writable) = sys::poll_ready(&entries[1 + 2 * k]);
                let exited = sys::poll_ready(&entries[2 + 2 * k]).0;
                let Some(mut w) = self.workers[slot].take() else {
                    continue;
                };
                if readable && !w.eof {
                    self.read_from(&mut w);
                }
                if writable {
                    write_out(&mut w);
                }
                // Anything but "still running" is an exit: a status reaped
                // elsewhere is `exitcode::UNKNOWN`, and an error here must
                // not put back a worker whose sentinel stays readable.
                if exited && !matches!(w.process.popen().map(|p| p.poll()), Some(Ok(None))) {
                    self.on_exit(slot, w);
                } else {
                    self.workers[slot] = Some(w);
                }
            }
            self.check_timeouts();
        }
    }

    /// How long `poll` may sleep: forever, unless a task timeout is
    /// configured and a worker is busy.
    fn tick(&self) -> Option<Duration> {
        let t = self.cfg.task_timeout?;
        let busy = self
            .workers
            .iter()
            .flatten()
            .any(|w| !w.inflight.is_empty());
        busy.then(|| (t / 10).clamp(Duration::from_millis(1), Duration::from_millis(50)))
    }

    /// No queued or running work and no live job.
    fn idle(&self) -> bool {
        self.pending.is_empty()
            && self.jobs.values().all(|j| j.ended || j.sealed)
            && self.workers.iter().flatten().all(|w| w.inflight.is_empty())
    }

    /// Takes every queued command. `false` once the pool must stop now.
    fn drain_commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Command::Terminate) => return false,
                Ok(cmd) => self.command(cmd),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Job {
                id,
                tx,
                f,
                tramp,
                ctx,
            } => {
                if let Some((step, msg)) = &self.broken {
                    tx.send(JobMsg::Abort(setup_error(step, msg)));
                    return;
                }
                self.jobs.insert(
                    id,
                    Job {
                        tx,
                        f,
                        tramp,
                        ctx: ctx.map(Arc::new),
                        chunks: 0,
                        sealed: false,
                        ended: false,
                    },
                );
            }
            Command::Chunk {
                job,
                base,
                count,
                items,
            } => {
                let Some(j) = self.jobs.get_mut(&job) else {
                    return;
                };
                if j.ended || count == 0 {
                    return;
                }
                j.chunks += 1;
                let id = self.next_chunk;
                self.next_chunk += 1;
                self.pending.push_back(Chunk {
                    id,
                    job,
                    base,
                    items: Arc::new(items),
                    start: 0,
                    end: count,
                });
            }
            Command::Seal(job) => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.sealed = true;
                }
                self.maybe_finish(job);
            }
            Command::EndJob(job) => {
                if let Some(j) = self.jobs.get_mut(&job) {
                    j.ended = true;
                    let before = self.pending.len();
                    self.pending.retain(|c| c.job != job);
                    j.chunks -= before - self.pending.len();
                }
                self.maybe_finish(job);
            }
            Command::Close => self.closing = true,
            Command::Terminate => unreachable!("handled by drain_commands"),
        }
    }

    /// Drops a job that is sealed or ended and has no chunk left, and tells
    /// the workers to forget its context.
    fn maybe_finish(&mut self, job: u64) {
        let done = self
            .jobs
            .get(&job)
            .is_some_and(|j| (j.sealed || j.ended) && j.chunks == 0);
        if !done {
            return;
        }
        self.jobs.remove(&job);
        for w in self.workers.iter_mut().flatten() {
            if w.contexts.remove(&job) && !w.exiting {
                wire::push_forget(&mut w.out, job);
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
            if self.pending.is_empty() {
                break;
            }
            for slot in 0..self.workers.len() {
                let Some(w) = self.workers[slot].as_mut() else {
                    continue;
                };
                if w.exiting
                    || w.eof
                    || w.fault.is_some()
                    || w.inflight.len() >= level
                    || w.out.len() - w.out_pos > OUT_HIGH_WATER
                {
                    continue;
                }
                let left = match self.cfg.max_tasks_per_child {
                    Some(m) => (m as u64).saturating_sub(w.assigned),
                    None => u64::MAX,
                };
                if left == 0 {
                    continue;
                }
                let Some(mut chunk) = pop_live(&mut self.pending, &mut self.jobs) else {
                    break;
                };
                let len = u64::from(chunk.end - chunk.start);
                if len > left {
                    // Split at the worker's remaining allowance.
                    let mut rest = chunk.clone();
                    rest.id = self.next_chunk;
                    self.next_chunk += 1;
                    chunk.end = chunk.start + left as u32;
                    rest.start = chunk.end;
                    if let Some(j) = self.jobs.get_mut(&rest.job) {
                        j.chunks += 1;
                    }
                    self.pending.push_front(rest);
                }
                let job = self.jobs.get(&chunk.job).expect("pop_live keeps live jobs");
                if let Some(ctx) = &job.ctx {
                    if w.contexts.insert(chunk.job) {
                        wire::push_context(&mut w.out, chunk.job, ctx);
                    }
                }
                wire::push_chunk(
                    &mut w.out,
                    chunk.id,
                    chunk.job,
                    job.f,
                    job.tramp,
                    chunk.start,
                    chunk.end,
                    &chunk.items,
                );
                if w.inflight.is_empty() {
                    w.last_done = now;
                }
                let n = u64::from(chunk.end - chunk.start);
                w.inflight.push_back(InFlight {
                    chunk,
                    seq_base: w.seq_next,
                    reported: 0,
                });
                w.seq_next += n;
                w.assigned += n;
            }
        }
        if let Some(m) = self.cfg.max_tasks_per_child {
            for w in self.workers.iter_mut().flatten() {
                if w.assigned >= m as u64 && w.inflight.is_empty() && !w.exiting {
                    wire::push_exit(&mut w.out);
                    w.exiting = true;
                }
            }
        }
    }

    /// Reads what the worker sent (a bounded number of reads) and handles
    /// every whole frame.
    fn read_from(&mut self, w: &mut Worker) {
        for _ in 0..8 {
            match w.reader.fill(w.sock.as_fd()) {
                Ok(Fill::Data) => {
                    self.frames(w);
                    // A short read took all there was: poll says when more
                    // comes, no need for a read that fails with EAGAIN.
                    if w.reader.drained() {
                        return;
                    }
                }
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e @ Error::Codec(_)) => return fault(w, e),
                // End of file, or a reset (the worker exited with bytes
                // unread): a worker closes its socket only by exiting. Its
                // sentinel reports the exit.
                Ok(Fill::Eof) | Err(_) => {
                    w.eof = true;
                    if !w.exiting {
                        let _ = w.process.kill();
                    }
                    return;
                }
            }
            if w.fault.is_some() {
                return;
            }
        }
    }

    /// Handles the whole frames buffered from `w`.
    fn frames(&mut self, w: &mut Worker) {
        loop {
            let payload = match w.reader.next_payload() {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => return fault(w, e),
            };
            let msg = match wire::parse_from_worker(payload) {
                Ok(m) => m,
                Err(e) => return fault(w, e),
            };
            match msg {
                FromWorker::InitFailed { message } => {
                    self.broken = Some(("pool initializer".into(), message));
                    return;
                }
                FromWorker::Results {
                    chunk,
                    start,
                    count,
                    entries,
                } => {
                    let Some(front) = w.inflight.front_mut() else {
                        return fault(w, protocol("results for no chunk"));
                    };
                    let c = &front.chunk;
                    if c.id != chunk
                        || start != c.start + front.reported
                        || u64::from(start) + u64::from(count) > u64::from(c.end)
                    {
                        return fault(w, protocol("results out of order"));
                    }
                    w.produced = true;
                    if let Some(job) = self.jobs.get(&c.job) {
                        job.tx.send(JobMsg::Results {
                            base: c.base + u64::from(start),
                            count,
                            bytes: entries.to_vec(),
                        });
                    }
                    front.reported += count;
                    if front.chunk.start + front.reported == front.chunk.end {
                        let done = w.inflight.pop_front().expect("front exists");
                        let now = Instant::now();
                        let dt = now.duration_since(w.last_done).as_secs_f64();
                        w.last_done = now;
                        self.chunk_secs = 0.7 * self.chunk_secs + 0.3 * dt;
                        if let Some(j) = self.jobs.get_mut(&done.chunk.job) {
                            j.chunks -= 1;
                        }
                        self.maybe_finish_in(w, done.chunk.job);
                    }
                }
            }
        }
    }

    /// [`maybe_finish`](Dispatcher::maybe_finish) while `w` is out of the
    /// worker table.
    fn maybe_finish_in(&mut self, w: &mut Worker, job: u64) {
        let done = self
            .jobs
            .get(&job)
            .is_some_and(|j| (j.sealed || j.ended) && j.chunks == 0);
        if done && w.contexts.remove(&job) && !w.exiting {
            wire::push_forget(&mut w.out, job);
        }
        self.maybe_finish(job);
    }

    /// A worker exited: fail the item it was running, queue the rest of its
    /// chunks again, and replace it.
    fn on_exit(&mut self, slot: usize, mut w: Worker) {
        // Results it wrote before dying are still in the socket.
        if !w.eof {
            while let Ok(Fill::Data) = w.reader.fill(w.sock.as_fd()) {
                self.frames(&mut w);
                if w.fault.is_some() {
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
        let running = (started > finished).then(|| started - 1);
        let mut fault = w.fault.take();
        let (timed_out, pid) = (w.timed_out, w.pid);
        // With no running item, a protocol fault is charged to the first
        // unreported item.
        let mut blame_first = running.is_none() && fault.is_some();
        let mut error_for = |seq: u64| -> Error {
            if timed_out == Some(seq) {
                Error::Timeout
            } else if let Some(e) = fault.take() {
                e
            } else {
                Error::Died { pid, exitcode }
            }
        };
        let mut again: Vec<Chunk> = Vec::new();
        let mut failed: Vec<(u64, u64, Error)> = Vec::new();
        for inf in w.inflight.drain(..) {
            let c = inf.chunk;
            let first = c.start + inf.reported;
            if let Some(j) = self.jobs.get_mut(&c.job) {
                j.chunks -= 1;
            }
            if first == c.end {
                continue;
            }
            let seq_of = |i: u32| inf.seq_base + u64::from(i - c.start);
            let culprit = match running {
                Some(r) if r >= seq_of(first) && r < seq_of(c.end) => {
                    Some(c.start + (r - inf.seq_base) as u32)
                }
                None if blame_first => {
                    blame_first = false;
                    Some(first)
                }
                _ => None,
            };
            let mut push = |start: u32, end: u32| {
                if start < end {
                    let mut piece = c.clone();
                    piece.start = start;
                    piece.end = end;
                    again.push(piece);
                }
            };
            match culprit {
                Some(i) => {
                    push(first, i);
                    failed.push((c.job, c.base + u64::from(i), error_for(seq_of(i))));
                    push(i + 1, c.end);
                }
                None => push(first, c.end),
            }
        }
        for (job, index, error) in failed {
            if let Some(j) = self.jobs.get(&job) {
                j.tx.send(JobMsg::Failed { index, error });
            }
        }
        for mut piece in again.into_iter().rev() {
            if let Some(j) = self.jobs.get_mut(&piece.job) {
                if !j.ended {
                    j.chunks += 1;
                    piece.id = self.next_chunk;
                    self.next_chunk += 1;
                    self.pending.push_front(piece);
                }
            }
        }
        let jobs: Vec<u64> = self.jobs.keys().copied().collect();
        for job in jobs {
            self.maybe_finish(job);
        }
        // A worker that dies before running anything, unasked, counts
        // towards giving up.
        if started == 0 && !w.produced && !w.exiting && w.timed_out.is_none() {
            self.startup_deaths += 1;
            if self.startup_deaths >= MAX_STARTUP_DEATHS && self.broken.is_none() {
                self.broken = Some((
                    "pool worker start".into(),
                    format!(
                        "{} workers in a row died before running a task (last: pid {}, exit code {})",
                        self.startup_deaths, w.pid, exitcode
                    ),
                ));
            }
        } else {
            self.startup_deaths = 0;
        }
        drop(w);
        if let Some((step, msg)) = self.broken.clone() {
            self.abort_all(&step, &msg);
        }
        if self.exit_sent || self.broken.is_some() {
            return;
        }
        if let Err(e) = self.spawn(slot) {
            log::error!("multiproc: cannot replace a pool worker: {e}");
            if self.workers.iter().all(Option::is_none) {
                self.broken = Some(("pool worker start".into(), e.to_string()));
                self.abort_all("pool worker start", &e.to_string());
            }
        }
    }

    /// Fails every job and drops the queue (the pool is broken).
    fn abort_all(&mut self, step: &str, msg: &str) {
        self.pending.clear();
        for (_, j) in self.jobs.drain() {
            j.tx.send(JobMsg::Abort(setup_error(step, msg)));
        }
        for w in self.workers.iter_mut().flatten() {
            w.inflight.clear();
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
            if w.inflight.is_empty() || w.timed_out.is_some() || w.fault.is_some() {
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
                w.timed_out = Some(started - 1);
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
        self.pending.clear();
        for (_, j) in self.jobs.drain() {
            j.tx.send(JobMsg::Abort(Error::PoolClosed));
        }
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

/// The first queued chunk whose job still wants it (chunks of ended jobs
/// are dropped on the way).
fn pop_live(pending: &mut VecDeque<Chunk>, jobs: &mut HashMap<u64, Job>) -> Option<Chunk> {
    while let Some(c) = pending.pop_front() {
        match jobs.get_mut(&c.job) {
            Some(j) if !j.ended => return Some(c),
            Some(j) => j.chunks -= 1,
            None => {}
        }
    }
    None
}

/// Writes as much of the worker's queued bytes as the socket takes.
fn write_out(w: &mut Worker) {
    while w.out_pos < w.out.len() {
        match sys::write_some(w.sock.as_fd(), &w.out[w.out_pos..]) {
            Ok(n) => w.out_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => {
                // The worker is gone; its sentinel will tell.
                w.out_pos = w.out.len();
            }
        }
    }
    w.out.clear();
    w.out_pos = 0;
    if w.out.capacity() > 4 * OUT_HIGH_WATER {
        w.out = Vec::new();
    }
}

/// Records a protocol error from `w` and kills it; the item it was running
/// (or its first unreported one) fails with `e`.
fn fault(w: &mut Worker, e: Error) {
    if w.fault.is_none() {
        w.fault = Some(e);
        w.eof = true;
        let _ = w.process.kill();
    }
}

fn protocol(what: &str) -> Error {
    crate::error::CodecError::new(crate::error::CodecErrorKind::Invalid(format!(
        "pool protocol: {what}"
    )))
    .into()
}

fn setup_error(step: &str, msg: &str) -> Error {
    Error::Setup {
        step: step.to_string(),
        source: io::Error::other(msg.to_string()),
    }
}
