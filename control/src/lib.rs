//! The manager side of mesh: the replicated state model and its allocator,
//! the Raft store (sealed at rest), the PKI, mTLS, the manager (Raft over
//! gRPC) with its write path, the gRPC API, the daemon lifecycle, the
//! data-plane tables derived from the state, the leader's dispatcher (agent
//! sessions, liveness) and the node agent. The orchestrator and scheduler
//! land with a later issue.

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
