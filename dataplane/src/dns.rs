//! Embedded DNS: a hickory-server in every local task's namespace at
//! 127.0.0.11:53, UDP and TCP, served from meshd.
//!
//! The sockets are opened inside the task's namespace (so only that task
//! reaches them) and served on meshd's runtime. Each task's server answers
//! from the records of the networks that task is attached to:
//! - `svc` and its aliases: the service's VIP there, or its task IPs in
//!   dnsrr mode; `tasks.svc`: the task IPs; `svc.slot`: that task;
//! - PTR for those addresses;
//! - several addresses come back shuffled;
//! - a name that looks like a cluster name (one label, or `tasks.*`) and
//!   is unknown: NXDOMAIN; any other name is forwarded to the upstream
//!   resolvers.
//!
//! The records are swapped in one step when the agent applies a revision,
//! before it acks: once a node has acked the revision that withdrew an
//! address, no query on that node is answered with it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    sync::{Arc, RwLock},
    time::Duration,
};

use hickory_proto::{
    op::{Message, Metadata, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A, rdata::PTR},
};
use hickory_server::{
    Server,
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use model::{
    EndpointMode, Subnet,
    session::{Applied, Update},
    tables::{Key, Tables, Value},
};

use crate::netlink::in_netns;

/// Where the embedded DNS answers inside a task's namespace.
pub const DNS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);
/// TTL of a VIP (stable for the service's life) and of task addresses
/// (which change with every reschedule).
const VIP_TTL: u32 = 600;
const TASK_TTL: u32 = 0;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// What one service puts in the zone (so that it can be taken out again).
#[derive(Debug, Default, Clone)]
struct Contribution {
    /// (network, name, address)
    names: Vec<(String, String, Ipv4Addr)>,
    /// (network, address, name)
    reverse: Vec<(String, Ipv4Addr, String)>,
    vips: Vec<Ipv4Addr>,
}

