//! Number formats for microscaling (MX) quantization.
//!
//! An MX block stores one shared E8M0 scale (a power of two) and a narrow element per value.
//! This module defines the rounding rules, the E8M0 scale byte, the sign-magnitude integer
//! elements, the minifloat elements (E2M1, E3M2, E2M3, E4M3, E5M2) and reference block
//! quantizers. Every conversion is exact except the one rounding step of the element format,
//! because all scaling goes through [`ldexp`], which multiplies by powers of two with at
//! most one rounding.

use serde::{Deserialize, Serialize};

/// Rounding rule for every quantizer in the crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    /// Round to nearest, ties to even (IEEE 754 `roundTiesToEven`).
    NearestEven,
    /// Round to nearest, ties away from zero (IEEE 754 `roundTiesToAway`).
    NearestAway,
}

impl Rounding {
    /// Rounds `x` to an integer-valued f64 with this rule.
    ///
    /// `x` should be finite. NaN and infinities are returned unchanged.
    pub fn round(self, x: f64) -> f64 {
        match self {
            Rounding::NearestEven => round_ties_even(x),
            Rounding::NearestAway => x.round(),
        }
    }

    /// Name used in configuration files and serde: `"nearest_even"` or `"nearest_away"`.
    pub fn name(self) -> &'static str {
        match self {
            Rounding::NearestEven => "nearest_even",
            Rounding::NearestAway => "nearest_away",
        }
    }
}

const F64_FRACTION_BITS: u32 = 52;
const F64_FRACTION_MASK: u64 = (1 << F64_FRACTION_BITS) - 1;
const F64_EXPONENT_MASK: u64 = 0x7FF;
const F64_EXPONENT_BIAS: i64 = 1023;
/// Exponent of the least significant bit of an f64 subnormal (2^-1074).
const F64_MIN_LSB_EXPONENT: i64 = -1074;

/// Splits a finite nonzero `x` into `(negative, significand, exponent)` with
/// `|x| = significand * 2^exponent` and `significand` in [2^52, 2^53), subnormals included.
fn decompose_f64(x: f64) -> (bool, u64, i64) {
    let bits = x.to_bits();
    let negative = bits >> 63 != 0;
    let exponent_field = (bits >> F64_FRACTION_BITS) & F64_EXPONENT_MASK;
    let fraction = bits & F64_FRACTION_MASK;

    if exponent_field == 0 {
        // Subnormal: |x| = fraction * 2^-1074, so shift the leading one up to bit 52.
        let shift = fraction.leading_zeros() - (63 - F64_FRACTION_BITS);
        (
            negative,
            fraction << shift,
            F64_MIN_LSB_EXPONENT - i64::from(shift),
        )
    } else {
        let significand = fraction | (1 << F64_FRACTION_BITS);
        let exponent = exponent_field as i64 - F64_EXPONENT_BIAS - i64::from(F64_FRACTION_BITS);
        (negative, significand, exponent)
    }
}

/// Computes floor(log2(|x|)) exactly from the IEEE 754 bit pattern, subnormals included.
///
/// Returns `None` for +0 and -0. Panics if `x` is NaN or infinite.
pub fn floor_log2_f64(x: f64) -> Option<i32> {
    assert!(
        x.is_finite(),
        "floor_log2_f64 requires a finite input, got {x}"
    );
    if x == 0.0 {
        return None;
    }
    let (_, _, exponent) = decompose_f64(x);
    Some((exponent + i64::from(F64_FRACTION_BITS)) as i32)
}

/// Computes floor(log2(|x|)) exactly from the IEEE 754 bit pattern, subnormals included.
///
/// Returns `None` for +0 and -0. Panics if `x` is NaN or infinite.
pub fn floor_log2_f32(x: f32) -> Option<i32> {
    assert!(
        x.is_finite(),
        "floor_log2_f32 requires a finite input, got {x}"
    );
    if x == 0.0 {
        return None;
    }
    let bits = x.to_bits();
    let exponent_field = ((bits >> 23) & 0xFF) as i32;
    let fraction = bits & 0x7F_FFFF;
    if exponent_field == 0 {
        // Subnormal: |x| = fraction * 2^-149.
        Some((31 - fraction.leading_zeros() as i32) - 149)
    } else {
        Some(exponent_field - 127)
    }
}

/// Multiplies `x` by 2^`exp` with a single rounding, like C's `ldexp`.
///
/// The result is exact whenever it is a normal f64. A result in the subnormal range is
/// rounded to nearest even, a result beyond f64::MAX becomes ±infinity, and the sign of zero
/// is kept. Zero, NaN and infinities are returned unchanged.
pub fn ldexp(x: f64, exp: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let (negative, significand, exponent) = decompose_f64(x);
    let sign_bit = u64::from(negative) << 63;
    let lsb_exponent = exponent + i64::from(exp);

    // The value is significand * 2^lsb_exponent with the leading one at bit 52.
    let biased_exponent = lsb_exponent + i64::from(F64_FRACTION_BITS) + F64_EXPONENT_BIAS;
    if biased_exponent >= 0x7FF {
        return if negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
    }
    if biased_exponent >= 1 {
        let fraction = significand & F64_FRACTION_MASK;
        return f64::from_bits(
            sign_bit | ((biased_exponent as u64) << F64_FRACTION_BITS) | fraction,
        );
    }

    // Subnormal result: keep the bits at or above 2^-1074 and round the rest to nearest even.
    // A carry into bit 52 yields the bit pattern of the smallest normal, which is correct.
    let shift = F64_MIN_LSB_EXPONENT - lsb_exponent;
    if shift > 54 {
        return f64::from_bits(sign_bit);
    }
    let shift = shift as u32;
    let mut kept = significand >> shift;
    let remainder = significand & ((1u64 << shift) - 1);
    let half = 1u64 << (shift - 1);
    if remainder > half || (remainder == half && kept & 1 == 1) {
        kept += 1;
    }
    f64::from_bits(sign_bit | kept)
}

/// Returns 2^`k` as f64: exact for `k` in -1074..=1023, 0 below and infinity above.
pub fn pow2(k: i32) -> f64 {
    ldexp(1.0, k)
}

/// E8M0 shared scale byte with value 2^(byte - 127).
///
/// Byte 0xFF is NaN, and byte 0x00 is 2^-127, not zero. The format has no sign and no zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct E8m0(pub u8);

impl E8m0 {
    /// The NaN scale.
    pub const NAN: E8m0 = E8m0(0xFF);
    /// Smallest exponent, stored as byte 0x00.
    pub const MIN_EXPONENT: i32 = -127;
    /// Largest exponent, stored as byte 0xFE.
    pub const MAX_EXPONENT: i32 = 127;

    /// Encodes the scale 2^`e`, clamping `e` to [-127, 127], so the result is never NaN.
    pub fn from_exponent(e: i32) -> E8m0 {
        let clamped = e.clamp(E8m0::MIN_EXPONENT, E8m0::MAX_EXPONENT);
        E8m0((clamped - E8m0::MIN_EXPONENT) as u8)
    }

