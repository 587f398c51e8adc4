//! From the control plane's tables to what this node's kernel should hold.
//!
//! The agent (`control::agent`) keeps a replica of the cluster's tables;
//! this module picks this node's share of it:
//! - the **overlay**: every network this node has its own address on (every
//!   node on `ingress`; another network from this node's first task there),
//!   with that address on the bridge, its local endpoints (veths into the
//!   tasks' namespaces), its remote endpoints and the other nodes' own
//!   addresses (static FDB and neighbour entries toward the nodes they are
//!   on), and the services' VIPs, which local tasks resolve to the bridge.
//!   Endpoints of a node that is down are not in the tables at all.
//! - the **load balancer** ([`LbView`]): every published port on the
//!   node's underlay address, to the service's tasks on `ingress`; and each
//!   VIP on a network this node is on, to the service's tasks there. Flows
//!   leave with this node's own address on the backend's network as their
//!   source, so that replies come back to the node that translated them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use model::{
    EndpointMode, Protocol as PortProtocol, PublishMode,
    session::Update,
    tables::{EndpointEntry, Key, NodeEndpointEntry, ServiceEntry, Tables, Value},
};

use crate::{
    lb::{
        ApplyReport, BackendSpec, FrontendSpec, LbChanges, LbSpec, LbTarget, Protocol, ServiceSpec,
        SyncError,
    },
    netlink::Mac,
    overlay::{Change, HostEndpoint, LocalEndpoint, NetworkSpec, OverlaySpec, RemoteEndpoint},
};

/// What the overlay needs after an update of the tables.
#[derive(Debug, PartialEq, Eq)]
pub enum OverlayUpdate {
    Unchanged,
    /// Endpoints came, went or moved on networks this node is already on:
    /// applied in constant time each.
    Changes(Vec<Change>),
    /// The set of networks this node is on changed, or one of them did
    /// (its entry, this node's address there, its VIPs): a whole table.
    Whole(OverlaySpec),
}

/// This node's share of the tables, followed delta by delta.
#[derive(Debug)]
pub struct NodeView {
    node: String,
    underlay: Ipv4Addr,
    /// Networks this node is on, with its own address there.
    local: BTreeMap<String, Ipv4Addr>,
}

fn endpoint(v: &Option<Value>) -> Option<&EndpointEntry> {
    match v {
        Some(Value::Endpoint(e)) => Some(e),
        _ => None,
    }
}

fn node_endpoint(v: &Option<Value>) -> Option<&NodeEndpointEntry> {
    match v {
        Some(Value::NodeEndpoint(e)) => Some(e),
        _ => None,
    }
}

fn vips(v: &Option<Value>) -> Option<&BTreeMap<String, Ipv4Addr>> {
    match v {
        Some(Value::Service(s)) => Some(&s.vips),
        _ => None,
    }
}

impl NodeView {
    pub fn new(node: &str, underlay: Ipv4Addr) -> NodeView {
        NodeView {
            node: node.to_owned(),
            underlay,
            local: BTreeMap::new(),
        }
    }

    fn is_local(&self, e: Option<&EndpointEntry>) -> bool {
        e.is_some_and(|e| e.node == self.node && e.netns.is_some())
    }

