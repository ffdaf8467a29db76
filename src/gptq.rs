//! GPTQ for the MicroScopiQ quantizer: quantize a layer one input channel at a time and feed
//! each channel's error into the channels that are not quantized yet.
//!
//! For W `[N_out, K_in]` (PyTorch layout) and a layer Hessian H (see [`crate::hessian`]):
//!
//! 1. A dead channel (H_kk = 0, its input is always zero) gets H_kk = 1 and zero weights.
//! 2. λ = `damping_fraction` * mean(diag H) is added to the diagonal. While the f64 Cholesky
//!    factorisation fails, λ grows geometrically up to a limit. A layer that still cannot be
//!    factorised is quantized with round to nearest, with a warning.
//! 3. U is the upper Cholesky factor of H^-1, with H^-1 computed from the Cholesky factor
//!    of H.
//! 4. Channels run in index order, or by descending H_kk with `act_order`, in lazy batches of
//!    `block_size`. Inside a batch each channel's error updates the later channels of the
//!    batch at once, and the channels after the batch receive the whole batch's update when
//!    it ends.
//! 5. For channel k, every micro-block is planned on the current weights: outliers from the
//!    configured statistics scope, pruning by the saliency w^2 / U_kk^2 (one U_kk per
//!    channel, so the ranking is by |w|), and ReCoN routing. A macro-block's base exponents
//!    are fixed when its first channel is reached, from the current weights of its R
//!    channels, after the pending updates of the batch are applied to them. The micro-blocks
//!    are then encoded, and the error err = (w - q) / U_kk, with q the dequantized value (the
//!    outlier's full value, 0 in a pruned slot), updates every later channel l by
//!    w_l -= err * U[k, l].
//!
//! With H = I no channel receives an update, so the result equals [`quantizer::quantize`]
//! bit for bit.
//!
//! The factorisations run cache-blocked ([`blocked`]) and return the same bits as the
//! straightforward code in [`reference`], which [`Factorizer::Reference`] selects.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Resolved;
use crate::formats::E8m0;
use crate::hessian::Hessian;
use crate::image;
use crate::quantizer::{self, Columns, EncodedBlock, MicroBlock, QuantizedLayer};
use crate::weights::Matrix;

pub mod blocked;
pub mod reference;

pub use blocked::{cholesky_lower, inverse_cholesky_upper};

/// Implementation of the factorisations of H. Both give the same bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Factorizer {
    /// Cache-blocked tiles ([`blocked`]).
    #[default]
    Blocked,
    /// The straightforward loops ([`reference`]), slower by a large factor.
    Reference,
}

/// Wall time of the two phases of one GPTQ run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTimes {
    /// Dead channels, channel order, permutation and every factorisation attempt.
    pub factorization: Duration,
    /// The column loop and the assembly of the quantized layer, or the round-to-nearest
    /// fallback.
    pub columns: Duration,
}

/// Settings of the GPTQ column loop.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GptqOptions {
    /// First damping, as a fraction of the mean diagonal of H.
    pub damping_fraction: f64,
    /// Channels per lazy batch.
    pub block_size: usize,
    /// Quantize the channels by descending H_kk (act-order) instead of by index.
    pub act_order: bool,
    /// Factor by which the damping grows after each failed factorisation.
    pub damping_growth: f64,
    /// Factorisations tried after the first one before falling back to round to nearest.
    pub max_damping_retries: u32,
}

impl Default for GptqOptions {
    fn default() -> GptqOptions {
        GptqOptions {
            damping_fraction: 0.01,
            block_size: 128,
            act_order: false,
            damping_growth: 10.0,
            max_damping_retries: 6,
        }
    }
}

/// Smallest fraction of the mean diagonal that a retry starts growing from, so that a
/// `damping_fraction` of 0 still retries with a nonzero damping.
const MIN_RETRY_DAMPING: f64 = 0.01;

