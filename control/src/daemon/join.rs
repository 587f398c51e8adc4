//! `meshd join`: a certificate from a manager (the CA pinned by the join
//! token), and a Raft voter's store when the token is a manager's.

use std::{
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use mtls::datadir::{NodeFile, certs_dir};
use proto::{JoinRequest, join_client::JoinClient};

use super::{
    error::{DaemonError, msg},
    init::{Addresses, fresh_dir},
    manager::start_manager,
    serve::Daemon,
};
use crate::{
    ca::{
        pki::{self, JoinToken},
        tls::{self, Credentials, Trust},
    },
    grpc::status_text,
    raft::{
        manager::{ManagerConfig, raft_id},
        seal::DataKeys,
    },
    state::Role,
};

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
        Some(start_manager(id, dir, keys.data, creds_arc.clone(), config).await?)
    } else {
        None
    };
    creds.save(&certs_dir(dir))?;
    file.save(dir)?;
    Daemon::serve(dir, &file, creds_arc, manager, config).await
}
