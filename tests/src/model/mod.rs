//! The reference model of what mesh's eBPF programs must do to a packet,
//! written plainly from the RFCs and the programs' contracts (not from
//! their code), for packet tests to compare the real programs against.
//!
//! - [`parse`]: what the parser makes of a frame (classes, outcome,
//!   offsets), which the XDP counters and the load balancer's gate follow;
//! - [`lb`]: `tc_lb`'s verdict, rewritten bytes and map changes, given
//!   the maps;
//! - [`reject`]: the answer of a frontend with no backend;
//! - [`csum`]: one's-complement checksums, whole and incremental.

pub mod csum;
pub mod lb;
pub mod parse;
mod reject;

pub use reject::reject;
