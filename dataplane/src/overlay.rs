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

/// Who holds an address in a network.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    Local(String),
    Remote,
}

/// The desired table, indexed so that one change is checked and applied in
/// constant time.
#[derive(Default)]
struct Desired {
    underlay: Option<Ipv4Addr>,
    networks: BTreeMap<String, DesiredNetwork>,
}

struct DesiredNetwork {
    /// id, VNI, subnet, gateway, MTU; its endpoint lists stay empty.
    spec: NetworkSpec,
    local: BTreeMap<String, LocalEndpoint>,
    remote: HashMap<Ipv4Addr, RemoteEndpoint>,
    owners: HashMap<Ipv4Addr, Owner>,
    macs: HashMap<Mac, Ipv4Addr>,
}

/// An endpoint, named in messages (formatted only when there is a problem).
enum What<'a> {
    Remote(&'a RemoteEndpoint),
    Local(&'a str),
}

impl fmt::Display for What<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            What::Remote(e) => write!(f, "remote endpoint {} on {}", e.ip, e.node),
            What::Local(id) => write!(f, "local endpoint {id}"),
        }
    }
}

/// How to take back one staged change.
enum Undo {
    Remote(String, Ipv4Addr, Option<RemoteEndpoint>),
    Local(String, String, Option<LocalEndpoint>),
}

impl DesiredNetwork {
    fn new(mut spec: NetworkSpec) -> DesiredNetwork {
        spec.local.clear();
        spec.remote.clear();
        DesiredNetwork {
            spec,
            local: BTreeMap::new(),
            remote: HashMap::new(),
            owners: HashMap::new(),
            macs: HashMap::new(),
        }
    }

    /// The neighbour entries that make the VIPs resolve to the bridge.
    fn vips(&self) -> BTreeMap<Ipv4Addr, Mac> {
        match self.spec.host {
            Some(h) => self.spec.vips.iter().map(|ip| (*ip, h.mac)).collect(),
            None => BTreeMap::new(),
        }
    }

    fn set_remote(&mut self, ip: Ipv4Addr, new: Option<RemoteEndpoint>) -> Option<RemoteEndpoint> {
        let old = match new {
            Some(e) => {
                self.owners.insert(ip, Owner::Remote);
                self.remote.insert(ip, e)
            }
            None => {
                let old = self.remote.remove(&ip);
                if old.is_some() {
                    self.owners.remove(&ip);
                }
                old
            }
        };
        if let Some(o) = &old {
            self.macs.remove(&o.mac);
        }
        if let Some(e) = self.remote.get(&ip) {
            self.macs.insert(e.mac, ip);
        }
        old
    }

    fn set_local(&mut self, id: &str, new: Option<LocalEndpoint>) -> Option<LocalEndpoint> {
        let old = match new {
            Some(e) => self.local.insert(id.to_owned(), e),
            None => self.local.remove(id),
        };
        if let Some(o) = &old {
            self.owners.remove(&o.ip);
            self.macs.remove(&o.mac);
        }
        if let Some(e) = self.local.get(id) {
            self.owners.insert(e.ip, Owner::Local(id.to_owned()));
            self.macs.insert(e.mac, e.ip);
        }
        old
    }

    /// Problems with an endpoint's address and MAC, given who holds what now.
    fn check_address(
        &self,
        what: &What<'_>,
        ip: Ipv4Addr,
        mac: Mac,
        me: &Owner,
        p: &mut Vec<String>,
    ) {
        let (n, net) = (&self.spec.id, &self.spec);
        if !net.subnet.is_host(ip) || ip == net.gateway {
            p.push(format!(
                "network {n}: {what}: {ip} is not a usable address in {} (gateway {})",
                net.subnet, net.gateway
            ));
        }
        if let Some(owner) = self.owners.get(&ip)
            && owner != me
        {
            let other = match owner {
                Owner::Local(id) => format!("local endpoint {id}"),
                Owner::Remote => "a remote endpoint".into(),
            };
            p.push(format!(
                "network {n}: {what}: address {ip} is already held by {other}"
            ));
        }
        if !mac.is_unicast() {
            p.push(format!("network {n}: {what}: {mac} is not a unicast MAC"));
        }
        if let Some(holder) = self.macs.get(&mac) {
            let same = match me {
                Owner::Remote => *holder == ip,
                Owner::Local(id) => self.local.get(id).is_some_and(|l| l.ip == *holder),
            };
            if !same {
                p.push(format!(
                    "network {n}: {what}: MAC {mac} is already held by {holder}"
                ));
            }
        }
    }
}

