//! Internet checksums (RFC 1071) and incremental updates (RFC 1624).

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum of an option-less IPv4 header given as ten 16-bit words in network order (the
/// checksum word itself must be zero).
#[inline(always)]
pub fn ipv4_header(words: &[u16; 10]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += u16::from_be(words[i]) as u32;
        i += 1;
    }
    !fold(sum)
}

/// New header checksum (network order in, network order out) after the TTL, the high byte of
/// the TTL/protocol word, dropped by one: the sum drops by 0x0100, so the checksum (its
/// complement) grows by 0x0100, with the end-around carry of one's-complement arithmetic.
#[inline(always)]
pub fn ttl_decrement(check_be: u16) -> u16 {
    let check = u16::from_be(check_be) as u32 + 0x0100;
    fold(check).to_be()
}
