//! The node's share of the tables, whole and by delta: the same either way.

use super::*;
use std::collections::{BTreeMap, BTreeSet};

use crate::{
    netlink::Mac,
    overlay::{Change, OverlaySpec},
};
use model::{EndpointMode, Protocol as PortProtocol, PublishMode, session::Update, tables::Tables};
use model::{
    PortConfig,
    session::Applied,
    tables::{EndpointEntry, Key, NetworkEntry, ServiceEntry, Value},
};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn node_addr(node: &str) -> Ipv4Addr {
    match node {
        "a" => ip("198.18.0.1"),
        "b" => ip("198.18.0.2"),
        _ => ip("198.18.0.3"),
    }
}

/// red and blue (tasks t1 on a; t2, t3 on b), ingress (every node),
/// and service s with VIPs on red and ingress, published 8080 -> 80.
fn table() -> Tables {
    let mut t = Tables::default();
    for (id, vni, subnet, ingress) in [
        ("red", 4097, "10.0.1.0/24", false),
        ("blue", 4098, "10.0.2.0/24", false),
        ("ingress", 4096, "10.255.0.0/24", true),
    ] {
        t.entries.insert(
            Key::Network { id: id.into() },
            Value::Network(NetworkEntry {
                name: id.into(),
                vni,
                subnet: subnet.parse().unwrap(),
                gateway: ip(&subnet.replace(".0/24", ".1")),
                ingress,
                internal: false,
                encrypted: false,
            }),
        );
    }
    let ep = |net: &str, task: &str, node: &str, addr: &str| {
        let addr = ip(addr);
        (
            Key::Endpoint {
                network: net.into(),
                task: task.into(),
            },
            Value::Endpoint(EndpointEntry {
                service: "s".into(),
                task_name: format!("s.{task}"),
                node: node.into(),
                node_addr: node_addr(node),
                addr,
                mac: Mac::from_ipv4(addr).0,
                netns: Some(format!("/run/netns/{task}")),
                draining: false,
            }),
        )
    };
    t.entries.extend([
        ep("red", "t1", "a", "10.0.1.2"),
        ep("blue", "t1", "a", "10.0.2.2"),
        ep("ingress", "t1", "a", "10.255.0.2"),
        ep("red", "t2", "b", "10.0.1.3"),
        ep("ingress", "t2", "b", "10.255.0.3"),
        ep("blue", "t3", "b", "10.0.2.3"),
    ]);
    for (net, node, addr) in [
        ("ingress", "a", "10.255.0.10"),
        ("red", "a", "10.0.1.10"),
        ("blue", "a", "10.0.2.10"),
        ("ingress", "b", "10.255.0.11"),
        ("red", "b", "10.0.1.11"),
        ("blue", "b", "10.0.2.11"),
        ("ingress", "c", "10.255.0.12"),
    ] {
        let addr = ip(addr);
        t.entries.insert(
            Key::NodeEndpoint {
                network: net.into(),
                node: node.into(),
            },
            Value::NodeEndpoint(NodeEndpointEntry {
                node_addr: node_addr(node),
                addr,
                mac: Mac::from_ipv4(addr).0,
            }),
        );
    }
    t.entries.insert(
        Key::Service { id: "s".into() },
        Value::Service(ServiceEntry {
            name: "web".into(),
            endpoint_mode: EndpointMode::Vip,
            vips: [
                ("red".to_owned(), ip("10.0.1.100")),
                ("ingress".to_owned(), ip("10.255.0.100")),
            ]
            .into(),
            ports: vec![PortConfig {
                protocol: PortProtocol::Tcp,
                target: 80,
                published: Some(8080),
                mode: PublishMode::Ingress,
            }],
            aliases: Default::default(),
        }),
    );
    t
}

