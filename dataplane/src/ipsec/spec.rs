//! What this node's IPsec should be ([`IpsecSpec`]), the names mesh's XFRM
//! and nftables objects carry, one SA's identity, and what an apply changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

/// Set on an encrypted network's VXLAN packets; the policies match it.
pub const ENCRYPT_MARK: u32 = 0x0040_0000;
/// Marks our states and policies' templates (ASCII "mesh").
pub const REQID: u32 = 0x6d65_7368;
pub(super) const AEAD: &str = "rfc4106(gcm(aes))";

pub(super) const NFT_TABLE: &str = "mesh_ipsec";

/// Why an [`IpsecSpec`] was refused before anything was written.
#[derive(Debug, thiserror::Error)]
pub enum IpsecSpecError {
    #[error(
        "network key {id} has {len} bytes; AES-128-GCM with its salt needs {}",
        model::ring::SECRET_LEN
    )]
    KeyLength { id: u32, len: usize },
    #[error("the primary network key {0} is not in the key ring")]
    NoPrimary(u32),
    #[error("encrypted networks, and no underlay address of this node to protect them from")]
    NoLocal,
}

/// What this node's IPsec should be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpsecSpec {
    /// This node's underlay address.
    pub local: Option<Ipv4Addr>,
    /// Nodes it shares an encrypted network with.
    pub peers: BTreeSet<Ipv4Addr>,
    /// The encrypted networks' VNIs this node is on.
    pub vnis: BTreeSet<u32>,
    /// Key id -> secret (key + salt), and the id senders use.
    pub keys: BTreeMap<u32, Vec<u8>>,
    pub primary: Option<u32>,
}

impl IpsecSpec {
    /// Nothing to protect and nothing to drop.
    pub fn is_empty(&self) -> bool {
        self.vnis.is_empty()
    }

    /// Whether the kernel can take this spec, checked before anything is
    /// written: every key is AES-128-GCM's key and salt, the primary is
    /// one of them, and a node with encrypted networks has its address.
    pub fn validate(&self) -> Result<(), IpsecSpecError> {
        if let Some((id, s)) = self
            .keys
            .iter()
            .find(|(_, s)| s.len() != model::ring::SECRET_LEN)
        {
            return Err(IpsecSpecError::KeyLength {
                id: *id,
                len: s.len(),
            });
        }
        if let Some(p) = self.primary
            && !self.keys.contains_key(&p)
        {
            return Err(IpsecSpecError::NoPrimary(p));
        }
        if !self.vnis.is_empty() && self.local.is_none() {
            return Err(IpsecSpecError::NoLocal);
        }
        Ok(())
    }

    /// This spec, still covering the VNIs and peers of `before` (applied
    /// while the overlay may still carry them).
    pub fn widened(&self, before: &IpsecSpec) -> IpsecSpec {
        let mut w = self.clone();
        if w.local.is_none() {
            w.local = before.local;
        }
        w.vnis.extend(before.vnis.iter().copied());
        if w.local == before.local {
            w.peers.extend(before.peers.iter().copied());
        }
        w
    }
}

/// One SA we keep: its endpoints and SPI (the key is its identity's part).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SaKey {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub spi: u32,
}

/// Counts of what one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpsecReport {
    pub states_added: usize,
    pub states_updated: usize,
    pub states_removed: usize,
    pub policies_set: usize,
    pub policies_removed: usize,
    pub nft_writes: usize,
    /// Out states made again after they were sent with (see the module doc).
    pub states_spent: usize,
}

impl IpsecReport {
    pub fn total(&self) -> usize {
        self.states_added
            + self.states_updated
            + self.states_removed
            + self.policies_set
            + self.policies_removed
            + self.nft_writes
    }
}
