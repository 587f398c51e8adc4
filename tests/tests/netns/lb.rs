//! The load balancer in namespaces: the published-port scenario on the eBPF
//! path (tests/tests/shared/published.rs; the VM tier runs it on IPVS), and
//! the conntrack sweeper.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use mesh_tests::{
    Host, Topology, meshd,
    netns::wait_for,
    require_root,
    services::{self, Session},
};

use crate::published::{Backend, DNS, T, WEB, published_ports_scenario, write_config_with};

#[test]
fn published_ports_answer_on_every_node_and_balance_across_hosts() {
    let Some(_root) =
        require_root("netns::lb::published_ports_answer_on_every_node_and_balance_across_hosts")
    else {
        return;
    };
    published_ports_scenario(Backend::Ebpf);
}

fn conntrack_entries(host: &Host, proto: u8) -> usize {
    use aya::maps::{HashMap, MapData};
    use dataplane_common::{CtEntry, FlowKey, maps};
    let map =
        dataplane::stats::open_pinned(&host.pin_dir(), maps::CONNTRACK).expect("pinned CONNTRACK");
    let ct: HashMap<&MapData, FlowKey, CtEntry> = HashMap::try_from(&map).expect("CONNTRACK type");
    ct.keys()
        .filter_map(Result::ok)
        .filter(|k| k.proto == proto)
        .count()
}

#[test]
fn the_sweeper_expires_idle_udp_but_keeps_idle_tcp() {
    let Some(_root) = require_root("netns::lb::the_sweeper_expires_idle_udp_but_keeps_idle_tcp")
    else {
        return;
    };
    let mut topo = Topology::new(1);
    topo.add_host("client");
    let (h1, client) = (topo.host(0), topo.host(1));
    let task = h1.add_task(0);
    let _tcp = services::tcp_echo(task.ns(), SocketAddr::from((task.addr(), 80)), "b1");
    let _udp = services::udp_echo(task.ns(), SocketAddr::from((task.addr(), 53)), "b1");
    // UDP idles out after 1 s; TCP keeps the default (2 h).
    let config = write_config_with(h1, &[&task], &[&task], serde_json::json!({"udp_idle_s": 1}));
    let daemon = meshd::start(h1, Some(&config), &["--sweep-interval", "1"]);

    let mut session = client
        .enter(|| Session::open(SocketAddr::from((h1.addr(), WEB)), T))
        .expect("tcp session");
    assert_eq!(session.ask("hi").expect("tcp answer"), "b1");
    let to = SocketAddr::from((h1.addr(), DNS));
    let answer = client.enter(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        services::udp_ask(&s, to, "q")
    });
    assert_eq!(answer.expect("udp answer"), "b1");
    assert_eq!(conntrack_entries(h1, 17), 1, "one UDP flow tracked");
    assert_eq!(conntrack_entries(h1, 6), 1, "one TCP flow tracked");

    wait_for("the idle UDP flow to be swept", T * 2, || {
        conntrack_entries(h1, 17) == 0
    });
    // Several sweeps later the idle TCP flow is still there, and still works.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(conntrack_entries(h1, 6), 1, "idle TCP flow was swept");
    assert_eq!(
        session
            .ask("still here")
            .expect("idle tcp flow still works"),
        "b1"
    );
    drop(daemon);
    meshd::down(h1);
}

/// A published port with no backend refuses at once, as a closed port
/// does: a TCP connect fails with "connection refused" (the RST reached
/// the client through the real device), and a connected UDP socket gets
/// ECONNREFUSED from the ICMP port unreachable. Nothing waits for a timeout.
#[test]
fn a_published_port_with_no_backend_refuses_at_once() {
    let Some(_root) = require_root("netns::lb::a_published_port_with_no_backend_refuses_at_once")
    else {
        return;
    };
    let mut topo = Topology::new(1);
    topo.add_host("client");
    let (h1, client) = (topo.host(0), topo.host(1));
    let task = h1.add_task(0);
    let config = write_config_with(h1, &[&task], &[], serde_json::json!({}));
    let daemon = meshd::start(h1, Some(&config), &[]);
    let web = SocketAddr::from((h1.addr(), WEB));
    wait_for("the web frontend to be loaded", T * 2, || {
        dataplane::inspect::read_lb(&h1.pin_dir()).is_ok_and(|v| v.len() >= 2)
    });
    let tcp = client.enter(|| std::net::TcpStream::connect_timeout(&web, T));
    let e = tcp.expect_err("no backend: the connect must fail");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "refused by a RST, not timed out: {e}"
    );
    let udp = client.enter(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.connect(SocketAddr::from((h1.addr(), DNS))).unwrap();
        s.send(b"q").unwrap();
        let mut buf = [0u8; 64];
        s.recv(&mut buf)
    });
    let e = udp.expect_err("no backend: no answer");
    assert_eq!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "refused by an ICMP port unreachable, not timed out: {e}"
    );
    let views = dataplane::inspect::read_lb(&h1.pin_dir()).expect("read the maps");
    let rejected: u64 = views.iter().map(|v| v.stats.rejected).sum();
    assert_eq!(rejected, 2, "both refusals counted: {views:?}");
    drop(daemon);
    meshd::down(h1);
}

/// This kernel has no IPVS: `--lb-backend ipvs` refuses to start, says why,
/// and leaves no data plane behind.
#[test]
fn the_ipvs_backend_refuses_to_start_without_ipvs() {
    let Some(_root) = require_root("netns::lb::the_ipvs_backend_refuses_to_start_without_ipvs")
    else {
        return;
    };
    let topo = Topology::new(1);
    let h1 = topo.host(0);
    let out = h1
        .command(meshd::meshd_bin())
        .args([
            "run",
            "--node",
            h1.node_name(),
            "--underlay",
            mesh_tests::netns::UNDERLAY_IFACE,
            "--bpf-root",
            mesh_tests::netns::BPF_ROOT,
            "--lb-backend",
            "ipvs",
        ])
        .output()
        .expect("run meshd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "meshd started without IPVS: {stderr}"
    );
    assert!(
        stderr.contains("IPVS is not available in this kernel")
            && stderr.contains("--lb-backend ebpf"),
        "unclear refusal: {stderr}"
    );
    assert!(
        h1.xdp_prog_id(mesh_tests::netns::UNDERLAY_IFACE).is_none(),
        "a refused start attached XDP"
    );
    assert!(!h1.pin_dir().exists(), "a refused start left pins");
}
