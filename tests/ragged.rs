//! Ragged layers whose output channels do not fill the last micro-blocks.
//!
//! W has 12 output channels and 2 input channels: input channel 0 is 0.01 everywhere and
//! input channel 1 is 5.0 everywhere. With M = 8 each input channel pads to 16 output
//! channels, so its second micro-block holds 4 real values and 4 zeros of padding. A
//! macro-block of one input channel (rows = 1, mab_rows = 1) gives every micro-block its own
//! base exponent.

mod common;

use microscopiq::config::{Config, Resolved};
use microscopiq::flow::{self, RunOptions};
use microscopiq::formats::{quantize_mx_int_block, shared_exponent};
use microscopiq::image;
use microscopiq::quantizer::{self, QuantizedLayer};
use microscopiq::weights::Matrix;

const N_OUT: usize = 12;
const SMALL: f32 = 0.01;
const LARGE: f32 = 5.0;

fn two_channel_weights() -> Matrix {
    let mut data = Vec::with_capacity(N_OUT * 2);
    for _ in 0..N_OUT {
        data.push(SMALL);
        data.push(LARGE);
    }
    Matrix::new("ragged 12 x 2", N_OUT, 2, data)
}

/// Builds a configuration of one PE row of 8 columns, M = 8, and macro-blocks of
/// `mab_rows` input channels.
fn one_row_config(mab_rows: u32) -> Config {
    let mut config = common::config(1, 8, 2, 8, 4);
    config.format.mab_rows = Some(mab_rows);
    config
}

fn base_exponent(layer: &QuantizedLayer, r: &Resolved, k: usize, ublock: usize) -> i32 {
    let per_channel = layer.ublocks_per_channel(r.m);
    layer.bases[(k / r.mab_rows) * per_channel + ublock].exponent().expect("finite base")
}

#[test]
fn ragged_dequant_has_original_shape() {
    let r = common::resolve(&one_row_config(1));
    let layer = quantizer::quantize(&two_channel_weights(), &r);
    assert_eq!((layer.n_out, layer.k_in), (N_OUT, 2), "original shape");
    assert_eq!((layer.n_pad, layer.k_pad), (16, 2), "padded shape");
    assert_eq!(layer.dequant.len(), N_OUT * 2, "dequant holds [12, 2] values");
}

#[test]
fn ragged_padding_keeps_small_scale() {
    let r = common::resolve(&one_row_config(1));
    let layer = quantizer::quantize(&two_channel_weights(), &r);

    // Reference: plain MX-INT2 on the 4 real values of each second micro-block alone.
    for (k, value) in [(0, SMALL), (1, LARGE)] {
        let (scale, _, reference) = quantize_mx_int_block(&[value; 4], r.int_format, r.rounding);
        let natural = scale.exponent().expect("finite scale");
        assert_eq!(
            base_exponent(&layer, &r, k, 1),
            natural,
            "input channel {k}: the padded micro-block's base exponent is not that of its real values"
        );
        for n in 8..N_OUT {
            let got = layer.dequant[n * 2 + k];
            assert_eq!(got, reference[0], "input channel {k}, output channel {n}: dequantized {got}");
        }
    }
    let small = layer.dequant[11 * 2];
    assert!(small != 0.0, "input channel 0's last real weight flushes to 0");
    assert!((small - SMALL as f64).abs() <= SMALL as f64 / 2.0, "input channel 0's last real weight is {small}");
}

#[test]
fn ragged_padding_never_raises_scale() {
    let r = common::resolve(&one_row_config(1));
    let layer = quantizer::quantize(&two_channel_weights(), &r);
    for k in 0..2 {
        let max = (0..N_OUT).map(|n| two_channel_weights().get(n, k).abs() as f64).fold(0.0, f64::max);
        let natural = shared_exponent(max, r.int_format.emax());
        for ublock in 0..layer.ublocks_per_channel(r.m) {
            let base = base_exponent(&layer, &r, k, ublock);
            assert!(base <= natural, "input channel {k}, micro-block {ublock}: base 2^{base} above 2^{natural}");
        }
    }
}

/// Macro-blocks of two input channels share one base, so input channel 0 sits more than
/// 2^u - 1 binades below 5.0 and flushes. This is the contrast to `mab_rows = 1`.
#[test]
fn ragged_shared_base_flushes_small_channel() {
    let r = common::resolve(&one_row_config(2));
    let layer = quantizer::quantize(&two_channel_weights(), &r);
    for n in 0..N_OUT {
        assert_eq!(layer.dequant[n * 2], 0.0, "mab_rows = 2: output channel {n} of input channel 0 is nonzero");
    }
}

#[test]
fn ragged_image_matches_quantizer() {
    let r = common::resolve(&one_row_config(1));
    let layer = quantizer::quantize(&two_channel_weights(), &r);
    let vectors = flow::random_activations(2, layer.k_pad, r.a, 9);
    let image = image::build(&layer, &r, &vectors);
    if let Err(e) = flow::check_image_dequantization(&layer, &r, &image) {
        panic!("ragged 12 x 2: {e}");
    }
}

#[test]
fn ragged_cosim_one_row() {
    let r = common::resolve(&one_row_config(1));
    let options = RunOptions { vectors: 3, seed: 4, ..RunOptions::default() };
    let report = flow::run(&r, &two_channel_weights(), &options, &|_| {}).unwrap_or_else(|e| panic!("ragged 12 x 2: {e}"));
    assert_eq!(report.mismatches, 0, "ragged 12 x 2: first mismatch {:?}", report.first_mismatch);
    assert_eq!(report.cycles, report.cycles_predicted, "ragged 12 x 2: RTL cycle count differs from the prediction");
    assert_eq!(report.tiles, 4, "ragged 12 x 2: 2 column tiles x 2 row tiles");
}
