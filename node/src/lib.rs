//! The node: what meshd runs on every host besides the control plane.
//!
//! - [`Dataplane`] is the loaded data path (eBPF, or IPVS) with the overlay
//!   and IPsec beside it, kept in shape by resyncs and conntrack sweeps.
//! - [`Node`] is the agent's [`Sink`](control::agent::Sink): it turns each
//!   update of the cluster's tables into the data plane's state, in the
//!   order of [`reconcile`].
//! - [`runner`] runs the tasks the leader assigns, with an
//!   [`executor::Executor`].
//!
//! The packet code (programs, maps, netlink, XFRM, DNS) is `dataplane`'s;
//! the cluster protocol (agent session, tables) is `control`'s and
//! `model`'s. This crate holds the order and the lifecycle between them.

mod attach;
pub mod config;
pub mod error;
pub mod executor;
mod lifecycle;
mod node;
pub mod reconcile;
pub mod runner;
pub mod underlay;

pub use error::{ApplyError, DownError, StartError};
pub use lifecycle::{Dataplane, LbBackend, Options, down};
pub use node::{Node, WiredCounts};
