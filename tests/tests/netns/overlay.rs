//! Overlay networks: three hosts, two VXLAN networks, a task namespace per
//! network on every host, reconciled by `dataplane::overlay` running in each
//! host namespace.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use dataplane::{
    netlink::{Mac, Netlink},
    overlay::{
        Change, LocalEndpoint, Overlay, OverlayError, RemoteEndpoint, bridge_name, vxlan_name,
    },
};
use mesh_tests::{
    ChildGuard, Netns,
    capture::{Capture, vxlan_frames},
    meshd::{self, ConfigFile},
    netns::wait_for,
    require_root,
    services::{tcp_ask, tcp_echo},
};

#[path = "overlay/fixture.rs"]
mod fixture;
use fixture::{Cluster, HOSTS, NETS, TaskNs, link_mtu, output};

#[test]
fn tasks_reach_each_other_across_hosts_and_nothing_on_another_network() {
    let Some(_) = require_root("overlay::tasks_reach_each_other_across_hosts") else {
        return;
    };
    let mut c = Cluster::new();
    c.apply_all();
    let (red, blue) = (0, 1);

    // Ping and TCP between hosts, on both networks.
    for net in [red, blue] {
        for (a, b) in [(0, 1), (1, 2), (2, 0)] {
            let (from, to) = (c.task(net, a), c.task(net, b));
            let o = from.ping(to.ip, &[]);
            assert!(
                o.status.success(),
                "{} -> {}: {}",
                from.id(),
                to.id(),
                output(&o)
            );
        }
    }
    let r0 = c.task(red, 0);
    let r1 = c.task(red, 1);
    let r2 = c.task(red, 2);
    let server = tcp_echo(&r2.ns, SocketAddr::from((r2.ip, 7000)), "red.2");
    let answer = r0.ns.enter(|| tcp_ask(server.addr, Duration::from_secs(3)));
    assert_eq!(answer.expect("TCP red.0 -> red.2"), "red.2");

    // The overlay MTU is the underlay's minus 50; a DF echo of exactly
    // MTU - 28 bytes crosses hosts, one byte more is refused.
    let mtu = link_mtu(c.topo.host(0).ns(), "eth0") - 50;
    assert_eq!(link_mtu(&r0.ns, "eth0"), mtu, "task eth0 MTU");
    let fits = (mtu - 28).to_string();
    let o = r0.ping(r1.ip, &["-M", "do", "-s", &fits]);
    assert!(
        o.status.success(),
        "DF ping of {fits} bytes: {}",
        output(&o)
    );
    let too_big = (mtu - 27).to_string();
    let o = r0.ping(r1.ip, &["-M", "do", "-s", &too_big]);
    let text = output(&o);
    assert!(
        !o.status.success(),
        "DF ping of {too_big} bytes passed: {text}"
    );
    assert!(
        text.contains(&format!("mtu={mtu}")) || text.contains(&format!("mtu = {mtu}")),
        "expected fragmentation needed (mtu {mtu}): {text}"
    );

    // Isolation. Without a route, red has no way to blue at all...
    let b0 = c.task(blue, 0);
    let b1 = c.task(blue, 1);
    assert!(r0.unreachable(b1.ip), "red.0 reached blue.1 with no route");
    // ...and a task that forces blue's subnet onto its red interface still
    // reaches nothing there: red's segment has no blue endpoint, locally or
    // remotely, and the host has no address on either overlay to route by.
    r0.ns
        .exec_ok("ip", &["route", "add", "10.10.2.0/24", "dev", "eth0"]);
    assert!(r0.unreachable(b1.ip), "red.0 reached blue.1 (other host)");
    assert!(r0.unreachable(b0.ip), "red.0 reached blue.0 (same host)");
    let host0 = c.topo.host(0).addr();
    assert!(
        r0.unreachable(host0),
        "red.0 reached its host's underlay address"
    );
    assert!(b0.reaches(b1.ip), "blue itself still works");

    // No flooding: force fresh ARP on both ends, then capture the underlay
    // during a TCP exchange. ARP is answered on each node from the neighbour
    // table; only unicast frames for known endpoints cross.
    for t in [r0, r1] {
        t.ns.exec_ok("ip", &["neigh", "flush", "all"]);
    }
    let server = tcp_echo(&r1.ns, SocketAddr::from((r1.ip, 7001)), "red.1");
    let capture = Capture::start(c.topo.underlay());
    for _ in 0..5 {
        let answer = r0.ns.enter(|| tcp_ask(server.addr, Duration::from_secs(3)));
        assert_eq!(answer.expect("TCP red.0 -> red.1"), "red.1");
    }
    let frames = vxlan_frames(&capture.finish());
    assert!(
        frames.len() >= 10,
        "only {} VXLAN frames captured",
        frames.len()
    );
    // Each frame goes to the one node that runs its destination: a flooded
    // unknown unicast would also show up at the third node.
    let owner = |mac: [u8; 6]| {
        [r0, r1]
            .into_iter()
            .find(|t| t.mac().0 == mac)
            .map(|t| c.topo.host(t.host).addr())
    };
    for f in &frames {
        assert_eq!(f.vni, NETS[red].1, "{f:?}");
        assert!(!f.is_flood(), "flooded frame crossed the underlay: {f:?}");
        assert_eq!(
            owner(f.inner_dst_mac()),
            Some(f.outer_dst),
            "frame sent to a node that does not own its MAC: {f:?}"
        );
    }
    let neigh = r0.ns.exec_ok("ip", &["neigh", "show", &r1.ip.to_string()]);
    assert!(
        neigh.contains(&r1.mac().to_string()),
        "red.0 resolved red.1 locally: {neigh}"
    );
}

