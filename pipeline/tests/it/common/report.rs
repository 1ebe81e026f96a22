//! The chaos report both crates' suites append to (`tools/test` prints it at the end).

/// Appends one row to the chaos report: scenario, trials, held, failed.
pub fn report(scenario: &str, trials: usize, held: usize) {
    use std::io::Write;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-report.tsv");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{scenario}\t{trials}\t{held}\t{}", trials - held);
    }
}
