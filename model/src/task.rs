//! Tasks: one slot of a service on one node, its states and attachments.

use std::{net::Ipv4Addr, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::service::TaskTemplate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Assigned,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
}

/// A task's address on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskAttachment {
    pub network: String,
    pub addr: Ipv4Addr,
    pub mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub service: String,
    pub slot: u32,
    pub node: String,
    pub desired: TaskState,
    pub observed: TaskState,
    pub attachments: Vec<TaskAttachment>,
    #[serde(default)]
    pub error: Option<String>,
    /// The task's network namespace on its node (`/run/netns/NAME` or
    /// `/proc/PID/ns/net`), once something runs it.
    #[serde(default)]
    pub netns: Option<String>,
    /// The process's exit code (128 + signal), once it ended.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Creation order in the cluster: the newest task of a slot is its
    /// current one, the rest its history.
    #[serde(default)]
    pub seq: u64,
    /// Restarts of this slot in a row: the previous task of the slot ended
    /// by itself (not stopped by the orchestrator) this many times.
    #[serde(default)]
    pub attempt: u32,
    /// When the node reported the current observed state (ms since the
    /// Unix epoch, the leader's clock); 0 before any report.
    #[serde(default)]
    pub since_ms: u64,
    /// Run by something other than mesh (its namespace was given when it
    /// was recorded): no node's executor starts it, and the orchestrator
    /// neither counts, stops nor replaces it. Its endpoints serve as any
    /// other's.
    #[serde(default)]
    pub attached: bool,
    /// The service's task template when this task was created: what the
    /// node runs. A task whose template differs from its service's is out
    /// of date, and a rolling update replaces it. Shared: the tasks made
    /// from one template hold one copy (the state interns it).
    #[serde(default)]
    pub spec: Arc<TaskTemplate>,
}

impl Task {
    /// Meant to run and not ended: it counts towards its service, and
    /// serves (on a ready node).
    pub fn live(&self) -> bool {
        self.desired <= TaskState::Running && !self.ended()
    }

    /// The orchestrator's to manage: not attached from outside.
    pub fn managed(&self) -> bool {
        !self.attached
    }

    /// Its name: `svc.slot` for a replicated service's task,
    /// `svc.node.task` for a global one's (as Swarm names them).
    pub fn name(&self, service: &str) -> String {
        if self.slot == 0 {
            format!("{service}.{}.{}", self.node, self.id)
        } else {
            format!("{service}.{}", self.slot)
        }
    }

    /// Its slot: the number, or for a global service's task (slot 0) its
    /// node.
    pub fn slot(&self) -> (u32, &str) {
        let node = if self.slot == 0 {
            self.node.as_str()
        } else {
            ""
        };
        (self.slot, node)
    }

    /// Ended, for whatever reason.
    pub fn ended(&self) -> bool {
        self.observed >= TaskState::Complete
    }

    /// Ended by itself (exited, failed, or was refused), not stopped
    /// because it was told to.
    pub fn ended_by_itself(&self) -> bool {
        matches!(
            self.observed,
            TaskState::Complete | TaskState::Failed | TaskState::Rejected
        )
    }
}