#[test]
fn reconcile_is_idempotent_repairs_drift_removes_endpoints_and_tears_down() {
    let Some(_) = require_root("overlay::reconcile_is_idempotent_repairs_drift") else {
        return;
    };
    let mut c = Cluster::new();
    c.apply_all();
    let red = 0;
    let (r0, r1, r2) = (c.task(red, 0).ip, c.task(red, 1).ip, c.task(red, 2).ip);
    let mac1 = c.task(red, 1).mac().to_string();
    let host0 = c.topo.host(0).ns().name().to_owned();
    let vx = vxlan_name(NETS[red].1);

    // Idempotent: the same table again, incrementally and by a full re-read,
    // and by a fresh reconciler adopting what a previous one built.
    for h in 0..HOSTS {
        let spec = c.spec(h);
        assert_eq!(
            c.apply(h, spec).unwrap(),
            0,
            "host {h}: re-apply changed something"
        );
        assert_eq!(
            c.reconcile(h),
            0,
            "host {h}: full reconcile changed something"
        );
    }
    let nl =
        c.rt.block_on(async { Netlink::open(&c.topo.host(0).ns().path()) })
            .unwrap();
    let mut fresh = Overlay::new(nl);
    let report = c.rt.block_on(fresh.apply(c.spec(0))).unwrap();
    assert!(report.full, "a new reconciler reads the kernel first");
    assert_eq!(
        report.changes, 0,
        "adopting existing state changed something"
    );

    // A network's MTU changes in place: the same task interface, the new MTU
    // on bridge, VXLAN device, host veth and task eth0 (four changes).
    let index = |t: &TaskNs| {
        t.ns.exec_ok("ip", &["-o", "link", "show", "eth0"])
            .split(':')
            .next()
            .unwrap()
            .to_owned()
    };
    let before = index(c.task(red, 0));
    for mtu in [1400, 1450] {
        let mut spec = c.spec(0);
        spec.networks[red].mtu = Some(mtu);
        assert_eq!(c.apply(0, spec).unwrap(), 4, "MTU {mtu}");
        assert_eq!(link_mtu(&c.task(red, 0).ns, "eth0"), mtu);
        assert_eq!(
            link_mtu(c.topo.host(0).ns(), &bridge_name(NETS[red].1)),
            mtu
        );
        assert_eq!(
            index(c.task(red, 0)),
            before,
            "the task's interface was recreated"
        );
    }
    assert!(c.task(red, 0).reaches(r1));
    assert_eq!(
        c.apply(0, c.spec(0)).unwrap(),
        0,
        "1450 is the default for this underlay"
    );

    // Drift: an FDB entry deleted by hand cuts red.0 off from red.1, and the
    // next reconcile restores exactly that entry.
    let t0 = c.task(red, 0);
    assert!(t0.reaches(r1));
    c.topo
        .host(0)
        .exec_ok("bridge", &["fdb", "del", &mac1, "dev", &vx, "self"]);
    assert!(t0.unreachable(r1), "still reachable without the FDB entry");
    assert_eq!(c.reconcile(0), 1);
    assert!(c.task(red, 0).reaches(r1), "FDB entry not restored");
    // A neighbour entry, a bridge set down, a task's MTU changed: one change each.
    let br = bridge_name(NETS[red].1);
    c.topo
        .host(0)
        .exec_ok("ip", &["neigh", "del", &r1.to_string(), "dev", &vx]);
    c.topo.host(0).exec_ok("ip", &["link", "set", &br, "down"]);
    c.task(red, 0)
        .ns
        .exec_ok("ip", &["link", "set", "eth0", "mtu", "1500"]);
    assert_eq!(c.reconcile(0), 3);
    assert!(c.task(red, 0).reaches(r1), "drift not repaired");
    assert_eq!(c.reconcile(0), 0);

    // The underlay address vanishing (an interface flap, an operator's
    // mistake) is an error, and the networks stay as they are.
    let underlay = format!("{}/{}", c.topo.host(0).addr(), c.topo.host(0).prefix_len());
    c.topo
        .host(0)
        .exec_ok("ip", &["addr", "del", &underlay, "dev", "eth0"]);
    let o = &mut c.overlays[0];
    let err = c.rt.block_on(o.reconcile()).unwrap_err().to_string();
    assert!(
        err.contains("no interface in netns") && err.contains("has this address"),
        "{err}"
    );
    assert!(
        Cluster::links(c.topo.host(0).ns()).contains(&br),
        "a network was torn down: {err}"
    );
    assert_eq!(Cluster::links(&c.task(red, 0).ns), vec!["lo", "eth0"]);
    c.topo
        .host(0)
        .exec_ok("ip", &["addr", "add", &underlay, "dev", "eth0"]);
    assert_eq!(
        c.reconcile(0),
        0,
        "nothing to rebuild once the address is back"
    );
    assert!(c.task(red, 0).reaches(r1));

    // An MTU that no longer fits, in an incremental apply: reported, and the
    // network keeps working as it was.
    let mut spec = c.spec(0);
    spec.networks[red].mtu = Some(9000);
    let err = c.apply(0, spec).unwrap_err().to_string();
    assert!(err.contains("MTU 9000 does not fit the underlay"), "{err}");
    assert_eq!(Cluster::links(&c.task(red, 0).ns), vec!["lo", "eth0"]);
    assert!(c.task(red, 0).reaches(r1));
    assert_eq!(c.apply(0, c.spec(0)).unwrap(), 0, "nothing was torn down");

    // One table that drops `red` and creates `green` on the same VNI, with
    // red.0's namespace now attached to green: the old links and the task's
    // old eth0 go first, then green is built and talks to red.1 (same VNI).
    let mut spec = c.spec(0);
    let mut green = spec.networks[red].clone();
    green.id = "green".into();
    for ep in &mut green.local {
        ep.id = ep.id.replace("red", "green");
    }
    spec.networks[red] = green;
    assert!(c.apply(0, spec).unwrap() > 0);
    assert!(c.task(red, 0).reaches(r1), "green.0 -> red.1 over VNI 4096");
    assert!(c.apply(0, c.spec(0)).unwrap() > 0, "and back to red");
    assert!(c.task(red, 0).reaches(r1));
    assert_eq!(c.reconcile(0), 0);

    // Removing a remote endpoint: two changes (neighbour + FDB), and it is gone.
    let mut spec = c.spec(0);
    spec.networks[red].remote.retain(|r| r.ip != r2);
    assert_eq!(c.apply(0, spec.clone()).unwrap(), 2);
    assert!(
        c.task(red, 0).unreachable(r2),
        "removed endpoint still reachable"
    );
    assert!(c.task(red, 0).reaches(r1), "the other endpoint went too");
    let fdb = c
        .topo
        .host(0)
        .exec_ok("bridge", &["fdb", "show", "dev", &vx]);
    assert!(!fdb.contains(&Mac::from_ipv4(r2).to_string()), "{fdb}");
    // Adding it back as a delta: two changes.
    let back = c.spec(0).networks[red]
        .remote
        .iter()
        .find(|r| r.ip == r2)
        .cloned()
        .unwrap();
    let upsert = Change::UpsertRemote {
        network: "red".into(),
        endpoint: back.clone(),
    };
    assert_eq!(c.changes(0, &[upsert]).unwrap(), 2);
    assert!(c.task(red, 0).reaches(r2));
    // Moving it to the wrong node is one FDB write, and cuts it off; back again.
    let mut moved = back.clone();
    moved.node = c.topo.host(1).addr();
    let to = |e: &RemoteEndpoint| Change::UpsertRemote {
        network: "red".into(),
        endpoint: e.clone(),
    };
    assert_eq!(c.changes(0, &[to(&moved)]).unwrap(), 1);
    assert!(
        c.task(red, 0).unreachable(r2),
        "reached through the wrong node"
    );
    assert_eq!(c.changes(0, &[to(&back)]).unwrap(), 1);
    assert!(c.task(red, 0).reaches(r2));
    assert_eq!(
        c.apply(0, c.spec(0)).unwrap(),
        0,
        "deltas and the table agree"
    );

    // A new task on host 0, added and removed as deltas on both ends.
    let extra = Netns::new();
    let ip: Ipv4Addr = "10.10.1.50".parse().unwrap();
    let ep = LocalEndpoint {
        id: "red.extra".into(),
        netns: extra.path(),
        ip,
        mac: Mac::from_ipv4(ip),
        interface: "eth0".into(),
    };
    let add_local = Change::UpsertLocal {
        network: "red".into(),
        endpoint: ep.clone(),
    };
    let remote_view = RemoteEndpoint {
        ip,
        mac: ep.mac,
        node: c.topo.host(0).addr(),
    };
    assert!(
        c.changes(0, &[add_local]).unwrap() >= 3,
        "veth, address, link up"
    );
    assert_eq!(c.changes(1, &[to(&remote_view)]).unwrap(), 2);
    assert!(c.task(red, 1).reaches(ip), "red.1 -> the new task");
    let gone = Change::RemoveLocal {
        network: "red".into(),
        id: "red.extra".into(),
    };
    assert_eq!(c.changes(0, &[gone]).unwrap(), 1, "one veth deletion");
    assert_eq!(Cluster::links(&extra), vec!["lo"]);
    let gone = Change::RemoveRemote {
        network: "red".into(),
        ip,
    };
    assert_eq!(c.changes(1, &[gone]).unwrap(), 2);
    // A batch with one bad change applies none of it.
    let bad = [
        to(&moved),
        Change::UpsertRemote {
            network: "red".into(),
            endpoint: RemoteEndpoint {
                ip: "10.10.9.9".parse().unwrap(),
                ..back.clone()
            },
        },
    ];
    assert!(matches!(c.changes(0, &bad), Err(OverlayError::Invalid(_))));
    assert_eq!(c.reconcile(0), 0, "a refused batch was half-applied");
    assert!(c.task(red, 0).reaches(r2));

    // A bad spec changes nothing.
    let mut bad = c.spec(0);
    bad.networks[red].remote[0].ip = "10.99.0.1".parse().unwrap();
    bad.networks[1].vni = NETS[red].1;
    match c.apply(0, bad) {
        Err(OverlayError::Invalid(problems)) => assert_eq!(problems.len(), 2, "{problems:?}"),
        other => panic!("expected an invalid-spec error, got {other:?}"),
    }
    assert_eq!(c.reconcile(0), 0, "an invalid spec was half-applied");

    // An endpoint whose namespace is gone is reported by name; the rest of
    // the table is applied.
    let mut spec = c.spec(0);
    let ghost = Netns::new();
    let ghost_path = ghost.path();
    drop(ghost);
    spec.networks[red].local.push(LocalEndpoint {
        id: "ghost".into(),
        netns: ghost_path,
        ip: "10.10.1.99".parse().unwrap(),
        mac: Mac::from_ipv4("10.10.1.99".parse().unwrap()),
        interface: "eth0".into(),
    });
    spec.networks[red].remote.retain(|r| r.ip != r2);
    let err = c.apply(0, spec).unwrap_err().to_string();
    assert!(
        err.contains("network red endpoint ghost") && err.contains("open namespace"),
        "{err}"
    );
    assert!(
        c.task(red, 0).unreachable(r2),
        "the rest of the table was not applied"
    );
    assert_eq!(c.apply(0, c.spec(0)).unwrap(), 2, "back to the full table");
    let _ = r0;

    // Teardown leaves nothing: no mesh link in any host, no eth0 in any task.
    for h in 0..HOSTS {
        let o = &mut c.overlays[h];
        c.rt.block_on(o.teardown())
            .unwrap_or_else(|e| panic!("teardown host {h}: {e}"));
    }
    c.assert_nothing_left("teardown");
    assert_eq!(
        c.rt.block_on(fresh.teardown()).unwrap().changes,
        0,
        "a second teardown has nothing to do"
    );
    let _ = host0;
}

