//! Deterministic byte patterns: what a test writes and later expects back. The bytes come
//! from a xorshift generator seeded by `seed`, so they do not repeat with a short period
//! (a block written at the wrong offset, or another seed's block, does not compare equal)
//! and two seeds give different bytes.

use crate::dev::AlignedBuf;

/// Fills `buf` with the pattern of `seed`.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for b in buf {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// `len` bytes of the pattern of `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    fill_pattern(&mut v, seed);
    v
}

/// The same bytes as [`pattern`] in an aligned buffer (for O_DIRECT I/O).
pub fn pattern_buf(len: usize, seed: u64) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    fill_pattern(&mut b, seed);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_deterministic_distinct_and_not_periodic() {
        assert_eq!(pattern(4096, 3), pattern(4096, 3));
        assert_eq!(&pattern_buf(4096, 3)[..], &pattern(4096, 3)[..]);
        assert_ne!(pattern(4096, 3), pattern(4096, 4));
        let p = pattern(8192, 0);
        assert_ne!(
            p[..4096],
            p[4096..],
            "the second block differs from the first"
        );
        assert!(p.iter().any(|&b| b != 0));
    }
}
