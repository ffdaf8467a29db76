//! Hand-built images with extreme weights and activations, packed by this file from the
//! layout documented in `src/image.rs`, so they do not depend on the quantizer or the packer.
//!
//! Each test checks the RTL against the golden model, and the golden model against a direct
//! i128 computation from the intended weights.

mod common;

use microscopiq::bits::{to_twos_complement, BitWord};
use microscopiq::config::Resolved;
use microscopiq::formats::pow2;
use microscopiq::golden;
use microscopiq::image::{Image, TilePass};
use microscopiq::recon::{self, SwitchOp};

/// Pair entry of a hand-built micro-block.
#[derive(Clone, Debug)]
struct PairEntry {
    /// (outlier lane, pruned lane).
    pairs: Vec<(usize, usize)>,
    offset_code: u32,
    commands: Vec<SwitchOp>,
}

/// One micro-block of a hand-built row: slot codes, micro-exponent d, optional pair entry,
/// and each lane's intended weight in units of the tile column's exponent.
#[derive(Clone, Debug)]
struct Ublock {
    slots: Vec<u32>,
    d: u32,
    pair: Option<PairEntry>,
    weights: Vec<i128>,
}

/// Sign-magnitude code of the inlier integer `q`.
fn inlier_code(r: &Resolved, q: i32) -> u32 {
    assert!(q.unsigned_abs() <= r.int_format.max_magnitude() as u32, "inlier {q} does not fit b = {}", r.b);
    let sign = if q < 0 { 1 << (r.b - 1) } else { 0 };
    sign | q.unsigned_abs()
}

/// Builds a micro-block of inliers `q` with micro-exponent `d`.
fn inlier_ublock(r: &Resolved, q: &[i32], d: u32) -> Ublock {
    assert_eq!(q.len(), r.m, "one inlier per lane");
    Ublock {
        slots: q.iter().map(|&q| inlier_code(r, q)).collect(),
        d,
        pair: None,
        weights: q.iter().map(|&q| (q as i128) << (r.micro_exp_max() - d)).collect(),
    }
}

/// Value of outlier `code` in units of the tile column's exponent, for micro-exponent `d`
/// and stored offset `offset_code`: decode(code) * 2^(e_out - column exponent), where
/// e_out - column exponent = (dmax - d) + offset_min + offset_code + (b - 2).
fn outlier_units(r: &Resolved, code: u32, d: u32, offset_code: u32) -> i128 {
    let format = r.outlier.expect("pairs need an outlier format");
    let exponent = (r.micro_exp_max() - d) as i32 + r.offset_min + offset_code as i32 + r.b as i32 - 2;
    let value = format.decode(code) * pow2(exponent);
    assert!(value.fract() == 0.0, "outlier code {code:#x} is {value} column units, not an integer");
    value as i128
}

/// Builds a micro-block whose lanes `outliers` store the outlier codes `codes` and merge with
/// the lanes `pruned` through ReCoN. Every other lane stores the inlier `inlier`.
fn pair_ublock(
    r: &Resolved,
    outliers: &[usize],
    pruned: &[usize],
    codes: &[u32],
    inlier: i32,
    d: u32,
    offset_code: u32,
) -> Ublock {
    let route = recon::route(r.m, outliers, pruned)
        .unwrap_or_else(|| panic!("ReCoN cannot merge outliers {outliers:?} with pruned lanes {pruned:?}"));
    let mut block = inlier_ublock(r, &vec![inlier; r.m], d);
    let mask = (1u32 << r.b) - 1;
    for &(o, p) in &route.pairs {
        let code = codes[outliers.iter().position(|&lane| lane == o).expect("routed outlier lane")];
        block.slots[o] = code >> r.b;
        block.slots[p] = code & mask;
        block.weights[o] = outlier_units(r, code, d, offset_code);
        block.weights[p] = 0;
    }
    block.pair = Some(PairEntry { pairs: route.pairs, offset_code, commands: route.commands });
    block
}

/// Packs one row word: slot c at [c*b, (c+1)*b), then per micro-block j at cols*b + j*meta
/// the flag (when pairs are allowed) and the micro-exponent.
fn pack_row(r: &Resolved, ublocks: &[Ublock]) -> BitWord {
    let b = r.b as usize;
    let meta = r.ublock_meta_bits as usize;
    let flag_bits = usize::from(r.max_pairs > 0);
    let mut word = BitWord::zero(r.row_word_bits as usize);
    for (j, block) in ublocks.iter().enumerate() {
        for (lane, &slot) in block.slots.iter().enumerate() {
            word.set((j * r.m + lane) * b, b, slot as u64);
        }
        let lo = r.cols * b + j * meta;
        if block.pair.is_some() {
            word.set(lo, 1, 1);
        }
        if r.micro_exp_bits > 0 {
            word.set(lo + flag_bits, r.micro_exp_bits as usize, block.d as u64);
        }
    }
    word
}

