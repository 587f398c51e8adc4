//! `cargo xtask bench`: the data plane measured side by side with baselines
//! in one run, written to docs/BENCHMARKS.md.
//!
//! (a) ns per packet through BPF_PROG_TEST_RUN: no-op XDP, the parser, and the
//!     load balancer's miss, conntrack-hit and new-flow (Maglev) paths.
//! (b) TCP connections/s and requests/s from a client namespace: straight to
//!     the backends, through a mesh published port, and through nftables DNAT
//!     (numgen + masquerade, like kube-proxy's nft mode), same topology.
//! (c) Overlay reconcile: programming N remote endpoints from empty, then one
//!     endpoint change into that table, against iproute2 batch mode writing
//!     the same entries and a full re-read reconcile.
//! (d) Committed control-plane writes against the disk's fsync rate.
//! (e), (f) Control to data latency at scale; the embedded DNS against
//!     dnsmasq.
//! (g) Resident memory per endpoint, manager plus agent, at 100,000.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use control::allocator::Subnet;
use dataplane::{
    ebpf::Datapath,
    lb::{BackendSpec, FrontendSpec, LbSpec, LbSync, Protocol, ServiceSpec, Timeouts},
};
use dataplane::{
    netlink::{Mac, Netlink},
    overlay::{Change, NetworkSpec, Overlay, OverlaySpec, RemoteEndpoint},
};
use mesh_tests::{
    ChildGuard, Host, Netns, Topology,
    frames::{TCP, v4_flow},
    meshd::{self, ConfigFile, Published},
    netns::lb_test_namespace,
    require_root,
    services::{self, Server},
};

const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const RUNS: u32 = 1_000_000;
static SLOW_CONNECTS: AtomicU64 = AtomicU64::new(0);

#[path = "control.rs"]
mod control_bench;
#[path = "memory.rs"]
mod memory_bench;
#[path = "tables.rs"]
mod tables_bench;

fn main() {
    let Some(_root) = require_root("bench") else {
        std::process::exit(1);
    };
    // RUST_LOG=control=debug shows the managers' and agents' logs of a
    // profile run.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n").unwrap();
    writeln!(
        md,
        "Written by `cargo xtask bench`; every number below comes from one run on this machine.\n"
    )
    .unwrap();
    writeln!(md, "- kernel: {}", uname()).unwrap();
    writeln!(
        md,
        "- CPUs: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
    .unwrap();
    writeln!(md, "- date: {}\n", date()).unwrap();
    // MESH_BENCH=a,c runs only those sections and prints them without
    // touching docs/BENCHMARKS.md (which always holds one complete run).
    let only = std::env::var("MESH_BENCH").ok();
    let wanted = |s: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == s));
    if wanted("a") {
        let from = md.len();
        per_packet(&mut md);
        eprint!("{}", &md[from..]);
    }
    if wanted("b") {
        let from = md.len();
        throughput(&mut md);
        eprint!("{}", &md[from..]);
    }
    if wanted("c") {
        let from = md.len();
        overlay(&mut md);
        eprint!("{}", &md[from..]);
    }
    if wanted("d") {
        let from = md.len();
        control_bench::control_writes(&mut md);
        eprint!("{}", &md[from..]);
    }
    if wanted("e") {
        let from = md.len();
        tables_bench::tables_latency(&mut md);
        eprint!("{}", &md[from..]);
    }
    if wanted("f") {
        let from = md.len();
        tables_bench::dns_qps(&mut md);
        eprint!("{}", &md[from..]);
    }
    if wanted("g") {
        let from = md.len();
        memory_bench::memory_per_endpoint(&mut md);
        eprint!("{}", &md[from..]);
    }
    if only.is_some() {
        println!("{md}");
        return;
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md");
    std::fs::write(&out, &md).expect("write docs/BENCHMARKS.md");
    println!("{md}\nwritten to {}", out.display());
}

fn uname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_owned())
}