impl Desired {
    /// Checks a whole table and indexes it; every problem is reported.
    fn build(spec: OverlaySpec) -> Result<Desired, OverlayError> {
        let mut p = Vec::new();
        if !spec.networks.is_empty() && spec.underlay.is_none() {
            p.push(
                "\"underlay\" (this node's underlay address) is required when there are networks"
                    .into(),
            );
        }
        let mut d = Desired {
            underlay: spec.underlay,
            networks: BTreeMap::new(),
        };
        let mut vnis = BTreeMap::new();
        let mut staged = Vec::new();
        for mut net in spec.networks {
            let n = net.id.clone();
            if n.is_empty() {
                p.push("a network has an empty id".into());
            }
            if !(1..(1 << 24)).contains(&net.vni) {
                p.push(format!(
                    "network {n}: VNI {} is outside 1..=16777215",
                    net.vni
                ));
            } else if let Some(other) = vnis.insert(net.vni, n.clone()) {
                p.push(format!("networks {other} and {n} both use VNI {}", net.vni));
            }
            if net.subnet.prefix() > 30 {
                p.push(format!(
                    "network {n}: subnet {} leaves no room for a gateway and endpoints; use /30 or larger",
                    net.subnet
                ));
            }
            if !net.subnet.is_host(net.gateway) {
                p.push(format!(
                    "network {n}: gateway {} is not a host address in {}",
                    net.gateway, net.subnet
                ));
            }
            match net.host {
                Some(h) if !net.subnet.is_host(h.ip) || h.ip == net.gateway => p.push(format!(
                    "network {n}: host address {} is not a usable address in {}",
                    h.ip, net.subnet
                )),
                Some(h) if !h.mac.is_unicast() => p.push(format!(
                    "network {n}: host MAC {} is not a unicast MAC",
                    h.mac
                )),
                None if !net.vips.is_empty() => p.push(format!(
                    "network {n}: VIPs need a host address for local tasks to reach them through"
                )),
                _ => {}
            }
            for vip in &net.vips {
                if !net.subnet.is_host(*vip) || Some(*vip) == net.host.map(|h| h.ip) {
                    p.push(format!(
                        "network {n}: VIP {vip} is not a usable address in {}",
                        net.subnet
                    ));
                }
            }
            if let Some(mtu) = net.mtu
                && !(MIN_MTU..=65535 - VXLAN_OVERHEAD).contains(&mtu)
            {
                p.push(format!(
                    "network {n}: MTU {mtu} is outside {MIN_MTU}..={}",
                    65535 - VXLAN_OVERHEAD
                ));
            }
            if d.networks.contains_key(&n) {
                p.push(format!("network {n} is listed twice"));
                continue;
            }
            let local = std::mem::take(&mut net.local);
            let remote = std::mem::take(&mut net.remote);
            d.networks.insert(n.clone(), DesiredNetwork::new(net));
            staged.extend(local.into_iter().map(|endpoint| Change::UpsertLocal {
                network: n.clone(),
                endpoint,
            }));
            staged.extend(remote.into_iter().map(|endpoint| Change::UpsertRemote {
                network: n.clone(),
                endpoint,
            }));
        }
        for c in &staged {
            match d.stage(c) {
                // In a whole table, an upsert that replaces is a duplicate.
                Ok(Undo::Remote(n, ip, Some(_))) => {
                    p.push(format!("network {n}: remote endpoint {ip} is listed twice"))
                }
                Ok(Undo::Local(n, id, Some(_))) => {
                    p.push(format!("network {n}: local endpoint {id} is listed twice"))
                }
                Ok(_) => {}
                Err(e) => p.extend(e),
            }
        }
        if p.is_empty() {
            Ok(d)
        } else {
            Err(OverlayError::Invalid(p))
        }
    }

    /// Checks one change against the table as it stands and makes it; the
    /// returned undo takes it back.
    fn stage(&mut self, c: &Change) -> Result<Undo, Vec<String>> {
        let mut p = Vec::new();
        let name = c.network();
        if !self.networks.contains_key(name) {
            return Err(vec![format!(
                "network {name} is not in the table (networks are added with a whole table)"
            )]);
        }
        if let Change::UpsertLocal { endpoint: e, .. } = c {
            // The task interface and the host-side veth name are unique
            // across every network on the node.
            let veth = veth_name(name, &e.id);
            for (other_net, other) in self
                .networks
                .values()
                .flat_map(|n| n.local.values().map(move |l| (&n.spec.id, l)))
                .filter(|(n, l)| !(*n == name && l.id == e.id))
            {
                if other.netns == e.netns && other.interface == e.interface {
                    p.push(format!(
                        "network {name}: local endpoint {}: {} in {} is already used by {other_net}/{}",
                        e.id,
                        e.interface,
                        e.netns.display(),
                        other.id
                    ));
                }
                if veth_name(other_net, &other.id) == veth {
                    p.push(format!(
                        "network {name}: local endpoints {} and {other_net}/{} hash to the same interface name; rename one",
                        e.id, other.id
                    ));
                }
            }
        }
        let underlay = self.underlay;
        let net = self.networks.get_mut(name).expect("checked above");
        let n = name.to_owned();
        match c {
            Change::UpsertRemote { endpoint: e, .. } => {
                let what = What::Remote(e);
                net.check_address(&what, e.ip, e.mac, &Owner::Remote, &mut p);
                if Some(e.node) == underlay {
                    p.push(format!(
                        "network {n}: {what} is on this node; list it as local"
                    ));
                }
                if e.node.is_unspecified() || e.node.is_multicast() || e.node.is_broadcast() {
                    p.push(format!(
                        "network {n}: {what}: {} is not a node address",
                        e.node
                    ));
                }
                if p.is_empty() {
                    return Ok(Undo::Remote(n, e.ip, net.set_remote(e.ip, Some(e.clone()))));
                }
            }
            Change::RemoveRemote { ip, .. } => {
                return Ok(Undo::Remote(n, *ip, net.set_remote(*ip, None)));
            }
            Change::UpsertLocal { endpoint: e, .. } => {
                let what = What::Local(&e.id);
                if e.id.is_empty() {
                    p.push(format!("network {n}: a local endpoint has an empty id"));
                }
                net.check_address(&what, e.ip, e.mac, &Owner::Local(e.id.clone()), &mut p);
                if let Err(err) = check_ifname(&e.interface) {
                    p.push(format!("network {n}: {what}: {err}"));
                }
                if !e.netns.is_absolute() {
                    p.push(format!(
                        "network {n}: {what}: netns {} must be an absolute path",
                        e.netns.display()
                    ));
                }
                if p.is_empty() {
                    return Ok(Undo::Local(
                        n,
                        e.id.clone(),
                        net.set_local(&e.id, Some(e.clone())),
                    ));
                }
            }
            Change::RemoveLocal { id, .. } => {
                return Ok(Undo::Local(n, id.clone(), net.set_local(id, None)));
            }
        }
        Err(p)
    }

