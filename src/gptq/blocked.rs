//! Cache-blocked versions of the factorisations in [`super::reference`] that return the same
//! bits.
//!
//! Every entry of the reference is a sum (or a chain of subtractions) over an index p in
//! increasing order, started from a fixed value. The blocked code keeps, for each entry, the
//! same start value, the same terms, the same order of p and the same final operation. It
//! only changes which entries are computed together. A register tile of W consecutive
//! entries of a row times NR broadcast values runs the p loop for W x NR entries at once.
//! Panels of [`PANEL`] rows or columns keep the operands of a tile in cache. A partial sum is
//! kept in a register or stored as an f64, which does not round it.
//!
//! The element-wise f64 multiplications, additions, subtractions, divisions and square roots
//! are correctly rounded IEEE 754 operations whether they run in scalar, SSE2 or AVX2
//! registers. Rust never fuses a multiplication and an addition into an FMA unless the code
//! calls `mul_add`, and no code here does, so the results do not depend on the CPU or on the
//! kernel that [`inverse_cholesky_upper`] selects at run time.
//!
//! Two steps of [`reference::inverse_from_cholesky`] take terms that the blocked code adds
//! in the same order but shapes differently, and both are exact only for finite values: the
//! reference skips a zero coefficient of L, and the blocked tile also subtracts the products
//! with the zero entries of L^-1 above the diagonal. Subtracting a zero from an entry that
//! started at +0 or 1 and was only ever reduced by subtraction leaves its bits unchanged,
//! because such an entry is never -0. The tile needs finite factors for that, so a factor or
//! an inverse with a NaN or infinite entry sends the whole computation to the reference.

use super::reference;

/// Rows or columns per panel. A multiple of every tile width W and tile height NR below.
const PANEL: usize = 32;

/// Returns the leading dimension of the padded working matrices.
fn padded(n: usize) -> usize {
    n.next_multiple_of(PANEL).max(PANEL)
}

/// Returns the upper Cholesky factor U of H^-1 for the `n x n` row-major `h`, or the index
/// of a failed pivot, with the same bits as [`reference::inverse_cholesky_upper`].
///
/// Uses AVX2 registers when the CPU has them and SSE2 otherwise; both give the same bits.
pub fn inverse_cholesky_upper(h: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2::inverse_cholesky_upper(h, n) };
    }
    inverse_cholesky_upper_tiled::<4, 4>(h, n)
}

/// [`inverse_cholesky_upper`] with the portable tile, for the tests that compare kernels.
pub fn inverse_cholesky_upper_portable(h: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    inverse_cholesky_upper_tiled::<4, 4>(h, n)
}

/// Returns the lower Cholesky factor of the `n x n` row-major `a`, with the same bits and
/// errors as [`reference::cholesky_lower`].
pub fn cholesky_lower(a: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    assert_eq!(a.len(), n * n, "cholesky_lower needs an {n} x {n} matrix");
    let ld = padded(n);
    let upper = cholesky_upper_form::<4, 4>(&upper_form(a, n, ld), n, ld)?;
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        for i in j..n {
            l[i * n + j] = upper[j * ld + i];
        }
    }
    Ok(l)
}

/// Returns A^-1 from the lower Cholesky factor L of A, with the same bits as
/// [`reference::inverse_from_cholesky`].
pub fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    let ld = padded(n);
    let mut upper = vec![0.0; ld * ld];
    for i in 0..n {
        for j in 0..=i {
            upper[j * ld + i] = l[i * n + j];
        }
    }
    if !all_finite(&upper) {
        return reference::inverse_from_cholesky(l, n);
    }
    let v = lower_inverse::<4, 4>(&upper, n, ld);
    if !all_finite(&v) {
        return reference::inverse_from_cholesky(l, n);
    }
    let inverse_upper = inverse_upper_form::<4, 4>(&v, n, ld);
    let mut inverse = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            inverse[i * n + j] = inverse_upper[i * ld + j];
            inverse[j * n + i] = inverse_upper[i * ld + j];
        }
    }
    inverse
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    /// Computes the factorisation with AVX2 tiles of 8 lanes (two 256-bit registers) times 4
    /// broadcast values. FMA stays disabled, so the operations match the portable ones.
    #[target_feature(enable = "avx2")]
    pub(super) fn inverse_cholesky_upper(h: &[f64], n: usize) -> Result<Vec<f64>, usize> {
        super::inverse_cholesky_upper_tiled::<8, 4>(h, n)
    }

    /// Applies the batch update with AVX2 registers and the tile of the portable version.
    #[target_feature(enable = "avx2")]
    pub(super) fn subtract_batch_errors(update: &mut super::BatchUpdate<'_>) {
        super::subtract_batch_errors_tiled::<8, 4>(update)
    }
}

