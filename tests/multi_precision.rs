//! Multi-precision arrays: one generated design runs both b-bit and 2b-bit layers, the mode
//! taken from each layer's image, and both match the golden model bit for bit.

mod common;

use microscopiq::config::Resolved;
use microscopiq::flow;
use microscopiq::generator;
use microscopiq::quantizer;

const N_OUT: usize = 21;
const K_IN: usize = 19;
const VECTORS: usize = 3;

fn design(rows: u32, cols: u32, ublock: u32) -> Resolved {
    let mut config = common::config(rows, cols, 2, ublock, ublock / 2);
    config.array.multi_precision = true;
    // A low threshold fills micro-blocks with pairs in both kinds of layer.
    config.quantizer.k_sigma = 1.0;
    common::resolve(&config)
}

/// Runs one layer of `weight_bits`-bit inliers on `array` and checks the comparison.
fn run_mode(array: &Resolved, weight_bits: u32, seed: u64) -> flow::RunReport {
    let layer_config = array.layer_config(weight_bits).expect("the array runs this width");
    let label = format!("{}x{} multi-precision array, W{weight_bits} layer", array.rows, array.cols);
    if layer_config.max_pairs > 0 {
        let layer = quantizer::quantize(&common::outlier_weights(N_OUT, K_IN, seed), layer_config);
        assert!(layer.stats.outliers > 0, "{label}: the test weights gave no outliers");
    }
    common::run_checked(array, weight_bits, (N_OUT, K_IN), VECTORS, seed, &label)
}

#[test]
fn w2_and_w4_layers_on_one_array() {
    for (rows, cols, ublock) in [(2, 2, 2), (4, 8, 8), (8, 4, 4)] {
        let array = design(rows, cols, ublock);
        let narrow = run_mode(&array, 2, 3);
        let wide = run_mode(&array, 4, 3);
        assert_eq!(narrow.config_hash, wide.config_hash, "both layers must run on the same design");
        // A 4-bit tile covers half as many input channels, so the same layer needs more tiles.
        assert!(wide.tiles > narrow.tiles, "{rows}x{cols}: W4 tiles {} vs W2 tiles {}", wide.tiles, narrow.tiles);
    }
}

#[test]
fn multi_precision_without_pairs() {
    let mut config = common::config(2, 4, 2, 4, 0);
    config.array.multi_precision = true;
    let array = common::resolve(&config);
    run_mode(&array, 2, 5);
    run_mode(&array, 4, 5);
}

#[test]
fn odd_rows_rejected() {
    let mut config = common::config(3, 4, 2, 4, 2);
    config.array.multi_precision = true;
    let error = config.resolve().expect_err("3 rows cannot pair into multi-precision PEs").to_string();
    assert!(error.contains("rows = 3"), "message does not name the parameter: {error}");
    assert!(error.contains("even"), "message does not say what is legal: {error}");
}

#[test]
fn shared_recon_rejected() {
    let mut config = common::config(4, 4, 2, 4, 2);
    config.array.multi_precision = true;
    config.array.recon_rows = Some(2);
    let error = config.resolve().expect_err("shared ReCoN rows are not supported").to_string();
    assert!(error.contains("recon_rows = 2"), "message does not name the parameter: {error}");
}

#[test]
fn wide_layer_needs_multi_precision() {
    let array = common::resolve(&common::config(4, 4, 2, 4, 2));
    let error = array.layer_config(4).expect_err("a single-precision array runs W2 only").to_string();
    assert!(error.contains("multi_precision"), "message does not say how to fix it: {error}");
}

#[test]
fn single_precision_rtl_unchanged() {
    // Turning the option on must not change the files of a single-precision design.
    let plain = common::resolve(&common::config(4, 4, 2, 4, 2));
    let files = generator::generate_rtl(&plain);
    assert!(files.iter().all(|f| !f.text.contains("wide_i")), "a single-precision design has mode ports");
    let mp = design(4, 4, 4);
    let names: Vec<String> = generator::generate_rtl(&mp).into_iter().map(|f| f.name).collect();
    assert!(names.contains(&"msq_decode_mp.sv".to_string()), "multi-precision design lacks its decode: {names:?}");
}

/// Runs the binary in `dir` and returns its exit code, stdout and stderr.
fn run_binary(dir: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(common::binary()).current_dir(dir).args(args).output().expect("start microscopiq");
    (output.status.code(), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn cli_simulates_w4_image_on_array() {
    let Some(_) = common::require_minilm("cli_simulates_w4_image_on_array") else { return };
    let dir = tempfile::tempdir().expect("temporary folder");
    let shape = ["--rows", "2", "--cols", "4", "--ublock", "4"];
    let (code, array_toml, stderr) = run_binary(dir.path(), &[&["generate", "--print-config", "--multi-precision"][..], &shape].concat());
    assert_eq!(code, Some(0), "generate --print-config failed: {stderr}");
    std::fs::write(dir.path().join("array.toml"), array_toml).expect("write the array configuration");

    let quantize = [
        &["quantize", "--multi-precision", "--layer-bits", "4", "--vectors", "1", "--out", "w4"][..],
        &["--tensor", "encoder.layer.0.attention.self.query.weight"],
        &shape,
    ]
    .concat();
    let (code, _, stderr) = run_binary(dir.path(), &quantize);
    assert_eq!(code, Some(0), "quantize --layer-bits 4 failed: {stderr}");
    let image_config = std::fs::read_to_string(dir.path().join("w4/config.toml")).expect("read the image configuration");
    assert!(image_config.contains("weight_bits = 4"), "the W4 image carries another configuration:\n{image_config}");

    let (code, stdout, stderr) = run_binary(dir.path(), &["simulate", "--image", "w4", "--array", "array.toml", "--json"]);
    assert_eq!(code, Some(0), "simulate on the multi-precision array failed: {stdout} {stderr}");
    let comparison: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON value");
    assert_eq!(comparison["mismatches"], 0, "mismatches: {comparison}");
    assert_eq!(comparison["cycles"], comparison["cycles_predicted"], "cycle count: {comparison}");

    let (code, plain_toml, stderr) = run_binary(dir.path(), &[&["generate", "--print-config"][..], &shape].concat());
    assert_eq!(code, Some(0), "generate --print-config failed: {stderr}");
    std::fs::write(dir.path().join("plain.toml"), plain_toml).expect("write the plain configuration");
    let (code, _, stderr) = run_binary(dir.path(), &["simulate", "--image", "w4", "--array", "plain.toml"]);
    assert_eq!(code, Some(2), "a W2-only array accepted a W4 image: {stderr}");
    assert!(stderr.contains("is not one that the array"), "unexpected message: {stderr}");
}
