//! The service model end to end: real meshd processes (1 manager, 2
//! workers, a fourth node that joins later) run real tasks (`mesh-web`)
//! that the leader's orchestrator places, and the routing mesh serves them
//! to an external client.
//!
//! - replicas 3 spread one per node, and a published port answers on every
//!   node from every task;
//! - a task killed with SIGKILL is replaced, and `service ps` shows the
//!   dead one as history with its exit code;
//! - a rolling update to a failing command rolls back to the old spec,
//!   while a client keeps asking through the mesh (failures counted);
//! - draining a node moves its tasks;
//! - `mode=host` answers only on the node running the task; dnsrr answers
//!   the tasks' addresses;
//! - a global service runs on every node, and a node that joins gets one.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use mesh_tests::{Host, Topology, meshd, require_root, services};

use super::control::{Node, json, token_from, wait_until};

const PUBLISHED: u16 = 8080;

/// Who answers `count` new connections from `client` to `node:port`: task
/// name -> answers. The first failure is an error.
fn tally(
    client: &Host,
    node: Ipv4Addr,
    port: u16,
    count: usize,
) -> Result<BTreeMap<String, usize>, String> {
    client.enter(|| {
        let mut t = BTreeMap::new();
        for i in 0..count {
            let body = services::http_get(SocketAddr::from((node, port)), "/")
                .map_err(|e| format!("connection {i} to {node}:{port}: {e}"))?;
            let name = body
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            *t.entry(name).or_default() += 1;
        }
        Ok(t)
    })
}

