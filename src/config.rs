//! Generator and quantizer configuration: TOML presets, command-line overrides, validation
//! and the widths derived from them.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bits::{index_bits, signed_width};
use crate::formats::{FpFormat, FpKind, IntFormat, Rounding};

/// The default configuration: a 16x16 array, 2-bit inliers, 8-bit activations, 8-wide micro-blocks.
pub const DEFAULT_TOML: &str = include_str!("../configs/default.toml");

/// Array shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrayConfig {
    /// PE rows: input channels per tile.
    pub rows: u32,
    /// PE columns: output channels per tile.
    pub cols: u32,
    /// Width of the memory addresses and of the tile and vector counters.
    #[serde(default = "default_address_bits")]
    pub address_bits: u32,
    /// PE rows that have a ReCoN (the first `recon_rows` rows); defaults to every row. With
    /// fewer, each tile's input channels are permuted so that rows with outlier pairs land on
    /// ReCoN rows, and a tile with more such rows runs in several passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recon_rows: Option<u32>,
    /// Multi-precision PEs: each pair of adjacent PE rows forms one PE that runs either two
    /// b-bit lanes (two input channels, W`b` images) or one 2b-bit weight split into a low
    /// and a high lane (W`2b` images). The image of each layer selects the mode.
    #[serde(default)]
    pub multi_precision: bool,
    /// Pipeline registers in each PE row: 0; 1 adds a register after the multiplier; 2 also
    /// adds one after ReCoN, before the column shift and addition. Each adds a cycle of latency.
    #[serde(default)]
    pub pipeline_stages: u32,
    /// Weight copies per PE (and ReCoN command copies per micro-block): 2 loads the next tile
    /// while the current one computes; 1 halves those registers, and a tile then loads only
    /// after the previous one has issued its vectors.
    #[serde(default = "default_weight_buffer_depth")]
    pub weight_buffer_depth: u32,
}

fn default_weight_buffer_depth() -> u32 {
    2
}

fn default_address_bits() -> u32 {
    24
}

/// Number formats of the packed image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    /// Inlier bits b (slot width).
    pub weight_bits: u32,
    /// Activation bits A (two's complement).
    pub act_bits: u32,
    /// Micro-block size M: output channels that share a micro-exponent.
    pub ublock: u32,
    /// Maximum outlier/pruned pairs per micro-block (at most M/2).
    pub max_pairs: u32,
    /// Input channels per macro-block (one E8M0 base exponent); defaults to `rows`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mab_rows: Option<u32>,
    /// Micro-exponent bits u: each micro-block sits 0 to 2^u - 1 binades below its base.
    pub micro_exp_bits: u32,
    /// Outlier element format; defaults to E2M1 for b = 2, E3M2 for b = 3, E4M3 for b = 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_format: Option<FpKind>,
    /// Bits of the outlier exponent offset stored per flagged micro-block.
    pub outlier_offset_bits: u32,
    /// Rounding rule of every element encoder.
    pub rounding: Rounding,
}

/// Population over which the outlier statistics (mean and standard deviation) are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutlierScope {
    /// All output channels of one input channel.
    Column,
    /// The R x M values of one macro-block.
    MacroBlock,
    /// The M values of one micro-block. With M = 8 a 3-sigma rule flags nothing, because no
    /// value of 8 samples lies more than sqrt(7) population standard deviations from their mean.
    MicroBlock,
}

/// Quantizer settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizerConfig {
    /// A weight is an outlier when |w - mean| > k_sigma * std.
    pub k_sigma: f64,
    /// Scope of the mean and standard deviation.
    pub outlier_scope: OutlierScope,
}

/// A complete configuration as read from TOML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub array: ArrayConfig,
    pub format: FormatConfig,
    pub quantizer: QuantizerConfig,
}

/// Command-line overrides applied on top of a TOML configuration.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub rows: Option<u32>,
    pub cols: Option<u32>,
    pub weight_bits: Option<u32>,
    pub act_bits: Option<u32>,
    pub ublock: Option<u32>,
    pub max_pairs: Option<u32>,
    pub k_sigma: Option<f64>,
    pub outlier_scope: Option<OutlierScope>,
    pub rounding: Option<Rounding>,
    pub recon_rows: Option<u32>,
    pub multi_precision: Option<bool>,
    pub pipeline_stages: Option<u32>,
    pub weight_buffer_depth: Option<u32>,
    pub outlier_format: Option<FpKind>,
}