#[test]
fn a_node_gets_the_networks_it_has_an_address_on() {
    let t = table();
    let a = overlay_spec(&t, "a", node_addr("a"));
    assert_eq!(a.underlay, Some(node_addr("a")));
    let names: Vec<&str> = a.networks.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(names, ["blue", "ingress", "red"]);
    let red = a.networks.iter().find(|n| n.id == "red").unwrap();
    assert_eq!(red.host.map(|h| h.ip), Some(ip("10.0.1.10")));
    assert_eq!(red.vips, [ip("10.0.1.100")]);
    assert_eq!(red.local.len(), 1);
    // b's task and b's own address.
    let remote: Vec<(Ipv4Addr, Ipv4Addr)> = red.remote.iter().map(|r| (r.ip, r.node)).collect();
    assert_eq!(
        remote,
        [
            (ip("10.0.1.3"), node_addr("b")),
            (ip("10.0.1.11"), node_addr("b"))
        ]
    );
    // One task on three networks: three interfaces.
    let blue = a.networks.iter().find(|n| n.id == "blue").unwrap();
    assert_ne!(blue.local[0].interface, red.local[0].interface);
    // A node with no task is on ingress only: the routing mesh.
    let c = overlay_spec(&t, "c", node_addr("c"));
    assert_eq!(c.networks.len(), 1);
    let ingress = &c.networks[0];
    assert_eq!(ingress.id, "ingress");
    assert!(ingress.local.is_empty());
    assert_eq!(ingress.host.map(|h| h.ip), Some(ip("10.255.0.12")));
    assert_eq!(ingress.remote.len(), 4, "{:?}", ingress.remote);
    // A node with nothing at all gets no overlay.
    assert_eq!(
        overlay_spec(&t, "d", ip("198.18.0.4")),
        OverlaySpec::default()
    );
}

#[test]
fn the_load_balancer_publishes_every_port_on_every_node_and_vips_where_the_node_is() {
    let t = table();
    for node in ["a", "c"] {
        let mut view = NodeView::new(node, node_addr(node));
        view.overlay(&t, Update::Whole);
        let spec = LbView::new()
            .whole(&t, view.networks(), vec![node_addr(node)])
            .unwrap();
        spec.validate().unwrap();
        assert_eq!(spec.nat_address, view.networks()["ingress"]);
        assert_eq!(spec.node_addresses, [node_addr(node)]);
        let published = spec
            .services
            .iter()
            .find(|s| s.frontends[0].address.is_none())
            .unwrap();
        assert_eq!(published.frontends[0].port, 8080);
        let backends: Vec<(Ipv4Addr, u16)> = published
            .backends
            .iter()
            .map(|b| (b.address, b.port))
            .collect();
        assert_eq!(backends, [(ip("10.255.0.2"), 80), (ip("10.255.0.3"), 80)]);
        let vips: Vec<Ipv4Addr> = spec
            .services
            .iter()
            .filter_map(|s| s.frontends[0].address)
            .collect();
        if node == "a" {
            // On red and ingress, so both VIPs, each to its network's tasks.
            assert_eq!(vips, [ip("10.255.0.100"), ip("10.0.1.100")]);
            let red = spec
                .services
                .iter()
                .find(|s| s.frontends[0].address == Some(ip("10.0.1.100")))
                .unwrap();
            let b: Vec<(Ipv4Addr, u16)> =
                red.backends.iter().map(|b| (b.address, b.port)).collect();
            // Port 0: every port, to the port the client asked for.
            assert_eq!(b, [(ip("10.0.1.2"), 0), (ip("10.0.1.3"), 0)]);
            assert_eq!(red.frontends[0].port, 0);
        } else {
            assert_eq!(vips, [ip("10.255.0.100")]);
        }
    }
    // A node without an ingress address has nothing to NAT with.
    let view = NodeView::new("d", ip("198.18.0.4"));
    assert!(LbView::new().whole(&t, view.networks(), vec![]).is_none());
}

fn change(t: &mut Tables, key: Key, new: Option<Value>) -> [Applied; 1] {
    let old = match &new {
        Some(v) => t.entries.insert(key.clone(), v.clone()),
        None => t.entries.remove(&key),
    };
    [Applied { key, old, new }]
}

