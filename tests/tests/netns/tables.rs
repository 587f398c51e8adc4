//! Control to data: real meshd processes (1 manager, 2 workers, each with
//! its data plane) get their overlay, DNS and load balancer from the
//! leader's tables: a VIP answers from a task, a published port answers on
//! every node (the manager runs no task) from an external client; a worker
//! that dies is withdrawn from the others' kernels and new connections all
//! succeed; a restarted worker resyncs to the same tables as everyone else.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use dataplane::inspect::read_lb;
use mesh_tests::{Host, Topology, meshd, require_root, services};

use super::control::{Node, json, token_from, wait_until};
use crate::cluster::{Task, place_task};

/// Heartbeat period for this cluster: 3 misses = 1.5 s to declare a node
/// down (the default, 1 s x 3, takes 3 s).
const HEARTBEAT: &str = "500ms";

impl Node<'_> {
    /// The replica the agent saved: (revision, entries).
    fn saved_tables(&self) -> Option<(u64, serde_json::Value)> {
        let text = std::fs::read_to_string(self.dir.0.join("tables.json")).ok()?;
        let v = json(&text);
        Some((v["revision"].as_u64()?, v["entries"].clone()))
    }

    /// This node's own address on the bridge of `vni`.
    fn bridge_addr(&self, vni: u64) -> String {
        let out = self.host.exec_ok(
            "ip",
            &["-4", "-o", "addr", "show", "dev", &format!("mbr-{vni}")],
        );
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.split('/').next())
            .unwrap_or_else(|| panic!("no address on mbr-{vni}: {out:?}"))
            .to_owned()
    }

    /// The VXLAN device's own FDB for `vni` (entries with a `dst`: where
    /// frames for a MAC are sent). The bridge's learned `master` entries
    /// on the same port are left out: they only say which port a MAC was
    /// last seen on.
    fn vxlan_fdb(&self, vni: u64) -> String {
        let dev = format!("mvx-{vni}");
        String::from_utf8_lossy(
            &self
                .host
                .exec("bridge", &["fdb", "show", "dev", &dev])
                .stdout,
        )
        .lines()
        .filter(|l| l.contains(" dst "))
        .collect::<Vec<_>>()
        .join("\n")
    }
}

impl Task {
    /// `dig` against the embedded DNS from inside the task.
    fn dig(&self, args: &[&str]) -> String {
        let mut argv = vec!["+time=1", "+tries=2", "@127.0.0.11"];
        argv.extend_from_slice(args);
        String::from_utf8_lossy(&self.ns.exec("dig", &argv).stdout).into_owned()
    }

    /// The A records `dig +short` gives for `name`, sorted.
    fn resolve(&self, name: &str, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["+short", name];
        args.extend_from_slice(extra);
        let mut v: Vec<String> = self.dig(&args).lines().map(str::to_owned).collect();
        v.sort();
        v
    }
}

/// The port `web` publishes.
const PUBLISHED: u16 = 8080;

/// `count` new connections from `client` to `node`'s published port: who
/// answered, how often; the first failure is an error.
fn ask_published(
    client: &Host,
    node: &Host,
    count: usize,
) -> Result<BTreeMap<String, usize>, String> {
    let front = SocketAddr::from((node.addr(), PUBLISHED));
    client.enter(|| {
        let mut tally = BTreeMap::new();
        for i in 0..count {
            let who = services::tcp_ask(front, Duration::from_secs(2)).map_err(|e| {
                let lb =
                    read_lb(&node.pin_dir()).map(|v| dataplane::inspect::LbTable(&v).to_string());
                format!("connection {i} to {front}: {e}\n{lb:?}")
            })?;
            *tally.entry(who).or_default() += 1;
        }
        Ok(tally)
    })
}

/// How many backends the published port has in `node`'s LB maps.
fn published_backends(node: &Host) -> usize {
    read_lb(&node.pin_dir())
        .ok()
        .and_then(|views| {
            views
                .into_iter()
                .find(|v| v.key.addr_be == [0; 4] && u16::from_be(v.key.port_be) == PUBLISHED)
        })
        .map_or(0, |v| v.backends.len())
}