    fn undo(&mut self, u: Undo) {
        match u {
            Undo::Remote(n, ip, old) => {
                if let Some(net) = self.networks.get_mut(&n) {
                    net.set_remote(ip, old);
                }
            }
            Undo::Local(n, id, old) => {
                if let Some(net) = self.networks.get_mut(&n) {
                    net.set_local(&id, old);
                }
            }
        }
    }

    fn to_spec(&self) -> OverlaySpec {
        OverlaySpec {
            underlay: self.underlay,
            networks: self
                .networks
                .values()
                .map(|n| {
                    let mut spec = n.spec.clone();
                    spec.local = n.local.values().cloned().collect();
                    let mut remote: Vec<_> = n.remote.values().cloned().collect();
                    remote.sort_by_key(|r| r.ip);
                    spec.remote = remote;
                    spec
                })
                .collect(),
        }
    }
}

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

impl Overlay {
    /// A reconciler working through `nl` (a handle in the node's namespace).
    pub fn new(nl: Netlink) -> Overlay {
        Overlay {
            nl,
            desired: Desired::default(),
            applied: None,
        }
    }

    /// The table as last given, with the changes applied since.
    /// The namespace this overlay lives in.
    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    pub fn table(&self) -> OverlaySpec {
        self.desired.to_spec()
    }

    /// Makes the kernel match a whole table. Only what differs from the last
    /// applied table is written (the first time, the kernel is read). An
    /// invalid table changes nothing.
    pub async fn apply(&mut self, spec: OverlaySpec) -> Result<Report, OverlayError> {
        self.desired = Desired::build(spec)?;
        let full = self.applied.is_none();
        self.sync(full).await
    }

