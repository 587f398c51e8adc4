//! Packet tier: mesh's XDP programs run on crafted frames with
//! BPF_PROG_TEST_RUN, in the style of katran's BpfTester. Each fixture names
//! the input bytes, the expected verdict, the expected output bytes and the
//! expected counter deltas.

use aya::programs::TestRun as _;
use aya::programs::TestRunOptions;
use dataplane::{ebpf::Datapath, stats::ParserStats};
use dataplane_common::{Counter, maps, outcome, proto};
use mesh_tests::require_root;

const XDP_PASS: u32 = 2;

struct Fixture {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    /// `None`: the frame must come out byte-for-byte unchanged.
    output: Option<Vec<u8>>,
    /// Protocol classes that count this packet once each.
    protos: &'static [u32],
    outcome: u32,
}

fn fixture(name: &'static str, input: Vec<u8>, protos: &'static [u32], outcome: u32) -> Fixture {
    Fixture {
        name,
        input,
        verdict: XDP_PASS,
        output: None,
        protos,
        outcome,
    }
}

use mesh_tests::frames::*;

fn fixtures() -> Vec<Fixture> {
    use outcome::{FRAGMENT as FRAG, MALFORMED, PARSED, TRUNCATED};
    use proto::{
        ICMP as P_ICMP, ICMPV6 as P_ICMPV6, IPV4, IPV6, NON_IP, OTHER_L4, TCP as P_TCP,
        UDP as P_UDP, VLAN,
    };
    let syn = tcp(40000, 80, 0x02);
    let dgram = udp(40000, 53, 12);
    let mut f = vec![
        fixture("ipv4 tcp syn", v4(TCP, &syn), &[IPV4, P_TCP], PARSED),
        fixture("ipv4 udp", v4(UDP, &dgram), &[IPV4, P_UDP], PARSED),
        fixture(
            "ipv4 icmp echo",
            v4(ICMP, &icmp_echo(8)),
            &[IPV4, P_ICMP],
            PARSED,
        ),
        fixture(
            "ipv4 with 12 bytes of options",
            cat(&[
                &eth(ETH_IP),
                &ipv4(TCP, syn.len(), &[0x94, 4, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0], 0),
                &syn,
            ]),
            &[IPV4, P_TCP],
            PARSED,
        ),
        fixture(
            "arp is parsed as non-ip",
            cat(&[&eth(ETH_ARP), &[0u8; 28]]),
            &[NON_IP],
            PARSED,
        ),
        fixture(
            "ipv6 tcp",
            cat(&[&eth(ETH_IPV6), &ipv6(TCP, syn.len()), &syn]),
            &[IPV6, P_TCP],
            PARSED,
        ),
        fixture(
            "ipv6 icmpv6 echo",
            cat(&[&eth(ETH_IPV6), &ipv6(ICMPV6, 8), &icmp_echo(128)]),
            &[IPV6, P_ICMPV6],
            PARSED,
        ),
        fixture(
            "ipv6 hop-by-hop + destination options + udp",
            cat(&[
                &eth(ETH_IPV6),
                &ipv6(HOPOPTS, 8 + 16 + dgram.len()),
                &ext(DSTOPTS, 0),
                &ext(UDP, 1),
                &dgram,
            ]),
            &[IPV6, P_UDP],
            PARSED,
        ),
        fixture(
            "802.1q tagged udp",
            {
                let mut fr = eth(ETH_8021Q);
                vlan(&mut fr, 100, ETH_IP);
                cat(&[&fr, &ipv4(UDP, dgram.len(), &[], 0), &dgram])
            },
            &[IPV4, P_UDP, VLAN],
            PARSED,
        ),
        fixture(
            "qinq tagged tcp",
            {
                let mut fr = eth(ETH_8021AD);
                vlan(&mut fr, 10, ETH_8021Q);
                vlan(&mut fr, 20, ETH_IP);
                cat(&[&fr, &ipv4(TCP, syn.len(), &[], 0), &syn])
            },
            &[IPV4, P_TCP, VLAN],
            PARSED,
        ),
        fixture(
            "three vlan tags are not walked",
            {
                let mut fr = eth(ETH_8021AD);
                vlan(&mut fr, 10, ETH_8021Q);
                vlan(&mut fr, 20, ETH_8021Q);
                vlan(&mut fr, 30, ETH_IP);
                cat(&[&fr, &ipv4(TCP, syn.len(), &[], 0), &syn])
            },
            &[NON_IP, VLAN],
            MALFORMED,
        ),
        // Truncation.
        // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header
        // (EINVAL), so the shortest frame we can feed is a bare Ethernet header.
        fixture(
            "bare ethernet header announcing ipv4",
            eth(ETH_IP),
            &[IPV4],
            TRUNCATED,
        ),
        fixture(
            "truncated ipv4 header",
            v4(TCP, &syn)[..14 + 12].to_vec(),
            &[IPV4],
            TRUNCATED,
        ),
        fixture(
            "ipv4 total length beyond the frame",
            v4(TCP, &syn)[..14 + 20 + 10].to_vec(),
            &[IPV4, P_TCP],
            TRUNCATED,
        ),
        fixture(
            "ipv4 options beyond the frame",
            {
                let full = cat(&[&eth(ETH_IP), &ipv4(TCP, 0, &[1; 40], 0)]);
                full[..14 + 30].to_vec()
            },
            &[IPV4, P_TCP],
            TRUNCATED,
        ),
        fixture(
            "zero-length l4: tcp announced, frame padded to 60 bytes",
            {
                let mut fr = cat(&[&eth(ETH_IP), &ipv4(TCP, 0, &[], 0)]);
                fr.resize(60, 0x11); // Ethernet padding must not be read as a TCP header
                fr
            },
            &[IPV4, P_TCP],
            TRUNCATED,
        ),
        fixture(
            "zero-length l4: udp",
            cat(&[&eth(ETH_IP), &ipv4(UDP, 0, &[], 0)]),
            &[IPV4, P_UDP],
            TRUNCATED,
        ),
        fixture(
            "tcp header cut short",
            {
                let fr = v4(TCP, &syn);
                let mut fr = fr[..fr.len() - 8].to_vec();
                let total = (20 + 12u16).to_be_bytes();
                fr[16..18].copy_from_slice(&total);
                fr
            },
            &[IPV4, P_TCP],
            TRUNCATED,
        ),
        fixture(
            "ipv6 hop-by-hop header longer than the packet",
            cat(&[
                &eth(ETH_IPV6),
                &ipv6(HOPOPTS, 8),
                &ext(UDP, 0)[..2],
                &[0u8; 6],
            ])
            .into_iter()
            .enumerate()
            .map(|(i, b)| if i == 14 + 40 + 1 { 2 } else { b })
            .collect(),
            &[IPV6, P_UDP],
            TRUNCATED,
        ),
        // Malformed headers.
        fixture(
            "ipv4 ihl 3",
            {
                let mut fr = v4(TCP, &syn);
                fr[14] = 0x43;
                fr
            },
            &[IPV4, P_TCP],
            MALFORMED,
        ),
        fixture(
            "ipv4 ethertype with version 6",
            {
                let mut fr = v4(TCP, &syn);
                fr[14] = 0x65;
                fr
            },
            &[IPV4, P_TCP],
            MALFORMED,
        ),
        fixture(
            "ipv4 total length shorter than ihl",
            {
                let mut fr = v4(TCP, &syn);
                fr[16..18].copy_from_slice(&12u16.to_be_bytes());
                fr
            },
            &[IPV4, P_TCP],
            MALFORMED,
        ),
        fixture(
            "tcp data offset 4",
            {
                let mut fr = v4(TCP, &syn);
                fr[14 + 20 + 12] = 4 << 4;
                fr
            },
            &[IPV4, P_TCP],
            MALFORMED,
        ),
        fixture(
            "udp length 7",
            {
                let mut fr = v4(UDP, &dgram);
                fr[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&7u16.to_be_bytes());
                fr
            },
            &[IPV4, P_UDP],
            MALFORMED,
        ),
        fixture(
            "ipv6 with seven extension headers",
            {
                let mut fr = cat(&[&eth(ETH_IPV6), &ipv6(DSTOPTS, 7 * 8 + dgram.len())]);
                for i in 0..7 {
                    fr.extend(ext(if i == 6 { UDP } else { DSTOPTS }, 0));
                }
                fr.extend(&dgram);
                fr
            },
            &[IPV6, OTHER_L4],
            MALFORMED,
        ), // the walk stops before the upper layer is known
        // Fragments.
        fixture(
            "ipv4 non-first fragment",
            cat(&[&eth(ETH_IP), &ipv4(UDP, 16, &[], 185), &[0xcd; 16]]),
            &[IPV4, P_UDP],
            FRAG,
        ),
        fixture(
            "ipv4 first fragment (more fragments set)",
            cat(&[
                &eth(ETH_IP),
                &ipv4(UDP, dgram.len(), &[], 0x2000),
                &udp(40000, 53, 100)[..dgram.len()],
            ]),
            &[IPV4, P_UDP],
            FRAG,
        ),
        fixture(
            "ipv6 non-first fragment",
            cat(&[
                &eth(ETH_IPV6),
                &ipv6(FRAGMENT, 8 + 16),
                &[UDP, 0, 0x05, 0xc8, 0, 0, 0, 7],
                &[0xcd; 16],
            ]),
            &[IPV6, P_UDP],
            FRAG,
        ),
        fixture(
            "ipv6 first fragment",
            cat(&[
                &eth(ETH_IPV6),
                &ipv6(FRAGMENT, 8 + dgram.len()),
                &[UDP, 0, 0, 1, 0, 0, 0, 7],
                &dgram,
            ]),
            &[IPV6, P_UDP],
            FRAG,
        ),
    ];
    // A frame with trailing Ethernet padding after a complete datagram parses fine.
    let mut padded = v4(UDP, &udp(1, 2, 0));
    padded.resize(60, 0);
    f.push(fixture(
        "udp with ethernet padding",
        padded,
        &[IPV4, P_UDP],
        PARSED,
    ));
    f
}

