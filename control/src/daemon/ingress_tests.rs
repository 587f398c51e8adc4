//! The ingress subnet a new cluster gets, off its first node's underlay.

use super::{init::ingress_subnet_for, *};

fn at(addr: [u8; 4], underlay: &[&str]) -> Addresses {
    Addresses {
        hostname: "h".into(),
        addr: addr.into(),
        listen_addr: "127.0.0.1:2377".parse().unwrap(),
        api_addr: "127.0.0.1:2377".into(),
        underlay: underlay.iter().map(|p| p.parse().unwrap()).collect(),
    }
}

/// A first node on 10.0.0.0/16 once got ingress 10.0.0.0/24 and its own
/// join was then refused after Init had committed: now ingress moves.
#[test]
fn the_ingress_subnet_stays_off_the_first_nodes_underlay() {
    let got = |a| ingress_subnet_for(&a, None).unwrap().to_string();
    assert_eq!(got(at([198, 18, 0, 1], &["198.18.0.0/24"])), "10.0.0.0/24");
    assert_eq!(got(at([10, 0, 3, 7], &["10.0.0.0/16"])), "10.1.0.0/24");
    // Its address alone (no local interface holds it) counts too.
    assert_eq!(got(at([10, 0, 0, 9], &[])), "10.0.1.0/24");
    let err = ingress_subnet_for(&at([10, 0, 0, 1], &["10.0.0.0/8"]), None).unwrap_err();
    assert!(
        err.to_string().contains("no /24 of the address pool"),
        "{err}"
    );
}

/// An operator's ingress subnet (room for more than 253 nodes) is taken
/// as given, unless it overlaps the first node's underlay.
#[test]
fn a_chosen_ingress_subnet_is_used_unless_it_overlaps_the_underlay() {
    let wanted = Some("10.0.0.0/20".parse().unwrap());
    let got = ingress_subnet_for(&at([198, 18, 0, 1], &["198.18.0.0/24"]), wanted).unwrap();
    assert_eq!(got.to_string(), "10.0.0.0/20");
    let err = ingress_subnet_for(&at([10, 0, 3, 7], &["10.0.0.0/16"]), wanted).unwrap_err();
    assert!(
        err.to_string()
            .contains("overlaps this node's underlay (10.0.0.0/16)"),
        "{err}"
    );
    let err = ingress_subnet_for(
        &at([198, 18, 0, 1], &["198.18.0.0/24"]),
        Some("10.9.0.0/30".parse().unwrap()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("too small"), "{err}");
}