    /// Applies endpoint changes in order: each is checked against the table
    /// as the earlier ones leave it and, if all are valid, written with a
    /// few netlink calls each, whatever the table's size. If any is invalid,
    /// none is applied.
    pub async fn apply_changes(&mut self, changes: &[Change]) -> Result<Report, OverlayError> {
        let mut undo = Vec::with_capacity(changes.len());
        let mut problems = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            match self.desired.stage(c) {
                Ok(u) => undo.push(u),
                Err(p) => problems.extend(p.into_iter().map(|p| format!("change {}: {p}", i + 1))),
            }
        }
        if !problems.is_empty() {
            for u in undo.into_iter().rev() {
                self.desired.undo(u);
            }
            return Err(OverlayError::Invalid(problems));
        }
        let Some(mut applied) = self.applied.take() else {
            // The kernel state is unknown: a full pass brings it to the table.
            return self.sync(true).await;
        };
        let start = self.nl.changes();
        let mut problems = Problems::default();
        for (c, u) in changes.iter().zip(&undo) {
            let Some(a) = applied.get_mut(c.network()) else {
                continue; // the network failed to build; the next full pass retries it
            };
            let ctx = format!("network {}", c.network());
            match (c, u) {
                (Change::UpsertRemote { endpoint, .. }, Undo::Remote(_, _, old)) => {
                    a.remotes.insert(endpoint.ip, endpoint.clone());
                    self.change_remote(&a.vxlan, old.as_ref(), Some(endpoint), &ctx, &mut problems)
                        .await;
                }
                (Change::RemoveRemote { ip, .. }, Undo::Remote(_, _, old)) => {
                    a.remotes.remove(ip);
                    self.change_remote(&a.vxlan, old.as_ref(), None, &ctx, &mut problems)
                        .await;
                }
                (Change::UpsertLocal { endpoint, .. }, _) => {
                    if a.locals
                        .get(&endpoint.id)
                        .is_some_and(|(e, _)| e == endpoint)
                    {
                        continue; // unchanged: leave the task's interface alone
                    }
                    if let Some((_, host)) = a.locals.remove(&endpoint.id) {
                        self.remove_local(&host, &ctx, &mut problems).await;
                    }
                    let spec = &self.desired.networks[c.network()].spec;
                    let ctx = format!("network {} endpoint {}", c.network(), endpoint.id);
                    let r = self
                        .ensure_local(spec, endpoint, &a.bridge, a.header.mtu, &Links::Lookup)
                        .await;
                    if let Some(host) = problems.check(ctx, r) {
                        a.locals
                            .insert(endpoint.id.clone(), (endpoint.clone(), host));
                    }
                }
                (Change::RemoveLocal { id, .. }, _) => {
                    if let Some((_, host)) = a.locals.remove(id) {
                        self.remove_local(&host, &ctx, &mut problems).await;
                    }
                }
                _ => unreachable!("stage() pairs each change with its own kind of undo"),
            }
        }
        self.finish(start, false, applied, problems)
    }

    /// Records the outcome of a pass: on success the applied state is kept
    /// for the next incremental pass; on any error it is dropped, so the
    /// next pass re-reads the kernel.
    fn finish(
        &mut self,
        start: u64,
        full: bool,
        applied: BTreeMap<String, AppliedNetwork>,
        problems: Problems,
    ) -> Result<Report, OverlayError> {
        let changes = self.nl.changes() - start;
        if problems.0.is_empty() {
            self.applied = Some(applied);
            Ok(Report { changes, full })
        } else {
            self.applied = None;
            Err(OverlayError::Kernel {
                changes,
                errors: problems.0,
            })
        }
    }

    /// Re-reads the kernel and repairs any drift from the last applied table.
    pub async fn reconcile(&mut self) -> Result<Report, OverlayError> {
        self.sync(true).await
    }

    /// Removes every link mesh created in this namespace (and with them their
    /// FDB and neighbour entries and the peers in task namespaces), including
    /// ones left by an earlier run. Goes on past errors and reports them all.
    pub async fn teardown(&mut self) -> Result<Report, OverlayError> {
        self.desired = Desired::default();
        self.sync(true).await
    }

    async fn sync(&mut self, full: bool) -> Result<Report, OverlayError> {
        let start = self.nl.changes();
        let mut problems = Problems::default();
        let mut prev = if full {
            BTreeMap::new()
        } else {
            self.applied.take().unwrap_or_default()
        };
        let links = if full {
            match self.nl.links().await {
                Ok(all) => Links::Dump(all.into_iter().map(|l| (l.name.clone(), l)).collect()),
                Err(e) => {
                    self.applied = None;
                    return Err(OverlayError::Kernel {
                        changes: 0,
                        errors: vec![e.to_string()],
                    });
                }
            }
        } else {
            Links::Lookup
        };

        let mut applied = BTreeMap::new();
        let underlay = match self.desired.underlay {
            Some(addr) if !self.desired.networks.is_empty() => {
                match self.underlay(addr, &prev, &links).await {
                    Ok(u) => Some(u),
                    Err(e) => {
                        problems.push(format!("underlay {addr}"), e);
                        None
                    }
                }
            }
            _ => None,
        };

        // Phase 1: take away what is no longer wanted before building
        // anything, so that a VNI, or a task interface moving from one
        // network to another, is free by the time it is needed.
        let mut kept = BTreeMap::new();
        for (id, mut p) in std::mem::take(&mut prev) {
            match self.desired.networks.get(&id) {
                Some(net) if net.spec.vni == p.header.vni => {
                    let stale: Vec<String> = p
                        .locals
                        .iter()
                        .filter(|(ep, (old, _))| net.local.get(*ep) != Some(old))
                        .map(|(ep, _)| ep.clone())
                        .collect();
                    for ep in stale {
                        if let Some((_, host)) = p.locals.remove(&ep) {
                            let ctx = format!("network {id} endpoint {ep}");
                            self.remove_local(&host, &ctx, &mut problems).await;
                        }
                    }
                    kept.insert(id, p);
                }
                // Gone, or under a new VNI (new link names): its links go.
                _ => self.remove_network(&p, &mut problems).await,
            }
        }
        let mut prev = kept;
        if let Links::Dump(all) = &links {
            self.collect_strays(all, &mut problems).await;
        }

        // Phase 2: build or update every wanted network. One that cannot be
        // built now (no underlay address, an MTU that does not fit) keeps its
        // links as they are and is retried by the next pass.
        for net in self.desired.networks.values() {
            let Some(underlay) = underlay else { break };
            let (id, vni) = (&net.spec.id, net.spec.vni);
            let esp = if net.spec.encrypted { ESP_OVERHEAD } else { 0 };
            let mtu = net
                .spec
                .mtu
                .unwrap_or(underlay.mtu.saturating_sub(VXLAN_OVERHEAD + esp));
            if mtu + VXLAN_OVERHEAD + esp > underlay.mtu || mtu < MIN_MTU {
                problems.push(
                    format!("network {id}"),
                    format_args!(
                        "MTU {mtu} does not fit the underlay: at most {} - {VXLAN_OVERHEAD} = {} (and at least {MIN_MTU})",
                        underlay.mtu,
                        underlay.mtu.saturating_sub(VXLAN_OVERHEAD)
                    ),
                );
                continue;
            }
            let header = Header {
                vni,
                mtu,
                underlay,
                host: net.spec.host,
            };
            let result = match prev.remove(id) {
                Some(p) if p.header == header => {
                    Some(self.update_network(net, p, &mut problems).await)
                }
                // New, or its MTU or underlay changed: links are created or
                // fixed in place (task interfaces included).
                _ => self.build_network(net, header, &links, &mut problems).await,
            };
            if let Some(a) = result {
                applied.insert(id.clone(), a);
            }
        }
        self.finish(start, full, applied, problems)
    }

    async fn underlay(
        &self,
        addr: Ipv4Addr,
        prev: &BTreeMap<String, AppliedNetwork>,
        links: &Links,
    ) -> Result<Underlay, String> {
        if matches!(links, Links::Lookup)
            && let Some(p) = prev.values().next()
            && p.header.underlay.addr == addr
        {
            return Ok(p.header.underlay);
        }
        let index = self
            .nl
            .link_with_address(IpAddr::V4(addr))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "no interface in netns {} has this address; give the node's underlay address",
                    self.nl.namespace()
                )
            })?;
        let link = self
            .nl
            .link_by_index(index)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("interface {index} vanished"))?;
        Ok(Underlay {
            addr,
            index,
            mtu: link.mtu,
        })
    }

    /// Creates or repairs a network's links and entries from what the kernel has.
    async fn build_network(
        &self,
        net: &DesiredNetwork,
        header: Header,
        links: &Links,
        problems: &mut Problems,
    ) -> Option<AppliedNetwork> {
        let (id, vni) = (&net.spec.id, net.spec.vni);
        let ctx = format!("network {id}");
        let bridge = problems.check(
            &ctx,
            self.ensure_bridge(&bridge_name(vni), header.mtu, links)
                .await,
        )?;
        let bridge = problems.check(
            &ctx,
            self.ensure_host(bridge, net.spec.subnet, header.host).await,
        )?;
        let vx_name = vxlan_name(vni);
        let spec = VxlanSpec {
            name: &vx_name,
            vni,
            local: header.underlay.addr,
            dev: header.underlay.index,
            mtu: header.mtu,
            controller: bridge.index,
        };
        let vxlan = problems.check(&ctx, self.ensure_vxlan(&spec, links).await)?;

        // Remote endpoints: compare with the entries the kernel has.
        let observed = async {
            let fdb = self.nl.fdb(vxlan.index).await?;
            let neigh = self.nl.neighbours(vxlan.index).await?;
            Ok::<_, NetlinkError>(Observed {
                fdb: fdb
                    .into_iter()
                    .filter(|e| e.on_device)
                    .map(|e| {
                        let dst = match (e.permanent, e.dst) {
                            (true, Some(IpAddr::V4(d))) => d,
                            // Not ours to keep as is: replace or delete it.
                            _ => Ipv4Addr::UNSPECIFIED,
                        };
                        (e.mac, dst)
                    })
                    .collect(),
                neigh: neigh
                    .into_iter()
                    .filter_map(|n| match (n.ip, n.permanent, n.mac) {
                        (IpAddr::V4(ip), true, Some(mac)) => Some((ip, mac)),
                        _ => None,
                    })
                    .collect(),
            })
        }
        .await;
        let observed = problems.check(&ctx, observed)?;
        let vips = net.vips();
        self.sync_remotes(&vxlan, &net.remote, &vips, observed, &ctx, problems)
            .await;

        let mut locals = BTreeMap::new();
        for ep in net.local.values() {
            let ctx = format!("network {id} endpoint {}", ep.id);
            let r = self
                .ensure_local(&net.spec, ep, &bridge, header.mtu, links)
                .await;
            if let Some(host) = problems.check(ctx, r) {
                locals.insert(ep.id.clone(), (ep.clone(), host));
            }
        }
        Some(AppliedNetwork {
            header,
            bridge,
            vxlan,
            remotes: net.remote.clone(),
            vips,
            locals,
        })
    }

    /// Applies only the difference from what the last pass left.
    async fn update_network(
        &self,
        net: &DesiredNetwork,
        mut prev: AppliedNetwork,
        problems: &mut Problems,
    ) -> AppliedNetwork {
        let id = &net.spec.id;
        let ctx = format!("network {id}");
        let vips = net.vips();
        if prev.remotes != net.remote || prev.vips != vips {
            let observed = Observed {
                fdb: prev.remotes.values().map(|r| (r.mac, r.node)).collect(),
                neigh: prev
                    .remotes
                    .values()
                    .map(|r| (r.ip, r.mac))
                    .chain(prev.vips.iter().map(|(ip, mac)| (*ip, *mac)))
                    .collect(),
            };
            self.sync_remotes(&prev.vxlan, &net.remote, &vips, observed, &ctx, problems)
                .await;
            prev.remotes = net.remote.clone();
            prev.vips = vips;
        }

        // Stale endpoints went in phase 1; add the missing ones.
        let mut locals = std::mem::take(&mut prev.locals);
        for ep in net.local.values() {
            if locals.contains_key(&ep.id) {
                continue;
            }
            let ctx = format!("network {id} endpoint {}", ep.id);
            let r = self
                .ensure_local(&net.spec, ep, &prev.bridge, prev.header.mtu, &Links::Lookup)
                .await;
            if let Some(host) = problems.check(ctx, r) {
                locals.insert(ep.id.clone(), (ep.clone(), host));
            }
        }
        prev.locals = locals;
        prev
    }

    /// Deletes a local endpoint's veth (its peer in the task goes with it).
    async fn remove_local(&self, host: &Link, ctx: &str, problems: &mut Problems) {
        if let Err(e) = self.nl.del_link(host).await
            && !e.is_not_found()
        {
            problems.push(ctx, e);
        }
    }

    /// One remote endpoint changes from `old` to `new`: at most one FDB and
    /// one neighbour write, plus deleting the old MAC's entry if it changed.
    async fn change_remote(
        &self,
        vxlan: &Link,
        old: Option<&RemoteEndpoint>,
        new: Option<&RemoteEndpoint>,
        ctx: &str,
        problems: &mut Problems,
    ) {
        let ignore_missing = |r: Result<(), NetlinkError>| match r {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        };
        match (old, new) {
            (None, None) => {}
            (Some(o), None) => {
                let r = self.nl.del_neighbour(vxlan, IpAddr::V4(o.ip)).await;
                problems.check(ctx, ignore_missing(r));
                let r = self.nl.del_fdb(vxlan, o.mac).await;
                problems.check(ctx, ignore_missing(r));
            }
            (o, Some(n)) => {
                if o.is_none_or(|o| (o.mac, o.node) != (n.mac, n.node)) {
                    let r = self.nl.set_fdb(vxlan, n.mac, n.node).await;
                    problems.check(ctx, r);
                }
                if o.is_none_or(|o| o.mac != n.mac) {
                    let r = self.nl.set_neighbour(vxlan, IpAddr::V4(n.ip), n.mac).await;
                    problems.check(ctx, r);
                }
                if let Some(o) = o
                    && o.mac != n.mac
                {
                    let r = self.nl.del_fdb(vxlan, o.mac).await;
                    problems.check(ctx, ignore_missing(r));
                }
            }
        }
    }

    /// Deletes a network's links: veths, then the VXLAN device, then the bridge.
    async fn remove_network(&self, p: &AppliedNetwork, problems: &mut Problems) {
        for link in p.links() {
            if let Err(e) = self.nl.del_link(link).await
                && !e.is_not_found()
            {
                problems.push("removing network", e);
            }
        }
    }

    /// In a full pass: deletes links with mesh's prefixes that no desired
    /// network owns (left by a crash, or by an earlier table).
    async fn collect_strays(&self, all: &HashMap<String, Link>, problems: &mut Problems) {
        // Keep whatever a desired network would use, even if building it
        // failed this pass (underlay address missing, MTU out of range):
        // a transient problem must not tear down working task networking.
        let mut keep = BTreeSet::new();
        for net in self.desired.networks.values() {
            keep.insert(bridge_name(net.spec.vni));
            keep.insert(vxlan_name(net.spec.vni));
            keep.extend(net.local.keys().map(|ep| veth_name(&net.spec.id, ep)));
        }
        let mut strays: Vec<&Link> = all
            .values()
            .filter(|l| is_owned(&l.name) && !keep.contains(&l.name))
            .collect();
        // Veths first, bridges last: a port goes before its bridge.
        strays.sort_by_key(|l| {
            (
                match l.kind {
                    LinkKind::Veth => 0,
                    LinkKind::Vxlan => 1,
                    _ => 2,
                },
                l.name.clone(),
            )
        });
        for link in strays {
            if let Err(e) = self.nl.del_link(link).await
                && !e.is_not_found()
            {
                problems.push("removing stray link", e);
            }
        }
    }

    async fn ensure_bridge(
        &self,
        name: &str,
        mtu: u32,
        links: &Links,
    ) -> Result<Link, NetlinkError> {
        if let Some(l) = links.get(&self.nl, name).await? {
            if l.kind == LinkKind::Bridge {
                if l.mtu != mtu {
                    self.nl.set_mtu(&l, mtu).await?;
                }
                if !l.up {
                    self.nl.set_up(&l).await?;
                }
                return Ok(l);
            }
            self.nl.del_link(&l).await?;
        }
        self.nl.add_bridge(name, mtu).await?;
        self.created(name).await
    }

    /// Gives the bridge this node's address and MAC on the network (and no
    /// other address), or takes them away.
    async fn ensure_host(
        &self,
        bridge: Link,
        subnet: Subnet,
        host: Option<HostEndpoint>,
    ) -> Result<Link, NetlinkError> {
        let want = host.map(|h| (IpAddr::V4(h.ip), subnet.prefix()));
        let have = self.nl.addresses(bridge.index).await?;
        for &(ip, prefix) in &have {
            if Some((ip, prefix)) != want {
                self.nl.del_address(&bridge, ip, prefix).await?;
            }
        }
        let (Some(h), Some((ip, prefix))) = (host, want) else {
            return Ok(bridge);
        };
        if bridge.mac != Some(h.mac) {
            self.nl.set_mac(&bridge, h.mac).await?;
        }
        if !have.contains(&(ip, prefix)) {
            self.nl.add_address(&bridge, ip, prefix).await?;
        }
        Ok(bridge)
    }

    async fn ensure_vxlan(
        &self,
        spec: &VxlanSpec<'_>,
        links: &Links,
    ) -> Result<Link, NetlinkError> {
        if let Some(l) = links.get(&self.nl, spec.name).await? {
            if l.kind == LinkKind::Vxlan && l.vxlan.as_ref() == Some(&spec.info()) {
                if l.mtu != spec.mtu {
                    self.nl.set_mtu(&l, spec.mtu).await?;
                }
                if l.controller != Some(spec.controller) {
                    self.nl.set_controller(&l, spec.controller).await?;
                }
                if !l.up {
                    self.nl.set_up(&l).await?;
                }
                return Ok(l);
            }
            // VNI, address, port or flags differ: these need a new device.
            self.nl.del_link(&l).await?;
        }
        self.nl.add_vxlan(spec).await?;
        self.created(spec.name).await
    }

    async fn created(&self, name: &str) -> Result<Link, NetlinkError> {
        self.nl.link(name).await?.ok_or_else(|| NetlinkError {
            op: "find new link",
            object: name.into(),
            ns: self.nl.namespace().into(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        })
    }

    /// Writes FDB and neighbour entries so that the VXLAN device holds
    /// exactly `desired`, given what it holds now.
    async fn sync_remotes(
        &self,
        vxlan: &Link,
        desired: &HashMap<Ipv4Addr, RemoteEndpoint>,
        vips: &BTreeMap<Ipv4Addr, Mac>,
        observed: Observed,
        ctx: &str,
        problems: &mut Problems,
    ) {
        let want_fdb: BTreeMap<Mac, Ipv4Addr> = desired.values().map(|r| (r.mac, r.node)).collect();
        let want_neigh: BTreeMap<Ipv4Addr, Mac> = desired
            .values()
            .map(|r| (r.ip, r.mac))
            .chain(vips.iter().map(|(ip, mac)| (*ip, *mac)))
            .collect();
        // Withdraw first, neighbour before FDB: a removed endpoint stops
        // resolving before its forwarding entry goes.
        for ip in observed
            .neigh
            .keys()
            .filter(|ip| !want_neigh.contains_key(ip))
        {
            let r = self.nl.del_neighbour(vxlan, IpAddr::V4(*ip)).await;
            if let Err(e) = r
                && !e.is_not_found()
            {
                problems.push(ctx, e);
            }
        }
        for mac in observed.fdb.keys().filter(|m| !want_fdb.contains_key(m)) {
            let r = self.nl.del_fdb(vxlan, *mac).await;
            if let Err(e) = r
                && !e.is_not_found()
            {
                problems.push(ctx, e);
            }
        }
        // Then add, FDB before neighbour: an address resolves only once its
        // MAC is reachable.
        for (mac, node) in &want_fdb {
            if observed.fdb.get(mac) != Some(node) {
                let r = self.nl.set_fdb(vxlan, *mac, *node).await;
                problems.check(ctx, r);
            }
        }
        for (ip, mac) in &want_neigh {
            if observed.neigh.get(ip) != Some(mac) {
                let r = self.nl.set_neighbour(vxlan, IpAddr::V4(*ip), *mac).await;
                problems.check(ctx, r);
            }
        }
    }

    /// Creates or repairs one local endpoint: the veth pair, the task side's
    /// name, MAC, MTU, address and state, and the task's loopback. Returns
    /// the host side.
    async fn ensure_local(
        &self,
        net: &NetworkSpec,
        ep: &LocalEndpoint,
        bridge: &Link,
        mtu: u32,
        links: &Links,
    ) -> Result<Link, NetlinkError> {
        let name = veth_name(&net.id, &ep.id);
        let host = links.get(&self.nl, &name).await?;
        let task = self.nl.enter(&ep.netns)?;
        let peer = task.link(&ep.interface).await?;
        let paired = match (&host, &peer) {
            (Some(h), Some(p)) => {
                // Each side names the other (indexes are per namespace, so
                // one direction alone could match a stranger's veth).
                h.kind == LinkKind::Veth
                    && p.kind == LinkKind::Veth
                    && p.link == Some(h.index)
                    && h.link == Some(p.index)
            }
            _ => false,
        };
        let (host, peer) = if paired {
            let (h, p) = (host.expect("paired"), peer.expect("paired"));
            if h.controller != Some(bridge.index) {
                self.nl.set_controller(&h, bridge.index).await?;
            }
            if h.mtu != mtu {
                self.nl.set_mtu(&h, mtu).await?;
            }
            if !h.up {
                self.nl.set_up(&h).await?;
            }
            if p.mac != Some(ep.mac) {
                task.set_mac(&p, ep.mac).await?;
            }
            if p.mtu != mtu {
                task.set_mtu(&p, mtu).await?;
            }
            (h, p)
        } else {
            if let Some(p) = peer {
                return Err(NetlinkError {
                    op: "create endpoint",
                    object: format!("{} ({})", ep.interface, p.index),
                    ns: task.namespace().into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the task namespace already has an interface of that name that mesh did not create for this endpoint",
                    ),
                });
            }
            if let Some(h) = host {
                self.nl.del_link(&h).await?;
            }
            let netns = File::open(&ep.netns).map_err(|source| NetlinkError {
                op: "open namespace",
                object: ep.netns.display().to_string(),
                ns: self.nl.namespace().into(),
                source,
            })?;
            self.nl
                .add_veth(
                    &name,
                    mtu,
                    bridge.index,
                    &VethPeer {
                        name: &ep.interface,
                        netns: &netns,
                        mac: ep.mac,
                        mtu,
                    },
                )
                .await?;
            let h = self.created(&name).await?;
            let p = task
                .link(&ep.interface)
                .await?
                .ok_or_else(|| NetlinkError {
                    op: "find new link",
                    object: ep.interface.clone(),
                    ns: task.namespace().into(),
                    source: std::io::Error::from_raw_os_error(libc::ENODEV),
                })?;
            (h, p)
        };

        // The address: exactly ours among the IPv4 ones (IPv6 link-local stays).
        let want = (IpAddr::V4(ep.ip), net.subnet.prefix());
        let have = task.addresses(peer.index).await?;
        for (ip, prefix) in have.iter().filter(|(ip, _)| ip.is_ipv4()) {
            if (*ip, *prefix) != want {
                task.del_address(&peer, *ip, *prefix).await?;
            }
        }
        if !have.contains(&want) {
            task.add_address(&peer, want.0, want.1).await?;
        }
        if !peer.up {
            task.set_up(&peer).await?;
        }
        if let Some(lo) = task.link("lo").await?
            && !lo.up
        {
            task.set_up(&lo).await?;
        }
        Ok(host)
    }
}