/// An invalid GPTQ input.
#[derive(Clone, Debug, PartialEq)]
pub enum GptqError {
    /// The Hessian's size differs from the layer's input channels.
    HessianShape {
        layer: String,
        dim: usize,
        k_in: usize,
    },
    /// The Hessian contains a NaN or infinite entry.
    NonFiniteHessian {
        layer: String,
        row: usize,
        col: usize,
        value: f64,
    },
}

impl fmt::Display for GptqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GptqError::HessianShape { layer, dim, k_in } => write!(
                f,
                "GPTQ of `{layer}`: the Hessian is {dim} x {dim}, but the layer has {k_in} input \
                 channels; accumulate the Hessian from this layer's inputs"
            ),
            GptqError::NonFiniteHessian {
                layer,
                row,
                col,
                value,
            } => write!(
                f,
                "GPTQ of `{layer}`: the Hessian entry [{row}, {col}] is {value}; rebuild it from \
                 finite calibration inputs"
            ),
        }
    }
}

impl std::error::Error for GptqError {}

/// A successful factorisation: U and the damping it needed.
#[derive(Clone, Debug, PartialEq)]
pub struct Factorization {
    /// Upper Cholesky factor of (H + λI)^-1, `dim x dim` row-major.
    pub upper: Vec<f64>,
    pub dim: usize,
    /// λ added to the diagonal.
    pub damping: f64,
    /// λ as a fraction of the mean diagonal of H.
    pub relative_damping: f64,
    /// Failed factorisations before this one.
    pub retries: u32,
}

/// Facts of one GPTQ run besides the quantized layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GptqInfo {
    /// λ added to the diagonal of H, or `None` after the fallback to round to nearest.
    pub damping: Option<f64>,
    /// λ as a fraction of the mean diagonal of H.
    pub relative_damping: Option<f64>,
    /// Failed factorisations before the one used (or before the fallback).
    pub damping_retries: u32,
    /// Input channels with H_kk = 0. Their weights were set to zero unless the layer fell
    /// back to round to nearest.
    pub dead_channels: Vec<usize>,
    /// True when the layer was quantized with round to nearest, because H could not be
    /// factorised or the updated weights overflowed.
    pub fell_back_to_rtn: bool,
    /// Order in which the input channels were quantized.
    pub order: Vec<usize>,
}

/// Sets H_kk = 1 for every channel with H_kk = 0 and returns those channels.
pub fn fix_dead_channels(h: &mut Hessian) -> Vec<usize> {
    let dim = h.dim;
    let dead: Vec<usize> = (0..dim).filter(|&k| h.values[k * dim + k] == 0.0).collect();
    for &k in &dead {
        h.values[k * dim + k] = 1.0;
    }
    dead
}

/// Factorises H + λI, starting at λ = `damping_fraction` * mean(diag H) and growing λ by
/// `damping_growth` after each failure, for at most `max_damping_retries` retries.
///
/// Returns the last damping tried and the retry count when every attempt failed.
pub fn factorize(h: &Hessian, options: &GptqOptions) -> Result<Factorization, (f64, u32)> {
    factorize_with(h, options, Factorizer::Blocked)
}

/// [`factorize`] with the given implementation of the factorisations.
pub fn factorize_with(
    h: &Hessian,
    options: &GptqOptions,
    factorizer: Factorizer,
) -> Result<Factorization, (f64, u32)> {
    let n = h.dim;
    let mean_diagonal = if n == 0 {
        0.0
    } else {
        h.diagonal().iter().sum::<f64>() / n as f64
    };
    let mut relative = options.damping_fraction;
    let mut damped = h.values.clone();
    for retries in 0..=options.max_damping_retries {
        if retries > 0 {
            relative = relative.max(MIN_RETRY_DAMPING) * options.damping_growth;
        }
        let damping = relative * mean_diagonal;
        for k in 0..n {
            damped[k * n + k] = h.values[k * n + k] + damping;
        }
        let upper = match factorizer {
            Factorizer::Blocked => inverse_cholesky_upper(&damped, n),
            Factorizer::Reference => reference::inverse_cholesky_upper(&damped, n),
        };
        if let Ok(upper) = upper {
            return Ok(Factorization {
                upper,
                dim: n,
                damping,
                relative_damping: relative,
                retries,
            });
        }
    }
    Err((relative, options.max_damping_retries))
}

