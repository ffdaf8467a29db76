//! GPTQ image sets and sequential calibration on the real MiniLM and glassllm models and the
//! Shakespeare calibration text: `quantize --all-layers --gptq`, `run --image-set` with
//! calibration activations, and the Hessians of sequential calibration.
//!
//! Calibration uses the first few samples only, so that each test stays fast. A missing model
//! file fails these tests unless `MICROSCOPIQ_SKIP_MODELS=1` is set.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use indicatif::ProgressBar;
use microscopiq::calibration::{self, CalibrationSet, LinearModel};
use microscopiq::config::Config;
use microscopiq::gptq::{self, GptqOptions};
use microscopiq::hessian::{self, Hessian};
use microscopiq::models::bpe::BpeTokenizer;
use microscopiq::models::glassllm::GlassLlm;
use microscopiq::models::minilm::MiniLm;
use microscopiq::models::wordpiece::WordPiece;
use microscopiq::weights::{self, Matrix};
use serde_json::Value;

/// MiniLM calibration sentences in the MiniLM image set.
const MINILM_SAMPLES: usize = 16;

/// glassllm calibration windows of 128 tokens in the glassllm tests.
const GLASSLLM_SAMPLES: usize = 8;

/// The MiniLM layer simulated from the image set: the first attention output projection.
const ATTENTION_OUTPUT: &str = "encoder.layer.0.attention.output.dense.weight";

fn binary(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_microscopiq")).args(args).output().expect("run microscopiq")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn glassllm_dir() -> PathBuf {
    weights::models_dir().join("glassllm")
}

/// Returns true when the glassllm files exist, as [`common::require_minilm`] does for MiniLM.
fn require_glassllm(test: &str) -> bool {
    let path = glassllm_dir().join("en.npz");
    if path.is_file() {
        return true;
    }
    if std::env::var(common::SKIP_MODELS_ENV).as_deref() == Ok("1") {
        eprintln!("skipped {test}: {} is missing and {}=1", path.display(), common::SKIP_MODELS_ENV);
        return false;
    }
    panic!("{test} needs {}, which is missing: run `make fetch-models`", path.display());
}

/// Writes a GPTQ image set of MiniLM's first encoder layer on an 8x8 array once, in a folder
/// that lives as long as the test binary.
fn minilm_set() -> &'static Path {
    static SET: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = SET.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary folder");
        let out = dir.path().join("set");
        let samples = MINILM_SAMPLES.to_string();
        let output = binary(&[
            "quantize", "--all-layers", "--gptq",
            "--layers", "encoder.layer.0.",
            "--calibration-samples", &samples,
            "--rows", "8", "--cols", "8", "--vectors", "2", "--json",
            "--out", path_str(&out),
        ]);
        assert!(output.status.success(), "quantize --all-layers --gptq failed: {}", text(&output.stderr));
        (dir, out)
    });
    path
}

#[test]
fn gptq_set_records_calibration() {
    if common::require_minilm("gptq_set_records_calibration").is_none() {
        return;
    }
    let set = minilm_set();
    let manifest = read_json(&set.join("manifest.json"));
    assert_eq!(manifest["method"], "gptq");
    assert_eq!(manifest["model"], "minilm");
    let calibration = &manifest["calibration"];
    assert_eq!(calibration["samples"], MINILM_SAMPLES);
    assert_eq!(calibration["sequential"], false);
    let tokens = calibration["tokens"].as_u64().expect("calibration tokens");
    assert!(tokens > 2 * MINILM_SAMPLES as u64, "{MINILM_SAMPLES} sentences give only {tokens} tokens");
    let slices = calibration["text"].as_str().expect("calibration text");
    assert!(slices.contains("macbeth_gut.txt"), "{slices}");
    assert!(!slices.contains("julius_caesar"), "calibration reads evaluation text: {slices}");
    assert!(manifest["config"].as_str().expect("config TOML").contains("rows = 8"));

    let layers = manifest["layers"].as_array().expect("layers");
    let names: Vec<&str> = layers.iter().map(|l| l["tensor"].as_str().expect("tensor name")).collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert_eq!(names[0], "encoder.layer.0.attention.self.query.weight", "layers follow execution order");
    for layer in layers {
        let gptq = &layer["gptq"];
        assert!(gptq["damping"].as_f64().is_some_and(|d| d > 0.0), "{layer}");
        assert_eq!(gptq["fell_back_to_rtn"], false, "{layer}");
        assert!(gptq["damping_retries"].as_u64().is_some(), "{layer}");
        assert!(gptq["dead_channels"].as_u64().is_some(), "{layer}");
        let folder = set.join(layer["folder"].as_str().expect("folder"));
        assert_eq!(read_json(&folder.join("manifest.json"))["method"], "gptq", "{}", folder.display());
    }
}

