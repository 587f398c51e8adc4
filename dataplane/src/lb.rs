//! Load-balancer state: the desired frontends and backends as plain Rust
//! values, and a sync engine that writes only the difference into the maps.
//!
//! Granularity: a backend entry is written when it is new; a frontend's
//! Maglev table is rebuilt and swapped in (one atomic map-of-maps update) only
//! when that frontend's backend set, weights or table size changed; unchanged
//! frontends cost nothing. Applying the same state twice makes no map writes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::Ipv4Addr,
};

use dataplane_common::{Backend, FAMILY_V4, Frontend, FrontendKey, LbConfig, limits};
use serde::{Deserialize, Serialize};

use crate::maglev::{self, MaglevError, NO_BACKEND, Weighted};

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

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{operation}: {message}")]
    Map {
        operation: &'static str,
        message: String,
    },
    /// The IPVS backend: a netlink or nftables failure, named.
    #[error("{0}")]
    Ipvs(String),
}

impl LbSpec {
    /// Checks the whole spec before anything is written, so a bad spec
    /// changes nothing.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_globals()?;
        validate_services(&self.services)
    }

    /// Everything but the services.
    fn validate_globals(&self) -> Result<(), SpecError> {
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
        if backends.len() > limits::MAX_BACKENDS as usize {
            return Err(SpecError::TooMany {
                what: "backends",
                count: backends.len(),
                max: limits::MAX_BACKENDS,
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
    fn maglev_key(&self) -> [u8; 7] {
        let a = self.address.octets();
        let p = self.port.to_be_bytes();
        [a[0], a[1], a[2], a[3], p[0], p[1], self.protocol.number()]
    }

    fn to_map(self) -> Backend {
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

fn backend_key(b: &BackendSpec, protocol: Protocol) -> BackendKey {
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

/// The map operations the sync engine needs; the kernel implementation lives
/// in `crate::ebpf`, and tests use an in-memory one.
pub trait LbMaps {
    fn set_config(&mut self, config: &LbConfig) -> Result<(), SyncError>;
    fn add_node_addr(&mut self, addr: Ipv4Addr) -> Result<(), SyncError>;
    fn remove_node_addr(&mut self, addr: Ipv4Addr) -> Result<(), SyncError>;
    /// Sets (`Some`) or removes the NAT address of interface `ifindex`.
    fn set_nat_interface(&mut self, ifindex: u32, addr: Option<Ipv4Addr>) -> Result<(), SyncError>;
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), SyncError>;
    fn remove_backend(&mut self, id: u32) -> Result<(), SyncError>;
    /// Installs a complete new table for `frontend_id` in one atomic swap.
    fn swap_table(&mut self, frontend_id: u32, table: &[u32]) -> Result<(), SyncError>;
    fn set_frontend(&mut self, key: &FrontendKey, frontend: &Frontend) -> Result<(), SyncError>;
    fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), SyncError>;
}

/// Where a load-balancer spec goes: the eBPF maps ([`Ebpf`]), or the eBPF
/// maps for VIPs and IPVS for ports (`crate::ipvs::WithIpvs`). Either way
/// only the difference is written.
pub trait LbTarget {
    fn apply(&mut self, spec: &LbSpec) -> Result<ApplyReport, SyncError>;
    fn apply_changes(
        &mut self,
        globals: &LbSpec,
        changes: &LbChanges,
    ) -> Result<ApplyReport, SyncError>;
}

/// The eBPF maps, through their sync engine.
pub struct Ebpf<'a, M: LbMaps> {
    pub sync: &'a mut LbSync,
    pub maps: M,
}

impl<M: LbMaps> LbTarget for Ebpf<'_, M> {
    fn apply(&mut self, spec: &LbSpec) -> Result<ApplyReport, SyncError> {
        self.sync.apply(spec, &mut self.maps)
    }

    fn apply_changes(
        &mut self,
        globals: &LbSpec,
        changes: &LbChanges,
    ) -> Result<ApplyReport, SyncError> {
        self.sync.apply_changes(globals, changes, &mut self.maps)
    }
}

/// Maps borrowed from their owner work as well.
impl<T: LbMaps + ?Sized> LbMaps for &mut T {
    fn set_config(&mut self, c: &LbConfig) -> Result<(), SyncError> {
        (**self).set_config(c)
    }
    fn add_node_addr(&mut self, a: Ipv4Addr) -> Result<(), SyncError> {
        (**self).add_node_addr(a)
    }
    fn remove_node_addr(&mut self, a: Ipv4Addr) -> Result<(), SyncError> {
        (**self).remove_node_addr(a)
    }
    fn set_nat_interface(&mut self, i: u32, a: Option<Ipv4Addr>) -> Result<(), SyncError> {
        (**self).set_nat_interface(i, a)
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), SyncError> {
        (**self).set_backend(id, b)
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), SyncError> {
        (**self).remove_backend(id)
    }
    fn swap_table(&mut self, id: u32, t: &[u32]) -> Result<(), SyncError> {
        (**self).swap_table(id, t)
    }
    fn set_frontend(&mut self, k: &FrontendKey, f: &Frontend) -> Result<(), SyncError> {
        (**self).set_frontend(k, f)
    }
    fn remove_frontend(&mut self, k: &FrontendKey) -> Result<(), SyncError> {
        (**self).remove_frontend(k)
    }
}

/// Map writes made by one `apply`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub config_writes: usize,
    pub node_addr_writes: usize,
    pub backend_writes: usize,
    pub backend_removals: usize,
    pub table_swaps: usize,
    pub frontend_writes: usize,
    pub frontend_removals: usize,
}

impl ApplyReport {
    /// The writes of `self` and `other` together.
    pub fn merged(self, other: ApplyReport) -> ApplyReport {
        ApplyReport {
            config_writes: self.config_writes + other.config_writes,
            node_addr_writes: self.node_addr_writes + other.node_addr_writes,
            backend_writes: self.backend_writes + other.backend_writes,
            backend_removals: self.backend_removals + other.backend_removals,
            table_swaps: self.table_swaps + other.table_swaps,
            frontend_writes: self.frontend_writes + other.frontend_writes,
            frontend_removals: self.frontend_removals + other.frontend_removals,
        }
    }

    pub fn total(&self) -> usize {
        self.config_writes
            + self.node_addr_writes
            + self.backend_writes
            + self.backend_removals
            + self.table_swaps
            + self.frontend_writes
            + self.frontend_removals
    }
}

/// What the spec asks of one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Desired {
    service_id: u32,
    /// Sorted by key, so order in the spec does not matter.
    backends: Vec<(BackendKey, u32)>,
    table_size: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct InstalledFrontend {
    id: u32,
    /// What was last written; `None` after a restart (the maps do not hold
    /// the weights), so the next apply rewrites the deterministic, hence
    /// identical, table once.
    installed: Option<Desired>,
}

/// Ids `0..MAX`, handed out oldest-freed first: a freed id is reused as late
/// as possible (a stale conntrack entry does not find a *different* entry
/// under its old id), and in O(1) however many are in use.
#[derive(Debug, Default)]
struct IdPool<const MAX: u32> {
    used: HashSet<u32>,
    /// Filled on first use, in order from `next`.
    free: VecDeque<u32>,
    filled: bool,
    next: u32,
}

impl<const MAX: u32> IdPool<MAX> {
    /// A pool with `used` taken; new ids start after the highest of them.
    fn with_used(used: impl IntoIterator<Item = u32>) -> Self {
        let used: HashSet<u32> = used.into_iter().collect();
        IdPool {
            next: used.iter().max().map_or(0, |m| (m + 1) % MAX),
            used,
            ..Self::default()
        }
    }

    fn allocate(&mut self) -> Option<u32> {
        if !self.filled {
            self.filled = true;
            let (start, used) = (self.next, &self.used);
            self.free = (0..MAX)
                .map(|i| (start + i) % MAX)
                .filter(|id| !used.contains(id))
                .collect();
        }
        let id = self.free.pop_front()?;
        self.used.insert(id);
        Some(id)
    }

    fn release(&mut self, id: u32) {
        if self.used.remove(&id) && self.filled {
            self.free.push_back(id);
        }
    }
}

/// What is in the maps now, as far as this process knows.
#[derive(Debug, Default)]
pub struct LbSync {
    config: Option<LbConfig>,
    node_addrs: BTreeSet<Ipv4Addr>,
    nat_interfaces: BTreeMap<u32, Ipv4Addr>,
    // Hash maps: a node holds thousands of frontends, and one change looks
    // a few of them up (fewer cache misses than a B-tree's levels).
    frontends: HashMap<FrontendKey, InstalledFrontend>,
    frontend_ids: IdPool<{ limits::MAX_FRONTENDS }>,
    backends: HashMap<BackendKey, u32>,
    backend_ids: IdPool<{ limits::MAX_BACKENDS }>,
    /// Installed frontends naming each backend; exact once every frontend's
    /// table is known (`exact`), which a whole apply ensures.
    refs: HashMap<BackendKey, usize>,
    exact: bool,
}

/// A change to some services: their frontends now, and frontends that are
/// no longer anyone's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbChanges {
    pub upsert: Vec<ServiceSpec>,
    pub remove: Vec<FrontendSpec>,
}