    /// The networks this node is on, with its own address there.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn networks(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.local
    }

    /// The interface a local task has on `network`: eth0, eth1, ... in the
    /// order of its networks' ids (as [`overlay_spec`] names them).
    fn interface(&self, tables: &Tables, network: &str, task: &str) -> String {
        let n = self
            .local
            .keys()
            .filter(|net| net.as_str() < network)
            .filter(|net| {
                tables.entries.contains_key(&Key::Endpoint {
                    network: (*net).clone(),
                    task: task.to_owned(),
                })
            })
            .count();
        format!("eth{n}")
    }

    /// What the overlay must do now that `update` made `tables`.
    pub fn overlay(&mut self, tables: &Tables, update: Update<'_>) -> OverlayUpdate {
        let changes = match update {
            Update::Delta(changes) if !self.needs_whole(changes) => changes,
            _ => {
                let spec = overlay_spec(tables, &self.node, self.underlay);
                self.local = spec
                    .networks
                    .iter()
                    .filter_map(|n| Some((n.id.clone(), n.host?.ip)))
                    .collect();
                return OverlayUpdate::Whole(spec);
            }
        };
        let mut out = Vec::new();
        for c in changes {
            match &c.key {
                Key::Endpoint { network, task } if self.local.contains_key(network) => {
                    self.endpoint_change(tables, network, task, c, &mut out)
                }
                // Another node's own address (ours needs a whole table).
                Key::NodeEndpoint { network, .. } if self.local.contains_key(network) => {
                    let (old, new) = (node_endpoint(&c.old), node_endpoint(&c.new));
                    if let Some(o) = old
                        && new.is_none_or(|n| n.addr != o.addr)
                    {
                        out.push(Change::RemoveRemote {
                            network: network.clone(),
                            ip: o.addr,
                        });
                    }
                    if let Some(n) = new {
                        out.push(Change::UpsertRemote {
                            network: network.clone(),
                            endpoint: RemoteEndpoint {
                                ip: n.addr,
                                mac: Mac(n.mac),
                                node: n.node_addr,
                            },
                        });
                    }
                }
                _ => {}
            }
        }
        if out.is_empty() {
            OverlayUpdate::Unchanged
        } else {
            OverlayUpdate::Changes(out)
        }
    }

    fn endpoint_change(
        &self,
        tables: &Tables,
        network: &str,
        task: &str,
        c: &model::session::Applied,
        out: &mut Vec<Change>,
    ) {
        let (mut old, mut new) = (endpoint(&c.old), endpoint(&c.new));
        // This node's endpoints without a namespace are not served here at
        // all (as in overlay_spec): never remote entries to itself.
        let ours = |e: &Option<&EndpointEntry>| {
            e.is_some_and(|e| e.node == self.node && e.netns.is_none())
        };
        if ours(&old) {
            old = None;
        }
        if ours(&new) {
            new = None;
        }
        if let Some(o) = old {
            if self.is_local(old) {
                if !self.is_local(new) {
                    out.push(Change::RemoveLocal {
                        network: network.to_owned(),
                        id: task.to_owned(),
                    });
                }
            } else if new.is_none_or(|n| n.addr != o.addr || self.is_local(Some(n))) {
                out.push(Change::RemoveRemote {
                    network: network.to_owned(),
                    ip: o.addr,
                });
            }
        }
        let Some(n) = new else { return };
        if self.is_local(new) {
            out.push(Change::UpsertLocal {
                network: network.to_owned(),
                endpoint: LocalEndpoint {
                    id: task.to_owned(),
                    netns: PathBuf::from(n.netns.as_deref().expect("local")),
                    ip: n.addr,
                    mac: Mac(n.mac),
                    interface: self.interface(tables, network, task),
                },
            });
        } else {
            out.push(Change::UpsertRemote {
                network: network.to_owned(),
                endpoint: RemoteEndpoint {
                    ip: n.addr,
                    mac: Mac(n.mac),
                    node: n.node_addr,
                },
            });
        }
    }

    /// Whether `changes` change which networks this node is on, or one of
    /// them: its entry, this node's address there, or the VIPs on it.
    fn needs_whole(&self, changes: &[model::session::Applied]) -> bool {
        changes.iter().any(|c| match &c.key {
            Key::Network { id } => self.local.contains_key(id),
            Key::NodeEndpoint { node, .. } => *node == self.node,
            Key::Service { .. } => {
                let (old, new) = (vips(&c.old), vips(&c.new));
                self.local
                    .keys()
                    .any(|net| old.and_then(|v| v.get(net)) != new.and_then(|v| v.get(net)))
            }
            Key::Endpoint { .. } | Key::NetworkKeys => false,
        })
    }
}

/// What this node's IPsec should be: the encrypted networks it has its own
/// address on, the other nodes with an address or a task on them, and the
/// key ring. Cheap when no network is encrypted.
pub fn ipsec_spec(tables: &Tables, node: &str, underlay: Ipv4Addr) -> crate::ipsec::IpsecSpec {
    use crate::ipsec::IpsecSpec;
    let encrypted: BTreeMap<&str, u32> = tables
        .networks()
        .filter(|(_, n)| n.encrypted)
        .map(|(id, n)| (id, n.vni))
        .collect();
    if encrypted.is_empty() {
        return IpsecSpec::default();
    }
    let mut spec = IpsecSpec {
        local: Some(underlay),
        ..IpsecSpec::default()
    };
    for (net, n, _) in tables.node_endpoints() {
        if n == node
            && let Some(vni) = encrypted.get(net)
        {
            spec.vnis.insert(*vni);
        }
    }
    if spec.vnis.is_empty() {
        return IpsecSpec::default();
    }
    let on = |net: &str| encrypted.get(net).is_some_and(|v| spec.vnis.contains(v));
    let mut peers = BTreeSet::new();
    for (net, _, e) in tables.node_endpoints() {
        if e.node_addr != underlay && on(net) {
            peers.insert(e.node_addr);
        }
    }
    for (net, _, e) in tables.endpoints() {
        if e.node_addr != underlay && on(net) {
            peers.insert(e.node_addr);
        }
    }
    spec.peers = peers;
    if let Some(ring) = tables.network_keys() {
        spec.keys = ring.keys.iter().map(|k| (k.id, k.secret.clone())).collect();
        spec.primary = Some(ring.primary);
    }
    spec
}

