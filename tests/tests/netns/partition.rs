//! A leader partitioned from the other managers: nftables in the leader's
//! own namespace drops the control-plane port (2377) to and from the other
//! managers, while the underlay itself (VXLAN) stays up. The cut leader
//! must refuse writes, the majority elect a new leader and take writes,
//! the cut node keep forwarding its published port on its last tables,
//! and after the heal every node converge.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{Topology, meshd, require_root, services};

use super::cluster::{Node, json, token_from, wait_until};

const PUBLISHED: u16 = 8080;

fn leader(n: &Node<'_>) -> Option<String> {
    let out = n.meshctl(&["node", "ls", "--format", "json"]);
    json(&String::from_utf8_lossy(&out.stdout))
        .as_array()?
        .iter()
        .find(|n| n["manager_status"] == "Leader")
        .and_then(|n| n["hostname"].as_str().map(str::to_owned))
}

fn services_on(n: &Node<'_>) -> BTreeSet<String> {
    let out = n.meshctl(&["service", "ls", "--format", "json"]);
    json(&String::from_utf8_lossy(&out.stdout))
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|s| {
            s["spec"]["name"]
                .as_str()
                .or(s["name"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

/// The log position this manager has applied (as `info` shows it).
fn applied(n: &Node<'_>) -> Option<String> {
    let out = n.meshctl(&["info", "--format", "json"]);
    let v = json(&String::from_utf8_lossy(&out.stdout))["last_applied"].clone();
    (!v.is_null()).then(|| v.to_string())
}

#[test]
fn a_partitioned_leader_refuses_writes_keeps_forwarding_and_converges_after_the_heal() {
    let Some(_root) = require_root(
        "netns::partition::a_partitioned_leader_refuses_writes_keeps_forwarding_and_converges_after_the_heal",
    ) else {
        return;
    };
    let mut topo = Topology::new(3);
    topo.add_host("client");
    let mut nodes = Node::for_hosts(&topo);
    nodes.truncate(3);
    let client = topo.host(3);
    let mut args = vec!["init".to_owned()];
    args.extend(nodes[0].common_args());
    args.extend(nodes[0].dataplane_args());
    let lines = nodes[0].start(args);
    let token = token_from(&lines, "manager");
    let first = nodes[0].api();
    for n in nodes.iter_mut().skip(1) {
        let mut args = vec!["join".to_owned()];
        args.extend(n.common_args());
        args.extend(n.dataplane_args());
        args.extend(["--token".into(), token.clone(), first.clone()]);
        n.start(args);
    }
    wait_until(
        "three managers, one leader",
        Duration::from_secs(30),
        || {
            let out = nodes[0].meshctl(&["node", "ls", "--format", "json"]);
            let list = json(&String::from_utf8_lossy(&out.stdout));
            let s: Vec<&str> = list
                .as_array()?
                .iter()
                .filter_map(|n| n["manager_status"].as_str())
                .collect();
            (s.iter().filter(|s| **s == "Leader").count() == 1
                && s.iter().filter(|s| **s == "Reachable").count() == 2)
                .then_some(())
        },
    );
    let web = meshd::mesh_web_bin();
    nodes[0].meshctl_ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--publish",
        &format!("{PUBLISHED}:80"),
        "--",
        web.to_str().expect("utf-8 path"),
        "--listen",
        "0.0.0.0:80",
    ]);
    let l = wait_until("a leader", Duration::from_secs(10), || leader(&nodes[0]));
    let li = nodes
        .iter()
        .position(|n| n.host.label() == l)
        .expect("the leader");
    let cut = &nodes[li];
    let others: Vec<String> = nodes
        .iter()
        .filter(|n| n.host.label() != l)
        .map(|n| n.host.addr().to_string())
        .collect();
    let front = SocketAddr::from((cut.host.addr(), PUBLISHED));
    let answered = |n: usize| -> BTreeSet<String> {
        (0..n)
            .filter_map(|i| client.enter(|| services::http_get(front, &format!("/{i}")).ok()))
            .filter_map(|b| b.split_whitespace().next().map(str::to_owned))
            .collect()
    };
    wait_until(
        "the cut-to-be node's port to reach all 3 tasks",
        Duration::from_secs(20),
        || (answered(20).len() == 3).then_some(()),
    );

    // The cut: the control-plane port between the leader and the others,
    // both ways, in the leader's namespace only.
    let set = others.join(", ");
    let rules = format!(
        "table inet mesh_partition {{\n\
         chain input {{ type filter hook input priority -10; ip saddr {{ {set} }} tcp dport 2377 drop; ip saddr {{ {set} }} tcp sport 2377 drop; }}\n\
         chain output {{ type filter hook output priority -10; ip daddr {{ {set} }} tcp dport 2377 drop; ip daddr {{ {set} }} tcp sport 2377 drop; }}\n\
         }}\n"
    );
    let file = std::env::temp_dir().join(format!("mesh-partition-{}.nft", std::process::id()));
    std::fs::write(&file, rules).expect("write the rules");
    cut.host
        .exec_ok("nft", &["-f", file.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&file);
    let at = Instant::now();
    let mut refused_figure = None;

    // The majority elects a new leader (watched from the cut on), while
    // the cut leader refuses writes: a write it took in the instant of the
    // cut has an unknown outcome; from a second on (no quorum has acked it
    // since) writes are refused at once, "not applied".
    let majority: Vec<&Node<'_>> = nodes.iter().filter(|n| n.host.label() != l).collect();
    let (new, elected) = std::thread::scope(|s| {
        let watch = s.spawn(|| {
            let new = wait_until(
                "a new leader on the majority side",
                Duration::from_secs(15),
                || leader(majority[0]).filter(|n| *n != l),
            );
            (new, at.elapsed())
        });
        let mut first_unknown = None;
        let refused = wait_until(
            "the cut leader to refuse a write",
            Duration::from_secs(15),
            || {
                let started = Instant::now();
                let out = cut
                    .host
                    .command(meshd::meshctl_bin())
                    .args(["--data-dir", cut.dir.path(), "--timeout", "5"])
                    .args([
                        "service",
                        "create",
                        "--detach",
                        "--name",
                        "cut-write",
                        "--replicas",
                        "0",
                        "--",
                        "/bin/true",
                    ])
                    .output()
                    .expect("meshctl");
                let err = String::from_utf8_lossy(&out.stderr).to_string();
                assert!(!out.status.success(), "the cut leader took a write: {err}");
                assert!(
                    !err.contains("Timeout expired"),
                    "the manager did not answer in time: {err}"
                );
                if err.contains("(not applied") {
                    return Some((at.elapsed(), started.elapsed(), err));
                }
                assert!(err.contains("outcome unknown"), "{err}");
                first_unknown.get_or_insert(at.elapsed());
                None
            },
        );
        refused_figure = Some((refused, first_unknown));
        watch.join().expect("watch")
    });
    let (refused, first_unknown) = refused_figure.take().expect("the refusal");
    majority[0].meshctl_ok(&[
        "service",
        "create",
        "--detach",
        "--name",
        "majority-write",
        "--replicas",
        "0",
        "--",
        "/bin/true",
    ]);
    // The cut node still forwards its published port, on its last tables,
    // to every task (its own and those across the overlay).
    let during = answered(30);
    assert_eq!(
        during.len(),
        3,
        "the cut node's published port during the partition: {during:?}"
    );

    // The heal: every node converges on the same log and the same services.
    cut.host
        .exec_ok("nft", &["delete", "table", "inet", "mesh_partition"]);
    let healed = Instant::now();
    wait_until("every manager to converge", Duration::from_secs(30), || {
        let views: BTreeSet<(Option<String>, BTreeSet<String>)> =
            nodes.iter().map(|n| (applied(n), services_on(n))).collect();
        let views: Vec<_> = views.into_iter().collect();
        match views.as_slice() {
            [(Some(_), names)] if names.contains("majority-write") => Some(()),
            _ => None,
        }
    });
    let converged = healed.elapsed();
    let cut_write = services_on(cut).contains("cut-write");
    assert!(
        !cut_write || first_unknown.is_some(),
        "a write only ever reported not applied is present after the heal"
    );
    wait_until(
        "the healed node's published port to reach 3 tasks",
        Duration::from_secs(20),
        || (answered(30).len() == 3).then_some(()),
    );
    // Node death: a non-leader's meshd SIGKILLed and its underlay link
    // cut. Until its task's backend is out of every other node's load
    // balancer (DNS is served from the same tables, applied in the same
    // revision).
    let leader_now = wait_until("a leader", Duration::from_secs(10), || leader(&nodes[0]));
    // A node running a task of web that every other node balances to, a
    // follower if one does (the cut node's tasks were replaced while it was
    // away), and that task's addresses. Chosen afresh on every look: just
    // after the heal a node may still be marked down and its tasks
    // replaced, and a task chosen then would never reach the others.
    let backends = |n: &Node<'_>| -> BTreeSet<std::net::Ipv4Addr> {
        dataplane::inspect::read_lb(&n.host.pin_dir())
            .map(|views| {
                views
                    .iter()
                    .flat_map(|v| &v.backends)
                    .map(|b| b.address)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (di, dead_addrs) = wait_until(
        "a node whose task of web is in every other node's load balancer",
        Duration::from_secs(30),
        || {
            let tasks = json(&nodes[0].meshctl_ok(&["service", "ps", "web", "--format", "json"]));
            // Followers first; the leader only if it alone runs a task.
            let mut order: Vec<(usize, &Node<'_>)> = nodes.iter().enumerate().collect();
            order.sort_by_key(|(_, n)| n.host.label() == leader_now);
            order.into_iter().find_map(|(i, n)| {
                let addrs: BTreeSet<std::net::Ipv4Addr> = tasks
                    .as_array()?
                    .iter()
                    .filter(|t| t["desired"] == "running" && t["node_hostname"] == n.host.label())
                    .flat_map(|t| t["attachments"].as_array().cloned().unwrap_or_default())
                    .filter_map(|a| a["addr"].as_str()?.parse().ok())
                    .collect();
                let everywhere = !addrs.is_empty()
                    && nodes
                        .iter()
                        .filter(|o| o.host.label() != n.host.label())
                        .all(|o| !backends(o).is_disjoint(&addrs));
                everywhere.then_some((i, addrs))
            })
        },
    );
    let dead = nodes[di].host.label().to_owned();
    let in_lb = |n: &Node<'_>| !backends(n).is_disjoint(&dead_addrs);
    let victim = nodes[di].meshd.take().expect("running");
    let survivors: Vec<&Node<'_>> = nodes.iter().filter(|n| n.host.label() != dead).collect();
    let port = format!("p{}", nodes[di].host.index());
    let underlay = topo.underlay().name().to_owned();
    victim.kill();
    let killed = Instant::now();
    let st = std::process::Command::new("ip")
        .args(["-n", &underlay, "link", "set", &port, "down"])
        .status()
        .expect("ip");
    assert!(st.success());
    wait_until(
        "the dead node's task out of every load balancer",
        Duration::from_secs(30),
        || survivors.iter().all(|n| !in_lb(n)).then_some(()),
    );
    let withdrawn = killed.elapsed();
    mesh_tests::figures::figure(&format!(
        "fault: node death ({dead}: meshd SIGKILL + underlay link down): its task out of every \
         other node's load balancer after {} ms (heartbeat 1 s x 3 misses)",
        withdrawn.as_millis()
    ));

    mesh_tests::figures::figure(&format!(
        "fault: leader {l} cut from the other managers (nftables, port 2377): a write in flight \
         at the cut answered 'outcome unknown' at {} ms; writes refused 'not applied' from {} ms \
         after the cut (that call took {} ms); {new} elected {} ms after the cut; the cut node's \
         published port reached all 3 tasks during the partition; every manager converged {} ms \
         after the heal",
        first_unknown.map_or(0, |d| d.as_millis()),
        refused.0.as_millis(),
        refused.1.as_millis(),
        elected.as_millis(),
        converged.as_millis(),
    ));
    let hosts: Vec<_> = nodes.iter().map(|n| n.host).collect();
    drop(nodes);
    for h in hosts {
        meshd::down(h);
    }
}
