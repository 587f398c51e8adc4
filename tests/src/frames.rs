//! Frame builders for packet tests: Ethernet, VLAN, IPv4 (with options),
//! IPv6 (with extension headers), TCP, UDP and ICMP, plus checksum helpers.
//! Addresses default to 198.18.0.1 -> 198.18.0.2 (IPv4) and fd00::1 -> fd00::2.

pub const ETH_IP: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_8021Q: u16 = 0x8100;
pub const ETH_8021AD: u16 = 0x88a8;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const HOPOPTS: u8 = 0;
pub const DSTOPTS: u8 = 60;
pub const FRAGMENT: u8 = 44;

pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    f.extend(ethertype.to_be_bytes());
    f
}

pub fn vlan(frame: &mut Vec<u8>, vid: u16, inner: u16) {
    frame.extend(vid.to_be_bytes());
    frame.extend(inner.to_be_bytes());
}

pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header with `options` (a multiple of 4 bytes) and a valid checksum.
pub fn ipv4(protocol: u8, l4_len: usize, options: &[u8], frag_off: u16) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + l4_len) as u16;
    let mut h = vec![(4 << 4) | ihl as u8, 0];
    h.extend(total.to_be_bytes());
    h.extend([0x12, 0x34]);
    h.extend(frag_off.to_be_bytes());
    h.extend([64, protocol, 0, 0]);
    h.extend([198, 18, 0, 1, 198, 18, 0, 2]);
    h.extend(options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

pub fn ipv6(nexthdr: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((payload_len as u16).to_be_bytes());
    h.extend([nexthdr, 64]);
    h.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h
}

/// An IPv6 extension header (hop-by-hop/destination options) of 8 * (1 + hdrlen) bytes.
pub fn ext(nexthdr: u8, hdrlen: u8) -> Vec<u8> {
    let mut h = vec![nexthdr, hdrlen, 1, 4, 0, 0, 0, 0]; // PadN option fills the rest
    h.resize(8 * (1 + hdrlen as usize), 0);
    h
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(1u32.to_be_bytes());
    h.extend(0u32.to_be_bytes());
    h.extend([5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

pub fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(((8 + payload) as u16).to_be_bytes());
    h.extend([0, 0]);
    h.resize(8 + payload, 0xab);
    h
}

pub fn icmp_echo(kind: u8) -> Vec<u8> {
    vec![kind, 0, 0, 0, 0x42, 0x42, 0, 1]
}

pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

pub fn v4(l4_proto: u8, l4: &[u8]) -> Vec<u8> {
    cat(&[&eth(ETH_IP), &ipv4(l4_proto, l4.len(), &[], 0), l4])
}

/// A TCP/UDP frame between two IPv4 endpoints with valid IP and L4 checksums.
/// `tcp_flags` is used for TCP; UDP carries `payload` bytes.
pub fn v4_flow(
    proto: u8,
    src: (std::net::Ipv4Addr, u16),
    dst: (std::net::Ipv4Addr, u16),
    tcp_flags: u8,
    payload: usize,
) -> Vec<u8> {
    let l4 = if proto == TCP {
        let mut t = tcp(src.1, dst.1, tcp_flags);
        t.resize(20 + payload, 0x5a);
        t
    } else {
        udp(src.1, dst.1, payload)
    };
    let mut f = v4(proto, &l4);
    set_v4_endpoints(&mut f, src, dst);
    f
}

/// Rewrites an untagged IPv4 TCP/UDP frame's addresses and ports, recomputing
/// both checksums from scratch (the reference a NAT's incremental update must match).
pub fn set_v4_endpoints(
    frame: &mut [u8],
    src: (std::net::Ipv4Addr, u16),
    dst: (std::net::Ipv4Addr, u16),
) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[26..30].copy_from_slice(&src.0.octets());
    frame[30..34].copy_from_slice(&dst.0.octets());
    let l4 = 14 + ihl;
    frame[l4..l4 + 2].copy_from_slice(&src.1.to_be_bytes());
    frame[l4 + 2..l4 + 4].copy_from_slice(&dst.1.to_be_bytes());
    fix_v4_checksums(frame);
}

/// Recomputes the IPv4 header checksum and the TCP/UDP checksum.
pub fn fix_v4_checksums(frame: &mut [u8]) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let proto = frame[23];
    let l4 = 14 + ihl;
    let off = match proto {
        TCP => l4 + 16,
        UDP => l4 + 6,
        _ => return,
    };
    frame[off..off + 2].copy_from_slice(&[0, 0]);
    let c = l4_checksum(frame);
    let c = if proto == UDP && c == 0 { 0xffff } else { c };
    frame[off..off + 2].copy_from_slice(&c.to_be_bytes());
    debug_assert!(total >= ihl);
}

/// The TCP/UDP checksum of an untagged IPv4 frame, computed over the pseudo
/// header and the segment as it stands (0 when the stored checksum is right).
pub fn l4_checksum(frame: &[u8]) -> u16 {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let l4 = &frame[14 + ihl..14 + total];
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend(&frame[26..34]);
    pseudo.extend([0, frame[23]]);
    pseudo.extend((l4.len() as u16).to_be_bytes());
    pseudo.extend(l4);
    checksum(&pseudo)
}

/// True when both the IPv4 header checksum and the L4 checksum verify.
pub fn v4_checksums_ok(frame: &[u8]) -> bool {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    checksum(&frame[14..14 + ihl]) == 0 && l4_checksum(frame) == 0
}