/// Returns the channel order: index order, or by descending H_kk (ties in index order).
fn channel_order(h: &Hessian, act_order: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..h.dim).collect();
    if act_order {
        let diagonal = h.diagonal();
        order.sort_by(|&a, &b| diagonal[b].total_cmp(&diagonal[a]));
    }
    order
}

/// Returns `h` with rows and columns reordered: entry (a, b) is h[order[a], order[b]].
fn permute(h: &Hessian, order: &[usize]) -> Hessian {
    let n = h.dim;
    let mut values = vec![0.0; n * n];
    for (a, &i) in order.iter().enumerate() {
        for (b, &j) in order.iter().enumerate() {
            values[a * n + b] = h.values[i * n + j];
        }
    }
    Hessian::new(n, values)
}

/// Quantizes `weights` with GPTQ under the layer Hessian `hessian`.
///
/// Returns an error when the Hessian does not match the layer or contains a non-finite entry.
/// A Hessian that cannot be factorised even with the largest damping, or weights that
/// overflow during the updates, give the round-to-nearest layer with `fell_back_to_rtn` set
/// and a warning on stderr. A factorisation that needed retries is logged on stderr.
pub fn quantize_gptq(
    weights: &Matrix,
    hessian: &Hessian,
    r: &Resolved,
    options: &GptqOptions,
) -> Result<(QuantizedLayer, GptqInfo), GptqError> {
    quantize_gptq_timed(weights, hessian, r, options, Factorizer::Blocked)
        .map(|(layer, info, _)| (layer, info))
}

/// [`quantize_gptq`] with the given implementation of the factorisations, also returning the
/// time of each phase.
pub fn quantize_gptq_timed(
    weights: &Matrix,
    hessian: &Hessian,
    r: &Resolved,
    options: &GptqOptions,
    factorizer: Factorizer,
) -> Result<(QuantizedLayer, GptqInfo, PhaseTimes), GptqError> {
    let start = Instant::now();
    let mut times = PhaseTimes::default();
    let name = &weights.name;
    if hessian.dim != weights.cols {
        return Err(GptqError::HessianShape {
            layer: name.clone(),
            dim: hessian.dim,
            k_in: weights.cols,
        });
    }
    if let Some(index) = hessian.values.iter().position(|v| !v.is_finite()) {
        return Err(GptqError::NonFiniteHessian {
            layer: name.clone(),
            row: index / hessian.dim,
            col: index % hessian.dim,
            value: hessian.values[index],
        });
    }
    assert!(
        options.block_size > 0,
        "GPTQ needs a block size of at least one channel"
    );

    let mut h = hessian.clone();
    let dead = fix_dead_channels(&mut h);
    let order = channel_order(&h, options.act_order);
    let fallback = |retries: u32| {
        let info = GptqInfo {
            damping: None,
            relative_damping: None,
            damping_retries: retries,
            dead_channels: dead.clone(),
            fell_back_to_rtn: true,
            order: (0..weights.cols).collect(),
        };
        (quantizer::quantize(weights, r), info)
    };

    let factorized = factorize_with(&permute(&h, &order), options, factorizer);
    times.factorization = start.elapsed();
    let start = Instant::now();
    let factorization = match factorized {
        Ok(factorization) => factorization,
        Err((relative, retries)) => {
            eprintln!(
                "warning: GPTQ of `{name}`: the Cholesky factorisation of the Hessian failed even \
                 with a damping of {relative:e} times its mean diagonal after {retries} retries; \
                 quantizing this layer with round to nearest"
            );
            let (layer, info) = fallback(retries);
            times.columns = start.elapsed();
            return Ok((layer, info, times));
        }
    };
    if factorization.retries > 0 {
        eprintln!(
            "info: GPTQ of `{name}`: the Cholesky factorisation succeeded with a damping of {:e} \
             ({:e} times the mean diagonal) after {} retries",
            factorization.damping, factorization.relative_damping, factorization.retries
        );
    }

    let Some(layer) = run_columns(
        weights,
        &dead,
        &order,
        &factorization,
        r,
        options.block_size,
    ) else {
        eprintln!(
            "warning: GPTQ of `{name}`: the error updates made a weight NaN or infinite; \
             quantizing this layer with round to nearest"
        );
        let (layer, info) = fallback(factorization.retries);
        times.columns = start.elapsed();
        return Ok((layer, info, times));
    };
    let info = GptqInfo {
        damping: Some(factorization.damping),
        relative_damping: Some(factorization.relative_damping),
        damping_retries: factorization.retries,
        dead_channels: dead,
        fell_back_to_rtn: false,
        order,
    };
    times.columns = start.elapsed();
    Ok((layer, info, times))
}