fn date() -> String {
    std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map_or_else(
            |_| "?".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

fn lb_spec(nat_port_count: u16) -> LbSpec {
    LbSpec {
        nat_address: NODE,
        node_addresses: vec![NODE],
        nat_port_min: 1024,
        nat_port_count,
        nat_interfaces: Default::default(),
        services: vec![ServiceSpec {
            id: 1,
            name: "web".into(),
            frontends: vec![FrontendSpec {
                address: None,
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            backends: (1..=4)
                .map(|i| BackendSpec {
                    address: Ipv4Addr::new(198, 19, i, 2),
                    port: 80,
                    weight: 1,
                })
                .collect(),
            table_size: 16381,
        }],
    }
}

/// Mean ns per run of `frames(i)` over `RUNS` single-run calls: the kernel
/// times each call's program run, so syscall cost is excluded. `between` runs
/// untimed every 50k calls (the new-flow row empties the flow tables there,
/// so it measures inserts into a live table, not LRU eviction of a full one).
fn ns_per_packet(
    run: &mut dyn FnMut(&[u8]) -> Duration,
    frames: &dyn Fn(u32) -> Vec<u8>,
    between: &mut dyn FnMut(),
) -> f64 {
    let mut total = Duration::ZERO;
    for i in 0..RUNS {
        if i % 50_000 == 0 {
            between();
        }
        total += run(&frames(i));
    }
    total.as_nanos() as f64 / f64::from(RUNS)
}

fn per_packet(md: &mut String) {
    let (ns, ifindex) = lb_test_namespace();
    let mut dp = Datapath::load(None).expect("load");
    let mut sync = LbSync::new();
    sync.apply(&lb_spec(64000), &mut dp.lb_maps())
        .expect("apply");
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let client = |i: u32| {
        (
            Ipv4Addr::from(0xc612_0100 + (i >> 14)),
            10000 + (i & 0x3fff) as u16,
        )
    };
    let syn = |i: u32| v4_flow(TCP, client(i), (NODE, 8080), 0x02, 0);
    let ack_same = |_: u32| {
        v4_flow(
            TCP,
            (Ipv4Addr::new(198, 18, 0, 100), 40000),
            (NODE, 8080),
            0x10,
            64,
        )
    };
    let miss = |i: u32| v4_flow(TCP, client(i), (NODE, 9999), 0x02, 0);

    let mut rows: Vec<(&str, f64)> = Vec::new();
    ns.enter(|| {
        let run_xdp = |prog: &mut aya::programs::Xdp, frame: &[u8]| {
            let mut out = vec![0u8; frame.len() + 64];
            prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("test_run")
            .duration
        };
        let noop = ns_per_packet(&mut |f| run_xdp(dp.noop().unwrap(), f), &syn, &mut || {});
        rows.push(("no-op XDP (baseline)", noop));
        let parse = ns_per_packet(&mut |f| run_xdp(dp.parser().unwrap(), f), &syn, &mut || {});
        rows.push(("XDP parser + counters", parse));
        let dp = std::cell::RefCell::new(dp);
        let run_tc = |f: &[u8]| {
            let mut out = vec![0u8; f.len() + 64];
            dp.borrow_mut()
                .lb()
                .unwrap()
                .test_run(TestRunOptions {
                    data_in: Some(f),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::default()
                })
                .expect("test_run")
                .duration
        };
        let mut run_tc = run_tc;
        rows.push((
            "tc_lb miss (no frontend)",
            ns_per_packet(&mut run_tc, &miss, &mut || {}),
        ));
        // One SYN creates the flow; then the same flow's segments hit conntrack.
        run_tc(&v4_flow(
            TCP,
            (Ipv4Addr::new(198, 18, 0, 100), 40000),
            (NODE, 8080),
            0x02,
            0,
        ));
        rows.push((
            "tc_lb conntrack hit (DNAT+SNAT, redirect)",
            ns_per_packet(&mut run_tc, &ack_same, &mut || {}),
        ));
        // Every run a new flow: Maglev pick, SNAT port claim, two map inserts.
        let flush = Timeouts {
            tcp_idle_s: 0,
            tcp_closing_s: 0,
            udp_idle_s: 0,
        };
        let mut empty_tables = || {
            dp.borrow_mut()
                .sweep_conntrack(u64::MAX, &flush)
                .expect("sweep");
        };
        rows.push((
            "tc_lb new flow (Maglev, NAT claim)",
            ns_per_packet(&mut run_tc, &syn, &mut empty_tables),
        ));
    });

    writeln!(md, "## (a) Per packet, BPF_PROG_TEST_RUN\n").unwrap();
    writeln!(
        md,
        "{RUNS} single-packet runs per row (mean of the kernel-timed program runs; the syscall is not included). \
         The LB runs as a TC program on a routed veth inside a test namespace; new flows use {RUNS} distinct \
         client address/port pairs. The kernel's per-run timer adds a constant that every row, the no-op \
         included, pays.\n"
    )
    .unwrap();
    writeln!(md, "| path | ns/packet | vs no-op |\n|---|---:|---:|").unwrap();
    let base = rows[0].1;
    for (name, v) in &rows {
        writeln!(md, "| {name} | {v:.1} | {:.2}x |", v / base).unwrap();
    }
    writeln!(md).unwrap();
}

/// Counts completed operations from `threads` client threads for `secs`.
fn load(
    client: &Host,
    threads: usize,
    secs: u64,
    op: impl Fn(&mut Option<ConnState>) -> bool + Sync,
) -> f64 {
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                client.enter(|| {
                    let mut state = None;
                    while !stop.load(Ordering::Relaxed) {
                        if op(&mut state) {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            state = None;
                        }
                    }
                })
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        eprintln!("warning: {f} failed operations");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// One measurement: new connections/s, kept-alive requests/s, and how many
/// connects needed a SYN retransmit.
struct Sample {
    conns: f64,
    reqs: f64,
    slow: u64,
}

struct ConnState {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn request(state: &mut Option<ConnState>, target: SocketAddr) -> bool {
    if state.is_none() {
        let t0 = Instant::now();
        let c = match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(c) => c,
            Err(_) => return false,
        };
        // A connect that took a SYN retransmit (1 s): the first SYN was lost.
        if t0.elapsed() > Duration::from_millis(500) {
            SLOW_CONNECTS.fetch_add(1, Ordering::Relaxed);
        }
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = c.set_nodelay(true);
        let Ok(w) = c.try_clone() else { return false };
        *state = Some(ConnState {
            reader: BufReader::new(c),
            writer: w,
        });
    }
    let st = state.as_mut().expect("just set");
    let mut line = String::new();
    st.writer.write_all(b"ping\n").is_ok() && st.reader.read_line(&mut line).is_ok_and(|n| n > 0)
}

fn throughput(md: &mut String) {
    let mut topo = Topology::new(2);
    topo.route_tasks_via_underlay();
    topo.add_host("client");
    let (h1, h2, client) = (topo.host(0), topo.host(1), topo.host(2));
    client.exec_ok("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"]);
    for (h, net) in [(h1, "198.19.1.0/24"), (h2, "198.19.2.0/24")] {
        client.exec_ok("ip", &["route", "add", net, "via", &h.addr().to_string()]);
    }
    let tasks = [h1.add_task(0), h2.add_task(0)];
    let _servers: Vec<Server> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            services::tcp_echo(t.ns(), SocketAddr::from((t.addr(), 80)), &format!("b{i}"))
        })
        .collect();

    // mesh on both hosts; host1 is the entry point.
    let addrs: Vec<Ipv4Addr> = tasks.iter().map(|t| t.addr()).collect();
    let web = Published {
        id: 1,
        name: "web",
        port: 8080,
        protocol: "tcp",
        target_port: 80,
        backends: &addrs,
    };
    let configs: Vec<ConfigFile> = [h1, h2]
        .iter()
        .zip(&tasks)
        .map(|(h, t)| {
            ConfigFile::write(
                h,
                &[t.host_iface()],
                serde_json::json!({}),
                std::slice::from_ref(&web),
            )
        })
        .collect();
    let daemons: Vec<ChildGuard> = [h1, h2]
        .iter()
        .zip(&configs)
        .map(|(h, c)| meshd::start(h, Some(c), &["--sweep-interval", "2"]))
        .collect();

    let direct_targets: Vec<SocketAddr> = tasks
        .iter()
        .map(|t| SocketAddr::from((t.addr(), 80)))
        .collect();
    let mesh_target = SocketAddr::from((h1.addr(), 8080));
    let nft_target = SocketAddr::from((h1.addr(), 8081));
    let threads = 2;
    let secs = 3;
    let rr = AtomicU64::new(0);
    let direct_pick = || direct_targets[(rr.fetch_add(1, Ordering::Relaxed) % 2) as usize];

    let measure = |target: &(dyn Fn() -> SocketAddr + Sync)| -> Sample {
        SLOW_CONNECTS.store(0, Ordering::Relaxed);
        let conns = load(client, threads, secs, |st| {
            let ok = request(st, target());
            *st = None;
            ok
        });
        let reqs = load(client, threads, secs, |st| {
            if st.is_none() {
                // Keep-alive: one connection per thread, opened once.
                return request(st, target());
            }
            request(st, SocketAddr::from(([0, 0, 0, 0], 0)))
        });
        Sample {
            conns,
            reqs,
            slow: SLOW_CONNECTS.load(Ordering::Relaxed),
        }
    };

    let mut results: Vec<(&str, Vec<Sample>)> = vec![
        ("direct to the backends", vec![]),
        ("mesh published port", vec![]),
    ];
    for _ in 0..3 {
        results[0].1.push(measure(&direct_pick));
        results[1].1.push(measure(&|| mesh_target));
    }
    // nftables last: its NAT hooks turn on kernel conntrack in host1's namespace.
    let nft = format!(
        "table ip meshbench {{
           chain pre {{ type nat hook prerouting priority dstnat; tcp dport 8081 dnat to numgen inc mod 2 map {{ 0 : {}, 1 : {} }} : 80; }}
           chain post {{ type nat hook postrouting priority srcnat; ip daddr 198.19.0.0/16 masquerade; }}
         }}",
        tasks[0].addr(),
        tasks[1].addr()
    );
    let nft_file = std::env::temp_dir().join(format!("{}-nft.conf", h1.node_name()));
    std::fs::write(&nft_file, nft).unwrap();
    h1.exec_ok("nft", &["-f", nft_file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&nft_file);
    results.push(("nftables DNAT (numgen + masquerade)", vec![]));
    for _ in 0..3 {
        results[2].1.push(measure(&|| nft_target));
    }
    drop(daemons);
    drop(configs);
    for h in [h1, h2] {
        meshd::down(h);
    }

    let median = |v: &[Sample], pick: fn(&Sample) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(pick).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    writeln!(md, "## (b) Through a published port, real TCP\n").unwrap();
    writeln!(
        md,
        "Client namespace -> host1 on the underlay bridge; two backends (a task on host1, a task on host2), \
         each a thread-per-connection line-echo server. {threads} client threads, {secs} s per measurement, \
         median of 3. `conn/s`: connect, one request/response, close. `req/s`: request/response on kept-alive \
         connections. Same topology and backends for every row; direct alternates between the two backends.\n"
    )
    .unwrap();
    writeln!(md, "| path | conn/s | req/s | connects that needed a SYN retransmit (3 runs) |\n|---|---:|---:|---:|").unwrap();
    let mut med = Vec::new();
    for (name, v) in &results {
        let (c, r) = (median(v, |x| x.conns), median(v, |x| x.reqs));
        let slow: u64 = v.iter().map(|x| x.slow).sum();
        med.push((c, r));
        writeln!(md, "| {name} | {c:.0} | {r:.0} | {slow} |").unwrap();
    }
    let (direct, mesh, nftm) = (med[0], med[1], med[2]);
    writeln!(
        md,
        "\nRatios: mesh/nftables = {:.2}x conn/s, {:.2}x req/s; mesh/direct = {:.2}x conn/s, {:.2}x req/s.\n",
        mesh.0 / nftm.0,
        mesh.1 / nftm.1,
        mesh.0 / direct.0,
        mesh.1 / direct.1
    )
    .unwrap();
}

/// One overlay network
/// holding `n` remote endpoints spread over 50 nodes.
fn overlay_table(n: usize, underlay: Ipv4Addr) -> OverlaySpec {
    let subnet: Subnet = "10.128.0.0/16".parse().expect("subnet");
    let remote = (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(subnet.network()) + 2 + i as u32);
            RemoteEndpoint {
                ip,
                mac: Mac::from_ipv4(ip),
                node: Ipv4Addr::new(198, 18, 0, 2 + (i % 50) as u8),
            }
        })
        .collect();
    OverlaySpec {
        underlay: Some(underlay),
        networks: vec![NetworkSpec {
            id: "bench".into(),
            vni: 4096,
            gateway: subnet.gateway(),
            subnet,
            mtu: None,
            encrypted: false,
            local: vec![],
            remote,
            host: None,
            vips: vec![],
        }],
    }
}

