//! Errors of IPsec: the XFRM operation the kernel refused ([`XfrmError`],
//! with a hint at the missing kernel feature), and [`IpsecError`].

use std::{net::Ipv4Addr, path::PathBuf};

use super::spec::{AEAD, NFT_TABLE, SaKey};

/// An XFRM operation, with the peer and SPI it concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XfrmOp {
    ListStates,
    ListPolicies,
    AddState(SaKey),
    DeleteState(SaKey),
    SetPolicy {
        local: Ipv4Addr,
        peer: Ipv4Addr,
        spi: u32,
    },
    DeletePolicy {
        local: Ipv4Addr,
        peer: Ipv4Addr,
    },
}

impl std::fmt::Display for XfrmOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XfrmOp::ListStates => write!(f, "list XFRM states"),
            XfrmOp::ListPolicies => write!(f, "list XFRM policies"),
            XfrmOp::AddState(k) => write!(
                f,
                "add ESP state {} -> {} spi {:#010x}",
                k.src, k.dst, k.spi
            ),
            XfrmOp::DeleteState(k) => {
                write!(
                    f,
                    "delete ESP state {} -> {} spi {:#010x}",
                    k.src, k.dst, k.spi
                )
            }
            XfrmOp::SetPolicy { local, peer, spi } => {
                write!(f, "set the ESP policy {local} -> {peer} (spi {spi:#010x})")
            }
            XfrmOp::DeletePolicy { local, peer } => {
                write!(f, "delete the ESP policy {local} -> {peer}")
            }
        }
    }
}

/// The kernel refused an XFRM request: what was asked, and why, with what
/// a missing kernel feature would explain.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {source}{}", hint(source.raw_os_error()))]
pub struct XfrmError {
    pub op: XfrmOp,
    #[source]
    pub source: std::io::Error,
}

impl XfrmError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

fn hint(errno: Option<i32>) -> String {
    match errno {
        Some(libc::EPROTONOSUPPORT) | Some(libc::ENOPROTOOPT) => {
            " (this kernel has no ESP or no XFRM netlink: CONFIG_INET_ESP, CONFIG_XFRM_USER)".into()
        }
        Some(libc::ENOENT) | Some(libc::ENOSYS) => {
            format!(" (this kernel has no {AEAD} for ESP: CONFIG_CRYPTO_GCM, CONFIG_INET_ESP)")
        }
        _ => String::new(),
    }
}

/// Why IPsec is not as asked. What was applied before the failure stays,
/// and the next apply retries the rest.
#[derive(Debug, thiserror::Error)]
pub enum IpsecError {
    /// Refused before anything was written.
    #[error("invalid IPsec spec")]
    InvalidSpec(#[from] super::spec::IpsecSpecError),
    #[error("opening an XFRM netlink socket: {0} (this kernel has no CONFIG_XFRM_USER)")]
    Socket(#[source] std::io::Error),
    #[error(transparent)]
    Xfrm(#[from] XfrmError),
    #[error("nftables {NFT_TABLE}: {0}")]
    Nft(#[source] crate::nft::NftError),
    #[error("saving {path}: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a namespace to test ESP in: {0}")]
    ProbeNamespace(#[source] std::io::Error),
    #[error("the ESP probe panicked")]
    ProbePanicked,
}
