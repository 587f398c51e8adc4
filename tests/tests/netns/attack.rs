//! Attacks on a manager from a host of the underlay: a flood of
//! unauthenticated 60 MiB bodies, and a join that tries to shadow another
//! node's identity. Each asserts on what the manager did: its memory, its
//! answers, its node table.

use std::{path::Path, time::Instant};

use mesh_tests::{Topology, meshd, require_root};
use proto::{JoinRequest, ServiceSpec, cluster_client::ClusterClient, join_client::JoinClient};

use crate::cluster::{DataDir, Node, json, token_from};

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

const FLOOD_CALLS: usize = 16;
const FLOOD_BODY: usize = 60 << 20;

/// Sends FLOOD_CALLS unauthenticated calls with FLOOD_BODY-byte bodies at
/// once, each on its own connection: half to a cluster API, half to Join.
/// Returns how many were refused (all should be).
async fn flood(api: &str, ca_pem: String) -> usize {
    let mut calls = Vec::new();
    for i in 0..FLOOD_CALLS {
        let channel = control::ca::tls::channel(
            api,
            control::ca::tls::Trust::Anonymous(ca_pem.clone()),
            std::time::Duration::from_secs(30),
        )
        .expect("channel");
        calls.push(tokio::spawn(async move {
            let body = "x".repeat(FLOOD_BODY);
            if i % 2 == 0 {
                ClusterClient::new(channel)
                    .max_encoding_message_size(usize::MAX)
                    .create_service(ServiceSpec {
                        name: body,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
            } else {
                JoinClient::new(channel)
                    .max_encoding_message_size(usize::MAX)
                    .join(JoinRequest {
                        token: "x".into(),
                        hostname: "h".into(),
                        addr: "198.18.0.99".into(),
                        api_addr: "198.18.0.99:2377".into(),
                        csr: body,
                        underlay: Vec::new(),
                    })
                    .await
                    .map(|_| ())
            }
        }));
    }
    let mut refused = 0;
    for c in calls {
        match c.await.expect("flood task") {
            Ok(()) => {}
            Err(s) => {
                eprintln!("flood call refused: {:?}: {}", s.code(), s.message());
                refused += 1;
            }
        }
    }
    refused
}

/// Identity and pre-authentication attacks on one manager: the flood
/// leaves its memory bounded (it once grew by ~1 GiB) and an authenticated
/// `node ls` still answers; a join named after another node's id is
/// refused, and the victim stays addressable by its id.
#[test]
fn a_manager_withstands_a_preauth_flood_and_a_shadowing_join() {
    let Some(_root) =
        require_root("netns::attack::a_manager_withstands_a_preauth_flood_and_a_shadowing_join")
    else {
        return;
    };
    let mut topo = Topology::new(1);
    topo.add_host("rogue");
    let mut nodes = Node::for_hosts(&topo);
    let mut init = vec!["init".to_owned()];
    init.extend(nodes[0].common_args());
    let lines = nodes[0].start(init);
    let worker_token = token_from(&lines, "worker");
    let manager = &nodes[0];
    let pid = manager.meshd.as_ref().expect("running").pid();
    let list = json(&manager.meshctl_ok(&["node", "ls", "--format", "json"]));
    let victim_id = list[0]["id"].as_str().expect("id").to_owned();

    // The flood, from the rogue host, while the manager's RSS is sampled.
    let ca_pem = std::fs::read_to_string(
        control::daemon::certs_dir(Path::new(manager.dir.path())).join("ca.crt"),
    )
    .expect("ca.crt");
    let before = rss_kib(pid);
    let api = manager.api();
    let rogue = &nodes[1];
    let done = std::sync::atomic::AtomicBool::new(false);
    let (refused, peak) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = before;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            peak
        });
        let refused = rogue.host.run(|| flood(&api, ca_pem));
        // An authenticated call right after the flood is answered.
        let started = Instant::now();
        let out = manager.meshctl(&["node", "ls"]);
        mesh_tests::figures::figure(&format!(
            "attack: authenticated node ls after the flood answered in {} ms",
            started.elapsed().as_millis()
        ));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (refused, sampler.join().expect("sampler"))
    });
    let growth_mib = peak.saturating_sub(before) / 1024;
    mesh_tests::figures::figure(&format!(
        "attack: {FLOOD_CALLS} unauthenticated {} MiB bodies: manager RSS {} MiB -> peak {} MiB \
         (+{growth_mib} MiB), {refused} refused",
        FLOOD_BODY >> 20,
        before / 1024,
        peak / 1024
    ));
    assert_eq!(
        refused, FLOOD_CALLS,
        "every unauthenticated call is refused"
    );
    assert!(
        growth_mib < 64,
        "the manager's RSS grew by {growth_mib} MiB under the flood"
    );

    // A worker join named after the manager's id is refused; nothing is added.
    let dir = DataDir::new("rogue");
    let out = rogue
        .host
        .command(meshd::meshd_bin())
        .args([
            "join",
            "--data-dir",
            dir.path(),
            "--listen-addr",
            &rogue.api(),
            "--hostname",
            &victim_id,
            "--task-scope",
            &dir.task_scope(),
            "--token",
            &worker_token,
            &api,
        ])
        .output()
        .expect("run meshd join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the shadowing join was accepted");
    assert!(stderr.contains("looks like a node id"), "{stderr}");
    let list = json(&manager.meshctl_ok(&["node", "ls", "--format", "json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    manager.meshctl_ok(&["node", "inspect", &victim_id]);

    // A network on the underlay is refused, naming the node (it once gave a
    // node's bridge another node's address); the rest of the pool is used.
    let (net, len) = mesh_tests::netns::underlay_prefix();
    let out = manager.meshctl(&[
        "network",
        "create",
        "--subnet",
        &format!("{net}/{len}"),
        "n4b",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a network on the underlay was accepted"
    );
    assert!(err.contains("overlaps the underlay of node host1"), "{err}");
    manager.meshctl_ok(&["network", "create", "n4c"]);
    drop(nodes.pop());
}