    /// Unbiased exponent of the scale, or `None` for NaN (0xFF).
    pub fn exponent(self) -> Option<i32> {
        if self.is_nan() {
            None
        } else {
            Some(i32::from(self.0) + E8m0::MIN_EXPONENT)
        }
    }

    /// Returns true for the NaN byte 0xFF.
    pub fn is_nan(self) -> bool {
        self.0 == 0xFF
    }

    /// Value of the scale: 2^(byte - 127), or NaN for 0xFF.
    pub fn to_f64(self) -> f64 {
        match self.exponent() {
            Some(e) => pow2(e),
            None => f64::NAN,
        }
    }
}

/// Returns `x.round_ties_even()`, bit for bit, without a call into libm.
///
/// Without SSE4.1 in the target features, `f64::round_ties_even` compiles to a call of
/// `rint`, which the quantizer's inner loops make for every weight at every micro-exponent.
/// For |x| < 2^52 the sum |x| + 2^52 lies in [2^52, 2^53), where the f64 spacing is 1, so the
/// addition itself rounds |x| to an integer with ties to even (2^52 is even) and the
/// subtraction is exact. Larger magnitudes, infinities and NaN are already integer-valued or
/// returned unchanged, and the sign of x is restored so that -0.3 gives -0.0.
fn round_ties_even(x: f64) -> f64 {
    const TWO_POW_52: f64 = 4_503_599_627_370_496.0;
    let magnitude = x.abs();
    if magnitude < TWO_POW_52 {
        ((magnitude + TWO_POW_52) - TWO_POW_52).copysign(x)
    } else {
        x
    }
}

/// Sign-magnitude symmetric integer element of `bits` bits (2..=8).
///
/// The integer q lies in [-(2^(bits-1) - 1), 2^(bits-1) - 1]. Bit `bits - 1` of a code is the
/// sign and the low `bits - 1` bits the magnitude. The code -2^(bits-1) (sign set, magnitude 0,
/// "negative zero") is never produced by [`IntFormat::encode`] and decodes to 0.
///
/// As an MX element the format is fixed point with emax 0: the element value is
/// q * 2^-(bits-2), so with shared exponent e the value is q * 2^(e - (bits-2)).
/// With bits = 2 the element is ternary {-1, 0, +1} with step 2^e.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IntFormat {
    /// Element width in bits, sign included.
    pub bits: u32,
}

impl IntFormat {
    /// Creates a format of `bits` bits. Panics unless `bits` is in 2..=8.
    pub fn new(bits: u32) -> IntFormat {
        assert!(
            (2..=8).contains(&bits),
            "integer element width must be 2..=8 bits, got {bits}"
        );
        IntFormat { bits }
    }

    /// Largest magnitude, 2^(bits-1) - 1.
    pub fn max_magnitude(self) -> i32 {
        (1 << (self.bits - 1)) - 1
    }

    /// Unbiased exponent of the largest element value, which is 0 for every width.
    pub fn emax(self) -> i32 {
        0
    }

    /// Exponent of the least significant bit for shared exponent `shared_exp`:
    /// `shared_exp - (bits - 2)`.
    pub fn lsb_exponent(self, shared_exp: i32) -> i32 {
        shared_exp.saturating_sub(self.bits as i32 - 2)
    }

    /// Quantizes `x` to q = clamp(round(x / 2^lsb_exponent(shared_exp)), ±max_magnitude).
    ///
    /// The division by the power of two is exact, so `rounding` applies to the exact quotient.
    /// Panics if `x` is NaN or infinite.
    pub fn quantize(self, x: f64, shared_exp: i32, rounding: Rounding) -> i32 {
        assert!(
            x.is_finite(),
            "IntFormat::quantize requires a finite input, got {x}"
        );
        let quotient = ldexp(x, self.lsb_exponent(shared_exp).saturating_neg());
        let max = f64::from(self.max_magnitude());
        rounding.round(quotient).clamp(-max, max) as i32
    }

    /// Value of `q` at shared exponent `shared_exp`, q * 2^lsb_exponent(shared_exp).
    ///
    /// Exact whenever the result is a normal f64, which holds for every |shared_exp| below 1000.
    pub fn value(self, q: i32, shared_exp: i32) -> f64 {
        ldexp(f64::from(q), self.lsb_exponent(shared_exp))
    }

    /// Encodes `q` as a sign-magnitude code. Panics if |q| > max_magnitude.
    pub fn encode(self, q: i32) -> u32 {
        let magnitude = q.unsigned_abs();
        assert!(
            magnitude <= self.max_magnitude() as u32,
            "{q} does not fit a {}-bit sign-magnitude element (max magnitude {})",
            self.bits,
            self.max_magnitude()
        );
        let sign = if q < 0 { 1 << (self.bits - 1) } else { 0 };
        sign | magnitude
    }

    /// Decodes a sign-magnitude code to q. The negative-zero code decodes to 0.
    ///
    /// Panics if `code` has bits set at or above bit `bits`.
    pub fn decode(self, code: u32) -> i32 {
        assert!(
            code >> self.bits == 0,
            "code {code:#x} does not fit in {} bits",
            self.bits
        );
        let magnitude = (code & self.max_magnitude() as u32) as i32;
        if code >> (self.bits - 1) == 1 {
            -magnitude
        } else {
            magnitude
        }
    }
}

/// Minifloat element kinds of the OCP Microscaling (MX) formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FpKind {
    /// FP4: 2 exponent bits, 1 mantissa bit, max 6.
    E2M1,
    /// FP6: 3 exponent bits, 2 mantissa bits, max 28.
    E3M2,
    /// FP6: 2 exponent bits, 3 mantissa bits, max 7.5.
    E2M3,
    /// FP8 without infinities: S.1111.111 is NaN, max 448.
    E4M3,
    /// FP8 with IEEE 754 style infinities and NaNs, max 57344.
    E5M2,
}

impl FpKind {
    /// Every kind, in declaration order.
    pub const ALL: [FpKind; 5] = [
        FpKind::E2M1,
        FpKind::E3M2,
        FpKind::E2M3,
        FpKind::E4M3,
        FpKind::E5M2,
    ];

    /// Lowercase name, as in serde and configuration files: `"e2m1"`, `"e4m3"`, ...
    pub fn name(self) -> &'static str {
        match self {
            FpKind::E2M1 => "e2m1",
            FpKind::E3M2 => "e3m2",
            FpKind::E2M3 => "e2m3",
            FpKind::E4M3 => "e4m3",
            FpKind::E5M2 => "e5m2",
        }
    }

    /// Field widths and bias of this kind.
    pub fn format(self) -> FpFormat {
        let (exp_bits, man_bits) = match self {
            FpKind::E2M1 => (2, 1),
            FpKind::E3M2 => (3, 2),
            FpKind::E2M3 => (2, 3),
            FpKind::E4M3 => (4, 3),
            FpKind::E5M2 => (5, 2),
        };
        FpFormat {
            kind: self,
            exp_bits,
            man_bits,
            bias: (1 << (exp_bits - 1)) - 1,
        }
    }

    /// Parses a kind name, ignoring ASCII case (`"e4m3"` or `"E4M3"`). Returns `None` for
    /// any other string.
    pub fn parse(s: &str) -> Option<FpKind> {
        FpKind::ALL
            .into_iter()
            .find(|kind| kind.name().eq_ignore_ascii_case(s))
    }
}

