//! `Cluster`: the API `meshctl` drives, for manager certificates only.
//! Reads take the read barrier and say when they may be stale; writes
//! become commands of the state machine (followers forward them to the
//! leader), and answer with the record as committed.

use std::sync::Arc;

use proto::{
    AddManagerRequest, CreateTaskRequest, Empty, Internal, JoinTokenRequest, JoinTokenResponse,
    Ref, Remove, SetRoleRequest, UnlockKeyResponse, UpdateNodeRequest, UpdateServiceRequest,
    cluster_server,
};
use tonic::{Request, Response, Status};

use super::{
    Ctx, Info, KeyRing, NodeView, STALE_HEADER, ServiceView, TaskLog, TaskView, from_wire,
    internal,
    member::{fetch_log, read_task_log},
    new_id, parse_internal, required, role,
};
use crate::{
    ca::pki::{self, JoinToken},
    raft::manager::{Manager, NOT_LEADER, WriteError, raft_id},
    state::{Command, Network, Node, NodeSpec, Outcome, Role, State, TaskState},
};

/// A reply of the model type `M`, as its wire message `P`.
fn reply<M, P: From<M>>(m: M) -> Result<Response<P>, Status> {
    Ok(Response::new(P::from(m)))
}

pub struct ClusterService(pub Arc<Ctx>);

/// A read's reply, marked stale when the read barrier taken before the
/// read (`Manager::read_barrier`) failed.
fn mark<P>(
    reply: Result<Response<P>, Status>,
    barrier: Result<(), String>,
) -> Result<Response<P>, Status> {
    let mut reply = reply?;
    if let Err(why) = barrier
        && let Ok(v) = tonic::metadata::MetadataValue::try_from(why.replace(['\r', '\n'], " "))
    {
        reply.metadata_mut().insert(STALE_HEADER, v);
    }
    Ok(reply)
}

fn node_view(ctx: &Ctx, m: &Manager, node: &Node) -> NodeView {
    NodeView {
        manager_status: raft_id(&node.id).and_then(|id| m.manager_status(id)),
        is_self: node.id == ctx.node_id,
        node: node.clone(),
    }
}

