//! Nodes: their role, availability, status and the spec an operator sets.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::Subnet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Manager,
    Worker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

/// What an operator may change about a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub role: Role,
    pub availability: Availability,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub version: u64,
    pub hostname: String,
    /// The node's underlay address (its VXLAN source).
    pub addr: Ipv4Addr,
    /// The prefixes on the node's underlay interface, as it reported them
    /// (at join, and when they change): no network may overlap them.
    #[serde(default)]
    pub underlay: Vec<Subnet>,
    /// Where a manager serves Raft and the API (host:port).
    #[serde(default)]
    pub api_addr: Option<String>,
    pub spec: NodeSpec,
    pub status: NodeStatus,
    /// Network id -> this node's own address there (Swarm's per-node
    /// load-balancer endpoint): the source of NATed flows towards tasks on
    /// that network, and where their replies come back. Every node has
    /// one on `ingress`; on another network a node gets one with its first
    /// task there. Its MAC is derived from it, as a task's is.
    #[serde(default)]
    pub lb_addrs: BTreeMap<String, Ipv4Addr>,
}