#[test]
fn endpoint_changes_are_deltas_and_a_nodes_own_changes_a_whole_table() {
    let mut t = table();
    let mut view = NodeView::new("a", node_addr("a"));
    assert!(matches!(
        view.overlay(&t, Update::Whole),
        OverlayUpdate::Whole(_)
    ));
    // A remote task on red moves to a new address: remove + upsert.
    let key = Key::Endpoint {
        network: "red".into(),
        task: "t2".into(),
    };
    let Some(Value::Endpoint(mut e)) = t.entries.get(&key).cloned() else {
        panic!()
    };
    e.addr = ip("10.0.1.9");
    let c = change(&mut t, key, Some(Value::Endpoint(e)));
    match view.overlay(&t, Update::Delta(&c)) {
        OverlayUpdate::Changes(c) => {
            assert_eq!(c.len(), 2);
            assert!(
                matches!(&c[0], Change::RemoveRemote { ip, .. } if ip.to_string() == "10.0.1.3")
            );
            assert!(
                matches!(&c[1], Change::UpsertRemote { endpoint, .. } if endpoint.ip.to_string() == "10.0.1.9")
            );
        }
        other => panic!("expected changes, got {other:?}"),
    }
    // A service change that leaves the VIPs alone touches no overlay.
    let Some(Value::Service(mut svc)) = t.entries.get(&Key::Service { id: "s".into() }).cloned()
    else {
        panic!()
    };
    svc.aliases.insert("red".into(), vec!["www".into()]);
    let c = change(
        &mut t,
        Key::Service { id: "s".into() },
        Some(Value::Service(svc.clone())),
    );
    assert_eq!(
        view.overlay(&t, Update::Delta(&c)),
        OverlayUpdate::Unchanged
    );
    // A new VIP on red does (its neighbour entry).
    svc.vips.insert("red".into(), ip("10.0.1.101"));
    let c = change(
        &mut t,
        Key::Service { id: "s".into() },
        Some(Value::Service(svc)),
    );
    assert!(matches!(
        view.overlay(&t, Update::Delta(&c)),
        OverlayUpdate::Whole(_)
    ));
    // Another node's own address on red: a remote entry.
    let addr = ip("10.0.1.12");
    let c = change(
        &mut t,
        Key::NodeEndpoint {
            network: "red".into(),
            node: "c".into(),
        },
        Some(Value::NodeEndpoint(NodeEndpointEntry {
            node_addr: node_addr("c"),
            addr,
            mac: Mac::from_ipv4(addr).0,
        })),
    );
    match view.overlay(&t, Update::Delta(&c)) {
        OverlayUpdate::Changes(c) => assert!(
            matches!(&c[..], [Change::UpsertRemote { endpoint, .. }] if endpoint.ip == addr && endpoint.node == node_addr("c")),
            "{c:?}"
        ),
        other => panic!("expected a remote change, got {other:?}"),
    }
    // A second local task on red: a local delta, on its own interface.
    let Some(Value::Endpoint(mut e9)) = t
        .entries
        .get(&Key::Endpoint {
            network: "red".into(),
            task: "t1".into(),
        })
        .cloned()
    else {
        panic!()
    };
    e9.addr = ip("10.0.1.20");
    e9.netns = Some("/run/netns/t9".into());
    let key = Key::Endpoint {
        network: "red".into(),
        task: "t9".into(),
    };
    let c = change(&mut t, key, Some(Value::Endpoint(e9)));
    match view.overlay(&t, Update::Delta(&c)) {
        OverlayUpdate::Changes(c) => assert!(
            matches!(&c[..], [Change::UpsertLocal { endpoint, .. }] if endpoint.interface == "eth0"),
            "{c:?}"
        ),
        other => panic!("expected a local change, got {other:?}"),
    }
    // The last local task leaving blue: the node keeps its address
    // there, so only the endpoint goes.
    let key = Key::Endpoint {
        network: "blue".into(),
        task: "t1".into(),
    };
    let c = change(&mut t, key, None);
    match view.overlay(&t, Update::Delta(&c)) {
        OverlayUpdate::Changes(c) => {
            assert!(
                matches!(&c[..], [Change::RemoveLocal { id, .. }] if id == "t1"),
                "{c:?}"
            )
        }
        other => panic!("expected a local removal, got {other:?}"),
    }
    // This node's own address on a network going: a whole table.
    let c = change(
        &mut t,
        Key::NodeEndpoint {
            network: "blue".into(),
            node: "a".into(),
        },
        None,
    );
    match view.overlay(&t, Update::Delta(&c)) {
        OverlayUpdate::Whole(spec) => assert_eq!(spec.networks.len(), 2),
        other => panic!("expected a whole table, got {other:?}"),
    }
    assert!(!view.networks().contains_key("blue"));
}

/// The maps' meaning, independent of ids: each frontend's service,
/// size and Maglev table as backend addresses; and every backend.
type Logical = (
    BTreeMap<dataplane_common::FrontendKey, (u32, u32, Vec<Option<[u32; 4]>>)>,
    BTreeSet<[u32; 4]>,
);

fn logical(m: &crate::lb::MemoryMaps) -> Logical {
    let fronts = m
        .frontends
        .iter()
        .map(|(k, f)| {
            let table = m.tables[&f.id]
                .iter()
                .map(|id| m.backends.get(id).map(|b| b.addr_be))
                .collect();
            (*k, (f.service_id, f.backend_count, table))
        })
        .collect();
    (fronts, m.backends.values().map(|b| b.addr_be).collect())
}

