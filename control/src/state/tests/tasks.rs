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

/// Tasks made from one template hold one copy of it, also after a reload;
/// an update gives the new tasks a new one and leaves the old ones theirs.
#[test]
fn tasks_share_their_services_template() {
    let mut s = init();
    s.apply(&Command::AddNode {
        id: "node1".into(),
        hostname: "h1".into(),
        addr: Ipv4Addr::new(198, 18, 0, 1),
        api_addr: None,
        role: Role::Manager,
        underlay: Vec::new(),
    })
    .unwrap();
    create(&mut s, "s1", spec("web", &[], &[])).unwrap();
    let task = |s: &mut State, id: &str, slot: u32| {
        s.apply(&Command::CreateTask {
            id: id.into(),
            service: "web".into(),
            slot,
            node: "node1".into(),
            netns: None,
        })
        .unwrap();
    };
    task(&mut s, "t1", 1);
    task(&mut s, "t2", 2);
    assert!(Arc::ptr_eq(&s.tasks["t1"].spec, &s.tasks["t2"].spec));
    assert_eq!(*s.tasks["t1"].spec, s.services["s1"].spec.task);
    // Decoded, each task has its own copy; the reindex shares them again.
    let mut copy: State = crate::codec::decode(&crate::codec::encode(&s).unwrap()).unwrap();
    assert!(!Arc::ptr_eq(&copy.tasks["t1"].spec, &copy.tasks["t2"].spec));
    copy.reindex().unwrap();
    assert!(Arc::ptr_eq(&copy.tasks["t1"].spec, &copy.tasks["t2"].spec));
    // A new template: new tasks share it, the old keep what they ran.
    let mut v2 = s.services["s1"].spec.clone();
    v2.task.command = vec!["/bin/web".into(), "v2".into()];
    let version = s.services["s1"].version;
    s.apply(&Command::UpdateService {
        target: "web".into(),
        version,
        spec: v2.clone(),
    })
    .unwrap();
    task(&mut s, "t3", 3);
    task(&mut s, "t4", 4);
    assert!(Arc::ptr_eq(&s.tasks["t3"].spec, &s.tasks["t4"].spec));
    assert_eq!(*s.tasks["t3"].spec, v2.task);
    assert_eq!(s.tasks["t1"].spec.command, ["/bin/web"]);
    // The slot index still finds a slot's newest task after the change.
    task(&mut s, "t1b", 1);
    assert_eq!(
        s.tasks_of_service("s1")
            .map(|t| t.id.as_str())
            .collect::<Vec<_>>(),
        ["t1", "t1b", "t2", "t3", "t4"]
    );
}
