//! The typed API as a client that knows nothing of mesh sees it: gRPC
//! server reflection on a manager lists mesh's services and describes
//! their messages, and a call built from those descriptions alone is
//! answered. A connection without a node certificate gets none of it.

use std::{path::Path, sync::Arc, sync::RwLock, time::Duration};

use mesh_tests::{Topology, require_root};
use prost::Message as _;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::cluster::Node;

/// One reflection request on `channel`, its answer.
async fn reflect(
    channel: tonic::transport::Channel,
    request: MessageRequest,
) -> Result<MessageResponse, tonic::Status> {
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([req]))
        .await?
        .into_inner();
    let answer = answers
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unknown("the reflection stream ended without an answer"))?;
    answer
        .message_response
        .ok_or_else(|| tonic::Status::unknown("an empty reflection answer"))
}

#[test]
fn reflection_lists_and_describes_the_api_and_a_call_built_from_it_is_answered() {
    let Some(_root) = require_root(
        "netns::api::reflection_lists_and_describes_the_api_and_a_call_built_from_it_is_answered",
    ) else {
        return;
    };
    let topo = Topology::new(1);
    let mut nodes = Node::for_hosts(&topo);
    let mut init = vec!["init".to_owned()];
    init.extend(nodes[0].common_args());
    nodes[0].start(init);
    let manager = &nodes[0];
    let api = manager.api();
    let certs = control::daemon::certs_dir(Path::new(manager.dir.path()));
    let creds = mtls_creds(&certs);
    let ca = creds.ca.clone();
    manager.host.run(|| async move {
        let channel = |trust| {
            control::ca::tls::channel(&api, trust, Duration::from_secs(10)).expect("channel")
        };
        let node = || {
            channel(control::ca::tls::Trust::Node(Arc::new(RwLock::new(
                creds.clone(),
            ))))
        };

        // The services, as grpcurl's `list` asks for them.
        let MessageResponse::ListServicesResponse(list) =
            reflect(node(), MessageRequest::ListServices(String::new()))
                .await
                .expect("reflection with a node certificate")
        else {
            panic!("not a service list");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "grpc.reflection.v1.ServerReflection",
                "mesh.v1.Cluster",
                "mesh.v1.Dispatcher",
                "mesh.v1.Join",
                "mesh.v1.Member",
                "mesh.v1.Raft",
            ]
        );

        // `describe mesh.v1.Cluster`: the file that defines it and the
        // ones it imports, enough to build any request.
        let MessageResponse::FileDescriptorResponse(files) = reflect(
            node(),
            MessageRequest::FileContainingSymbol("mesh.v1.Cluster".into()),
        )
        .await
        .expect("the Cluster service's files") else {
            panic!("not file descriptors");
        };
        let decode = |files: tonic_reflection::pb::v1::FileDescriptorResponse| {
            files
                .file_descriptor_proto
                .iter()
                .map(|b| {
                    prost_types::FileDescriptorProto::decode(b.as_slice()).expect("a descriptor")
                })
                .collect::<Vec<_>>()
        };
        let mut files = decode(files);
        // And the files it imports, by name, as grpcurl fetches them.
        let imports: Vec<String> = files.iter().flat_map(|f| f.dependency.clone()).collect();
        assert!(
            !imports.is_empty(),
            "the Cluster service's file imports its messages"
        );
        for name in imports {
            let MessageResponse::FileDescriptorResponse(more) =
                reflect(node(), MessageRequest::FileByFilename(name.clone()))
                    .await
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
            else {
                panic!("{name}: not file descriptors");
            };
            files.extend(decode(more));
        }
        let cluster = files
            .iter()
            .flat_map(|f| f.service.iter().map(move |s| (f, s)))
            .find(|(_, s)| s.name() == "Cluster")
            .expect("the Cluster service is described");
        let method = |name: &str| {
            cluster
                .1
                .method
                .iter()
                .find(|m| m.name() == name)
                .unwrap_or_else(|| panic!("{name} is not described"))
                .clone()
        };
        // Specs are messages, not JSON documents.
        assert_eq!(method("CreateService").input_type(), ".mesh.v1.ServiceSpec");
        assert_eq!(method("ListNodes").output_type(), ".mesh.v1.NodeList");
        let message = |name: &str| {
            files
                .iter()
                .flat_map(|f| f.message_type.iter())
                .find(|m| m.name() == name)
                .unwrap_or_else(|| panic!("message {name} is not described"))
                .clone()
        };
        let port = message("PortConfig");
        let protocol = port
            .field
            .iter()
            .find(|f| f.name() == "protocol")
            .expect("PortConfig.protocol");
        assert_eq!(protocol.type_name(), ".mesh.v1.Protocol", "enums are enums");

        // A call made from the description alone: the path from the
        // package, service and method names it gave.
        let list_nodes = method("ListNodes");
        let path = format!(
            "/{}.{}/{}",
            cluster.0.package(),
            cluster.1.name(),
            list_nodes.name()
        );
        let mut grpc = tonic::client::Grpc::new(node());
        grpc.ready().await.expect("ready");
        let reply: tonic::Response<proto::NodeList> = grpc
            .unary(
                tonic::Request::new(proto::Empty {}),
                path.parse().expect("a path"),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .expect("ListNodes answered");
        let listed = reply.into_inner().nodes;
        assert_eq!(listed.len(), 1, "{listed:?}");
        let only = listed[0].node.as_ref().expect("a node");
        assert_eq!(only.status, proto::NodeStatus::Ready as i32);

        // Without a certificate: refused, as every call but Join is.
        let anonymous = channel(control::ca::tls::Trust::Anonymous(ca));
        let err = reflect(anonymous, MessageRequest::ListServices(String::new()))
            .await
            .expect_err("reflection without a certificate");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    });
}

/// The node's credentials from its certs dir.
fn mtls_creds(certs: &Path) -> control::ca::tls::Credentials {
    control::ca::tls::Credentials::load(certs).expect("the node's credentials")
}
