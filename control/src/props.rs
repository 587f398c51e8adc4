//! Property tests of the state machine: random command sequences (nodes,
//! networks, services with VIPs and published ports, tasks, removals,
//! status reports, batches, retried requests) applied to a [`State`] keep
//! its invariants:
//!
//! - no address is handed out twice on a network (task addresses, VIPs,
//!   nodes' load-balancer addresses, the gateway), and no published port
//!   twice;
//! - a refused command leaves the serialized state byte-identical;
//! - a snapshot (serialized, loaded, reindexed) equals the state, and
//!   goes on equal to it under the same commands;
//! - replaying the log from scratch gives the same bytes;
//! - the tables kept from each command's touches equal a full derivation;
//! - every record comes back from its wire message (`proto::convert`) as
//!   it went.
//!
//! `PROPTEST_CASES` sets how many sequences run (default 64 here; the
//! fuzz command runs more).

use std::{collections::BTreeSet, net::Ipv4Addr};

use proptest::prelude::*;

use crate::state::*;

fn init() -> Command {
    Command::Init {
        cluster_id: "c1".into(),
        ingress_id: "ing".into(),
        settings: ClusterSettings {
            // A small pool and small subnets: collisions are likely.
            address_pool: "10.9.0.0/22".parse().expect("valid"),
            subnet_size: 26,
            ..ClusterSettings::default()
        },
        secrets: None,
    }
}

const NODES: [&str; 3] = ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc"];
const NETS: [&str; 3] = ["red", "blue", "green"];
const SERVICES: [&str; 4] = ["web", "db", "cache", "api"];

fn service_spec(name: &str, nets: &[&str], port: Option<u16>, replicas: u32) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: ServiceMode::Replicated { replicas },
        task: TaskTemplate {
            command: vec!["/bin/true".into()],
            env: vec![],
            networks: nets
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
            ports: port
                .map(|p| PortConfig {
                    protocol: Protocol::Tcp,
                    target: 80,
                    published: Some(p),
                    mode: PublishMode::Ingress,
                })
                .into_iter()
                .collect(),
        },
        update: UpdateConfig::default(),
        rollback: UpdateConfig::default(),
    }
}

/// One random command, over a small universe of names so that they meet.
fn command() -> impl Strategy<Value = Command> {
    let node = prop::sample::select(NODES.to_vec());
    let net = prop::sample::select(NETS.to_vec());
    let svc = prop::sample::select(SERVICES.to_vec());
    let task = (0u8..12).prop_map(|i| format!("t{i}"));
    let port = prop::option::of(prop::sample::select(vec![8080u16, 8081, 8082]));
    prop_oneof![
        1 => (node.clone(), 1u8..6).prop_map(|(id, last)| Command::AddNode {
            id: id.into(),
            hostname: format!("host-{}", &id[..1]),
            addr: Ipv4Addr::new(198, 18, 0, last),
            api_addr: None,
            role: Role::Worker,
            underlay: vec![],
        }),
        1 => (node.clone(), any::<bool>()).prop_map(|(id, force)| Command::RemoveNode {
            id: id.into(),
            force,
        }),
        1 => (node.clone(), any::<bool>()).prop_map(|(id, down)| Command::SetNodeStatus {
            id: id.into(),
            status: if down { NodeStatus::Down } else { NodeStatus::Ready },
        }),
        1 => (node.clone(), prop::collection::vec(prop::sample::select(vec!["10.0.0.0/24", "10.0.1.0/24", "198.18.0.0/24", "172.16.0.0/12"]), 0..3))
            .prop_map(|(id, p)| Command::SetNodeUnderlay {
                id: id.into(),
                underlay: p.iter().map(|p| p.parse().unwrap()).collect(),
            }),
        1 => net.clone().prop_map(|n| Command::CreateNetwork {
            id: format!("net-{n}"),
            spec: NetworkSpec {
                name: n.into(),
                ..NetworkSpec::default()
            },
        }),
        1 => net.clone().prop_map(|n| Command::RemoveNetwork { target: n.into() }),
        1 => (svc.clone(), prop::sample::subsequence(NETS.to_vec(), 0..3), port.clone(), 0u32..4)
            .prop_map(|(s, nets, port, replicas)| Command::CreateService {
                id: format!("svc-{s}"),
                spec: service_spec(s, &nets, port, replicas),
            }),
        1 => (svc.clone(), prop::sample::subsequence(NETS.to_vec(), 0..3), port, 0u32..4, 0u64..4)
            .prop_map(|(s, nets, port, replicas, version)| Command::UpdateService {
                target: s.into(),
                version,
                spec: service_spec(s, &nets, port, replicas),
            }),
        1 => svc.clone().prop_map(|s| Command::RemoveService { target: s.into() }),
        4 => (task.clone(), svc, 1u32..4, node).prop_map(|(id, s, slot, n)| Command::CreateTask {
            id,
            service: format!("svc-{s}"),
            slot,
            node: n.into(),
            netns: None,
        }),
        1 => task.clone().prop_map(|id| Command::RemoveTask { id }),
        1 => task.clone().prop_map(|id| Command::ShutdownTask { id }),
        1 => (task, prop::sample::select(vec![
            TaskState::Starting,
            TaskState::Running,
            TaskState::Complete,
            TaskState::Failed,
        ]))
        .prop_map(|(id, observed)| Command::SetTaskStatus {
            id,
            observed,
            netns: None,
            exit_code: None,
            error: Some("x".repeat(5000)),
            at_ms: 1,
        }),
    ]
}

