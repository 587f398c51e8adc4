//! The cluster side of mesh, by concern:
//! - the replicated model: [`state`] (records and how commands change
//!   them), [`allocator`] (IPAM, VNIs, ports), [`keys`] (the encrypted
//!   networks' key ring), [`tables`] (what every node's data plane is
//!   told, derived from the state);
//! - Raft: [`raft`] (manager, durable store, sealing at rest), [`codec`]
//!   (the binary encoding of entries, snapshots and internal bodies);
//! - identity: [`ca`] (PKI, mTLS, the unauthenticated front door);
//! - serving: [`api`] (the gRPC services), [`dispatcher`] (agent sessions
//!   and liveness, on the leader) with its registry [`sessions`] (read by
//!   the manager too), [`orchestrator`] (tasks per service,
//!   scheduling, rolling updates), [`daemon`] (a node's lifecycle);
//! - the node's end of the session: [`agent`].
//!
//! The pure parts (state, allocator, keys, tables, orchestrator's
//! reconcile) use no tokio or tonic.

pub mod agent;
pub mod allocator;
pub mod api;
pub mod ca;
pub mod codec;
pub mod context;
pub mod daemon;
pub mod deadline;
pub mod dispatcher;
pub use mtls::grpc;
pub use mtls::ids;
pub mod keys;
pub mod orchestrator;
#[cfg(test)]
mod props;
pub mod raft;
pub mod reply;
pub mod sessions;
pub mod shutdown;
pub mod state;
pub mod tables;
pub use model::units;
