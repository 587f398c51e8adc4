//! A cluster node for tests that run `meshd` with its control plane:
//! its data dir, its process, `meshctl` with its credentials. Shared by the
//! namespace tier and the VM tier.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Output,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use mesh_tests::{
    ChildGuard, Host, Netns, Topology, meshd,
    netns::{BPF_ROOT, UNDERLAY_IFACE},
};

/// A data dir under /tmp, removed on Drop.
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn new(tag: &str) -> DataDir {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "mesh-data-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        DataDir(p)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl DataDir {
    /// Names this node's tasks' namespaces and cgroup (`--task-scope`).
    pub fn task_scope(&self) -> String {
        let name = self.0.file_name().and_then(|n| n.to_str()).unwrap_or("x");
        name.trim_start_matches("mesh-data-")
            .chars()
            .take(32)
            .collect()
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Node<'_> {
    fn drop(&mut self) {
        // meshd first (it would start tasks again), then what its tasks
        // left: a killed meshd leaves them running.
        drop(self.meshd.take());
        mesh_tests::meshd::remove_task_scope(&self.dir.task_scope());
    }
}

pub struct Node<'a> {
    pub host: &'a Host,
    pub dir: DataDir,
    pub meshd: Option<ChildGuard>,
}

impl Node<'_> {
    pub fn api(&self) -> String {
        format!("{}:2377", self.host.addr())
    }

    /// One node per host of `topo`, nothing started yet.
    pub fn for_hosts(topo: &Topology) -> Vec<Node<'_>> {
        topo.hosts()
            .iter()
            .map(|h| Node {
                host: h,
                dir: DataDir::new(h.label()),
                meshd: None,
            })
            .collect()
    }

    /// Data dir, listen address and hostname, for init and join.
    pub fn common_args(&self) -> Vec<String> {
        vec![
            "--data-dir".into(),
            self.dir.path().into(),
            "--listen-addr".into(),
            self.api(),
            "--hostname".into(),
            self.host.label().into(),
            "--task-scope".into(),
            self.dir.task_scope(),
        ]
    }

    /// `meshctl` on this node with its own credentials.
    pub fn meshctl(&self, args: &[&str]) -> Output {
        self.host
            .command(meshd::meshctl_bin())
            .arg("--data-dir")
            .arg(self.dir.path())
            .arg("--timeout")
            .arg("20")
            .args(args)
            .output()
            .expect("run meshctl")
    }

    pub fn meshctl_ok(&self, args: &[&str]) -> String {
        let out = self.meshctl(args);
        assert!(
            out.status.success(),
            "meshctl {args:?} on {} failed: {}",
            self.host.label(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    pub fn restart(&mut self) {
        let scope = self.dir.task_scope();
        let (guard, _) = meshd::start_control(
            self.host,
            &["run", "--data-dir", self.dir.path(), "--task-scope", &scope],
        );
        self.meshd = Some(guard);
    }
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The token printed after "run the following command" for `role`.
pub fn token_from(lines: &[String], role: &str) -> String {
    let at = lines
        .iter()
        .position(|l| l.contains(&format!("To add a {role}")))
        .unwrap_or_else(|| panic!("no {role} token in {lines:?}"));
    lines[at + 1..]
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("meshd join --token ")
                .map(|rest| rest.split_whitespace().next().expect("token").to_owned())
        })
        .expect("token line")
}

impl Node<'_> {
    /// The data plane on this node's host: its pins and underlay.
    pub fn dataplane_args(&self) -> Vec<String> {
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

    /// Starts meshd with `args` (init, join or run); returns its first lines.
    pub fn start(&mut self, args: Vec<String>) -> Vec<String> {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (guard, lines) = meshd::start_control(self.host, &argv);
        self.meshd = Some(guard);
        lines
    }
}

/// A task attached by hand (`task create --netns`): its namespace is the
/// test's, and the test runs what it serves.
pub struct Task {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub mac: String,
}

impl Task {
    /// Whether a ping from the task reaches `to` (3 tries).
    pub fn reaches(&self, to: Ipv4Addr) -> bool {
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
pub fn place_task(manager: &Node<'_>, service: &str, slot: u32, node_id: &str) -> Task {
    let ns = Netns::new();
    let path = ns.path();
    let out = manager.meshctl_ok(&[
        "task",
        "create",
        "--service",
        service,
        "--node",
        node_id,
        "--slot",
        &slot.to_string(),
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

/// Starts `nodes` as one cluster with their data planes: the first runs
/// `meshd init` (heartbeat `heartbeat`), the others join it as workers.
/// `extra` goes to every meshd. Returns the node ids, in `nodes`' order.
pub fn start_cluster(nodes: &mut [Node<'_>], heartbeat: &str, extra: &[&str]) -> Vec<String> {
    let common = |n: &Node<'_>| {
        let mut v = n.common_args();
        v.extend(n.dataplane_args());
        v.extend(extra.iter().map(|a| (*a).to_owned()));
        v
    };
    let mut args = vec!["init".into(), "--heartbeat-period".into(), heartbeat.into()];
    args.extend(common(&nodes[0]));
    let lines = nodes[0].start(args);
    let token = token_from(&lines, "worker");
    let api = nodes[0].api();
    for n in nodes.iter_mut().skip(1) {
        let mut args = vec!["join".into()];
        args.extend(common(n));
        args.extend(["--token".into(), token.clone(), api.clone()]);
        n.start(args);
    }
    node_ids(&nodes[0], nodes)
}

/// The id of each of `nodes`, as the manager `m` lists them.
pub fn node_ids(m: &Node<'_>, nodes: &[Node<'_>]) -> Vec<String> {
    let list = json(&m.meshctl_ok(&["node", "ls", "--format", "json"]));
    nodes
        .iter()
        .map(|n| {
            list.as_array()
                .expect("a node list")
                .iter()
                .find(|x| x["hostname"] == n.host.label())
                .and_then(|x| x["id"].as_str())
                .expect("node listed")
                .to_owned()
        })
        .collect()
}