/// Minifloat with a sign bit, `exp_bits` exponent bits, `man_bits` mantissa bits and
/// subnormals. The bias is 2^(exp_bits-1) - 1.
///
/// E4M3 follows OCP E4M3 (the "FN" variant): S.1111.111 is NaN, there is no infinity, and the
/// max finite value is 448 (S.1111.110). E5M2 follows IEEE 754: an all-ones exponent field
/// is infinity (mantissa 0) or NaN, and the max finite value is 57344. E2M1 (max 6), E3M2
/// (max 28) and E2M3 (max 7.5) have no special codes.
///
/// Build values with [`FpKind::format`]. The methods assume the fields match `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FpFormat {
    /// Element kind, which decides the special codes.
    pub kind: FpKind,
    /// Exponent field width.
    pub exp_bits: u32,
    /// Mantissa (trailing significand) field width.
    pub man_bits: u32,
    /// Exponent bias.
    pub bias: i32,
}

impl FpFormat {
    /// Code width, 1 + exp_bits + man_bits.
    pub fn bits(self) -> u32 {
        1 + self.exp_bits + self.man_bits
    }

    fn magnitude_mask(self) -> u32 {
        (1 << (self.exp_bits + self.man_bits)) - 1
    }

    fn sign_bit(self) -> u32 {
        1 << (self.exp_bits + self.man_bits)
    }

    /// Positive code of the largest finite value.
    pub fn max_finite_code(self) -> u32 {
        match self.kind {
            // S.1111.111 is NaN, so the largest finite mantissa is one below all-ones.
            FpKind::E4M3 => self.magnitude_mask() - 1,
            // The all-ones exponent field is reserved for infinities and NaNs.
            FpKind::E5M2 => ((1 << self.exp_bits) - 1) * (1 << self.man_bits) - 1,
            FpKind::E2M1 | FpKind::E3M2 | FpKind::E2M3 => self.magnitude_mask(),
        }
    }

    /// Largest finite value.
    pub fn max_finite(self) -> f64 {
        self.decode(self.max_finite_code())
    }

    /// Unbiased exponent of the largest finite value (E2M1: 2, E3M2: 4, E2M3: 2, E4M3: 8,
    /// E5M2: 15).
    pub fn emax(self) -> i32 {
        (self.max_finite_code() >> self.man_bits) as i32 - self.bias
    }

    /// Returns true if `code` is a finite value of this format, and false for NaN and
    /// infinity codes and for codes wider than `bits()`.
    pub fn is_finite_code(self, code: u32) -> bool {
        code >> self.bits() == 0 && code & self.magnitude_mask() <= self.max_finite_code()
    }

    /// Encodes `x` (already divided by the block scale) to the nearest finite code.
    ///
    /// Rounding works on the exact value, and RNE ties go to the even significand, which is
    /// the code with an even mantissa field. Values beyond the max finite value saturate to
    /// ±max finite, so the result is never a NaN or infinity code. Subnormals are produced.
    /// A negative value that rounds to zero gives code 0 (+0).
    /// Panics if `x` is NaN or infinite.
    pub fn encode(self, x: f64, rounding: Rounding) -> u32 {
        assert!(
            x.is_finite(),
            "FpFormat::encode requires a finite input, got {x}"
        );
        let magnitude = x.abs();
        let sign = if x.is_sign_negative() {
            self.sign_bit()
        } else {
            0
        };
        if magnitude >= self.max_finite() {
            return sign | self.max_finite_code();
        }
        let Some(floor_log2) = floor_log2_f64(magnitude) else {
            return 0;
        };

        // Biased exponent of the binade containing x. Subnormals use E = 1 for their quantum.
        let mut biased_exponent = (floor_log2 + self.bias).max(1);
        let quantum_exponent = biased_exponent - self.bias - self.man_bits as i32;
        // `magnitude` is fewer than 2^(man_bits+1) quanta, so the scaling is exact.
        let mut significand = rounding.round(ldexp(magnitude, -quantum_exponent)) as u32;

        let hidden_bit = 1u32 << self.man_bits;
        if significand == 2 * hidden_bit {
            // Rounding carried into the next binade.
            biased_exponent += 1;
            significand /= 2;
        }

        // A subnormal that rounds up to the hidden bit takes the first branch and becomes
        // the smallest normal (E = 1, M = 0).
        let code_magnitude = if significand >= hidden_bit {
            ((biased_exponent as u32) << self.man_bits) | (significand - hidden_bit)
        } else {
            // Subnormal: E = 0 and M is the significand.
            significand
        };

        // A carry can land on a NaN or infinity code (E4M3 from 464, E5M2 from 61440), so
        // saturate to the max finite code.
        let code_magnitude = code_magnitude.min(self.max_finite_code());
        if code_magnitude == 0 {
            0
        } else {
            sign | code_magnitude
        }
    }

    /// Value of `code`. NaN and infinity codes decode to f64 NaN and ±infinity.
    ///
    /// Panics if `code` has bits set at or above bit `bits()`.
    pub fn decode(self, code: u32) -> f64 {
        assert!(
            code >> self.bits() == 0,
            "code {code:#x} does not fit in {} bits",
            self.bits()
        );
        if !self.is_finite_code(code) {
            let mantissa = code & ((1 << self.man_bits) - 1);
            return match (self.kind, mantissa) {
                (FpKind::E5M2, 0) if code & self.sign_bit() != 0 => f64::NEG_INFINITY,
                (FpKind::E5M2, 0) => f64::INFINITY,
                _ => f64::NAN,
            };
        }
        let (negative, significand, exponent) = self.integer_parts(code);
        let value = ldexp(f64::from(significand), exponent);
        if negative {
            -value
        } else {
            value
        }
    }

    /// Integer form of a finite code as `(negative, significand, exponent)`, the form the
    /// hardware uses.
    ///
    /// The value is (-1)^negative * significand * 2^exponent, where significand is
    /// 2^man_bits + M for a biased exponent field E > 0 and M otherwise, and exponent is
    /// max(E, 1) - bias - man_bits. Panics if `code` is not a finite code.
    pub fn integer_parts(self, code: u32) -> (bool, u32, i32) {
        assert!(
            self.is_finite_code(code),
            "code {code:#x} is not a finite {} value",
            self.kind.name()
        );
        let negative = code & self.sign_bit() != 0;
        let exponent_field = (code >> self.man_bits) & ((1 << self.exp_bits) - 1);
        let mantissa = code & ((1 << self.man_bits) - 1);
        let significand = if exponent_field > 0 {
            (1 << self.man_bits) + mantissa
        } else {
            mantissa
        };
        let exponent = (exponent_field as i32).max(1) - self.bias - self.man_bits as i32;
        (negative, significand, exponent)
    }
}

