//! A node's context, shared by its gRPC services, its agent and its
//! upkeep: who this node is, its credentials, the managers it knows, and its
//! manager (if it is one). It also checks a caller's certificate.

use std::sync::{Arc, RwLock};

use proto::cluster_client::ClusterClient;
use tonic::{Request, Response, Status};

use crate::{
    ca::pki::{self, Identity},
    ca::tls::Credentials,
    raft::manager::Manager,
    state::Role,
};

/// What every service needs: who this node is, and its manager (if any).
pub struct Ctx {
    pub node_id: String,
    pub cluster_id: String,
    pub ca_der: Vec<u8>,
    pub api_addr: String,
    pub creds: Arc<RwLock<Credentials>>,
    pub manager: RwLock<Option<Arc<Manager>>>,
    /// The managers' API addresses, as last heard (kept by the upkeep loop).
    pub managers: RwLock<Vec<String>>,
    /// Certificates already checked (signature, names), by their DER; the
    /// validity window is still checked on every call.
    pub checked: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Identity>>,
    /// Where this node's executor keeps its tasks' files (`<id>/output.log`).
    pub tasks_dir: Option<std::path::PathBuf>,
    /// Set, with a manager's words, once the cluster has removed this
    /// node (the agent or the upkeep loop hears it first).
    pub removed: tokio::sync::watch::Sender<Option<String>>,
    /// What this node's manager starts with (now or when promoted).
    pub manager_config: crate::raft::manager::ManagerConfig,
}

impl Ctx {
    pub fn manager(&self) -> Result<Arc<Manager>, Status> {
        self.manager
            .read()
            .expect("manager lock")
            .clone()
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "node {} is not a manager: worker nodes can't view or modify cluster state; \
                 use a manager's address",
                    self.node_id
                ))
            })
    }

    /// The caller's identity, from its certificate.
    pub(crate) fn identify<T>(&self, req: &Request<T>) -> Result<Identity, Status> {
        let certs = req.peer_certs().filter(|c| !c.is_empty()).ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: this call needs a mesh node certificate \
                 (meshctl on a manager uses the one in its data dir; elsewhere pass --cert and --key)",
            )
        })?;
        let cached = self
            .checked
            .lock()
            .expect("checked lock")
            .get(certs[0].as_ref())
            .cloned();
        let id = match cached {
            Some(id) if id.not_after >= pki::now() => id,
            _ => {
                let id = pki::identity_der(&certs[0], &self.ca_der, pki::now()).map_err(|e| {
                    Status::unauthenticated(format!("client certificate refused: {e}"))
                })?;
                let mut checked = self.checked.lock().expect("checked lock");
                if checked.len() >= 4096 {
                    checked.clear();
                }
                checked.insert(certs[0].to_vec(), id.clone());
                id
            }
        };
        if id.cluster_id != self.cluster_id {
            return Err(Status::unauthenticated(format!(
                "client certificate is for cluster {}, not this one ({})",
                id.cluster_id, self.cluster_id
            )));
        }
        if let Some(m) = self.manager.read().expect("manager lock").as_ref()
            && m.with_state(|s| s.removed.contains(&id.node_id))
        {
            return Err(Status::permission_denied(format!(
                "node {} has been removed from the cluster; its certificate is no longer accepted. \
                 To come back it must join again with a token",
                id.node_id
            )));
        }
        Ok(id)
    }

    /// The caller, who must hold a manager certificate; and our manager.
    pub(crate) fn require_manager<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(Identity, Arc<Manager>), Status> {
        let id = self.identify(req)?;
        if id.role != Role::Manager {
            return Err(Status::permission_denied(format!(
                "node {} holds a worker certificate: worker nodes can't view or modify cluster \
                 state; run meshctl on a manager, pass a manager's --cert/--key, or promote the node",
                id.node_id
            )));
        }
        let m = self.manager()?;
        let role = m.with_state(|s| s.nodes.get(&id.node_id).map(|n| n.spec.role));
        if role.is_none() {
            return Err(Status::permission_denied(format!(
                "node {} is not a member of this cluster as this manager sees it; if it has just \
                 joined, retry in a moment",
                id.node_id
            )));
        }
        if role == Some(Role::Worker) {
            return Err(Status::permission_denied(format!(
                "node {} has been demoted to worker; its manager certificate is no longer accepted",
                id.node_id
            )));
        }
        Ok((id, m))
    }

    /// Runs `f` against the leader's Cluster API with this node's
    /// certificate (for calls that only the leader can serve).
    pub(crate) async fn on_leader<T, F, Fut>(&self, m: &Manager, f: F) -> Result<T, Status>
    where
        F: FnOnce(ClusterClient<tonic::transport::Channel>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let (_, addr) = m.leader(std::time::Duration::from_secs(3)).await?;
        let channel = m.peers.channel(&addr)?;
        f(ClusterClient::new(channel))
            .await
            .map(Response::into_inner)
    }
}
