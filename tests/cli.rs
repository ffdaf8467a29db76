//! The command-line tool end to end on the real MiniLM query projection
//! `encoder.layer.0.attention.self.query.weight` ([384, 384]).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use microscopiq::bits::BitWord;
use serde_json::Value;

fn run_binary(args: &[&str]) -> Output {
    Command::new(common::binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", common::binary().display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `quantize` on an 8x8 array with 4 activation vectors and returns the image folder.
fn quantize_query(test: &str, weights: &Path, parent: &Path) -> std::path::PathBuf {
    let out = parent.join("image");
    let output = run_binary(&[
        "quantize",
        "--rows", "8",
        "--cols", "8",
        "--ublock", "8",
        "--weights", weights.to_str().expect("UTF-8 path"),
        "--tensor", common::QUERY,
        "--out", out.to_str().expect("UTF-8 path"),
        "--vectors", "4",
        "--json",
    ]);
    assert!(output.status.success(), "{test}: quantize failed: {}", text(&output.stderr));
    out
}

fn simulate_json(image: &Path) -> (Output, Value) {
    let output = run_binary(&["simulate", "--image", image.to_str().expect("UTF-8 path"), "--json"]);
    let json = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output, json)
}

#[test]
fn cli_quantize_then_simulate() {
    let Some(weights) = common::require_minilm("cli_quantize_then_simulate") else { return };
    let dir = tempfile::tempdir().expect("temporary folder");
    let image = quantize_query("cli_quantize_then_simulate", &weights, dir.path());

    for file in ["config.toml", "rows.hex", "pairs.hex", "acts.hex", "bases.hex", "expected.hex", "dequant.safetensors", "manifest.json"] {
        assert!(image.join(file).is_file(), "quantize 8x8 did not write {file}");
    }
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(image.join("manifest.json")).expect("read manifest.json"))
        .expect("manifest.json is JSON");
    assert_eq!(manifest["shape"], serde_json::json!([384, 384]), "manifest shape");
    assert_eq!(manifest["vectors"], 4, "manifest vectors");

    let (output, json) = simulate_json(&image);
    assert!(output.status.success(), "simulate failed: {}{}", text(&output.stdout), text(&output.stderr));
    assert_eq!(json["mismatches"], 0, "simulate 8x8: {json}");
    assert!(json["cycles"].as_u64().is_some(), "simulate 8x8 printed no cycle count: {json}");
    assert_eq!(json["cycles"], json["cycles_predicted"], "simulate 8x8: RTL cycle count differs from the prediction");
    assert_eq!(json["cycles_predicted"], manifest["cycles_predicted"], "simulate 8x8: prediction differs from the manifest");
    assert_eq!(json["compared"], 48 * 48 * 4 * 8, "simulate 8x8: outputs compared (2304 tiles x 4 vectors x 8 columns)");
}

#[test]
fn cli_run_prints_json_report() {
    let Some(weights) = common::require_minilm("cli_run_prints_json_report") else { return };
    let output = run_binary(&[
        "run", "--json",
        "--rows", "4",
        "--cols", "8",
        "--ublock", "8",
        "--vectors", "2",
        "--weights", weights.to_str().expect("UTF-8 path"),
        "--tensor", common::QUERY,
    ]);
    assert!(output.status.success(), "run 4x8 failed: {}", text(&output.stderr));

    let stdout = text(&output.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("run 4x8 stdout is not one JSON value ({e}): {stdout}"));
    assert!(report.is_object(), "run 4x8 printed {report}, not an object");

    for key in [
        "config_hash", "tensor", "shape", "ebw", "outliers", "pruned", "outputs_compared",
        "mismatches", "cycles", "cycles_predicted", "verilator_version",
    ] {
        assert!(report.get(key).is_some(), "run 4x8 report lacks `{key}`: {report}");
    }

    assert_eq!(report["tensor"], common::QUERY, "run 4x8 report tensor");
    assert_eq!(report["shape"], serde_json::json!([384, 384]), "run 4x8 report shape");
    assert_eq!(report["mismatches"], 0, "run 4x8: {report}");
    assert_eq!(report["cycles"], report["cycles_predicted"], "run 4x8: RTL cycle count differs from the prediction");
    assert!(report["outputs_compared"].as_u64().unwrap_or(0) > 0, "run 4x8 compared no outputs");
    assert!(
        report["verilator_version"].as_str().unwrap_or("").starts_with("Verilator"),
        "run 4x8 report verilator_version: {}",
        report["verilator_version"]
    );
}

