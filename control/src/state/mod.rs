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
    sync::Arc,
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
    #[error(
        "network {network} has active endpoints: task(s) {tasks} still run on it (their service \
         left the network, and a rolling update has not replaced them yet); wait for them to \
         stop, or remove them"
    )]
    NetworkHasEndpoints { network: String, tasks: String },
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
    /// its slot's previous one in O(log n). One flat map, not a map per
    /// slot: most slots hold one task, and a map's first node costs ~400 B.
    slots: BTreeMap<(SlotKey, u64), String>,
    /// Service id -> its current task template, the one copy its new
    /// tasks share.
    templates: BTreeMap<String, Arc<TaskTemplate>>,
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

impl Allocations {
    /// The id of the newest task of slot `key`.
    fn newest_of_slot(&self, key: &SlotKey) -> Option<&String> {
        self.slots
            .range((key.clone(), 0)..=(key.clone(), u64::MAX))
            .next_back()
            .map(|(_, id)| id)
    }

    /// `current`, service `service`'s task template, as the one shared
    /// copy its tasks hold (made anew when the template changed).
    fn template(&mut self, service: &str, current: &TaskTemplate) -> Arc<TaskTemplate> {
        match self.templates.get(service) {
            Some(t) if **t == *current => t.clone(),
            _ => {
                let t = Arc::new(current.clone());
                self.templates.insert(service.to_owned(), t.clone());
                t
            }
        }
    }
}

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
            .range((from, 0)..)
            .take_while(move |((k, _), _)| k.0 == id)
            .filter_map(|(_, t)| self.tasks.get(t))
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
        for t in self.tasks.values_mut() {
            // Decoded, every task has its own copy of its template: tasks
            // of a service's current template share its one again.
            if let Some(s) = self.services.get(&t.service)
                && *t.spec == s.spec.task
            {
                t.spec = alloc.template(&s.id, &s.spec.task);
            }
            for a in &t.attachments {
                if let Some(pool) = alloc.addresses.get_mut(&a.network) {
                    pool.reserve(a.addr)?;
                }
            }
            alloc.slots.insert((slot_key(t), t.seq), t.id.clone());
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
}

mod networks;
mod nodes;
mod services;
mod tasks;

#[cfg(test)]
mod tests;
