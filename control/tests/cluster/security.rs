//! Who may join and call, with which certificate: every refusal without the
//! right credentials, promotion and demotion, certificates renewed before
//! they expire.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joining_and_calling_are_refused_without_the_right_credentials() {
    let mut c = Cluster::start("sec", 1, 1).await;
    let mgr = c.api(0).to_owned();

    // A client without a certificate.
    let ca = Credentials::load(&daemon::certs_dir(&c.dirs[0].0))
        .unwrap()
        .ca;
    let anon = tls::channel(&mgr, Trust::Anonymous(ca), Duration::from_secs(5)).unwrap();
    let err = ClusterClient::new(anon)
        .list_nodes(Empty {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(
        err.message().contains("no client certificate"),
        "{}",
        err.message()
    );

    // A worker's certificate on a manager API.
    let err = client(&c.dirs[1].0, &mgr)
        .list_nodes(Empty {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("worker certificate"),
        "{}",
        err.message()
    );

    // A wrong token (right CA, made-up secret).
    let digest = pki::ca_digest(
        &Credentials::load(&daemon::certs_dir(&c.dirs[0].0))
            .unwrap()
            .ca,
    )
    .unwrap();
    let wrong = format!("MESH-1-{digest}-{}", "0".repeat(32));
    let d = TempDir::new("wrong");
    let err = daemon::join(&d.0, &addresses(50), &wrong, &mgr)
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("not valid for this cluster"),
        "{err}"
    );
    assert!(!d.0.join("node.json").exists());

    // A token whose CA digest is not this cluster's.
    let other = format!("MESH-1-{}-{}", "ab".repeat(32), "1".repeat(32));
    let d = TempDir::new("digest");
    let err = daemon::join(&d.0, &addresses(51), &other, &mgr)
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("is not the one in the token"),
        "{err}"
    );

    // A rotated token: the old one is refused, the new one works.
    let mut admin = client(&c.dirs[0].0, &mgr);
    let old = c.report.worker_token.clone();
    // Shown again: derived from the CA key, not read back from the state.
    let shown = admin
        .join_token(JoinTokenRequest {
            role: proto::Role::Worker.into(),
            rotate: false,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(shown, old, "join-token shows the token init gave");
    let new = admin
        .join_token(JoinTokenRequest {
            role: proto::Role::Worker.into(),
            rotate: true,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_ne!(old, new);
    let d = TempDir::new("rotated");
    let err = daemon::join(&d.0, &addresses(52), &old, &mgr)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("rotated"), "{err}");
    let d2 = TempDir::new("fresh");
    let joined = daemon::join(&d2.0, &addresses(53), &new, &mgr)
        .await
        .unwrap();
    joined.stop().await;

    // A worker's certificate on every manager-only API: refused from the
    // headers, whatever the call.
    let mut w = client(&c.dirs[1].0, &mgr);
    let calls: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "join-token",
            w.join_token(JoinTokenRequest {
                role: proto::Role::Manager.into(),
                rotate: true,
            })
            .await
            .map(|_| ()),
        ),
        ("unlock-key", w.unlock_key(Empty {}).await.map(|_| ())),
        (
            "rotate-network-key",
            w.rotate_network_key(Empty {}).await.map(|_| ()),
        ),
        (
            "node rm",
            w.remove_node(Remove {
                target: c.node(0).ctx.node_id.clone(),
                force: true,
            })
            .await
            .map(|_| ()),
        ),
        ("service ls", w.list_services(Empty {}).await.map(|_| ())),
    ];
    for (what, r) in calls {
        let err = r.expect_err(what);
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{what}: {err:?}");
    }
    assert_eq!(
        c.node(0)
            .ctx
            .manager()
            .unwrap()
            .with_state(|s| s.nodes.len()),
        3
    );

    // A certificate from another cluster's CA, and an expired one from
    // this CA: each refused in the handshake, and said so.
    let ca_cert = Credentials::load(&daemon::certs_dir(&c.dirs[0].0))
        .unwrap()
        .ca;
    let forged = |ca: &pki::Ca, lifetime| {
        let (key, csr) = pki::node_key_and_csr().unwrap();
        let cert = ca
            .issue(&csr, "sec", "ffffffffffffffff", Role::Manager, lifetime)
            .unwrap();
        Credentials {
            ca: ca_cert.clone(),
            cert,
            key,
        }
    };
    let call = |creds: Credentials| {
        let mgr = mgr.clone();
        async move {
            let ch = tls::channel(
                &mgr,
                Trust::Node(Arc::new(RwLock::new(creds))),
                Duration::from_secs(5),
            )
            .unwrap();
            ClusterClient::new(ch)
                .list_nodes(Empty {})
                .await
                .unwrap_err()
        }
    };
    let foreign = pki::Ca::create("other").unwrap();
    let err = call(forged(&foreign, Duration::from_secs(3600))).await;
    let text = daemon::status_text(&err);
    assert!(
        text.contains("not signed by this cluster's CA") && text.contains("another cluster"),
        "foreign certificate: {text}"
    );
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let secrets = c
        .node(0)
        .ctx
        .manager()
        .unwrap()
        .with_state(|s| s.secrets.clone())
        .unwrap();
    let ours = pki::Ca::from_pem(&secrets.ca_cert, &secrets.ca_key);
    let short = forged(&ours, Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = call(short).await;
    let text = daemon::status_text(&err);
    assert!(
        text.contains("certificate expired at") && text.contains("Join the node again"),
        "expired certificate: {text}"
    );
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // A removed node reconnecting with its old certificate.
    let worker_id = c.node(1).ctx.node_id.clone();
    c.nodes[1].take().unwrap().stop().await;
    admin
        .remove_node(Remove {
            target: worker_id.clone(),
            force: true,
        })
        .await
        .unwrap();
    let err = NodeClientExt::whoami(&c.dirs[1].0, &mgr).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("has been removed"),
        "{}",
        err.message()
    );
    c.stop().await;
}

struct NodeClientExt;

impl NodeClientExt {
    async fn whoami(dir: &Path, addr: &str) -> Result<(), tonic::Status> {
        let creds = Credentials::load(&daemon::certs_dir(dir)).unwrap();
        let ch = tls::channel(
            addr,
            Trust::Node(Arc::new(RwLock::new(creds))),
            Duration::from_secs(10),
        )
        .unwrap();
        proto::member_client::MemberClient::new(ch)
            .whoami(Empty {})
            .await
            .map(|_| ())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promote_demote_and_renewal() {
    let c = Cluster::start("roles", 1, 1).await;
    let mut admin = client(&c.dirs[0].0, c.api(0));
    let worker = c.node(1).ctx.node_id.clone();
    admin
        .set_role(SetRoleRequest {
            target: worker.clone(),
            role: proto::Role::Manager.into(),
        })
        .await
        .unwrap();
    // The node notices, renews its certificate as a manager, starts Raft
    // and joins the voters.
    wait_for(
        "the promoted node to be a voter",
        Duration::from_secs(30),
        || (voters(c.node(0)) == 2).then_some(()),
    )
    .await;
    wait_for("a manager certificate", Duration::from_secs(10), || {
        let creds = Credentials::load(&daemon::certs_dir(&c.dirs[1].0)).ok()?;
        let id = pki::identity(&creds.cert, &creds.ca, now()).ok()?;
        (id.role == Role::Manager).then_some(())
    })
    .await;
    // Its certificate now reaches the manager API.
    client(&c.dirs[1].0, c.api(0))
        .list_nodes(Empty {})
        .await
        .unwrap();
    let view = admin
        .inspect_node(Ref {
            target: worker.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let view = control::api::NodeView::try_from(view).unwrap();
    assert_eq!(
        view.manager_status,
        Some(model::api::ManagerStatus::Reachable)
    );

    // A demotion whose role change committed but whose voter removal
    // never ran (the leader died between the two steps): the state alone
    // says worker, and the leader's reconciler removes the voter.
    let node = c
        .node(0)
        .ctx
        .manager()
        .unwrap()
        .with_state(|s| s.nodes[&worker].clone());
    propose(
        c.node(0),
        control::state::Command::UpdateNode {
            id: worker.clone(),
            version: node.version,
            spec: control::state::NodeSpec {
                role: Role::Worker,
                ..node.spec
            },
        },
    )
    .await;
    wait_for(
        "the demoted node to leave the voters",
        Duration::from_secs(20),
        || (voters(c.node(0)) == 1).then_some(()),
    )
    .await;
    wait_for(
        "Raft to stop on the demoted node",
        Duration::from_secs(20),
        || {
            c.node(1)
                .ctx
                .manager
                .read()
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    let err = client(&c.dirs[1].0, c.api(0))
        .list_nodes(Empty {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_lived_certificates_renew_before_expiry() {
    let d = TempDir::new("renew");
    let at = addresses(1);
    let node = daemon::init(
        &d.0,
        &at,
        &InitOptions {
            autolock: false,
            cert_lifetime: Duration::from_secs(9),
            ..InitOptions::default()
        },
    )
    .await
    .unwrap();
    let (node, report) = node;
    // A worker renews too (it learns the lifetime from the managers).
    let w = TempDir::new("renew-worker");
    let worker = daemon::join(&w.0, &addresses(2), &report.worker_token, &at.api_addr)
        .await
        .unwrap();
    let first = Credentials::load(&daemon::certs_dir(&d.0)).unwrap().cert;
    let first_worker = Credentials::load(&daemon::certs_dir(&w.0)).unwrap().cert;
    // Renewal starts in the last third (3 s before expiry); the upkeep
    // loop looks every 2 s.
    for (dir, was) in [(&d.0, &first), (&w.0, &first_worker)] {
        wait_for("a renewed certificate", Duration::from_secs(15), || {
            let now_cert = Credentials::load(&daemon::certs_dir(dir)).ok()?.cert;
            (now_cert != *was).then_some(())
        })
        .await;
    }
    // 12 s after init the first certificate has expired; the API still
    // answers with the renewed one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    client(&d.0, &at.api_addr)
        .list_nodes(Empty {})
        .await
        .unwrap();
    NodeClientExt::whoami(&w.0, &at.api_addr).await.unwrap();
    worker.stop().await;
    node.stop().await;
}
