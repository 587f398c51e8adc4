//! The control side of `meshd`: `init`, `join` and `run` on a data dir,
//! the gRPC server, and the node's upkeep loop (certificate renewal, role
//! changes, joining the Raft voters).
//!
//! Data dir layout:
//! - `node.json`: who this node is (ids, addresses, last known managers);
//!   written last by init/join, so its presence means "part of a cluster";
//! - `certs/ca.crt`, `certs/node.crt`, `certs/node.key` (0600);
//! - managers only: `keys/` (the data key, wrapped; [`crate::raft::seal`]) and
//!   `raft.redb` (log, vote, snapshots; every record sealed).

mod error;
mod init;
mod join;
mod manager;
mod run;
mod serve;
mod unlock;
mod upkeep;

pub use crate::grpc::{MAX_MESSAGE, status_text};
pub use mtls::datadir::{NodeFile, NodeFileError, certs_dir};

pub use error::DaemonError;
pub use init::{Addresses, InitOptions, InitReport, init, init_with};
pub use join::{join, join_with};
pub use run::{run, run_with};
pub use serve::{Daemon, TaskLink};
pub use unlock::{Unlock, send_unlock, unlock_socket};
pub use upkeep::UPKEEP_PERIOD;

#[cfg(test)]
mod ingress_tests;