impl LbChanges {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// What each frontend of `services` asks for (backends sorted: order in the
/// spec does not matter).
fn desired(services: &[ServiceSpec]) -> BTreeMap<FrontendKey, Desired> {
    let mut want = BTreeMap::new();
    for svc in services {
        for f in &svc.frontends {
            let mut backends: Vec<(BackendKey, u32)> = svc
                .backends
                .iter()
                .map(|b| (backend_key(b, f.protocol), b.weight))
                .collect();
            backends.sort();
            backends.dedup_by_key(|(k, _)| *k);
            want.insert(
                frontend_key(f),
                Desired {
                    service_id: svc.id,
                    backends,
                    table_size: svc.table_size,
                },
            );
        }
    }
    want
}

impl LbSync {
    pub fn new() -> LbSync {
        LbSync::default()
    }

    /// Rebuilds the sync state from what an earlier meshd left in the maps, so
    /// ids (and with them every conntrack entry) stay valid across restarts.
    /// Whether the maps held a configuration (an earlier meshd applied
    /// tables to them: a warm restart).
    pub fn configured(&self) -> bool {
        self.config.is_some()
    }

    pub fn recover(
        config: Option<LbConfig>,
        node_addrs: impl IntoIterator<Item = Ipv4Addr>,
        nat_interfaces: impl IntoIterator<Item = (u32, Ipv4Addr)>,
        frontends: impl IntoIterator<Item = (FrontendKey, Frontend)>,
        backends: impl IntoIterator<Item = (u32, BackendKey)>,
    ) -> LbSync {
        let backends: HashMap<BackendKey, u32> =
            backends.into_iter().map(|(id, k)| (k, id)).collect();
        let frontends: HashMap<FrontendKey, InstalledFrontend> = frontends
            .into_iter()
            .map(|(k, f)| {
                (
                    k,
                    InstalledFrontend {
                        id: f.id,
                        installed: None,
                    },
                )
            })
            .collect();
        LbSync {
            config,
            node_addrs: node_addrs.into_iter().collect(),
            nat_interfaces: nat_interfaces.into_iter().collect(),
            frontend_ids: IdPool::with_used(frontends.values().map(|f| f.id)),
            frontends,
            backend_ids: IdPool::with_used(backends.values().copied()),
            backends,
            refs: HashMap::new(),
            // Recovered frontends' tables are unknown until rewritten.
            exact: false,
        }
    }

