//! Test harness for mesh's privileged tiers.
//!
//! - [`skip`]: the guard every privileged test starts with; skips are printed
//!   and recorded so `cargo xtask test` can count them.
//! - [`netns`]: network namespaces, hosts and the underlay topology builder.

pub mod capture;
pub mod figures;
pub mod frames;
pub mod meshd;
pub mod model;
pub mod netns;
mod runlog;
pub mod services;
pub mod skip;

pub use netns::{ChildGuard, Host, Netns, Task, Topology};
pub use skip::{Skip, require_root};
