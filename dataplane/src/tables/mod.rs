//! From the control plane's tables to what this node's kernel should hold.
//!
//! The agent (`control::agent`) keeps a replica of the cluster's tables;
//! this module picks this node's share of it:
//! - the **overlay**: every network this node has its own address on (every
//!   node on `ingress`; another network from this node's first task there),
//!   with that address on the bridge, its local endpoints (veths into the
//!   tasks' namespaces), its remote endpoints and the other nodes' own
//!   addresses (static FDB and neighbour entries toward the nodes they are
//!   on), and the services' VIPs, which local tasks resolve to the bridge.
//!   Endpoints of a node that is down are not in the tables at all.
//! - the **load balancer** ([`LbView`]): every published port on the
//!   node's underlay address, to the service's tasks on `ingress`; and each
//!   VIP on a network this node is on, to the service's tasks there. Flows
//!   leave with this node's own address on the backend's network as their
//!   source, so that replies come back to the node that translated them.

mod ipsec;
mod lb;
mod overlay;
#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;

use model::tables::{EndpointEntry, NodeEndpointEntry, Value};

pub use ipsec::ipsec_spec;
pub use lb::LbView;
pub use overlay::{NodeView, OverlayUpdate, overlay_spec};

fn endpoint(v: &Option<Value>) -> Option<&EndpointEntry> {
    match v {
        Some(Value::Endpoint(e)) => Some(e),
        _ => None,
    }
}

fn node_endpoint(v: &Option<Value>) -> Option<&NodeEndpointEntry> {
    match v {
        Some(Value::NodeEndpoint(e)) => Some(e),
        _ => None,
    }
}

fn vips(v: &Option<Value>) -> Option<&model::by_network::ByNetwork<Ipv4Addr>> {
    match v {
        Some(Value::Service(s)) => Some(&s.vips),
        _ => None,
    }
}