#[test]
fn run_gptq_set_layer_in_rtl() {
    if common::require_minilm("run_gptq_set_layer_in_rtl").is_none() {
        return;
    }
    let set = minilm_set();
    let output = binary(&["run", "--json", "--image-set", path_str(set), "--layer", ATTENTION_OUTPUT, "--vectors", "2"]);
    assert!(output.status.success(), "run --image-set failed: {}{}", text(&output.stdout), text(&output.stderr));
    let report: Value = serde_json::from_str(text(&output.stdout).trim()).expect("one JSON object");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["cycles"], report["cycles_predicted"], "{report}");
    assert_eq!(report["outputs_compared"], 48 * 48 * 2 * 8, "{report}");
    assert_eq!(report["tensor"], ATTENTION_OUTPUT);

    let layer = read_json(&set.join("manifest.json"))["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .find(|l| l["tensor"] == ATTENTION_OUTPUT)
        .cloned()
        .expect("layer in the set");
    assert_eq!(report["outliers"], layer["outliers"], "the run reads the stored image, it does not quantize again");
}

#[test]
fn set_rejects_other_config() {
    if common::require_minilm("set_rejects_other_config").is_none() {
        return;
    }
    let set = minilm_set();
    let work = tempfile::tempdir().expect("temporary folder");
    let keep = work.path().join("rtl");
    let output = binary(&[
        "run", "--image-set", path_str(set), "--layer", ATTENTION_OUTPUT,
        "--k-sigma", "2.5", "--keep", path_str(&keep),
    ]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("was quantized with configuration"), "{stderr}");
    assert!(stderr.contains("k_sigma = 2.5"), "{stderr}");
    assert!(!keep.exists(), "RTL files were written before the configuration check");

    // An option equal to the set's value is no mismatch, so only the layer name is wrong here.
    let output = binary(&["run", "--image-set", path_str(set), "--layer", "encoder.layer.0.query", "--rows", "8"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not in the image set"), "{stderr}");
    assert!(stderr.contains("encoder.layer.0.attention.self.query.weight"), "the error lists the layers: {stderr}");
}

#[test]
fn glassllm_sequential_set_runs_in_rtl() {
    if !require_glassllm("glassllm_sequential_set_runs_in_rtl") {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary folder");
    let out = dir.path().join("set");
    let samples = GLASSLLM_SAMPLES.to_string();
    let output = binary(&[
        "quantize", "--all-layers", "--model", "glassllm", "--gptq", "--sequential",
        "--calibration-samples", &samples,
        "--rows", "8", "--cols", "8", "--vectors", "2", "--json",
        "--out", path_str(&out),
    ]);
    assert!(output.status.success(), "quantize --gptq --sequential failed: {}", text(&output.stderr));
    let manifest = read_json(&out.join("manifest.json"));
    assert_eq!(manifest["calibration"]["sequential"], true);
    assert_eq!(manifest["calibration"]["tokens"], GLASSLLM_SAMPLES * 128);
    assert_eq!(manifest["layers"].as_array().expect("layers").len(), 28);

    // A layer of the second block: its inputs come through the quantized first block.
    let output = binary(&["run", "--json", "--image-set", path_str(&out), "--layer", "blocks.1.attn.W_O", "--vectors", "4"]);
    assert!(output.status.success(), "run --image-set failed: {}{}", text(&output.stdout), text(&output.stderr));
    let report: Value = serde_json::from_str(text(&output.stdout).trim()).expect("one JSON object");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["cycles"], report["cycles_predicted"], "{report}");
    assert_eq!(report["outputs_compared"], 16 * 16 * 4 * 8, "{report}");
}

fn glassllm_calibration(samples: usize) -> Option<(GlassLlm, CalibrationSet)> {
    if !require_glassllm("glassllm calibration") {
        return None;
    }
    let model = GlassLlm::load(&glassllm_dir().join("en.npz")).unwrap_or_else(|e| panic!("{e}"));
    let tokenizer = BpeTokenizer::load(&glassllm_dir().join("en.tokenizer.json")).unwrap_or_else(|e| panic!("{e}"));
    let mut set = calibration::glassllm_calibration(&model, &tokenizer).unwrap_or_else(|e| panic!("{e}"));
    set.truncate(samples);
    Some((model, set))
}

/// Quantizes the layers that `selected` accepts sequentially with GPTQ-MicroScopiQ at b = 2
/// and returns their Hessians.
fn sequential_gptq<M: LinearModel>(model: &M, set: &CalibrationSet, selected: &dyn Fn(&str) -> bool) -> std::collections::HashMap<String, Hessian> {
    let r = Config::default_config().resolve().expect("default configuration");
    let mut quantized = model.clone();
    calibration::quantize_sequential(
        &mut quantized,
        set,
        selected,
        &mut |name, weight, hessian| {
            let (layer, _) = gptq::quantize_gptq(weight, hessian, &r, &GptqOptions::default()).map_err(|e| e.to_string())?;
            Ok(Matrix::new(name, weight.rows, weight.cols, layer.dequant.iter().map(|&v| v as f32).collect()))
        },
        &ProgressBar::hidden(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn parallel_hessian(accumulated: &hessian::LayerHessians, layer: &str) -> Hessian {
    accumulated.layer(layer).unwrap_or_else(|| panic!("no Hessian for {layer}")).hessian().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn block_chain_matches_forward_capture() {
    let Some((model, set)) = glassllm_calibration(GLASSLLM_SAMPLES) else { return };
    let chained = calibration::parallel_hessians(&model, &set, &|_| true, &ProgressBar::hidden()).unwrap_or_else(|e| panic!("{e}"));
    let forward = hessian::capture_glassllm(&model, "glassllm", &set.samples).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(chained.layers().len(), 28);
    for accumulator in forward.layers() {
        let name = accumulator.layer();
        assert_eq!(parallel_hessian(&chained, name), accumulator.hessian().unwrap(), "{name}");
        assert_eq!(chained.layer(name).unwrap().rows(), set.tokens(), "{name}");
    }
}

#[test]
fn sequential_glassllm_hessians() {
    let Some((model, set)) = glassllm_calibration(GLASSLLM_SAMPLES) else { return };
    let parallel = calibration::parallel_hessians(&model, &set, &|_| true, &ProgressBar::hidden()).unwrap_or_else(|e| panic!("{e}"));
    let sequential = sequential_gptq(&model, &set, &|_| true);
    assert_eq!(sequential.len(), 28);

    // The first group reads the embeddings, which no quantized layer changes.
    for layer in ["blocks.0.attn.W_Q", "blocks.0.attn.W_K", "blocks.0.attn.W_V"] {
        assert_eq!(sequential[layer], parallel_hessian(&parallel, layer), "{layer}");
    }
    // W1 and W3 read the same input, so they share one Hessian.
    assert_eq!(sequential["blocks.2.ffn.W1"], sequential["blocks.2.ffn.W3"]);
    // Every later group reads inputs changed by the quantized layers before it.
    for layer in ["blocks.0.attn.W_O", "blocks.0.ffn.W2", "blocks.1.attn.W_Q", "blocks.3.ffn.W2"] {
        assert_ne!(sequential[layer], parallel_hessian(&parallel, layer), "{layer}");
    }
}

#[test]
fn sequential_minilm_hessians() {
    if common::require_minilm("sequential_minilm_hessians").is_none() {
        return;
    }
    let dir = weights::models_dir().join("all-MiniLM-L6-v2");
    let model = MiniLm::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let tokenizer = WordPiece::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let mut set = calibration::minilm_calibration(&tokenizer).unwrap_or_else(|e| panic!("{e}"));
    set.truncate(MINILM_SAMPLES);

    let later = "encoder.layer.1.attention.self.query.weight";
    let selected = |name: &str| name.starts_with("encoder.layer.0.") || name == later;
    let parallel = calibration::parallel_hessians(&model, &set, &selected, &ProgressBar::hidden()).unwrap_or_else(|e| panic!("{e}"));
    let sequential = sequential_gptq(&model, &set, &selected);
    assert_eq!(sequential.len(), 7);
    for layer in ["query", "key", "value"].map(|p| format!("encoder.layer.0.attention.self.{p}.weight")) {
        assert_eq!(sequential[&layer], parallel_hessian(&parallel, &layer), "{layer}");
    }
    for layer in ["encoder.layer.0.attention.output.dense.weight", "encoder.layer.0.output.dense.weight", later] {
        assert_ne!(sequential[layer], parallel_hessian(&parallel, layer), "{layer}");
    }

    // Without quantization every layer keeps its FP32 inputs, so the two modes agree.
    let mut unchanged = model.clone();
    let identical = calibration::quantize_sequential(&mut unchanged, &set, &selected, &mut |_, weight, _| Ok(weight.clone()), &ProgressBar::hidden())
        .unwrap_or_else(|e| panic!("{e}"));
    for (layer, hessian) in &identical {
        assert_eq!(*hessian, parallel_hessian(&parallel, layer), "{layer}");
    }
}

#[test]
fn eval_sequential_rows_name_mode() {
    if !require_glassllm("eval_sequential_rows_name_mode") {
        return;
    }
    let options = microscopiq::eval::EvalOptions {
        methods: vec![microscopiq::eval::Method::MicroScopiqGptq],
        bits: vec![4],
        windows: Some(2),
        sequential: true,
        ..Default::default()
    };
    let progress = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden());
    let rows = microscopiq::eval::evaluate(microscopiq::eval::EvalModel::GlassLlm, &options, &progress).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows.len(), 1);
    let calibration = rows[0].calibration.as_deref().unwrap_or("");
    assert!(calibration.contains("sequential"), "{calibration}");
    assert_eq!(rows[0].gptq_fallback_layers, Some(0));
    let microscopiq::eval::Metric::Perplexity { perplexity: Some(perplexity), .. } = rows[0].metric else {
        panic!("no perplexity: {:?}", rows[0].metric);
    };
    // A W4 model stays near FP32, whose perplexity is 140.8 on the first 20 windows.
    assert!(perplexity > 100.0, "W4 perplexity {perplexity}");
    assert!(perplexity < 200.0, "W4 perplexity {perplexity}");
}
