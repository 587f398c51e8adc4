//! What a client sees of a refused request: the validation error verbatim.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn validation_errors_reach_the_client_verbatim() {
    let c = Cluster::start("valid", 1, 0).await;
    let mut api = client(&c.dirs[0].0, c.api(0));
    let err = api
        .create_network(proto::NetworkSpec::from(NetworkSpec {
            name: "Bad_Name".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("not DNS-safe"), "{}", err.message());
    create_service(&mut api, "web").await;
    // The same create again: named as such, not as a conflict.
    let err = api
        .create_service(proto::ServiceSpec::from(service("web")))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("already exists, with the same spec"),
        "{}",
        err.message()
    );
    // Another spec under the name: a conflict.
    let mut other = service("web");
    other.task.command = vec!["/bin/other".into()];
    let err = api
        .create_service(proto::ServiceSpec::from(other))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("already in use"),
        "{}",
        err.message()
    );
    // What protobuf cannot say is refused naming the field: a required
    // message missing, an enum value this manager does not know.
    let mut no_mode = proto::ServiceSpec::from(service("nomode"));
    no_mode.mode = None;
    let err = api.create_service(no_mode).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "invalid service spec: mode: missing");
    let mut odd = service("odd");
    odd.endpoint.ports.push(control::state::PortConfig {
        protocol: control::state::Protocol::Tcp,
        target: 80,
        published: None,
        mode: Default::default(),
    });
    let mut odd = proto::ServiceSpec::from(odd);
    odd.endpoint.as_mut().unwrap().ports[0].protocol = 7;
    let err = api.create_service(odd).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "invalid service spec: endpoint.ports[0].protocol: 7 is not a known protocol"
    );
    let mut port0 = proto::ServiceSpec::from(service("port0"));
    port0.endpoint = Some(proto::EndpointSpec {
        mode: 0,
        ports: vec![proto::PortConfig {
            protocol: proto::Protocol::Udp.into(),
            target: 70_000,
            published: None,
            mode: 0,
        }],
    });
    let err = api.create_service(port0).await.unwrap_err();
    assert_eq!(
        err.message(),
        "invalid service spec: endpoint.ports[0].target: 70000 is not a port (1-65535)"
    );
    let services = api
        .list_services(Empty {})
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(services.len(), 1, "a refused spec left a service behind");
    c.stop().await;
}
