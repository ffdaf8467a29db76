//! The MicroScopiQ quantizer for one linear layer.
//!
//! Per input channel k and micro-block (M consecutive output channels of that channel):
//! outliers are the values with |w - mean| > k_sigma * std, with the statistics taken over a
//! configurable scope; as many of the least salient inliers are pruned as there are outliers;
//! each outlier is encoded in the 2b-bit outlier format, its upper b bits stored in its own
//! slot and its lower b bits in a pruned slot. Inliers use sign-magnitude MX-INT-b on the
//! micro-block's exponent, which sits 0 to 2^u - 1 binades below the macro-block's E8M0 base.
//!
//! This version ranks pruning candidates by |w|, which is the saliency w^2 / U_kk^2 with an
//! identity Hessian. Rounding is to nearest, without error feedback.

use crate::config::{OutlierScope, Resolved};
use crate::formats::{floor_log2_f64, E8m0};
use crate::recon::{self, SwitchOp};
use crate::weights::Matrix;

/// Outlier pairs of one micro-block, with the ReCoN commands that merge them.
#[derive(Clone, Debug, PartialEq)]
pub struct PairBlock {
    /// Input channel.
    pub k: usize,
    /// Micro-block index along the output channels.
    pub ublock: usize,
    /// (outlier lane, pruned lane) pairs, lanes counted inside the micro-block.
    pub pairs: Vec<(usize, usize)>,
    /// Stored outlier exponent offset: offset minus the configuration's smallest offset.
    pub offset_code: u32,
    pub commands: Vec<SwitchOp>,
}

/// Counts gathered while quantizing one layer.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LayerStats {
    /// Weights of the original tensor.
    pub weights: usize,
    /// Outliers kept at outlier precision.
    pub outliers: usize,
    /// Inliers pruned to host outlier bits (equal to `outliers`).
    pub pruned: usize,
    /// Outliers demoted to inliers because ReCoN could not merge their micro-block in one pass.
    pub demoted: usize,
    /// Outliers whose exponent offset was clamped to the stored range.
    pub offset_clamped: usize,
    /// Micro-blocks holding at least one pair.
    pub flagged_ublocks: usize,
    /// Micro-blocks in the padded layer.
    pub ublocks: usize,
    /// Micro-blocks by number of pairs (index = pairs).
    pub pairs_histogram: Vec<usize>,
    /// ||W - Q(W)||_F / ||W||_F over the original weights.
    pub relative_error: f64,
}

/// A quantized layer: every slot code, exponent and pair, plus the dequantized weights.
#[derive(Clone, Debug)]
pub struct QuantizedLayer {
    pub name: String,
    /// Output channels of the original tensor.
    pub n_out: usize,
    /// Input channels of the original tensor.
    pub k_in: usize,
    /// Output channels after zero padding to a multiple of the array columns.
    pub n_pad: usize,
    /// Input channels after zero padding to a multiple of the macro-block rows.
    pub k_pad: usize,
    /// E8M0 base exponents, `[k_pad / R][n_pad / M]`.
    pub bases: Vec<E8m0>,
    /// Micro-exponents d, `[k_pad][n_pad / M]`.
    pub micro_exps: Vec<u8>,
    /// Slot codes, `[k_pad][n_pad]`.
    pub slots: Vec<u8>,
    /// Index into `pair_blocks` per micro-block, `[k_pad][n_pad / M]`; `u32::MAX` for none.
    pub pair_index: Vec<u32>,
    pub pair_blocks: Vec<PairBlock>,
    /// Dequantized weights, `[n_out][k_in]`, exact.
    pub dequant: Vec<f64>,
    pub stats: LayerStats,
}

impl QuantizedLayer {
    /// Micro-blocks per input channel.
    pub fn ublocks_per_channel(&self, m: usize) -> usize {
        self.n_pad / m
    }

    /// Returns the pair block of micro-block `ublock` of input channel `k`, if it has pairs.
    pub fn pair_block(&self, k: usize, ublock: usize, m: usize) -> Option<&PairBlock> {
        let index = self.pair_index[k * (self.n_pad / m) + ublock];
        (index != u32::MAX).then(|| &self.pair_blocks[index as usize])
    }
}

/// Exact 2^e as f64 for exponents in the normal range.
pub fn pow2(e: i32) -> f64 {
    assert!((-1022..=1023).contains(&e), "2^{e} is outside the f64 normal range");
    f64::from_bits(((e + 1023) as u64) << 52)
}

fn round_up(value: usize, multiple: usize) -> usize {
    value.div_ceil(multiple).max(1) * multiple
}

/// Mean and population standard deviation of the finite values.
fn mean_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let count = values.clone().count();
    if count == 0 {
        return (0.0, 0.0);
    }
    let mean = values.clone().sum::<f64>() / count as f64;
    let var = values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / count as f64;
    (mean, var.sqrt())
}

