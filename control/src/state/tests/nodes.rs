//! Nodes: versioned and guarded commands, and an identity no hostname can
//! shadow.

use super::*;

#[test]
fn nodes_are_versioned_and_guarded() {
    let mut s = init();
    s.apply(&Command::AddNode {
        id: "m1".into(),
        hostname: "mgr".into(),
        addr: Ipv4Addr::new(198, 18, 0, 1),
        api_addr: None,
        role: Role::Manager,
        underlay: Vec::new(),
    })
    .unwrap();
    s.apply(&Command::AddNode {
        id: "w1".into(),
        hostname: "wrk".into(),
        addr: Ipv4Addr::new(198, 18, 0, 2),
        api_addr: None,
        role: Role::Worker,
        underlay: Vec::new(),
    })
    .unwrap();
    let err = s
        .apply(&Command::AddNode {
            id: "w2".into(),
            hostname: "dup".into(),
            addr: Ipv4Addr::new(198, 18, 0, 2),
            api_addr: None,
            role: Role::Worker,
            underlay: Vec::new(),
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "node address 198.18.0.2 is already used by node wrk"
    );
    let demote = NodeSpec {
        role: Role::Worker,
        availability: Availability::Active,
        labels: BTreeMap::new(),
    };
    let err = s
        .apply(&Command::UpdateNode {
            id: "m1".into(),
            version: 1,
            spec: demote.clone(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("is the last manager"), "{err}");
    let drain = NodeSpec {
        availability: Availability::Drain,
        ..demote.clone()
    };
    s.apply(&Command::UpdateNode {
        id: "w1".into(),
        version: 1,
        spec: drain.clone(),
    })
    .unwrap();
    let err = s
        .apply(&Command::UpdateNode {
            id: "w1".into(),
            version: 1,
            spec: drain,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            StateError::Conflict {
                current: 2,
                given: 1,
                ..
            }
        ),
        "{err}"
    );
    let remove = |s: &mut State, id: &str, force| {
        s.apply(&Command::RemoveNode {
            id: id.into(),
            force,
        })
        .unwrap_err()
        .to_string()
    };
    let err = remove(&mut s, "m1", true);
    assert!(err.contains("demote it before removing it"), "{err}");
    let err = remove(&mut s, "w1", false);
    assert!(err.contains("is not down and can't be removed"), "{err}");
    s.apply(&Command::SetNodeStatus {
        id: "w1".into(),
        status: NodeStatus::Down,
    })
    .unwrap();
    s.apply(&Command::RemoveNode {
        id: "w1".into(),
        force: false,
    })
    .unwrap();
    assert_eq!(s.nodes.len(), 1);
}

/// A node is addressed by id only: a hostname that equals, or looks
/// like, another node's id is refused at join, and commands never
/// resolve a hostname (they once took "id or hostname, first match",
/// so a joiner named after a victim's id was marked down for it).
#[test]
fn node_identity_cannot_be_shadowed() {
    let mut s = init();
    let add = |s: &mut State, id: &str, hostname: &str, last: u8| {
        s.apply(&Command::AddNode {
            id: id.into(),
            hostname: hostname.into(),
            addr: Ipv4Addr::new(198, 18, 0, last),
            api_addr: None,
            role: Role::Worker,
            underlay: Vec::new(),
        })
    };
    add(&mut s, "00000000000000a1", "victim", 1).unwrap();
    let before = serde_json::to_vec(&s).unwrap();
    for (hostname, want) in [
        ("00000000000000a1", "looks like a node id"),
        ("0123456789abcdef", "looks like a node id"),
        ("Victim", "not a valid host name"),
        ("-x", "not a valid host name"),
        ("a..b", "not a valid host name"),
        ("", "not a valid host name"),
        (&"a".repeat(64), "not a valid host name"),
    ] {
        let err = add(&mut s, "00000000000000b2", hostname, 2).unwrap_err();
        assert!(err.to_string().contains(want), "{hostname:?}: {err}");
        assert_eq!(
            serde_json::to_vec(&s).unwrap(),
            before,
            "{hostname:?} left a trace"
        );
    }
    // A new id may not equal an existing hostname either.
    add(&mut s, "00000000000000c3", "00000000000000d4x.example", 3).unwrap();
    let err = add(&mut s, "00000000000000d4x.example", "other", 4).unwrap_err();
    assert!(err.to_string().contains("already the hostname"), "{err}");
    s.apply(&Command::RemoveNode {
        id: "00000000000000c3".into(),
        force: true,
    })
    .unwrap();
    // Two nodes may share a hostname; commands by hostname find neither.
    add(&mut s, "00000000000000e5", "victim", 5).unwrap();
    let err = s
        .apply(&Command::SetNodeStatus {
            id: "victim".into(),
            status: NodeStatus::Down,
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "node victim not found");
    s.apply(&Command::SetNodeStatus {
        id: "00000000000000a1".into(),
        status: NodeStatus::Down,
    })
    .unwrap();
    assert_eq!(s.nodes["00000000000000a1"].status, NodeStatus::Down);
    assert_eq!(s.nodes["00000000000000e5"].status, NodeStatus::Ready);
}