    /// Makes the maps match `spec`, writing only what differs. The spec is
    /// validated first: an invalid spec changes nothing.
    pub fn apply(
        &mut self,
        spec: &LbSpec,
        maps: &mut impl LbMaps,
    ) -> Result<ApplyReport, SyncError> {
        spec.validate()?;
        let mut report = ApplyReport::default();
        self.apply_globals(spec, maps, &mut report)?;
        let want = desired(&spec.services);
        let gone: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        let changes = want
            .into_iter()
            .map(|(k, d)| (k, Some(d)))
            .chain(gone.into_iter().map(|k| (k, None)))
            .collect();
        self.change_frontends(changes, maps, &mut report)?;
        // Every frontend is now as written: the reference counts are exact,
        // and a backend that none names (recovered ones included) goes.
        self.refs.clear();
        for f in self.frontends.values() {
            for (k, _) in &f.installed.as_ref().expect("just written").backends {
                *self.refs.entry(*k).or_default() += 1;
            }
        }
        self.exact = true;
        let unnamed: Vec<BackendKey> = self
            .backends
            .keys()
            .filter(|k| !self.refs.contains_key(k))
            .copied()
            .collect();
        self.remove_backends(unnamed, maps, &mut report)?;
        Ok(report)
    }

    /// Applies a change to some services only, at a cost that depends on
    /// them, not on how many services there are: `changes.upsert` are
    /// those services' frontends as they are now, `changes.remove` the
    /// frontends they no longer have. The globals come from `globals` (its
    /// services are ignored). Needs a whole [`LbSync::apply`] first; an
    /// invalid change changes nothing.
    pub fn apply_changes(
        &mut self,
        globals: &LbSpec,
        changes: &LbChanges,
        maps: &mut impl LbMaps,
    ) -> Result<ApplyReport, SyncError> {
        if !self.exact {
            return Err(SyncError::Map {
                operation: "incremental load-balancer update",
                message: "the maps were not written by a whole apply yet".into(),
            });
        }
        globals.validate_globals()?;
        validate_services(&changes.upsert)?;
        let want = desired(&changes.upsert);
        let removed: BTreeSet<FrontendKey> = changes
            .remove
            .iter()
            .map(frontend_key)
            .filter(|k| !want.contains_key(k))
            .collect();
        // A frontend another service holds (and keeps) is refused.
        let mut added = 0usize;
        for (key, d) in &want {
            match self.frontends.get(key) {
                Some(f)
                    if !removed.contains(key)
                        && f.installed
                            .as_ref()
                            .is_some_and(|i| i.service_id != d.service_id) =>
                {
                    let svc = |id: u32| {
                        changes
                            .upsert
                            .iter()
                            .find(|s| s.id == id)
                            .map_or(format!("#{id}"), |s| s.name.clone())
                    };
                    return Err(SpecError::DuplicateFrontend {
                        address: match key.addr_be[0] {
                            0 => "*".into(),
                            a => Ipv4Addr::from(a.to_ne_bytes()).to_string(),
                        },
                        port: u16::from_be(key.port_be),
                        protocol: Protocol::from_number(key.proto).unwrap_or(Protocol::Tcp),
                        first: format!("#{}", f.installed.as_ref().expect("checked").service_id),
                        second: svc(d.service_id),
                    }
                    .into());
                }
                Some(_) => {}
                None => added += 1,
            }
        }
        let gone = removed
            .iter()
            .filter(|k| self.frontends.contains_key(*k))
            .count();
        let count = self.frontends.len() + added - gone;
        if count > limits::MAX_FRONTENDS as usize {
            return Err(SpecError::TooMany {
                what: "frontends",
                count,
                max: limits::MAX_FRONTENDS,
            }
            .into());
        }
        let mut report = ApplyReport::default();
        self.apply_globals(globals, maps, &mut report)?;
        let changes = want
            .into_iter()
            .map(|(k, d)| (k, Some(d)))
            .chain(removed.into_iter().map(|k| (k, None)))
            .collect();
        let orphans = self.change_frontends(changes, maps, &mut report)?;
        self.remove_backends(orphans, maps, &mut report)?;
        Ok(report)
    }

