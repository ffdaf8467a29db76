//! Fixed-width bit vectors for memory words wider than 128 bits.

use std::fmt::Write as _;

/// A little-endian bit vector of a fixed width, used for packed memory words.
///
/// Bit 0 is the least significant bit of the word, so `to_hex` prints bit 0 as the last
/// hex digit, which is the order `$readmemh` expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitWord {
    width: usize,
    limbs: Vec<u64>,
}

impl BitWord {
    /// Creates an all-zero word of `width` bits.
    pub fn zero(width: usize) -> BitWord {
        BitWord { width, limbs: vec![0; width.div_ceil(64).max(1)] }
    }

    /// Width in bits.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Writes the low `len` bits of `value` at bit offset `lo`.
    ///
    /// Panics when the field does not fit in the word or `value` has bits above `len`,
    /// because either would silently corrupt a neighbouring field.
    pub fn set(&mut self, lo: usize, len: usize, value: u64) {
        assert!(len <= 64, "field of {len} bits is wider than 64");
        assert!(lo + len <= self.width, "field [{lo}, {}) exceeds word width {}", lo + len, self.width);
        assert!(len == 64 || value >> len == 0, "value {value:#x} does not fit in {len} bits");
        for i in 0..len {
            let bit = (value >> i) & 1;
            let pos = lo + i;
            let limb = &mut self.limbs[pos / 64];
            *limb = (*limb & !(1u64 << (pos % 64))) | (bit << (pos % 64));
        }
    }

    /// Reads `len` bits at bit offset `lo`.
    pub fn get(&self, lo: usize, len: usize) -> u64 {
        assert!(len <= 64, "field of {len} bits is wider than 64");
        assert!(lo + len <= self.width, "field [{lo}, {}) exceeds word width {}", lo + len, self.width);
        let mut value = 0u64;
        for i in 0..len {
            let pos = lo + i;
            value |= ((self.limbs[pos / 64] >> (pos % 64)) & 1) << i;
        }
        value
    }

    /// Reads `len` bits (up to 128) at bit offset `lo`.
    pub fn get_wide(&self, lo: usize, len: usize) -> u128 {
        assert!(len <= 128, "field of {len} bits is wider than 128");
        let low = len.min(64);
        let mut value = self.get(lo, low) as u128;
        if len > 64 {
            value |= (self.get(lo + 64, len - 64) as u128) << 64;
        }
        value
    }

    /// Formats the word as `ceil(width / 4)` hex digits, most significant first.
    pub fn to_hex(&self) -> String {
        let digits = self.width.div_ceil(4).max(1);
        let mut text = String::with_capacity(digits);
        for d in (0..digits).rev() {
            let lo = d * 4;
            let len = 4.min(self.width.saturating_sub(lo));
            let nibble = if len == 0 { 0 } else { self.get(lo, len) };
            let _ = write!(text, "{nibble:x}");
        }
        text
    }

    /// Parses hex digits (most significant first) into a word of `width` bits.
    ///
    /// Returns `None` for a non-hex character or a value wider than `width`.
    pub fn from_hex(text: &str, width: usize) -> Option<BitWord> {
        let mut word = BitWord::zero(width);
        for (d, ch) in text.trim().chars().rev().enumerate() {
            let nibble = ch.to_digit(16)? as u64;
            for i in 0..4 {
                let bit = (nibble >> i) & 1;
                let pos = d * 4 + i;
                if pos >= width {
                    if bit != 0 {
                        return None;
                    }
                    continue;
                }
                word.set(pos, 1, bit);
            }
        }
        Some(word)
    }
}

/// Sign-extends the low `width` bits of `value` to i128.
pub fn sign_extend(value: u128, width: u32) -> i128 {
    let shift = 128 - width;
    ((value << shift) as i128) >> shift
}

/// Two's-complement encoding of `value` in `width` bits (`width` <= 64).
pub fn to_twos_complement(value: i64, width: u32) -> u64 {
    if width == 64 {
        value as u64
    } else {
        (value as u64) & ((1u64 << width) - 1)
    }
}

/// Number of bits needed to index `n` items: `max(1, ceil(log2(n)))`.
pub fn index_bits(n: u64) -> u32 {
    if n <= 2 {
        1
    } else {
        64 - (n - 1).leading_zeros()
    }
}

/// Width of a two's-complement number that can represent every value in `[-bound, bound]`.
pub fn signed_width(bound: u128) -> u32 {
    // A magnitude of `bound` needs ceil(log2(bound + 1)) bits plus one sign bit.
    (128 - bound.leading_zeros()) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_wide_word() {
        let mut word = BitWord::zero(150);
        word.set(0, 3, 0b101);
        word.set(60, 10, 0x3ff);
        word.set(140, 10, 0x2aa);
        let text = word.to_hex();
        assert_eq!(text.len(), 38);
        assert_eq!(BitWord::from_hex(&text, 150), Some(word.clone()));
        assert_eq!(word.get(60, 10), 0x3ff);
        assert_eq!(word.get(140, 10), 0x2aa);
    }

    #[test]
    fn from_hex_rejects_overflow() {
        assert!(BitWord::from_hex("1f", 4).is_none());
        assert!(BitWord::from_hex("0f", 4).is_some());
    }

    #[test]
    fn index_bits_degenerate_sizes() {
        assert_eq!(index_bits(1), 1);
        assert_eq!(index_bits(2), 1);
        assert_eq!(index_bits(3), 2);
        assert_eq!(index_bits(8), 3);
        assert_eq!(index_bits(9), 4);
    }

    #[test]
    fn signed_width_bounds() {
        assert_eq!(signed_width(0), 1);
        assert_eq!(signed_width(1), 2);
        assert_eq!(signed_width(128), 9);
        assert_eq!(signed_width(127), 8);
        // INT8 x INT8 over 1536 rows: 16384 * 1536 needs 26 signed bits.
        assert_eq!(signed_width(16384 * 1536), 26);
        // INT4 inliers (|q| <= 7) times INT8 over 1536 rows need 22.
        assert_eq!(signed_width(7 * 128 * 1536), 22);
    }

    #[test]
    fn sign_extend_negative() {
        assert_eq!(sign_extend(0b1111, 4), -1);
        assert_eq!(sign_extend(0b1000, 4), -8);
        assert_eq!(sign_extend(0b0111, 4), 7);
    }
}
