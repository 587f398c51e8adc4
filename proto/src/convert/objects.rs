//! The records the cluster holds: nodes, networks, services and tasks.

use model::{
    Network, Node, NodeStatus, Service, Task, TaskAttachment, TaskState, UpdateState, UpdateStatus,
    Vip,
};

use super::{FromWire, Wire, WireError, each, enum_map, ipv4, nested, subnet, wire};
use crate::v1 as pb;

enum_map!(NodeStatus, NodeStatus, "node status", { Ready => NodeStatus::Ready, Down => NodeStatus::Down });
enum_map!(TaskState, TaskState, "task state", {
    New => TaskState::New, Assigned => TaskState::Assigned, Starting => TaskState::Starting,
    Running => TaskState::Running, Complete => TaskState::Complete, Shutdown => TaskState::Shutdown,
    Failed => TaskState::Failed, Rejected => TaskState::Rejected,
});
enum_map!(UpdateState, UpdateState, "update state", {
    Updating => UpdateState::Updating, Paused => UpdateState::Paused,
    Completed => UpdateState::Completed, RollbackStarted => UpdateState::RollbackStarted,
    RollbackPaused => UpdateState::RollbackPaused, RollbackCompleted => UpdateState::RollbackCompleted,
});

impl From<Node> for pb::Node {
    fn from(n: Node) -> Self {
        pb::Node {
            id: n.id,
            version: n.version,
            hostname: n.hostname,
            addr: n.addr.to_string(),
            underlay: n.underlay.iter().map(ToString::to_string).collect(),
            api_addr: n.api_addr,
            spec: Some(n.spec.into()),
            status: wire::<pb::NodeStatus, _>(n.status),
            lb_addrs: n
                .lb_addrs
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect(),
        }
    }
}

impl TryFrom<pb::Node> for Node {
    type Error = WireError;
    fn try_from(n: pb::Node) -> Wire<Node> {
        Ok(Node {
            id: n.id,
            version: n.version,
            hostname: n.hostname,
            addr: ipv4(&n.addr, "addr")?,
            underlay: n
                .underlay
                .iter()
                .map(|s| subnet(s, "underlay"))
                .collect::<Wire<_>>()?,
            api_addr: n.api_addr,
            spec: nested(n.spec, "spec")?,
            status: NodeStatus::from_wire(n.status, "status")?,
            lb_addrs: n
                .lb_addrs
                .iter()
                .map(|(k, v)| Ok((k.clone(), ipv4(v, "lb_addrs")?)))
                .collect::<Wire<_>>()?,
        })
    }
}

impl From<Network> for pb::Network {
    fn from(n: Network) -> Self {
        pb::Network {
            id: n.id,
            spec: Some(n.spec.into()),
            vni: n.vni,
            subnet: n.subnet.to_string(),
            gateway: n.gateway.to_string(),
            ingress: n.ingress,
        }
    }
}

impl TryFrom<pb::Network> for Network {
    type Error = WireError;
    fn try_from(n: pb::Network) -> Wire<Network> {
        Ok(Network {
            id: n.id,
            spec: nested(n.spec, "spec")?,
            vni: n.vni,
            subnet: subnet(&n.subnet, "subnet")?,
            gateway: ipv4(&n.gateway, "gateway")?,
            ingress: n.ingress,
        })
    }
}

impl From<Vip> for pb::Vip {
    fn from(v: Vip) -> Self {
        pb::Vip {
            network: v.network,
            addr: v.addr.to_string(),
        }
    }
}

impl TryFrom<pb::Vip> for Vip {
    type Error = WireError;
    fn try_from(v: pb::Vip) -> Wire<Vip> {
        Ok(Vip {
            network: v.network,
            addr: ipv4(&v.addr, "addr")?,
        })
    }
}

impl From<UpdateStatus> for pb::UpdateStatus {
    fn from(u: UpdateStatus) -> Self {
        pb::UpdateStatus {
            state: wire::<pb::UpdateState, _>(u.state),
            from_seq: u.from_seq,
            message: u.message,
        }
    }
}

impl TryFrom<pb::UpdateStatus> for UpdateStatus {
    type Error = WireError;
    fn try_from(u: pb::UpdateStatus) -> Wire<UpdateStatus> {
        Ok(UpdateStatus {
            state: UpdateState::from_wire(u.state, "state")?,
            from_seq: u.from_seq,
            message: u.message,
        })
    }
}

impl From<Service> for pb::Service {
    fn from(s: Service) -> Self {
        pb::Service {
            id: s.id,
            version: s.version,
            spec: Some(s.spec.into()),
            previous: s.previous.map(Into::into),
            vips: s.vips.into_iter().map(Into::into).collect(),
            ports: s.ports.into_iter().map(Into::into).collect(),
            update_status: s.update_status.map(Into::into),
        }
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = WireError;
    fn try_from(s: pb::Service) -> Wire<Service> {
        Ok(Service {
            id: s.id,
            version: s.version,
            spec: nested(s.spec, "spec")?,
            previous: s
                .previous
                .map(|p| nested(Some(p), "previous"))
                .transpose()?,
            vips: each(s.vips, "vips")?,
            ports: each(s.ports, "ports")?,
            update_status: s
                .update_status
                .map(|u| nested(Some(u), "update_status"))
                .transpose()?,
        })
    }
}

impl From<TaskAttachment> for pb::TaskAttachment {
    fn from(a: TaskAttachment) -> Self {
        pb::TaskAttachment {
            network: a.network,
            addr: a.addr.to_string(),
            mac: a.mac.to_vec(),
        }
    }
}

impl TryFrom<pb::TaskAttachment> for TaskAttachment {
    type Error = WireError;
    fn try_from(a: pb::TaskAttachment) -> Wire<TaskAttachment> {
        Ok(TaskAttachment {
            network: a.network,
            addr: ipv4(&a.addr, "addr")?,
            mac: a
                .mac
                .as_slice()
                .try_into()
                .map_err(|_| WireError::new("mac", format!("{} bytes, not 6", a.mac.len())))?,
        })
    }
}

impl From<Task> for pb::Task {
    fn from(t: Task) -> Self {
        pb::Task {
            id: t.id,
            service: t.service,
            slot: t.slot,
            node: t.node,
            desired: wire::<pb::TaskState, _>(t.desired),
            observed: wire::<pb::TaskState, _>(t.observed),
            attachments: t.attachments.into_iter().map(Into::into).collect(),
            error: t.error,
            netns: t.netns,
            exit_code: t.exit_code,
            seq: t.seq,
            attempt: t.attempt,
            since_ms: t.since_ms,
            attached: t.attached,
            spec: Some(std::sync::Arc::unwrap_or_clone(t.spec).into()),
        }
    }
}

impl TryFrom<pb::Task> for Task {
    type Error = WireError;
    fn try_from(t: pb::Task) -> Wire<Task> {
        Ok(Task {
            id: t.id,
            service: t.service,
            slot: t.slot,
            node: t.node,
            desired: TaskState::from_wire(t.desired, "desired")?,
            observed: TaskState::from_wire(t.observed, "observed")?,
            attachments: each(t.attachments, "attachments")?,
            error: t.error,
            netns: t.netns,
            exit_code: t.exit_code,
            seq: t.seq,
            attempt: t.attempt,
            since_ms: t.since_ms,
            attached: t.attached,
            spec: std::sync::Arc::new(nested(t.spec, "spec")?),
        })
    }
}
