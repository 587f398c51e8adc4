//! [`LbTarget`]: where a load-balancer spec goes. [`Ebpf`] is the eBPF maps
//! through their sync engine; `crate::ipvs::WithIpvs` is the other.

use super::{
    maps::{LbMaps, SyncError},
    spec::LbSpec,
    sync::{ApplyReport, LbChanges, LbSync},
};

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
