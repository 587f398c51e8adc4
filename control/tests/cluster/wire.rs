//! gRPC request decoding, fuzzed through a live manager: every unary call
//! of the Cluster, Member and Join services gets random and mutated
//! protobuf bodies (typed messages with random field values, enum values
//! outside their range, missing required messages; and those encodings
//! with bytes flipped, cut short or padded), on an authenticated
//! connection.
//! Each is answered with a status a client can act on; none panics a
//! handler (which would surface as a reset stream: Unknown, Internal or
//! Unavailable), and the manager keeps serving. The manager-to-manager
//! calls (Raft, Propose, AddManager) are left out: they decode openraft's
//! types and `Command`s, covered by the state-machine properties.

use super::*;
use prost::Message as _;
use std::collections::BTreeMap;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

/// Bytes in, bytes out: the body goes on the wire as given.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf as _;
        let n = buf.remaining();
        Ok(Some(buf.copy_to_bytes(n).to_vec()))
    }
}

/// splitmix64: a seeded, reproducible stream (MESH_FUZZ_SEED).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `valid`: flips, a cut, padding, or noise.
fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut b = valid.to_vec();
    match rng.below(5) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
            }
        }
        1 => b.truncate(rng.below(b.len() + 1)),
        2 => b.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        3 => b = (0..rng.below(256)).map(|_| rng.next() as u8).collect(),
        // A varint length far past the end, then nothing.
        _ => b = vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
    }
    b
}

/// An enum value: mostly a defined one, sometimes unspecified or out of
/// range.
fn enum_value(rng: &mut Rng, defined: i32) -> i32 {
    match rng.below(8) {
        0 => 0,
        1 => [-1, defined + 1, i32::MAX][rng.below(3)],
        _ => rng.below(defined as usize + 1) as i32,
    }
}

