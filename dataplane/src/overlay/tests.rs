use super::*;

fn net(id: &str, vni: u32, subnet: &str) -> NetworkSpec {
    let subnet: Subnet = subnet.parse().unwrap();
    NetworkSpec {
        id: id.into(),
        vni,
        gateway: subnet.gateway(),
        subnet,
        mtu: None,
        encrypted: false,
        local: vec![],
        remote: vec![],
        host: None,
        vips: vec![],
    }
}

fn remote(ip: &str, node: &str) -> RemoteEndpoint {
    let ip: Ipv4Addr = ip.parse().unwrap();
    RemoteEndpoint {
        ip,
        mac: Mac::from_ipv4(ip),
        node: node.parse().unwrap(),
    }
}

fn local(id: &str, ip: &str, netns: &str) -> LocalEndpoint {
    let ip: Ipv4Addr = ip.parse().unwrap();
    LocalEndpoint {
        id: id.into(),
        netns: netns.into(),
        ip,
        mac: Mac::from_ipv4(ip),
        interface: "eth0".into(),
    }
}

fn problems(spec: &OverlaySpec) -> Vec<String> {
    match spec.validate() {
        Ok(()) => vec![],
        Err(OverlayError::Invalid(p)) => p,
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn a_good_spec_validates_and_round_trips_through_json() {
    let mut a = net("front", 4096, "10.0.1.0/24");
    a.remote.push(remote("10.0.1.3", "198.18.0.3"));
    a.local.push(local("t1", "10.0.1.2", "/run/netns/t1"));
    let spec = OverlaySpec {
        underlay: Some("198.18.0.2".parse().unwrap()),
        networks: vec![a, net("back", 4097, "10.0.2.0/24")],
    };
    assert_eq!(problems(&spec), Vec::<String>::new());
    let json = serde_json::to_string(&spec).unwrap();
    assert!(
        json.contains("\"10.0.1.0/24\"") && json.contains("\"02:42:0a:00:01:03\""),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<OverlaySpec>(&json).unwrap(), spec);
}

#[test]
fn every_problem_is_reported_at_once() {
    let mut a = net("front", 4096, "10.0.1.0/24");
    a.remote.push(remote("10.0.1.1", "198.18.0.3")); // the gateway
    a.remote.push(remote("10.0.2.9", "198.18.0.3")); // outside the subnet
    a.remote.push(remote("10.0.1.5", "198.18.0.2")); // on this node
    a.remote.push(remote("10.0.1.8", "198.18.0.4"));
    let mut dup = remote("10.0.1.6", "198.18.0.4");
    dup.mac = Mac::from_ipv4("10.0.1.8".parse().unwrap());
    a.remote.push(dup); // same MAC as the previous one
    a.remote.push(remote("10.0.1.8", "198.18.0.3")); // same address
    a.local.push(local("t1", "10.0.1.7", "relative/path"));
    let mut b = net("front", 4096, "10.0.3.0/24"); // same id, same VNI
    b.mtu = Some(20);
    let spec = OverlaySpec {
        underlay: Some("198.18.0.2".parse().unwrap()),
        networks: vec![a, b],
    };
    let p = problems(&spec);
    let expect = [
        "10.0.1.1 is not a usable address",
        "10.0.2.9 is not a usable address",
        "remote endpoint 10.0.1.5 on 198.18.0.2 is on this node; list it as local",
        "MAC 02:42:0a:00:01:08 is already held by 10.0.1.8",
        "remote endpoint 10.0.1.8 is listed twice",
        "must be an absolute path",
        "network front is listed twice",
        "both use VNI 4096",
        "MTU 20 is outside",
    ];
    for e in expect {
        assert!(p.iter().any(|x| x.contains(e)), "missing {e:?} in {p:#?}");
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn networks_need_an_underlay_and_unknown_fields_are_refused() {
    let spec = OverlaySpec {
        underlay: None,
        networks: vec![net("a", 4096, "10.0.1.0/24")],
    };
    assert!(problems(&spec)[0].contains("\"underlay\""));
    let err = serde_json::from_str::<OverlaySpec>(r#"{"networks":[],"extra":1}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    let err = serde_json::from_str::<NetworkSpec>(
        r#"{"id":"a","vni":1,"subnet":"10.0.1.0/33","gateway":"10.0.1.1"}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("is not an IPv4 subnet"), "{err}");
}

#[test]
fn changes_are_checked_in_order_and_all_or_nothing() {
    let mut a = net("front", 4096, "10.0.1.0/24");
    a.remote.push(remote("10.0.1.3", "198.18.0.3"));
    a.local.push(local("t1", "10.0.1.2", "/run/netns/t1"));
    let spec = OverlaySpec {
        underlay: Some("198.18.0.2".parse().unwrap()),
        networks: vec![a],
    };
    let mut d = Desired::build(spec.clone()).unwrap();
    let stage_all = |d: &mut Desired, changes: &[Change]| -> Result<(), Vec<String>> {
        let mut undo = Vec::new();
        for c in changes {
            match d.stage(c) {
                Ok(u) => undo.push(u),
                Err(p) => {
                    for u in undo.into_iter().rev() {
                        d.undo(u);
                    }
                    return Err(p);
                }
            }
        }
        Ok(())
    };
    let network = "front".to_string();
    // A MAC may pass from one endpoint to another within one batch...
    let mut moved = remote("10.0.1.4", "198.18.0.4");
    moved.mac = Mac::from_ipv4("10.0.1.3".parse().unwrap());
    stage_all(
        &mut d,
        &[
            Change::RemoveRemote {
                network: network.clone(),
                ip: "10.0.1.3".parse().unwrap(),
            },
            Change::UpsertRemote {
                network: network.clone(),
                endpoint: moved.clone(),
            },
        ],
    )
    .unwrap();
    assert_eq!(d.to_spec().networks[0].remote, vec![moved.clone()]);
    // ...but a batch with one bad change leaves the table as it was.
    let before = d.to_spec();
    let err = stage_all(
        &mut d,
        &[
            Change::UpsertRemote {
                network: network.clone(),
                endpoint: remote("10.0.1.9", "198.18.0.3"),
            },
            Change::UpsertLocal {
                network: network.clone(),
                endpoint: local("t2", "10.0.1.4", "/run/netns/t2"),
            },
        ],
    )
    .unwrap_err();
    assert!(
        err[0].contains("address 10.0.1.4 is already held by a remote endpoint"),
        "{err:?}"
    );
    assert_eq!(d.to_spec(), before);
    // Unknown networks, duplicate task interfaces, and updates in place.
    let err = stage_all(
        &mut d,
        &[Change::RemoveLocal {
            network: "nope".into(),
            id: "t1".into(),
        }],
    )
    .unwrap_err();
    assert!(
        err[0].contains("network nope is not in the table"),
        "{err:?}"
    );
    let mut second = net("back", 4097, "10.0.2.0/24");
    second.local.push(local("t9", "10.0.2.2", "/run/netns/t1"));
    let err = Desired::build(OverlaySpec {
        networks: vec![spec.networks[0].clone(), second],
        ..spec.clone()
    })
    .err()
    .expect("eth0 twice in one namespace");
    assert!(
        err.to_string()
            .contains("eth0 in /run/netns/t1 is already used by front/t1"),
        "{err}"
    );
    let mut t1 = local("t1", "10.0.1.20", "/run/netns/t1");
    t1.mac = Mac::from_ipv4("10.0.1.2".parse().unwrap()); // keeps its own MAC
    stage_all(
        &mut d,
        &[Change::UpsertLocal {
            network,
            endpoint: t1.clone(),
        }],
    )
    .unwrap();
    assert_eq!(d.to_spec().networks[0].local, vec![t1]);
}

#[test]
fn link_names_are_short_stable_and_distinct() {
    assert_eq!(bridge_name(16_777_215), "mbr-16777215");
    assert_eq!(vxlan_name(4096), "mvx-4096");
    let v = veth_name("front", "t1");
    assert_eq!(v, veth_name("front", "t1"));
    assert_ne!(v, veth_name("front", "t2"));
    assert_ne!(veth_name("ab", "c"), veth_name("a", "bc"));
    for n in [bridge_name(16_777_215), vxlan_name(16_777_215), v] {
        check_ifname(&n).unwrap();
        assert!(is_owned(&n));
    }
    assert!(!is_owned("eth0"));
}
