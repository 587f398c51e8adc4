//! The state machine's unit tests: one per command family, plus equality
//! and replay.

use super::*;

fn init() -> State {
    let mut s = State::default();
    s.apply(&Command::Init {
        cluster_id: "c1".into(),
        ingress_id: "ing".into(),
        settings: ClusterSettings::default(),
        secrets: None,
    })
    .unwrap();
    s
}

fn network(s: &mut State, id: &str, name: &str) -> Result<Network, StateError> {
    network_with(s, id, name, None)
}

fn network_with(
    s: &mut State,
    id: &str,
    name: &str,
    subnet: Option<Subnet>,
) -> Result<Network, StateError> {
    match s.apply(&Command::CreateNetwork {
        id: id.into(),
        spec: NetworkSpec {
            name: name.into(),
            subnet,
            ..NetworkSpec::default()
        },
    })? {
        Outcome::Network(n) => Ok(n),
        o => panic!("unexpected {o:?}"),
    }
}

fn spec(name: &str, networks: &[&str], ports: &[(u16, Option<u16>)]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: ServiceMode::Replicated { replicas: 3 },
        task: TaskTemplate {
            command: vec!["/bin/web".into()],
            env: vec!["A=1".into()],
            networks: networks
                .iter()
                .map(|n| NetworkAttachment {
                    target: (*n).into(),
                    aliases: vec![],
                })
                .collect(),
            restart: RestartPolicy::default(),
            constraints: vec![],
        },
        endpoint: EndpointSpec {
            mode: EndpointMode::Vip,
            ports: ports
                .iter()
                .map(|(target, published)| PortConfig {
                    protocol: Protocol::Tcp,
                    target: *target,
                    published: *published,
                    mode: PublishMode::Ingress,
                })
                .collect(),
        },
        update: UpdateConfig::default(),
        rollback: UpdateConfig::default(),
    }
}

fn create(s: &mut State, id: &str, spec: ServiceSpec) -> Result<Service, StateError> {
    match s.apply(&Command::CreateService {
        id: id.into(),
        spec,
    })? {
        Outcome::Service(svc) => Ok(*svc),
        o => panic!("unexpected {o:?}"),
    }
}

#[test]
fn a_batch_applies_each_command_on_its_own_and_renames_keep_the_name_index() {
    let mut s = init();
    let out = s
        .apply(&Command::Batch {
            commands: vec![
                Command::CreateService {
                    id: "s1".into(),
                    spec: spec("web", &[], &[(80, Some(8080))]),
                },
                // Same published port: refused, alone.
                Command::CreateService {
                    id: "s2".into(),
                    spec: spec("api", &[], &[(80, Some(8080))]),
                },
                Command::CreateService {
                    id: "s3".into(),
                    spec: spec("db", &[], &[]),
                },
                Command::Batch { commands: vec![] },
            ],
        })
        .unwrap();
    let Outcome::Batch(results) = out else {
        panic!("{out:?}")
    };
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(
        results[1].as_ref().unwrap_err().contains("8080"),
        "{results:?}"
    );
    assert!(results[3].is_err());
    assert_eq!(s.services.len(), 2);
    // The name index follows a rename, and a reindex rebuilds it.
    let mut renamed = s.services["s3"].spec.clone();
    renamed.name = "store".into();
    s.apply(&Command::UpdateService {
        target: "db".into(),
        version: 1,
        spec: renamed,
    })
    .unwrap();
    assert!(s.service_by_ref("db").is_none());
    assert_eq!(s.service_by_ref("store").unwrap().id, "s3");
    let mut copy: State = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
    assert_eq!(copy.service_by_ref("store").unwrap().id, "s3");
    copy.reindex().unwrap();
    assert_eq!(copy.service_by_ref("web").unwrap().id, "s1");
    assert!(create(&mut copy, "s4", spec("web", &[], &[])).is_err());
}

#[test]
fn init_creates_ingress_once_and_nothing_runs_before_it() {
    let mut empty = State::default();
    let err = network(&mut empty, "n1", "front").unwrap_err();
    assert_eq!(err.to_string(), "the cluster is not initialized");
    let mut s = init();
    let ingress = s.ingress().unwrap().clone();
    assert_eq!(
        (
            ingress.spec.name.as_str(),
            ingress.subnet.to_string(),
            ingress.vni
        ),
        ("ingress", "10.0.0.0/24".into(), 4096)
    );
    let again = s.apply(&Command::Init {
        cluster_id: "c2".into(),
        ingress_id: "i2".into(),
        settings: ClusterSettings::default(),
        secrets: None,
    });
    assert_eq!(
        again.unwrap_err().to_string(),
        "the cluster is already initialized"
    );
}

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

