//! `cargo xtask demo`: Swarm's routing mesh on three hosts in network
//! namespaces. A "web" service has three tasks on two of the hosts; its
//! published port answers on every host, the third included, and spreads
//! connections over all tasks wherever they run.

use std::{collections::BTreeMap, net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{
    Task, Topology,
    meshd::{self, ConfigFile, Published},
    netns::{BPF_ROOT, UNDERLAY_IFACE},
    services,
};

const WEB_PORT: u16 = 8080;
const REQUESTS: usize = 30;

pub fn run() -> Result<()> {
    if !crate::is_root() {
        bail!("the demo creates network namespaces and loads eBPF: run it as root");
    }
    crate::setup::run()?;
    crate::run_ok(crate::cargo().args(["build", "--package", "dataplane", "--bins"]))?;
    let meshd_bin = crate::target_dir().join("debug/meshd");
    // SAFETY: set before any thread of ours reads the environment.
    unsafe { std::env::set_var("MESHD", &meshd_bin) };

    println!(
        "\n== underlay: bridge br0 in its own namespace; 3 hosts and a client attached by veth"
    );
    let mut topo = Topology::new(3);
    topo.route_tasks_via_underlay();
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
    let (h1, h2, h3, client) = (topo.host(0), topo.host(1), topo.host(2), topo.host(3));

    println!(
        "\n== service web: 3 tasks (web.1 on host1, web.2 and web.3 on host2), published on port {WEB_PORT}"
    );
    let tasks: Vec<(&str, Task)> = vec![
        ("web.1", h1.add_task(0)),
        ("web.2", h2.add_task(0)),
        ("web.3", h2.add_task(1)),
    ];
    let _servers: Vec<services::Server> = tasks
        .iter()
        .map(|(name, t)| services::tcp_echo(t.ns(), SocketAddr::from((t.addr(), 80)), name))
        .collect();
    for (name, t) in &tasks {
        println!("   {name:<6} {}:80", t.addr());
    }
    let backends: Vec<_> = tasks.iter().map(|(_, t)| t.addr()).collect();
    let web = Published {
        id: 1,
        name: "web",
        port: WEB_PORT,
        protocol: "tcp",
        target_port: 80,
        backends: &backends,
    };
    let local_ifaces = |h: &mesh_tests::Host| -> Vec<&str> {
        tasks
            .iter()
            .filter(|(_, t)| t.addr().octets()[2] == h.index())
            .map(|(_, t)| t.host_iface())
            .collect()
    };

    println!(
        "\n== meshd on every host (XDP counters + TC load balancer on {UNDERLAY_IFACE}, maps pinned under {BPF_ROOT}/<node>)"
    );
    let configs: Vec<ConfigFile> = [h1, h2, h3]
        .iter()
        .map(|h| {
            ConfigFile::write(
                h,
                &local_ifaces(h),
                serde_json::json!({}),
                std::slice::from_ref(&web),
            )
        })
        .collect();
    let daemons: Vec<_> = [h1, h2, h3]
        .iter()
        .zip(&configs)
        .map(|(h, c)| meshd::start(h, Some(c), &[]))
        .collect();
    println!("   ready on host1, host2, host3");

    println!("\n== {REQUESTS} connections from the client to each host's published port");
    for h in [h1, h2, h3] {
        let front = SocketAddr::from((h.addr(), WEB_PORT));
        let tally = client.enter(|| -> Result<BTreeMap<String, usize>> {
            let mut tally = BTreeMap::new();
            for _ in 0..REQUESTS {
                let who = services::tcp_ask(front, Duration::from_secs(5))
                    .with_context(|| format!("request to {front}"))?;
                *tally.entry(who).or_default() += 1;
            }
            Ok(tally)
        })?;
        let spread: Vec<String> = tally.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let note = if local_ifaces(h).is_empty() {
            "  (no task runs here)"
        } else {
            ""
        };
        println!(
            "   via {:<5} {front:<20} -> {}{note}",
            h.label(),
            spread.join(", ")
        );
    }

    println!("\n== `meshd lb ls --node <host3>`: frontends, Maglev slots and counters");
    print!(
        "{}",
        meshd_output(
            &meshd_bin,
            &["lb", "ls", "--node", h3.node_name(), "--bpf-root", BPF_ROOT]
        )?
    );
    println!("\n== `meshd stats --node <host1>`: what the XDP parser counted on host1's underlay");
    print!(
        "{}",
        meshd_output(
            &meshd_bin,
            &["stats", "--node", h1.node_name(), "--bpf-root", BPF_ROOT]
        )?
    );

    println!("\n== tearing down (meshd stopped, `meshd down` on every host, namespaces removed)");
    drop(daemons);
    for h in [h1, h2, h3] {
        meshd::down(h);
    }
    Ok(())
}

fn meshd_output(meshd: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = Command::new(meshd)
        .args(args)
        .output()
        .context("running meshd")?;
    if !out.status.success() {
        bail!("meshd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
