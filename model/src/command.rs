//! The commands of the replicated log, and what applying one produced.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::*;

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// The first entry: settings and the ingress network.
    Init {
        cluster_id: String,
        ingress_id: String,
        settings: ClusterSettings,
        #[serde(default)]
        secrets: Option<ClusterSecrets>,
    },
    /// Adds keys to the encrypted networks' ring (the leader's key
    /// manager); the oldest go beyond the ring's size.
    RotateNetworkKeys {
        keys: Vec<NetworkKey>,
    },
    /// Replaces a join token (rotation): the old one is refused from then on.
    SetJoinToken {
        role: Role,
        record: TokenRecord,
    },
    AddNode {
        id: String,
        hostname: String,
        addr: Ipv4Addr,
        #[serde(default)]
        api_addr: Option<String>,
        role: Role,
        /// The prefixes on its underlay interface.
        #[serde(default)]
        underlay: Vec<Subnet>,
    },

    UpdateNode {
        id: String,
        version: u64,
        spec: NodeSpec,
    },
    SetNodeStatus {
        id: String,
        status: NodeStatus,
    },
    /// A node's underlay interface changed after it joined: the prefixes it
    /// holds now, which every network must stay off from then on.
    SetNodeUnderlay {
        id: String,
        underlay: Vec<Subnet>,
    },
    RemoveNode {
        id: String,
        force: bool,
    },
    CreateNetwork {
        id: String,
        spec: NetworkSpec,
    },
    RemoveNetwork {
        target: String,
    },
    CreateService {
        id: String,
        spec: ServiceSpec,
    },
    UpdateService {
        target: String,
        version: u64,
        spec: ServiceSpec,
    },
    RemoveService {
        target: String,
    },
    /// `service rollback`, or an update's failure_action: the previous spec
    /// becomes the spec again, and the orchestrator rolls the tasks back.
    RollbackService {
        target: String,
        #[serde(default)]
        message: String,
    },
    /// The orchestrator's progress on a service's rolling update.
    SetUpdateStatus {
        service: String,
        state: UpdateState,
        #[serde(default)]
        message: String,
    },
    CreateTask {
        id: String,
        service: String,
        slot: u32,
        node: String,
        #[serde(default)]
        netns: Option<String>,
    },
    RemoveTask {
        id: String,
    },
    /// Tells a task to stop (desired state shutdown); its record stays as
    /// history. A task no node has started yet ends at once.
    ShutdownTask {
        id: String,
    },
    /// What the node running a task saw: states only move forward, and an
    /// ended task gives its addresses back.
    SetTaskStatus {
        id: String,
        observed: TaskState,
        #[serde(default)]
        netns: Option<String>,
        #[serde(default)]
        exit_code: Option<i32>,
        #[serde(default)]
        error: Option<String>,
        /// When the leader recorded it (ms since the Unix epoch): restart
        /// delays and `service ps` count from it.
        #[serde(default)]
        at_ms: u64,
    },
    /// Several commands in one log entry (the leader batches concurrent
    /// writes). Each applies, or is refused, on its own.
    Batch {
        commands: Vec<Command>,
    },
    /// `write`, applied at most once for `request`: a write retried
    /// across a leader change (the first attempt may have committed) is
    /// answered [`Outcome::AlreadyApplied`] the second time. The state
    /// remembers the last [`RecentRequests::CAPACITY`] applied requests.
    Once {
        request: String,
        write: Box<Command>,
    },
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Done,
    Node(Node),
    Network(Network),
    Service(Box<Service>),
    Task(Task),
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<Result<Outcome, String>>),
    /// A [`Command::Once`] whose request was applied before.
    AlreadyApplied,
}

/// What a command may change, named by the ids or names it carries. This is
/// the one table of it: the orchestrator's touched set (`control::state`)
/// and the tables' delta derivation (`control::tables`) both read it, each
/// resolving names against the state before the command applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch<'a> {
    /// The settings or the set of networks.
    Networks,
    /// The encrypted networks' key ring.
    NetworkKeys,
    /// A node that joins (by id).
    NewNode(&'a str),
    /// A node that exists (by id).
    Node(&'a str),
    /// A service being created (by id).
    NewService(&'a str),
    /// An existing service's spec, by id or name: its tasks' names follow it.
    Service(&'a str),
    /// A service's rolling-update status (by id): the orchestrator's
    /// business, not the tables'.
    UpdateStatus(&'a str),
    /// A task being created for a service (id or name) on a node.
    NewTask {
        id: &'a str,
        service: &'a str,
        node: &'a str,
    },
    /// An existing task (by id).
    Task(&'a str),
}

impl Command {
    /// What this command may change; a batch's (or a retried request's)
    /// commands are looked into.
    pub fn touches(&self) -> Vec<Touch<'_>> {
        let mut out = Vec::new();
        self.touches_into(&mut out);
        out
    }

    fn touches_into<'a>(&'a self, out: &mut Vec<Touch<'a>>) {
        match self {
            Command::Init { .. }
            | Command::CreateNetwork { .. }
            | Command::RemoveNetwork { .. } => out.push(Touch::Networks),
            // The join tokens are secrets, not objects; the underlay
            // prefixes steer the allocator only.
            Command::SetJoinToken { .. } | Command::SetNodeUnderlay { .. } => {}
            Command::RotateNetworkKeys { .. } => out.push(Touch::NetworkKeys),
            Command::AddNode { id, .. } => out.push(Touch::NewNode(id)),
            Command::UpdateNode { id, .. }
            | Command::SetNodeStatus { id, .. }
            | Command::RemoveNode { id, .. } => out.push(Touch::Node(id)),
            Command::CreateService { id, .. } => out.push(Touch::NewService(id)),
            Command::UpdateService { target, .. }
            | Command::RemoveService { target }
            | Command::RollbackService { target, .. } => out.push(Touch::Service(target)),
            Command::SetUpdateStatus { service, .. } => out.push(Touch::UpdateStatus(service)),
            Command::CreateTask {
                id, service, node, ..
            } => out.push(Touch::NewTask { id, service, node }),
            Command::RemoveTask { id }
            | Command::ShutdownTask { id }
            | Command::SetTaskStatus { id, .. } => out.push(Touch::Task(id)),
            Command::Batch { commands } => {
                for c in commands {
                    c.touches_into(out);
                }
            }
            Command::Once { write, .. } => write.touches_into(out),
        }
    }
}
