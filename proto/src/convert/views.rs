//! What the API answers with beyond the records: views with their
//! derived columns, lists, cluster info, progress, logs and the key ring.

use model::{
    NodeStatus,
    api::{
        Info, KeyRing, ManagerStatus, NodeProgress, NodeView, Progress, ServiceView, TaskLog,
        TaskView, Whoami,
    },
};

use super::{FromWire, Wire, WireError, each, nested, wire};
use crate::v1 as pb;

impl From<ManagerStatus> for pb::ManagerStatus {
    fn from(m: ManagerStatus) -> Self {
        use pb::manager_status::Kind;
        let (kind, behind) = match m {
            ManagerStatus::Leader => (Kind::Leader, 0),
            ManagerStatus::Reachable => (Kind::Reachable, 0),
            ManagerStatus::Unreachable => (Kind::Unreachable, 0),
            ManagerStatus::Behind { entries } => (Kind::Behind, entries),
        };
        pb::ManagerStatus {
            kind: kind.into(),
            behind_entries: behind,
        }
    }
}

impl TryFrom<pb::ManagerStatus> for ManagerStatus {
    type Error = WireError;
    fn try_from(m: pb::ManagerStatus) -> Wire<ManagerStatus> {
        use pb::manager_status::Kind;
        match Kind::try_from(m.kind) {
            Ok(Kind::Leader) => Ok(ManagerStatus::Leader),
            Ok(Kind::Reachable) => Ok(ManagerStatus::Reachable),
            Ok(Kind::Unreachable) => Ok(ManagerStatus::Unreachable),
            Ok(Kind::Behind) => Ok(ManagerStatus::Behind {
                entries: m.behind_entries,
            }),
            Ok(Kind::Unspecified) | Err(_) => Err(WireError::new(
                "kind",
                format!("{} is not a manager status", m.kind),
            )),
        }
    }
}

impl From<NodeView> for pb::NodeView {
    fn from(v: NodeView) -> Self {
        pb::NodeView {
            node: Some(v.node.into()),
            manager_status: v.manager_status.map(Into::into),
            is_self: v.is_self,
        }
    }
}

impl TryFrom<pb::NodeView> for NodeView {
    type Error = WireError;
    fn try_from(v: pb::NodeView) -> Wire<NodeView> {
        Ok(NodeView {
            node: nested(v.node, "node")?,
            manager_status: v
                .manager_status
                .map(|m| nested(Some(m), "manager_status"))
                .transpose()?,
            is_self: v.is_self,
        })
    }
}

impl From<ServiceView> for pb::ServiceView {
    fn from(v: ServiceView) -> Self {
        pb::ServiceView {
            service: Some(v.service.into()),
            running: v.running as u64,
        }
    }
}

impl TryFrom<pb::ServiceView> for ServiceView {
    type Error = WireError;
    fn try_from(v: pb::ServiceView) -> Wire<ServiceView> {
        Ok(ServiceView {
            service: nested(v.service, "service")?,
            running: usize::try_from(v.running)
                .map_err(|_| WireError::new("running", "out of range"))?,
        })
    }
}

impl From<TaskView> for pb::TaskView {
    fn from(v: TaskView) -> Self {
        pb::TaskView {
            task: Some(v.task.into()),
            name: v.name,
            node_hostname: v.node_hostname,
        }
    }
}

impl TryFrom<pb::TaskView> for TaskView {
    type Error = WireError;
    fn try_from(v: pb::TaskView) -> Wire<TaskView> {
        Ok(TaskView {
            task: nested(v.task, "task")?,
            name: v.name,
            node_hostname: v.node_hostname,
        })
    }
}

impl From<TaskLog> for pb::TaskLog {
    fn from(l: TaskLog) -> Self {
        pb::TaskLog {
            id: l.id,
            name: l.name,
            node_hostname: l.node_hostname,
            text: l.text,
            error: l.error,
        }
    }
}

impl TryFrom<pb::TaskLog> for TaskLog {
    type Error = WireError;
    fn try_from(l: pb::TaskLog) -> Wire<TaskLog> {
        Ok(TaskLog {
            id: l.id,
            name: l.name,
            node_hostname: l.node_hostname,
            text: l.text,
            error: l.error,
        })
    }
}

