//! The control side of `meshd`: `init`, `join` and `run` on a data dir,
//! the gRPC server, and the node's upkeep loop (certificate renewal, role
//! changes, joining the Raft voters).
//!
//! Data dir layout:
//! - `node.json`: who this node is (ids, addresses, last known managers);
//!   written last by init/join, so its presence means "part of a cluster";
//! - `certs/ca.crt`, `certs/node.crt`, `certs/node.key` (0600);
//! - managers only: `keys/` (the data key, wrapped; [`crate::raft::seal`]) and
//!   `raft.redb` (log, vote, snapshots; every record sealed).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use proto::{
    AddManagerRequest, Empty, JoinRequest, RenewRequest, cluster_client::ClusterClient,
    cluster_server::ClusterServer, dispatcher_server::DispatcherServer, join_client::JoinClient,
    join_server::JoinServer, member_client::MemberClient, member_server::MemberServer,
    raft_server::RaftServer,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    agent::{Agent, Sink},
    api::{self, ClusterService, Ctx, JoinService, MemberService, RaftService, Whoami},
    ca::pki::{self, Ca, JoinToken},
    ca::tls::{self, Credentials, Trust},
    dispatcher::DispatcherService,
    raft::manager::{Manager, ManagerConfig, raft_id},
    raft::seal::{DataKeys, SealError, UnlockKey},
    state::{ClusterSecrets, ClusterSettings, Command, Role},
};

pub use crate::grpc::{MAX_MESSAGE, status_text};

/// Starts this node's manager, with the dispatcher's liveness check (which
/// marks silent nodes down) beside it.
async fn start_manager(
    id: crate::raft::store::NodeId,
    dir: &Path,
    key: crate::raft::seal::Key,
    creds: Arc<RwLock<Credentials>>,
    config: &ManagerConfig,
) -> Result<Arc<Manager>, String> {
    let m = Manager::start(id, dir, key, creds, config).await?;
    m.keep_task(tokio::spawn(crate::dispatcher::liveness(
        Arc::downgrade(&m),
        m.stopping(),
    )));
    Ok(m)
}

use mtls::datadir::NODE_FILE;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Cert(#[from] mtls::CertError),
    #[error(transparent)]
    NodeFile(#[from] NodeFileError),
}

fn msg(m: impl Into<String>) -> DaemonError {
    DaemonError::Msg(m.into())
}

pub use mtls::datadir::{NodeFile, NodeFileError, certs_dir};

/// Where a node listens and what it tells others.
#[derive(Debug, Clone)]
pub struct Addresses {
    pub hostname: String,
    /// Underlay IPv4 address (VXLAN source).
    pub addr: Ipv4Addr,
    pub listen_addr: SocketAddr,
    /// Advertised gRPC address; defaults to addr:listen-port.
    pub api_addr: String,
    /// The prefixes on the underlay interface (the one holding `addr`).
    pub underlay: Vec<crate::allocator::Subnet>,
}

fn fresh_dir(dir: &Path) -> Result<(), DaemonError> {
    if dir.join(NODE_FILE).exists() {
        return Err(msg(format!(
            "{} already holds a node of a cluster; start it with `meshd run`, or remove the data dir to start over",
            dir.display()
        )));
    }
    if dir.join("raft.redb").exists() {
        return Err(msg(format!(
            "{} holds a Raft store from an unfinished init or join; remove the data dir and try again",
            dir.display()
        )));
    }
    if let Ok(mut entries) = std::fs::read_dir(dir)
        && entries.next().is_some()
    {
        return Err(msg(format!(
            "{} is not empty: give meshd a new or empty data dir",
            dir.display()
        )));
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| msg(format!("{}: {e}", dir.display())))
}

/// What `meshd init` reports.
pub struct InitReport {
    pub node_id: String,
    pub worker_token: String,
    pub manager_token: String,
    pub unlock_key: Option<UnlockKey>,
}

/// Options of `meshd init`.
pub struct InitOptions {
    pub autolock: bool,
    pub cert_lifetime: Duration,
    /// Agents' heartbeat period, and the misses after which a node is down.
    pub heartbeat: Duration,
    pub heartbeat_misses: u32,
    /// How often the leader rotates the encrypted networks' key ring.
    pub network_key_rotation: Duration,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            autolock: false,
            cert_lifetime: pki::DEFAULT_CERT_LIFETIME,
            heartbeat: Duration::from_secs(1),
            heartbeat_misses: 3,
            network_key_rotation: crate::keys::DEFAULT_ROTATION,
        }
    }
}

