//! The nftables table `ip mesh_ipsec`: VXLAN of the encrypted VNIs is
//! marked for the policies, and dropped wherever it would pass without
//! IPsec.

use std::collections::BTreeSet;

use super::{
    error::IpsecError,
    spec::{ENCRYPT_MARK, NFT_TABLE},
};
use crate::netlink::VXLAN_PORT;

/// Only the nftables part: no VXLAN of `vnis` in or out without IPsec. For
/// a kernel where XFRM itself is missing: the encrypted networks then carry
/// nothing, never plaintext.
pub fn block_plaintext(vnis: &BTreeSet<u32>) -> Result<(), IpsecError> {
    crate::nft::run(&nft_ruleset(vnis)).map_err(IpsecError::Nft)
}

/// Removes the nftables table (`meshd down` where XFRM is missing).
pub fn remove_rules() {
    let _ = crate::nft::run(&format!("delete table ip {NFT_TABLE}"));
}

pub(super) fn nft_ruleset(vnis: &BTreeSet<u32>) -> String {
    let mut s = format!("table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n");
    if vnis.is_empty() {
        return s;
    }
    let set = vnis
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let vxlan = format!("udp dport {VXLAN_PORT} @th,96,24 {{ {set} }}");
    s.push_str(&format!(
        "table ip {NFT_TABLE} {{\n\
         \tchain output {{ type route hook output priority mangle; policy accept; \
         {vxlan} meta mark set meta mark | {ENCRYPT_MARK:#x}; }}\n\
         \tchain postrouting {{ type filter hook postrouting priority filter; policy accept; \
         {vxlan} rt ipsec missing counter drop; }}\n\
         \tchain input {{ type filter hook input priority filter; policy accept; \
         {vxlan} meta secpath missing counter drop; }}\n\
         }}\n"
    ));
    s
}
