//! The load balancer (`tc_lb`) on crafted frames: published ports and VIPs
//! translated both ways, options and checksums kept, other traffic
//! untouched, established flows pinned, rejects rate-limited, an overlay
//! bridge failing closed.

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use aya::programs::{TestRun as _, TestRunOptions};
use dataplane::ebpf::Datapath;
use dataplane::lb::{BackendSpec, FrontendSpec, LbSpec, LbSync, Protocol, ServiceSpec};
use dataplane_common::{Backend, CtEntry, FAMILY_V4, FlowKey, maps};
use mesh_tests::{Netns, frames::*, netns::lb_test_namespace, require_root};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const WEB_PORT: u16 = 8080;
const DNS_PORT: u16 = 5353;
/// A service VIP: not a node address; it answers every port.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 100);

fn backend(i: u8) -> BackendSpec {
    BackendSpec {
        address: Ipv4Addr::new(198, 19, i, 2),
        port: 80,
        weight: 1,
    }
}

fn spec(backends: &[u8]) -> LbSpec {
    let backends: Vec<BackendSpec> = backends.iter().map(|i| backend(*i)).collect();
    LbSpec {
        nat_address: NODE,
        node_addresses: vec![NODE],
        nat_port_min: 61000,
        nat_port_count: 4536,
        nat_interfaces: Default::default(),
        services: vec![
            ServiceSpec {
                id: 1,
                name: "web".into(),
                frontends: vec![FrontendSpec {
                    address: None,
                    port: WEB_PORT,
                    protocol: Protocol::Tcp,
                }],
                backends: backends.clone(),
                table_size: 251,
            },
            ServiceSpec {
                id: 2,
                name: "dns".into(),
                frontends: vec![FrontendSpec {
                    address: None,
                    port: DNS_PORT,
                    protocol: Protocol::Udp,
                }],
                backends: backends
                    .iter()
                    .map(|b| BackendSpec {
                        port: 53,
                        ..b.clone()
                    })
                    .collect(),
                table_size: 251,
            },
            ServiceSpec {
                id: 3,
                name: "db@vip".into(),
                frontends: vec![FrontendSpec {
                    address: Some(VIP),
                    port: 0,
                    protocol: Protocol::Tcp,
                }],
                backends: backends
                    .iter()
                    .map(|b| BackendSpec {
                        port: 0,
                        ..b.clone()
                    })
                    .collect(),
                table_size: 251,
            },
        ],
    }
}

/// A namespace with a routed underlay, the program loaded and a spec applied.
struct Env {
    ns: Netns,
    dp: Datapath,
    sync: LbSync,
    ifindex: u32,
}

impl Env {
    fn new(backends: &[u8]) -> Env {
        let (ns, ifindex) = lb_test_namespace();
        let mut dp = Datapath::load(None).expect("load");
        let mut sync = LbSync::new();
        sync.apply(&spec(backends), &mut dp.lb_maps())
            .expect("apply");
        Env {
            ns,
            dp,
            sync,
            ifindex,
        }
    }

    fn apply(&mut self, backends: &[u8]) {
        self.sync
            .apply(&spec(backends), &mut self.dp.lb_maps())
            .expect("apply");
    }

    /// Runs tc_lb on `frame` as if it arrived on v0; returns (verdict, output).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes()); // __sk_buff.ifindex
        let prog = self.dp.lb().expect("tc_lb");
        let (rv, out) = self.ns.enter(|| {
            let mut out = vec![0u8; frame.len() + 256];
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::default()
                })
                .expect("BPF_PROG_TEST_RUN");
            out.truncate(r.data_size_out as usize);
            (r.return_value, out)
        });
        (rv, out)
    }

    fn conntrack(&self, client: (Ipv4Addr, u16), port: u16, proto: u8) -> Option<CtEntry> {
        let ct: HashMap<&MapData, FlowKey, CtEntry> =
            HashMap::try_from(self.dp.ebpf().map(maps::CONNTRACK).unwrap()).unwrap();
        ct.get(&flow(client, (NODE, port), proto), 0).ok()
    }

    fn backend_of(&self, ct: &CtEntry) -> Ipv4Addr {
        let b: HashMap<&MapData, u32, Backend> =
            HashMap::try_from(self.dp.ebpf().map(maps::BACKENDS).unwrap()).unwrap();
        let b = b
            .get(&ct.backend_id, 0)
            .expect("backend of a conntrack entry");
        Ipv4Addr::from(b.addr_be[0].to_ne_bytes())
    }
}