/// The records of every network, kept up to date from each delta: a change
/// costs the services it touches, never the size of the zone.
#[derive(Debug, Default)]
pub struct Zone {
    /// network -> name -> addresses (a multiset: contributions overlap).
    names: HashMap<String, HashMap<String, Vec<Ipv4Addr>>>,
    /// network -> address -> names (the first one answers PTR).
    reverse: HashMap<String, HashMap<Ipv4Addr, Vec<String>>>,
    subnets: HashMap<String, Subnet>,
    /// VIPs (counted), for the TTL.
    vips: HashMap<Ipv4Addr, usize>,
    /// service id -> its endpoints (network, task).
    members: HashMap<String, BTreeSet<(String, String)>>,
    contributions: HashMap<String, Contribution>,
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

fn remove_one<T: PartialEq>(v: &mut Vec<T>, x: &T) {
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
            z.members
                .entry(e.service.clone())
                .or_default()
                .insert((network.to_owned(), task.to_owned()));
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
                        }
                    }
                    // Whether the network carries names may have changed
                    // (ingress carries none): its services are redone. A
                    // network comes and goes rarely; this costs them all.
                    for (svc, m) in &self.members {
                        if m.iter().any(|(n, _)| n == id) {
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
                    let member = (network.clone(), task.clone());
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
        let names_on = |net: &str| {
            std::iter::once(svc.name.clone())
                .chain(svc.aliases.get(net).into_iter().flatten().cloned())
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
                network: net.clone(),
                task: task.clone(),
            };
            let Some(Value::Endpoint(e)) = tables.entries.get(&key) else {
                continue;
            };
            // A stopping task serves its open flows, and no new names.
            if e.draining {
                continue;
            }
            c.names
                .push((net.clone(), format!("tasks.{}", svc.name), e.addr));
            c.names.push((net.clone(), e.task_name.clone(), e.addr));
            c.reverse.push((net.clone(), e.addr, e.task_name.clone()));
            if svc.endpoint_mode == EndpointMode::Dnsrr {
                for n in names_on(net) {
                    c.names.push((net.clone(), n, e.addr));
                }
            }
        }
        for (net, vip) in svc.vips.iter().filter(|(net, _)| named(net)) {
            for n in names_on(net) {
                c.names.push((net.clone(), n, *vip));
            }
            c.reverse.push((net.clone(), *vip, svc.name.clone()));
            c.vips.push(*vip);
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
                .filter_map(|n| self.reverse.get(n)?.get(&ip)?.iter().min())
                .min();
            if let Some(n) = found {
                return Answer::Pointer(n.clone());
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
            if let Some(a) = self.names.get(net).and_then(|m| m.get(name)) {
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
fn arpa_v4(name: &str) -> Option<Ipv4Addr> {
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

/// Answers one task's queries.
struct Handler {
    zone: SharedZone,
    /// The networks of the task (updated when its attachments change).
    scope: Arc<RwLock<Vec<String>>>,
    upstream: Arc<Vec<SocketAddr>>,
    /// The shuffle's state, per server.
    rng: std::sync::atomic::AtomicU64,
}

/// A local task's namespace and networks in `tables` (None: not a local,
/// running task). Costs the number of networks, not endpoints.
fn task_networks(tables: &Tables, node: &str, task: &str) -> Option<(PathBuf, Vec<String>)> {
    let mut out: Option<(PathBuf, Vec<String>)> = None;
    for (network, _) in tables.networks() {
        let key = Key::Endpoint {
            network: network.to_owned(),
            task: task.to_owned(),
        };
        if let Some(Value::Endpoint(e)) = tables.entries.get(&key)
            && e.node == node
            && let Some(netns) = &e.netns
        {
            out.get_or_insert_with(|| (PathBuf::from(netns), Vec::new()))
                .1
                .push(network.to_owned());
        }
    }
    out
}

/// The shuffle's first state.
const RNG_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A small xorshift over `state`: shuffling answers needs no cryptographic
/// randomness.
fn shuffle<T>(v: &mut [T], state: &std::sync::atomic::AtomicU64) {
    use std::sync::atomic::Ordering;
    for i in (1..v.len()).rev() {
        let mut x = state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.store(x, Ordering::Relaxed);
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// Sends the query as it came to each upstream in turn, until one answers.
async fn forward(upstream: &[SocketAddr], query: &[u8]) -> Option<Message> {
    for server in upstream {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.send_to(query, server).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv_from(&mut buf)).await
            && let Ok(m) = Message::from_vec(&buf[..n])
        {
            return Some(m);
        }
    }
    None
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        let builder = MessageResponseBuilder::new(&request.queries, None);
        let Some(query) = request.queries.queries().first() else {
            meta.response_code = ResponseCode::FormErr;
            return send(&mut response, builder.build_no_records(meta)).await;
        };
        let qname = query.name().to_string().to_ascii_lowercase();
        let qname = qname.trim_end_matches('.');
        let answer = {
            let scope = self.scope.read().expect("scope lock").clone();
            self.zone
                .read()
                .expect("zone lock")
                .lookup(&scope, qname, query.query_type())
        };
        let owner = Name::from(query.name().clone());
        let records: Vec<Record> = match answer {
            Answer::Addresses(mut addrs, ttl) => {
                shuffle(&mut addrs, &self.rng);
                addrs
                    .into_iter()
                    .map(|a| Record::from_rdata(owner.clone(), ttl, RData::A(A(a))))
                    .collect()
            }
            Answer::Pointer(target) => match Name::from_ascii(format!("{target}.")) {
                Ok(t) => vec![Record::from_rdata(owner, TASK_TTL, RData::PTR(PTR(t)))],
                Err(_) => vec![],
            },
            Answer::NoData => vec![],
            Answer::NxDomain => {
                meta.response_code = ResponseCode::NXDomain;
                vec![]
            }
            Answer::Forward => match forward(&self.upstream, request.as_slice()).await {
                Some(m) => {
                    meta.response_code = m.metadata.response_code;
                    let r = builder.build(
                        meta,
                        m.answers.iter(),
                        m.authorities.iter(),
                        std::iter::empty(),
                        std::iter::empty(),
                    );
                    return send(&mut response, r).await;
                }
                None => {
                    meta.response_code = ResponseCode::ServFail;
                    vec![]
                }
            },
        };
        meta.authoritative = meta.response_code != ResponseCode::ServFail;
        let r = builder.build(
            meta,
            records.iter(),
            std::iter::empty(),
            std::iter::empty(),
            std::iter::empty(),
        );
        send(&mut response, r).await
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let id = msg.metadata().id;
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!("dns: sending a response: {e}");
            let mut meta = Metadata::new(
                id,
                hickory_proto::op::MessageType::Response,
                hickory_proto::op::OpCode::Query,
            );
            meta.response_code = ResponseCode::ServFail;
            hickory_proto::op::Header {
                metadata: meta,
                counts: Default::default(),
            }
            .into()
        }
    }
}

struct TaskServer {
    netns: PathBuf,
    scope: Arc<RwLock<Vec<String>>>,
    server: Server<Handler>,
}

/// A task's DNS server could not be started: 127.0.0.11:53 in its
/// namespace would not bind (the others are still served).
#[derive(Debug, thiserror::Error)]
#[error("dns for task {task} in {}: {source}", netns.display())]
pub struct ServeError {
    pub task: String,
    pub netns: PathBuf,
    #[source]
    pub source: io::Error,
}

/// The embedded DNS of one node: a server per local task.
pub struct Dns {
    zone: SharedZone,
    upstream: Arc<Vec<SocketAddr>>,
    tasks: HashMap<String, TaskServer>,
}

impl Dns {
    pub fn new(upstream: Vec<SocketAddr>) -> Dns {
        Dns {
            zone: Arc::default(),
            upstream: Arc::new(upstream),
            tasks: HashMap::new(),
        }
    }

    /// The resolvers in `/etc/resolv.conf` (port 53), skipping loopback
    /// ones, which would not be reachable the same way from meshd.
    pub fn host_resolvers() -> Vec<SocketAddr> {
        std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .filter(|a| !a.is_loopback())
            .map(|a| SocketAddr::new(a, 53))
            .collect()
    }

    /// Brings the records to `tables` (whole, or by the delta's entries),
    /// and starts, re-scopes or stops the servers of this node's tasks when
    /// they may have changed. Returns the first error opening a task's
    /// sockets (the others are still served).
    pub async fn update(
        &mut self,
        tables: &Tables,
        update: Update<'_>,
        node: &str,
    ) -> Result<(), ServeError> {
        // The local tasks whose servers may need to change, and what each
        // should be now (namespace, networks); None: not served any more.
        let mut want: BTreeMap<String, Option<(PathBuf, Vec<String>)>> = BTreeMap::new();
        match update {
            Update::Whole => {
                *self.zone.write().expect("zone lock") = Zone::from_tables(tables);
                for t in self.tasks.keys() {
                    want.insert(t.clone(), None);
                }
                for (network, task, e) in tables.endpoints() {
                    if e.node != node {
                        continue;
                    }
                    let Some(netns) = &e.netns else { continue };
                    want.entry(task.to_owned())
                        .or_default()
                        .get_or_insert_with(|| (PathBuf::from(netns), Vec::new()))
                        .1
                        .push(network.to_owned());
                }
            }
            Update::Delta(changes) => {
                self.zone.write().expect("zone lock").apply(tables, changes);
                for c in changes {
                    if let Key::Endpoint { task, .. } = &c.key
                        && [&c.old, &c.new]
                            .into_iter()
                            .any(|v| matches!(v, Some(Value::Endpoint(e)) if e.node == node))
                    {
                        want.insert(task.clone(), task_networks(tables, node, task));
                    }
                }
            }
        }
        let mut first_error = None;
        for (task, want) in want {
            let Some((netns, scope)) = want else {
                if let Some(mut s) = self.tasks.remove(&task) {
                    let _ = s.server.shutdown_gracefully().await;
                }
                continue;
            };
            if let Some(s) = self.tasks.get(&task)
                && s.netns == netns
            {
                *s.scope.write().expect("scope lock") = scope;
                continue;
            }
            if let Some(mut old) = self.tasks.remove(&task) {
                let _ = old.server.shutdown_gracefully().await;
            }
            match self.serve(&netns, scope) {
                Ok(s) => {
                    self.tasks.insert(task, s);
                }
                Err(source) => {
                    let e = ServeError {
                        task,
                        netns,
                        source,
                    };
                    tracing::warn!("{e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn serve(&self, netns: &std::path::Path, scope: Vec<String>) -> io::Result<TaskServer> {
        let (udp, tcp) = in_netns(netns, || {
            let udp = std::net::UdpSocket::bind(DNS_ADDR)?;
            let tcp = std::net::TcpListener::bind(DNS_ADDR)?;
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })?;
        let scope = Arc::new(RwLock::new(scope));
        let mut server = Server::new(Handler {
            zone: self.zone.clone(),
            scope: scope.clone(),
            upstream: self.upstream.clone(),
            rng: std::sync::atomic::AtomicU64::new(RNG_SEED),
        });
        server.register_socket(tokio::net::UdpSocket::from_std(udp)?);
        server.register_listener(
            tokio::net::TcpListener::from_std(tcp)?,
            Duration::from_secs(5),
            64,
        );
        Ok(TaskServer {
            netns: netns.to_owned(),
            scope,
            server,
        })
    }

    /// Tasks served now.
    pub fn served(&self) -> usize {
        self.tasks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::tables::{EndpointEntry, Key, NetworkEntry, ServiceEntry, Value};

    fn tables() -> Tables {
        let mut t = Tables::default();
        for (id, subnet) in [
            ("red", "10.0.1.0/24"),
            ("blue", "10.0.2.0/24"),
            ("ingress", "10.255.0.0/24"),
        ] {
            t.entries.insert(
                Key::Network { id: id.into() },
                Value::Network(NetworkEntry {
                    name: id.into(),
                    vni: 4097,
                    subnet: subnet.parse().unwrap(),
                    gateway: subnet.replace(".0/24", ".1").parse().unwrap(),
                    ingress: id == "ingress",
                    internal: false,
                    encrypted: false,
                }),
            );
        }
        let svc = |name: &str, mode, vips: &[(&str, &str)], aliases: &[(&str, &str)]| {
            Value::Service(ServiceEntry {
                name: name.into(),
                endpoint_mode: mode,
                vips: vips
                    .iter()
                    .map(|(n, a)| ((*n).into(), a.parse().unwrap()))
                    .collect(),
                ports: vec![],
                aliases: aliases
                    .iter()
                    .map(|(n, a)| ((*n).into(), vec![(*a).into()]))
                    .collect(),
            })
        };
        use model::EndpointMode::{Dnsrr, Vip};
        t.entries.insert(
            Key::Service { id: "web".into() },
            svc(
                "web",
                Vip,
                &[("red", "10.0.1.2"), ("ingress", "10.255.0.2")],
                &[("red", "www")],
            ),
        );
        t.entries
            .insert(Key::Service { id: "db".into() }, svc("db", Dnsrr, &[], &[]));
        let ep = |net: &str, task: &str, svc: &str, slot: u32, ip: &str| {
            (
                Key::Endpoint {
                    network: net.into(),
                    task: task.into(),
                },
                Value::Endpoint(EndpointEntry {
                    service: svc.into(),
                    task_name: format!("{svc}.{slot}"),
                    node: "n".into(),
                    node_addr: "198.18.0.1".parse().unwrap(),
                    addr: ip.parse().unwrap(),
                    mac: [2, 0x42, 0, 0, 0, 1],
                    netns: None,
                    draining: false,
                }),
            )
        };
        t.entries.extend([
            ep("red", "w1", "web", 1, "10.0.1.3"),
            ep("red", "w2", "web", 2, "10.0.1.4"),
            ep("ingress", "w1", "web", 1, "10.255.0.3"),
            ep("ingress", "w2", "web", 2, "10.255.0.4"),
            ep("blue", "d1", "db", 1, "10.0.2.3"),
            ep("blue", "d2", "db", 2, "10.0.2.4"),
        ]);
        t
    }

    type Dump = (
        BTreeMap<(String, String), Vec<Ipv4Addr>>,
        BTreeMap<(String, Ipv4Addr), String>,
    );

    /// Everything the zone answers, in a comparable form.
    fn dump(z: &Zone) -> Dump {
        let mut names = BTreeMap::new();
        for (net, m) in &z.names {
            for (name, v) in m {
                let mut v = v.clone();
                v.sort();
                names.insert((net.clone(), name.clone()), v);
            }
        }
        let mut reverse = BTreeMap::new();
        for (net, m) in &z.reverse {
            for (ip, v) in m {
                reverse.insert((net.clone(), *ip), v.iter().min().unwrap().clone());
            }
        }
        (names, reverse)
    }

    #[test]
    fn the_ingress_network_carries_no_names() {
        let (names, reverse) = dump(&Zone::from_tables(&tables()));
        assert!(names.keys().all(|(net, _)| net != "ingress"), "{names:?}");
        assert!(
            reverse.keys().all(|(net, _)| net != "ingress"),
            "{reverse:?}"
        );
        // The same service still has its names on red.
        assert!(names.contains_key(&("red".to_owned(), "web".to_owned())));
    }

    #[test]
    fn deltas_give_the_same_zone_as_a_whole_build() {
        let full = tables();
        let mut t = Tables::default();
        let mut z = Zone::default();
        let step = |t: &mut Tables, z: &mut Zone, key: Key, new: Option<Value>| {
            let old = t.entries.get(&key).cloned();
            match &new {
                Some(v) => t.entries.insert(key.clone(), v.clone()),
                None => t.entries.remove(&key),
            };
            z.apply(t, &[Applied { key, old, new }]);
            assert_eq!(dump(z), dump(&Zone::from_tables(t)));
        };
        // Endpoints before their service, then the rest.
        let mut entries: Vec<(Key, Value)> = full.entries.clone().into_iter().collect();
        entries.sort_by_key(|(k, _)| !matches!(k, Key::Endpoint { .. }));
        for (k, v) in entries.clone() {
            step(&mut t, &mut z, k, Some(v));
        }
        assert_eq!(dump(&z), dump(&Zone::from_tables(&full)));
        // web becomes dnsrr; then everything goes, services first.
        if let Some(Value::Service(mut web)) =
            t.entries.get(&Key::Service { id: "web".into() }).cloned()
        {
            web.endpoint_mode = model::EndpointMode::Dnsrr;
            web.vips.clear();
            step(
                &mut t,
                &mut z,
                Key::Service { id: "web".into() },
                Some(Value::Service(web)),
            );
        }
        entries.sort_by_key(|(k, _)| matches!(k, Key::Endpoint { .. }));
        for (k, _) in entries {
            step(&mut t, &mut z, k, None);
        }
        assert!(dump(&z).0.is_empty() && dump(&z).1.is_empty());
    }

    fn ips(v: &[&str]) -> Vec<Ipv4Addr> {
        v.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn answers_are_scoped_to_the_tasks_networks() {
        let z = Zone::from_tables(&tables());
        let red = ["red".to_owned()];
        let blue = ["blue".to_owned()];
        let both = ["red".to_owned(), "blue".to_owned()];
        assert_eq!(
            z.lookup(&red, "web", RecordType::A),
            Answer::Addresses(ips(&["10.0.1.2"]), VIP_TTL)
        );
        assert_eq!(
            z.lookup(&red, "www", RecordType::A),
            Answer::Addresses(ips(&["10.0.1.2"]), VIP_TTL)
        );
        assert_eq!(
            z.lookup(&red, "tasks.web", RecordType::A),
            Answer::Addresses(ips(&["10.0.1.3", "10.0.1.4"]), TASK_TTL)
        );
        assert_eq!(
            z.lookup(&red, "web.2", RecordType::A),
            Answer::Addresses(ips(&["10.0.1.4"]), TASK_TTL)
        );
        // dnsrr: the name gives the task IPs.
        assert_eq!(
            z.lookup(&blue, "db", RecordType::A),
            Answer::Addresses(ips(&["10.0.2.3", "10.0.2.4"]), TASK_TTL)
        );
        // Another network's service is unknown here.
        assert_eq!(z.lookup(&red, "db", RecordType::A), Answer::NxDomain);
        assert_eq!(
            z.lookup(&blue, "tasks.web", RecordType::A),
            Answer::NxDomain
        );
        assert!(matches!(
            z.lookup(&both, "db", RecordType::A),
            Answer::Addresses(..)
        ));
        assert_eq!(z.lookup(&red, "web", RecordType::AAAA), Answer::NoData);
        assert_eq!(
            z.lookup(&red, "example.org", RecordType::A),
            Answer::Forward
        );
        assert_eq!(
            z.lookup(&red, "2.1.0.10.in-addr.arpa", RecordType::PTR),
            Answer::Pointer("web".into())
        );
        assert_eq!(
            z.lookup(&red, "4.1.0.10.in-addr.arpa", RecordType::PTR),
            Answer::Pointer("web.2".into())
        );
        // In our subnet but unknown: ours to deny; elsewhere: upstream's.
        assert_eq!(
            z.lookup(&red, "99.1.0.10.in-addr.arpa", RecordType::PTR),
            Answer::NxDomain
        );
        assert_eq!(
            z.lookup(&red, "8.8.8.8.in-addr.arpa", RecordType::PTR),
            Answer::Forward
        );
    }

    #[test]
    fn shuffling_reorders_but_keeps_every_address() {
        let base = ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]);
        let mut orders = std::collections::HashSet::new();
        let rng = std::sync::atomic::AtomicU64::new(RNG_SEED);
        for _ in 0..50 {
            let mut v = base.clone();
            shuffle(&mut v, &rng);
            let mut sorted = v.clone();
            sorted.sort();
            assert_eq!(sorted, base);
            orders.insert(v);
        }
        assert!(
            orders.len() > 5,
            "only {} orders in 50 shuffles",
            orders.len()
        );
    }
}