/// Packs one pair entry: count, offset code, `max_pairs` lane pairs (o then p), then the
/// ReCoN commands, 2 bits per switch, stage-major.
fn pack_pair(r: &Resolved, entry: &PairEntry) -> BitWord {
    let pcb = r.pair_count_bits as usize;
    let x = r.offset_bits as usize;
    let l = r.log_m as usize;
    let mut word = BitWord::zero(r.pair_entry_bits as usize);
    word.set(0, pcb, entry.pairs.len() as u64);
    word.set(pcb, x, entry.offset_code as u64);
    for (i, &(o, p)) in entry.pairs.iter().enumerate() {
        word.set(pcb + x + i * 2 * l, l, o as u64);
        word.set(pcb + x + i * 2 * l + l, l, p as u64);
    }
    let commands = pcb + x + r.max_pairs * 2 * l;
    for (s, &op) in entry.commands.iter().enumerate() {
        word.set(commands + 2 * s, 2, op as u64);
    }
    word
}

/// A hand-built layer: tiles of `[row][micro-block]` and activation vectors per row tile.
struct HandLayer {
    /// Tiles in image order (column tile first, row tile second).
    tiles: Vec<Vec<Vec<Ublock>>>,
    k_tiles: usize,
    /// `[row tile][vector][row]`.
    activations: Vec<Vec<Vec<i64>>>,
}

impl HandLayer {
    fn image(&self, r: &Resolved) -> Image {
        let mut row_words = Vec::new();
        let mut pair_words = Vec::new();
        for tile in &self.tiles {
            assert_eq!(tile.len(), r.rows, "one row of micro-blocks per PE row");
            for row in tile {
                row_words.push(pack_row(r, row));
                pair_words.extend(row.iter().filter_map(|block| block.pair.as_ref()).map(|entry| pack_pair(r, entry)));
            }
        }
        let mut act_words = Vec::new();
        for vectors in &self.activations {
            for vector in vectors {
                let mut word = BitWord::zero(r.rows * r.a as usize);
                for (row, &value) in vector.iter().enumerate() {
                    word.set(row * r.a as usize, r.a as usize, to_twos_complement(value, r.a));
                }
                act_words.push(word);
            }
        }
        // Every PE row has a ReCoN in these configurations, so each tile runs as one pass with
        // every row on its own input channel and needs no header word.
        assert_eq!(r.recon_rows, r.rows, "hand-built images assume a ReCoN on every PE row");
        let passes = (0..self.tiles.len())
            .map(|t| TilePass {
                n_tile: t / self.k_tiles,
                k_tile: t % self.k_tiles,
                sources: (0..r.rows).map(Some).collect(),
                swaps: Vec::new(),
                same_acts: false,
            })
            .collect();
        Image {
            k_tiles: self.k_tiles,
            n_tiles: self.tiles.len() / self.k_tiles,
            vectors: self.activations[0].len(),
            passes,
            row_words,
            pair_words,
            header_words: Vec::new(),
            act_words,
        }
    }

    /// Column sums of every tile and vector, `[t * vectors + v][c]`, from the intended weights.
    fn direct_outputs(&self, r: &Resolved) -> Vec<Vec<i128>> {
        let mut outputs = Vec::new();
        for (t, tile) in self.tiles.iter().enumerate() {
            for vector in &self.activations[t % self.k_tiles] {
                let mut sums = vec![0i128; r.cols];
                for (row, ublocks) in tile.iter().enumerate() {
                    for (j, block) in ublocks.iter().enumerate() {
                        for (lane, &weight) in block.weights.iter().enumerate() {
                            sums[j * r.m + lane] += weight * vector[row] as i128;
                        }
                    }
                }
                outputs.push(sums);
            }
        }
        outputs
    }
}

/// Checks the golden model against the direct computation and the RTL against both.
fn check_layer(r: &Resolved, layer: &HandLayer, label: &str) {
    let image = layer.image(r);
    let direct = layer.direct_outputs(r);
    let prediction = golden::predict(r, &image);
    assert_eq!(prediction.outputs, direct, "{label}: golden model differs from the direct i128 computation");

    // Two's-complement range of the accumulator.
    let min = -(1i128 << (r.acc_width - 1));
    let max = (1i128 << (r.acc_width - 1)) - 1;
    for &sum in direct.iter().flatten() {
        assert!(sum >= min, "{label}: column sum {sum} is below the {}-bit accumulator's minimum", r.acc_width);
        assert!(sum <= max, "{label}: column sum {sum} is above the {}-bit accumulator's maximum", r.acc_width);
    }

    let cosim = common::cosimulate(r, &image, label);
    assert_eq!(cosim.comparison.mismatches, 0, "{label}: first mismatch {:?}", cosim.comparison.first);
    assert_eq!(cosim.sim.outputs, direct, "{label}: RTL differs from the direct i128 computation");
    assert_eq!(cosim.comparison.cycles, cosim.comparison.cycles_predicted, "{label}: RTL cycle count differs from the prediction");
}

/// Code of the minimum finite outlier value, the negative one of largest magnitude.
fn min_outlier_code(r: &Resolved) -> u32 {
    let format = r.outlier.expect("pairs need an outlier format");
    (1 << (2 * r.b - 1)) | format.max_finite_code()
}

