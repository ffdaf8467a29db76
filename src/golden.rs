//! Integer-exact golden model of the generated accelerator.
//!
//! It reads the same words as the RTL, decodes them the way the decode logic does, and
//! predicts every column output and the cycle count. Nothing here uses floating point.

use crate::bits::{sign_extend, BitWord};
use crate::config::Resolved;
use crate::image::Image;
use crate::recon::{self, SwitchOp};

/// Decoded state of one PE: two's-complement weight, the shift its column applies after
/// ReCoN, and whether the weight is an outlier's upper significand half.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeState {
    pub weight: i64,
    pub shift: u32,
    pub hi: bool,
}

/// Decoded weights of one tile, as the shadow registers hold them after loading.
#[derive(Clone, Debug, PartialEq)]
pub struct TileState {
    /// `[row][col]`.
    pub pes: Vec<PeState>,
    /// ReCoN commands, `[row][micro-block]`, each stage-major.
    pub commands: Vec<Vec<SwitchOp>>,
    /// Pair entries the tile consumed.
    pub flagged: usize,
}

/// Decodes one tile from its row words, taking its pair entries from `pairs` in order.
///
/// Panics when the image has fewer pair entries than its flags announce, because that image
/// does not come from this crate's packer.
pub fn decode_tile<'a>(r: &Resolved, rows: &[BitWord], pairs: &mut impl Iterator<Item = &'a BitWord>) -> TileState {
    let b = r.b as usize;
    let meta = r.ublock_meta_bits as usize;
    let flag_bits = usize::from(r.max_pairs > 0);
    let ub_row = r.ublocks_per_row();
    let switches = r.recon_stages * r.switches_per_stage();
    let mut tile = TileState {
        pes: vec![PeState::default(); r.rows * r.cols],
        commands: vec![vec![SwitchOp::Pass; switches]; r.rows * ub_row],
        flagged: 0,
    };
    // A later pass of a tile stores only its first rows; the others stay zero.
    for (row, word) in rows.iter().enumerate() {
        let micro = |j: usize| -> u32 {
            if r.micro_exp_bits == 0 {
                0
            } else {
                word.get(r.cols * b + j * meta + flag_bits, r.micro_exp_bits as usize) as u32
            }
        };
        for c in 0..r.cols {
            let code = word.get(c * b, b) as u32;
            tile.pes[row * r.cols + c] = PeState {
                weight: r.int_format.decode(code) as i64,
                shift: r.micro_exp_max() - micro(c / r.m),
                hi: false,
            };
        }
        if r.max_pairs == 0 {
            continue;
        }
        for j in 0..ub_row {
            if word.get(r.cols * b + j * meta, 1) == 0 {
                continue;
            }
            let entry = pairs.next().expect("pair entry for a flagged micro-block");
            tile.flagged += 1;
            apply_pair_entry(r, word, j, micro(j), entry, row, &mut tile);
        }
    }
    tile
}

fn apply_pair_entry(r: &Resolved, word: &BitWord, j: usize, micro: u32, entry: &BitWord, row: usize, tile: &mut TileState) {
    let fp = r.outlier.expect("pairs need an outlier format");
    let b = r.b as usize;
    let pcb = r.pair_count_bits as usize;
    let x = r.offset_bits as usize;
    let l = r.log_m as usize;
    let count = entry.get(0, pcb) as usize;
    let offset = entry.get(pcb, x) as u32;
    let base_shift = r.micro_exp_max() - micro + offset;
    for i in 0..count.min(r.max_pairs) {
        let lo = pcb + x + i * 2 * l;
        let o = entry.get(lo, l) as usize;
        let p = entry.get(lo + l, l) as usize;
        let slot = |lane: usize| word.get((j * r.m + lane) * b, b) as u32;
        let code = (slot(o) << r.b) | slot(p);
        let negative = code >> (2 * r.b - 1) == 1;
        let exponent = (code >> fp.man_bits) & ((1 << fp.exp_bits) - 1);
        let mantissa = code & ((1 << fp.man_bits) - 1);
        let significand = if exponent != 0 { (1 << fp.man_bits) | mantissa } else { mantissa };
        let lo_shift = base_shift + exponent.max(1) - 1;
        let sign = if negative { -1 } else { 1 };
        let hi = (significand >> r.lo_bits) as i64 * sign;
        let lo_part = (significand & ((1 << r.lo_bits) - 1)) as i64 * sign;
        tile.pes[row * r.cols + j * r.m + o] = PeState { weight: hi, shift: lo_shift, hi: true };
        tile.pes[row * r.cols + j * r.m + p] = PeState { weight: lo_part, shift: lo_shift, hi: false };
    }
    let cmd_lo = pcb + x + r.max_pairs * 2 * l;
    let switches = r.recon_stages * r.switches_per_stage();
    tile.commands[row * r.ublocks_per_row() + j] =
        (0..switches).map(|s| SwitchOp::from_bits(entry.get(cmd_lo + 2 * s, 2) as u8)).collect();
}

