//! Raft among managers: election, replication and a leader change; no
//! writes without a quorum; a snapshot for a manager joining after
//! compaction; an autolocked manager waiting for its unlock key.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_managers_elect_replicate_and_survive_a_leader_change() {
    let mut c = Cluster::start("elect", 3, 0).await;
    // Writes through a follower are forwarded to the leader.
    let leader = wait_for("a leader", Duration::from_secs(10), || leader_of(c.node(0))).await;
    let follower = (0..3).find(|&i| c.node(i).ctx.node_id != leader).unwrap();
    let mut api = client(&c.dirs[follower].0, c.api(follower));
    for i in 0..10 {
        create_service(&mut api, &format!("before-{i}")).await;
        // Every manager's read, right after the write, holds it and is not
        // marked stale: a follower reads after the leader's applied index.
        for n in 0..3 {
            let reply = client(&c.dirs[n].0, c.api(n))
                .list_services(Empty {})
                .await
                .unwrap();
            assert_eq!(
                reply.metadata().get(control::api::STALE_HEADER),
                None,
                "manager {n}"
            );
            let have = reply.into_inner().services;
            assert_eq!(
                have.len(),
                i + 1,
                "manager {n} misses an acknowledged write"
            );
        }
    }
    for i in 0..3 {
        wait_for(
            "replication to every manager",
            Duration::from_secs(10),
            || (services(c.node(i)).len() == 10).then_some(()),
        )
        .await;
    }

    // Kill the leader: the others elect a new one and keep every write.
    let li = c.index_of(&leader);
    let started = Instant::now();
    c.nodes[li].take().unwrap().stop().await;
    let survivor = (0..3).find(|&i| i != li).unwrap();
    let new_leader = wait_for("a new leader", Duration::from_secs(10), || {
        leader_of(c.node(survivor)).filter(|l| *l != leader)
    })
    .await;
    eprintln!(
        "new leader {new_leader} elected {} ms after the old one stopped",
        started.elapsed().as_millis()
    );
    let mut api = client(&c.dirs[survivor].0, c.api(survivor));
    for i in 0..10 {
        create_service(&mut api, &format!("after-{i}")).await;
    }
    for i in (0..3).filter(|&i| i != li) {
        wait_for(
            "20 services on the survivors",
            Duration::from_secs(10),
            || (services(c.node(i)).len() == 20).then_some(()),
        )
        .await;
    }

    // The old leader comes back from its data dir and catches up.
    let back = daemon::run(&c.dirs[li].0, daemon::Unlock::Wait)
        .await
        .unwrap();
    c.nodes[li] = Some(back);
    wait_for(
        "the restarted manager to catch up",
        Duration::from_secs(15),
        || (services(c.node(li)).len() == 20).then_some(()),
    )
    .await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lone_manager_refuses_writes_with_no_quorum() {
    let mut c = Cluster::start("quorum", 3, 0).await;
    let leader = wait_for("a leader", Duration::from_secs(10), || leader_of(c.node(0))).await;
    // Stop the two others (whichever they are): what is left has no quorum.
    let keep = c.index_of(&leader);
    for i in (0..3).filter(|&i| i != keep) {
        c.nodes[i].take().unwrap().stop().await;
    }
    // Past the quorum lease, the leader knows: it refuses before it
    // appends, so the write is "not applied" (within the lease it would
    // append, and answer "outcome unknown").
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut api = client(&c.dirs[keep].0, c.api(keep));
    let err = api
        .create_service(proto::ServiceSpec::from(service("lonely")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().starts_with("no quorum"), "{}", err.message());
    assert!(
        err.message().ends_with("(not applied)"),
        "{}",
        err.message()
    );
    assert!(services(c.node(keep)).is_empty());
    // Reads are still answered, marked stale with the reason: this manager
    // can't confirm its state is current.
    let reply = api.list_services(Empty {}).await.unwrap();
    let why = reply
        .metadata()
        .get(control::api::STALE_HEADER)
        .expect("a read without a quorum is marked stale")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        why.contains("can't confirm it still leads") || why.contains("no leader"),
        "{why}"
    );
    c.stop().await;
}