/// An invalid configuration: names the parameter, the value and the legal range.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl OutlierScope {
    /// Every scope: column, macro-block, micro-block.
    pub const ALL: [OutlierScope; 3] = [OutlierScope::Column, OutlierScope::MacroBlock, OutlierScope::MicroBlock];

    /// Name in the configuration file, tables and CSV.
    pub fn name(self) -> &'static str {
        match self {
            OutlierScope::Column => "column",
            OutlierScope::MacroBlock => "macro_block",
            OutlierScope::MicroBlock => "micro_block",
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn invalid(message: String) -> ConfigError {
    ConfigError(message)
}

impl Config {
    /// Parses a TOML configuration; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| invalid(format!("invalid configuration {origin}: {e}")))
    }

    /// Reads a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(format!("cannot read configuration {}: {e}", path.display()))
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Returns the embedded default configuration.
    pub fn default_config() -> Config {
        Config::from_toml(DEFAULT_TOML, "configs/default.toml").expect("embedded default parses")
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.rows {
            self.array.rows = v;
        }
        if let Some(v) = o.recon_rows {
            self.array.recon_rows = Some(v);
        }
        if let Some(v) = o.multi_precision {
            self.array.multi_precision = v;
        }
        if let Some(v) = o.pipeline_stages {
            self.array.pipeline_stages = v;
        }
        if let Some(v) = o.weight_buffer_depth {
            self.array.weight_buffer_depth = v;
        }
        if let Some(v) = o.cols {
            self.array.cols = v;
        }
        if let Some(v) = o.weight_bits {
            if v != self.format.weight_bits {
                // The outlier format follows b unless the file chose one for this b.
                self.format.outlier_format = None;
            }
            self.format.weight_bits = v;
        }
        if let Some(v) = o.outlier_format {
            self.format.outlier_format = Some(v);
        }
        if let Some(v) = o.act_bits {
            self.format.act_bits = v;
        }
        if let Some(v) = o.ublock {
            self.format.ublock = v;
            if o.max_pairs.is_none() {
                self.format.max_pairs = self.format.max_pairs.min(v / 2);
            }
        }
        if let Some(v) = o.max_pairs {
            self.format.max_pairs = v;
        }
        if let Some(v) = o.k_sigma {
            self.quantizer.k_sigma = v;
        }
        if let Some(v) = o.outlier_scope {
            self.quantizer.outlier_scope = v;
        }
        if let Some(v) = o.rounding {
            self.format.rounding = v;
        }
    }

    /// Validates every parameter and derives the widths of the image and the hardware.
    ///
    /// Nothing is generated from a configuration that fails here.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        Resolved::new(self.clone())
    }
}

fn check_range(name: &str, value: u32, lo: u32, hi: u32) -> Result<(), ConfigError> {
    if value < lo || value > hi {
        return Err(invalid(format!("invalid {name} = {value}: it must be in {lo}..={hi}")));
    }
    Ok(())
}

/// Default outlier format for b inlier bits, if one of 2b bits exists.
pub fn default_outlier_format(weight_bits: u32) -> Option<FpKind> {
    match weight_bits {
        2 => Some(FpKind::E2M1),
        3 => Some(FpKind::E3M2),
        4 => Some(FpKind::E4M3),
        _ => None,
    }
}

