//! nftables, driven as netavark drives it: a ruleset script piped to
//! `nft -f -`, applied as one transaction. The IPVS backend and encrypted
//! overlays each keep their own table.

use std::{
    io::{self, Write as _},
    process::{Command, Stdio},
};

/// Why a ruleset was not applied (the transaction then changed nothing).
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft: {0}")]
    Spawn(#[source] io::Error),
    #[error("writing the ruleset to nft: {0}")]
    Write(#[source] io::Error),
    #[error("waiting for nft: {0}")]
    Wait(#[source] io::Error),
    /// nft ran and refused: what it said on stderr.
    #[error("nft refused the ruleset: {stderr}")]
    Refused { stderr: String },
}

/// Runs `nft -f -` with `script`.
pub fn run(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .map_err(NftError::Write)?;
    let out = child.wait_with_output().map_err(NftError::Wait)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
