//! GPTQ with the MicroScopiQ quantizer: the Hessian cases H1 to H5, equality with round to
//! nearest under an identity Hessian, the error feedback, a real glassllm layer calibrated
//! on Shakespeare text, and the blocked factorisations and parallel layers against the
//! reference factorisations bit for bit on real glassllm and MiniLM layers.
//!
//! The glassllm and MiniLM tests need the files of `make fetch-models`. A missing file fails
//! them unless `MICROSCOPIQ_SKIP_MODELS=1` is set.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use microscopiq::config::{Config, Resolved};
use microscopiq::flow::{self, random_activations, SplitMix64};
use microscopiq::eval::SENTENCE_WORDS;
use microscopiq::gptq::{self, Factorizer, GptqInfo, GptqOptions};
use microscopiq::hessian::{self, Hessian, HessianAccumulator, LayerHessians};
use microscopiq::models::bpe::{self, BpeTokenizer};
use microscopiq::models::glassllm::GlassLlm;
use microscopiq::models::minilm::MiniLm;
use microscopiq::models::wordpiece::WordPiece;
use microscopiq::quantizer::{self, Columns, QuantizedLayer};
use microscopiq::weights::{self, Matrix};
use microscopiq::{golden, image};

/// Environment variable that turns missing model files from a failure into a skip.
const SKIP_MODELS_ENV: &str = "MICROSCOPIQ_SKIP_MODELS";

/// Name of glassllm in calibration error messages.
const MODEL_NAME: &str = "glassllm/en";

/// Calibration windows of 128 tokens for the real-layer tests.
const CALIBRATION_WINDOWS: usize = 8;

/// The glassllm layer of the single-layer tests: `[128, 341]`, so its 341 input channels
/// also exercise the padding to a multiple of 16.
const REAL_LAYER: &str = "blocks.2.ffn.W2";

