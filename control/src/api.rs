//! The gRPC services a node serves: Raft, Join, Node and Cluster.
//!
//! Authorization is per call, from the caller's certificate (the TLS layer
//! accepts connections without one, because joining needs none):
//! - no certificate: only `Join`;
//! - a certificate must be signed by this cluster's CA, be within its
//!   validity, name this cluster, and name a node that was not removed;
//! - `Raft` and `Cluster` need a manager certificate, and a node the state
//!   still lists as a manager.

use std::{net::Ipv4Addr, sync::Arc};

use proto::{
    AddManagerRequest, Blob, Empty, JoinRequest, JoinResponse, JoinTokenRequest, JoinTokenResponse,
    Ref, Remove, RenewRequest, RenewResponse, SetRoleRequest, UnlockKeyResponse, Update,
    cluster_server, join_server, node_server, raft_server,
};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::{
    manager::{Manager, NOT_LEADER, WriteError, raft_id},
    pki::{self, Ca, JoinToken},
    state::{Command, Network, Node, NodeSpec, Outcome, Role, State, TaskState},
};

pub use crate::context::Ctx;
pub use model::api::{
    Info, KeyRing, NodeView, STALE_HEADER, ServiceView, TaskLog, TaskView, Whoami,
};

pub use crate::grpc::{REMOVED, is_removal};

/// The most of one task's log a call returns (its end).
const LOG_TAIL_BYTES: u64 = 1 << 20;

/// The end of task `id`'s log under `dir`.
fn read_task_log(dir: &std::path::Path, id: &str) -> Result<String, Status> {
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

fn json<T: Serialize>(v: &T) -> Result<Response<Blob>, Status> {
    serde_json::to_vec(v)
        .map(|json| Response::new(Blob { json }))
        .map_err(|e| Status::internal(e.to_string()))
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes)
        .map_err(|e| Status::invalid_argument(format!("invalid {what}: {e}")))
}

fn parse_role(role: &str) -> Result<Role, Status> {
    match role {
        "manager" => Ok(Role::Manager),
        "worker" => Ok(Role::Worker),
        other => Err(Status::invalid_argument(format!(
            "unknown role {other:?}: use worker or manager"
        ))),
    }
}

pub use crate::ids::{new_id, new_node_id};

// ----- Raft -----

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
    async fn append_entries(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let m = self.manager(&req)?;
        let rpc = parse("append-entries request", &req.into_inner().json)?;
        json(&m.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let m = self.manager(&req)?;
        let rpc = parse("vote request", &req.into_inner().json)?;
        json(&m.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let m = self.manager(&req)?;
        let rpc = parse("install-snapshot request", &req.into_inner().json)?;
        json(&m.raft.install_snapshot(rpc).await)
    }
}

// ----- Join -----

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
            role: pki::role_name(role).trim_start_matches("mesh-").into(),
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

/// Task `id`'s log from the node at `api` (mTLS, this node's certificate).
async fn fetch_log(ctx: &Ctx, node: &str, api: Option<&str>, id: &str) -> Result<String, Status> {
    let api = api.ok_or_else(|| Status::unavailable("the node has no API address"))?;
    let channel = crate::tls::node_channel(
        api,
        ctx.creds.clone(),
        node,
        std::time::Duration::from_secs(2),
    )
    .map_err(|e| Status::unavailable(e.to_string()))?;
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        proto::node_client::NodeClient::new(channel)
            .max_decoding_message_size(crate::grpc::MAX_MESSAGE)
            .task_logs(Ref { target: id.into() }),
    )
    .await
    .map_err(|_| Status::deadline_exceeded("no answer within 5 s"))??;
    parse("task log", &reply.into_inner().json)
}

/// The API addresses of the managers.
pub fn manager_addrs(s: &State) -> Vec<String> {
    s.nodes
        .values()
        .filter(|n| n.spec.role == Role::Manager)
        .filter_map(|n| n.api_addr.clone())
        .collect()
}

// ----- Node -----

pub struct NodeService(pub Arc<Ctx>);

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn whoami(&self, req: Request<Empty>) -> Result<Response<Blob>, Status> {
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
        json(&Whoami {
            node,
            managers,
            cert_lifetime_secs: lifetime,
        })
    }

    async fn task_logs(&self, req: Request<Ref>) -> Result<Response<Blob>, Status> {
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
        json(&text)
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
            role: role_str(role).into(),
        }))
    }
}

pub fn role_str(role: Role) -> &'static str {
    match role {
        Role::Manager => "manager",
        Role::Worker => "worker",
    }
}

// ----- Cluster -----

pub struct ClusterService(pub Arc<Ctx>);

