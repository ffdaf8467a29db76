//! Quantization of real MiniLM weights around the 7.9148 outlier at [99, 856] of
//! `encoder.layer.0.output.dense.weight`, which lies about 175 standard deviations of the
//! whole tensor from its mean, and co-simulation of a slice of that layer.
//!
//! A micro-block here is M consecutive output channels n of one input channel k of W[n, k],
//! so the outlier's micro-block with M = 8 is rows 96..104 of column 856.

mod common;

use microscopiq::config::{Config, Resolved};
use microscopiq::flow::{self, RunOptions, SplitMix64};
use microscopiq::formats::{pow2, FpFormat};
use microscopiq::quantizer::{self, QuantizedLayer};
use microscopiq::weights::Matrix;

const OUTLIER_ROW: usize = 99;
const OUTLIER_COL: usize = 856;
const OUTLIER_VALUE: f64 = 7.9148;

/// Values of W[99, 856..864] in the MiniLM file. They run along the input channels there, and
/// [`real_values_keep_outlier_four_bit`] places them in one column so that they form one
/// micro-block in this project's layout.
const REAL_VALUES: [f32; 8] = [7.9148, 0.0144, 0.01055, -0.00558, -0.00359, -0.02867, 0.01819, -0.01587];

/// Exponent of the outlier scale stored for micro-block `ublock` of input channel `k`:
/// base exponent minus micro-exponent plus the outlier offset.
fn outlier_exponent(layer: &QuantizedLayer, r: &Resolved, k: usize, ublock: usize) -> i32 {
    let per_channel = layer.ublocks_per_channel(r.m);
    let base = layer.bases[(k / r.mab_rows) * per_channel + ublock].exponent().expect("finite base");
    let d = layer.micro_exps[k * per_channel + ublock] as i32;
    let block = layer.pair_block(k, ublock, r.m).expect("micro-block with pairs");
    base - d + r.offset_min + block.offset_code as i32
}

/// Lists every finite value of `format` at scale 2^`exponent`.
fn representable(format: FpFormat, exponent: i32) -> Vec<f64> {
    (0..1u32 << format.bits())
        .filter(|&code| format.is_finite_code(code))
        .map(|code| format.decode(code) * pow2(exponent))
        .collect()
}

/// Returns the value of `candidates` nearest to `x`.
fn nearest(candidates: &[f64], x: f64) -> f64 {
    candidates
        .iter()
        .copied()
        .min_by(|a, b| (a - x).abs().total_cmp(&(b - x).abs()))
        .expect("at least one candidate")
}

/// Returns the distance between the two largest magnitudes of `format` at scale
/// 2^`exponent`, which is the coarsest step of the format.
fn top_step(format: FpFormat, exponent: i32) -> f64 {
    let max = format.max_finite_code();
    (format.decode(max) - format.decode(max - 1)) * pow2(exponent)
}

fn dequantized(layer: &QuantizedLayer, n: usize, k: usize) -> f64 {
    layer.dequant[n * layer.k_in + k]
}

#[test]
fn minilm_outlier_value_matches_file() {
    let Some(w) = common::load_minilm("minilm_outlier_value_matches_file", common::FFN_OUTPUT) else { return };
    assert_eq!((w.rows, w.cols), (384, 1536), "shape of {}", common::FFN_OUTPUT);

    let value = w.get(OUTLIER_ROW, OUTLIER_COL) as f64;
    assert!((value - OUTLIER_VALUE).abs() < 1e-4, "W[99, 856] is {value}, expected {OUTLIER_VALUE}");
    for (i, &expected) in REAL_VALUES.iter().enumerate() {
        let got = w.get(OUTLIER_ROW, OUTLIER_COL + i);
        assert!((got - expected).abs() < 1e-4, "W[99, {}] is {got}, expected {expected}", OUTLIER_COL + i);
    }
}

