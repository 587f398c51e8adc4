//! Differential testing of `tc_lb` and `xdp_parse`: random and mutated
//! frames go through BPF_PROG_TEST_RUN on the real object, and each result
//! is compared with [`mesh_tests::model`]: the verdict, every output byte,
//! the conntrack entry of the packet's flow, and at the end every
//! frontend's and backend's counters, the map sizes and the parser's
//! counters.
//!
//! The frames: flows to published ports, a VIP and a frontend with no
//! backend, replies to SNAT ports (known and unknown), and noise (other
//! addresses and ports, ICMP, ARP, IPv6); then mutated: truncated, IP
//! options, VLAN tags (one or two), fragments, bad versions, IHLs and
//! lengths, bad checksums, UDP checksum 0, TCP flag mixes and data
//! offsets, trailing padding, random byte flips.
//!
//! `MESH_FUZZ_PACKETS` (default 1,000,000) and `MESH_FUZZ_SEED` set the
//! run; a mismatch prints the seed and the frame.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{TestRun as _, TestRunOptions};
use dataplane::{
    ebpf::Datapath,
    lb::{BackendSpec, FrontendSpec, LbMaps as _, LbSpec, LbSync, Protocol, ServiceSpec},
    stats::ParserStats,
};
use dataplane_common::{CtEntry, FAMILY_V4, FlowKey, Frontend, FrontendKey, LbCounter, maps};
use mesh_tests::{
    frames::*,
    model::{
        lb::{Addr, Flow, Front, FrontKey, Model, Verdict},
        parse::{self, parse},
    },
    netns::lb_test_namespace,
    require_root,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;
const NODE: [u8; 4] = [198, 18, 0, 1];
const VIP: [u8; 4] = [10, 0, 9, 100];
/// The node's address on an overlay bridge, in the bridge round.
const HERE: [u8; 4] = [10, 0, 0, 3];
const WEB: u16 = 8080;
const DNS: u16 = 5353;
const EMPTY_TCP: u16 = 7070;
const EMPTY_UDP: u16 = 7071;
/// A wide SNAT range: the run makes ~100k flows (closed flows' ports stay
/// taken for their last second, and the run lasts seconds), and a range
/// that fills up makes drops the model can only call plausible.
const NAT_MIN: u16 = 32768;
const NAT_COUNT: u16 = 32768;

#[path = "differential/frames.rs"]
mod frames;
use frames::generate;

/// splitmix64: a small, seedable generator (the run is reproducible).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn spec() -> LbSpec {
    let backends = |port| -> Vec<BackendSpec> {
        (1..=3)
            .map(|i| BackendSpec {
                address: Ipv4Addr::new(198, 19, i, 2),
                port,
                weight: 1,
            })
            .collect()
    };
    let service = |id, name: &str, frontends, backends| ServiceSpec {
        id,
        name: name.into(),
        frontends,
        backends,
        table_size: 251,
    };
    let published = |port, protocol| FrontendSpec {
        address: None,
        port,
        protocol,
    };
    LbSpec {
        nat_address: Ipv4Addr::from(NODE),
        node_addresses: vec![Ipv4Addr::from(NODE)],
        nat_port_min: NAT_MIN,
        nat_port_count: NAT_COUNT,
        nat_interfaces: Default::default(),
        services: vec![
            service(1, "web", vec![published(WEB, Protocol::Tcp)], backends(80)),
            service(2, "dns", vec![published(DNS, Protocol::Udp)], backends(53)),
            service(
                3,
                "db@vip",
                vec![FrontendSpec {
                    address: Some(Ipv4Addr::from(VIP)),
                    port: 0,
                    protocol: Protocol::Tcp,
                }],
                backends(0),
            ),
            service(
                4,
                "empty",
                vec![
                    published(EMPTY_TCP, Protocol::Tcp),
                    published(EMPTY_UDP, Protocol::Udp),
                ],
                vec![],
            ),
        ],
    }
}

