//! The load-balancer spec as plain Rust values (services, frontends,
//! backends, NAT range), its validation, and the keys its frontends and
//! backends have in the maps. Nothing here touches a map.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::{Backend, FAMILY_V4, FrontendKey, limits};
use serde::{Deserialize, Serialize};

use crate::maglev::{self, MaglevError};

/// Default SNAT range 10000-32767: below Linux's ephemeral range
/// (32768-60999), so NATed flows never collide with the node's own outgoing
/// connections, and large enough that closed flows' ports (held about a
/// second after their FIN) do not run out at ~10k new connections/s per
/// backend. A 4.5k-port range ran out at ~2k/s (see docs/BENCHMARKS.md).
pub const DEFAULT_NAT_PORT_MIN: u16 = 10000;
pub const DEFAULT_NAT_PORT_COUNT: u16 = 22768;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub const fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// Where a service answers. `address: None` publishes the port on every
/// node address (Swarm's ingress routing mesh).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FrontendSpec {
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendSpec {
    pub address: Ipv4Addr,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub id: u32,
    pub name: String,
    pub frontends: Vec<FrontendSpec>,
    pub backends: Vec<BackendSpec>,
    #[serde(default = "default_table_size")]
    pub table_size: u32,
}

fn default_table_size() -> u32 {
    maglev::DEFAULT_TABLE_SIZE
}

/// Everything the load balancer needs on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbSpec {
    /// Source address for NATed flows: the node's mesh address.
    pub nat_address: Ipv4Addr,
    /// Addresses a published port answers on.
    pub node_addresses: Vec<Ipv4Addr>,
    #[serde(default = "default_nat_port_min")]
    pub nat_port_min: u16,
    #[serde(default = "default_nat_port_count")]
    pub nat_port_count: u16,
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Interface index -> the node's own address on it: a flow routed out
    /// of that interface leaves with that source (not `nat_address`), and
    /// its replies are taken back there. One per overlay bridge.
    #[serde(default)]
    pub nat_interfaces: BTreeMap<u32, Ipv4Addr>,
}

fn default_nat_port_min() -> u16 {
    DEFAULT_NAT_PORT_MIN
}

fn default_nat_port_count() -> u16 {
    DEFAULT_NAT_PORT_COUNT
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("service {service}: {source}")]
    Maglev {
        service: String,
        #[source]
        source: MaglevError,
    },
    #[error(
        "frontend {address}:{port}/{protocol:?} is claimed by both service {first} and service {second}"
    )]
    DuplicateFrontend {
        address: String,
        port: u16,
        protocol: Protocol,
        first: String,
        second: String,
    },
    #[error("service {service}: port 0 is not a valid {what} port")]
    ZeroPort { service: String, what: &'static str },
    #[error("service ids must be unique: {0} is used twice")]
    DuplicateServiceId(u32),
    #[error(
        "this node's load balancer holds at most {max} backends, and the tables need {count}: \
         start meshd with a larger --lb-backends (at most {limit})",
        limit = limits::BACKENDS_LIMIT
    )]
    BackendCapacity { count: usize, max: u32 },
    #[error("too many {what}: {count} (at most {max})")]
    TooMany {
        what: &'static str,
        count: usize,
        max: u32,
    },
    #[error(
        "nat_port_count must be at least 1, and nat_port_min + nat_port_count must not pass 65536"
    )]
    NatRange,
    #[error("nat_address must not be 0.0.0.0")]
    NatAddress,
}

impl LbSpec {
    /// Checks the whole spec before anything is written, so a bad spec
    /// changes nothing.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_globals()?;
        validate_services(&self.services)
    }

    /// Everything but the services.
    pub(super) fn validate_globals(&self) -> Result<(), SpecError> {
        if self.nat_address.is_unspecified() {
            return Err(SpecError::NatAddress);
        }
        if self.nat_port_count == 0
            || u32::from(self.nat_port_min) + u32::from(self.nat_port_count) > 65536
        {
            return Err(SpecError::NatRange);
        }
        if self.node_addresses.len() > limits::NODE_ADDRS_MAX as usize {
            return Err(SpecError::TooMany {
                what: "node addresses",
                count: self.node_addresses.len(),
                max: limits::NODE_ADDRS_MAX,
            });
        }
        Ok(())
    }
}