/// A running node: its server and upkeep loop.
pub struct Daemon {
    pub ctx: Arc<Ctx>,
    pub dir: PathBuf,
    server: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    agent: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

/// Creates a cluster: CA, this node's manager certificate, join tokens,
/// and the Raft state with the ingress network; then serves.
pub async fn init(
    dir: &Path,
    at: &Addresses,
    opts: &InitOptions,
) -> Result<(Daemon, InitReport), DaemonError> {
    init_with(dir, at, opts, &ManagerConfig::default()).await
}

/// [`init`], with this manager's configuration.
pub async fn init_with(
    dir: &Path,
    at: &Addresses,
    opts: &InitOptions,
    config: &ManagerConfig,
) -> Result<(Daemon, InitReport), DaemonError> {
    fresh_dir(dir)?;
    let result = init_inner(dir, at, opts, config).await;
    if result.is_err() {
        // Leave nothing half-made behind: init can simply be run again.
        let _ = std::fs::remove_file(dir.join("raft.redb"));
        let _ = std::fs::remove_dir_all(dir.join("keys"));
        let _ = std::fs::remove_dir_all(certs_dir(dir));
    }
    result
}

/// The ingress subnet for a cluster whose first node is `at`: Swarm's
/// 10.0.0.0/24, or the first /24 of the address pool off that node's
/// underlay (its prefixes and its address).
fn ingress_subnet_for(at: &Addresses) -> Result<crate::allocator::Subnet, DaemonError> {
    use crate::allocator::{Subnet, SubnetPool};
    let defaults = ClusterSettings::default();
    let mut avoid = at.underlay.clone();
    avoid.push(Subnet::containing(at.addr, 32));
    if !avoid.iter().any(|p| p.overlaps(&defaults.ingress_subnet)) {
        return Ok(defaults.ingress_subnet);
    }
    SubnetPool::new(defaults.address_pool, 24)
        .and_then(|mut pool| pool.allocate_avoiding("ingress", &avoid))
        .map_err(|e| {
            msg(format!(
                "no /24 of the address pool {} is off this node's underlay ({}) for the ingress \
                 network: {e}",
                defaults.address_pool,
                avoid
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

async fn init_inner(
    dir: &Path,
    at: &Addresses,
    opts: &InitOptions,
    config: &ManagerConfig,
) -> Result<(Daemon, InitReport), DaemonError> {
    // Checked before anything is made: the ingress network must not
    // overlap this node's underlay (the default 10.0.0.0/24 does on many
    // hosts), else its own AddNode would be refused after Init committed.
    let ingress_subnet = ingress_subnet_for(at)?;
    let cluster_id = api::new_id();
    let node_id = api::new_node_id();
    let ca = Ca::create(&cluster_id)?;
    let (key, csr) = pki::node_key_and_csr()?;
    let cert = ca.issue(
        &csr,
        &cluster_id,
        &node_id,
        Role::Manager,
        opts.cert_lifetime,
    )?;
    let creds = Credentials {
        ca: ca.cert_pem.clone(),
        cert,
        key,
    };
    let digest = ca.digest()?;
    let (worker_token, worker_join) = JoinToken::issue(&digest, ca.key_pem(), Role::Worker)?;
    let (manager_token, manager_join) = JoinToken::issue(&digest, ca.key_pem(), Role::Manager)?;
    let (worker_token, manager_token) = (worker_token.to_string(), manager_token.to_string());
    let keys = DataKeys::create(dir, opts.autolock)?;
    let unlock_key = keys.unlock.clone();
    let creds_arc = Arc::new(RwLock::new(creds.clone()));
    let id = raft_id(&node_id).expect("a fresh node id is a raft id");
    let manager = start_manager(id, dir, keys.data, creds_arc.clone(), config)
        .await
        .map_err(msg)?;
    let file = NodeFile {
        node_id: node_id.clone(),
        cluster_id: cluster_id.clone(),
        hostname: at.hostname.clone(),
        addr: at.addr,
        listen_addr: at.listen_addr,
        api_addr: at.api_addr.clone(),
        managers: vec![at.api_addr.clone()],
    };
    let daemon = Daemon::serve(dir, &file, creds_arc, Some(manager.clone()), config).await?;
    let setup = async {
        manager.bootstrap(&at.api_addr).await.map_err(msg)?;
        manager
            .propose(Command::Init {
                cluster_id: cluster_id.clone(),
                ingress_id: api::new_id(),
                settings: ClusterSettings {
                    cert_lifetime_secs: opts.cert_lifetime.as_secs(),
                    autolock: opts.autolock,
                    heartbeat_period_ms: opts.heartbeat.as_millis().max(1) as u64,
                    heartbeat_misses: opts.heartbeat_misses.max(1),
                    network_key_rotation_secs: opts.network_key_rotation.as_secs().max(1),
                    ingress_subnet,
                    ..ClusterSettings::default()
                },
                secrets: Some(ClusterSecrets {
                    ca_cert: ca.cert_pem.clone(),
                    ca_key: ca.key_pem().to_owned(),
                    worker_join: Some(worker_join),
                    manager_join: Some(manager_join),
                    unlock_key: unlock_key.as_ref().map(ToString::to_string),
                }),
            })
            .await
            .map_err(|e| msg(format!("committing the cluster: {e}")))?;
        manager
            .propose(Command::AddNode {
                id: node_id.clone(),
                hostname: at.hostname.clone(),
                addr: at.addr,
                api_addr: Some(at.api_addr.clone()),
                role: Role::Manager,
                underlay: at.underlay.clone(),
            })
            .await
            .map_err(|e| msg(format!("adding this node: {e}")))?;
        creds.save(&certs_dir(dir))?;
        file.save(dir)?;
        Ok::<(), DaemonError>(())
    };
    if let Err(e) = setup.await {
        daemon.stop().await;
        return Err(e);
    }
    Ok((
        daemon,
        InitReport {
            node_id,
            worker_token,
            manager_token,
            unlock_key,
        },
    ))
}

/// Joins the cluster `remote` (a manager's API address) with `token`, then
/// serves. A manager token makes this node a Raft voter.
pub async fn join(
    dir: &Path,
    at: &Addresses,
    token: &str,
    remote: &str,
) -> Result<Daemon, DaemonError> {
    join_with(dir, at, token, remote, &ManagerConfig::default()).await
}

/// [`join`], with the configuration this node's manager (if it becomes
/// one) starts with.
pub async fn join_with(
    dir: &Path,
    at: &Addresses,
    token: &str,
    remote: &str,
    config: &ManagerConfig,
) -> Result<Daemon, DaemonError> {
    let token: JoinToken = token.parse()?;
    fresh_dir(dir)?;
    let seen = Arc::new(Mutex::new(None));
    let channel = tls::channel(
        remote,
        Trust::Pinned {
            digest: token.ca_digest.clone(),
            seen: seen.clone(),
        },
        Duration::from_secs(10),
    )?;
    let (key, csr) = pki::node_key_and_csr()?;
    let reply = JoinClient::new(channel)
        .join(JoinRequest {
            token: token.to_string(),
            csr,
            hostname: at.hostname.clone(),
            addr: at.addr.to_string(),
            api_addr: at.api_addr.clone(),
            underlay: at.underlay.iter().map(ToString::to_string).collect(),
        })
        .await;
    let reply = match reply {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if let Some(ca) = seen.lock().expect("seen lock").clone()
                && ca.digest != token.ca_digest
            {
                return Err(pki::PkiError::CaMismatch {
                    expected: token.ca_digest.clone(),
                    presented: ca.digest,
                }
                .into());
            }
            return Err(msg(format!(
                "joining through {remote} failed: {}",
                status_text(&status)
            )));
        }
    };
    token.check_ca(&reply.ca)?;
    let creds = Credentials {
        ca: reply.ca,
        cert: reply.cert,
        key,
    };
    let role = <Role as proto::convert::FromWire>::from_wire(reply.role, "role")
        .map_err(|e| msg(format!("{remote} answered the join with {e}")))?;
    let file = NodeFile {
        node_id: reply.node_id.clone(),
        cluster_id: reply.cluster_id,
        hostname: at.hostname.clone(),
        addr: at.addr,
        listen_addr: at.listen_addr,
        api_addr: at.api_addr.clone(),
        managers: reply.managers,
    };
    let creds_arc = Arc::new(RwLock::new(creds.clone()));
    let manager = if role == Role::Manager {
        let keys = if reply.unlock_key.is_empty() {
            DataKeys::create(dir, false)?
        } else {
            DataKeys::create_locked_by(dir, &reply.unlock_key.parse()?)?
        };
        let id = raft_id(&reply.node_id).ok_or_else(|| msg("the manager sent a bad node id"))?;
        Some(
            start_manager(id, dir, keys.data, creds_arc.clone(), config)
                .await
                .map_err(msg)?,
        )
    } else {
        None
    };
    creds.save(&certs_dir(dir))?;
    file.save(dir)?;
    Daemon::serve(dir, &file, creds_arc, manager, config).await
}

/// How a locked data dir gets its unlock key.
pub enum Unlock {
    /// Given on the command line / stdin.
    Key(UnlockKey),
    /// Wait for `meshd unlock` on `<data-dir>/unlock.sock`.
    Wait,
}

/// Starts a node from its data dir.
pub async fn run(dir: &Path, unlock: Unlock) -> Result<Daemon, DaemonError> {
    run_with(dir, unlock, &ManagerConfig::default()).await
}

/// [`run`], with this node's manager configuration.
pub async fn run_with(
    dir: &Path,
    unlock: Unlock,
    config: &ManagerConfig,
) -> Result<Daemon, DaemonError> {
    let file = NodeFile::load(dir)?;
    let creds = Credentials::load(&certs_dir(dir))?;
    let id = pki::identity(&creds.cert, &creds.ca, pki::now())?;
    let creds_arc = Arc::new(RwLock::new(creds));
    let manager = if id.role == Role::Manager && dir.join("raft.redb").exists() {
        let keys = open_keys(dir, unlock).await?;
        let rid = raft_id(&file.node_id).ok_or_else(|| msg("node.json has a bad node id"))?;
        Some(
            start_manager(rid, dir, keys.data, creds_arc.clone(), config)
                .await
                .map_err(msg)?,
        )
    } else {
        None
    };
    Daemon::serve(dir, &file, creds_arc, manager, config).await
}

/// The unlock socket: in its own 0700 directory, so that no other user
/// can reach it at any moment (a socket's own mode is set only after
/// `bind`, and the process-wide umask can't be changed safely while other
/// threads create files).
pub fn unlock_socket(dir: &Path) -> PathBuf {
    dir.join("unlock").join("unlock.sock")
}

async fn open_keys(dir: &Path, unlock: Unlock) -> Result<DataKeys, DaemonError> {
    match unlock {
        Unlock::Key(k) => Ok(DataKeys::load(dir, Some(&k))?),
        Unlock::Wait => match DataKeys::load(dir, None) {
            Err(SealError::Locked) => wait_for_unlock(dir).await,
            other => Ok(other?),
        },
    }
}

/// How long an unlock client may take to send its key line, and its most.
const UNLOCK_READ_TIMEOUT: Duration = Duration::from_secs(10);
const UNLOCK_LINE_MAX: u64 = 1024;

/// Serves the unlock socket until a client sends the right key. Clients
/// are served concurrently, each with a read timeout and a bounded line:
/// one that connects and says nothing holds up no one.
async fn wait_for_unlock(dir: &Path) -> Result<DataKeys, DaemonError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = unlock_socket(dir);
    let parent = path
        .parent()
        .expect("the socket has a directory")
        .to_owned();
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&parent)
        .map_err(|e| msg(format!("{}: {e}", parent.display())))?;
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| msg(format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| msg(format!("{}: {e}", path.display())))?;
    tracing::warn!(
        "this manager is locked (autolock): run `meshd unlock --data-dir {}` with the unlock key",
        dir.display()
    );
    let (found, mut unlocked) = tokio::sync::mpsc::channel::<DataKeys>(1);
    loop {
        tokio::select! {
            Some(keys) = unlocked.recv() => {
                let _ = std::fs::remove_dir_all(&parent);
                return Ok(keys);
            }
            accepted = listener.accept() => {
                let (stream, _) = accepted.map_err(|e| msg(format!("{}: {e}", path.display())))?;
                tokio::spawn(serve_unlock(stream, dir.to_owned(), found.clone()));
            }
        }
    }
}

/// One unlock client: a key line in, "ok" or "error: ..." out.
async fn serve_unlock(
    stream: tokio::net::UnixStream,
    dir: PathBuf,
    found: tokio::sync::mpsc::Sender<DataKeys>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r.take(UNLOCK_LINE_MAX));
    let read = reader.read_line(&mut line);
    let answer = match tokio::time::timeout(UNLOCK_READ_TIMEOUT, read).await {
        Err(_) => Err(format!(
            "no key line within {} s",
            UNLOCK_READ_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) => line
            .trim()
            .parse::<UnlockKey>()
            .and_then(|k| DataKeys::load(&dir, Some(&k)))
            .map_err(|e| e.to_string()),
    };
    match answer {
        Ok(keys) => {
            let _ = w.write_all(b"ok\n").await;
            let _ = found.send(keys).await;
        }
        Err(e) => {
            let _ = w.write_all(format!("error: {e}\n").as_bytes()).await;
        }
    }
}

/// Sends an unlock key to a waiting `meshd run` (`meshd unlock`).
pub async fn send_unlock(dir: &Path, key: &str) -> Result<(), DaemonError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let path = unlock_socket(dir);
    let stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        msg(format!(
            "{}: {e} (is meshd running and waiting to be unlocked?)",
            path.display()
        ))
    })?;
    let (r, mut w) = stream.into_split();
    w.write_all(format!("{}\n", key.trim()).as_bytes())
        .await
        .map_err(|e| msg(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(r)
        .read_line(&mut line)
        .await
        .map_err(|e| msg(e.to_string()))?;
    match line.trim() {
        "ok" => Ok(()),
        other => Err(msg(other.trim_start_matches("error: ").to_owned())),
    }
}

impl Daemon {
    async fn serve(
        dir: &Path,
        file: &NodeFile,
        creds: Arc<RwLock<Credentials>>,
        manager: Option<Arc<Manager>>,
        config: &ManagerConfig,
    ) -> Result<Daemon, DaemonError> {
        let current = creds.read().expect("creds lock").clone();
        let ctx = Arc::new(Ctx {
            manager_config: *config,
            removed: tokio::sync::watch::Sender::new(None),
            node_id: file.node_id.clone(),
            cluster_id: file.cluster_id.clone(),
            ca_der: current.ca_bytes()?,
            api_addr: file.api_addr.clone(),
            creds,
            manager: RwLock::new(manager),
            managers: RwLock::new(file.managers.clone()),
            checked: Default::default(),
            tasks_dir: Some(dir.join("tasks")),
        });
        let tls = tls::Server::new(&current)?;
        let listener = TcpListener::bind(file.listen_addr)
            .await
            .map_err(|e| msg(format!("listening on {}: {e}", file.listen_addr)))?;
        let (stop, mut stopped) = watch::channel(false);
        let limits = crate::ca::gate::Limits::default();
        let certs = Arc::new(crate::ca::gate::CertCheck::new(ctx.ca_der.clone()));
        let incoming = tls.incoming(
            listener,
            crate::ca::gate::Admission::new(limits, certs.clone()),
        );
        // gRPC server reflection, so that grpcurl and other clients can
        // list and call the typed API (with a node certificate: the gate
        // keeps anonymous connections to Join).
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| msg(format!("building the reflection service: {e}")))?;
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.streams)
            .http2_max_header_list_size(16 << 10)
            .layer(crate::ca::gate::AnonymousGate(certs))
            .layer(crate::deadline::DeadlineLayer)
            .layer(crate::reply::BoundStatusLayer)
            .add_service(
                RaftServer::new(RaftService(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(
                JoinServer::new(JoinService(ctx.clone()))
                    .max_decoding_message_size(crate::ca::gate::JOIN_MESSAGE),
            )
            .add_service(
                DispatcherServer::new(DispatcherService(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            )
            .add_service(reflection)
            .add_service(MemberServer::new(MemberService(ctx.clone())))
            .add_service(
                ClusterServer::new(ClusterService(ctx.clone()))
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            );
        let mut stop_server = stopped.clone();
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop_server.wait_for(|s| *s).await;
            };
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                tracing::error!("gRPC server: {e}");
            }
        });
        let tls = Arc::new(tls);
        let upkeep = {
            let ctx = ctx.clone();
            let dir = dir.to_owned();
            let file = file.clone();
            tokio::spawn(async move {
                let mut u = Upkeep {
                    ctx,
                    dir,
                    file,
                    tls,
                    next: 0,
                    failures: 0,
                };
                loop {
                    u.tick().await;
                    tokio::select! {
                        _ = stopped.wait_for(|s| *s) => return,
                        () = tokio::time::sleep(UPKEEP_PERIOD) => {}
                    }
                }
            })
        };
        Ok(Daemon {
            ctx,
            dir: dir.to_owned(),
            server,
            upkeep,
            agent: None,
            stop,
        })
    }

    /// Starts this node's agent, which feeds `sink` (the data plane) from
    /// the leader's dispatcher. The returned ends connect the node's
    /// executor: the tasks assigned to it, and where its reports go.
    /// `underlay` follows the prefixes on the node's underlay interface;
    /// the agent reports their changes.
    pub fn start_agent<S: Sink>(
        &mut self,
        sink: S,
        underlay: Option<tokio::sync::watch::Receiver<Vec<crate::allocator::Subnet>>>,
    ) -> TaskLink {
        let mut agent = Agent::new(self.ctx.clone(), sink, Some(self.dir.clone()));
        if let Some(rx) = underlay {
            agent.follow_underlay(rx);
        }
        let reports = agent.task_reports();
        let assignments = agent.assignments();
        let removed = self.ctx.removed.subscribe();
        let stop = self.stop.subscribe();
        if let Some(old) = self.agent.replace(tokio::spawn(agent.run(stop))) {
            old.abort();
        }
        TaskLink {
            reports,
            assignments,
            removed,
        }
    }

    /// Stops serving and shuts Raft down.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.upkeep.await;
        if let Some(agent) = self.agent {
            let _ = agent.await;
        }
        // Dispatcher sessions are open streams the server waits for: end
        // them first.
        if let Some(m) = self.ctx.manager.read().expect("manager lock").as_ref() {
            m.begin_shutdown();
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), self.server).await;
        let m = self.ctx.manager.write().expect("manager lock").take();
        if let Some(m) = m {
            m.shutdown().await;
        }
    }
}