/// The model's view of the maps as the program sees them.
fn model_of(dp: &Datapath, here: Option<Addr>) -> Model {
    let ebpf = dp.ebpf();
    let fronts: HashMap<&MapData, FrontendKey, Frontend> =
        HashMap::try_from(ebpf.map(maps::FRONTENDS).unwrap()).unwrap();
    let backs: HashMap<&MapData, u32, dataplane_common::Backend> =
        HashMap::try_from(ebpf.map(maps::BACKENDS).unwrap()).unwrap();
    let tables: aya::maps::ArrayOfMaps<&MapData, aya::maps::Array<MapData, u32>> =
        aya::maps::ArrayOfMaps::try_from(ebpf.map(maps::MAGLEV).unwrap()).unwrap();
    let mut m = Model {
        node_addrs: [NODE].into(),
        nat_addr: NODE,
        nat_port_min: NAT_MIN,
        nat_port_count: NAT_COUNT,
        here,
        out_nat: here,
        // lb_test_namespace's routes.
        routes: vec![([198, 18, 0, 0], 24), ([198, 19, 0, 0], 16)],
        ..Model::default()
    };
    for e in fronts.iter() {
        let (k, f) = e.unwrap();
        m.frontends.insert(
            FrontKey {
                addr: k.addr_be[0].to_ne_bytes(),
                port: u16::from_be(k.port_be),
                proto: k.proto,
            },
            Front {
                id: f.id,
                backend_count: f.backend_count,
                table_size: f.table_size,
            },
        );
        if let Ok(t) = tables.get(&f.id, 0) {
            m.maglev
                .insert(f.id, t.iter().map(Result::unwrap).collect());
        }
    }
    for e in backs.iter() {
        let (id, b) = e.unwrap();
        m.backends
            .insert(id, (b.addr_be[0].to_ne_bytes(), u16::from_be(b.port_be)));
    }
    m
}

