//! The agent session: what a node's agent and the leader's dispatcher say
//! to each other (binary bodies, see `control::codec`, of the
//! `Dispatcher.Session` stream), and what the agent hands its data plane after each change.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::tables::{Delta, Key, Revision, Tables, Value};

/// What an agent sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message: the revision the agent has applied (0: none).
    Hello {
        revision: Revision,
        /// The agent has no key ring (it is never written to disk): send
        /// it with the catch-up ([`DispatcherMessage::Keys`]).
        #[serde(default)]
        want_keys: bool,
    },
    Heartbeat,
    /// The agent applied everything up to `revision` to its data plane.
    Ack {
        revision: Revision,
    },
    /// What one of this node's tasks did.
    TaskStatus(TaskReport),
    /// The prefixes on this node's underlay interface now: sent after the
    /// hello and whenever they change, committed as
    /// [`Command::SetNodeUnderlay`](crate::Command::SetNodeUnderlay)
    /// when they differ from the state's.
    Underlay {
        prefixes: Vec<crate::Subnet>,
    },
}

/// A node's report on one of its tasks, committed as
/// [`Command::SetTaskStatus`](crate::Command::SetTaskStatus).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskReport {
    pub id: String,
    pub observed: crate::TaskState,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A task this node must run, or stop: the node's share of the state, as
/// Swarm's dispatcher assigns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: String,
    /// `svc.slot` (replicated) or `svc.node.task` (global).
    pub name: String,
    pub service: String,
    pub desired: crate::TaskState,
    /// What the node last reported (a node that restarted learns here
    /// which tasks it had started).
    pub observed: crate::TaskState,
    pub command: Vec<String>,
    pub env: Vec<String>,
    /// The networks it is attached to: the node starts the task once its
    /// data plane has wired that many endpoints into the namespace.
    #[serde(default)]
    pub networks: usize,
}

/// What the dispatcher sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatcherMessage {
    /// First message: how often to send heartbeats.
    Welcome { heartbeat_ms: u64, misses: u32 },
    /// Replace the whole table.
    Snapshot { tables: Tables },
    /// Apply on top of the previous revision.
    Delta { delta: Arc<Delta> },
    /// Answers a heartbeat: the leader is alive.
    Heartbeat,
    /// This node's whole set of assigned tasks; sent at the start of a
    /// session and whenever it changes.
    Assignments { tasks: Vec<Assignment> },
    /// The catch-up at the start of a session is complete: the agent now
    /// holds the current tables (at `revision`).
    CaughtUp { revision: Revision },
    /// The encrypted networks' key ring as the tables hold it now (`None`:
    /// none), for an agent that asked in its hello. It changes no
    /// revision: the ring is part of the tables, only kept off the disk.
    Keys {
        entry: Option<Box<crate::tables::Value>>,
    },
}

/// One entry a delta changed: what it was and what it is now.
#[derive(Debug, Clone)]
pub struct Applied {
    pub key: Key,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// What changed since the sink's last call.
#[derive(Debug, Clone, Copy)]
pub enum Update<'a> {
    /// Everything may have changed (a snapshot, or the state at start).
    Whole,
    /// Exactly these entries changed.
    Delta(&'a [Applied]),
}

/// Prefix of the error a manager that is not the leader gives an agent,
/// followed by the leader's API address when known.
pub const NOT_LEADER_DISPATCH: &str = "not the leader; the dispatcher is at";
