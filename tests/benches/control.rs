//! Section (d): committed control-plane writes. Three managers (in this
//! process, on loopback, real gRPC over mTLS, each with its own redb store
//! that fsyncs every commit) take `CreateService` calls from 1 and from 64
//! concurrent clients. The baseline is the disk itself: sequential fsync'd
//! redb commits of one record, the ceiling for an unbatched writer.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use control::{
    ca::pki,
    ca::tls::{self, Credentials, Trust},
    daemon::{self, Addresses, Daemon, InitOptions},
    state::{ServiceMode, ServiceSpec, TaskTemplate},
};
use proto::cluster_client::ClusterClient;
use tonic::transport::Channel;

const RUN: Duration = Duration::from_secs(5);

pub fn addresses(i: u8) -> Addresses {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    Addresses {
        hostname: format!("bench-{i}"),
        addr: Ipv4Addr::new(198, 18, 9, i),
        listen_addr: listen,
        api_addr: listen.to_string(),
        underlay: Vec::new(),
    }
}

fn spec(name: String) -> proto::ServiceSpec {
    proto::ServiceSpec::from(ServiceSpec {
        name,
        mode: ServiceMode::Replicated { replicas: 0 },
        task: TaskTemplate {
            command: vec!["/usr/sbin/nginx".into(), "-g".into(), "daemon off;".into()],
            env: vec!["MODE=bench".into()],
            ..TaskTemplate::default()
        },
        endpoint: Default::default(),
        update: Default::default(),
        rollback: Default::default(),
    })
}

fn client(dir: &Path, addr: &str) -> ClusterClient<Channel> {
    let creds = Credentials::load(&daemon::certs_dir(dir)).unwrap();
    ClusterClient::new(
        tls::channel(
            addr,
            Trust::Node(Arc::new(RwLock::new(creds))),
            Duration::from_secs(10),
        )
        .unwrap(),
    )
}

