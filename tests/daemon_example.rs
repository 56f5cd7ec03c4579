//! `examples/daemon.rs`, run as a user would: `start`, a refused second
//! `start`, `status`, `stop` (`SIGTERM`, pid file removed), every command
//! bounded in time, no daemon left behind.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// What one command of the example did.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `daemon --dir DIR ARG` to its end (killed past [`DEADLINE`]). Its
/// output goes to files, not pipes: a daemon forked by `start` must not
/// hold our end open.
fn example(dir: &Path, arg: &str) -> Out {
    let out = dir.join(format!("{arg}.out"));
    let err = dir.join(format!("{arg}.err"));
    let mut child = ReapedChild(
        Command::new(example_binary("daemon"))
            .arg("--dir")
            .arg(dir.join("d"))
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let status = wait_child(&mut child.0, DEADLINE)
        .unwrap_or_else(|| panic!("`daemon {arg}` ran past {DEADLINE:?}"));
    Out {
        code: status.code(),
        stdout: std::fs::read_to_string(out).unwrap(),
        stderr: std::fs::read_to_string(err).unwrap(),
    }
}

/// Kills the daemon a failed test left running, and removes the folder.
struct Cleanup(PathBuf, Option<u32>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.1 {
            if !is_dead(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                wait_gone(pid, DEADLINE);
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_daemon_example_starts_refuses_a_second_instance_and_stops() {
    let dir = temp_dir("daemon-example");
    let mut cleanup = Cleanup(dir.clone(), None);
    let files = dir.join("d");
    let pid_file = files.join("daemon.pid");

    let started = example(&dir, "start");
    assert_eq!(started.code, Some(0), "{started:?}");
    // The launcher exits 0 only once the daemon is set up: the pid file is
    // in place (and locked) by then.
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("a pid file once start returned")
        .trim()
        .parse()
        .unwrap();
    cleanup.1 = Some(pid);
    assert!(pid_alive(pid));
    let log = files.join("daemon.log");
    assert!(eventually(DEADLINE, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains(&format!("daemon {pid}: up"))));

    let second = example(&dir, "start");
    assert_eq!(second.code, Some(1), "{second:?}");
    assert!(
        second
            .stderr
            .contains(&format!("cannot start: already running as pid {pid}")),
        "{second:?}"
    );
    assert!(pid_alive(pid), "the first daemon runs on");

    let status = example(&dir, "status");
    assert_eq!(status.code, Some(0), "{status:?}");
    assert_eq!(status.stdout, format!("running as pid {pid}\n"));

    let stopped = example(&dir, "stop");
    assert_eq!(stopped.code, Some(0), "{stopped:?}");
    assert_eq!(stopped.stdout, format!("stopped pid {pid}\n"));
    // `stop` returns once the daemon is gone, and its pid file went with it.
    assert!(is_dead(pid));
    assert!(!pid_file.exists(), "the pid file was removed");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains(&format!("daemon {pid}: SIGTERM, stopping")));

    let status = example(&dir, "status");
    assert_eq!(status.code, Some(3), "{status:?}");
    let again = example(&dir, "stop");
    assert_eq!(again.code, Some(3), "{again:?}");
}

#[test]
fn the_daemon_example_reports_a_setup_error() {
    // A folder where the pid file should be: the daemon's setup fails, and
    // its launcher says why.
    let dir = temp_dir("daemon-example-err");
    let _cleanup = Cleanup(dir.clone(), None);
    std::fs::create_dir_all(dir.join("d").join("daemon.pid")).unwrap();
    let out = example(&dir, "start");
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .starts_with("daemon: cannot start: pid file failed in the child: Is a directory"),
        "{out:?}"
    );
}