/// The result of one layer in [`quantize_layers`].
pub type LayerResult = Result<(QuantizedLayer, GptqInfo, PhaseTimes), GptqError>;

/// Quantizes independent layers, each `(weights, hessian)`, with GPTQ on up to `threads`
/// threads and returns the results in the order of `layers`.
///
/// One thread computes each layer from start to end, so the results do not depend on the
/// thread count. Threads take the layers with the most input channels first, which balances
/// the load because the factorisations grow with the cube of that count. `on_done` runs
/// after each layer, on the thread that computed it.
pub fn quantize_layers(
    layers: &[(&Matrix, &Hessian)],
    r: &Resolved,
    options: &GptqOptions,
    factorizer: Factorizer,
    threads: usize,
    on_done: &(dyn Fn(usize) + Sync),
) -> Vec<LayerResult> {
    let mut by_cost: Vec<usize> = (0..layers.len()).collect();
    by_cost.sort_by_key(|&i| std::cmp::Reverse((layers[i].0.cols, layers[i].0.rows)));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<LayerResult>>> =
        layers.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let work = || loop {
        let taken = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(&index) = by_cost.get(taken) else {
            break;
        };
        let (weights, hessian) = layers[index];
        let result = quantize_gptq_timed(weights, hessian, r, options, factorizer);
        *results[index].lock().expect("no thread panics while holding it") = Some(result);
        on_done(index);
    };
    std::thread::scope(|scope| {
        for _ in 1..threads.clamp(1, layers.len().max(1)) {
            scope.spawn(work);
        }
        work();
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .expect("no thread panics while holding it")
                .expect("every layer was taken")
        })
        .collect()
}

/// State of the column loop.
///
/// Channel `order[j]` is quantized at position j. A later channel at position p receives
/// the errors of earlier positions as one subtraction each, in increasing j, whenever it is
/// brought up to date. That happens right away inside the batch, on demand when a
/// macro-block's bases are fixed, and for every remaining channel at the end of the batch.
/// Every channel therefore gets the same arithmetic for any batch size.
struct ColumnLoop<'a> {
    r: &'a Resolved,
    /// Current weights. A channel keeps its value from the moment it is quantized.
    weights: Columns,
    n_pad: usize,
    k_pad: usize,
    order: &'a [usize],
    /// Position in `order` of each real input channel.
    position: Vec<usize>,
    /// Upper Cholesky factor of H^-1 in `order`, `dim x dim`.
    upper: &'a [f64],
    /// U_kk by input channel (1 for padding channels).
    u_diagonal: Vec<f64>,
    /// First position of the current batch.
    batch_start: usize,
    /// Scaled errors of the current batch, `errors[(j - batch_start) * n_out + n]`.
    errors: Vec<f64>,
    /// By position p: the errors of positions below `applied[p]` have been subtracted.
    applied: Vec<usize>,
    /// Base exponents by (macro-block row, micro-block), set when the row is first reached.
    bases: Vec<Option<E8m0>>,
    /// The layer being built. A micro-block without outlier pairs is stored as soon as it
    /// is encoded, because storing it touches only its own codes and the counters.
    layer: QuantizedLayer,
    /// Planned and encoded micro-blocks with outlier pairs by (input channel, micro-block).
    /// They are stored at the end in the order of [`quantizer::quantize`], which numbers the
    /// pair blocks.
    paired: Vec<Option<(MicroBlock, EncodedBlock)>>,
    /// Dequantized values of the channel just quantized, one per real output channel.
    dequantized: Vec<f64>,
}

