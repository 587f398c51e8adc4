//! Key derivation, the choice of sending key, the sent record's file and
//! the nftables table, checked without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::{keys::sending_key, nft::nft_ruleset, *};

#[test]
fn spis_differ_per_direction_pair_and_key_and_avoid_the_reserved_range() {
    let (a, b, c) = (
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 0, 0, 2),
        Ipv4Addr::new(10, 0, 0, 3),
    );
    let all = [
        spi(a, b, 1),
        spi(b, a, 1),
        spi(a, b, 2),
        spi(a, c, 1),
        spi(c, a, 1),
    ];
    let distinct: BTreeSet<u32> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "{all:x?}");
    assert!(all.iter().all(|s| *s >= 0x100));
    assert_eq!(spi(a, b, 1), spi(a, b, 1), "both ends derive the same");
}

#[test]
fn each_sa_gets_its_own_key_both_ends_derive() {
    let ring = [9u8; 20];
    let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    let ab = sa_secret(&ring, a, b, 1);
    assert_eq!(ab.len(), 20);
    assert_eq!(ab, sa_secret(&ring, a, b, 1), "deterministic");
    assert_ne!(ab, sa_secret(&ring, b, a, 1), "per direction");
    assert_ne!(ab, sa_secret(&ring, a, b, 2), "per key id");
    assert_ne!(ab, sa_secret(&[8u8; 20], a, b, 1), "per ring secret");
    assert_ne!(ab.as_slice(), ring.as_slice());
}

#[test]
fn a_pair_whose_state_was_made_again_sends_with_the_next_fresh_key() {
    let (a, b, c) = (
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 0, 0, 2),
        Ipv4Addr::new(10, 0, 0, 3),
    );
    let spec = IpsecSpec {
        local: Some(a),
        peers: BTreeSet::from([b, c]),
        vnis: BTreeSet::from([4097]),
        keys: BTreeMap::from([(4, vec![1; 20]), (5, vec![2; 20]), (6, vec![3; 20])]),
        primary: Some(5),
    };
    let out = |peer, id| SaKey {
        src: a,
        dst: peer,
        spi: spi(a, peer, id),
    };
    let mut spent = BTreeSet::new();
    assert_eq!(
        sending_key(&spec, a, b, &spent),
        Some((5, false)),
        "the primary"
    );
    // The older key never comes back, even unspent.
    spent.insert(out(b, 5));
    assert_eq!(
        sending_key(&spec, a, b, &spent),
        Some((6, false)),
        "the newer key"
    );
    assert_eq!(
        sending_key(&spec, a, c, &spent),
        Some((5, false)),
        "per pair"
    );
    spent.insert(out(b, 6));
    assert_eq!(
        sending_key(&spec, a, b, &spent),
        Some((5, true)),
        "nothing fresh: the primary, flagged"
    );
    let none = IpsecSpec {
        primary: Some(9),
        ..spec.clone()
    };
    assert_eq!(
        sending_key(&none, a, b, &spent),
        None,
        "a primary not in the ring"
    );
}

#[test]
fn the_sent_record_survives_a_round_trip_and_ignores_garbage() {
    let dir = std::env::temp_dir().join(format!("mesh-ipsec-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ipsec-sent.json");
    let k = SaKey {
        src: Ipv4Addr::new(10, 0, 0, 1),
        dst: Ipv4Addr::new(10, 0, 0, 2),
        spi: 0x1234,
    };
    let r = SentRecord {
        sent: BTreeSet::from([k]),
        spent: BTreeSet::from([k]),
    };
    r.save(&path).unwrap();
    assert_eq!(SentRecord::load(&path), r);
    std::fs::write(&path, b"{not json").unwrap();
    assert_eq!(SentRecord::load(&path), SentRecord::default());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_nft_table_marks_and_drops_exactly_the_encrypted_vnis() {
    let r = nft_ruleset(&BTreeSet::from([4097, 4099]));
    assert!(r.contains("@th,96,24 { 4097, 4099 }"), "{r}");
    assert!(r.contains("rt ipsec missing counter drop"));
    assert!(r.contains("meta secpath missing counter drop"));
    assert!(r.contains(&format!("{ENCRYPT_MARK:#x}")));
    assert!(!nft_ruleset(&BTreeSet::new()).contains("chain"));
}

/// A spec the kernel would refuse halfway (a key of another length: the
/// drop rules and some states written, then EINVAL) is refused whole, before
/// any write; so is a primary that is not in the ring, and encrypted
/// networks without this node's address.
#[test]
fn a_spec_the_kernel_would_refuse_halfway_is_refused_before_any_write() {
    let good = IpsecSpec {
        local: Some(Ipv4Addr::new(10, 0, 0, 1)),
        peers: BTreeSet::from([Ipv4Addr::new(10, 0, 0, 2)]),
        vnis: BTreeSet::from([4097]),
        keys: BTreeMap::from([(1, vec![7u8; 20])]),
        primary: Some(1),
    };
    good.validate().unwrap();
    IpsecSpec::default().validate().unwrap();
    let short = IpsecSpec {
        keys: BTreeMap::from([(1, vec![7u8; 20]), (2, vec![7u8; 5])]),
        ..good.clone()
    };
    let e = short.validate().unwrap_err().to_string();
    assert!(e.contains("network key 2 has 5 bytes"), "{e}");
    let huge = IpsecSpec {
        keys: BTreeMap::from([(1, vec![7u8; 1 << 16])]),
        ..good.clone()
    };
    assert!(huge.validate().is_err(), "would panic in HKDF's expand");
    let orphan = IpsecSpec {
        primary: Some(9),
        ..good.clone()
    };
    assert!(
        orphan
            .validate()
            .unwrap_err()
            .to_string()
            .contains("primary network key 9")
    );
    let nowhere = IpsecSpec {
        local: None,
        ..good
    };
    assert!(matches!(nowhere.validate(), Err(IpsecSpecError::NoLocal)));
}
