//! The documents the Cluster and Node APIs answer with (JSON in `Blob`s
//! until the typed API lands): views of nodes, services and tasks, cluster
//! info, convergence progress, task logs and the key ring's public part;
//! and how a client reads a write error.

use serde::{Deserialize, Serialize};

use crate::{Node, NodeStatus, Service, Task, tables::Revision};

/// The output of one task, as `service logs` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskLog {
    pub id: String,
    pub name: String,
    pub node_hostname: String,
    /// Its stdout and stderr, in the order written (the last 1 MiB).
    pub text: String,
    /// Why the log could not be read (the node is down, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The key ring without its secrets (`meshctl swarm rotate-network-key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRing {
    /// Key ids, oldest first, with their creation time (ms).
    pub keys: Vec<(u32, u64)>,
    pub primary: Option<u32>,
}

impl KeyRing {
    pub fn of(keys: &[crate::NetworkKey]) -> KeyRing {
        KeyRing {
            keys: keys.iter().map(|k| (k.id, k.created_ms)).collect(),
            primary: crate::ring::primary(keys).map(|k| k.id),
        }
    }
}

/// What `Node/Whoami` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Whoami {
    pub node: Node,
    pub managers: Vec<String>,
    /// The cluster's certificate lifetime: renewal starts in its last third.
    #[serde(default)]
    pub cert_lifetime_secs: u64,
}

/// A node with its Raft standing, as `node ls/inspect` show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub node: Node,
    pub manager_status: Option<ManagerStatus>,
    /// Whether this is the manager that answered.
    pub is_self: bool,
}

/// A service with its task count, as `service ls` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    #[serde(flatten)]
    pub service: Service,
    /// Tasks observed running.
    pub running: usize,
}

/// A task with the names `service ps` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskView {
    #[serde(flatten)]
    pub task: Task,
    /// `svc.slot`, or `svc.node-id.task-id` for a global service's task.
    pub name: String,
    pub node_hostname: String,
}

/// What `Cluster/Info` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub cluster_id: String,
    pub node_id: String,
    pub leader: Option<String>,
    pub term: u64,
    pub last_applied: Option<u64>,
    pub managers: usize,
    pub nodes: usize,
    pub services: usize,
    pub networks: usize,
}

/// The metadata key a read's reply carries when the answering manager
/// could not confirm its state is current: the reason, with its lag.
pub const STALE_HEADER: &str = "mesh-stale";

/// How a manager sees another, for `node ls`'s MANAGER STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManagerStatus {
    Leader,
    Reachable,
    Unreachable,
    /// Reachable, but missing this many committed entries (the leader's
    /// view): its reads wait, its state is not yet the cluster's.
    Behind {
        entries: u64,
    },
}

/// Whether a transport error's text says the request was never sent (the
/// TCP connection could not be made). Anything else, a reset or a TLS
/// close included, may have come after the request went out.
pub fn never_sent(text: &str) -> bool {
    [
        "tcp connect error",
        "Connection refused",
        "No route to host",
        "error trying to connect",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// One node's convergence, as `meshctl` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProgress {
    pub id: String,
    pub hostname: String,
    pub status: NodeStatus,
    /// The revision the node's agent last acked (None: no session since
    /// this leader took over).
    pub acked: Option<Revision>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The tables' current revision on the leader.
    pub revision: Revision,
    pub nodes: Vec<NodeProgress>,
}

impl Progress {
    /// Nodes that are up and have not yet applied `revision`.
    pub fn pending(&self, revision: Revision) -> Vec<&NodeProgress> {
        self.nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Ready && n.acked.unwrap_or(0) < revision)
            .collect()
    }
}
