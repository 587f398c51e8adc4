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
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    sync::{Arc, RwLock},
    time::Duration,
};

use control::{
    allocator::Subnet,
    tables::{NetworkRecords, Tables, dns_records},
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

use crate::netlink::in_netns;

/// Where the embedded DNS answers inside a task's namespace.
pub const DNS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);
/// TTL of a VIP (stable for the service's life) and of task addresses
/// (which change with every reschedule).
const VIP_TTL: u32 = 600;
const TASK_TTL: u32 = 0;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The records of every network, and which addresses are VIPs.
#[derive(Debug, Default)]
pub struct Zone {
    networks: BTreeMap<String, NetworkRecords>,
    subnets: BTreeMap<String, Subnet>,
    vips: std::collections::HashSet<Ipv4Addr>,
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

impl Zone {
    pub fn from_tables(tables: &Tables) -> Zone {
        let vips = tables
            .services()
            .flat_map(|(_, s)| s.vips.values().copied())
            .collect();
        Zone {
            networks: dns_records(tables),
            subnets: tables
                .networks()
                .map(|(id, n)| (id.to_owned(), n.subnet))
                .collect(),
            vips,
        }
    }

    /// The answer for `name` (lowercase, no trailing dot) of type `qtype`,
    /// seen from a task on the networks `scope`.
    pub fn lookup(&self, scope: &[String], name: &str, qtype: RecordType) -> Answer {
        let records = || scope.iter().filter_map(|n| self.networks.get(n));
        if qtype == RecordType::PTR {
            let Some(ip) = arpa_v4(name) else {
                return Answer::Forward;
            };
            if let Some(n) = records().find_map(|r| r.reverse.get(&ip)) {
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
        for r in records() {
            if let Some(a) = r.names.get(name) {
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
            let ttl = if addrs.iter().all(|a| self.vips.contains(a)) {
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

/// The zone every task server reads; replaced whole on each revision.
pub type SharedZone = Arc<RwLock<Arc<Zone>>>;

/// Answers one task's queries.
struct Handler {
    zone: SharedZone,
    /// The networks of the task (updated when its attachments change).
    scope: Arc<RwLock<Vec<String>>>,
    upstream: Arc<Vec<SocketAddr>>,
}

/// A small xorshift: shuffling answers needs no cryptographic randomness.
fn shuffle<T>(v: &mut [T]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    for i in (1..v.len()).rev() {
        let mut x = STATE.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        STATE.store(x, Ordering::Relaxed);
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
            let zone = self.zone.read().expect("zone lock").clone();
            let scope = self.scope.read().expect("scope lock").clone();
            zone.lookup(&scope, qname, query.query_type())
        };
        let owner = Name::from(query.name().clone());
        let records: Vec<Record> = match answer {
            Answer::Addresses(mut addrs, ttl) => {
                shuffle(&mut addrs);
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

    /// Swaps in the records of `tables`, and starts, re-scopes or stops
    /// the servers of this node's tasks. Returns the first error opening
    /// a task's sockets (the others are still served).
    pub async fn update(&mut self, tables: &Tables, node: &str) -> Result<(), String> {
        *self.zone.write().expect("zone lock") = Arc::new(Zone::from_tables(tables));
        let mut want: BTreeMap<&str, (PathBuf, Vec<String>)> = BTreeMap::new();
        for (network, task, e) in tables.endpoints() {
            if e.node != node {
                continue;
            }
            let Some(netns) = &e.netns else { continue };
            want.entry(task)
                .or_insert_with(|| (PathBuf::from(netns), Vec::new()))
                .1
                .push(network.to_owned());
        }
        let gone: Vec<String> = self
            .tasks
            .keys()
            .filter(|t| !want.contains_key(t.as_str()))
            .cloned()
            .collect();
        for t in gone {
            if let Some(mut s) = self.tasks.remove(&t) {
                let _ = s.server.shutdown_gracefully().await;
            }
        }
        let mut first_error = None;
        for (task, (netns, scope)) in want {
            if let Some(s) = self.tasks.get(task)
                && s.netns == netns
            {
                *s.scope.write().expect("scope lock") = scope;
                continue;
            }
            if let Some(mut old) = self.tasks.remove(task) {
                let _ = old.server.shutdown_gracefully().await;
            }
            match self.serve(&netns, scope) {
                Ok(s) => {
                    self.tasks.insert(task.to_owned(), s);
                }
                Err(e) => {
                    let e = format!("dns for task {task} in {}: {e}", netns.display());
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
    use control::tables::{EndpointEntry, Key, NetworkEntry, ServiceEntry, Value};

    fn tables() -> Tables {
        let mut t = Tables::default();
        for (id, subnet) in [("red", "10.0.1.0/24"), ("blue", "10.0.2.0/24")] {
            t.entries.insert(
                Key::Network { id: id.into() },
                Value::Network(NetworkEntry {
                    name: id.into(),
                    vni: 4097,
                    subnet: subnet.parse().unwrap(),
                    gateway: subnet.replace(".0/24", ".1").parse().unwrap(),
                    ingress: false,
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
        use control::state::EndpointMode::{Dnsrr, Vip};
        t.entries.insert(
            Key::Service { id: "web".into() },
            svc("web", Vip, &[("red", "10.0.1.2")], &[("red", "www")]),
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
                }),
            )
        };
        t.entries.extend([
            ep("red", "w1", "web", 1, "10.0.1.3"),
            ep("red", "w2", "web", 2, "10.0.1.4"),
            ep("blue", "d1", "db", 1, "10.0.2.3"),
            ep("blue", "d2", "db", 2, "10.0.2.4"),
        ]);
        t
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
        for _ in 0..50 {
            let mut v = base.clone();
            shuffle(&mut v);
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
