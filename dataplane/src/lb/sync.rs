//! [`LbSync`]: what is in the maps now, and the engine that writes only the
//! difference to a new spec (whole, or a change to some services). Ids are
//! handed out oldest-freed first and survive a restart.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::Ipv4Addr,
};

use dataplane_common::{Frontend, FrontendKey, LbConfig, limits};

use super::{
    maps::{LbMaps, SyncError},
    spec::{
        BackendKey, FrontendSpec, LbSpec, Protocol, ServiceSpec, SpecError, backend_key,
        frontend_key, validate_services,
    },
};
use crate::maglev::{self, NO_BACKEND, Weighted};

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

/// Ids `0..max`: first every id never used, in order from after the
/// highest one in use; then freed ids, oldest-freed first. A freed id is
/// reused as late as possible (a stale conntrack entry does not find a
/// *different* entry under its old id). Nothing is kept per free id: a
/// pool sized for a million backends costs what it holds, and each id is
/// scanned past at most once (amortised O(1) per allocation).
#[derive(Debug)]
pub(super) struct IdPool {
    max: u32,
    used: HashSet<u32>,
    /// Where the scan of never-used ids started, and how far it got.
    start: u32,
    scanned: u32,
    /// Released ids the scan has passed, oldest first (one the scan has not
    /// reached yet is found by it).
    freed: VecDeque<u32>,
}

impl IdPool {
    /// A pool of `0..max` with `used` taken; new ids start after the
    /// highest of them.
    pub(super) fn with_used(max: u32, used: impl IntoIterator<Item = u32>) -> Self {
        let used: HashSet<u32> = used.into_iter().filter(|id| *id < max).collect();
        IdPool {
            max,
            start: used.iter().max().map_or(0, |m| (m + 1) % max.max(1)),
            scanned: 0,
            used,
            freed: VecDeque::new(),
        }
    }

    pub(super) fn capacity(&self) -> u32 {
        self.max
    }

    pub(super) fn allocate(&mut self) -> Option<u32> {
        while self.scanned < self.max {
            let id =
                ((u64::from(self.start) + u64::from(self.scanned)) % u64::from(self.max)) as u32;
            self.scanned += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        while let Some(id) = self.freed.pop_front() {
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }

    pub(super) fn release(&mut self, id: u32) {
        if !self.used.remove(&id) {
            return;
        }
        let offset = (u64::from(id) + u64::from(self.max) - u64::from(self.start))
            % u64::from(self.max.max(1));
        if offset < u64::from(self.scanned) {
            self.freed.push_back(id);
        }
    }
}

/// What is in the maps now, as far as this process knows.
#[derive(Debug)]
pub struct LbSync {
    config: Option<LbConfig>,
    node_addrs: BTreeSet<Ipv4Addr>,
    nat_interfaces: BTreeMap<u32, Ipv4Addr>,
    // Hash maps: a node holds thousands of frontends, and one change looks
    // a few of them up (fewer cache misses than a B-tree's levels).
    frontends: HashMap<FrontendKey, InstalledFrontend>,
    frontend_ids: IdPool,
    backends: HashMap<BackendKey, u32>,
    /// Its capacity is the BACKENDS map's.
    backend_ids: IdPool,
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

impl Default for LbSync {
    fn default() -> Self {
        LbSync::with_backends(limits::BACKENDS_DEFAULT)
    }
}

impl LbSync {
    pub fn new() -> LbSync {
        LbSync::default()
    }

    /// An empty load balancer whose BACKENDS map holds `capacity` entries.
    pub fn with_backends(capacity: u32) -> LbSync {
        LbSync::recover(None, [], [], [], [], capacity)
    }

    /// How many backends the maps hold at most.
    pub fn backend_capacity(&self) -> u32 {
        self.backend_ids.capacity()
    }

    /// Refuses, before anything is written, a change whose backends would
    /// not fit. New backends are written before the old ones go (a table
    /// never names a missing one), so the installed and the new must fit
    /// together.
    fn check_capacity(&self, want: &BTreeMap<FrontendKey, Desired>) -> Result<(), SpecError> {
        let new: HashSet<&BackendKey> = want
            .values()
            .flat_map(|d| &d.backends)
            .map(|(k, _)| k)
            .filter(|k| !self.backends.contains_key(*k))
            .collect();
        let count = self.backends.len() + new.len();
        let max = self.backend_capacity();
        if count > max as usize {
            return Err(SpecError::BackendCapacity { count, max });
        }
        Ok(())
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
        backend_capacity: u32,
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
            frontend_ids: IdPool::with_used(
                limits::MAX_FRONTENDS,
                frontends.values().map(|f| f.id),
            ),
            frontends,
            backend_ids: IdPool::with_used(backend_capacity, backends.values().copied()),
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
        let want = desired(&spec.services);
        self.check_capacity(&want)?;
        let mut report = ApplyReport::default();
        self.apply_globals(spec, maps, &mut report)?;
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
        self.check_capacity(&want)?;
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
                    // Checked before: out of ids only if that check is wrong.
                    let id = self
                        .backend_ids
                        .allocate()
                        .ok_or(SpecError::BackendCapacity {
                            count: self.backends.len() + 1,
                            max: self.backend_ids.capacity(),
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
