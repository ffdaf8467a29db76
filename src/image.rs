//! Packed memory images: the exact words the RTL reads, their hex files and the manifest.
//!
//! Tiles are numbered column tile first, row tile second: tile t = n_tile * k_tiles + k_tile,
//! so the tiles that add into one group of output columns run back to back.
//!
//! - Row words, one per (tile, PE row): slot c at bits [c*b, (c+1)*b), then the metadata of
//!   each micro-block j at bit cols*b + j*meta. The metadata is a flag, set when the
//!   micro-block has pairs and present only when pairs are allowed, then the micro-exponent d
//!   (u bits).
//! - Pair entries, one per flagged micro-block in (tile, row, micro-block) order: pair count,
//!   outlier offset code, `max_pairs` lane pairs (o then p, log2 M bits each; unused pairs are
//!   zero), then the ReCoN commands, 2 bits per switch, stage-major.
//! - Activation words, one per (row tile, vector): element r at bits [r*A, (r+1)*A), two's
//!   complement.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use crate::bits::{to_twos_complement, BitWord};
use crate::config::Resolved;
use crate::quantizer::QuantizedLayer;

/// Version of the image layout described above; bump it on any change.
pub const FORMAT_VERSION: u32 = 1;

/// The words of one layer's weight image and one batch of activations.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// Tiles along the input channels.
    pub k_tiles: usize,
    /// Tiles along the output channels.
    pub n_tiles: usize,
    /// Activation vectors per tile.
    pub vectors: usize,
    pub row_words: Vec<BitWord>,
    pub pair_words: Vec<BitWord>,
    pub act_words: Vec<BitWord>,
}

impl Image {
    /// Total tiles.
    pub fn tiles(&self) -> usize {
        self.k_tiles * self.n_tiles
    }
}

/// Packs the weights of `layer` into row words and pair entries.
pub fn pack_weights(layer: &QuantizedLayer, r: &Resolved) -> (Vec<BitWord>, Vec<BitWord>) {
    let k_tiles = layer.k_pad / r.rows;
    let n_tiles = layer.n_pad / r.cols;
    let ub_row = r.ublocks_per_row();
    let b = r.b as usize;
    let meta = r.ublock_meta_bits as usize;
    let flag_bits = usize::from(r.max_pairs > 0);
    let mut rows = Vec::with_capacity(k_tiles * n_tiles * r.rows);
    let mut pairs = Vec::new();
    for nt in 0..n_tiles {
        for kt in 0..k_tiles {
            for row in 0..r.rows {
                let k = kt * r.rows + row;
                let mut word = BitWord::zero(r.row_word_bits as usize);
                for c in 0..r.cols {
                    let n = nt * r.cols + c;
                    word.set(c * b, b, layer.slots[k * layer.n_pad + n] as u64);
                }
                for j in 0..ub_row {
                    let ublock = nt * ub_row + j;
                    let lo = r.cols * b + j * meta;
                    let d = layer.micro_exps[k * layer.ublocks_per_channel(r.m) + ublock];
                    if r.micro_exp_bits > 0 {
                        word.set(lo + flag_bits, r.micro_exp_bits as usize, d as u64);
                    }
                    if let Some(block) = layer.pair_block(k, ublock, r.m) {
                        word.set(lo, 1, 1);
                        pairs.push(pack_pair_entry(block, r));
                    }
                }
                rows.push(word);
            }
        }
    }
    (rows, pairs)
}

fn pack_pair_entry(block: &crate::quantizer::PairBlock, r: &Resolved) -> BitWord {
    let mut word = BitWord::zero(r.pair_entry_bits as usize);
    let pcb = r.pair_count_bits as usize;
    let x = r.offset_bits as usize;
    let l = r.log_m as usize;
    word.set(0, pcb, block.pairs.len() as u64);
    word.set(pcb, x, block.offset_code as u64);
    for (i, &(o, p)) in block.pairs.iter().enumerate() {
        let lo = pcb + x + i * 2 * l;
        word.set(lo, l, o as u64);
        word.set(lo + l, l, p as u64);
    }
    let cmd_lo = pcb + x + r.max_pairs * 2 * l;
    for (i, op) in block.commands.iter().enumerate() {
        word.set(cmd_lo + 2 * i, 2, *op as u64);
    }
    word
}