#[test]
fn tables_drive_every_node_and_a_dead_worker_is_withdrawn() {
    let Some(_root) =
        require_root("netns::tables::tables_drive_every_node_and_a_dead_worker_is_withdrawn")
    else {
        return;
    };
    let mut topo = Topology::new(3);
    topo.add_host("client");
    let mut nodes = Node::for_hosts(&topo);
    nodes.truncate(3);
    let client = topo.host(3);
    let common = |n: &Node<'_>| {
        let mut v = n.common_args();
        v.extend(n.dataplane_args());
        v
    };
    let mut args = vec!["init".into(), "--heartbeat-period".into(), HEARTBEAT.into()];
    args.extend(common(&nodes[0]));
    // A config that programs the load balancer itself is refused before
    // anything is initialized: the tables own it on a control-plane node.
    let config = nodes[0].dir.0.with_extension("config.json");
    std::fs::write(
        &config,
        r#"{"lb": {"nat_address": "198.18.0.1", "node_addresses": []}}"#,
    )
    .expect("write config");
    let mut refused = args.clone();
    refused.extend(["--config".into(), config.display().to_string()]);
    let out = nodes[0]
        .host
        .command(meshd::meshd_bin())
        .args(&refused)
        .output()
        .expect("run meshd");
    let _ = std::fs::remove_file(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("come from the cluster's tables"), "{err}");
    assert!(
        std::fs::read_dir(&nodes[0].dir.0).map_or(true, |mut d| d.next().is_none()),
        "the refused init left files behind"
    );
    let lines = nodes[0].start(args);
    let token = token_from(&lines, "worker");
    let manager_api = nodes[0].api();
    // Worker 1's upstream resolver: dnsmasq in its host namespace.
    let _upstream = nodes[1].host.spawn(
        nodes[1]
            .host
            .command("dnsmasq")
            .args([
                "--no-daemon",
                "--port=5353",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--address=/example.test/192.0.2.7",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    for (i, n) in nodes.iter_mut().enumerate().skip(1) {
        let mut args = vec!["join".into()];
        if i == 1 {
            args.extend(["--dns-upstream".into(), "127.0.0.1:5353".into()]);
        }
        args.extend(common(n));
        args.extend(["--token".into(), token.clone(), manager_api.clone()]);
        n.start(args);
    }
    let ids = crate::cluster::node_ids(&nodes[0], &nodes);

    nodes[0].meshctl_ok(&["network", "create", "red"]);
    let vni = json(&nodes[0].meshctl_ok(&["network", "inspect", "red"]))[0]["vni"]
        .as_u64()
        .expect("vni");
    // The CLI waits until every node has applied the change.
    let out = nodes[0].meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "red",
        "--publish",
        &format!("{PUBLISHED}:80"),
        // Its tasks are attached by hand below (run by the test, not by
        // meshd): the orchestrator places none.
        "--replicas",
        "0",
        "--",
        "/bin/true",
    ]);
    assert!(out.contains("verify: Service converged"), "{out}");
    assert!(out.contains("overall progress: 3 out of 3 nodes"), "{out}");

    let t1 = place_task(&nodes[0], "web", 1, &ids[1]);
    let t2 = place_task(&nodes[0], "web", 2, &ids[2]);
    // `service scale`: every argument is checked before anything changes.
    let replicas = || {
        json(&nodes[0].meshctl_ok(&["service", "inspect", "web"]))[0]["spec"]["mode"]["replicated"]
            ["replicas"]
            .as_u64()
    };
    let bad = nodes[0].meshctl(&["service", "scale", "web=3", "nosuch=1"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("service nosuch not found"), "{err}");
    assert_eq!(replicas(), Some(0), "half-applied scale");
    // Each task serves HTTP and line-echo on port 80, naming itself.
    let _servers = [
        services::tcp_echo(&t1.ns, SocketAddr::from(([0, 0, 0, 0], 80)), "web.1"),
        services::tcp_echo(&t2.ns, SocketAddr::from(([0, 0, 0, 0], 80)), "web.2"),
    ];
    wait_until(
        "a task on worker 1 to reach one on worker 2",
        Duration::from_secs(15),
        || t1.reaches(t2.ip).then_some(()),
    );
    assert!(t2.reaches(t1.ip));
    assert!(nodes[1].vxlan_fdb(vni).contains(&t2.mac));

    // The embedded DNS in the task: the VIP, the tasks, PTR, NXDOMAIN,
    // forwarding; over UDP and TCP.
    let svc = json(&nodes[0].meshctl_ok(&["service", "inspect", "web"]));
    let red_id = json(&nodes[0].meshctl_ok(&["network", "inspect", "red"]))[0]["id"].clone();
    let vip = svc[0]["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["network"] == red_id)
        .and_then(|v| v["addr"].as_str())
        .expect("a VIP on red")
        .to_owned();
    let mut both = vec![t1.ip.to_string(), t2.ip.to_string()];
    both.sort();
    assert_eq!(t1.resolve("web", &[]), std::slice::from_ref(&vip));
    assert_eq!(t1.resolve("web", &["+tcp"]), std::slice::from_ref(&vip));
    assert_eq!(t2.resolve("tasks.web", &[]), both);
    assert_eq!(t1.resolve("tasks.web", &["+tcp"]), both);
    assert_eq!(t1.resolve("-x", &[&t2.ip.to_string()]), ["web.2."]);
    assert!(t1.dig(&["nosuch"]).contains("status: NXDOMAIN"));
    assert!(t1.dig(&["tasks.nosuch"]).contains("status: NXDOMAIN"));
    assert_eq!(
        t1.resolve("example.test", &[]),
        ["192.0.2.7"],
        "forwarded upstream"
    );

    // The VIP, from a task: curl reaches both tasks, across hosts, through
    // the load balancer on the task's own node.
    let url = format!("http://{vip}:80/");
    let from_vip = wait_until(
        "curl to the VIP from a task",
        Duration::from_secs(10),
        || {
            let mut seen = BTreeMap::<String, usize>::new();
            for _ in 0..20 {
                let out = t1.ns.exec("curl", &["-s", "-m", "2", &url]);
                if !out.status.success() {
                    return None;
                }
                *seen
                    .entry(String::from_utf8_lossy(&out.stdout).trim().to_owned())
                    .or_default() += 1;
            }
            Some(seen)
        },
    );
    assert_eq!(
        from_vip.keys().collect::<Vec<_>>(),
        ["web.1", "web.2"],
        "curl {url} from web.1: {from_vip:?}"
    );

    // A service that is not on ingress (its port is host mode): its task
    // can answer a VIP flow only if the flow's source is the client node's
    // own address on red (the per-interface NAT address), not on ingress.
    nodes[0].meshctl_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "api",
        "--network",
        "red",
        "--publish",
        "mode=host,published=9000,target=80",
        "--replicas",
        "0",
        "--",
        "/bin/true",
    ]);
    let api = place_task(&nodes[0], "api", 1, &ids[2]);
    let _api_server = services::tcp_echo(&api.ns, SocketAddr::from(([0, 0, 0, 0], 80)), "api.1");
    let api_vip = json(&nodes[0].meshctl_ok(&["service", "inspect", "api"]))[0]["vips"][0]["addr"]
        .as_str()
        .expect("api's VIP")
        .to_owned();
    let api_url = format!("http://{api_vip}:80/");
    let answer = wait_until(
        "curl to api's VIP from web.1",
        Duration::from_secs(10),
        || {
            let out = t1.ns.exec("curl", &["-s", "-m", "2", &api_url]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        },
    );
    assert_eq!(answer, "api.1");
    drop(_api_server);
    nodes[0].meshctl_ok(&["service", "rm", "api"]);

    // The node routes nothing for a task: a route through worker 1's own
    // address on red toward worker 2's underlay address leads nowhere
    // (worker 2 would answer, and route its reply back over red).
    let via = nodes[1].bridge_addr(vni);
    let target = format!("{}/32", nodes[2].host.addr());
    t1.ns.exec_ok("ip", &["route", "add", &target, "via", &via]);
    let ping = t1.ns.exec(
        "ping",
        &["-c", "2", "-W", "1", &nodes[2].host.addr().to_string()],
    );
    assert!(
        !ping.status.success(),
        "a task routed through its node onto the underlay"
    );
    t1.ns.exec_ok("ip", &["route", "del", &target]);

    // The published port, from an external client, on every node: the
    // manager runs no task of the service.
    for n in &nodes {
        let tally = ask_published(client, n.host, 40)
            .unwrap_or_else(|e| panic!("via {}: {e}", n.host.label()));
        assert_eq!(
            tally.keys().collect::<Vec<_>>(),
            ["web.1", "web.2"],
            "via {}: {tally:?}",
            n.host.label()
        );
    }

    // Worker 2 dies hard and loses its link.
    let underlay = topo.underlay().name().to_owned();
    let port = format!("p{}", nodes[2].host.index());
    let ip = |args: &[&str]| {
        let st = Command::new("ip")
            .args(["-n", &underlay])
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success());
    };
    let entries_before = wait_until(
        "worker 1 to save the manager's tables",
        Duration::from_secs(5),
        || {
            let (m, w) = (nodes[0].saved_tables()?, nodes[1].saved_tables()?);
            (m == w).then_some(w)
        },
    )
    .1;
    let killed = Instant::now();
    nodes[2].meshd.take().expect("running").kill();
    ip(&["link", "set", &port, "down"]);
    wait_until(
        "worker 2's endpoint to leave worker 1's FDB",
        Duration::from_secs(5),
        || (!nodes[1].vxlan_fdb(vni).contains(&t2.mac)).then_some(()),
    );
    let withdrawn = killed.elapsed();
    // And from every other node's load balancer.
    for n in &nodes[..2] {
        wait_until(
            "worker 2's task to leave the published port's backends",
            Duration::from_secs(5),
            || (published_backends(n.host) == 1).then_some(()),
        );
    }
    let lb_withdrawn = killed.elapsed();
    eprintln!(
        "dead worker withdrawn {} ms after SIGKILL from another node's FDB, {} ms from the LB maps of both others (heartbeat {HEARTBEAT} x 3)",
        withdrawn.as_millis(),
        lb_withdrawn.as_millis()
    );
    // New connections to the published port all succeed, on both
    // surviving nodes, and all reach the surviving task.
    for n in &nodes[..2] {
        let tally = ask_published(client, n.host, 50)
            .unwrap_or_else(|e| panic!("after the failure, via {}: {e}", n.host.label()));
        assert_eq!(
            tally.get("web.1"),
            Some(&50),
            "via {}: {tally:?}",
            n.host.label()
        );
    }
    // Worker 1 has applied (and acked) that revision: DNS there never
    // gives the dead task's address again.
    for _ in 0..10 {
        assert_eq!(t1.resolve("tasks.web", &[]), [t1.ip.to_string()]);
    }
    let list = json(&nodes[0].meshctl_ok(&["node", "ls", "--format", "json"]));
    let status = list
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == ids[2].as_str())
        .map(|n| n["status"].clone());
    assert_eq!(status, Some(serde_json::json!("down")));

    // It comes back: resyncs from its saved revision and ends with the
    // same tables as the others.
    let (before, _) = nodes[2].saved_tables().unwrap_or_else(|| {
        let path = nodes[2].dir.0.join("tables.json");
        panic!(
            "worker 2 saved no readable tables: {:?}",
            std::fs::read_to_string(&path).map(|t| t.len())
        )
    });
    ip(&["link", "set", &port, "up"]);
    let mut args: Vec<String> = vec![
        "run".into(),
        "--data-dir".into(),
        nodes[2].dir.path().into(),
        "--task-scope".into(),
        nodes[2].dir.task_scope(),
    ];
    args.extend(nodes[2].dataplane_args());
    nodes[2].start(args);
    let (revision, entries) = wait_until(
        "every node to hold the same tables",
        Duration::from_secs(20),
        || {
            let all: Vec<(u64, serde_json::Value)> =
                nodes.iter().filter_map(Node::saved_tables).collect();
            // Identical everywhere, past the revision it had, and with its
            // endpoint back (the same entries as before it died).
            (all.len() == 3
                && all.iter().all(|t| *t == all[0])
                && all[0].0 > before
                && all[0].1 == entries_before)
                .then(|| all[0].clone())
        },
    );
    eprintln!(
        "restarted worker resynced from revision {before} to {revision}; {} entries identical on 3 nodes",
        entries.as_array().map_or(0, Vec::len)
    );
    wait_until(
        "the tasks to reach each other again",
        Duration::from_secs(15),
        || t1.reaches(t2.ip).then_some(()),
    );
    // Its published port balances over both tasks again.
    wait_until(
        "the restarted worker's published port to reach both tasks",
        Duration::from_secs(10),
        || {
            ask_published(client, nodes[2].host, 20)
                .ok()
                .filter(|t| t.len() == 2)
        },
    );
    for n in &mut nodes {
        if let Some(g) = n.meshd.take() {
            g.stop();
        }
        meshd::down(n.host);
    }
}

