//! `#[repr(C)]` map keys and values shared by `dataplane-ebpf` and userspace.
//!
//! Rules (see STYLE.md): no `bool`/`Option`/enums in map types, explicit `_pad`
//! fields, a `_be` suffix on network-byte-order fields, and a size assert per type.
#![no_std]

/// Map names as they appear in the eBPF object (and as pin file names).
pub mod maps {
    /// Per-CPU array of [`crate::Counter`], indexed by [`crate::proto`] class.
    pub const PROTO_STATS: &str = "PROTO_STATS";
    /// Per-CPU array of [`crate::Counter`], indexed by [`crate::outcome`].
    pub const OUTCOME_STATS: &str = "OUTCOME_STATS";

    /// Hash: [`crate::FrontendKey`] -> [`crate::Frontend`]; what the LB answers on.
    pub const FRONTENDS: &str = "FRONTENDS";
    /// Hash: backend id (u32) -> [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// Array of maps, indexed by frontend id: each inner map is that frontend's
    /// Maglev table (u32 backend ids). Swapping an inner map is one atomic update.
    pub const MAGLEV: &str = "MAGLEV";
    /// LRU hash: client->frontend [`crate::FlowKey`] -> [`crate::CtEntry`].
    pub const CONNTRACK: &str = "CONNTRACK";
    /// LRU hash: backend->NAT address [`crate::FlowKey`] -> [`crate::RevNat`].
    pub const REVNAT: &str = "REVNAT";
    /// Hash: a local address ([u32; 4]) -> 1. Wildcard frontends answer on these.
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    /// Array of one [`crate::LbConfig`].
    pub const LB_CONFIG: &str = "LB_CONFIG";
    /// Hash: ifindex (u32) -> the node's own address on that interface
    /// ([u32; 4]). A flow routed out of such an interface is NATed to that
    /// address (else to `LB_CONFIG.nat_addr`), and replies arriving on it
    /// to that address are reverse-NATed.
    pub const NAT_IFACES: &str = "NAT_IFACES";
    /// Per-CPU array of [`crate::LbCounter`], indexed by frontend id.
    pub const FRONTEND_STATS: &str = "FRONTEND_STATS";
    /// Per-CPU array of [`crate::LbCounter`], indexed by backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// Per-CPU array of one u64: the rate limit of rejects (a GCRA's
    /// theoretical arrival time, ns).
    pub const REJECT_BUDGET: &str = "REJECT_BUDGET";

    /// Every map the object defines; a packet test checks each one resolves.
    pub const ALL: &[&str] = &[
        PROTO_STATS,
        OUTCOME_STATS,
        FRONTENDS,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        REVNAT,
        NODE_ADDRS,
        LB_CONFIG,
        NAT_IFACES,
        FRONTEND_STATS,
        BACKEND_STATS,
        REJECT_BUDGET,
    ];
}

/// Map capacities. Ids index arrays, so they are small integers chosen by userspace.
pub mod limits {
    /// Frontend ids are 0..MAX_FRONTENDS (also the MAGLEV outer size). A
    /// node holds two any-port frontends (TCP, UDP) per VIP on each network
    /// it is on, plus one per published port: 10,000 services with a VIP and
    /// a published port each fit.
    pub const MAX_FRONTENDS: u32 = 32768;
    /// Backend ids are 0..N, where N is the capacity of BACKENDS and
    /// BACKEND_STATS: this compiled default (Cilium's `bpf-lb-map-max`), or
    /// what meshd's `--lb-backends` sets at load, up to [`BACKENDS_LIMIT`].
    /// A backend is address, port and protocol: a task behind a VIP and a
    /// published port is two.
    pub const BACKENDS_DEFAULT: u32 = 65536;
    /// The largest backend capacity meshd loads (BACKEND_STATS is per CPU:
    /// 16 bytes per backend per CPU).
    pub const BACKENDS_LIMIT: u32 = 1 << 20;
    /// Largest Maglev table (the inner map template's size).
    pub const MAGLEV_MAX: u32 = 65521;
    pub const CONNTRACK_MAX: u32 = 262144;
    pub const NODE_ADDRS_MAX: u32 = 64;
    /// Interfaces with their own NAT address (one per overlay network).
    pub const NAT_IFACES_MAX: u32 = 1024;
}

/// Program names as they appear in the eBPF object.
pub mod programs {
    /// XDP: parses every packet, counts it, passes it.
    pub const XDP_PARSE: &str = "xdp_parse";
    /// XDP: returns XDP_PASS and nothing else; the benchmark baseline.
    pub const XDP_PASS: &str = "xdp_pass";
    /// TC ingress: the L4 load balancer (published ports, NAT, conntrack).
    pub const TC_LB: &str = "tc_lb";
}