#[test]
fn the_load_balancer_follows_deltas_as_a_whole_rebuild_would() {
    use crate::lb::{LbSync, MemoryMaps};
    let mut t = table();
    let mut view = NodeView::new("a", node_addr("a"));
    view.overlay(&t, Update::Whole);
    let networks = view.networks().clone();
    let mut lbv = LbView::new();
    let whole = lbv.whole(&t, &networks, vec![node_addr("a")]).unwrap();
    let (mut sync, mut maps) = (LbSync::new(), MemoryMaps::default());
    sync.apply(&whole, &mut maps).unwrap();
    let mut steps: Vec<(Key, Option<Value>)> = Vec::new();
    // A task moves; a new task on red and ingress; one goes away.
    let Some(Value::Endpoint(mut moved)) = t
        .entries
        .get(&Key::Endpoint {
            network: "red".into(),
            task: "t2".into(),
        })
        .cloned()
    else {
        panic!()
    };
    moved.addr = ip("10.0.1.9");
    steps.push((
        Key::Endpoint {
            network: "red".into(),
            task: "t2".into(),
        },
        Some(Value::Endpoint(moved.clone())),
    ));
    for (net, addr) in [("red", "10.0.1.30"), ("ingress", "10.255.0.30")] {
        let mut e = moved.clone();
        e.addr = ip(addr);
        e.task_name = "web.4".into();
        steps.push((
            Key::Endpoint {
                network: net.into(),
                task: "t4".into(),
            },
            Some(Value::Endpoint(e)),
        ));
    }
    steps.push((
        Key::Endpoint {
            network: "ingress".into(),
            task: "t1".into(),
        },
        None,
    ));
    // The service publishes a second port, then a new VIP; then it goes.
    let Some(Value::Service(mut svc)) = t.entries.get(&Key::Service { id: "s".into() }).cloned()
    else {
        panic!()
    };
    svc.ports.push(PortConfig {
        protocol: PortProtocol::Udp,
        target: 53,
        published: Some(5353),
        mode: PublishMode::Ingress,
    });
    steps.push((
        Key::Service { id: "s".into() },
        Some(Value::Service(svc.clone())),
    ));
    svc.vips.insert("red".into(), ip("10.0.1.101"));
    steps.push((Key::Service { id: "s".into() }, Some(Value::Service(svc))));
    steps.push((Key::Service { id: "s".into() }, None));
    for (i, (key, new)) in steps.into_iter().enumerate() {
        let c = change(&mut t, key, new);
        let changes = lbv.delta(&t, &c, &networks);
        let mut globals = whole.clone();
        globals.services.clear();
        sync.apply_changes(&globals, &changes, &mut maps)
            .unwrap_or_else(|e| panic!("step {i}: {e}"));
        let rebuilt = LbView::new()
            .whole(&t, &networks, vec![node_addr("a")])
            .unwrap();
        let (mut fresh_sync, mut fresh) = (LbSync::new(), MemoryMaps::default());
        fresh_sync.apply(&rebuilt, &mut fresh).unwrap();
        assert_eq!(logical(&maps), logical(&fresh), "step {i}: {changes:?}");
        // And the same state again writes nothing.
        assert_eq!(
            sync.apply(&rebuilt, &mut maps).unwrap().total(),
            0,
            "step {i}"
        );
    }
    assert!(maps.frontends.is_empty() && maps.backends.is_empty());
}

#[test]
fn an_incremental_change_that_takes_anothers_frontend_changes_nothing() {
    use crate::lb::{LbChanges, LbSync, MemoryMaps};
    let t = table();
    let mut view = NodeView::new("a", node_addr("a"));
    view.overlay(&t, Update::Whole);
    let whole = LbView::new()
        .whole(&t, view.networks(), vec![node_addr("a")])
        .unwrap();
    let (mut sync, mut maps) = (LbSync::new(), MemoryMaps::default());
    sync.apply(&whole, &mut maps).unwrap();
    let mut thief = whole.services[0].clone();
    thief.id += 1;
    thief.name = "thief".into();
    let before = logical(&maps);
    let mut globals = whole.clone();
    globals.services.clear();
    let changes = LbChanges {
        upsert: vec![thief],
        remove: vec![],
    };
    let err = sync
        .apply_changes(&globals, &changes, &mut maps)
        .unwrap_err();
    assert!(err.to_string().contains("claimed by both"), "{err}");
    assert_eq!(logical(&maps), before);
}
