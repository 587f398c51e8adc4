//! VXLAN overlay networks, reconciled from a table: no gossip, no flooding,
//! no learning.
//!
//! Per network, in the node's namespace:
//! - a bridge `mbr-<vni>`, with the node's own address on the network when
//!   the table gives one (`host`, for the load balancer). The node routes
//!   nothing for tasks: the load balancer's program on the bridge drops any
//!   IPv4 packet that is neither load-balanced nor for that address, so
//!   nothing can route from one overlay to another, or onto the underlay,
//!   through the node;
//! - a VXLAN device `mvx-<vni>` on that bridge: UDP 4789, the node's underlay
//!   address as source, `nolearning`, ARP answered locally from its neighbour
//!   table (`proxy`), DF set on the outer header;
//! - per local endpoint, a veth `mve-<hash>` on the bridge whose peer is the
//!   endpoint's interface (`eth0`) in the task namespace, with its IP, MAC and
//!   the overlay MTU (underlay − 50);
//! - per remote endpoint, a static FDB entry (MAC → the node's underlay
//!   address) and a permanent neighbour entry (IP → MAC) on the VXLAN device.
//!   With no all-zeros FDB entry, a frame for an unknown MAC is dropped, never
//!   flooded to every node.
//!
//! [`Overlay::apply`] diffs the new table against the last one it applied and
//! touches only what changed, so one endpoint change costs the same few
//! netlink calls whatever the table size. [`Overlay::reconcile`] re-reads the
//! kernel and repairs drift (an entry deleted by hand, a link set down); the
//! first apply, and any apply after an error, is such a full pass.
//! [`Overlay::teardown`] removes everything mesh created, going on past
//! errors and reporting them all.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use model::Subnet;
use serde::{Deserialize, Serialize};

use crate::netlink::{
    Link, LinkKind, Mac, Netlink, NetlinkError, VethPeer, VxlanSpec, check_ifname,
};

/// Bytes VXLAN adds on an IPv4 underlay: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8.
pub const VXLAN_OVERHEAD: u32 = 50;
/// Bytes ESP transport mode with rfc4106 AES-GCM adds to an encrypted
/// network's VXLAN packets: header 8 + IV 8 + ICV 16 + padding and trailer
/// (at most 5), rounded up.
pub const ESP_OVERHEAD: u32 = 40;
/// The smallest MTU IPv4 allows on a link.
pub const MIN_MTU: u32 = 68;

pub const BRIDGE_PREFIX: &str = "mbr-";
const VXLAN_PREFIX: &str = "mvx-";
const VETH_PREFIX: &str = "mve-";

/// Everything the overlay should look like on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySpec {
    /// This node's address on the underlay: the VXLAN source address. The
    /// interface holding it carries the encapsulated traffic. Required when
    /// there are networks.
    #[serde(default)]
    pub underlay: Option<Ipv4Addr>,
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
}

/// One overlay network and its endpoints as this node sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub id: String,
    pub vni: u32,
    pub subnet: Subnet,
    /// Reserved in the subnet (never an endpoint address).
    pub gateway: Ipv4Addr,
    /// Defaults to the underlay interface's MTU minus [`VXLAN_OVERHEAD`]
    /// (and [`ESP_OVERHEAD`] when encrypted).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Its VXLAN traffic is IPsec-protected (`crate::ipsec`): leaves room
    /// for ESP in the MTU.
    #[serde(default)]
    pub encrypted: bool,
    /// Endpoints of tasks on this node.
    #[serde(default)]
    pub local: Vec<LocalEndpoint>,
    /// Endpoints of tasks on other nodes (and other nodes' own addresses).
    #[serde(default)]
    pub remote: Vec<RemoteEndpoint>,
    /// This node's own address on the network, put on the bridge: the
    /// load balancer's source address towards tasks there, and where their
    /// replies come back. Without it the host has no L3 presence here.
    #[serde(default)]
    pub host: Option<HostEndpoint>,
    /// Service VIPs on this network. Local tasks resolve each to the
    /// bridge's MAC (the VXLAN device answers their ARP), so their flows to
    /// a VIP reach this node's load balancer. Needs `host`.
    #[serde(default)]
    pub vips: Vec<Ipv4Addr>,
}

/// This node's own address and MAC on a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEndpoint {
    pub ip: Ipv4Addr,
    pub mac: Mac,
}

/// A task on this node attached to the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalEndpoint {
    /// Unique within the network (the task id); names the host-side veth.
    pub id: String,
    /// The task's network namespace: `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    pub mac: Mac,
    /// The interface name inside the task namespace.
    #[serde(default = "default_interface")]
    pub interface: String,
}

fn default_interface() -> String {
    "eth0".into()
}

/// A task on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteEndpoint {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    /// The underlay address of the node it runs on.
    pub node: Ipv4Addr,
}

/// The bridge of the network with this VNI.
pub fn bridge_name(vni: u32) -> String {
    format!("{BRIDGE_PREFIX}{vni}")
}

