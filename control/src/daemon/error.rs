//! [`DaemonError`]: why a node could not be made, started or unlocked.

use crate::ca::{pki, tls};
use crate::raft::seal::SealError;
use mtls::datadir::NodeFileError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Cert(#[from] mtls::CertError),
    #[error(transparent)]
    NodeFile(#[from] NodeFileError),
    #[error("this node's manager")]
    Manager(#[from] crate::raft::manager::StartError),
}

pub(super) fn msg(m: impl Into<String>) -> DaemonError {
    DaemonError::Msg(m.into())
}