/// A namespace whose eth0 (one end of a veth pair) holds the underlay address.
fn overlay_namespace(underlay: Ipv4Addr) -> Netns {
    let ns = Netns::new();
    // No dummy driver on every kernel: a veth pair serves as well.
    ns.exec_ok(
        "ip",
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ],
    );
    ns.exec_ok(
        "ip",
        &["addr", "add", &format!("{underlay}/24"), "dev", "eth0"],
    );
    ns.exec_ok("ip", &["link", "set", "eth0", "up"]);
    ns
}

struct OverlayRow {
    n: usize,
    from_empty: Duration,
    from_empty_changes: u64,
    batch: Duration,
    single: Duration,
    single_table: Duration,
    single_changes: u64,
    full: Duration,
}

fn overlay_row(rt: &tokio::runtime::Runtime, n: usize) -> OverlayRow {
    let underlay = Ipv4Addr::new(198, 18, 0, 1);
    let ns = overlay_namespace(underlay);
    let spec = overlay_table(n, underlay);
    let nl = rt
        .block_on(async { Netlink::open(&ns.path()) })
        .expect("netlink");
    let mut overlay = Overlay::new(nl);
    let t = Instant::now();
    let report = rt
        .block_on(overlay.apply(spec.clone()))
        .expect("apply from empty");
    let from_empty = t.elapsed();

    // One endpoint moves to another node, then back: each is one FDB
    // replace. As a delta (what the agent gets), and as a whole table with
    // that one difference. Median of 101 each.
    let base_ep = spec.networks[0].remote[n / 2].clone();
    let mut moved_ep = base_ep.clone();
    moved_ep.node = Ipv4Addr::new(198, 18, 0, 200);
    let mut deltas = Vec::new();
    let mut tables = Vec::new();
    let mut single_changes = 0;
    for i in 0..101 {
        let ep = if i % 2 == 0 { &moved_ep } else { &base_ep };
        let change = Change::UpsertRemote {
            network: "bench".into(),
            endpoint: ep.clone(),
        };
        let t = Instant::now();
        let r = rt
            .block_on(overlay.apply_changes(&[change]))
            .expect("delta");
        deltas.push(t.elapsed());
        single_changes = single_changes.max(r.changes);
    }
    for i in 0..101 {
        let mut table = spec.clone();
        if i % 2 == 0 {
            table.networks[0].remote[n / 2] = moved_ep.clone();
        }
        let t = Instant::now();
        let r = rt.block_on(overlay.apply(table)).expect("table");
        tables.push(t.elapsed());
        single_changes = single_changes.max(r.changes);
    }
    deltas.sort();
    tables.sort();
    let t = Instant::now();
    let r = rt.block_on(overlay.reconcile()).expect("full reconcile");
    let full = t.elapsed();
    assert_eq!(
        r.changes, 0,
        "full reconcile of an unchanged table changed something"
    );

    // Baseline: the same neighbour and FDB entries written by iproute2 in
    // batch mode (one process each, no diffing, no reads), into a fresh namespace.
    let base = overlay_namespace(underlay);
    base.exec_ok(
        "ip",
        &[
            "link",
            "add",
            "mvx-4096",
            "type",
            "vxlan",
            "id",
            "4096",
            "dev",
            "eth0",
            "local",
            "198.18.0.1",
            "dstport",
            "4789",
            "nolearning",
            "proxy",
        ],
    );
    let dir = std::env::temp_dir();
    let neigh = dir.join(format!("mesh-bench-neigh-{}", std::process::id()));
    let fdb = dir.join(format!("mesh-bench-fdb-{}", std::process::id()));
    let mut neigh_text = String::new();
    let mut fdb_text = String::new();
    for r in &spec.networks[0].remote {
        writeln!(
            fdb_text,
            "fdb replace {} dev mvx-4096 dst {} self permanent",
            r.mac, r.node
        )
        .unwrap();
        writeln!(
            neigh_text,
            "neigh replace {} lladdr {} dev mvx-4096 nud permanent",
            r.ip, r.mac
        )
        .unwrap();
    }
    std::fs::write(&fdb, fdb_text).expect("write batch");
    std::fs::write(&neigh, neigh_text).expect("write batch");
    let t = Instant::now();
    base.exec_ok("bridge", &["-batch", &fdb.display().to_string()]);
    base.exec_ok("ip", &["-batch", &neigh.display().to_string()]);
    let batch = t.elapsed();
    let _ = std::fs::remove_file(&fdb);
    let _ = std::fs::remove_file(&neigh);

    rt.block_on(overlay.teardown()).expect("teardown");
    OverlayRow {
        n,
        from_empty,
        from_empty_changes: report.changes,
        batch,
        single: deltas[deltas.len() / 2],
        single_table: tables[tables.len() / 2],
        single_changes,
        full,
    }
}

