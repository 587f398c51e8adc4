//! The manager side of mesh. So far: `allocator` (subnets, VNIs, task
//! addresses). Raft, the state model, the API, PKI, the orchestrator,
//! scheduler and dispatcher land here with the control-plane issues.

pub mod allocator;
