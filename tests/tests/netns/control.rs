//! The control plane as real processes: 3 managers and 2 workers, each a
//! `meshd` in its own host namespace, driven with `meshctl`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{Host, Topology, meshd, require_root};

pub(super) use crate::cluster::{DataDir, Node, json, token_from, wait_until};

/// The hostname of the leader, as `node` sees it (None if it sees none).
fn leader(node: &Node<'_>) -> Option<String> {
    let out = node.meshctl(&["node", "ls", "--format", "json"]);
    if !out.status.success() {
        return None;
    }
    json(&String::from_utf8_lossy(&out.stdout))
        .as_array()?
        .iter()
        .find(|n| n["manager_status"] == "Leader")
        .and_then(|n| n["hostname"].as_str().map(str::to_owned))
}

fn start_cluster(topo: &Topology) -> (Vec<Node<'_>>, String, String) {
    let mut nodes = Node::for_hosts(topo);
    let mut args = vec!["init".to_owned()];
    args.extend(nodes[0].common_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let (guard, lines) = meshd::start_control(nodes[0].host, &argv);
    nodes[0].meshd = Some(guard);
    let worker = token_from(&lines, "worker");
    let manager = token_from(&lines, "manager");
    let first = nodes[0].api();
    for (i, n) in nodes.iter_mut().enumerate().skip(1) {
        let token = if i < 3 { &manager } else { &worker };
        let mut args = vec!["join".to_owned()];
        args.extend(n.common_args());
        args.extend(["--token".to_owned(), token.clone(), first.clone()]);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (guard, lines) = meshd::start_control(n.host, &argv);
        let role = if i < 3 { "manager" } else { "worker" };
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("joined a swarm as a {role}"))),
            "{lines:?}"
        );
        n.meshd = Some(guard);
    }
    // Every manager is a voter and the leader sees the other two.
    wait_until(
        "3 managers (Leader + 2 Reachable)",
        Duration::from_secs(30),
        || {
            let out = nodes[0].meshctl(&["node", "ls", "--format", "json"]);
            let list = json(&String::from_utf8_lossy(&out.stdout));
            let statuses: Vec<&str> = list
                .as_array()?
                .iter()
                .filter_map(|n| n["manager_status"].as_str())
                .collect();
            (list.as_array()?.len() == 5
                && statuses.iter().filter(|s| **s == "Leader").count() == 1
                && statuses.iter().filter(|s| **s == "Reachable").count() == 2)
                .then_some(())
        },
    );
    (nodes, worker, manager)
}