/// What connects a node's executor to its agent.
pub struct TaskLink {
    /// Reports on this node's tasks, for the dispatcher.
    pub reports: tokio::sync::mpsc::UnboundedSender<model::session::TaskReport>,
    /// The tasks the leader assigns this node.
    pub assignments: tokio::sync::watch::Receiver<Option<Vec<model::session::Assignment>>>,
    /// Some (the manager's words) once the cluster has removed this node.
    pub removed: tokio::sync::watch::Receiver<Option<String>>,
}

/// How often a node checks its standing (role, certificate, membership).
pub const UPKEEP_PERIOD: Duration = Duration::from_secs(2);

struct Upkeep {
    ctx: Arc<Ctx>,
    dir: PathBuf,
    file: NodeFile,
    tls: Arc<tls::Server>,
    /// Which manager to ask next (rotates on failure).
    next: usize,
    /// Failed checks in a row.
    failures: u32,
}

impl Upkeep {
    /// Managers to ask, the others before this one: a manager that just
    /// joined has no state to answer with yet.
    fn managers(&self) -> Vec<String> {
        let mut list: Vec<String> = self
            .file
            .managers
            .iter()
            .filter(|a| **a != self.file.api_addr)
            .cloned()
            .collect();
        if self.ctx.manager.read().expect("manager lock").is_some() {
            list.push(self.file.api_addr.clone());
        }
        list
    }

