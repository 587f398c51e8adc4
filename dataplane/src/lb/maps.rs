//! The map operations the sync engine needs ([`LbMaps`]), and the error of
//! a write that failed.

use std::net::Ipv4Addr;

use dataplane_common::{Backend, Frontend, FrontendKey, LbConfig};

use super::spec::SpecError;

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
