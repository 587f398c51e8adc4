//! The answer of a frontend with no backend (RFC 793's RST, RFC 792's
//! port unreachable), or none where none is due (RFC 1122 3.2.2).

use crate::frames::{ICMP, TCP, UDP, checksum};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The answer to `frame` (an IPv4 TCP or UDP packet, whose IP header
/// starts at `l3`) from a frontend with no backend: Ethernet addresses
/// swapped, from the frontend to the client. `None`: no answer is due (a
/// RST, a group or zero source, an Ethernet group frame, a UDP datagram
/// with IP options).
pub fn reject(frame: &[u8], l3: usize) -> Option<Vec<u8>> {
    let ip = &frame[l3..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let proto = ip[9];
    let (src, dst) = (&ip[12..16], &ip[16..20]);
    if src[0] >= 224 || src == [0, 0, 0, 0] || frame[0] & 1 != 0 {
        return None;
    }
    let l4 = &ip[ihl..];
    let mut out = Vec::new();
    out.extend(&frame[6..12]);
    out.extend(&frame[0..6]);
    out.extend(&frame[12..l3]);
    match proto {
        TCP => {
            let flags = l4[13];
            if flags & TCP_RST != 0 {
                return None;
            }
            let seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
            let ack = u32::from_be_bytes(l4[8..12].try_into().unwrap());
            let doff = usize::from(l4[12] >> 4) * 4;
            let payload = (total - ihl).saturating_sub(doff) as u32;
            let (rseq, rack, rflags) = if flags & TCP_ACK != 0 {
                (ack, 0, TCP_RST)
            } else {
                let n = payload + u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
                (0, seq.wrapping_add(n), TCP_RST | TCP_ACK)
            };
            out.extend(ipv4_header(TCP, 40, dst, src, true));
            let mut tcp = Vec::new();
            tcp.extend(&l4[2..4]);
            tcp.extend(&l4[0..2]);
            tcp.extend(rseq.to_be_bytes());
            tcp.extend(rack.to_be_bytes());
            tcp.extend([0x50, rflags, 0, 0, 0, 0, 0, 0]);
            let mut pseudo = [dst, src].concat();
            pseudo.extend([0, TCP, 0, 20]);
            pseudo.extend(&tcp);
            let c = checksum(&pseudo);
            tcp[16..18].copy_from_slice(&c.to_be_bytes());
            out.extend(tcp);
        }
        UDP => {
            if ihl != 20 {
                return None;
            }
            out.extend(ipv4_header(ICMP, 56, dst, src, false));
            let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
            icmp.extend(&ip[..28]);
            let c = checksum(&icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            out.extend(icmp);
        }
        _ => return None,
    }
    Some(out)
}

fn ipv4_header(proto: u8, total: u16, src: &[u8], dst: &[u8], df: bool) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend(total.to_be_bytes());
    h.extend([0, 0, if df { 0x40 } else { 0 }, 0, 64, proto, 0, 0]);
    h.extend(src);
    h.extend(dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}
