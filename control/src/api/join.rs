//! `Join`: a node presents a join token (its secret is the credential;
//! no client certificate) and a CSR, and gets its certificate, its id and
//! the managers' addresses. Nothing is recorded for a request refused.

use std::{net::Ipv4Addr, sync::Arc};

use proto::{JoinRequest, JoinResponse, join_server};
use tonic::{Request, Response, Status};

use super::{Ctx, manager_addrs, new_node_id};
use crate::{
    ca::pki::{self, Ca, JoinToken},
    state::{Command, Role},
};

pub struct JoinService(pub Arc<Ctx>);

/// Which role a presented token grants, comparing in constant time.
fn token_role(token: &JoinToken, secrets: &crate::state::ClusterSecrets) -> Option<Role> {
    [Role::Worker, Role::Manager]
        .into_iter()
        .find(|&role| secrets.join(role).is_some_and(|r| token.check(r).is_ok()))
}

#[tonic::async_trait]
impl join_server::Join for JoinService {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let m = self.0.manager()?;
        let r = req.into_inner();
        let token: JoinToken = r
            .token
            .parse()
            .map_err(|e: pki::PkiError| Status::invalid_argument(e.to_string()))?;
        let (secrets, settings, cluster_id) =
            m.with_state(|s| (s.secrets.clone(), s.settings.clone(), s.cluster_id.clone()));
        let (Some(secrets), Some(settings), Some(cluster_id)) = (secrets, settings, cluster_id)
        else {
            return Err(Status::unavailable(
                "this manager has not received the cluster state yet; try again",
            ));
        };
        token
            .check_ca(&secrets.ca_cert)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let role = token_role(&token, &secrets).ok_or_else(|| {
            Status::permission_denied(
                "the join token is not valid for this cluster: it is wrong, or it was rotated. \
                 Get the current one with `meshctl swarm join-token worker|manager`",
            )
        })?;
        let addr: Ipv4Addr = r.addr.parse().map_err(|_| {
            Status::invalid_argument(format!("node address {:?} is not an IPv4 address", r.addr))
        })?;
        crate::state::check_hostname(&r.hostname)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if crate::state::looks_like_node_id(&r.hostname)
            || m.with_state(|s| s.nodes.contains_key(&r.hostname))
        {
            return Err(Status::invalid_argument(format!(
                "hostname {:?} looks like a node id (16 hex digits); a node's hostname may \
                 never be mistaken for another node's id: join with another --hostname",
                r.hostname
            )));
        }
        if r.api_addr.is_empty() {
            return Err(Status::invalid_argument(
                "a joining node must give the address it serves gRPC on (--advertise-addr)",
            ));
        }
        let underlay = r
            .underlay
            .iter()
            .map(|p| {
                p.parse::<crate::allocator::Subnet>()
                    .map_err(|e| Status::invalid_argument(format!("underlay prefix {p:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if underlay.len() > crate::state::MAX_UNDERLAY_PREFIXES {
            return Err(Status::invalid_argument(
                "a node reports at most 64 underlay prefixes",
            ));
        }
        let node_id = new_node_id();
        let lifetime = std::time::Duration::from_secs(settings.cert_lifetime_secs);
        // Sign first: a bad request must not leave a node record behind.
        let cert = Ca::from_pem(&secrets.ca_cert, &secrets.ca_key)
            .issue(&r.csr, &cluster_id, &node_id, role, lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        m.propose(Command::AddNode {
            id: node_id.clone(),
            hostname: r.hostname,
            addr,
            api_addr: Some(r.api_addr),
            role,
            underlay,
        })
        .await?;
        let managers = m.with_state(manager_addrs);
        Ok(Response::new(JoinResponse {
            node_id,
            role: proto::Role::from(role).into(),
            cluster_id,
            cert,
            ca: secrets.ca_cert.clone(),
            managers,
            unlock_key: match role {
                Role::Manager => secrets.unlock_key.clone().unwrap_or_default(),
                Role::Worker => String::new(),
            },
        }))
    }
}