/// One micro-block while it is being quantized.
struct Block {
    values: Vec<f64>,
    real: Vec<bool>,
    outliers: Vec<usize>,
    pruned: Vec<usize>,
    route: recon::Route,
}

/// Quantizes `weights` (`[out, in]`) with the configuration `r`.
pub fn quantize(weights: &Matrix, r: &Resolved) -> QuantizedLayer {
    let n_out = weights.rows;
    let k_in = weights.cols;
    let m = r.m;
    let n_pad = round_up(n_out, r.cols);
    let k_pad = round_up(k_in, r.mab_rows);
    let ub_per_k = n_pad / m;
    let mabs_k = k_pad / r.mab_rows;

    let mut layer = QuantizedLayer {
        name: weights.name.clone(),
        n_out,
        k_in,
        n_pad,
        k_pad,
        bases: vec![E8m0::from_exponent(E8m0::MIN_EXPONENT); mabs_k * ub_per_k],
        micro_exps: vec![0; k_pad * ub_per_k],
        slots: vec![0; k_pad * n_pad],
        pair_index: vec![u32::MAX; k_pad * ub_per_k],
        pair_blocks: Vec::new(),
        dequant: vec![0.0; n_out * k_in],
        stats: LayerStats {
            weights: n_out * k_in,
            ublocks: k_pad * ub_per_k,
            pairs_histogram: vec![0; r.max_pairs + 1],
            ..LayerStats::default()
        },
    };

    let column_stats: Vec<(f64, f64)> = (0..k_in)
        .map(|k| mean_std((0..n_out).map(move |n| weights.get(n, k) as f64)))
        .collect();

    for kb in 0..mabs_k {
        for nb in 0..ub_per_k {
            quantize_macro_block(weights, r, &column_stats, kb, nb, &mut layer);
        }
    }

    let mut err = 0.0;
    let mut norm = 0.0;
    for n in 0..n_out {
        for k in 0..k_in {
            let w = weights.get(n, k) as f64;
            let d = layer.dequant[n * k_in + k] - w;
            err += d * d;
            norm += w * w;
        }
    }
    layer.stats.relative_error = if norm > 0.0 { (err / norm).sqrt() } else { 0.0 };
    layer
}

fn quantize_macro_block(
    weights: &Matrix,
    r: &Resolved,
    column_stats: &[(f64, f64)],
    kb: usize,
    nb: usize,
    layer: &mut QuantizedLayer,
) {
    let m = r.m;
    let n_out = weights.rows;
    let k_in = weights.cols;
    let ub_per_k = layer.n_pad / m;
    let k_range = kb * r.mab_rows..(kb + 1) * r.mab_rows;

    let value_at = |n: usize, k: usize| -> Option<f64> {
        (n < n_out && k < k_in).then(|| weights.get(n, k) as f64)
    };
    let mab_stats = if r.scope == OutlierScope::MacroBlock {
        let values: Vec<f64> = k_range
            .clone()
            .flat_map(|k| (0..m).filter_map(move |i| value_at(nb * m + i, k)))
            .collect();
        mean_std(values.iter().copied())
    } else {
        (0.0, 0.0)
    };

    // Outlier detection, pruning and routing, one micro-block per input channel.
    let mut blocks: Vec<Block> = Vec::with_capacity(r.mab_rows);
    for k in k_range.clone() {
        let values: Vec<f64> = (0..m).map(|i| value_at(nb * m + i, k).unwrap_or(0.0)).collect();
        let real: Vec<bool> = (0..m).map(|i| value_at(nb * m + i, k).is_some()).collect();
        let (mean, std) = match r.scope {
            OutlierScope::Column if k < k_in => column_stats[k],
            OutlierScope::Column => (0.0, 0.0),
            OutlierScope::MacroBlock => mab_stats,
            OutlierScope::MicroBlock => {
                mean_std((0..m).filter(|&i| real[i]).map(|i| values[i]))
            }
        };
        let mut candidates: Vec<usize> = (0..m)
            .filter(|&i| real[i] && std > 0.0 && (values[i] - mean).abs() > r.k_sigma * std)
            .collect();
        // Largest magnitude first; the stable sort keeps the lower index first on ties.
        candidates.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()));
        candidates.truncate(r.max_pairs);

        loop {
            let pruned = least_salient(&values, &candidates, candidates.len());
            let mut outliers = candidates.clone();
            outliers.sort_unstable();
            let mut pruned_sorted = pruned.clone();
            pruned_sorted.sort_unstable();
            if let Some(route) = recon::route(m, &outliers, &pruned_sorted) {
                blocks.push(Block { values, real, outliers, pruned: pruned_sorted, route });
                break;
            }
            // NOTE: an unroutable set loses its smallest outlier; multi-pass ReCoN would keep it.
            candidates.pop();
            layer.stats.demoted += 1;
        }
    }

    // Base exponent: the largest natural exponent among the micro-blocks, raised where an
    // outlier would otherwise need an offset above the stored range.
    let fp = r.outlier;
    let natural_inlier = |b: &Block| -> Option<i32> {
        let max = kept_inliers(b).map(|i| b.values[i].abs()).fold(0.0, f64::max);
        floor_log2_f64(max).map(|e| e - r.int_format.emax())
    };
    let natural_outlier = |b: &Block| -> Option<i32> {
        let max = b.outliers.iter().map(|&i| b.values[i].abs()).fold(0.0, f64::max);
        let fp = fp?;
        floor_log2_f64(max).map(|e| e - fp.emax())
    };
    let mut base: Option<i32> = None;
    for b in &blocks {
        let wanted = [natural_inlier(b), natural_outlier(b).map(|e| e - r.offset_max())];
        for e in wanted.into_iter().flatten() {
            base = Some(base.map_or(e, |x: i32| x.max(e)));
        }
    }
    let base = E8m0::from_exponent(base.unwrap_or(E8m0::MIN_EXPONENT));
    let beta = base.exponent().expect("the quantizer never writes the NaN scale");
    layer.bases[kb * ub_per_k + nb] = base;

    for (row, block) in blocks.iter().enumerate() {
        let k = kb * r.mab_rows + row;
        let nat_out = natural_outlier(block);
        let mut best: Option<(f64, u32)> = None;
        for d in 0..=r.micro_exp_max() {
            let e_in = beta - d as i32;
            let (err, _) = encode_block(r, block, e_in, nat_out);
            if best.is_none_or(|(e, _)| err < e) {
                best = Some((err, d));
            }
        }
        let (_, d) = best.expect("at least one micro-exponent");
        let e_in = beta - d as i32;
        let (_, encoded) = encode_block(r, block, e_in, nat_out);
        layer.micro_exps[k * ub_per_k + nb] = d as u8;
        for i in 0..m {
            layer.slots[k * layer.n_pad + nb * m + i] = encoded.slots[i];
            let n = nb * m + i;
            if block.real[i] {
                layer.dequant[n * k_in + k] = encoded.values[i];
            }
        }
        let pairs = block.route.pairs.len();
        layer.stats.pairs_histogram[pairs] += 1;
        if pairs > 0 {
            layer.stats.outliers += pairs;
            layer.stats.pruned += pairs;
            layer.stats.flagged_ublocks += 1;
            if encoded.offset_clamped {
                layer.stats.offset_clamped += pairs;
            }
            layer.pair_index[k * ub_per_k + nb] = layer.pair_blocks.len() as u32;
            layer.pair_blocks.push(PairBlock {
                k,
                ublock: nb,
                pairs: block.route.pairs.clone(),
                offset_code: encoded.offset_code,
                commands: block.route.commands.clone(),
            });
        }
    }
}

