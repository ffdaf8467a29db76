//! Single-buffered weights: the RTL still matches the golden model bit for bit, and the cycle
//! model counts the loads that no longer overlap the computation.

mod common;

use microscopiq::config::{Config, Resolved};

const N_OUT: usize = 21;
const K_IN: usize = 19;
const VECTORS: usize = 3;

fn with_depth(mut config: Config, depth: u32) -> Resolved {
    config.array.weight_buffer_depth = depth;
    config.quantizer.k_sigma = 1.0;
    common::resolve(&config)
}

/// Runs one layer of `weight_bits`-bit inliers on `r`, checks it and returns the RTL cycle count.
fn run_cycles(r: &Resolved, weight_bits: u32, label: &str) -> u64 {
    common::run_checked(r, weight_bits, (N_OUT, K_IN), VECTORS, 11, label).cycles
}

#[test]
fn single_buffer_is_exact_and_slower() {
    let base = common::config(4, 8, 2, 8, 4);
    let double = run_cycles(&with_depth(base.clone(), 2), 2, "4x8 array, double buffer");
    let single = run_cycles(&with_depth(base, 1), 2, "4x8 array, single buffer");
    assert!(single > double, "loads that wait for the computation must cost cycles: {single} vs {double}");
}

#[test]
fn single_buffer_on_smallest_array() {
    run_cycles(&with_depth(common::config(1, 1, 2, 1, 0), 1), 2, "1x1 array, single buffer");
}

#[test]
fn single_buffer_with_shared_recon_and_pipeline() {
    let mut config = common::config(4, 8, 2, 8, 4);
    config.array.recon_rows = Some(1);
    config.array.pipeline_stages = 2;
    run_cycles(&with_depth(config, 1), 2, "4x8 array, 1 ReCoN row, 2 stages, single buffer");
}

#[test]
fn single_buffer_with_multi_precision() {
    let mut config = common::config(4, 8, 2, 8, 4);
    config.array.multi_precision = true;
    let r = with_depth(config, 1);
    run_cycles(&r, 4, "4x8 multi-precision array, W4 layer, single buffer");
    run_cycles(&r, 2, "4x8 multi-precision array, W2 layer, single buffer");
}

#[test]
fn buffer_depth_out_of_range_rejected() {
    for depth in [0, 3] {
        let mut config = common::config(4, 8, 2, 8, 4);
        config.array.weight_buffer_depth = depth;
        let error = config.resolve().expect_err("only 1 and 2 copies are supported").to_string();
        assert!(error.contains(&format!("weight_buffer_depth = {depth}")), "message does not name the parameter: {error}");
        assert!(error.contains("1..=2"), "message does not give the legal range: {error}");
    }
}
