//! The manager side of mesh. So far: `allocator` (subnets, VNIs, task
//! addresses, published ports) and `state` (the replicated cluster state and
//! its commands). Raft, the API, PKI, the orchestrator, scheduler and
//! dispatcher land here with the control-plane issues.

pub mod allocator;
pub mod pki;
pub mod seal;
pub mod state;
pub mod store;
