//! Tasks: an address and MAC per network, released when they end; reports
//! bounded.

use super::*;

#[test]
fn tasks_get_an_address_and_mac_per_network_and_release_them() {
    let mut s = init();
    network(&mut s, "n1", "front").unwrap();
    s.apply(&Command::AddNode {
        id: "node1".into(),
        hostname: "h1".into(),
        addr: Ipv4Addr::new(198, 18, 0, 1),
        api_addr: None,
        role: Role::Manager,
        underlay: Vec::new(),
    })
    .unwrap();
    create(&mut s, "s1", spec("web", &["front"], &[(80, Some(8080))])).unwrap();
    let Outcome::Task(t) = s
        .apply(&Command::CreateTask {
            id: "t1".into(),
            service: "web".into(),
            slot: 1,
            node: "node1".into(),
            netns: None,
        })
        .unwrap()
    else {
        panic!()
    };
    let got: Vec<_> = t
        .attachments
        .iter()
        .map(|a| (a.network.as_str(), a.addr, a.mac))
        .collect();
    assert_eq!(
        got,
        vec![
            ("n1", Ipv4Addr::new(10, 0, 1, 4), [2, 0x42, 10, 0, 1, 4]),
            ("ing", Ipv4Addr::new(10, 0, 0, 4), [2, 0x42, 10, 0, 0, 4]),
        ]
    );
    // The node got its ingress address when it joined (10.0.0.2, before
    // the service's ingress VIP), and its address on n1 with its first
    // task there (10.0.1.3, after the VIP).
    let lbs: Vec<_> = s.nodes["node1"].lb_addrs.clone().into_iter().collect();
    assert_eq!(
        lbs,
        vec![
            ("ing".to_owned(), Ipv4Addr::new(10, 0, 0, 2)),
            ("n1".to_owned(), Ipv4Addr::new(10, 0, 1, 3)),
        ]
    );
    // A second task there reuses the node's address.
    s.apply(&Command::CreateTask {
        id: "t2".into(),
        service: "web".into(),
        slot: 2,
        node: "node1".into(),
        netns: None,
    })
    .unwrap();
    assert_eq!(s.nodes["node1"].lb_addrs.len(), 2);
    let mut copy = s.clone();
    copy.reindex().unwrap();
    for net in ["n1", "ing"] {
        let mut a = copy.alloc.addresses[net].clone();
        let mut b = s.alloc.addresses[net].clone();
        assert_eq!(a.allocate().unwrap(), b.allocate().unwrap(), "{net}");
    }
    // Removing the service removes its tasks and frees every address.
    s.apply(&Command::RemoveService {
        target: "web".into(),
    })
    .unwrap();
    assert!(s.tasks.is_empty());
    let again = create(&mut s, "s2", spec("web2", &["front"], &[(80, None)])).unwrap();
    assert_eq!(again.vips[0].addr, Ipv4Addr::new(10, 0, 1, 2));
}

/// A worker's report is bounded before it reaches the log, and the
/// state refuses an unbounded one from anywhere else.
#[test]
fn task_reports_are_bounded() {
    let long = "é".repeat(10_000);
    let cut = bound_report(long.clone());
    assert!(
        cut.len() <= REPORT_MAX && cut.ends_with("(truncated)"),
        "{}",
        cut.len()
    );
    assert_eq!(bound_report("short".into()), "short");
    let mut s = init();
    let err = s
        .apply(&Command::SetTaskStatus {
            id: "t".into(),
            observed: TaskState::Failed,
            netns: None,
            exit_code: None,
            error: Some(long),
            at_ms: 0,
        })
        .unwrap_err();
    assert!(err.to_string().contains("at most 4096 bytes"), "{err}");
}
