//! The specs a client sends: nodes, networks and services.

use model::{
    Availability, EndpointMode, EndpointSpec, FailureAction, NetworkAttachment, NetworkSpec,
    NodeSpec, PortConfig, Protocol, PublishMode, RestartCondition, RestartPolicy, Role,
    ServiceMode, ServiceSpec, TaskTemplate, UpdateConfig, UpdateOrder,
};

use super::{FromWire, Wire, WireError, each, enum_map, nested, port, subnet, wire};
use crate::v1 as pb;

enum_map!(Role, Role, "role", { Manager => Role::Manager, Worker => Role::Worker });
enum_map!(Availability, Availability, "availability", {
    Active => Availability::Active, Pause => Availability::Pause, Drain => Availability::Drain,
});
enum_map!(Protocol, Protocol, "protocol", { Tcp => Protocol::Tcp, Udp => Protocol::Udp });
enum_map!(PublishMode, PublishMode, "publish mode", { Ingress => PublishMode::Ingress, Host => PublishMode::Host });
enum_map!(EndpointMode, EndpointMode, "endpoint mode", { Vip => EndpointMode::Vip, Dnsrr => EndpointMode::Dnsrr });
enum_map!(RestartCondition, RestartCondition, "restart condition", {
    Any => RestartCondition::Any, OnFailure => RestartCondition::OnFailure, None => RestartCondition::None,
});
enum_map!(FailureAction, FailureAction, "failure action", {
    Pause => FailureAction::Pause, Continue => FailureAction::Continue, Rollback => FailureAction::Rollback,
});
enum_map!(UpdateOrder, UpdateOrder, "update order", {
    StopFirst => UpdateOrder::StopFirst, StartFirst => UpdateOrder::StartFirst,
});

fn enum_of<M: FromWire>(v: i32, field: &str) -> Wire<M> {
    M::from_wire(v, field)
}

impl From<NodeSpec> for pb::NodeSpec {
    fn from(s: NodeSpec) -> Self {
        pb::NodeSpec {
            role: wire::<pb::Role, _>(s.role),
            availability: wire::<pb::Availability, _>(s.availability),
            labels: s.labels.into_iter().collect(),
        }
    }
}

impl TryFrom<pb::NodeSpec> for NodeSpec {
    type Error = WireError;
    fn try_from(s: pb::NodeSpec) -> Wire<NodeSpec> {
        Ok(NodeSpec {
            role: enum_of(s.role, "role")?,
            availability: enum_of(s.availability, "availability")?,
            labels: s.labels.into_iter().collect(),
        })
    }
}

impl From<NetworkSpec> for pb::NetworkSpec {
    fn from(s: NetworkSpec) -> Self {
        pb::NetworkSpec {
            name: s.name,
            subnet: s.subnet.map(|n| n.to_string()),
            encrypted: s.encrypted,
            internal: s.internal,
            attachable: s.attachable,
        }
    }
}

impl TryFrom<pb::NetworkSpec> for NetworkSpec {
    type Error = WireError;
    fn try_from(s: pb::NetworkSpec) -> Wire<NetworkSpec> {
        Ok(NetworkSpec {
            name: s.name,
            subnet: s
                .subnet
                .as_deref()
                .map(|n| subnet(n, "subnet"))
                .transpose()?,
            encrypted: s.encrypted,
            internal: s.internal,
            attachable: s.attachable,
        })
    }
}

impl From<PortConfig> for pb::PortConfig {
    fn from(p: PortConfig) -> Self {
        pb::PortConfig {
            protocol: wire::<pb::Protocol, _>(p.protocol),
            target: p.target.into(),
            published: p.published.map(u32::from),
            mode: wire::<pb::PublishMode, _>(p.mode),
        }
    }
}

impl TryFrom<pb::PortConfig> for PortConfig {
    type Error = WireError;
    fn try_from(p: pb::PortConfig) -> Wire<PortConfig> {
        Ok(PortConfig {
            protocol: enum_of(p.protocol, "protocol")?,
            target: port(p.target, "target")?,
            published: p.published.map(|v| port(v, "published")).transpose()?,
            mode: enum_of(p.mode, "mode")?,
        })
    }
}