/// Sometimes absent.
fn maybe<T>(rng: &mut Rng, f: impl FnOnce(&mut Rng) -> T) -> Option<T> {
    (rng.below(5) != 0).then(|| f(rng))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutated_grpc_bodies_are_refused_cleanly_and_the_manager_keeps_serving() {
    let c = Cluster::start("wire", 1, 0).await;
    let mut api = client(&c.dirs[0].0, c.api(0));
    create_service(&mut api, "web").await;
    let creds = Credentials::load(&daemon::certs_dir(&c.dirs[0].0)).unwrap();
    let channel = tls::channel(
        c.api(0),
        Trust::Node(Arc::new(RwLock::new(creds))),
        Duration::from_secs(10),
    )
    .unwrap();
    let seed = std::env::var("MESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d65_7368u64);
    let per_call: usize = std::env::var("MESH_FUZZ_GRPC")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let mut rng = Rng(seed);
    let node_id = c.node(0).ctx.node_id.clone();
    // Field values that have broken parsers elsewhere: empty, huge,
    // control characters, prefixes of real ids, near-miss names.
    let pool: Vec<String> = vec![
        String::new(),
        "web".into(),
        "w".into(),
        node_id[..4].into(),
        node_id.clone(),
        "host1".into(),
        "Bad_Name".into(),
        "web\n".into(),
        "\u{0}".into(),
        "ö".repeat(100),
        "x".repeat(70_000),
        "../../etc".into(),
        "manager".into(),
        "worker".into(),
        "-1".into(),
        "10.0.0.0/8".into(),
        c.report.worker_token.clone(),
    ];
    let token = c.report.worker_token.clone();
    // Each call: a body built from random field values (structure kept).
    type Make<'a> = Box<dyn Fn(&mut Rng) -> Vec<u8> + 'a>;
    let pick = |rng: &mut Rng| pool[rng.below(pool.len())].clone();
    // The bodies several calls share, one maker per use.
    let empty = || -> Make { Box::new(|_| Empty {}.encode_to_vec()) };
    let by_ref = || -> Make { Box::new(move |rng| Ref { target: pick(rng) }.encode_to_vec()) };
    let remove = |random_force: bool| -> Make {
        Box::new(move |rng| {
            Remove {
                target: pick(rng),
                force: random_force && rng.below(2) == 0,
            }
            .encode_to_vec()
        })
    };
    let network_spec = |rng: &mut Rng| proto::NetworkSpec {
        name: pick(rng),
        subnet: maybe(rng, |rng| {
            ["10.9.0.0/24", "10.9.0.1/24", "300.0.0.0/8", ""][rng.below(4)].into()
        }),
        encrypted: rng.below(2) == 0,
        internal: rng.below(2) == 0,
        attachable: rng.below(2) == 0,
    };
    let service_spec = |rng: &mut Rng| {
        let mut spec = proto::ServiceSpec::from(service("api"));
        spec.name = pick(rng);
        spec.mode = maybe(rng, |rng| proto::ServiceMode {
            mode: maybe(rng, |rng| {
                proto::service_mode::Mode::Replicated(proto::ReplicatedMode {
                    replicas: [0, 1, 3, u32::MAX][rng.below(4)],
                })
            }),
        });
        if rng.below(3) == 0 {
            spec.task = None;
        }
        spec.endpoint = maybe(rng, |rng| proto::EndpointSpec {
            mode: enum_value(rng, 1),
            ports: (0..rng.below(3))
                .map(|_| proto::PortConfig {
                    protocol: enum_value(rng, 2),
                    target: [0, 80, 65_535, 65_536, u32::MAX][rng.below(5)],
                    published: maybe(rng, |rng| [0, 30_000, 70_000][rng.below(3)]),
                    mode: enum_value(rng, 1),
                })
                .collect(),
        });
        spec.update = maybe(rng, |rng| proto::UpdateConfig {
            parallelism: rng.below(3) as u32,
            failure_action: enum_value(rng, 2),
            order: enum_value(rng, 1),
            ..Default::default()
        });
        spec
    };
    let update: Make = Box::new(move |rng| {
        proto::UpdateServiceRequest {
            target: pick(rng),
            version: [0, 1, 2, u64::MAX][rng.below(4)],
            spec: maybe(rng, |rng| service_spec(rng)),
        }
        .encode_to_vec()
    });
    let calls: Vec<(&str, Make)> = vec![
        ("/mesh.v1.Cluster/Info", empty()),
        ("/mesh.v1.Cluster/ListNodes", empty()),
        ("/mesh.v1.Cluster/InspectNode", by_ref()),
        (
            "/mesh.v1.Cluster/UpdateNode",
            Box::new(|rng| {
                proto::UpdateNodeRequest {
                    target: pick(rng),
                    version: rng.below(3) as u64,
                    spec: maybe(rng, |rng| proto::NodeSpec {
                        role: enum_value(rng, 2),
                        availability: enum_value(rng, 3),
                        labels: [(pick(rng), pick(rng))].into(),
                    }),
                }
                .encode_to_vec()
            }),
        ),
        (
            "/mesh.v1.Cluster/SetRole",
            Box::new(|rng| {
                SetRoleRequest {
                    target: pick(rng),
                    role: enum_value(rng, 2),
                }
                .encode_to_vec()
            }),
        ),
        (
            "/mesh.v1.Cluster/RemoveNode",
            Box::new(|rng| {
                Remove {
                    target: format!("{}x", pick(rng)),
                    force: false,
                }
                .encode_to_vec()
            }),
        ),
        (
            "/mesh.v1.Cluster/CreateNetwork",
            Box::new(move |rng| network_spec(rng).encode_to_vec()),
        ),
        ("/mesh.v1.Cluster/ListNetworks", empty()),
        ("/mesh.v1.Cluster/InspectNetwork", by_ref()),
        ("/mesh.v1.Cluster/RemoveNetwork", remove(true)),
        (
            "/mesh.v1.Cluster/CreateService",
            Box::new(move |rng| service_spec(rng).encode_to_vec()),
        ),
        ("/mesh.v1.Cluster/ListServices", empty()),
        ("/mesh.v1.Cluster/InspectService", by_ref()),
        ("/mesh.v1.Cluster/UpdateService", update),
        ("/mesh.v1.Cluster/RollbackService", by_ref()),
        ("/mesh.v1.Cluster/RemoveService", remove(false)),
        ("/mesh.v1.Cluster/ServiceLogs", by_ref()),
        ("/mesh.v1.Cluster/ListTasks", by_ref()),
        (
            "/mesh.v1.Cluster/CreateTask",
            Box::new(|rng| {
                proto::CreateTaskRequest {
                    service: pick(rng),
                    node: pick(rng),
                    slot: [0, 1, u32::MAX][rng.below(3)],
                    netns: maybe(rng, |rng| pick(rng)),
                }
                .encode_to_vec()
            }),
        ),
        ("/mesh.v1.Cluster/RemoveTask", by_ref()),
        ("/mesh.v1.Cluster/Progress", empty()),
        (
            "/mesh.v1.Cluster/JoinToken",
            Box::new(|rng| {
                JoinTokenRequest {
                    role: enum_value(rng, 2),
                    rotate: false,
                }
                .encode_to_vec()
            }),
        ),
        ("/mesh.v1.Cluster/UnlockKey", empty()),
        ("/mesh.v1.Member/Whoami", empty()),
        (
            "/mesh.v1.Member/Renew",
            Box::new(|rng| proto::RenewRequest { csr: pick(rng) }.encode_to_vec()),
        ),
        ("/mesh.v1.Member/TaskLogs", by_ref()),
        (
            "/mesh.v1.Join/Join",
            Box::new(|rng| {
                proto::JoinRequest {
                    token: if rng.below(2) == 0 {
                        token.clone()
                    } else {
                        pick(rng)
                    },
                    csr: pick(rng),
                    hostname: pick(rng),
                    addr: ["198.18.9.9", "0.0.0.0", "x", "255.255.255.255"][rng.below(4)].into(),
                    api_addr: pick(rng),
                    underlay: (0..rng.below(3)).map(|_| pick(rng)).collect(),
                }
                .encode_to_vec()
            }),
        ),
    ];
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    for (path, make) in &calls {
        for i in 0..per_call {
            // Half keep the message's structure (random field values),
            // half are those bytes mutated.
            let body = make(&mut rng);
            let body = if i % 2 == 0 {
                body
            } else {
                mutate(&mut rng, &body)
            };
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.expect("the manager's connection");
            let reply = grpc
                .unary(
                    tonic::Request::new(body.clone()),
                    PathAndQuery::from_static(path),
                    Raw,
                )
                .await;
            let code = match reply {
                Ok(_) => tonic::Code::Ok,
                Err(s) => {
                    // A body that is not protobuf is INTERNAL by gRPC's
                    // own table (statuscodes.md), with prost's reason.
                    let undecodable = s.code() == tonic::Code::Internal
                        && s.message().starts_with("failed to decode Protobuf message");
                    // Answered by the manager, not a transport failure (a
                    // reset stream, a closed connection).
                    assert!(
                        std::error::Error::source(&s).is_none(),
                        "{path} (seed {seed}): no answer from the manager: {s:?}"
                    );
                    assert!(
                        undecodable
                            || !matches!(
                                s.code(),
                                tonic::Code::Unknown
                                    | tonic::Code::Internal
                                    | tonic::Code::Unavailable
                            ),
                        "{path} with body {body:02x?} (seed {seed}): {s:?}"
                    );
                    s.code()
                }
            };
            *answered.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    // Still serving, and still itself.
    let nodes = client(&c.dirs[0].0, c.api(0))
        .list_nodes(Empty {})
        .await
        .expect("the manager still answers");
    assert_eq!(nodes.into_inner().nodes.len(), 1);
    eprintln!(
        "grpc fuzz: {} calls over {} methods in {} ms (seed {seed}), answers {answered:?}",
        calls.len() * per_call,
        calls.len(),
        started.elapsed().as_millis()
    );
}
