//! The classic fork-per-connection server, without a SIGCHLD handler and
//! without zombies: each accepted connection is served by a new `Process`
//! whose handle is dropped at once. The child closes its copy of the
//! listener, the parent its copy of the connection; the crate's reaper
//! collects each child as it exits, even when the server then sits idle.
//!
//! ```text
//! cargo run --release --example fork_server -- --port 7000
//! echo hello | nc 127.0.0.1 7000     # pid 51234: hello
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port = 7000u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().ok_or("--port needs a value")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    println!(
        "listening on {} (server pid {})",
        listener.local_addr()?,
        std::process::id()
    );
    let listener_fd = listener.as_raw_fd();
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        // The connection moves into the child's closure: the parent's copy
        // is closed right after the fork, when the closure is dropped here.
        let mut child = multiproc::Process::new(move || {
            // The child does not accept: close its copy of the listener.
            let _ = nix::unistd::close(listener_fd);
            let mut line = String::new();
            let mut reader = BufReader::new(&conn);
            if reader.read_line(&mut line).is_ok() {
                let _ = write!(&conn, "pid {}: {line}", std::process::id());
            }
        })
        .with_name("conn");
        if let Err(e) = child.start() {
            eprintln!("fork: {e}");
        }
        // `child` is dropped here, still running: the reaper waits for it.
    }
    Ok(())
}