impl From<EndpointSpec> for pb::EndpointSpec {
    fn from(e: EndpointSpec) -> Self {
        pb::EndpointSpec {
            mode: wire::<pb::EndpointMode, _>(e.mode),
            ports: e.ports.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::EndpointSpec> for EndpointSpec {
    type Error = WireError;
    fn try_from(e: pb::EndpointSpec) -> Wire<EndpointSpec> {
        Ok(EndpointSpec {
            mode: enum_of(e.mode, "mode")?,
            ports: each(e.ports, "ports")?,
        })
    }
}

impl From<ServiceMode> for pb::ServiceMode {
    fn from(m: ServiceMode) -> Self {
        use pb::service_mode::Mode;
        pb::ServiceMode {
            mode: Some(match m {
                ServiceMode::Replicated { replicas } => {
                    Mode::Replicated(pb::ReplicatedMode { replicas })
                }
                ServiceMode::Global => Mode::Global(pb::GlobalMode {}),
            }),
        }
    }
}

impl TryFrom<pb::ServiceMode> for ServiceMode {
    type Error = WireError;
    fn try_from(m: pb::ServiceMode) -> Wire<ServiceMode> {
        use pb::service_mode::Mode;
        match m.mode {
            Some(Mode::Replicated(r)) => Ok(ServiceMode::Replicated {
                replicas: r.replicas,
            }),
            Some(Mode::Global(_)) => Ok(ServiceMode::Global),
            None => Err(WireError::new("", "neither replicated nor global")),
        }
    }
}

impl From<NetworkAttachment> for pb::NetworkAttachment {
    fn from(a: NetworkAttachment) -> Self {
        pb::NetworkAttachment {
            target: a.target,
            aliases: a.aliases,
        }
    }
}

impl TryFrom<pb::NetworkAttachment> for NetworkAttachment {
    type Error = WireError;
    fn try_from(a: pb::NetworkAttachment) -> Wire<NetworkAttachment> {
        Ok(NetworkAttachment {
            target: a.target,
            aliases: a.aliases,
        })
    }
}

impl From<RestartPolicy> for pb::RestartPolicy {
    fn from(r: RestartPolicy) -> Self {
        pb::RestartPolicy {
            condition: wire::<pb::RestartCondition, _>(r.condition),
            delay_ms: Some(r.delay_ms),
            max_attempts: r.max_attempts,
            window_ms: r.window_ms,
        }
    }
}

impl TryFrom<pb::RestartPolicy> for RestartPolicy {
    type Error = WireError;
    fn try_from(r: pb::RestartPolicy) -> Wire<RestartPolicy> {
        Ok(RestartPolicy {
            condition: enum_of(r.condition, "condition")?,
            delay_ms: r.delay_ms.unwrap_or(RestartPolicy::default().delay_ms),
            max_attempts: r.max_attempts,
            window_ms: r.window_ms,
        })
    }
}

impl From<TaskTemplate> for pb::TaskTemplate {
    fn from(t: TaskTemplate) -> Self {
        pb::TaskTemplate {
            command: t.command,
            env: t.env,
            networks: t.networks.into_iter().map(Into::into).collect(),
            restart: Some(t.restart.into()),
            constraints: t.constraints,
        }
    }
}

impl TryFrom<pb::TaskTemplate> for TaskTemplate {
    type Error = WireError;
    fn try_from(t: pb::TaskTemplate) -> Wire<TaskTemplate> {
        Ok(TaskTemplate {
            command: t.command,
            env: t.env,
            networks: each(t.networks, "networks")?,
            restart: match t.restart {
                Some(r) => RestartPolicy::try_from(r).map_err(|e| e.under("restart"))?,
                None => RestartPolicy::default(),
            },
            constraints: t.constraints,
        })
    }
}

impl From<UpdateConfig> for pb::UpdateConfig {
    fn from(u: UpdateConfig) -> Self {
        pb::UpdateConfig {
            parallelism: u.parallelism,
            delay_ms: u.delay_ms,
            monitor_ms: u.monitor_ms,
            failure_action: wire::<pb::FailureAction, _>(u.failure_action),
            order: wire::<pb::UpdateOrder, _>(u.order),
        }
    }
}

impl TryFrom<pb::UpdateConfig> for UpdateConfig {
    type Error = WireError;
    fn try_from(u: pb::UpdateConfig) -> Wire<UpdateConfig> {
        Ok(UpdateConfig {
            parallelism: u.parallelism,
            delay_ms: u.delay_ms,
            monitor_ms: u.monitor_ms,
            failure_action: enum_of(u.failure_action, "failure_action")?,
            order: enum_of(u.order, "order")?,
        })
    }
}

/// An absent update config is Swarm's defaults.
fn update_config(u: Option<pb::UpdateConfig>, field: &str) -> Wire<UpdateConfig> {
    u.map_or_else(
        || Ok(UpdateConfig::default()),
        |u| UpdateConfig::try_from(u).map_err(|e| e.under(field)),
    )
}

impl From<ServiceSpec> for pb::ServiceSpec {
    fn from(s: ServiceSpec) -> Self {
        pb::ServiceSpec {
            name: s.name,
            mode: Some(s.mode.into()),
            task: Some(s.task.into()),
            endpoint: Some(s.endpoint.into()),
            update: Some(s.update.into()),
            rollback: Some(s.rollback.into()),
        }
    }
}

impl TryFrom<pb::ServiceSpec> for ServiceSpec {
    type Error = WireError;
    fn try_from(s: pb::ServiceSpec) -> Wire<ServiceSpec> {
        Ok(ServiceSpec {
            name: s.name,
            mode: nested(s.mode, "mode")?,
            task: nested(s.task, "task")?,
            endpoint: s.endpoint.map_or_else(
                || Ok(EndpointSpec::default()),
                |e| EndpointSpec::try_from(e).map_err(|e| e.under("endpoint")),
            )?,
            update: update_config(s.update, "update")?,
            rollback: update_config(s.rollback, "rollback")?,
        })
    }
}
