//! Tool gates on the generated Verilog: Yosys elaboration and synthesis checks over a matrix of
//! configurations, and Icarus Verilog (four-state) cross-simulation of the smallest ones.

use microscopiq::config::{Config, Resolved};
use microscopiq::flow::{random_activations, SplitMix64};
use microscopiq::simulation::{self, SimOptions, Simulator};
use microscopiq::weights::Matrix;
use microscopiq::{generator, golden, image, quantizer, synthesis};

/// (rows, cols, weight bits, micro-block, max pairs, micro-exponent bits)
const MATRIX: &[(u32, u32, u32, u32, u32, u32)] = &[
    (1, 1, 2, 1, 0, 2),
    (1, 2, 4, 2, 1, 0),
    (2, 4, 2, 4, 2, 2),
    (4, 4, 4, 4, 2, 2),
    (8, 8, 2, 8, 4, 2),
    (8, 8, 4, 8, 4, 1),
    (16, 16, 2, 8, 4, 2),
];

fn resolve(point: (u32, u32, u32, u32, u32, u32)) -> Resolved {
    let (rows, cols, b, m, pairs, u) = point;
    let mut c = Config::default_config();
    c.array.rows = rows;
    c.array.cols = cols;
    c.format.weight_bits = b;
    c.format.ublock = m;
    c.format.max_pairs = pairs;
    c.format.micro_exp_bits = u;
    c.format.mab_rows = None;
    c.format.outlier_format = None;
    c.resolve().unwrap_or_else(|e| panic!("configuration {point:?}: {e}"))
}

#[test]
fn yosys_synthesizes_matrix_cleanly() {
    for &point in MATRIX {
        let r = resolve(point);
        let dir = tempfile::tempdir().unwrap();
        let files = generator::generate_rtl(&r);
        generator::write_files(dir.path(), &files).unwrap();
        let report = synthesis::check(dir.path(), &files).unwrap_or_else(|e| panic!("configuration {point:?}: {e}"));
        assert!(report.cells > 0, "configuration {point:?}: no cells after synthesis");
    }
}

/// Multi-precision points: (rows, cols, micro-block, max pairs).
const MULTI_PRECISION: &[(u32, u32, u32, u32)] = &[(2, 2, 2, 1), (4, 8, 8, 4), (16, 16, 8, 4)];

fn resolve_multi_precision(point: (u32, u32, u32, u32)) -> Resolved {
    let (rows, cols, m, pairs) = point;
    let mut c = Config::default_config();
    c.array.rows = rows;
    c.array.cols = cols;
    c.array.multi_precision = true;
    c.format.ublock = m;
    c.format.max_pairs = pairs;
    c.format.mab_rows = None;
    c.resolve().unwrap_or_else(|e| panic!("multi-precision configuration {point:?}: {e}"))
}

#[test]
fn yosys_synthesizes_multi_precision_cleanly() {
    for &point in MULTI_PRECISION {
        let r = resolve_multi_precision(point);
        let dir = tempfile::tempdir().unwrap();
        let files = generator::generate_rtl(&r);
        generator::write_files(dir.path(), &files).unwrap();
        let report = synthesis::check(dir.path(), &files).unwrap_or_else(|e| panic!("multi-precision {point:?}: {e}"));
        assert!(report.cells > 0, "multi-precision {point:?}: no cells after synthesis");
    }
}

