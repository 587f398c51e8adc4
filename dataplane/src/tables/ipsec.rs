//! [`ipsec_spec`]: the IPsec this node's share of the tables asks for.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use model::tables::Tables;

/// What this node's IPsec should be: the encrypted networks it has its own
/// address on, the other nodes with an address or a task on them, and the
/// key ring. Cheap when no network is encrypted.
pub fn ipsec_spec(tables: &Tables, node: &str, underlay: Ipv4Addr) -> crate::ipsec::IpsecSpec {
    use crate::ipsec::IpsecSpec;
    let encrypted: BTreeMap<&str, u32> = tables
        .networks()
        .filter(|(_, n)| n.encrypted)
        .map(|(id, n)| (id, n.vni))
        .collect();
    if encrypted.is_empty() {
        return IpsecSpec::default();
    }
    let mut spec = IpsecSpec {
        local: Some(underlay),
        ..IpsecSpec::default()
    };
    for (net, n, _) in tables.node_endpoints() {
        if n == node
            && let Some(vni) = encrypted.get(net)
        {
            spec.vnis.insert(*vni);
        }
    }
    if spec.vnis.is_empty() {
        return IpsecSpec::default();
    }
    let on = |net: &str| encrypted.get(net).is_some_and(|v| spec.vnis.contains(v));
    let mut peers = BTreeSet::new();
    for (net, _, e) in tables.node_endpoints() {
        if e.node_addr != underlay && on(net) {
            peers.insert(e.node_addr);
        }
    }
    for (net, _, e) in tables.endpoints() {
        if e.node_addr != underlay && on(net) {
            peers.insert(e.node_addr);
        }
    }
    spec.peers = peers;
    if let Some(ring) = tables.network_keys() {
        spec.keys = ring.keys.iter().map(|k| (k.id, k.secret.clone())).collect();
        spec.primary = Some(ring.primary);
    }
    spec
}
