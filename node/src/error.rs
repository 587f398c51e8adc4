//! What can go wrong on a node, by what it was doing: starting the data
//! plane, applying the cluster's tables, or taking the data plane down.
//! Each keeps its cause as `#[source]`.

use std::path::PathBuf;

use dataplane::{
    bpffs::BpffsError,
    ebpf::LoadError,
    ipsec::{IpsecError, XfrmError},
    ipvs::IpvsError,
    lb::SyncError,
    netlink::NetlinkError,
    overlay::OverlayError,
};

/// Starting the data plane failed; nothing the node serves depends on it
/// yet, and the pins an earlier meshd left are untouched.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--underlay needs --node")]
    NoNodeName,
    #[error("--lb-backend ipvs: {0}")]
    Ipvs(#[source] IpvsError),
    #[error("creating {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error("enabling IPv4 forwarding (the load balancer routes what it translates): {0}")]
    Forwarding(#[source] std::io::Error),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("reading the pinned load-balancer state: {0}")]
    Recover(#[source] SyncError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("opening netlink: {0}")]
    Netlink(#[source] NetlinkError),
}

/// Applying an update of the tables failed. The agent keeps the revision
/// unacknowledged and retries; what the error names is not in place.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("ipsec: {0}")]
    Ipsec(#[from] IpsecError),
    /// XFRM could not be opened, and the plaintext of the encrypted
    /// networks could not be blocked either.
    #[error("encrypted networks: {open}; and blocking their plaintext: {block}")]
    IpsecUnavailable {
        open: IpsecError,
        #[source]
        block: IpsecError,
    },
    #[error("overlay: {0}")]
    Overlay(#[from] OverlayError),
    #[error("load balancer: {0}")]
    Lb(#[from] SyncError),
    #[error("reading bridge {bridge}: {source}")]
    Bridge {
        bridge: String,
        #[source]
        source: NetlinkError,
    },
    #[error("attaching the load balancer to {bridge}: {source}")]
    Attach {
        bridge: String,
        #[source]
        source: LoadError,
    },
    #[error(transparent)]
    Dns(#[from] dataplane::dns::ServeError),
}

/// `meshd down` could not remove everything; what it names is left.
#[derive(Debug, thiserror::Error)]
pub enum DownError {
    #[error("opening netlink: {0}")]
    Netlink(#[source] NetlinkError),
    #[error("removing the overlay links: {0}")]
    Overlay(#[source] OverlayError),
    #[error("removing the IPsec states and policies: {0}")]
    Ipsec(#[source] XfrmError),
    #[error("removing the IPVS services: {0}")]
    Ipvs(#[source] IpvsError),
    #[error("removing the IPVS services: {0}")]
    IpvsSync(#[source] SyncError),
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node} has no pins under {root} and no overlay links")]
    NothingThere { node: String, root: PathBuf },
}
