//! Packed memory images: the exact words the RTL reads, their hex files and the manifest.
//!
//! Tiles run column tile first, row tile second (tile n_tile * k_tiles + k_tile), so the tiles
//! that add into one group of output columns run back to back. When fewer PE rows than all
//! have a ReCoN, a tile may run in several passes (see [`plan_passes`]). Every word below is
//! then per pass, in pass order.
//!
//! - Row words, one per (pass, PE row), in PE row order: slot c at bits [c*b, (c+1)*b), then the metadata of
//!   each micro-block j at bit cols*b + j*meta. The metadata is a flag, set when the
//!   micro-block has pairs and present only when pairs are allowed, then the micro-exponent d
//!   (u bits).
//! - Pair entries, one per flagged micro-block in (tile, row, micro-block) order: pair count,
//!   outlier offset code, `max_pairs` lane pairs (o then p, log2 M bits each; unused pairs are
//!   zero), then the ReCoN commands, 2 bits per switch, stage-major.
//! - Header words, one per pass, only when ReCoN rows are shared: bit 0 set when the pass
//!   is a later pass of the same tile, then per ReCoN row i a valid bit and the PE row whose
//!   activation row i swaps with (index bits of rows). A later pass reuses the previous
//!   pass's activations, stores row words only for the ReCoN rows, and the array zeroes the
//!   activations of the other rows.
//! - Activation words, one per (row tile, vector): element r at bits [r*A, (r+1)*A), two's
//!   complement.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use crate::bits::{to_twos_complement, BitWord};
use crate::config::Resolved;
use crate::quantizer::QuantizedLayer;

/// Version of the image layout described above; bump it on any change.
pub const FORMAT_VERSION: u32 = 2;

/// One pass of the array over a tile: the logical tile and the input channel of each PE row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TilePass {
    pub n_tile: usize,
    pub k_tile: usize,
    /// Input channel (0..rows, inside the row tile) of each PE row; `None` for a zero row.
    pub sources: Vec<Option<usize>>,
    /// For each ReCoN row i, the row it swaps activations with, if any.
    pub swaps: Vec<Option<usize>>,
    /// The pass reuses the previous pass's activations (a second or later pass of a tile).
    pub same_acts: bool,
}

/// The words of one layer's weight image and one batch of activations.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// Tiles along the input channels.
    pub k_tiles: usize,
    /// Tiles along the output channels.
    pub n_tiles: usize,
    /// Activation vectors per tile.
    pub vectors: usize,
    /// Passes in execution order; one per tile unless ReCoN rows are shared.
    pub passes: Vec<TilePass>,
    pub row_words: Vec<BitWord>,
    pub pair_words: Vec<BitWord>,
    /// One header per pass when ReCoN rows are shared, empty otherwise.
    pub header_words: Vec<BitWord>,
    pub act_words: Vec<BitWord>,
}

impl Image {
    /// Passes the array runs (tiles, plus extra passes of split tiles).
    pub fn tiles(&self) -> usize {
        self.passes.len()
    }
}

/// Plans the passes of tile (n_tile, k_tile): which channel each PE row contains.
///
/// Without sharing every row contains its own channel. With `recon_rows` < rows, the channels
/// whose micro-blocks have pairs ("flagged") must sit on ReCoN rows: a flagged channel that
/// is not on one swaps rows with an unflagged ReCoN row's channel. A tile with more flagged
/// channels than ReCoN rows runs again: each later pass holds only the next flagged channels
/// and zero rows elsewhere, and reuses the same activations.
pub fn plan_passes(layer: &QuantizedLayer, r: &Resolved, n_tile: usize, k_tile: usize) -> Vec<TilePass> {
    let identity = TilePass {
        n_tile,
        k_tile,
        sources: (0..r.rows).map(Some).collect(),
        swaps: vec![None; if r.has_sharing { r.recon_rows } else { 0 }],
        same_acts: false,
    };
    if !r.has_sharing {
        return vec![identity];
    }
    let ub_row = r.ublocks_per_row();
    let flagged: Vec<usize> = (0..r.rows)
        .filter(|&row| {
            let k = k_tile * r.rows + row;
            (0..ub_row).any(|j| layer.pair_block(k, n_tile * ub_row + j, r.m).is_some())
        })
        .collect();
    if flagged.is_empty() {
        return vec![identity];
    }
    let mut passes = Vec::new();
    for (index, chunk) in flagged.chunks(r.recon_rows).enumerate() {
        let included = |channel: usize| {
            if chunk.contains(&channel) {
                true
            } else {
                index == 0 && !flagged.contains(&channel)
            }
        };
        let mut sources: Vec<Option<usize>> = (0..r.rows).map(|row| included(row).then_some(row)).collect();
        let mut swaps = vec![None; r.recon_rows];
        let mut free = (0..r.recon_rows).filter(|row| !chunk.contains(row));
        for &channel in chunk.iter().filter(|&&c| c >= r.recon_rows) {
            let row = free.next().expect("chunks are at most recon_rows long, so a free ReCoN row exists");
            swaps[row] = Some(channel);
            sources[row] = Some(channel);
            sources[channel] = included(row).then_some(row);
        }
        passes.push(TilePass { n_tile, k_tile, sources, swaps, same_acts: index > 0 });
    }
    passes
}