impl ColumnLoop<'_> {
    fn ublocks(&self) -> usize {
        self.n_pad / self.r.m
    }

    /// Subtracts from the channel at position `p` the errors of the batch positions up to
    /// (not including) `through`.
    fn bring_up_to_date(&mut self, p: usize, through: usize) {
        let n_out = self.weights.n_out;
        let dim = self.order.len();
        let column = self.weights.column_mut(self.order[p]);
        for j in self.applied[p]..through {
            let error =
                &self.errors[(j - self.batch_start) * n_out..(j - self.batch_start + 1) * n_out];
            subtract_scaled(column, self.upper[j * dim + p], error);
        }
        self.applied[p] = self.applied[p].max(through);
    }

    /// Brings every channel after the batch that ends at `end` up to date, with the same
    /// arithmetic as [`Self::bring_up_to_date`] on each of them.
    fn update_after_batch(&mut self, end: usize) {
        let dim = self.order.len();
        if end >= dim {
            return;
        }
        blocked::subtract_batch_errors(&mut blocked::BatchUpdate {
            columns: &mut self.weights.data,
            n_out: self.weights.n_out,
            targets: &self.order[end..],
            applied: &self.applied[end..],
            first_position: end,
            errors: &self.errors,
            batch: self.batch_start..end,
            upper: self.upper,
            dim,
        });
        for applied in &mut self.applied[end..] {
            *applied = (*applied).max(end);
        }
    }

    /// Fixes the base exponents of macro-block row `kb` from the current weights of its
    /// channels, unless they are fixed already. `next` is the position about to be quantized
    /// and `k` its channel, which must lie in row `kb`.
    ///
    /// Returns the plan of channel `k` when the bases were fixed now. Nothing changes the
    /// channel's weights before it is quantized, so that plan equals a new one.
    fn fix_bases(&mut self, kb: usize, k: usize, next: usize) -> Option<Vec<MicroBlock>> {
        let ub = self.ublocks();
        if self.bases[kb * ub].is_some() {
            return None;
        }
        let rows = self.r.mab_rows;
        let k_in = self.weights.k_in;
        for k in (kb * rows..(kb + 1) * rows).filter(|&k| k < k_in) {
            let p = self.position[k];
            if p >= next {
                self.bring_up_to_date(p, next);
            }
        }
        let mut plans: Vec<Vec<MicroBlock>> = (kb * rows..(kb + 1) * rows)
            .map(|row_k| {
                quantizer::plan_column(&self.weights, self.r, row_k, self.n_pad, self.u_diagonal[row_k])
            })
            .collect();
        for nb in 0..ub {
            self.bases[kb * ub + nb] = Some(quantizer::base_exponent(
                plans.iter().map(|plan| &plan[nb]),
                self.r,
            ));
        }
        Some(plans.swap_remove(k - kb * rows))
    }

    /// Quantizes input channel `k` (at position `next`, or any position for padding) from
    /// its current weights and leaves the dequantized values of its real rows in
    /// `dequantized`.
    fn quantize_channel(&mut self, k: usize, next: usize) {
        let kb = k / self.r.mab_rows;
        let planned = self.fix_bases(kb, k, next);
        let ub = self.ublocks();
        let m = self.r.m;
        let plans = planned.unwrap_or_else(|| {
            quantizer::plan_column(&self.weights, self.r, k, self.n_pad, self.u_diagonal[k])
        });
        for (nb, block) in plans.into_iter().enumerate() {
            let base = self.bases[kb * ub + nb].expect("bases are fixed above");
            let encoded = quantizer::encode_micro_block(&block, base, self.r);
            for i in 0..m {
                if block.real[i] {
                    self.dequantized[nb * m + i] = encoded.values[i];
                }
            }
            if block.route.pairs.is_empty() {
                self.layer
                    .store_micro_block(self.r, k, nb, &block, &encoded);
            } else {
                self.paired[k * ub + nb] = Some((block, encoded));
            }
        }
    }

    /// Runs the batches over every real channel. Returns false when a weight became NaN or
    /// infinite.
    fn run(&mut self, block_size: usize) -> bool {
        let n_out = self.weights.n_out;
        let dim = self.order.len();
        for start in (0..dim).step_by(block_size) {
            let end = (start + block_size).min(dim);
            self.batch_start = start;
            for j in start..end {
                let k = self.order[j];
                if !self.weights.column(k).iter().all(|v| v.is_finite()) {
                    return false;
                }
                self.quantize_channel(k, j);
                let u_jj = self.upper[j * dim + j];
                let error = &mut self.errors[(j - start) * n_out..(j - start + 1) * n_out];
                for ((e, w), q) in error
                    .iter_mut()
                    .zip(self.weights.column(k))
                    .zip(&self.dequantized)
                {
                    *e = (w - q) / u_jj;
                }
                for p in j + 1..end {
                    self.bring_up_to_date(p, j + 1);
                }
            }
            // Lazy batch update of the channels after the batch.
            self.update_after_batch(end);
        }
        for k in dim..self.k_pad {
            self.quantize_channel(k, dim);
        }
        true
    }

    /// Stores the bases and the micro-blocks with pairs in the order of
    /// [`quantizer::quantize`] and returns the layer.
    fn assemble(self, weights: &Matrix) -> QuantizedLayer {
        let ub = self.ublocks();
        let rows = self.r.mab_rows;
        let mut layer = self.layer;
        let mut paired = self.paired;
        for kb in 0..self.k_pad / rows {
            for nb in 0..ub {
                layer.bases[kb * ub + nb] =
                    self.bases[kb * ub + nb].expect("every macro-block row was reached");
                for k in kb * rows..(kb + 1) * rows {
                    if let Some((block, encoded)) = paired[k * ub + nb].take() {
                        layer.store_micro_block(self.r, k, nb, &block, &encoded);
                    }
                }
            }
        }
        layer.set_relative_error(weights);
        layer
    }
}

