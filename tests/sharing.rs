//! ReCoN sharing: arrays where only the first `recon_rows` PE rows have a ReCoN. The packer
//! permutes tiles and splits them into passes. The RTL must still match the golden model bit
//! for bit and cycle for cycle, and the passes must add up to the exact GEMM.

use microscopiq::config::{Config, Resolved};
use microscopiq::flow::{self, random_activations, SplitMix64};
use microscopiq::simulation::{self, SimOptions};
use microscopiq::weights::Matrix;
use microscopiq::{generator, golden, image, quantizer, synthesis};

fn resolve(rows: u32, cols: u32, b: u32, m: u32, recon_rows: u32) -> Resolved {
    let mut c = Config::default_config();
    c.array.rows = rows;
    c.array.cols = cols;
    c.array.recon_rows = Some(recon_rows);
    c.format.weight_bits = b;
    c.format.ublock = m;
    c.format.max_pairs = m / 2;
    c.format.mab_rows = None;
    c.format.outlier_format = None;
    c.resolve().unwrap_or_else(|e| panic!("{rows}x{cols} b={b} recon_rows={recon_rows}: {e}"))
}

/// Weights where about one value in five is scaled up 40 times, so most rows hold pairs.
fn dense_outliers(n: usize, k: usize, seed: u64) -> Matrix {
    let mut rng = SplitMix64(seed);
    let data = (0..n * k)
        .map(|_| {
            let x = rng.normal() as f32 * 0.05;
            if rng.next_u64() % 5 == 0 {
                x * 40.0
            } else {
                x
            }
        })
        .collect();
    Matrix::new("dense_outliers", n, k, data)
}

#[test]
fn split_tiles_add_up_to_gemm() {
    for (rows, cols, b, m, recon_rows) in [(4, 8, 2, 4, 1), (8, 8, 4, 8, 2), (16, 16, 2, 8, 3), (2, 4, 2, 2, 1)] {
        let r = resolve(rows, cols, b, m, recon_rows);
        let weights = dense_outliers(37, 29, 11);
        let layer = quantizer::quantize(&weights, &r);
        let vectors = random_activations(3, layer.k_pad, r.a, 2);
        let img = image::build(&layer, &r, &vectors);
        let tiles = img.k_tiles * img.n_tiles;
        assert!(img.tiles() > tiles, "{rows}x{cols} recon_rows={recon_rows}: no tile was split");
        flow::check_image_dequantization(&layer, &r, &img).unwrap();
        let prediction = golden::predict(&r, &img);
        flow::check_golden_against_gemm(&layer, &r, &img, &prediction, &vectors).unwrap();
    }
}

#[test]
fn later_passes_store_only_recon_rows() {
    let r = resolve(8, 8, 2, 8, 2);
    let weights = dense_outliers(16, 16, 5);
    let layer = quantizer::quantize(&weights, &r);
    let img = image::build(&layer, &r, &random_activations(1, layer.k_pad, r.a, 1));
    let later = img.passes.iter().filter(|p| p.same_acts).count();
    assert!(later > 0, "no later pass");
    assert_eq!(img.header_words.len(), img.tiles());
    assert_eq!(img.row_words.len(), (img.tiles() - later) * r.rows + later * r.recon_rows);
    for pass in img.passes.iter().filter(|p| p.same_acts) {
        let loaded: Vec<usize> = pass.sources.iter().flatten().copied().collect();
        assert!(loaded.len() <= r.recon_rows, "later pass holds {} channels", loaded.len());
    }
}

#[test]
fn rtl_matches_golden_with_shared_recon() {
    for (rows, cols, b, m, recon_rows) in [(4, 8, 2, 4, 1), (8, 8, 4, 8, 2), (16, 16, 2, 8, 1)] {
        let r = resolve(rows, cols, b, m, recon_rows);
        let weights = dense_outliers(23, 35, 7);
        let layer = quantizer::quantize(&weights, &r);
        let vectors = random_activations(4, layer.k_pad, r.a, 3);
        let img = image::build(&layer, &r, &vectors);
        let prediction = golden::predict(&r, &img);
        let sim = simulation::simulate(&r, &img, prediction.cycles, &SimOptions::default())
            .unwrap_or_else(|e| panic!("{rows}x{cols} recon_rows={recon_rows}: {e}"));
        let comparison = simulation::compare(&prediction, &sim, img.vectors);
        assert_eq!(comparison.mismatches, 0, "{rows}x{cols} recon_rows={recon_rows}: first mismatch {:?}", comparison.first);
        assert_eq!(comparison.cycles, comparison.cycles_predicted, "{rows}x{cols} recon_rows={recon_rows}: cycles");
        std::fs::remove_dir_all(&sim.work_dir).unwrap();
    }
}

#[test]
fn icarus_matches_golden_with_shared_recon() {
    let r = resolve(4, 8, 2, 4, 1);
    let weights = dense_outliers(16, 24, 7);
    let layer = quantizer::quantize(&weights, &r);
    let vectors = random_activations(2, layer.k_pad, r.a, 6);
    let img = image::build(&layer, &r, &vectors);
    assert!(img.passes.iter().any(|p| p.same_acts), "no later pass to exercise");
    let prediction = golden::predict(&r, &img);
    let options = SimOptions { simulator: simulation::Simulator::Icarus, ..SimOptions::default() };
    let sim = simulation::simulate(&r, &img, prediction.cycles, &options).unwrap();
    let comparison = simulation::compare(&prediction, &sim, img.vectors);
    assert_eq!(comparison.mismatches, 0, "first mismatch {:?}", comparison.first);
    assert_eq!(comparison.cycles, comparison.cycles_predicted, "cycles");
    std::fs::remove_dir_all(&sim.work_dir).unwrap();
}

#[test]
fn shared_recon_passes_lint_and_yosys() {
    for (rows, cols, b, m, recon_rows) in [(2, 4, 2, 4, 1), (8, 8, 4, 8, 3)] {
        let r = resolve(rows, cols, b, m, recon_rows);
        let dir = tempfile::tempdir().unwrap();
        let files = generator::generate_rtl(&r);
        assert!(files.iter().any(|f| f.name == "msq_act_route.sv"), "no routing module");
        generator::write_files(dir.path(), &files).unwrap();
        simulation::lint(dir.path(), &files).unwrap_or_else(|e| panic!("{rows}x{cols} recon_rows={recon_rows}: {e}"));
        synthesis::check(dir.path(), &files).unwrap_or_else(|e| panic!("{rows}x{cols} recon_rows={recon_rows}: {e}"));
    }
}

#[test]
fn recon_rows_above_rows_rejected() {
    let mut c = Config::default_config();
    c.array.recon_rows = Some(17);
    let error = c.resolve().unwrap_err().to_string();
    assert!(error.contains("recon_rows = 17"), "{error}");
}