fn flow_key(f: &Flow) -> FlowKey {
    FlowKey {
        saddr_be: [u32::from_ne_bytes(f.saddr), 0, 0, 0],
        daddr_be: [u32::from_ne_bytes(f.daddr), 0, 0, 0],
        sport_be: f.sport.to_be(),
        dport_be: f.dport.to_be(),
        proto: f.proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// One packet of a flow, for `MESH_FUZZ_TRACE`: (index, kind, TCP flags,
/// verdict, SNAT port).
type Event = (u64, &'static str, u8, u32, Option<u16>);

/// Tallies of one run.
#[derive(Default, Debug)]
struct Tally {
    pass: u64,
    drop: u64,
    forward: u64,
    new_flows: u64,
    reply: u64,
    rejected: u64,
    reject_limited: u64,
    /// New flows dropped for want of a free SNAT port.
    exhausted: u64,
    /// Frames the TC test run refuses (see [`is_short_ip`]).
    untestable: u64,
    mismatches: Vec<String>,
}

/// An IPv4 or IPv6 frame shorter than its fixed IP header.
fn is_short_ip(f: &[u8]) -> bool {
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => f.len() < 14 + 20,
        0x86dd => f.len() < 14 + 40,
        _ => false,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `packets` frames from `seed` through both programs against the
/// model; `here`: on an overlay bridge with that address.
fn run(seed: u64, packets: u64, here: Option<Addr>) -> Tally {
    let (ns, ifindex) = lb_test_namespace();
    let mut dp = Datapath::load(None).expect("load the eBPF object");
    LbSync::new()
        .apply(&spec(), &mut dp.lb_maps())
        .expect("apply the spec");
    if let Some(h) = here {
        dp.lb_maps()
            .set_nat_interface(ifindex, Some(Ipv4Addr::from(h)))
            .expect("mark v0 as a bridge");
    }
    let mut model = model_of(&dp, here);
    let parser_before = ParserStats::read(dp.ebpf()).unwrap();
    let mut parser_want = ParserStats::default();
    let mut ctx = [0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut rng = Rng(seed);
    let mut t = Tally::default();
    // Conntrack through a second descriptor: the programs' runs borrow
    // the object mutably.
    let ct_map = {
        let aya::maps::Map::LruHashMap(d) = dp.ebpf().map(maps::CONNTRACK).unwrap() else {
            panic!("CONNTRACK is an LRU hash");
        };
        let id = d.info().unwrap().id();
        aya::maps::Map::from_map_data(MapData::from_id(id).unwrap()).unwrap()
    };
    ns.enter(|| {
        let ct: HashMap<&MapData, FlowKey, CtEntry> = HashMap::try_from(&ct_map).unwrap();
        let mut out = vec![0u8; 2048];
        // The reply flows made so far (to pick from in O(1)).
        let mut replies: Vec<Flow> = Vec::new();
        // MESH_FUZZ_TRACE=1: each flow's history, printed with a mismatch.
        let trace = std::env::var_os("MESH_FUZZ_TRACE").is_some();
        let mut history: std::collections::HashMap<Flow, Vec<Event>> = Default::default();
        for i in 0..packets {
            let case = generate(&mut rng, &replies);
            let frame = &case.frame;
            let p = parse(frame);
            let this = Flow {
                saddr: p.saddr,
                daddr: p.daddr,
                sport: p.sport,
                dport: p.dport,
                proto: p.ip_proto,
            };
            let past = if trace {
                history
                    .get(&this)
                    .map(|h| {
                        h.iter()
                            .map(|e| format!("{e:?}"))
                            .collect::<Vec<_>>()
                            .join("\n    ")
                    })
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let mut fail = |what: String| {
                if t.mismatches.len() < 20 {
                    t.mismatches.push(format!(
                        "packet {i} ({}, seed {seed}): {what}\n  in  {}\n  history\n    {past}",
                        case.kind,
                        hex(frame)
                    ));
                }
            };
            // The parser: always a pass, the bytes untouched; counted.
            let x = dp
                .parser()
                .unwrap()
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ..TestRunOptions::default()
                })
                .unwrap_or_else(|e| panic!("xdp test run of {} ({}): {e}", hex(frame), case.kind));
            if x.return_value != XDP_PASS || out[..x.data_size_out as usize] != frame[..] {
                fail(format!(
                    "xdp_parse: verdict {} or bytes changed",
                    x.return_value
                ));
            }
            let len = frame.len() as u64;
            let count = |c: &mut dataplane_common::Counter| {
                c.packets += 1;
                c.bytes += len;
            };
            count(&mut parser_want.proto[p.l3_class as usize]);
            if let Some(c) = p.l4_class {
                count(&mut parser_want.proto[c as usize]);
            }
            if p.vlan_tags > 0 {
                count(&mut parser_want.proto[parse::VLAN as usize]);
            }
            count(&mut parser_want.outcome[p.outcome as usize]);

            // The load balancer.
            let want = model.decide(frame);
            let r = match dp.lb().unwrap().test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            }) {
                Ok(r) => r,
                // BPF_PROG_TEST_RUN for TC refuses an IPv4 or IPv6 frame
                // too short for its IP header (a device would deliver it).
                Err(_) if is_short_ip(frame) => {
                    t.untestable += 1;
                    continue;
                }
                Err(e) => panic!("tc test run of {} ({}): {e}", hex(frame), case.kind),
            };
            let got = &out[..r.data_size_out as usize];
            let rv = r.return_value;
            let mut learned = None;
            let mut answered = false;
            match &want {
                Verdict::Pass => {
                    t.pass += 1;
                    if rv != TC_ACT_OK || got != &frame[..] {
                        fail(format!("want pass unchanged, got {rv}\n  out {}", hex(got)));
                    }
                }
                Verdict::Drop | Verdict::Unroutable { .. } | Verdict::ReplyUnroutable => {
                    t.drop += 1;
                    if rv != TC_ACT_SHOT {
                        fail(format!("want drop, got {rv}\n  out {}", hex(got)));
                    }
                }
                Verdict::Reply(bytes) => {
                    t.reply += 1;
                    if rv != TC_ACT_REDIRECT || got != &bytes[..] {
                        fail(format!(
                            "want reply {rv}\n  out  {}\n  want {}",
                            hex(got),
                            hex(bytes)
                        ));
                    }
                }
                Verdict::Reject { answer, .. } => match (answer, rv) {
                    (Some(a), TC_ACT_REDIRECT) if got == &a[..] => {
                        t.rejected += 1;
                        answered = true;
                    }
                    (Some(_), TC_ACT_SHOT) => t.reject_limited += 1,
                    (None, TC_ACT_SHOT) => t.drop += 1,
                    _ => fail(format!(
                        "want reject {:?}, got {rv}\n  out  {}",
                        answer.as_deref().map(hex),
                        hex(got)
                    )),
                },
                Verdict::Forward {
                    flow,
                    frontend,
                    backend,
                    nat_port,
                    new_flow,
                    ..
                } => {
                    // A fresh port can run out: 32 random tries all hit
                    // taken ports. Plausible only with the range mostly full.
                    if nat_port.is_none() && rv == TC_ACT_SHOT {
                        let full = model.nat_occupancy(&want);
                        if full < 0.75 {
                            fail(format!(
                                "dropped with the SNAT range {:.0}% full",
                                full * 100.0
                            ));
                        }
                        t.exhausted += 1;
                        model.commit(
                            frame,
                            &Verdict::Unroutable {
                                frontend: *frontend,
                            },
                            None,
                            false,
                        );
                        continue;
                    }
                    t.forward += 1;
                    t.new_flows += u64::from(*new_flow);
                    let entry = ct.get(&flow_key(flow), 0).ok();
                    let port = match (nat_port, entry) {
                        (Some(p), _) => *p,
                        (None, Some(e)) => {
                            let p = u16::from_be(e.nat_port_be);
                            if !model.port_free(&want, p) {
                                fail(format!("SNAT port {p} taken by another live flow"));
                            }
                            learned = Some(p);
                            p
                        }
                        (None, None) => {
                            fail(format!("forward {rv} made no conntrack entry"));
                            0
                        }
                    };
                    match entry {
                        Some(e)
                            if e.backend_id == *backend && u16::from_be(e.nat_port_be) == port => {}
                        e => fail(format!(
                            "conntrack {e:?}, want backend {backend} nat port {port}"
                        )),
                    }
                    let bytes = Model::forwarded(frame, &want, port);
                    if rv != TC_ACT_REDIRECT || got != &bytes[..] {
                        fail(format!(
                            "want forward, got {rv}\n  out  {}\n  want {}",
                            hex(got),
                            hex(&bytes)
                        ));
                    }
                }
            }
            if !matches!(want, Verdict::Forward { .. })
                && p.outcome == parse::PARSED
                && p.ethertype == 0x0800
                && (p.ip_proto == TCP || p.ip_proto == UDP)
            {
                // Anything but a forward leaves the flow's entry as it was.
                let flow = Flow {
                    saddr: p.saddr,
                    daddr: p.daddr,
                    sport: p.sport,
                    dport: p.dport,
                    proto: p.ip_proto,
                };
                let kernel = ct.get(&flow_key(&flow), 0).ok().map(|e| e.backend_id);
                let ours = model.conntrack.get(&flow).map(|c| c.backend);
                if kernel != ours {
                    fail(format!(
                        "conntrack of a non-forward: {kernel:?}, want {ours:?}"
                    ));
                }
            }
            if trace && p.outcome == parse::PARSED {
                let port = match &want {
                    Verdict::Forward { nat_port, .. } => nat_port.or(learned),
                    _ => None,
                };
                history
                    .entry(this)
                    .or_default()
                    .push((i, case.kind, p.tcp_flags, rv, port));
            }
            if learned.is_some() || !matches!(want, Verdict::Forward { nat_port: None, .. }) {
                let before = model.revnat.len();
                model.commit(frame, &want, learned, answered);
                if model.revnat.len() > before
                    && let (
                        Verdict::Forward {
                            flow, to, nat_addr, ..
                        },
                        Some(port),
                    ) = (&want, learned)
                {
                    replies.push(Flow {
                        saddr: to.0,
                        daddr: *nat_addr,
                        sport: to.1,
                        dport: port,
                        proto: flow.proto,
                    });
                }
            }
        }
    });

    // The maps and counters after the run.
    let ebpf = dp.ebpf();
    let ct: HashMap<&MapData, FlowKey, CtEntry> =
        HashMap::try_from(ebpf.map(maps::CONNTRACK).unwrap()).unwrap();
    let rev: HashMap<&MapData, FlowKey, dataplane_common::RevNat> =
        HashMap::try_from(ebpf.map(maps::REVNAT).unwrap()).unwrap();
    let (n_ct, n_rev) = (ct.keys().count(), rev.keys().count());
    if (n_ct, n_rev) != (model.conntrack.len(), model.revnat.len()) {
        t.mismatches.push(format!(
            "map sizes: conntrack {n_ct}, revnat {n_rev}; want {}, {}",
            model.conntrack.len(),
            model.revnat.len()
        ));
    }
    for (map, stats) in [
        (maps::FRONTEND_STATS, &model.front_stats),
        (maps::BACKEND_STATS, &model.back_stats),
    ] {
        let a: PerCpuArray<&MapData, LbCounter> =
            PerCpuArray::try_from(ebpf.map(map).unwrap()).unwrap();
        for id in 0..64u32 {
            let got = a.get(&id, 0).unwrap().iter().fold([0u64; 4], |s, c| {
                [
                    s[0] + c.packets,
                    s[1] + c.bytes,
                    s[2] + c.new_flows,
                    s[3] + c.rejected,
                ]
            });
            let want = stats.get(&id).copied().unwrap_or_default();
            if got != want {
                t.mismatches.push(format!(
                    "{map}[{id}] (packets, bytes, new flows, rejected): {got:?}, want {want:?}"
                ));
            }
        }
    }
    let parser_got = ParserStats::read(dp.ebpf()).unwrap().since(&parser_before);
    if parser_got != parser_want {
        t.mismatches.push(format!(
            "parser counters\n  got  {parser_got:?}\n  want {parser_want:?}"
        ));
    }
    t
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?}: {e}")),
        Err(_) => default,
    }
}

