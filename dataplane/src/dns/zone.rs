//! [`Zone`]: every network's records, kept up to date from each delta (a
//! change costs the services it touches), and the lookup that answers a
//! query from them.

use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    str::FromStr,
    sync::{Arc, RwLock},
};

use hickory_proto::rr::RecordType;
use model::{
    EndpointMode, Subnet,
    session::Applied,
    tables::{Key, Tables, Value},
};
use smallvec::SmallVec;

use super::{TASK_TTL, VIP_TTL};
use crate::compact::{Interner, SortedVec, Text};

/// A name's addresses: most names (a task's) have one, kept inline (four
/// fit in the room the vector's heap pointer takes anyway).
type Addrs = SmallVec<[Ipv4Addr; 4]>;
/// An address's names: most have one, kept inline.
type Names = SmallVec<[Text; 1]>;
/// A service's endpoints (network, task): most have one, kept inline.
type Members = SortedVec<[(Text, Box<str>); 1]>;

/// What a record's address answers besides A.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A only (`tasks.svc`, an alias).
    Name,
    /// A, and PTR back to the name (a task's name).
    Pointer,
    /// A and PTR, and the address is a VIP (its TTL).
    Vip,
}

/// One record a service puts in the zone: `name` is `addr` on `network`.
#[derive(Debug)]
struct Record {
    network: Text,
    name: Text,
    addr: Ipv4Addr,
    kind: Kind,
}

/// What the zone keeps per service: its endpoints, and the records it put
/// in (so that a change can take them out again).
#[derive(Debug, Default)]
struct ServiceZone {
    members: Members,
    records: Box<[Record]>,
}

/// The records of every network, kept up to date from each delta: a change
/// costs the services it touches, never the size of the zone.
#[derive(Debug, Default)]
pub struct Zone {
    /// network -> name -> addresses (a multiset: contributions overlap).
    pub(super) names: HashMap<Text, HashMap<Text, Addrs>>,
    /// network -> address -> names (the first one answers PTR).
    pub(super) reverse: HashMap<Text, HashMap<Ipv4Addr, Names>>,
    subnets: HashMap<String, Subnet>,
    /// VIPs (counted), for the TTL.
    vips: HashMap<Ipv4Addr, usize>,
    /// service id -> its endpoints and records.
    services: HashMap<Box<str>, ServiceZone>,
    /// The one copy of each network id (few: kept until the network goes).
    networks: Interner,
}

/// What a query gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Addresses for an A query (in zone order; shuffled when sent).
    Addresses(Vec<Ipv4Addr>, u32),
    Pointer(String),
    /// The name exists, but has no record of that type (e.g. AAAA).
    NoData,
    NxDomain,
    /// Not ours: ask the upstream resolvers.
    Forward,
}

fn remove_one<A: smallvec::Array>(v: &mut SmallVec<A>, x: &A::Item)
where
    A::Item: PartialEq,
{
    if let Some(i) = v.iter().position(|y| y == x) {
        v.swap_remove(i);
    }
}

impl Zone {
    /// The whole zone of `tables`.
    pub fn from_tables(tables: &Tables) -> Zone {
        let mut z = Zone {
            subnets: tables
                .networks()
                .map(|(id, n)| (id.to_owned(), n.subnet))
                .collect(),
            ..Zone::default()
        };
        for (network, task, e) in tables.endpoints() {
            let network = z.networks.get(network);
            z.services
                .entry(e.service.as_str().into())
                .or_default()
                .members
                .insert((network, task.into()));
        }
        let services: Vec<String> = tables.services().map(|(id, _)| id.to_owned()).collect();
        for id in services {
            z.refresh(tables, &id);
        }
        z
    }