/// Column sums of one tile for one activation vector (`acts[row]`).
pub fn tile_output(r: &Resolved, tile: &TileState, acts: &[i64]) -> Vec<i128> {
    let mut sums = vec![0i128; r.cols];
    let mut lanes = vec![0i128; r.m];
    for row in 0..r.rows {
        for j in 0..r.ublocks_per_row() {
            // Products enter ReCoN unshifted, except that an upper half is pre-shifted so it
            // adds to its lower half. Each lane is shifted by its own PE's shift afterwards.
            for (lane, value) in lanes.iter_mut().enumerate() {
                let pe = tile.pes[row * r.cols + j * r.m + lane];
                let pre_shift = if pe.hi { r.lo_bits } else { 0 };
                *value = (pe.weight as i128 * acts[row] as i128) << pre_shift;
            }
            if r.max_pairs > 0 && row < r.recon_rows {
                recon::apply(&tile.commands[row * r.ublocks_per_row() + j], &mut lanes, 0, |a, b| a + b);
            }
            for (lane, value) in lanes.iter().enumerate() {
                let pe = tile.pes[row * r.cols + j * r.m + lane];
                sums[j * r.m + lane] += value << pe.shift;
            }
        }
    }
    sums
}

/// Activation routing of one pass, read from its header word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassRouting {
    /// Element of the activation word that each PE row receives.
    pub sources: Vec<usize>,
    /// The pass reuses the previous pass's activations; rows without ReCoN get zero.
    pub same_acts: bool,
}

impl PassRouting {
    /// Activation of each PE row from an activation word's elements.
    pub fn route(&self, r: &Resolved, element: impl Fn(usize) -> i64) -> Vec<i64> {
        self.sources
            .iter()
            .enumerate()
            .map(|(row, &source)| if self.same_acts && row >= r.recon_rows { 0 } else { element(source) })
            .collect()
    }
}

/// Decodes a header word (identity routing when there is none).
pub fn decode_header(r: &Resolved, header: Option<&BitWord>) -> PassRouting {
    let mut sources: Vec<usize> = (0..r.rows).collect();
    let Some(word) = header else {
        return PassRouting { sources, same_acts: false };
    };
    let index_bits = crate::bits::index_bits(r.rows as u64) as usize;
    for i in 0..r.recon_rows {
        let lo = 1 + i * (1 + index_bits);
        if word.get(lo, 1) == 1 {
            let other = word.get(lo + 1, index_bits) as usize;
            if other < r.rows {
                sources[i] = other;
                sources[other] = i;
            }
        }
    }
    PassRouting { sources, same_acts: word.get(0, 1) == 1 }
}

/// Predicted outputs and cycle count of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// `outputs[t * vectors + v][c]`: column sums of pass t for vector v.
    pub outputs: Vec<Vec<i128>>,
    pub cycles: u64,
    /// Pair entries per pass.
    pub flagged_per_tile: Vec<usize>,
    /// Row tile whose activations each pass reads.
    pub k_tile_of_pass: Vec<usize>,
}

/// Row tile of every pass, as the controller steps through the activations: the next row
/// tile (wrapping after `k_tiles`) unless the pass reuses the previous activations.
pub fn k_tiles_of_passes(routings: &[PassRouting], k_tiles: usize) -> Vec<usize> {
    let mut k_tile = 0;
    routings
        .iter()
        .enumerate()
        .map(|(t, routing)| {
            if t > 0 && !routing.same_acts {
                k_tile = (k_tile + 1) % k_tiles;
            }
            k_tile
        })
        .collect()
}