/// The overlay this node should have: the networks it has its own address on.
pub fn overlay_spec(tables: &Tables, node: &str, underlay: Ipv4Addr) -> OverlaySpec {
    let mine: BTreeMap<&str, &NodeEndpointEntry> = tables
        .node_endpoints()
        .filter(|(_, n, _)| *n == node)
        .map(|(net, _, e)| (net, e))
        .collect();
    // A task's interfaces are eth0, eth1, ... in network-id order.
    let mut next_if: BTreeMap<&str, usize> = BTreeMap::new();
    let mut local: BTreeMap<&str, Vec<LocalEndpoint>> = BTreeMap::new();
    let mut remote: BTreeMap<&str, Vec<RemoteEndpoint>> = BTreeMap::new();
    for (network, task, e) in tables.endpoints() {
        if !mine.contains_key(network) {
            continue;
        }
        if e.node != node {
            remote.entry(network).or_default().push(RemoteEndpoint {
                ip: e.addr,
                mac: Mac(e.mac),
                node: e.node_addr,
            });
            continue;
        }
        let Some(netns) = &e.netns else { continue };
        let n = next_if.entry(task).or_default();
        local.entry(network).or_default().push(LocalEndpoint {
            id: task.to_owned(),
            netns: PathBuf::from(netns),
            ip: e.addr,
            mac: Mac(e.mac),
            interface: format!("eth{n}"),
        });
        *n += 1;
    }
    for (network, other, e) in tables.node_endpoints() {
        if other != node && mine.contains_key(network) {
            remote.entry(network).or_default().push(RemoteEndpoint {
                ip: e.addr,
                mac: Mac(e.mac),
                node: e.node_addr,
            });
        }
    }
    let mut vips: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
    for (_, s) in tables.services() {
        for (net, vip) in &s.vips {
            if mine.contains_key(net.as_str()) {
                vips.entry(net).or_default().push(*vip);
            }
        }
    }
    let mut networks = Vec::new();
    for (id, n) in tables.networks() {
        let Some(host) = mine.get(id) else { continue };
        networks.push(NetworkSpec {
            id: id.to_owned(),
            vni: n.vni,
            subnet: n.subnet,
            gateway: n.gateway,
            mtu: None,
            encrypted: n.encrypted,
            local: local.remove(id).unwrap_or_default(),
            remote: remote.remove(id).unwrap_or_default(),
            host: Some(HostEndpoint {
                ip: host.addr,
                mac: Mac(host.mac),
            }),
            vips: vips.remove(id).unwrap_or_default(),
        });
    }
    OverlaySpec {
        underlay: (!networks.is_empty()).then_some(underlay),
        networks,
    }
}

/// The smallest Maglev table size (prime) with at least 100 slots per
/// backend, as the Maglev paper advises, up to the largest the maps hold.
fn table_size(backends: usize) -> u32 {
    const PRIMES: [u32; 6] = [251, 1021, 4093, 16381, 32749, 65521];
    PRIMES
        .into_iter()
        .find(|p| *p as usize >= backends.saturating_mul(100))
        .unwrap_or(PRIMES[PRIMES.len() - 1])
}

/// This node's load balancer, followed delta by delta: which services it
/// holds and what each contributes, so that a change costs the services it
/// touches, never the number of services.
///
/// - every published port (ingress mode) answers on the node's addresses
///   and goes to the service's tasks on `ingress`, at the target port;
/// - each VIP on a network this node is on answers on every port (TCP and
///   UDP, one frontend) and goes to the service's tasks on that network, at the port the
///   client asked for;
/// - a port published in host mode answers only on a node that runs a task
///   of the service, and goes only to the tasks on that node (no mesh).
#[derive(Debug, Default)]
pub struct LbView {
    /// This node's id (host-mode ports serve its own tasks only).
    node: String,
    /// Service id -> network -> its task addresses there, and whether each
    /// is draining (kept for open flows, weight 0 for new ones).
    members: HashMap<String, HashMap<String, BTreeMap<Ipv4Addr, bool>>>,
    /// Service id -> its live tasks' addresses on this node (one per task:
    /// the first network's).
    local: HashMap<String, BTreeMap<String, Ipv4Addr>>,
    /// Service id -> the load-balancer services it contributes.
    specs: HashMap<String, Vec<ServiceSpec>>,
    /// Load-balancer service name -> its id in the counters.
    ids: HashMap<String, u32>,
    taken: HashSet<u32>,
    /// The last whole spec without its services (set by [`LbView::sync`]).
    globals: Option<LbSpec>,
}

/// The ingress network's id and this node's address there.
fn ingress<'a>(
    tables: &'a Tables,
    networks: &BTreeMap<String, Ipv4Addr>,
) -> Option<(&'a str, Ipv4Addr)> {
    let (id, _) = tables.networks().find(|(_, n)| n.ingress)?;
    Some((id, *networks.get(id)?))
}

impl LbView {
    pub fn new() -> LbView {
        LbView::default()
    }

    /// The view of node `node`: host-mode ports serve its tasks.
    pub fn for_node(node: &str) -> LbView {
        LbView {
            node: node.to_owned(),
            ..LbView::default()
        }
    }

    fn add_member(&mut self, network: &str, e: &EndpointEntry) {
        self.members
            .entry(e.service.clone())
            .or_default()
            .entry(network.to_owned())
            .or_default()
            .insert(e.addr, e.draining);
        if e.node == self.node && !e.draining {
            self.local
                .entry(e.service.clone())
                .or_default()
                .entry(e.task_name.clone())
                .or_insert(e.addr);
        }
    }

    fn remove_member(&mut self, network: &str, e: &EndpointEntry) {
        if let Some(m) = self.members.get_mut(&e.service) {
            if let Some(set) = m.get_mut(network) {
                set.remove(&e.addr);
                if set.is_empty() {
                    m.remove(network);
                }
            }
            if m.is_empty() {
                self.members.remove(&e.service);
            }
        }
        if let Some(l) = self.local.get_mut(&e.service)
            && l.get(&e.task_name) == Some(&e.addr)
        {
            l.remove(&e.task_name);
            if l.is_empty() {
                self.local.remove(&e.service);
            }
        }
    }

