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

#[path = "cluster/agents.rs"]
mod agents;
#[path = "cluster/api.rs"]
mod api;
#[path = "cluster/raft.rs"]
mod raft;
#[path = "cluster/security.rs"]
mod security;
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

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn propose(d: &Daemon, cmd: control::state::Command) -> control::state::Outcome {
    let m = d.ctx.manager().unwrap();
    m.propose(cmd).await.unwrap()
}
