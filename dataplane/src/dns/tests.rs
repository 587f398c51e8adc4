//! The zone against whole builds and the lookups a task makes.

use super::*;
use hickory_proto::rr::RecordType;
use model::tables::{EndpointEntry, Key, NetworkEntry, ServiceEntry, Value};
use model::{session::Applied, tables::Tables};
use server::{RNG_SEED, shuffle};
use std::collections::BTreeMap;

fn tables() -> Tables {
    let mut t = Tables::default();
    for (id, subnet) in [
        ("red", "10.0.1.0/24"),
        ("blue", "10.0.2.0/24"),
        ("ingress", "10.255.0.0/24"),
    ] {
        t.entries.insert(
            Key::Network { id: id.into() },
            Value::Network(NetworkEntry {
                name: id.into(),
                vni: 4097,
                subnet: subnet.parse().unwrap(),
                gateway: subnet.replace(".0/24", ".1").parse().unwrap(),
                ingress: id == "ingress",
                internal: false,
                encrypted: false,
            }),
        );
    }
    let svc = |name: &str, mode, vips: &[(&str, &str)], aliases: &[(&str, &str)]| {
        Value::Service(ServiceEntry {
            name: name.into(),
            endpoint_mode: mode,
            vips: vips
                .iter()
                .map(|(n, a)| ((*n).into(), a.parse().unwrap()))
                .collect(),
            ports: vec![],
            aliases: aliases
                .iter()
                .map(|(n, a)| ((*n).into(), vec![(*a).into()]))
                .collect(),
        })
    };
    use model::EndpointMode::{Dnsrr, Vip};
    t.entries.insert(
        Key::Service { id: "web".into() },
        svc(
            "web",
            Vip,
            &[("red", "10.0.1.2"), ("ingress", "10.255.0.2")],
            &[("red", "www")],
        ),
    );
    t.entries
        .insert(Key::Service { id: "db".into() }, svc("db", Dnsrr, &[], &[]));
    let ep = |net: &str, task: &str, svc: &str, slot: u32, ip: &str| {
        (
            Key::Endpoint {
                network: net.into(),
                task: task.into(),
            },
            Value::Endpoint(EndpointEntry {
                service: svc.into(),
                task_name: format!("{svc}.{slot}"),
                node: "n".into(),
                node_addr: "198.18.0.1".parse().unwrap(),
                addr: ip.parse().unwrap(),
                mac: [2, 0x42, 0, 0, 0, 1],
                netns: None,
                draining: false,
            }),
        )
    };
    t.entries.extend([
        ep("red", "w1", "web", 1, "10.0.1.3"),
        ep("red", "w2", "web", 2, "10.0.1.4"),
        ep("ingress", "w1", "web", 1, "10.255.0.3"),
        ep("ingress", "w2", "web", 2, "10.255.0.4"),
        ep("blue", "d1", "db", 1, "10.0.2.3"),
        ep("blue", "d2", "db", 2, "10.0.2.4"),
    ]);
    t
}

type Dump = (
    BTreeMap<(String, String), Vec<Ipv4Addr>>,
    BTreeMap<(String, Ipv4Addr), String>,
);

/// Everything the zone answers, in a comparable form.
fn dump(z: &Zone) -> Dump {
    let mut names = BTreeMap::new();
    for (net, m) in &z.names {
        for (name, v) in m {
            let mut v = v.to_vec();
            v.sort();
            names.insert((net.to_string(), name.to_string()), v);
        }
    }
    let mut reverse = BTreeMap::new();
    for (net, m) in &z.reverse {
        for (ip, v) in m {
            reverse.insert((net.to_string(), *ip), v.iter().min().unwrap().to_string());
        }
    }
    (names, reverse)
}

#[test]
fn the_ingress_network_carries_no_names() {
    let (names, reverse) = dump(&Zone::from_tables(&tables()));
    assert!(names.keys().all(|(net, _)| net != "ingress"), "{names:?}");
    assert!(
        reverse.keys().all(|(net, _)| net != "ingress"),
        "{reverse:?}"
    );
    // The same service still has its names on red.
    assert!(names.contains_key(&("red".to_owned(), "web".to_owned())));
}

