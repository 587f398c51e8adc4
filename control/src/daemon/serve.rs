//! [`Daemon`]: a running node (its gRPC server, upkeep loop and agent),
//! and [`TaskLink`], what connects its executor to the agent.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use mtls::datadir::NodeFile;
use proto::{
    cluster_server::ClusterServer, dispatcher_server::DispatcherServer, join_server::JoinServer,
    member_server::MemberServer, raft_server::RaftServer,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use super::{
    error::{DaemonError, msg},
    upkeep::{UPKEEP_PERIOD, Upkeep},
};
use crate::{
    agent::{Agent, Sink},
    api::{ClusterService, Ctx, JoinService, MemberService, RaftService},
    ca::tls::{self, Credentials},
    dispatcher::DispatcherService,
    grpc::MAX_MESSAGE,
    raft::manager::{Manager, ManagerConfig},
};

/// A running node: its server and upkeep loop.
pub struct Daemon {
    pub ctx: Arc<Ctx>,
    pub dir: PathBuf,
    server: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    agent: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Daemon {
    pub(super) async fn serve(
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