/// A validated configuration with every derived width, as the quantizer, the image, the
/// golden model and the generator use it.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub config: Config,
    pub rows: usize,
    pub cols: usize,
    /// Inlier bits b.
    pub b: u32,
    /// Activation bits A.
    pub a: u32,
    /// Micro-block size M.
    pub m: usize,
    /// log2(M).
    pub log_m: u32,
    pub max_pairs: usize,
    /// Macro-block rows R.
    pub mab_rows: usize,
    /// Micro-exponent bits u.
    pub micro_exp_bits: u32,
    pub int_format: IntFormat,
    /// Outlier element format; `None` only when `max_pairs` is 0 and b has no 2b-bit format.
    pub outlier: Option<FpFormat>,
    pub offset_bits: u32,
    /// Smallest outlier exponent offset (outlier exponent minus inlier exponent).
    pub offset_min: i32,
    /// Significand bits carried by the pruned slot's PE.
    pub lo_bits: u32,
    /// Significand bits carried by the outlier slot's PE.
    pub hi_bits: u32,
    pub rounding: Rounding,
    pub k_sigma: f64,
    pub scope: OutlierScope,
    /// ReCoN stages (2 log2 M - 1, 0 when M = 1).
    pub recon_stages: usize,
    /// Largest shift of a merged lane.
    pub max_shift: u32,
    /// Bits of a PE shift register.
    pub shift_bits: u32,
    /// Width of a PE product before its shift.
    pub product_width: u32,
    /// Width of a ReCoN lane (a product or the sum of one outlier's two products).
    pub lane_width: u32,
    /// Width of a lane after its shift.
    pub shifted_width: u32,
    /// Width of a column partial sum.
    pub acc_width: u32,
    /// Bits of one micro-block's metadata in a row word (flag and micro-exponent).
    pub ublock_meta_bits: u32,
    /// Width of a row word: slots plus micro-block metadata.
    pub row_word_bits: u32,
    /// Bits of the pair count field of a pair entry.
    pub pair_count_bits: u32,
    /// Width of a pair entry (0 when `max_pairs` is 0).
    pub pair_entry_bits: u32,
    /// PE rows with a ReCoN (the first ones).
    pub recon_rows: usize,
    /// True when fewer rows than all have a ReCoN, so tiles carry a permutation header.
    pub has_sharing: bool,
    /// Width of a tile header word (0 without sharing).
    pub header_bits: u32,
    /// Configuration hash: 16 hex digits.
    pub hash: String,
    /// With `multi_precision`: the configuration of the 2b-bit layers that the array also
    /// runs (rows / 2 input channels per tile, 2b-bit inliers). The datapath widths above
    /// (shift, product, lane and partial-sum widths) then cover both kinds of layer.
    pub wide: Option<Box<Resolved>>,
}