/// Copies the image files of `from` into a new folder `to`.
fn copy_image(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("list the image") {
        let entry = entry.expect("image entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy an image file");
    }
}

/// Replaces the first line of `file` with `edit` applied to it.
fn edit_first_line(file: &Path, edit: impl Fn(&str) -> String) {
    let text = std::fs::read_to_string(file).expect("read the hex file");
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[0] = edit(&lines[0]);
    std::fs::write(file, lines.join("\n") + "\n").expect("write the hex file");
}

/// Flips bit 0 of the last hex digit, which is bit 0 of slot 0 of the first row word.
fn flip_low_bit(line: &str) -> String {
    let mut digits: Vec<char> = line.chars().collect();
    let last = digits.len() - 1;
    let value = digits[last].to_digit(16).expect("hex digit") ^ 1;
    digits[last] = char::from_digit(value, 16).expect("hex digit");
    digits.into_iter().collect()
}

/// `simulate` recomputes the golden model from the hex files and checks expected.hex
/// against it, so a changed weight in rows.hex shows up as an expected.hex line that no
/// longer matches.
#[test]
fn cli_simulate_rejects_edited_rows() {
    let Some(weights) = common::require_minilm("cli_simulate_rejects_edited_rows") else { return };
    let dir = tempfile::tempdir().expect("temporary folder");
    let image = quantize_query("cli_simulate_rejects_edited_rows", &weights, dir.path());
    let copy = dir.path().join("edited");
    copy_image(&image, &copy);
    edit_first_line(&copy.join("rows.hex"), flip_low_bit);

    let (output, _) = simulate_json(&copy);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "simulate on an edited rows.hex: exit status {}; stderr: {stderr}", output.status);
    assert!(stderr.contains("expected.hex"), "simulate on an edited rows.hex: the message does not name expected.hex: {stderr}");
    assert!(stderr.contains("differs from the golden model"), "simulate on an edited rows.hex: {stderr}");
    assert!(stderr.contains(copy.to_str().unwrap()), "simulate on an edited rows.hex: the message does not name the folder: {stderr}");
}

#[test]
fn cli_simulate_rejects_invalid_hex_word() {
    let Some(weights) = common::require_minilm("cli_simulate_rejects_invalid_hex_word") else { return };
    let dir = tempfile::tempdir().expect("temporary folder");
    let image = quantize_query("cli_simulate_rejects_invalid_hex_word", &weights, dir.path());
    let copy = dir.path().join("edited");
    copy_image(&image, &copy);
    edit_first_line(&copy.join("rows.hex"), |line| format!("g{}", &line[1..]));

    let (output, _) = simulate_json(&copy);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "simulate on a non-hex rows.hex: exit status {}; stderr: {stderr}", output.status);
    assert!(stderr.contains("rows.hex:1"), "simulate on a non-hex rows.hex: the message does not name rows.hex:1: {stderr}");
}

/// Setting the pair flag of a micro-block that has no pair entry leaves pairs.hex one entry
/// short of what rows.hex announces.
#[test]
fn cli_simulate_rejects_extra_flag() {
    let Some(weights) = common::require_minilm("cli_simulate_rejects_extra_flag") else { return };
    let dir = tempfile::tempdir().expect("temporary folder");
    let image = quantize_query("cli_simulate_rejects_extra_flag", &weights, dir.path());
    let copy = dir.path().join("edited");
    copy_image(&image, &copy);

    // The 8x8 configuration of `quantize_query`: one micro-block per row word, whose flag
    // follows the slots.
    let r = common::resolve(&common::config(8, 8, 2, 8, 4));
    let width = r.row_word_bits as usize;
    let flag = r.cols * r.b as usize;
    let rows_file = copy.join("rows.hex");
    let contents = std::fs::read_to_string(&rows_file).expect("read rows.hex");
    let mut words: Vec<BitWord> = contents.lines().map(|line| BitWord::from_hex(line, width).expect("valid row word")).collect();
    let unflagged = words.iter().rposition(|word| word.get(flag, 1) == 0).expect("a row word without pairs");
    words[unflagged].set(flag, 1, 1);
    let edited: String = words.iter().map(|word| word.to_hex() + "\n").collect();
    std::fs::write(&rows_file, edited).expect("write rows.hex");

    let (output, _) = simulate_json(&copy);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "simulate with an extra flag: exit status {}; stderr: {stderr}", output.status);
    assert!(stderr.contains("pairs.hex"), "simulate with an extra flag: the message does not name pairs.hex: {stderr}");
}