/// The tasks of `service` as `service ps --format json` gives them.
fn tasks(manager: &Node<'_>, service: &str) -> Vec<serde_json::Value> {
    json(&manager.meshctl_ok(&["service", "ps", service, "--format", "json"]))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The running tasks of `service` that are meant to run: not a stopping
/// one that still runs while it drains (its namespace goes when it ends).
fn live_tasks(manager: &Node<'_>, service: &str) -> Vec<serde_json::Value> {
    tasks(manager, service)
        .into_iter()
        .filter(|t| t["desired"] == "running" && t["observed"] == "running")
        .collect()
}

/// (task name, node hostname) of each of [`live_tasks`].
fn running(manager: &Node<'_>, service: &str) -> BTreeSet<(String, String)> {
    live_tasks(manager, service)
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or_default().to_owned(),
                t["node_hostname"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn hostnames(set: &BTreeSet<(String, String)>) -> BTreeSet<String> {
    set.iter().map(|(_, h)| h.clone()).collect()
}

#[test]
fn services_are_placed_restarted_updated_and_served_by_the_mesh() {
    let Some(_root) = require_root(
        "netns::services::services_are_placed_restarted_updated_and_served_by_the_mesh",
    ) else {
        return;
    };
    let mut topo = Topology::new(4);
    topo.add_host("client");
    let mut nodes = Node::for_hosts(&topo);
    nodes.truncate(4);
    let client = topo.host(4);
    let common = |n: &Node<'_>| {
        let mut v = n.common_args();
        v.extend(n.dataplane_args());
        // Short drains keep the test quick; the default is 2 s.
        v.extend(["--drain-ms".into(), "500".into()]);
        v
    };
    let mut args = vec!["init".into(), "--heartbeat-period".into(), "500ms".into()];
    args.extend(common(&nodes[0]));
    let lines = nodes[0].start(args);
    let token = token_from(&lines, "worker");
    let manager_api = nodes[0].api();
    let join = |n: &mut Node<'_>| {
        let mut args = vec!["join".into()];
        args.extend(common(n));
        args.extend(["--token".into(), token.clone(), manager_api.clone()]);
        n.start(args);
    };
    for n in nodes.iter_mut().take(3).skip(1) {
        join(n);
    }
    let label = |i: usize| nodes[i].host.label().to_owned();
    let web = meshd::mesh_web_bin();
    let web = web.to_str().expect("utf-8 path");
    let m = &nodes[0];

    // Replicas 3 on 3 nodes: one each; the CLI waits until they run.
    m.meshctl_ok(&["network", "create", "red"]);
    let out = m.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--network",
        "red",
        "--publish",
        &format!("{PUBLISHED}:80"),
        "--restart-delay",
        "200ms",
        "--update-parallelism",
        "1",
        "--update-monitor",
        "2s",
        "--update-failure-action",
        "rollback",
        "--",
        web,
        "--listen",
        "0.0.0.0:80",
    ]);
    assert!(out.contains("overall progress: 3 out of 3 tasks"), "{out}");
    assert!(out.contains("verify: Service web converged"), "{out}");
    let placed = running(m, "web");
    assert_eq!(placed.len(), 3, "{placed:?}");
    assert_eq!(
        hostnames(&placed),
        (0..3).map(label).collect::<BTreeSet<_>>(),
        "not one per node: {placed:?}"
    );
    let ls = m.meshctl_ok(&["service", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.contains("web") && l.contains("3/3") && l.contains("*:8080->80/tcp")),
        "{ls}"
    );

    // `service logs`: each task's output, fetched from the node it ran on.
    let out = m.meshctl(&["service", "logs", "web"]);
    let logs =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut seen = BTreeSet::new();
    for (name, host) in &placed {
        let line = logs
            .lines()
            .find(|l| l.starts_with(&format!("{name}.")) && l.contains(&format!("@{host} ")))
            .unwrap_or_else(|| panic!("no log line of {name} on {host}:\n{logs}"));
        assert!(
            line.contains(&format!("| mesh-web: {name} listening on 0.0.0.0:80")),
            "{line}"
        );
        seen.insert(host.clone());
    }
    assert_eq!(seen.len(), 3, "{logs}");

    // The published port answers on every node, from every task.
    for n in nodes.iter().take(3) {
        let t = wait_until(
            &format!("{}:{PUBLISHED} to reach all three tasks", n.host.label()),
            Duration::from_secs(20),
            || {
                tally(client, n.host.addr(), PUBLISHED, 30)
                    .ok()
                    .filter(|t| t.len() == 3)
            },
        );
        assert_eq!(t.values().sum::<usize>(), 30, "{t:?}");
    }

    // SIGKILL one task's process: it is replaced, and its end is history.
    let victim = tasks(m, "web")
        .into_iter()
        .find(|t| t["name"] == "web.2")
        .expect("web.2");
    let victim_id = victim["id"].as_str().unwrap().to_owned();
    let host = victim["node_hostname"].as_str().unwrap().to_owned();
    let owner = nodes
        .iter()
        .find(|n| n.host.label() == host)
        .expect("its node");
    let procs = node::executor::cgroup2_mount()
        .unwrap()
        .join(owner.dir.task_scope())
        .join(&victim_id)
        .join("cgroup.procs");
    let pids = std::fs::read_to_string(&procs).expect("the task's cgroup");
    for pid in pids.lines() {
        // SAFETY: a pid from the task's own cgroup, which this test's meshd made.
        unsafe { libc::kill(pid.trim().parse().unwrap(), libc::SIGKILL) };
    }
    let ps = wait_until("web.2 to be replaced", Duration::from_secs(20), || {
        let ps = m.meshctl_ok(&["service", "ps", "web"]);
        let ok = running(m, "web").len() == 3
            && ps.lines().any(|l| {
                l.contains("\\_ web.2")
                    && l.contains("Failed")
                    && l.contains("task: non-zero exit (137)")
            });
        ok.then_some(ps)
    });
    assert_eq!(running(m, "web").len(), 3, "{ps}");

    // A rolling update to a failing command rolls back, while a client
    // keeps asking every node through the mesh.
    let stop = AtomicBool::new(false);
    let (asked, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let fronts: Vec<Ipv4Addr> = (0..3).map(|i| nodes[i].host.addr()).collect();
    let before = m.meshctl_ok(&["service", "inspect", "web"]);
    let old_command = json(&before)[0]["spec"]["command"].clone();
    let (update, errors) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            client.enter(|| {
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    for f in &fronts {
                        asked.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = services::http_get(SocketAddr::from((*f, PUBLISHED)), "/") {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("{f}: {e}"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                errors
            })
        });
        // First an update that works (one task at a time, each watched
        // for 2 s), then one whose tasks fail at once.
        let good = m.meshctl_ok(&["service", "update", "web", "--env", "RELEASE=2"]);
        assert!(good.contains("verify: Service web converged"), "{good}");
        let update = m.meshctl(&[
            "service", "update", "web", "--args", "/bin/sh", "-c", "exit 3",
        ]);
        stop.store(true, Ordering::Relaxed);
        (update, load.join().expect("load thread"))
    });
    let out = String::from_utf8_lossy(&update.stdout).into_owned();
    let err = String::from_utf8_lossy(&update.stderr).into_owned();
    assert!(
        !update.status.success(),
        "a rolled-back update is an error: {out}"
    );
    assert!(
        err.contains("update rolled back due to failure or early termination of task"),
        "{out}\n{err}"
    );
    let svc = json(&m.meshctl_ok(&["service", "inspect", "web"]))[0].clone();
    assert_eq!(svc["spec"]["command"], old_command);
    assert_eq!(svc["update_status"]["state"], "rollback_completed");
    let now = running(m, "web");
    assert_eq!(now.len(), 3, "{now:?}");
    let (asked, failed) = (asked.into_inner(), failed.into_inner());
    eprintln!(
        "rolling update with rollback: {failed} of {asked} requests through the mesh failed: {errors:?}"
    );
    assert!(asked > 50, "the client hardly asked: {asked}");
    assert!(
        failed * 10 < asked,
        "{failed} of {asked} failed: {errors:?}"
    );

    // Scale down while requests are open: a removed task drains (no new
    // flows, its open ones finish) before it stops.
    let front = SocketAddr::from((nodes[0].host.addr(), PUBLISHED));
    let answers: Vec<Result<String, String>> = std::thread::scope(|s| {
        let open: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || {
                    client.enter(|| {
                        services::http_get(front, &format!("/slow/2500/{i}"))
                            .map_err(|e| e.to_string())
                    })
                })
            })
            .collect();
        // Every request is open (connected, waiting for its answer).
        let dst = front.to_string();
        wait_until("8 open requests", Duration::from_secs(10), || {
            let out = client.exec("ss", &["-Htn", "state", "established", "dst", &dst]);
            (String::from_utf8_lossy(&out.stdout).lines().count() >= 8).then_some(())
        });
        let out = m.meshctl_ok(&["service", "scale", "web=1"]);
        assert!(out.contains("web scaled to 1"), "{out}");
        open.into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });
    let by: Vec<&str> = answers
        .iter()
        .map(|a| {
            a.as_deref()
                .map_or("failed", |b| b.split_whitespace().next().unwrap_or(""))
        })
        .collect();
    assert!(
        answers.iter().all(Result::is_ok),
        "open requests broke on scale-down: {answers:?}"
    );
    assert!(
        by.iter().any(|n| *n == "web.2" || *n == "web.3"),
        "no open request was on a removed task, so nothing was drained: {by:?}"
    );
    eprintln!("open requests during scale-down answered by {by:?}");
    let ps = m.meshctl_ok(&["service", "ps", "web"]);
    assert_eq!(running(m, "web").len(), 1, "{ps}");
    m.meshctl_ok(&["service", "scale", "web=3"]);
    assert_eq!(running(m, "web").len(), 3);

    // Drain worker 2: its task moves; nothing moves back by itself.
    let w2 = label(2);
    m.meshctl_ok(&["node", "update", "--availability", "drain", &w2]);
    let moved = wait_until("worker 2 to be drained", Duration::from_secs(20), || {
        let r = running(m, "web");
        (r.len() == 3 && !hostnames(&r).contains(&w2)).then_some(r)
    });
    eprintln!("after drain: {moved:?}");
    m.meshctl_ok(&["node", "update", "--availability", "active", &w2]);

    // mode=host: answers only where the task runs; dnsrr: the name is the
    // tasks' addresses.
    m.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "api",
        "--replicas",
        "1",
        "--network",
        "red",
        "--endpoint-mode",
        "dnsrr",
        "--constraint",
        &format!("node.hostname=={}", label(1)),
        "--publish",
        "mode=host,published=9000,target=80",
        "--",
        web,
        "--listen",
        "0.0.0.0:80",
    ]);
    let on_w1 = wait_until(
        "api on worker 1 to answer on 9000",
        Duration::from_secs(20),
        || tally(client, nodes[1].host.addr(), 9000, 5).ok(),
    );
    assert_eq!(on_w1.keys().collect::<Vec<_>>(), ["api.1"], "{on_w1:?}");
    for i in [0, 2] {
        let r = tally(client, nodes[i].host.addr(), 9000, 1);
        assert!(
            r.is_err(),
            "{}:9000 answered without a task there: {r:?}",
            label(i)
        );
    }
    let api_addrs: BTreeSet<String> = live_tasks(m, "api")
        .iter()
        .flat_map(|t| t["attachments"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["addr"].as_str().map(str::to_owned))
        .collect();
    let web_task = live_tasks(m, "web")
        .into_iter()
        .next()
        .expect("a running web task");
    let netns = web_task["netns"].as_str().expect("netns").to_owned();
    let ns_name = netns.trim_start_matches("/run/netns/").to_owned();
    let dig = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns_name,
                "dig",
                "+short",
                "+time=1",
                "+tries=1",
                "@127.0.0.11",
                "api",
            ])
            .output()
            .expect("dig");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let mut last = String::new();
    let mut resolved = BTreeSet::new();
    for _ in 0..30 {
        last = dig();
        resolved = last.lines().map(str::to_owned).collect();
        if resolved == api_addrs {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(resolved, api_addrs, "dig api from {ns_name}: {last}");
    assert_eq!(resolved.len(), 1);

    // A task's networks and names are there when it starts: one that looks
    // up `api` first thing, and gives up if it cannot, runs at once.
    m.meshctl_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "probe",
        "--network",
        "red",
        "--restart-condition",
        "none",
        "--",
        "/bin/sh",
        "-c",
        "getent hosts api || exit 7; exec sleep 600",
    ]);
    let probe = wait_until("probe to run or fail", Duration::from_secs(20), || {
        let t = tasks(m, "probe");
        let first = t.first()?.clone();
        (first["observed"] == "running" || first["observed"] == "failed").then_some(first)
    });
    assert_eq!(
        probe["observed"], "running",
        "it started before its network: {probe:?}"
    );
    let logs = m.meshctl_ok(&["service", "logs", "probe"]);
    assert!(
        api_addrs.iter().all(|a| logs.contains(a.as_str())),
        "probe did not resolve api to {api_addrs:?} at its start:\n{logs}"
    );

    // A global service: one task per node, and the node that joins gets
    // its own.
    m.meshctl_ok(&[
        "service",
        "create",
        "--name",
        "agent",
        "--mode",
        "global",
        "--network",
        "red",
        "--",
        web,
        "--listen",
        "0.0.0.0:81",
    ]);
    let three = running(m, "agent");
    assert_eq!(
        hostnames(&three),
        (0..3).map(label).collect::<BTreeSet<_>>(),
        "{three:?}"
    );
    drop(three);
    join(&mut nodes[3]);
    let m = &nodes[0];
    let four = wait_until(
        "the new node's global task",
        Duration::from_secs(30),
        || {
            let r = running(m, "agent");
            (hostnames(&r).len() == 4).then_some(r)
        },
    );
    assert!(
        four.iter().all(|(name, _)| name.starts_with("agent.")),
        "{four:?}"
    );
}