/// Row words stored for each pass: every row, or only the ReCoN rows for a later pass of a
/// tile (read from the header's first bit).
pub fn rows_per_pass(r: &Resolved, headers: &[BitWord], passes: usize) -> Vec<usize> {
    (0..passes)
        .map(|t| match headers.get(t) {
            Some(word) if word.get(0, 1) == 1 => r.recon_rows,
            _ => r.rows,
        })
        .collect()
}

/// Rebuilds the pass list of an image read back from its hex files: a pass that does not
/// reuse the previous activations starts the next tile. Zero rows look the same as rows of zero
/// weights, so every row is reported with its routed channel.
pub fn passes_from_headers(r: &Resolved, passes: usize, headers: &[BitWord], k_tiles: usize) -> Vec<TilePass> {
    let mut logical = 0usize;
    (0..passes)
        .map(|t| {
            let routing = crate::golden::decode_header(r, headers.get(t));
            if t > 0 && !routing.same_acts {
                logical += 1;
            }
            let swaps = (0..if r.has_sharing { r.recon_rows } else { 0 })
                .map(|i| (routing.sources[i] != i).then_some(routing.sources[i]))
                .collect();
            TilePass {
                n_tile: logical / k_tiles.max(1),
                k_tile: logical % k_tiles.max(1),
                sources: routing.sources.iter().map(|&s| Some(s)).collect(),
                swaps,
                same_acts: routing.same_acts,
            }
        })
        .collect()
}

/// Packs the header word of a pass: bit 0 = reuse the previous activations, then per ReCoN
/// row a valid bit and the row it swaps with.
pub fn pack_header(pass: &TilePass, r: &Resolved) -> BitWord {
    let mut word = BitWord::zero(r.header_bits as usize);
    word.set(0, 1, u64::from(pass.same_acts));
    let index_bits = crate::bits::index_bits(r.rows as u64) as usize;
    for (i, swap) in pass.swaps.iter().enumerate() {
        if let Some(row) = swap {
            let lo = 1 + i * (1 + index_bits);
            word.set(lo, 1, 1);
            word.set(lo + 1, index_bits, *row as u64);
        }
    }
    word
}

/// Packs the weights of `layer` into passes, row words, pair entries and headers.
pub fn pack_weights(layer: &QuantizedLayer, r: &Resolved) -> (Vec<TilePass>, Vec<BitWord>, Vec<BitWord>, Vec<BitWord>) {
    let k_tiles = layer.k_pad / r.rows;
    let n_tiles = layer.n_pad / r.cols;
    let ub_row = r.ublocks_per_row();
    let b = r.b as usize;
    let meta = r.ublock_meta_bits as usize;
    let flag_bits = usize::from(r.max_pairs > 0);
    let mut passes = Vec::new();
    let mut rows = Vec::with_capacity(k_tiles * n_tiles * r.rows);
    let mut pairs = Vec::new();
    let mut headers = Vec::new();
    for nt in 0..n_tiles {
        for kt in 0..k_tiles {
            for pass in plan_passes(layer, r, nt, kt) {
                // A later pass of a tile stores only its ReCoN rows: the array zeroes the
                // activations of every other row instead.
                let stored = if pass.same_acts { r.recon_rows } else { r.rows };
                for source in &pass.sources[..stored] {
                    let mut word = BitWord::zero(r.row_word_bits as usize);
                    if let Some(channel) = source {
                        let k = kt * r.rows + channel;
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
                    }
                    rows.push(word);
                }
                if r.has_sharing {
                    headers.push(pack_header(&pass, r));
                }
                passes.push(pass);
            }
        }
    }
    (passes, rows, pairs, headers)
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
    let (passes, row_words, pair_words, header_words) = pack_weights(layer, r);
    Image {
        k_tiles: layer.k_pad / r.rows,
        n_tiles: layer.n_pad / r.cols,
        vectors: vectors.len(),
        passes,
        row_words,
        pair_words,
        header_words,
        act_words: pack_activations(vectors, layer.k_pad, r),
    }
}

/// Bits of the weight image: row words, pair entries, headers and base exponents.
pub fn weight_image_bits(layer: &QuantizedLayer, r: &Resolved, image: &Image) -> u64 {
    let rows = image.row_words.len() as u64 * r.row_word_bits as u64;
    let pairs = image.pair_words.len() as u64 * r.pair_entry_bits as u64;
    let headers = image.header_words.len() as u64 * r.header_bits as u64;
    let bases = layer.bases.len() as u64 * 8;
    rows + pairs + headers + bases
}