fn quantize_gptq(
    weights: &Matrix,
    h: &Hessian,
    r: &Resolved,
    options: &GptqOptions,
) -> (QuantizedLayer, GptqInfo) {
    gptq::quantize_gptq(weights, h, r, options).unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts that two quantized layers are equal in every field and give the same image.
fn assert_same_layer(
    actual: &QuantizedLayer,
    expected: &QuantizedLayer,
    r: &Resolved,
    label: &str,
) {
    assert_eq!(actual.slots, expected.slots, "{label}: slots");
    assert_eq!(actual.bases, expected.bases, "{label}: bases");
    assert_eq!(
        actual.micro_exps, expected.micro_exps,
        "{label}: micro-exponents"
    );
    assert_eq!(
        actual.pair_index, expected.pair_index,
        "{label}: pair index"
    );
    assert_eq!(
        actual.pair_blocks, expected.pair_blocks,
        "{label}: pair blocks"
    );
    let bits = |layer: &QuantizedLayer| {
        layer
            .dequant
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<u64>>()
    };
    assert_eq!(bits(actual), bits(expected), "{label}: dequantized weights");
    assert_eq!(actual.stats, expected.stats, "{label}: stats");
    let vectors = random_activations(2, actual.k_pad, r.a, 9);
    assert_eq!(
        image::build(actual, r, &vectors),
        image::build(expected, r, &vectors),
        "{label}: image"
    );
}

/// Builds a Hessian 2 X^T X / n of `rows` random inputs whose channels are correlated: each
/// input is a normal vector plus a multiple of its left neighbour.
fn correlated_hessian(dim: usize, rows: usize, seed: u64) -> Hessian {
    let mut rng = SplitMix64(seed);
    let mut accumulator = HessianAccumulator::new("synthetic", "layer", dim);
    for sample in 0..rows {
        let mut x = vec![0.0f32; dim];
        for i in 0..dim {
            let previous = if i > 0 { x[i - 1] } else { 0.0 };
            x[i] = rng.normal() as f32 + 0.8 * previous;
        }
        accumulator.add_sample(sample, &x).unwrap();
    }
    accumulator.hessian().unwrap()
}

/// Builds a diagonal Hessian with distinct random entries, so act-order permutes the channels.
fn diagonal_hessian(dim: usize, seed: u64) -> Hessian {
    let mut rng = SplitMix64(seed);
    let mut h = Hessian::identity(dim);
    for i in 0..dim {
        h.values[i * dim + i] = 0.1 + (rng.next_u64() % 1000) as f64 / 100.0;
    }
    h
}

#[test]
fn h1_dead_channels_get_zero_weights() {
    // X rows [1, 0, 2, 0] and [0, 0, 1, 0]: channels 1 and 3 never see an input.
    let mut accumulator = HessianAccumulator::new("synthetic", "layer", 4);
    accumulator
        .add_sample(0, &[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0, 0.0])
        .unwrap();
    let h = accumulator.hessian().unwrap();
    assert_eq!(
        h.values,
        [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert!(
        gptq::cholesky_lower(&h.values, 4).is_err(),
        "plain Cholesky must fail on H1"
    );

    let r = common::resolve(&Config::default_config());
    let weights = common::outlier_weights(16, 4, 3);
    let (layer, info) = quantize_gptq(&weights, &h, &r, &GptqOptions::default());
    assert_eq!(info.dead_channels, [1, 3]);
    // 0.01 * mean(1, 1, 5, 1) after the dead channels get H_kk = 1.
    let damping = info.damping.expect("factorised");
    assert!((damping - 0.02).abs() < 1e-15, "damping {damping}");
    assert_eq!(info.damping_retries, 0);
    assert!(!info.fell_back_to_rtn);
    for n in 0..16 {
        assert_eq!(layer.dequant[n * 4 + 1], 0.0, "output {n}, dead channel 1");
        assert_eq!(layer.dequant[n * 4 + 3], 0.0, "output {n}, dead channel 3");
    }
    assert!(layer.dequant.iter().all(|v| v.is_finite()));
    assert!(layer.dequant.iter().any(|&v| v != 0.0));
}

#[test]
fn h1_identical_channels_need_damping() {
    // X rows [1, 1] and [2, 2] give H = [[5, 5], [5, 5]].
    let mut accumulator = HessianAccumulator::new("synthetic", "layer", 2);
    accumulator.add_sample(0, &[1.0, 1.0, 2.0, 2.0]).unwrap();
    let h = accumulator.hessian().unwrap();
    assert_eq!(h.values, [5.0, 5.0, 5.0, 5.0]);
    assert!(
        gptq::cholesky_lower(&h.values, 2).is_err(),
        "plain Cholesky must fail"
    );

    let r = common::resolve(&Config::default_config());
    let weights = common::outlier_weights(16, 2, 5);
    let (layer, info) = quantize_gptq(&weights, &h, &r, &GptqOptions::default());
    let damping = info.damping.expect("factorised");
    assert!((damping - 0.05).abs() < 1e-15, "damping {damping}");
    assert_eq!(info.damping_retries, 0);
    assert!(info.dead_channels.is_empty());
    assert!(layer.dequant.iter().all(|v| v.is_finite()));
}

#[test]
fn h1_damping_retries_then_falls_back() {
    let r = common::resolve(&Config::default_config());
    let weights = common::outlier_weights(16, 2, 7);

    // Eigenvalues -1 and 3: the damping must grow from 0.01 to 10 times the mean diagonal.
    let indefinite = Hessian::new(2, vec![1.0, 2.0, 2.0, 1.0]);
    let (layer, info) = quantize_gptq(&weights, &indefinite, &r, &GptqOptions::default());
    assert_eq!(info.damping_retries, 3);
    let relative = info.relative_damping.expect("factorised");
    assert!(
        (relative - 10.0).abs() < 1e-12,
        "relative damping {relative}"
    );
    assert!(!info.fell_back_to_rtn);
    assert!(layer.dequant.iter().all(|v| v.is_finite()));

    // Needs a damping near 1e9, beyond the 1e4 limit: round to nearest, no NaN.
    let hopeless = Hessian::new(2, vec![1.0, 1e9, 1e9, 1.0]);
    let (layer, info) = quantize_gptq(&weights, &hopeless, &r, &GptqOptions::default());
    assert!(info.fell_back_to_rtn);
    assert_eq!(info.damping, None);
    assert_eq!(info.damping_retries, 6);
    assert_same_layer(&layer, &quantizer::quantize(&weights, &r), &r, "fallback");
}

#[test]
fn gptq_rejects_invalid_hessians() {
    let r = common::resolve(&Config::default_config());
    let weights = common::outlier_weights(16, 3, 1);
    let error = gptq::quantize_gptq(&weights, &Hessian::identity(4), &r, &GptqOptions::default())
        .unwrap_err();
    assert!(error.to_string().contains("4 x 4"), "{error}");
    let mut h = Hessian::identity(3);
    h.values[5] = f64::NAN;
    let error = gptq::quantize_gptq(&weights, &h, &r, &GptqOptions::default()).unwrap_err();
    assert!(error.to_string().contains("[1, 2]"), "{error}");
}

#[test]
fn h3_saliency_uses_cholesky_diagonal() {
    let h = [4.0, 2.0, 2.0, 3.0];
    let u = gptq::inverse_cholesky_upper(&h, 2).unwrap();
    let expected_u = [0.61237, -0.40825, 0.0, 0.57735];
    for (i, (&actual, expected)) in u.iter().zip(expected_u).enumerate() {
        assert!(
            (actual - expected).abs() < 5e-6,
            "U entry {i} is {actual}, expected {expected}"
        );
    }

    // Saliency w^2 / U_jj^2 for w = [1, 1].
    let pairs = [(1.0, u[0]), (1.0, u[3])];
    let saliencies: Vec<f64> = pairs
        .iter()
        .map(|&(w, u_jj)| quantizer::saliency(w, u_jj))
        .collect();
    assert!((saliencies[0] - 8.0 / 3.0).abs() < 1e-12, "{saliencies:?}");
    assert!((saliencies[1] - 3.0).abs() < 1e-12, "{saliencies:?}");
    // diag(H^-1) = [0.375, 0.5] in place of U_jj^2 would give [2.667, 2.0].
    let diagonal_inverse = [0.375f64.sqrt(), 0.5f64.sqrt()];
    let wrong: Vec<f64> = diagonal_inverse
        .iter()
        .map(|&d| quantizer::saliency(1.0, d))
        .collect();
    assert!((wrong[1] - 2.0).abs() < 1e-12, "{wrong:?}");

    // Pruning follows the saliency: U prunes weight 0, diag(H^-1) would prune weight 1.
    let values = [1.0, 1.0];
    assert_eq!(
        quantizer::least_salient(&values, &[u[0], u[3]], &[], 1),
        [0]
    );
    assert_eq!(
        quantizer::least_salient(&values, &diagonal_inverse, &[], 1),
        [1]
    );
}

/// Resolves the default configuration (b = 2, M = 8, four pairs) with `k_sigma`.
fn config_with_k_sigma(k_sigma: f64) -> Resolved {
    let mut config = Config::default_config();
    config.quantizer.k_sigma = k_sigma;
    common::resolve(&config)
}

#[test]
fn h4_pruned_pair_is_smallest() {
    // With k_sigma = 1.5 the micro-block's outliers are -7 and 6 (mean -0.125, std 3.63).
    let r = config_with_k_sigma(1.5);
    let scale = 0.01;
    let block: Vec<f32> = [-7.0, -1.0, 1.0, 6.0, 0.5, -0.5, 3.0, -3.0]
        .iter()
        .map(|v| v * scale)
        .collect();
    let weights = Matrix::new("h4", 8, 1, block);

    let plans = quantizer::plan_column(&Columns::from_matrix(&weights), &r, 0, 16, 1.0);
    assert_eq!(plans[0].outliers, [0, 3]);
    assert_eq!(plans[0].pruned, [4, 5]);

    let rtn = quantizer::quantize(&weights, &r);
    let pair_block = rtn
        .pair_block(0, 0, r.m)
        .expect("the micro-block contains pairs");
    let mut pruned: Vec<usize> = pair_block.pairs.iter().map(|&(_, p)| p).collect();
    pruned.sort_unstable();
    assert_eq!(pruned, [4, 5]);
    assert_eq!(rtn.dequant[4], 0.0);
    assert_eq!(rtn.dequant[5], 0.0);

    let (layer, _) = quantize_gptq(&weights, &Hessian::identity(1), &r, &GptqOptions::default());
    assert_same_layer(&layer, &rtn, &r, "h4 identity");
}

#[test]
fn h4_hessian_makes_large_weight_cheaper() {
    let values = [-7.0, -1.0, 1.0, 6.0, 0.5, -0.5, 3.0, -3.0];
    let outliers = [0, 3];
    let identity = [1.0; 8];
    assert_eq!(
        quantizer::least_salient(&values, &identity, &outliers, 2),
        [4, 5]
    );
    // A large U_jj for lane 7 makes -3 (saliency 9e-4) cheaper than 0.5 (25 with U_jj = 0.1).
    let u = [1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 1.0, 100.0];
    assert_eq!(quantizer::least_salient(&values, &u, &outliers, 2), [7, 1]);
}

#[test]
fn h5_equal_block_has_no_outliers() {
    let r = config_with_k_sigma(3.0);
    let weights = Matrix::new("h5", 8, 1, vec![0.1; 8]);
    let plans = quantizer::plan_column(&Columns::from_matrix(&weights), &r, 0, 16, 1.0);
    assert!(plans[0].outliers.is_empty(), "{:?}", plans[0].outliers);
    assert!(plans[0].pruned.is_empty());
    assert_eq!(quantizer::quantize(&weights, &r).stats.outliers, 0);

    // Ties go to the lower index.
    let values = [0.1; 8];
    assert_eq!(
        quantizer::least_salient(&values, &[1.0; 8], &[], 3),
        [0, 1, 2]
    );
    assert_eq!(
        quantizer::least_salient(&values, &[1.0; 8], &[1], 3),
        [0, 2, 3]
    );
}

#[test]
fn h5_outlier_count_never_exceeds_cap() {
    let r = config_with_k_sigma(3.0);
    assert_eq!(r.max_pairs, 4);
    // Six equal outliers: the four lowest lanes are kept.
    let values = [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 0.1, 0.1];
    let real = [true; 8];
    assert_eq!(
        quantizer::outlier_candidates(&values, &real, 0.0, 1.0, &r),
        [0, 1, 2, 3]
    );

    let mut rng = SplitMix64(17);
    for case in 0..200 {
        let values: Vec<f64> = (0..8)
            .map(|_| {
                rng.normal()
                    * if rng.next_u64().is_multiple_of(2) {
                        10.0
                    } else {
                        0.1
                    }
            })
            .collect();
        let block = quantizer::plan_micro_block(values, vec![true; 8], (0.0, 0.5), &[1.0; 8], &r);
        assert!(
            block.outliers.len() <= r.max_pairs,
            "case {case}: {:?}",
            block.outliers
        );
        assert_eq!(block.outliers.len(), block.pruned.len(), "case {case}");
        assert!(
            block.pruned.iter().all(|p| !block.outliers.contains(p)),
            "case {case}"
        );
    }
}

#[test]
fn identity_hessian_matches_rtn() {
    let mut configs = vec![
        ("default", common::config(16, 16, 2, 8, 4)),
        ("b4 8x8", common::config(8, 8, 4, 8, 2)),
        ("b2 M4", common::config(4, 8, 2, 4, 2)),
        ("b3 M2", common::config(2, 4, 3, 2, 1)),
    ];
    let mut macro_scope = common::config(4, 8, 2, 4, 2);
    macro_scope.quantizer.outlier_scope = microscopiq::config::OutlierScope::MacroBlock;
    macro_scope.format.mab_rows = Some(8);
    configs.push(("macro-block scope", macro_scope));
    let mut micro_scope = common::config(8, 8, 2, 8, 4);
    micro_scope.quantizer.outlier_scope = microscopiq::config::OutlierScope::MicroBlock;
    micro_scope.quantizer.k_sigma = 1.5;
    configs.push(("micro-block scope", micro_scope));

    for (label, config) in &configs {
        let r = common::resolve(config);
        for (n, k, seed) in [(37, 29, 11), (16, 16, 2), (8, 3, 4)] {
            let weights = common::outlier_weights(n, k, seed);
            let rtn = quantizer::quantize(&weights, &r);
            let hessians = [
                ("identity", Hessian::identity(k), false),
                ("diagonal, act-order", diagonal_hessian(k, seed), true),
            ];
            for (kind, h, act_order) in hessians {
                let options = GptqOptions {
                    act_order,
                    block_size: 5,
                    ..GptqOptions::default()
                };
                let (layer, info) = quantize_gptq(&weights, &h, &r, &options);
                assert!(!info.fell_back_to_rtn);
                assert_same_layer(&layer, &rtn, &r, &format!("{label}, {n} x {k}, {kind}"));
            }
        }
    }
}

#[test]
fn error_feedback_follows_hand_example() {
    // One input channel per macro-block, M = 1, no pairs, b = 2: a weight w quantizes to
    // 2^floor(log2 |w|) or a lower power of two.
    let mut config = common::config(1, 1, 2, 1, 0);
    config.format.mab_rows = None;
    let r = common::resolve(&config);
    let weights = Matrix::new("hand", 1, 2, vec![0.75, 0.375]);
    let h = Hessian::new(2, vec![4.0, 2.0, 2.0, 3.0]);
    let options = GptqOptions {
        damping_fraction: 0.0,
        ..GptqOptions::default()
    };

    // Channel 0: 0.75 -> 0.5. Its error 0.25 / U_00 times U_01 = -0.25 * 2 / 3 raises
    // channel 1 from 0.375 to 0.375 + 1/6 = 0.5417, which quantizes to 0.5.
    let (layer, info) = quantize_gptq(&weights, &h, &r, &options);
    assert_eq!(info.damping, Some(0.0));
    assert_eq!(layer.dequant, [0.5, 0.5]);
    let rtn = quantizer::quantize(&weights, &r);
    assert_eq!(rtn.dequant, [0.5, 0.25]);

    // (w - q) H (w - q)^T: 11/64 for w - q = (0.25, -0.125) with GPTQ, against 27/64 for
    // (0.25, 0.125) with round to nearest.
    let output_error =
        |dequant: &[f64]| gptq::relative_output_error(&weights, dequant, &h).unwrap();
    let norm: f64 = 4.0 * 0.75 * 0.75 + 4.0 * 0.75 * 0.375 + 3.0 * 0.375 * 0.375;
    assert!((output_error(&layer.dequant) - (11.0 / 64.0 / norm).sqrt()).abs() < 1e-12);
    assert!((output_error(&rtn.dequant) - (27.0 / 64.0 / norm).sqrt()).abs() < 1e-12);
}

#[test]
fn lazy_batches_match_unbatched() {
    let r = common::resolve(&Config::default_config());
    let weights = common::outlier_weights(48, 40, 23);
    let h = correlated_hessian(40, 200, 5);
    for act_order in [false, true] {
        let run = |block_size| {
            quantize_gptq(
                &weights,
                &h,
                &r,
                &GptqOptions {
                    block_size,
                    act_order,
                    ..GptqOptions::default()
                },
            )
            .0
        };
        let unbatched = run(1);
        for block_size in [3, 16, 128] {
            assert_same_layer(
                &run(block_size),
                &unbatched,
                &r,
                &format!("block size {block_size}, act-order {act_order}"),
            );
        }
    }
}

#[test]
fn correlated_hessian_lowers_output_error() {
    let r = common::resolve(&Config::default_config());
    let weights = common::outlier_weights(64, 40, 29);
    let h = correlated_hessian(40, 400, 8);
    let rtn = quantizer::quantize(&weights, &r);
    let rtn_error = gptq::relative_output_error(&weights, &rtn.dequant, &h).unwrap();
    for act_order in [false, true] {
        let (layer, info) = quantize_gptq(
            &weights,
            &h,
            &r,
            &GptqOptions {
                act_order,
                ..GptqOptions::default()
            },
        );
        let error = gptq::relative_output_error(&weights, &layer.dequant, &h).unwrap();
        assert!(
            error < rtn_error,
            "act-order {act_order}: GPTQ {error:.5}, round to nearest {rtn_error:.5}"
        );
        let mut order = info.order.clone();
        order.sort_unstable();
        assert_eq!(
            order,
            (0..40).collect::<Vec<_>>(),
            "the order is a permutation"
        );
        check_image(&layer, &r, &format!("synthetic, act-order {act_order}"));
    }
}

/// Builds the image of `layer` and runs the flow's checks: image against quantizer, and
/// golden model against an exact GEMM.
fn check_image(layer: &QuantizedLayer, r: &Resolved, label: &str) {
    let vectors = random_activations(4, layer.k_pad, r.a, 31);
    let img = image::build(layer, r, &vectors);
    flow::check_image_dequantization(layer, r, &img).unwrap_or_else(|e| panic!("{label}: {e}"));
    let prediction = golden::predict(r, &img);
    flow::check_golden_against_gemm(layer, r, &img, &prediction, &vectors)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
}

fn glassllm_dir() -> PathBuf {
    weights::models_dir().join("glassllm")
}

fn shakespeare_dir() -> PathBuf {
    weights::models_dir().join("shakespeare")
}

/// Returns true when the model, tokenizer and texts exist. When one is missing, the test
/// fails with the fix, or prints a skip line and returns false with
/// `MICROSCOPIQ_SKIP_MODELS=1`.
fn require_files(test: &str) -> bool {
    let mut files = vec![
        glassllm_dir().join("en.npz"),
        glassllm_dir().join("en.tokenizer.json"),
    ];
    for slice in hessian::CALIBRATION_TEXT
        .iter()
        .chain(&hessian::EVALUATION_TEXT)
    {
        files.push(shakespeare_dir().join(format!("{}.txt", slice.play)));
    }
    let Some(missing) = files.iter().find(|path| !path.is_file()) else {
        return true;
    };
    if std::env::var(SKIP_MODELS_ENV).as_deref() == Ok("1") {
        eprintln!(
            "skipped {test}: {} is missing and {SKIP_MODELS_ENV}=1",
            missing.display()
        );
        return false;
    }
    panic!(
        "{test} needs {}, which is missing: run `make fetch-models`, or set {SKIP_MODELS_ENV}=1 \
         to skip the tests that need the model files",
        missing.display()
    );
}

fn model() -> &'static GlassLlm {
    static MODEL: OnceLock<GlassLlm> = OnceLock::new();
    MODEL.get_or_init(|| {
        GlassLlm::load(&glassllm_dir().join("en.npz"))
            .unwrap_or_else(|e| panic!("loading glassllm failed: {e}"))
    })
}

fn tokenizer() -> &'static BpeTokenizer {
    static TOKENIZER: OnceLock<BpeTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        BpeTokenizer::load(&glassllm_dir().join("en.tokenizer.json"))
            .unwrap_or_else(|e| panic!("loading the tokenizer failed: {e}"))
    })
}

