//! `Member`: what any node certificate may ask about itself (its record,
//! a renewed certificate), and a task's log from the node that ran it
//! (manager certificates only), with the client side managers use to
//! fetch one.

use std::sync::Arc;

use proto::{Empty, Ref, RenewRequest, RenewResponse, member_server};
use tonic::{Request, Response, Status};

use super::{Ctx, Whoami, manager_addrs};
use crate::{ca::pki::Ca, state::Role};

/// The most of one task's log a call returns (its end).
const LOG_TAIL_BYTES: u64 = 1 << 20;

/// The end of task `id`'s log under `dir`.
pub(super) fn read_task_log(dir: &std::path::Path, id: &str) -> Result<String, Status> {
    use std::io::{Read as _, Seek as _};
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(Status::invalid_argument(format!("{id:?} is not a task id")));
    }
    let path = dir.join(id).join("output.log");
    let mut f = std::fs::File::open(&path).map_err(|e| {
        Status::not_found(format!(
            "task {id} has no log on this node ({}): {e}",
            path.display()
        ))
    })?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > LOG_TAIL_BYTES {
        f.seek(std::io::SeekFrom::Start(len - LOG_TAIL_BYTES))
            .map_err(|e| Status::internal(e.to_string()))?;
    }
    let mut raw = Vec::new();
    f.read_to_end(&mut raw)
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// Task `id`'s log from the node at `api` (mTLS, this node's certificate).
pub(super) async fn fetch_log(
    ctx: &Ctx,
    node: &str,
    api: Option<&str>,
    id: &str,
) -> Result<String, Status> {
    let api = api.ok_or_else(|| Status::unavailable("the node has no API address"))?;
    let channel = crate::ca::tls::node_channel(
        api,
        ctx.creds.clone(),
        node,
        std::time::Duration::from_secs(2),
    )
    .map_err(|e| Status::unavailable(e.to_string()))?;
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        proto::member_client::MemberClient::new(channel)
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE)
            .task_logs(Ref { target: id.into() }),
    )
    .await
    .map_err(|_| Status::deadline_exceeded("no answer within 5 s"))??;
    Ok(reply.into_inner().text)
}

pub struct MemberService(pub Arc<Ctx>);

#[tonic::async_trait]
impl member_server::Member for MemberService {
    async fn whoami(&self, req: Request<Empty>) -> Result<Response<proto::Whoami>, Status> {
        let id = self.0.identify(&req)?;
        let m = self.0.manager()?;
        let (node, managers, lifetime) = m.with_state(|s| {
            (
                s.nodes.get(&id.node_id).cloned(),
                manager_addrs(s),
                s.settings.as_ref().map_or(0, |x| x.cert_lifetime_secs),
            )
        });
        let node = node.ok_or_else(|| {
            Status::not_found(format!("node {} is not in the cluster state", id.node_id))
        })?;
        Ok(Response::new(
            Whoami {
                node,
                managers,
                cert_lifetime_secs: lifetime,
            }
            .into(),
        ))
    }

    async fn task_logs(&self, req: Request<Ref>) -> Result<Response<proto::TaskLog>, Status> {
        let id = self.0.identify(&req)?;
        if id.role != Role::Manager {
            return Err(Status::permission_denied(
                "task logs are for managers (they may hold secrets)",
            ));
        }
        let dir = self
            .0
            .tasks_dir
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("this node runs no tasks"))?;
        let task = req.into_inner().target;
        let text = read_task_log(dir, &task)?;
        Ok(Response::new(proto::TaskLog {
            id: task,
            text,
            ..Default::default()
        }))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let id = self.0.identify(&req)?;
        let m = self.0.manager()?;
        let (role, secrets, settings) = m.with_state(|s| {
            (
                s.nodes.get(&id.node_id).map(|n| n.spec.role),
                s.secrets.clone(),
                s.settings.clone(),
            )
        });
        let role = role.ok_or_else(|| {
            Status::not_found(format!("node {} is not in the cluster state", id.node_id))
        })?;
        let (Some(secrets), Some(settings)) = (secrets, settings) else {
            return Err(Status::unavailable(
                "the cluster state is not replicated here yet",
            ));
        };
        let cert = Ca::from_pem(&secrets.ca_cert, &secrets.ca_key)
            .issue(
                &req.into_inner().csr,
                &id.cluster_id,
                &id.node_id,
                role,
                std::time::Duration::from_secs(settings.cert_lifetime_secs),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(RenewResponse {
            cert,
            role: proto::Role::from(role).into(),
        }))
    }
}
