//! Loud, counted skips.
//!
//! A privileged test starts with `let Some(_root) = require_root("name") else { return };`.
//! A skip prints `mesh-skip: <test>: <reason>` and, when `MESH_SKIP_LOG` names a
//! file (as `cargo xtask test` sets it), appends that line there so the runner
//! counts the test as skipped, not passed.

/// Env var naming the file skips are appended to.
pub const SKIP_LOG_ENV: &str = "MESH_SKIP_LOG";

/// Proof that the privilege checks passed.
pub struct Skip;

/// Records that `test` was skipped because of `reason`.
pub fn record_skip(test: &str, reason: &str) {
    let line = format!("mesh-skip: {test}: {reason}");
    eprintln!("{line}");
    crate::runlog::append(SKIP_LOG_ENV, &line);
}

/// `Some` when running as root; otherwise records a skip for `test`.
pub fn require_root(test: &str) -> Option<Skip> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Some(Skip)
    } else {
        record_skip(test, "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
        None
    }
}