    /// Brings the zone to `tables` after `changes` (entries before and
    /// after) produced them.
    pub fn apply(&mut self, tables: &Tables, changes: &[Applied]) {
        let mut affected = BTreeSet::new();
        for c in changes {
            match &c.key {
                Key::Network { id } => {
                    match &c.new {
                        Some(Value::Network(n)) => {
                            self.subnets.insert(id.clone(), n.subnet);
                        }
                        _ => {
                            self.subnets.remove(id);
                            self.networks.forget(id);
                        }
                    }
                    // Whether the network carries names may have changed
                    // (ingress carries none): its services are redone. A
                    // network comes and goes rarely; this costs them all.
                    for (svc, z) in &self.services {
                        if z.members.iter().any(|(n, _)| **n == **id) {
                            affected.insert(svc.to_string());
                        }
                    }
                    for (svc, s) in tables.services() {
                        if s.vips.contains_key(id) {
                            affected.insert(svc.to_owned());
                        }
                    }
                }
                Key::Service { id } => {
                    affected.insert(id.clone());
                }
                Key::Endpoint { network, task } => {
                    let member = (self.networks.get(network), Box::<str>::from(task.as_str()));
                    if let Some(Value::Endpoint(old)) = &c.old {
                        if let Some(z) = self.services.get_mut(old.service.as_str()) {
                            z.members.remove(&member);
                        }
                        affected.insert(old.service.clone());
                    }
                    if let Some(Value::Endpoint(new)) = &c.new {
                        self.services
                            .entry(new.service.as_str().into())
                            .or_default()
                            .members
                            .insert(member);
                        affected.insert(new.service.clone());
                    }
                }
                // Nodes' own addresses have no names.
                Key::NodeEndpoint { .. } | Key::NetworkKeys => {}
            }
        }
        for id in affected {
            self.refresh(tables, &id);
        }
    }

    /// Replaces what service `id` contributes with what `tables` says now.
    fn refresh(&mut self, tables: &Tables, id: &str) {
        let old = match self.services.get_mut(id) {
            Some(z) => std::mem::take(&mut z.records),
            None => Box::default(),
        };
        for r in &old {
            if let Some(m) = self.names.get_mut(&r.network)
                && let Some(v) = m.get_mut(&r.name)
            {
                remove_one(v, &r.addr);
                if v.is_empty() {
                    m.remove(&r.name);
                }
            }
            if r.kind != Kind::Name
                && let Some(m) = self.reverse.get_mut(&r.network)
                && let Some(v) = m.get_mut(&r.addr)
            {
                remove_one(v, &r.name);
                if v.is_empty() {
                    m.remove(&r.addr);
                }
            }
            if r.kind == Kind::Vip
                && let Some(n) = self.vips.get_mut(&r.addr)
            {
                *n -= 1;
                if *n == 0 {
                    self.vips.remove(&r.addr);
                }
            }
        }
        let Some(Value::Service(svc)) = tables.entries.get(&Key::Service { id: id.to_owned() })
        else {
            if self.services.get(id).is_some_and(|z| z.members.is_empty()) {
                self.services.remove(id);
            }
            return;
        };
        let mut records = Vec::new();
        // Each name once, however many endpoints and networks carry it.
        let svc_name: Text = svc.name.as_str().into();
        let tasks_name: Text = format!("tasks.{}", svc.name).into();
        let aliases_on = |net: &str| {
            svc.aliases
                .get(net)
                .into_iter()
                .flatten()
                .map(|a| Text::from(a.as_str()))
                .collect::<Vec<_>>()
        };
        // Swarm's ingress network carries the routing mesh, not names.
        let named = |net: &str| {
            !matches!(
                tables.entries.get(&Key::Network { id: net.to_owned() }),
                Some(Value::Network(n)) if n.ingress
            )
        };
        let record = |network: &Text, name: Text, addr, kind| Record {
            network: network.clone(),
            name,
            addr,
            kind,
        };
        let members = self.services.get(id).map(|z| &z.members);
        for (net, task) in members.into_iter().flatten() {
            if !named(net) {
                continue;
            }
            let key = Key::Endpoint {
                network: net.to_string(),
                task: task.to_string(),
            };
            let Some(Value::Endpoint(e)) = tables.entries.get(&key) else {
                continue;
            };
            // A stopping task serves its open flows, and no new names.
            if e.draining {
                continue;
            }
            records.push(record(net, tasks_name.clone(), e.addr, Kind::Name));
            records.push(record(
                net,
                e.task_name.as_str().into(),
                e.addr,
                Kind::Pointer,
            ));
            if svc.endpoint_mode == EndpointMode::Dnsrr {
                records.push(record(net, svc_name.clone(), e.addr, Kind::Name));
                for a in aliases_on(net) {
                    records.push(record(net, a, e.addr, Kind::Name));
                }
            }
        }
        let vips: Vec<(&String, Ipv4Addr)> = svc
            .vips
            .iter()
            .filter(|(net, _)| named(net))
            .map(|(net, vip)| (net, *vip))
            .collect();
        for (net, vip) in vips {
            let net = self.networks.get(net);
            records.push(record(&net, svc_name.clone(), vip, Kind::Vip));
            for a in aliases_on(&net) {
                records.push(record(&net, a, vip, Kind::Name));
            }
        }
        for r in &records {
            self.names
                .entry(r.network.clone())
                .or_default()
                .entry(r.name.clone())
                .or_default()
                .push(r.addr);
            if r.kind != Kind::Name {
                self.reverse
                    .entry(r.network.clone())
                    .or_default()
                    .entry(r.addr)
                    .or_default()
                    .push(r.name.clone());
            }
            if r.kind == Kind::Vip {
                *self.vips.entry(r.addr).or_default() += 1;
            }
        }
        // Kept until the service's next refresh: no room to spare.
        self.services.entry(id.into()).or_default().records = records.into_boxed_slice();
    }