fn expected_delta(fx: &Fixture) -> ParserStats {
    let mut want = ParserStats::default();
    let one = Counter {
        packets: 1,
        bytes: fx.input.len() as u64,
    };
    for class in fx.protos {
        want.proto[*class as usize] = one;
    }
    want.outcome[fx.outcome as usize] = one;
    want
}

#[test]
fn parser_fixtures() {
    let Some(_root) = require_root("packet::parser_fixtures") else {
        return;
    };
    let mut dp = Datapath::load(None).expect("load eBPF object");
    let fixtures = fixtures();
    assert!(fixtures.len() >= 12);
    let mut failures = Vec::new();
    for fx in &fixtures {
        let before = ParserStats::read(dp.ebpf()).expect("read counters");
        let mut out = vec![0u8; fx.input.len() + 256];
        let result = dp
            .parser()
            .expect("parser program")
            .test_run(TestRunOptions {
                data_in: Some(&fx.input),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN: {e}", fx.name));
        let after = ParserStats::read(dp.ebpf()).expect("read counters");
        out.truncate(result.data_size_out as usize);
        let want_out = fx.output.as_ref().unwrap_or(&fx.input);
        if result.return_value != fx.verdict {
            failures.push(format!(
                "{}: verdict {} != {}",
                fx.name, result.return_value, fx.verdict
            ));
        }
        if &out != want_out {
            failures.push(format!(
                "{}: output bytes differ\n got  {out:02x?}\n want {want_out:02x?}",
                fx.name
            ));
        }
        let got = after.since(&before);
        let want = expected_delta(fx);
        if got != want {
            failures.push(format!(
                "{}: counter deltas differ\n got  {got:?}\n want {want:?}",
                fx.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_map_name_resolves_in_the_object() {
    let Some(_root) = require_root("packet::every_map_name_resolves_in_the_object") else {
        return;
    };
    let dp = Datapath::load(None).expect("load eBPF object");
    for name in maps::ALL {
        assert!(
            dp.ebpf().map(name).is_some(),
            "map {name} missing from the object"
        );
    }
    let names: Vec<&str> = dp.ebpf().maps().map(|(n, _)| n).collect();
    assert_eq!(
        names.len(),
        maps::ALL.len(),
        "object has maps {names:?} not listed in maps::ALL"
    );
}

// ---- load balancer (tc_lb) ----

mod lb {
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
        let Some(_root) =
            require_root("packet::lb::ipv4_options_are_kept_and_checksums_stay_valid")
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
        let Some(_root) =
            require_root("packet::lb::traffic_that_is_not_for_a_frontend_is_untouched")
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
}

/// A pin directory under bpffs, removed on drop.
struct PinDir(std::path::PathBuf);

impl PinDir {
    /// A fresh directory on the bpffs at `BPF_ROOT`, mounted here if no
    /// earlier test did (on a fresh machine this test may run first).
    fn new(what: &str) -> PinDir {
        let root = std::path::Path::new(mesh_tests::netns::BPF_ROOT);
        let name = format!("{what}-{}", std::process::id());
        let _ = std::fs::remove_dir_all(root.join(&name));
        let dir = dataplane::bpffs::prepare_node_dir(root, &name).expect("create the pin dir");
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An upgrade that changed a map's layout must still load: the pinned map
/// of the old layout is started afresh (reusing it failed verification),
/// while a map whose layout is unchanged keeps its entries.
#[test]
fn a_pinned_map_of_another_layout_is_replaced_and_the_others_kept() {
    let Some(_root) =
        require_root("packet::a_pinned_map_of_another_layout_is_replaced_and_the_others_kept")
    else {
        return;
    };
    use aya::maps::{HashMap, MapData, MapInfo};
    use dataplane_common::limits;
    let pins = PinDir::new("mesh-stale-pins");
    {
        let mut dp = Datapath::load(Some(&pins.0)).expect("first load");
        let mut nodes: HashMap<&mut MapData, [u32; 4], u32> =
            HashMap::try_from(dp.ebpf_mut().map_mut(maps::NODE_ADDRS).unwrap()).unwrap();
        nodes
            .insert([7, 0, 0, 0], 1, 0)
            .expect("insert a node address");
    }
    // The counters as an older build pinned them: 24-byte values.
    let stale = pins.0.join(maps::FRONTEND_STATS);
    std::fs::remove_file(&stale).expect("unpin");
    let entries = limits::MAX_FRONTENDS.to_string();
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stale)
        .args([
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "24",
            "entries",
            &entries,
        ])
        .args(["name", "FRONTEND_STATS"])
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool: {out:?}");
    assert_eq!(MapInfo::from_pin(&stale).unwrap().value_size(), 24);

    let dp = Datapath::load(Some(&pins.0)).expect("a stale pin must not stop the load");
    let info = MapInfo::from_pin(&stale).expect("re-pinned");
    assert_eq!(
        info.value_size() as usize,
        std::mem::size_of::<dataplane_common::LbCounter>(),
        "started afresh at the new layout"
    );
    let nodes: HashMap<&MapData, [u32; 4], u32> =
        HashMap::try_from(dp.ebpf().map(maps::NODE_ADDRS).unwrap()).unwrap();
    assert_eq!(
        nodes.get(&[7, 0, 0, 0], 0).ok(),
        Some(1),
        "unchanged map kept"
    );
}

#[path = "packet/differential.rs"]
mod differential;