/// A list message <-> the model's `Vec`.
macro_rules! list {
    ($list:ident, $field:ident, $item:ty) => {
        impl From<Vec<$item>> for pb::$list {
            fn from(v: Vec<$item>) -> Self {
                pb::$list {
                    $field: v.into_iter().map(Into::into).collect(),
                }
            }
        }

        impl TryFrom<pb::$list> for Vec<$item> {
            type Error = WireError;
            fn try_from(l: pb::$list) -> Wire<Vec<$item>> {
                each(l.$field, stringify!($field))
            }
        }
    };
}

list!(NodeList, nodes, NodeView);
list!(NetworkList, networks, model::Network);
list!(ServiceList, services, ServiceView);
list!(TaskList, tasks, TaskView);
list!(TaskLogList, logs, TaskLog);

impl From<KeyRing> for pb::KeyRing {
    fn from(r: KeyRing) -> Self {
        pb::KeyRing {
            keys: r
                .keys
                .into_iter()
                .map(|(id, created_ms)| pb::key_ring::Key { id, created_ms })
                .collect(),
            primary: r.primary,
        }
    }
}

impl TryFrom<pb::KeyRing> for KeyRing {
    type Error = WireError;
    fn try_from(r: pb::KeyRing) -> Wire<KeyRing> {
        Ok(KeyRing {
            keys: r.keys.into_iter().map(|k| (k.id, k.created_ms)).collect(),
            primary: r.primary,
        })
    }
}

impl From<Whoami> for pb::Whoami {
    fn from(w: Whoami) -> Self {
        pb::Whoami {
            node: Some(w.node.into()),
            managers: w.managers,
            cert_lifetime_secs: w.cert_lifetime_secs,
        }
    }
}

impl TryFrom<pb::Whoami> for Whoami {
    type Error = WireError;
    fn try_from(w: pb::Whoami) -> Wire<Whoami> {
        Ok(Whoami {
            node: nested(w.node, "node")?,
            managers: w.managers,
            cert_lifetime_secs: w.cert_lifetime_secs,
        })
    }
}

impl From<Info> for pb::Info {
    fn from(i: Info) -> Self {
        pb::Info {
            cluster_id: i.cluster_id,
            node_id: i.node_id,
            leader: i.leader,
            term: i.term,
            last_applied: i.last_applied,
            managers: i.managers as u64,
            nodes: i.nodes as u64,
            services: i.services as u64,
            networks: i.networks as u64,
        }
    }
}

impl TryFrom<pb::Info> for Info {
    type Error = WireError;
    fn try_from(i: pb::Info) -> Wire<Info> {
        let count =
            |v: u64, f: &str| usize::try_from(v).map_err(|_| WireError::new(f, "out of range"));
        Ok(Info {
            cluster_id: i.cluster_id,
            node_id: i.node_id,
            leader: i.leader,
            term: i.term,
            last_applied: i.last_applied,
            managers: count(i.managers, "managers")?,
            nodes: count(i.nodes, "nodes")?,
            services: count(i.services, "services")?,
            networks: count(i.networks, "networks")?,
        })
    }
}

impl From<NodeProgress> for pb::NodeProgress {
    fn from(n: NodeProgress) -> Self {
        pb::NodeProgress {
            id: n.id,
            hostname: n.hostname,
            status: wire::<pb::NodeStatus, _>(n.status),
            acked: n.acked,
        }
    }
}

impl TryFrom<pb::NodeProgress> for NodeProgress {
    type Error = WireError;
    fn try_from(n: pb::NodeProgress) -> Wire<NodeProgress> {
        Ok(NodeProgress {
            id: n.id,
            hostname: n.hostname,
            status: NodeStatus::from_wire(n.status, "status")?,
            acked: n.acked,
        })
    }
}

impl From<Progress> for pb::Progress {
    fn from(p: Progress) -> Self {
        pb::Progress {
            revision: p.revision,
            nodes: p.nodes.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::Progress> for Progress {
    type Error = WireError;
    fn try_from(p: pb::Progress) -> Wire<Progress> {
        Ok(Progress {
            revision: p.revision,
            nodes: each(p.nodes, "nodes")?,
        })
    }
}