/// Checks that an image read from files is consistent: the number of row words matches the
/// passes, and the number of pair entries matches the flags set in the row words.
pub fn validate(r: &Resolved, image: &Image) -> Result<(), String> {
    let passes = pass_count(r, image);
    let stored: usize = crate::image::rows_per_pass(r, &image.header_words, passes).iter().sum();
    if stored != image.row_words.len() {
        return Err(format!(
            "rows.hex has {} row words, but the {passes} passes need {stored}",
            image.row_words.len()
        ));
    }
    let meta = r.ublock_meta_bits as usize;
    let flags: usize = if r.max_pairs == 0 {
        0
    } else {
        image
            .row_words
            .iter()
            .map(|w| (0..r.ublocks_per_row()).filter(|&j| w.get(r.cols * r.b as usize + j * meta, 1) == 1).count())
            .sum()
    };
    if flags != image.pair_words.len() {
        return Err(format!(
            "rows.hex flags {flags} micro-blocks with outlier pairs, but pairs.hex has {} entries",
            image.pair_words.len()
        ));
    }
    Ok(())
}

/// Runs the golden model on an image.
pub fn predict(r: &Resolved, image: &Image) -> Prediction {
    predict_on_array(r, image, r.rows)
}

/// Predicts the outputs and cycles of an image of layer configuration `r` on an array of
/// `array_rows` PE rows: `r.rows` itself, or twice that for a 2b-bit layer on a
/// multi-precision array, whose row words each load two PE rows.
pub fn predict_on_array(r: &Resolved, image: &Image, array_rows: usize) -> Prediction {
    let passes = pass_count(r, image);
    let routings: Vec<PassRouting> = (0..passes).map(|t| decode_header(r, image.header_words.get(t))).collect();
    let k_tile_of_pass = k_tiles_of_passes(&routings, image.k_tiles);
    let mut pairs = image.pair_words.iter();
    let mut outputs = Vec::with_capacity(passes * image.vectors);
    let mut flagged_per_tile = Vec::with_capacity(passes);
    let mut reads_per_tile = Vec::with_capacity(passes);
    let stored = crate::image::rows_per_pass(r, &image.header_words, passes);
    let mut first_row = 0;
    for t in 0..passes {
        let tile = decode_tile(r, &image.row_words[first_row..first_row + stored[t]], &mut pairs);
        first_row += stored[t];
        flagged_per_tile.push(tile.flagged);
        let mut reads = u64::from(r.has_sharing) + stored[t] as u64 + tile.flagged as u64;
        if array_rows > r.rows {
            reads += wide_row_gaps(r, &image.row_words[first_row - stored[t]..first_row]);
        }
        reads_per_tile.push(reads);
        let kt = k_tile_of_pass[t];
        for v in 0..image.vectors {
            let word = &image.act_words[kt * image.vectors + v];
            let element = |row: usize| sign_extend(word.get(row * r.a as usize, r.a as usize) as u128, r.a) as i64;
            outputs.push(tile_output(r, &tile, &routings[t].route(r, element)));
        }
    }
    // Pipeline registers lengthen the path from the first row to the output like extra rows.
    let latency_rows = array_rows as u64 + u64::from(r.config.array.pipeline_stages);
    let cycles = if r.config.array.weight_buffer_depth == 1 {
        predict_cycles_single_buffer(latency_rows, image.vectors as u64, &reads_per_tile)
    } else {
        predict_cycles(latency_rows, image.vectors as u64, &reads_per_tile)
    };
    Prediction { outputs, cycles, flagged_per_tile, k_tile_of_pass }
}

/// Counts the idle load cycles of a 2b-bit tile on a multi-precision array.
///
/// A row word's odd PE row switches tiles one cycle after its even row, so every row word but
/// the last is followed by a cycle without a row read. Its pair reads fill that cycle when it
/// has any.
fn wide_row_gaps(r: &Resolved, rows: &[BitWord]) -> u64 {
    let Some((_, earlier)) = rows.split_last() else {
        return 0;
    };
    let meta = r.ublock_meta_bits as usize;
    let flagged = |word: &BitWord| r.max_pairs > 0 && (0..r.ublocks_per_row()).any(|j| word.get(r.cols * r.b as usize + j * meta, 1) != 0);
    earlier.iter().filter(|word| !flagged(word)).count() as u64
}

