//! [`LbView`]: this node's load balancer from the tables, whole or
//! service by service.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use model::{
    EndpointMode, Protocol as PortProtocol, PublishMode,
    session::Update,
    tables::{EndpointEntry, Key, ServiceEntry, Tables, Value},
};

use crate::lb::{
    ApplyReport, BackendSpec, FrontendSpec, LbChanges, LbSpec, LbTarget, Protocol, ServiceSpec,
    SyncError,
};

use super::endpoint;

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
