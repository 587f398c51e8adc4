//! `Raft`: consensus traffic between managers, as openraft's own
//! messages in the internal encoding. Manager certificates only, from
//! nodes the state does not list as workers.

use std::sync::Arc;

use proto::{Internal, raft_server};
use tonic::{Request, Response, Status};

use super::{Ctx, internal, parse_internal};
use crate::{raft::manager::Manager, state::Role};

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<Internal>, Status> {
    internal(v).map(Response::new)
}

pub struct RaftService(pub Arc<Ctx>);

impl RaftService {
    fn manager<T>(&self, req: &Request<T>) -> Result<Arc<Manager>, Status> {
        let id = self.0.identify(req)?;
        if id.role != Role::Manager {
            return Err(Status::permission_denied(format!(
                "node {} holds a worker certificate and cannot take part in Raft",
                id.node_id
            )));
        }
        let m = self.0.manager()?;
        // A node this manager does not know yet may be a manager that just
        // joined; one it knows as a worker was demoted and keeps out.
        if m.with_state(|s| {
            s.nodes
                .get(&id.node_id)
                .is_some_and(|n| n.spec.role == Role::Worker)
        }) {
            return Err(Status::permission_denied(format!(
                "node {} has been demoted to worker and cannot take part in Raft",
                id.node_id
            )));
        }
        Ok(m)
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn append_entries(&self, req: Request<Internal>) -> Result<Response<Internal>, Status> {
        let m = self.manager(&req)?;
        let rpc = parse_internal("append-entries request", req.get_ref())?;
        reply(&m.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<Internal>) -> Result<Response<Internal>, Status> {
        let m = self.manager(&req)?;
        let rpc = parse_internal("vote request", req.get_ref())?;
        reply(&m.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Internal>) -> Result<Response<Internal>, Status> {
        let m = self.manager(&req)?;
        let rpc = parse_internal("install-snapshot request", req.get_ref())?;
        reply(&m.raft.install_snapshot(rpc).await)
    }
}
