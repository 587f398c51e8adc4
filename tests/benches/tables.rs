//! Sections (e) and (f): control to data.
//!
//! (e) The latency from an endpoint change committed on the leader to it
//! being applied on every node: one manager (in this process, real gRPC
//! over mTLS, redb with fsync) and 100 agents, each the real
//! `control::agent::Agent` with its own node certificate and dispatcher
//! session, applying every update through the real incremental path
//! (`NodeView::overlay`, the DNS `Zone`, and `LbView` + `LbSync` writing
//! the load balancer's maps, Maglev tables included, into memory) without
//! kernel calls. Every service has a VIP (one any-port frontend), so every
//! node holds a frontend per service. Measured with 100 services and again with
//! 10,000.
//!
//! (f) The embedded DNS (hickory-server, one core) against dnsmasq serving
//! the same records, both queried by dnsperf from inside a namespace.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use control::{
    agent::{Agent, Sink, Update},
    api::Ctx,
    ca::pki::{self, Ca},
    ca::tls::Credentials,
    daemon::{self, InitOptions},
    state::{
        Command, EndpointMode, EndpointSpec, NetworkAttachment, NetworkSpec, Role, ServiceMode,
        ServiceSpec, State, TaskTemplate,
    },
    tables::{Revision, Tables},
};
use dataplane::{
    dns::Zone,
    lb::{LbMaps, LbSync, SyncError},
    tables::{LbView, NodeView, OverlayUpdate},
};
use dataplane_common::{Backend, Frontend, FrontendKey, LbConfig};
use mesh_tests::Netns;

