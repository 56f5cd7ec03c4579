//! `MpiPool` under `mpiexec` (cargo feature `mpi`; MPICH's `mpiexec.hydra`).
//!
//! A program of its own (`harness = false`): run by `cargo test`, it is the
//! *driver* and re-launches itself under `mpiexec.hydra -np 3` and `-np 4`
//! (each launch bounded by `timeout`) for each scenario; launched by
//! `mpiexec` (the launcher sets `PMI_RANK`), it runs the scenario named in
//! `MP_MPI_SCENARIO` on every rank, and rank 0 prints `PASS <scenario>`
//! once every check held. Scenarios:
//!
//! - `methods`: every method gives what the local `Pool` gives on the same
//!   inputs; a segfaulting task fails only its item (`Died`, naming a
//!   worker rank) and the next map works; a panic is `Panicked`; a task past
//!   `task_timeout` is `Timeout`; a function from outside the executable is
//!   `Error::Mpi` and the pool still works.
//! - `mismatch`: ranks 1.. run a copy of the binary with one byte appended:
//!   `start()` on rank 0 is `Error::Mpi` naming the other build, and the job
//!   ends (non-zero: the refused ranks exit with 1).
//! - `kill_rank`: a worker rank is SIGKILLed while it computes: `mpiexec`
//!   exits non-zero within 15 s.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use multiproc::mpi::MpiPool;
use multiproc::{Error, Pool};

/// Bounds each `mpiexec` launch (the `timeout` command kills it past this).
const LAUNCH_TIMEOUT_S: u32 = 240;

fn main() {
    if std::env::var_os("PMI_RANK").is_some() {
        let scenario = std::env::var("MP_MPI_SCENARIO").unwrap_or_default();
        match scenario.as_str() {
            "methods" => methods(),
            "mismatch" => mismatch(),
            "kill_rank" => kill_rank(),
            other => panic!("unknown scenario {other:?}"),
        }
        return;
    }
    if which("mpiexec.hydra").is_none() {
        println!("test mpi ... skipped: no mpiexec.hydra (apt-get install mpich)");
        println!("\ntest result: ok. 0 passed; 0 failed; 1 ignored");
        return;
    }
    let mut passed = 0;
    for np in [3, 4] {
        run(&format!("methods_np{np}"), || driver_methods(np));
        passed += 1;
    }
    run("mismatched_binary_is_an_error", driver_mismatch);
    passed += 1;
    run("killed_rank_ends_the_job", driver_kill_rank);
    passed += 1;
    println!("\ntest result: ok. {passed} passed; 0 failed; 0 ignored");
}