#[test]
fn minilm_microblock_keeps_outlier() {
    let Some(w) = common::load_minilm("minilm_microblock_keeps_outlier", common::FFN_OUTPUT) else { return };
    let r = common::resolve(&Config::default_config());
    let format = r.outlier.expect("the default configuration has an outlier format");
    let layer = quantizer::quantize(&w, &r);
    let ublock = OUTLIER_ROW / r.m;
    let lane = OUTLIER_ROW % r.m;

    let block = layer.pair_block(OUTLIER_COL, ublock, r.m);
    assert!(block.is_some(), "micro-block {ublock} of input channel 856 has no pair");
    let block = block.unwrap();
    assert!(
        block.pairs.iter().any(|&(o, _)| o == lane),
        "lane {lane} (row 99) is not an outlier lane of its micro-block: pairs {:?}",
        block.pairs
    );

    let exponent = outlier_exponent(&layer, &r, OUTLIER_COL, ublock);
    let got = dequantized(&layer, OUTLIER_ROW, OUTLIER_COL);
    let expected = nearest(&representable(format, exponent), OUTLIER_VALUE);
    assert_eq!(got, expected, "[99, 856] is not the nearest E2M1 value at the stored scale 2^{exponent}");
    let step = top_step(format, exponent);
    assert!(
        (got - OUTLIER_VALUE).abs() <= step,
        "[99, 856] dequantizes to {got}, more than one E2M1 step ({step}) from {OUTLIER_VALUE}"
    );
}

/// Checks that 7.9148 gets the nearest value that the stored offset range allows. The offset
/// lets the outlier scale rise above the natural exponent floor(log2 |w|) - emax. At the
/// natural exponent 0 the E2M1 maximum is 6, so 7.9148 clips by 24 %, while at exponent 1,
/// one offset code higher, it rounds to 8.
#[test]
fn minilm_outlier_scale_avoids_clipping() {
    let Some(w) = common::load_minilm("minilm_outlier_scale_avoids_clipping", common::FFN_OUTPUT) else { return };
    let r = common::resolve(&Config::default_config());
    let format = r.outlier.expect("the default configuration has an outlier format");
    let layer = quantizer::quantize(&w, &r);
    let ublock = OUTLIER_ROW / r.m;
    let per_channel = layer.ublocks_per_channel(r.m);

    // Every outlier scale that the offset field can express next to the stored base exponent
    // and micro-exponent, so the inliers of the micro-block keep their scale.
    let base = layer.bases[(OUTLIER_COL / r.mab_rows) * per_channel + ublock].exponent().expect("finite base");
    let d = layer.micro_exps[OUTLIER_COL * per_channel + ublock] as i32;
    let mut candidates = Vec::new();
    for offset in r.offset_min..=r.offset_max() {
        candidates.extend(representable(format, base - d + offset));
    }

    let expected = nearest(&candidates, OUTLIER_VALUE);
    let got = dequantized(&layer, OUTLIER_ROW, OUTLIER_COL);
    assert_eq!(got, expected, "[99, 856] is not the nearest value that the image format can store");
}

#[test]
fn minilm_plain_int2_flushes_column() {
    let Some(w) = common::load_minilm("minilm_plain_int2_flushes_column", common::FFN_OUTPUT) else { return };
    let mut plain = Config::default_config();
    plain.format.max_pairs = 0;
    let plain_layer = quantizer::quantize(&w, &common::resolve(&plain));
    let outlier_layer = quantizer::quantize(&w, &common::resolve(&Config::default_config()));

    // Nonzero weights of column 856 other than the outlier that dequantize to 0.
    let flushed = |layer: &QuantizedLayer, rows: std::ops::Range<usize>| {
        rows.filter(|&n| n != OUTLIER_ROW && w.get(n, OUTLIER_COL) != 0.0 && dequantized(layer, n, OUTLIER_COL) == 0.0)
            .count()
    };
    let column_flushed = flushed(&plain_layer, 0..w.rows);
    assert!(
        column_flushed > w.rows / 2,
        "plain MX-INT2 flushes only {column_flushed} of {} weights of column 856",
        w.rows
    );

    // The outlier's own micro-block: plain MX-INT2 scales it to 7.9148 and loses every inlier.
    let ublock_rows = (OUTLIER_ROW / 8) * 8..(OUTLIER_ROW / 8 + 1) * 8;
    assert_eq!(
        flushed(&plain_layer, ublock_rows.clone()),
        7,
        "plain MX-INT2 keeps an inlier of the outlier's micro-block"
    );
    let kept_with_outliers = 7 - flushed(&outlier_layer, ublock_rows);
    assert!(kept_with_outliers > 0, "the outlier configuration flushes every inlier of the outlier's micro-block");
    assert!(
        flushed(&outlier_layer, 0..w.rows) < column_flushed,
        "the outlier configuration flushes as many weights of column 856 as plain MX-INT2"
    );
}