    /// The answer for `name` (lowercase, no trailing dot) of type `qtype`,
    /// seen from a task on the networks `scope`.
    pub fn lookup(&self, scope: &[String], name: &str, qtype: RecordType) -> Answer {
        if qtype == RecordType::PTR {
            let Some(ip) = arpa_v4(name) else {
                return Answer::Forward;
            };
            let found = scope
                .iter()
                .filter_map(|n| self.reverse.get(n.as_str())?.get(&ip)?.iter().min())
                .min();
            if let Some(n) = found {
                return Answer::Pointer(n.to_string());
            }
            let ours = scope
                .iter()
                .filter_map(|n| self.subnets.get(n))
                .any(|s| s.contains(ip));
            return if ours {
                Answer::NxDomain
            } else {
                Answer::Forward
            };
        }
        let mut found = false;
        let mut addrs = Vec::new();
        for net in scope {
            if let Some(a) = self.names.get(net.as_str()).and_then(|m| m.get(name)) {
                found = true;
                addrs.extend(a);
            }
        }
        if found {
            addrs.sort();
            addrs.dedup();
            if qtype != RecordType::A && qtype != RecordType::ANY {
                return Answer::NoData;
            }
            let ttl = if addrs.iter().all(|a| self.vips.contains_key(a)) {
                VIP_TTL
            } else {
                TASK_TTL
            };
            return Answer::Addresses(addrs, ttl);
        }
        if !name.contains('.') || name.starts_with("tasks.") {
            Answer::NxDomain
        } else {
            Answer::Forward
        }
    }
}

/// `d.c.b.a.in-addr.arpa` -> a.b.c.d
pub(super) fn arpa_v4(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let mut octets: Vec<u8> = rest
        .split('.')
        .map(u8::from_str)
        .collect::<Result<_, _>>()
        .ok()?;
    if octets.len() != 4 {
        return None;
    }
    octets.reverse();
    Some(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
}

/// The zone every task server reads; a revision's changes go in under one
/// write lock, so a query sees the zone before or after it, never between.
pub type SharedZone = Arc<RwLock<Zone>>;
