//! [`MemoryMaps`]: load-balancer maps in memory that count every write.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use dataplane_common::{Backend, Frontend, FrontendKey, LbConfig};

use super::maps::{LbMaps, SyncError};

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
