//! Networks: names, subnets and VNIs, clashes refused, none on a node's
//! underlay, none removed while a task still has an address on it.

use super::*;

#[test]
fn networks_get_names_subnets_and_vnis_and_refuse_clashes() {
    let mut s = init();
    let front = network(&mut s, "n1", "front").unwrap();
    assert_eq!(
        (front.subnet.to_string(), front.vni),
        ("10.0.1.0/24".into(), 4097)
    );
    assert_eq!(front.gateway, Ipv4Addr::new(10, 0, 1, 1));
    let err = network(&mut s, "n2", "Front_1").unwrap_err().to_string();
    assert!(err.contains("is not DNS-safe"), "{err}");
    assert_eq!(
        s.apply(&Command::CreateNetwork {
            id: "n2".into(),
            spec: NetworkSpec {
                name: "front".into(),
                internal: true,
                ..NetworkSpec::default()
            },
        })
        .unwrap_err()
        .to_string(),
        "network name front is already in use"
    );
    let err = s
        .apply(&Command::CreateNetwork {
            id: "n3".into(),
            spec: NetworkSpec {
                name: "back".into(),
                subnet: Some("10.0.1.128/25".parse().unwrap()),
                ..NetworkSpec::default()
            },
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("overlaps 10.0.1.0/24, used by network front"),
        "{err}"
    );
    // In use: refused; free: removed, and its subnet and VNI come back.
    create(&mut s, "s1", spec("web", &["front"], &[])).unwrap();
    let err = s
        .apply(&Command::RemoveNetwork {
            target: "front".into(),
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "network front is in use by service(s) web; remove them first"
    );
    s.apply(&Command::RemoveService {
        target: "web".into(),
    })
    .unwrap();
    s.apply(&Command::RemoveNetwork {
        target: "front".into(),
    })
    .unwrap();
    let again = network(&mut s, "n4", "again").unwrap();
    assert_eq!((again.subnet, again.vni), (front.subnet, front.vni));
}

/// Found by the state properties: a service that left a network let the
/// network go while its old task still had an address there; the subnet
/// went back to the pool, and the next network handed the same address
/// out again under the running task. Docker refuses the removal ("network
/// has active endpoints"); so does mesh, until the task ends.
#[test]
fn a_network_with_a_running_task_on_it_stays_until_the_task_ends() {
    let mut s = init();
    let front = network(&mut s, "n1", "front").unwrap();
    s.apply(&Command::AddNode {
        id: "node1".into(),
        hostname: "h1".into(),
        addr: Ipv4Addr::new(198, 18, 0, 1),
        api_addr: None,
        role: Role::Worker,
        underlay: Vec::new(),
    })
    .unwrap();
    let web = create(&mut s, "s1", spec("web", &["front"], &[])).unwrap();
    s.apply(&Command::CreateTask {
        id: "t1".into(),
        service: "web".into(),
        slot: 1,
        node: "node1".into(),
        netns: None,
    })
    .unwrap();
    // The service leaves the network; its task still runs there.
    s.apply(&Command::UpdateService {
        target: "web".into(),
        version: web.version,
        spec: spec("web", &[], &[]),
    })
    .unwrap();
    let before = serde_json::to_vec(&s).unwrap();
    let err = s
        .apply(&Command::RemoveNetwork {
            target: "front".into(),
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "network front has active endpoints: task(s) web.1 still run on it (their service \
         left the network, and a rolling update has not replaced them yet); wait for them to \
         stop, or remove them"
    );
    assert_eq!(
        serde_json::to_vec(&s).unwrap(),
        before,
        "refused, yet changed"
    );
    // Once it ended, the network goes, and its subnet with it.
    s.apply(&Command::SetTaskStatus {
        id: "t1".into(),
        observed: TaskState::Complete,
        netns: None,
        exit_code: Some(0),
        error: None,
        at_ms: 1,
    })
    .unwrap();
    s.apply(&Command::RemoveNetwork {
        target: "front".into(),
    })
    .unwrap();
    let again = network(&mut s, "n2", "again").unwrap();
    assert_eq!(again.subnet, front.subnet);
}

/// No network may overlap a node's underlay, given or picked from the
/// pool, and no node may join on an underlay a network overlaps.
#[test]
fn networks_stay_off_every_nodes_underlay() {
    let mut s = init();
    let sub = |t: &str| t.parse::<Subnet>().unwrap();
    s.apply(&Command::AddNode {
        id: "n1".into(),
        hostname: "host1".into(),
        addr: Ipv4Addr::new(10, 0, 1, 5),
        api_addr: None,
        role: Role::Worker,
        underlay: vec![sub("10.0.1.0/24")],
    })
    .unwrap();
    let before = serde_json::to_vec(&s).unwrap();
    let err = network_with(&mut s, "x", "n4b", Some(sub("10.0.0.0/16"))).unwrap_err();
    assert!(
        err.to_string()
            .contains("overlaps the underlay of node host1 (10.0.1.0/24"),
        "{err}"
    );
    assert_eq!(serde_json::to_vec(&s).unwrap(), before);
    // The pool skips it: ingress has 10.0.0.0/24, the next free is .2.
    let picked = network_with(&mut s, "y", "auto", None).unwrap();
    assert_eq!(picked.subnet.to_string(), "10.0.2.0/24");
    // A node whose underlay a network overlaps can't join.
    let err = s
        .apply(&Command::AddNode {
            id: "n2".into(),
            hostname: "host2".into(),
            addr: Ipv4Addr::new(10, 0, 2, 9),
            api_addr: None,
            role: Role::Worker,
            underlay: vec![sub("10.0.2.0/24")],
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("overlaps network auto (10.0.2.0/24)"),
        "{err}"
    );
    // Its address alone counts too.
    let err = s
        .apply(&Command::AddNode {
            id: "n3".into(),
            hostname: "host3".into(),
            addr: Ipv4Addr::new(10, 0, 2, 10),
            api_addr: None,
            role: Role::Worker,
            underlay: Vec::new(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("overlaps network auto"), "{err}");

    // host1's underlay grows after it joined: recorded (a fact, even
    // where a network overlaps it), and kept off from then on.
    s.apply(&Command::SetNodeUnderlay {
        id: "n1".into(),
        underlay: vec![sub("10.0.1.0/24"), sub("10.0.9.0/24"), sub("10.0.2.0/24")],
    })
    .unwrap();
    assert!(
        s.underlay_clash("n1", &s.nodes["n1"].underlay)
            .unwrap()
            .contains("network auto")
    );
    let err = network_with(&mut s, "z", "late", Some(sub("10.0.9.128/25"))).unwrap_err();
    assert!(
        err.to_string()
            .contains("overlaps the underlay of node host1 (10.0.9.0/24"),
        "{err}"
    );
    let picked = network_with(&mut s, "w", "next", None).unwrap();
    assert_eq!(picked.subnet.to_string(), "10.0.3.0/24");
    // Bounded, and only for a node that exists.
    let before = serde_json::to_vec(&s).unwrap();
    let many = (0..65)
        .map(|i| Subnet::containing(Ipv4Addr::new(192, 168, i, 0), 24))
        .collect();
    assert!(
        s.apply(&Command::SetNodeUnderlay {
            id: "n1".into(),
            underlay: many
        })
        .is_err()
    );
    assert!(
        s.apply(&Command::SetNodeUnderlay {
            id: "nope".into(),
            underlay: vec![]
        })
        .is_err()
    );
    assert_eq!(serde_json::to_vec(&s).unwrap(), before);
}
