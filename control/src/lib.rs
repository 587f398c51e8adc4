//! The manager side of mesh (Raft, state model, API, PKI, allocator,
//! orchestrator, scheduler, dispatcher). Nothing lives here yet: the crate
//! exists so the dependency direction `dataplane -> control` is fixed from the
//! start. See docs/architecture.md for what lands here and when.