fn all_finite(values: &[f64]) -> bool {
    values.iter().all(|v| v.is_finite())
}

/// Computes [`inverse_cholesky_upper`] with tiles of W lanes times NR broadcast values.
#[inline(always)]
fn inverse_cholesky_upper_tiled<const W: usize, const NR: usize>(
    h: &[f64],
    n: usize,
) -> Result<Vec<f64>, usize> {
    assert_eq!(h.len(), n * n, "inverse_cholesky_upper needs an {n} x {n} matrix");
    let ld = padded(n);
    let l_upper = cholesky_upper_form::<W, NR>(&upper_form(h, n, ld), n, ld)?;
    if !all_finite(&l_upper) {
        return reference::inverse_cholesky_upper(h, n);
    }
    let v = lower_inverse::<W, NR>(&l_upper, n, ld);
    if !all_finite(&v) {
        return reference::inverse_cholesky_upper(h, n);
    }
    drop(l_upper);
    let inverse_upper = inverse_upper_form::<W, NR>(&v, n, ld);
    drop(v);
    let factor = cholesky_upper_form::<W, NR>(&inverse_upper, n, ld)?;
    // Row i of the upper form of the factor L of H^-1 is column i of L, which is row i of U.
    let mut upper = vec![0.0; n * n];
    for i in 0..n {
        upper[i * n + i..(i + 1) * n].copy_from_slice(&factor[i * ld + i..i * ld + n]);
    }
    if all_finite(&upper) {
        Ok(upper)
    } else {
        Err(n)
    }
}

/// Returns the lower triangle of the `n x n` row-major `a` transposed into the upper triangle
/// of an `ld x ld` matrix: entry (j, i) for i >= j is a[i][j]. Everything else is +0.
fn upper_form(a: &[f64], n: usize, ld: usize) -> Vec<f64> {
    let mut at = vec![0.0; ld * ld];
    for i0 in (0..n).step_by(PANEL) {
        for j0 in (0..=i0).step_by(PANEL) {
            for i in i0..(i0 + PANEL).min(n) {
                for j in j0..(j0 + PANEL).min(i + 1) {
                    at[j * ld + i] = a[i * n + j];
                }
            }
        }
    }
    at
}

/// Factorises the symmetric matrix whose lower triangle `at` contains in upper form (see
/// [`upper_form`]) and returns its Cholesky factor L in upper form. Row j contains column j
/// of L from the diagonal on, and every other entry in the `n x n` corner is +0.
///
/// The bits and the error are those of [`reference::cholesky_lower`]: entry (i, j) is
/// (a[i][j] - s) / L[j][j], with s the sum from -0 of L[i][p] L[j][p] over p < j in
/// increasing order. A panel of columns first receives the terms of every earlier column as
/// a tiled product, and then the terms of its own columns one column after the other.
#[inline(always)]
fn cholesky_upper_form<const W: usize, const NR: usize>(
    at: &[f64],
    n: usize,
    ld: usize,
) -> Result<Vec<f64>, usize> {
    let mut lt = vec![0.0; ld * ld];
    for j0 in (0..n).step_by(PANEL) {
        let j1 = (j0 + PANEL).min(n);
        let (done, panel) = lt.split_at_mut(j0 * ld);
        let panel = &mut panel[..PANEL * ld];

        // Sums over the columns before the panel, for rows i >= j0 of columns j0..j0 + PANEL.
        for i0 in (j0..ld).step_by(W) {
            for js in (j0..j0 + PANEL).step_by(NR) {
                let mut acc = [[-0.0f64; W]; NR];
                for p in 0..j0 {
                    let row = &done[p * ld..(p + 1) * ld];
                    let a: &[f64; W] = row[i0..i0 + W].try_into().expect("W lanes");
                    let b: &[f64; NR] = row[js..js + NR].try_into().expect("NR values");
                    for (acc_j, &b_j) in acc.iter_mut().zip(b) {
                        for (acc_ij, &a_i) in acc_j.iter_mut().zip(a) {
                            *acc_ij += a_i * b_j;
                        }
                    }
                }
                for (jj, acc_j) in acc.iter().enumerate() {
                    let j = js + jj - j0;
                    panel[j * ld + i0..j * ld + i0 + W].copy_from_slice(acc_j);
                }
            }
        }

        // The panel's own columns, in order.
        for j in j0..j1 {
            let (before, from_j) = panel.split_at_mut((j - j0) * ld);
            let row_j = &mut from_j[..ld];
            for p in j0..j {
                let row_p = &before[(p - j0) * ld..(p - j0 + 1) * ld];
                let coefficient = row_p[j];
                for (s, &l_ip) in row_j[j..n].iter_mut().zip(&row_p[j..n]) {
                    *s += l_ip * coefficient;
                }
            }
            let a_j = &at[j * ld..(j + 1) * ld];
            let pivot = a_j[j] - row_j[j];
            let tolerance = n as f64 * f64::EPSILON * a_j[j].abs();
            let clearly_positive = pivot.is_finite() && pivot > tolerance;
            if !clearly_positive {
                return Err(j);
            }
            let diagonal = pivot.sqrt();
            row_j[j] = diagonal;
            for (s, &a_ij) in row_j[j + 1..n].iter_mut().zip(&a_j[j + 1..n]) {
                *s = (a_ij - *s) / diagonal;
            }
            // The tiled product also filled entries left of the diagonal and in the padding.
            row_j[j0..j].fill(0.0);
            row_j[n..].fill(0.0);
        }
    }
    Ok(lt)
}

