//! The node's upkeep loop: every [`UPKEEP_PERIOD`] it asks a manager about
//! itself, follows the managers' list, renews its certificate, starts or
//! stops Raft on a role change, and asks to become a voter.

use std::{path::PathBuf, sync::Arc, time::Duration};

use mtls::datadir::{NodeFile, certs_dir};
use proto::{
    AddManagerRequest, Empty, RenewRequest, cluster_client::ClusterClient,
    member_client::MemberClient,
};

use super::manager::start_manager;
use crate::{
    api::{Ctx, Whoami},
    ca::{
        pki,
        tls::{self, Trust},
    },
    grpc::status_text,
    raft::{manager::raft_id, seal::DataKeys},
    state::Role,
};

/// How often a node checks its standing (role, certificate, membership).
pub const UPKEEP_PERIOD: Duration = Duration::from_secs(2);

/// Why one upkeep check failed: which step, with its cause kept.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpkeepError {
    #[error("{addr} answered an invalid record of this node: {reason}")]
    BadWhoami { addr: String, reason: String },
    #[error("asking {addr} about this node: {status}")]
    Whoami { addr: String, status: String },
    #[error("reading this node's own certificate")]
    OwnCert(#[source] mtls::CertError),
    #[error("making a key and CSR for renewal")]
    Csr(#[source] pki::PkiError),
    #[error("renewing the certificate: {0}")]
    Renew(String),
    #[error("installing the renewed certificate")]
    Install(#[source] tls::TlsError),
    #[error("this node's data keys")]
    Keys(#[source] crate::raft::seal::SealError),
    #[error("node id {0:?} maps to no Raft id")]
    BadNodeId(String),
    #[error("starting Raft after promotion")]
    Start(#[source] crate::raft::manager::StartError),
    #[error("joining the Raft voters: {0}")]
    AddVoter(String),
}

pub(super) struct Upkeep {
    pub(super) ctx: Arc<Ctx>,
    pub(super) dir: PathBuf,
    pub(super) file: NodeFile,
    pub(super) tls: Arc<tls::Server>,
    /// Which manager to ask next (rotates on failure).
    pub(super) next: usize,
    /// Failed checks in a row.
    pub(super) failures: u32,
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

    pub(super) async fn tick(&mut self) {
        match self.check().await {
            Ok(()) => self.failures = 0,
            Err(e) => {
                let e = mtls::client::chain(&e);
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

    async fn check(&mut self) -> Result<(), UpkeepError> {
        let Some((addr, channel)) = self.channel() else {
            return Ok(());
        };
        let who: Whoami = match MemberClient::new(channel.clone()).whoami(Empty {}).await {
            Ok(r) => Whoami::try_from(r.into_inner()).map_err(|e| UpkeepError::BadWhoami {
                addr: addr.clone(),
                reason: e.to_string(),
            })?,
            Err(s) => {
                if crate::grpc::is_removal(&s) {
                    self.ctx.removed.send_replace(Some(status_text(&s)));
                }
                return Err(UpkeepError::Whoami {
                    addr,
                    status: status_text(&s),
                });
            }
        };
        if who.managers != self.file.managers && !who.managers.is_empty() {
            self.file.managers = who.managers.clone();
            *self.ctx.managers.write().expect("managers lock") = who.managers.clone();
            let _ = self.file.save(&self.dir);
        }
        let creds = self.ctx.creds.read().expect("creds lock").clone();
        let me = pki::identity(&creds.cert, &creds.ca, pki::now()).map_err(UpkeepError::OwnCert)?;
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
                    DataKeys::load(&self.dir, None).map_err(UpkeepError::Keys)?
                } else {
                    DataKeys::create(&self.dir, false).map_err(UpkeepError::Keys)?
                };
                let id = raft_id(&self.file.node_id)
                    .ok_or_else(|| UpkeepError::BadNodeId(self.file.node_id.clone()))?;
                let m = start_manager(
                    id,
                    &self.dir,
                    keys.data,
                    self.ctx.creds.clone(),
                    &self.ctx.manager_config,
                )
                .await
                .map_err(UpkeepError::Start)?;
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
                    .map_err(|s| UpkeepError::AddVoter(status_text(&s)))?;
                tracing::info!("added to the Raft voters");
            }
        }
        Ok(())
    }

    async fn renew(&mut self, channel: tonic::transport::Channel) -> Result<(), UpkeepError> {
        let (key, csr) = pki::node_key_and_csr().map_err(UpkeepError::Csr)?;
        let reply = MemberClient::new(channel)
            .renew(RenewRequest { csr })
            .await
            .map_err(|s| UpkeepError::Renew(status_text(&s)))?
            .into_inner();
        let mut creds = self.ctx.creds.read().expect("creds lock").clone();
        creds.cert = reply.cert;
        creds.key = key;
        creds
            .save(&certs_dir(&self.dir))
            .map_err(UpkeepError::Install)?;
        self.tls.cert.set(&creds).map_err(UpkeepError::Install)?;
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
