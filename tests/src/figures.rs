//! Figures a test measured, for the suite's summary.
//!
//! `figure("fault: ...")` prints the line and, when `MESH_FIGURES_LOG` names
//! a file (as `cargo xtask test` sets it), appends it there, so the runner
//! prints every figure after its summary even though libtest hides the
//! output of tests that pass. docs/RELIABILITY.md records them.

/// Env var naming the file figures are appended to.
pub const FIGURES_LOG_ENV: &str = "MESH_FIGURES_LOG";

/// Prints `line` and records it for the summary.
pub fn figure(line: &str) {
    println!("{line}");
    crate::runlog::append(FIGURES_LOG_ENV, line);
}
