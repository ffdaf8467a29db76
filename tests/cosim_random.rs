//! RTL against the golden model on random configurations, array options included: shapes,
//! inlier widths, micro-blocks, pair limits, micro-exponents, ReCoN sharing, multi-precision
//! PEs with either layer width, pipeline registers and weight-buffer depths.
//!
//! Each case builds a Verilator model, so the case count is small.

mod common;

use microscopiq::config::Resolved;
use microscopiq::flow::{self, RunOptions};
use proptest::prelude::*;

/// Simulations per test run.
const CASES: u32 = 8;

/// Generates a random array configuration and the inlier width of the layer to run on it.
fn configurations() -> impl Strategy<Value = (Resolved, u32)> {
    (
        prop::sample::select(vec![1u32, 2, 4]),
        prop::sample::select(vec![2u32, 4, 8]),
        0u32..4,
        any::<u32>(),
        0u32..3,
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
        0u32..3,
        1u32..3,
    )
        .prop_map(|(rows, cols, log_m, pairs_draw, u, recon_draw, multi_precision, wide_layer, stages, depth)| {
            let ublock = (1u32 << log_m).min(cols);
            let max_pairs = pairs_draw % (ublock / 2 + 1);
            let multi_precision = multi_precision && rows % 2 == 0;
            let mut config = common::config(rows, cols, 2, ublock, max_pairs);
            // Multi-precision arrays need a ReCoN on every row.
            config.array.recon_rows = Some(if multi_precision { rows } else { 1 + recon_draw % rows });
            config.array.multi_precision = multi_precision;
            config.array.pipeline_stages = stages;
            config.array.weight_buffer_depth = depth;
            config.format.micro_exp_bits = u;
            config.quantizer.k_sigma = 1.0;
            let layer_bits = if multi_precision && wide_layer { 4 } else { 2 };
            (common::resolve(&config), layer_bits)
        })
}

fn describe(r: &Resolved, layer_bits: u32) -> String {
    let array = &r.config.array;
    format!(
        "{}x{} array, W{layer_bits} layer, recon_rows = {}, M = {}, max_pairs = {}, u = {}, multi_precision = {}, \
         pipeline_stages = {}, weight_buffer_depth = {}",
        r.rows,
        r.cols,
        r.recon_rows,
        r.m,
        r.max_pairs,
        r.micro_exp_bits,
        array.multi_precision,
        array.pipeline_stages,
        array.weight_buffer_depth
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn rtl_matches_golden_on_random_configs((r, layer_bits) in configurations(), n_out in 1usize..=12, k_in in 1usize..=10, seed in any::<u64>()) {
        let label = describe(&r, layer_bits);
        let layer_config = r.layer_config(layer_bits).expect("layer width chosen from the array").clone();
        let weights = common::outlier_weights(n_out, k_in, seed);
        let options = RunOptions { vectors: 2, seed, ..RunOptions::default() };
        let report = flow::run_layer(&r, &layer_config, &weights, &options, &|_| {})
            .map_err(|e| TestCaseError::fail(format!("{label}: run failed: {e}")))?;
        prop_assert_eq!(report.mismatches, 0, "{}: first mismatch {:?}, files in {:?}", label, report.first_mismatch, report.work_dir);
        prop_assert_eq!(report.cycles, report.cycles_predicted, "{}: RTL cycle count differs from the prediction", label);
    }
}
