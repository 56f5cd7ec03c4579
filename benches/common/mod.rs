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
