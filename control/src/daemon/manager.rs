//! Starting this node's manager (Raft), with the dispatcher's liveness
//! check beside it.

use std::{
    path::Path,
    sync::{Arc, RwLock},
};

use crate::{
    ca::tls::Credentials,
    raft::manager::{Manager, ManagerConfig, StartError},
};

/// Starts this node's manager, with the dispatcher's liveness check (which
/// marks silent nodes down) beside it.
pub(super) async fn start_manager(
    id: crate::raft::store::NodeId,
    dir: &Path,
    key: crate::raft::seal::Key,
    creds: Arc<RwLock<Credentials>>,
    config: &ManagerConfig,
) -> Result<Arc<Manager>, StartError> {
    let m = Manager::start(id, dir, key, creds, config).await?;
    m.keep_task(tokio::spawn(crate::dispatcher::liveness(
        Arc::downgrade(&m),
        m.stopping(),
    )));
    Ok(m)
}
