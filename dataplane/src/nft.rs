//! nftables, driven as netavark drives it: a ruleset script piped to
//! `nft -f -`, applied as one transaction. The IPVS backend and encrypted
//! overlays each keep their own table.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

/// Runs `nft -f -` with `script`; nft's complaint on failure.
pub fn run(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(|e: std::io::Error| format!("write to nft: {e}"))?;
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}
