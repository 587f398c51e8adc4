//! The cluster state that Raft replicates: nodes, networks, services, tasks.
//!
//! [`State::apply`] is the state machine. It is deterministic: ids come in
//! the command (the proposer picks them), and every allocation (subnet, VNI,
//! VIP, port, task address) takes the lowest free value, so every replica
//! that applies the same log ends with the same state. A command is checked
//! completely before anything changes; when an allocation fails halfway,
//! what was taken is given back, so a refused command leaves no trace.
//!
//! Allocator state is not stored: it is derived from the entities
//! ([`State::reindex`]) after a snapshot is loaded.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

use crate::allocator::{AddressPool, AllocError, PortAllocator, Subnet, SubnetPool, VniAllocator};

/// Why a command was refused. The text is what the user sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    Invalid(String),
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} name {name} is already in use")]
    NameInUse { kind: &'static str, name: String },
    /// A create whose name exists with the very same spec: most likely an
    /// earlier attempt of this create, whose outcome the caller missed.
    #[error(
        "{kind} {name} already exists, with the same spec (id {id}): an earlier attempt of \
         this create was applied; nothing was changed"
    )]
    SameSpec {
        kind: &'static str,
        name: String,
        id: String,
    },
    #[error(
        "{kind} {name} was changed since you read it (version {current}, you sent {given}); read it again and retry"
    )]
    Conflict {
        kind: &'static str,
        name: String,
        current: u64,
        given: u64,
    },
    #[error("network {network} is in use by service(s) {services}; remove them first")]
    NetworkInUse { network: String, services: String },
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

fn invalid(msg: impl Into<String>) -> StateError {
    StateError::Invalid(msg.into())
}

/// The most a node's report on a task may carry in one string (its error,
/// its namespace path): what reaches the Raft log is bounded.
pub const REPORT_MAX: usize = 4096;

/// How many underlay prefixes a node may report (at join and after).
pub const MAX_UNDERLAY_PREFIXES: usize = 64;

/// `text` cut to at most [`REPORT_MAX`] bytes, on a character boundary,
/// saying so at its end.
pub fn bound_report(text: String) -> String {
    const MARK: &str = " ... (truncated)";
    if text.len() <= REPORT_MAX {
        return text;
    }
    let mut end = REPORT_MAX - MARK.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

/// Checks a node's hostname: an RFC 1123 host name (dot-separated labels
/// of lowercase letters, digits and inner hyphens, 1-63 bytes each, at
/// most 253 in all). Uppercase is refused rather than folded, so that one
/// host has one spelling in `node ls`, constraints and logs.
pub fn check_hostname(hostname: &str) -> Result<(), StateError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if hostname.is_empty() || hostname.len() > 253 || !hostname.split('.').all(label_ok) {
        return Err(invalid(format!(
            "hostname {:?} is not a valid host name: use dot-separated labels of lowercase \
             letters, digits and inner hyphens, each 1-63 characters, at most 253 in all",
            hostname.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

/// Whether `s` has the shape of a node id (16 lowercase hex digits).
pub fn looks_like_node_id(s: &str) -> bool {
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks a name against RFC 1123 label rules, so it can be a DNS name.
pub fn check_name(kind: &str, name: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{kind} name {name:?} is not DNS-safe: use 1 to 63 lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        )))
    }
}

pub use model::{INGRESS, cluster::*, command::*, network::*, node::*, service::*, task::*};

impl State {
    /// Network ids `service`'s tasks attach to.
    pub fn network_ids_of(&self, service: &Service) -> Vec<String> {
        let mut ids: Vec<String> = service
            .spec
            .task
            .networks
            .iter()
            .filter_map(|a| self.network_by_ref(&a.target).map(|n| n.id.clone()))
            .collect();
        if service.ports.iter().any(|p| p.mode == PublishMode::Ingress)
            && let Some(ingress) = self.ingress()
            && !ids.contains(&ingress.id)
        {
            ids.push(ingress.id.clone());
        }
        ids
    }
}

/// The requests of the last applied [`Command::Once`]s, oldest first:
/// bounded, deterministic (every replica evicts the same ones), and
/// persisted with the state so that a snapshot keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    from = "std::collections::VecDeque<String>",
    into = "std::collections::VecDeque<String>"
)]
pub struct RecentRequests {
    order: std::collections::VecDeque<String>,
    index: BTreeSet<String>,
}

impl RecentRequests {
    /// Far more than the writes of any retry window (a few seconds).
    pub const CAPACITY: usize = 16_384;

    pub fn contains(&self, request: &str) -> bool {
        self.index.contains(request)
    }

    fn insert(&mut self, request: &str) {
        if self.index.insert(request.to_owned()) {
            self.order.push_back(request.to_owned());
            while self.order.len() > Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.index.remove(&old);
                }
            }
        }
    }
}

impl From<std::collections::VecDeque<String>> for RecentRequests {
    fn from(order: std::collections::VecDeque<String>) -> Self {
        let mut r = RecentRequests::default();
        for req in order {
            r.insert(&req);
        }
        r
    }
}

impl From<RecentRequests> for std::collections::VecDeque<String> {
    fn from(r: RecentRequests) -> Self {
        r.order
    }
}

/// Allocations derived from the entities; rebuilt by [`State::reindex`].
#[derive(Debug, Clone, Default)]
struct Allocations {
    subnets: SubnetPool,
    vnis: VniAllocator,
    addresses: BTreeMap<String, AddressPool>,
    ports: PortAllocator,
    /// Service name -> id: name lookups and uniqueness checks stay O(log n)
    /// with many services.
    service_names: BTreeMap<String, String>,
    /// A slot's tasks by `seq` (the last is the newest): a new task finds
    /// its slot's previous one in O(log n).
    slots: BTreeMap<SlotKey, BTreeMap<u64, String>>,
    /// Node id -> its tasks' ids: what the dispatcher assigns a node,
    /// found without a scan of every task.
    by_node: BTreeMap<String, BTreeSet<String>>,
    /// Nodes whose managed tasks changed since the store last looked: it
    /// wakes their dispatcher sessions only (each set is at most the
    /// nodes, and taken after every applied batch).
    bumped: BTreeSet<String>,
}

/// (service id, slot, node id for a global service's slot 0, else "").
type SlotKey = (String, u32, String);

fn slot_key(t: &Task) -> SlotKey {
    let (slot, node) = t.slot();
    (t.service.clone(), slot, node.to_owned())
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub cluster_id: Option<String>,
    pub settings: Option<ClusterSettings>,
    #[serde(default)]
    pub secrets: Option<ClusterSecrets>,
    pub nodes: BTreeMap<String, Node>,
    /// Ids of removed nodes: their certificates are refused from then on.
    #[serde(default)]
    pub removed: BTreeSet<String>,
    pub networks: BTreeMap<String, Network>,
    pub services: BTreeMap<String, Service>,
    pub tasks: BTreeMap<String, Task>,
    /// The encrypted networks' key ring, oldest first (at most
    /// [`crate::keys::RING`]); agents send with [`crate::keys::primary`].
    #[serde(default)]
    pub network_keys: Vec<NetworkKey>,
    /// The last task `seq` handed out.
    #[serde(default)]
    pub task_seq: u64,
    /// Requests already applied (see [`Command::Once`]).
    #[serde(default)]
    pub requests: RecentRequests,
    #[serde(skip)]
    alloc: Allocations,
    /// What changed since the orchestrator last looked.
    #[serde(skip)]
    touched: Touched,
}

/// The services whose tasks may need the orchestrator, since it last
/// looked: a command on a service or one of its tasks touches it; a node
/// change touches every service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub all: bool,
    pub services: BTreeSet<String>,
}

/// Beyond this many touched services, the orchestrator looks at all of them
/// (and a follower's set stays small).
const TOUCHED_MAX: usize = 4096;

impl Touched {
    fn service(&mut self, id: &str) {
        if !self.all {
            self.services.insert(id.to_owned());
            if self.services.len() > TOUCHED_MAX {
                self.everything();
            }
        }
    }

    fn everything(&mut self) {
        self.all = true;
        self.services.clear();
    }

    /// Is `service` among them?
    pub fn has(&self, service: &str) -> bool {
        self.all || self.services.contains(service)
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }
}

/// Every persisted field counts; the allocator index and the
/// orchestrator's touched set are derived, so they don't. Destructured so
/// that a field added to [`State`] can't be left out of the comparison.
impl PartialEq for State {
    fn eq(&self, other: &Self) -> bool {
        let State {
            cluster_id,
            settings,
            secrets,
            nodes,
            removed,
            networks,
            services,
            tasks,
            network_keys,
            task_seq,
            requests,
            alloc: _,
            touched: _,
        } = self;
        (
            cluster_id,
            settings,
            secrets,
            nodes,
            removed,
            (networks, services, tasks),
            network_keys,
            (task_seq, requests),
        ) == (
            &other.cluster_id,
            &other.settings,
            &other.secrets,
            &other.nodes,
            &other.removed,
            (&other.networks, &other.services, &other.tasks),
            &other.network_keys,
            (&other.task_seq, &other.requests),
        )
    }
}

impl State {
    pub fn network_by_ref(&self, target: &str) -> Option<&Network> {
        self.networks
            .get(target)
            .or_else(|| self.networks.values().find(|n| n.spec.name == target))
    }

    pub fn service_by_ref(&self, target: &str) -> Option<&Service> {
        if let Some(s) = self.services.get(target) {
            return Some(s);
        }
        if self.alloc.service_names.len() == self.services.len() {
            self.alloc
                .service_names
                .get(target)
                .and_then(|id| self.services.get(id))
        } else {
            // Not indexed (a state deserialized without reindex).
            self.services.values().find(|s| s.spec.name == target)
        }
    }