#[test]
fn deltas_give_the_same_zone_as_a_whole_build() {
    let full = tables();
    let mut t = Tables::default();
    let mut z = Zone::default();
    let step = |t: &mut Tables, z: &mut Zone, key: Key, new: Option<Value>| {
        let old = t.entries.get(&key).cloned();
        match &new {
            Some(v) => t.entries.insert(key.clone(), v.clone()),
            None => t.entries.remove(&key),
        };
        z.apply(t, &[Applied { key, old, new }]);
        assert_eq!(dump(z), dump(&Zone::from_tables(t)));
    };
    // Endpoints before their service, then the rest.
    let mut entries: Vec<(Key, Value)> = full.entries.clone().into_iter().collect();
    entries.sort_by_key(|(k, _)| !matches!(k, Key::Endpoint { .. }));
    for (k, v) in entries.clone() {
        step(&mut t, &mut z, k, Some(v));
    }
    assert_eq!(dump(&z), dump(&Zone::from_tables(&full)));
    // web becomes dnsrr; then everything goes, services first.
    if let Some(Value::Service(mut web)) =
        t.entries.get(&Key::Service { id: "web".into() }).cloned()
    {
        web.endpoint_mode = model::EndpointMode::Dnsrr;
        web.vips.clear();
        step(
            &mut t,
            &mut z,
            Key::Service { id: "web".into() },
            Some(Value::Service(web)),
        );
    }
    entries.sort_by_key(|(k, _)| matches!(k, Key::Endpoint { .. }));
    for (k, _) in entries {
        step(&mut t, &mut z, k, None);
    }
    assert!(dump(&z).0.is_empty() && dump(&z).1.is_empty());
}

fn ips(v: &[&str]) -> Vec<Ipv4Addr> {
    v.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn answers_are_scoped_to_the_tasks_networks() {
    let z = Zone::from_tables(&tables());
    let red = ["red".to_owned()];
    let blue = ["blue".to_owned()];
    let both = ["red".to_owned(), "blue".to_owned()];
    assert_eq!(
        z.lookup(&red, "web", RecordType::A),
        Answer::Addresses(ips(&["10.0.1.2"]), VIP_TTL)
    );
    assert_eq!(
        z.lookup(&red, "www", RecordType::A),
        Answer::Addresses(ips(&["10.0.1.2"]), VIP_TTL)
    );
    assert_eq!(
        z.lookup(&red, "tasks.web", RecordType::A),
        Answer::Addresses(ips(&["10.0.1.3", "10.0.1.4"]), TASK_TTL)
    );
    assert_eq!(
        z.lookup(&red, "web.2", RecordType::A),
        Answer::Addresses(ips(&["10.0.1.4"]), TASK_TTL)
    );
    // dnsrr: the name gives the task IPs.
    assert_eq!(
        z.lookup(&blue, "db", RecordType::A),
        Answer::Addresses(ips(&["10.0.2.3", "10.0.2.4"]), TASK_TTL)
    );
    // Another network's service is unknown here.
    assert_eq!(z.lookup(&red, "db", RecordType::A), Answer::NxDomain);
    assert_eq!(
        z.lookup(&blue, "tasks.web", RecordType::A),
        Answer::NxDomain
    );
    assert!(matches!(
        z.lookup(&both, "db", RecordType::A),
        Answer::Addresses(..)
    ));
    assert_eq!(z.lookup(&red, "web", RecordType::AAAA), Answer::NoData);
    assert_eq!(
        z.lookup(&red, "example.org", RecordType::A),
        Answer::Forward
    );
    assert_eq!(
        z.lookup(&red, "2.1.0.10.in-addr.arpa", RecordType::PTR),
        Answer::Pointer("web".into())
    );
    assert_eq!(
        z.lookup(&red, "4.1.0.10.in-addr.arpa", RecordType::PTR),
        Answer::Pointer("web.2".into())
    );
    // In our subnet but unknown: ours to deny; elsewhere: upstream's.
    assert_eq!(
        z.lookup(&red, "99.1.0.10.in-addr.arpa", RecordType::PTR),
        Answer::NxDomain
    );
    assert_eq!(
        z.lookup(&red, "8.8.8.8.in-addr.arpa", RecordType::PTR),
        Answer::Forward
    );
}

#[test]
fn shuffling_reorders_but_keeps_every_address() {
    let base = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]);
    let mut orders = std::collections::HashSet::new();
    let rng = std::sync::atomic::AtomicU64::new(RNG_SEED);
    for _ in 0..50 {
        let mut v = base.clone();
        shuffle(&mut v, &rng);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, base);
        orders.insert(v);
    }
    assert!(
        orders.len() > 5,
        "only {} orders in 50 shuffles",
        orders.len()
    );
}
