//! Control to data: real meshd processes (1 manager, 2 workers, each with
//! its data plane) get their overlay from the leader's tables; a worker
//! that dies is withdrawn from the others' kernels; a restarted worker
//! resyncs to the same tables as everyone else.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use mesh_tests::{
    ChildGuard, Host, Netns, Topology, meshd,
    netns::{BPF_ROOT, UNDERLAY_IFACE},
    require_root,
};

use super::control::{DataDir, json, token_from, wait_until};

/// Heartbeat period for this cluster: 3 misses = 1.5 s to declare a node
/// down (the default, 1 s x 3, takes 3 s).
const HEARTBEAT: &str = "500ms";

struct Node<'a> {
    host: &'a Host,
    dir: DataDir,
    meshd: Option<ChildGuard>,
}

impl Node<'_> {
    fn api(&self) -> String {
        format!("{}:2377", self.host.addr())
    }

    fn dataplane_args(&self) -> Vec<String> {
        [
            "--node",
            self.host.node_name(),
            "--underlay",
            UNDERLAY_IFACE,
            "--bpf-root",
            BPF_ROOT,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn start(&mut self, args: Vec<String>) -> Vec<String> {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (guard, lines) = meshd::start_control(self.host, &argv);
        self.meshd = Some(guard);
        lines
    }

    fn meshctl(&self, args: &[&str]) -> std::process::Output {
        self.host
            .command(meshd::meshctl_bin())
            .args(["--data-dir", self.dir.path(), "--timeout", "20"])
            .args(args)
            .output()
            .expect("run meshctl")
    }

    fn meshctl_ok(&self, args: &[&str]) -> String {
        let out = self.meshctl(args);
        assert!(
            out.status.success(),
            "meshctl {args:?} on {}: {}",
            self.host.label(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// The replica the agent saved: (revision, entries).
    fn saved_tables(&self) -> Option<(u64, serde_json::Value)> {
        let text = std::fs::read_to_string(self.dir.0.join("tables.json")).ok()?;
        let v = json(&text);
        Some((v["revision"].as_u64()?, v["entries"].clone()))
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

struct Task {
    ns: Netns,
    ip: Ipv4Addr,
    mac: String,
}

impl Task {
    fn reaches(&self, to: Ipv4Addr) -> bool {
        let to = to.to_string();
        (0..3).any(|_| {
            self.ns
                .exec("ping", &["-c", "1", "-W", "1", &to])
                .status
                .success()
        })
    }
}

/// Records a task of `service` on `node` (the internal path, manager
/// certificate only) whose namespace the test created.
fn place_task(manager: &Node<'_>, service: &str, node_id: &str) -> Task {
    let ns = Netns::new();
    let path = ns.path();
    let out = manager.meshctl_ok(&[
        "task",
        "create",
        "--service",
        service,
        "--node",
        node_id,
        "--netns",
        path.to_str().expect("utf-8"),
    ]);
    let mut lines = out.lines().skip(1);
    let (_, ip) = lines
        .next()
        .and_then(|l| l.split_once(' '))
        .unwrap_or_else(|| panic!("no address in {out:?}"));
    let ip: Ipv4Addr = ip.parse().expect("address");
    let [a, b, c, d] = ip.octets();
    Task {
        ns,
        ip,
        mac: format!("02:42:{a:02x}:{b:02x}:{c:02x}:{d:02x}"),
    }
}

#[test]
fn tables_drive_every_node_and_a_dead_worker_is_withdrawn() {
    let Some(_root) =
        require_root("netns::tables::tables_drive_every_node_and_a_dead_worker_is_withdrawn")
    else {
        return;
    };
    let topo = Topology::new(3);
    let mut nodes: Vec<Node<'_>> = topo
        .hosts()
        .iter()
        .map(|h| Node {
            host: h,
            dir: DataDir::new(h.label()),
            meshd: None,
        })
        .collect();
    let common = |n: &Node<'_>| {
        let mut v: Vec<String> = vec![
            "--data-dir".into(),
            n.dir.path().into(),
            "--listen-addr".into(),
            n.api(),
            "--hostname".into(),
            n.host.label().into(),
        ];
        v.extend(n.dataplane_args());
        v
    };
    let mut args = vec!["init".into(), "--heartbeat-period".into(), HEARTBEAT.into()];
    args.extend(common(&nodes[0]));
    let lines = nodes[0].start(args);
    let token = token_from(&lines, "worker");
    let manager_api = nodes[0].api();
    for n in nodes.iter_mut().skip(1) {
        let mut args = vec!["join".into()];
        args.extend(common(n));
        args.extend(["--token".into(), token.clone(), manager_api.clone()]);
        n.start(args);
    }
    let ids: Vec<String> = {
        let list = json(&nodes[0].meshctl_ok(&["node", "ls", "--format", "json"]));
        topo.hosts()
            .iter()
            .map(|h| {
                list.as_array()
                    .unwrap()
                    .iter()
                    .find(|n| n["hostname"] == h.label())
                    .and_then(|n| n["id"].as_str())
                    .expect("node listed")
                    .to_owned()
            })
            .collect()
    };

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
        "--",
        "/bin/true",
    ]);
    assert!(out.contains("verify: Service converged"), "{out}");
    assert!(out.contains("overall progress: 3 out of 3 nodes"), "{out}");

    let t1 = place_task(&nodes[0], "web", &ids[1]);
    let t2 = place_task(&nodes[0], "web", &ids[2]);
    wait_until(
        "a task on worker 1 to reach one on worker 2",
        Duration::from_secs(15),
        || t1.reaches(t2.ip).then_some(()),
    );
    assert!(t2.reaches(t1.ip));
    assert!(nodes[1].vxlan_fdb(vni).contains(&t2.mac));

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
    let killed = Instant::now();
    nodes[2].meshd.take().expect("running").kill();
    ip(&["link", "set", &port, "down"]);
    wait_until(
        "worker 2's endpoint to leave worker 1's FDB",
        Duration::from_secs(5),
        || (!nodes[1].vxlan_fdb(vni).contains(&t2.mac)).then_some(()),
    );
    let withdrawn = killed.elapsed();
    eprintln!(
        "dead worker withdrawn from another node's kernel {} ms after SIGKILL (heartbeat {HEARTBEAT} x 3)",
        withdrawn.as_millis()
    );
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
    let (before, _) = nodes[2].saved_tables().expect("worker 2 saved its tables");
    ip(&["link", "set", &port, "up"]);
    let mut args: Vec<String> = vec![
        "run".into(),
        "--data-dir".into(),
        nodes[2].dir.path().into(),
    ];
    args.extend(nodes[2].dataplane_args());
    nodes[2].start(args);
    let (revision, entries) = wait_until(
        "every node to hold the same tables",
        Duration::from_secs(20),
        || {
            let all: Vec<(u64, serde_json::Value)> =
                nodes.iter().filter_map(Node::saved_tables).collect();
            (all.len() == 3 && all.iter().all(|t| *t == all[0]) && all[0].0 > before)
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
    for n in &mut nodes {
        if let Some(g) = n.meshd.take() {
            g.stop();
        }
        meshd::down(n.host);
    }
}
