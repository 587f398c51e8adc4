//! [`LbView`]: this node's load balancer from the tables, whole or
//! service by service.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use smallvec::SmallVec;

use model::{
    EndpointMode, Protocol as PortProtocol, PublishMode,
    session::Update,
    tables::{EndpointEntry, Key, ServiceEntry, Tables, Value},
};

use crate::compact::{Interner, SortedVec, Text};
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

/// A service's task address on a network, and whether it is draining
/// (kept for open flows, weight 0 for new ones). Ordered by network, then
/// address: a network's members are a contiguous, sorted run.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Member {
    network: Text,
    addr: Ipv4Addr,
    draining: bool,
}

/// One load-balancer service a service contributes: its name, its id in
/// the counters and its frontend (what a change must take away). What it
/// balances to is not kept: the sync below holds what it installed and
/// skips a frontend that did not change.
#[derive(Debug)]
struct Contributed {
    name: Box<str>,
    id: u32,
    frontend: FrontendSpec,
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
    /// Service id -> its task addresses on each network (most services
    /// have one or two: inline, no allocation).
    members: HashMap<Box<str>, SortedVec<[Member; 1]>>,
    /// Service id -> its live tasks' addresses on this node (one per task:
    /// the first network's).
    local: HashMap<String, BTreeMap<String, Ipv4Addr>>,
    /// Service id -> the load-balancer services it contributes.
    contributed: HashMap<Box<str>, SmallVec<[Contributed; 1]>>,
    /// The counter ids the contributions hold.
    taken: HashSet<u32>,
    /// The one copy of each network id the members name.
    networks: Interner,
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
        let network = self.networks.get(network);
        let m = self.members.entry(e.service.as_str().into()).or_default();
        // One entry per address: a second endpoint there replaces it.
        m.remove_by(|x| (&*x.network, x.addr).cmp(&(&*network, e.addr)));
        m.insert(Member {
            network,
            addr: e.addr,
            draining: e.draining,
        });
        if e.node == self.node && !e.draining {
            self.local
                .entry(e.service.clone())
                .or_default()
                .entry(e.task_name.clone())
                .or_insert(e.addr);
        }
    }

    fn remove_member(&mut self, network: &str, e: &EndpointEntry) {
        if let Some(m) = self.members.get_mut(e.service.as_str()) {
            m.remove_by(|x| (&*x.network, x.addr).cmp(&(network, e.addr)));
            if m.is_empty() {
                self.members.remove(e.service.as_str());
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
        // The globals only: the services' room goes too (at 10,000
        // services, a megabyte kept for nothing).
        spec.services = Vec::new();
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
            let specs = self.service_specs(id, s, ingress_id, networks, &[]);
            self.keep(id, &specs);
            services.extend(specs);
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
            let old = self.contributed.remove(id.as_str()).unwrap_or_default();
            let new = match tables.entries.get(&Key::Service { id: id.clone() }) {
                Some(Value::Service(s)) => self.service_specs(&id, s, ingress_id, networks, &old),
                _ => Vec::new(),
            };
            for o in &old {
                if !new.iter().any(|n| n.frontends[..] == [o.frontend.clone()]) {
                    out.remove.push(o.frontend.clone());
                }
                if !new.iter().any(|n| *n.name == *o.name) {
                    self.taken.remove(&o.id);
                }
            }
            self.keep(&id, &new);
            // All of them: the sync skips a frontend whose table is as
            // installed.
            out.upsert.extend(new);
        }
        out
    }

    /// Records what service `id` contributes now.
    fn keep(&mut self, id: &str, specs: &[ServiceSpec]) {
        if specs.is_empty() {
            return;
        }
        let kept = specs
            .iter()
            .flat_map(|s| {
                s.frontends.iter().map(|f| Contributed {
                    name: s.name.as_str().into(),
                    id: s.id,
                    frontend: f.clone(),
                })
            })
            .collect();
        self.contributed.insert(id.into(), kept);
    }

    /// A stable id for a load-balancer service in the counters: the one it
    /// had (in `old`), else a hash of its name, probed past ids taken.
    fn id_for(&mut self, name: &str, old: &[Contributed]) -> u32 {
        if let Some(o) = old.iter().find(|o| *o.name == *name) {
            return o.id;
        }
        let mut h: u32 = 0x811c_9dc5;
        for b in name.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        while !self.taken.insert(h) {
            h = h.wrapping_add(1);
        }
        h
    }

    /// What service `id` contributes: one load-balancer service per
    /// published port, and one per VIP and target port on this node's
    /// networks. Each keeps its counter id from `old` (what the service
    /// contributed before).
    fn service_specs(
        &mut self,
        id: &str,
        s: &ServiceEntry,
        ingress_id: &str,
        networks: &BTreeMap<String, Ipv4Addr>,
        old: &[Contributed],
    ) -> Vec<ServiceSpec> {
        let members = self.members.get(id);
        // (address, weight): a draining task keeps its open flows and gets
        // no new ones.
        let on = |net: &str| -> Vec<(Ipv4Addr, u32)> {
            members
                .into_iter()
                .flatten()
                .filter(|m| *m.network == *net)
                .map(|m| (m.addr, u32::from(!m.draining)))
                .collect()
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
                spec.id = self.id_for(&name, old);
                spec.name = name;
                spec
            })
            .collect()
    }
}