fn calibration_windows() -> &'static [Vec<u32>] {
    static WINDOWS: OnceLock<Vec<Vec<u32>>> = OnceLock::new();
    WINDOWS.get_or_init(|| {
        hessian::calibration_windows(&shakespeare_dir(), tokenizer(), 128, CALIBRATION_WINDOWS)
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

fn calibration() -> &'static LayerHessians {
    static HESSIANS: OnceLock<LayerHessians> = OnceLock::new();
    HESSIANS.get_or_init(|| {
        hessian::capture_glassllm(model(), MODEL_NAME, calibration_windows())
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

/// Tokens of the evaluation slice, Hamlet characters 20000..80000.
fn hamlet_tokens() -> &'static [u32] {
    static TOKENS: OnceLock<Vec<u32>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let slice = &hessian::EVALUATION_TEXT[0];
        let path = shakespeare_dir().join(format!("{}.txt", slice.play));
        let text =
            bpe::read_text_slice(&path, slice.chars.clone()).unwrap_or_else(|e| panic!("{e}"));
        tokenizer().encode(&text).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn layer_hessian(hessians: &LayerHessians, layer: &str) -> Hessian {
    hessians
        .layer(layer)
        .unwrap_or_else(|| panic!("no inputs captured for {layer}"))
        .hessian()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Captures the `[tokens, in]` inputs of `layer` over `windows`, stacked.
fn capture_inputs(layer: &str, windows: &[Vec<u32>]) -> Vec<f32> {
    let mut rows = Vec::new();
    for window in windows {
        let mut record = |name: &str, inputs: &[f32], _width: usize| {
            if name == layer {
                rows.extend_from_slice(inputs);
            }
        };
        model().forward(window, Some(&mut record));
    }
    rows
}

/// ||X W^T - X Q^T||_F / ||X W^T||_F computed from the inputs themselves.
fn output_error_from_inputs(inputs: &[f32], weights: &Matrix, dequant: &[f64]) -> f64 {
    let k_in = weights.cols;
    let mut error = 0.0;
    let mut norm = 0.0;
    for x in inputs.chunks_exact(k_in) {
        for n in 0..weights.rows {
            let mut exact = 0.0;
            let mut quantized = 0.0;
            for k in 0..k_in {
                exact += f64::from(x[k]) * f64::from(weights.get(n, k));
                quantized += f64::from(x[k]) * dequant[n * k_in + k];
            }
            error += (exact - quantized) * (exact - quantized);
            norm += exact * exact;
        }
    }
    (error / norm).sqrt()
}

#[test]
fn calibration_windows_avoid_evaluation_text() {
    if !require_files("calibration_windows_avoid_evaluation_text") {
        return;
    }
    let windows = calibration_windows();
    assert_eq!(windows.len(), CALIBRATION_WINDOWS);
    assert!(windows.iter().all(|w| w.len() == 128));
    // No calibration window occurs in the evaluation slice.
    let hamlet = hamlet_tokens();
    for (i, window) in windows.iter().enumerate() {
        assert!(
            !hamlet.windows(128).any(|w| w == window.as_slice()),
            "window {i} is Hamlet text"
        );
    }
    let error =
        hessian::calibration_windows(&shakespeare_dir(), tokenizer(), 128, 100_000).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("fewer than the 100000 requested"),
        "{error}"
    );
}

#[test]
fn h2_non_finite_input_stops_calibration() {
    if !require_files("h2_non_finite_input_stops_calibration") {
        return;
    }
    // +Inf in one real captured row: rejected with its sample and token, H unchanged.
    let windows = &calibration_windows()[..1];
    let layer = "blocks.2.attn.W_V";
    let mut set =
        hessian::capture_glassllm(model(), MODEL_NAME, windows).unwrap_or_else(|e| panic!("{e}"));
    let before = layer_hessian(&set, layer);
    let mut inputs = capture_inputs(layer, windows);
    inputs[5 * 128 + 7] = f32::INFINITY;
    let error = set.add(layer, 3, &inputs, 128).unwrap_err();
    let message = error.to_string();
    for part in [
        MODEL_NAME,
        "`blocks.2.attn.W_V`",
        "sample 3",
        "token 5",
        "channel 7",
        "inf",
    ] {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }
    assert_eq!(
        layer_hessian(&set, layer),
        before,
        "the rejected sample reached H"
    );

    // A model whose W_O overflows: the next layer input is NaN and calibration stops
    // there, so nothing is quantized and no image is written.
    let mut broken = model().clone();
    let w_o = broken.linear_weight("blocks.0.attn.W_O").unwrap();
    broken
        .set_linear_weight(
            "blocks.0.attn.W_O",
            &Matrix::new("huge", w_o.rows, w_o.cols, vec![3e38; w_o.data.len()]),
        )
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    let error = calibrate_and_write_images(&broken, windows, out.path()).unwrap_err();
    for part in [
        MODEL_NAME,
        "`blocks.0.ffn.W1`",
        "sample 0",
        "token 0",
        "NaN",
    ] {
        assert!(error.contains(part), "`{part}` missing from: {error}");
    }
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "an image was written"
    );
}

/// Calibrates `model`, quantizes every layer with GPTQ and writes each image's hex files
/// into `out/<layer>`, the way a quantization job would.
fn calibrate_and_write_images(
    model: &GlassLlm,
    windows: &[Vec<u32>],
    out: &Path,
) -> Result<(), String> {
    let r = common::resolve(&Config::default_config());
    let hessians =
        hessian::capture_glassllm(model, MODEL_NAME, windows).map_err(|e| e.to_string())?;
    for accumulator in hessians.layers() {
        let weights = model
            .linear_weight(accumulator.layer())
            .expect("captured layers exist");
        let h = accumulator.hessian().map_err(|e| e.to_string())?;
        let (layer, _) = gptq::quantize_gptq(&weights, &h, &r, &GptqOptions::default())
            .map_err(|e| e.to_string())?;
        let img = image::build(&layer, &r, &[]);
        image::write_hex_files(&out.join(accumulator.layer()), &img).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[test]
fn glassllm_layer_gptq_beats_rtn() {
    if !require_files("glassllm_layer_gptq_beats_rtn") {
        return;
    }
    let r = common::resolve(&Config::default_config());
    assert_eq!((r.b, r.m), (2, 8));
    let weights = model().linear_weight(REAL_LAYER).unwrap();
    let h = layer_hessian(calibration(), REAL_LAYER);
    let (layer, info) = quantize_gptq(&weights, &h, &r, &GptqOptions::default());
    let rtn = quantizer::quantize(&weights, &r);
    assert!(!info.fell_back_to_rtn);

    let gptq_error = gptq::relative_output_error(&weights, &layer.dequant, &h).unwrap();
    let rtn_error = gptq::relative_output_error(&weights, &rtn.dequant, &h).unwrap();
    println!(
        "{REAL_LAYER}, b = 2, M = 8, {CALIBRATION_WINDOWS} calibration windows of 128 tokens:"
    );
    println!("  relative output error on the calibration inputs: GPTQ {gptq_error:.4}, round to nearest {rtn_error:.4}");
    assert!(
        gptq_error < rtn_error,
        "GPTQ {gptq_error:.4} is not below round to nearest {rtn_error:.4}"
    );

    // The Hessian form equals the error computed on the captured inputs themselves.
    let inputs = capture_inputs(REAL_LAYER, calibration_windows());
    let direct = output_error_from_inputs(&inputs, &weights, &layer.dequant);
    assert!(
        (direct - gptq_error).abs() < 1e-6,
        "from inputs {direct}, from H {gptq_error}"
    );

    // Held-out inputs from the evaluation slice.
    let hamlet = hamlet_tokens();
    let held_out: Vec<Vec<u32>> = (0..4)
        .map(|i| hamlet[i * 128..(i + 1) * 128].to_vec())
        .collect();
    let inputs = capture_inputs(REAL_LAYER, &held_out);
    let gptq_held_out = output_error_from_inputs(&inputs, &weights, &layer.dequant);
    let rtn_held_out = output_error_from_inputs(&inputs, &weights, &rtn.dequant);
    println!("  relative output error on 4 Hamlet evaluation windows: GPTQ {gptq_held_out:.4}, round to nearest {rtn_held_out:.4}");
    assert!(gptq_held_out < rtn_held_out);

    let report = gptq::layer_report(&weights, &layer, Some(&info), Some(&h), &r);
    println!("  {}", serde_json::to_string(&report).unwrap());
    assert_eq!(report.outliers, layer.stats.outliers);
    assert_eq!(report.relative_output_error, Some(gptq_error));
    assert!(report.ebw > 2.0, "EBW {}", report.ebw);
    assert!(report.ebw < 4.0, "EBW {}", report.ebw);
}

#[test]
fn glassllm_gptq_image_passes_flow_checks() {
    if !require_files("glassllm_gptq_image_passes_flow_checks") {
        return;
    }
    let r = common::resolve(&Config::default_config());
    let weights = model().linear_weight(REAL_LAYER).unwrap();
    let h = layer_hessian(calibration(), REAL_LAYER);
    for act_order in [false, true] {
        let (layer, _) = quantize_gptq(
            &weights,
            &h,
            &r,
            &GptqOptions {
                act_order,
                ..GptqOptions::default()
            },
        );
        check_image(&layer, &r, &format!("{REAL_LAYER}, act-order {act_order}"));
    }
}

#[test]
fn glassllm_all_layers_timing() {
    if !require_files("glassllm_all_layers_timing") {
        return;
    }
    let r = common::resolve(&Config::default_config());
    let hessians = calibration();
    assert_eq!(hessians.layers().len(), 28);
    let mut gptq_model = model().clone();
    let mut rtn_model = model().clone();
    let mut gptq_seconds = 0.0;
    println!(
        "{:<20} {:>9} {:>9} {:>8} {:>6} {:>9}",
        "layer", "GPTQ", "RTN", "outliers", "EBW", "damping"
    );
    for accumulator in hessians.layers() {
        let name = accumulator.layer();
        let weights = model().linear_weight(name).unwrap();
        let h = accumulator.hessian().unwrap();
        let start = Instant::now();
        let (layer, info) = quantize_gptq(&weights, &h, &r, &GptqOptions::default());
        gptq_seconds += start.elapsed().as_secs_f64();
        let rtn = quantizer::quantize(&weights, &r);
        let report = gptq::layer_report(&weights, &layer, Some(&info), Some(&h), &r);
        let rtn_error = gptq::relative_output_error(&weights, &rtn.dequant, &h).unwrap();
        let gptq_error = report.relative_output_error.unwrap();
        println!(
            "{name:<20} {gptq_error:>9.4} {rtn_error:>9.4} {:>8} {:>6.3} {:>9.2e}",
            report.outliers,
            report.ebw,
            report.damping.unwrap()
        );
        assert!(!report.fell_back_to_rtn, "{name}");
        assert!(
            gptq_error < rtn_error,
            "{name}: GPTQ {gptq_error:.4}, round to nearest {rtn_error:.4}"
        );
        let as_matrix = |dequant: &[f64]| {
            Matrix::new(
                name,
                weights.rows,
                weights.cols,
                dequant.iter().map(|&v| v as f32).collect(),
            )
        };
        gptq_model
            .set_linear_weight(name, &as_matrix(&layer.dequant))
            .unwrap();
        rtn_model
            .set_linear_weight(name, &as_matrix(&rtn.dequant))
            .unwrap();
    }
    println!("GPTQ of all 28 layers: {gptq_seconds:.3} s (calibration excluded)");

    let hamlet = hamlet_tokens();
    let perplexity = |model: &GlassLlm| model.cross_entropy(hamlet, 0..20).0.exp();
    let (reference, gptq_ppl, rtn_ppl) = (
        perplexity(model()),
        perplexity(&gptq_model),
        perplexity(&rtn_model),
    );
    println!("Hamlet perplexity (20 windows): fp32 {reference:.2}, GPTQ {gptq_ppl:.2}, round to nearest {rtn_ppl:.2}");
    assert!(gptq_ppl < rtn_ppl);
}

/// Returns the bits of every value, so that comparisons also tell -0 from +0.
fn bits(values: &[f64]) -> Vec<u64> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Asserts that the blocked and the reference factorisations give the same U bits and the
/// same quantized layer and `GptqInfo` for `weights` under `h`, in channel order and with
/// act-order.
fn assert_blocked_matches_reference(weights: &Matrix, h: &Hessian, r: &Resolved) {
    let name = &weights.name;
    for act_order in [false, true] {
        let options = GptqOptions {
            act_order,
            ..GptqOptions::default()
        };
        let label = format!("{name}, act-order {act_order}");
        let mut fixed = h.clone();
        gptq::fix_dead_channels(&mut fixed);
        let blocked = gptq::factorize_with(&fixed, &options, Factorizer::Blocked).unwrap();
        let reference = gptq::factorize_with(&fixed, &options, Factorizer::Reference).unwrap();
        assert_eq!(bits(&blocked.upper), bits(&reference.upper), "{label}: U");
        assert_eq!(blocked.damping.to_bits(), reference.damping.to_bits(), "{label}");
        assert_eq!(blocked.retries, reference.retries, "{label}");

        let (fast, fast_info, _) =
            gptq::quantize_gptq_timed(weights, h, r, &options, Factorizer::Blocked).unwrap();
        let (slow, slow_info, _) =
            gptq::quantize_gptq_timed(weights, h, r, &options, Factorizer::Reference).unwrap();
        assert_same_layer(&fast, &slow, r, &label);
        assert_eq!(fast_info, slow_info, "{label}: GptqInfo");
        assert_eq!(
            fast.stats.relative_error.to_bits(),
            slow.stats.relative_error.to_bits(),
            "{label}: relative error"
        );
    }
}

#[test]
fn blocked_matches_reference_on_glassllm() {
    if !require_files("blocked_matches_reference_on_glassllm") {
        return;
    }
    let r = common::resolve(&Config::default_config());
    let hessians = calibration();
    assert_eq!(hessians.layers().len(), 28);
    for accumulator in hessians.layers() {
        let weights = model().linear_weight(accumulator.layer()).unwrap();
        let h = accumulator.hessian().unwrap();
        assert_blocked_matches_reference(&weights, &h, &r);
    }
}

/// Calibration tokens of the MiniLM comparison: enough for a well-conditioned Hessian of
/// the 1536-input layer, few enough for a quick capture.
const MINILM_TOKENS: usize = 512;

#[test]
fn blocked_matches_reference_on_minilm() {
    let test = "blocked_matches_reference_on_minilm";
    let dir = weights::models_dir().join("all-MiniLM-L6-v2");
    let files = ["model.safetensors", "config.json", "tokenizer.json"];
    if let Some(missing) = files.iter().find(|file| !dir.join(file).is_file()) {
        if std::env::var(SKIP_MODELS_ENV).as_deref() == Ok("1") {
            eprintln!("skipped {test}: {missing} is missing and {SKIP_MODELS_ENV}=1");
            return;
        }
        panic!(
            "{test} needs {}, which is missing: run `make fetch-models`, or set \
             {SKIP_MODELS_ENV}=1 to skip the tests that need the model files",
            dir.join(missing).display()
        );
    }
    if !require_files(test) {
        return;
    }
    let model = MiniLm::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let tokenizer = WordPiece::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let samples = hessian::minilm_calibration_samples(
        &shakespeare_dir(),
        &tokenizer,
        SENTENCE_WORDS,
        MINILM_TOKENS,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let tokens: usize = samples.iter().map(Vec::len).sum();
    assert_eq!(tokens, MINILM_TOKENS);
    let hessians = hessian::capture_minilm(&model, "minilm", &samples).unwrap();
    assert_eq!(hessians.layers().len(), 36);

    let r = common::resolve(&Config::default_config());
    // The attention output (384 inputs) and the FFN output (1536 inputs) of the last layer.
    for name in [
        "encoder.layer.5.attention.output.dense.weight",
        "encoder.layer.5.output.dense.weight",
    ] {
        let weights = model.linear_weight(name).unwrap();
        let h = layer_hessian(&hessians, name);
        assert_blocked_matches_reference(&weights, &h, &r);
    }
}

#[test]
fn minilm_calibration_has_token_budget() {
    let test = "minilm_calibration_has_token_budget";
    let dir = weights::models_dir().join("all-MiniLM-L6-v2");
    if !dir.join("tokenizer.json").is_file() {
        if std::env::var(SKIP_MODELS_ENV).as_deref() == Ok("1") {
            eprintln!("skipped {test}: the MiniLM tokenizer is missing and {SKIP_MODELS_ENV}=1");
            return;
        }
        panic!("{test} needs {}: run `make fetch-models`", dir.join("tokenizer.json").display());
    }
    if !require_files(test) {
        return;
    }
    let tokenizer = WordPiece::load(&dir).unwrap_or_else(|e| panic!("{e}"));
    let samples =
        hessian::minilm_calibration_samples(&shakespeare_dir(), &tokenizer, SENTENCE_WORDS, 2048)
            .unwrap();
    assert_eq!(samples.iter().map(Vec::len).sum::<usize>(), 2048);
    // Every line but the last is whole: [CLS] first and [SEP] last.
    let cls = samples[0][0];
    let sep = *samples[0].last().unwrap();
    assert_ne!(cls, sep);
    for sample in &samples[..samples.len() - 1] {
        assert_eq!(sample[0], cls);
        assert_eq!(*sample.last().unwrap(), sep);
    }
    // A smaller budget gives a prefix of the same samples.
    let fewer =
        hessian::minilm_calibration_samples(&shakespeare_dir(), &tokenizer, SENTENCE_WORDS, 100)
            .unwrap();
    assert_eq!(fewer.iter().map(Vec::len).sum::<usize>(), 100);
    let last = fewer.len() - 1;
    assert_eq!(fewer[..last], samples[..last]);
    assert!(samples[last].starts_with(&fewer[last]));

    let error = hessian::minilm_calibration_samples(
        &shakespeare_dir(),
        &tokenizer,
        SENTENCE_WORDS,
        100_000_000,
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("fewer than the 100000000 requested"),
        "{error}"
    );
}

#[test]
fn parallel_layers_match_one_thread() {
    if !require_files("parallel_layers_match_one_thread") {
        return;
    }
    let r = common::resolve(&Config::default_config());
    let hessians: Vec<(Matrix, Hessian)> = calibration()
        .layers()
        .iter()
        .map(|a| {
            (
                model().linear_weight(a.layer()).unwrap(),
                a.hessian().unwrap(),
            )
        })
        .collect();
    let layers: Vec<(&Matrix, &Hessian)> = hessians.iter().map(|(w, h)| (w, h)).collect();
    let options = GptqOptions::default();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let count = |_: usize| {
        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    };
    let one = gptq::quantize_layers(&layers, &r, &options, Factorizer::Blocked, 1, &count);
    let two = gptq::quantize_layers(&layers, &r, &options, Factorizer::Blocked, 2, &count);
    let many = gptq::quantize_layers(&layers, &r, &options, Factorizer::Blocked, 64, &count);
    assert_eq!(done.into_inner(), 3 * layers.len());
    for (index, (weights, h)) in layers.iter().enumerate() {
        let (expected, expected_info) = quantize_gptq(weights, h, &r, &options);
        for (threads, results) in [(1, &one), (2, &two), (64, &many)] {
            let (layer, info, _) = results[index].as_ref().unwrap();
            let label = format!("{} on {threads} threads", weights.name);
            assert_same_layer(layer, &expected, &r, &label);
            assert_eq!(*info, expected_info, "{label}");
        }
    }
}
