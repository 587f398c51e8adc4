//! What the parser must make of a frame: the protocol classes it counts,
//! the outcome, and the offsets and fields the load balancer reads.
//!
//! The contract: up to two VLAN tags (802.1Q, 802.1ad); IPv4 needs version
//! 4, IHL >= 5 and a total length >= IHL (else malformed) inside the frame
//! (else truncated); a non-first fragment ends there, a first one parses
//! its L4 header but counts as a fragment; IPv6 walks up to 6 extension
//! headers. TCP needs its 20 bytes and a data offset >= 5 within the
//! datagram, UDP its 8 bytes and a length >= 8 within it (a first fragment
//! excepted), ICMP 8 bytes. No header may start past 512 bytes.

pub const NON_IP: u32 = 0;
pub const IPV4: u32 = 1;
pub const IPV6: u32 = 2;
pub const TCP: u32 = 3;
pub const UDP: u32 = 4;
pub const ICMP: u32 = 5;
pub const ICMPV6: u32 = 6;
pub const OTHER_L4: u32 = 7;
pub const VLAN: u32 = 8;

pub const PARSED: u32 = 0;
pub const TRUNCATED: u32 = 1;
pub const MALFORMED: u32 = 2;
pub const FRAGMENT: u32 = 3;

const MAX_HDR_OFF: usize = 512;
const MAX_IPV6_EXT: usize = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Frag {
    #[default]
    None,
    First,
    Later,
}

/// What the parser found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub outcome: u32,
    pub l3_class: u32,
    /// `None`: no L4 class counted.
    pub l4_class: Option<u32>,
    pub ethertype: u16,
    pub vlan_tags: u8,
    pub ip_proto: u8,
    pub frag: Frag,
    pub l3_off: usize,
    /// 0 when no L4 header was parsed.
    pub l4_off: usize,
    pub l3_end: usize,
    /// IPv4 addresses (bytes as on the wire).
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
}

fn class(proto: u8) -> u32 {
    match proto {
        6 => TCP,
        17 => UDP,
        1 => ICMP,
        58 => ICMPV6,
        _ => OTHER_L4,
    }
}