/// Commands, some in batches, some as retried requests.
fn commands() -> impl Strategy<Value = Vec<Command>> {
    let one = prop_oneof![
        6 => command(),
        1 => prop::collection::vec(command(), 0..4).prop_map(|commands| Command::Batch { commands }),
        1 => (0u8..4, command()).prop_map(|(r, c)| Command::Once {
            request: format!("req-{r}"),
            write: Box::new(c),
        }),
    ];
    prop::collection::vec(one, 1..60)
}

/// The state as a snapshot holds it.
fn bytes(s: &State) -> Vec<u8> {
    crate::codec::encode(s).expect("the state serializes")
}

/// No address twice on a network, no published port twice.
fn check_unique(s: &State) -> Result<(), String> {
    let mut taken: BTreeSet<(String, Ipv4Addr)> = BTreeSet::new();
    let mut take = |net: &str, addr: Ipv4Addr, what: String| {
        if taken.insert((net.to_owned(), addr)) {
            Ok(())
        } else {
            Err(format!("{addr} on {net} handed out twice ({what})"))
        }
    };
    for n in s.networks.values() {
        take(&n.id, n.gateway, "gateway".into())?;
        if !n.subnet.contains(n.gateway) {
            return Err(format!("gateway {} outside {}", n.gateway, n.subnet));
        }
    }
    for t in s.tasks.values() {
        for a in &t.attachments {
            if t.ended() {
                continue;
            }
            take(&a.network, a.addr, format!("task {}", t.id))?;
        }
    }
    for svc in s.services.values() {
        for v in &svc.vips {
            take(&v.network, v.addr, format!("VIP of {}", svc.id))?;
        }
    }
    for node in s.nodes.values() {
        for (net, addr) in &node.lb_addrs {
            take(net, *addr, format!("node {}", node.id))?;
        }
    }
    let mut ports = BTreeSet::new();
    for svc in s.services.values() {
        for p in &svc.ports {
            if let Some(published) = p.published
                && p.mode == PublishMode::Ingress
                && !ports.insert((published, p.protocol))
            {
                return Err(format!("published port {published} twice"));
            }
        }
    }
    Ok(())
}

