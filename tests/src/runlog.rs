//! Lines a test hands to `cargo xtask test` through a file the runner
//! names in an environment variable (skips, figures).

use std::{fs::OpenOptions, io::Write as _};

/// Appends `line` to the file `env` names, if it names one.
pub(crate) fn append(env: &str, line: &str) {
    if let Ok(path) = std::env::var(env) {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot append to {env}={path}: {e}"));
        writeln!(file, "{line}").unwrap_or_else(|e| panic!("writing {env}={path}: {e}"));
    }
}