/// Whether `len` bytes at `off` lie inside the frame and may be read.
fn fits(frame: &[u8], off: usize, len: usize) -> bool {
    off <= MAX_HDR_OFF && off + len <= frame.len()
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub fn parse(frame: &[u8]) -> Parsed {
    let mut p = Parsed {
        outcome: PARSED,
        l3_class: NON_IP,
        l4_class: None,
        ethertype: 0,
        vlan_tags: 0,
        ip_proto: 0,
        frag: Frag::None,
        l3_off: 0,
        l4_off: 0,
        l3_end: 0,
        saddr: [0; 4],
        daddr: [0; 4],
        sport: 0,
        dport: 0,
        tcp_flags: 0,
    };
    if !fits(frame, 0, 14) {
        p.outcome = TRUNCATED;
        return p;
    }
    let mut ethertype = be16(frame, 12);
    let mut off = 14;
    for _ in 0..2 {
        if ethertype != 0x8100 && ethertype != 0x88a8 {
            break;
        }
        if !fits(frame, off, 4) {
            p.outcome = TRUNCATED;
            return p;
        }
        ethertype = be16(frame, off + 2);
        off += 4;
        p.vlan_tags += 1;
    }
    p.ethertype = ethertype;
    p.l3_off = off;
    match ethertype {
        0x0800 => ipv4(frame, p, off),
        0x86dd => ipv6(frame, p, off),
        0x8100 | 0x88a8 => {
            p.outcome = MALFORMED;
            p
        }
        _ => p,
    }
}

fn ipv4(frame: &[u8], mut p: Parsed, off: usize) -> Parsed {
    p.l3_class = IPV4;
    if !fits(frame, off, 20) {
        p.outcome = TRUNCATED;
        return p;
    }
    let ip = &frame[off..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    let frag = be16(ip, 6);
    p.ip_proto = ip[9];
    p.l4_class = Some(class(ip[9]));
    p.saddr.copy_from_slice(&ip[12..16]);
    p.daddr.copy_from_slice(&ip[16..20]);
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl {
        p.outcome = MALFORMED;
        return p;
    }
    if off + ihl > frame.len() || off + total > frame.len() {
        p.outcome = TRUNCATED;
        return p;
    }
    p.l3_end = off + total;
    if frag & 0x1fff != 0 {
        p.frag = Frag::Later;
        p.outcome = FRAGMENT;
        return p;
    }
    if frag & 0x2000 != 0 {
        p.frag = Frag::First;
    }
    l4(frame, p, off + ihl, off + total)
}

fn ipv6(frame: &[u8], mut p: Parsed, off: usize) -> Parsed {
    p.l3_class = IPV6;
    if !fits(frame, off, 40) {
        p.outcome = TRUNCATED;
        return p;
    }
    let ip = &frame[off..];
    let mut next = ip[6];
    if ip[0] >> 4 != 6 {
        p.l4_class = Some(class(next));
        p.outcome = MALFORMED;
        return p;
    }
    let l3_end = off + 40 + usize::from(be16(ip, 4));
    if l3_end > frame.len() {
        p.l4_class = Some(class(next));
        p.outcome = TRUNCATED;
        return p;
    }
    p.l3_end = l3_end;
    let mut off = off + 40;
    let mut walked = 0;
    while walked < MAX_IPV6_EXT {
        let len = match next {
            0 | 43 | 60 | 51 => {
                if !fits(frame, off, 2) {
                    p.outcome = TRUNCATED;
                    return p;
                }
                let (n, hdrlen) = (frame[off], usize::from(frame[off + 1]));
                let len = if next == 51 {
                    (hdrlen + 2) * 4
                } else {
                    (hdrlen + 1) * 8
                };
                next = n;
                len
            }
            44 => {
                if !fits(frame, off, 8) {
                    p.outcome = TRUNCATED;
                    return p;
                }
                let fo = be16(frame, off + 2);
                next = frame[off];
                if fo & 0xfff8 != 0 {
                    p.frag = Frag::Later;
                } else if fo & 1 != 0 {
                    p.frag = Frag::First;
                }
                8
            }
            _ => break,
        };
        off += len;
        if off > l3_end {
            p.l4_class = Some(class(next));
            p.outcome = TRUNCATED;
            return p;
        }
        if p.frag == Frag::Later {
            p.l4_class = Some(class(next));
            p.outcome = FRAGMENT;
            return p;
        }
        walked += 1;
    }
    p.ip_proto = next;
    p.l4_class = Some(class(next));
    if walked == MAX_IPV6_EXT && matches!(next, 0 | 43 | 60 | 51 | 44) {
        p.outcome = MALFORMED;
        return p;
    }
    l4(frame, p, off, l3_end)
}

fn l4(frame: &[u8], mut p: Parsed, off: usize, l3_end: usize) -> Parsed {
    p.l4_off = off;
    let done = if p.frag == Frag::First {
        FRAGMENT
    } else {
        PARSED
    };
    let truncated = |mut p: Parsed| {
        p.l4_off = 0;
        p.outcome = TRUNCATED;
        p
    };
    match p.ip_proto {
        6 => {
            if !fits(frame, off, 20) || off + 20 > l3_end {
                return truncated(p);
            }
            let doff = usize::from(frame[off + 12] >> 4) * 4;
            if doff < 20 {
                p.outcome = MALFORMED;
                return p;
            }
            if off + doff > l3_end {
                return truncated(p);
            }
            p.sport = be16(frame, off);
            p.dport = be16(frame, off + 2);
            p.tcp_flags = frame[off + 13];
        }
        17 => {
            if !fits(frame, off, 8) || off + 8 > l3_end {
                return truncated(p);
            }
            let len = usize::from(be16(frame, off + 4));
            if len < 8 {
                p.outcome = MALFORMED;
                return p;
            }
            if p.frag == Frag::None && off + len > l3_end {
                return truncated(p);
            }
            p.sport = be16(frame, off);
            p.dport = be16(frame, off + 2);
        }
        1 | 58 => {
            if !fits(frame, off, 8) || off + 8 > l3_end {
                return truncated(p);
            }
            p.sport = be16(frame, off + 4);
        }
        _ => {}
    }
    p.outcome = done;
    p
}