/// Computes the shared exponent of an MX block: floor(log2(max_abs)) - element_emax, clamped
/// to [-127, 127].
///
/// The exponent is read from the bit pattern of `max_abs`, so no rounding of the maximum can
/// move it into the next binade. A zero `max_abs` gives -127. Panics if `max_abs` is NaN or
/// infinite.
pub fn shared_exponent(max_abs: f64, element_emax: i32) -> i32 {
    match floor_log2_f64(max_abs) {
        None => E8m0::MIN_EXPONENT,
        Some(floor_log2) => floor_log2
            .saturating_sub(element_emax)
            .clamp(E8m0::MIN_EXPONENT, E8m0::MAX_EXPONENT),
    }
}

/// Largest |x| of a block. Panics on a NaN or infinite element, naming its index.
fn block_max_abs(block: &[f32]) -> f64 {
    let mut max_abs = 0.0f64;
    for (index, &x) in block.iter().enumerate() {
        assert!(
            x.is_finite(),
            "MX block element {index} is {x}, but elements must be finite"
        );
        max_abs = max_abs.max(f64::from(x.abs()));
    }
    max_abs
}

/// Quantizes one MX-INT block the standard way and returns `(scale, q values, dequantized)`.
///
/// The shared exponent comes from the block's max |x| and the element emax of 0. This is the
/// plain MX reference without outlier handling, used for tests and baselines.
/// Panics if an element is NaN or infinite.
pub fn quantize_mx_int_block(
    block: &[f32],
    format: IntFormat,
    rounding: Rounding,
) -> (E8m0, Vec<i32>, Vec<f64>) {
    let exponent = shared_exponent(block_max_abs(block), format.emax());
    let q: Vec<i32> = block
        .iter()
        .map(|&x| format.quantize(f64::from(x), exponent, rounding))
        .collect();
    let dequantized = q
        .iter()
        .map(|&value| format.value(value, exponent))
        .collect();
    (E8m0::from_exponent(exponent), q, dequantized)
}

