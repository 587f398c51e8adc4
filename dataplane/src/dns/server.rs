//! [`Dns`]: a hickory server per local task, in the task's namespace,
//! answering from the zone and forwarding the rest upstream.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use hickory_proto::{
    op::{Message, Metadata, ResponseCode},
    rr::{Name, RData, Record, rdata::A, rdata::PTR},
};
use hickory_server::{
    Server,
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use model::{
    session::Update,
    tables::{Key, Tables, Value},
};

use crate::netlink::in_netns;

use super::{
    DNS_ADDR, TASK_TTL, UPSTREAM_TIMEOUT,
    zone::{Answer, SharedZone, Zone},
};

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
pub(super) const RNG_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A small xorshift over `state`: shuffling answers needs no cryptographic
/// randomness.
pub(super) fn shuffle<T>(v: &mut [T], state: &std::sync::atomic::AtomicU64) {
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
