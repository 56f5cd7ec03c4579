//! A probe for instruction counts of the tiny-item path (W2), to run under
//! `valgrind --tool=callgrind --trace-children=yes`: one pool of 2 workers,
//! `map(square)` over 1 M `u64` twice. Prints nothing but the check.
//!
//! ```text
//! cargo bench --bench probe_w2 --no-run
//! valgrind --tool=callgrind --trace-children=yes target/release/deps/probe_w2-<hash>
//! callgrind_annotate callgrind.out.<worker pid> | head
//! ```

fn square(x: u64) -> u64 {
    x * x
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let pool = multiproc::Pool::new(2).unwrap();
    for _ in 0..2 {
        let r = pool.map(square, 0..n).unwrap();
        assert_eq!(r[(n - 1) as usize], (n - 1) * (n - 1));
    }
    pool.close();
    pool.join().unwrap();
    println!("ok");
}