#[test]
fn netlink_errors_name_the_operation_and_the_object() {
    let Some(_) = require_root("overlay::netlink_errors_name_the_operation") else {
        return;
    };
    let ns = Netns::new();
    let other = Netns::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let nl = Netlink::open(&ns.path()).unwrap();
        nl.add_bridge("mbr-test", 1400).await.unwrap();
        let err = nl.add_bridge("mbr-test", 1400).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("add bridge mbr-test") && text.contains(ns.name()),
            "{text}"
        );
        assert_eq!(err.errno(), Some(libc::EEXIST));

        let br = nl.link("mbr-test").await.unwrap().expect("bridge exists");
        assert_eq!(br.mtu, 1400);
        assert!(br.up);
        assert!(nl.link("nothing").await.unwrap().is_none());

        // Addresses and routes.
        nl.add_address(&br, "10.77.0.1".parse().unwrap(), 24)
            .await
            .unwrap();
        let route = dataplane::netlink::Route {
            dst: "10.78.0.0".parse().unwrap(),
            prefix: 16,
            oif: br.index,
            gateway: Some("10.77.0.2".parse().unwrap()),
        };
        nl.add_route(&route).await.unwrap();
        let routes = ns.exec_ok("ip", &["route", "show", "10.78.0.0/16"]);
        assert!(routes.contains("via 10.77.0.2 dev mbr-test"), "{routes}");
        nl.del_route(&route).await.unwrap();
        let err = nl.del_route(&route).await.unwrap_err().to_string();
        assert!(
            err.contains("delete route 10.78.0.0/16 via 10.77.0.2"),
            "{err}"
        );
        nl.del_address(&br, "10.77.0.1".parse().unwrap(), 24)
            .await
            .unwrap();
        assert!(nl.addresses(br.index).await.unwrap().is_empty());

        // A veth created with its peer in another namespace, then moved there
        // whole; the bridge (which cannot change namespace) says so by name.
        let file = std::fs::File::open(other.path()).unwrap();
        let peer = dataplane::netlink::VethPeer {
            name: "eth0",
            netns: &file,
            mac: "02:42:0a:4d:00:02".parse().unwrap(),
            mtu: 1400,
        };
        nl.add_veth("mve-test", 1400, br.index, &peer)
            .await
            .unwrap();
        let host_side = nl.link("mve-test").await.unwrap().expect("host side");
        assert_eq!(host_side.controller, Some(br.index));
        let there = Netlink::open(&other.path()).unwrap();
        let eth0 = there
            .link("eth0")
            .await
            .unwrap()
            .expect("peer in the other namespace");
        assert_eq!(eth0.mac, Some(peer.mac));
        assert_eq!(
            eth0.link,
            Some(host_side.index),
            "peer points at its host side"
        );
        nl.move_to_namespace(&host_side, &file).await.unwrap();
        assert!(nl.link("mve-test").await.unwrap().is_none());
        assert!(there.link("mve-test").await.unwrap().is_some());
        let err = nl
            .move_to_namespace(&br, &file)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("move to namespace mbr-test"), "{err}");
        nl.del_link(&br).await.unwrap();
        let err = nl.del_link(&br).await.unwrap_err();
        assert!(
            err.is_not_found() && err.to_string().contains("delete link mbr-test"),
            "{err}"
        );

        // Changes are counted per handle; reads are not changes.
        assert_eq!(nl.changes(), 8);
        assert_eq!(there.changes(), 0);
    });
}

