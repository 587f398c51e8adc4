//! Services: the spec (task template, ports, endpoint mode, update and
//! restart policies) and what the cluster allocated for it (VIPs, ports).

use std::{fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// Through the routing mesh, on every node.
    #[default]
    Ingress,
    /// Only on the nodes that run a task, straight to it.
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    pub protocol: Protocol,
    pub target: u16,
    /// Auto-assigned from 30000-32767 when absent (ingress mode).
    #[serde(default)]
    pub published: Option<u16>,
    #[serde(default)]
    pub mode: PublishMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    #[default]
    Vip,
    Dnsrr,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EndpointSpec {
    #[serde(default)]
    pub mode: EndpointMode,
    #[serde(default)]
    pub ports: Vec<PortConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    Replicated { replicas: u32 },
    Global,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAttachment {
    /// Network name or id.
    pub target: String,
    #[serde(default)]
    pub aliases: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    #[default]
    Any,
    OnFailure,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    #[serde(default)]
    pub condition: RestartCondition,
    /// Between a task's end and its replacement; Swarm's default is 5 s.
    #[serde(default = "default_restart_delay")]
    pub delay_ms: u64,
    /// 0: unlimited.
    #[serde(default)]
    pub max_attempts: u32,
    #[serde(default)]
    pub window_ms: u64,
}

fn default_restart_delay() -> u64 {
    5000
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay_ms: default_restart_delay(),
            max_attempts: 0,
            window_ms: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskTemplate {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub networks: Vec<NetworkAttachment>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Placement constraints, as `docker service create --constraint`:
    /// `node.role==manager`, `node.hostname!=a`, `node.labels.zone==east`.
    #[serde(default)]
    pub constraints: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    #[default]
    Pause,
    Continue,
    Rollback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    #[default]
    StopFirst,
    StartFirst,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateConfig {
    pub parallelism: u32,
    pub delay_ms: u64,
    pub monitor_ms: u64,
    pub failure_action: FailureAction,
    pub order: UpdateOrder,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        // Swarm's defaults.
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
            monitor_ms: 5000,
            failure_action: FailureAction::Pause,
            order: UpdateOrder::StopFirst,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub mode: ServiceMode,
    pub task: TaskTemplate,
    #[serde(default)]
    pub endpoint: EndpointSpec,
    #[serde(default)]
    pub update: UpdateConfig,
    #[serde(default)]
    pub rollback: UpdateConfig,
}

/// A virtual IP of a service on one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vip {
    pub network: String,
    pub addr: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    /// Bumped by every update; an update must name the version it read.
    pub version: u64,
    pub spec: ServiceSpec,
    /// The spec before the last update (for rollback).
    pub previous: Option<ServiceSpec>,
    /// One per attached network (network ids), ingress included when the
    /// service publishes in ingress mode; none in dnsrr mode.
    pub vips: Vec<Vip>,
    /// The ports as published: `published` always set.
    pub ports: Vec<PortConfig>,
    /// The rolling update (or rollback) the orchestrator is carrying out,
    /// or the last one's outcome.
    #[serde(default)]
    pub update_status: Option<UpdateStatus>,
}

/// Where a rolling update stands, as `docker service inspect` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

impl UpdateState {
    /// The orchestrator is replacing tasks.
    pub fn active(self) -> bool {
        matches!(self, UpdateState::Updating | UpdateState::RollbackStarted)
    }

    pub fn rollback(self) -> bool {
        matches!(
            self,
            UpdateState::RollbackStarted
                | UpdateState::RollbackPaused
                | UpdateState::RollbackCompleted
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    /// Tasks created after this `seq` with the current spec belong to this
    /// update (their failures count against it).
    pub from_seq: u64,
    #[serde(default)]
    pub message: String,
}
