//! Agents: they follow the tables the managers publish, a silent node's
//! endpoints are withdrawn, and a node whose data plane applies slowly is
//! not taken for dead.

use super::*;

/// The agent's data plane, as a test sees it: the tables it was handed.
#[derive(Clone, Default)]
struct Recorder(Arc<std::sync::Mutex<control::tables::Tables>>);

impl control::agent::Sink for Recorder {
    type Error = std::convert::Infallible;
    async fn apply(
        &mut self,
        tables: &control::tables::Tables,
        _: control::agent::Update<'_>,
    ) -> Result<(), Self::Error> {
        *self.0.lock().unwrap() = tables.clone();
        Ok(())
    }
}

fn endpoints_on(t: &control::tables::Tables, node: &str) -> usize {
    t.endpoints().filter(|(_, _, e)| e.node == node).count()
}

fn book_of(d: &Daemon) -> control::tables::Tables {
    let m = d.ctx.manager().unwrap();
    m.sm.with_book(|s, b| b.tables(s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_follow_the_tables_and_a_silent_node_is_withdrawn() {
    use control::state::{Command, NodeStatus};
    let dirs: Vec<TempDir> = (0..3)
        .map(|i| TempDir::new(&format!("agents{i}")))
        .collect();
    let addrs: Vec<Addresses> = (0..3).map(|i| addresses(i as u8 + 1)).collect();
    let heartbeat = Duration::from_millis(200);
    let (mut manager, report) = daemon::init(
        &dirs[0].0,
        &addrs[0],
        &InitOptions {
            heartbeat,
            heartbeat_misses: 3,
            ..opts()
        },
    )
    .await
    .unwrap();
    let mut workers = Vec::new();
    for i in 1..3 {
        workers.push(
            daemon::join(
                &dirs[i].0,
                &addrs[i],
                &report.worker_token,
                &addrs[0].api_addr,
            )
            .await
            .unwrap(),
        );
    }
    let rec: Vec<Recorder> = (0..3).map(|_| Recorder::default()).collect();
    manager.start_agent(rec[0].clone(), None);
    // Worker 1 follows its underlay interface (meshd polls netlink).
    let (underlay_tx, underlay_rx) = tokio::sync::watch::channel(Vec::new());
    let mut follow = Some(underlay_rx);
    for (w, r) in workers.iter_mut().zip(&rec[1..]) {
        w.start_agent(r.clone(), follow.take());
    }
    let ids: Vec<String> = std::iter::once(&manager)
        .chain(&workers)
        .map(|d| d.ctx.node_id.clone())
        .collect();

    // A network, a service on it publishing a port, a task on each worker.
    propose(
        &manager,
        Command::CreateNetwork {
            id: "net-red".into(),
            spec: NetworkSpec {
                name: "red".into(),
                // Encrypted: the tables carry a key ring, which agents
                // hold in memory only.
                encrypted: true,
                ..NetworkSpec::default()
            },
        },
    )
    .await;
    wait_for(
        "the leader to fill the key ring",
        Duration::from_secs(5),
        || {
            book_of(&manager)
                .network_keys()
                .is_some_and(|k| k.keys.len() == control::keys::RING)
                .then_some(())
        },
    )
    .await;
    let mut web = service("web");
    web.task.networks = vec![control::state::NetworkAttachment {
        target: "red".into(),
        aliases: vec![],
    }];
    propose(
        &manager,
        Command::CreateService {
            id: "svc-web".into(),
            spec: web,
        },
    )
    .await;
    for (slot, node) in ids[1..].iter().enumerate() {
        propose(
            &manager,
            Command::CreateTask {
                id: format!("task-{slot}"),
                service: "web".into(),
                slot: slot as u32 + 1,
                node: node.clone(),
                netns: Some(format!("/run/netns/attached-{slot}")),
            },
        )
        .await;
    }
    let want = book_of(&manager);
    assert_eq!(endpoints_on(&want, &ids[2]), 1);
    for (i, r) in rec.iter().enumerate() {
        wait_for(
            "every agent to apply the tables",
            Duration::from_secs(10),
            || (*r.0.lock().unwrap() == want).then_some(()),
        )
        .await;
        eprintln!("agent {i} at revision {}", want.revision);
    }

    // Worker 1's underlay gains a prefix after it joined: the cluster
    // learns it, and keeps networks off it from then on.
    let grown: Vec<control::allocator::Subnet> = vec!["10.77.0.0/16".parse().unwrap()];
    underlay_tx.send_replace(grown.clone());
    wait_for(
        "the new underlay prefix to reach the state",
        Duration::from_secs(5),
        || {
            (manager
                .ctx
                .manager()
                .unwrap()
                .with_state(|s| s.nodes[&ids[1]].underlay.clone())
                == grown)
                .then_some(())
        },
    )
    .await;
    let refused = manager
        .ctx
        .manager()
        .unwrap()
        .propose(Command::CreateNetwork {
            id: "net-clash".into(),
            spec: NetworkSpec {
                name: "clash".into(),
                subnet: Some("10.77.3.0/24".parse().unwrap()),
                ..NetworkSpec::default()
            },
        })
        .await
        .expect_err("a subnet on a node's new underlay prefix is refused");
    assert!(
        refused
            .to_string()
            .contains("overlaps the underlay of node"),
        "{refused}"
    );
    // Each agent saves its replica (at most once a second), without the
    // key ring: no secret of it is on disk.
    let mut at_rest = want.clone();
    at_rest.entries.remove(&control::tables::Key::NetworkKeys);
    let secrets: Vec<String> = want
        .network_keys()
        .expect("a key ring")
        .keys
        .iter()
        .map(|k| k.secret.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    for d in std::iter::once(&manager).chain(&workers) {
        wait_for(
            "the saved replica to catch up",
            Duration::from_secs(5),
            || (control::agent::load_replica(&d.dir) == at_rest).then_some(()),
        )
        .await;
        let file = std::fs::read_to_string(d.dir.join("tables.json")).unwrap();
        for secret in &secrets {
            assert!(
                !file.contains(secret.as_str()),
                "a network key in tables.json"
            );
        }
    }
    // The leader saw every ack.
    let m = manager.ctx.manager().unwrap();
    let progress =
        m.sm.with_book(|state, book| m.dispatcher.progress(state, book.revision()));
    assert!(progress.pending(want.revision).is_empty(), "{progress:?}");

    // Worker 2 goes silent: the leader commits it down, and its endpoint
    // leaves the others' tables in that same revision.
    let stopped_at = Instant::now();
    let w2 = workers.pop().unwrap();
    let w2_dir = w2.dir.clone();
    w2.stop().await;
    let withdrawn = wait_for(
        "worker 2's endpoint to be withdrawn",
        Duration::from_secs(5),
        || {
            let t = rec[1].0.lock().unwrap().clone();
            (endpoints_on(&t, &ids[2]) == 0).then_some(t)
        },
    )
    .await;
    eprintln!(
        "silent node withdrawn from another node's tables {} ms after it stopped (heartbeat 200 ms x 3)",
        stopped_at.elapsed().as_millis()
    );
    assert_eq!(
        endpoints_on(&withdrawn, &ids[1]),
        1,
        "the live worker's endpoint stays"
    );
    let status = m.with_state(|s| s.nodes[&ids[2]].status);
    assert_eq!(status, NodeStatus::Down);
    // A change while it is away.
    propose(
        &manager,
        Command::RemoveTask {
            id: "task-0".into(),
        },
    )
    .await;

    // It restarts from its saved revision, catches up, and is ready again.
    let saved = control::agent::load_replica(&w2_dir);
    assert!(saved.revision > 0, "the agent saved its tables");
    assert!(saved.network_keys().is_none(), "no key ring at rest");
    // As an older meshd left it: the key ring on disk. The agent rewrites
    // the file without it as it starts, not at its next change.
    let mut old = saved.clone();
    old.entries.insert(
        control::tables::Key::NetworkKeys,
        want.entries[&control::tables::Key::NetworkKeys].clone(),
    );
    std::fs::write(
        w2_dir.join("tables.json"),
        serde_json::to_vec(&old).unwrap(),
    )
    .unwrap();
    let mut w2 = daemon::run(&w2_dir, daemon::Unlock::Wait).await.unwrap();
    let r2 = Recorder::default();
    let w2_reports = w2.start_agent(r2.clone(), None).reports;
    let file = std::fs::read_to_string(w2_dir.join("tables.json")).unwrap();
    for s in &secrets {
        assert!(
            !file.contains(s.as_str()),
            "a key of the ring is still on disk"
        );
    }
    wait_for(
        "worker 2 to be ready again",
        Duration::from_secs(10),
        || (m.with_state(|s| s.nodes[&ids[2]].status) == NodeStatus::Ready).then_some(()),
    )
    .await;
    let want = book_of(&manager);
    assert_eq!(endpoints_on(&want, &ids[2]), 1, "back in the tables");
    assert_eq!(endpoints_on(&want, &ids[1]), 0, "task-0 was removed");
    for r in [&rec[0], &rec[1], &r2] {
        wait_for(
            "every agent, the restarted one too, to match (its key ring fetched)",
            Duration::from_secs(10),
            || (*r.0.lock().unwrap() == want).then_some(()),
        )
        .await;
    }

    // Worker 2 reports on its task through its session: running in a
    // namespace, then dead. A report on another node's task is dropped.
    use control::{dispatcher::TaskReport, state::TaskState};
    propose(
        &manager,
        Command::CreateTask {
            id: "task-other".into(),
            service: "web".into(),
            slot: 3,
            node: ids[1].clone(),
            netns: Some("/run/netns/attached-other".into()),
        },
    )
    .await;
    let report = |id: &str, observed, exit_code| TaskReport {
        id: id.into(),
        observed,
        netns: Some(format!("/run/netns/{id}")),
        exit_code,
        error: None,
    };
    for r in [
        report("task-other", TaskState::Failed, Some(1)),
        report("task-1", TaskState::Running, None),
    ] {
        w2_reports.send(r).unwrap();
    }
    let task = |id: &str| m.with_state(|s| s.tasks[id].clone());
    wait_for(
        "the running report to commit",
        Duration::from_secs(5),
        || (task("task-1").observed == TaskState::Running).then_some(()),
    )
    .await;
    assert_eq!(task("task-1").netns.as_deref(), Some("/run/netns/task-1"));
    let other = task("task-other");
    assert_eq!(
        (other.observed, other.netns.as_deref()),
        (TaskState::New, Some("/run/netns/attached-other")),
        "a node changed another node's task"
    );
    w2_reports
        .send(report("task-1", TaskState::Failed, Some(137)))
        .unwrap();
    wait_for(
        "the dead task's endpoint to leave every replica",
        Duration::from_secs(5),
        || {
            [&rec[0], &rec[1], &r2]
                .iter()
                .all(|r| endpoints_on(&r.0.lock().unwrap(), &ids[2]) == 0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(task("task-1").exit_code, Some(137));
    for d in [w2, workers.pop().unwrap(), manager] {
        d.stop().await;
    }
}

/// A data plane that takes `delay` over every apply (a whole table on a
/// slow kernel, an emulated VM), recording the tables it was handed.
#[derive(Clone)]
struct SlowSink {
    delay: Duration,
    applied: Recorder,
}

impl control::agent::Sink for SlowSink {
    type Error = std::convert::Infallible;
    async fn apply(
        &mut self,
        tables: &control::tables::Tables,
        update: control::agent::Update<'_>,
    ) -> Result<(), Self::Error> {
        tokio::time::sleep(self.delay).await;
        self.applied.apply(tables, update).await
    }
}

/// The VM tier lost pings on an encrypted network: under emulation a
/// restarted node's whole apply outlasted 3 heartbeat periods, the agent
/// sent no heartbeat while applying, and the leader withdrew the node's
/// endpoints just after the node had repaired them. Heartbeats are the
/// agent's liveness, not the speed of its data plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_data_plane_applies_slowly_is_not_taken_for_dead() {
    use control::state::{Command, NodeStatus};
    let dirs: Vec<TempDir> = (0..2).map(|i| TempDir::new(&format!("slow{i}"))).collect();
    let addrs: Vec<Addresses> = (0..2).map(|i| addresses(i as u8 + 1)).collect();
    let heartbeat = Duration::from_millis(200);
    let (mut manager, report) = daemon::init(
        &dirs[0].0,
        &addrs[0],
        &InitOptions {
            heartbeat,
            heartbeat_misses: 3,
            ..opts()
        },
    )
    .await
    .unwrap();
    let mut worker = daemon::join(
        &dirs[1].0,
        &addrs[1],
        &report.worker_token,
        &addrs[0].api_addr,
    )
    .await
    .unwrap();
    manager.start_agent(Recorder::default(), None);
    let slow = SlowSink {
        // 2.5 times the 600 ms after which a silent node is down.
        delay: Duration::from_millis(1500),
        applied: Recorder::default(),
    };
    worker.start_agent(slow.clone(), None);
    let id = worker.ctx.node_id.clone();
    let m = manager.ctx.manager().unwrap();
    let status = || m.with_state(|s| s.nodes[&id].status);
    wait_for("the worker's first apply", Duration::from_secs(10), || {
        (slow.applied.0.lock().unwrap().revision > 0).then_some(())
    })
    .await;
    // Three changes: three slow applies in a row, 4.5 s of them.
    for i in 0..3 {
        propose(
            &manager,
            Command::CreateNetwork {
                id: format!("net-slow{i}"),
                spec: NetworkSpec {
                    name: format!("slow{i}"),
                    ..NetworkSpec::default()
                },
            },
        )
        .await;
    }
    let want = book_of(&manager).revision;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while slow.applied.0.lock().unwrap().revision < want {
        assert_eq!(
            status(),
            NodeStatus::Ready,
            "the worker was marked down while applying"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never applied revision {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status(), NodeStatus::Ready);
    worker.stop().await;
    manager.stop().await;
}