#[test]
fn meshd_applies_its_overlay_config_repairs_drift_and_removes_it_on_down() {
    let Some(_) = require_root("overlay::meshd_applies_its_overlay_config") else {
        return;
    };
    let c = Cluster::new();
    let red = 0;
    let configs: Vec<ConfigFile> = (0..HOSTS)
        .map(|h| {
            let spec = serde_json::to_value(c.spec(h)).expect("spec as json");
            ConfigFile::json(c.topo.host(h), &serde_json::json!({ "overlay": spec }))
        })
        .collect();
    let daemons: Vec<ChildGuard> = (0..HOSTS)
        .map(|h| {
            meshd::start(
                c.topo.host(h),
                Some(&configs[h]),
                &["--resync-interval", "1"],
            )
        })
        .collect();
    let (r1, r2) = (c.task(red, 1).ip, c.task(red, 2).ip);
    assert!(c.task(red, 0).reaches(r1), "overlay from meshd's config");

    // Drift is repaired by the periodic resync, without a reload.
    let vx = vxlan_name(NETS[red].1);
    let mac1 = c.task(red, 1).mac().to_string();
    c.topo
        .host(0)
        .exec_ok("bridge", &["fdb", "del", &mac1, "dev", &vx, "self"]);
    wait_for(
        "meshd to restore the FDB entry",
        Duration::from_secs(5),
        || {
            c.topo
                .host(0)
                .exec_ok("bridge", &["fdb", "show", "dev", &vx])
                .lines()
                // The VXLAN's own entry, not one the bridge learned.
                .any(|l| l.starts_with(&mac1) && l.contains(" dst "))
        },
    );
    assert!(c.task(red, 0).reaches(r1));

    // SIGHUP applies a changed table; a broken one is refused and the old kept.
    configs[0].replace(&serde_json::json!({ "overlay": { "underlay": "198.18.0.1", "networks": [{"id": "x", "vni": 0, "subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}] } }));
    daemons[0].signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.task(red, 0).reaches(r2), "an invalid config was applied");
    let mut spec = c.spec(0);
    spec.networks[red].remote.retain(|r| r.ip != r2);
    configs[0].replace(&serde_json::json!({ "overlay": spec }));
    daemons[0].signal(libc::SIGHUP);
    wait_for("meshd to withdraw red.2", Duration::from_secs(5), || {
        c.task(red, 0).unreachable(r2)
    });

    // Stopping meshd leaves the overlay up (tasks keep talking); `down` removes it.
    drop(daemons);
    assert!(
        c.task(red, 0).reaches(r1),
        "the overlay went down with meshd"
    );
    for h in 0..HOSTS {
        meshd::down(c.topo.host(h));
    }
    c.assert_nothing_left("meshd down");
}