    fn channel(&mut self) -> Option<(String, tonic::transport::Channel)> {
        let managers = self.managers();
        if managers.is_empty() {
            return None;
        }
        let addr = managers[self.next % managers.len()].clone();
        tls::channel(
            &addr,
            Trust::Node(self.ctx.creds.clone()),
            Duration::from_secs(3),
        )
        .ok()
        .map(|c| (addr, c))
    }

    async fn tick(&mut self) {
        match self.check().await {
            Ok(()) => self.failures = 0,
            Err(e) => {
                // One manager restarting or catching up is routine; say so
                // only when it goes on.
                self.failures += 1;
                if self.failures >= 3 {
                    tracing::warn!("upkeep: {e}");
                } else {
                    tracing::debug!("upkeep: {e}");
                }
                self.next += 1;
            }
        }
    }

    async fn check(&mut self) -> Result<(), String> {
        let Some((addr, channel)) = self.channel() else {
            return Ok(());
        };
        let who: Whoami = match MemberClient::new(channel.clone()).whoami(Empty {}).await {
            Ok(r) => Whoami::try_from(r.into_inner())
                .map_err(|e| format!("{addr} answered an invalid record of this node: {e}"))?,
            Err(s) => {
                if crate::grpc::is_removal(&s) {
                    self.ctx.removed.send_replace(Some(status_text(&s)));
                }
                return Err(format!(
                    "asking {addr} about this node: {}",
                    status_text(&s)
                ));
            }
        };
        if who.managers != self.file.managers && !who.managers.is_empty() {
            self.file.managers = who.managers.clone();
            *self.ctx.managers.write().expect("managers lock") = who.managers.clone();
            let _ = self.file.save(&self.dir);
        }
        let creds = self.ctx.creds.read().expect("creds lock").clone();
        let me = pki::identity(&creds.cert, &creds.ca, pki::now()).map_err(|e| e.to_string())?;
        let lifetime = Duration::from_secs((me.not_after - pki::now()).max(0) as u64);
        let role_changed = me.role != who.node.spec.role;
        // The cluster's setting, as the managers report it (workers have
        // no state of their own); a manager without settings yet sends 0.
        let settings_lifetime = if who.cert_lifetime_secs > 0 {
            Duration::from_secs(who.cert_lifetime_secs)
        } else {
            lifetime
        };
        if role_changed || pki::needs_renewal(me.not_after, pki::now(), settings_lifetime) {
            self.renew(channel.clone()).await?;
        }
        let role = who.node.spec.role;
        let running = self.ctx.manager.read().expect("manager lock").clone();
        match (role, running) {
            (Role::Manager, None) => {
                // Keys only where none exist: never overwrite a data key.
                let keys = if self.dir.join("keys").exists() {
                    DataKeys::load(&self.dir, None).map_err(|e| e.to_string())?
                } else {
                    DataKeys::create(&self.dir, false).map_err(|e| e.to_string())?
                };
                let id = raft_id(&self.file.node_id).ok_or("bad node id")?;
                let m = start_manager(
                    id,
                    &self.dir,
                    keys.data,
                    self.ctx.creds.clone(),
                    &self.ctx.manager_config,
                )
                .await?;
                *self.ctx.manager.write().expect("manager lock") = Some(m);
                tracing::info!("promoted: Raft started");
            }
            (Role::Worker, Some(m)) => {
                // Demoted (and already out of the voters): stop Raft and
                // drop the store, which a worker must not keep.
                *self.ctx.manager.write().expect("manager lock") = None;
                m.shutdown().await;
                let _ = std::fs::remove_file(self.dir.join("raft.redb"));
                tracing::info!("demoted: Raft stopped");
            }
            _ => {}
        }
        // A manager that is not yet a voter asks to become one.
        let m = self.ctx.manager.read().expect("manager lock").clone();
        if let Some(m) = m
            && role == Role::Manager
        {
            let voter = m
                .metrics()
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == m.raft_id);
            if !voter {
                ClusterClient::new(channel)
                    .add_manager(AddManagerRequest {
                        node_id: self.file.node_id.clone(),
                        api_addr: self.file.api_addr.clone(),
                    })
                    .await
                    .map_err(|s| format!("joining the Raft voters: {}", status_text(&s)))?;
                tracing::info!("added to the Raft voters");
            }
        }
        Ok(())
    }

    async fn renew(&mut self, channel: tonic::transport::Channel) -> Result<(), String> {
        let (key, csr) = pki::node_key_and_csr().map_err(|e| e.to_string())?;
        let reply = MemberClient::new(channel)
            .renew(RenewRequest { csr })
            .await
            .map_err(|s| format!("renewing the certificate: {}", status_text(&s)))?
            .into_inner();
        let mut creds = self.ctx.creds.read().expect("creds lock").clone();
        creds.cert = reply.cert;
        creds.key = key;
        creds
            .save(&certs_dir(&self.dir))
            .map_err(|e| e.to_string())?;
        self.tls.cert.set(&creds).map_err(|e| e.to_string())?;
        *self.ctx.creds.write().expect("creds lock") = creds;
        if let Some(m) = self.ctx.manager.read().expect("manager lock").as_ref() {
            m.peers.reset();
        }
        tracing::info!(
            "certificate renewed (role {})",
            proto::Role::try_from(reply.role).map_or("unknown", |r| r.as_str_name())
        );
        Ok(())
    }
}

