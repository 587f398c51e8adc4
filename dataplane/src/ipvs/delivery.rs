//! How packets reach IPVS and come back: a local route per VIP, and the
//! nftables table `ip mesh_ipvs` (marks, masquerade, isolation of tasks).

use std::{collections::BTreeSet, net::Ipv4Addr};

use super::{
    error::IpvsError,
    key::{MASQ_MARK, VIP_MARK, VsKey},
};
use crate::{
    lb::Protocol,
    nlsock::{Attrs, NlSocket},
};

pub(super) const NFT_TABLE: &str = "mesh_ipvs";

/// Marks our routes (`proto 0xb5` in `ip route`).
const RTPROT_MESH: u8 = 0xb5;

/// Adds (replacing) or deletes `local VIP dev lo table local`.
pub(super) fn local_route(sock: &mut NlSocket, vip: Ipv4Addr, add: bool) -> Result<(), IpvsError> {
    const RTM_NEWROUTE: u16 = 24;
    const RTM_DELROUTE: u16 = 25;
    const NLM_F_REPLACE: u16 = 0x100;
    const RT_TABLE_LOCAL: u8 = 255;
    const RT_SCOPE_HOST: u8 = 254;
    const RTN_LOCAL: u8 = 2;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    let mut p = vec![
        libc::AF_INET as u8,
        32,
        0,
        0,
        RT_TABLE_LOCAL,
        RTPROT_MESH,
        RT_SCOPE_HOST,
        RTN_LOCAL,
    ];
    p.extend_from_slice(&0u32.to_ne_bytes());
    let mut attrs = Attrs::new();
    // SAFETY: a NUL-terminated literal.
    let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    attrs.put(RTA_DST, &vip.octets()).u32(RTA_OIF, lo);
    p.extend_from_slice(&attrs.0);
    let (kind, flags) = if add {
        (RTM_NEWROUTE, crate::nlsock::NLM_F_CREATE | NLM_F_REPLACE)
    } else {
        (RTM_DELROUTE, 0)
    };
    let verb = if add { "add" } else { "delete" };
    match sock.request(kind, flags, &p, || {
        format!("{verb} the local route for VIP {vip}")
    }) {
        Ok(_) => Ok(()),
        Err(e) if !add && e.errno() == Some(libc::ESRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn nft_ruleset(keys: &BTreeSet<VsKey>) -> String {
    let vips: Vec<String> = keys
        .iter()
        .filter(|k| k.fwmark != 0)
        .map(|k| format!("{} : {:#x}", k.address, k.fwmark))
        .collect();
    let vip_addrs: Vec<String> = keys
        .iter()
        .filter(|k| k.fwmark != 0)
        .map(|k| k.address.to_string())
        .collect();
    let elements_of = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!("elements = {{ {} }}", v.join(", "))
        }
    };
    let (vips, vip_addrs) = (elements_of(&vips), elements_of(&vip_addrs));
    let elements: Vec<String> = keys
        .iter()
        .filter(|k| k.fwmark == 0)
        .map(|k| {
            let p = match k.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            format!("{p} . {} . {}", k.address, k.port)
        })
        .collect();
    let elements = if elements.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}", elements.join(", "))
    };
    let mark = format!(
        "meta l4proto . ip daddr . th dport @published meta mark set meta mark | {MASQ_MARK:#x}; \
         meta mark set ip daddr map @vips"
    );
    let bridges = crate::overlay::BRIDGE_PREFIX;
    // A VXLAN packet keeps the mark of the frame it carries: without its
    // VIP bits, or IPVS would take the tunnel packet for the VIP again.
    // Only the IPsec mark may stay (set by `ip mesh_ipsec`'s own output
    // chain, before or after this one): a masquerade mark on a tunnel
    // packet would NAT it after the IPsec checks.
    let (vxlan, keep) = (crate::netlink::VXLAN_PORT, crate::ipsec::ENCRYPT_MARK);
    format!(
        "table ip {NFT_TABLE}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tset published {{ type inet_proto . ipv4_addr . inet_service; {elements} }}\n\
         \tmap vips {{ type ipv4_addr : mark; {vips} }}\n\
         \tset vip_addrs {{ type ipv4_addr; {vip_addrs} }}\n\
         \tchain prerouting {{ type filter hook prerouting priority mangle; policy accept; {mark}; }}\n\
         \tchain output {{ type route hook output priority mangle; policy accept; \
         udp dport {vxlan} meta mark set meta mark & {keep:#x}; {mark}; }}\n\
         \tchain postrouting {{ type nat hook postrouting priority srcnat; policy accept; \
         udp dport {vxlan} accept; \
         meta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} masquerade; \
         meta mark & {VIP_MARK:#x} == {VIP_MARK:#x} masquerade; }}\n\
         \tchain forward {{ type filter hook forward priority filter; policy accept; \
         iifname \"{bridges}*\" ct direction original drop; }}\n\
         \tchain input {{ type filter hook input priority filter; policy accept; \
         iifname \"{bridges}*\" ip daddr @vip_addrs accept; \
         iifname \"{bridges}*\" ct direction original fib daddr . iif type != local drop; }}\n\
         }}\n"
    )
}