/// Passes of an image: one per header with shared ReCoN rows, else one per `rows` row words.
pub fn pass_count(r: &Resolved, image: &Image) -> usize {
    if r.has_sharing {
        image.header_words.len()
    } else {
        image.row_words.len() / r.rows
    }
}

/// Cycle count of the controller from the start pulse (cycle 0) to the first cycle with
/// `done_o` high. The array has `rows` PE rows, and loading pass t takes `reads_per_tile[t]`
/// memory reads (its header, its row words and its pair entries).
///
/// Pass 0's load starts reading in cycle 2 and pass t's in the cycle after pass t-1 started
/// computing. A load reads one word per cycle, and the pass is ready two cycles after its last
/// read. A pass starts computing when it is ready and the previous pass has issued its V
/// vectors. The last vector's column sums leave the array `rows` + 2 cycles after its read was
/// issued, and `done_o` rises one cycle later.
pub fn predict_cycles(rows: u64, vectors: u64, reads_per_tile: &[u64]) -> u64 {
    let Some((&first, rest)) = reads_per_tile.split_first() else {
        return 1;
    };
    let mut start = first + 3;
    for &reads in rest {
        start = (start + vectors).max(start + reads + 2);
    }
    start + vectors + rows + 2
}

/// Cycle count as [`predict_cycles`] for single-buffered weights: pass t's load starts only
/// when pass t-1 has issued its last vector, so `start_t = start_(t-1) + V + reads_t + 2`.
pub fn predict_cycles_single_buffer(rows: u64, vectors: u64, reads_per_tile: &[u64]) -> u64 {
    let Some((&first, rest)) = reads_per_tile.split_first() else {
        return 1;
    };
    let mut start = first + 3;
    for &reads in rest {
        start += vectors + reads + 2;
    }
    start + vectors + rows + 2
}

/// Exact value of a tile column sum: `sum * 2^exponent`, where the exponent comes from the
/// macro-block's base exponent `base`.
pub fn output_exponent(r: &Resolved, base: i32) -> i32 {
    r.column_exponent(base)
}

/// Dequantizes a weight image through the decode path and returns `[n_pad][k_pad]`.
///
/// The weight of input channel k and output channel n is the column-n output for a unit
/// activation on k, summed over the passes of its tile and scaled by the column exponent.
pub fn dequantize(r: &Resolved, image: &Image, bases: &[crate::formats::E8m0]) -> Vec<f64> {
    let n_pad = image.n_tiles * r.cols;
    let k_pad = image.k_tiles * r.rows;
    let ub_per_k = n_pad / r.m;
    let mut out = vec![0.0; n_pad * k_pad];
    let passes = pass_count(r, image);
    let routings: Vec<PassRouting> = (0..passes).map(|t| decode_header(r, image.header_words.get(t))).collect();
    let stored = crate::image::rows_per_pass(r, &image.header_words, passes);
    let mut pairs = image.pair_words.iter();
    let mut logical = 0usize;
    let mut first_row = 0;
    for t in 0..passes {
        if t > 0 && !routings[t].same_acts {
            logical += 1;
        }
        let nt = logical / image.k_tiles;
        let kt = logical % image.k_tiles;
        let tile = decode_tile(r, &image.row_words[first_row..first_row + stored[t]], &mut pairs);
        first_row += stored[t];
        for channel in 0..r.rows {
            let acts = routings[t].route(r, |source| i64::from(source == channel));
            let sums = tile_output(r, &tile, &acts);
            let k = kt * r.rows + channel;
            for (c, &sum) in sums.iter().enumerate() {
                let n = nt * r.cols + c;
                let base = bases[(k / r.mab_rows) * ub_per_k + n / r.m];
                let exp = output_exponent(r, base.exponent().expect("finite base"));
                out[n * k_pad + k] += sum as f64 * crate::formats::pow2(exp);
            }
        }
    }
    out
}