fn purged(d: &Daemon) -> Option<u64> {
    d.ctx
        .manager
        .read()
        .unwrap()
        .as_ref()
        .and_then(|m| m.metrics().purged.map(|l| l.index))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manager_joining_after_compaction_gets_a_snapshot() {
    // Snapshot (and purge the log) every 30 entries: this cluster only
    // (a process-wide setting once reached every test's managers).
    let every30 = ManagerConfig {
        snapshot_every: 30,
        ..ManagerConfig::default()
    };
    let c = Cluster::start_with("snap", 1, 0, &every30).await;
    let mut api = client(&c.dirs[0].0, c.api(0));
    for i in 0..100 {
        create_service(&mut api, &format!("s{i}")).await;
    }
    let cut = wait_for("the log to be compacted", Duration::from_secs(10), || {
        purged(c.node(0))
    })
    .await;
    assert!(cut > 10, "purged up to {cut}");
    // The new manager cannot get the purged entries: it must install the
    // snapshot (over gRPC), then the entries after it.
    let d = TempDir::new("snap-join");
    let at = addresses(9);
    let joined = daemon::join(&d.0, &at, &c.report.manager_token, c.api(0))
        .await
        .unwrap();
    wait_for(
        "the new manager to be a voter",
        Duration::from_secs(30),
        || (voters(c.node(0)) == 2).then_some(()),
    )
    .await;
    wait_for(
        "100 services on the new manager",
        Duration::from_secs(15),
        || (services(&joined).len() == 100).then_some(()),
    )
    .await;
    let snap = joined
        .ctx
        .manager
        .read()
        .unwrap()
        .as_ref()
        .and_then(|m| m.metrics().snapshot.map(|l| l.index));
    assert!(
        snap.is_some_and(|i| i >= cut),
        "installed snapshot {snap:?}, purged {cut}"
    );
    joined.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_autolocked_manager_waits_for_its_unlock_key() {
    let d = TempDir::new("lock");
    let at = addresses(1);
    let (node, report) = daemon::init(
        &d.0,
        &at,
        &InitOptions {
            autolock: true,
            cert_lifetime: pki::DEFAULT_CERT_LIFETIME,
            ..InitOptions::default()
        },
    )
    .await
    .unwrap();
    let key = report
        .unlock_key
        .clone()
        .expect("autolock gives an unlock key");
    let mut api = client(&d.0, &at.api_addr);
    create_service(&mut api, "locked-away").await;
    let shown = api.unlock_key(Empty {}).await.unwrap().into_inner().key;
    assert_eq!(shown, key.to_string());
    node.stop().await;
    assert!(
        !d.0.join("keys/kek").exists(),
        "the KEK must not be on disk"
    );

    // A restart waits on the unlock socket; a wrong key is refused there.
    let dir = d.0.clone();
    let run = tokio::spawn(async move { daemon::run(&dir, daemon::Unlock::Wait).await });
    wait_for("the unlock socket", Duration::from_secs(10), || {
        daemon::unlock_socket(&d.0).exists().then_some(())
    })
    .await;
    // Only its owner reaches it: a 0700 directory around a 0600 socket.
    {
        use std::os::unix::fs::PermissionsExt;
        let sock = daemon::unlock_socket(&d.0);
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(sock.parent().unwrap()), 0o700);
        assert_eq!(mode(&sock), 0o600);
    }
    // A client that connects and says nothing holds up no one.
    let _silent = tokio::net::UnixStream::connect(daemon::unlock_socket(&d.0))
        .await
        .unwrap();
    let wrong = format!("MESHKEY-{}", "ab".repeat(32));
    let err = tokio::time::timeout(Duration::from_secs(5), daemon::send_unlock(&d.0, &wrong))
        .await
        .expect("served beside a silent client")
        .unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
    assert!(!run.is_finished());
    daemon::send_unlock(&d.0, &key.to_string()).await.unwrap();
    let node = run.await.unwrap().unwrap();
    wait_for("the state after unlocking", Duration::from_secs(10), || {
        services(&node)
            .contains(&"locked-away".to_owned())
            .then_some(())
    })
    .await;
    node.stop().await;
}