/// Resolves what a user typed to one node: an exact id first (ids are
/// unique, and no hostname may look like one), then an exact hostname,
/// then a unique id prefix. Hostnames need not be unique: a hostname two
/// nodes share is refused with their ids, never resolved to the first.
pub(crate) fn find_node<'a>(s: &'a State, target: &str) -> Result<&'a Node, Status> {
    if let Some(node) = s.nodes.get(target) {
        return Ok(node);
    }
    let ids = |nodes: &[&Node]| {
        nodes
            .iter()
            .map(|n| n.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let named: Vec<&Node> = s.nodes.values().filter(|n| n.hostname == target).collect();
    match named.as_slice() {
        [one] => return Ok(one),
        [] => {}
        many => {
            return Err(Status::invalid_argument(format!(
                "{} nodes are named {target} ({}); use the node id",
                many.len(),
                ids(many)
            )));
        }
    }
    let by_prefix: Vec<&Node> = s
        .nodes
        .values()
        .filter(|n| !target.is_empty() && n.id.starts_with(target))
        .collect();
    match by_prefix.as_slice() {
        [one] => Ok(one),
        [] => Err(Status::not_found(format!("node {target} not found"))),
        many => Err(Status::invalid_argument(format!(
            "node {target} is ambiguous: {} node ids start with it ({}); give more of the id",
            many.len(),
            ids(many)
        ))),
    }
}

/// The record a write committed, as `what` (a service, a network, ...).
fn outcome<M, P: From<M>>(
    o: Outcome,
    what: &str,
    pick: impl FnOnce(Outcome) -> Option<M>,
) -> Result<Response<P>, Status> {
    let text = format!("{o:?}");
    pick(o).map(reply).unwrap_or_else(|| {
        Err(Status::internal(format!(
            "the state machine answered {text} where it commits a {what}"
        )))
    })
}

fn committed_service(o: Outcome) -> Result<Response<proto::Service>, Status> {
    outcome(o, "service", |o| match o {
        Outcome::Service(s) => Some(*s),
        _ => None,
    })
}

fn committed_network(o: Outcome) -> Result<Response<proto::Network>, Status> {
    outcome(o, "network", |o| match o {
        Outcome::Network(n) => Some(n),
        _ => None,
    })
}

fn committed_node(o: Outcome) -> Result<Response<proto::Node>, Status> {
    outcome(o, "node", |o| match o {
        Outcome::Node(n) => Some(n),
        _ => None,
    })
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    async fn info(&self, req: Request<Empty>) -> Result<Response<proto::Info>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let metrics = m.metrics();
        let info = m.with_state(|s| Info {
            cluster_id: self.0.cluster_id.clone(),
            node_id: self.0.node_id.clone(),
            leader: metrics.current_leader.map(|l| format!("{l:016x}")),
            term: metrics.current_term,
            last_applied: metrics.last_applied.map(|l| l.index),
            managers: s
                .nodes
                .values()
                .filter(|n| n.spec.role == Role::Manager)
                .count(),
            nodes: s.nodes.len(),
            services: s.services.len(),
            networks: s.networks.len(),
        });
        reply(info)
    }

    async fn list_nodes(&self, req: Request<Empty>) -> Result<Response<proto::NodeList>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let views: Vec<NodeView> = m.with_state(|s| {
            s.nodes
                .values()
                .map(|n| node_view(&self.0, &m, n))
                .collect()
        });
        mark(reply(views), barrier)
    }

    async fn inspect_node(&self, req: Request<Ref>) -> Result<Response<proto::NodeView>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let target = req.into_inner().target;
        let barrier = m.read_barrier().await;
        let view = m.with_state(|s| find_node(s, &target).map(|n| node_view(&self.0, &m, n)))?;
        mark(reply(view), barrier)
    }

    async fn update_node(
        &self,
        req: Request<UpdateNodeRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let u = req.into_inner();
        let spec: NodeSpec = from_wire(required(u.spec, "the node spec")?, "node spec")?;
        let (id, role) =
            m.with_state(|s| find_node(s, &u.target).map(|n| (n.id.clone(), n.spec.role)))?;
        if spec.role != role {
            return Err(Status::invalid_argument(
                "a node's role changes with `meshctl node promote` or `meshctl node demote`",
            ));
        }
        let out = m
            .propose(Command::UpdateNode {
                id,
                version: u.version,
                spec,
            })
            .await?;
        committed_node(out)
    }

    async fn set_role(
        &self,
        req: Request<SetRoleRequest>,
    ) -> Result<Response<proto::Node>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let r = req.into_inner();
        let role = role(r.role)?;
        if !m.is_leader() {
            let reply = self
                .0
                .on_leader(&m, |mut c| async move { c.set_role(r).await })
                .await?;
            return Ok(Response::new(reply));
        }
        let node = m.with_state(|s| find_node(s, &r.target).cloned())?;
        if node.spec.role == role {
            return reply(node);
        }
        if role == Role::Manager && node.api_addr.is_none() {
            return Err(Status::failed_precondition(format!(
                "node {} has no API address; restart its meshd with --listen-addr so it can serve Raft",
                node.hostname
            )));
        }
        let mut spec = node.spec.clone();
        spec.role = role;
        let update = Command::UpdateNode {
            id: node.id.clone(),
            version: node.version,
            spec: spec.clone(),
        };
        // Check the change against a copy first ("last manager", version),
        // so a refused demotion never touches the Raft membership.
        m.with_state(|s| s.clone().apply(&update))
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        // The role first, then the voter set: the state is the truth, and
        // the leader's voter reconciler (Manager::reconcile_voters) removes
        // a demoted voter if this call fails after the commit. The other
        // order left a node out of the voters that the state still called
        // a manager when the commit failed.
        let out = m.propose(update).await?;
        if role == Role::Worker
            && let Some(id) = raft_id(&node.id)
            && let Err(e) = m.remove_voter(id).await
        {
            tracing::warn!(node = %node.id, "demoted; the leader will remove the voter: {e}");
        }
        committed_node(out)
    }

    async fn remove_node(&self, req: Request<Remove>) -> Result<Response<Empty>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let r = req.into_inner();
        let id = m.with_state(|s| find_node(s, &r.target).map(|n| n.id.clone()))?;
        m.propose(Command::RemoveNode { id, force: r.force })
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn create_network(
        &self,
        req: Request<proto::NetworkSpec>,
    ) -> Result<Response<proto::Network>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let spec: crate::state::NetworkSpec = from_wire(req.into_inner(), "network spec")?;
        if spec.encrypted
            && let Some(check) = self.0.manager_config.encryption_check
            && let Err(why) = check()
        {
            return Err(Status::failed_precondition(format!(
                "network {}: --opt encrypted needs IPsec ESP with AES-GCM (rfc4106) in the kernel, \
                 and this manager's kernel refused it: {why}. Nothing was created; mesh never \
                 falls back to plaintext (create the network without --opt encrypted, or run \
                 the cluster on kernels with CONFIG_INET_ESP and CONFIG_XFRM_USER)",
                spec.name
            )));
        }
        let out = m
            .propose(Command::CreateNetwork { id: new_id(), spec })
            .await?;
        committed_network(out)
    }

    async fn list_networks(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<proto::NetworkList>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let nets: Vec<Network> = m.with_state(|s| s.networks.values().cloned().collect());
        mark(reply(nets), barrier)
    }

    async fn inspect_network(&self, req: Request<Ref>) -> Result<Response<proto::Network>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let target = req.into_inner().target;
        let net = m
            .with_state(|s| s.network_by_ref(&target).cloned())
            .ok_or_else(|| Status::not_found(format!("network {target} not found")))?;
        mark(reply(net), barrier)
    }

    async fn remove_network(&self, req: Request<Remove>) -> Result<Response<Empty>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        m.propose(Command::RemoveNetwork {
            target: req.into_inner().target,
        })
        .await?;
        Ok(Response::new(Empty {}))
    }

    async fn create_service(
        &self,
        req: Request<proto::ServiceSpec>,
    ) -> Result<Response<proto::Service>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let spec = from_wire(req.into_inner(), "service spec")?;
        let out = m
            .propose(Command::CreateService { id: new_id(), spec })
            .await?;
        committed_service(out)
    }

    async fn list_services(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<proto::ServiceList>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let svcs: Vec<ServiceView> = m.with_state(|s| {
            s.services
                .values()
                .map(|svc| ServiceView {
                    running: s
                        .tasks
                        .values()
                        .filter(|t| t.service == svc.id && t.observed == TaskState::Running)
                        .count(),
                    service: svc.clone(),
                })
                .collect()
        });
        mark(reply(svcs), barrier)
    }

    async fn service_logs(
        &self,
        req: Request<Ref>,
    ) -> Result<Response<proto::TaskLogList>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let target = req.into_inner().target;
        // (task id, name, node id, hostname, node API address), oldest first.
        let tasks = m
            .with_state(|s| {
                let svc = s.service_by_ref(&target)?;
                let mut v: Vec<(u64, String, String, String, String, Option<String>)> = s
                    .tasks
                    .values()
                    .filter(|t| t.service == svc.id && t.managed())
                    .map(|t| {
                        let node = s.nodes.get(&t.node);
                        (
                            t.seq,
                            t.id.clone(),
                            t.name(&svc.spec.name),
                            t.node.clone(),
                            node.map_or_else(|| t.node.clone(), |n| n.hostname.clone()),
                            node.and_then(|n| n.api_addr.clone()),
                        )
                    })
                    .collect();
                v.sort();
                Some(v)
            })
            .ok_or_else(|| Status::not_found(format!("service {target} not found")))?;
        let mut out = Vec::new();
        for (_, id, name, node, hostname, api) in tasks {
            let got = if node == self.0.node_id {
                match self.0.tasks_dir.as_deref() {
                    Some(dir) => read_task_log(dir, &id),
                    None => Err(Status::failed_precondition("this node runs no tasks")),
                }
            } else {
                fetch_log(&self.0, &node, api.as_deref(), &id).await
            };
            let (text, error) = match got {
                Ok(t) => (t, None),
                Err(e) => (String::new(), Some(format!("{hostname}: {}", e.message()))),
            };
            out.push(TaskLog {
                id,
                name,
                node_hostname: hostname,
                text,
                error,
            });
        }
        reply(out)
    }

    async fn list_tasks(&self, req: Request<Ref>) -> Result<Response<proto::TaskList>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let target = req.into_inner().target;
        let tasks = m.with_state(|s| {
            let svc = s.service_by_ref(&target)?;
            Some(
                s.tasks
                    .values()
                    .filter(|t| t.service == svc.id)
                    .map(|t| TaskView {
                        name: t.name(&svc.spec.name),
                        node_hostname: s
                            .nodes
                            .get(&t.node)
                            .map_or_else(|| t.node.clone(), |n| n.hostname.clone()),
                        task: t.clone(),
                    })
                    .collect::<Vec<_>>(),
            )
        });
        let tasks =
            tasks.ok_or_else(|| Status::not_found(format!("service {target} not found")))?;
        mark(reply(tasks), barrier)
    }

    async fn inspect_service(&self, req: Request<Ref>) -> Result<Response<proto::Service>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let target = req.into_inner().target;
        let svc = m
            .with_state(|s| s.service_by_ref(&target).cloned())
            .ok_or_else(|| Status::not_found(format!("service {target} not found")))?;
        mark(reply(svc), barrier)
    }

    async fn update_service(
        &self,
        req: Request<UpdateServiceRequest>,
    ) -> Result<Response<proto::Service>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let u = req.into_inner();
        let spec = from_wire(required(u.spec, "the service spec")?, "service spec")?;
        let out = m
            .propose(Command::UpdateService {
                target: u.target,
                version: u.version,
                spec,
            })
            .await?;
        committed_service(out)
    }

    async fn remove_service(&self, req: Request<Remove>) -> Result<Response<Empty>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        m.propose(Command::RemoveService {
            target: req.into_inner().target,
        })
        .await?;
        Ok(Response::new(Empty {}))
    }

    async fn rollback_service(
        &self,
        req: Request<Ref>,
    ) -> Result<Response<proto::Service>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let out = m
            .propose(Command::RollbackService {
                target: req.into_inner().target,
                message: String::new(),
            })
            .await?;
        committed_service(out)
    }

    async fn create_task(
        &self,
        req: Request<CreateTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let r = req.into_inner();
        let out = m
            .propose(Command::CreateTask {
                id: new_id(),
                service: r.service,
                slot: r.slot,
                node: r.node,
                netns: r.netns,
            })
            .await?;
        outcome(out, "task", |o| match o {
            Outcome::Task(t) => Some(t),
            _ => None,
        })
    }

    async fn remove_task(&self, req: Request<Ref>) -> Result<Response<Empty>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        m.propose(Command::RemoveTask {
            id: req.into_inner().target,
        })
        .await?;
        Ok(Response::new(Empty {}))
    }

    async fn join_token(
        &self,
        req: Request<JoinTokenRequest>,
    ) -> Result<Response<JoinTokenResponse>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let r = req.into_inner();
        let role = role(r.role)?;
        let secrets = m
            .with_state(|s| s.secrets.clone())
            .ok_or_else(|| Status::unavailable("the cluster state is not replicated here yet"))?;
        let digest =
            pki::ca_digest(&secrets.ca_cert).map_err(|e| Status::internal(e.to_string()))?;
        if !r.rotate {
            let record = secrets.join(role).ok_or_else(|| {
                let word = match role {
                    Role::Worker => "worker",
                    Role::Manager => "manager",
                };
                Status::failed_precondition(format!(
                    "this cluster keeps no {word} join token (its state predates hashed tokens): \
                     make one with `meshctl swarm join-token --rotate {word}`"
                ))
            })?;
            let token = JoinToken::derive(&digest, &secrets.ca_key, role, &record.nonce);
            return Ok(Response::new(JoinTokenResponse {
                token: token.to_string(),
            }));
        }
        let (token, record) = JoinToken::issue(&digest, &secrets.ca_key, role)
            .map_err(|e| Status::internal(e.to_string()))?;
        m.propose(Command::SetJoinToken { role, record }).await?;
        Ok(Response::new(JoinTokenResponse {
            token: token.to_string(),
        }))
    }

    async fn rotate_network_key(
        &self,
        req: Request<Empty>,
    ) -> Result<Response<proto::KeyRing>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let now = crate::raft::manager::now_ms();
        let keys = m.with_state(|s| {
            if !s.networks.values().any(|n| n.spec.encrypted) {
                return Err(Status::failed_precondition(
                    "no encrypted network: there is no network key to rotate",
                ));
            }
            crate::keys::generate(s, 1, now).map_err(Status::internal)
        })?;
        m.propose(Command::RotateNetworkKeys { keys }).await?;
        let ring = m.with_state(|s| KeyRing::of(&s.network_keys));
        reply(ring)
    }

    async fn unlock_key(&self, req: Request<Empty>) -> Result<Response<UnlockKeyResponse>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let key = m
            .with_state(|s| s.secrets.as_ref().and_then(|s| s.unlock_key.clone()))
            .ok_or_else(|| {
                Status::failed_precondition(
                    "autolock is not enabled on this cluster: managers keep their key-encrypting \
                     key in their data dir (start the cluster with `meshd init --autolock` to change that)",
                )
            })?;
        Ok(Response::new(UnlockKeyResponse { key }))
    }

    async fn progress(&self, req: Request<Empty>) -> Result<Response<proto::Progress>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        if !m.is_leader() {
            let r = req.into_inner();
            let b = self
                .0
                .on_leader(&m, |mut c| async move { c.progress(r).await })
                .await?;
            return Ok(Response::new(b));
        }
        reply(m.sm.with_book(|state, book| m.dispatcher.progress(state, book.revision())))
    }

    async fn propose(&self, req: Request<Internal>) -> Result<Response<Internal>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let cmd: Command = parse_internal("command", req.get_ref())?;
        match m.write_local(cmd).await {
            Ok(out) => internal(&Ok::<_, String>(out)).map(Response::new),
            Err(WriteError::Refused(msg)) => internal(&Err::<Outcome, _>(msg)).map(Response::new),
            Err(WriteError::Internal(msg)) if msg.starts_with(NOT_LEADER) => {
                Err(Status::unavailable(msg))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn add_manager(
        &self,
        req: Request<AddManagerRequest>,
    ) -> Result<Response<Empty>, Status> {
        let (caller, m) = self.0.require_manager(&req)?;
        let r = req.into_inner();
        if caller.node_id != r.node_id {
            return Err(Status::permission_denied(format!(
                "node {} may only add itself as a manager, not {}",
                caller.node_id, r.node_id
            )));
        }
        if !m.is_leader() {
            self.0
                .on_leader(&m, |mut c| async move { c.add_manager(r).await })
                .await?;
            return Ok(Response::new(Empty {}));
        }
        let is_manager = m.with_state(|s| {
            s.nodes
                .get(&r.node_id)
                .is_some_and(|n| n.spec.role == Role::Manager)
        });
        if !is_manager {
            return Err(Status::permission_denied(format!(
                "node {} is not a manager in the cluster state",
                r.node_id
            )));
        }
        let id = raft_id(&r.node_id)
            .ok_or_else(|| Status::invalid_argument(format!("bad node id {}", r.node_id)))?;
        m.add_voter(id, &r.api_addr).await?;
        Ok(Response::new(Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::state::{ClusterSettings, Command};

    fn cluster(nodes: &[(&str, &str)]) -> State {
        let mut s = State::default();
        s.apply(&Command::Init {
            cluster_id: "c".into(),
            ingress_id: "ing".into(),
            settings: ClusterSettings::default(),
            secrets: None,
        })
        .unwrap();
        for (i, (id, host)) in nodes.iter().enumerate() {
            s.apply(&Command::AddNode {
                id: (*id).into(),
                hostname: (*host).into(),
                addr: Ipv4Addr::new(198, 18, 0, i as u8 + 1),
                api_addr: None,
                role: Role::Worker,
                underlay: Vec::new(),
            })
            .unwrap();
        }
        s
    }

    /// An exact id wins; a hostname two nodes share is refused with both
    /// ids (it once resolved to whichever came first); a prefix must be
    /// unique, and its refusal lists the candidates.
    #[test]
    fn node_names_resolve_to_one_id_or_are_refused_with_the_candidates() {
        let s = cluster(&[
            ("aaaa000000000001", "web"),
            ("aaaa000000000002", "web"),
            ("bbbb000000000003", "db"),
        ]);
        assert_eq!(
            find_node(&s, "aaaa000000000002").unwrap().id,
            "aaaa000000000002"
        );
        assert_eq!(find_node(&s, "db").unwrap().id, "bbbb000000000003");
        assert_eq!(find_node(&s, "bbbb").unwrap().id, "bbbb000000000003");
        let err = find_node(&s, "web").unwrap_err();
        assert_eq!(
            err.message(),
            "2 nodes are named web (aaaa000000000001, aaaa000000000002); use the node id"
        );
        let err = find_node(&s, "aaaa").unwrap_err();
        assert!(
            err.message()
                .contains("(aaaa000000000001, aaaa000000000002)"),
            "{}",
            err.message()
        );
        assert_eq!(
            find_node(&s, "zzz").unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
