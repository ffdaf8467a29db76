//! Invalid configurations: `resolve` rejects them with a message that names the parameter,
//! and the command-line tool exits with an error before it writes any file.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use microscopiq::config::{Config, DEFAULT_TOML};

#[test]
fn resolve_rejects_cols_not_multiple_of_ublock() {
    let mut config = Config::default_config();
    config.array.cols = 12;
    config.format.ublock = 8;
    let error = config.resolve().expect_err("cols = 12 with ublock = 8 resolved");
    assert!(error.0.contains("ublock"), "cols = 12, ublock = 8: message does not name ublock: {error}");
    assert!(error.0.contains("cols = 12"), "cols = 12, ublock = 8: message does not name cols = 12: {error}");
}

#[test]
fn resolve_rejects_too_many_pairs() {
    let mut config = Config::default_config();
    config.format.max_pairs = 5;
    let error = config.resolve().expect_err("max_pairs = 5 with ublock = 8 resolved");
    assert!(error.0.contains("max_pairs = 5"), "max_pairs = 5: message does not name it: {error}");
}

#[test]
fn resolve_rejects_weight_bits_five() {
    let mut config = Config::default_config();
    config.format.weight_bits = 5;
    config.format.outlier_format = None;
    let error = config.resolve().expect_err("weight_bits = 5 resolved");
    assert!(error.0.contains("weight_bits = 5"), "weight_bits = 5: message does not name it: {error}");
}

#[test]
fn resolve_rejects_mab_rows_not_multiple_of_rows() {
    let mut config = common::config(4, 8, 2, 8, 4);
    config.format.mab_rows = Some(6);
    let error = config.resolve().expect_err("mab_rows = 6 with rows = 4 resolved");
    assert!(error.0.contains("mab_rows = 6"), "mab_rows = 6, rows = 4: message does not name it: {error}");
}

#[test]
fn from_toml_rejects_unknown_field() {
    let text = DEFAULT_TOML.replace("[array]", "[array]\nrowz = 3");
    let error = Config::from_toml(&text, "test.toml").expect_err("unknown field `rowz` parsed");
    assert!(error.0.contains("rowz"), "unknown field: message does not name `rowz`: {error}");
    assert!(error.0.contains("test.toml"), "unknown field: message does not name the file: {error}");
}

/// Runs the binary with `args` in `dir`.
fn run_binary(dir: &Path, args: &[&str]) -> Output {
    Command::new(common::binary())
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", common::binary().display()))
}

/// Checks that `args` exits with an error that contains every string in `names` and that
/// `x`, the output folder the arguments name, was not created.
fn assert_rejected(args: &[&str], names: &[&str]) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = dir.path().join("x");
    let mut full: Vec<&str> = args.to_vec();
    let out_text = out.to_str().expect("UTF-8 path").to_string();
    full.extend(["--out", &out_text]);
    let output = run_binary(dir.path(), &full);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let label = args.join(" ");

    assert!(!output.status.success(), "`{label}` succeeded; stdout: {}", String::from_utf8_lossy(&output.stdout));
    assert_eq!(output.status.code(), Some(2), "`{label}`: exit status {}; stderr: {stderr}", output.status);
    for name in names {
        assert!(stderr.contains(name), "`{label}`: the message does not name `{name}`: {stderr}");
    }
    assert!(!out.exists(), "`{label}` created {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("list the temporary folder").collect();
    assert!(leftovers.is_empty(), "`{label}` left files behind: {leftovers:?}");
}

#[test]
fn generate_rejects_cols_twelve() {
    assert_rejected(&["generate", "--cols", "12"], &["ublock", "cols = 12"]);
}

#[test]
fn generate_rejects_max_pairs_five() {
    assert_rejected(&["generate", "--max-pairs", "5"], &["max_pairs = 5"]);
}

#[test]
fn generate_rejects_weight_bits_five() {
    assert_rejected(&["generate", "--weight-bits", "5"], &["weight_bits = 5"]);
}

#[test]
fn generate_rejects_unknown_toml_field() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join("unknown_field.toml");
    std::fs::write(&path, DEFAULT_TOML.replace("[format]", "[format]\nweight_bitz = 2")).expect("write the configuration");
    let path_text = path.to_str().expect("UTF-8 path");
    assert_rejected(&["generate", "--config", path_text], &["weight_bitz", "unknown_field.toml"]);
}

