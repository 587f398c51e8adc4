//! The manager side of mesh: the replicated state model and its allocator,
//! the Raft store (sealed at rest), the PKI, mTLS, the manager (Raft over
//! gRPC) with its write path, the gRPC API, and the daemon lifecycle. The
//! orchestrator, scheduler and dispatcher land with later issues.

pub mod agent;
pub mod allocator;
pub mod api;
pub mod daemon;
pub mod dispatcher;
pub mod manager;
pub mod pki;
pub mod seal;
pub mod state;
pub mod store;
pub mod tables;
pub mod tls;