impl Resolved {
    fn new(mut config: Config) -> Result<Resolved, ConfigError> {
        let f = &config.format;
        check_range("rows", config.array.rows, 1, 256)?;
        check_range("cols", config.array.cols, 1, 256)?;
        check_range("weight_bits", f.weight_bits, 2, 8)?;
        if f.weight_bits != 2 && f.weight_bits != 3 && f.weight_bits != 4 && f.weight_bits != 8 {
            return Err(invalid(format!(
                "invalid weight_bits = {}: supported inlier widths are 2, 3, 4 and 8",
                f.weight_bits
            )));
        }
        check_range("act_bits", f.act_bits, 2, 16)?;
        check_range("address_bits", config.array.address_bits, 4, 32)?;
        check_range("pipeline_stages", config.array.pipeline_stages, 0, 2)?;
        check_range("weight_buffer_depth", config.array.weight_buffer_depth, 1, 2)?;
        let recon_rows = config.array.recon_rows.unwrap_or(config.array.rows);
        check_range("recon_rows", recon_rows, 1, config.array.rows)?;
        if !f.ublock.is_power_of_two() || f.ublock > 32 {
            return Err(invalid(format!(
                "invalid ublock = {}: the micro-block size must be a power of two from 1 to 32",
                f.ublock
            )));
        }
        if config.array.cols % f.ublock != 0 {
            return Err(invalid(format!(
                "invalid ublock = {} for cols = {}: cols must be a multiple of ublock, because ReCoN \
                 merges outlier products inside one micro-block of one PE row",
                f.ublock, config.array.cols
            )));
        }
        if f.max_pairs > f.ublock / 2 {
            return Err(invalid(format!(
                "invalid max_pairs = {} for ublock = {}: at most ublock / 2 = {} pairs fit in a micro-block",
                f.max_pairs,
                f.ublock,
                f.ublock / 2
            )));
        }
        let mab_rows = f.mab_rows.unwrap_or(config.array.rows);
        if mab_rows == 0 || mab_rows % config.array.rows != 0 {
            return Err(invalid(format!(
                "invalid mab_rows = {mab_rows} for rows = {}: a macro-block must span a whole number \
                 of tiles along the input channels, so that each tile column shares one base exponent",
                config.array.rows
            )));
        }
        check_range("micro_exp_bits", f.micro_exp_bits, 0, 4)?;
        check_range("outlier_offset_bits", f.outlier_offset_bits, 1, 6)?;
        if !(config.quantizer.k_sigma.is_finite() && config.quantizer.k_sigma > 0.0) {
            return Err(invalid(format!(
                "invalid k_sigma = {}: it must be a positive number",
                config.quantizer.k_sigma
            )));
        }

        let b = f.weight_bits;
        let outlier_kind = f.outlier_format.or_else(|| default_outlier_format(b));
        let outlier = outlier_kind.map(|k| k.format());
        if f.max_pairs > 0 {
            let Some(of) = outlier else {
                return Err(invalid(format!(
                    "invalid max_pairs = {} for weight_bits = {b}: no outlier format of {} bits exists; \
                     set max_pairs = 0",
                    f.max_pairs,
                    2 * b
                )));
            };
            if of.bits() != 2 * b {
                return Err(invalid(format!(
                    "invalid outlier_format = {} for weight_bits = {b}: an outlier needs a {}-bit format \
                     so that its code splits into two {b}-bit slots",
                    of.kind.name(),
                    2 * b
                )));
            }
        }
        let int_format = IntFormat::new(b);
        let max_pairs = f.max_pairs as usize;
        let u = f.micro_exp_bits;
        let x = f.outlier_offset_bits;

        // Split of the outlier significand between the two PEs of a pair.
        let (lo_bits, hi_bits, offset_min, outlier_shift_max) = match (outlier, max_pairs) {
            (Some(of), p) if p > 0 => {
                let sig_bits = of.man_bits + 1;
                let lo = sig_bits / 2;
                let hi = sig_bits - lo;
                if hi > b - 1 {
                    return Err(invalid(format!(
                        "invalid outlier_format = {} for weight_bits = {b}: its {sig_bits}-bit significand \
                         does not split into two halves of at most {} bits",
                        of.kind.name(),
                        b - 1
                    )));
                }
                // The smallest offset keeps the outlier's least significant bit on or above the
                // finest inlier grid of the macro-block, so every PE shift is non-negative.
                let offset_min = of.bias + of.man_bits as i32 - 1 - (b as i32 - 2);
                let e_field_max = of.max_finite_code() >> of.man_bits;
                // Shift of the merged outlier product, applied after ReCoN.
                let shift_max = (1u32 << u) - 1 + ((1u32 << x) - 1) + e_field_max - 1;
                (lo, hi, offset_min, shift_max)
            }
            _ => (0, 0, 0, 0),
        };
        let inlier_shift_max = (1u32 << u) - 1;
        let max_shift = inlier_shift_max.max(outlier_shift_max);
        let shift_bits = index_bits(max_shift as u64 + 1);

        // ReCoN routes products before the shift, so its lanes stay narrow: a PE emits
        // weight * activation, an outlier's upper half pre-shifted by lo_bits, and each column
        // shifts its merged lane afterwards.
        let a = f.act_bits;
        let act_mag: u128 = 1u128 << (a - 1);
        let inlier_product = int_format.max_magnitude() as u128 * act_mag;
        let mut pe_bound = inlier_product;
        let mut lane_bound = inlier_product;
        let mut shifted_bound = inlier_product << inlier_shift_max;
        if max_pairs > 0 {
            let hi_max = (1u128 << hi_bits) - 1;
            let lo_max = (1u128 << lo_bits) - 1;
            let sig_max = (1u128 << (hi_bits + lo_bits)) - 1;
            pe_bound = pe_bound.max((hi_max * act_mag) << lo_bits).max(lo_max * act_mag);
            lane_bound = pe_bound.max(sig_max * act_mag);
            shifted_bound = shifted_bound.max((sig_max * act_mag) << outlier_shift_max);
        }
        let product_width = signed_width(pe_bound);
        let lane_width = signed_width(lane_bound);
        let shifted_width = signed_width(shifted_bound);
        let acc_width = signed_width(shifted_bound * config.array.rows as u128);
        if acc_width > 120 {
            return Err(invalid(format!(
                "invalid configuration: the partial sum needs {acc_width} bits, more than the 120 the \
                 golden model supports; lower outlier_offset_bits or act_bits"
            )));
        }

        let m = f.ublock as usize;
        let log_m = f.ublock.trailing_zeros();
        let recon_stages = if m > 1 { 2 * log_m as usize - 1 } else { 0 };
        let flag_bits = u32::from(max_pairs > 0);
        let ublock_meta_bits = flag_bits + u;
        let cols = config.array.cols as usize;
        let row_word_bits = cols as u32 * b + (cols / m) as u32 * ublock_meta_bits;
        let pair_count_bits = if max_pairs > 0 { index_bits(max_pairs as u64 + 1) } else { 0 };
        let pair_entry_bits = if max_pairs > 0 {
            pair_count_bits
                + x
                + max_pairs as u32 * 2 * log_m
                + recon_stages as u32 * (m as u32 / 2) * 2
        } else {
            0
        };

        let has_sharing = max_pairs > 0 && recon_rows < config.array.rows;
        let header_bits = if has_sharing {
            1 + recon_rows * (1 + index_bits(config.array.rows as u64))
        } else {
            0
        };

        // Record the defaults that were filled in, so the hash names the whole configuration.
        config.array.recon_rows = Some(recon_rows);
        config.format.mab_rows = Some(mab_rows);
        config.format.outlier_format = outlier_kind;
        let canonical = toml::to_string(&config).expect("configuration serialises");
        let hash = format!("{:016x}", fnv1a64(canonical.as_bytes()));

        let mut resolved = Resolved {
            rows: config.array.rows as usize,
            cols,
            b,
            a,
            m,
            log_m,
            max_pairs,
            mab_rows: mab_rows as usize,
            micro_exp_bits: u,
            int_format,
            outlier,
            offset_bits: x,
            offset_min,
            lo_bits,
            hi_bits,
            rounding: config.format.rounding,
            k_sigma: config.quantizer.k_sigma,
            scope: config.quantizer.outlier_scope,
            recon_stages,
            max_shift,
            shift_bits,
            product_width,
            lane_width,
            shifted_width,
            acc_width,
            ublock_meta_bits,
            row_word_bits,
            pair_count_bits,
            pair_entry_bits,
            recon_rows: recon_rows as usize,
            has_sharing,
            header_bits,
            hash,
            config,
            wide: None,
        };
        if resolved.config.array.multi_precision {
            resolved.add_wide_layers()?;
        }
        Ok(resolved)
    }

