//! Services: VIPs and published ports, conflicts that leave no trace, and
//! updates that need the current version.

use super::*;

#[test]
fn services_get_vips_and_ports_and_conflicts_leave_no_trace() {
    let mut s = init();
    network(&mut s, "n1", "front").unwrap();
    let web = create(
        &mut s,
        "s1",
        spec("web", &["front"], &[(80, Some(8080)), (443, None)]),
    )
    .unwrap();
    let published: Vec<_> = web.ports.iter().map(|p| p.published.unwrap()).collect();
    assert_eq!(published, vec![8080, 30000]);
    assert_eq!(
        web.vips,
        vec![
            Vip {
                network: "n1".into(),
                addr: Ipv4Addr::new(10, 0, 1, 2)
            },
            Vip {
                network: "ing".into(),
                addr: Ipv4Addr::new(10, 0, 0, 2)
            },
        ]
    );
    // 9090 is free, 8080 is not: refused, and 9090 is not kept.
    let err = create(
        &mut s,
        "s2",
        spec("api", &["front"], &[(1, Some(9090)), (2, Some(8080))]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "published port 8080/tcp is already used by service web"
    );
    assert!(s.service_by_ref("api").is_none());
    let api = create(&mut s, "s3", spec("api", &["front"], &[(1, Some(9090))])).unwrap();
    assert_eq!(
        api.vips[0].addr,
        Ipv4Addr::new(10, 0, 1, 3),
        "the refused service's VIP was given back"
    );
    // Other refusals, each with the reason.
    let cases: Vec<(ServiceSpec, &str)> = vec![
        (spec("web", &[], &[]), "service name web is already in use"),
        (spec("x", &["nope"], &[]), "network nope not found"),
        (spec("x", &["ingress"], &[]), "joined by publishing a port"),
        (spec("x", &["front", "n1"], &[]), "attached twice"),
        (
            spec("x", &[], &[(80, Some(7000)), (81, Some(7000))]),
            "port 7000/tcp is published twice",
        ),
        (spec("x", &[], &[(0, None)]), "target port must be 1-65535"),
        (
            spec("x", &[], &[(80, Some(0))]),
            "published port must be 1-65535",
        ),
        (
            ServiceSpec {
                endpoint: EndpointSpec {
                    mode: EndpointMode::Dnsrr,
                    ..spec("x", &[], &[(80, None)]).endpoint
                },
                ..spec("x", &[], &[])
            },
            "needs endpoint mode vip",
        ),
        (
            ServiceSpec {
                task: TaskTemplate {
                    env: vec!["NOEQUALS".into()],
                    ..spec("x", &[], &[]).task
                },
                ..spec("x", &[], &[])
            },
            "must look like KEY=VALUE",
        ),
        (
            ServiceSpec {
                task: TaskTemplate {
                    command: vec![],
                    ..spec("x", &[], &[]).task
                },
                ..spec("x", &[], &[])
            },
            "a command is required",
        ),
    ];
    let before = s.clone();
    for (spec, want) in cases {
        let err = create(&mut s, "sx", spec).unwrap_err().to_string();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
    }
    assert_eq!(s, before, "a refused create changed the state");
}

#[test]
fn updates_need_the_current_version_and_keep_what_still_applies() {
    let mut s = init();
    network(&mut s, "n1", "front").unwrap();
    network(&mut s, "n2", "back").unwrap();
    let web = create(
        &mut s,
        "s1",
        spec("web", &["front"], &[(80, Some(8080)), (443, None)]),
    )
    .unwrap();
    create(&mut s, "s2", spec("db", &["back"], &[(5432, Some(5432))])).unwrap();
    let update = |s: &mut State, version, spec| {
        s.apply(&Command::UpdateService {
            target: "web".into(),
            version,
            spec,
        })
    };
    // A stale version is refused with both numbers.
    let err = update(&mut s, 0, spec("web", &["front"], &[])).unwrap_err();
    assert!(err.to_string().contains("(version 1, you sent 0)"), "{err}");
    // Moving 8080 to 8081, adding a network: the auto port and the front VIP stay.
    let Outcome::Service(v2) = update(
        &mut s,
        1,
        spec("web", &["front", "back"], &[(80, Some(8081)), (443, None)]),
    )
    .unwrap() else {
        panic!()
    };
    assert_eq!(v2.version, 2);
    assert_eq!(
        v2.ports
            .iter()
            .map(|p| p.published.unwrap())
            .collect::<Vec<_>>(),
        vec![8081, 30000]
    );
    assert_eq!(v2.vips[0], web.vips[0]);
    assert_eq!(v2.previous.as_ref().unwrap(), &web.spec);
    // 8080 is free again; a clash with db's port is refused and changes nothing.
    create(&mut s, "s3", spec("other", &[], &[(1, Some(8080))])).unwrap();
    let before = s.clone();
    let err = update(&mut s, 2, spec("web", &["front"], &[(80, Some(5432))])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "published port 5432/tcp is already used by service db"
    );
    assert_eq!(s, before);
}
