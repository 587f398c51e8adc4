//! [`IpvsError`]: why the IPVS backend failed, each naming what it tried.

use crate::{lb::SyncError, nlsock::NlError};

/// Errors of the IPVS backend, each naming what it tried.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error(
        "IPVS is not available in this kernel: the generic-netlink family \"IPVS\" does not exist \
         (the kernel lacks CONFIG_IP_VS or the ip_vs module cannot load). \
         Use --lb-backend ebpf, the default"
    )]
    Unavailable,
    #[error(transparent)]
    Netlink(#[from] NlError),
    #[error("{0}")]
    Io(String),
}

impl From<IpvsError> for SyncError {
    fn from(e: IpvsError) -> SyncError {
        SyncError::Ipvs(format!("ipvs: {e}"))
    }
}
