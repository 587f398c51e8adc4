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
    services::{self, Server, Session},
};

pub const WEB: u16 = 8080;
pub const DNS: u16 = 5353;
pub const T: Duration = Duration::from_secs(5);

/// What balances the published ports.
#[allow(dead_code)] // each test binary runs one of them
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The TC program and its maps (the default).
    Ebpf,
    /// `meshd --lb-backend ipvs`: the kernel's IPVS (the VM tier).
    Ipvs,
}

impl Backend {
    fn args(self) -> &'static [&'static str] {
        match self {
            Backend::Ebpf => &[],
            Backend::Ipvs => &["--lb-backend", "ipvs"],
        }
    }
}

/// Calls `f` with `local`'s host-side interfaces and the web (tcp 8080 -> 80)
/// and dns (udp 5353 -> 53) services balanced over `backends`.
pub fn with_services<R>(
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

pub fn write_config(host: &Host, local: &[&Task], backends: &[&Task]) -> ConfigFile {
    write_config_with(host, local, backends, serde_json::json!({}))
}

pub fn write_config_with(
    host: &Host,
    local: &[&Task],
    backends: &[&Task],
    timeouts: serde_json::Value,
) -> ConfigFile {
    with_services(local, backends, |ifaces, services| {
        ConfigFile::write(host, ifaces, timeouts, services)
    })
}

fn start(host: &Host, config: &ConfigFile, backend: Backend) -> ChildGuard {
    meshd::start(host, Some(config), backend.args())
}

/// Waits until `host`'s web frontend names exactly `want` as backends.
fn wait_backends(host: &Host, want: &[&Task], backend: Backend) {
    let mut want: Vec<Ipv4Addr> = want.iter().map(|t| t.addr()).collect();
    want.sort();
    if backend == Backend::Ipvs {
        return wait_for(
            &format!("{} to give IPVS real servers {want:?}", host.label()),
            T * 2,
            || ipvs_backends(host).is_some_and(|all| all.iter().all(|got| *got == want)),
        );
    }
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

/// The load-balancer issue's published-port test, against `backend`:
/// 3 hosts, 4 backends (one added later), a client outside. Every node's
/// port reaches every backend; UDP answers; a long-lived flow survives
/// backends coming and going; a removed backend gets no new flow; a meshd
/// restart breaks no open flow.
pub fn published_ports_scenario(backend: Backend) {
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
    let mut daemons: Vec<ChildGuard> = (0..3)
        .map(|i| start(hosts[i], &configs[i], backend))
        .collect();
    let reconfigure = |backends: &[&Task], daemons: &[ChildGuard]| {
        for i in 0..3 {
            with_services(&local(i), backends, |ifaces, services| {
                configs[i].overwrite(hosts[i], ifaces, serde_json::json!({}), services)
            });
            daemons[i].signal(libc::SIGHUP);
        }
        for h in hosts {
            wait_backends(h, backends, backend);
        }
    };

    // 300 connections through each node's address: all succeed, all backends share.
    for h in hosts {
        let front = SocketAddr::from((h.addr(), WEB));
        let tally: BTreeMap<String, usize> = client.enter(|| {
            let mut tally = BTreeMap::new();
            for i in 0..300 {
                let who = services::tcp_ask(front, T).unwrap_or_else(|e| {
                    let lb =
                        read_lb(&h.pin_dir()).map(|v| dataplane::inspect::LbTable(&v).to_string());
                    panic!("connection {i} via {front}: {e}\n{lb:?}")
                });
                *tally.entry(who).or_default() += 1;
            }
            tally
        });
        assert_eq!(tally.values().sum::<usize>(), 300);
        if backend == Backend::Ipvs {
            // IPVS carried them (its own counters), with Maglev hashing.
            let (sched, conns) = ipvs_usage(h);
            assert_eq!(sched, "mh", "via {}", h.label());
            assert!(
                conns >= 300,
                "via {}: IPVS counted {conns} connections",
                h.label()
            );
        }
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
    daemons.insert(0, start(h1, &configs[0], backend));
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

/// The real servers of each of `host`'s IPVS services (sorted addresses),
/// or `None` when it has none yet.
fn ipvs_backends(host: &Host) -> Option<Vec<Vec<Ipv4Addr>>> {
    host.enter(|| {
        let mut ipvs = dataplane::ipvs::Ipvs::open().ok()?;
        let services = ipvs.services().ok()?;
        if services.is_empty() {
            return None;
        }
        services
            .iter()
            .map(|s| {
                let mut a: Vec<Ipv4Addr> =
                    ipvs.dests(&s.key).ok()?.iter().map(|d| d.address).collect();
                a.sort();
                Some(a)
            })
            .collect()
    })
}

/// The scheduler of `host`'s web service and the connections IPVS counted
/// on it (active + inactive).
fn ipvs_usage(host: &Host) -> (String, u32) {
    host.enter(|| {
        let mut ipvs = dataplane::ipvs::Ipvs::open().expect("IPVS");
        let web = ipvs
            .services()
            .expect("IPVS services")
            .into_iter()
            .find(|s| s.key.port == WEB && s.key.address == host.addr())
            .expect("an IPVS service for the web port");
        let conns = ipvs
            .dests(&web.key)
            .expect("real servers")
            .iter()
            .map(|d| d.active + d.inactive)
            .sum();
        (web.scheduler, conns)
    })
}