/// Builds a 32 x 4 matrix with [`REAL_VALUES`] as micro-block 0 of input channel 0 and
/// seeded ordinary values elsewhere. With only 8 values in the column no value could exceed 3
/// standard deviations (sqrt(7) is the maximum), so the extra output channels let the column
/// statistic flag 7.9148.
fn real_values_matrix() -> Matrix {
    let (n_out, k_in) = (32, 4);
    let mut rng = SplitMix64(5);
    let mut data: Vec<f32> = (0..n_out * k_in).map(|_| (rng.normal() * 0.02) as f32).collect();
    for (n, &value) in REAL_VALUES.iter().enumerate() {
        data[n * k_in] = value;
    }
    Matrix::new("real micro-block", n_out, k_in, data)
}

#[test]
fn real_values_keep_outlier_four_bit() {
    let r = common::resolve(&common::config(16, 16, 4, 8, 4));
    let format = r.outlier.expect("b = 4 has the E4M3 outlier format");
    let weights = real_values_matrix();
    let layer = quantizer::quantize(&weights, &r);

    let block = layer.pair_block(0, 0, r.m);
    assert!(block.is_some(), "b = 4: the real micro-block has no pair");
    let block = block.unwrap();
    assert_eq!(block.pairs.len(), 1, "b = 4: the real micro-block has pairs {:?}", block.pairs);
    assert_eq!(block.pairs[0].0, 0, "b = 4: 7.9148 (lane 0) is not the outlier lane");

    let exponent = outlier_exponent(&layer, &r, 0, 0);
    let got = dequantized(&layer, 0, 0);
    let expected = nearest(&representable(format, exponent), REAL_VALUES[0] as f64);
    assert_eq!(got, expected, "b = 4: 7.9148 is not the nearest E4M3 value at the stored scale 2^{exponent}");
    assert!(
        (got - REAL_VALUES[0] as f64).abs() <= top_step(format, exponent),
        "b = 4: 7.9148 dequantizes to {got}"
    );

    let pruned = block.pairs[0].1;
    let inliers: Vec<usize> = (1..8).filter(|&n| n != pruned).collect();
    let nonzero_inliers = inliers.iter().filter(|&&n| dequantized(&layer, n, 0) != 0.0).count();
    assert!(
        nonzero_inliers * 2 > inliers.len(),
        "b = 4: only {nonzero_inliers} of the {} inliers next to 7.9148 are nonzero",
        inliers.len()
    );
    assert_eq!(dequantized(&layer, pruned, 0), 0.0, "b = 4: the pruned lane {pruned} dequantizes to nonzero");
}

/// Loads the block of the FFN output projection around [99, 856]: output channels 64..128
/// and input channels 832..896.
fn minilm_slice(test: &str) -> Option<Matrix> {
    let w = common::load_minilm(test, common::FFN_OUTPUT)?;
    Some(common::slice(&w, 64, 64, 832, 64))
}

fn cosim_slice(test: &str, rows: u32, cols: u32) {
    let Some(weights) = minilm_slice(test) else { return };
    let r = common::resolve(&common::config(rows, cols, 2, 8, 4));
    let label = format!("{} on a {rows}x{cols} array", weights.name);
    let options = RunOptions { vectors: 4, seed: 3, ..RunOptions::default() };
    let report = flow::run(&r, &weights, &options, &|_| {}).unwrap_or_else(|e| panic!("{label}: run failed: {e}"));

    assert!(report.outliers > 0, "{label}: no outliers in the slice that contains 7.9148");
    assert_eq!(report.mismatches, 0, "{label}: first mismatch {:?}, files in {:?}", report.first_mismatch, report.work_dir);
    assert_eq!(report.cycles, report.cycles_predicted, "{label}: RTL cycle count differs from the prediction");
}

#[test]
fn minilm_slice_cosim_8x8() {
    cosim_slice("minilm_slice_cosim_8x8", 8, 8);
}

#[test]
fn minilm_slice_cosim_16x16() {
    cosim_slice("minilm_slice_cosim_16x16", 16, 16);
}
