//! `cargo xtask demo`: Swarm mode on three hosts in network namespaces, as
//! the seeds' 3-node demo runs it. One manager and two workers run `meshd`
//! (control plane, data plane and executor); `meshctl` on the manager
//! creates services, and the cluster places, runs, serves and repairs them:
//!
//! - `web`: 3 replicas of `mesh-web` (a small HTTP server of ours),
//!   published on 8080: every host answers, from every task;
//! - `psql`: postgres on the overlay network `backend`, and a `client` task
//!   there that reaches it by the name `psql` (the seeds' drupal/psql);
//! - one web task is killed, and the orchestrator replaces it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{
    ChildGuard, Host, Topology,
    meshd::{self, remove_task_scope},
    netns::{BPF_ROOT, UNDERLAY_IFACE},
    services,
};

const WEB_PORT: u16 = 8080;
const REQUESTS: usize = 9;

/// One host's meshd: its data dir and task scope are removed on Drop.
struct Node<'a> {
    host: &'a Host,
    dir: PathBuf,
    scope: String,
    meshd: Option<ChildGuard>,
}

impl Node<'_> {
    fn args(&self, sub: &str) -> Vec<String> {
        [
            sub,
            "--data-dir",
            self.dir.to_str().expect("utf-8"),
            "--listen-addr",
            &format!("{}:2377", self.host.addr()),
            "--hostname",
            self.host.label(),
            "--task-scope",
            &self.scope,
            "--node",
            self.host.node_name(),
            "--underlay",
            UNDERLAY_IFACE,
            "--bpf-root",
            BPF_ROOT,
            "--drain-ms",
            "500",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn meshctl(&self, args: &[&str]) -> Result<Output> {
        self.host
            .command(meshd::meshctl_bin())
            .args(["--data-dir", self.dir.to_str().expect("utf-8")])
            .args(args)
            .output()
            .context("running meshctl")
    }

    /// Runs meshctl, echoing the command line and its output.
    fn show(&self, args: &[&str]) -> Result<String> {
        println!("\n$ meshctl {}", args.join(" "));
        let out = self.meshctl(args)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{text}");
        if !out.status.success() {
            bail!("meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(text)
    }

    fn quiet(&self, args: &[&str]) -> Result<String> {
        let out = self.meshctl(args)?;
        if !out.status.success() {
            bail!("meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Node<'_> {
    fn drop(&mut self) {
        // SIGTERM: meshd stops its tasks on the way out.
        if let Some(m) = self.meshd.take() {
            m.stop();
        }
        remove_task_scope(&self.scope);
        meshd::down(self.host);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The postgres server binary: on PATH, else Debian's package layout.
fn postgres_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("postgres").exists() && d.join("initdb").exists())
    });
    on_path.or_else(|| {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|d| d.join("postgres").exists())
            .collect();
        found.sort();
        found.pop()
    })
}

pub fn run() -> Result<()> {
    if !crate::is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    crate::setup::run()?;
    if postgres_bin_dir().is_none() || which("psql").is_none() {
        println!("== installing postgresql (the demo's psql service)");
        crate::setup::apt_install(&["postgresql", "postgresql-client"])?;
    }
    let pg = postgres_bin_dir().context("postgres not found after installing postgresql")?;
    crate::run_ok(crate::cargo().args([
        "build",
        "--package",
        "dataplane",
        "--package",
        "meshd",
        "--bins",
        "--package",
        "meshctl",
    ]))?;
    let bin = crate::target_dir().join("debug");
    // SAFETY: set before any thread of ours reads the environment.
    unsafe {
        std::env::set_var("MESHD", bin.join("meshd"));
        std::env::set_var("MESHCTL", bin.join("meshctl"));
    }
    let web = bin.join("mesh-web");
    let web = web.to_str().context("utf-8 path")?;
    let started = Instant::now();

    println!("== underlay: bridge br0 in its own namespace; 3 hosts and a client attached by veth");
    let mut topo = Topology::new(3);
    topo.add_host("client");
    for h in topo.hosts() {
        println!(
            "   {:<7} {}/{}  netns {}",
            h.label(),
            h.addr(),
            h.prefix_len(),
            h.ns().name()
        );
    }
    let client = topo.host(3);
    let pid = std::process::id();
    let mut nodes: Vec<Node<'_>> = (0..3)
        .map(|i| Node {
            host: topo.host(i),
            dir: std::env::temp_dir().join(format!("mesh-demo-{pid}-{i}")),
            scope: format!("demo{pid}n{i}"),
            meshd: None,
        })
        .collect();

    println!("\n== meshd init on host1 (manager), meshd join on host2 and host3 (workers)");
    let (guard, lines) = meshd::start_control(nodes[0].host, &str_args(&nodes[0].args("init")));
    nodes[0].meshd = Some(guard);
    let token = lines
        .iter()
        .skip_while(|l| !l.contains("To add a worker"))
        .find_map(|l| l.trim().strip_prefix("meshd join --token "))
        .and_then(|r| r.split_whitespace().next())
        .context("no worker token in meshd init's output")?
        .to_owned();
    let manager = format!("{}:2377", nodes[0].host.addr());
    for n in nodes.iter_mut().skip(1) {
        let mut args = n.args("join");
        args.extend(["--token".into(), token.clone(), manager.clone()]);
        let (guard, _) = meshd::start_control(n.host, &str_args(&args));
        n.meshd = Some(guard);
    }
    let m = &nodes[0];
    m.show(&["node", "ls"])?;

    m.show(&["network", "create", "backend"])?;
    m.show(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--publish",
        &format!("{WEB_PORT}:80"),
        "--",
        web,
        "--listen",
        "0.0.0.0:80",
    ])?;
    // postgres refuses to run as root: the task starts it as the postgres
    // user, on a fresh data dir.
    let pg_script = format!(
        "D=$(mktemp -d) && chown postgres \"$D\" && \
         runuser -u postgres -- {pg}/initdb -D \"$D\" -A trust >/dev/null && \
         echo 'host all all 0.0.0.0/0 trust' >> \"$D/pg_hba.conf\" && \
         exec runuser -u postgres -- {pg}/postgres -D \"$D\" -c listen_addresses='*' -k /tmp",
        pg = pg.display()
    );
    m.show(&[
        "service",
        "create",
        "--name",
        "psql",
        "--network",
        "backend",
        "--",
        "/bin/sh",
        "-c",
        &pg_script,
    ])?;
    m.show(&[
        "service",
        "create",
        "--name",
        "client",
        "--network",
        "backend",
        "--",
        "/bin/sh",
        "-c",
        "until psql -h psql -U postgres -Atc \"select 'client reached psql: ' || version()\"; \
         do sleep 1; done; exec sleep infinity",
    ])?;
    m.show(&["service", "ls"])?;
    m.show(&["service", "ps", "web"])?;

    println!(
        "\n== {REQUESTS} connections from the client to each host's published port {WEB_PORT}"
    );
    for n in &nodes {
        let front = SocketAddr::from((n.host.addr(), WEB_PORT));
        let tally = client.enter(|| -> Result<BTreeMap<String, usize>> {
            let mut tally = BTreeMap::new();
            for _ in 0..REQUESTS {
                let body = services::http_get(front, "/")
                    .with_context(|| format!("request to {front}"))?;
                *tally.entry(body).or_default() += 1;
            }
            Ok(tally)
        })?;
        let spread: Vec<String> = tally.iter().map(|(k, v)| format!("{k} x{v}")).collect();
        println!("   curl {front:<20} -> {}", spread.join(", "));
    }

    println!("\n== the client task reaches postgres by the service name psql (its VIP, port 5432)");
    let ps = json(&m.quiet(&["service", "ps", "client", "--format", "json"])?)?;
    let netns = ps
        .as_array()
        .and_then(|a| a.iter().find_map(|t| t["netns"].as_str()))
        .context("the client task has no namespace")?
        .trim_start_matches("/run/netns/")
        .to_owned();
    let vip = wait(
        "the embedded DNS to answer psql",
        Duration::from_secs(30),
        || {
            let out = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns,
                    "dig",
                    "+short",
                    "+time=1",
                    "@127.0.0.11",
                    "psql",
                ])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (!text.is_empty()).then_some(text)
        },
    )?;
    println!("   dig @127.0.0.11 psql, in the client task: {vip}");
    // The client task itself runs psql until it answers; its log says so.
    let answer = wait(
        "the client task to reach psql",
        Duration::from_secs(60),
        || task_log(&nodes, m, "client").filter(|l| l.contains("client reached psql")),
    );
    // A failure here is reported at the end, after the rest has run.
    let psql_failed = match &answer {
        Ok(log) => {
            let line = log
                .lines()
                .find(|l| l.contains("client reached psql"))
                .unwrap_or("");
            println!("   client's log: {line}");
            None
        }
        Err(e) => {
            let log = task_log(&nodes, m, "client").unwrap_or_default();
            println!("   FAILED: {e}; client's log:\n{log}");
            Some(format!("the client task did not reach psql: {e}"))
        }
    };

    println!("\n== killing web.2's process (SIGKILL); the orchestrator replaces it");
    let ps = json(&m.quiet(&["service", "ps", "web", "--format", "json"])?)?;
    let victim = ps
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|t| t["name"] == "web.2" && t["desired"] == "running")
        })
        .context("no web.2")?;
    let (id, host) = (
        victim["id"].as_str().unwrap_or_default().to_owned(),
        victim["node_hostname"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    let owner = nodes
        .iter()
        .find(|n| n.host.label() == host)
        .context("web.2's node")?;
    kill_task(&owner.scope, &id)?;
    wait("web.2 to be replaced", Duration::from_secs(30), || {
        let ps = m.quiet(&["service", "ps", "web"]).ok()?;
        ps.lines()
            .any(|l| l.contains("\\_ web.2") && l.contains("non-zero exit (137)"))
            .then_some(())
    })?;
    wait("web.2 to run again", Duration::from_secs(30), || {
        let ls = m.quiet(&["service", "ls"]).ok()?;
        ls.lines()
            .any(|l| l.contains(" web ") && l.contains("3/3"))
            .then_some(())
    })?;
    m.show(&["service", "ps", "web"])?;

    println!(
        "\n== done in {:.1} s; tearing down (meshd stopped with its tasks, `meshd down` on every host, namespaces removed)",
        started.elapsed().as_secs_f64()
    );
    drop(nodes);
    if let Some(e) = psql_failed {
        bail!("{e}");
    }
    Ok(())
}

fn str_args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn json(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).context("meshctl's JSON")
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(program))
            .find(|p| p.exists())
    })
}

/// SIGKILL to every process of a task (its cgroup under the node's scope).
fn kill_task(scope: &str, id: &str) -> Result<()> {
    let procs = meshd::cgroup2_mount()
        .context("no cgroup2 mount")?
        .join(scope)
        .join(id)
        .join("cgroup.procs");
    let pids =
        std::fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
        // SAFETY: a pid from the demo's own task cgroup.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    Ok(())
}

/// The log of `service`'s first running task, read on the node running it.
fn task_log(nodes: &[Node<'_>], m: &Node<'_>, service: &str) -> Option<String> {
    let ps = json(
        &m.quiet(&["service", "ps", service, "--format", "json"])
            .ok()?,
    )
    .ok()?;
    let t = ps
        .as_array()?
        .iter()
        .find(|t| t["desired"] == "running" && t["observed"] == "running")?;
    let node = nodes
        .iter()
        .find(|n| n.host.label() == t["node_hostname"])?;
    let path: &Path = &node
        .dir
        .join("tasks")
        .join(t["id"].as_str()?)
        .join("output.log");
    std::fs::read_to_string(path).ok()
}
