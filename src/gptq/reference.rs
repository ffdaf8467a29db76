//! The straightforward f64 factorisations of GPTQ, kept as the reference for the blocked
//! ones in [`super::blocked`].
//!
//! Every function here defines the bits that the blocked version must reproduce, so change
//! neither the formulas nor the order of the sums. The tests in `src/gptq/blocked.rs` and
//! `tests/gptq.rs` compare both bit for bit.

/// Returns the lower Cholesky factor L of the `n x n` row-major matrix `a` (a = L L^T), or
/// the index of the first pivot that is not clearly positive.
///
/// A pivot fails when it is not finite or at most n * ε times its diagonal entry, so a
/// matrix that is singular up to rounding is rejected instead of yielding a huge inverse.
pub fn cholesky_lower(a: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    assert_eq!(a.len(), n * n, "cholesky_lower needs an {n} x {n} matrix");
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let row_j = j * n;
        let sum: f64 = l[row_j..row_j + j].iter().map(|v| v * v).sum();
        let pivot = a[row_j + j] - sum;
        let tolerance = n as f64 * f64::EPSILON * a[row_j + j].abs();
        let clearly_positive = pivot.is_finite() && pivot > tolerance;
        if !clearly_positive {
            return Err(j);
        }
        let diagonal = pivot.sqrt();
        l[row_j + j] = diagonal;
        let (done, rest) = l.split_at_mut((j + 1) * n);
        let factor_j = &done[row_j..row_j + j];
        for (offset, row) in rest.chunks_exact_mut(n).enumerate() {
            let i = j + 1 + offset;
            let dot: f64 = row[..j].iter().zip(factor_j).map(|(x, y)| x * y).sum();
            row[j] = (a[i * n + j] - dot) / diagonal;
        }
    }
    Ok(l)
}

/// Returns A^-1 = L^-T L^-1 from the lower Cholesky factor L of A.
pub fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    // V = L^-1 by forward substitution, row by row: L[i][i] V[i] = e_i - sum over p < i of
    // L[i][p] V[p]. Rows are contiguous, so each step is one vector update.
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        let (done, rest) = v.split_at_mut(i * n);
        let row = &mut rest[..n];
        row[i] = 1.0;
        for p in 0..i {
            let coefficient = l[i * n + p];
            if coefficient != 0.0 {
                for (value, earlier) in row[..=p].iter_mut().zip(&done[p * n..p * n + p + 1]) {
                    *value -= coefficient * earlier;
                }
            }
        }
        let diagonal = l[i * n + i];
        for value in &mut row[..=i] {
            *value /= diagonal;
        }
    }
    // A^-1[i][j] = sum over p >= max(i, j) of V[p][i] V[p][j], a dot product of rows of V^T.
    let mut v_transposed = vec![0.0; n * n];
    for p in 0..n {
        for c in 0..=p {
            v_transposed[c * n + p] = v[p * n + c];
        }
    }
    let mut inverse = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            let row_i = &v_transposed[i * n + j..(i + 1) * n];
            let row_j = &v_transposed[j * n + j..(j + 1) * n];
            let value: f64 = row_i.iter().zip(row_j).map(|(a, b)| a * b).sum();
            inverse[i * n + j] = value;
            inverse[j * n + i] = value;
        }
    }
    inverse
}

/// Returns the upper Cholesky factor U of H^-1 (H^-1 = U^T U) for the `n x n` row-major
/// `h`, or the index of a failed pivot.
///
/// H^-1 comes from the Cholesky factor of H, and U from a second factorisation, all in f64.
/// Row k of U contains the coefficients with which channel k's error updates later channels.
pub fn inverse_cholesky_upper(h: &[f64], n: usize) -> Result<Vec<f64>, usize> {
    let l = cholesky_lower(h, n)?;
    let inverse = inverse_from_cholesky(&l, n);
    let l_inverse = cholesky_lower(&inverse, n)?;
    let mut upper = vec![0.0; n * n];
    for i in 0..n {
        for j in i..n {
            upper[i * n + j] = l_inverse[j * n + i];
        }
    }
    if upper.iter().all(|v| v.is_finite()) {
        Ok(upper)
    } else {
        Err(n)
    }
}
