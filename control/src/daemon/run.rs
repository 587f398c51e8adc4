//! `meshd run`: a node started again from its data dir.

use std::{
    path::Path,
    sync::{Arc, RwLock},
};

use mtls::datadir::{NodeFile, certs_dir};

use super::{
    error::{DaemonError, msg},
    manager::start_manager,
    serve::Daemon,
    unlock::{Unlock, open_keys},
};
use crate::{
    ca::{pki, tls::Credentials},
    raft::manager::{ManagerConfig, raft_id},
    state::Role,
};

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
        Some(start_manager(rid, dir, keys.data, creds_arc.clone(), config).await?)
    } else {
        None
    };
    Daemon::serve(dir, &file, creds_arc, manager, config).await
}