/// Inliers that are kept (neither outlier nor pruned).
fn kept_inliers(b: &Block) -> impl Iterator<Item = usize> + '_ {
    (0..b.values.len()).filter(|i| !b.outliers.contains(i) && !b.pruned.contains(i))
}

/// Returns the `count` least salient non-outlier lanes; ties go to the lower index.
fn least_salient(values: &[f64], outliers: &[usize], count: usize) -> Vec<usize> {
    let mut inliers: Vec<usize> = (0..values.len()).filter(|i| !outliers.contains(i)).collect();
    inliers.sort_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()));
    inliers.truncate(count);
    inliers
}

struct Encoded {
    slots: Vec<u8>,
    values: Vec<f64>,
    offset_code: u32,
    offset_clamped: bool,
}

/// Encodes one micro-block at inlier exponent `e_in`; returns the squared error over the kept
/// values (inliers and outliers) and the encoding.
fn encode_block(r: &Resolved, block: &Block, e_in: i32, nat_out: Option<i32>) -> (f64, Encoded) {
    let m = block.values.len();
    let mut slots = vec![0u8; m];
    let mut values = vec![0.0; m];
    let mut err = 0.0;
    for i in kept_inliers(block) {
        let q = r.int_format.quantize(block.values[i], e_in, r.rounding);
        slots[i] = r.int_format.encode(q) as u8;
        values[i] = r.int_format.value(q, e_in);
        err += (values[i] - block.values[i]).powi(2);
    }
    let mut offset_code = 0;
    let mut offset_clamped = false;
    if let (Some(fp), Some(nat)) = (r.outlier, nat_out) {
        let wanted = nat - e_in;
        let offset = wanted.clamp(r.offset_min, r.offset_max());
        offset_clamped = offset != wanted && wanted > r.offset_max();
        offset_code = (offset - r.offset_min) as u32;
        let e_out = e_in + offset;
        let mask = (1u32 << r.b) - 1;
        for &(o, p) in &block.route.pairs {
            let code = fp.encode(block.values[o] * pow2(-e_out), r.rounding);
            slots[o] = (code >> r.b) as u8;
            slots[p] = (code & mask) as u8;
            values[o] = fp.decode(code) * pow2(e_out);
            err += (values[o] - block.values[o]).powi(2);
        }
    }
    (err, Encoded { slots, values, offset_code, offset_clamped })
}