/// Checks tiles with the largest column sums: every inlier is -(2^(b-1) - 1) with micro-exponent
/// d = 0 (the largest shift), and every pair carries the most negative outlier with the
/// largest offset. Activations are all -2^(A-1), then all 2^(A-1) - 1.
fn check_accumulator(weight_bits: u32) {
    let rows = 16;
    let r = common::resolve(&common::config(rows, 8, weight_bits, 8, 4));
    let label = format!("{rows}x8 array, b = {weight_bits}, M = 8, max_pairs = 4");
    let min_inlier = -r.int_format.max_magnitude();
    let offset_max = (1u32 << r.offset_bits) - 1;
    let code = min_outlier_code(&r);

    let inliers = inlier_ublock(&r, &vec![min_inlier; r.m], 0);
    // Each outlier's low half travels across lanes to its pruned lane.
    let straight = pair_ublock(&r, &[0, 1, 2, 3], &[4, 5, 6, 7], &[code; 4], min_inlier, 0, offset_max);
    let crossed = pair_ublock(&r, &[0, 3, 5, 6], &[1, 2, 4, 7], &[code; 4], min_inlier, 0, offset_max);
    let single = pair_ublock(&r, &[7], &[0], &[code], min_inlier, 0, offset_max);

    let tile_of = |pick: &dyn Fn(usize) -> Ublock| -> Vec<Vec<Ublock>> { (0..rows as usize).map(|row| vec![pick(row)]).collect() };
    let mixed = |row: usize| match row % 3 {
        0 => straight.clone(),
        1 => crossed.clone(),
        _ => single.clone(),
    };
    let low = -(1i64 << (r.a - 1));
    let high = (1i64 << (r.a - 1)) - 1;
    let layer = HandLayer {
        tiles: vec![
            tile_of(&|_| inliers.clone()),
            tile_of(&|_| straight.clone()),
            tile_of(&|_| crossed.clone()),
            tile_of(&mixed),
        ],
        k_tiles: 1,
        activations: vec![vec![vec![low; rows as usize], vec![high; rows as usize]]],
    };
    check_layer(&r, &layer, &label);
}

#[test]
fn accumulator_extremes_two_bit() {
    check_accumulator(2);
}

#[test]
fn accumulator_extremes_four_bit() {
    check_accumulator(4);
}

/// Checks one signed product per row tile on a 1x2 array with b = 4 and A = 8: lane 0 stores the
/// weight, and lane 1 a second inlier or the pruned half of the pair.
#[test]
fn signed_products_four_bit() {
    let mut config = common::config(1, 2, 4, 2, 1);
    config.format.act_bits = 8;
    let r = common::resolve(&config);
    let dmax = r.micro_exp_max();

    // Symmetric sign-magnitude INT4 stops at +-7, so -8 and 8 go through an E4M3 pair. With
    // d = dmax and offset code 0 one column unit is 2^(offset_min + b - 2) = 2^9 outlier
    // units, so the outlier value -8 is -2^-6, the smallest normal E4M3 magnitude (code 0x88).
    let minus_eight = 0x88;
    let plus_eight = 0x08;
    assert_eq!(outlier_units(&r, minus_eight, dmax, 0), -8, "E4M3 code 0x88 is not -8 column units");
    assert_eq!(outlier_units(&r, plus_eight, dmax, 0), 8, "E4M3 code 0x08 is not 8 column units");

    let inliers = |q0: i32, q1: i32| inlier_ublock(&r, &[q0, q1], dmax);
    let pair = |code: u32| pair_ublock(&r, &[0], &[1], &[code], 0, dmax, 0);
    // The sign-magnitude code 0b1000 ("negative zero") must act as weight 0.
    let mut negative_zero = inliers(-7, 0);
    negative_zero.slots[1] = 0b1000;

    let cases: Vec<(&str, Ublock, i64)> = vec![
        ("(-8) * (-128) through a pair", pair(minus_eight), -128),
        ("(-1) * (-1)", inliers(-1, 1), -1),
        ("7 * (-128)", inliers(7, -7), -128),
        ("(-8) * 127 through a pair", pair(minus_eight), 127),
        ("8 * (-128) through a pair", pair(plus_eight), -128),
        ("(-7) * (-128) beside negative zero", negative_zero, -128),
    ];
    let expected = [[1024, 0], [1, -1], [-896, 896], [-1016, 0], [-1024, 0], [896, 0]];

    let layer = HandLayer {
        tiles: cases.iter().map(|(_, block, _)| vec![vec![block.clone()]]).collect(),
        k_tiles: cases.len(),
        activations: cases.iter().map(|&(_, _, act)| vec![vec![act]]).collect(),
    };
    let direct = layer.direct_outputs(&r);
    for ((name, _, _), (got, want)) in cases.iter().zip(direct.iter().zip(expected)) {
        assert_eq!(got.as_slice(), want.as_slice(), "{name}: direct product of the intended weights");
    }
    check_layer(&r, &layer, "1x2 array, b = 4, A = 8, M = 2, max_pairs = 1");
}