fn overlay(md: &mut String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rows: Vec<OverlayRow> = [1_000, 10_000]
        .iter()
        .map(|&n| overlay_row(&rt, n))
        .collect();
    writeln!(md, "\n## (c) Overlay reconcile (`dataplane::overlay`)\n").unwrap();
    writeln!(
        md,
        "One network, N remote endpoints spread over 50 nodes, in a namespace whose underlay is a veth. \
         `from empty`: the first apply (bridge, VXLAN device, one FDB and one neighbour entry per endpoint; \
         it also reads the kernel first). `batch`: iproute2 writing the same entries with `bridge -batch` and \
         `ip -batch` (no reads, no diff). `one change`: one endpoint moves to another node, applied into the \
         full table as a delta (`Overlay::apply_changes`, what the agent receives), and as a whole table \
         with that one difference (`Overlay::apply`, which diffs in memory); median of 101 each. `full reconcile`: re-reading the kernel and diffing, with nothing to repair.\n"
    )
    .unwrap();
    writeln!(
        md,
        "| endpoints | from empty | netlink changes | iproute2 batch (baseline) | one change, delta | one change, whole table | changes | full reconcile |"
    )
    .unwrap();
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|").unwrap();
    for r in &rows {
        writeln!(
            md,
            "| {} | {:.1} ms | {} | {:.1} ms | {:.0} µs | {:.0} µs | {} | {:.1} ms |",
            r.n,
            r.from_empty.as_secs_f64() * 1e3,
            r.from_empty_changes,
            r.batch.as_secs_f64() * 1e3,
            r.single.as_secs_f64() * 1e6,
            r.single_table.as_secs_f64() * 1e6,
            r.single_changes,
            r.full.as_secs_f64() * 1e3,
        )
        .unwrap();
    }
    let (a, b) = (&rows[0], &rows[1]);
    writeln!(
        md,
        "\nA one-endpoint delta at {} endpoints costs {:.2}x what it costs at {} ({} netlink write either way); \
         the whole-table apply grows {:.1}x (in-memory diff) and the full reconcile {:.1}x (kernel dump).",
        b.n,
        b.single.as_secs_f64() / a.single.as_secs_f64(),
        a.n,
        a.single_changes,
        b.single_table.as_secs_f64() / a.single_table.as_secs_f64(),
        b.full.as_secs_f64() / a.full.as_secs_f64(),
    )
    .unwrap();
}
