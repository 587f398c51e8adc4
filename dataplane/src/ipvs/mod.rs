//! The IPVS load-balancer backend (`meshd --lb-backend ipvs`): every
//! frontend as an IPVS virtual service with NAT ("masq") forwarding to the
//! tasks, through our own small generic-netlink module (no maintained crate
//! speaks IPVS's netlink family).
//!
//! It keeps the eBPF path's contract: [`IpvsSync`] is handed the same
//! [`LbSpec`](crate::lb::LbSpec) (or [`LbChanges`](crate::lb::LbChanges))
//! and writes only the difference to the kernel.
//! - A published port is a TCP or UDP service on each node address.
//! - A VIP (any port, TCP and UDP) is a fwmark service, as Swarm's own
//!   IPVS VIPs are: nftables marks packets to the VIP, and a local route
//!   delivers them where IPVS looks. Real servers at port 0 get the port
//!   the client asked for.
//! - Replies must come back through the node that balanced the flow, so
//!   both kinds are masqueraded in postrouting (nftables table
//!   `ip mesh_ipvs`, as Swarm's ingress sandbox SNATs with iptables);
//!   `net.ipv4.vs.conntrack=1` lets netfilter NAT see IPVS's flows.
//!
//! The eBPF program stays attached with no frontend, passing everything.

mod delivery;
mod error;
mod genl;
mod key;
mod sync;

pub use error::IpvsError;
pub use genl::{Ipvs, RealServer, VirtualService};
pub use key::{MASQ_MARK, VIP_MARK, VIP_SLOT_MASK, VsKey};
pub use sync::{IpvsSync, WithIpvs};

#[cfg(test)]
mod tests;