/// Agents per cluster: the issue's scale, 1,000 (`MESH_BENCH_AGENTS` sets
/// another for a profile run).
fn agents() -> usize {
    std::env::var("MESH_BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}
/// Agents that join at once (and catch up from a whole table).
const JOIN_WAVE: usize = 50;
/// Enough that p99 is not one outlier (the 10th slowest).
const CHANGES: usize = 1000;

pub(crate) fn service(name: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: ServiceMode::Replicated { replicas: 0 },
        task: TaskTemplate {
            command: vec!["/bin/true".into()],
            networks: vec![NetworkAttachment {
                target: "bench".into(),
                aliases: vec![],
            }],
            ..TaskTemplate::default()
        },
        // No published port (none to spend): the VIP answers every port,
        // so every node holds its any-port frontends (TCP and UDP).
        endpoint: EndpointSpec {
            mode: EndpointMode::Vip,
            ports: vec![],
        },
        update: Default::default(),
        rollback: Default::default(),
    }
}

/// Services `from..to`, each with one task on node `nodes[i % len]`.
fn services(from: usize, to: usize, nodes: &[String]) -> Vec<Command> {
    let mut cmds = Vec::new();
    for i in from..to {
        let name = format!("svc-{i}");
        cmds.push(Command::CreateService {
            id: format!("s{i:05}"),
            spec: service(&name),
        });
        cmds.push(Command::CreateTask {
            id: format!("t{i:05}"),
            service: name,
            slot: 1,
            node: nodes[i % nodes.len()].clone(),
            netns: Some(format!("/run/netns/bench-{i}")),
        });
    }
    cmds
}

fn bench_network() -> Command {
    Command::CreateNetwork {
        id: "net-bench".into(),
        spec: NetworkSpec {
            name: "bench".into(),
            subnet: Some("10.128.0.0/16".parse().unwrap()),
            ..NetworkSpec::default()
        },
    }
}

/// The load balancer's map writes with the kernel call left out: each is
/// counted and its value handed to `black_box`, nothing is kept (the
/// kernel would keep it).
#[derive(Default)]
struct NoKernel {
    writes: u64,
}

impl NoKernel {
    fn write<T>(&mut self, value: T) -> Result<(), SyncError> {
        std::hint::black_box(value);
        self.writes += 1;
        Ok(())
    }
}

impl LbMaps for NoKernel {
    fn set_config(&mut self, c: &LbConfig) -> Result<(), SyncError> {
        self.write(c)
    }
    fn add_node_addr(&mut self, a: Ipv4Addr) -> Result<(), SyncError> {
        self.write(a)
    }
    fn remove_node_addr(&mut self, a: Ipv4Addr) -> Result<(), SyncError> {
        self.write(a)
    }
    fn set_nat_interface(&mut self, i: u32, a: Option<Ipv4Addr>) -> Result<(), SyncError> {
        self.write((i, a))
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), SyncError> {
        self.write((id, b))
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), SyncError> {
        self.write(id)
    }
    fn swap_table(&mut self, id: u32, t: &[u32]) -> Result<(), SyncError> {
        self.write((id, t))
    }
    fn set_frontend(&mut self, k: &FrontendKey, f: &Frontend) -> Result<(), SyncError> {
        self.write((k, f))
    }
    fn remove_frontend(&mut self, k: &FrontendKey) -> Result<(), SyncError> {
        self.write(k)
    }
}

/// A simulated node's data plane: everything but the kernel calls.
struct BenchSink {
    underlay: Ipv4Addr,
    view: NodeView,
    zone: Zone,
    lb: LbView,
    sync: LbSync,
    maps: NoKernel,
    applied: Arc<Mutex<(Revision, Instant)>>,
    stats: Arc<SinkStats>,
}

/// The sinks' own time per delta, summed over a cluster's agents:
/// overlay view, load balancer, DNS zone (ns); and how many deltas.
#[derive(Default)]
pub(crate) struct SinkStats {
    ns: [AtomicU64; 3],
    n: AtomicU64,
    /// The last apply that failed, if any (the agent retries the whole).
    pub(crate) failed: Mutex<Option<String>>,
}

impl Sink for BenchSink {
    type Error = dataplane::lb::SyncError;
    async fn apply(&mut self, tables: &Tables, update: Update<'_>) -> Result<(), Self::Error> {
        let t0 = Instant::now();
        let overlay = self.view.overlay(tables, update);
        // As meshd does: a whole overlay means a whole load balancer.
        let whole = matches!(overlay, OverlayUpdate::Whole(_));
        std::hint::black_box(overlay);
        let t1 = Instant::now();
        let update_lb = if whole { Update::Whole } else { update };
        let nat = BTreeMap::new();
        let synced = self.lb.sync(
            tables,
            update_lb,
            self.view.networks(),
            vec![self.underlay],
            nat,
            &mut dataplane::lb::Ebpf {
                sync: &mut self.sync,
                maps: &mut self.maps,
            },
        );
        if let Err(e) = &synced {
            *self.stats.failed.lock().unwrap() = Some(e.to_string());
        }
        synced?;
        let t2 = Instant::now();
        match update {
            Update::Whole => self.zone = Zone::from_tables(tables),
            Update::Delta(changes) => self.zone.apply(tables, changes),
        }
        if matches!(update, Update::Delta(_)) {
            for (slot, d) in self.stats.ns.iter().zip([t1 - t0, t2 - t1, t2.elapsed()]) {
                slot.fetch_add(d.as_nanos() as u64, Relaxed);
            }
            self.stats.n.fetch_add(1, Relaxed);
        }
        *self.applied.lock().unwrap() = (tables.revision, Instant::now());
        Ok(())
    }
}

struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Mean sink time per agent and delta: overlay, LB, DNS (µs).
    sink_us: [f64; 3],
}