    /// Resolves the 2b-bit layer configuration of a multi-precision array and widens the
    /// datapath so that both kinds of layer fit.
    ///
    /// In a 2b-bit layer, PE rows 2k and 2k+1 hold the low and high b-bit halves of input
    /// channel k's weights. The low half is unsigned (0..2^b - 1). The high half is signed,
    /// and its column shift is b larger. Both rows see activation k.
    fn add_wide_layers(&mut self) -> Result<(), ConfigError> {
        let rows = self.config.array.rows;
        if rows % 2 != 0 {
            return Err(invalid(format!(
                "invalid rows = {rows} with multi_precision = true: a multi-precision PE spans two \
                 adjacent rows, so rows must be even"
            )));
        }
        if self.has_sharing {
            return Err(invalid(format!(
                "invalid recon_rows = {} with multi_precision = true: shared ReCoN rows are not \
                 supported on multi-precision arrays; set recon_rows = rows = {rows}",
                self.recon_rows
            )));
        }
        let mut wide_config = self.config.clone();
        wide_config.array.rows = rows / 2;
        wide_config.array.recon_rows = None;
        wide_config.array.multi_precision = false;
        wide_config.format.weight_bits = 2 * self.b;
        wide_config.format.mab_rows = self.config.format.mab_rows.map(|m| m / 2);
        wide_config.format.outlier_format = None;
        let wide = Resolved::new(wide_config).map_err(|e| {
            invalid(format!(
                "invalid multi_precision = true for weight_bits = {}: the {}-bit layers it would also \
                 run have an invalid configuration: {e}",
                self.b,
                2 * self.b
            ))
        })?;

        // In a 2b-bit layer a low half is at most 2^b - 1 and a high half at least -2^(b-1).
        // An outlier's upper half is also pre-shifted by the wide lo_bits.
        let act_mag: u128 = 1u128 << (self.a - 1);
        let half_max = (1u128 << self.b) - 1;
        let mut pe_bound = half_max * act_mag;
        let mut lane_bound = pe_bound;
        if wide.max_pairs > 0 {
            pe_bound = (half_max * act_mag) << wide.lo_bits;
            lane_bound = pe_bound + half_max * act_mag;
        }
        let max_shift = self.max_shift.max(wide.max_shift + self.b);
        self.shift_bits = index_bits(max_shift as u64 + 1);
        self.product_width = self.product_width.max(signed_width(pe_bound));
        self.lane_width = self.lane_width.max(signed_width(lane_bound)).max(self.product_width);
        self.shifted_width = self.shifted_width.max(signed_width(lane_bound << (wide.max_shift + self.b)));
        // Partial sums wrap modulo 2^acc_width, so only the final sums of each kind of layer
        // have to fit, and every shifted lane.
        self.acc_width = self.acc_width.max(wide.acc_width).max(self.shifted_width);
        self.wide = Some(Box::new(wide));
        Ok(())
    }