#[test]
fn quantize_rejects_cols_twelve() {
    assert_rejected(&["quantize", "--cols", "12", "--vectors", "1"], &["ublock", "cols = 12"]);
}

#[test]
fn generate_writes_rtl_files() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = dir.path().join("rtl");
    let output = run_binary(dir.path(), &["generate", "--rows", "2", "--cols", "4", "--ublock", "4", "--out", out.to_str().unwrap()]);
    assert!(output.status.success(), "generate 2x4 failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(out.join("msq_top.sv").is_file(), "generate 2x4 wrote no msq_top.sv");
}

#[test]
fn generate_rejects_invalid_array_options() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["generate", "--pipeline-stages", "3"], &["pipeline_stages = 3", "0..=2"]),
        (&["generate", "--weight-buffer-depth", "0"], &["weight_buffer_depth = 0", "1..=2"]),
        (&["generate", "--multi-precision", "--rows", "3"], &["rows = 3", "even"]),
        (&["generate", "--multi-precision", "--recon-rows", "4"], &["recon_rows = 4", "multi_precision"]),
        (&["generate", "--outlier-format", "e3m2"], &["outlier_format = e3m2", "weight_bits = 2"]),
    ];
    for (args, names) in cases {
        assert_rejected(args, names);
    }
}

#[test]
fn generate_writes_multi_precision_rtl() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = dir.path().join("rtl");
    let args = ["generate", "--rows", "2", "--cols", "4", "--ublock", "4", "--multi-precision", "--pipeline-stages", "2", "--out"];
    let mut full: Vec<&str> = args.to_vec();
    full.push(out.to_str().unwrap());
    let output = run_binary(dir.path(), &full);
    assert!(output.status.success(), "generate multi-precision 2x4 failed: {}", String::from_utf8_lossy(&output.stderr));
    for name in ["msq_decode_mp.sv", "msq_decode_narrow.sv", "msq_decode_wide.sv", "msq_top.sv"] {
        assert!(out.join(name).is_file(), "generate multi-precision 2x4 wrote no {name}");
    }
}

#[test]
fn generate_rejects_unknown_outlier_scope() {
    assert_rejected(&["generate", "--outlier-scope", "row"], &["--outlier-scope", "column", "macro-block", "micro-block"]);
}

#[test]
fn generate_rejects_k_sigma_zero() {
    assert_rejected(&["generate", "--k-sigma", "0"], &["k_sigma = 0"]);
}

#[test]
fn print_config_applies_outlier_scope() {
    let dir = tempfile::tempdir().expect("temporary folder");
    for (flag, expected) in [("column", "column"), ("macro-block", "macro_block"), ("micro-block", "micro_block")] {
        let output = run_binary(dir.path(), &["generate", "--print-config", "--outlier-scope", flag, "--k-sigma", "2.5"]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "--outlier-scope {flag}: {}", String::from_utf8_lossy(&output.stderr));
        let config = Config::from_toml(&stdout, "printed configuration").expect("printed configuration parses");
        assert_eq!(config.quantizer.outlier_scope.name(), expected, "--outlier-scope {flag}");
        assert_eq!(config.quantizer.k_sigma, 2.5, "--outlier-scope {flag}");
    }
}

#[test]
fn eval_rejects_weight_bits() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let output = run_binary(dir.path(), &["eval", "--weight-bits", "4"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--weight-bits 4"), "{stderr}");
    assert!(stderr.contains("--bits"), "{stderr}");
}

#[test]
fn sweep_rejects_fixed_rule() {
    let dir = tempfile::tempdir().expect("temporary folder");
    for flag in [["--k-sigma", "2"], ["--outlier-scope", "column"]] {
        let output = run_binary(dir.path(), &["eval", "--sweep-outliers", flag[0], flag[1]]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag:?}: {stderr}");
        assert!(stderr.contains("--sweep-outliers"), "{flag:?}: {stderr}");
        assert!(stderr.contains(flag[0]), "{flag:?}: {stderr}");
    }
}

#[test]
fn sweep_lists_need_sweep_flag() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let output = run_binary(dir.path(), &["eval", "--k-sigmas", "2,3"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--sweep-outliers"), "{stderr}");
}