/// Returns V = L^-1, row-major `ld x ld`, from L in upper form, with the bits of the first
/// step of [`reference::inverse_from_cholesky`]. L must be finite.
///
/// Entry (i, c) for c <= i starts at 1 on the diagonal and +0 elsewhere, loses
/// L[i][p] V[p][c] for p = c..i in increasing order, and is then divided by L[i][i]. The
/// tiles also subtract the products with the +0 entries V[p][c] for p < c and with zero
/// coefficients, which leaves the bits unchanged (see the module documentation).
#[inline(always)]
fn lower_inverse<const W: usize, const NR: usize>(
    l_upper: &[f64],
    n: usize,
    ld: usize,
) -> Vec<f64> {
    let mut v = vec![0.0; ld * ld];
    for i0 in (0..n).step_by(PANEL) {
        let i1 = (i0 + PANEL).min(n);
        let (done, block) = v.split_at_mut(i0 * ld);
        let block = &mut block[..PANEL * ld];

        // Rows of V before the block, for columns c < i1.
        for c0 in (0..i1).step_by(W) {
            for is in (i0..i0 + PANEL).step_by(NR) {
                // Written lane by lane with constant indices, so that the tile stays in
                // registers.
                let mut acc = [[0.0f64; W]; NR];
                for (ii, acc_i) in acc.iter_mut().enumerate() {
                    for (x, value) in acc_i.iter_mut().enumerate() {
                        if c0 + x == is + ii {
                            *value = 1.0;
                        }
                    }
                }
                for p in c0..i0 {
                    let a: &[f64; W] = done[p * ld + c0..p * ld + c0 + W]
                        .try_into()
                        .expect("W lanes");
                    let b: &[f64; NR] = l_upper[p * ld + is..p * ld + is + NR]
                        .try_into()
                        .expect("NR values");
                    for (acc_i, &b_i) in acc.iter_mut().zip(b) {
                        for (acc_ic, &a_c) in acc_i.iter_mut().zip(a) {
                            *acc_ic -= b_i * a_c;
                        }
                    }
                }
                for (ii, acc_i) in acc.iter().enumerate() {
                    let row = (is + ii - i0) * ld;
                    block[row + c0..row + c0 + W].copy_from_slice(acc_i);
                }
            }
        }

        // The block's own rows, as the reference computes them.
        for i in i0..i1 {
            let (before, from_i) = block.split_at_mut((i - i0) * ld);
            let row = &mut from_i[..ld];
            for p in i0..i {
                let coefficient = l_upper[p * ld + i];
                if coefficient != 0.0 {
                    let earlier = &before[(p - i0) * ld..(p - i0) * ld + p + 1];
                    for (value, earlier) in row[..=p].iter_mut().zip(earlier) {
                        *value -= coefficient * earlier;
                    }
                }
            }
            let diagonal = l_upper[i * ld + i];
            for value in &mut row[..=i] {
                *value /= diagonal;
            }
            // The tiles wrote +0 right of the diagonal and the reference keeps +0 there.
            debug_assert!(row[i + 1..].iter().all(|v| v.to_bits() == 0));
        }
    }
    v
}