    /// Returns the configuration of layers with `weight_bits`-bit inliers on this array: this
    /// one for b, the 2b-bit one on a multi-precision array.
    pub fn layer_config(&self, weight_bits: u32) -> Result<&Resolved, ConfigError> {
        if weight_bits == self.b {
            return Ok(self);
        }
        match &self.wide {
            Some(wide) if wide.b == weight_bits => Ok(wide),
            Some(wide) => Err(invalid(format!(
                "invalid weight_bits = {weight_bits} for this array: it runs {}-bit and {}-bit layers",
                self.b, wide.b
            ))),
            None if weight_bits == 2 * self.b => Err(invalid(format!(
                "invalid weight_bits = {weight_bits} for this array: it runs {}-bit layers only; set \
                 multi_precision = true to run {weight_bits}-bit layers too",
                self.b
            ))),
            None => Err(invalid(format!(
                "invalid weight_bits = {weight_bits} for this array: it runs {}-bit layers only",
                self.b
            ))),
        }
    }

    /// Micro-blocks per PE row.
    pub fn ublocks_per_row(&self) -> usize {
        self.cols / self.m
    }

    /// 2x2 switches per ReCoN stage.
    pub fn switches_per_stage(&self) -> usize {
        self.m / 2
    }

    /// Largest micro-exponent d.
    pub fn micro_exp_max(&self) -> u32 {
        (1u32 << self.micro_exp_bits) - 1
    }

    /// Largest outlier exponent offset.
    pub fn offset_max(&self) -> i32 {
        self.offset_min + (1i32 << self.offset_bits) - 1
    }

    /// Exponent of a tile column's integer partial sum, for base exponent `base`.
    pub fn column_exponent(&self, base: i32) -> i32 {
        base - self.micro_exp_max() as i32 - (self.b as i32 - 2)
    }

    /// Serializes the resolved configuration as TOML, with every default filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.config).expect("configuration serialises")
    }
}

/// 64-bit FNV-1a: a small, stable hash for naming configurations.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::default_config()
    }

    #[test]
    fn default_resolves() {
        let r = base().resolve().unwrap();
        assert_eq!((r.rows, r.cols, r.b, r.a, r.m), (16, 16, 2, 8, 8));
        assert_eq!(r.recon_stages, 5);
        assert_eq!(r.hash.len(), 16);
    }

    #[test]
    fn rejects_cols_not_multiple_of_ublock() {
        let mut c = base();
        c.array.cols = 12;
        let e = c.resolve().unwrap_err();
        assert!(e.0.contains("ublock = 8 for cols = 12"), "{e}");
    }

    #[test]
    fn rejects_too_many_pairs() {
        let mut c = base();
        c.format.max_pairs = 5;
        let e = c.resolve().unwrap_err();
        assert!(e.0.contains("max_pairs = 5"), "{e}");
    }

    #[test]
    fn rejects_mab_rows_not_multiple() {
        let mut c = base();
        c.format.mab_rows = Some(24);
        assert!(c.resolve().unwrap_err().0.contains("mab_rows = 24"));
    }

    #[test]
    fn rejects_unknown_toml_field() {
        let text = DEFAULT_TOML.replace("[array]", "[array]\nrowz = 3");
        let e = Config::from_toml(&text, "test").unwrap_err();
        assert!(e.0.contains("rowz"), "{e}");
    }

    #[test]
    fn hash_changes_with_parameters() {
        let a = base().resolve().unwrap().hash;
        let mut c = base();
        c.array.rows = 8;
        c.format.mab_rows = None;
        let b = c.resolve().unwrap().hash;
        assert_ne!(a, b);
    }

    #[test]
    fn one_by_one_array_resolves() {
        let mut c = base();
        c.array.rows = 1;
        c.array.cols = 1;
        c.format.ublock = 1;
        c.format.max_pairs = 0;
        c.format.mab_rows = None;
        let r = c.resolve().unwrap();
        assert_eq!(r.recon_stages, 0);
        assert_eq!(r.pair_entry_bits, 0);
    }

    #[test]
    fn accumulator_covers_int8_extremes() {
        // Symmetric INT8 inliers (no outliers, no micro-exponent) never reach -128, so one
        // product is at most 127 * 128 = 16256 in magnitude.
        let mut c = base();
        c.array.rows = 1;
        c.array.cols = 1;
        c.format.weight_bits = 8;
        c.format.ublock = 1;
        c.format.max_pairs = 0;
        c.format.micro_exp_bits = 0;
        c.format.mab_rows = None;
        let r = c.resolve().unwrap();
        assert_eq!(r.product_width, 15);
        assert_eq!(r.acc_width, 15);
    }
}
