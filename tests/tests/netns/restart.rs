//! meshd restarts under load: a node's meshd is SIGKILLed and started
//! again while requests are open, 20 through the routing mesh's published
//! port (half of them entering through the restarted node) and 20 from a
//! task to the service's VIP; some of each reach the task on that node. The task must outlive its meshd: adopted by the
//! next one, not reaped, not replaced, and no open request broken: not
//! those to the task, nor those that entered through the restarted node's
//! own load balancer.

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use mesh_tests::{Topology, meshd, require_root, services};

use super::control::{Node, json, token_from, wait_until};

const PUBLISHED: u16 = 8080;
/// Requests open through the published port, and to the VIP from a task.
const OPEN: usize = 20;

/// (task id, name, node hostname, observed) of every task of `service`
/// meant to run.
fn live(manager: &Node<'_>, service: &str) -> BTreeSet<(String, String, String, String)> {
    json(&manager.meshctl_ok(&["service", "ps", service, "--format", "json"]))
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|t| t["desired"] == "running")
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
            (s("id"), s("name"), s("node_hostname"), s("observed"))
        })
        .collect()
}

#[test]
fn a_meshd_restart_keeps_its_tasks_and_their_connections() {
    let Some(_root) =
        require_root("netns::restart::a_meshd_restart_keeps_its_tasks_and_their_connections")
    else {
        return;
    };
    let mut topo = Topology::new(2);
    topo.add_host("client");
    let mut nodes = Node::for_hosts(&topo);
    nodes.truncate(2);
    let client = topo.host(2);
    let dataplane = |n: &Node<'_>| {
        let mut v = n.dataplane_args();
        v.extend(["--drain-ms".into(), "500".into()]);
        v
    };
    // A generous grace (10 missed 1 s heartbeats): the restart must not
    // count as a death, whatever this machine's load.
    let mut args: Vec<String> = ["init", "--heartbeat-misses", "10"]
        .map(str::to_owned)
        .to_vec();
    args.extend(nodes[0].common_args());
    args.extend(dataplane(&nodes[0]));
    let lines = nodes[0].start(args);
    let token = token_from(&lines, "worker");
    let mut args = vec!["join".to_owned()];
    args.extend(nodes[1].common_args());
    args.extend(dataplane(&nodes[1]));
    args.extend(["--token".into(), token, nodes[0].api()]);
    nodes[1].start(args);
    let web = meshd::mesh_web_bin();
    let (first, rest) = nodes.split_at_mut(1);
    let (m, worker) = (&first[0], &mut rest[0]);
    m.meshctl_ok(&["network", "create", "red"]);
    m.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--network",
        "red",
        "--replicas",
        "2",
        "--publish",
        &format!("{PUBLISHED}:80"),
        "--",
        web.to_str().expect("utf-8 path"),
        "--listen",
        "0.0.0.0:80",
    ]);
    let before = wait_until(
        "2 running tasks, one per node",
        Duration::from_secs(20),
        || {
            let l = live(m, "web");
            let hosts: BTreeSet<&String> = l.iter().map(|t| &t.2).collect();
            (l.len() == 2 && hosts.len() == 2 && l.iter().all(|t| t.3 == "running")).then_some(l)
        },
    );
    let victim = worker.host.label().to_owned();
    // The VIP on red, and the namespace of the task on the manager's node
    // (VIP flows from it are balanced by that node over both tasks).
    let red = json(&m.meshctl_ok(&["network", "inspect", "red"]))[0]["id"].clone();
    let vip: std::net::Ipv4Addr = json(&m.meshctl_ok(&["service", "inspect", "web"]))[0]["vips"]
        .as_array()
        .expect("vips")
        .iter()
        .find(|v| v["network"] == red)
        .and_then(|v| v["addr"].as_str())
        .expect("a VIP on red")
        .parse()
        .expect("an address");
    let here = m.host.label().to_owned();
    let task_ns = json(&m.meshctl_ok(&["service", "ps", "web", "--format", "json"]))
        .as_array()
        .expect("tasks")
        .iter()
        .find(|t| t["desired"] == "running" && t["node_hostname"] == here.as_str())
        .and_then(|t| t["netns"].as_str())
        .map(std::path::PathBuf::from)
        .expect("the manager node's task namespace");

    // Open requests through both nodes' published port, each held 2.5 s
    // by the task that answers it; wait until all are established.
    let fronts = [m.host.addr(), worker.host.addr()];
    let (restarted, to_vip) = std::thread::scope(|s| {
        let open: Vec<_> = (0..OPEN)
            .map(|i| {
                let front = SocketAddr::from((fronts[i % 2], PUBLISHED));
                s.spawn(move || {
                    client.enter(|| {
                        services::http_get(front, &format!("/slow/3000/{i}"))
                            .map_err(|e| format!("{front}: {e}"))
                    })
                })
            })
            .collect();
        let task_ns = &task_ns;
        let vip_open: Vec<_> = (0..OPEN)
            .map(|i| {
                let to = SocketAddr::from((vip, 80));
                s.spawn(move || {
                    mesh_tests::netns::enter_path(task_ns, || {
                        services::http_get(to, &format!("/slow/3000/vip{i}"))
                            .map_err(|e| format!("{to}: {e}"))
                    })
                })
            })
            .collect();
        wait_until("the open requests", Duration::from_secs(10), || {
            let out = client.exec("ss", &["-Htn", "state", "established"]);
            let vips = mesh_tests::netns::enter_path(task_ns, || {
                std::process::Command::new("ss")
                    .args(["-Htn", "state", "established", "dst", &vip.to_string()])
                    .output()
                    .expect("ss")
            });
            (String::from_utf8_lossy(&out.stdout).lines().count() >= OPEN
                && String::from_utf8_lossy(&vips.stdout).lines().count() >= OPEN)
                .then_some(())
        });
        // SIGKILL the worker's meshd and start it again, data plane and all.
        let n = &mut *worker;
        n.meshd.take().expect("running").kill();
        let mut args: Vec<String> = ["run", "--data-dir", n.dir.path(), "--task-scope"]
            .map(str::to_owned)
            .to_vec();
        args.push(n.dir.task_scope());
        args.extend(dataplane(n));
        n.start(args);
        (
            open.into_iter()
                .map(|h| h.join().expect("request thread"))
                .collect::<Vec<_>>(),
            vip_open
                .into_iter()
                .map(|h| h.join().expect("request thread"))
                .collect::<Vec<_>>(),
        )
    });
    let vip_broken: Vec<&String> = to_vip.iter().filter_map(|r| r.as_ref().err()).collect();
    let vip_by: BTreeSet<&str> = to_vip
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter_map(|b| b.split_whitespace().next())
        .collect();
    // Requests i % 2 == 0 entered through the manager's node, the others
    // through the restarted node's own load balancer.
    let (via_other, via_restarted): (Vec<_>, Vec<_>) =
        restarted.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let broken = |v: &[(usize, &Result<String, String>)]| {
        v.iter()
            .filter_map(|(_, r)| r.as_ref().err().cloned())
            .collect::<Vec<_>>()
    };
    let by: BTreeSet<&str> = via_other
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter_map(|b| b.split_whitespace().next())
        .collect();
    mesh_tests::figures::figure(&format!(
        "fault: meshd SIGKILL + restart on {victim} under {OPEN} open requests through the \
         published port and {OPEN} to the VIP: through the other \
         node {} of {} broken (answered by {by:?}); through the restarted node's own front {} of \
         {} broken; from a task to the VIP {} of {OPEN} broken (answered by {vip_by:?})",
        broken(&via_other).len(),
        via_other.len(),
        broken(&via_restarted).len(),
        via_restarted.len(),
        vip_broken.len(),
    ));
    assert!(
        vip_broken.is_empty(),
        "requests to the VIP broke: {vip_broken:?}"
    );
    assert_eq!(
        vip_by.len(),
        2,
        "the VIP requests did not reach both tasks: {vip_by:?}"
    );
    // The task on the restarted node outlived its meshd: flows to it
    // through the other node all finish (they broke when meshd reaped it);
    // flows through the restarted node's own front finish too (they broke
    // when it re-applied its saved tables, older than the kernel's state).
    for (what, v) in [
        ("the other node", &via_other),
        ("the restarted node", &via_restarted),
    ] {
        assert!(
            broken(v).is_empty(),
            "open requests through {what} broke: {:?}",
            broken(v)
        );
    }
    assert_eq!(
        by.len(),
        2,
        "the open requests did not reach both tasks: {by:?}"
    );

    // The same two tasks run: adopted, not replaced, nothing lost.
    let after = wait_until("the tasks to settle", Duration::from_secs(10), || {
        let l = live(m, "web");
        (l.len() == 2 && l.iter().all(|t| t.3 == "running")).then_some(l)
    });
    assert_eq!(after, before, "tasks were replaced across the restart");
    let ps = m.meshctl_ok(&["service", "ps", "web"]);
    assert!(!ps.contains("task lost"), "{ps}");
    assert!(!ps.contains("Failed"), "{ps}");
    // And the restarted node still serves both tasks on new connections.
    let front = SocketAddr::from((worker.host.addr(), PUBLISHED));
    wait_until(
        "new connections through the restarted node",
        Duration::from_secs(10),
        || {
            let names: BTreeSet<String> = (0..12)
                .filter_map(|i| client.enter(|| services::http_get(front, &format!("/{i}")).ok()))
                .filter_map(|b| b.split_whitespace().next().map(str::to_owned))
                .collect();
            (names.len() == 2).then_some(())
        },
    );

    // Removed by force while it runs: the node stops its tasks, takes its
    // data plane down and exits, saying why (it once kept serving its last
    // tables with its tasks running).
    let worker_id = json(&m.meshctl_ok(&["node", "inspect", &victim]))[0]["id"]
        .as_str()
        .expect("node id")
        .to_owned();
    m.meshctl_ok(&["node", "rm", "--force", &worker_id]);
    let status = wait_until(
        "the removed node's meshd to exit",
        Duration::from_secs(20),
        || worker.meshd.as_mut().expect("running").try_wait(),
    );
    assert!(!status.success(), "a removed node exited 0");
    let scope = node::executor::cgroup2_mount()
        .unwrap()
        .join(worker.dir.task_scope());
    let left: Vec<_> = std::fs::read_dir(&scope)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "tasks left running on the removed node: {left:?}"
    );
    assert!(
        !worker.host.pin_dir().exists(),
        "the removed node's pins are still there"
    );
}
