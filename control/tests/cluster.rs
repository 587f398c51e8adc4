//! In-process clusters on loopback: managers elect, replicate and survive
//! a leader change; every security refusal the control plane promises.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use control::{
    ca::pki,
    ca::tls::{self, Credentials, Trust},
    daemon::{self, Addresses, Daemon, InitOptions, InitReport},
    raft::manager::ManagerConfig,
    state::{EndpointSpec, NetworkSpec, Role, ServiceMode, ServiceSpec, TaskTemplate},
};
use proto::{Empty, JoinTokenRequest, Ref, Remove, SetRoleRequest, cluster_client::ClusterClient};

#[path = "cluster/wire.rs"]
mod wire;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "mesh-cluster-{tag}-{}-{}",
            std::process::id(),
            pki_free_suffix()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

fn pki_free_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn addresses(i: u8) -> Addresses {
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    Addresses {
        hostname: format!("node-{i}"),
        addr: Ipv4Addr::new(198, 18, 0, i),
        listen_addr: listen,
        api_addr: listen.to_string(),
        underlay: Vec::new(),
    }
}

fn opts() -> InitOptions {
    InitOptions {
        autolock: false,
        cert_lifetime: pki::DEFAULT_CERT_LIFETIME,
        ..InitOptions::default()
    }
}

fn service(name: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        // These tests place tasks by hand (attached: run from outside), so
        // the orchestrator has none to place.
        mode: ServiceMode::Replicated { replicas: 0 },
        task: TaskTemplate {
            command: vec!["/bin/true".into()],
            ..TaskTemplate::default()
        },
        endpoint: EndpointSpec::default(),
        update: Default::default(),
        rollback: Default::default(),
    }
}

/// A client of `addr` with the node credentials in `dir`.
fn client(dir: &Path, addr: &str) -> ClusterClient<tonic::transport::Channel> {
    let creds = Credentials::load(&daemon::certs_dir(dir)).unwrap();
    let ch = tls::channel(
        addr,
        Trust::Node(Arc::new(RwLock::new(creds))),
        Duration::from_secs(10),
    )
    .unwrap();
    ClusterClient::new(ch)
}

async fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn voters(d: &Daemon) -> usize {
    d.ctx
        .manager
        .read()
        .unwrap()
        .as_ref()
        .map(|m| {
            m.metrics()
                .membership_config
                .membership()
                .voter_ids()
                .count()
        })
        .unwrap_or(0)
}

fn services(d: &Daemon) -> Vec<String> {
    d.ctx
        .manager
        .read()
        .unwrap()
        .as_ref()
        .map(|m| m.with_state(|s| s.services.values().map(|s| s.spec.name.clone()).collect()))
        .unwrap_or_default()
}

fn leader_of(d: &Daemon) -> Option<String> {
    d.ctx
        .manager
        .read()
        .unwrap()
        .as_ref()
        .and_then(|m| m.metrics().current_leader)
        .map(|l| format!("{l:016x}"))
}

struct Cluster {
    dirs: Vec<TempDir>,
    nodes: Vec<Option<Daemon>>,
    addrs: Vec<Addresses>,
    report: InitReport,
}

impl Cluster {
    /// One manager (init) plus `managers - 1` joined managers and
    /// `workers` workers, all voters in place.
    async fn start(tag: &str, managers: usize, workers: usize) -> Cluster {
        Cluster::start_with(tag, managers, workers, &ManagerConfig::default()).await
    }

    /// [`Cluster::start`], every manager started with `config`.
    async fn start_with(
        tag: &str,
        managers: usize,
        workers: usize,
        config: &ManagerConfig,
    ) -> Cluster {
        let dirs: Vec<TempDir> = (0..managers + workers)
            .map(|i| TempDir::new(&format!("{tag}{i}")))
            .collect();
        let addrs: Vec<Addresses> = (0..managers + workers)
            .map(|i| addresses(i as u8 + 1))
            .collect();
        let (first, report) = daemon::init_with(&dirs[0].0, &addrs[0], &opts(), config)
            .await
            .unwrap();
        let mut nodes = vec![Some(first)];
        for i in 1..managers + workers {
            let token = if i < managers {
                &report.manager_token
            } else {
                &report.worker_token
            };
            let d = daemon::join_with(&dirs[i].0, &addrs[i], token, &addrs[0].api_addr, config)
                .await
                .unwrap();
            nodes.push(Some(d));
        }
        let c = Cluster {
            dirs,
            nodes,
            addrs,
            report,
        };
        let first = c.nodes[0].as_ref().unwrap();
        wait_for("all managers to be voters", Duration::from_secs(30), || {
            (voters(first) == managers).then_some(())
        })
        .await;
        c
    }

    fn node(&self, i: usize) -> &Daemon {
        self.nodes[i].as_ref().unwrap()
    }

    fn api(&self, i: usize) -> &str {
        &self.addrs[i].api_addr
    }

