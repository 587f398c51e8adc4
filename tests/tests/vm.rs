//! The VM tier: what this host's kernel cannot run (IPVS, ESP), run by
//! `cargo xtask vm` inside Debian's stock kernel under QEMU, with the same
//! binaries and the same namespace topologies as the namespace tier. Outside
//! the VM every test here records a skip (counted, with the reason).

use mesh_tests::skip::{Skip, record_skip, require_root};

#[path = "shared/cluster.rs"]
#[allow(dead_code)] // the namespace tier uses more of it
mod cluster;
#[path = "shared/published.rs"]
mod published;

/// `Some` inside the VM tier (as root); otherwise a recorded skip.
fn require_vm(test: &str) -> Option<Skip> {
    if std::env::var_os("MESH_VM").is_none() {
        record_skip(
            test,
            "runs in the VM tier (`cargo xtask vm`): needs IPVS and ESP from Debian's stock kernel",
        );
        return None;
    }
    require_root(test)
}

#[test]
fn ipvs_backend_passes_the_published_port_test() {
    let Some(_vm) = require_vm("vm::ipvs_backend_passes_the_published_port_test") else {
        return;
    };
    published::published_ports_scenario(published::Backend::Ipvs);
}

#[path = "vm/encrypted.rs"]
mod encrypted;

/// The IPVS backend's sync contract, against the kernel: a spec applied
/// twice writes nothing the second time; a change writes only itself; a
/// restarted sync reads back what it owns; a delta removes a frontend.
#[test]
fn ipvs_sync_writes_only_the_difference() {
    use std::net::Ipv4Addr;

    use dataplane::{
        ipvs::{Ipvs, IpvsSync},
        lb::{
            BackendSpec, DEFAULT_NAT_PORT_COUNT, DEFAULT_NAT_PORT_MIN, FrontendSpec, LbChanges,
            LbSpec, Protocol, ServiceSpec,
        },
    };

    let Some(_vm) = require_vm("vm::ipvs_sync_writes_only_the_difference") else {
        return;
    };
    let nodes = [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)];
    let b = |last: u8| Ipv4Addr::new(10, 9, 0, last);
    let front = FrontendSpec {
        address: None,
        port: 8080,
        protocol: Protocol::Tcp,
    };
    let spec = |backends: &[(u8, u32)]| LbSpec {
        nat_address: nodes[0],
        node_addresses: nodes.to_vec(),
        nat_port_min: DEFAULT_NAT_PORT_MIN,
        nat_port_count: DEFAULT_NAT_PORT_COUNT,
        services: vec![ServiceSpec {
            id: 1,
            name: "web".into(),
            frontends: vec![front.clone()],
            backends: backends
                .iter()
                .map(|&(last, weight)| BackendSpec {
                    address: b(last),
                    port: 80,
                    weight,
                })
                .collect(),
            table_size: 251,
        }],
        nat_interfaces: Default::default(),
    };
    let kernel = || -> Vec<Vec<(Ipv4Addr, u32)>> {
        let mut ipvs = Ipvs::open().expect("IPVS");
        let mut all = Vec::new();
        for s in ipvs.services().expect("services") {
            assert_eq!(s.key.port, 8080);
            all.push(
                ipvs.dests(&s.key)
                    .expect("dests")
                    .iter()
                    .map(|d| (d.address, d.weight))
                    .collect(),
            );
        }
        all
    };
    let ns = mesh_tests::Netns::new();
    // A namespace with `lo` down has no local table, and IPVS refuses
    // real servers there (inet_addr_type says "broadcast").
    ns.exec_ok("ip", &["link", "set", "lo", "up"]);
    let state = std::env::temp_dir().join(format!("mesh-ipvs-{}.json", std::process::id()));
    ns.enter(|| {
        let mut sync = IpvsSync::open(&state).expect("open IPVS");
        let r = sync.apply(&spec(&[(1, 1), (2, 1)])).expect("apply");
        assert_eq!((r.frontend_writes, r.backend_writes), (2, 4), "{r:?}");
        assert_eq!(kernel(), vec![vec![(b(1), 1), (b(2), 1)]; 2]);
        let r = sync.apply(&spec(&[(1, 1), (2, 1)])).expect("apply again");
        assert_eq!(r.total(), 0, "the same spec wrote {r:?}");
        // b2 drains (weight 0), b1 goes, b3 comes: per node address one
        // weight change, one add, one removal.
        let changed = spec(&[(2, 0), (3, 1)]);
        let r = sync.apply(&changed).expect("apply a change");
        assert_eq!(
            (r.frontend_writes, r.backend_writes, r.backend_removals),
            (0, 4, 2),
            "{r:?}"
        );
        assert_eq!(kernel(), vec![vec![(b(2), 0), (b(3), 1)]; 2]);
        drop(sync);
        // A restarted meshd reads back what it owns and writes no IPVS entry.
        let mut sync = IpvsSync::open(&state).expect("reopen");
        let r = sync.apply(&changed).expect("apply after restart");
        assert_eq!(
            r.frontend_writes + r.frontend_removals + r.backend_writes + r.backend_removals,
            0,
            "{r:?}"
        );
        let r = sync
            .apply_changes(
                &changed,
                &LbChanges {
                    upsert: Vec::new(),
                    remove: vec![front.clone()],
                },
            )
            .expect("delta");
        assert_eq!(r.frontend_removals, 2, "{r:?}");
        assert!(kernel().is_empty());
        sync.teardown().expect("teardown");
    });
    let _ = std::fs::remove_file(&state);
}