#[test]
fn services_get_vips_and_ports_and_conflicts_leave_no_trace() {
    let mut s = init();
    network(&mut s, "n1", "front").unwrap();
    let web = create(
        &mut s,
        "s1",
        spec("web", &["front"], &[(80, Some(8080)), (443, None)]),
    )
    .unwrap();
    let published: Vec<_> = web.ports.iter().map(|p| p.published.unwrap()).collect();
    assert_eq!(published, vec![8080, 30000]);
    assert_eq!(
        web.vips,
        vec![
            Vip {
                network: "n1".into(),
                addr: Ipv4Addr::new(10, 0, 1, 2)
            },
            Vip {
                network: "ing".into(),
                addr: Ipv4Addr::new(10, 0, 0, 2)
            },
        ]
    );
    // 9090 is free, 8080 is not: refused, and 9090 is not kept.
    let err = create(
        &mut s,
        "s2",
        spec("api", &["front"], &[(1, Some(9090)), (2, Some(8080))]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "published port 8080/tcp is already used by service web"
    );
    assert!(s.service_by_ref("api").is_none());
    let api = create(&mut s, "s3", spec("api", &["front"], &[(1, Some(9090))])).unwrap();
    assert_eq!(
        api.vips[0].addr,
        Ipv4Addr::new(10, 0, 1, 3),
        "the refused service's VIP was given back"
    );
    // Other refusals, each with the reason.
    let cases: Vec<(ServiceSpec, &str)> = vec![
        (spec("web", &[], &[]), "service name web is already in use"),
        (spec("x", &["nope"], &[]), "network nope not found"),
        (spec("x", &["ingress"], &[]), "joined by publishing a port"),
        (spec("x", &["front", "n1"], &[]), "attached twice"),
        (
            spec("x", &[], &[(80, Some(7000)), (81, Some(7000))]),
            "port 7000/tcp is published twice",
        ),
        (spec("x", &[], &[(0, None)]), "target port must be 1-65535"),
        (
            spec("x", &[], &[(80, Some(0))]),
            "published port must be 1-65535",
        ),
        (
            ServiceSpec {
                endpoint: EndpointSpec {
                    mode: EndpointMode::Dnsrr,
                    ..spec("x", &[], &[(80, None)]).endpoint
                },
                ..spec("x", &[], &[])
            },
            "needs endpoint mode vip",
        ),
        (
            ServiceSpec {
                task: TaskTemplate {
                    env: vec!["NOEQUALS".into()],
                    ..spec("x", &[], &[]).task
                },
                ..spec("x", &[], &[])
            },
            "must look like KEY=VALUE",
        ),
        (
            ServiceSpec {
                task: TaskTemplate {
                    command: vec![],
                    ..spec("x", &[], &[]).task
                },
                ..spec("x", &[], &[])
            },
            "a command is required",
        ),
    ];
    let before = s.clone();
    for (spec, want) in cases {
        let err = create(&mut s, "sx", spec).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
    assert_eq!(s, before, "a refused create changed the state");
}

#[test]
fn updates_need_the_current_version_and_keep_what_still_applies() {
    let mut s = init();
    network(&mut s, "n1", "front").unwrap();
    network(&mut s, "n2", "back").unwrap();
    let web = create(
        &mut s,
        "s1",
        spec("web", &["front"], &[(80, Some(8080)), (443, None)]),
    )
    .unwrap();
    create(&mut s, "s2", spec("db", &["back"], &[(5432, Some(5432))])).unwrap();
    let update = |s: &mut State, version, spec| {
        s.apply(&Command::UpdateService {
            target: "web".into(),
            version,
            spec,
        })
    };
    // A stale version is refused with both numbers.
    let err = update(&mut s, 0, spec("web", &["front"], &[])).unwrap_err();
    assert!(err.to_string().contains("(version 1, you sent 0)"), "{err}");
    // Moving 8080 to 8081, adding a network: the auto port and the front VIP stay.
    let Outcome::Service(v2) = update(
        &mut s,
        1,
        spec("web", &["front", "back"], &[(80, Some(8081)), (443, None)]),
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(v2.version, 2);
    assert_eq!(
        v2.ports
            .iter()
            .map(|p| p.published.unwrap())
            .collect::<Vec<_>>(),
        vec![8081, 30000]
    );
    assert_eq!(v2.vips[0], web.vips[0]);
    assert_eq!(v2.previous.as_ref().unwrap(), &web.spec);
    // 8080 is free again; a clash with db's port is refused and changes nothing.
    create(&mut s, "s3", spec("other", &[], &[(1, Some(8080))])).unwrap();
    let before = s.clone();
    let err = update(&mut s, 2, spec("web", &["front"], &[(80, Some(5432))])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "published port 5432/tcp is already used by service db"
    );
    assert_eq!(s, before);
}

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

/// A request applies once: the retry of a write whose first attempt
/// committed unseen is answered "already applied", and changes nothing.
/// A create retried by hand finds "already exists, same spec".
#[test]
fn a_request_applies_once_and_a_same_spec_create_says_so() {
    let mut s = init();
    let create = Command::CreateNetwork {
        id: "n1".into(),
        spec: NetworkSpec {
            name: "front".into(),
            ..NetworkSpec::default()
        },
    };
    let once = Command::Once {
        request: "r1".into(),
        write: Box::new(create.clone()),
    };
    assert!(matches!(s.apply(&once).unwrap(), Outcome::Network(_)));
    let after = serde_json::to_vec(&s).unwrap();
    assert_eq!(s.apply(&once).unwrap(), Outcome::AlreadyApplied);
    assert_eq!(serde_json::to_vec(&s).unwrap(), after);
    assert!(matches!(s.outcome_of(&create), Outcome::Network(n) if n.id == "n1"));
    // The request log survives a snapshot.
    let mut copy: State = serde_json::from_slice(&after).unwrap();
    copy.reindex().unwrap();
    assert_eq!(copy.apply(&once).unwrap(), Outcome::AlreadyApplied);
    // A new request with the same spec: not a conflict, but named.
    let err = s
        .apply(&Command::CreateNetwork {
            id: "n2".into(),
            spec: NetworkSpec {
                name: "front".into(),
                ..NetworkSpec::default()
            },
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("already exists, with the same spec (id n1)"),
        "{err}"
    );
    // A refused request is not recorded: it can be retried.
    let bad = Command::Once {
        request: "r2".into(),
        write: Box::new(Command::RemoveNetwork {
            target: "nope".into(),
        }),
    };
    assert!(s.apply(&bad).is_err());
    assert!(!s.requests.contains("r2"));
    // The log is bounded, oldest out first.
    let mut r = RecentRequests::default();
    for i in 0..RecentRequests::CAPACITY + 2 {
        r.insert(&i.to_string());
    }
    assert!(!r.contains("0") && !r.contains("1") && r.contains("2"));
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

/// Equality sees every persisted field: it once ignored these four,
/// so replicas diverging in them compared equal.
#[test]
fn state_equality_covers_every_persisted_field() {
    let base = init();
    let mut changed: Vec<(&str, State)> = Vec::new();
    let mut s = base.clone();
    s.removed.insert("gone".into());
    changed.push(("removed", s));
    let mut s = base.clone();
    s.task_seq += 1;
    changed.push(("task_seq", s));
    let mut s = base.clone();
    s.secrets = Some(ClusterSecrets::default());
    changed.push(("secrets", s));
    let mut s = base.clone();
    s.network_keys.push(NetworkKey {
        id: 1,
        secret: vec![0; 20],
        created_ms: 0,
    });
    changed.push(("network_keys", s));
    for (field, s) in changed {
        assert_ne!(s, base, "{field} is not compared");
    }
    assert_eq!(base.clone(), base);
}

#[test]
fn replicas_and_snapshots_agree() {
    let log = vec![
        Command::Init {
            cluster_id: "c".into(),
            ingress_id: "ing".into(),
            settings: ClusterSettings::default(),
            secrets: None,
        },
        Command::AddNode {
            id: "n".into(),
            hostname: "h".into(),
            addr: Ipv4Addr::new(198, 18, 0, 1),
            api_addr: None,
            role: Role::Manager,
            underlay: Vec::new(),
        },
        Command::CreateNetwork {
            id: "n1".into(),
            spec: NetworkSpec {
                name: "front".into(),
                ..NetworkSpec::default()
            },
        },
        Command::CreateService {
            id: "s1".into(),
            spec: spec("web", &["front"], &[(80, None)]),
        },
        Command::CreateTask {
            id: "t1".into(),
            service: "s1".into(),
            slot: 1,
            node: "n".into(),
            netns: None,
        },
        Command::CreateService {
            id: "s2".into(),
            spec: spec("api", &["front"], &[(81, None)]),
        },
        Command::RemoveService {
            target: "web".into(),
        },
    ];
    let mut a = State::default();
    let mut b = State::default();
    for c in &log {
        assert_eq!(a.apply(c), b.apply(c));
    }
    assert_eq!(a, b);
    // A snapshot round trip, then the same next command on both.
    let mut restored: State = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
    restored.reindex().unwrap();
    assert_eq!(restored, a);
    let next = Command::CreateService {
        id: "s3".into(),
        spec: spec("new", &["front"], &[(82, None)]),
    };
    let (x, y) = (a.apply(&next).unwrap(), restored.apply(&next).unwrap());
    assert_eq!(
        x, y,
        "the restored allocators hand out what the originals do"
    );
    let Outcome::Service(svc) = x else { panic!() };
    assert_eq!(
        svc.ports[0].published,
        Some(30000),
        "web's port was freed and is reused"
    );
}
