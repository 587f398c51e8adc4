//! Bounds-checked packet parser shared by every program: Ethernet, up to two
//! VLAN tags, IPv4 (with options), IPv6 (walking extension headers), and the
//! first bytes of TCP, UDP, ICMP and ICMPv6.
//!
//! The parser never fails: it always returns a [`Parsed`] whose `outcome` says
//! how far it got. Only `outcome::PARSED` packets may be rewritten by a caller;
//! first fragments (`outcome::FRAGMENT` with `l4_off != 0`) carry ports too.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};
use dataplane_common::{outcome, proto};

/// A program context that exposes linear packet data.
pub trait Packet {
    /// Start of the linear (directly readable) data.
    fn data(&self) -> usize;
    /// End of the linear data; headers must lie before it.
    fn data_end(&self) -> usize;
    /// Length of the whole frame, including data beyond `data_end` (an skb's
    /// paged fragments). IP lengths are checked against this.
    fn frame_len(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        XdpContext::data_end(self) - XdpContext::data(self)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// `l4_class` when the packet names no L4 protocol (non-IP).
pub const NO_CLASS: u32 = u32::MAX;
/// How many IPv6 extension headers the parser walks before calling it malformed.
pub const MAX_IPV6_EXT: usize = 6;
/// Headers must start within this many bytes of the frame start; keeps every
/// packet-pointer offset small and provably bounded for the verifier.
pub const MAX_HDR_OFF: usize = 512;

pub const FRAG_NONE: u8 = 0;
/// First fragment: L4 header present, payload continues in later fragments.
pub const FRAG_FIRST: u8 = 1;
/// Non-first fragment: no L4 header.
pub const FRAG_LATER: u8 = 2;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto_be: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci_be: u16,
    pub proto_be: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check_be: u16,
    pub saddr_be: u32,
    pub daddr_be: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow_be: u32,
    pub payload_len_be: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[repr(C)]
pub struct Ipv6ExtHdr {
    pub nexthdr: u8,
    pub hdrlen: u8,
}

#[repr(C)]
pub struct Ipv6FragHdr {
    pub nexthdr: u8,
    pub reserved: u8,
    pub frag_off_be: u16,
    pub id_be: u32,
}

#[repr(C)]
pub struct TcpHdr {
    pub source_be: u16,
    pub dest_be: u16,
    pub seq_be: u32,
    pub ack_seq_be: u32,
    /// Data offset (high nibble) and reserved bits.
    pub doff_res: u8,
    pub flags: u8,
    pub window_be: u16,
    pub check_be: u16,
    pub urg_ptr_be: u16,
}

#[repr(C)]
pub struct UdpHdr {
    pub source_be: u16,
    pub dest_be: u16,
    pub len_be: u16,
    pub check_be: u16,
}

/// ICMP and ICMPv6 share this 8-byte layout (type, code, checksum, rest).
#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check_be: u16,
    /// Echo identifier for echo request/reply; other data otherwise.
    pub id_be: u16,
    pub seq_be: u16,
}

/// What the parser learned about one packet. Offsets are from the frame start.
#[derive(Clone, Copy)]
pub struct Parsed {
    pub outcome: u32,
    /// `proto::NON_IP`, `proto::IPV4` or `proto::IPV6`.
    pub l3_class: u32,
    /// `proto::{TCP,UDP,ICMP,ICMPV6,OTHER_L4}`, or [`NO_CLASS`].
    pub l4_class: u32,
    /// EtherType after any VLAN tags, host order.
    pub ethertype: u16,
    pub vlan_tags: u8,
    /// L4 protocol number (IPv6: after extension headers).
    pub ip_proto: u8,
    pub frag: u8,
    pub l3_off: u16,
    /// Start of the L4 header; 0 when no L4 header was parsed.
    pub l4_off: u16,
    /// End of the IP datagram (frame padding excluded).
    pub l3_end: u16,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// TCP/UDP ports, or the ICMP echo id in `sport_be`; network order.
    pub sport_be: u16,
    pub dport_be: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
}

impl Parsed {
    const fn new() -> Self {
        Parsed {
            outcome: outcome::PARSED,
            l3_class: proto::NON_IP,
            l4_class: NO_CLASS,
            ethertype: 0,
            vlan_tags: 0,
            ip_proto: 0,
            frag: FRAG_NONE,
            l3_off: 0,
            l4_off: 0,
            l3_end: 0,
            saddr: [0; 4],
            daddr: [0; 4],
            sport_be: 0,
            dport_be: 0,
            tcp_flags: 0,
            icmp_type: 0,
        }
    }