/// The VXLAN device of the network with this VNI.
pub fn vxlan_name(vni: u32) -> String {
    format!("{VXLAN_PREFIX}{vni}")
}

/// The host side of a local endpoint's veth: stable across restarts, unique
/// per (network, endpoint), 14 bytes.
pub fn veth_name(network: &str, endpoint: &str) -> String {
    // FNV-1a: fixed, so the name survives a restart of meshd.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in network.bytes().chain([0]).chain(endpoint.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{VETH_PREFIX}{:010x}", h & 0xff_ffff_ffff)
}

fn is_owned(name: &str) -> bool {
    [BRIDGE_PREFIX, VXLAN_PREFIX, VETH_PREFIX]
        .iter()
        .any(|p| name.starts_with(p))
}

impl OverlaySpec {
    /// Every problem in the spec, checked before anything touches the kernel.
    pub fn validate(&self) -> Result<(), OverlayError> {
        Desired::build(self.clone()).map(|_| ())
    }
}

/// One change to the endpoint table, for [`Overlay::apply_changes`]: what
/// the control plane pushes as deltas. Networks themselves come and go with
/// a whole table ([`Overlay::apply`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// Adds a remote endpoint, or updates the one with this IP.
    UpsertRemote {
        network: String,
        endpoint: RemoteEndpoint,
    },
    /// Removes the remote endpoint with this IP (nothing if there is none).
    RemoveRemote { network: String, ip: Ipv4Addr },
    /// Adds a local endpoint, or updates the one with this id.
    UpsertLocal {
        network: String,
        endpoint: LocalEndpoint,
    },
    /// Removes the local endpoint with this id (nothing if there is none).
    RemoveLocal { network: String, id: String },
}

impl Change {
    fn network(&self) -> &str {
        match self {
            Change::UpsertRemote { network, .. }
            | Change::RemoveRemote { network, .. }
            | Change::UpsertLocal { network, .. }
            | Change::RemoveLocal { network, .. } => network,
        }
    }
}

mod desired;
mod reconcile;
#[cfg(test)]
mod tests;

use desired::{Desired, DesiredNetwork, Undo};

/// Why an apply did not fully succeed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The spec is wrong; nothing was changed.
    #[error("invalid overlay spec:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    /// Some kernel changes failed; the rest were made. The next apply
    /// re-reads the kernel.
    #[error("{} overlay change(s) failed ({changes} made):\n  {}", errors.len(), errors.join("\n  "))]
    Kernel { changes: u64, errors: Vec<String> },
}

/// What a successful pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Netlink changes made, in every namespace.
    pub changes: u64,
    /// Whether the kernel was re-read (a full reconcile) or only the
    /// difference from the last applied table was written.
    pub full: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Underlay {
    addr: Ipv4Addr,
    index: u32,
    mtu: u32,
}

/// The parts of a network that decide its links; a change in any of them is
/// handled by re-reading that network's links from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    vni: u32,
    mtu: u32,
    underlay: Underlay,
    host: Option<HostEndpoint>,
}

struct AppliedNetwork {
    header: Header,
    bridge: Link,
    vxlan: Link,
    remotes: HashMap<Ipv4Addr, RemoteEndpoint>,
    /// VIP neighbour entries: VIP -> the bridge's MAC.
    vips: BTreeMap<Ipv4Addr, Mac>,
    /// Local endpoints by id, with their host-side veth.
    locals: BTreeMap<String, (LocalEndpoint, Link)>,
}

impl AppliedNetwork {
    fn links(&self) -> impl Iterator<Item = &Link> {
        self.locals
            .values()
            .map(|(_, l)| l)
            .chain([&self.vxlan, &self.bridge])
    }
}

/// The overlay reconciler for one node namespace.
pub struct Overlay {
    nl: Netlink,
    desired: Desired,
    /// What the last successful pass left in the kernel, by network id.
    /// `None`: unknown, so the next pass re-reads the kernel.
    applied: Option<BTreeMap<String, AppliedNetwork>>,
}

/// Problems collected during a pass; it goes on past each one.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, context: impl fmt::Display, e: impl fmt::Display) {
        self.0.push(format!("{context}: {e}"));
    }

    fn check<T>(&mut self, context: impl fmt::Display, r: Result<T, NetlinkError>) -> Option<T> {
        r.map_err(|e| self.push(context, e)).ok()
    }
}

/// Where link lookups come from: a full pass dumps them once; an incremental
/// pass asks for the few it needs by name.
enum Links {
    Dump(HashMap<String, Link>),
    Lookup,
}

impl Links {
    async fn get(&self, nl: &Netlink, name: &str) -> Result<Option<Link>, NetlinkError> {
        match self {
            Links::Dump(map) => Ok(map.get(name).cloned()),
            Links::Lookup => nl.link(name).await,
        }
    }
}

/// FDB (MAC → node) and neighbour (IP → MAC) entries as they are now.
struct Observed {
    fdb: BTreeMap<Mac, Ipv4Addr>,
    neigh: BTreeMap<Ipv4Addr, Mac>,
}