/// Packs activations (`vectors[v][k]`, k over the padded input channels) into words.
pub fn pack_activations(vectors: &[Vec<i64>], k_pad: usize, r: &Resolved) -> Vec<BitWord> {
    let k_tiles = k_pad / r.rows;
    let a = r.a as usize;
    let mut words = Vec::with_capacity(k_tiles * vectors.len());
    for kt in 0..k_tiles {
        for v in vectors {
            let mut word = BitWord::zero(r.rows * a);
            for row in 0..r.rows {
                let value = v.get(kt * r.rows + row).copied().unwrap_or(0);
                word.set(row * a, a, to_twos_complement(value, r.a));
            }
            words.push(word);
        }
    }
    words
}

/// Builds the complete image of `layer` with the activation vectors `vectors[v][k]`.
pub fn build(layer: &QuantizedLayer, r: &Resolved, vectors: &[Vec<i64>]) -> Image {
    let (row_words, pair_words) = pack_weights(layer, r);
    Image {
        k_tiles: layer.k_pad / r.rows,
        n_tiles: layer.n_pad / r.cols,
        vectors: vectors.len(),
        row_words,
        pair_words,
        act_words: pack_activations(vectors, layer.k_pad, r),
    }
}

/// Bits of the weight image: row words, pair entries and base exponents.
pub fn weight_image_bits(layer: &QuantizedLayer, r: &Resolved) -> u64 {
    let rows = (layer.k_pad * layer.n_pad / r.cols) as u64 * r.row_word_bits as u64;
    let pairs = layer.pair_blocks.len() as u64 * r.pair_entry_bits as u64;
    let bases = layer.bases.len() as u64 * 8;
    rows + pairs + bases
}

/// Effective bit width: weight image bits per weight of the original tensor.
pub fn effective_bit_width(layer: &QuantizedLayer, r: &Resolved) -> f64 {
    weight_image_bits(layer, r) as f64 / (layer.n_out * layer.k_in) as f64
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// failed run never leaves a half-written file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Formats words as a `$readmemh` file, one word per line.
pub fn to_hex_lines(words: &[BitWord]) -> String {
    let mut text = String::new();
    for word in words {
        text.push_str(&word.to_hex());
        text.push('\n');
    }
    text
}

/// Parses a `$readmemh` file of `width`-bit words.
pub fn parse_hex_lines(text: &str, width: usize, origin: &str) -> Result<Vec<BitWord>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with("//"))
        .map(|(i, line)| {
            BitWord::from_hex(line, width).ok_or_else(|| {
                format!("{origin}:{}: invalid {width}-bit hex word `{}`", i + 1, line.trim())
            })
        })
        .collect()
}

/// Writes the image's hex files into `dir`: rows.hex, pairs.hex (when pairs exist) and acts.hex.
pub fn write_hex_files(dir: &Path, image: &Image) -> std::io::Result<()> {
    write_atomically(&dir.join("rows.hex"), to_hex_lines(&image.row_words).as_bytes())?;
    if !image.pair_words.is_empty() {
        write_atomically(&dir.join("pairs.hex"), to_hex_lines(&image.pair_words).as_bytes())?;
    }
    write_atomically(&dir.join("acts.hex"), to_hex_lines(&image.act_words).as_bytes())?;
    Ok(())
}

/// Fills a temporary folder next to `target` with `fill`, then renames it to `target`,
/// replacing an older folder of that name only after the new one is complete.
pub fn write_dir_atomically(target: &Path, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    let tmp = tempfile::Builder::new().prefix(&format!(".{name}.partial-")).tempdir_in(parent)?;
    fill(tmp.path())?;
    let staged = tmp.keep();
    if target.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        fs::rename(target, &old)?;
        if let Err(e) = fs::rename(&staged, target) {
            let _ = fs::rename(&old, target);
            return Err(e);
        }
        fs::remove_dir_all(&old)?;
    } else {
        fs::rename(&staged, target)?;
    }
    Ok(())
}

/// Formats golden outputs (`outputs[t * vectors + v][c]`) as `$readmemh` lines of
/// `cols * acc_width` bits.
pub fn expected_hex(outputs: &[Vec<i128>], r: &Resolved) -> String {
    let acc = r.acc_width as usize;
    let mut text = String::new();
    for row in outputs {
        let mut word = BitWord::zero(r.cols * acc);
        for (c, &value) in row.iter().enumerate() {
            let bits = (value as u128) & (u128::MAX >> (128 - acc));
            word.set(c * acc, acc.min(64), (bits & u64::MAX as u128) as u64);
            if acc > 64 {
                word.set(c * acc + 64, acc - 64, (bits >> 64) as u64);
            }
        }
        text.push_str(&word.to_hex());
        text.push('\n');
    }
    text
}
