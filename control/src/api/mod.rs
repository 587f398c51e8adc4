//! The gRPC services a node serves: Raft, Join, Member and Cluster, one
//! module each, over the typed messages of `proto` (the conversions live
//! there, in `proto::convert`).
//!
//! Authorization is per call, from the caller's certificate (the TLS layer
//! accepts connections without one, because joining needs none):
//! - no certificate: only `Join`;
//! - a certificate must be signed by this cluster's CA, be within its
//!   validity, name this cluster, and name a node that was not removed;
//! - `Raft` and `Cluster` need a manager certificate, and a node the state
//!   still lists as a manager.

mod cluster;
mod join;
mod member;
mod raft;

use tonic::Status;

use crate::state::{Role, State};

pub use cluster::ClusterService;
pub use join::JoinService;
pub use member::MemberService;
pub use raft::RaftService;

pub use crate::context::Ctx;
pub use crate::grpc::{REMOVED, is_removal};
pub use crate::ids::{new_id, new_node_id};
pub use model::api::{
    Info, KeyRing, NodeView, STALE_HEADER, ServiceView, TaskLog, TaskView, Whoami,
};

/// A request's message as the model type, or `invalid_argument` naming
/// the field the model cannot take.
pub(crate) fn from_wire<P, M>(p: P, what: &str) -> Result<M, Status>
where
    M: TryFrom<P, Error = proto::WireError>,
{
    M::try_from(p).map_err(|e| Status::invalid_argument(format!("invalid {what}: {e}")))
}

/// A required message field of a request.
pub(crate) fn required<P>(p: Option<P>, what: &str) -> Result<P, Status> {
    p.ok_or_else(|| Status::invalid_argument(format!("{what} is missing")))
}

/// A role a request names.
pub(crate) fn role(v: i32) -> Result<Role, Status> {
    use proto::convert::FromWire;
    Role::from_wire(v, "role")
        .map_err(|e| Status::invalid_argument(format!("{e}: use ROLE_WORKER or ROLE_MANAGER")))
}

/// The API addresses of the managers.
pub fn manager_addrs(s: &State) -> Vec<String> {
    s.nodes
        .values()
        .filter(|n| n.spec.role == Role::Manager)
        .filter_map(|n| n.api_addr.clone())
        .collect()
}

/// A manager-internal body (Raft, forwarded proposals), encoded.
pub(crate) fn internal<T: serde::Serialize>(v: &T) -> Result<proto::Internal, Status> {
    crate::codec::encode(v)
        .map(|body| proto::Internal { body })
        .map_err(|e| Status::internal(e.to_string()))
}

/// A manager-internal body, decoded.
pub(crate) fn parse_internal<T: serde::de::DeserializeOwned>(
    what: &str,
    b: &proto::Internal,
) -> Result<T, Status> {
    crate::codec::decode(&b.body)
        .map_err(|e| Status::invalid_argument(format!("invalid {what}: {e}")))
}