    fn index_of(&self, node_id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(|n| n.ctx.node_id == node_id))
            .unwrap()
    }

    async fn stop(mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(d) = n.take() {
                d.stop().await;
            }
        }
    }
}

async fn create_service(c: &mut ClusterClient<tonic::transport::Channel>, name: &str) {
    c.create_service(proto::ServiceSpec::from(service(name)))
        .await
        .unwrap_or_else(|e| panic!("creating {name}: {}", e.message()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_managers_elect_replicate_and_survive_a_leader_change() {
    let mut c = Cluster::start("elect", 3, 0).await;
    // Writes through a follower are forwarded to the leader.
    let leader = wait_for("a leader", Duration::from_secs(10), || leader_of(c.node(0))).await;
    let follower = (0..3).find(|&i| c.node(i).ctx.node_id != leader).unwrap();
    let mut api = client(&c.dirs[follower].0, c.api(follower));
    for i in 0..10 {
        create_service(&mut api, &format!("before-{i}")).await;
        // Every manager's read, right after the write, holds it and is not
        // marked stale: a follower reads after the leader's applied index.
        for n in 0..3 {
            let reply = client(&c.dirs[n].0, c.api(n))
                .list_services(Empty {})
                .await
                .unwrap();
            assert_eq!(
                reply.metadata().get(control::api::STALE_HEADER),
                None,
                "manager {n}"
            );
            let have = reply.into_inner().services;
            assert_eq!(
                have.len(),
                i + 1,
                "manager {n} misses an acknowledged write"
            );
        }
    }
    for i in 0..3 {
        wait_for(
            "replication to every manager",
            Duration::from_secs(10),
            || (services(c.node(i)).len() == 10).then_some(()),
        )
        .await;
    }

    // Kill the leader: the others elect a new one and keep every write.
    let li = c.index_of(&leader);
    let started = Instant::now();
    c.nodes[li].take().unwrap().stop().await;
    let survivor = (0..3).find(|&i| i != li).unwrap();
    let new_leader = wait_for("a new leader", Duration::from_secs(10), || {
        leader_of(c.node(survivor)).filter(|l| *l != leader)
    })
    .await;
    eprintln!(
        "new leader {new_leader} elected {} ms after the old one stopped",
        started.elapsed().as_millis()
    );
    let mut api = client(&c.dirs[survivor].0, c.api(survivor));
    for i in 0..10 {
        create_service(&mut api, &format!("after-{i}")).await;
    }
    for i in (0..3).filter(|&i| i != li) {
        wait_for(
            "20 services on the survivors",
            Duration::from_secs(10),
            || (services(c.node(i)).len() == 20).then_some(()),
        )
        .await;
    }

    // The old leader comes back from its data dir and catches up.
    let back = daemon::run(&c.dirs[li].0, daemon::Unlock::Wait)
        .await
        .unwrap();
    c.nodes[li] = Some(back);
    wait_for(
        "the restarted manager to catch up",
        Duration::from_secs(15),
        || (services(c.node(li)).len() == 20).then_some(()),
    )
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_manager_refuses_writes_with_no_quorum() {
    let mut c = Cluster::start("quorum", 3, 0).await;
    let leader = wait_for("a leader", Duration::from_secs(10), || leader_of(c.node(0))).await;
    // Stop the two others (whichever they are): what is left has no quorum.
    let keep = c.index_of(&leader);
    for i in (0..3).filter(|&i| i != keep) {
        c.nodes[i].take().unwrap().stop().await;
    }
    // Past the quorum lease, the leader knows: it refuses before it
    // appends, so the write is "not applied" (within the lease it would
    // append, and answer "outcome unknown").
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut api = client(&c.dirs[keep].0, c.api(keep));
    let err = api
        .create_service(proto::ServiceSpec::from(service("lonely")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with("no quorum"), "{}", err.message());
    assert!(
        err.message().ends_with("(not applied)"),
        "{}",
        err.message()
    );
    assert!(services(c.node(keep)).is_empty());
    // Reads are still answered, marked stale with the reason: this manager
    // can't confirm its state is current.
    let reply = api.list_services(Empty {}).await.unwrap();
    let why = reply
        .metadata()
        .get(control::api::STALE_HEADER)
        .expect("a read without a quorum is marked stale")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        why.contains("can't confirm it still leads") || why.contains("no leader"),
        "{why}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_and_calling_are_refused_without_the_right_credentials() {
    let mut c = Cluster::start("sec", 1, 1).await;
    let mgr = c.api(0).to_owned();

    // A client without a certificate.
    let ca = Credentials::load(&daemon::certs_dir(&c.dirs[0].0))
        .unwrap()
        .ca;
    let anon = tls::channel(&mgr, Trust::Anonymous(ca), Duration::from_secs(5)).unwrap();
    let err = ClusterClient::new(anon)
        .list_nodes(Empty {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message().contains("no client certificate"),
        "{}",
        err.message()
    );

    // A worker's certificate on a manager API.
    let err = client(&c.dirs[1].0, &mgr)
        .list_nodes(Empty {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("worker certificate"),
        "{}",
        err.message()
    );

    // A wrong token (right CA, made-up secret).
    let digest = pki::ca_digest(
        &Credentials::load(&daemon::certs_dir(&c.dirs[0].0))
            .unwrap()
            .ca,
    )
    .unwrap();
    let wrong = format!("MESH-1-{digest}-{}", "0".repeat(32));
    let d = TempDir::new("wrong");
    let err = daemon::join(&d.0, &addresses(50), &wrong, &mgr)
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("not valid for this cluster"),
        "{err}"
    );
    assert!(!d.0.join("node.json").exists());

    // A token whose CA digest is not this cluster's.
    let other = format!("MESH-1-{}-{}", "ab".repeat(32), "1".repeat(32));
    let d = TempDir::new("digest");
    let err = daemon::join(&d.0, &addresses(51), &other, &mgr)
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("is not the one in the token"),
        "{err}"
    );

    // A rotated token: the old one is refused, the new one works.
    let mut admin = client(&c.dirs[0].0, &mgr);
    let old = c.report.worker_token.clone();
    // Shown again: derived from the CA key, not read back from the state.
    let shown = admin
        .join_token(JoinTokenRequest {
            role: proto::Role::Worker.into(),
            rotate: false,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(shown, old, "join-token shows the token init gave");
    let new = admin
        .join_token(JoinTokenRequest {
            role: proto::Role::Worker.into(),
            rotate: true,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_ne!(old, new);
    let d = TempDir::new("rotated");
    let err = daemon::join(&d.0, &addresses(52), &old, &mgr)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("rotated"), "{err}");
    let d2 = TempDir::new("fresh");
    let joined = daemon::join(&d2.0, &addresses(53), &new, &mgr)
        .await
        .unwrap();
    joined.stop().await;

    // A worker's certificate on every manager-only API: refused from the
    // headers, whatever the call.
    let mut w = client(&c.dirs[1].0, &mgr);
    let calls: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "join-token",
            w.join_token(JoinTokenRequest {
                role: proto::Role::Manager.into(),
                rotate: true,
            })
            .await
            .map(|_| ()),
        ),
        ("unlock-key", w.unlock_key(Empty {}).await.map(|_| ())),
        (
            "rotate-network-key",
            w.rotate_network_key(Empty {}).await.map(|_| ()),
        ),
        (
            "node rm",
            w.remove_node(Remove {
                target: c.node(0).ctx.node_id.clone(),
                force: true,
            })
            .await
            .map(|_| ()),
        ),
        ("service ls", w.list_services(Empty {}).await.map(|_| ())),
    ];
    for (what, r) in calls {
        let err = r.expect_err(what);
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{what}: {err:?}");
    }
    assert_eq!(
        c.node(0)
            .ctx
            .manager()
            .unwrap()
            .with_state(|s| s.nodes.len()),
        3
    );

    // A certificate from another cluster's CA, and an expired one from
    // this CA: each refused in the handshake, and said so.
    let ca_cert = Credentials::load(&daemon::certs_dir(&c.dirs[0].0))
        .unwrap()
        .ca;
    let forged = |ca: &pki::Ca, lifetime| {
        let (key, csr) = pki::node_key_and_csr().unwrap();
        let cert = ca
            .issue(&csr, "sec", "ffffffffffffffff", Role::Manager, lifetime)
            .unwrap();
        Credentials {
            ca: ca_cert.clone(),
            cert,
            key,
        }
    };
    let call = |creds: Credentials| {
        let mgr = mgr.clone();
        async move {
            let ch = tls::channel(
                &mgr,
                Trust::Node(Arc::new(RwLock::new(creds))),
                Duration::from_secs(5),
            )
            .unwrap();
            ClusterClient::new(ch)
                .list_nodes(Empty {})
                .await
                .unwrap_err()
        }
    };
    let foreign = pki::Ca::create("other").unwrap();
    let err = call(forged(&foreign, Duration::from_secs(3600))).await;
    let text = daemon::status_text(&err);
    assert!(
        text.contains("not signed by this cluster's CA") && text.contains("another cluster"),
        "foreign certificate: {text}"
    );
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let secrets = c
        .node(0)
        .ctx
        .manager()
        .unwrap()
        .with_state(|s| s.secrets.clone())
        .unwrap();
    let ours = pki::Ca::from_pem(&secrets.ca_cert, &secrets.ca_key);
    let short = forged(&ours, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = call(short).await;
    let text = daemon::status_text(&err);
    assert!(
        text.contains("certificate expired at") && text.contains("Join the node again"),
        "expired certificate: {text}"
    );
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // A removed node reconnecting with its old certificate.
    let worker_id = c.node(1).ctx.node_id.clone();
    c.nodes[1].take().unwrap().stop().await;
    admin
        .remove_node(Remove {
            target: worker_id.clone(),
            force: true,
        })
        .await
        .unwrap();
    let err = NodeClientExt::whoami(&c.dirs[1].0, &mgr).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("has been removed"),
        "{}",
        err.message()
    );
    c.stop().await;
}

struct NodeClientExt;

impl NodeClientExt {
    async fn whoami(dir: &Path, addr: &str) -> Result<(), tonic::Status> {
        let creds = Credentials::load(&daemon::certs_dir(dir)).unwrap();
        let ch = tls::channel(
            addr,
            Trust::Node(Arc::new(RwLock::new(creds))),
            Duration::from_secs(10),
        )
        .unwrap();
        proto::member_client::MemberClient::new(ch)
            .whoami(Empty {})
            .await
            .map(|_| ())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promote_demote_and_renewal() {
    let c = Cluster::start("roles", 1, 1).await;
    let mut admin = client(&c.dirs[0].0, c.api(0));
    let worker = c.node(1).ctx.node_id.clone();
    admin
        .set_role(SetRoleRequest {
            target: worker.clone(),
            role: proto::Role::Manager.into(),
        })
        .await
        .unwrap();
    // The node notices, renews its certificate as a manager, starts Raft
    // and joins the voters.
    wait_for(
        "the promoted node to be a voter",
        Duration::from_secs(30),
        || (voters(c.node(0)) == 2).then_some(()),
    )
    .await;
    wait_for("a manager certificate", Duration::from_secs(10), || {
        let creds = Credentials::load(&daemon::certs_dir(&c.dirs[1].0)).ok()?;
        let id = pki::identity(&creds.cert, &creds.ca, now()).ok()?;
        (id.role == Role::Manager).then_some(())
    })
    .await;
    // Its certificate now reaches the manager API.
    client(&c.dirs[1].0, c.api(0))
        .list_nodes(Empty {})
        .await
        .unwrap();
    let view = admin
        .inspect_node(Ref {
            target: worker.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let view = control::api::NodeView::try_from(view).unwrap();
    assert_eq!(
        view.manager_status,
        Some(model::api::ManagerStatus::Reachable)
    );

    // A demotion whose role change committed but whose voter removal
    // never ran (the leader died between the two steps): the state alone
    // says worker, and the leader's reconciler removes the voter.
    let node = c
        .node(0)
        .ctx
        .manager()
        .unwrap()
        .with_state(|s| s.nodes[&worker].clone());
    propose(
        c.node(0),
        control::state::Command::UpdateNode {
            id: worker.clone(),
            version: node.version,
            spec: control::state::NodeSpec {
                role: Role::Worker,
                ..node.spec
            },
        },
    )
    .await;
    wait_for(
        "the demoted node to leave the voters",
        Duration::from_secs(20),
        || (voters(c.node(0)) == 1).then_some(()),
    )
    .await;
    wait_for(
        "Raft to stop on the demoted node",
        Duration::from_secs(20),
        || {
            c.node(1)
                .ctx
                .manager
                .read()
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    let err = client(&c.dirs[1].0, c.api(0))
        .list_nodes(Empty {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    c.stop().await;
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_lived_certificates_renew_before_expiry() {
    let d = TempDir::new("renew");
    let at = addresses(1);
    let node = daemon::init(
        &d.0,
        &at,
        &InitOptions {
            autolock: false,
            cert_lifetime: Duration::from_secs(9),
            ..InitOptions::default()
        },
    )
    .await
    .unwrap();
    let (node, report) = node;
    // A worker renews too (it learns the lifetime from the managers).
    let w = TempDir::new("renew-worker");
    let worker = daemon::join(&w.0, &addresses(2), &report.worker_token, &at.api_addr)
        .await
        .unwrap();
    let first = Credentials::load(&daemon::certs_dir(&d.0)).unwrap().cert;
    let first_worker = Credentials::load(&daemon::certs_dir(&w.0)).unwrap().cert;
    // Renewal starts in the last third (3 s before expiry); the upkeep
    // loop looks every 2 s.
    for (dir, was) in [(&d.0, &first), (&w.0, &first_worker)] {
        wait_for("a renewed certificate", Duration::from_secs(15), || {
            let now_cert = Credentials::load(&daemon::certs_dir(dir)).ok()?.cert;
            (now_cert != *was).then_some(())
        })
        .await;
    }
    // 12 s after init the first certificate has expired; the API still
    // answers with the renewed one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    client(&d.0, &at.api_addr)
        .list_nodes(Empty {})
        .await
        .unwrap();
    NodeClientExt::whoami(&w.0, &at.api_addr).await.unwrap();
    worker.stop().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn validation_errors_reach_the_client_verbatim() {
    let c = Cluster::start("valid", 1, 0).await;
    let mut api = client(&c.dirs[0].0, c.api(0));
    let err = api
        .create_network(proto::NetworkSpec::from(NetworkSpec {
            name: "Bad_Name".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not DNS-safe"), "{}", err.message());
    create_service(&mut api, "web").await;
    // The same create again: named as such, not as a conflict.
    let err = api
        .create_service(proto::ServiceSpec::from(service("web")))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("already exists, with the same spec"),
        "{}",
        err.message()
    );
    // Another spec under the name: a conflict.
    let mut other = service("web");
    other.task.command = vec!["/bin/other".into()];
    let err = api
        .create_service(proto::ServiceSpec::from(other))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("already in use"),
        "{}",
        err.message()
    );
    // What protobuf cannot say is refused naming the field: a required
    // message missing, an enum value this manager does not know.
    let mut no_mode = proto::ServiceSpec::from(service("nomode"));
    no_mode.mode = None;
    let err = api.create_service(no_mode).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "invalid service spec: mode: missing");
    let mut odd = service("odd");
    odd.endpoint.ports.push(control::state::PortConfig {
        protocol: control::state::Protocol::Tcp,
        target: 80,
        published: None,
        mode: Default::default(),
    });
    let mut odd = proto::ServiceSpec::from(odd);
    odd.endpoint.as_mut().unwrap().ports[0].protocol = 7;
    let err = api.create_service(odd).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "invalid service spec: endpoint.ports[0].protocol: 7 is not a known protocol"
    );
    let mut port0 = proto::ServiceSpec::from(service("port0"));
    port0.endpoint = Some(proto::EndpointSpec {
        mode: 0,
        ports: vec![proto::PortConfig {
            protocol: proto::Protocol::Udp.into(),
            target: 70_000,
            published: None,
            mode: 0,
        }],
    });
    let err = api.create_service(port0).await.unwrap_err();
    assert_eq!(
        err.message(),
        "invalid service spec: endpoint.ports[0].target: 70000 is not a port (1-65535)"
    );
    let services = api
        .list_services(Empty {})
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(services.len(), 1, "a refused spec left a service behind");
    c.stop().await;
}

fn purged(d: &Daemon) -> Option<u64> {
    d.ctx
        .manager
        .read()
        .unwrap()
        .as_ref()
        .and_then(|m| m.metrics().purged.map(|l| l.index))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manager_joining_after_compaction_gets_a_snapshot() {
    // Snapshot (and purge the log) every 30 entries: this cluster only
    // (a process-wide setting once reached every test's managers).
    let every30 = ManagerConfig {
        snapshot_every: 30,
        ..ManagerConfig::default()
    };
    let c = Cluster::start_with("snap", 1, 0, &every30).await;
    let mut api = client(&c.dirs[0].0, c.api(0));
    for i in 0..100 {
        create_service(&mut api, &format!("s{i}")).await;
    }
    let cut = wait_for("the log to be compacted", Duration::from_secs(10), || {
        purged(c.node(0))
    })
    .await;
    assert!(cut > 10, "purged up to {cut}");
    // The new manager cannot get the purged entries: it must install the
    // snapshot (over gRPC), then the entries after it.
    let d = TempDir::new("snap-join");
    let at = addresses(9);
    let joined = daemon::join(&d.0, &at, &c.report.manager_token, c.api(0))
        .await
        .unwrap();
    wait_for(
        "the new manager to be a voter",
        Duration::from_secs(30),
        || (voters(c.node(0)) == 2).then_some(()),
    )
    .await;
    wait_for(
        "100 services on the new manager",
        Duration::from_secs(15),
        || (services(&joined).len() == 100).then_some(()),
    )
    .await;
    let snap = joined
        .ctx
        .manager
        .read()
        .unwrap()
        .as_ref()
        .and_then(|m| m.metrics().snapshot.map(|l| l.index));
    assert!(
        snap.is_some_and(|i| i >= cut),
        "installed snapshot {snap:?}, purged {cut}"
    );
    joined.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_autolocked_manager_waits_for_its_unlock_key() {
    let d = TempDir::new("lock");
    let at = addresses(1);
    let (node, report) = daemon::init(
        &d.0,
        &at,
        &InitOptions {
            autolock: true,
            cert_lifetime: pki::DEFAULT_CERT_LIFETIME,
            ..InitOptions::default()
        },
    )
    .await
    .unwrap();
    let key = report
        .unlock_key
        .clone()
        .expect("autolock gives an unlock key");
    let mut api = client(&d.0, &at.api_addr);
    create_service(&mut api, "locked-away").await;
    let shown = api.unlock_key(Empty {}).await.unwrap().into_inner().key;
    assert_eq!(shown, key.to_string());
    node.stop().await;
    assert!(
        !d.0.join("keys/kek").exists(),
        "the KEK must not be on disk"
    );

    // A restart waits on the unlock socket; a wrong key is refused there.
    let dir = d.0.clone();
    let run = tokio::spawn(async move { daemon::run(&dir, daemon::Unlock::Wait).await });
    wait_for("the unlock socket", Duration::from_secs(10), || {
        daemon::unlock_socket(&d.0).exists().then_some(())
    })
    .await;
    // Only its owner reaches it: a 0700 directory around a 0600 socket.
    {
        use std::os::unix::fs::PermissionsExt;
        let sock = daemon::unlock_socket(&d.0);
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(sock.parent().unwrap()), 0o700);
        assert_eq!(mode(&sock), 0o600);
    }
    // A client that connects and says nothing holds up no one.
    let _silent = tokio::net::UnixStream::connect(daemon::unlock_socket(&d.0))
        .await
        .unwrap();
    let wrong = format!("MESHKEY-{}", "ab".repeat(32));
    let err = tokio::time::timeout(Duration::from_secs(5), daemon::send_unlock(&d.0, &wrong))
        .await
        .expect("served beside a silent client")
        .unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
    assert!(!run.is_finished());
    daemon::send_unlock(&d.0, &key.to_string()).await.unwrap();
    let node = run.await.unwrap().unwrap();
    wait_for("the state after unlocking", Duration::from_secs(10), || {
        services(&node)
            .contains(&"locked-away".to_owned())
            .then_some(())
    })
    .await;
    node.stop().await;
}

/// The agent's data plane, as a test sees it: the tables it was handed.
#[derive(Clone, Default)]
struct Recorder(Arc<std::sync::Mutex<control::tables::Tables>>);

impl control::agent::Sink for Recorder {
    type Error = std::convert::Infallible;
    async fn apply(
        &mut self,
        tables: &control::tables::Tables,
        _: control::agent::Update<'_>,
    ) -> Result<(), Self::Error> {
        *self.0.lock().unwrap() = tables.clone();
        Ok(())
    }
}

fn endpoints_on(t: &control::tables::Tables, node: &str) -> usize {
    t.endpoints().filter(|(_, _, e)| e.node == node).count()
}

async fn propose(d: &Daemon, cmd: control::state::Command) -> control::state::Outcome {
    let m = d.ctx.manager().unwrap();
    m.propose(cmd).await.unwrap()
}

fn book_of(d: &Daemon) -> control::tables::Tables {
    let m = d.ctx.manager().unwrap();
    m.sm.with_book(|_, b| b.tables().clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_follow_the_tables_and_a_silent_node_is_withdrawn() {
    use control::state::{Command, NodeStatus};
    let dirs: Vec<TempDir> = (0..3)
        .map(|i| TempDir::new(&format!("agents{i}")))
        .collect();
    let addrs: Vec<Addresses> = (0..3).map(|i| addresses(i as u8 + 1)).collect();
    let heartbeat = Duration::from_millis(200);
    let (mut manager, report) = daemon::init(
        &dirs[0].0,
        &addrs[0],
        &InitOptions {
            heartbeat,
            heartbeat_misses: 3,
            ..opts()
        },
    )
    .await
    .unwrap();
    let mut workers = Vec::new();
    for i in 1..3 {
        workers.push(
            daemon::join(
                &dirs[i].0,
                &addrs[i],
                &report.worker_token,
                &addrs[0].api_addr,
            )
            .await
            .unwrap(),
        );
    }
    let rec: Vec<Recorder> = (0..3).map(|_| Recorder::default()).collect();
    manager.start_agent(rec[0].clone(), None);
    // Worker 1 follows its underlay interface (meshd polls netlink).
    let (underlay_tx, underlay_rx) = tokio::sync::watch::channel(Vec::new());
    let mut follow = Some(underlay_rx);
    for (w, r) in workers.iter_mut().zip(&rec[1..]) {
        w.start_agent(r.clone(), follow.take());
    }
    let ids: Vec<String> = std::iter::once(&manager)
        .chain(&workers)
        .map(|d| d.ctx.node_id.clone())
        .collect();

    // A network, a service on it publishing a port, a task on each worker.
    propose(
        &manager,
        Command::CreateNetwork {
            id: "net-red".into(),
            spec: NetworkSpec {
                name: "red".into(),
                // Encrypted: the tables carry a key ring, which agents
                // hold in memory only.
                encrypted: true,
                ..NetworkSpec::default()
            },
        },
    )
    .await;
    wait_for(
        "the leader to fill the key ring",
        Duration::from_secs(5),
        || {
            book_of(&manager)
                .network_keys()
                .is_some_and(|k| k.keys.len() == control::keys::RING)
                .then_some(())
        },
    )
    .await;
    let mut web = service("web");
    web.task.networks = vec![control::state::NetworkAttachment {
        target: "red".into(),
        aliases: vec![],
    }];
    propose(
        &manager,
        Command::CreateService {
            id: "svc-web".into(),
            spec: web,
        },
    )
    .await;
    for (slot, node) in ids[1..].iter().enumerate() {
        propose(
            &manager,
            Command::CreateTask {
                id: format!("task-{slot}"),
                service: "web".into(),
                slot: slot as u32 + 1,
                node: node.clone(),
                netns: Some(format!("/run/netns/attached-{slot}")),
            },
        )
        .await;
    }
    let want = book_of(&manager);
    assert_eq!(endpoints_on(&want, &ids[2]), 1);
    for (i, r) in rec.iter().enumerate() {
        wait_for(
            "every agent to apply the tables",
            Duration::from_secs(10),
            || (*r.0.lock().unwrap() == want).then_some(()),
        )
        .await;
        eprintln!("agent {i} at revision {}", want.revision);
    }

    // Worker 1's underlay gains a prefix after it joined: the cluster
    // learns it, and keeps networks off it from then on.
    let grown: Vec<control::allocator::Subnet> = vec!["10.77.0.0/16".parse().unwrap()];
    underlay_tx.send_replace(grown.clone());
    wait_for(
        "the new underlay prefix to reach the state",
        Duration::from_secs(5),
        || {
            (manager
                .ctx
                .manager()
                .unwrap()
                .with_state(|s| s.nodes[&ids[1]].underlay.clone())
                == grown)
                .then_some(())
        },
    )
    .await;
    let refused = manager
        .ctx
        .manager()
        .unwrap()
        .propose(Command::CreateNetwork {
            id: "net-clash".into(),
            spec: NetworkSpec {
                name: "clash".into(),
                subnet: Some("10.77.3.0/24".parse().unwrap()),
                ..NetworkSpec::default()
            },
        })
        .await
        .expect_err("a subnet on a node's new underlay prefix is refused");
    assert!(
        refused
            .to_string()
            .contains("overlaps the underlay of node"),
        "{refused}"
    );
    // Each agent saves its replica (at most once a second), without the
    // key ring: no secret of it is on disk.
    let mut at_rest = want.clone();
    at_rest.entries.remove(&control::tables::Key::NetworkKeys);
    let secrets: Vec<String> = want
        .network_keys()
        .expect("a key ring")
        .keys
        .iter()
        .map(|k| k.secret.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    for d in std::iter::once(&manager).chain(&workers) {
        wait_for(
            "the saved replica to catch up",
            Duration::from_secs(5),
            || (control::agent::load_replica(&d.dir) == at_rest).then_some(()),
        )
        .await;
        let file = std::fs::read_to_string(d.dir.join("tables.json")).unwrap();
        for secret in &secrets {
            assert!(
                !file.contains(secret.as_str()),
                "a network key in tables.json"
            );
        }
    }
    // The leader saw every ack.
    let m = manager.ctx.manager().unwrap();
    let progress =
        m.sm.with_book(|state, book| m.dispatcher.progress(state, book.revision()));
    assert!(progress.pending(want.revision).is_empty(), "{progress:?}");

    // Worker 2 goes silent: the leader commits it down, and its endpoint
    // leaves the others' tables in that same revision.
    let stopped_at = Instant::now();
    let w2 = workers.pop().unwrap();
    let w2_dir = w2.dir.clone();
    w2.stop().await;
    let withdrawn = wait_for(
        "worker 2's endpoint to be withdrawn",
        Duration::from_secs(5),
        || {
            let t = rec[1].0.lock().unwrap().clone();
            (endpoints_on(&t, &ids[2]) == 0).then_some(t)
        },
    )
    .await;
    eprintln!(
        "silent node withdrawn from another node's tables {} ms after it stopped (heartbeat 200 ms x 3)",
        stopped_at.elapsed().as_millis()
    );
    assert_eq!(
        endpoints_on(&withdrawn, &ids[1]),
        1,
        "the live worker's endpoint stays"
    );
    let status = m.with_state(|s| s.nodes[&ids[2]].status);
    assert_eq!(status, NodeStatus::Down);
    // A change while it is away.
    propose(
        &manager,
        Command::RemoveTask {
            id: "task-0".into(),
        },
    )
    .await;

    // It restarts from its saved revision, catches up, and is ready again.
    let saved = control::agent::load_replica(&w2_dir);
    assert!(saved.revision > 0, "the agent saved its tables");
    assert!(saved.network_keys().is_none(), "no key ring at rest");
    // As an older meshd left it: the key ring on disk. The agent rewrites
    // the file without it as it starts, not at its next change.
    let mut old = saved.clone();
    old.entries.insert(
        control::tables::Key::NetworkKeys,
        want.entries[&control::tables::Key::NetworkKeys].clone(),
    );
    std::fs::write(
        w2_dir.join("tables.json"),
        serde_json::to_vec(&old).unwrap(),
    )
    .unwrap();
    let mut w2 = daemon::run(&w2_dir, daemon::Unlock::Wait).await.unwrap();
    let r2 = Recorder::default();
    let w2_reports = w2.start_agent(r2.clone(), None).reports;
    let file = std::fs::read_to_string(w2_dir.join("tables.json")).unwrap();
    for s in &secrets {
        assert!(
            !file.contains(s.as_str()),
            "a key of the ring is still on disk"
        );
    }
    wait_for(
        "worker 2 to be ready again",
        Duration::from_secs(10),
        || (m.with_state(|s| s.nodes[&ids[2]].status) == NodeStatus::Ready).then_some(()),
    )
    .await;
    let want = book_of(&manager);
    assert_eq!(endpoints_on(&want, &ids[2]), 1, "back in the tables");
    assert_eq!(endpoints_on(&want, &ids[1]), 0, "task-0 was removed");
    for r in [&rec[0], &rec[1], &r2] {
        wait_for(
            "every agent, the restarted one too, to match (its key ring fetched)",
            Duration::from_secs(10),
            || (*r.0.lock().unwrap() == want).then_some(()),
        )
        .await;
    }

    // Worker 2 reports on its task through its session: running in a
    // namespace, then dead. A report on another node's task is dropped.
    use control::{dispatcher::TaskReport, state::TaskState};
    propose(
        &manager,
        Command::CreateTask {
            id: "task-other".into(),
            service: "web".into(),
            slot: 3,
            node: ids[1].clone(),
            netns: Some("/run/netns/attached-other".into()),
        },
    )
    .await;
    let report = |id: &str, observed, exit_code| TaskReport {
        id: id.into(),
        observed,
        netns: Some(format!("/run/netns/{id}")),
        exit_code,
        error: None,
    };
    for r in [
        report("task-other", TaskState::Failed, Some(1)),
        report("task-1", TaskState::Running, None),
    ] {
        w2_reports.send(r).unwrap();
    }
    let task = |id: &str| m.with_state(|s| s.tasks[id].clone());
    wait_for(
        "the running report to commit",
        Duration::from_secs(5),
        || (task("task-1").observed == TaskState::Running).then_some(()),
    )
    .await;
    assert_eq!(task("task-1").netns.as_deref(), Some("/run/netns/task-1"));
    let other = task("task-other");
    assert_eq!(
        (other.observed, other.netns.as_deref()),
        (TaskState::New, Some("/run/netns/attached-other")),
        "a node changed another node's task"
    );
    w2_reports
        .send(report("task-1", TaskState::Failed, Some(137)))
        .unwrap();
    wait_for(
        "the dead task's endpoint to leave every replica",
        Duration::from_secs(5),
        || {
            [&rec[0], &rec[1], &r2]
                .iter()
                .all(|r| endpoints_on(&r.0.lock().unwrap(), &ids[2]) == 0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(task("task-1").exit_code, Some(137));
    for d in [w2, workers.pop().unwrap(), manager] {
        d.stop().await;
    }
}

/// A data plane that takes `delay` over every apply (a whole table on a
/// slow kernel, an emulated VM), recording the tables it was handed.
#[derive(Clone)]
struct SlowSink {
    delay: Duration,
    applied: Recorder,
}

impl control::agent::Sink for SlowSink {
    type Error = std::convert::Infallible;
    async fn apply(
        &mut self,
        tables: &control::tables::Tables,
        update: control::agent::Update<'_>,
    ) -> Result<(), Self::Error> {
        tokio::time::sleep(self.delay).await;
        self.applied.apply(tables, update).await
    }
}

/// The VM tier lost pings on an encrypted network: under emulation a
/// restarted node's whole apply outlasted 3 heartbeat periods, the agent
/// sent no heartbeat while applying, and the leader withdrew the node's
/// endpoints just after the node had repaired them. Heartbeats are the
/// agent's liveness, not the speed of its data plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_data_plane_applies_slowly_is_not_taken_for_dead() {
    use control::state::{Command, NodeStatus};
    let dirs: Vec<TempDir> = (0..2).map(|i| TempDir::new(&format!("slow{i}"))).collect();
    let addrs: Vec<Addresses> = (0..2).map(|i| addresses(i as u8 + 1)).collect();
    let heartbeat = Duration::from_millis(200);
    let (mut manager, report) = daemon::init(
        &dirs[0].0,
        &addrs[0],
        &InitOptions {
            heartbeat,
            heartbeat_misses: 3,
            ..opts()
        },
    )
    .await
    .unwrap();
    let mut worker = daemon::join(
        &dirs[1].0,
        &addrs[1],
        &report.worker_token,
        &addrs[0].api_addr,
    )
    .await
    .unwrap();
    manager.start_agent(Recorder::default(), None);
    let slow = SlowSink {
        // 2.5 times the 600 ms after which a silent node is down.
        delay: Duration::from_millis(1500),
        applied: Recorder::default(),
    };
    worker.start_agent(slow.clone(), None);
    let id = worker.ctx.node_id.clone();
    let m = manager.ctx.manager().unwrap();
    let status = || m.with_state(|s| s.nodes[&id].status);
    wait_for("the worker's first apply", Duration::from_secs(10), || {
        (slow.applied.0.lock().unwrap().revision > 0).then_some(())
    })
    .await;
    // Three changes: three slow applies in a row, 4.5 s of them.
    for i in 0..3 {
        propose(
            &manager,
            Command::CreateNetwork {
                id: format!("net-slow{i}"),
                spec: NetworkSpec {
                    name: format!("slow{i}"),
                    ..NetworkSpec::default()
                },
            },
        )
        .await;
    }
    let want = book_of(&manager).revision;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while slow.applied.0.lock().unwrap().revision < want {
        assert_eq!(
            status(),
            NodeStatus::Ready,
            "the worker was marked down while applying"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never applied revision {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(), NodeStatus::Ready);
    worker.stop().await;
    manager.stop().await;
}