/// Effective bit width: weight image bits per weight of the original tensor.
pub fn effective_bit_width(layer: &QuantizedLayer, r: &Resolved, image: &Image) -> f64 {
    weight_image_bits(layer, r, image) as f64 / (layer.n_out * layer.k_in) as f64
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
    if !image.header_words.is_empty() {
        write_atomically(&dir.join("headers.hex"), to_hex_lines(&image.header_words).as_bytes())?;
    }
    write_atomically(&dir.join("acts.hex"), to_hex_lines(&image.act_words).as_bytes())?;
    Ok(())
}

/// Fills a temporary folder next to `target` with `fill`, then renames it to `target`,
/// replacing an older folder of that name only after the new one is complete.
///
/// Rejects, before writing anything, a `target` that is a file or a non-empty folder with
/// none of this crate's output files in it.
pub fn write_dir_atomically(target: &Path, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    check_replaceable(target)?;
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent)?;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    // The staging folder is removed when it is dropped, so a failed fill or rename leaves
    // nothing behind.
    let tmp = tempfile::Builder::new().prefix(&format!(".{name}.partial-")).tempdir_in(parent)?;
    fill(tmp.path())?;
    let renamed = |result: std::io::Result<()>| {
        result.map_err(|e| std::io::Error::new(e.kind(), format!("cannot move the new folder into place: {e}; choose another folder")))
    };
    if target.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        renamed(fs::rename(target, &old))?;
        if let Err(e) = fs::rename(tmp.path(), target) {
            let _ = fs::rename(&old, target);
            return renamed(Err(e));
        }
        fs::remove_dir_all(&old)?;
    } else {
        renamed(fs::rename(tmp.path(), target))?;
    }
    Ok(())
}

/// Files of which at least one sits in every folder this crate writes as a whole.
const OUTPUT_MARKERS: [&str; 3] = ["manifest.json", "config.toml", "msq_top.sv"];

/// Rejects a target that is not a folder, or a non-empty folder that this crate did not
/// write, so that replacing it as a whole cannot destroy someone's files.
fn check_replaceable(target: &Path) -> std::io::Result<()> {
    let Ok(meta) = fs::symlink_metadata(target) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a folder; choose a new folder name or remove it", target.display()),
        ));
    }
    let empty = fs::read_dir(target)?.next().is_none();
    if empty || OUTPUT_MARKERS.iter().any(|m| target.join(m).is_file()) {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!(
            "{} is a non-empty folder without {}, so microscopiq did not write it and will not replace it; \
             choose an empty or new folder",
            target.display(),
            OUTPUT_MARKERS.join(", ")
        ),
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect()
    }

    #[test]
    fn dir_write_rejects_file_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        fs::write(&target, "precious").unwrap();
        let error = write_dir_atomically(&target, |d| fs::write(d.join("config.toml"), "x")).unwrap_err();
        assert!(error.to_string().contains("is not a folder"), "unexpected message: {error}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious", "the file was changed");
        assert!(leftovers(dir.path()).is_empty(), "staging folders left behind: {:?}", leftovers(dir.path()));
    }

    #[test]
    fn dir_write_rejects_foreign_folder() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        fs::create_dir_all(target.join("src")).unwrap();
        fs::write(target.join("src/notes.txt"), "important").unwrap();
        let error = write_dir_atomically(&target, |d| fs::write(d.join("config.toml"), "x")).unwrap_err();
        assert!(error.to_string().contains("will not replace it"), "unexpected message: {error}");
        assert_eq!(fs::read_to_string(target.join("src/notes.txt")).unwrap(), "important", "the folder was changed");
        assert!(leftovers(dir.path()).is_empty(), "staging folders left behind: {:?}", leftovers(dir.path()));
    }

    #[test]
    fn dir_write_replaces_own_output() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        write_dir_atomically(&target, |d| fs::write(d.join("config.toml"), "old")).unwrap();
        write_dir_atomically(&target, |d| fs::write(d.join("config.toml"), "new")).unwrap();
        assert_eq!(fs::read_to_string(target.join("config.toml")).unwrap(), "new");
        assert!(leftovers(dir.path()).is_empty(), "old or staging folders left behind: {:?}", leftovers(dir.path()));
    }

    #[test]
    fn dir_write_failure_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let error = write_dir_atomically(&target, |_| Err(std::io::Error::other("fill failed"))).unwrap_err();
        assert!(error.to_string().contains("fill failed"), "unexpected message: {error}");
        assert!(!target.exists(), "a failed write created the target");
        assert!(leftovers(dir.path()).is_empty(), "staging folders left behind: {:?}", leftovers(dir.path()));
    }
}
