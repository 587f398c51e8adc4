//! [`Zone`]: every network's records, kept up to date from each delta (a
//! change costs the services it touches), and the lookup that answers a
//! query from them.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
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

/// A network id or a name, held once and shared by the maps and the
/// contributions that name it (at 100,000 endpoints, copies add up).
type Text = Arc<str>;

/// A name's addresses: most names (a task's) have one, kept inline.
type Addrs = SmallVec<[Ipv4Addr; 2]>;
/// An address's names: most have one, kept inline.
type Names = SmallVec<[Text; 1]>;

/// What one service puts in the zone (so that it can be taken out again).
#[derive(Debug, Default, Clone)]
struct Contribution {
    /// (network, name, address)
    names: Vec<(Text, Text, Ipv4Addr)>,
    /// (network, address, name)
    reverse: Vec<(Text, Ipv4Addr, Text)>,
    vips: Vec<Ipv4Addr>,
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
    /// service id -> its endpoints (network, task).
    members: HashMap<String, BTreeSet<(Text, String)>>,
    contributions: HashMap<String, Contribution>,
    /// The one copy of each network id (few: kept until the network goes).
    networks: HashSet<Text>,
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
    /// Network `id`, as the one copy the zone shares.
    fn network(&mut self, id: &str) -> Text {
        if let Some(t) = self.networks.get(id) {
            return t.clone();
        }
        let t: Text = id.into();
        self.networks.insert(t.clone());
        t
    }

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
            let network = z.network(network);
            z.members
                .entry(e.service.clone())
                .or_default()
                .insert((network, task.to_owned()));
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
                            self.networks.remove(id.as_str());
                        }
                    }
                    // Whether the network carries names may have changed
                    // (ingress carries none): its services are redone. A
                    // network comes and goes rarely; this costs them all.
                    for (svc, m) in &self.members {
                        if m.iter().any(|(n, _)| **n == **id) {
                            affected.insert(svc.clone());
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
                    let member = (self.network(network), task.clone());
                    if let Some(Value::Endpoint(old)) = &c.old {
                        if let Some(m) = self.members.get_mut(&old.service) {
                            m.remove(&member);
                        }
                        affected.insert(old.service.clone());
                    }
                    if let Some(Value::Endpoint(new)) = &c.new {
                        self.members
                            .entry(new.service.clone())
                            .or_default()
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
        if let Some(old) = self.contributions.remove(id) {
            for (net, name, ip) in &old.names {
                if let Some(m) = self.names.get_mut(net)
                    && let Some(v) = m.get_mut(name)
                {
                    remove_one(v, ip);
                    if v.is_empty() {
                        m.remove(name);
                    }
                }
            }
            for (net, ip, name) in &old.reverse {
                if let Some(m) = self.reverse.get_mut(net)
                    && let Some(v) = m.get_mut(ip)
                {
                    remove_one(v, name);
                    if v.is_empty() {
                        m.remove(ip);
                    }
                }
            }
            for vip in &old.vips {
                if let Some(n) = self.vips.get_mut(vip) {
                    *n -= 1;
                    if *n == 0 {
                        self.vips.remove(vip);
                    }
                }
            }
        }
        let Some(Value::Service(svc)) = tables.entries.get(&Key::Service { id: id.to_owned() })
        else {
            if self.members.get(id).is_some_and(BTreeSet::is_empty) {
                self.members.remove(id);
            }
            return;
        };
        let mut c = Contribution::default();
        // Each name once, however many endpoints and networks carry it.
        let svc_name: Text = svc.name.as_str().into();
        let tasks_name: Text = format!("tasks.{}", svc.name).into();
        let names_on = |net: &str| {
            std::iter::once(svc_name.clone())
                .chain(
                    svc.aliases
                        .get(net)
                        .into_iter()
                        .flatten()
                        .map(|a| Text::from(a.as_str())),
                )
                .collect::<Vec<_>>()
        };
        // Swarm's ingress network carries the routing mesh, not names.
        let named = |net: &str| {
            !matches!(
                tables.entries.get(&Key::Network { id: net.to_owned() }),
                Some(Value::Network(n)) if n.ingress
            )
        };
        for (net, task) in self.members.get(id).into_iter().flatten() {
            if !named(net) {
                continue;
            }
            let key = Key::Endpoint {
                network: net.to_string(),
                task: task.clone(),
            };
            let Some(Value::Endpoint(e)) = tables.entries.get(&key) else {
                continue;
            };
            // A stopping task serves its open flows, and no new names.
            if e.draining {
                continue;
            }
            let task_name: Text = e.task_name.as_str().into();
            c.names.push((net.clone(), tasks_name.clone(), e.addr));
            c.names.push((net.clone(), task_name.clone(), e.addr));
            c.reverse.push((net.clone(), e.addr, task_name));
            if svc.endpoint_mode == EndpointMode::Dnsrr {
                for n in names_on(net) {
                    c.names.push((net.clone(), n, e.addr));
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
            let net = self.network(net);
            for n in names_on(&net) {
                c.names.push((net.clone(), n, vip));
            }
            c.reverse.push((net, vip, svc_name.clone()));
            c.vips.push(vip);
        }
        for (net, name, ip) in &c.names {
            self.names
                .entry(net.clone())
                .or_default()
                .entry(name.clone())
                .or_default()
                .push(*ip);
        }
        for (net, ip, name) in &c.reverse {
            self.reverse
                .entry(net.clone())
                .or_default()
                .entry(*ip)
                .or_default()
                .push(name.clone());
        }
        for vip in &c.vips {
            *self.vips.entry(*vip).or_default() += 1;
        }
        // Kept until the service's next refresh: no room to spare.
        c.names.shrink_to_fit();
        c.reverse.shrink_to_fit();
        self.contributions.insert(id.to_owned(), c);
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