#[cfg(test)]
mod ingress_tests {
    use super::*;

    fn at(addr: [u8; 4], underlay: &[&str]) -> Addresses {
        Addresses {
            hostname: "h".into(),
            addr: addr.into(),
            listen_addr: "127.0.0.1:2377".parse().unwrap(),
            api_addr: "127.0.0.1:2377".into(),
            underlay: underlay.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    /// A first node on 10.0.0.0/16 once got ingress 10.0.0.0/24 and its own
    /// join was then refused after Init had committed: now ingress moves.
    #[test]
    fn the_ingress_subnet_stays_off_the_first_nodes_underlay() {
        let got = |a| ingress_subnet_for(&a).unwrap().to_string();
        assert_eq!(got(at([198, 18, 0, 1], &["198.18.0.0/24"])), "10.0.0.0/24");
        assert_eq!(got(at([10, 0, 3, 7], &["10.0.0.0/16"])), "10.1.0.0/24");
        // Its address alone (no local interface holds it) counts too.
        assert_eq!(got(at([10, 0, 0, 9], &[])), "10.0.1.0/24");
        let err = ingress_subnet_for(&at([10, 0, 0, 1], &["10.0.0.0/8"])).unwrap_err();
        assert!(
            err.to_string().contains("no /24 of the address pool"),
            "{err}"
        );
    }
}