/// Each node, network, service and task of `s` through its wire message
/// and back.
fn wire_round_trip(s: &State) -> Result<(), String> {
    fn back<M, P>(m: &M) -> Result<(), String>
    where
        M: Clone + PartialEq + std::fmt::Debug + TryFrom<P, Error = proto::WireError>,
        P: From<M>,
    {
        let again = M::try_from(P::from(m.clone())).map_err(|e| format!("{m:?}: {e}"))?;
        if &again == m {
            Ok(())
        } else {
            Err(format!("{m:?} came back as {again:?}"))
        }
    }
    for n in s.nodes.values() {
        back::<_, proto::Node>(n)?;
    }
    for n in s.networks.values() {
        back::<_, proto::Network>(n)?;
    }
    for svc in s.services.values() {
        back::<_, proto::Service>(svc)?;
    }
    for t in s.tasks.values() {
        back::<_, proto::Task>(t)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_command_sequences_keep_the_state_invariants(log in commands()) {
        let mut s = State::default();
        s.apply(&init()).expect("init");
        let mut applied = vec![init()];
        // A cluster to work on: nodes, networks, services; the random
        // commands then meet things that exist.
        let setup: Vec<Command> = NODES
            .iter()
            .enumerate()
            .map(|(i, id)| Command::AddNode {
                id: (*id).into(),
                hostname: format!("node-{i}"),
                addr: Ipv4Addr::new(198, 18, 1, i as u8 + 1),
                api_addr: None,
                role: Role::Worker,
                underlay: vec![],
            })
            .chain(NETS[..2].iter().map(|n| Command::CreateNetwork {
                id: format!("net-{n}"),
                spec: NetworkSpec { name: (*n).into(), ..NetworkSpec::default() },
            }))
            .chain([
                Command::CreateService { id: "svc-web".into(), spec: service_spec("web", &["red", "blue"], Some(8080), 3) },
                Command::CreateService { id: "svc-db".into(), spec: service_spec("db", &["red"], None, 1) },
            ])
            .collect();
        for cmd in &setup {
            s.apply(cmd).expect("the setup applies");
            applied.push(cmd.clone());
        }
        // The tables, kept incrementally from what each command touches
        // (Command::touches), must equal a full derivation after every
        // command: a node fed the deltas misses nothing.
        let mut book = crate::tables::Book::new(0);
        // A node's replica, fed only the deltas.
        let mut replica = crate::tables::derive(&s, 0);
        for (i, cmd) in log.iter().enumerate() {
            let before = bytes(&s);
            let touched = crate::tables::Touched::before(&s, cmd);
            let result = s.apply(cmd);
            if result.is_ok()
                && let Some(d) = book.update(&s, touched, i as u64 + 1)
            {
                prop_assert_eq!(replica.apply(&d), Ok(true));
            }
            prop_assert_eq!(
                &replica.entries,
                &crate::tables::derive(&s, 0).entries,
                "after command {} ({:?}): the deltas' tables differ from a full derivation", i, cmd
            );
            match result {
                Ok(_) => applied.push(cmd.clone()),
                Err(e) => prop_assert_eq!(
                    &bytes(&s), &before,
                    "command {} ({:?}) was refused ({}) but changed the state", i, cmd, e
                ),
            }
            if let Err(e) = check_unique(&s) {
                prop_assert!(false, "after command {} ({:?}): {}", i, cmd, e);
            }
            for t in s.tasks.values() {
                prop_assert!(
                    t.error.as_ref().is_none_or(|e| e.len() <= REPORT_MAX),
                    "an unbounded report"
                );
            }
        }
        // Every record, as the API sends it and a client reads it back
        // (proto::convert), is itself: the typed API loses nothing.
        prop_assert_eq!(wire_round_trip(&s), Ok(()));
        // A snapshot: loaded and reindexed, it is the state.
        let mut snap: State = crate::codec::decode(&bytes(&s)).expect("the snapshot loads");
        snap.reindex().expect("the snapshot reindexes");
        prop_assert!(snap == s, "the snapshot differs from the state");
        // And stays so under the same commands.
        for cmd in log.iter().take(10) {
            let (a, b) = (s.apply(cmd).map_err(|e| e.to_string()), snap.apply(cmd).map_err(|e| e.to_string()));
            prop_assert_eq!(a.is_ok(), b.is_ok(), "{:?}: {:?} vs {:?}", cmd, a, b);
            prop_assert_eq!(bytes(&s), bytes(&snap));
        }
        // The tables as a session carries them to an agent.
        let tables = book.tables(&s);
        let carried: model::tables::Tables = crate::codec::decode(&crate::codec::encode(&tables).unwrap())
            .expect("the tables decode");
        prop_assert!(carried == tables, "the tables changed on the way");
        // The log, as its entries are stored and replicated, replayed from
        // nothing gives the same bytes.
        let mut replay = State::default();
        for cmd in &applied {
            let stored = crate::codec::encode(cmd).expect("a command encodes");
            let cmd: Command = crate::codec::decode(&stored).expect("a stored command decodes");
            replay.apply(&cmd).expect("an applied command applies again");
        }
        for cmd in log.iter().take(10) {
            let _ = replay.apply(cmd);
        }
        prop_assert_eq!(bytes(&replay), bytes(&s));
    }
}

/// A valid body with `flips` bytes replaced: what a broken or hostile
/// peer may send as a manager-internal body (see `codec`).
fn mutated(json: &[u8], flips: &[(usize, u8)]) -> Vec<u8> {
    let mut b = json.to_vec();
    for &(at, v) in flips {
        if !b.is_empty() {
            let i = at % b.len();
            b[i] = v;
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    /// Bodies as managers and agents decode them (postcard commands, specs
    /// and session messages):
    /// arbitrary or mutated bytes never panic the decoder, and a service
    /// or network spec that decodes is applied whole or refused with the
    /// state untouched.
    #[test]
    fn mutated_request_bodies_decode_or_fail_and_never_half_apply(
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        noise in prop::collection::vec(any::<u8>(), 0..200),
        replicas in 0u32..5,
    ) {
        let _ = crate::codec::decode::<Command>(&noise);
        let _ = crate::codec::decode::<ServiceSpec>(&noise);
        let _ = crate::codec::decode::<model::session::DispatcherMessage>(&noise);
        let _ = crate::codec::decode::<model::session::AgentMessage>(&noise);
        let mut s = State::default();
        s.apply(&init()).unwrap();
        s.apply(&Command::CreateNetwork {
            id: "net-red".into(),
            spec: NetworkSpec { name: "red".into(), ..NetworkSpec::default() },
        }).unwrap();
        let spec = crate::codec::encode(&service_spec("web", &["red"], Some(8080), replicas)).unwrap();
        if let Ok(spec) = crate::codec::decode::<ServiceSpec>(&mutated(&spec, &flips)) {
            let before = bytes(&s);
            if s.apply(&Command::CreateService { id: "svc-x".into(), spec }).is_err() {
                prop_assert_eq!(bytes(&s), before);
            }
            prop_assert!(check_unique(&s).is_ok());
        }
        let net = crate::codec::encode(&NetworkSpec { name: "blue".into(), ..NetworkSpec::default() }).unwrap();
        if let Ok(spec) = crate::codec::decode::<NetworkSpec>(&mutated(&net, &flips)) {
            let before = bytes(&s);
            if s.apply(&Command::CreateNetwork { id: "net-x".into(), spec }).is_err() {
                prop_assert_eq!(bytes(&s), before);
            }
            prop_assert!(check_unique(&s).is_ok());
        }
        let cmd = crate::codec::encode(&Command::RemoveService { target: "web".into() }).unwrap();
        if let Ok(cmd) = crate::codec::decode::<Command>(&mutated(&cmd, &flips)) {
            let before = bytes(&s);
            if s.apply(&cmd).is_err() {
                prop_assert_eq!(bytes(&s), before);
            }
        }
    }

    /// Join tokens: no text panics the parser, and one it accepts prints
    /// back as itself.
    #[test]
    fn join_tokens_parse_or_fail_and_round_trip(
        text in prop_oneof![
            ".{0,120}",
            "MESH-1-[0-9a-f]{60,68}-[0-9a-zA-Z]{0,40}",
        ],
    ) {
        if let Ok(t) = text.parse::<crate::ca::pki::JoinToken>() {
            prop_assert_eq!(t.to_string(), text);
        }
    }
}