    /// Config, node addresses and per-interface NAT addresses.
    fn apply_globals(
        &mut self,
        spec: &LbSpec,
        maps: &mut impl LbMaps,
        report: &mut ApplyReport,
    ) -> Result<(), SyncError> {
        let config = LbConfig {
            nat_addr_be: [u32::from_ne_bytes(spec.nat_address.octets()), 0, 0, 0],
            nat_port_min: spec.nat_port_min,
            nat_port_count: spec.nat_port_count,
            _pad: 0,
        };
        if self.config != Some(config) {
            maps.set_config(&config)?;
            self.config = Some(config);
            report.config_writes += 1;
        }

        let want_addrs: BTreeSet<Ipv4Addr> = spec.node_addresses.iter().copied().collect();
        let added: Vec<Ipv4Addr> = want_addrs.difference(&self.node_addrs).copied().collect();
        let removed: Vec<Ipv4Addr> = self.node_addrs.difference(&want_addrs).copied().collect();
        for addr in added {
            maps.add_node_addr(addr)?;
            self.node_addrs.insert(addr);
            report.node_addr_writes += 1;
        }
        for addr in removed {
            maps.remove_node_addr(addr)?;
            self.node_addrs.remove(&addr);
            report.node_addr_writes += 1;
        }
        let stale: Vec<u32> = self
            .nat_interfaces
            .keys()
            .filter(|i| !spec.nat_interfaces.contains_key(i))
            .copied()
            .collect();
        for ifindex in stale {
            maps.set_nat_interface(ifindex, None)?;
            self.nat_interfaces.remove(&ifindex);
            report.node_addr_writes += 1;
        }
        for (ifindex, addr) in &spec.nat_interfaces {
            if self.nat_interfaces.get(ifindex) != Some(addr) {
                maps.set_nat_interface(*ifindex, Some(*addr))?;
                self.nat_interfaces.insert(*ifindex, *addr);
                report.node_addr_writes += 1;
            }
        }
        Ok(())
    }