/// Returns H^-1 = V^T V in upper form (entry (c, r) for r >= c is H^-1[r][c]) from
/// V = L^-1, with the bits of the second step of [`reference::inverse_from_cholesky`].
///
/// Entry (c, r) is the sum from -0 of V[p][c] V[p][r] over p = r..n in increasing order. A
/// tile covers NR values of r, so its first NR values of p add only to the entries whose r
/// they have reached.
#[inline(always)]
fn inverse_upper_form<const W: usize, const NR: usize>(v: &[f64], n: usize, ld: usize) -> Vec<f64> {
    let mut inverse = vec![0.0; ld * ld];
    for r0 in (0..n).step_by(PANEL) {
        let r1 = (r0 + PANEL).min(n);
        for c0 in (0..r1).step_by(W) {
            for rs in (r0..r1).step_by(NR) {
                let mut acc = [[-0.0f64; W]; NR];
                let head_end = (rs + NR).min(n);
                for p in rs..head_end {
                    let a: &[f64; W] = v[p * ld + c0..p * ld + c0 + W]
                        .try_into()
                        .expect("W lanes");
                    for (rr, acc_r) in acc.iter_mut().enumerate().take(p + 1 - rs) {
                        let b_r = v[p * ld + rs + rr];
                        for (acc_cr, &a_c) in acc_r.iter_mut().zip(a) {
                            *acc_cr += a_c * b_r;
                        }
                    }
                }
                for p in head_end..n {
                    let row = &v[p * ld..(p + 1) * ld];
                    let a: &[f64; W] = row[c0..c0 + W].try_into().expect("W lanes");
                    let b: &[f64; NR] = row[rs..rs + NR].try_into().expect("NR values");
                    for (acc_r, &b_r) in acc.iter_mut().zip(b) {
                        for (acc_cr, &a_c) in acc_r.iter_mut().zip(a) {
                            *acc_cr += a_c * b_r;
                        }
                    }
                }
                for (rr, acc_r) in acc.iter().enumerate() {
                    let r = rs + rr;
                    if r >= n {
                        break;
                    }
                    for (x, &value) in acc_r.iter().enumerate() {
                        let c = c0 + x;
                        if c > r {
                            break;
                        }
                        inverse[c * ld + r] = value;
                    }
                }
            }
        }
    }
    inverse
}

/// Lazy update of the channels after a GPTQ batch.
///
/// Channel `targets[t]`, at position `first_position + t`, loses error row j times
/// U[j][position] for each batch position j from `max(applied[t], batch.start)` to
/// `batch.end`, in increasing j. A zero U entry is skipped, as `subtract_scaled` in the column
/// loop does.
pub(super) struct BatchUpdate<'a> {
    /// Weights by input channel, `n_out` values each.
    pub columns: &'a mut [f64],
    pub n_out: usize,
    /// Input channel of each position from `first_position` on.
    pub targets: &'a [usize],
    /// First batch position not yet subtracted, by target.
    pub applied: &'a [usize],
    pub first_position: usize,
    /// Scaled errors of the batch, row j - batch.start, `n_out` values each.
    pub errors: &'a [f64],
    pub batch: std::ops::Range<usize>,
    /// U, `dim x dim` row-major, in channel order.
    pub upper: &'a [f64],
    pub dim: usize,
}

/// Applies a [`BatchUpdate`] with register tiles of 8 weights times 4 channels. Each weight
/// gets the same subtractions in the same order as one call of `subtract_scaled` per error
/// row, so the result is the same bit for bit.
pub(super) fn subtract_batch_errors(update: &mut BatchUpdate<'_>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2::subtract_batch_errors(update) };
    }
    subtract_batch_errors_tiled::<8, 4>(update);
}

