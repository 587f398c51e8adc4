//! One's-complement checksums (RFC 1071) and their incremental update
//! (RFC 1624, equation 3), as a NAT must apply it: a wrong checksum stays
//! exactly as wrong.

/// The end-around-carry sum of 16-bit words, folded to 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// `HC' = ~(~HC + ~m + m')` for each 16-bit word of `old` -> `new`.
pub fn update(check: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert_eq!(old.len(), new.len());
    let mut sum = u64::from(!check);
    for (o, n) in old.chunks(2).zip(new.chunks(2)) {
        sum += u64::from(!u16::from_be_bytes([o[0], o[1]]));
        sum += u64::from(u16::from_be_bytes([n[0], n[1]]));
    }
    !fold(sum)
}