    /// Writes each frontend's new state (`None`: remove it): new backends
    /// first, so that new tables only name existing entries; then each
    /// changed table and its frontend entry. Returns the backends whose
    /// last reference went (the caller removes them after).
    fn change_frontends(
        &mut self,
        changes: Vec<(FrontendKey, Option<Desired>)>,
        maps: &mut impl LbMaps,
        report: &mut ApplyReport,
    ) -> Result<Vec<BackendKey>, SyncError> {
        for (_, d) in &changes {
            for (key, _) in d.iter().flat_map(|d| &d.backends) {
                if !self.backends.contains_key(key) {
                    let id = self.backend_ids.allocate().ok_or(SpecError::TooMany {
                        what: "backends",
                        count: self.backends.len() + 1,
                        max: limits::MAX_BACKENDS,
                    })?;
                    if let Err(e) = maps.set_backend(id, &key.to_map()) {
                        self.backend_ids.release(id);
                        return Err(e);
                    }
                    self.backends.insert(*key, id);
                    report.backend_writes += 1;
                }
            }
        }
        let mut orphans = Vec::new();
        for (key, d) in changes {
            let Some(d) = d else {
                let Some(gone) = self.frontends.remove(&key) else {
                    continue;
                };
                maps.remove_frontend(&key)?;
                // Release the old table's memory; the id is unreachable now.
                maps.swap_table(gone.id, &[NO_BACKEND])?;
                self.frontend_ids.release(gone.id);
                report.frontend_removals += 1;
                self.unref(gone.installed.as_ref(), &mut orphans);
                continue;
            };
            let current = self.frontends.get(&key);
            if current.is_some_and(|c| c.installed.as_ref() == Some(&d)) {
                continue;
            }
            let id = match current {
                Some(c) => c.id,
                None => self.frontend_ids.allocate().ok_or(SpecError::TooMany {
                    what: "frontends",
                    count: self.frontends.len() + 1,
                    max: limits::MAX_FRONTENDS,
                })?,
            };
            let entry = Frontend {
                id,
                service_id: d.service_id,
                backend_count: d.backends.iter().filter(|(_, w)| *w > 0).count() as u32,
                table_size: d.table_size,
                flags: 0,
                _pad: 0,
            };
            let written = self
                .build_table(&d.backends, d.table_size)
                .and_then(|table| {
                    maps.swap_table(id, &table)?;
                    maps.set_frontend(&key, &entry)
                });
            if let Err(e) = written {
                // A new frontend's id goes back; an existing one keeps its own.
                if current.is_none() {
                    self.frontend_ids.release(id);
                }
                return Err(e);
            }
            report.table_swaps += 1;
            report.frontend_writes += 1;
            for (k, _) in &d.backends {
                *self.refs.entry(*k).or_default() += 1;
            }
            let old = self.frontends.insert(
                key,
                InstalledFrontend {
                    id,
                    installed: Some(d),
                },
            );
            self.unref(old.and_then(|o| o.installed).as_ref(), &mut orphans);
        }
        Ok(orphans)
    }

    fn unref(&mut self, old: Option<&Desired>, orphans: &mut Vec<BackendKey>) {
        for (k, _) in old.iter().flat_map(|d| &d.backends) {
            if let Some(n) = self.refs.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(k);
                    orphans.push(*k);
                }
            }
        }
    }

    /// Removes backends no table names any more. Their conntrack entries
    /// now miss in BACKENDS, so those flows are re-steered at once.
    fn remove_backends(
        &mut self,
        keys: Vec<BackendKey>,
        maps: &mut impl LbMaps,
        report: &mut ApplyReport,
    ) -> Result<(), SyncError> {
        for key in keys {
            if self.refs.contains_key(&key) {
                continue;
            }
            if let Some(id) = self.backends.remove(&key) {
                maps.remove_backend(id)?;
                self.backend_ids.release(id);
                report.backend_removals += 1;
            }
        }
        Ok(())
    }

    fn build_table(
        &self,
        backends: &[(BackendKey, u32)],
        size: u32,
    ) -> Result<Vec<u32>, SyncError> {
        let keys: Vec<[u8; 7]> = backends.iter().map(|(k, _)| k.maglev_key()).collect();
        let weighted: Vec<Weighted<'_>> = keys
            .iter()
            .zip(backends)
            .map(|(key, (_, weight))| Weighted {
                key,
                weight: *weight,
            })
            .collect();
        let table = maglev::build(&weighted, size).map_err(|e| SyncError::Map {
            operation: "building a Maglev table",
            message: e.to_string(),
        })?;
        Ok(table
            .into_iter()
            .map(|i| {
                if i == NO_BACKEND {
                    NO_BACKEND
                } else {
                    self.backends[&backends[i as usize].0]
                }
            })
            .collect())
    }

    /// Backend id of `key`, if installed.
    pub fn backend_id(&self, key: &BackendKey) -> Option<u32> {
        self.backends.get(key).copied()
    }
}

