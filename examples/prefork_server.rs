//! A pre-fork TCP server in the style of tornado: bind one listening socket,
//! fork N children with `fork_processes`, and let each child accept on the
//! shared socket. Each answers an HTTP/1.0 request with its task id and pid.
//!
//! ```text
//! cargo run --release --example prefork_server -- --port 8080 --processes 4
//! curl http://127.0.0.1:8080/        # task 2 pid 41803
//! kill -TERM <parent pid>            # children get SIGTERM, the parent exits 0
//! ```
//!
//! A child that crashes is restarted with the same task id; `kill -HUP` on
//! the parent restarts the children one by one. `--port 0` picks a free port
//! (printed on the first line).
//!
//! Each child installs a [`multiproc::StopSignal`]: on `SIGTERM` (a
//! shutdown, or the old child of a `SIGHUP` roll) it stops accepting,
//! finishes the requests it holds and exits 0, so rolls and shutdowns under
//! load fail no request.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port = 8080u16;
    let mut processes = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().ok_or("--port needs a value")?.parse()?,
            "--processes" => processes = args.next().ok_or("--processes needs a value")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    // Bind before forking: every child accepts on this one socket.
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    println!(
        "listening on {} (supervisor pid {})",
        listener.local_addr()?,
        std::process::id()
    );
    // The parent supervises here and never returns; each child returns
    // with its task id and serves.
    let id = multiproc::fork_processes(processes, None)?;
    // From here SIGTERM asks for a graceful stop instead of killing us.
    let stop = multiproc::StopSignal::install()?;
    listener.set_nonblocking(true)?;
    while !stop.requested() {
        // Serve every connection waiting, one at a time; a stop request
        // that comes meanwhile is seen once the one in hand is answered.
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(false)?;
                    if let Err(e) = serve(conn, id) {
                        eprintln!("task {id}: {e}");
                    }
                    if stop.requested() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    eprintln!("task {id}: accept: {e}");
                    break;
                }
            }
        }
        // Sleep until a client or the stop request comes.
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
            if e != nix::errno::Errno::EINTR {
                return Err(e.into());
            }
        }
    }
    // Stop requested: accept nothing more (the connection in hand was
    // answered), exit 0.
    std::process::exit(0)
}

/// Reads the request head and answers with this child's task id and pid.
/// `GET /slow` takes 100 ms, to show several children serving at once.
fn serve(mut conn: TcpStream, id: usize) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    if head.starts_with(b"GET /slow") {
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = format!("task {id} pid {}\n", std::process::id());
    write!(
        conn,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}
