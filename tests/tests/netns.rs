//! Namespace tier: real meshd processes on hosts in their own network
//! namespaces, joined by an underlay bridge; real traffic between them.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use dataplane::stats::ParserStats;
use dataplane_common::{outcome, proto};
use mesh_tests::{
    ChildGuard, Host, Topology, meshd,
    netns::{UNDERLAY_IFACE, leftovers_matching},
    require_root,
};

#[path = "netns/api.rs"]
mod api;
#[path = "netns/attack.rs"]
mod attack;
#[path = "netns/control.rs"]
mod control;
#[path = "netns/executor.rs"]
mod executor;
#[path = "netns/overlay.rs"]
mod overlay;
#[path = "netns/partition.rs"]
mod partition;
#[path = "netns/restart.rs"]
mod restart;
#[path = "netns/services.rs"]
mod services;
#[path = "netns/tables.rs"]
mod tables;

const PINGS: u64 = 4;
const DATAGRAMS: u64 = 5;
const UDP_PAYLOAD: usize = 100;
const SYNS: u64 = 3;
/// Ethernet + IPv4 + ICMP header + ping's default 56-byte payload.
const PING_FRAME: u64 = 14 + 20 + 8 + 56;
const UDP_FRAME: u64 = 14 + 20 + 8 + UDP_PAYLOAD as u64;

fn start_meshd(host: &Host) -> ChildGuard {
    let child = meshd::start(host, None, &[]);
    assert!(
        host.xdp_prog_id(UNDERLAY_IFACE).is_some(),
        "{}: ready but XDP not attached",
        host.label()
    );
    child
}

fn stats(host: &Host) -> ParserStats {
    ParserStats::read_pinned(&host.pin_dir())
        .unwrap_or_else(|e| panic!("{}: read pinned counters: {e:?}", host.label()))
}

/// Sends ICMP echo, UDP datagrams and refused TCP SYNs from `from` to `to`.
fn send_traffic(from: &Host, to: &Host, udp_port: u16) {
    let dst = to.addr().to_string();
    from.exec_ok(
        "ping",
        &[
            "-q",
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.01",
            "-W",
            "5",
            &dst,
        ],
    );

    let rx = to
        .enter(|| UdpSocket::bind(SocketAddr::from((to.addr(), udp_port))))
        .expect("bind udp");
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = from
        .enter(|| UdpSocket::bind(SocketAddr::from((from.addr(), 0))))
        .expect("bind udp");
    for i in 0..DATAGRAMS {
        tx.send_to(&[i as u8; UDP_PAYLOAD], rx.local_addr().unwrap())
            .expect("send udp");
    }
    let mut buf = [0u8; 2048];
    for _ in 0..DATAGRAMS {
        let (n, _) = rx.recv_from(&mut buf).expect("udp datagram delivered");
        assert_eq!(n, UDP_PAYLOAD);
    }

    // Nothing listens on port 9: each SYN is answered by exactly one RST.
    let closed = SocketAddr::from((to.addr(), 9));
    for _ in 0..SYNS {
        let err = from
            .enter(|| TcpStream::connect_timeout(&closed, Duration::from_secs(5)))
            .expect_err("nothing listens on port 9");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    }
}

#[test]
fn three_hosts_count_exactly_what_crossed_their_underlay() {
    let Some(_root) = require_root("netns::three_hosts_count_exactly_what_crossed_their_underlay")
    else {
        return;
    };
    let topo = Topology::new(3);
    let names = topo.namespace_names();
    let daemons: Vec<ChildGuard> = topo.hosts().iter().map(start_meshd).collect();
    let before: Vec<ParserStats> = topo.hosts().iter().map(stats).collect();

    // A ring: host1 -> host2 -> host3 -> host1.
    let n = topo.hosts().len();
    for i in 0..n {
        send_traffic(topo.host(i), topo.host((i + 1) % n), 7000 + i as u16);
    }

    for (host, before) in topo.hosts().iter().zip(&before) {
        let d = stats(host).since(before);
        let who = host.label();
        // Each host received its predecessor's echo requests and the replies
        // to its own; its predecessor's datagrams; SYNs from its predecessor
        // and RSTs answering its own SYNs.
        let icmp = d.proto(proto::ICMP);
        assert_eq!(icmp.packets, 2 * PINGS, "{who}: icmp {d:?}");
        assert_eq!(icmp.bytes, 2 * PINGS * PING_FRAME, "{who}: icmp bytes");
        let udp = d.proto(proto::UDP);
        assert_eq!(udp.packets, DATAGRAMS, "{who}: udp {d:?}");
        assert_eq!(udp.bytes, DATAGRAMS * UDP_FRAME, "{who}: udp bytes");
        assert_eq!(d.proto(proto::TCP).packets, 2 * SYNS, "{who}: tcp {d:?}");
        // The kernel's own IGMP reports may cross too; they count as other-l4.
        let ipv4 = d.proto(proto::IPV4);
        assert_eq!(
            ipv4.packets,
            2 * PINGS + DATAGRAMS + 2 * SYNS + d.proto(proto::OTHER_L4).packets,
            "{who}: ipv4 {d:?}"
        );
        for class in [proto::IPV6, proto::ICMPV6, proto::VLAN] {
            assert_eq!(
                d.proto(class).packets,
                0,
                "{who}: {} {d:?}",
                proto::NAMES[class as usize]
            );
        }
        // Only ARP is non-IP here, and every frame parsed cleanly.
        for bad in [outcome::TRUNCATED, outcome::MALFORMED, outcome::FRAGMENT] {
            assert_eq!(
                d.outcome(bad).packets,
                0,
                "{who}: {} {d:?}",
                outcome::NAMES[bad as usize]
            );
        }
        assert_eq!(
            d.outcome(outcome::PARSED).packets,
            ipv4.packets + d.proto(proto::NON_IP).packets,
            "{who}: every frame counts in exactly one outcome"
        );
    }

    // Stopping meshd leaves the data path attached (so restarts do not break
    // flows); `meshd down` detaches it and removes the pins.
    for (host, daemon) in topo.hosts().iter().zip(daemons) {
        let status = daemon.stop();
        assert!(
            status.success(),
            "{}: meshd exited with {status}",
            host.label()
        );
        assert!(
            host.xdp_prog_id(UNDERLAY_IFACE).is_some(),
            "{}: XDP detached by a stop",
            host.label()
        );
        meshd::down(host);
        assert_eq!(
            host.xdp_prog_id(UNDERLAY_IFACE),
            None,
            "{}: XDP still attached after down",
            host.label()
        );
        assert!(
            !host.pin_dir().exists(),
            "{}: pins left after down",
            host.label()
        );
    }

    drop(topo);
    for name in &names {
        let left = leftovers_matching(&|n| n == name);
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[test]
fn a_panicking_test_still_removes_its_namespaces_and_pins() {
    let Some(_root) = require_root("netns::a_panicking_test_still_removes_its_namespaces_and_pins")
    else {
        return;
    };
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::new(2);
        names = topo.namespace_names();
        std::fs::create_dir_all(topo.host(0).pin_dir()).unwrap();
        let _sleeper = topo.host(1).spawn(topo.host(1).command("sleep").arg("600"));
        panic!("deliberate panic with a live topology");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 3);
    for name in &names {
        let left = leftovers_matching(&|n| n == name);
        assert!(left.is_empty(), "left behind after a panic: {left:?}");
    }
}

#[path = "shared/cluster.rs"]
#[allow(dead_code)] // the VM tier uses more of it
mod cluster;
#[path = "shared/published.rs"]
mod published;

#[path = "netns/lb.rs"]
mod lb;
