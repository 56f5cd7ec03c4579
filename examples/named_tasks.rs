//! Named child tasks: start a few, join some, terminate one from the parent,
//! and print every exit code.
//!
//! Run with `cargo run --release --example named_tasks`.

use std::time::Duration;

use multiproc::{Process, Result};

fn main() -> Result<()> {
    println!(
        "parent {} is {}",
        std::process::id(),
        multiproc::current_process().name()
    );

    // A task that finishes on its own.
    let mut fetch = Process::new(|| {
        let me = multiproc::current_process();
        println!("  [{}] pid {} fetching", me.name(), me.pid());
    })
    .with_name("fetch");

    // A task that reports failure with an exit code, as sys.exit(3) would.
    let mut parse = Process::new(|| {
        println!(
            "  [{}] input is malformed, exiting with 3",
            multiproc::current_process().name()
        );
        multiproc::exit(3);
    })
    .with_name("parse");

    // A task that panics: exit code 1 and one line on stderr.
    let mut check = Process::new(|| {
        let values: Vec<u32> = Vec::new();
        let _first = values[0];
    })
    .with_name("check");

    // A runaway task that the parent terminates.
    let mut spin = Process::new(|| loop {
        std::thread::sleep(Duration::from_millis(100));
    })
    .with_name("spin");

    // An unnamed task gets Process-N.
    let mut anonymous = Process::new(|| {
        println!("  [{}] default name", multiproc::current_process().name());
    });

    for p in [
        &mut fetch,
        &mut parse,
        &mut check,
        &mut spin,
        &mut anonymous,
    ] {
        p.start()?;
    }
    println!("live children: {:?}", names(&multiproc::active_children()));

    for p in [&fetch, &parse, &check, &anonymous] {
        println!("{:<10} exit code {}", p.name(), p.join()?);
    }

    assert_eq!(spin.join_timeout(Duration::from_millis(200))?, None);
    println!(
        "{:<10} still running after 200 ms, terminating it",
        spin.name()
    );
    spin.terminate()?;
    println!(
        "{:<10} exit code {} (killed by SIGTERM)",
        spin.name(),
        spin.join()?
    );
    println!("live children: {:?}", names(&multiproc::active_children()));
    Ok(())
}

fn names(children: &[multiproc::ProcessInfo]) -> Vec<&str> {
    children.iter().map(|c| c.name()).collect()
}