/// Runs the column loop, or returns `None` when a weight became NaN or infinite.
fn run_columns(
    weights: &Matrix,
    dead: &[usize],
    order: &[usize],
    factorization: &Factorization,
    r: &Resolved,
    block_size: usize,
) -> Option<QuantizedLayer> {
    let (n_out, k_in) = (weights.rows, weights.cols);
    let (n_pad, k_pad) = quantizer::padded_shape(n_out, k_in, r);
    let ub = n_pad / r.m;
    let dim = factorization.dim;

    let mut columns = Columns::from_matrix(weights);
    for &k in dead {
        columns.column_mut(k).fill(0.0);
    }
    let mut position = vec![0; k_in];
    let mut u_diagonal = vec![1.0; k_pad];
    for (j, &k) in order.iter().enumerate() {
        position[k] = j;
        u_diagonal[k] = factorization.upper[j * dim + j];
    }
    let mut state = ColumnLoop {
        r,
        weights: columns,
        n_pad,
        k_pad,
        order,
        position,
        upper: &factorization.upper,
        u_diagonal,
        batch_start: 0,
        errors: vec![0.0; block_size.min(k_in) * n_out],
        applied: vec![0; k_in],
        bases: vec![None; (k_pad / r.mab_rows) * ub],
        layer: QuantizedLayer::empty(weights, r),
        paired: vec![None; k_pad * ub],
        dequantized: vec![0.0; n_out],
    };
    state.run(block_size).then(|| state.assemble(weights))
}

/// w -= coefficient * error. A zero coefficient leaves w untouched (even the sign of a zero),
/// which keeps the diagonal-Hessian case equal to round to nearest.
fn subtract_scaled(w: &mut [f64], coefficient: f64, error: &[f64]) {
    if coefficient == 0.0 {
        return;
    }
    for (w, e) in w.iter_mut().zip(error) {
        *w -= e * coefficient;
    }
}