    /// Notes that `task`'s node's assignments (see
    /// [`crate::dispatcher::assignments`]) may have changed.
    fn bump_node(&mut self, task: &str) {
        if let Some(t) = self.tasks.get(task)
            && t.managed()
        {
            self.alloc.bumped.insert(t.node.clone());
        }
    }

    /// The nodes whose assignments may have changed since the last call.
    pub fn take_bumped(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.alloc.bumped)
    }

    /// The tasks of service `id`, through the slot index (no scan).
    pub fn tasks_of_service<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Task> + 'a {
        let from: SlotKey = (id.to_owned(), 0, String::new());
        self.alloc
            .slots
            .range(from..)
            .take_while(move |(k, _)| k.0 == id)
            .flat_map(|(_, tasks)| tasks.values())
            .filter_map(|t| self.tasks.get(t))
    }

    /// The tasks recorded on `node`, in id order.
    pub fn tasks_on<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.alloc
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
    }

    pub fn ingress(&self) -> Option<&Network> {
        self.networks.values().find(|n| n.ingress)
    }

    /// Rebuilds the allocators from the entities (after loading a snapshot).
    pub fn reindex(&mut self) -> Result<(), StateError> {
        let settings = self.settings.clone().unwrap_or_default();
        let mut alloc = Allocations {
            subnets: SubnetPool::new(settings.address_pool, settings.subnet_size)?,
            ..Allocations::default()
        };
        for n in self.networks.values() {
            alloc.subnets.reserve(&n.spec.name, n.subnet)?;
            alloc.vnis.reserve(n.vni)?;
            alloc
                .addresses
                .insert(n.id.clone(), AddressPool::new(&n.spec.name, n.subnet));
        }
        for s in self.services.values() {
            alloc
                .service_names
                .insert(s.spec.name.clone(), s.id.clone());
            for v in &s.vips {
                if let Some(pool) = alloc.addresses.get_mut(&v.network) {
                    pool.reserve(v.addr)?;
                }
            }
            for p in s.ports.iter().filter(|p| p.mode == PublishMode::Ingress) {
                let port = p.published.expect("stored ports are resolved");
                alloc
                    .ports
                    .reserve(&p.protocol.to_string(), port, &s.spec.name)?;
            }
        }
        for t in self.tasks.values() {
            for a in &t.attachments {
                if let Some(pool) = alloc.addresses.get_mut(&a.network) {
                    pool.reserve(a.addr)?;
                }
            }
            alloc
                .slots
                .entry(slot_key(t))
                .or_default()
                .insert(t.seq, t.id.clone());
            alloc
                .by_node
                .entry(t.node.clone())
                .or_default()
                .insert(t.id.clone());
        }
        for n in self.nodes.values() {
            for (net, addr) in &n.lb_addrs {
                if let Some(pool) = alloc.addresses.get_mut(net) {
                    pool.reserve(*addr)?;
                }
            }
        }
        self.alloc = alloc;
        Ok(())
    }

    /// A copy of the service `target` names (id or name), or NotFound.
    fn service_owned(&self, target: &str) -> Result<Service, StateError> {
        self.service_by_ref(target)
            .cloned()
            .ok_or_else(|| StateError::NotFound {
                kind: "service",
                name: target.to_owned(),
            })
    }

    /// Takes what changed since the last call (see [`Touched`]).
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    /// Marks everything touched (a new leader looks at every service).
    pub fn touch_all(&mut self) {
        self.touched.everything();
    }

    /// Marks for the orchestrator what `cmd` may change ([`Command::touches`]):
    /// a node or network change can move any service's tasks.
    fn touch(&mut self, cmd: &Command) {
        for t in cmd.touches() {
            match t {
                Touch::Networks | Touch::NewNode(_) | Touch::Node(_) => self.touched.everything(),
                Touch::NetworkKeys => {}
                Touch::NewService(id) | Touch::UpdateStatus(id) => self.touched.service(id),
                Touch::Service(target)
                | Touch::NewTask {
                    service: target, ..
                } => {
                    if let Some(id) = self.service_by_ref(target).map(|s| s.id.clone()) {
                        self.touched.service(&id);
                    }
                }
                Touch::Task(id) => {
                    if let Some(s) = self.tasks.get(id).map(|t| t.service.clone()) {
                        self.touched.service(&s);
                    }
                }
            }
        }
    }

    /// What `cmd` made, read back from the state: the answer to a
    /// request that was applied before ([`Outcome::AlreadyApplied`]).
    pub fn outcome_of(&self, cmd: &Command) -> Outcome {
        let found = match cmd {
            Command::CreateService { id: target, .. }
            | Command::UpdateService { target, .. }
            | Command::RollbackService { target, .. } => self
                .service_by_ref(target)
                .map(|s| Outcome::Service(Box::new(s.clone()))),
            Command::CreateNetwork { id, .. } => {
                self.networks.get(id).cloned().map(Outcome::Network)
            }
            Command::AddNode { id, .. } | Command::UpdateNode { id, .. } => {
                self.nodes.get(id).cloned().map(Outcome::Node)
            }
            Command::CreateTask { id, .. } => self.tasks.get(id).cloned().map(Outcome::Task),
            _ => None,
        };
        found.unwrap_or(Outcome::Done)
    }

    /// Applies one command: all of it, or (with an error) none of it.
    pub fn apply(&mut self, cmd: &Command) -> Result<Outcome, StateError> {
        // Before: a removal still finds what it removes.
        self.touch(cmd);
        self.apply_inner(cmd)
    }

    fn apply_inner(&mut self, cmd: &Command) -> Result<Outcome, StateError> {
        if self.settings.is_none() && !matches!(cmd, Command::Init { .. }) {
            return Err(invalid("the cluster is not initialized"));
        }
        match cmd {
            Command::Init {
                cluster_id,
                ingress_id,
                settings,
                secrets,
            } => {
                let out = self.init(cluster_id, ingress_id, settings)?;
                self.secrets = secrets.clone();
                Ok(out)
            }
            Command::RotateNetworkKeys { keys } => {
                model::ring::validate(&self.network_keys, keys).map_err(invalid)?;
                self.network_keys.extend(keys.iter().cloned());
                let extra = self.network_keys.len().saturating_sub(model::ring::RING);
                self.network_keys.drain(..extra);
                Ok(Outcome::Done)
            }
            Command::SetJoinToken { role, record } => {
                let secrets = self
                    .secrets
                    .as_mut()
                    .ok_or_else(|| invalid("this cluster has no join tokens"))?;
                let hexed =
                    |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
                if !(hexed(&record.nonce, 32) && hexed(&record.salt, 32) && hexed(&record.hash, 64))
                {
                    return Err(invalid(
                        "a join token record is 3 hex strings (nonce, salt, hash)",
                    ));
                }
                match role {
                    Role::Manager => secrets.manager_join = Some(record.clone()),
                    Role::Worker => secrets.worker_join = Some(record.clone()),
                }
                Ok(Outcome::Done)
            }
            Command::AddNode {
                id,
                hostname,
                addr,
                api_addr,
                role,
                underlay,
            } => self.add_node(id, hostname, *addr, api_addr.clone(), *role, underlay),

            Command::UpdateNode { id, version, spec } => self.update_node(id, *version, spec),
            Command::SetNodeStatus { id, status } => {
                let node = self.node_mut(id)?;
                if node.status != *status {
                    node.status = *status;
                    node.version += 1;
                }
                Ok(Outcome::Node(node.clone()))
            }
            Command::SetNodeUnderlay { id, underlay } => self.set_node_underlay(id, underlay),
            Command::RemoveNode { id, force } => self.remove_node(id, *force),
            Command::CreateNetwork { id, spec } => self.create_network(id, spec, false),
            Command::RemoveNetwork { target } => self.remove_network(target),
            Command::CreateService { id, spec } => self.create_service(id, spec),
            Command::UpdateService {
                target,
                version,
                spec,
            } => self.update_service(target, *version, spec),
            Command::RemoveService { target } => self.remove_service(target),
            Command::RollbackService { target, message } => self.rollback_service(target, message),
            Command::SetUpdateStatus {
                service,
                state,
                message,
            } => {
                let task_seq = self.task_seq;
                let svc = self
                    .services
                    .get_mut(service)
                    .ok_or_else(|| StateError::NotFound {
                        kind: "service",
                        name: service.clone(),
                    })?;
                let from_seq = svc.update_status.as_ref().map_or(task_seq, |u| u.from_seq);
                svc.update_status = Some(UpdateStatus {
                    state: *state,
                    from_seq,
                    message: message.clone(),
                });
                Ok(Outcome::Service(Box::new(svc.clone())))
            }
            Command::CreateTask {
                id,
                service,
                slot,
                node,
                netns,
            } => self.create_task(id, service, *slot, node, netns.clone()),
            Command::RemoveTask { id } => self.remove_task(id),
            Command::ShutdownTask { id } => self.shutdown_task(id),
            Command::SetTaskStatus {
                id,
                observed,
                netns,
                exit_code,
                error,
                at_ms,
            } => self.set_task_status(id, *observed, netns, *exit_code, error, *at_ms),
            Command::Batch { commands } => Ok(Outcome::Batch(
                commands
                    .iter()
                    .map(|c| match c {
                        Command::Batch { .. } | Command::Init { .. } => {
                            Err("a batch holds only ordinary commands".to_owned())
                        }
                        c => self.apply(c).map_err(|e| e.to_string()),
                    })
                    .collect(),
            )),
            Command::Once { request, write } => {
                if matches!(**write, Command::Batch { .. } | Command::Once { .. }) {
                    return Err(invalid("a request wraps one ordinary command"));
                }
                if self.requests.contains(request) {
                    return Ok(Outcome::AlreadyApplied);
                }
                let out = self.apply(write)?;
                self.requests.insert(request);
                Ok(out)
            }
        }
    }

    fn init(
        &mut self,
        cluster_id: &str,
        ingress_id: &str,
        settings: &ClusterSettings,
    ) -> Result<Outcome, StateError> {
        if self.settings.is_some() {
            return Err(invalid("the cluster is already initialized"));
        }
        self.alloc.subnets = SubnetPool::new(settings.address_pool, settings.subnet_size)?;
        self.settings = Some(settings.clone());
        self.cluster_id = Some(cluster_id.to_owned());
        let spec = NetworkSpec {
            name: INGRESS.into(),
            subnet: Some(settings.ingress_subnet),
            ..NetworkSpec::default()
        };
        self.create_network(ingress_id, &spec, true)
    }

    /// The node with this id. Commands address nodes by id only: names
    /// are resolved to ids by the API, which refuses an ambiguous one.
    fn node_mut(&mut self, id: &str) -> Result<&mut Node, StateError> {
        self.nodes.get_mut(id).ok_or_else(|| StateError::NotFound {
            kind: "node",
            name: id.to_owned(),
        })
    }

    fn add_node(
        &mut self,
        id: &str,
        hostname: &str,
        addr: Ipv4Addr,
        api_addr: Option<String>,
        role: Role,
        underlay: &[Subnet],
    ) -> Result<Outcome, StateError> {
        if self.nodes.contains_key(id) || self.removed.contains(id) {
            return Err(StateError::NameInUse {
                kind: "node id",
                name: id.to_owned(),
            });
        }
        check_hostname(hostname)?;
        if looks_like_node_id(hostname) {
            return Err(invalid(format!(
                "hostname {hostname:?} looks like a node id (16 hex digits); node ids and \
                 hostnames must never be confused: use another hostname"
            )));
        }
        if let Some(other) = self.nodes.values().find(|n| n.hostname == id) {
            return Err(invalid(format!(
                "node id {id} is already the hostname of node {}",
                other.id
            )));
        }
        if underlay.len() > MAX_UNDERLAY_PREFIXES {
            return Err(invalid(format!(
                "a node reports at most {MAX_UNDERLAY_PREFIXES} underlay prefixes, not {}",
                underlay.len()
            )));
        }
        let mut prefixes = underlay.to_vec();
        prefixes.push(Subnet::containing(addr, 32));
        if let Some(clash) = self.underlay_clash(id, &prefixes) {
            return Err(invalid(format!("node {hostname} can't join: {clash}")));
        }
        if let Some(other) = self.nodes.values().find(|n| n.addr == addr) {
            return Err(invalid(format!(
                "node address {addr} is already used by node {}",
                other.hostname
            )));
        }
        let mut lb_addrs = BTreeMap::new();
        if let Some(ingress) = self.ingress().map(|n| n.id.clone()) {
            let pool = self.alloc.addresses.get_mut(&ingress).expect("indexed");
            lb_addrs.insert(ingress, pool.allocate()?);
        }
        let node = Node {
            id: id.to_owned(),
            version: 1,
            hostname: hostname.to_owned(),
            addr,
            underlay: underlay.to_vec(),
            api_addr,
            spec: NodeSpec {
                role,
                availability: Availability::Active,
                labels: BTreeMap::new(),
            },
            status: NodeStatus::Ready,
            lb_addrs,
        };
        self.nodes.insert(id.to_owned(), node.clone());
        Ok(Outcome::Node(node))
    }

    /// Every node's underlay prefixes and address (as a /32), with the
    /// node's hostname.
    fn underlay_prefixes(&self) -> Vec<(String, Subnet)> {
        self.nodes
            .values()
            .flat_map(|n| {
                n.underlay
                    .iter()
                    .copied()
                    .chain([Subnet::containing(n.addr, 32)])
                    .map(|p| (n.hostname.clone(), p))
            })
            .collect()
    }

    /// Records what node `id`'s underlay holds now. This is a fact about
    /// the host, not a request: it is recorded even when a network already
    /// overlaps it (refusing it would only let the next `network create`
    /// land on it too); the dispatcher warns with [`State::underlay_clash`].
    fn set_node_underlay(&mut self, id: &str, underlay: &[Subnet]) -> Result<Outcome, StateError> {
        if underlay.len() > MAX_UNDERLAY_PREFIXES {
            return Err(invalid(format!(
                "a node reports at most {MAX_UNDERLAY_PREFIXES} underlay prefixes, not {}",
                underlay.len()
            )));
        }
        let node = self.node_mut(id)?;
        let mut sorted = underlay.to_vec();
        sorted.sort();
        sorted.dedup();
        if node.underlay != sorted {
            node.underlay = sorted;
            node.version += 1;
        }
        Ok(Outcome::Node(node.clone()))
    }

    /// Why node `id` may not have `prefixes` on its underlay: a network
    /// overlaps one of them.
    pub fn underlay_clash(&self, id: &str, prefixes: &[Subnet]) -> Option<String> {
        self.networks.values().find_map(|net| {
            let p = prefixes.iter().find(|p| p.overlaps(&net.subnet))?;
            Some(format!(
                "its underlay {p} overlaps network {} ({}); its tasks' addresses would shadow \
                 the node addresses there. Move the node to an underlay outside every \
                 network, or remove network {} (node {id})",
                net.spec.name, net.subnet, net.spec.name
            ))
        })
    }

    fn managers(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.spec.role == Role::Manager)
            .count()
    }

    fn update_node(
        &mut self,
        id: &str,
        version: u64,
        spec: &NodeSpec,
    ) -> Result<Outcome, StateError> {
        let managers = self.managers();
        let node = self.node_mut(id)?;
        if node.version != version {
            return Err(StateError::Conflict {
                kind: "node",
                name: node.hostname.clone(),
                current: node.version,
                given: version,
            });
        }
        if node.spec.role == Role::Manager && spec.role == Role::Worker && managers == 1 {
            return Err(invalid(format!(
                "node {} is the last manager; promote another node before demoting it",
                node.hostname
            )));
        }
        for key in spec.labels.keys() {
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(invalid(format!(
                    "node label {key:?} must be a non-empty word"
                )));
            }
        }
        node.spec = spec.clone();
        node.version += 1;
        Ok(Outcome::Node(node.clone()))
    }

    fn remove_node(&mut self, id: &str, force: bool) -> Result<Outcome, StateError> {
        let node = self.node_mut(id)?.clone();
        if node.spec.role == Role::Manager {
            return Err(invalid(format!(
                "node {} is a manager; demote it before removing it",
                node.hostname
            )));
        }
        if node.status == NodeStatus::Ready && !force {
            return Err(invalid(format!(
                "node {} is not down and can't be removed; stop it, or use --force",
                node.hostname
            )));
        }
        self.remove_tasks_where(|t| t.node == node.id);
        for (net, addr) in &node.lb_addrs {
            if let Some(pool) = self.alloc.addresses.get_mut(net) {
                pool.release(*addr);
            }
        }
        self.nodes.remove(&node.id);
        self.removed.insert(node.id);
        Ok(Outcome::Done)
    }

    fn create_network(
        &mut self,
        id: &str,
        spec: &NetworkSpec,
        ingress: bool,
    ) -> Result<Outcome, StateError> {
        check_name("network", &spec.name)?;
        if !ingress && spec.name == INGRESS {
            return Err(StateError::NameInUse {
                kind: "network",
                name: spec.name.clone(),
            });
        }
        if let Some(other) = self.network_by_ref(&spec.name) {
            // The same spec: a pool-picked subnet counts as the one it got.
            let same = NetworkSpec {
                subnet: spec.subnet.or(other.spec.subnet),
                ..spec.clone()
            } == other.spec;
            return Err(if same {
                StateError::SameSpec {
                    kind: "network",
                    name: spec.name.clone(),
                    id: other.id.clone(),
                }
            } else {
                StateError::NameInUse {
                    kind: "network",
                    name: spec.name.clone(),
                }
            });
        }
        if self.networks.contains_key(id) {
            return Err(invalid(format!("network id {id} is already in use")));
        }
        let underlay = self.underlay_prefixes();
        let subnet = match spec.subnet {
            Some(s) => {
                if let Some((node, prefix)) = underlay.iter().find(|(_, p)| p.overlaps(&s)) {
                    return Err(invalid(format!(
                        "subnet {s} for network {} overlaps the underlay of node {node} \
                         ({prefix}, where its VXLAN and its managers' traffic run): a task \
                         there would take a node's address and its traffic would go astray. \
                         Pick a subnet outside every node's underlay",
                        spec.name
                    )));
                }
                if s.prefix() > 29 {
                    return Err(invalid(format!(
                        "subnet {s} for network {} is too small; use /29 or larger",
                        spec.name
                    )));
                }
                self.alloc.subnets.reserve(&spec.name, s)?;
                s
            }
            None => {
                let avoid: Vec<Subnet> = underlay.iter().map(|(_, p)| *p).collect();
                self.alloc.subnets.allocate_avoiding(&spec.name, &avoid)?
            }
        };
        let vni = match self.alloc.vnis.allocate() {
            Ok(v) => v,
            Err(e) => {
                self.alloc.subnets.release(&subnet);
                return Err(e.into());
            }
        };
        let network = Network {
            id: id.to_owned(),
            spec: NetworkSpec {
                subnet: Some(subnet),
                ..spec.clone()
            },
            vni,
            subnet,
            gateway: subnet.gateway(),
            ingress,
        };
        self.alloc
            .addresses
            .insert(id.to_owned(), AddressPool::new(&spec.name, subnet));
        self.networks.insert(id.to_owned(), network.clone());
        Ok(Outcome::Network(network))
    }

    fn remove_network(&mut self, target: &str) -> Result<Outcome, StateError> {
        let network = self
            .network_by_ref(target)
            .cloned()
            .ok_or_else(|| StateError::NotFound {
                kind: "network",
                name: target.to_owned(),
            })?;
        let users: Vec<&str> = self
            .services
            .values()
            .filter(|s| self.network_ids_of(s).contains(&network.id))
            .map(|s| s.spec.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(StateError::NetworkInUse {
                network: network.spec.name.clone(),
                services: users.join(", "),
            });
        }
        self.networks.remove(&network.id);
        for n in self.nodes.values_mut() {
            n.lb_addrs.remove(&network.id);
        }
        self.alloc.addresses.remove(&network.id);
        self.alloc.subnets.release(&network.subnet);
        self.alloc.vnis.release(network.vni);
        Ok(Outcome::Done)
    }

    /// Everything about a service spec that does not need allocation.
    fn check_service(&self, spec: &ServiceSpec, own_id: Option<&str>) -> Result<(), StateError> {
        check_name("service", &spec.name)?;
        if let Some(other) = self.service_by_ref(&spec.name)
            && Some(other.id.as_str()) != own_id
        {
            // A create retried after an unknown outcome finds its own work.
            return Err(if own_id.is_none() && other.spec == *spec {
                StateError::SameSpec {
                    kind: "service",
                    name: spec.name.clone(),
                    id: other.id.clone(),
                }
            } else {
                StateError::NameInUse {
                    kind: "service",
                    name: spec.name.clone(),
                }
            });
        }
        if spec.task.command.is_empty() || spec.task.command[0].is_empty() {
            return Err(invalid(format!(
                "service {}: a command is required",
                spec.name
            )));
        }
        let max_ms = crate::units::SPEC_MAX.as_millis() as u64;
        for (what, ms) in [
            ("restart delay", spec.task.restart.delay_ms),
            ("restart window", spec.task.restart.window_ms),
            ("update delay", spec.update.delay_ms),
            ("update monitor", spec.update.monitor_ms),
            ("rollback delay", spec.rollback.delay_ms),
            ("rollback monitor", spec.rollback.monitor_ms),
        ] {
            if ms > max_ms {
                return Err(invalid(format!(
                    "service {}: the {what} of {ms} ms is longer than the most a spec holds \
                     (365 days)",
                    spec.name
                )));
            }
        }
        model::constraint::parse_constraints(&spec.task.constraints)
            .map_err(|e| invalid(format!("service {}: {e}", spec.name)))?;
        for e in &spec.task.env {
            match e.split_once('=') {
                Some((k, _)) if !k.is_empty() && !k.contains(char::is_whitespace) => {}
                _ => {
                    return Err(invalid(format!(
                        "service {}: environment entry {e:?} must look like KEY=VALUE",
                        spec.name
                    )));
                }
            }
        }
        let mut seen = BTreeSet::new();
        for a in &spec.task.networks {
            let n = self
                .network_by_ref(&a.target)
                .ok_or_else(|| StateError::NotFound {
                    kind: "network",
                    name: a.target.clone(),
                })?;
            if n.ingress {
                return Err(invalid(format!(
                    "service {}: the ingress network is joined by publishing a port, not attached by hand",
                    spec.name
                )));
            }
            if !seen.insert(&n.id) {
                return Err(invalid(format!(
                    "service {}: network {} is attached twice",
                    spec.name, n.spec.name
                )));
            }
            for alias in &a.aliases {
                check_name("alias", alias)?;
            }
        }
        let mut ports = BTreeSet::new();
        for p in &spec.endpoint.ports {
            if p.target == 0 {
                return Err(invalid(format!(
                    "service {}: target port must be 1-65535",
                    spec.name
                )));
            }
            if p.published == Some(0) {
                return Err(invalid(format!(
                    "service {}: published port must be 1-65535 (leave it out to get one from 30000-32767)",
                    spec.name
                )));
            }
            if p.mode == PublishMode::Ingress && spec.endpoint.mode == EndpointMode::Dnsrr {
                return Err(invalid(format!(
                    "service {}: a port published in ingress mode needs endpoint mode vip, not dnsrr; use mode=host",
                    spec.name
                )));
            }
            if p.mode == PublishMode::Host && spec.task.networks.is_empty() {
                return Err(invalid(format!(
                    "service {}: a port published in mode=host reaches the task through one of its networks; attach one (--network NAME)",
                    spec.name
                )));
            }
            if p.mode == PublishMode::Host && p.published.is_none() {
                return Err(invalid(format!(
                    "service {}: a port published in mode=host needs published=PORT",
                    spec.name
                )));
            }
            if let Some(port) = p.published
                && !ports.insert((p.protocol, port))
            {
                return Err(invalid(format!(
                    "service {}: port {port}/{} is published twice",
                    spec.name, p.protocol
                )));
            }
        }
        if let ServiceMode::Replicated { replicas } = spec.mode
            && replicas > 10_000
        {
            return Err(invalid(format!(
                "service {}: {replicas} replicas is more than this cluster supports (10000)",
                spec.name
            )));
        }
        Ok(())
    }

    /// Publishes ports and takes VIPs for `spec`, keeping what `old` already
    /// had where it still applies. On error, everything taken is given back.
    fn allocate_endpoint(
        &mut self,
        spec: &ServiceSpec,
        old: Option<&Service>,
    ) -> Result<(Vec<PortConfig>, Vec<Vip>), StateError> {
        let name = &spec.name;
        let mut taken_ports: Vec<(String, u16)> = Vec::new();
        let mut taken_vips: Vec<Vip> = Vec::new();
        let result = (|| {
            let mut ports = Vec::new();
            for p in &spec.endpoint.ports {
                let proto = p.protocol.to_string();
                let published = match (p.mode, p.published) {
                    (PublishMode::Host, Some(port)) => port,
                    (PublishMode::Host, None) => p.target,
                    (PublishMode::Ingress, Some(port)) => {
                        let held = old.is_some_and(|o| {
                            o.ports.iter().any(|q| {
                                q.mode == PublishMode::Ingress
                                    && q.protocol == p.protocol
                                    && q.published == Some(port)
                            })
                        });
                        if !held {
                            self.alloc.ports.reserve(&proto, port, name)?;
                            taken_ports.push((proto, port));
                        }
                        port
                    }
                    (PublishMode::Ingress, None) => {
                        // Keep the port an unchanged auto-published target had.
                        let kept = old.and_then(|o| {
                            let i = o.spec.endpoint.ports.iter().position(|q| {
                                q.published.is_none()
                                    && q.target == p.target
                                    && q.protocol == p.protocol
                                    && q.mode == PublishMode::Ingress
                            })?;
                            o.ports[i].published
                        });
                        match kept {
                            Some(port) => port,
                            None => {
                                let port = self.alloc.ports.allocate(&proto, name)?;
                                taken_ports.push((proto, port));
                                port
                            }
                        }
                    }
                };
                ports.push(PortConfig {
                    published: Some(published),
                    ..p.clone()
                });
            }
            let mut vips = Vec::new();
            if spec.endpoint.mode == EndpointMode::Vip {
                let mut nets: Vec<String> = spec
                    .task
                    .networks
                    .iter()
                    .filter_map(|a| self.network_by_ref(&a.target).map(|n| n.id.clone()))
                    .collect();
                if ports.iter().any(|p| p.mode == PublishMode::Ingress)
                    && let Some(i) = self.ingress()
                {
                    nets.push(i.id.clone());
                }
                for net in nets {
                    if let Some(v) = old.and_then(|o| o.vips.iter().find(|v| v.network == net)) {
                        vips.push(v.clone());
                        continue;
                    }
                    let pool = self.alloc.addresses.get_mut(&net).expect("indexed");
                    let addr = pool.allocate()?;
                    let vip = Vip { network: net, addr };
                    taken_vips.push(vip.clone());
                    vips.push(vip);
                }
            }
            Ok((ports, vips))
        })();
        if result.is_err() {
            for (proto, port) in taken_ports {
                self.alloc.ports.release(&proto, port);
            }
            for v in taken_vips {
                if let Some(pool) = self.alloc.addresses.get_mut(&v.network) {
                    pool.release(v.addr);
                }
            }
        }
        result
    }

    /// Gives back what `old` held and `new` (if any) no longer does.
    fn release_endpoint(&mut self, old: &Service, new: Option<(&[PortConfig], &[Vip])>) {
        for p in old.ports.iter().filter(|p| p.mode == PublishMode::Ingress) {
            let still = new.is_some_and(|(ports, _)| {
                ports.iter().any(|q| {
                    q.mode == PublishMode::Ingress
                        && q.protocol == p.protocol
                        && q.published == p.published
                })
            });
            if !still {
                self.alloc
                    .ports
                    .release(&p.protocol.to_string(), p.published.expect("resolved"));
            }
        }
        for v in &old.vips {
            if !new.is_some_and(|(_, vips)| vips.contains(v))
                && let Some(pool) = self.alloc.addresses.get_mut(&v.network)
            {
                pool.release(v.addr);
            }
        }
    }

    fn create_service(&mut self, id: &str, spec: &ServiceSpec) -> Result<Outcome, StateError> {
        self.check_service(spec, None)?;
        if self.services.contains_key(id) {
            return Err(invalid(format!("service id {id} is already in use")));
        }
        let (ports, vips) = self.allocate_endpoint(spec, None)?;
        let service = Service {
            id: id.to_owned(),
            version: 1,
            spec: spec.clone(),
            previous: None,
            vips,
            ports,
            update_status: None,
        };
        self.services.insert(id.to_owned(), service.clone());
        self.alloc
            .service_names
            .insert(spec.name.clone(), id.to_owned());
        Ok(Outcome::Service(Box::new(service)))
    }

    fn update_service(
        &mut self,
        target: &str,
        version: u64,
        spec: &ServiceSpec,
    ) -> Result<Outcome, StateError> {
        let old = self.service_owned(target)?;
        if old.version != version {
            return Err(StateError::Conflict {
                kind: "service",
                name: old.spec.name.clone(),
                current: old.version,
                given: version,
            });
        }
        self.check_service(spec, Some(&old.id))?;
        // Ports the service gives up must not block ports it takes, and the
        // old ones come back if the new ones cannot be had.
        let (ports, vips) = self.allocate_endpoint(spec, Some(&old))?;
        self.release_endpoint(&old, Some((&ports, &vips)));
        // A new task template starts a rolling update; a change of
        // replicas or ports alone does not.
        let update_status = if spec.task != old.spec.task {
            Some(UpdateStatus {
                state: UpdateState::Updating,
                from_seq: self.task_seq,
                message: "update in progress".into(),
            })
        } else {
            old.update_status.clone()
        };
        let service = Service {
            id: old.id.clone(),
            version: old.version + 1,
            spec: spec.clone(),
            previous: Some(old.spec.clone()),
            vips,
            ports,
            update_status,
        };
        self.services.insert(old.id.clone(), service.clone());
        self.alloc.service_names.remove(&old.spec.name);
        self.alloc
            .service_names
            .insert(spec.name.clone(), old.id.clone());
        Ok(Outcome::Service(Box::new(service)))
    }

    /// The previous spec comes back (its ports and VIPs allocated again as
    /// an update would); the spec rolled back from becomes the previous.
    fn rollback_service(&mut self, target: &str, message: &str) -> Result<Outcome, StateError> {
        let old = self.service_owned(target)?;
        let Some(previous) = old.previous.clone() else {
            return Err(invalid(format!(
                "service {}: there is no previous spec to roll back to",
                old.spec.name
            )));
        };
        self.update_service(&old.id, old.version, &previous)?;
        let svc = self.services.get_mut(&old.id).expect("just updated");
        svc.update_status = Some(UpdateStatus {
            state: UpdateState::RollbackStarted,
            from_seq: self.task_seq,
            message: if message.is_empty() {
                "manually requested rollback".into()
            } else {
                message.to_owned()
            },
        });
        Ok(Outcome::Service(Box::new(svc.clone())))
    }

    fn remove_service(&mut self, target: &str) -> Result<Outcome, StateError> {
        let old = self.service_owned(target)?;
        self.remove_tasks_where(|t| t.service == old.id);
        self.release_endpoint(&old, None);
        self.services.remove(&old.id);
        self.alloc.service_names.remove(&old.spec.name);
        Ok(Outcome::Done)
    }

    fn create_task(
        &mut self,
        id: &str,
        service: &str,
        slot: u32,
        node: &str,
        netns: Option<String>,
    ) -> Result<Outcome, StateError> {
        if self.tasks.contains_key(id) {
            return Err(invalid(format!("task id {id} is already in use")));
        }
        let svc = self
            .service_by_ref(service)
            .cloned()
            .ok_or_else(|| StateError::NotFound {
                kind: "service",
                name: service.to_owned(),
            })?;
        let node = self
            .nodes
            .get(node)
            .cloned()
            .ok_or_else(|| StateError::NotFound {
                kind: "node",
                name: node.to_owned(),
            })?;
        let mut attachments = Vec::new();
        let mut node_lbs: Vec<(String, Ipv4Addr)> = Vec::new();
        let give_back =
            |s: &mut State, attachments: &[TaskAttachment], lbs: &[(String, Ipv4Addr)]| {
                let addrs = attachments.iter().map(|a| (&a.network, a.addr));
                for (net, addr) in addrs.chain(lbs.iter().map(|(n, a)| (n, *a))) {
                    if let Some(pool) = s.alloc.addresses.get_mut(net) {
                        pool.release(addr);
                    }
                }
            };
        for net in self.network_ids_of(&svc) {
            let pool = self.alloc.addresses.get_mut(&net).expect("indexed");
            if !node.lb_addrs.contains_key(&net) {
                match pool.allocate() {
                    Ok(addr) => node_lbs.push((net.clone(), addr)),
                    Err(e) => {
                        give_back(self, &attachments, &node_lbs);
                        return Err(e.into());
                    }
                }
            }
            let pool = self.alloc.addresses.get_mut(&net).expect("indexed");
            match pool.allocate() {
                Ok(addr) => {
                    attachments.push(TaskAttachment {
                        network: net,
                        addr,
                        mac: model::tables::mac_of(addr),
                    });
                }
                Err(e) => {
                    give_back(self, &attachments, &node_lbs);
                    return Err(e.into());
                }
            }
        }
        if let Some(n) = self.nodes.get_mut(&node.id) {
            n.lb_addrs.extend(node_lbs);
        }
        // The slot's previous task (a global service's slot is its node).
        let key: SlotKey = (
            svc.id.clone(),
            slot,
            if slot == 0 {
                node.id.clone()
            } else {
                String::new()
            },
        );
        let previous = self
            .alloc
            .slots
            .get(&key)
            .and_then(|s| s.last_key_value())
            .and_then(|(_, id)| self.tasks.get(id));
        let attempt = previous.map_or(0, |p| {
            if p.ended_by_itself() {
                p.attempt + 1
            } else {
                0
            }
        });
        self.task_seq += 1;
        let attached = netns.is_some();
        let task = Task {
            id: id.to_owned(),
            service: svc.id,
            slot,
            node: node.id,
            desired: TaskState::Running,
            observed: TaskState::New,
            attachments,
            error: None,
            netns,
            exit_code: None,
            seq: self.task_seq,
            attempt,
            since_ms: 0,
            attached,
            spec: svc.spec.task.clone(),
        };
        self.alloc
            .slots
            .entry(key)
            .or_default()
            .insert(task.seq, task.id.clone());
        self.alloc
            .by_node
            .entry(task.node.clone())
            .or_default()
            .insert(task.id.clone());
        self.tasks.insert(id.to_owned(), task.clone());
        self.bump_node(id);
        Ok(Outcome::Task(task))
    }

    /// Removes the tasks matching `which`, giving back their addresses.
    fn remove_tasks_where(&mut self, which: impl Fn(&Task) -> bool) {
        let ids: Vec<String> = self
            .tasks
            .values()
            .filter(|t| which(t))
            .map(|t| t.id.clone())
            .collect();
        for id in ids {
            let _ = self.remove_task(&id); // listed just now, so present
        }
    }

    fn task_mut(&mut self, id: &str) -> Result<&mut Task, StateError> {
        self.tasks.get_mut(id).ok_or_else(|| StateError::NotFound {
            kind: "task",
            name: id.to_owned(),
        })
    }

    /// Gives back an ended task's addresses; its endpoints go with them.
    fn release_task_addresses(&mut self, id: &str) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        for a in std::mem::take(&mut t.attachments) {
            if let Some(pool) = self.alloc.addresses.get_mut(&a.network) {
                pool.release(a.addr);
            }
        }
    }

    fn shutdown_task(&mut self, id: &str) -> Result<Outcome, StateError> {
        self.task_mut(id)?;
        self.bump_node(id);
        let t = self.task_mut(id)?;
        if t.desired < TaskState::Shutdown {
            t.desired = TaskState::Shutdown;
        }
        // Nothing runs it yet: nothing will report its end.
        if t.observed < TaskState::Starting {
            t.observed = TaskState::Shutdown;
            self.release_task_addresses(id);
        }
        Ok(Outcome::Task(self.tasks[id].clone()))
    }

    fn set_task_status(
        &mut self,
        id: &str,
        observed: TaskState,
        netns: &Option<String>,
        exit_code: Option<i32>,
        error: &Option<String>,
        at_ms: u64,
    ) -> Result<Outcome, StateError> {
        if error.as_ref().is_some_and(|e| e.len() > REPORT_MAX)
            || netns.as_ref().is_some_and(|n| n.len() > REPORT_MAX)
        {
            return Err(invalid(format!(
                "task {id}: a report's error and namespace path are at most {REPORT_MAX} bytes"
            )));
        }
        let t = self.task_mut(id)?;
        if t.ended() && observed != t.observed {
            return Err(invalid(format!(
                "task {id} already ended ({:?}); its status cannot change to {observed:?}",
                t.observed
            )));
        }
        if observed < t.observed {
            return Err(invalid(format!(
                "task {id} is {:?}; a status cannot go back to {observed:?}",
                t.observed
            )));
        }
        if observed != t.observed {
            t.since_ms = at_ms;
        }
        t.observed = observed;
        if netns.is_some() {
            t.netns.clone_from(netns);
        }
        if exit_code.is_some() {
            t.exit_code = exit_code;
        }
        if error.is_some() {
            t.error.clone_from(error);
        }
        if observed >= TaskState::Complete {
            self.release_task_addresses(id);
        }
        self.bump_node(id);
        Ok(Outcome::Task(self.tasks[id].clone()))
    }

    fn remove_task(&mut self, id: &str) -> Result<Outcome, StateError> {
        self.bump_node(id);
        let task = self.tasks.remove(id).ok_or_else(|| StateError::NotFound {
            kind: "task",
            name: id.to_owned(),
        })?;
        for a in &task.attachments {
            if let Some(pool) = self.alloc.addresses.get_mut(&a.network) {
                pool.release(a.addr);
            }
        }
        if let Some(ids) = self.alloc.by_node.get_mut(&task.node) {
            ids.remove(&task.id);
            if ids.is_empty() {
                self.alloc.by_node.remove(&task.node);
            }
        }
        let key = slot_key(&task);
        if let Some(s) = self.alloc.slots.get_mut(&key) {
            s.remove(&task.seq);
            if s.is_empty() {
                self.alloc.slots.remove(&key);
            }
        }
        Ok(Outcome::Done)
    }
}

