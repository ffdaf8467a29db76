//! The golden model against an exact GEMM of the dequantized weights, and the packed image
//! against the quantizer, on random configurations and weights. No Verilator runs here.

mod common;

use microscopiq::config::{OutlierScope, Resolved};
use microscopiq::flow;
use microscopiq::formats::Rounding;
use microscopiq::golden;
use microscopiq::image;
use microscopiq::quantizer;
use microscopiq::weights::Matrix;
use proptest::prelude::*;

/// Generates a random valid configuration: rows in {1, 2, 4}, cols in {4, 8}, b in {2, 4}, M dividing
/// cols, max_pairs in 0..=M/2, micro_exp_bits in {0, 1, 2}, one or two tiles per macro-block,
/// ReCoN on 1 to all PE rows, every outlier scope and rounding rule, and k_sigma from 1 to 3.
fn configurations() -> impl Strategy<Value = Resolved> {
    (
        prop::sample::select(vec![1u32, 2, 4]),
        prop::sample::select(vec![4u32, 8]),
        prop::sample::select(vec![2u32, 4]),
        0u32..4,
        any::<u32>(),
        0u32..3,
        1u32..3,
        prop::sample::select(vec![OutlierScope::Column, OutlierScope::MacroBlock, OutlierScope::MicroBlock]),
        prop::sample::select(vec![Rounding::NearestEven, Rounding::NearestAway]),
        prop::sample::select(vec![1.0f64, 2.0, 3.0]),
        any::<u32>(),
    )
        .prop_map(|(rows, cols, b, log_m, pairs_draw, u, tiles_per_mab, scope, rounding, k_sigma, recon_draw)| {
            let ublock = (1u32 << log_m).min(cols);
            let max_pairs = pairs_draw % (ublock / 2 + 1);
            let mut config = common::config(rows, cols, b, ublock, max_pairs);
            config.array.recon_rows = Some(1 + recon_draw % rows);
            config.format.micro_exp_bits = u;
            config.format.mab_rows = Some(rows * tiles_per_mab);
            config.format.rounding = rounding;
            config.quantizer.outlier_scope = scope;
            config.quantizer.k_sigma = k_sigma;
            common::resolve(&config)
        })
}

/// Generates random weights of 1 to 20 output and 1 to 12 input channels, with outliers.
fn weights() -> impl Strategy<Value = Matrix> {
    (1usize..=20, 1usize..=12, any::<u64>()).prop_map(|(n_out, k_in, seed)| common::outlier_weights(n_out, k_in, seed))
}

fn describe(r: &Resolved) -> String {
    format!(
        "{}x{} array, recon_rows = {}, b = {}, M = {}, max_pairs = {}, u = {}, mab_rows = {}, {:?}, {:?}, k_sigma = {}",
        r.rows, r.cols, r.recon_rows, r.b, r.m, r.max_pairs, r.micro_exp_bits, r.mab_rows, r.scope, r.rounding, r.k_sigma
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn golden_matches_exact_gemm(r in configurations(), w in weights(), act_seed in any::<u64>()) {
        let layer = quantizer::quantize(&w, &r);
        let vectors = flow::random_activations(3, layer.k_pad, r.a, act_seed);
        let image = image::build(&layer, &r, &vectors);
        let prediction = golden::predict(&r, &image);
        let label = format!("{} on {} x {} weights", describe(&r), w.rows, w.cols);
        if let Err(e) = flow::check_image_dequantization(&layer, &r, &image) {
            return Err(TestCaseError::fail(format!("{label}: {e}")));
        }
        if let Err(e) = flow::check_golden_against_gemm(&layer, &r, &image, &prediction, &vectors) {
            return Err(TestCaseError::fail(format!("{label}: {e}")));
        }
        prop_assert_eq!(layer.stats.outliers, layer.stats.pruned, "{}: outliers and pruned differ", label);
        prop_assert_eq!(image.pair_words.len(), layer.stats.flagged_ublocks, "{}: one pair entry per flagged micro-block", label);
    }
}

/// Quantizes and packs weights with many outliers on an 8x8 array, so the checks below see pair entries.
fn pair_heavy_layer() -> (Resolved, quantizer::QuantizedLayer, image::Image, Vec<Vec<i64>>) {
    let mut config = common::config(8, 8, 2, 8, 4);
    config.quantizer.k_sigma = 1.0;
    let r = common::resolve(&config);
    let layer = quantizer::quantize(&common::outlier_weights(21, 19, 1), &r);
    let vectors = flow::random_activations(2, layer.k_pad, r.a, 2);
    let image = image::build(&layer, &r, &vectors);
    (r, layer, image, vectors)
}

#[test]
fn image_check_detects_flipped_slot() {
    let (r, layer, mut image, _) = pair_heavy_layer();
    let b = r.b as usize;
    // The first slot with a nonzero magnitude bit, whose sign flip changes its weight.
    let (word, slot) = (0..image.row_words.len())
        .flat_map(|word| (0..r.cols).map(move |slot| (word, slot)))
        .find(|&(word, slot)| image.row_words[word].get(slot * b, 1) == 1)
        .expect("a slot with bit 0 set");
    let sign = slot * b + b - 1;
    let flipped = image.row_words[word].get(sign, 1) ^ 1;
    image.row_words[word].set(sign, 1, flipped);
    assert!(
        flow::check_image_dequantization(&layer, &r, &image).is_err(),
        "a flipped sign bit in row word {word}, slot {slot} passed the image check"
    );
}

#[test]
fn gemm_check_detects_changed_output() {
    let (r, layer, image, vectors) = pair_heavy_layer();
    let mut prediction = golden::predict(&r, &image);
    prediction.outputs[0][0] += 1;
    assert!(
        flow::check_golden_against_gemm(&layer, &r, &image, &prediction, &vectors).is_err(),
        "an output changed by 1 passed the GEMM check"
    );
}

#[test]
fn pair_heavy_layer_has_pair_entries() {
    let (_, layer, image, _) = pair_heavy_layer();
    assert!(common::multi_pair_ublocks(&layer.stats.pairs_histogram) > 0, "no micro-block with two pairs: {:?}", layer.stats.pairs_histogram);
    assert_eq!(image.pair_words.len(), layer.stats.flagged_ublocks, "one pair entry per flagged micro-block");
}