/// Checks services together: ids, ports, Maglev sizes, no frontend twice.
pub fn validate_services(services: &[ServiceSpec]) -> Result<(), SpecError> {
    {
        let mut ids = BTreeSet::new();
        let mut seen: BTreeMap<FrontendKey, &str> = BTreeMap::new();
        let mut backends = BTreeSet::new();
        for svc in services {
            if !ids.insert(svc.id) {
                return Err(SpecError::DuplicateServiceId(svc.id));
            }
            maglev::validate_size(svc.table_size).map_err(|source| SpecError::Maglev {
                service: svc.name.clone(),
                source,
            })?;
            let live = svc.backends.iter().filter(|b| b.weight > 0).count();
            if live >= svc.table_size as usize {
                return Err(SpecError::Maglev {
                    service: svc.name.clone(),
                    source: MaglevError::TooSmall {
                        size: svc.table_size,
                        backends: live,
                    },
                });
            }
            for f in &svc.frontends {
                // Port 0 is "any port", for an address of its own (a VIP),
                // and then the backends take the client's port (port 0).
                if f.port == 0 && f.address.is_none() {
                    return Err(SpecError::ZeroPort {
                        service: svc.name.clone(),
                        what: "frontend (any port needs an address: a VIP)",
                    });
                }
                if let Some(first) = seen.insert(frontend_key(f), &svc.name) {
                    return Err(SpecError::DuplicateFrontend {
                        address: f.address.map_or("*".into(), |a| a.to_string()),
                        port: f.port,
                        protocol: f.protocol,
                        first: first.to_owned(),
                        second: svc.name.clone(),
                    });
                }
                for b in &svc.backends {
                    if (b.port == 0) != (f.port == 0) {
                        return Err(SpecError::ZeroPort {
                            service: svc.name.clone(),
                            what: "backend (port 0, the client's port, goes with an any-port frontend only)",
                        });
                    }
                    backends.insert(backend_key(b, f.protocol));
                }
            }
        }
        if seen.len() > limits::MAX_FRONTENDS as usize {
            return Err(SpecError::TooMany {
                what: "frontends",
                count: seen.len(),
                max: limits::MAX_FRONTENDS,
            });
        }
        // The hard limit; a load balancer's own capacity
        // ([`super::LbSync::backend_capacity`]) may be smaller.
        if backends.len() > limits::BACKENDS_LIMIT as usize {
            return Err(SpecError::TooMany {
                what: "backends",
                count: backends.len(),
                max: limits::BACKENDS_LIMIT,
            });
        }
        Ok(())
    }
}

/// Identity of a backend in the maps: address, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl BackendKey {
    /// The bytes Maglev hashes: identical on every node.
    pub(super) fn maglev_key(&self) -> [u8; 7] {
        let a = self.address.octets();
        let p = self.port.to_be_bytes();
        [a[0], a[1], a[2], a[3], p[0], p[1], self.protocol.number()]
    }

    pub(super) fn to_map(self) -> Backend {
        Backend {
            addr_be: [u32::from_ne_bytes(self.address.octets()), 0, 0, 0],
            port_be: self.port.to_be(),
            family: FAMILY_V4,
            proto: self.protocol.number(),
            flags: 0,
        }
    }

    /// The key of a backend read back from the maps; `None` for a protocol we
    /// never write.
    pub fn from_map(b: &Backend) -> Option<BackendKey> {
        Some(BackendKey {
            address: Ipv4Addr::from(b.addr_be[0].to_ne_bytes()),
            port: u16::from_be(b.port_be),
            protocol: Protocol::from_number(b.proto)?,
        })
    }
}

pub(super) fn backend_key(b: &BackendSpec, protocol: Protocol) -> BackendKey {
    BackendKey {
        address: b.address,
        port: b.port,
        protocol,
    }
}

pub fn frontend_key(f: &FrontendSpec) -> FrontendKey {
    FrontendKey {
        addr_be: [
            f.address.map_or(0, |a| u32::from_ne_bytes(a.octets())),
            0,
            0,
            0,
        ],
        port_be: f.port.to_be(),
        // Port 0 (a VIP's any-port frontend) matches TCP and UDP alike.
        proto: if f.port == 0 { 0 } else { f.protocol.number() },
        family: FAMILY_V4,
    }
}