/// Quantizes one MX-FP block (for example MXFP4: E2M1 with 32 elements) the standard way and
/// returns `(scale, codes, dequantized)`.
///
/// The shared exponent comes from the block's max |x| and the element format's emax, so
/// elements above max_finite * scale saturate. Panics if an element is NaN or infinite.
pub fn quantize_mx_fp_block(
    block: &[f32],
    format: FpFormat,
    rounding: Rounding,
) -> (E8m0, Vec<u32>, Vec<f64>) {
    let exponent = shared_exponent(block_max_abs(block), format.emax());
    let codes: Vec<u32> = block
        .iter()
        .map(|&x| format.encode(ldexp(f64::from(x), -exponent), rounding))
        .collect();
    let dequantized = codes
        .iter()
        .map(|&code| ldexp(format.decode(code), exponent))
        .collect();
    (E8m0::from_exponent(exponent), codes, dequantized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ROUNDINGS: [Rounding; 2] = [Rounding::NearestEven, Rounding::NearestAway];

    #[test]
    fn rounding_ties_follow_rule() {
        let cases = [
            // (x, nearest even, nearest away)
            (0.5, 0.0, 1.0),
            (1.5, 2.0, 2.0),
            (2.5, 2.0, 3.0),
            (-0.5, 0.0, -1.0),
            (-2.5, -2.0, -3.0),
            (2.4999999999999996, 2.0, 2.0),
            (7.0, 7.0, 7.0),
        ];
        for (x, even, away) in cases {
            assert_eq!(Rounding::NearestEven.round(x), even, "nearest even of {x}");
            assert_eq!(Rounding::NearestAway.round(x), away, "nearest away of {x}");
        }
    }

    #[test]
    fn rounding_names_match_serde() {
        for rounding in ROUNDINGS {
            let json = serde_json::to_string(&rounding).unwrap();
            assert_eq!(json, format!("\"{}\"", rounding.name()));
            let parsed: Rounding = serde_json::from_str(&json).unwrap();
            assert_eq!(parsed, rounding);
        }
        assert_eq!(Rounding::NearestEven.name(), "nearest_even");
        assert_eq!(Rounding::NearestAway.name(), "nearest_away");
    }

    #[test]
    fn floor_log2_powers_of_two() {
        for k in -1074..=1023 {
            let x = pow2(k);
            assert_eq!(floor_log2_f64(x), Some(k), "f64 2^{k}");
            assert_eq!(floor_log2_f64(-x), Some(k), "f64 -2^{k}");
        }
        for k in -149..=127 {
            let x = pow2(k) as f32;
            assert_eq!(floor_log2_f32(x), Some(k), "f32 2^{k}");
            assert_eq!(floor_log2_f32(-x), Some(k), "f32 -2^{k}");
        }
    }

    #[test]
    fn floor_log2_below_power_of_two() {
        for k in -1073..=1023 {
            let below = f64::from_bits(pow2(k).to_bits() - 1);
            assert_eq!(floor_log2_f64(below), Some(k - 1), "f64 just below 2^{k}");
        }
        for k in -148..=127 {
            let below = f32::from_bits((pow2(k) as f32).to_bits() - 1);
            assert_eq!(floor_log2_f32(below), Some(k - 1), "f32 just below 2^{k}");
        }
        assert_eq!(floor_log2_f64(f64::MAX), Some(1023));
        assert_eq!(floor_log2_f32(f32::MAX), Some(127));
    }

    #[test]
    fn floor_log2_subnormals() {
        assert_eq!(floor_log2_f64(f64::from_bits(1)), Some(-1074));
        assert_eq!(floor_log2_f64(f64::from_bits(3)), Some(-1073));
        assert_eq!(floor_log2_f64(f64::MIN_POSITIVE / 2.0), Some(-1023));
        assert_eq!(
            floor_log2_f64(f64::from_bits(F64_FRACTION_MASK)),
            Some(-1023)
        );
        assert_eq!(floor_log2_f32(f32::from_bits(1)), Some(-149));
        assert_eq!(floor_log2_f32(f32::from_bits(3)), Some(-148));
        assert_eq!(floor_log2_f32(f32::MIN_POSITIVE / 2.0), Some(-127));
        assert_eq!(floor_log2_f32(f32::from_bits(0x7F_FFFF)), Some(-127));
    }

    #[test]
    fn floor_log2_zero_is_none() {
        assert_eq!(floor_log2_f64(0.0), None);
        assert_eq!(floor_log2_f64(-0.0), None);
        assert_eq!(floor_log2_f32(0.0), None);
        assert_eq!(floor_log2_f32(-0.0), None);
    }

    #[test]
    #[should_panic(expected = "finite")]
    fn floor_log2_rejects_nan() {
        floor_log2_f64(f64::NAN);
    }

    #[test]
    fn round_ties_even_matches_std() {
        let mut cases = vec![
            0.0, -0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 0.49999999999999994, 0.3, -0.3, 1e-320,
            4_503_599_627_370_495.5, 4_503_599_627_370_496.0, 9_007_199_254_740_993.0,
            f64::MAX, f64::MIN_POSITIVE, f64::INFINITY, f64::NEG_INFINITY,
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            cases.push(f64::from_bits(state));
            cases.push((state >> 11) as f64 / 256.0 - 1e13);
        }
        for x in cases {
            let expected = x.round_ties_even();
            let got = Rounding::NearestEven.round(x);
            assert!(
                got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan()),
                "round_ties_even({x:e}): got {got:e}, expected {expected:e}"
            );
        }
    }

    #[test]
    fn ldexp_exact_and_rounds_subnormals_once() {
        assert_eq!(ldexp(1.5, 3), 12.0);
        assert_eq!(ldexp(-1.5, -3), -0.1875);
        assert_eq!(ldexp(1.0, -1074), f64::from_bits(1));
        assert_eq!(ldexp(1.0, -1022), f64::MIN_POSITIVE);
        assert_eq!(ldexp(f64::from_bits(1), 1074), 1.0);
        assert_eq!(ldexp(f64::MAX, -2000), f64::MAX * pow2(-1000) * pow2(-1000));
        assert_eq!(ldexp(f64::MAX, -2200), 0.0);
        assert_eq!(ldexp(1.0, 1024), f64::INFINITY);
        assert_eq!(ldexp(-1.0, 1024), f64::NEG_INFINITY);
        assert_eq!(ldexp(f64::MAX, i32::MIN), 0.0);
        assert!(ldexp(-1.0, i32::MIN).is_sign_negative());
        assert_eq!(ldexp(f64::from_bits(1), i32::MAX), f64::INFINITY);

        // Exact ties at 2^-1075 go to the even neighbour, and anything above rounds up.
        assert_eq!(ldexp(1.0, -1075), 0.0);
        assert_eq!(ldexp(3.0, -1075), f64::from_bits(2));
        assert_eq!(ldexp(1.0 + f64::EPSILON, -1075), f64::from_bits(1));

        // (1 + 2^-40) * 2^-1075 lies just above the tie between 0 and 2^-1074. Scaling by
        // 2^-1022 repeatedly would first round at 2^-1044, drop the 2^-40 term and then
        // round the exact tie to 0.
        let x = (1.0 + pow2(-40)) * pow2(1000);
        assert_eq!(ldexp(x, -2075), f64::from_bits(1));
        assert_eq!(x * pow2(-1022) * pow2(-1022) * pow2(-31), 0.0);
    }

    #[test]
    fn e8m0_special_bytes() {
        let smallest = E8m0(0x00).to_f64();
        assert_eq!(smallest, pow2(-127));
        assert!(smallest > 0.0);
        assert!((smallest as f32).is_subnormal());
        assert_eq!((smallest as f32) as f64, smallest);

        assert!(E8m0(0xFF).to_f64().is_nan());
        assert!(E8m0::NAN.is_nan());
        assert_eq!(E8m0::NAN.exponent(), None);
        assert_eq!(E8m0(0x7F).to_f64(), 1.0);
        assert_eq!(E8m0(0xFE).to_f64(), pow2(127));
        assert_eq!(E8m0(0xFE).exponent(), Some(127));
        assert_eq!(E8m0(0x00).exponent(), Some(-127));
        assert!(!E8m0(0xFE).is_nan());
    }

    #[test]
    fn e8m0_from_exponent_clamps() {
        assert_eq!(E8m0::from_exponent(0), E8m0(0x7F));
        assert_eq!(E8m0::from_exponent(-127), E8m0(0x00));
        assert_eq!(E8m0::from_exponent(-500), E8m0(0x00));
        assert_eq!(E8m0::from_exponent(127), E8m0(0xFE));
        assert_eq!(E8m0::from_exponent(128), E8m0(0xFE));
        assert_eq!(E8m0::from_exponent(i32::MAX), E8m0(0xFE));
        for e in -127..=127 {
            assert_eq!(E8m0::from_exponent(e).exponent(), Some(e));
        }
    }

    #[test]
    fn int_codes_round_trip() {
        for bits in 2..=8 {
            let format = IntFormat::new(bits);
            let max = format.max_magnitude();
            assert_eq!(max, (1 << (bits - 1)) - 1);
            assert_eq!(format.emax(), 0);
            for q in -max..=max {
                let code = format.encode(q);
                assert!(code < 1 << bits, "{bits}-bit code of {q} is {code:#x}");
                assert_eq!(format.decode(code), q, "{bits}-bit code {code:#x}");
            }
            let negative_zero = 1 << (bits - 1);
            assert_eq!(format.decode(negative_zero), 0, "{bits}-bit negative zero");
            assert_eq!(format.encode(0), 0);
        }
    }

    #[test]
    fn int_quantize_round_trips_values() {
        let exponents = [-140, -128, -127, -126, -1, 0, 1, 7, 126, 127, 128, 140];
        for bits in 2..=8 {
            let format = IntFormat::new(bits);
            let max = format.max_magnitude();
            for e in exponents {
                assert_eq!(format.lsb_exponent(e), e - (bits as i32 - 2));
                for q in -max..=max {
                    let value = format.value(q, e);
                    assert_eq!(value, f64::from(q) * pow2(e - (bits as i32 - 2)));
                    for rounding in ROUNDINGS {
                        assert_eq!(
                            format.quantize(value, e, rounding),
                            q,
                            "{bits}-bit q {q} at shared exponent {e} with {rounding:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn int_quantize_saturates_and_rounds() {
        let int4 = IntFormat::new(4);
        // Step 2^-2 at shared exponent 0, max magnitude 7 (1.75).
        assert_eq!(int4.quantize(1.0e30, 0, Rounding::NearestEven), 7);
        assert_eq!(int4.quantize(-1.0e30, 0, Rounding::NearestEven), -7);
        assert_eq!(int4.quantize(f64::MAX, -140, Rounding::NearestAway), 7);
        assert_eq!(int4.quantize(0.375, 0, Rounding::NearestEven), 2);
        assert_eq!(int4.quantize(0.625, 0, Rounding::NearestEven), 2);
        assert_eq!(int4.quantize(0.625, 0, Rounding::NearestAway), 3);
        assert_eq!(int4.quantize(-0.625, 0, Rounding::NearestAway), -3);
        assert_eq!(
            int4.quantize(f64::from_bits(1), 127, Rounding::NearestAway),
            0
        );

        let ternary = IntFormat::new(2);
        assert_eq!(ternary.max_magnitude(), 1);
        assert_eq!(ternary.value(1, 3), 8.0);
        assert_eq!(ternary.quantize(4.0, 3, Rounding::NearestEven), 0);
        assert_eq!(ternary.quantize(4.0, 3, Rounding::NearestAway), 1);
        assert_eq!(ternary.quantize(-100.0, 3, Rounding::NearestEven), -1);
    }

    #[test]
    #[should_panic(expected = "2..=8")]
    fn int_format_rejects_width_nine() {
        IntFormat::new(9);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn int_encode_rejects_out_of_range() {
        IntFormat::new(4).encode(-8);
    }

    #[test]
    fn fp_kind_names_parse() {
        for kind in FpKind::ALL {
            assert_eq!(FpKind::parse(kind.name()), Some(kind));
            assert_eq!(FpKind::parse(&kind.name().to_uppercase()), Some(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(kind.format().kind, kind);
        }
        assert_eq!(FpKind::parse("e3m3"), None);
        assert_eq!(FpKind::parse(""), None);
    }

    #[test]
    fn fp_format_constants() {
        // (kind, bits, bias, max finite code, max finite, emax)
        let cases = [
            (FpKind::E2M1, 4, 1, 0x7, 6.0, 2),
            (FpKind::E3M2, 6, 3, 0x1F, 28.0, 4),
            (FpKind::E2M3, 6, 1, 0x1F, 7.5, 2),
            (FpKind::E4M3, 8, 7, 0x7E, 448.0, 8),
            (FpKind::E5M2, 8, 15, 0x7B, 57344.0, 15),
        ];
        for (kind, bits, bias, max_code, max_finite, emax) in cases {
            let format = kind.format();
            assert_eq!(format.bits(), bits, "{kind:?} bits");
            assert_eq!(format.bias, bias, "{kind:?} bias");
            assert_eq!(
                format.max_finite_code(),
                max_code,
                "{kind:?} max finite code"
            );
            assert_eq!(format.max_finite(), max_finite, "{kind:?} max finite");
            assert_eq!(format.emax(), emax, "{kind:?} emax");
        }
    }

    #[test]
    fn fp_codes_round_trip_exhaustive() {
        for kind in FpKind::ALL {
            let format = kind.format();
            let negative_zero = format.sign_bit();
            for code in 0..1u32 << format.bits() {
                if !format.is_finite_code(code) {
                    continue;
                }
                let value = format.decode(code);
                assert!(
                    value.is_finite(),
                    "{kind:?} code {code:#x} decodes to {value}"
                );
                let expected = if code == negative_zero { 0 } else { code };
                for rounding in ROUNDINGS {
                    assert_eq!(
                        format.encode(value, rounding),
                        expected,
                        "{kind:?} code {code:#x} (value {value}) with {rounding:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn fp_magnitudes_increase_with_code() {
        for kind in FpKind::ALL {
            let format = kind.format();
            for code in 1..=format.max_finite_code() {
                let previous = format.decode(code - 1);
                let current = format.decode(code);
                assert!(
                    previous < current,
                    "{kind:?} code {code:#x}: {previous} >= {current}"
                );
                let negative = format.decode(code | format.sign_bit());
                assert_eq!(negative, -current, "{kind:?} negative code {code:#x}");
            }
        }
    }

    #[test]
    fn fp_special_codes_are_not_finite() {
        // (kind, number of NaN or infinity codes)
        let cases = [
            (FpKind::E2M1, 0),
            (FpKind::E3M2, 0),
            (FpKind::E2M3, 0),
            (FpKind::E4M3, 2),
            (FpKind::E5M2, 8),
        ];
        for (kind, expected_count) in cases {
            let format = kind.format();
            let mut count = 0;
            for code in 0..1u32 << format.bits() {
                if format.is_finite_code(code) {
                    continue;
                }
                count += 1;
                let value = format.decode(code);
                assert!(
                    !value.is_finite(),
                    "{kind:?} code {code:#x} decodes to {value}"
                );
            }
            assert_eq!(count, expected_count, "{kind:?} NaN and infinity codes");
            assert!(
                !format.is_finite_code(1 << format.bits()),
                "{kind:?} code wider than format"
            );
        }

        let e4m3 = FpKind::E4M3.format();
        assert!(e4m3.decode(0x7F).is_nan());
        assert!(e4m3.decode(0xFF).is_nan());
        let e5m2 = FpKind::E5M2.format();
        assert_eq!(e5m2.decode(0x7C), f64::INFINITY);
        assert_eq!(e5m2.decode(0xFC), f64::NEG_INFINITY);
        assert!(e5m2.decode(0x7D).is_nan());
        assert!(e5m2.decode(0xFF).is_nan());
    }

    #[test]
    fn fp_integer_parts_match_decode() {
        for kind in FpKind::ALL {
            let format = kind.format();
            for code in 0..1u32 << format.bits() {
                if !format.is_finite_code(code) {
                    continue;
                }
                let (negative, significand, exponent) = format.integer_parts(code);
                assert!(
                    significand < 2 << format.man_bits,
                    "{kind:?} code {code:#x}"
                );
                let magnitude = f64::from(significand) * pow2(exponent);
                let value = if negative { -magnitude } else { magnitude };
                assert_eq!(value, format.decode(code), "{kind:?} code {code:#x}");
            }
        }

        let e2m1 = FpKind::E2M1.format();
        assert_eq!(e2m1.integer_parts(0x1), (false, 1, -1));
        assert_eq!(e2m1.integer_parts(0x7), (false, 3, 1));
        assert_eq!(e2m1.integer_parts(0xF), (true, 3, 1));
        let e4m3 = FpKind::E4M3.format();
        assert_eq!(e4m3.integer_parts(0x7E), (false, 14, 5));
        assert_eq!(e4m3.integer_parts(0x01), (false, 1, -9));
    }

    #[test]
    fn e2m1_ties_round_to_even() {
        let e2m1 = FpKind::E2M1.format();
        let even = Rounding::NearestEven;
        let cases = [
            (0.25, 0.0),
            (f64::from(0.25000006f32), 0.5),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (6.5, 6.0),
            (-5.0, -4.0),
        ];
        for (x, expected) in cases {
            let code = e2m1.encode(x, even);
            assert_eq!(
                e2m1.decode(code),
                expected,
                "E2M1 encode of {x} gave code {code:#x}"
            );
        }
        assert_eq!(
            e2m1.encode(-0.25, even),
            0,
            "negative value rounding to zero gives +0"
        );
        assert_eq!(e2m1.encode(-0.0, even), 0);
    }

    #[test]
    fn e2m1_nearest_away_ties() {
        let e2m1 = FpKind::E2M1.format();
        let away = Rounding::NearestAway;
        let cases = [
            (0.25, 0.5),
            (0.2499999, 0.0),
            (0.75, 1.0),
            (1.25, 1.5),
            (2.5, 3.0),
            (5.0, 6.0),
            (-5.0, -6.0),
            (6.5, 6.0),
        ];
        for (x, expected) in cases {
            let code = e2m1.encode(x, away);
            assert_eq!(
                e2m1.decode(code),
                expected,
                "E2M1 encode of {x} gave code {code:#x}"
            );
        }
    }

    #[test]
    fn e2m1_saturates_large_values() {
        let e2m1 = FpKind::E2M1.format();
        for rounding in ROUNDINGS {
            assert_eq!(e2m1.encode(6.0, rounding), 0x7);
            assert_eq!(e2m1.encode(1.0e30, rounding), 0x7);
            assert_eq!(e2m1.encode(f64::MAX, rounding), 0x7);
            assert_eq!(e2m1.encode(-1.0e30, rounding), 0xF);
        }
    }

    #[test]
    fn e4m3_never_returns_nan_code() {
        let e4m3 = FpKind::E4M3.format();
        let large = [
            448.0,
            449.0,
            463.9,
            464.0,
            464.1,
            479.0,
            480.0,
            1.0e6,
            1.0e30,
            f64::MAX,
        ];
        for rounding in ROUNDINGS {
            for x in large {
                assert_eq!(e4m3.encode(x, rounding), 0x7E, "E4M3 {x} with {rounding:?}");
                assert_eq!(
                    e4m3.encode(-x, rounding),
                    0xFE,
                    "E4M3 {} with {rounding:?}",
                    -x
                );
            }
        }
        assert_eq!(
            e4m3.decode(e4m3.encode(432.0, Rounding::NearestEven)),
            448.0
        );
        assert_eq!(
            e4m3.decode(e4m3.encode(432.0, Rounding::NearestAway)),
            448.0
        );
        assert_eq!(
            e4m3.decode(e4m3.encode(pow2(-10), Rounding::NearestEven)),
            0.0
        );
        assert_eq!(
            e4m3.decode(e4m3.encode(pow2(-10), Rounding::NearestAway)),
            pow2(-9)
        );
    }

    #[test]
    fn e5m2_never_returns_infinity() {
        let e5m2 = FpKind::E5M2.format();
        let large = [
            57344.0,
            60000.0,
            61439.0,
            61440.0,
            65536.0,
            1.0e30,
            f64::MAX,
        ];
        for rounding in ROUNDINGS {
            for x in large {
                assert_eq!(e5m2.encode(x, rounding), 0x7B, "E5M2 {x} with {rounding:?}");
                assert_eq!(
                    e5m2.encode(-x, rounding),
                    0xFB,
                    "E5M2 {} with {rounding:?}",
                    -x
                );
            }
        }
        assert_eq!(
            e5m2.decode(e5m2.encode(pow2(-16), Rounding::NearestEven)),
            pow2(-16)
        );
        assert_eq!(
            e5m2.decode(e5m2.encode(pow2(-17), Rounding::NearestEven)),
            0.0
        );
    }

    #[test]
    fn shared_exponent_clamps() {
        assert_eq!(shared_exponent(0.0, 0), -127);
        assert_eq!(shared_exponent(0.0, 2), -127);
        assert_eq!(shared_exponent(1.0, 0), 0);
        assert_eq!(shared_exponent(1.99609375, 0), 0);
        assert_eq!(shared_exponent(6.0, 2), 0);
        assert_eq!(shared_exponent(7.9, 2), 0);
        assert_eq!(shared_exponent(8.0, 2), 1);
        assert_eq!(shared_exponent(448.0, 8), 0);
        assert_eq!(shared_exponent(pow2(-130), 0), -127);
        assert_eq!(shared_exponent(pow2(200), 0), 127);
        assert_eq!(shared_exponent(f64::from(f32::MAX), 0), 127);
        assert_eq!(shared_exponent(f64::from(f32::MAX), 2), 125);

        // f32 just below 2 must not widen or round into the next binade.
        let below_two = f32::from_bits(2.0f32.to_bits() - 1);
        assert_eq!(shared_exponent(f64::from(below_two), 0), 0);
    }

    // Every literal is an exact binary fraction, so the f32 values are exact.
    #[allow(clippy::excessive_precision)]
    const F1_BLOCK: [f32; 10] = [
        1.99609375,
        1.98828125,
        0.0,
        0.00390625,
        0.0078125,
        0.01171875,
        -0.015625,
        -0.01171875,
        -0.0078125,
        -0.00390625,
    ];

    #[test]
    fn mx_int8_block_nearest_away() {
        // Step 2^-6 at shared exponent 0, so the block in steps is
        // [127.75, 127.25, 0, 0.25, 0.5, 0.75, -1, -0.75, -0.5, -0.25].
        let (scale, q, dequantized) =
            quantize_mx_int_block(&F1_BLOCK, IntFormat::new(8), Rounding::NearestAway);
        assert_eq!(scale, E8m0(127));
        assert_eq!(q, [127, 127, 0, 0, 1, 1, -1, -1, -1, 0]);
        let expected = [
            1.984375, 1.984375, 0.0, 0.0, 0.015625, 0.015625, -0.015625, -0.015625, -0.015625, 0.0,
        ];
        assert_eq!(dequantized, expected);
    }

    #[test]
    fn mx_int8_block_nearest_even() {
        // Indices 4 and 8 are exact ties (±0.5 steps) and go to the even value 0.
        let (scale, q, dequantized) =
            quantize_mx_int_block(&F1_BLOCK, IntFormat::new(8), Rounding::NearestEven);
        assert_eq!(scale, E8m0(127));
        assert_eq!(q, [127, 127, 0, 0, 0, 1, -1, -1, 0, 0]);
        let expected = [
            1.984375, 1.984375, 0.0, 0.0, 0.0, 0.015625, -0.015625, -0.015625, 0.0, 0.0,
        ];
        assert_eq!(dequantized, expected);
    }

    #[test]
    fn mx_fp4_block_matches_elements() {
        let block = [6.0f32, -3.0, 0.75, 0.2, 5.0, 12.5];
        let (scale, codes, dequantized) =
            quantize_mx_fp_block(&block, FpKind::E2M1.format(), Rounding::NearestEven);
        // max |x| = 12.5, floor(log2) = 3, minus E2M1 emax 2 gives shared exponent 1, so the
        // element inputs are [3, -1.5, 0.375, 0.1, 2.5, 6.25]. 2.5 is a tie between 2 and 3.
        assert_eq!(scale, E8m0(128));
        assert_eq!(codes, [0x5, 0xB, 0x1, 0x0, 0x4, 0x7]);
        assert_eq!(dequantized, [6.0, -3.0, 1.0, 0.0, 4.0, 12.0]);
    }

    #[test]
    fn zero_block_decodes_to_zero() {
        let block = [0.0f32, -0.0, 0.0, 0.0];
        for rounding in ROUNDINGS {
            let (scale, q, dequantized) =
                quantize_mx_int_block(&block, IntFormat::new(8), rounding);
            assert_eq!(scale, E8m0(0));
            assert!(q.iter().all(|&value| value == 0), "INT8 q {q:?}");
            assert!(
                dequantized.iter().all(|&value| value == 0.0),
                "INT8 {dequantized:?}"
            );

            for kind in FpKind::ALL {
                let (scale, codes, dequantized) =
                    quantize_mx_fp_block(&block, kind.format(), rounding);
                assert_eq!(scale, E8m0(0), "{kind:?} scale");
                assert!(
                    codes.iter().all(|&code| code == 0),
                    "{kind:?} codes {codes:?}"
                );
                assert!(
                    dequantized.iter().all(|&value| value == 0.0),
                    "{kind:?} {dequantized:?}"
                );
            }
        }
    }

    #[test]
    fn tiny_block_clamps_scale() {
        let block = [pow2(-130) as f32, -(pow2(-131) as f32), pow2(-132) as f32];
        assert!(block.iter().all(|x| x.is_subnormal()));

        // INT4 step is 2^(-127 - 2) = 2^-129, so 2^-130 is exactly half a step.
        let int4 = IntFormat::new(4);
        let (scale, q, dequantized) = quantize_mx_int_block(&block, int4, Rounding::NearestEven);
        assert_eq!(scale, E8m0(0));
        assert_eq!(q, [0, 0, 0]);
        assert_eq!(dequantized, [0.0, 0.0, 0.0]);
        let (scale, q, dequantized) = quantize_mx_int_block(&block, int4, Rounding::NearestAway);
        assert_eq!(scale, E8m0(0));
        assert_eq!(q, [1, 0, 0], "the half-step tie rounds away from zero");
        assert_eq!(dequantized, [pow2(-129), 0.0, 0.0]);

        // At scale 2^-127 the largest E2M1 input is 2^-3, below half of the smallest
        // subnormal 0.5.
        for rounding in ROUNDINGS {
            let (scale, codes, dequantized) =
                quantize_mx_fp_block(&block, FpKind::E2M1.format(), rounding);
            assert_eq!(scale, E8m0(0));
            assert_eq!(codes, [0, 0, 0]);
            assert_eq!(dequantized, [0.0, 0.0, 0.0]);
        }
    }

    #[test]
    #[should_panic(expected = "element 1")]
    fn mx_block_rejects_nan() {
        quantize_mx_fp_block(
            &[1.0, f32::NAN],
            FpKind::E2M1.format(),
            Rounding::NearestEven,
        );
    }

    /// Picks a shared exponent within `offset` of the one an MX block led by `x` would use,
    /// or `any_exponent` when `use_any` is set.
    fn pick_shared_exponent(
        x: f32,
        emax: i32,
        offset: i32,
        any_exponent: i32,
        use_any: bool,
    ) -> i32 {
        if use_any {
            any_exponent
        } else {
            shared_exponent(f64::from(x), emax) + offset
        }
    }

    fn rounding_from_flag(away: bool) -> Rounding {
        if away {
            Rounding::NearestAway
        } else {
            Rounding::NearestEven
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn fp_encode_is_nearest(
            x_bits in any::<u32>(),
            cleared_bits in 0u32..=23,
            kind_index in 0usize..FpKind::ALL.len(),
            offset in -6i32..=6,
            any_exponent in -127i32..=127,
            use_any in any::<bool>(),
            away in any::<bool>(),
        ) {
            // Clearing low mantissa bits makes exact ties between two codes common.
            let x = f32::from_bits(x_bits & !((1u32 << cleared_bits) - 1));
            prop_assume!(x.is_finite());
            let format = FpKind::ALL[kind_index].format();
            let rounding = rounding_from_flag(away);
            let exponent = pick_shared_exponent(x, format.emax(), offset, any_exponent, use_any);
            let v = ldexp(f64::from(x), -exponent);

            let code = format.encode(v, rounding);
            prop_assert!(format.is_finite_code(code), "code {:#x} is not finite", code);

            let magnitude_code = code & format.magnitude_mask();
            if magnitude_code == 0 {
                prop_assert_eq!(code, 0, "zero must be encoded as +0");
            } else {
                prop_assert_eq!(code & format.sign_bit() != 0, v < 0.0, "sign of code {:#x}", code);
            }

            // Magnitudes increase with the code, so the nearest value is the code itself
            // or one of its two neighbours.
            let target = v.abs();
            let distance = (target - format.decode(magnitude_code)).abs();
            let mut neighbours = Vec::new();
            if magnitude_code > 0 {
                neighbours.push(magnitude_code - 1);
            }
            if magnitude_code < format.max_finite_code() {
                neighbours.push(magnitude_code + 1);
            }
            for neighbour in neighbours {
                let neighbour_distance = (target - format.decode(neighbour)).abs();
                prop_assert!(
                    distance <= neighbour_distance,
                    "{} -> code {:#x} is farther than code {:#x}", v, code, neighbour
                );
                // Equal distances mean a real tie only up to the max finite value. Above it,
                // both distances can round to the same large number.
                if distance == neighbour_distance && target <= format.max_finite() {
                    match rounding {
                        Rounding::NearestEven => prop_assert!(
                            magnitude_code.is_multiple_of(2),
                            "tie at {} picked odd code {:#x}", v, code
                        ),
                        Rounding::NearestAway => prop_assert!(
                            magnitude_code > neighbour,
                            "tie at {} picked the smaller code {:#x}", v, code
                        ),
                    }
                }
            }
        }

        #[test]
        fn int_quantize_is_nearest(
            x_bits in any::<u32>(),
            cleared_bits in 0u32..=23,
            bits in 2u32..=8,
            offset in -6i32..=6,
            any_exponent in -127i32..=127,
            use_any in any::<bool>(),
            away in any::<bool>(),
        ) {
            // Clearing low mantissa bits makes exact ties between two codes common.
            let x = f32::from_bits(x_bits & !((1u32 << cleared_bits) - 1));
            prop_assume!(x.is_finite());
            let format = IntFormat::new(bits);
            let rounding = rounding_from_flag(away);
            let exponent = pick_shared_exponent(x, format.emax(), offset, any_exponent, use_any);
            let target = f64::from(x);

            let q = format.quantize(target, exponent, rounding);
            let max = format.max_magnitude();
            prop_assert!(q.abs() <= max, "q {} exceeds max magnitude {}", q, max);

            let distance = (target - format.value(q, exponent)).abs();
            for neighbour in [q - 1, q + 1] {
                if neighbour.abs() > max {
                    continue;
                }
                let neighbour_distance = (target - format.value(neighbour, exponent)).abs();
                prop_assert!(
                    distance <= neighbour_distance,
                    "{} -> q {} is farther than q {}", target, q, neighbour
                );
                if distance == neighbour_distance && target.abs() <= format.value(max, exponent) {
                    match rounding {
                        Rounding::NearestEven => prop_assert!(
                            q % 2 == 0,
                            "tie at {} picked odd q {}", target, q
                        ),
                        Rounding::NearestAway => prop_assert!(
                            q.abs() > neighbour.abs(),
                            "tie at {} picked q {} closer to zero", target, q
                        ),
                    }
                }
            }
        }
    }
}
