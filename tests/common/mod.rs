//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};
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
/// `deadline`.
pub fn run_self(name: &str, envs: &[(&str, &str)], deadline: Duration) -> Run {
    let mut cmd = self_command(name);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("{name} ran past its deadline of {deadline:?} ({status})");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// The pids of zombie processes whose parent is `ppid`.
pub fn zombies_of(ppid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...; comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let parent: u32 = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if parent == ppid && state == "Z" {
            found.push(pid);
        }
    }
    found
}

/// Open fds of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count() - 1
}

/// Whether `pid` is gone or a zombie (dead, maybe not yet reaped by init).
pub fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .map(|i| stat[i + 2..].starts_with('Z') || stat[i + 2..].starts_with('X'))
            .unwrap_or(true),
    }
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
