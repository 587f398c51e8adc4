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

    /// Every map the object defines; a packet test checks each one resolves.
    pub const ALL: &[&str] = &[PROTO_STATS, OUTCOME_STATS];
}

/// Program names as they appear in the eBPF object.
pub mod programs {
    /// XDP: parses every packet, counts it, passes it.
    pub const XDP_PARSE: &str = "xdp_parse";
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