#[test]
fn yosys_synthesizes_array_options_cleanly() {
    // (rows, cols, pipeline stages, weight buffer depth, recon rows)
    for (rows, cols, stages, depth, recon_rows) in [(1, 2, 2, 1, 1), (8, 8, 2, 1, 2), (8, 8, 1, 2, 8)] {
        let mut c = Config::default_config();
        c.array.rows = rows;
        c.array.cols = cols;
        c.array.recon_rows = Some(recon_rows);
        c.array.pipeline_stages = stages;
        c.array.weight_buffer_depth = depth;
        c.format.ublock = cols.min(8);
        c.format.max_pairs = cols.min(8) / 2;
        c.format.mab_rows = None;
        let label = format!("{rows}x{cols}, {stages} stages, buffer depth {depth}, {recon_rows} ReCoN rows");
        let r = c.resolve().unwrap_or_else(|e| panic!("{label}: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let files = generator::generate_rtl(&r);
        generator::write_files(dir.path(), &files).unwrap();
        let report = synthesis::check(dir.path(), &files).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(report.cells > 0, "{label}: no cells after synthesis");
    }
}

#[test]
fn icarus_matches_golden_multi_precision() {
    let array = resolve_multi_precision(MULTI_PRECISION[0]);
    for weight_bits in [2, 4] {
        let r = array.layer_config(weight_bits).unwrap().clone();
        let weights = random_weights(9, 7, 3);
        let layer = quantizer::quantize(&weights, &r);
        let vectors = random_activations(3, layer.k_pad, r.a, 5);
        let img = image::build(&layer, &r, &vectors);
        let prediction = golden::predict_on_array(&r, &img, array.rows);
        let options = SimOptions { simulator: Simulator::Icarus, ..SimOptions::default() };
        let sim = simulation::simulate_layer(&array, &r, &img, prediction.cycles, &options)
            .unwrap_or_else(|e| panic!("W{weight_bits} layer: {e}"));
        let comparison = simulation::compare(&prediction, &sim, img.vectors);
        assert_eq!(comparison.mismatches, 0, "W{weight_bits} layer: first mismatch {:?}", comparison.first);
        assert_eq!(comparison.cycles, comparison.cycles_predicted, "W{weight_bits} layer: cycle count");
        std::fs::remove_dir_all(&sim.work_dir).unwrap();
    }
}

fn random_weights(n: usize, k: usize, seed: u64) -> Matrix {
    let mut rng = SplitMix64(seed);
    let data = (0..n * k)
        .map(|_| {
            let x = rng.normal() as f32 * 0.05;
            if rng.next_u64() % 8 == 0 {
                x * 40.0
            } else {
                x
            }
        })
        .collect();
    Matrix::new("random", n, k, data)
}

#[test]
fn icarus_matches_golden_small_configs() {
    for &point in &MATRIX[..4] {
        let r = resolve(point);
        let weights = random_weights(9, 7, 3);
        let layer = quantizer::quantize(&weights, &r);
        let vectors = random_activations(3, layer.k_pad, r.a, 5);
        let img = image::build(&layer, &r, &vectors);
        let prediction = golden::predict(&r, &img);
        let options = SimOptions { simulator: Simulator::Icarus, ..SimOptions::default() };
        let sim = simulation::simulate(&r, &img, prediction.cycles, &options)
            .unwrap_or_else(|e| panic!("configuration {point:?}: {e}"));
        let comparison = simulation::compare(&prediction, &sim, img.vectors);
        assert_eq!(comparison.mismatches, 0, "configuration {point:?}: first mismatch {:?}", comparison.first);
        assert_eq!(comparison.cycles, comparison.cycles_predicted, "configuration {point:?}: cycle count");
        std::fs::remove_dir_all(&sim.work_dir).unwrap();
    }
}

#[test]
fn ice40_place_and_route_reports_fmax() {
    let r = resolve((2, 4, 2, 4, 2, 2));
    let dir = tempfile::tempdir().unwrap();
    let mut files = generator::generate_rtl(&r);
    files.extend(generator::generate_fmax_wrapper(&r));
    generator::write_files(dir.path(), &files).unwrap();
    let report = synthesis::place_and_route_ice40(dir.path(), &files).unwrap();
    assert!(report.logic_cells > 0, "no logic cells placed");
    assert!(report.logic_cells <= report.logic_cells_available, "{report:?}");
    assert!(report.fmax_mhz > 1.0, "implausibly low maximum frequency {report:?}");
    assert!(report.fmax_mhz < 1000.0, "implausibly high maximum frequency {report:?}");
}
