//! Dense row-major `f32` helpers shared by the reference models.
//!
//! Every function accumulates in `f32` in a fixed order, so results do not depend on the
//! number of threads or on the caller's batch layout.

/// Multiplies `a` (`[m, k]`) by `b` (`[k, n]`) and returns the `[m, n]` product.
///
/// Each output element is summed over `k` in index order in `f32`.
///
/// # Panics
///
/// Panics if `a.len() != m * k` or `b.len() != k * n`.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(a.len(), m * k, "matmul: left operand must be [{m}, {k}]");
    assert_eq!(b.len(), k * n, "matmul: right operand must be [{k}, {n}]");
    let mut out = vec![0.0f32; m * n];
    if n == 0 || k == 0 {
        return out;
    }

    // Four rows of `a` share each loaded row of `b`. The inner loops run over contiguous
    // output columns, which the compiler vectorizes.
    const ROWS: usize = 4;
    let mut out_blocks = out.chunks_exact_mut(ROWS * n);
    let mut a_blocks = a.chunks_exact(ROWS * k);
    for (out_block, a_block) in (&mut out_blocks).zip(&mut a_blocks) {
        let (out0, rest) = out_block.split_at_mut(n);
        let (out1, rest) = rest.split_at_mut(n);
        let (out2, out3) = rest.split_at_mut(n);
        for (p, b_row) in b.chunks_exact(n).enumerate() {
            let (a0, a1, a2, a3) = (
                a_block[p],
                a_block[k + p],
                a_block[2 * k + p],
                a_block[3 * k + p],
            );
            for j in 0..n {
                let b_value = b_row[j];
                out0[j] += a0 * b_value;
                out1[j] += a1 * b_value;
                out2[j] += a2 * b_value;
                out3[j] += a3 * b_value;
            }
        }
    }
    for (out_row, a_row) in out_blocks
        .into_remainder()
        .chunks_exact_mut(n)
        .zip(a_blocks.remainder().chunks_exact(k))
    {
        for (a_value, b_row) in a_row.iter().zip(b.chunks_exact(n)) {
            for (out_value, b_value) in out_row.iter_mut().zip(b_row) {
                *out_value += a_value * b_value;
            }
        }
    }
    out
}

/// Returns the transpose of the row-major `[rows, cols]` matrix `a`, as `[cols, rows]`.
///
/// # Panics
///
/// Panics if `a.len() != rows * cols`.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(
        a.len(),
        rows * cols,
        "transpose: operand must be [{rows}, {cols}]"
    );
    let mut out = vec![0.0f32; a.len()];
    for (r, row) in a.chunks_exact(cols.max(1)).enumerate() {
        for (c, value) in row.iter().enumerate() {
            out[c * rows + r] = *value;
        }
    }
    out
}

/// Returns the dot product of two equally long vectors, summed in index order in `f32`.
///
/// # Panics
///
/// Panics if the lengths differ.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: vectors of different lengths");
    let mut sum = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

/// Applies RMSNorm to each row of `x`: `x / sqrt(mean(x²) + eps) * gamma`.
///
/// The row width is `gamma.len()`. Returns a new `[rows, width]` buffer.
///
/// # Panics
///
/// Panics if `x.len()` is not a multiple of `gamma.len()`, or if `gamma` is empty.
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let width = gamma.len();
    assert!(width > 0, "rms_norm: gamma is empty");
    assert_eq!(
        x.len() % width,
        0,
        "rms_norm: input length is not a multiple of {width}"
    );
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let mean_square = dot(row, row) / width as f32;
        let inverse_rms = 1.0 / (mean_square + eps).sqrt();
        out.extend(
            row.iter()
                .zip(gamma)
                .map(|(value, g)| value * inverse_rms * g),
        );
    }
    out
}

/// Applies LayerNorm to each row of `x`: `(x - mean) / sqrt(var + eps) * gamma + beta`, with
/// the biased (population) variance, as in PyTorch's `nn.LayerNorm`.
///
/// The row width is `gamma.len()`. Returns a new `[rows, width]` buffer.
///
/// # Panics
///
/// Panics if `beta` and `gamma` differ in length, if `gamma` is empty, or if `x.len()` is
/// not a multiple of the width.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let width = gamma.len();
    assert!(width > 0, "layer_norm: gamma is empty");
    assert_eq!(
        beta.len(),
        width,
        "layer_norm: beta and gamma differ in length"
    );
    assert_eq!(
        x.len() % width,
        0,
        "layer_norm: input length is not a multiple of {width}"
    );
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let mean = row.iter().sum::<f32>() / width as f32;
        let variance = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / width as f32;
        let inverse_std = 1.0 / (variance + eps).sqrt();
        for ((value, g), b) in row.iter().zip(gamma).zip(beta) {
            out.push((value - mean) * inverse_std * g + b);
        }
    }
    out
}

/// Replaces `row` by its softmax, subtracting the maximum first so that `exp` cannot
/// overflow. An empty row is left unchanged.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for value in row.iter_mut() {
        *value = (*value - max).exp();
        sum += *value;
    }
    for value in row.iter_mut() {
        *value /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward triple loop with the same summation order as [`matmul`].
    fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0.0f32;
                for p in 0..k {
                    sum += a[i * k + p] * b[p * n + j];
                }
                out[i * n + j] = sum;
            }
        }
        out
    }

    /// Deterministic values in [-1, 1) that are not all representable in few bits.
    fn values(count: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_matches_naive_bit_for_bit() {
        for (m, k, n) in [
            (1, 1, 1),
            (3, 5, 2),
            (4, 7, 9),
            (9, 16, 13),
            (128, 32, 5),
            (6, 0, 3),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            assert_eq!(
                matmul(&a, &b, m, k, n),
                naive_matmul(&a, &b, m, k, n),
                "{m}x{k}x{n}"
            );
        }
    }

    #[test]
    fn matmul_small_example() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
        assert_eq!(matmul(&a, &b, 2, 3, 2), vec![58.0, 64.0, 139.0, 154.0]);
    }

    #[test]
    fn transpose_swaps_indices() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(transpose(&a, 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(transpose(&[], 0, 3), Vec::<f32>::new());
    }

    #[test]
    fn rms_norm_scales_rows() {
        let out = rms_norm(&[3.0, 4.0, 0.0, 0.0], &[1.0, 2.0], 0.0);
        let inverse_rms = 1.0 / 12.5f32.sqrt();
        assert_eq!(out[0], 3.0 * inverse_rms);
        assert_eq!(out[1], 4.0 * inverse_rms * 2.0);
        assert!(
            out[2..].iter().all(|v| v.is_nan()),
            "0/0 without eps is NaN: {out:?}"
        );
        let with_eps = rms_norm(&[0.0, 0.0], &[1.0, 1.0], 1e-6);
        assert_eq!(with_eps, vec![0.0, 0.0]);
    }

    #[test]
    fn layer_norm_centers_rows() {
        let out = layer_norm(&[1.0, 3.0], &[1.0, 1.0], &[0.5, 0.0], 0.0);
        assert_eq!(out, vec![-0.5, 1.0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut row = [1000.0, 1000.0, f32::NEG_INFINITY];
        softmax_in_place(&mut row);
        assert_eq!(row, [0.5, 0.5, 0.0]);
        let mut row = [0.0, 2.0f32.ln()];
        softmax_in_place(&mut row);
        assert!((row[0] - 1.0 / 3.0).abs() < 1e-7, "{row:?}");
        assert!((row[1] - 2.0 / 3.0).abs() < 1e-7, "{row:?}");
    }
}
