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

#[path = "netns/control.rs"]
mod control;
#[path = "netns/executor.rs"]
mod executor;
#[path = "netns/overlay.rs"]
mod overlay;
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

mod lb {
    use std::{
        collections::BTreeMap,
        net::{Ipv4Addr, SocketAddr, UdpSocket},
        time::Duration,
    };

    use dataplane::inspect::read_lb;
    use mesh_tests::{
        ChildGuard, Host, Task, Topology,
        meshd::{self, ConfigFile, Published},
        netns::wait_for,
        require_root,
        services::{self, Server, Session},
    };

    const WEB: u16 = 8080;
    const DNS: u16 = 5353;
    const T: Duration = Duration::from_secs(5);

    /// Calls `f` with `local`'s host-side interfaces and the web (tcp 8080 -> 80)
    /// and dns (udp 5353 -> 53) services balanced over `backends`.
    fn with_services<R>(
        local: &[&Task],
        backends: &[&Task],
        f: impl FnOnce(&[&str], &[Published<'_>]) -> R,
    ) -> R {
        let ifaces: Vec<&str> = local.iter().map(|t| t.host_iface()).collect();
        let addrs: Vec<Ipv4Addr> = backends.iter().map(|t| t.addr()).collect();
        let service = |id, name, port, protocol, target_port| Published {
            id,
            name,
            port,
            protocol,
            target_port,
            backends: &addrs,
        };
        f(
            &ifaces,
            &[
                service(1, "web", WEB, "tcp", 80),
                service(2, "dns", DNS, "udp", 53),
            ],
        )
    }

    fn write_config(host: &Host, local: &[&Task], backends: &[&Task]) -> ConfigFile {
        write_config_with(host, local, backends, serde_json::json!({}))
    }

    fn write_config_with(
        host: &Host,
        local: &[&Task],
        backends: &[&Task],
        timeouts: serde_json::Value,
    ) -> ConfigFile {
        with_services(local, backends, |ifaces, services| {
            ConfigFile::write(host, ifaces, timeouts, services)
        })
    }

    fn start(host: &Host, config: &ConfigFile) -> ChildGuard {
        meshd::start(host, Some(config), &[])
    }

    /// Waits until `host`'s web frontend names exactly `want` as backends.
    fn wait_backends(host: &Host, want: &[&Task]) {
        let mut want: Vec<Ipv4Addr> = want.iter().map(|t| t.addr()).collect();
        want.sort();
        wait_for(
            &format!("{} to load backends {want:?}", host.label()),
            T * 2,
            || {
                read_lb(&host.pin_dir()).is_ok_and(|views| {
                    views.iter().all(|v| {
                        let mut got: Vec<Ipv4Addr> = v.backends.iter().map(|b| b.address).collect();
                        got.sort();
                        got == want
                    })
                })
            },
        );
    }

    #[test]
    fn published_ports_answer_on_every_node_and_balance_across_hosts() {
        let Some(_root) = require_root(
            "netns::lb::published_ports_answer_on_every_node_and_balance_across_hosts",
        ) else {
            return;
        };
        let mut topo = Topology::new(3);
        topo.route_tasks_via_underlay();
        topo.add_host("client");
        let (h1, h2, h3, client) = (topo.host(0), topo.host(1), topo.host(2), topo.host(3));
        // b1 on host1; b2, b3 on host2; b4 (added later) on host3.
        let tasks = [
            h1.add_task(0),
            h2.add_task(0),
            h2.add_task(1),
            h3.add_task(0),
        ];
        let names = ["b1", "b2", "b3", "b4"];
        let servers: Vec<(Server, Server)> = tasks
            .iter()
            .zip(names)
            .map(|(t, n)| {
                (
                    services::tcp_echo(t.ns(), SocketAddr::from((t.addr(), 80)), n),
                    services::udp_echo(t.ns(), SocketAddr::from((t.addr(), 53)), n),
                )
            })
            .collect();
        let hosts = [h1, h2, h3];
        let local = |h: usize| -> Vec<&Task> {
            match h {
                0 => vec![&tasks[0]],
                1 => vec![&tasks[1], &tasks[2]],
                _ => vec![&tasks[3]],
            }
        };
        let mut backends: Vec<&Task> = vec![&tasks[0], &tasks[1], &tasks[2]];
        let configs: Vec<ConfigFile> = (0..3)
            .map(|i| write_config(hosts[i], &local(i), &backends))
            .collect();
        let mut daemons: Vec<ChildGuard> = (0..3).map(|i| start(hosts[i], &configs[i])).collect();
        let reconfigure = |backends: &[&Task], daemons: &[ChildGuard]| {
            for i in 0..3 {
                with_services(&local(i), backends, |ifaces, services| {
                    configs[i].overwrite(hosts[i], ifaces, serde_json::json!({}), services)
                });
                daemons[i].signal(libc::SIGHUP);
            }
            for h in hosts {
                wait_backends(h, backends);
            }
        };

        // 300 connections through each node's address: all succeed, all backends share.
        for h in hosts {
            let front = SocketAddr::from((h.addr(), WEB));
            let tally: BTreeMap<String, usize> = client.enter(|| {
                let mut tally = BTreeMap::new();
                for i in 0..300 {
                    let who = services::tcp_ask(front, T).unwrap_or_else(|e| {
                        let lb = read_lb(&h.pin_dir())
                            .map(|v| dataplane::inspect::LbTable(&v).to_string());
                        panic!("connection {i} via {front}: {e}\n{lb:?}")
                    });
                    *tally.entry(who).or_default() += 1;
                }
                tally
            });
            assert_eq!(tally.values().sum::<usize>(), 300);
            for n in ["b1", "b2", "b3"] {
                let got = tally.get(n).copied().unwrap_or(0);
                assert!(
                    got >= 45,
                    "via {}: {n} got {got} of 300 (< 15%): {tally:?}",
                    h.label()
                );
            }
        }

        // UDP request/response through every node.
        for h in hosts {
            let to = SocketAddr::from((h.addr(), DNS));
            let who = client.enter(|| {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(T)).unwrap();
                services::udp_ask(&s, to, "query")
            });
            let who = who.unwrap_or_else(|e| panic!("udp via {}: {e}", h.label()));
            assert!(["b1", "b2", "b3"].contains(&who.as_str()), "{who}");
        }

        // A long-lived connection survives adding and removing other backends.
        let mut session = client
            .enter(|| Session::open(SocketAddr::from((h3.addr(), WEB)), T))
            .expect("session");
        let owner = session.ask("first").expect("first answer");
        backends.push(&tasks[3]);
        reconfigure(&backends, &daemons);
        assert_eq!(session.ask("after add").expect("answer after add"), owner);
        let victim = ["b1", "b2", "b3"].iter().position(|n| *n != owner).unwrap();
        backends.retain(|t| t.addr() != tasks[victim].addr());
        reconfigure(&backends, &daemons);
        assert_eq!(
            session.ask("after remove").expect("answer after remove"),
            owner
        );

        // The removed backend gets no new flow.
        let before = servers[victim].0.served();
        for h in hosts {
            let front = SocketAddr::from((h.addr(), WEB));
            let answers: Vec<String> = client.enter(|| {
                (0..100)
                    .map(|_| services::tcp_ask(front, T).expect("connect"))
                    .collect()
            });
            assert!(
                !answers.iter().any(|a| a == names[victim]),
                "{} still answered via {}",
                names[victim],
                h.label()
            );
        }
        assert_eq!(
            servers[victim].0.served(),
            before,
            "the removed backend accepted a connection"
        );

        // A daemon restart during an open connection does not break it.
        let mut held = client
            .enter(|| Session::open(SocketAddr::from((h1.addr(), WEB)), T))
            .expect("session");
        let who = held.ask("before restart").expect("answer");
        let status = daemons.remove(0).stop();
        assert!(status.success(), "meshd exited with {status}");
        assert_eq!(
            held.ask("while down").expect("answer while meshd is down"),
            who
        );
        daemons.insert(0, start(h1, &configs[0]));
        assert_eq!(
            held.ask("after restart").expect("answer after restart"),
            who
        );
        let front = SocketAddr::from((h1.addr(), WEB));
        client
            .enter(|| services::tcp_ask(front, T))
            .expect("new connection after restart");
        assert_eq!(
            session
                .ask("still there")
                .expect("first session survives it all"),
            owner
        );

        drop(daemons);
        for h in hosts {
            meshd::down(h);
        }
    }

    fn conntrack_entries(host: &Host, proto: u8) -> usize {
        use aya::maps::{HashMap, MapData};
        use dataplane_common::{CtEntry, FlowKey, maps};
        let map = dataplane::stats::open_pinned(&host.pin_dir(), maps::CONNTRACK)
            .expect("pinned CONNTRACK");
        let ct: HashMap<&MapData, FlowKey, CtEntry> =
            HashMap::try_from(&map).expect("CONNTRACK type");
        ct.keys()
            .filter_map(Result::ok)
            .filter(|k| k.proto == proto)
            .count()
    }

    #[test]
    fn the_sweeper_expires_idle_udp_but_keeps_idle_tcp() {
        let Some(_root) =
            require_root("netns::lb::the_sweeper_expires_idle_udp_but_keeps_idle_tcp")
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
        let config =
            write_config_with(h1, &[&task], &[&task], serde_json::json!({"udp_idle_s": 1}));
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
}