/// A read's reply, marked stale when the read barrier taken before the
/// read (`Manager::read_barrier`) failed.
fn mark(
    reply: Result<Response<Blob>, Status>,
    barrier: Result<(), String>,
) -> Result<Response<Blob>, Status> {
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

fn outcome_service(o: Outcome) -> Result<Response<Blob>, Status> {
    match o {
        Outcome::Service(s) => json(&*s),
        Outcome::Network(n) => json(&n),
        Outcome::Node(n) => json(&n),
        other => json(&other),
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    async fn info(&self, req: Request<Empty>) -> Result<Response<Blob>, Status> {
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
        json(&info)
    }

    async fn list_nodes(&self, req: Request<Empty>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let views: Vec<NodeView> = m.with_state(|s| {
            s.nodes
                .values()
                .map(|n| node_view(&self.0, &m, n))
                .collect()
        });
        mark(json(&views), barrier)
    }

    async fn inspect_node(&self, req: Request<Ref>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let target = req.into_inner().target;
        let barrier = m.read_barrier().await;
        let view = m.with_state(|s| find_node(s, &target).map(|n| node_view(&self.0, &m, n)))?;
        mark(json(&view), barrier)
    }

    async fn update_node(&self, req: Request<Update>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let u = req.into_inner();
        let spec: NodeSpec = parse("node spec", &u.spec)?;
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
        outcome_service(out)
    }

    async fn set_role(&self, req: Request<SetRoleRequest>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let r = req.into_inner();
        let role = parse_role(&r.role)?;
        if !m.is_leader() {
            let reply = self
                .0
                .on_leader(&m, |mut c| async move { c.set_role(r).await })
                .await?;
            return Ok(Response::new(reply));
        }
        let node = m.with_state(|s| find_node(s, &r.target).cloned())?;
        if node.spec.role == role {
            return json(&node);
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
        outcome_service(out)
    }

    async fn remove_node(&self, req: Request<Remove>) -> Result<Response<Empty>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let r = req.into_inner();
        let id = m.with_state(|s| find_node(s, &r.target).map(|n| n.id.clone()))?;
        m.propose(Command::RemoveNode { id, force: r.force })
            .await?;
        Ok(Response::new(Empty {}))
    }

    async fn create_network(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let spec: crate::state::NetworkSpec = parse("network spec", &req.into_inner().json)?;
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
        outcome_service(out)
    }

    async fn list_networks(&self, req: Request<Empty>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let nets: Vec<Network> = m.with_state(|s| s.networks.values().cloned().collect());
        mark(json(&nets), barrier)
    }

    async fn inspect_network(&self, req: Request<Ref>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let target = req.into_inner().target;
        let net = m
            .with_state(|s| s.network_by_ref(&target).cloned())
            .ok_or_else(|| Status::not_found(format!("network {target} not found")))?;
        mark(json(&net), barrier)
    }

    async fn remove_network(&self, req: Request<Remove>) -> Result<Response<Empty>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        m.propose(Command::RemoveNetwork {
            target: req.into_inner().target,
        })
        .await?;
        Ok(Response::new(Empty {}))
    }

    async fn create_service(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let spec = parse("service spec", &req.into_inner().json)?;
        let out = m
            .propose(Command::CreateService { id: new_id(), spec })
            .await?;
        outcome_service(out)
    }

    async fn list_services(&self, req: Request<Empty>) -> Result<Response<Blob>, Status> {
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
        mark(json(&svcs), barrier)
    }

    async fn service_logs(&self, req: Request<Ref>) -> Result<Response<Blob>, Status> {
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
        json(&out)
    }

    async fn list_tasks(&self, req: Request<Ref>) -> Result<Response<Blob>, Status> {
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
        mark(json(&tasks), barrier)
    }

    async fn inspect_service(&self, req: Request<Ref>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let barrier = m.read_barrier().await;
        let target = req.into_inner().target;
        let svc = m
            .with_state(|s| s.service_by_ref(&target).cloned())
            .ok_or_else(|| Status::not_found(format!("service {target} not found")))?;
        mark(json(&svc), barrier)
    }

    async fn update_service(&self, req: Request<Update>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let u = req.into_inner();
        let spec = parse("service spec", &u.spec)?;
        let out = m
            .propose(Command::UpdateService {
                target: u.target,
                version: u.version,
                spec,
            })
            .await?;
        outcome_service(out)
    }

    async fn remove_service(&self, req: Request<Remove>) -> Result<Response<Empty>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        m.propose(Command::RemoveService {
            target: req.into_inner().target,
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
        let role = parse_role(&r.role)?;
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

    async fn rotate_network_key(&self, req: Request<Empty>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let now = crate::manager::now_ms();
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
        json(&ring)
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

    async fn progress(&self, req: Request<Empty>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        if !m.is_leader() {
            let r = req.into_inner();
            let b = self
                .0
                .on_leader(&m, |mut c| async move { c.progress(r).await })
                .await?;
            return Ok(Response::new(b));
        }
        json(
            &m.sm
                .with_book(|state, book| m.dispatcher.progress(state, book.revision())),
        )
    }

    async fn propose(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let (_, m) = self.0.require_manager(&req)?;
        let cmd: Command = parse("command", &req.into_inner().json)?;
        match m.write_local(cmd).await {
            Ok(out) => json(&Ok::<_, String>(out)),
            Err(WriteError::Refused(msg)) => json(&Err::<Outcome, _>(msg)),
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
