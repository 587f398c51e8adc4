//! The run's frames: flows to the frontends, replies to SNAT ports and
//! noise, built from the seeded generator, then mutated (truncated,
//! options, VLAN tags, fragments, bad fields and checksums, flips).

use super::*;

/// One generated frame and what it was meant to be (for the report).
pub(super) struct Case {
    pub(super) frame: Vec<u8>,
    pub(super) kind: &'static str,
}

const CLIENTS: [[u8; 4]; 4] = [
    [198, 18, 0, 100],
    [198, 18, 0, 101],
    [198, 18, 0, 102],
    [198, 18, 0, 103],
];
const FLAGS: [u8; 8] = [0x02, 0x02, 0x10, 0x18, 0x11, 0x04, 0x12, 0x14];

fn build(
    proto: u8,
    src: (Addr, u16),
    dst: (Addr, u16),
    flags: u8,
    payload: usize,
    options: &[u8],
) -> Vec<u8> {
    let l4 = if proto == TCP {
        let mut t = tcp(src.1, dst.1, flags);
        t.resize(20 + payload, 0x5a);
        t
    } else {
        udp(src.1, dst.1, payload)
    };
    let mut f = cat(&[&eth(ETH_IP), &ipv4(proto, l4.len(), options, 0), &l4]);
    set_v4_endpoints(
        &mut f,
        (Ipv4Addr::from(src.0), src.1),
        (Ipv4Addr::from(dst.0), dst.1),
    );
    f
}

pub(super) fn generate(rng: &mut Rng, replies: &[Flow]) -> Case {
    let proto = if rng.chance(60) { TCP } else { UDP };
    let client = (*rng.pick(&CLIENTS), 20000 + rng.below(400) as u16);
    let flags = if rng.chance(85) {
        *rng.pick(&FLAGS)
    } else {
        rng.next() as u8
    };
    let payload = if rng.chance(50) {
        0
    } else {
        rng.below(200) as usize
    };
    let options: Vec<u8> = if rng.chance(8) {
        let words = 1 + rng.below(10) as usize;
        (0..words * 4)
            .map(|i| if i % 4 == 0 { 1 } else { rng.next() as u8 })
            .collect()
    } else {
        Vec::new()
    };
    let (kind, mut frame) = match rng.below(100) {
        0..40 => {
            let port = if proto == TCP { WEB } else { DNS };
            (
                "published",
                build(proto, client, (NODE, port), flags, payload, &options),
            )
        }
        40..55 => {
            let any = 1 + rng.below(65535) as u16;
            let port = *rng.pick(&[80u16, 5432, 6379, any]);
            (
                "vip",
                build(proto, client, (VIP, port), flags, payload, &options),
            )
        }
        55..57 => {
            let port = if proto == TCP { EMPTY_TCP } else { EMPTY_UDP };
            (
                "no backend",
                build(proto, client, (NODE, port), flags, payload, &options),
            )
        }
        57..75 if !replies.is_empty() => {
            // A reply to a flow the program made: from its backend to its
            // SNAT port.
            let f = *rng.pick(replies);
            (
                "reply",
                build(
                    f.proto,
                    (f.saddr, f.sport),
                    (f.daddr, f.dport),
                    flags,
                    payload,
                    &options,
                ),
            )
        }
        57..80 => {
            let backend = [198, 19, 1 + rng.below(3) as u8, 2];
            let port = NAT_MIN + rng.below(u64::from(NAT_COUNT)) as u16;
            (
                "unknown reply",
                build(proto, (backend, 80), (NODE, port), flags, payload, &options),
            )
        }
        80..88 => {
            let dst = if rng.chance(50) {
                (NODE, rng.next() as u16)
            } else {
                ([198, 18, 0, 7 + rng.below(5) as u8], WEB)
            };
            (
                "not a frontend",
                build(proto, client, dst, flags, payload, &options),
            )
        }
        88..92 => ("icmp", v4(ICMP, &icmp_echo(8))),
        92..95 => {
            let mut f = eth(ETH_ARP);
            f.extend([0u8; 28]);
            ("arp", f)
        }
        95..98 => {
            let l4 = udp(1000, DNS, 8);
            ("ipv6", cat(&[&eth(ETH_IPV6), &ipv6(UDP, l4.len()), &l4]))
        }
        _ => {
            let len = 14 + rng.below(80) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            f[12..14].copy_from_slice(&ETH_IP.to_be_bytes());
            ("random bytes", f)
        }
    };
    if rng.chance(30) {
        mutate(rng, &mut frame);
    }
    if rng.chance(6) {
        // One or two VLAN tags (802.1Q; QinQ with an 802.1ad outer tag).
        let inner = frame[12..14].to_vec();
        let mut tags = vec![0x81, 0x00, 0, rng.below(4095) as u8];
        if rng.chance(30) {
            tags = [&[0x88, 0xa8, 0, 7][..], &tags].concat();
        }
        let mut f = frame[..12].to_vec();
        f.extend(tags);
        f.extend(inner);
        f.extend(&frame[14..]);
        frame = f;
    }
    if rng.chance(3) {
        // Ethernet padding past the datagram.
        frame.extend(std::iter::repeat_n(0u8, rng.below(40) as usize));
    }
    Case { frame, kind }
}

fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    let ihl = usize::from(f.get(14).map_or(5, |b| b & 0x0f)) * 4;
    let l4 = 14 + ihl.max(20);
    match rng.below(12) {
        0 => {
            // BPF_PROG_TEST_RUN (like any device) takes no frame shorter
            // than an Ethernet header.
            let n = 14 + rng.below(f.len().saturating_sub(14) as u64 + 1) as usize;
            f.truncate(n);
        }
        1 if f.len() > 14 => f[14] = (f[14] & 0xf0) | rng.below(16) as u8,
        2 if f.len() > 14 => f[14] = (rng.below(16) as u8) << 4 | (f[14] & 0x0f),
        3 if f.len() > 17 => {
            let v = rng.next() as u16;
            f[16..18].copy_from_slice(&v.to_be_bytes());
        }
        4 if f.len() > 21 => {
            // More fragments, or an offset, or both.
            let v: u16 = *rng.pick(&[0x2000, 0x0001, 0x2010, 0x4000]);
            f[20..22].copy_from_slice(&v.to_be_bytes());
            refix(f);
        }
        5 if f.len() > 25 => f[24] ^= 1 << rng.below(8),
        6 if f.len() > l4 + 17 => f[l4 + 16 + rng.below(2) as usize] ^= 1 << rng.below(8),
        7 if f.len() > l4 + 8 && f[23] == UDP => {
            f[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
        }
        8 if f.len() > l4 + 13 && f[23] == TCP => {
            f[l4 + 12] = (rng.below(16) as u8) << 4;
        }
        9 if f.len() > l4 + 5 && f[23] == UDP => {
            let v = rng.next() as u16 % 300;
            f[l4 + 4..l4 + 6].copy_from_slice(&v.to_be_bytes());
        }
        10 if f.len() > l4 + 3 => {
            // A port in the SNAT range.
            let v = NAT_MIN + rng.below(u64::from(NAT_COUNT)) as u16;
            f[l4 + 2..l4 + 4].copy_from_slice(&v.to_be_bytes());
            refix(f);
        }
        _ if !f.is_empty() => {
            let i = rng.below(f.len() as u64) as usize;
            f[i] ^= 1 << rng.below(8);
        }
        _ => {}
    }
}

/// Recomputes the checksums of an untagged IPv4 TCP/UDP frame whose
/// headers and lengths are whole (else leaves it: it is broken anyway).
fn refix(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != ETH_IP.to_be_bytes() {
        return;
    }
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let need = match f[23] {
        TCP => 20,
        UDP => 8,
        _ => 0,
    };
    if ihl >= 20 && total >= ihl + need && 14 + total <= f.len() {
        fix_v4_checksums(f);
    }
}
