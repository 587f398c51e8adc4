//! Figures a test measured, for the suite's summary.
//!
//! `figure("fault: ...")` prints the line and, when `MESH_FIGURES_LOG` names
//! a file (as `cargo xtask test` sets it), appends it there, so the runner
//! prints every figure after its summary even though libtest hides the
//! output of tests that pass. docs/RELIABILITY.md records them.

use std::{fs::OpenOptions, io::Write as _};

/// Env var naming the file figures are appended to.
pub const FIGURES_LOG_ENV: &str = "MESH_FIGURES_LOG";

/// Prints `line` and records it for the summary.
pub fn figure(line: &str) {
    println!("{line}");
    if let Ok(path) = std::env::var(FIGURES_LOG_ENV) {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot append to {FIGURES_LOG_ENV}={path}: {e}"));
        writeln!(file, "{line}").expect("write the figures log");
    }
}