/// Maps in memory that count every write: for tests, and for simulated
/// nodes in benchmarks (the real sync path, no kernel calls).
#[derive(Debug, Default)]
pub struct MemoryMaps {
    pub config: Option<LbConfig>,
    pub addrs: BTreeSet<Ipv4Addr>,
    pub nat_interfaces: BTreeMap<u32, Ipv4Addr>,
    pub backends: BTreeMap<u32, Backend>,
    pub tables: BTreeMap<u32, Vec<u32>>,
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub writes: usize,
}

impl LbMaps for MemoryMaps {
    fn set_config(&mut self, c: &LbConfig) -> Result<(), SyncError> {
        self.writes += 1;
        self.config = Some(*c);
        Ok(())
    }
    fn add_node_addr(&mut self, a: Ipv4Addr) -> Result<(), SyncError> {
        self.writes += 1;
        self.addrs.insert(a);
        Ok(())
    }
    fn remove_node_addr(&mut self, a: Ipv4Addr) -> Result<(), SyncError> {
        self.writes += 1;
        self.addrs.remove(&a);
        Ok(())
    }
    fn set_nat_interface(&mut self, i: u32, a: Option<Ipv4Addr>) -> Result<(), SyncError> {
        self.writes += 1;
        match a {
            Some(a) => self.nat_interfaces.insert(i, a),
            None => self.nat_interfaces.remove(&i),
        };
        Ok(())
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), SyncError> {
        self.writes += 1;
        self.backends.insert(id, *b);
        Ok(())
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), SyncError> {
        self.writes += 1;
        self.backends.remove(&id);
        Ok(())
    }
    fn swap_table(&mut self, id: u32, t: &[u32]) -> Result<(), SyncError> {
        self.writes += 1;
        self.tables.insert(id, t.to_vec());
        Ok(())
    }
    fn set_frontend(&mut self, k: &FrontendKey, f: &Frontend) -> Result<(), SyncError> {
        self.writes += 1;
        self.frontends.insert(*k, *f);
        Ok(())
    }
    fn remove_frontend(&mut self, k: &FrontendKey) -> Result<(), SyncError> {
        self.writes += 1;
        self.frontends.remove(k);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type FakeMaps = MemoryMaps;

    fn service(id: u32, port: u16, backends: &[(u8, u32)]) -> ServiceSpec {
        ServiceSpec {
            id,
            name: format!("svc{id}"),
            frontends: vec![FrontendSpec {
                address: None,
                port,
                protocol: Protocol::Tcp,
            }],
            backends: backends
                .iter()
                .map(|&(last, weight)| BackendSpec {
                    address: Ipv4Addr::new(10, 0, 0, last),
                    port: 80,
                    weight,
                })
                .collect(),
            table_size: 251,
        }
    }

    fn spec(services: Vec<ServiceSpec>) -> LbSpec {
        LbSpec {
            nat_address: Ipv4Addr::new(198, 18, 0, 1),
            node_addresses: vec![Ipv4Addr::new(198, 18, 0, 1)],
            nat_port_min: DEFAULT_NAT_PORT_MIN,
            nat_port_count: DEFAULT_NAT_PORT_COUNT,
            services,
            nat_interfaces: BTreeMap::new(),
        }
    }

    #[test]
    fn applying_the_same_state_twice_writes_nothing() {
        let s = spec(vec![
            service(1, 8080, &[(1, 1), (2, 1)]),
            service(2, 9090, &[(3, 1)]),
        ]);
        let mut maps = FakeMaps::default();
        let mut sync = LbSync::new();
        let first = sync.apply(&s, &mut maps).unwrap();
        assert_eq!(first.table_swaps, 2);
        assert_eq!(first.backend_writes, 3);
        assert_eq!(sync.apply(&s, &mut maps).unwrap().total(), 0);
        assert_eq!(maps.frontends.len(), 2);
        // Every table slot names an installed backend.
        for t in maps.tables.values() {
            assert!(t.iter().all(|id| maps.backends.contains_key(id)));
        }
    }

    #[test]
    fn changing_one_service_touches_only_that_service() {
        let mut services: Vec<ServiceSpec> = (1..=50)
            .map(|i| service(i, 8000 + i as u16, &[(i as u8, 1)]))
            .collect();
        let mut maps = FakeMaps::default();
        let mut sync = LbSync::new();
        sync.apply(&spec(services.clone()), &mut maps).unwrap();
        services[7] = service(8, 8008, &[(8, 1), (200, 1)]);
        let report = sync.apply(&spec(services), &mut maps).unwrap();
        assert_eq!(
            report,
            ApplyReport {
                backend_writes: 1,
                table_swaps: 1,
                frontend_writes: 1,
                ..ApplyReport::default()
            }
        );
    }

    #[test]
    fn removed_backends_and_frontends_are_deleted_after_tables_stop_naming_them() {
        let mut maps = FakeMaps::default();
        let mut sync = LbSync::new();
        sync.apply(&spec(vec![service(1, 8080, &[(1, 1), (2, 1)])]), &mut maps)
            .unwrap();
        let r = sync
            .apply(&spec(vec![service(1, 8080, &[(1, 1)])]), &mut maps)
            .unwrap();
        assert_eq!((r.table_swaps, r.backend_removals), (1, 1));
        assert_eq!(maps.backends.len(), 1);
        let only = *maps.backends.keys().next().unwrap();
        assert!(
            maps.tables
                .values()
                .next()
                .unwrap()
                .iter()
                .all(|id| *id == only)
        );
        let r = sync.apply(&spec(vec![]), &mut maps).unwrap();
        assert_eq!((r.frontend_removals, r.backend_removals), (1, 1));
        assert!(maps.frontends.is_empty() && maps.backends.is_empty());
    }

    #[test]
    fn ids_are_reused_oldest_freed_first_and_run_out_cleanly() {
        let mut pool = IdPool::<4>::with_used([1]);
        // After the highest id in use, wrapping, skipping used ones.
        assert_eq!(
            [pool.allocate(), pool.allocate(), pool.allocate()],
            [Some(2), Some(3), Some(0)]
        );
        assert_eq!(pool.allocate(), None);
        pool.release(3);
        pool.release(1);
        pool.release(1); // twice: still free once
        assert_eq!(
            [pool.allocate(), pool.allocate(), pool.allocate()],
            [Some(3), Some(1), None]
        );
    }

    #[test]
    fn backend_ids_are_not_reused_immediately() {
        let mut maps = FakeMaps::default();
        let mut sync = LbSync::new();
        sync.apply(&spec(vec![service(1, 8080, &[(1, 1)])]), &mut maps)
            .unwrap();
        let first: Vec<u32> = maps.backends.keys().copied().collect();
        sync.apply(&spec(vec![service(1, 8080, &[(2, 1)])]), &mut maps)
            .unwrap();
        let second: Vec<u32> = maps.backends.keys().copied().collect();
        assert_ne!(first, second);
    }

    #[test]
    fn invalid_specs_change_nothing() {
        let mut maps = FakeMaps::default();
        let mut sync = LbSync::new();
        let good = spec(vec![service(1, 8080, &[(1, 1)])]);
        sync.apply(&good, &mut maps).unwrap();
        let writes = maps.writes;
        let mut dup = spec(vec![
            service(1, 8080, &[(1, 1)]),
            service(2, 8080, &[(2, 1)]),
        ]);
        assert!(matches!(
            sync.apply(&dup, &mut maps),
            Err(SyncError::Spec(SpecError::DuplicateFrontend { .. }))
        ));
        dup.services[1].frontends[0].port = 0;
        assert!(matches!(
            sync.apply(&dup, &mut maps),
            Err(SyncError::Spec(SpecError::ZeroPort { .. }))
        ));
        let mut bad_size = good.clone();
        bad_size.services[0].table_size = 100;
        assert!(sync.apply(&bad_size, &mut maps).is_err());
        let mut bad_nat = good.clone();
        bad_nat.nat_port_count = 0;
        assert!(sync.apply(&bad_nat, &mut maps).is_err());
        assert_eq!(maps.writes, writes, "a rejected spec wrote to the maps");
    }

    #[test]
    fn recovery_keeps_ids_and_rewrites_each_table_once() {
        let s = spec(vec![service(1, 8080, &[(1, 1), (2, 1)])]);
        let mut maps = FakeMaps::default();
        let mut sync = LbSync::new();
        sync.apply(&s, &mut maps).unwrap();
        let tables = maps.tables.clone();
        let backends = maps.backends.clone();
        let mut again = LbSync::recover(
            maps.config,
            maps.addrs.clone(),
            maps.nat_interfaces.clone(),
            maps.frontends.clone(),
            maps.backends
                .iter()
                .map(|(id, b)| (*id, BackendKey::from_map(b).unwrap())),
        );
        let r = again.apply(&s, &mut maps).unwrap();
        assert_eq!(r.backend_writes, 0, "backend ids survive a restart");
        assert_eq!(r.table_swaps, 1);
        assert_eq!(maps.tables, tables, "the rebuilt table is identical");
        assert_eq!(maps.backends, backends);
        assert_eq!(again.apply(&s, &mut maps).unwrap().total(), 0);
    }

    #[test]
    fn spec_parses_from_json() {
        let json = r#"{"nat_address":"198.18.0.1","node_addresses":["198.18.0.1"],
            "services":[{"id":1,"name":"web","frontends":[{"port":8080,"protocol":"tcp"}],
            "backends":[{"address":"198.19.1.2","port":80}]}]}"#;
        let s: LbSpec = serde_json::from_str(json).unwrap();
        assert_eq!(s.services[0].backends[0].weight, 1);
        assert_eq!(s.services[0].table_size, maglev::DEFAULT_TABLE_SIZE);
        assert_eq!(s.services[0].frontends[0].address, None);
        s.validate().unwrap();
        let err = serde_json::from_str::<LbSpec>(r#"{"nat_address":"nope"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid IPv4 address"), "{err}");
    }
}

/// Idle timeouts for the userspace conntrack sweeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// Established TCP. Swarm's IPVS cut idle flows at 900 s (moby #31208);
    /// we default to 2 h, like the kernel's own conntrack.
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_s: u64,
    /// TCP after a FIN or RST was seen.
    #[serde(default = "default_tcp_closing")]
    pub tcp_closing_s: u64,
    #[serde(default = "default_udp_idle")]
    pub udp_idle_s: u64,
}

