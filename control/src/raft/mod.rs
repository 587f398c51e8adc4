//! Raft: the [`manager`] (an openraft member over gRPC/mTLS, with the
//! write path every API call takes), its durable [`store`] (redb, one file,
//! versioned), and [`seal`], which encrypts every record at rest.

pub mod manager;
mod membership;
mod network;
pub mod seal;
pub mod store;
mod write;
