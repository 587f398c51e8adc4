//! Load-balancer state: the desired frontends and backends as plain Rust
//! values, and a sync engine that writes only the difference into the maps.
//!
//! Granularity: a backend entry is written when it is new; a frontend's
//! Maglev table is rebuilt and swapped in (one atomic map-of-maps update) only
//! when that frontend's backend set, weights or table size changed; unchanged
//! frontends cost nothing. Applying the same state twice makes no map writes.

mod maps;
mod memory;
mod spec;
mod sync;
mod target;
mod timeouts;

/// Map capacities the load balancer is sized by.
pub use dataplane_common::limits;
pub use maps::{LbMaps, SyncError};
pub use memory::MemoryMaps;
pub use spec::{
    BackendKey, BackendSpec, DEFAULT_NAT_PORT_COUNT, DEFAULT_NAT_PORT_MIN, FrontendSpec, LbSpec,
    Protocol, ServiceSpec, SpecError, frontend_key, validate_services,
};
pub use sync::{ApplyReport, LbChanges, LbSync};
pub use target::{Ebpf, LbTarget};
pub use timeouts::Timeouts;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod timeout_tests;
