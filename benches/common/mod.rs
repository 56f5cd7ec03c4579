//! What the benches share: the output line, in the form of
//! `../shared/anchors` so the two outputs pair line by line.

/// Prints `<id> <name> <key>=<median> reps=<n> min=<min> max=<max>`.
pub fn emit(id: &str, name: &str, key: &str, values: &[f64], decimals: usize) {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    println!(
        "{id} {name} {key}={median:.decimals$} reps={n} min={:.decimals$} max={:.decimals$}",
        v[0],
        v[n - 1]
    );
}

/// `fork`, `_exit(0)` in the child, `waitpid` in the parent: the C probe's
/// loop body (`../shared/anchors/l1_fork.c`), from this process image.
#[allow(dead_code)] // not every bench forks
pub fn bare_fork_wait() {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::ForkResult;
    // SAFETY: the child only calls `_exit`, which is async-signal-safe.
    match unsafe { nix::unistd::fork() }.unwrap() {
        // SAFETY: `_exit` ends the child at once, running no destructor and
        // no at-exit handler of the parent's program.
        ForkResult::Child => unsafe { nix::libc::_exit(0) },
        ForkResult::Parent { child } => {
            assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
        }
    }
}