    /// Brings the maps to the tables after `update`: per service for a
    /// delta, all of it for a whole update (or the first one). Only the
    /// difference is written either way. `nat_interfaces`: this host's
    /// bridge indexes with its address on each.
    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &mut self,
        tables: &Tables,
        update: Update<'_>,
        networks: &BTreeMap<String, Ipv4Addr>,
        node_addresses: Vec<Ipv4Addr>,
        nat_interfaces: BTreeMap<u32, Ipv4Addr>,
        target: &mut dyn LbTarget,
    ) -> Result<ApplyReport, SyncError> {
        if let (Update::Delta(changes), Some(mut globals)) = (update, self.globals.take()) {
            globals.node_addresses = node_addresses;
            globals.nat_interfaces = nat_interfaces;
            let changes = self.delta(tables, changes, networks);
            let r = target.apply_changes(&globals, &changes);
            self.globals = Some(globals);
            return r;
        }
        let Some(mut spec) = self.whole(tables, networks, node_addresses) else {
            return Ok(ApplyReport::default());
        };
        spec.nat_interfaces = nat_interfaces;
        let r = target.apply(&spec);
        spec.services.clear();
        self.globals = Some(spec);
        r
    }

    /// Moves the NAT addresses to new interface indexes (a bridge was
    /// re-created); nothing else changes.
    pub fn set_nat_interfaces(
        &mut self,
        nat_interfaces: BTreeMap<u32, Ipv4Addr>,
        target: &mut dyn LbTarget,
    ) -> Result<ApplyReport, SyncError> {
        let Some(globals) = &mut self.globals else {
            return Ok(ApplyReport::default());
        };
        globals.nat_interfaces = nat_interfaces;
        target.apply_changes(globals, &LbChanges::default())
    }

    /// The whole load balancer from `tables`, or `None` when this node has
    /// no address on `ingress` (then it has no source address to NAT to).
    /// `networks` are the networks this node is on, with its address there
    /// ([`NodeView::networks`]).
    pub fn whole(
        &mut self,
        tables: &Tables,
        networks: &BTreeMap<String, Ipv4Addr>,
        node_addresses: Vec<Ipv4Addr>,
    ) -> Option<LbSpec> {
        *self = LbView::for_node(&self.node);
        for (network, _, e) in tables.endpoints() {
            self.add_member(network, e);
        }
        let (ingress_id, nat_address) = ingress(tables, networks)?;
        let mut services = Vec::new();
        for (id, s) in tables.services() {
            let specs = self.service_specs(id, s, ingress_id, networks);
            services.extend(specs.iter().cloned());
            if !specs.is_empty() {
                self.specs.insert(id.to_owned(), specs);
            }
        }
        Some(LbSpec {
            nat_address,
            node_addresses,
            nat_port_min: crate::lb::DEFAULT_NAT_PORT_MIN,
            nat_port_count: crate::lb::DEFAULT_NAT_PORT_COUNT,
            services,
            // Interface indexes are this host's business: the caller adds them.
            nat_interfaces: BTreeMap::new(),
        })
    }

    /// What `changes` change, service by service. The set of networks this
    /// node is on must be the same as at the last [`LbView::whole`] (a
    /// change to it needs a whole table, as it does for the overlay).
    pub fn delta(
        &mut self,
        tables: &Tables,
        changes: &[model::session::Applied],
        networks: &BTreeMap<String, Ipv4Addr>,
    ) -> LbChanges {
        let mut affected = BTreeSet::new();
        for c in changes {
            match &c.key {
                Key::Endpoint { network, .. } => {
                    if let Some(o) = endpoint(&c.old) {
                        self.remove_member(network, o);
                        affected.insert(o.service.clone());
                    }
                    if let Some(n) = endpoint(&c.new) {
                        self.add_member(network, n);
                        affected.insert(n.service.clone());
                    }
                }
                Key::Service { id } => {
                    affected.insert(id.clone());
                }
                Key::Network { .. } | Key::NodeEndpoint { .. } | Key::NetworkKeys => {}
            }
        }
        let mut out = LbChanges::default();
        let Some((ingress_id, _)) = ingress(tables, networks) else {
            return out;
        };
        for id in affected {
            let old = self.specs.remove(&id).unwrap_or_default();
            let new = match tables.entries.get(&Key::Service { id: id.clone() }) {
                Some(Value::Service(s)) => self.service_specs(&id, s, ingress_id, networks),
                _ => Vec::new(),
            };
            for o in &old {
                if !new.iter().any(|n| n.frontends == o.frontends) {
                    out.remove.extend(o.frontends.iter().cloned());
                }
                if !new.iter().any(|n| n.name == o.name)
                    && let Some(freed) = self.ids.remove(&o.name)
                {
                    self.taken.remove(&freed);
                }
            }
            out.upsert
                .extend(new.iter().filter(|n| !old.contains(n)).cloned());
            if !new.is_empty() {
                self.specs.insert(id, new);
            }
        }
        out
    }

    /// A stable id for a load-balancer service in the counters: a hash of
    /// its name, probed past ids already taken.
    fn id_for(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let mut h: u32 = 0x811c_9dc5;
        for b in name.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        while !self.taken.insert(h) {
            h = h.wrapping_add(1);
        }
        self.ids.insert(name.to_owned(), h);
        h
    }

    /// What service `id` contributes: one load-balancer service per
    /// published port, and one per VIP and target port on this node's
    /// networks.
    fn service_specs(
        &mut self,
        id: &str,
        s: &ServiceEntry,
        ingress_id: &str,
        networks: &BTreeMap<String, Ipv4Addr>,
    ) -> Vec<ServiceSpec> {
        let members = self.members.get(id);
        // (address, weight): a draining task keeps its open flows and gets
        // no new ones.
        let on = |net: &str| -> Vec<(Ipv4Addr, u32)> {
            members.and_then(|m| m.get(net)).map_or_else(Vec::new, |v| {
                v.iter()
                    .map(|(a, draining)| (*a, u32::from(!*draining)))
                    .collect()
            })
        };
        let mut found = Vec::new();
        for p in &s.ports {
            let protocol = match p.protocol {
                PortProtocol::Tcp => Protocol::Tcp,
                PortProtocol::Udp => Protocol::Udp,
            };
            let backends = |addrs: Vec<(Ipv4Addr, u32)>| -> Vec<BackendSpec> {
                addrs
                    .into_iter()
                    .map(|(address, weight)| BackendSpec {
                        address,
                        port: p.target,
                        weight,
                    })
                    .collect()
            };
            let push = |name: String, address: Option<Ipv4Addr>, port: u16, net: &str| {
                let b = backends(on(net));
                (
                    name,
                    ServiceSpec {
                        id: 0,
                        name: String::new(),
                        frontends: vec![FrontendSpec {
                            address,
                            port,
                            protocol,
                        }],
                        table_size: table_size(b.len()),
                        backends: b,
                    },
                )
            };
            if p.mode == PublishMode::Ingress
                && let Some(published) = p.published
            {
                found.push(push(
                    format!("{}:{published}/{}", s.name, p.protocol),
                    None,
                    published,
                    ingress_id,
                ));
            }
            if p.mode == PublishMode::Host
                && let Some(published) = p.published
                && let Some(local) = self.local.get(id).filter(|l| !l.is_empty())
            {
                let b = backends(local.values().map(|a| (*a, 1)).collect());
                found.push((
                    format!("{}:{published}/{}@host", s.name, p.protocol),
                    ServiceSpec {
                        id: 0,
                        name: String::new(),
                        frontends: vec![FrontendSpec {
                            address: None,
                            port: published,
                            protocol,
                        }],
                        table_size: table_size(b.len()),
                        backends: b,
                    },
                ));
            }
        }
        // Each VIP on this node's networks answers every port, TCP and UDP,
        // as Swarm's does (its IPVS service matches a firewall mark, not a
        // port): one frontend with port 0 (any port, either protocol), and
        // the backend gets the port the client asked for.
        if s.endpoint_mode == EndpointMode::Vip {
            for (net, vip) in s.vips.iter().filter(|(net, _)| networks.contains_key(*net)) {
                let b: Vec<BackendSpec> = on(net)
                    .into_iter()
                    .map(|(address, weight)| BackendSpec {
                        address,
                        port: 0,
                        weight,
                    })
                    .collect();
                found.push((
                    format!("{}@{vip}", s.name),
                    ServiceSpec {
                        id: 0,
                        name: String::new(),
                        frontends: vec![FrontendSpec {
                            address: Some(*vip),
                            port: 0,
                            protocol: Protocol::Tcp,
                        }],
                        table_size: table_size(b.len()),
                        backends: b,
                    },
                ));
            }
        }
        found
            .into_iter()
            .map(|(name, mut spec)| {
                spec.id = self.id_for(&name);
                spec.name = name;
                spec
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{
        PortConfig,
        session::Applied,
        tables::{EndpointEntry, Key, NetworkEntry, ServiceEntry, Value},
    };

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn node_addr(node: &str) -> Ipv4Addr {
        match node {
            "a" => ip("198.18.0.1"),
            "b" => ip("198.18.0.2"),
            _ => ip("198.18.0.3"),
        }
    }

    /// red and blue (tasks t1 on a; t2, t3 on b), ingress (every node),
    /// and service s with VIPs on red and ingress, published 8080 -> 80.
    fn table() -> Tables {
        let mut t = Tables::default();
        for (id, vni, subnet, ingress) in [
            ("red", 4097, "10.0.1.0/24", false),
            ("blue", 4098, "10.0.2.0/24", false),
            ("ingress", 4096, "10.255.0.0/24", true),
        ] {
            t.entries.insert(
                Key::Network { id: id.into() },
                Value::Network(NetworkEntry {
                    name: id.into(),
                    vni,
                    subnet: subnet.parse().unwrap(),
                    gateway: ip(&subnet.replace(".0/24", ".1")),
                    ingress,
                    internal: false,
                    encrypted: false,
                }),
            );
        }
        let ep = |net: &str, task: &str, node: &str, addr: &str| {
            let addr = ip(addr);
            (
                Key::Endpoint {
                    network: net.into(),
                    task: task.into(),
                },
                Value::Endpoint(EndpointEntry {
                    service: "s".into(),
                    task_name: format!("s.{task}"),
                    node: node.into(),
                    node_addr: node_addr(node),
                    addr,
                    mac: Mac::from_ipv4(addr).0,
                    netns: Some(format!("/run/netns/{task}")),
                    draining: false,
                }),
            )
        };
        t.entries.extend([
            ep("red", "t1", "a", "10.0.1.2"),
            ep("blue", "t1", "a", "10.0.2.2"),
            ep("ingress", "t1", "a", "10.255.0.2"),
            ep("red", "t2", "b", "10.0.1.3"),
            ep("ingress", "t2", "b", "10.255.0.3"),
            ep("blue", "t3", "b", "10.0.2.3"),
        ]);
        for (net, node, addr) in [
            ("ingress", "a", "10.255.0.10"),
            ("red", "a", "10.0.1.10"),
            ("blue", "a", "10.0.2.10"),
            ("ingress", "b", "10.255.0.11"),
            ("red", "b", "10.0.1.11"),
            ("blue", "b", "10.0.2.11"),
            ("ingress", "c", "10.255.0.12"),
        ] {
            let addr = ip(addr);
            t.entries.insert(
                Key::NodeEndpoint {
                    network: net.into(),
                    node: node.into(),
                },
                Value::NodeEndpoint(NodeEndpointEntry {
                    node_addr: node_addr(node),
                    addr,
                    mac: Mac::from_ipv4(addr).0,
                }),
            );
        }
        t.entries.insert(
            Key::Service { id: "s".into() },
            Value::Service(ServiceEntry {
                name: "web".into(),
                endpoint_mode: EndpointMode::Vip,
                vips: [
                    ("red".to_owned(), ip("10.0.1.100")),
                    ("ingress".to_owned(), ip("10.255.0.100")),
                ]
                .into(),
                ports: vec![PortConfig {
                    protocol: PortProtocol::Tcp,
                    target: 80,
                    published: Some(8080),
                    mode: PublishMode::Ingress,
                }],
                aliases: BTreeMap::new(),
            }),
        );
        t
    }

    #[test]
    fn a_node_gets_the_networks_it_has_an_address_on() {
        let t = table();
        let a = overlay_spec(&t, "a", node_addr("a"));
        assert_eq!(a.underlay, Some(node_addr("a")));
        let names: Vec<&str> = a.networks.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(names, ["blue", "ingress", "red"]);
        let red = a.networks.iter().find(|n| n.id == "red").unwrap();
        assert_eq!(red.host.map(|h| h.ip), Some(ip("10.0.1.10")));
        assert_eq!(red.vips, [ip("10.0.1.100")]);
        assert_eq!(red.local.len(), 1);
        // b's task and b's own address.
        let remote: Vec<(Ipv4Addr, Ipv4Addr)> = red.remote.iter().map(|r| (r.ip, r.node)).collect();
        assert_eq!(
            remote,
            [
                (ip("10.0.1.3"), node_addr("b")),
                (ip("10.0.1.11"), node_addr("b"))
            ]
        );
        // One task on three networks: three interfaces.
        let blue = a.networks.iter().find(|n| n.id == "blue").unwrap();
        assert_ne!(blue.local[0].interface, red.local[0].interface);
        // A node with no task is on ingress only: the routing mesh.
        let c = overlay_spec(&t, "c", node_addr("c"));
        assert_eq!(c.networks.len(), 1);
        let ingress = &c.networks[0];
        assert_eq!(ingress.id, "ingress");
        assert!(ingress.local.is_empty());
        assert_eq!(ingress.host.map(|h| h.ip), Some(ip("10.255.0.12")));
        assert_eq!(ingress.remote.len(), 4, "{:?}", ingress.remote);
        // A node with nothing at all gets no overlay.
        assert_eq!(
            overlay_spec(&t, "d", ip("198.18.0.4")),
            OverlaySpec::default()
        );
    }

    #[test]
    fn the_load_balancer_publishes_every_port_on_every_node_and_vips_where_the_node_is() {
        let t = table();
        for node in ["a", "c"] {
            let mut view = NodeView::new(node, node_addr(node));
            view.overlay(&t, Update::Whole);
            let spec = LbView::new()
                .whole(&t, view.networks(), vec![node_addr(node)])
                .unwrap();
            spec.validate().unwrap();
            assert_eq!(spec.nat_address, view.networks()["ingress"]);
            assert_eq!(spec.node_addresses, [node_addr(node)]);
            let published = spec
                .services
                .iter()
                .find(|s| s.frontends[0].address.is_none())
                .unwrap();
            assert_eq!(published.frontends[0].port, 8080);
            let backends: Vec<(Ipv4Addr, u16)> = published
                .backends
                .iter()
                .map(|b| (b.address, b.port))
                .collect();
            assert_eq!(backends, [(ip("10.255.0.2"), 80), (ip("10.255.0.3"), 80)]);
            let vips: Vec<Ipv4Addr> = spec
                .services
                .iter()
                .filter_map(|s| s.frontends[0].address)
                .collect();
            if node == "a" {
                // On red and ingress, so both VIPs, each to its network's tasks.
                assert_eq!(vips, [ip("10.255.0.100"), ip("10.0.1.100")]);
                let red = spec
                    .services
                    .iter()
                    .find(|s| s.frontends[0].address == Some(ip("10.0.1.100")))
                    .unwrap();
                let b: Vec<(Ipv4Addr, u16)> =
                    red.backends.iter().map(|b| (b.address, b.port)).collect();
                // Port 0: every port, to the port the client asked for.
                assert_eq!(b, [(ip("10.0.1.2"), 0), (ip("10.0.1.3"), 0)]);
                assert_eq!(red.frontends[0].port, 0);
            } else {
                assert_eq!(vips, [ip("10.255.0.100")]);
            }
        }
        // A node without an ingress address has nothing to NAT with.
        let view = NodeView::new("d", ip("198.18.0.4"));
        assert!(LbView::new().whole(&t, view.networks(), vec![]).is_none());
    }

    fn change(t: &mut Tables, key: Key, new: Option<Value>) -> [Applied; 1] {
        let old = match &new {
            Some(v) => t.entries.insert(key.clone(), v.clone()),
            None => t.entries.remove(&key),
        };
        [Applied { key, old, new }]
    }

    #[test]
    fn endpoint_changes_are_deltas_and_a_nodes_own_changes_a_whole_table() {
        let mut t = table();
        let mut view = NodeView::new("a", node_addr("a"));
        assert!(matches!(
            view.overlay(&t, Update::Whole),
            OverlayUpdate::Whole(_)
        ));
        // A remote task on red moves to a new address: remove + upsert.
        let key = Key::Endpoint {
            network: "red".into(),
            task: "t2".into(),
        };
        let Some(Value::Endpoint(mut e)) = t.entries.get(&key).cloned() else {
            panic!()
        };
        e.addr = ip("10.0.1.9");
        let c = change(&mut t, key, Some(Value::Endpoint(e)));
        match view.overlay(&t, Update::Delta(&c)) {
            OverlayUpdate::Changes(c) => {
                assert_eq!(c.len(), 2);
                assert!(
                    matches!(&c[0], Change::RemoveRemote { ip, .. } if ip.to_string() == "10.0.1.3")
                );
                assert!(
                    matches!(&c[1], Change::UpsertRemote { endpoint, .. } if endpoint.ip.to_string() == "10.0.1.9")
                );
            }
            other => panic!("expected changes, got {other:?}"),
        }
        // A service change that leaves the VIPs alone touches no overlay.
        let Some(Value::Service(mut svc)) =
            t.entries.get(&Key::Service { id: "s".into() }).cloned()
        else {
            panic!()
        };
        svc.aliases.insert("red".into(), vec!["www".into()]);
        let c = change(
            &mut t,
            Key::Service { id: "s".into() },
            Some(Value::Service(svc.clone())),
        );
        assert_eq!(
            view.overlay(&t, Update::Delta(&c)),
            OverlayUpdate::Unchanged
        );
        // A new VIP on red does (its neighbour entry).
        svc.vips.insert("red".into(), ip("10.0.1.101"));
        let c = change(
            &mut t,
            Key::Service { id: "s".into() },
            Some(Value::Service(svc)),
        );
        assert!(matches!(
            view.overlay(&t, Update::Delta(&c)),
            OverlayUpdate::Whole(_)
        ));
        // Another node's own address on red: a remote entry.
        let addr = ip("10.0.1.12");
        let c = change(
            &mut t,
            Key::NodeEndpoint {
                network: "red".into(),
                node: "c".into(),
            },
            Some(Value::NodeEndpoint(NodeEndpointEntry {
                node_addr: node_addr("c"),
                addr,
                mac: Mac::from_ipv4(addr).0,
            })),
        );
        match view.overlay(&t, Update::Delta(&c)) {
            OverlayUpdate::Changes(c) => assert!(
                matches!(&c[..], [Change::UpsertRemote { endpoint, .. }] if endpoint.ip == addr && endpoint.node == node_addr("c")),
                "{c:?}"
            ),
            other => panic!("expected a remote change, got {other:?}"),
        }
        // A second local task on red: a local delta, on its own interface.
        let Some(Value::Endpoint(mut e9)) = t
            .entries
            .get(&Key::Endpoint {
                network: "red".into(),
                task: "t1".into(),
            })
            .cloned()
        else {
            panic!()
        };
        e9.addr = ip("10.0.1.20");
        e9.netns = Some("/run/netns/t9".into());
        let key = Key::Endpoint {
            network: "red".into(),
            task: "t9".into(),
        };
        let c = change(&mut t, key, Some(Value::Endpoint(e9)));
        match view.overlay(&t, Update::Delta(&c)) {
            OverlayUpdate::Changes(c) => assert!(
                matches!(&c[..], [Change::UpsertLocal { endpoint, .. }] if endpoint.interface == "eth0"),
                "{c:?}"
            ),
            other => panic!("expected a local change, got {other:?}"),
        }
        // The last local task leaving blue: the node keeps its address
        // there, so only the endpoint goes.
        let key = Key::Endpoint {
            network: "blue".into(),
            task: "t1".into(),
        };
        let c = change(&mut t, key, None);
        match view.overlay(&t, Update::Delta(&c)) {
            OverlayUpdate::Changes(c) => {
                assert!(
                    matches!(&c[..], [Change::RemoveLocal { id, .. }] if id == "t1"),
                    "{c:?}"
                )
            }
            other => panic!("expected a local removal, got {other:?}"),
        }
        // This node's own address on a network going: a whole table.
        let c = change(
            &mut t,
            Key::NodeEndpoint {
                network: "blue".into(),
                node: "a".into(),
            },
            None,
        );
        match view.overlay(&t, Update::Delta(&c)) {
            OverlayUpdate::Whole(spec) => assert_eq!(spec.networks.len(), 2),
            other => panic!("expected a whole table, got {other:?}"),
        }
        assert!(!view.networks().contains_key("blue"));
    }

    /// The maps' meaning, independent of ids: each frontend's service,
    /// size and Maglev table as backend addresses; and every backend.
    type Logical = (
        BTreeMap<dataplane_common::FrontendKey, (u32, u32, Vec<Option<[u32; 4]>>)>,
        BTreeSet<[u32; 4]>,
    );

    fn logical(m: &crate::lb::MemoryMaps) -> Logical {
        let fronts = m
            .frontends
            .iter()
            .map(|(k, f)| {
                let table = m.tables[&f.id]
                    .iter()
                    .map(|id| m.backends.get(id).map(|b| b.addr_be))
                    .collect();
                (*k, (f.service_id, f.backend_count, table))
            })
            .collect();
        (fronts, m.backends.values().map(|b| b.addr_be).collect())
    }

    #[test]
    fn the_load_balancer_follows_deltas_as_a_whole_rebuild_would() {
        use crate::lb::{LbSync, MemoryMaps};
        let mut t = table();
        let mut view = NodeView::new("a", node_addr("a"));
        view.overlay(&t, Update::Whole);
        let networks = view.networks().clone();
        let mut lbv = LbView::new();
        let whole = lbv.whole(&t, &networks, vec![node_addr("a")]).unwrap();
        let (mut sync, mut maps) = (LbSync::new(), MemoryMaps::default());
        sync.apply(&whole, &mut maps).unwrap();
        let mut steps: Vec<(Key, Option<Value>)> = Vec::new();
        // A task moves; a new task on red and ingress; one goes away.
        let Some(Value::Endpoint(mut moved)) = t
            .entries
            .get(&Key::Endpoint {
                network: "red".into(),
                task: "t2".into(),
            })
            .cloned()
        else {
            panic!()
        };
        moved.addr = ip("10.0.1.9");
        steps.push((
            Key::Endpoint {
                network: "red".into(),
                task: "t2".into(),
            },
            Some(Value::Endpoint(moved.clone())),
        ));
        for (net, addr) in [("red", "10.0.1.30"), ("ingress", "10.255.0.30")] {
            let mut e = moved.clone();
            e.addr = ip(addr);
            e.task_name = "web.4".into();
            steps.push((
                Key::Endpoint {
                    network: net.into(),
                    task: "t4".into(),
                },
                Some(Value::Endpoint(e)),
            ));
        }
        steps.push((
            Key::Endpoint {
                network: "ingress".into(),
                task: "t1".into(),
            },
            None,
        ));
        // The service publishes a second port, then a new VIP; then it goes.
        let Some(Value::Service(mut svc)) =
            t.entries.get(&Key::Service { id: "s".into() }).cloned()
        else {
            panic!()
        };
        svc.ports.push(PortConfig {
            protocol: PortProtocol::Udp,
            target: 53,
            published: Some(5353),
            mode: PublishMode::Ingress,
        });
        steps.push((
            Key::Service { id: "s".into() },
            Some(Value::Service(svc.clone())),
        ));
        svc.vips.insert("red".into(), ip("10.0.1.101"));
        steps.push((Key::Service { id: "s".into() }, Some(Value::Service(svc))));
        steps.push((Key::Service { id: "s".into() }, None));
        for (i, (key, new)) in steps.into_iter().enumerate() {
            let c = change(&mut t, key, new);
            let changes = lbv.delta(&t, &c, &networks);
            let mut globals = whole.clone();
            globals.services.clear();
            sync.apply_changes(&globals, &changes, &mut maps)
                .unwrap_or_else(|e| panic!("step {i}: {e}"));
            let rebuilt = LbView::new()
                .whole(&t, &networks, vec![node_addr("a")])
                .unwrap();
            let (mut fresh_sync, mut fresh) = (LbSync::new(), MemoryMaps::default());
            fresh_sync.apply(&rebuilt, &mut fresh).unwrap();
            assert_eq!(logical(&maps), logical(&fresh), "step {i}: {changes:?}");
            // And the same state again writes nothing.
            assert_eq!(
                sync.apply(&rebuilt, &mut maps).unwrap().total(),
                0,
                "step {i}"
            );
        }
        assert!(maps.frontends.is_empty() && maps.backends.is_empty());
    }

    #[test]
    fn an_incremental_change_that_takes_anothers_frontend_changes_nothing() {
        use crate::lb::{LbChanges, LbSync, MemoryMaps};
        let t = table();
        let mut view = NodeView::new("a", node_addr("a"));
        view.overlay(&t, Update::Whole);
        let whole = LbView::new()
            .whole(&t, view.networks(), vec![node_addr("a")])
            .unwrap();
        let (mut sync, mut maps) = (LbSync::new(), MemoryMaps::default());
        sync.apply(&whole, &mut maps).unwrap();
        let mut thief = whole.services[0].clone();
        thief.id += 1;
        thief.name = "thief".into();
        let before = logical(&maps);
        let mut globals = whole.clone();
        globals.services.clear();
        let changes = LbChanges {
            upsert: vec![thief],
            remove: vec![],
        };
        let err = sync
            .apply_changes(&globals, &changes, &mut maps)
            .unwrap_err();
        assert!(err.to_string().contains("claimed by both"), "{err}");
        assert_eq!(logical(&maps), before);
    }
}