#[cfg(test)]
#[path = "state_props.rs"]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> State {
        let mut s = State::default();
        s.apply(&Command::Init {
            cluster_id: "c1".into(),
            ingress_id: "ing".into(),
            settings: ClusterSettings::default(),
            secrets: None,
        })
        .unwrap();
        s
    }

    fn network(s: &mut State, id: &str, name: &str) -> Result<Network, StateError> {
        network_with(s, id, name, None)
    }

    fn network_with(
        s: &mut State,
        id: &str,
        name: &str,
        subnet: Option<Subnet>,
    ) -> Result<Network, StateError> {
        match s.apply(&Command::CreateNetwork {
            id: id.into(),
            spec: NetworkSpec {
                name: name.into(),
                subnet,
                ..NetworkSpec::default()
            },
        })? {
            Outcome::Network(n) => Ok(n),
            o => panic!("unexpected {o:?}"),
        }
    }

    fn spec(name: &str, networks: &[&str], ports: &[(u16, Option<u16>)]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            mode: ServiceMode::Replicated { replicas: 3 },
            task: TaskTemplate {
                command: vec!["/bin/web".into()],
                env: vec!["A=1".into()],
                networks: networks
                    .iter()
                    .map(|n| NetworkAttachment {
                        target: (*n).into(),
                        aliases: vec![],
                    })
                    .collect(),
                restart: RestartPolicy::default(),
                constraints: vec![],
            },
            endpoint: EndpointSpec {
                mode: EndpointMode::Vip,
                ports: ports
                    .iter()
                    .map(|(target, published)| PortConfig {
                        protocol: Protocol::Tcp,
                        target: *target,
                        published: *published,
                        mode: PublishMode::Ingress,
                    })
                    .collect(),
            },
            update: UpdateConfig::default(),
            rollback: UpdateConfig::default(),
        }
    }

    fn create(s: &mut State, id: &str, spec: ServiceSpec) -> Result<Service, StateError> {
        match s.apply(&Command::CreateService {
            id: id.into(),
            spec,
        })? {
            Outcome::Service(svc) => Ok(*svc),
            o => panic!("unexpected {o:?}"),
        }
    }

    #[test]
    fn a_batch_applies_each_command_on_its_own_and_renames_keep_the_name_index() {
        let mut s = init();
        let out = s
            .apply(&Command::Batch {
                commands: vec![
                    Command::CreateService {
                        id: "s1".into(),
                        spec: spec("web", &[], &[(80, Some(8080))]),
                    },
                    // Same published port: refused, alone.
                    Command::CreateService {
                        id: "s2".into(),
                        spec: spec("api", &[], &[(80, Some(8080))]),
                    },
                    Command::CreateService {
                        id: "s3".into(),
                        spec: spec("db", &[], &[]),
                    },
                    Command::Batch { commands: vec![] },
                ],
            })
            .unwrap();
        let Outcome::Batch(results) = out else {
            panic!("{out:?}")
        };
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(
            results[1].as_ref().unwrap_err().contains("8080"),
            "{results:?}"
        );
        assert!(results[3].is_err());
        assert_eq!(s.services.len(), 2);
        // The name index follows a rename, and a reindex rebuilds it.
        let mut renamed = s.services["s3"].spec.clone();
        renamed.name = "store".into();
        s.apply(&Command::UpdateService {
            target: "db".into(),
            version: 1,
            spec: renamed,
        })
        .unwrap();
        assert!(s.service_by_ref("db").is_none());
        assert_eq!(s.service_by_ref("store").unwrap().id, "s3");
        let mut copy: State = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(copy.service_by_ref("store").unwrap().id, "s3");
        copy.reindex().unwrap();
        assert_eq!(copy.service_by_ref("web").unwrap().id, "s1");
        assert!(create(&mut copy, "s4", spec("web", &[], &[])).is_err());
    }

    #[test]
    fn init_creates_ingress_once_and_nothing_runs_before_it() {
        let mut empty = State::default();
        let err = network(&mut empty, "n1", "front").unwrap_err();
        assert_eq!(err.to_string(), "the cluster is not initialized");
        let mut s = init();
        let ingress = s.ingress().unwrap().clone();
        assert_eq!(
            (
                ingress.spec.name.as_str(),
                ingress.subnet.to_string(),
                ingress.vni
            ),
            ("ingress", "10.0.0.0/24".into(), 4096)
        );
        let again = s.apply(&Command::Init {
            cluster_id: "c2".into(),
            ingress_id: "i2".into(),
            settings: ClusterSettings::default(),
            secrets: None,
        });
        assert_eq!(
            again.unwrap_err().to_string(),
            "the cluster is already initialized"
        );
    }

    #[test]
    fn networks_get_names_subnets_and_vnis_and_refuse_clashes() {
        let mut s = init();
        let front = network(&mut s, "n1", "front").unwrap();
        assert_eq!(
            (front.subnet.to_string(), front.vni),
            ("10.0.1.0/24".into(), 4097)
        );
        assert_eq!(front.gateway, Ipv4Addr::new(10, 0, 1, 1));
        let err = network(&mut s, "n2", "Front_1").unwrap_err().to_string();
        assert!(err.contains("is not DNS-safe"), "{err}");
        assert_eq!(
            s.apply(&Command::CreateNetwork {
                id: "n2".into(),
                spec: NetworkSpec {
                    name: "front".into(),
                    internal: true,
                    ..NetworkSpec::default()
                },
            })
            .unwrap_err()
            .to_string(),
            "network name front is already in use"
        );
        let err = s
            .apply(&Command::CreateNetwork {
                id: "n3".into(),
                spec: NetworkSpec {
                    name: "back".into(),
                    subnet: Some("10.0.1.128/25".parse().unwrap()),
                    ..NetworkSpec::default()
                },
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("overlaps 10.0.1.0/24, used by network front"),
            "{err}"
        );
        // In use: refused; free: removed, and its subnet and VNI come back.
        create(&mut s, "s1", spec("web", &["front"], &[])).unwrap();
        let err = s
            .apply(&Command::RemoveNetwork {
                target: "front".into(),
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "network front is in use by service(s) web; remove them first"
        );
        s.apply(&Command::RemoveService {
            target: "web".into(),
        })
        .unwrap();
        s.apply(&Command::RemoveNetwork {
            target: "front".into(),
        })
        .unwrap();
        let again = network(&mut s, "n4", "again").unwrap();
        assert_eq!((again.subnet, again.vni), (front.subnet, front.vni));
    }

    #[test]
    fn services_get_vips_and_ports_and_conflicts_leave_no_trace() {
        let mut s = init();
        network(&mut s, "n1", "front").unwrap();
        let web = create(
            &mut s,
            "s1",
            spec("web", &["front"], &[(80, Some(8080)), (443, None)]),
        )
        .unwrap();
        let published: Vec<_> = web.ports.iter().map(|p| p.published.unwrap()).collect();
        assert_eq!(published, vec![8080, 30000]);
        assert_eq!(
            web.vips,
            vec![
                Vip {
                    network: "n1".into(),
                    addr: Ipv4Addr::new(10, 0, 1, 2)
                },
                Vip {
                    network: "ing".into(),
                    addr: Ipv4Addr::new(10, 0, 0, 2)
                },
            ]
        );
        // 9090 is free, 8080 is not: refused, and 9090 is not kept.
        let err = create(
            &mut s,
            "s2",
            spec("api", &["front"], &[(1, Some(9090)), (2, Some(8080))]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "published port 8080/tcp is already used by service web"
        );
        assert!(s.service_by_ref("api").is_none());
        let api = create(&mut s, "s3", spec("api", &["front"], &[(1, Some(9090))])).unwrap();
        assert_eq!(
            api.vips[0].addr,
            Ipv4Addr::new(10, 0, 1, 3),
            "the refused service's VIP was given back"
        );
        // Other refusals, each with the reason.
        let cases: Vec<(ServiceSpec, &str)> = vec![
            (spec("web", &[], &[]), "service name web is already in use"),
            (spec("x", &["nope"], &[]), "network nope not found"),
            (spec("x", &["ingress"], &[]), "joined by publishing a port"),
            (spec("x", &["front", "n1"], &[]), "attached twice"),
            (
                spec("x", &[], &[(80, Some(7000)), (81, Some(7000))]),
                "port 7000/tcp is published twice",
            ),
            (spec("x", &[], &[(0, None)]), "target port must be 1-65535"),
            (
                spec("x", &[], &[(80, Some(0))]),
                "published port must be 1-65535",
            ),
            (
                ServiceSpec {
                    endpoint: EndpointSpec {
                        mode: EndpointMode::Dnsrr,
                        ..spec("x", &[], &[(80, None)]).endpoint
                    },
                    ..spec("x", &[], &[])
                },
                "needs endpoint mode vip",
            ),
            (
                ServiceSpec {
                    task: TaskTemplate {
                        env: vec!["NOEQUALS".into()],
                        ..spec("x", &[], &[]).task
                    },
                    ..spec("x", &[], &[])
                },
                "must look like KEY=VALUE",
            ),
            (
                ServiceSpec {
                    task: TaskTemplate {
                        command: vec![],
                        ..spec("x", &[], &[]).task
                    },
                    ..spec("x", &[], &[])
                },
                "a command is required",
            ),
        ];
        let before = s.clone();
        for (spec, want) in cases {
            let err = create(&mut s, "sx", spec).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
        assert_eq!(s, before, "a refused create changed the state");
    }

    #[test]
    fn updates_need_the_current_version_and_keep_what_still_applies() {
        let mut s = init();
        network(&mut s, "n1", "front").unwrap();
        network(&mut s, "n2", "back").unwrap();
        let web = create(
            &mut s,
            "s1",
            spec("web", &["front"], &[(80, Some(8080)), (443, None)]),
        )
        .unwrap();
        create(&mut s, "s2", spec("db", &["back"], &[(5432, Some(5432))])).unwrap();
        let update = |s: &mut State, version, spec| {
            s.apply(&Command::UpdateService {
                target: "web".into(),
                version,
                spec,
            })
        };
        // A stale version is refused with both numbers.
        let err = update(&mut s, 0, spec("web", &["front"], &[])).unwrap_err();
        assert!(err.to_string().contains("(version 1, you sent 0)"), "{err}");
        // Moving 8080 to 8081, adding a network: the auto port and the front VIP stay.
        let Outcome::Service(v2) = update(
            &mut s,
            1,
            spec("web", &["front", "back"], &[(80, Some(8081)), (443, None)]),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(v2.version, 2);
        assert_eq!(
            v2.ports
                .iter()
                .map(|p| p.published.unwrap())
                .collect::<Vec<_>>(),
            vec![8081, 30000]
        );
        assert_eq!(v2.vips[0], web.vips[0]);
        assert_eq!(v2.previous.as_ref().unwrap(), &web.spec);
        // 8080 is free again; a clash with db's port is refused and changes nothing.
        create(&mut s, "s3", spec("other", &[], &[(1, Some(8080))])).unwrap();
        let before = s.clone();
        let err = update(&mut s, 2, spec("web", &["front"], &[(80, Some(5432))])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "published port 5432/tcp is already used by service db"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn tasks_get_an_address_and_mac_per_network_and_release_them() {
        let mut s = init();
        network(&mut s, "n1", "front").unwrap();
        s.apply(&Command::AddNode {
            id: "node1".into(),
            hostname: "h1".into(),
            addr: Ipv4Addr::new(198, 18, 0, 1),
            api_addr: None,
            role: Role::Manager,
            underlay: Vec::new(),
        })
        .unwrap();
        create(&mut s, "s1", spec("web", &["front"], &[(80, Some(8080))])).unwrap();
        let Outcome::Task(t) = s
            .apply(&Command::CreateTask {
                id: "t1".into(),
                service: "web".into(),
                slot: 1,
                node: "node1".into(),
                netns: None,
            })
            .unwrap()
        else {
            panic!()
        };
        let got: Vec<_> = t
            .attachments
            .iter()
            .map(|a| (a.network.as_str(), a.addr, a.mac))
            .collect();
        assert_eq!(
            got,
            vec![
                ("n1", Ipv4Addr::new(10, 0, 1, 4), [2, 0x42, 10, 0, 1, 4]),
                ("ing", Ipv4Addr::new(10, 0, 0, 4), [2, 0x42, 10, 0, 0, 4]),
            ]
        );
        // The node got its ingress address when it joined (10.0.0.2, before
        // the service's ingress VIP), and its address on n1 with its first
        // task there (10.0.1.3, after the VIP).
        let lbs: Vec<_> = s.nodes["node1"].lb_addrs.clone().into_iter().collect();
        assert_eq!(
            lbs,
            vec![
                ("ing".to_owned(), Ipv4Addr::new(10, 0, 0, 2)),
                ("n1".to_owned(), Ipv4Addr::new(10, 0, 1, 3)),
            ]
        );
        // A second task there reuses the node's address.
        s.apply(&Command::CreateTask {
            id: "t2".into(),
            service: "web".into(),
            slot: 2,
            node: "node1".into(),
            netns: None,
        })
        .unwrap();
        assert_eq!(s.nodes["node1"].lb_addrs.len(), 2);
        let mut copy = s.clone();
        copy.reindex().unwrap();
        for net in ["n1", "ing"] {
            let mut a = copy.alloc.addresses[net].clone();
            let mut b = s.alloc.addresses[net].clone();
            assert_eq!(a.allocate().unwrap(), b.allocate().unwrap(), "{net}");
        }
        // Removing the service removes its tasks and frees every address.
        s.apply(&Command::RemoveService {
            target: "web".into(),
        })
        .unwrap();
        assert!(s.tasks.is_empty());
        let again = create(&mut s, "s2", spec("web2", &["front"], &[(80, None)])).unwrap();
        assert_eq!(again.vips[0].addr, Ipv4Addr::new(10, 0, 1, 2));
    }

    #[test]
    fn nodes_are_versioned_and_guarded() {
        let mut s = init();
        s.apply(&Command::AddNode {
            id: "m1".into(),
            hostname: "mgr".into(),
            addr: Ipv4Addr::new(198, 18, 0, 1),
            api_addr: None,
            role: Role::Manager,
            underlay: Vec::new(),
        })
        .unwrap();
        s.apply(&Command::AddNode {
            id: "w1".into(),
            hostname: "wrk".into(),
            addr: Ipv4Addr::new(198, 18, 0, 2),
            api_addr: None,
            role: Role::Worker,
            underlay: Vec::new(),
        })
        .unwrap();
        let err = s
            .apply(&Command::AddNode {
                id: "w2".into(),
                hostname: "dup".into(),
                addr: Ipv4Addr::new(198, 18, 0, 2),
                api_addr: None,
                role: Role::Worker,
                underlay: Vec::new(),
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "node address 198.18.0.2 is already used by node wrk"
        );
        let demote = NodeSpec {
            role: Role::Worker,
            availability: Availability::Active,
            labels: BTreeMap::new(),
        };
        let err = s
            .apply(&Command::UpdateNode {
                id: "m1".into(),
                version: 1,
                spec: demote.clone(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("is the last manager"), "{err}");
        let drain = NodeSpec {
            availability: Availability::Drain,
            ..demote.clone()
        };
        s.apply(&Command::UpdateNode {
            id: "w1".into(),
            version: 1,
            spec: drain.clone(),
        })
        .unwrap();
        let err = s
            .apply(&Command::UpdateNode {
                id: "w1".into(),
                version: 1,
                spec: drain,
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Conflict {
                    current: 2,
                    given: 1,
                    ..
                }
            ),
            "{err}"
        );
        let remove = |s: &mut State, id: &str, force| {
            s.apply(&Command::RemoveNode {
                id: id.into(),
                force,
            })
            .unwrap_err()
            .to_string()
        };
        let err = remove(&mut s, "m1", true);
        assert!(err.contains("demote it before removing it"), "{err}");
        let err = remove(&mut s, "w1", false);
        assert!(err.contains("is not down and can't be removed"), "{err}");
        s.apply(&Command::SetNodeStatus {
            id: "w1".into(),
            status: NodeStatus::Down,
        })
        .unwrap();
        s.apply(&Command::RemoveNode {
            id: "w1".into(),
            force: false,
        })
        .unwrap();
        assert_eq!(s.nodes.len(), 1);
    }

    /// A node is addressed by id only: a hostname that equals, or looks
    /// like, another node's id is refused at join, and commands never
    /// resolve a hostname (they once took "id or hostname, first match",
    /// so a joiner named after a victim's id was marked down for it).
    #[test]
    fn node_identity_cannot_be_shadowed() {
        let mut s = init();
        let add = |s: &mut State, id: &str, hostname: &str, last: u8| {
            s.apply(&Command::AddNode {
                id: id.into(),
                hostname: hostname.into(),
                addr: Ipv4Addr::new(198, 18, 0, last),
                api_addr: None,
                role: Role::Worker,
                underlay: Vec::new(),
            })
        };
        add(&mut s, "00000000000000a1", "victim", 1).unwrap();
        let before = serde_json::to_vec(&s).unwrap();
        for (hostname, want) in [
            ("00000000000000a1", "looks like a node id"),
            ("0123456789abcdef", "looks like a node id"),
            ("Victim", "not a valid host name"),
            ("-x", "not a valid host name"),
            ("a..b", "not a valid host name"),
            ("", "not a valid host name"),
            (&"a".repeat(64), "not a valid host name"),
        ] {
            let err = add(&mut s, "00000000000000b2", hostname, 2).unwrap_err();
            assert!(err.to_string().contains(want), "{hostname:?}: {err}");
            assert_eq!(
                serde_json::to_vec(&s).unwrap(),
                before,
                "{hostname:?} left a trace"
            );
        }
        // A new id may not equal an existing hostname either.
        add(&mut s, "00000000000000c3", "00000000000000d4x.example", 3).unwrap();
        let err = add(&mut s, "00000000000000d4x.example", "other", 4).unwrap_err();
        assert!(err.to_string().contains("already the hostname"), "{err}");
        s.apply(&Command::RemoveNode {
            id: "00000000000000c3".into(),
            force: true,
        })
        .unwrap();
        // Two nodes may share a hostname; commands by hostname find neither.
        add(&mut s, "00000000000000e5", "victim", 5).unwrap();
        let err = s
            .apply(&Command::SetNodeStatus {
                id: "victim".into(),
                status: NodeStatus::Down,
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "node victim not found");
        s.apply(&Command::SetNodeStatus {
            id: "00000000000000a1".into(),
            status: NodeStatus::Down,
        })
        .unwrap();
        assert_eq!(s.nodes["00000000000000a1"].status, NodeStatus::Down);
        assert_eq!(s.nodes["00000000000000e5"].status, NodeStatus::Ready);
    }

    /// A request applies once: the retry of a write whose first attempt
    /// committed unseen is answered "already applied", and changes nothing.
    /// A create retried by hand finds "already exists, same spec".
    #[test]
    fn a_request_applies_once_and_a_same_spec_create_says_so() {
        let mut s = init();
        let create = Command::CreateNetwork {
            id: "n1".into(),
            spec: NetworkSpec {
                name: "front".into(),
                ..NetworkSpec::default()
            },
        };
        let once = Command::Once {
            request: "r1".into(),
            write: Box::new(create.clone()),
        };
        assert!(matches!(s.apply(&once).unwrap(), Outcome::Network(_)));
        let after = serde_json::to_vec(&s).unwrap();
        assert_eq!(s.apply(&once).unwrap(), Outcome::AlreadyApplied);
        assert_eq!(serde_json::to_vec(&s).unwrap(), after);
        assert!(matches!(s.outcome_of(&create), Outcome::Network(n) if n.id == "n1"));
        // The request log survives a snapshot.
        let mut copy: State = serde_json::from_slice(&after).unwrap();
        copy.reindex().unwrap();
        assert_eq!(copy.apply(&once).unwrap(), Outcome::AlreadyApplied);
        // A new request with the same spec: not a conflict, but named.
        let err = s
            .apply(&Command::CreateNetwork {
                id: "n2".into(),
                spec: NetworkSpec {
                    name: "front".into(),
                    ..NetworkSpec::default()
                },
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("already exists, with the same spec (id n1)"),
            "{err}"
        );
        // A refused request is not recorded: it can be retried.
        let bad = Command::Once {
            request: "r2".into(),
            write: Box::new(Command::RemoveNetwork {
                target: "nope".into(),
            }),
        };
        assert!(s.apply(&bad).is_err());
        assert!(!s.requests.contains("r2"));
        // The log is bounded, oldest out first.
        let mut r = RecentRequests::default();
        for i in 0..RecentRequests::CAPACITY + 2 {
            r.insert(&i.to_string());
        }
        assert!(!r.contains("0") && !r.contains("1") && r.contains("2"));
    }

    /// No network may overlap a node's underlay, given or picked from the
    /// pool, and no node may join on an underlay a network overlaps.
    #[test]
    fn networks_stay_off_every_nodes_underlay() {
        let mut s = init();
        let sub = |t: &str| t.parse::<Subnet>().unwrap();
        s.apply(&Command::AddNode {
            id: "n1".into(),
            hostname: "host1".into(),
            addr: Ipv4Addr::new(10, 0, 1, 5),
            api_addr: None,
            role: Role::Worker,
            underlay: vec![sub("10.0.1.0/24")],
        })
        .unwrap();
        let before = serde_json::to_vec(&s).unwrap();
        let err = network_with(&mut s, "x", "n4b", Some(sub("10.0.0.0/16"))).unwrap_err();
        assert!(
            err.to_string()
                .contains("overlaps the underlay of node host1 (10.0.1.0/24"),
            "{err}"
        );
        assert_eq!(serde_json::to_vec(&s).unwrap(), before);
        // The pool skips it: ingress has 10.0.0.0/24, the next free is .2.
        let picked = network_with(&mut s, "y", "auto", None).unwrap();
        assert_eq!(picked.subnet.to_string(), "10.0.2.0/24");
        // A node whose underlay a network overlaps can't join.
        let err = s
            .apply(&Command::AddNode {
                id: "n2".into(),
                hostname: "host2".into(),
                addr: Ipv4Addr::new(10, 0, 2, 9),
                api_addr: None,
                role: Role::Worker,
                underlay: vec![sub("10.0.2.0/24")],
            })
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("overlaps network auto (10.0.2.0/24)"),
            "{err}"
        );
        // Its address alone counts too.
        let err = s
            .apply(&Command::AddNode {
                id: "n3".into(),
                hostname: "host3".into(),
                addr: Ipv4Addr::new(10, 0, 2, 10),
                api_addr: None,
                role: Role::Worker,
                underlay: Vec::new(),
            })
            .unwrap_err();
        assert!(err.to_string().contains("overlaps network auto"), "{err}");

        // host1's underlay grows after it joined: recorded (a fact, even
        // where a network overlaps it), and kept off from then on.
        s.apply(&Command::SetNodeUnderlay {
            id: "n1".into(),
            underlay: vec![sub("10.0.1.0/24"), sub("10.0.9.0/24"), sub("10.0.2.0/24")],
        })
        .unwrap();
        assert!(
            s.underlay_clash("n1", &s.nodes["n1"].underlay)
                .unwrap()
                .contains("network auto")
        );
        let err = network_with(&mut s, "z", "late", Some(sub("10.0.9.128/25"))).unwrap_err();
        assert!(
            err.to_string()
                .contains("overlaps the underlay of node host1 (10.0.9.0/24"),
            "{err}"
        );
        let picked = network_with(&mut s, "w", "next", None).unwrap();
        assert_eq!(picked.subnet.to_string(), "10.0.3.0/24");
        // Bounded, and only for a node that exists.
        let before = serde_json::to_vec(&s).unwrap();
        let many = (0..65)
            .map(|i| Subnet::containing(Ipv4Addr::new(192, 168, i, 0), 24))
            .collect();
        assert!(
            s.apply(&Command::SetNodeUnderlay {
                id: "n1".into(),
                underlay: many
            })
            .is_err()
        );
        assert!(
            s.apply(&Command::SetNodeUnderlay {
                id: "nope".into(),
                underlay: vec![]
            })
            .is_err()
        );
        assert_eq!(serde_json::to_vec(&s).unwrap(), before);
    }

    /// A worker's report is bounded before it reaches the log, and the
    /// state refuses an unbounded one from anywhere else.
    #[test]
    fn task_reports_are_bounded() {
        let long = "é".repeat(10_000);
        let cut = bound_report(long.clone());
        assert!(
            cut.len() <= REPORT_MAX && cut.ends_with("(truncated)"),
            "{}",
            cut.len()
        );
        assert_eq!(bound_report("short".into()), "short");
        let mut s = init();
        let err = s
            .apply(&Command::SetTaskStatus {
                id: "t".into(),
                observed: TaskState::Failed,
                netns: None,
                exit_code: None,
                error: Some(long),
                at_ms: 0,
            })
            .unwrap_err();
        assert!(err.to_string().contains("at most 4096 bytes"), "{err}");
    }

    /// Equality sees every persisted field: it once ignored these four,
    /// so replicas diverging in them compared equal.
    #[test]
    fn state_equality_covers_every_persisted_field() {
        let base = init();
        let mut changed: Vec<(&str, State)> = Vec::new();
        let mut s = base.clone();
        s.removed.insert("gone".into());
        changed.push(("removed", s));
        let mut s = base.clone();
        s.task_seq += 1;
        changed.push(("task_seq", s));
        let mut s = base.clone();
        s.secrets = Some(ClusterSecrets::default());
        changed.push(("secrets", s));
        let mut s = base.clone();
        s.network_keys.push(NetworkKey {
            id: 1,
            secret: vec![0; 20],
            created_ms: 0,
        });
        changed.push(("network_keys", s));
        for (field, s) in changed {
            assert_ne!(s, base, "{field} is not compared");
        }
        assert_eq!(base.clone(), base);
    }

    #[test]
    fn replicas_and_snapshots_agree() {
        let log = vec![
            Command::Init {
                cluster_id: "c".into(),
                ingress_id: "ing".into(),
                settings: ClusterSettings::default(),
                secrets: None,
            },
            Command::AddNode {
                id: "n".into(),
                hostname: "h".into(),
                addr: Ipv4Addr::new(198, 18, 0, 1),
                api_addr: None,
                role: Role::Manager,
                underlay: Vec::new(),
            },
            Command::CreateNetwork {
                id: "n1".into(),
                spec: NetworkSpec {
                    name: "front".into(),
                    ..NetworkSpec::default()
                },
            },
            Command::CreateService {
                id: "s1".into(),
                spec: spec("web", &["front"], &[(80, None)]),
            },
            Command::CreateTask {
                id: "t1".into(),
                service: "s1".into(),
                slot: 1,
                node: "n".into(),
                netns: None,
            },
            Command::CreateService {
                id: "s2".into(),
                spec: spec("api", &["front"], &[(81, None)]),
            },
            Command::RemoveService {
                target: "web".into(),
            },
        ];
        let mut a = State::default();
        let mut b = State::default();
        for c in &log {
            assert_eq!(a.apply(c), b.apply(c));
        }
        assert_eq!(a, b);
        // A snapshot round trip, then the same next command on both.
        let mut restored: State =
            serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        restored.reindex().unwrap();
        assert_eq!(restored, a);
        let next = Command::CreateService {
            id: "s3".into(),
            spec: spec("new", &["front"], &[(82, None)]),
        };
        let (x, y) = (a.apply(&next).unwrap(), restored.apply(&next).unwrap());
        assert_eq!(
            x, y,
            "the restored allocators hand out what the originals do"
        );
        let Outcome::Service(svc) = x else { panic!() };
        assert_eq!(
            svc.ports[0].published,
            Some(30000),
            "web's port was freed and is reused"
        );
    }
}
