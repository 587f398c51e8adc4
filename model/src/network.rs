//! Overlay networks: the spec a user gives and what the cluster allocated.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::Subnet;

/// The network every service that publishes ports in ingress mode joins.
pub const INGRESS: &str = "ingress";

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub name: String,
    /// Taken from the pool when not given.
    #[serde(default)]
    pub subnet: Option<Subnet>,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub attachable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub spec: NetworkSpec,
    pub vni: u32,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    /// The routing-mesh network created at init.
    pub ingress: bool,
}