/// Returns ||X W^T - X Q^T||_F / ||X W^T||_F from the layer Hessian H = 2 X^T X / n, or
/// `None` when X W^T is zero.
///
/// The factor 2 / n cancels, so this equals the ratio on the calibration inputs X. Pass the
/// Hessian as accumulated, before any damping or dead-channel change. `dequant` is
/// `[n_out][k_in]`.
pub fn relative_output_error(weights: &Matrix, dequant: &[f64], hessian: &Hessian) -> Option<f64> {
    let k_in = weights.cols;
    assert_eq!(
        hessian.dim, k_in,
        "the Hessian must match the layer's input channels"
    );
    assert_eq!(
        dequant.len(),
        weights.rows * k_in,
        "dequant must be [n_out][k_in]"
    );
    let quadratic_form = |v: &[f64]| -> f64 {
        (0..k_in)
            .map(|i| {
                let row = &hessian.values[i * k_in..(i + 1) * k_in];
                v[i] * row.iter().zip(v).map(|(h, x)| h * x).sum::<f64>()
            })
            .sum()
    };
    let mut error = 0.0;
    let mut norm = 0.0;
    for n in 0..weights.rows {
        let w: Vec<f64> = (0..k_in).map(|k| f64::from(weights.get(n, k))).collect();
        let d: Vec<f64> = (0..k_in).map(|k| w[k] - dequant[n * k_in + k]).collect();
        error += quadratic_form(&d);
        norm += quadratic_form(&w);
    }
    (norm > 0.0).then(|| (error.max(0.0) / norm).sqrt())
}

/// Per-layer summary of a GPTQ (or round-to-nearest) quantization.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerReport {
    pub layer: String,
    /// `[N_out, K_in]`.
    pub shape: [usize; 2],
    pub outliers: usize,
    pub pruned: usize,
    pub demoted: usize,
    /// Effective bit width of the weight image.
    pub ebw: f64,
    /// λ added to the diagonal of H, `None` without GPTQ or after the fallback.
    pub damping: Option<f64>,
    pub damping_retries: u32,
    pub dead_channels: usize,
    pub fell_back_to_rtn: bool,
    /// ||W - Q||_F / ||W||_F.
    pub relative_weight_error: f64,
    /// ||X W^T - X Q^T||_F / ||X W^T||_F on the calibration inputs, when a calibration
    /// Hessian is given.
    pub relative_output_error: Option<f64>,
}

