//! Embedded DNS: a hickory-server in every local task's namespace at
//! 127.0.0.11:53, UDP and TCP, served from meshd.
//!
//! The sockets are opened inside the task's namespace (so only that task
//! reaches them) and served on meshd's runtime. Each task's server answers
//! from the records of the networks that task is attached to:
//! - `svc` and its aliases: the service's VIP there, or its task IPs in
//!   dnsrr mode; `tasks.svc`: the task IPs; `svc.slot`: that task;
//! - PTR for those addresses;
//! - several addresses come back shuffled;
//! - a name that looks like a cluster name (one label, or `tasks.*`) and
//!   is unknown: NXDOMAIN; any other name is forwarded to the upstream
//!   resolvers.
//!
//! The records are swapped in one step when the agent applies a revision,
//! before it acks: once a node has acked the revision that withdrew an
//! address, no query on that node is answered with it.

mod server;
#[cfg(test)]
mod tests;
mod zone;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

pub use server::{Dns, ServeError};
pub use zone::{Answer, SharedZone, Zone};

/// Where the embedded DNS answers inside a task's namespace.
pub const DNS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);
/// TTL of a VIP (stable for the service's life) and of task addresses
/// (which change with every reschedule).
const VIP_TTL: u32 = 600;
const TASK_TTL: u32 = 0;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