/// FDB (MAC → node) and neighbour (IP → MAC) entries as they are now.
struct Observed {
    fdb: BTreeMap<Mac, Ipv4Addr>,
    neigh: BTreeMap<Ipv4Addr, Mac>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(id: &str, vni: u32, subnet: &str) -> NetworkSpec {
        let subnet: Subnet = subnet.parse().unwrap();
        NetworkSpec {
            id: id.into(),
            vni,
            gateway: subnet.gateway(),
            subnet,
            mtu: None,
            encrypted: false,
            local: vec![],
            remote: vec![],
            host: None,
            vips: vec![],
        }
    }

    fn remote(ip: &str, node: &str) -> RemoteEndpoint {
        let ip: Ipv4Addr = ip.parse().unwrap();
        RemoteEndpoint {
            ip,
            mac: Mac::from_ipv4(ip),
            node: node.parse().unwrap(),
        }
    }

    fn local(id: &str, ip: &str, netns: &str) -> LocalEndpoint {
        let ip: Ipv4Addr = ip.parse().unwrap();
        LocalEndpoint {
            id: id.into(),
            netns: netns.into(),
            ip,
            mac: Mac::from_ipv4(ip),
            interface: "eth0".into(),
        }
    }

    fn problems(spec: &OverlaySpec) -> Vec<String> {
        match spec.validate() {
            Ok(()) => vec![],
            Err(OverlayError::Invalid(p)) => p,
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn a_good_spec_validates_and_round_trips_through_json() {
        let mut a = net("front", 4096, "10.0.1.0/24");
        a.remote.push(remote("10.0.1.3", "198.18.0.3"));
        a.local.push(local("t1", "10.0.1.2", "/run/netns/t1"));
        let spec = OverlaySpec {
            underlay: Some("198.18.0.2".parse().unwrap()),
            networks: vec![a, net("back", 4097, "10.0.2.0/24")],
        };
        assert_eq!(problems(&spec), Vec::<String>::new());
        let json = serde_json::to_string(&spec).unwrap();
        assert!(
            json.contains("\"10.0.1.0/24\"") && json.contains("\"02:42:0a:00:01:03\""),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<OverlaySpec>(&json).unwrap(), spec);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut a = net("front", 4096, "10.0.1.0/24");
        a.remote.push(remote("10.0.1.1", "198.18.0.3")); // the gateway
        a.remote.push(remote("10.0.2.9", "198.18.0.3")); // outside the subnet
        a.remote.push(remote("10.0.1.5", "198.18.0.2")); // on this node
        a.remote.push(remote("10.0.1.8", "198.18.0.4"));
        let mut dup = remote("10.0.1.6", "198.18.0.4");
        dup.mac = Mac::from_ipv4("10.0.1.8".parse().unwrap());
        a.remote.push(dup); // same MAC as the previous one
        a.remote.push(remote("10.0.1.8", "198.18.0.3")); // same address
        a.local.push(local("t1", "10.0.1.7", "relative/path"));
        let mut b = net("front", 4096, "10.0.3.0/24"); // same id, same VNI
        b.mtu = Some(20);
        let spec = OverlaySpec {
            underlay: Some("198.18.0.2".parse().unwrap()),
            networks: vec![a, b],
        };
        let p = problems(&spec);
        let expect = [
            "10.0.1.1 is not a usable address",
            "10.0.2.9 is not a usable address",
            "remote endpoint 10.0.1.5 on 198.18.0.2 is on this node; list it as local",
            "MAC 02:42:0a:00:01:08 is already held by 10.0.1.8",
            "remote endpoint 10.0.1.8 is listed twice",
            "must be an absolute path",
            "network front is listed twice",
            "both use VNI 4096",
            "MTU 20 is outside",
        ];
        for e in expect {
            assert!(p.iter().any(|x| x.contains(e)), "missing {e:?} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    #[test]
    fn networks_need_an_underlay_and_unknown_fields_are_refused() {
        let spec = OverlaySpec {
            underlay: None,
            networks: vec![net("a", 4096, "10.0.1.0/24")],
        };
        assert!(problems(&spec)[0].contains("\"underlay\""));
        let err = serde_json::from_str::<OverlaySpec>(r#"{"networks":[],"extra":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
        let err = serde_json::from_str::<NetworkSpec>(
            r#"{"id":"a","vni":1,"subnet":"10.0.1.0/33","gateway":"10.0.1.1"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("is not an IPv4 subnet"), "{err}");
    }

    #[test]
    fn changes_are_checked_in_order_and_all_or_nothing() {
        let mut a = net("front", 4096, "10.0.1.0/24");
        a.remote.push(remote("10.0.1.3", "198.18.0.3"));
        a.local.push(local("t1", "10.0.1.2", "/run/netns/t1"));
        let spec = OverlaySpec {
            underlay: Some("198.18.0.2".parse().unwrap()),
            networks: vec![a],
        };
        let mut d = Desired::build(spec.clone()).unwrap();
        let stage_all = |d: &mut Desired, changes: &[Change]| -> Result<(), Vec<String>> {
            let mut undo = Vec::new();
            for c in changes {
                match d.stage(c) {
                    Ok(u) => undo.push(u),
                    Err(p) => {
                        for u in undo.into_iter().rev() {
                            d.undo(u);
                        }
                        return Err(p);
                    }
                }
            }
            Ok(())
        };
        let network = "front".to_string();
        // A MAC may pass from one endpoint to another within one batch...
        let mut moved = remote("10.0.1.4", "198.18.0.4");
        moved.mac = Mac::from_ipv4("10.0.1.3".parse().unwrap());
        stage_all(
            &mut d,
            &[
                Change::RemoveRemote {
                    network: network.clone(),
                    ip: "10.0.1.3".parse().unwrap(),
                },
                Change::UpsertRemote {
                    network: network.clone(),
                    endpoint: moved.clone(),
                },
            ],
        )
        .unwrap();
        assert_eq!(d.to_spec().networks[0].remote, vec![moved.clone()]);
        // ...but a batch with one bad change leaves the table as it was.
        let before = d.to_spec();
        let err = stage_all(
            &mut d,
            &[
                Change::UpsertRemote {
                    network: network.clone(),
                    endpoint: remote("10.0.1.9", "198.18.0.3"),
                },
                Change::UpsertLocal {
                    network: network.clone(),
                    endpoint: local("t2", "10.0.1.4", "/run/netns/t2"),
                },
            ],
        )
        .unwrap_err();
        assert!(
            err[0].contains("address 10.0.1.4 is already held by a remote endpoint"),
            "{err:?}"
        );
        assert_eq!(d.to_spec(), before);
        // Unknown networks, duplicate task interfaces, and updates in place.
        let err = stage_all(
            &mut d,
            &[Change::RemoveLocal {
                network: "nope".into(),
                id: "t1".into(),
            }],
        )
        .unwrap_err();
        assert!(
            err[0].contains("network nope is not in the table"),
            "{err:?}"
        );
        let mut second = net("back", 4097, "10.0.2.0/24");
        second.local.push(local("t9", "10.0.2.2", "/run/netns/t1"));
        let err = Desired::build(OverlaySpec {
            networks: vec![spec.networks[0].clone(), second],
            ..spec.clone()
        })
        .err()
        .expect("eth0 twice in one namespace");
        assert!(
            err.to_string()
                .contains("eth0 in /run/netns/t1 is already used by front/t1"),
            "{err}"
        );
        let mut t1 = local("t1", "10.0.1.20", "/run/netns/t1");
        t1.mac = Mac::from_ipv4("10.0.1.2".parse().unwrap()); // keeps its own MAC
        stage_all(
            &mut d,
            &[Change::UpsertLocal {
                network,
                endpoint: t1.clone(),
            }],
        )
        .unwrap();
        assert_eq!(d.to_spec().networks[0].local, vec![t1]);
    }

    #[test]
    fn link_names_are_short_stable_and_distinct() {
        assert_eq!(bridge_name(16_777_215), "mbr-16777215");
        assert_eq!(vxlan_name(4096), "mvx-4096");
        let v = veth_name("front", "t1");
        assert_eq!(v, veth_name("front", "t1"));
        assert_ne!(v, veth_name("front", "t2"));
        assert_ne!(veth_name("ab", "c"), veth_name("a", "bc"));
        for n in [bridge_name(16_777_215), vxlan_name(16_777_215), v] {
            check_ifname(&n).unwrap();
            assert!(is_owned(&n));
        }
        assert!(!is_owned("eth0"));
    }
}
