//! The state machine's unit tests: one per command family, plus equality
//! and replay.

use super::*;

mod networks;
mod nodes;
mod services;
mod tasks;

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
