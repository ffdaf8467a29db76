//! Pipeline registers: with 1 or 2 registers per PE row the RTL still matches the golden model
//! bit for bit, and every register adds exactly one cycle.

mod common;

use microscopiq::config::{Config, Resolved};

const N_OUT: usize = 21;
const K_IN: usize = 19;
const VECTORS: usize = 3;

fn with_stages(mut config: Config, stages: u32) -> Resolved {
    config.array.pipeline_stages = stages;
    config.quantizer.k_sigma = 1.0;
    common::resolve(&config)
}

/// Runs one layer of `weight_bits`-bit inliers on `r`, checks it and returns the RTL cycle count.
fn run_cycles(r: &Resolved, weight_bits: u32, label: &str) -> u64 {
    common::run_checked(r, weight_bits, (N_OUT, K_IN), VECTORS, 7, label).cycles
}

#[test]
fn each_stage_adds_one_cycle() {
    let base = common::config(4, 8, 2, 8, 4);
    let cycles: Vec<u64> = (0..=2)
        .map(|stages| run_cycles(&with_stages(base.clone(), stages), 2, &format!("4x8 array, {stages} stage(s)")))
        .collect();
    assert_eq!(cycles[1], cycles[0] + 1, "one pipeline register must add one cycle: {cycles:?}");
    assert_eq!(cycles[2], cycles[0] + 2, "two pipeline registers must add two cycles: {cycles:?}");
}

#[test]
fn pipeline_on_smallest_array() {
    run_cycles(&with_stages(common::config(1, 1, 2, 1, 0), 2), 2, "1x1 array, 2 stages");
}

#[test]
fn pipeline_with_shared_recon() {
    let mut config = common::config(4, 8, 2, 8, 4);
    config.array.recon_rows = Some(1);
    run_cycles(&with_stages(config, 2), 2, "4x8 array, 1 ReCoN row, 2 stages");
}

#[test]
fn pipeline_with_multi_precision() {
    let mut config = common::config(4, 8, 2, 8, 4);
    config.array.multi_precision = true;
    let r = with_stages(config, 1);
    run_cycles(&r, 4, "4x8 multi-precision array, W4 layer, 1 stage");
}

#[test]
fn too_many_stages_rejected() {
    let mut config = common::config(4, 8, 2, 8, 4);
    config.array.pipeline_stages = 3;
    let error = config.resolve().expect_err("3 stages are not supported").to_string();
    assert!(error.contains("pipeline_stages = 3"), "message does not name the parameter: {error}");
    assert!(error.contains("0..=2"), "message does not give the legal range: {error}");
}
