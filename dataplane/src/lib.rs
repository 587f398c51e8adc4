//! The node side of mesh: loads the eBPF programs, pins their maps under a
//! per-node bpffs directory, and reads them back. `meshd` is built from here.

pub mod bpffs;
mod compact;
pub mod dns;
pub mod ebpf;
pub mod inspect;
pub mod ipsec;
pub mod ipvs;
pub mod lb;
pub mod maglev;
pub mod netlink;
pub mod nft;
pub mod nlsock;
pub mod overlay;
#[cfg(test)]
mod spec_props;
pub mod stats;
pub mod tables;
