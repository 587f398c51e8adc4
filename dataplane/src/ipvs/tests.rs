//! The IPVS share of a spec and the nftables table, checked without a
//! kernel.

use std::{collections::BTreeSet, net::Ipv4Addr};

use super::{delivery::nft_ruleset, sync::desired_of, *};
use crate::lb::{BackendSpec, FrontendSpec, Protocol, ServiceSpec};

fn svc(port: u16, backends: &[(u8, u32)]) -> ServiceSpec {
    ServiceSpec {
        id: 1,
        name: "web".into(),
        frontends: vec![
            FrontendSpec {
                address: None,
                port,
                protocol: Protocol::Tcp,
            },
            FrontendSpec {
                address: Some(Ipv4Addr::new(10, 0, 0, 2)),
                port: 0,
                protocol: Protocol::Tcp,
            },
        ],
        backends: backends
            .iter()
            .map(|&(last, weight)| BackendSpec {
                address: Ipv4Addr::new(10, 0, 0, last),
                port: 80,
                weight,
            })
            .collect(),
        table_size: 251,
    }
}

#[test]
fn published_ports_become_a_service_per_node_address_and_vips_a_fwmark_service() {
    let nodes = [Ipv4Addr::new(192, 168, 0, 1), Ipv4Addr::new(192, 168, 0, 2)];
    let want = desired_of(&[svc(8080, &[(5, 1), (6, 0)])], &nodes);
    assert_eq!(want.len(), 3, "{want:?}");
    let vip = VsKey::vip(Ipv4Addr::new(10, 0, 0, 2), 0);
    assert_eq!(vip.fwmark, VIP_MARK, "no slot until the sync gives one");
    assert!(want.contains_key(&vip), "{want:?}");
    for (k, dests) in &want {
        if k.fwmark == 0 {
            assert_eq!(k.port, 8080);
            assert!(nodes.contains(&k.address));
        }
        assert_eq!(
            dests.get(&(Ipv4Addr::new(10, 0, 0, 6), 80)),
            Some(&0),
            "draining = weight 0"
        );
    }
    // The kernel knows a fwmark service by its mark alone.
    let vip = VsKey::vip(Ipv4Addr::new(10, 0, 0, 2), 1);
    assert_eq!(vip.kernel_id(), (0x8000_0001, 0, Ipv4Addr::UNSPECIFIED, 0));
}

#[test]
fn the_nft_table_marks_exactly_the_published_keys_and_vips() {
    let keys = BTreeSet::from([
        VsKey::vip(Ipv4Addr::new(10, 0, 0, 2), 7),
        VsKey {
            fwmark: 0,
            protocol: Protocol::Udp,
            address: Ipv4Addr::new(192, 168, 0, 1),
            port: 5353,
        },
    ]);
    let r = nft_ruleset(&keys);
    assert!(r.contains("elements = { udp . 192.168.0.1 . 5353 }"), "{r}");
    assert!(r.contains("elements = { 10.0.0.2 : 0x80000007 }"), "{r}");
    assert!(
        r.contains("udp dport 4789 meta mark set meta mark & 0x400000")
            && r.contains("udp dport 4789 accept"),
        "{r}"
    );
    assert!(
        r.contains("meta mark & 0x80000000 == 0x80000000 masquerade"),
        "{r}"
    );
    assert!(!nft_ruleset(&BTreeSet::new()).contains("elements"));
}