struct Row {
    writes: u64,
    secs: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// What a client of [`load`] calls, over and over.
#[derive(Clone, Copy)]
enum Op {
    /// `CreateService`: a committed write.
    Create,
    /// `ListNodes` on the leader: a read index, one quorum round to the
    /// followers and back with no log entry and no fsync. What a write
    /// costs above the disk is at least this.
    QuorumRead,
}

/// `clients` concurrent callers of `op` for [`RUN`], over `channels`
/// connections.
async fn load(dir: &Path, addr: &str, clients: usize, channels: usize, tag: &str, op: Op) -> Row {
    let conns: Vec<ClusterClient<Channel>> = (0..channels).map(|_| client(dir, addr)).collect();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut api = conns[c % channels].clone();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while start.elapsed() < RUN {
                let t = Instant::now();
                let ok = match op {
                    Op::Create => api
                        .create_service(spec(format!("{tag}-{c}-{i}")))
                        .await
                        .is_ok(),
                    Op::QuorumRead => api
                        .list_nodes(proto::Empty {})
                        .await
                        .is_ok_and(|r| r.metadata().get(model::api::STALE_HEADER).is_none()),
                };
                if ok {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Row {
        writes: all.len() as u64,
        secs,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
    }
}

/// Sequential one-record redb commits with fsync, for [`RUN`]/2.
fn disk_baseline(dir: &Path) -> f64 {
    const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
    let db = redb::Database::create(dir.join("baseline.redb")).unwrap();
    let record = vec![7u8; 600];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN / 2 {
        let tx = db.begin_write().unwrap();
        tx.open_table(T)
            .unwrap()
            .insert(n, record.as_slice())
            .unwrap();
        tx.commit().unwrap();
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// A fresh scratch directory under the target dir.
pub fn scratch(tag: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{tag}-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    base
}

pub fn control_writes(md: &mut String) {
    let base = scratch("control");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let baseline = disk_baseline(&base);
    let rows = rt.block_on(async {
        let dirs: Vec<PathBuf> = (0..3).map(|i| base.join(format!("m{i}"))).collect();
        let addrs: Vec<Addresses> = (0..3).map(|i| addresses(i + 1)).collect();
        let opts = InitOptions {
            autolock: false,
            cert_lifetime: pki::DEFAULT_CERT_LIFETIME,
            ..InitOptions::default()
        };
        let (first, report) = daemon::init(&dirs[0], &addrs[0], &opts).await.unwrap();
        let mut nodes: Vec<Daemon> = vec![first];
        for i in 1..3 {
            nodes.push(
                daemon::join(
                    &dirs[i],
                    &addrs[i],
                    &report.manager_token,
                    &addrs[0].api_addr,
                )
                .await
                .unwrap(),
            );
        }
        let voters = |d: &Daemon| {
            d.ctx.manager.read().unwrap().as_ref().map_or(0, |m| {
                m.metrics()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .count()
            })
        };
        let start = Instant::now();
        while voters(&nodes[0]) < 3 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "managers did not join"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let leader = loop {
            let m = nodes[0].ctx.manager.read().unwrap().clone().unwrap();
            if let Some(l) = m.metrics().current_leader {
                break format!("{l:016x}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let li = nodes.iter().position(|n| n.ctx.node_id == leader).unwrap();
        let fi = (li + 1) % 3;
        let read = load(&dirs[li], &addrs[li].api_addr, 1, 1, "read", Op::QuorumRead).await;
        let one = load(&dirs[li], &addrs[li].api_addr, 1, 1, "one", Op::Create).await;
        let many = load(&dirs[li], &addrs[li].api_addr, 64, 4, "many", Op::Create).await;
        let forwarded = load(&dirs[fi], &addrs[fi].api_addr, 64, 4, "fwd", Op::Create).await;
        let services = nodes[li]
            .ctx
            .manager
            .read()
            .unwrap()
            .as_ref()
            .map_or(0, |m| m.with_state(|s| s.services.len()));
        for n in nodes {
            n.stop().await;
        }
        (read, one, many, forwarded, services)
    });
    let _ = std::fs::remove_dir_all(&base);
    let (read, one, many, forwarded, services) = rows;
    writeln!(md, "## (d) Control plane: committed service writes\n").unwrap();
    writeln!(
        md,
        "Three managers in one process on loopback (gRPC over mTLS, openraft, one redb store each on \
         ext4 with an fsync per commit). Each write is a `CreateService` that returns once the \
         entry is committed by a majority and applied on the leader. {}s per row; {services} \
         services in the state at the end.\n",
        RUN.as_secs()
    )
    .unwrap();
    writeln!(md, "| clients | path | writes/s | p50 | p99 | errors |").unwrap();
    writeln!(md, "|---|---|---|---|---|---|").unwrap();
    for (clients, path, r) in [
        (
            1,
            "read index only (`ListNodes`: a quorum round, no write)",
            &read,
        ),
        (1, "to the leader", &one),
        (64, "to the leader", &many),
        (64, "to a follower (forwarded)", &forwarded),
    ] {
        writeln!(
            md,
            "| {clients} | {path} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            r.writes as f64 / r.secs,
            r.p50_ms,
            r.p99_ms,
            r.errors
        )
        .unwrap();
    }
    // One client's write is a client round trip, then the leader's fsync
    // beside a replication round trip and a follower's fsync. The read
    // index row is both round trips with no disk, so the floor for one
    // writer is one read index plus one fsync.
    let rate = |r: &Row| r.writes as f64 / r.secs;
    let fsync_ms = 1e3 / baseline;
    let floor = 1e3 / (1e3 / rate(&read) + fsync_ms);
    writeln!(
        md,
        "\nBaseline, same disk, same run: sequential one-record redb commits with fsync: \
         **{baseline:.0}/s** ({fsync_ms:.2} ms each).\n\n\
         - **64 clients:** {:.2}x the fsync rate (target 2.5x, and 10k/s). Concurrent clients \
         share commits: the leader puts queued writes into one log entry (one batch in flight) \
         and each store commits queued appends in one fsync.\n\
         - **One client:** {:.2}x the fsync rate. A write cannot beat one read index (the \
         client's round trip and the leader's to a follower: {:.2} ms at p50 here) plus one \
         fsync, which makes {floor:.0}/s the floor-bound limit; one client reaches {:.2}x of it. \
         On this disk a round trip over mTLS costs more than the fsync, so no Raft write reaches \
         the bare fsync rate.\n",
        rate(&many) / baseline,
        rate(&one) / baseline,
        read.p50_ms,
        rate(&one) / floor,
    )
    .unwrap();
}