#[test]
fn managers_survive_leader_kills_restarts_and_a_partition() {
    let Some(_root) =
        require_root("netns::control::managers_survive_leader_kills_restarts_and_a_partition")
    else {
        return;
    };
    let topo = Topology::new(5);
    let (mut nodes, worker_token, _) = start_cluster(&topo);

    // node ls looks like docker's.
    let table = nodes[0].meshctl_ok(&["node", "ls"]);
    let header = table.lines().next().unwrap();
    for col in ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.contains(" * ") && l.contains("host1")),
        "{table}"
    );
    assert_eq!(table.matches("Leader").count(), 1, "{table}");

    // A secret and a name that must never reach the disk in plaintext.
    let canary_secret = "canary-4c1d7e9f2b8a6053";
    nodes[1].meshctl_ok(&[
        "service",
        "create",
        "--name",
        "plaintext-canary",
        // Only its spec matters here (/bin/server does not exist).
        "--replicas",
        "0",
        "--env",
        &format!("DB_PASSWORD={canary_secret}"),
        "-p",
        "8080:80",
        "--",
        "/bin/server",
    ]);

    // Steady streams of writes from WRITERS clients, each through the
    // managers in turn (a killed one too: its refusals are counted).
    let log = Arc::new(Mutex::new(WriteLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let managers: Vec<(&Host, String)> = nodes[..3]
        .iter()
        .map(|n| (n.host, n.dir.path().to_owned()))
        .collect();
    let mut election_ms = Vec::new();
    let mut first_write_ms = Vec::new();
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let log = log.clone();
            let stop = stop.clone();
            let pause = pause.clone();
            let managers = managers.clone();
            s.spawn(move || {
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    if pause.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    let (host, dir) = &managers[i % managers.len()];
                    let name = format!("w{w}-svc-{i}");
                    let out = host
                        .command(meshd::meshctl_bin())
                        .args(["--data-dir", dir, "--timeout", "10"])
                        .args([
                            "service",
                            "create",
                            // The commit, not convergence (which waits for
                            // a dead node to be marked down).
                            "--detach",
                            "--name",
                            &name,
                            "--replicas",
                            "0",
                            "--",
                            "/bin/true",
                        ])
                        .output()
                        .expect("meshctl");
                    log.lock().unwrap().record(
                        name,
                        out.status.success(),
                        &String::from_utf8_lossy(&out.stderr),
                    );
                    i += WRITERS;
                }
            });
        }
        // However the rounds end (a failed assertion too), the writers stop.
        struct StopOnDrop(Arc<AtomicBool>);
        impl Drop for StopOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = StopOnDrop(stop.clone());
        for round in 0..LEADER_KILLS {
            // Writes pause while we check that the cluster is steady, and
            // run again during the kill.
            pause.store(true, Ordering::Relaxed);
            // A steady cluster: every manager names the same leader and
            // has applied the same log.
            let name = wait_until("the managers to agree", Duration::from_secs(15), || {
                let views: BTreeSet<(Option<String>, String)> = nodes[..3]
                    .iter()
                    .map(|n| {
                        let out = n.meshctl(&["info", "--format", "json"]);
                        let applied =
                            json(&String::from_utf8_lossy(&out.stdout))["last_applied"].to_string();
                        (leader(n), applied)
                    })
                    .collect();
                match views.into_iter().collect::<Vec<_>>().as_slice() {
                    [(Some(l), _)] => Some(l.clone()),
                    _ => None,
                }
            });
            pause.store(false, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(300));
            let li = nodes.iter().position(|n| n.host.label() == name).unwrap();
            let before = log.lock().unwrap().acked.len();
            let killed = Instant::now();
            nodes[li].meshd.take().unwrap().kill();
            let new = wait_until("a new leader", Duration::from_secs(10), || {
                nodes[..3]
                    .iter()
                    .filter(|n| n.meshd.is_some())
                    .find_map(leader)
                    .filter(|l| *l != name)
            });
            let ms = killed.elapsed().as_millis();
            election_ms.push(ms);
            // Kill -> the first write acknowledged after it.
            let first = wait_until("a write after the kill", Duration::from_secs(15), || {
                log.lock().unwrap().first_ack_after(killed)
            });
            first_write_ms.push(first.as_millis());
            eprintln!(
                "round {round}: killed leader {name}; {new} leads after {ms} ms, first write \
                 acked after {} ms ({before} writes acked so far)",
                first.as_millis()
            );
            nodes[li].restart();
            // Back to three voters before the next kill.
            wait_until(
                "the restarted manager to be reachable",
                Duration::from_secs(30),
                || {
                    let out = nodes[..3]
                        .iter()
                        .filter(|n| n.host.label() == new)
                        .map(|n| n.meshctl(&["node", "ls", "--format", "json"]))
                        .next()?;
                    let list = json(&String::from_utf8_lossy(&out.stdout));
                    (list
                        .as_array()?
                        .iter()
                        .filter(|n| {
                            n["manager_status"] == "Reachable" || n["manager_status"] == "Leader"
                        })
                        .count()
                        == 3)
                        .then_some(())
                },
            );
        }
        stop.store(true, Ordering::Relaxed);
    });
    let log = log.lock().unwrap().clone();
    let acked: BTreeSet<String> = log.acked.iter().map(|(n, _)| n.clone()).collect();
    assert!(
        acked.len() >= 10,
        "too few writes went through: {}",
        acked.len()
    );
    assert!(
        log.other.is_empty(),
        "writes that failed neither as 'not applied' nor as 'outcome unknown': {:?}",
        &log.other[..log.other.len().min(5)]
    );

    // Every acknowledged write is there, on every manager.
    let present = |n: &Node<'_>| -> BTreeSet<String> {
        let list = json(&n.meshctl_ok(&["service", "ls", "--format", "json"]));
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| s["spec"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for n in &nodes[..3] {
        wait_until(
            "every acked write on every manager",
            Duration::from_secs(10),
            || {
                let have = present(n);
                acked.is_subset(&have).then_some(())
            },
        );
    }
    // Every write reported "not applied" is absent; every "outcome
    // unknown" is resolved by reading.
    let have = present(&nodes[0]);
    let ghosts: Vec<&String> = log
        .not_applied
        .iter()
        .filter(|n| have.contains(*n))
        .collect();
    assert!(
        ghosts.is_empty(),
        "reported not applied, yet applied: {ghosts:?}"
    );
    let unknown_applied = log.unknown.iter().filter(|n| have.contains(*n)).count();
    let stats = |v: &mut Vec<u128>| {
        v.sort_unstable();
        (v[0], v[v.len() / 2], v[v.len() - 1])
    };
    let (emin, emed, emax) = stats(&mut election_ms);
    let (wmin, wmed, wmax) = stats(&mut first_write_ms);
    mesh_tests::figures::figure(&format!(
        "fault: {LEADER_KILLS} leader SIGKILLs under {WRITERS} writers: {} writes acked (0 lost), \
         {} not applied (0 present), {} outcome unknown ({unknown_applied} applied, {} not); \
         kill -> new leader ms min/median/max {emin}/{emed}/{emax}; kill -> first acked write \
         ms {wmin}/{wmed}/{wmax}",
        acked.len(),
        log.not_applied.len(),
        log.unknown.len(),
        log.unknown.len() - unknown_applied,
    ));

    // Nothing in plaintext at rest: secrets nowhere, and the service's
    // name nowhere but in the agent's replica of the data-plane tables
    // (tables.json: names and addresses every node needs for DNS and
    // load balancing, never env or secrets).
    for n in &nodes[..3] {
        for needle in [
            "plaintext-canary",
            canary_secret,
            &worker_token[worker_token.len() - 32..],
        ] {
            let hits: Vec<_> = grep_dir(&n.dir.0, needle.as_bytes())
                .into_iter()
                .filter(|p| !(needle == "plaintext-canary" && p.ends_with("tables.json")))
                .collect();
            assert!(hits.is_empty(), "{needle:?} in plaintext in {hits:?}");
        }
    }

    // Restart every manager from disk: the state is still there.
    for n in nodes[..3].iter_mut() {
        n.meshd.take().unwrap().stop();
    }
    for n in nodes[..3].iter_mut() {
        n.restart();
    }
    let name = wait_until(
        "a leader after a full restart",
        Duration::from_secs(20),
        || nodes[..3].iter().find_map(leader),
    );
    eprintln!("after restarting all managers, {name} leads");
    for n in &nodes[..3] {
        let have = present(n);
        assert!(
            acked.is_subset(&have),
            "lost writes after restart on {}",
            n.host.label()
        );
        assert!(have.contains("plaintext-canary"));
    }

    // A manager cut off from the others refuses writes: "no quorum".
    let cut = wait_until("a follower", Duration::from_secs(10), || {
        let l = nodes[..3].iter().find_map(leader)?;
        nodes[..3].iter().position(|n| n.host.label() != l)
    });
    let port = format!("p{}", nodes[cut].host.index());
    let underlay = topo.underlay().name().to_owned();
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(["-n", &underlay])
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success());
    };
    ip(&["link", "set", &port, "down"]);
    let out = nodes[cut].meshctl(&[
        "service",
        "create",
        "--name",
        "isolated",
        "--replicas",
        "0",
        "--",
        "/bin/true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a cut-off manager accepted a write");
    assert!(err.contains("no quorum"), "{err}");
    eprintln!("cut-off manager says: {}", err.trim());
    // The majority side still takes writes.
    let majority = (0..3).find(|&i| i != cut).unwrap();
    nodes[majority].meshctl_ok(&[
        "service",
        "create",
        "--name",
        "majority",
        "--replicas",
        "0",
        "--",
        "/bin/true",
    ]);
    ip(&["link", "set", &port, "up"]);
    wait_until(
        "the cut-off manager to catch up",
        Duration::from_secs(20),
        || present(&nodes[cut]).contains("majority").then_some(()),
    );
    assert!(!present(&nodes[cut]).contains("isolated"));

    // Workers and strangers are refused.
    let out = nodes[3].meshctl(&["node", "ls"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("worker"), "{err}");
    let ca = nodes[0].dir.0.join("certs/ca.crt");
    let out = nodes[3]
        .host
        .command(meshd::meshctl_bin())
        .args(["--data-dir", "/nonexistent", "--host", &nodes[0].api()])
        .arg("--ca")
        .arg(&ca)
        .args(["node", "ls"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no client certificate"),
        "{err}"
    );
    let stranger = DataDir::new("stranger");
    let bad = format!(
        "{}{}",
        &worker_token[..worker_token.len() - 32],
        "0".repeat(32)
    );
    let out = nodes[4]
        .host
        .command(meshd::meshd_bin())
        .args(["join", "--data-dir", stranger.path(), "--listen-addr"])
        .arg(format!("{}:2378", nodes[4].host.addr()))
        .args(["--token", &bad, &nodes[0].api()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not valid for this cluster"),
        "{err}"
    );
}

/// Leader kills in the fault run, and concurrent writers during them.
const LEADER_KILLS: usize = 20;
const WRITERS: usize = 4;

/// What the writers saw: each write acknowledged (with when), reported
/// not applied, reported with an unknown outcome, or failing otherwise.
#[derive(Default, Clone)]
struct WriteLog {
    acked: Vec<(String, Instant)>,
    not_applied: Vec<String>,
    unknown: Vec<String>,
    other: Vec<String>,
}

impl WriteLog {
    fn record(&mut self, name: String, ok: bool, stderr: &str) {
        if ok {
            self.acked.push((name, Instant::now()));
        } else if stderr.contains("outcome unknown") || stderr.contains("its outcome is unknown") {
            self.unknown.push(name);
        } else if stderr.contains("(not applied") {
            self.not_applied.push(name);
        } else {
            self.other.push(format!("{name}: {}", stderr.trim()));
        }
    }

    fn first_ack_after(&self, t: Instant) -> Option<Duration> {
        self.acked
            .iter()
            .filter(|(_, at)| *at > t)
            .map(|(_, at)| *at - t)
            .min()
    }
}

/// Files under `dir` whose raw bytes contain `needle`.
fn grep_dir(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p);
            }
        }
    }
    hits
}
