//! Rolling restarts under load: `examples/prefork_server` (4 children) under
//! a load of our own (32 client threads on loopback, HTTP/1.0, a connection
//! per request) for 6 s, once without and once with three `SIGHUP` rolls.
//! Prints the requests per second and the failed requests (a refused or
//! reset connection, or a cut answer).
//!
//! `MP_SERVER_BIN=/path/to/prefork_server cargo bench --bench graceful`
//! measures another build of the server (for a before/after).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

const CLIENTS: usize = 32;
const SECS: u64 = 6;

fn server_binary() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("MP_SERVER_BIN") {
        return p.into();
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "--example", "prefork_server"])
        .status()
        .expect("cargo")
        .success();
    assert!(ok, "cannot build the example");
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/graceful-… -> target/release/examples/prefork_server
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("prefork_server")
}

fn one_request(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    s.read_to_string(&mut out).is_ok() && out.starts_with("HTTP/1.0 200 OK") && out.ends_with('\n')
}

/// (requests per second, failed requests)
fn run(rolls: u32) -> (f64, u64) {
    let mut child = Command::new(server_binary())
        .args(["--port", "0", "--processes", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let mut first = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut first).unwrap();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut out, &mut std::io::sink());
    });
    let port: u16 = first
        .split(':')
        .nth(1)
        .and_then(|p| p.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("port");
    let pid = child.id() as i32;
    // Let the children come up.
    let t = Instant::now();
    while !one_request(port) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if one_request(port) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for k in 1..=rolls {
        let at = Duration::from_secs(SECS) * k / (rolls + 1);
        std::thread::sleep(at.saturating_sub(t0.elapsed()));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        );
    }
    std::thread::sleep(Duration::from_secs(SECS).saturating_sub(t0.elapsed()));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let total = ok.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed);
    (total as f64 / secs, failed.load(Ordering::Relaxed))
}

fn main() {
    let (rps, failed) = run(0);
    common::emit("G1", "prefork_4_no_roll", "req_per_s", &[rps], 0);
    common::emit("G1", "prefork_4_no_roll", "failed", &[failed as f64], 0);
    let (rps, failed) = run(3);
    common::emit("G2", "prefork_4_three_rolls", "req_per_s", &[rps], 0);
    common::emit("G2", "prefork_4_three_rolls", "failed", &[failed as f64], 0);
}
