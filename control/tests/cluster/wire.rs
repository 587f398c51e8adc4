//! gRPC request decoding, fuzzed through a live manager: every unary call
//! of the Cluster, Node and Join services gets random and mutated protobuf
//! bodies (valid encodings with bytes flipped, cut short or padded, and
//! valid envelopes around mutated JSON), on an authenticated connection.
//! Each is answered with a status a client can act on; none panics a
//! handler (which would surface as a reset stream: Unknown, Internal or
//! Unavailable), and the manager keeps serving. The manager-to-manager
//! calls (Raft, Propose, AddManager) are left out: they decode openraft's
//! types and `Command` JSON, covered by the state-machine properties.

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

/// A valid JSON document for the calls that carry one, mutated.
fn json_body(rng: &mut Rng, doc: &serde_json::Value) -> Vec<u8> {
    let text = serde_json::to_vec(doc).unwrap();
    let json = if rng.below(2) == 0 {
        mutate(rng, &text)
    } else {
        text
    };
    proto::Blob { json }.encode_to_vec()
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
    let network =
        serde_json::json!({"name": "blue", "subnet": "10.9.0.0/24", "labels": {"a": "b"}});
    let service = serde_json::to_value(service("api")).unwrap();
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
    let spec = serde_json::to_vec(&service).unwrap();
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
    let update: Make = Box::new(|rng| {
        proto::Update {
            target: pick(rng),
            version: [0, 1, 2, u64::MAX][rng.below(4)],
            spec: if rng.below(2) == 0 {
                mutate(rng, &spec)
            } else {
                spec.clone()
            },
        }
        .encode_to_vec()
    });
    let blob = |doc: serde_json::Value| -> Make { Box::new(move |rng| json_body(rng, &doc)) };
    let calls: Vec<(&str, Make)> = vec![
        ("/mesh.v1.Cluster/Info", empty()),
        ("/mesh.v1.Cluster/ListNodes", empty()),
        ("/mesh.v1.Cluster/InspectNode", by_ref()),
        (
            "/mesh.v1.Cluster/UpdateNode",
            Box::new(|rng| {
                proto::Update {
                    target: pick(rng),
                    version: rng.below(3) as u64,
                    spec: mutate(
                        rng,
                        br#"{"role":"worker","availability":"active","labels":{}}"#,
                    ),
                }
                .encode_to_vec()
            }),
        ),
        (
            "/mesh.v1.Cluster/SetRole",
            Box::new(|rng| {
                SetRoleRequest {
                    target: pick(rng),
                    role: pick(rng),
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
        ("/mesh.v1.Cluster/CreateNetwork", blob(network)),
        ("/mesh.v1.Cluster/ListNetworks", empty()),
        ("/mesh.v1.Cluster/InspectNetwork", by_ref()),
        ("/mesh.v1.Cluster/RemoveNetwork", remove(true)),
        ("/mesh.v1.Cluster/CreateService", blob(service.clone())),
        ("/mesh.v1.Cluster/ListServices", empty()),
        ("/mesh.v1.Cluster/InspectService", by_ref()),
        ("/mesh.v1.Cluster/UpdateService", update),
        ("/mesh.v1.Cluster/RemoveService", remove(false)),
        ("/mesh.v1.Cluster/ServiceLogs", by_ref()),
        ("/mesh.v1.Cluster/ListTasks", by_ref()),
        ("/mesh.v1.Cluster/Progress", empty()),
        (
            "/mesh.v1.Cluster/JoinToken",
            Box::new(|rng| {
                JoinTokenRequest {
                    role: pick(rng),
                    rotate: false,
                }
                .encode_to_vec()
            }),
        ),
        ("/mesh.v1.Cluster/UnlockKey", empty()),
        ("/mesh.v1.Node/Whoami", empty()),
        (
            "/mesh.v1.Node/Renew",
            Box::new(|rng| proto::RenewRequest { csr: pick(rng) }.encode_to_vec()),
        ),
        ("/mesh.v1.Node/TaskLogs", by_ref()),
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
    assert!(!nodes.into_inner().json.is_empty());
    eprintln!(
        "grpc fuzz: {} calls over {} methods in {} ms (seed {seed}), answers {answered:?}",
        calls.len() * per_call,
        calls.len(),
        started.elapsed().as_millis()
    );
}