    #[inline(always)]
    fn end(mut self, outcome: u32) -> Self {
        self.outcome = outcome;
        self
    }
}

/// A pointer to a `T` at `off`, if the whole `T` lies inside the frame.
#[inline(always)]
pub fn ptr_at<T, C: Packet>(ctx: &C, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if off > MAX_HDR_OFF || start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

#[inline(always)]
pub fn parse<C: Packet>(ctx: &C) -> Parsed {
    let mut p = Parsed::new();
    let Some(eth) = ptr_at::<EthHdr, C>(ctx, 0) else {
        return p.end(outcome::TRUNCATED);
    };
    // SAFETY: ptr_at checked the header lies inside the packet.
    let mut ethertype = u16::from_be(unsafe { (*eth).proto_be });
    let mut off = size_of::<EthHdr>();
    // Two tags cover 802.1Q and QinQ (802.1ad outer + 802.1Q inner).
    for _ in 0..2 {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(vlan) = ptr_at::<VlanHdr, C>(ctx, off) else {
            return p.end(outcome::TRUNCATED);
        };
        // SAFETY: bounds checked by ptr_at.
        ethertype = u16::from_be(unsafe { (*vlan).proto_be });
        off += size_of::<VlanHdr>();
        p.vlan_tags += 1;
    }
    p.ethertype = ethertype;
    p.l3_off = off as u16;
    let frame_len = ctx.frame_len();
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, p, off, frame_len),
        ETH_P_IPV6 => parse_ipv6(ctx, p, off, frame_len),
        // Still tagged after two VLAN headers: we do not walk deeper stacks.
        ETH_P_8021Q | ETH_P_8021AD => p.end(outcome::MALFORMED),
        _ => p,
    }
}

#[inline(always)]
fn parse_ipv4<C: Packet>(ctx: &C, mut p: Parsed, off: usize, frame_len: usize) -> Parsed {
    p.l3_class = proto::IPV4;
    let Some(ip) = ptr_at::<Ipv4Hdr, C>(ctx, off) else {
        return p.end(outcome::TRUNCATED);
    };
    // SAFETY: bounds checked by ptr_at.
    let (version_ihl, tot_len, frag_off, protocol, saddr, daddr) = unsafe {
        (
            (*ip).version_ihl,
            u16::from_be((*ip).tot_len_be) as usize,
            u16::from_be((*ip).frag_off_be),
            (*ip).protocol,
            (*ip).saddr_be,
            (*ip).daddr_be,
        )
    };
    p.ip_proto = protocol;
    p.l4_class = l4_class(protocol);
    p.saddr[0] = saddr;
    p.daddr[0] = daddr;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4Hdr>() || tot_len < ihl {
        return p.end(outcome::MALFORMED);
    }
    if off + ihl > frame_len || off + tot_len > frame_len {
        return p.end(outcome::TRUNCATED);
    }
    p.l3_end = (off + tot_len) as u16;
    if frag_off & 0x1fff != 0 {
        p.frag = FRAG_LATER;
        return p.end(outcome::FRAGMENT);
    }
    if frag_off & 0x2000 != 0 {
        p.frag = FRAG_FIRST;
    }
    parse_l4(ctx, p, off + ihl, off + tot_len)
}

#[inline(always)]
fn parse_ipv6<C: Packet>(ctx: &C, mut p: Parsed, off: usize, frame_len: usize) -> Parsed {
    p.l3_class = proto::IPV6;
    let Some(ip) = ptr_at::<Ipv6Hdr, C>(ctx, off) else {
        return p.end(outcome::TRUNCATED);
    };
    // SAFETY: bounds checked by ptr_at.
    let (vtc_flow, payload_len, mut nexthdr) = unsafe {
        (
            u32::from_be((*ip).vtc_flow_be),
            u16::from_be((*ip).payload_len_be) as usize,
            (*ip).nexthdr,
        )
    };
    // SAFETY: bounds checked by ptr_at; [u8; 16] has no alignment needs.
    let (saddr, daddr) = unsafe { ((*ip).saddr, (*ip).daddr) };
    p.saddr = words(saddr);
    p.daddr = words(daddr);
    if vtc_flow >> 28 != 6 {
        p.l4_class = l4_class(nexthdr);
        return p.end(outcome::MALFORMED);
    }
    let l3_end = off + size_of::<Ipv6Hdr>() + payload_len;
    if l3_end > frame_len {
        p.l4_class = l4_class(nexthdr);
        return p.end(outcome::TRUNCATED);
    }
    p.l3_end = l3_end as u16;
    let mut off = off + size_of::<Ipv6Hdr>();
    let mut walked = 0;
    while walked < MAX_IPV6_EXT {
        let current = nexthdr;
        let len = match current {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH => {
                let Some(ext) = ptr_at::<Ipv6ExtHdr, C>(ctx, off) else {
                    return p.end(outcome::TRUNCATED);
                };
                // SAFETY: bounds checked by ptr_at.
                let (next, hdrlen) = unsafe { ((*ext).nexthdr, (*ext).hdrlen as usize) };
                nexthdr = next;
                if current == IPPROTO_AH {
                    (hdrlen + 2) * 4
                } else {
                    (hdrlen + 1) * 8
                }
            }
            IPPROTO_FRAGMENT => {
                let Some(frag) = ptr_at::<Ipv6FragHdr, C>(ctx, off) else {
                    return p.end(outcome::TRUNCATED);
                };
                // SAFETY: bounds checked by ptr_at.
                let (next, frag_off) =
                    unsafe { ((*frag).nexthdr, u16::from_be((*frag).frag_off_be)) };
                nexthdr = next;
                if frag_off & 0xfff8 != 0 {
                    p.frag = FRAG_LATER;
                } else if frag_off & 1 != 0 {
                    p.frag = FRAG_FIRST;
                }
                size_of::<Ipv6FragHdr>()
            }
            _ => break,
        };
        off += len;
        if off > l3_end {
            p.l4_class = l4_class(nexthdr);
            return p.end(outcome::TRUNCATED);
        }
        if p.frag == FRAG_LATER {
            p.l4_class = l4_class(nexthdr);
            return p.end(outcome::FRAGMENT);
        }
        walked += 1;
    }
    p.ip_proto = nexthdr;
    p.l4_class = l4_class(nexthdr);
    if walked == MAX_IPV6_EXT && is_ipv6_ext(nexthdr) {
        return p.end(outcome::MALFORMED);
    }
    parse_l4(ctx, p, off, l3_end)
}

