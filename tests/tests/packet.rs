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

// ---- frame builders ----

const ETH_IP: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_ARP: u16 = 0x0806;
const ETH_8021Q: u16 = 0x8100;
const ETH_8021AD: u16 = 0x88a8;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const HOPOPTS: u8 = 0;
const DSTOPTS: u8 = 60;
const FRAGMENT: u8 = 44;

fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend(ethertype.to_be_bytes());
    f
}

fn vlan(frame: &mut Vec<u8>, vid: u16, inner: u16) {
    frame.extend(vid.to_be_bytes());
    frame.extend(inner.to_be_bytes());
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header with `options` (a multiple of 4 bytes) and a valid checksum.
fn ipv4(protocol: u8, l4_len: usize, options: &[u8], frag_off: u16) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + l4_len) as u16;
    let mut h = vec![(4 << 4) | ihl as u8, 0];
    h.extend(total.to_be_bytes());
    h.extend([0x12, 0x34]);
    h.extend(frag_off.to_be_bytes());
    h.extend([64, protocol, 0, 0]);
    h.extend([198, 18, 0, 1, 198, 18, 0, 2]);
    h.extend(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn ipv6(nexthdr: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((payload_len as u16).to_be_bytes());
    h.extend([nexthdr, 64]);
    h.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h
}

/// An IPv6 extension header (hop-by-hop/destination options) of 8 * (1 + hdrlen) bytes.
fn ext(nexthdr: u8, hdrlen: u8) -> Vec<u8> {
    let mut h = vec![nexthdr, hdrlen, 1, 4, 0, 0, 0, 0]; // PadN option fills the rest
    h.resize(8 * (1 + hdrlen as usize), 0);
    h
}

fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(1u32.to_be_bytes());
    h.extend(0u32.to_be_bytes());
    h.extend([5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(((8 + payload) as u16).to_be_bytes());
    h.extend([0, 0]);
    h.resize(8 + payload, 0xab);
    h
}

fn icmp_echo(kind: u8) -> Vec<u8> {
    vec![kind, 0, 0, 0, 0x42, 0x42, 0, 1]
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn v4(l4_proto: u8, l4: &[u8]) -> Vec<u8> {
    cat(&[&eth(ETH_IP), &ipv4(l4_proto, l4.len(), &[], 0), l4])
}

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