/// Packets and bytes: the value of every per-CPU counter slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

#[cfg(feature = "user")]
// SAFETY: `Counter` is `repr(C)`, has no padding and every bit pattern is valid.
unsafe impl aya::Pod for Counter {}

impl Counter {
    pub const fn add(self, other: Counter) -> Counter {
        Counter {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// Protocol classes counted by the parser. A packet counts once in its L3 class
/// (non-IP, IPv4, IPv6), once more in its L4 class when the IP header names one,
/// and in `VLAN` when it carried at least one 802.1Q/802.1ad tag.
pub mod proto {
    pub const NON_IP: u32 = 0;
    pub const IPV4: u32 = 1;
    pub const IPV6: u32 = 2;
    pub const TCP: u32 = 3;
    pub const UDP: u32 = 4;
    pub const ICMP: u32 = 5;
    pub const ICMPV6: u32 = 6;
    /// IP with any other next protocol (GRE, SCTP, ESP, ...).
    pub const OTHER_L4: u32 = 7;
    pub const VLAN: u32 = 8;
    pub const COUNT: u32 = 9;

    pub const NAMES: [&str; COUNT as usize] = [
        "non-ip", "ipv4", "ipv6", "tcp", "udp", "icmp", "icmpv6", "other-l4", "vlan",
    ];
}

/// How parsing ended; every packet counts in exactly one outcome.
pub mod outcome {
    /// Every header up to and including L4 was present and well-formed
    /// (or the packet is not IP, and its Ethernet header was complete).
    pub const PARSED: u32 = 0;
    /// A header the previous one announced does not fit in the frame (or in
    /// the IP total length).
    pub const TRUNCATED: u32 = 1;
    /// A header is present but inconsistent: bad version, IHL < 5, TCP data
    /// offset < 5, a length field shorter than its header, or more IPv6
    /// extension headers than the parser walks.
    pub const MALFORMED: u32 = 2;
    /// An IP fragment. A first fragment has its L4 header parsed; a later one
    /// has none. Either way its payload is incomplete, so it is never rewritten.
    pub const FRAGMENT: u32 = 3;
    pub const COUNT: u32 = 4;

    pub const NAMES: [&str; COUNT as usize] = ["parsed", "truncated", "malformed", "fragment"];
}

/// Address family tags used in keys (`AF_INET`/`AF_INET6` values).
pub const FAMILY_V4: u8 = 2;
pub const FAMILY_V6: u8 = 10;

/// What the load balancer answers on. `addr` all-zero is the wildcard: every
/// address in `NODE_ADDRS` (a published port). IPv4 uses `addr[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    /// Network byte order words.
    pub addr_be: [u32; 4],
    pub port_be: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 20);

/// A frontend: its id (stats and Maglev slot) and its service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    pub id: u32,
    pub service_id: u32,
    /// Live backends; 0 means "answer nothing" (packets are dropped and counted).
    pub backend_count: u32,
    /// Size of this frontend's Maglev table (prime).
    pub table_size: u32,
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Frontend>() == 24);

/// A backend task: where flows are sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub family: u8,
    /// IPPROTO_TCP or IPPROTO_UDP (the frontends' protocol).
    pub proto: u8,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// A flow as seen on the wire (source first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr_be: [u32; 4],
    pub daddr_be: [u32; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Conntrack flag: a FIN or RST was seen, so the flow expires quickly.
pub const CT_F_CLOSING: u32 = 1;

/// Conntrack entry for a client->frontend flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub backend_id: u32,
    pub frontend_id: u32,
    /// The source we NATed to (node mesh address and port).
    pub nat_addr_be: [u32; 4],
    pub nat_port_be: u16,
    pub _pad: u16,
    pub flags: u32,
    /// bpf_ktime_get_ns() of the last packet in either direction.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 40);

/// Reverse NAT entry, keyed by the reply's flow (backend -> NAT address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    pub client_addr_be: [u32; 4],
    pub frontend_addr_be: [u32; 4],
    pub client_port_be: u16,
    pub frontend_port_be: u16,
    pub flags: u32,
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RevNat>() == 48);

/// Node-wide load-balancer settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Source address for NATed flows (the node's mesh address); 0 disables the LB.
    pub nat_addr_be: [u32; 4],
    /// First port of the SNAT range, host order.
    pub nat_port_min: u16,
    /// Number of ports in the SNAT range.
    pub nat_port_count: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<LbConfig>() == 24);

/// Per-frontend / per-backend traffic counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbCounter {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Packets answered with a TCP RST or an ICMP port unreachable (a
    /// frontend with no backend).
    pub rejected: u64,
}
const _: () = assert!(core::mem::size_of::<LbCounter>() == 32);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), padding is explicit, any bit pattern is valid.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::Frontend {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::LbCounter {}
}