fn flow(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> FlowKey {
    FlowKey {
        saddr_be: [u32::from_ne_bytes(src.0.octets()), 0, 0, 0],
        daddr_be: [u32::from_ne_bytes(dst.0.octets()), 0, 0, 0],
        sport_be: src.1.to_be(),
        dport_be: dst.1.to_be(),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// Sends `frame` (client -> node) and checks it comes out DNATed to the
/// conntrack entry's backend and SNATed to the node, byte for byte.
/// Returns (backend, nat port).
fn expect_forward(
    env: &mut Env,
    frame: &[u8],
    client: (Ipv4Addr, u16),
    port: u16,
    proto: u8,
) -> (Ipv4Addr, u16) {
    let (rv, out) = env.run(frame);
    assert_eq!(
        rv, TC_ACT_REDIRECT,
        "forward verdict; in {frame:02x?} out {out:02x?}"
    );
    let ct = env
        .conntrack(client, port, proto)
        .expect("conntrack entry created");
    let backend = env.backend_of(&ct);
    let nat_port = u16::from_be(ct.nat_port_be);
    assert!(
        (61000..65536u32).contains(&u32::from(nat_port)),
        "nat port {nat_port}"
    );
    let backend_port = if proto == TCP { 80 } else { 53 };
    let mut want = frame.to_vec();
    set_v4_endpoints(&mut want, (NODE, nat_port), (backend, backend_port));
    assert_eq!(out, want, "forward rewrite");
    assert!(v4_checksums_ok(&out), "checksums after DNAT/SNAT");
    (backend, nat_port)
}

#[test]
fn syn_to_published_port_and_its_reply_are_translated() {
    let Some(_root) =
        require_root("packet::lb::syn_to_published_port_and_its_reply_are_translated")
    else {
        return;
    };
    let mut env = Env::new(&[1, 2, 3]);
    let client = (CLIENT, 40000);
    let syn = v4_flow(TCP, client, (NODE, WEB_PORT), 0x02, 0);
    let (backend, nat_port) = expect_forward(&mut env, &syn, client, WEB_PORT, TCP);

    let syn_ack = v4_flow(TCP, (backend, 80), (NODE, nat_port), 0x12, 0);
    let (rv, out) = env.run(&syn_ack);
    assert_eq!(rv, TC_ACT_REDIRECT, "reply verdict");
    let want = v4_flow(TCP, (NODE, WEB_PORT), client, 0x12, 0);
    assert_eq!(out, want, "reply reverse-NATed to the client");
    assert!(v4_checksums_ok(&out));
}

#[test]
fn a_vip_answers_any_port_at_the_same_port_on_the_backend() {
    let Some(_root) =
        require_root("packet::lb::a_vip_answers_any_port_at_the_same_port_on_the_backend")
    else {
        return;
    };
    let mut env = Env::new(&[1, 2, 3]);
    for (i, port) in [5432u16, 6379, 80].into_iter().enumerate() {
        let client = (CLIENT, 41000 + i as u16);
        let syn = v4_flow(TCP, client, (VIP, port), 0x02, 0);
        let (rv, out) = env.run(&syn);
        assert_eq!(rv, TC_ACT_REDIRECT, "port {port}: {out:02x?}");
        let ct: HashMap<&MapData, FlowKey, CtEntry> =
            HashMap::try_from(env.dp.ebpf().map(maps::CONNTRACK).unwrap()).unwrap();
        let ct = ct
            .get(&flow(client, (VIP, port), TCP), 0)
            .expect("conntrack entry");
        let backend = env.backend_of(&ct);
        let nat_port = u16::from_be(ct.nat_port_be);
        let mut want = syn.clone();
        set_v4_endpoints(&mut want, (NODE, nat_port), (backend, port));
        assert_eq!(out, want, "port {port}: DNAT to the same port");
        assert!(v4_checksums_ok(&out));
        let reply = v4_flow(TCP, (backend, port), (NODE, nat_port), 0x12, 0);
        let (rv, out) = env.run(&reply);
        assert_eq!(rv, TC_ACT_REDIRECT);
        assert_eq!(
            out,
            v4_flow(TCP, (VIP, port), client, 0x12, 0),
            "port {port}: reply"
        );
    }
    // The same frontend takes UDP, at its port too.
    let client = (CLIENT, 41100);
    let dgram = v4_flow(UDP, client, (VIP, 5353), 0, 10);
    let (rv, out) = env.run(&dgram);
    assert_eq!(rv, TC_ACT_REDIRECT, "udp: {out:02x?}");
    let ct: HashMap<&MapData, FlowKey, CtEntry> =
        HashMap::try_from(env.dp.ebpf().map(maps::CONNTRACK).unwrap()).unwrap();
    let ct = ct
        .get(&flow(client, (VIP, 5353), UDP), 0)
        .expect("udp conntrack");
    let mut want = dgram.clone();
    set_v4_endpoints(
        &mut want,
        (NODE, u16::from_be(ct.nat_port_be)),
        (env.backend_of(&ct), 5353),
    );
    assert_eq!(out, want);
    // Another address, any port: not a frontend, untouched.
    let other = v4_flow(
        TCP,
        (CLIENT, 41200),
        (Ipv4Addr::new(10, 0, 9, 101), 5432),
        0x02,
        0,
    );
    let (rv, out) = env.run(&other);
    assert_eq!((rv, out), (TC_ACT_OK, other));
}

#[test]
fn udp_request_and_reply_are_translated() {
    let Some(_root) = require_root("packet::lb::udp_request_and_reply_are_translated") else {
        return;
    };
    let mut env = Env::new(&[1, 2]);
    let client = (CLIENT, 33333);
    let query = v4_flow(UDP, client, (NODE, DNS_PORT), 0, 40);
    let (backend, nat_port) = expect_forward(&mut env, &query, client, DNS_PORT, UDP);
    let answer = v4_flow(UDP, (backend, 53), (NODE, nat_port), 0, 90);
    let (rv, out) = env.run(&answer);
    assert_eq!(rv, TC_ACT_REDIRECT);
    assert_eq!(out, v4_flow(UDP, (NODE, DNS_PORT), client, 0, 90));
}

#[test]
fn ipv4_options_are_kept_and_checksums_stay_valid() {
    let Some(_root) = require_root("packet::lb::ipv4_options_are_kept_and_checksums_stay_valid")
    else {
        return;
    };
    let mut env = Env::new(&[1, 2, 3]);
    let client = (CLIENT, 40001);
    let syn = tcp(client.1, WEB_PORT, 0x02);
    let mut frame = cat(&[
        &eth(ETH_IP),
        &ipv4(TCP, syn.len(), &[0x94, 4, 0, 0, 1, 1, 1, 0], 0),
        &syn,
    ]);
    set_v4_endpoints(&mut frame, client, (NODE, WEB_PORT));
    expect_forward(&mut env, &frame, client, WEB_PORT, TCP);
}

#[test]
fn traffic_that_is_not_for_a_frontend_is_untouched() {
    let Some(_root) = require_root("packet::lb::traffic_that_is_not_for_a_frontend_is_untouched")
    else {
        return;
    };
    let mut env = Env::new(&[1, 2]);
    let client = (CLIENT, 40002);
    let mut cases = vec![
        (
            "non-matching port",
            v4_flow(TCP, client, (NODE, 9999), 0x02, 0),
        ),
        (
            "udp to the tcp frontend's port",
            v4_flow(UDP, client, (NODE, WEB_PORT), 0, 8),
        ),
        (
            "address that is not the node's",
            v4_flow(
                TCP,
                client,
                (Ipv4Addr::new(198, 18, 0, 7), WEB_PORT),
                0x02,
                0,
            ),
        ),
    ];
    let good = v4_flow(TCP, client, (NODE, WEB_PORT), 0x02, 0);
    let mut truncated = good[..good.len() - 6].to_vec();
    let ip_len = (truncated.len() - 14) as u16;
    truncated[16..18].copy_from_slice(&ip_len.to_be_bytes());
    cases.push(("truncated tcp header", truncated));
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44;
    cases.push(("ihl 4", bad_ihl));
    let mut bad_doff = good.clone();
    bad_doff[14 + 20 + 12] = 0x30;
    cases.push(("tcp data offset 3", bad_doff));
    let mut later_fragment = v4_flow(UDP, client, (NODE, DNS_PORT), 0, 32);
    later_fragment[20..22].copy_from_slice(&100u16.to_be_bytes());
    cases.push(("non-first fragment", later_fragment));
    let mut first_fragment = v4_flow(UDP, client, (NODE, DNS_PORT), 0, 32);
    first_fragment[20..22].copy_from_slice(&0x2000u16.to_be_bytes());
    cases.push(("first fragment", first_fragment));
    for (what, frame) in cases {
        let (rv, out) = env.run(&frame);
        assert_eq!(rv, TC_ACT_OK, "{what}: verdict");
        assert_eq!(out, frame, "{what}: must pass unchanged");
    }
    assert!(
        env.conntrack(client, WEB_PORT, TCP).is_none(),
        "no flow was created"
    );
    assert!(
        env.conntrack(client, DNS_PORT, UDP).is_none(),
        "no flow was created"
    );
}

/// On an overlay bridge (v0 given the node's address there) the program
/// fails closed: before the load balancer is configured, a task's
/// packet to anywhere but that address is dropped, not passed (a pass
/// routed it past network isolation); to that address it passes.
#[test]
fn an_overlay_bridge_fails_closed_before_it_is_configured() {
    let Some(_root) =
        require_root("packet::lb::an_overlay_bridge_fails_closed_before_it_is_configured")
    else {
        return;
    };
    use dataplane::lb::LbMaps as _;
    const HERE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    let mut env = Env::new(&[1]);
    env.dp
        .lb_maps()
        .set_nat_interface(env.ifindex, Some(HERE))
        .expect("mark v0 as a bridge");
    let task = (Ipv4Addr::new(10, 0, 0, 7), 40005);
    let elsewhere = v4_flow(TCP, task, (Ipv4Addr::new(10, 0, 1, 9), 5432), 0x02, 0);
    let to_here = v4_flow(TCP, task, (HERE, 53), 0x02, 0);
    // Configured: isolation holds.
    assert_eq!(env.run(&elsewhere).0, TC_ACT_SHOT, "configured, elsewhere");
    assert_eq!(env.run(&to_here).0, TC_ACT_OK, "configured, to the bridge");
    // Not configured (no NAT address): the same verdicts.
    env.dp
        .lb_maps()
        .set_config(&dataplane_common::LbConfig {
            nat_addr_be: [0; 4],
            nat_port_min: 0,
            nat_port_count: 0,
            _pad: 0,
        })
        .expect("clear the config");
    assert_eq!(
        env.run(&elsewhere).0,
        TC_ACT_SHOT,
        "unconfigured, elsewhere"
    );
    assert_eq!(
        env.run(&to_here).0,
        TC_ACT_OK,
        "unconfigured, to the bridge"
    );
}

#[test]
fn an_established_flow_keeps_its_backend_when_others_change() {
    let Some(_root) =
        require_root("packet::lb::an_established_flow_keeps_its_backend_when_others_change")
    else {
        return;
    };
    let mut env = Env::new(&[1, 2]);
    let client = (CLIENT, 40003);
    let syn = v4_flow(TCP, client, (NODE, WEB_PORT), 0x02, 0);
    let (backend, nat_port) = expect_forward(&mut env, &syn, client, WEB_PORT, TCP);
    let keep = backend.octets()[2];
    let others: Vec<u8> = [1u8, 2].into_iter().filter(|b| *b != keep).collect();
    // Add five backends and remove the other original one.
    let mut changed = vec![keep, 10, 11, 12, 13, 14];
    changed.retain(|b| !others.contains(b));
    env.apply(&changed);
    let ack = v4_flow(TCP, client, (NODE, WEB_PORT), 0x10, 100);
    let (again, again_port) = expect_forward(&mut env, &ack, client, WEB_PORT, TCP);
    assert_eq!(
        (again, again_port),
        (backend, nat_port),
        "conntrack hit keeps backend and NAT port"
    );
}

/// The `rejected` count of the frontend on `port` (summed over CPUs).
fn rejected(env: &Env, port: u16) -> u64 {
    use aya::maps::PerCpuArray;
    use dataplane_common::{Frontend, FrontendKey, LbCounter};
    let fronts: HashMap<&MapData, FrontendKey, Frontend> =
        HashMap::try_from(env.dp.ebpf().map(maps::FRONTENDS).unwrap()).unwrap();
    let stats: PerCpuArray<&MapData, LbCounter> =
        PerCpuArray::try_from(env.dp.ebpf().map(maps::FRONTEND_STATS).unwrap()).unwrap();
    let (_, f) = fronts
        .iter()
        .map(Result::unwrap)
        .find(|(k, _)| u16::from_be(k.port_be) == port && k.addr_be[0] == 0)
        .expect("frontend on that port");
    stats
        .get(&f.id, 0)
        .unwrap()
        .iter()
        .map(|c| c.rejected)
        .sum()
}

/// A frontend with no backend answers as a closed port does: a TCP
/// segment gets a RST (RFC 793's two forms), a UDP datagram an ICMP
/// port unreachable quoting it; each counted. A RST, and a datagram with
/// IP options, get no answer and are dropped.
#[test]
fn a_frontend_with_no_backend_answers_with_a_reset_or_port_unreachable() {
    let Some(_root) = require_root(
        "packet::lb::a_frontend_with_no_backend_answers_with_a_reset_or_port_unreachable",
    ) else {
        return;
    };
    use mesh_tests::model;
    let mut env = Env::new(&[]);
    let client = (CLIENT, 40010);
    let check = |what: &str, input: &[u8], out: &[u8]| {
        let want = model::reject(input, 14).expect("an answer is due");
        assert_eq!(out, &want[..], "{what}: answer bytes");
        assert_eq!(
            &out[0..6],
            &input[6..12],
            "{what}: back to the sender's MAC"
        );
        assert_eq!(&out[26..30], &input[30..34], "{what}: from the frontend");
        assert_eq!(&out[30..34], &input[26..30], "{what}: to the client");
    };
    // A SYN: RST|ACK acking the SYN.
    let syn = v4_flow(TCP, client, (NODE, WEB_PORT), 0x02, 0);
    let (rv, out) = env.run(&syn);
    assert_eq!(rv, TC_ACT_REDIRECT, "syn: {out:02x?}");
    check("syn", &syn, &out);
    assert_eq!(out.len(), 54);
    assert_eq!(out[47], 0x14, "RST|ACK");
    assert_eq!(&out[42..46], &2u32.to_be_bytes(), "ack = seq 1 + SYN");
    assert!(v4_checksums_ok(&out), "rst checksums");
    // Data on an established flow whose backends all went: RST at its ack.
    let mut data = v4_flow(TCP, client, (NODE, WEB_PORT), 0x18, 100);
    data[42..46].copy_from_slice(&777u32.to_be_bytes());
    fix_v4_checksums(&mut data);
    let (rv, out) = env.run(&data);
    assert_eq!(rv, TC_ACT_REDIRECT);
    check("data", &data, &out);
    assert_eq!(out[47], 0x04, "RST alone");
    assert_eq!(&out[38..42], &777u32.to_be_bytes(), "seq = its ack");
    assert!(v4_checksums_ok(&out));
    // UDP: ICMP port unreachable, quoting the IP and UDP headers.
    let q = v4_flow(UDP, (CLIENT, 33334), (NODE, DNS_PORT), 0, 40);
    let (rv, out) = env.run(&q);
    assert_eq!(rv, TC_ACT_REDIRECT, "udp: {out:02x?}");
    check("udp", &q, &out);
    assert_eq!((out[23], out[34], out[35]), (ICMP, 3, 3), "icmp 3/3");
    assert_eq!(&out[42..70], &q[14..42], "the quote");
    assert_eq!(checksum(&out[14..34]), 0, "ip checksum");
    assert_eq!(checksum(&out[34..70]), 0, "icmp checksum");
    // No answer: a RST, a datagram with IP options, a broadcast source.
    let rst = v4_flow(TCP, client, (NODE, WEB_PORT), 0x04, 0);
    let udp_opts = v4_flow(UDP, (CLIENT, 33335), (NODE, DNS_PORT), 0, 8);
    let udp_opts = {
        let l4 = udp_opts[34..].to_vec();
        let mut f = cat(&[&eth(ETH_IP), &ipv4(UDP, l4.len(), &[1, 1, 1, 0], 0), &l4]);
        set_v4_endpoints(&mut f, (CLIENT, 33335), (NODE, DNS_PORT));
        f
    };
    let bcast = v4_flow(UDP, (Ipv4Addr::BROADCAST, 68), (NODE, DNS_PORT), 0, 8);
    for (what, frame) in [("rst", rst), ("ip options", udp_opts), ("broadcast", bcast)] {
        assert_eq!(model::reject(&frame, 14), None, "{what}: the model");
        let (rv, _) = env.run(&frame);
        assert_eq!(rv, TC_ACT_SHOT, "{what}: dropped unanswered");
    }
    assert_eq!(rejected(&env, WEB_PORT), 2, "web rejects counted");
    assert_eq!(rejected(&env, DNS_PORT), 1, "dns rejects counted");
    // With a backend again, the same SYN is forwarded, not refused.
    env.apply(&[1]);
    expect_forward(&mut env, &syn, client, WEB_PORT, TCP);
}

/// Answers are rate-limited: a burst of SYNs to a frontend with no
/// backend gets at most the burst (plus what the clock refilled)
/// answered; the rest are dropped.
#[test]
fn rejects_are_rate_limited() {
    let Some(_root) = require_root("packet::lb::rejects_are_rate_limited") else {
        return;
    };
    let mut env = Env::new(&[]);
    let sent = 2000u16;
    let mut answered = 0u64;
    for i in 0..sent {
        let syn = v4_flow(TCP, (CLIENT, 20000 + i), (NODE, WEB_PORT), 0x02, 0);
        match env.run(&syn).0 {
            TC_ACT_REDIRECT => answered += 1,
            TC_ACT_SHOT => {}
            v => panic!("verdict {v}"),
        }
    }
    assert!(answered >= 100, "the burst is answered: {answered}");
    assert!(
        answered < u64::from(sent),
        "not all {sent} answered: {answered}"
    );
    assert_eq!(rejected(&env, WEB_PORT), answered);
}

#[test]
fn a_udp_flow_to_a_removed_backend_is_resteered_at_once() {
    let Some(_root) =
        require_root("packet::lb::a_udp_flow_to_a_removed_backend_is_resteered_at_once")
    else {
        return;
    };
    let mut env = Env::new(&[1, 2, 3]);
    let client = (CLIENT, 40004);
    let q = v4_flow(UDP, client, (NODE, DNS_PORT), 0, 20);
    let (backend, _) = expect_forward(&mut env, &q, client, DNS_PORT, UDP);
    let gone = backend.octets()[2];
    let rest: Vec<u8> = [1u8, 2, 3].into_iter().filter(|b| *b != gone).collect();
    env.apply(&rest);
    let (next, _) = expect_forward(&mut env, &q, client, DNS_PORT, UDP);
    assert_ne!(
        next, backend,
        "the next datagram must not go to the removed backend"
    );
    assert!(rest.contains(&next.octets()[2]));
}
