//! `meshd init`: a new cluster (CA, this node's manager certificate, join
//! tokens, the Raft state with the ingress network); and what a first
//! start (init or join) needs: the node's addresses, a fresh data dir.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use mtls::datadir::{NODE_FILE, NodeFile, certs_dir};

use super::{
    error::{DaemonError, msg},
    manager::start_manager,
    serve::Daemon,
};
use crate::{
    api,
    ca::{
        pki::{self, Ca, JoinToken},
        tls::Credentials,
    },
    raft::{
        manager::{ManagerConfig, raft_id},
        seal::{DataKeys, UnlockKey},
    },
    state::{ClusterSecrets, ClusterSettings, Command, Role},
};

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

pub(super) fn fresh_dir(dir: &Path) -> Result<(), DaemonError> {
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
    /// The ingress network's subnet (every node takes one address of it):
    /// by default Swarm's 10.0.0.0/24, room for 253 nodes.
    pub ingress_subnet: Option<crate::allocator::Subnet>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            autolock: false,
            cert_lifetime: pki::DEFAULT_CERT_LIFETIME,
            heartbeat: Duration::from_secs(1),
            heartbeat_misses: 3,
            network_key_rotation: crate::keys::DEFAULT_ROTATION,
            ingress_subnet: None,
        }
    }
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

/// The ingress subnet for a cluster whose first node is `at`: `wanted`
/// if given (refused if it overlaps that node's underlay), else Swarm's
/// 10.0.0.0/24, or the first /24 of the address pool off that node's
/// underlay (its prefixes and its address).
pub(super) fn ingress_subnet_for(
    at: &Addresses,
    wanted: Option<crate::allocator::Subnet>,
) -> Result<crate::allocator::Subnet, DaemonError> {
    use crate::allocator::{Subnet, SubnetPool};
    let defaults = ClusterSettings::default();
    let mut avoid = at.underlay.clone();
    avoid.push(Subnet::containing(at.addr, 32));
    if let Some(s) = wanted {
        if s.prefix() > 29 {
            return Err(msg(format!(
                "the ingress subnet {s} is too small: every node takes one address of it; \
                 use /29 or larger"
            )));
        }
        if let Some(p) = avoid.iter().find(|p| p.overlaps(&s)) {
            return Err(msg(format!(
                "the ingress subnet {s} overlaps this node's underlay ({p}): tasks and nodes \
                 there would be unreachable; choose another --ingress-subnet"
            )));
        }
        return Ok(s);
    }
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
    let ingress_subnet = ingress_subnet_for(at, opts.ingress_subnet)?;
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
    let manager = start_manager(id, dir, keys.data, creds_arc.clone(), config).await?;
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
        manager.bootstrap(&at.api_addr).await?;
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