/// 1M frames (`MESH_FUZZ_PACKETS`) on the underlay and a tenth of that
/// on an overlay bridge, 0 mismatches.
#[test]
fn tc_lb_and_the_parser_match_the_model_on_random_frames() {
    let Some(_root) =
        require_root("packet::differential::tc_lb_and_the_parser_match_the_model_on_random_frames")
    else {
        return;
    };
    let packets = env_u64("MESH_FUZZ_PACKETS", 1_000_000);
    let seed = env_u64(
        "MESH_FUZZ_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    let started = std::time::Instant::now();
    let mut all = Vec::new();
    let rounds = [(None, packets), (Some(HERE), (packets / 10).max(1))];
    let mut lines = Vec::new();
    for (i, (here, n)) in rounds.into_iter().enumerate() {
        let t = run(seed.wrapping_add(i as u64), n, here);
        lines.push(format!(
            "{} {n}: {} pass, {} drop, {} forward ({} new flows), {} reply, {} rejected ({} rate-limited), {} without a free SNAT port, {} too short for a TC test run",
            if here.is_some() { "bridge" } else { "underlay" },
            t.pass,
            t.drop,
            t.forward,
            t.new_flows,
            t.reply,
            t.rejected,
            t.reject_limited,
            t.exhausted,
            t.untestable
        ));
        assert!(
            t.forward > 0 && t.reply > 0 && t.pass > 0 && t.drop > 0,
            "{t:?}"
        );
        all.extend(t.mismatches);
    }
    let total: u64 = packets + (packets / 10).max(1);
    mesh_tests::figures::figure(&format!(
        "differential: {total} frames through tc_lb and xdp_parse vs the model (seed {seed}), \
         {} mismatches, {:.1} s; {}",
        all.len(),
        started.elapsed().as_secs_f64(),
        lines.join("; ")
    ));
    assert!(
        all.is_empty(),
        "{} mismatches (seed {seed}; MESH_FUZZ_SEED={seed} repeats the run):\n{}",
        all.len(),
        all.join("\n")
    );
}