/// Summarises a quantized layer. `info` is `None` for round to nearest, and `calibration` is
/// the accumulated Hessian for the output error.
pub fn layer_report(
    weights: &Matrix,
    layer: &QuantizedLayer,
    info: Option<&GptqInfo>,
    calibration: Option<&Hessian>,
    r: &Resolved,
) -> LayerReport {
    let image = image::build(layer, r, &[]);
    LayerReport {
        layer: layer.name.clone(),
        shape: [layer.n_out, layer.k_in],
        outliers: layer.stats.outliers,
        pruned: layer.stats.pruned,
        demoted: layer.stats.demoted,
        ebw: image::effective_bit_width(layer, r, &image),
        damping: info.and_then(|i| i.damping),
        damping_retries: info.map_or(0, |i| i.damping_retries),
        dead_channels: info.map_or(0, |i| i.dead_channels.len()),
        fell_back_to_rtn: info.is_some_and(|i| i.fell_back_to_rtn),
        relative_weight_error: layer.stats.relative_error,
        relative_output_error: calibration
            .and_then(|h| relative_output_error(weights, &layer.dequant, h)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: &[f64], expected: &[f64], tolerance: f64) {
        assert_eq!(actual.len(), expected.len());
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() <= tolerance,
                "entry {i}: {a} differs from {e}; all {actual:?}"
            );
        }
    }

    #[test]
    fn inverse_cholesky_of_two_by_two() {
        // H3: H = [[4, 2], [2, 3]], H^-1 = [[0.375, -0.25], [-0.25, 0.5]].
        let h = [4.0, 2.0, 2.0, 3.0];
        let l = cholesky_lower(&h, 2).unwrap();
        assert_close(
            &blocked::inverse_from_cholesky(&l, 2),
            &[0.375, -0.25, -0.25, 0.5],
            1e-15,
        );
        let u = inverse_cholesky_upper(&h, 2).unwrap();
        assert_close(&u, &[0.61237, -0.40825, 0.0, 0.57735], 5e-6);
        // U^T U reproduces H^-1.
        let product = [
            u[0] * u[0],
            u[0] * u[1],
            u[1] * u[0],
            u[1] * u[1] + u[3] * u[3],
        ];
        assert_close(&product, &[0.375, -0.25, -0.25, 0.5], 1e-15);
    }

    #[test]
    fn cholesky_rejects_singular_hessians() {
        // H1 before the dead channels are fixed: pivot 1 is zero.
        let h1 = [
            1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(cholesky_lower(&h1, 4), Err(1));
        // Two identical channels: the second pivot is zero up to rounding.
        assert_eq!(cholesky_lower(&[5.0, 5.0, 5.0, 5.0], 2), Err(1));
        assert_eq!(cholesky_lower(&[f64::NAN, 0.0, 0.0, 1.0], 2), Err(0));
    }

    #[test]
    fn dead_channels_then_damping() {
        let mut h = Hessian::new(
            4,
            vec![
                1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            ],
        );
        assert_eq!(fix_dead_channels(&mut h), [1, 3]);
        assert_eq!(h.diagonal(), [1.0, 1.0, 5.0, 1.0]);
        let factorization = factorize(&h, &GptqOptions::default()).unwrap();
        // 0.01 * mean(1, 1, 5, 1) = 0.02.
        assert!(
            (factorization.damping - 0.02).abs() < 1e-15,
            "{}",
            factorization.damping
        );
        assert_eq!(factorization.retries, 0);
        assert!(factorization.upper.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn identical_channels_need_damping() {
        let h = Hessian::new(2, vec![5.0, 5.0, 5.0, 5.0]);
        let undamped = GptqOptions {
            damping_fraction: 0.0,
            ..GptqOptions::default()
        };
        assert!(inverse_cholesky_upper(&h.values, 2).is_err());
        // Without a first damping the retries start at 0.01 * 10 times the mean diagonal.
        let retried = factorize(&h, &undamped).unwrap();
        assert_eq!(retried.retries, 1);
        assert!((retried.relative_damping - 0.1).abs() < 1e-15);
        let damped = factorize(&h, &GptqOptions::default()).unwrap();
        assert_eq!(damped.retries, 0);
        assert!((damped.damping - 0.05).abs() < 1e-15, "{}", damped.damping);
        assert!(damped.upper.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn damping_grows_geometrically() {
        // Not positive semi-definite (eigenvalues -1 and 3): λ = 0.01, 0.1 and 1 fail, 10 works.
        let h = Hessian::new(2, vec![1.0, 2.0, 2.0, 1.0]);
        let factorization = factorize(&h, &GptqOptions::default()).unwrap();
        assert_eq!(factorization.retries, 3);
        assert!((factorization.relative_damping - 10.0).abs() < 1e-12);
        assert!((factorization.damping - 10.0).abs() < 1e-12);
    }

    #[test]
    fn damping_gives_up_at_limit() {
        let h = Hessian::new(2, vec![1.0, 1e9, 1e9, 1.0]);
        let (relative, retries) = factorize(&h, &GptqOptions::default()).unwrap_err();
        assert_eq!(retries, 6);
        assert!((relative - 1e4).abs() < 1e-6, "{relative}");
    }

    #[test]
    fn act_order_sorts_by_descending_diagonal() {
        let h = Hessian::new(
            4,
            vec![
                1.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 2.0,
            ],
        );
        assert_eq!(channel_order(&h, true), [1, 2, 3, 0]);
        assert_eq!(channel_order(&h, false), [0, 1, 2, 3]);
        let permuted = permute(&h, &[1, 2, 3, 0]);
        assert_eq!(permuted.diagonal(), [3.0, 3.0, 2.0, 1.0]);
    }
}
