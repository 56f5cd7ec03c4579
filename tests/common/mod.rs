//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A generous bound for anything a test waits on.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Kills and reaps a started `Process` when dropped, even when an assertion
/// failed first: no test leaves a child behind.
pub struct Reaped(pub multiproc::Process);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.join_timeout(DEADLINE);
    }
}

/// Starts `f` in a child, killed and reaped when the handle drops.
pub fn start(f: impl FnOnce() + Send + 'static) -> Reaped {
    let mut p = multiproc::Process::new(f);
    p.start().expect("start child");
    Reaped(p)
}

/// The child's exit code, within [`DEADLINE`].
pub fn exit_code(p: &Reaped) -> i32 {
    p.join_timeout(DEADLINE)
        .expect("join")
        .expect("child did not exit in time")
}

impl std::ops::Deref for Reaped {
    type Target = multiproc::Process;
    fn deref(&self) -> &multiproc::Process {
        &self.0
    }
}

/// What a re-run of the test binary printed.
#[derive(Debug)]
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A command that re-runs this test binary with only the `#[ignore]`d test
/// `name`, on one thread, output not captured, stdout and stderr piped.
pub fn self_command(name: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// Runs [`self_command`]`(name)` to its end; kills it if it runs past
/// `deadline`. Its output is read to the end within the deadline too (a
/// grandchild could hold the pipes open).
pub fn run_self(name: &str, envs: &[(&str, &str)], deadline: Duration) -> Run {
    let mut cmd = self_command(name);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = ReapedChild(cmd.spawn().unwrap());
    let stdout = read_in_background(child.0.stdout.take().unwrap());
    let stderr = read_in_background(child.0.stderr.take().unwrap());
    let Some(status) = wait_child(&mut child.0, deadline) else {
        panic!("{name} ran past its deadline of {deadline:?}");
    };
    let text = |rx: mpsc::Receiver<String>| {
        rx.recv_timeout(DEADLINE)
            .unwrap_or_else(|_| panic!("{name}'s output did not end"))
    };
    Run {
        status,
        stdout: text(stdout),
        stderr: text(stderr),
    }
}

/// Reads `pipe` to its end on a thread; the text arrives on the channel.
fn read_in_background(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = String::new();
        let _ = pipe.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    rx
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold
/// spaces and parentheses): the state is `[0]`, the parent `[1]`, the
/// session `[3]`. `None` once the process is gone.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// `(pid, state)` of every child of `ppid`.
fn children_of(ppid: u32) -> Vec<(u32, String)> {
    let parent = ppid.to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            if f.len() > 1 && f[1] == parent {
                found.push((pid, f[0].clone()));
            }
        }
    }
    found
}

fn is_dead_state(state: &str) -> bool {
    state == "Z" || state == "X"
}

/// The pids of zombie processes whose parent is `ppid`.
pub fn zombies_of(ppid: u32) -> Vec<u32> {
    children_of(ppid)
        .into_iter()
        .filter(|(_, state)| state == "Z")
        .map(|(pid, _)| pid)
        .collect()
}

/// Live (not zombie) children of `ppid`.
pub fn live_children_of(ppid: u32) -> Vec<u32> {
    children_of(ppid)
        .into_iter()
        .filter(|(_, state)| !is_dead_state(state))
        .map(|(pid, _)| pid)
        .collect()
}

/// Children of this process: `(live, zombies)`.
pub fn children_of_self() -> (usize, usize) {
    let all = children_of(std::process::id());
    let zombies = all.iter().filter(|(_, state)| state == "Z").count();
    let live = all
        .iter()
        .filter(|(_, state)| !is_dead_state(state))
        .count();
    (live, zombies)
}

/// Open fds of this process.
pub fn fd_count() -> usize {
    // Less the one `read_dir` itself holds while counting.
    fd_count_of(std::process::id()) - 1
}

/// Open fds of process `pid`.
pub fn fd_count_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether `pid` is gone or a zombie (dead, maybe not yet reaped by init).
pub fn is_dead(pid: u32) -> bool {
    stat_fields(pid).is_none_or(|f| f.first().is_none_or(|s| is_dead_state(s)))
}

/// Whether a process with this pid exists (a zombie counts as gone).
pub fn pid_alive(pid: u32) -> bool {
    !is_dead(pid)
}

/// Waits until `pid` is gone, at most `timeout`.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    eventually(timeout, || is_dead(pid))
}

/// Waits until `cond` holds, checking every 10 ms, at most `deadline`.
pub fn eventually(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// Runs `body` on a thread and fails the test if it does not finish within
/// `secs` seconds (a hung pool must fail the test, not stall the suite).
pub fn within<T: Send + 'static>(secs: u64, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(body());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("the body sent nothing and did not panic"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test body did not finish within {secs} s"),
    }
}

/// Kills (if still running) and reaps a subprocess on drop.
pub struct ReapedChild(pub Child);

impl Drop for ReapedChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the ignored test `name` of this test binary in a subprocess, with
/// `env`, and returns its exit success and stdout; fails the test after
/// `secs` seconds.
pub fn run_ignored(name: &str, env: &[(&str, &str)], secs: u64) -> (bool, String) {
    let run = run_self(name, env, Duration::from_secs(secs));
    (run.status.success(), run.stdout)
}

/// A fresh empty directory for one test.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "multiproc-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Appends `line` to `path` in one `write` (O_APPEND: lines of several
/// processes do not mix).
pub fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// The lines of `path` (none if it does not exist yet).
pub fn read_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The path of example `name`, built by `cargo test` next to the test
/// binaries (`target/<profile>/examples`); built on demand when only this
/// test target was asked for.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let path = profile_dir.join("examples").join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", name]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "cannot build example {name}");
    }
    path
}

/// Spawns `cmd` with stdout piped and returns the child (killed and reaped
/// on drop) and its first stdout line.
pub fn spawn_with_first_line(mut cmd: Command) -> (ReapedChild, String) {
    use std::io::BufRead;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = ReapedChild(cmd.spawn().unwrap());
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = std::io::BufReader::new(out);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    let line = rx.recv_timeout(DEADLINE).expect("no first line in time");
    (child, line)
}

/// Waits for the subprocess to exit, at most `deadline`.
pub fn wait_child(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}
