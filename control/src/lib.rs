//! The manager side of mesh: the replicated state model and its allocator,
//! the Raft store (sealed at rest), the PKI, mTLS, the manager (Raft over
//! gRPC) with its write path, the gRPC API, the daemon lifecycle, the
//! data-plane tables derived from the state, the leader's dispatcher (agent
//! sessions, liveness), the node agent, and the orchestrator with its
//! scheduler.

pub mod agent;
pub mod allocator;
pub mod api;
pub mod codec;
pub mod context;
pub mod daemon;
pub mod deadline;
pub mod dispatcher;
pub mod gate;
pub use mtls::grpc;
pub use mtls::ids;
pub mod keys;
pub mod manager;
pub mod orchestrator;
pub mod pki;
#[cfg(test)]
mod props;
pub mod reply;
pub mod seal;
pub mod sessions;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod tables;
pub mod tls;
pub use model::units;
