//! mesh's data model: the objects of the cluster state (nodes, networks,
//! services, tasks and their specs), the commands of the replicated log,
//! subnets, the tables every node's data plane is built from, and the
//! agent session's messages. Plain data with serde: no I/O, no async, no
//! consensus. The state machine that applies commands lives in `control`;
//! the data plane in `dataplane` reads the tables through these types.

pub mod api;
pub mod by_network;
pub mod cluster;
pub mod command;
pub mod constraint;
pub mod network;
pub mod node;
pub mod ring;
pub mod service;
pub mod session;
pub mod subnet;
pub mod tables;
pub mod task;
pub mod units;

pub use cluster::*;
pub use command::*;
pub use network::*;
pub use node::*;
pub use service::*;
pub use subnet::{Subnet, SubnetError};
pub use task::*;
