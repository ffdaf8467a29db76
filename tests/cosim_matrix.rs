//! Co-simulation matrix: every array shape and inlier width runs the generated RTL with
//! Verilator on seeded weights with many outliers and compares it with the golden model.
//!
//! Each point also lints its design with `verilator --lint-only -Wall`.

mod common;

use microscopiq::flow::{self, RunOptions};
use microscopiq::quantizer;

/// Output and input channels of the test weights. Neither is a multiple of any array side
/// above 1, so every point pads both dimensions.
const N_OUT: usize = 21;
const K_IN: usize = 19;

/// Activation vectors per tile.
const VECTORS: usize = 3;

/// Outlier threshold of the matrix. The default of 3 flags only the tail of the scaled
/// entries, which leaves almost no micro-block with two pairs (none at 21 x 19 with seed 1),
/// so the matrix uses 1 to fill micro-blocks up to `max_pairs` pairs.
const K_SIGMA: f64 = 1.0;

/// Quantizes, simulates and lints one point of the matrix.
///
/// M is min(8, cols), and `max_pairs` is M / 2, which gives 0 for the 1x1 array.
fn check_point(rows: u32, cols: u32, weight_bits: u32, seed: u64) {
    let ublock = cols.min(8);
    let max_pairs = ublock / 2;
    let mut config = common::config(rows, cols, weight_bits, ublock, max_pairs);
    config.quantizer.k_sigma = K_SIGMA;
    let r = common::resolve(&config);
    let label = format!("{rows}x{cols} array, b = {weight_bits}, M = {ublock}, max_pairs = {max_pairs}");
    let weights = common::outlier_weights(N_OUT, K_IN, seed);

    let layer = quantizer::quantize(&weights, &r);
    if max_pairs > 0 {
        assert!(layer.stats.outliers > 0, "{label}: the test weights gave no outliers");
        assert!(
            common::multi_pair_ublocks(&layer.stats.pairs_histogram) > 0,
            "{label}: no micro-block holds more than one pair (histogram {:?})",
            layer.stats.pairs_histogram
        );
    }

    let options = RunOptions { vectors: VECTORS, seed, ..RunOptions::default() };
    let report = flow::run(&r, &weights, &options, &|_| {}).unwrap_or_else(|e| panic!("{label}: run failed: {e}"));
    assert_eq!(report.outliers, layer.stats.outliers, "{label}: flow::run quantized differently");
    assert_eq!(report.mismatches, 0, "{label}: first mismatch {:?}, files in {:?}", report.first_mismatch, report.work_dir);
    assert_eq!(report.cycles, report.cycles_predicted, "{label}: RTL cycle count differs from the prediction");
    assert_eq!(
        report.outputs_compared,
        report.tiles * VECTORS * cols as usize,
        "{label}: not every column output was compared"
    );

    if let Err(e) = common::lint_design(&r) {
        panic!("{label}: verilator --lint-only -Wall reported: {e}");
    }
}

#[test]
fn cosim_matrix_1x1_two_bit() {
    check_point(1, 1, 2, 1);
}

#[test]
fn cosim_matrix_1x1_four_bit() {
    check_point(1, 1, 4, 1);
}

#[test]
fn cosim_matrix_2x4_two_bit() {
    check_point(2, 4, 2, 1);
}

#[test]
fn cosim_matrix_2x4_four_bit() {
    check_point(2, 4, 4, 1);
}

#[test]
fn cosim_matrix_4x4_two_bit() {
    check_point(4, 4, 2, 1);
}

#[test]
fn cosim_matrix_4x4_four_bit() {
    check_point(4, 4, 4, 1);
}

#[test]
fn cosim_matrix_8x8_two_bit() {
    check_point(8, 8, 2, 1);
}

#[test]
fn cosim_matrix_8x8_four_bit() {
    check_point(8, 8, 4, 1);
}

#[test]
fn cosim_matrix_16x16_two_bit() {
    check_point(16, 16, 2, 1);
}

#[test]
fn cosim_matrix_16x16_four_bit() {
    check_point(16, 16, 4, 1);
}