/// This kernel has no ESP: an encrypted network is refused with the
/// reason, nothing is created (no plaintext fallback), and there is no key
/// ring to rotate.
#[test]
fn an_encrypted_network_is_refused_on_a_kernel_without_esp() {
    let Some(_root) =
        require_root("netns::tables::an_encrypted_network_is_refused_on_a_kernel_without_esp")
    else {
        return;
    };
    let topo = Topology::new(1);
    let mut nodes = Node::for_hosts(&topo);
    let mut args = vec!["init".to_owned()];
    args.extend(nodes[0].common_args());
    nodes[0].start(args);
    let m = &nodes[0];
    let out = m.meshctl(&["network", "create", "--opt", "encrypted", "secret"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an encrypted network was created: {err}"
    );
    assert!(
        err.contains("--opt encrypted needs IPsec ESP")
            && err.contains("never falls back to plaintext")
            && err.contains("CONFIG_INET_ESP"),
        "unclear refusal: {err}"
    );
    eprintln!("refusal: {err}");
    let list = m.meshctl_ok(&["network", "ls"]);
    assert!(!list.contains("secret"), "half-created: {list}");
    let out = m.meshctl(&["swarm", "rotate-network-key"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no encrypted network"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A plain network is still fine.
    m.meshctl_ok(&["network", "create", "plain"]);
}