#[inline(always)]
fn parse_l4<C: Packet>(ctx: &C, mut p: Parsed, off: usize, l3_end: usize) -> Parsed {
    p.l4_off = off as u16;
    let done = if p.frag == FRAG_FIRST {
        outcome::FRAGMENT
    } else {
        outcome::PARSED
    };
    match p.ip_proto {
        IPPROTO_TCP => {
            let Some(tcp) = ptr_at::<TcpHdr, C>(ctx, off) else {
                return truncated_l4(p);
            };
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport, doff_res, flags) = unsafe {
                (
                    (*tcp).source_be,
                    (*tcp).dest_be,
                    (*tcp).doff_res,
                    (*tcp).flags,
                )
            };
            let doff = ((doff_res >> 4) as usize) * 4;
            if off + size_of::<TcpHdr>() > l3_end {
                return truncated_l4(p);
            }
            if doff < size_of::<TcpHdr>() {
                return p.end(outcome::MALFORMED);
            }
            if off + doff > l3_end {
                return truncated_l4(p);
            }
            p.sport_be = sport;
            p.dport_be = dport;
            p.tcp_flags = flags;
            p.end(done)
        }
        IPPROTO_UDP => {
            let Some(udp) = ptr_at::<UdpHdr, C>(ctx, off) else {
                return truncated_l4(p);
            };
            // SAFETY: bounds checked by ptr_at.
            let (sport, dport, len) = unsafe {
                (
                    (*udp).source_be,
                    (*udp).dest_be,
                    u16::from_be((*udp).len_be) as usize,
                )
            };
            if off + size_of::<UdpHdr>() > l3_end {
                return truncated_l4(p);
            }
            if len < size_of::<UdpHdr>() {
                return p.end(outcome::MALFORMED);
            }
            // A first fragment's UDP length covers the whole datagram.
            if p.frag == FRAG_NONE && off + len > l3_end {
                return truncated_l4(p);
            }
            p.sport_be = sport;
            p.dport_be = dport;
            p.end(done)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let Some(icmp) = ptr_at::<IcmpHdr, C>(ctx, off) else {
                return truncated_l4(p);
            };
            if off + size_of::<IcmpHdr>() > l3_end {
                return truncated_l4(p);
            }
            // SAFETY: bounds checked by ptr_at.
            let (kind, id) = unsafe { ((*icmp).kind, (*icmp).id_be) };
            p.icmp_type = kind;
            p.sport_be = id;
            p.end(done)
        }
        // Unknown L4: nothing more to check.
        _ => p.end(done),
    }
}

#[inline(always)]
fn truncated_l4(mut p: Parsed) -> Parsed {
    p.l4_off = 0;
    p.end(outcome::TRUNCATED)
}

#[inline(always)]
fn l4_class(protocol: u8) -> u32 {
    match protocol {
        IPPROTO_TCP => proto::TCP,
        IPPROTO_UDP => proto::UDP,
        IPPROTO_ICMP => proto::ICMP,
        IPPROTO_ICMPV6 => proto::ICMPV6,
        _ => proto::OTHER_L4,
    }
}

#[inline(always)]
fn is_ipv6_ext(nexthdr: u8) -> bool {
    matches!(
        nexthdr,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_AH | IPPROTO_FRAGMENT
    )
}

#[inline(always)]
fn words(addr: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}