#[inline(always)]
fn subtract_batch_errors_tiled<const W: usize, const NR: usize>(update: &mut BatchUpdate<'_>) {
    let n_out = update.n_out;
    let batch_start = update.batch.start;
    let full = n_out - n_out % W;
    for t0 in (0..update.targets.len()).step_by(NR) {
        let tiles = (update.targets.len() - t0).min(NR);
        let first_j = (t0..t0 + tiles)
            .map(|t| update.applied[t].max(batch_start))
            .min()
            .expect("at least one target");
        // Coefficient of row j for each target, 0 where the target already has row j, so that
        // the zero test below skips it as it skips a zero entry of U.
        let mut coefficients: Vec<[f64; NR]> = Vec::with_capacity(update.batch.end - first_j);
        for j in first_j..update.batch.end {
            let mut row = [0.0f64; NR];
            for (tt, c) in row.iter_mut().enumerate().take(tiles) {
                let t = t0 + tt;
                if j >= update.applied[t] {
                    *c = update.upper[j * update.dim + update.first_position + t];
                }
            }
            coefficients.push(row);
        }
        let errors = &update.errors[(first_j - batch_start) * n_out..];
        for n0 in (0..full).step_by(W) {
            let mut acc = [[0.0f64; W]; NR];
            for (tt, acc_t) in acc.iter_mut().enumerate().take(tiles) {
                let k = update.targets[t0 + tt];
                acc_t.copy_from_slice(&update.columns[k * n_out + n0..k * n_out + n0 + W]);
            }
            for (row, error) in coefficients.iter().zip(errors.chunks_exact(n_out)) {
                let e: &[f64; W] = error[n0..n0 + W].try_into().expect("W lanes");
                for (acc_t, &c) in acc.iter_mut().zip(row) {
                    if c != 0.0 {
                        for (w, &e_n) in acc_t.iter_mut().zip(e) {
                            *w -= e_n * c;
                        }
                    }
                }
            }
            for (tt, acc_t) in acc.iter().enumerate().take(tiles) {
                let k = update.targets[t0 + tt];
                update.columns[k * n_out + n0..k * n_out + n0 + W].copy_from_slice(acc_t);
            }
        }
        for n in full..n_out {
            for (tt, &k) in update.targets[t0..t0 + tiles].iter().enumerate() {
                let mut w = update.columns[k * n_out + n];
                for (row, error) in coefficients.iter().zip(errors.chunks_exact(n_out)) {
                    if row[tt] != 0.0 {
                        w -= error[n] * row[tt];
                    }
                }
                update.columns[k * n_out + n] = w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a seeded symmetric positive definite matrix B B^T / k + diag, with some exact zeros.
    fn spd(n: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let k = n + 3;
        let b: Vec<f64> = (0..n * k).map(|_| next()).collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..k).map(|t| b[i * k + t] * b[j * k + t]).sum();
                a[i * n + j] = dot / k as f64;
            }
            a[i * n + i] += 0.01;
        }
        // An isolated channel, as a dead channel becomes after H_kk = 1.
        if n > 5 {
            for j in 0..n {
                a[5 * n + j] = 0.0;
                a[j * n + 5] = 0.0;
            }
            a[5 * n + 5] = 1.0;
        }
        a
    }

    fn bits(values: &[f64]) -> Vec<u64> {
        values.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn blocked_matches_reference_bits() {
        // Sizes below, at and across the panel and tile widths.
        for (n, seed) in [(1, 1), (3, 2), (7, 3), (32, 4), (33, 5), (70, 6), (130, 7)] {
            let a = spd(n, seed);
            let l = reference::cholesky_lower(&a, n).unwrap();
            assert_eq!(bits(&cholesky_lower(&a, n).unwrap()), bits(&l), "L, n = {n}");
            assert_eq!(
                bits(&inverse_from_cholesky(&l, n)),
                bits(&reference::inverse_from_cholesky(&l, n)),
                "inverse, n = {n}"
            );
            let expected = bits(&reference::inverse_cholesky_upper(&a, n).unwrap());
            assert_eq!(
                bits(&inverse_cholesky_upper(&a, n).unwrap()),
                expected,
                "U, n = {n}"
            );
            assert_eq!(
                bits(&inverse_cholesky_upper_portable(&a, n).unwrap()),
                expected,
                "portable U, n = {n}"
            );
        }
    }

    #[test]
    fn blocked_rejects_same_pivot() {
        let mut a = spd(40, 9);
        // Row 37 equals row 36, so pivot 37 vanishes up to rounding.
        for j in 0..40 {
            a[37 * 40 + j] = a[36 * 40 + j];
        }
        for i in 0..40 {
            a[i * 40 + 37] = a[i * 40 + 36];
        }
        let expected = reference::cholesky_lower(&a, 40).unwrap_err();
        assert_eq!(cholesky_lower(&a, 40), Err(expected));
        assert_eq!(inverse_cholesky_upper(&a, 40), Err(expected));
        assert_eq!(cholesky_lower(&[f64::NAN, 0.0, 0.0, 1.0], 2), Err(0));
    }

    #[test]
    fn blocked_handles_empty_matrix() {
        assert_eq!(inverse_cholesky_upper(&[], 0), Ok(vec![]));
        assert_eq!(reference::inverse_cholesky_upper(&[], 0), Ok(vec![]));
    }
}