fn percentiles(mut v: Vec<Duration>) -> Latency {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
    Latency {
        sink_us: [0.0; 3],
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

pub(crate) struct Agents {
    applied: Vec<Arc<Mutex<(Revision, Instant)>>>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Simulated nodes' agents, each load balancer with room for `backends`
/// (meshd's `--lb-backends`).
pub(crate) fn start_agents(
    ctxs: &[(Arc<Ctx>, Ipv4Addr)],
    stats: &Arc<SinkStats>,
    backends: u32,
) -> Agents {
    let mut agents = Agents::new();
    agents.add(ctxs, stats, backends);
    agents
}

impl Agents {
    fn new() -> Agents {
        Agents {
            applied: Vec::new(),
            stop: tokio::sync::watch::channel(false).0,
            tasks: Vec::new(),
        }
    }

    /// Starts an agent for each of `ctxs`.
    fn add(&mut self, ctxs: &[(Arc<Ctx>, Ipv4Addr)], stats: &Arc<SinkStats>, backends: u32) {
        for (ctx, addr) in ctxs {
            let slot = Arc::new(Mutex::new((0, Instant::now())));
            let sink = BenchSink {
                underlay: *addr,
                view: NodeView::new(&ctx.node_id, *addr),
                zone: Zone::default(),
                lb: LbView::new(),
                sync: LbSync::with_backends(backends),
                maps: NoKernel::default(),
                applied: slot.clone(),
                stats: stats.clone(),
            };
            self.applied.push(slot);
            self.tasks.push(tokio::spawn(
                Agent::new(ctx.clone(), sink, None).run(self.stop.subscribe()),
            ));
        }
    }

    async fn wait_all(&self, revision: Revision) -> Instant {
        match self.wait_for(revision, Duration::from_secs(120)).await {
            Ok(t) => t,
            Err(at) => {
                let behind = at.iter().filter(|r| **r < revision).count();
                panic!(
                    "agents did not reach revision {revision}: {behind} of {} behind, lowest at {:?}",
                    at.len(),
                    at.iter().min()
                );
            }
        }
    }

    /// When the last agent applied `revision`, or where each agent was
    /// when `limit` ran out.
    pub(crate) async fn wait_for(
        &self,
        revision: Revision,
        limit: Duration,
    ) -> Result<Instant, Vec<Revision>> {
        let deadline = Instant::now() + limit;
        loop {
            let at: Vec<(Revision, Instant)> =
                self.applied.iter().map(|a| *a.lock().unwrap()).collect();
            if at.iter().all(|(r, _)| *r >= revision) {
                return Ok(at
                    .iter()
                    .map(|(_, t)| *t)
                    .max()
                    .unwrap_or_else(Instant::now));
            }
            if Instant::now() >= deadline {
                return Err(at.into_iter().map(|(r, _)| r).collect());
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Commits `cmds` in order, many at a time (the leader batches them):
/// each service goes in before its task.
pub(crate) async fn bulk(m: &control::raft::manager::Manager, cmds: Vec<Command>) {
    let (services, tasks): (Vec<Command>, Vec<Command>) = cmds
        .into_iter()
        .partition(|c| matches!(c, Command::CreateService { .. }));
    for wave in [services, tasks] {
        for chunk in wave.chunks(512) {
            for r in futures::future::join_all(chunk.iter().map(|c| m.propose(c.clone()))).await {
                r.unwrap();
            }
        }
    }
}

/// `count` worker nodes added to the cluster, each with its own node
/// certificate: their agents' contexts and ids.
pub(crate) async fn add_nodes(
    m: &control::raft::manager::Manager,
    api_addr: &str,
    count: usize,
) -> (Vec<(Arc<Ctx>, Ipv4Addr)>, Vec<String>) {
    let (secrets, cluster_id) =
        m.with_state(|s| (s.secrets.clone().unwrap(), s.cluster_id.clone().unwrap()));
    let ca = Ca::from_pem(&secrets.ca_cert, &secrets.ca_key);
    let mut ctxs = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..count {
        let id = control::api::new_node_id();
        let addr = Ipv4Addr::new(198, 18, 10 + (i / 250) as u8, (i % 250) as u8 + 1);
        let (key, csr) = pki::node_key_and_csr().unwrap();
        let cert = ca
            .issue(
                &csr,
                &cluster_id,
                &id,
                Role::Worker,
                pki::DEFAULT_CERT_LIFETIME,
            )
            .unwrap();
        m.propose(Command::AddNode {
            id: id.clone(),
            hostname: format!("sim-{i}"),
            addr,
            api_addr: None,
            role: Role::Worker,
            underlay: Vec::new(),
        })
        .await
        .unwrap();
        let creds = Credentials {
            ca: secrets.ca_cert.clone(),
            cert,
            key,
        };
        ctxs.push((
            Arc::new(Ctx {
                removed: tokio::sync::watch::Sender::new(None),
                node_id: id.clone(),
                cluster_id: cluster_id.clone(),
                ca_der: creds.ca_bytes().unwrap(),
                api_addr: String::new(),
                creds: Arc::new(RwLock::new(creds)),
                manager: RwLock::new(None),
                managers: RwLock::new(vec![api_addr.to_owned()]),
                checked: Default::default(),
                tasks_dir: None,
                manager_config: Default::default(),
            }),
            addr,
        ));
        nodes.push(id);
    }
    (ctxs, nodes)
}

/// One cluster: a manager and [`agents`] agents, with `services` services.
struct Cluster {
    manager: daemon::Daemon,
    ctxs: Vec<(Arc<Ctx>, Ipv4Addr)>,
    nodes: Vec<String>,
    services: usize,
    agents: Agents,
    /// When the leader applied each revision (the start of each change).
    committed: Arc<Mutex<BTreeMap<Revision, Instant>>>,
    stats: Arc<SinkStats>,
    latencies: Vec<Duration>,
}

impl Cluster {
    async fn start(dir: &std::path::Path, index: u8, services_: usize) -> Cluster {
        let at = super::control_bench::addresses(index);
        // Liveness out of the way: the manager runs no agent of its own and
        // the agents start after the bulk load; no node may go down.
        let opts = InitOptions {
            heartbeat_misses: 100,
            // An ingress address per node: room for a thousand.
            ingress_subnet: Some("10.0.0.0/20".parse().unwrap()),
            ..InitOptions::default()
        };
        let (manager, _) = daemon::init(dir, &at, &opts).await.unwrap();
        let m = manager.ctx.manager().unwrap();
        let committed: Arc<Mutex<BTreeMap<Revision, Instant>>> = Arc::default();
        {
            let committed = committed.clone();
            let mut rx = m.sm.revisions();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let r = *rx.borrow_and_update();
                    committed.lock().unwrap().insert(r, Instant::now());
                }
            });
        }
        let (ctxs, nodes) = add_nodes(&m, &at.api_addr, agents()).await;
        m.propose(bench_network()).await.unwrap();
        // The agents start after the bulk load (no fan-out of it) and
        // catch up from a snapshot.
        bulk(&m, services(0, services_, &nodes)).await;
        let stats = Arc::<SinkStats>::default();
        // They join in waves, as nodes do, each catching up before the
        // next starts: a thousand whole tables decoded at once would be a
        // peak no real node sees.
        let mut agents = Agents::new();
        let revision = m.sm.with_book(|_, b| b.revision());
        for wave in ctxs.chunks(JOIN_WAVE) {
            agents.add(wave, &stats, dataplane::lb::limits::BACKENDS_DEFAULT);
            agents.wait_all(revision).await;
        }
        // The catch-up is not a change: its sink time is not counted.
        for slot in stats.ns.iter().chain([&stats.n]) {
            slot.store(0, Relaxed);
        }
        Cluster {
            manager,
            ctxs,
            nodes,
            services: services_,
            agents,
            committed,
            stats,
            latencies: Vec::new(),
        }
    }

    /// Change `k` of `CHANGES` (a task removed, then put back), timed from
    /// the leader applying it to the last agent applying it.
    async fn change(&mut self, k: usize) {
        let m = self.manager.ctx.manager().unwrap();
        let i = (k / 2 * 7919) % self.services;
        let cmd = if k.is_multiple_of(2) {
            Command::RemoveTask {
                id: format!("t{i:05}"),
            }
        } else {
            Command::CreateTask {
                id: format!("t{i:05}"),
                service: format!("svc-{i}"),
                slot: 1,
                node: self.nodes[i % self.nodes.len()].clone(),
                netns: Some(format!("/run/netns/bench-{i}")),
            }
        };
        m.propose(cmd).await.unwrap();
        let revision = m.sm.with_book(|_, b| b.revision());
        let done = self.agents.wait_all(revision).await;
        // The watch may coalesce: the first time seen at or after it.
        let start = loop {
            if let Some((_, t)) = self.committed.lock().unwrap().range(revision..).next() {
                break *t;
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        };
        self.latencies.push(done.saturating_duration_since(start));
    }

    fn latency(&self) -> Latency {
        let n = self.stats.n.load(Relaxed).max(1) as f64;
        let mut l = percentiles(self.latencies.clone());
        for (out, slot) in l.sink_us.iter_mut().zip(&self.stats.ns) {
            *out = slot.load(Relaxed) as f64 / n / 1e3;
        }
        l
    }

    pub(crate) async fn stop(self) {
        self.agents.stop().await;
        drop(self.ctxs);
        self.manager.stop().await;
    }
}

pub fn tables_latency(md: &mut String) {
    let base = super::control_bench::scratch("tables");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (small, large) = rt.block_on(async {
        // Two clusters side by side, measured in turns: change k on one,
        // then change k on the other (which goes first alternates). Both
        // see the same machine at the same moment, so drift in this
        // machine's speed over the run (it is a shared VM) falls on both.
        let mut small = Cluster::start(&base.join("small"), 1, 100).await;
        let mut large = Cluster::start(&base.join("large"), 2, 10_000).await;
        eprintln!("(e) both clusters caught up: {} MiB resident", rss_mib());
        if std::env::var_os("MESH_BENCH_EXIT_LOADED").is_some() {
            // For a heap profiler: what is still allocated at exit is what
            // both clusters hold, caught up.
            eprintln!("(e) exiting loaded");
            std::process::exit(0);
        }
        eprintln!("(e) measuring {CHANGES} changes on each cluster, in turns");
        for k in 0..CHANGES {
            if k.is_multiple_of(2) {
                small.change(k).await;
                large.change(k).await;
            } else {
                large.change(k).await;
                small.change(k).await;
            }
        }
        let (s, l) = (small.latency(), large.latency());
        small.stop().await;
        large.stop().await;
        (s, l)
    });
    let _ = std::fs::remove_dir_all(&base);
    let agents = agents();
    writeln!(md, "## (e) Control to data: change applied on every node\n").unwrap();
    writeln!(
        md,
        "Two clusters in this process, one with 100 services and one with 10,000, each one \
         manager (gRPC over mTLS, redb with fsync) and {agents} agents, joining in waves of \
         {JOIN_WAVE} (each catches up from a whole table before the next joins). Every agent is the real \
         agent with its own node certificate and dispatcher session, applying every update \
         through the real incremental path (its overlay view, DNS zone, and load-balancer view \
         and map sync, Maglev tables built) without kernel calls. Every service has a VIP, \
         which answers every port: one frontend per service on every node. Each of {CHANGES} changes per \
         cluster removes or restores one task (an endpoint); latency runs from the leader \
         applying the change to the last of the {agents} agents applying it. Every node has tasks \
         on the network, so every change reaches all of them. The clusters are measured in \
         turns (change k on one, then on the other, the order alternating), so both see this \
         shared machine at the same moments and the ratio is not a drift of its speed between \
         two phases.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| services | p50 | p99 | max | per agent and delta: overlay / LB / DNS |"
    )
    .unwrap();
    writeln!(md, "|---|---|---|---|---|").unwrap();
    for (n, l) in [(100, &small), (10_000, &large)] {
        writeln!(
            md,
            "| {n} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} / {:.1} / {:.1} µs |",
            l.p50_ms, l.p99_ms, l.max_ms, l.sink_us[0], l.sink_us[1], l.sink_us[2]
        )
        .unwrap();
    }
    writeln!(
        md,
        "\nRatio 10,000 / 100 services: p50 {:.2}, p99 {:.2} (target at 1,000 agents: p99 ≤ 100 ms, ratio ≤ 1.2).\n",
        large.p50_ms / small.p50_ms,
        large.p99_ms / small.p99_ms
    )
    .unwrap();
    writeln!(
        md,
        "The last column is each sink's own time, the mean per agent and delta (the agents \
         share {} cores, so {agents} of them add up): it grows with the table only through cache \
         misses, every step being a hash or B-tree lookup.\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
    .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let per_change = |l: &Latency| l.sink_us.iter().sum::<f64>() * agents as f64 / 1e3;
    writeln!(
        md,
        "What bounds it here: the {agents} simulated nodes' own work, which real nodes do each          on their own CPU, runs on this machine's {cores} cores one after another: the sinks          alone take {:.1} ms of CPU per change at 100 services and {:.1} ms at 10,000, that is          {:.1} and {:.1} ms of wall time on {cores} cores, and the rest is the leader's fan-out          and each agent's decode and replica update. The 10,000-service sinks are slower per          delta because {agents} nodes' tables ({} MiB resident at the peak, for both clusters)          miss every cache, where one real node's fit its own. On separate hosts the latency is          the leader's fan-out plus one agent's apply.\n",
        per_change(&small),
        per_change(&large),
        per_change(&small) / cores,
        per_change(&large) / cores,
        peak_rss_mib(),
    )
    .unwrap();
}

fn rss_mib() -> u64 {
    status_mib("VmRSS:")
}

/// This process's peak resident memory (MiB), from the kernel.
fn peak_rss_mib() -> u64 {
    status_mib("VmHWM:")
}

/// A memory line of /proc/self/status, in MiB.
fn status_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb >> 10)
}

/// dnsperf's "Queries per second" from `out`.
fn qps(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no qps in dnsperf output:\n{out}"))
}

pub fn dns_qps(md: &mut String) {
    const SERVICES: usize = 1000;
    // The records: SERVICES services with a VIP and one task each, on one
    // network; the task that asks is on this node.
    let mut state = State::default();
    let node = "dns-bench-node".to_owned();
    let mut cmds = vec![
        Command::Init {
            cluster_id: "c".into(),
            ingress_id: "ingress".into(),
            settings: Default::default(),
            secrets: None,
        },
        Command::AddNode {
            id: node.clone(),
            hostname: "n".into(),
            addr: Ipv4Addr::new(198, 18, 0, 1),
            api_addr: None,
            role: Role::Worker,
            underlay: Vec::new(),
        },
        bench_network(),
    ];
    cmds.extend(services(0, SERVICES, std::slice::from_ref(&node)));
    for c in &cmds {
        state.apply(c).unwrap();
    }
    let ns = Netns::new();
    ns.exec_ok("ip", &["link", "set", "lo", "up"]);
    let path = ns.path();
    // The asking task: the first service's task lives in our namespace.
    let mut tables = control::tables::derive(&state, 1);
    let mut first = true;
    for v in tables.entries.values_mut() {
        if let control::tables::Value::Endpoint(e) = v {
            e.netns = first.then(|| path.display().to_string());
            first = false;
        }
    }
    // Query mix: the VIP name and tasks.* of every service.
    let queries = std::env::temp_dir().join(format!("mesh-dnsperf-{}.txt", std::process::id()));
    let mut q = String::new();
    let mut hosts = String::new();
    let probe = tables
        .services()
        .next()
        .map(|(_, s)| s.name.clone())
        .unwrap();
    for (_, s) in tables.services() {
        writeln!(q, "{} A\ntasks.{} A", s.name, s.name).unwrap();
        for vip in s.vips.values() {
            writeln!(hosts, "{vip} {}", s.name).unwrap();
        }
    }
    for (_, _, e) in tables.endpoints() {
        let svc = e.task_name.rsplit_once('.').map_or("", |(s, _)| s);
        writeln!(hosts, "{} tasks.{svc}", e.addr).unwrap();
    }
    std::fs::write(&queries, q).unwrap();
    let hosts_file = std::env::temp_dir().join(format!("mesh-dnshosts-{}", std::process::id()));
    std::fs::write(&hosts_file, hosts).unwrap();
    let dnsperf = |server: &str| -> f64 {
        let out = ns.exec(
            "dnsperf",
            &[
                "-s",
                server,
                "-d",
                queries.to_str().unwrap(),
                "-l",
                "5",
                "-c",
                "4",
                "-Q",
                "200000",
            ],
        );
        qps(&String::from_utf8_lossy(&out.stdout))
    };
    // Ours: the DNS server on a one-thread runtime (one core).
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut dns = dataplane::dns::Dns::new(vec![]);
            dns.update(&tables, Update::Whole, &node).await.unwrap();
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
            drop(dns);
        });
    });
    ready_rx.recv().unwrap();
    let ours = dnsperf("127.0.0.11");
    let _ = stop_tx.send(());
    server.join().unwrap();
    // dnsmasq (single-threaded) with the same names, same namespace.
    let mut dnsmasq = ns.spawn(
        ns.command("dnsmasq")
            .args([
                "--no-daemon",
                "--listen-address=127.0.0.12",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--cache-size=10000",
            ])
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    // Ready when it answers (a loaded machine can take longer than any
    // fixed pause): dnsperf against a server not yet bound counts 0.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        dnsmasq.assert_running();
        let out = ns.exec(
            "dig",
            &["+short", "+time=1", "+tries=1", "@127.0.0.12", &probe],
        );
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dnsmasq did not answer {probe} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let theirs = dnsperf("127.0.0.12");
    assert!(
        ours > 0.0 && theirs > 0.0,
        "a DNS server answered nothing (mesh {ours}/s, dnsmasq {theirs}/s): not a measurement"
    );
    drop(dnsmasq);
    let _ = std::fs::remove_file(&queries);
    let _ = std::fs::remove_file(&hosts_file);
    writeln!(md, "## (f) Embedded DNS: queries per second\n").unwrap();
    writeln!(
        md,
        "dnsperf (4 clients, 5 s) from inside a namespace, {SERVICES} services: half the queries \
         are `svc` (the VIP), half `tasks.svc`. The embedded DNS runs on one thread; dnsmasq \
         (single-threaded) serves the same names from a hosts file.\n"
    )
    .unwrap();
    writeln!(md, "| server | queries/s |").unwrap();
    writeln!(md, "|---|---|").unwrap();
    writeln!(
        md,
        "| mesh embedded DNS (hickory-server, 1 thread) | {ours:.0} |"
    )
    .unwrap();
    writeln!(md, "| dnsmasq | {theirs:.0} |").unwrap();
    writeln!(md, "\nRatio mesh / dnsmasq: {:.2}.\n", ours / theirs).unwrap();
}
