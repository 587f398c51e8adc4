//! The sync engine against [`MemoryMaps`]: writes only differences, ids
//! reused late and kept across a restart, invalid specs change nothing.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::sync::IdPool;
use super::*;
use crate::maglev;

type FakeMaps = MemoryMaps;

fn service(id: u32, port: u16, backends: &[(u8, u32)]) -> ServiceSpec {
    ServiceSpec {
        id,
        name: format!("svc{id}"),
        frontends: vec![FrontendSpec {
            address: None,
            port,
            protocol: Protocol::Tcp,
        }],
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

fn spec(services: Vec<ServiceSpec>) -> LbSpec {
    LbSpec {
        nat_address: Ipv4Addr::new(198, 18, 0, 1),
        node_addresses: vec![Ipv4Addr::new(198, 18, 0, 1)],
        nat_port_min: DEFAULT_NAT_PORT_MIN,
        nat_port_count: DEFAULT_NAT_PORT_COUNT,
        services,
        nat_interfaces: BTreeMap::new(),
    }
}

#[test]
fn applying_the_same_state_twice_writes_nothing() {
    let s = spec(vec![
        service(1, 8080, &[(1, 1), (2, 1)]),
        service(2, 9090, &[(3, 1)]),
    ]);
    let mut maps = FakeMaps::default();
    let mut sync = LbSync::new();
    let first = sync.apply(&s, &mut maps).unwrap();
    assert_eq!(first.table_swaps, 2);
    assert_eq!(first.backend_writes, 3);
    assert_eq!(sync.apply(&s, &mut maps).unwrap().total(), 0);
    assert_eq!(maps.frontends.len(), 2);
    // Every table slot names an installed backend.
    for t in maps.tables.values() {
        assert!(t.iter().all(|id| maps.backends.contains_key(id)));
    }
}

#[test]
fn changing_one_service_touches_only_that_service() {
    let mut services: Vec<ServiceSpec> = (1..=50)
        .map(|i| service(i, 8000 + i as u16, &[(i as u8, 1)]))
        .collect();
    let mut maps = FakeMaps::default();
    let mut sync = LbSync::new();
    sync.apply(&spec(services.clone()), &mut maps).unwrap();
    services[7] = service(8, 8008, &[(8, 1), (200, 1)]);
    let report = sync.apply(&spec(services), &mut maps).unwrap();
    assert_eq!(
        report,
        ApplyReport {
            backend_writes: 1,
            table_swaps: 1,
            frontend_writes: 1,
            ..ApplyReport::default()
        }
    );
}

#[test]
fn removed_backends_and_frontends_are_deleted_after_tables_stop_naming_them() {
    let mut maps = FakeMaps::default();
    let mut sync = LbSync::new();
    sync.apply(&spec(vec![service(1, 8080, &[(1, 1), (2, 1)])]), &mut maps)
        .unwrap();
    let r = sync
        .apply(&spec(vec![service(1, 8080, &[(1, 1)])]), &mut maps)
        .unwrap();
    assert_eq!((r.table_swaps, r.backend_removals), (1, 1));
    assert_eq!(maps.backends.len(), 1);
    let only = *maps.backends.keys().next().unwrap();
    assert!(
        maps.tables
            .values()
            .next()
            .unwrap()
            .iter()
            .all(|id| *id == only)
    );
    let r = sync.apply(&spec(vec![]), &mut maps).unwrap();
    assert_eq!((r.frontend_removals, r.backend_removals), (1, 1));
    assert!(maps.frontends.is_empty() && maps.backends.is_empty());
}

#[test]
fn ids_are_reused_oldest_freed_first_and_run_out_cleanly() {
    let mut pool = IdPool::with_used(4, [1]);
    // After the highest id in use, wrapping, skipping used ones.
    assert_eq!(
        [pool.allocate(), pool.allocate(), pool.allocate()],
        [Some(2), Some(3), Some(0)]
    );
    assert_eq!(pool.allocate(), None);
    pool.release(3);
    pool.release(1);
    pool.release(1); // twice: still free once
    assert_eq!(
        [pool.allocate(), pool.allocate(), pool.allocate()],
        [Some(3), Some(1), None]
    );
}

/// A recovered id released before the scan of never-used ids reaches it
/// is handed out once, not twice; in a pool of a million, never-used ids
/// still come before freed ones.
#[test]
fn a_released_id_is_handed_out_once_and_never_used_ids_come_first() {
    let mut pool = IdPool::with_used(4, [0, 2]);
    pool.release(0);
    let got: Vec<Option<u32>> = (0..5).map(|_| pool.allocate()).collect();
    assert_eq!(got, [Some(3), Some(0), Some(1), None, None]);
    let mut big = IdPool::with_used(1 << 20, []);
    assert_eq!([big.allocate(), big.allocate()], [Some(0), Some(1)]);
    big.release(0);
    assert_eq!(
        big.allocate(),
        Some(2),
        "never-used ids come before freed ones"
    );
}

#[test]
fn backend_ids_are_not_reused_immediately() {
    let mut maps = FakeMaps::default();
    let mut sync = LbSync::new();
    sync.apply(&spec(vec![service(1, 8080, &[(1, 1)])]), &mut maps)
        .unwrap();
    let first: Vec<u32> = maps.backends.keys().copied().collect();
    sync.apply(&spec(vec![service(1, 8080, &[(2, 1)])]), &mut maps)
        .unwrap();
    let second: Vec<u32> = maps.backends.keys().copied().collect();
    assert_ne!(first, second);
}

#[test]
fn invalid_specs_change_nothing() {
    let mut maps = FakeMaps::default();
    let mut sync = LbSync::new();
    let good = spec(vec![service(1, 8080, &[(1, 1)])]);
    sync.apply(&good, &mut maps).unwrap();
    let writes = maps.writes;
    let mut dup = spec(vec![
        service(1, 8080, &[(1, 1)]),
        service(2, 8080, &[(2, 1)]),
    ]);
    assert!(matches!(
        sync.apply(&dup, &mut maps),
        Err(SyncError::Spec(SpecError::DuplicateFrontend { .. }))
    ));
    dup.services[1].frontends[0].port = 0;
    assert!(matches!(
        sync.apply(&dup, &mut maps),
        Err(SyncError::Spec(SpecError::ZeroPort { .. }))
    ));
    let mut bad_size = good.clone();
    bad_size.services[0].table_size = 100;
    assert!(sync.apply(&bad_size, &mut maps).is_err());
    let mut bad_nat = good.clone();
    bad_nat.nat_port_count = 0;
    assert!(sync.apply(&bad_nat, &mut maps).is_err());
    assert_eq!(maps.writes, writes, "a rejected spec wrote to the maps");
}

#[test]
fn recovery_keeps_ids_and_rewrites_each_table_once() {
    let s = spec(vec![service(1, 8080, &[(1, 1), (2, 1)])]);
    let mut maps = FakeMaps::default();
    let mut sync = LbSync::new();
    sync.apply(&s, &mut maps).unwrap();
    let tables = maps.tables.clone();
    let backends = maps.backends.clone();
    let mut again = LbSync::recover(
        maps.config,
        maps.addrs.clone(),
        maps.nat_interfaces.clone(),
        maps.frontends.clone(),
        maps.backends
            .iter()
            .map(|(id, b)| (*id, BackendKey::from_map(b).unwrap())),
        sync.backend_capacity(),
    );
    let r = again.apply(&s, &mut maps).unwrap();
    assert_eq!(r.backend_writes, 0, "backend ids survive a restart");
    assert_eq!(r.table_swaps, 1);
    assert_eq!(maps.tables, tables, "the rebuilt table is identical");
    assert_eq!(maps.backends, backends);
    assert_eq!(again.apply(&s, &mut maps).unwrap().total(), 0);
}

#[test]
fn spec_parses_from_json() {
    let json = r#"{"nat_address":"198.18.0.1","node_addresses":["198.18.0.1"],
        "services":[{"id":1,"name":"web","frontends":[{"port":8080,"protocol":"tcp"}],
        "backends":[{"address":"198.19.1.2","port":80}]}]}"#;
    let s: LbSpec = serde_json::from_str(json).unwrap();
    assert_eq!(s.services[0].backends[0].weight, 1);
    assert_eq!(s.services[0].table_size, maglev::DEFAULT_TABLE_SIZE);
    assert_eq!(s.services[0].frontends[0].address, None);
    s.validate().unwrap();
    let err = serde_json::from_str::<LbSpec>(r#"{"nat_address":"nope"}"#).unwrap_err();
    assert!(err.to_string().contains("invalid IPv4 address"), "{err}");
}

/// A load balancer sized for 4 backends: a whole spec or a change that
/// needs a fifth is refused with the option to raise, and writes nothing;
/// the installed state keeps working and takes changes that fit.
#[test]
fn backends_past_the_capacity_are_refused_before_any_write() {
    let mut maps = FakeMaps::default();
    let mut sync = LbSync::with_backends(4);
    let five = spec(vec![service(
        1,
        8080,
        &[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)],
    )]);
    let err = sync.apply(&five, &mut maps).unwrap_err().to_string();
    assert!(
        err.contains("at most 4 backends") && err.contains("--lb-backends"),
        "{err}"
    );
    assert_eq!(maps.writes, 0, "nothing written for a refused spec");
    let four = spec(vec![service(1, 8080, &[(1, 1), (2, 1), (3, 1), (4, 1)])]);
    sync.apply(&four, &mut maps).unwrap();
    let before = (maps.backends.clone(), maps.frontends.clone(), maps.writes);
    let changes = LbChanges {
        upsert: vec![service(2, 9090, &[(5, 1)])],
        remove: Vec::new(),
    };
    let err = sync.apply_changes(&four, &changes, &mut maps).unwrap_err();
    assert!(err.to_string().contains("at most 4 backends"), "{err}");
    assert_eq!(
        (maps.backends.clone(), maps.frontends.clone(), maps.writes),
        before,
        "a refused change writes nothing"
    );
    // The new and the installed backends must fit together while a change
    // is written: with one gone, a replacement fits.
    let three = spec(vec![service(1, 8080, &[(1, 1), (2, 1), (3, 1)])]);
    sync.apply(&three, &mut maps).unwrap();
    let swap = spec(vec![service(1, 8080, &[(1, 1), (2, 1), (3, 1), (6, 1)])]);
    sync.apply(&swap, &mut maps).unwrap();
    assert_eq!(maps.backends.len(), 4);
}