/// `--lb-backend ipvs` on a cluster fed by the tables: a VIP answers on
/// every port from a task on any node (IPVS fwmark services), and a
/// published port answers on every node (through the ingress network).
/// The eBPF program then holds no frontend: IPVS carries it all.
#[test]
fn ipvs_backend_serves_vips_and_published_ports_from_the_tables() {
    use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

    use cluster::{Node, json, place_task, start_cluster, wait_until};
    use dataplane::ipvs::Ipvs;
    use mesh_tests::{Topology, services};

    let Some(_vm) = require_vm("vm::ipvs_backend_serves_vips_and_published_ports_from_the_tables")
    else {
        return;
    };
    const T: Duration = Duration::from_secs(30);
    let mut topo = Topology::new(3);
    topo.add_host("client");
    let mut nodes = Node::for_hosts(&topo);
    nodes.truncate(3);
    let (h1, client) = (topo.host(0), topo.host(3));
    let ids = start_cluster(&mut nodes, "5s", &["--lb-backend", "ipvs"]);
    let m = &nodes[0];
    m.meshctl_ok(&["network", "create", "red"]);
    m.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "red",
        "--publish",
        "8080:80",
        "--replicas",
        "0",
        "--",
        "/bin/true",
    ]);
    m.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "cli",
        "--network",
        "red",
        "--replicas",
        "0",
        "--",
        "/bin/true",
    ]);
    // web.1 on h2, web.2 on h3, the client task on h1.
    let w1 = place_task(m, "web", 1, &ids[1]);
    let w2 = place_task(m, "web", 2, &ids[2]);
    let c = place_task(m, "cli", 1, &ids[0]);
    let _servers: Vec<_> = [(&w1, "web.1"), (&w2, "web.2")]
        .iter()
        .flat_map(|(t, name)| {
            [80, 81]
                .map(|port| services::tcp_echo(&t.ns, SocketAddr::from(([0, 0, 0, 0], port)), name))
        })
        .collect();
    let red = json(&m.meshctl_ok(&["network", "inspect", "red"]))[0]["id"].clone();
    let vip: std::net::Ipv4Addr = json(&m.meshctl_ok(&["service", "inspect", "web"]))[0]["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["network"] == red)
        .and_then(|v| v["addr"].as_str())
        .expect("a VIP on red")
        .parse()
        .expect("VIP");

    // The VIP from a task on a node that runs no backend: both answer, on
    // any port.
    let ask = |from: &cluster::Task, port: u16| {
        from.ns
            .enter(|| services::tcp_ask(SocketAddr::from((vip, port)), Duration::from_secs(3)))
    };
    let start = std::time::Instant::now();
    while ask(&c, 80).is_err() {
        if start.elapsed() > T {
            for cmd in [
                "ip route show table local",
                "nft list ruleset",
                "cat /proc/net/ip_vs",
                "cat /proc/net/ip_vs_conn",
                "ip -br addr",
                "ip -s link show mbr-4097",
                "tc filter show dev mbr-4097 ingress",
            ] {
                let argv: Vec<&str> = cmd.split(' ').collect();
                let out = h1.exec(argv[0], &argv[1..]);
                eprintln!(
                    "h1$ {cmd}\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            for cmd in ["ip route", "ip neigh", "ip -br addr"] {
                let argv: Vec<&str> = cmd.split(' ').collect();
                let out = c.ns.exec(argv[0], &argv[1..]);
                eprintln!(
                    "client task$ {cmd}\n{}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            panic!("the VIP {vip} never answered");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..40 {
        let who = ask(&c, 80 + (i % 2) as u16).unwrap_or_else(|e| panic!("VIP ask {i}: {e}"));
        *tally.entry(who).or_default() += 1;
    }
    assert_eq!(tally.len(), 2, "both tasks answer the VIP: {tally:?}");
    // From a backend's own node too (it may reach itself).
    let who = ask(&w1, 80).expect("the VIP from web.1");
    assert!(who.starts_with("web."), "{who}");

    // IPVS did it: h1 has the VIP's fwmark service with both tasks, and
    // counted the client's connections; the TC program holds no frontend.
    let mut backends = vec![w1.ip, w2.ip];
    backends.sort();
    let conns = h1.enter(|| {
        let mut ipvs = Ipvs::open().expect("IPVS");
        let services = ipvs.services().expect("IPVS services");
        services
            .iter()
            .filter(|s| s.key.fwmark != 0)
            .find_map(|s| {
                let d = ipvs.dests(&s.key).ok()?;
                let mut a: Vec<_> = d.iter().map(|d| d.address).collect();
                a.sort();
                (a == backends).then(|| d.iter().map(|d| d.active + d.inactive).sum::<u32>())
            })
            .expect("a fwmark service with web's two tasks")
    });
    assert!(conns >= 40, "IPVS counted {conns} connections to the VIP");
    let lb = dataplane::inspect::read_lb(&h1.pin_dir()).expect("read the eBPF LB");
    assert!(
        lb.is_empty(),
        "the eBPF LB holds frontends in IPVS mode: {}",
        lb.len()
    );

    // The published port on every node, from outside the cluster.
    for n in &nodes {
        let front = SocketAddr::from((n.host.addr(), 8080));
        wait_until(&format!("8080 on {}", n.host.label()), T, || {
            client
                .enter(|| services::tcp_ask(front, Duration::from_secs(3)))
                .ok()
        });
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..20 {
            let who = client
                .enter(|| services::tcp_ask(front, Duration::from_secs(3)))
                .unwrap_or_else(|e| panic!("{front} ask {i}: {e}"));
            seen.insert(who);
        }
        assert_eq!(seen.len(), 2, "via {front}: {seen:?}");
    }

    // The node is no router for its tasks (the eBPF program's rule, kept
    // by nftables here): a task that routes through its node reaches the
    // node's address on its bridge, and not the node's underlay address.
    let vni = json(&m.meshctl_ok(&["network", "inspect", "red"]))[0]["vni"]
        .as_u64()
        .expect("vni");
    let text = h1.exec_ok(
        "ip",
        &["-4", "-o", "addr", "show", "dev", &format!("mbr-{vni}")],
    );
    let bridge_addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .expect("the bridge's address")
        .to_owned();
    c.ns.exec_ok("ip", &["route", "add", "default", "via", &bridge_addr]);
    assert!(c.reaches(bridge_addr.parse().expect("address")));
    let api = SocketAddr::from((h1.addr(), 2377));
    h1.enter(|| std::net::TcpStream::connect_timeout(&api, Duration::from_secs(2)))
        .expect("the API answers on the underlay");
    assert!(
        c.ns.enter(|| std::net::TcpStream::connect_timeout(&api, Duration::from_secs(2)))
            .is_err(),
        "a task reached its node's underlay address"
    );
    drop(nodes);
    for h in topo.hosts().iter().take(3) {
        mesh_tests::meshd::down(h);
    }
}