fn default_tcp_idle() -> u64 {
    7200
}
fn default_tcp_closing() -> u64 {
    10
}
fn default_udp_idle() -> u64 {
    60
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_idle_s: default_tcp_idle(),
            tcp_closing_s: default_tcp_closing(),
            udp_idle_s: default_udp_idle(),
        }
    }
}

impl Timeouts {
    /// Whether a flow last seen at `last_seen_ns` (CLOCK_MONOTONIC, as
    /// bpf_ktime_get_ns) is idle past its timeout at `now_ns`.
    pub fn expired(&self, proto: u8, closing: bool, last_seen_ns: u64, now_ns: u64) -> bool {
        let timeout_s = match (Protocol::from_number(proto), closing) {
            (Some(Protocol::Tcp), false) => self.tcp_idle_s,
            (Some(Protocol::Tcp), true) => self.tcp_closing_s,
            _ => self.udp_idle_s,
        };
        now_ns.saturating_sub(last_seen_ns) > timeout_s.saturating_mul(1_000_000_000)
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn idle_tcp_survives_swarms_900_seconds() {
        let t = Timeouts::default();
        assert!(!t.expired(6, false, 0, 901 * S), "cut at Swarm's 900 s");
        assert!(!t.expired(6, false, 0, 7200 * S));
        assert!(t.expired(6, false, 0, 7201 * S));
    }

    #[test]
    fn closing_tcp_and_udp_expire_sooner() {
        let t = Timeouts::default();
        assert!(t.expired(6, true, 100 * S, 111 * S));
        assert!(!t.expired(17, false, 100 * S, 159 * S));
        assert!(t.expired(17, false, 100 * S, 161 * S));
        assert!(
            !t.expired(6, false, 500 * S, 100 * S),
            "a clock behind last_seen never expires"
        );
    }
}
