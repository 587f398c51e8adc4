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

#[path = "packet/lb.rs"]
mod lb;

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

/// `--lb-backends`: the backend maps take the size asked for at load, a
/// pinned map of another size starts afresh while the rest are kept, the
/// recovered load balancer knows its capacity, and a size out of range is
/// refused before anything loads.
#[test]
fn the_backend_maps_take_the_capacity_asked_at_load() {
    let Some(_root) = require_root("packet::the_backend_maps_take_the_capacity_asked_at_load")
    else {
        return;
    };
    use aya::maps::{HashMap, MapData, MapInfo};
    use dataplane_common::limits;
    let pins = PinDir::new("mesh-capacity-pins");
    let sizes = |dir: &std::path::Path| {
        [maps::BACKENDS, maps::BACKEND_STATS]
            .map(|m| MapInfo::from_pin(dir.join(m)).unwrap().max_entries())
    };
    {
        let mut dp = Datapath::load_with(Some(&pins.0), 2048).expect("load with 2048");
        assert_eq!(sizes(&pins.0), [2048, 2048]);
        assert_eq!(dp.recover_lb().unwrap().backend_capacity(), 2048);
        let mut nodes: HashMap<&mut MapData, [u32; 4], u32> =
            HashMap::try_from(dp.ebpf_mut().map_mut(maps::NODE_ADDRS).unwrap()).unwrap();
        nodes
            .insert([7, 0, 0, 0], 1, 0)
            .expect("insert a node address");
    }
    let mut dp = Datapath::load_with(Some(&pins.0), 4096).expect("reload with 4096");
    assert_eq!(sizes(&pins.0), [4096, 4096], "resized maps start afresh");
    assert_eq!(dp.recover_lb().unwrap().backend_capacity(), 4096);
    let nodes: HashMap<&MapData, [u32; 4], u32> =
        HashMap::try_from(dp.ebpf().map(maps::NODE_ADDRS).unwrap()).unwrap();
    assert_eq!(nodes.get(&[7, 0, 0, 0], 0).ok(), Some(1), "other maps kept");
    drop(dp);
    for bad in [0, limits::BACKENDS_LIMIT + 1] {
        let err = Datapath::load_with(None, bad).err().expect("out of range");
        assert!(err.to_string().contains("between 1 and"), "{err}");
    }
}

#[path = "packet/differential.rs"]
mod differential;
