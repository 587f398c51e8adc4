//! The commands of the replicated log, and what applying one produced.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::*;

/// One entry of the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "command")]
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