fn run(name: &str, f: impl FnOnce()) {
    let t0 = Instant::now();
    f();
    println!("test {name} ... ok ({:.1?})", t0.elapsed());
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

/// `timeout mpiexec.hydra <args>` running this scenario, output captured.
fn mpiexec(scenario: &str, args: &[&str]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", &LAUNCH_TIMEOUT_S.to_string(), "mpiexec.hydra"])
        .args(args)
        .env("MP_MPI_SCENARIO", scenario)
        // UCX (MPICH's network layer) prints a backtrace for every
        // segfault it sees, the tests' deliberate ones included.
        .env("UCX_HANDLE_ERRORS", "none")
        .stdin(Stdio::null());
    c
}

fn exe() -> String {
    std::env::current_exe()
        .expect("the test's own path")
        .to_string_lossy()
        .into_owned()
}

fn driver_methods(np: usize) {
    let out = mpiexec("methods", &["-np", &np.to_string(), &exe()])
        .output()
        .expect("mpiexec.hydra runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("PASS methods"),
        "np {np}: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
}

fn driver_mismatch() {
    let dir = std::env::temp_dir().join(format!("multiproc-mpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("other-build");
    let mut bytes = std::fs::read(exe()).unwrap();
    bytes.push(0);
    std::fs::write(&copy, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let t0 = Instant::now();
    let out = mpiexec(
        "mismatch",
        &["-np", "1", &exe(), ":", "-np", "2", copy.to_str().unwrap()],
    )
    .output()
    .expect("mpiexec.hydra runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("PASS mismatch"),
        "{:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // The refused ranks exit with 1: the job fails, it does not hang.
    assert!(!out.status.success(), "{:?}", out.status);
    assert_ne!(out.status.code(), Some(124), "timed out");
    assert!(t0.elapsed() < Duration::from_secs(LAUNCH_TIMEOUT_S as u64));
}

fn driver_kill_rank() {
    let dir = std::env::temp_dir().join(format!("multiproc-mpi-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = mpiexec("kill_rank", &["-np", "3", &exe()])
        .env("MP_MPI_DIR", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mpiexec.hydra runs");
    let result = kill_rank_and_time(&mut child, &dir);
    // Whatever happened, nothing is left behind.
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (status, took) = result.unwrap_or_else(|e| panic!("{e}"));
    assert!(!status.success(), "mpiexec exited with {status:?}");
    assert!(took < Duration::from_secs(15), "mpiexec took {took:?}");
}

fn kill_rank_and_time(
    child: &mut Child,
    dir: &Path,
) -> Result<(std::process::ExitStatus, Duration), String> {
    // Rank 0 prints RUNNING once the pool started and the long map is
    // under way.
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("RUNNING") => break,
            Ok(_) => {}
            Err(_) => return Err("rank 0 never reported RUNNING".into()),
        }
    }
    let pid: i32 = std::fs::read_to_string(dir.join("rank-1.pid"))
        .map_err(|e| format!("rank 1's pid file: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("rank 1's pid: {e}"))?;
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .map_err(|e| format!("kill rank 1: {e}"))?;
    let limit = Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok((status, t0.elapsed()));
        }
        if t0.elapsed() > limit {
            return Err(format!(
                "mpiexec still runs {limit:?} after rank 1 was killed"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- on the ranks ----

fn square(x: u64) -> u64 {
    x * x
}

fn shout(s: String) -> String {
    format!("{}!", s.to_uppercase())
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Point {
    x: i32,
    label: String,
}

fn mirror(p: Point) -> Point {
    Point {
        x: -p.x,
        label: p.label.chars().rev().collect(),
    }
}

#[allow(clippy::ptr_arg)] // the context type is `Vec<u64>`
fn scaled(k: &Vec<u64>, i: usize) -> u64 {
    k[i % k.len()] * i as u64
}

fn crash_on_3(x: u32) -> u32 {
    if x == 3 {
        // The first SIGSEGV meets std's stack-overflow handler, which puts
        // the default action back; the second one kills the process.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
    }
    x + 1
}

fn panic_on_2(x: u32) -> u32 {
    if x == 2 {
        panic!("two is right out");
    }
    x
}

fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// The same results, comparing the kinds of failure (the MPI pool's `Died`
/// names a rank, the local pool's does not).
fn same<R: PartialEq + std::fmt::Debug>(
    mpi: &[multiproc::Result<R>],
    local: &[multiproc::Result<R>],
) {
    assert_eq!(mpi.len(), local.len());
    for (i, (a, b)) in mpi.iter().zip(local).enumerate() {
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "item {i}"),
            (Err(a), Err(b)) => assert_eq!(
                (a.is_died(), a.is_panicked(), a.is_timeout()),
                (b.is_died(), b.is_panicked(), b.is_timeout()),
                "item {i}: {a} vs {b}"
            ),
            _ => panic!("item {i}: {a:?} vs {b:?}"),
        }
    }
}

fn methods() {
    let pool = MpiPool::builder()
        .task_timeout(Duration::from_secs(2))
        .start()
        .expect("the pool starts");
    // Only rank 0 gets here.
    let np: usize = std::env::var("PMI_SIZE").unwrap().parse().unwrap();
    assert_eq!(pool.ranks(), np);
    assert!(pool.processes() >= np - 1, "{}", pool.processes());
    let local = Pool::builder()
        .processes(2)
        .task_timeout(Duration::from_secs(2))
        .build()
        .unwrap();

    let xs: Vec<u64> = (0..10_000).collect();
    assert_eq!(
        pool.map(square, xs.clone()).unwrap(),
        local.map(square, xs.clone()).unwrap()
    );
    for chunk in [1, 7, 5000, 20_000] {
        assert_eq!(
            pool.map_chunked(square, xs.clone(), chunk).unwrap(),
            local.map_chunked(square, xs.clone(), chunk).unwrap(),
            "chunk {chunk}"
        );
    }
    let words: Vec<String> = ["alpha", "beta", "", "δέλτα"].map(String::from).to_vec();
    assert_eq!(
        pool.map(shout, words.clone()).unwrap(),
        local.map(shout, words.clone()).unwrap()
    );
    let points: Vec<Point> = (0..50)
        .map(|x| Point {
            x,
            label: format!("p{x}"),
        })
        .collect();
    assert_eq!(
        pool.map(mirror, points.clone()).unwrap(),
        local.map(mirror, points.clone()).unwrap()
    );
    let table: Vec<u64> = (1..=1000).collect();
    assert_eq!(
        pool.map_with(&table, scaled, 0..3000usize).unwrap(),
        local.map_with(&table, scaled, 0..3000usize).unwrap()
    );
    // imap: lazy (an endless input), ordered.
    let first: Vec<u64> = pool
        .imap(square, 0u64..)
        .take(2000)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(first, (0..2000u64).map(square).collect::<Vec<_>>());
    let mut un: Vec<u64> = pool
        .imap_unordered(square, 0..3000u64)
        .collect::<Result<_, _>>()
        .unwrap();
    un.sort_unstable();
    let mut lun: Vec<u64> = local
        .imap_unordered(square, 0..3000u64)
        .collect::<Result<_, _>>()
        .unwrap();
    lun.sort_unstable();
    assert_eq!(un, lun);
    assert_eq!(
        pool.apply(square, 12).unwrap(),
        local.apply(square, 12).unwrap()
    );
    assert_eq!(
        pool.apply(shout, "hi".into()).unwrap(),
        local.apply(shout, "hi".into()).unwrap()
    );
    assert_eq!(pool.apply_async(square, 5).get().unwrap(), 25);
    assert_eq!(
        pool.map_async(square, 0..4u64).get().unwrap(),
        vec![0, 1, 4, 9]
    );
    let empty: Vec<u64> = pool.map(square, Vec::<u64>::new()).unwrap();
    assert!(empty.is_empty());

    // A segfault fails its item only; the rank names itself; the pool goes on.
    let got: Vec<_> = pool.imap(crash_on_3, 0..8u32).collect();
    let want: Vec<_> = local.imap(crash_on_3, 0..8u32).collect();
    same(&got, &want);
    match &got[3] {
        Err(Error::Died {
            rank: Some(rank),
            exitcode: -11,
            ..
        }) => assert!((1..np).contains(rank), "rank {rank}"),
        other => panic!("item 3: {other:?}"),
    }
    assert!(got[3].as_ref().unwrap_err().to_string().contains("on rank"));
    assert!(matches!(
        pool.map(crash_on_3, 0..8u32),
        Err(Error::Died {
            exitcode: -11,
            rank: Some(_),
            ..
        })
    ));
    assert_eq!(pool.map(square, 0..100u64).unwrap()[99], 9801);
    // A panic.
    let got: Vec<_> = pool.imap(panic_on_2, 0..4u32).collect();
    let want: Vec<_> = local.imap(panic_on_2, 0..4u32).collect();
    same(&got, &want);
    assert_eq!(
        got[2].as_ref().unwrap_err().panic_message(),
        Some("two is right out")
    );
    // The task timeout.
    let got: Vec<_> = pool.imap(sleep_ms, [1, 20_000, 2]).collect();
    assert!(got[1].as_ref().unwrap_err().is_timeout(), "{:?}", got[1]);
    assert_eq!(got[2].as_ref().ok(), Some(&2));

    // A function from outside the executable: an error, not a jump.
    // SAFETY: never called; the pool must refuse its address.
    let foreign: fn(u64) -> u64 = unsafe {
        std::mem::transmute(
            nix::libc::labs as unsafe extern "C" fn(nix::libc::c_long) -> nix::libc::c_long,
        )
    };
    match pool.map(foreign, 0..4u64) {
        Err(e @ Error::Mpi { .. }) => {
            assert!(e.to_string().contains("not in the executable"), "{e}")
        }
        other => panic!("a foreign function: {other:?}"),
    }
    assert!(pool.apply(foreign, 1).unwrap_err().is_mpi());
    assert_eq!(pool.apply(square, 9).unwrap(), 81);

    local.terminate();
    pool.close().unwrap();
    println!("PASS methods");
}

fn mismatch() {
    match MpiPool::start() {
        Err(e) => {
            assert!(e.is_mpi(), "{e:?}");
            assert!(e.to_string().contains("another build"), "{e}");
            println!("PASS mismatch: {e}");
        }
        Ok(_) => panic!("ranks running another build were accepted"),
    }
}

fn kill_rank() {
    if let (Ok(dir), Ok(rank)) = (std::env::var("MP_MPI_DIR"), std::env::var("PMI_RANK")) {
        std::fs::write(
            Path::new(&dir).join(format!("rank-{rank}.pid")),
            std::process::id().to_string(),
        )
        .unwrap();
    }
    let pool = MpiPool::builder()
        .workers_per_rank(1)
        .start()
        .expect("the pool starts");
    println!("RUNNING");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    // Long enough to outlast the test; mpiexec ends it when rank 1 dies.
    let _ = pool.map(sleep_ms, vec![60_000u64; 8]);
    println!("the map ended");
}
