//! Model-level accuracy of each weight quantization method.
//!
//! Every method quantizes every linear layer of a model, and the model then runs with the
//! dequantized weights on held-out text:
//!
//! - glassllm: perplexity over windows of 128 tokens from two plays, by default all 204
//!   windows of `hamlet_gut.txt` characters 20000..80000 and the first 150 windows of
//!   `othello_gut.txt` from character 20000 (354 windows, see [`GLASSLLM_TEXTS`]).
//! - all-MiniLM-L6-v2: mean cosine similarity between the quantized and the FP32 sentence
//!   embeddings of lines of Julius Caesar (see [`minilm_sentences`]).
//!
//! Each row also reports the worst layer's relative output error
//! `||X W^T - X Q^T||_F / ||X W^T||_F`, with X the FP32 model's input to that layer on the
//! first few evaluation windows or sentences. The effective bit width (EBW) of a row is the
//! storage of every quantized layer, in bits, over the number of weights.
//!
//! GPTQ methods calibrate on other plays, [`hessian::CALIBRATION_TEXT`], which
//! [`check_calibration_text`] checks against the evaluation text.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Serialize, Serializer};

use crate::calibration::{self, CalibrationSet, LinearModel};
use crate::config::{Config, Overrides, Resolved};
use crate::formats::{quantize_mx_fp_block, FpKind, Rounding};
use crate::gptq::{self, GptqOptions};
use crate::hessian::{self, Hessian, LayerHessians};
use crate::image;
use crate::models::bpe::{self, BpeTokenizer};
use crate::models::glassllm::GlassLlm;
use crate::models::minilm::MiniLm;
use crate::models::tensor::{matmul, transpose};
use crate::models::wordpiece::WordPiece;
use crate::quantizer;
use crate::weights::{self, Matrix};

/// One part of the glassllm evaluation text: a character range of a play, cut into windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextPart {
    /// File name in `models_dir()/shakespeare`.
    pub file: &'static str,
    /// Characters read, as in [`bpe::read_text_slice`], so an end past the text reads to the end.
    pub chars: Range<usize>,
    /// Largest number of windows taken from this part, or `None` for every complete window.
    pub max_windows: Option<usize>,
}

/// The glassllm evaluation text, in window order.
pub const GLASSLLM_TEXTS: [TextPart; 2] = [
    TextPart { file: "hamlet_gut.txt", chars: 20_000..80_000, max_windows: None },
    TextPart { file: "othello_gut.txt", chars: 20_000..usize::MAX, max_windows: Some(150) },
];

/// Play whose lines are the MiniLM evaluation sentences. GPTQ calibrates on Macbeth, King
/// Lear and The Tempest (`hessian::CALIBRATION_TEXT`), so the evaluation uses another play.
pub const MINILM_TEXT: &str = "julius_caesar_gut.txt";

/// Characters of [`MINILM_TEXT`] skipped before the first sentence: the front matter and the
/// first scenes.
pub const MINILM_TEXT_OFFSET: usize = 20_000;

/// Words (whitespace-separated) that a line needs to count as a sentence. The lower bound
/// drops speaker names and short stage directions.
pub const SENTENCE_WORDS: RangeInclusive<usize> = 5..=40;

/// Default number of MiniLM evaluation sentences.
pub const DEFAULT_SENTENCES: usize = 256;

/// Windows whose layer inputs give the worst layer output error of glassllm.
pub const CAPTURE_WINDOWS: usize = 4;

/// Sentences whose layer inputs give the worst layer output error of MiniLM.
pub const CAPTURE_SENTENCES: usize = 16;

/// glassllm calibration windows of 128 tokens for GPTQ, taken in turn from the plays of
/// [`hessian::CALIBRATION_TEXT`].
pub const CALIBRATION_WINDOWS: usize = 64;

/// MiniLM calibration sentences for GPTQ, taken in turn from the plays of
/// [`hessian::CALIBRATION_TEXT`] with the same line rule as the evaluation sentences.
pub const CALIBRATION_SENTENCES: usize = 512;

/// Elements per MXFP4 block: consecutive input channels of one output channel.
pub const MXFP4_BLOCK: usize = 32;

/// Plays that the evaluation reads. Calibration must use other plays.
pub const EVALUATION_PLAYS: [&str; 3] = ["hamlet", "othello", "julius_caesar"];

/// Returns an error when `file` (a name in `models_dir()/shakespeare`) is one of
/// [`EVALUATION_PLAYS`], in either its Gutenberg or its First Folio (`_f`) edition.
pub fn check_calibration_text(file: &str) -> Result<(), String> {
    let stem = Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or(file);
    let play = stem.trim_end_matches("_f").trim_end_matches("_gut");
    if EVALUATION_PLAYS.contains(&play) {
        return Err(format!(
            "invalid calibration text {file}: {play} is evaluation text; calibrate on another play"
        ));
    }
    Ok(())
}

/// A model that the evaluation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalModel {
    /// The small LLaMA-style decoder, scored by perplexity.
    GlassLlm,
    /// all-MiniLM-L6-v2, scored by the cosine similarity of its sentence embeddings to FP32.
    MiniLm,
}

impl EvalModel {
    /// Name in tables, CSV and JSON.
    pub fn name(self) -> &'static str {
        match self {
            EvalModel::GlassLlm => "glassllm",
            EvalModel::MiniLm => "minilm",
        }
    }
}

impl Serialize for EvalModel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// A weight quantization method of the comparison.
///
/// To add a method, add a variant to this enum and to [`Method::ALL`], give it a name and a
/// short name, and return its [`LayerQuantizer`] from [`Method::prepare`]. A method that
/// needs layer Hessians returns true from [`Method::needs_calibration`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// The unquantized weights, stored as 32-bit floats.
    Fp32,
    /// Round-to-nearest MX-INT-b through the MicroScopiQ quantizer with `max_pairs = 0`, so
    /// no outliers and no pruning.
    RtnMxInt,
    /// OCP MXFP4: E2M1 elements in blocks of 32 input channels with an E8M0 scale each.
    Mxfp4,
    /// The MicroScopiQ quantizer with the evaluation's configuration at b bits, without GPTQ.
    MicroScopiq,
    /// GPTQ with MX-INT-b and `max_pairs = 0`, so no outliers and no pruning.
    GptqMxInt,
    /// GPTQ with the MicroScopiQ quantizer in the evaluation's configuration at b bits.
    MicroScopiqGptq,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 6] = [
        Method::Fp32,
        Method::RtnMxInt,
        Method::GptqMxInt,
        Method::Mxfp4,
        Method::MicroScopiq,
        Method::MicroScopiqGptq,
    ];

    /// Name in tables, CSV and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Method::Fp32 => "FP32",
            Method::RtnMxInt => "RTN MX-INT (no outliers)",
            Method::Mxfp4 => "MXFP4",
            Method::MicroScopiq => "MicroScopiQ (no GPTQ)",
            Method::GptqMxInt => "GPTQ MX-INT (no outliers)",
            Method::MicroScopiqGptq => "MicroScopiQ (GPTQ)",
        }
    }

    /// Name of the points in the plot.
    pub fn short_name(self) -> &'static str {
        match self {
            Method::Fp32 => "FP32",
            Method::RtnMxInt => "RTN",
            Method::Mxfp4 => "MXFP4",
            Method::MicroScopiq => "MicroScopiQ",
            Method::GptqMxInt => "GPTQ",
            Method::MicroScopiqGptq => "MicroScopiQ+GPTQ",
        }
    }

    /// Returns true when [`Method::prepare`] needs the layer Hessians of calibration text.
    pub fn needs_calibration(self) -> bool {
        matches!(self, Method::GptqMxInt | Method::MicroScopiqGptq)
    }

    /// Builds the layer quantizer of this method at `bits` inlier bits, or returns why the
    /// method does not apply at that width.
    ///
    /// MX-INT and MicroScopiQ methods quantize with `config` at `bits` inlier bits. `hessians`
    /// are the layer Hessians of the calibration text. A method that needs them returns an
    /// error without them.
    pub fn prepare(self, config: &Config, bits: u32, hessians: Option<&Hessians>) -> Result<LayerQuantizer, String> {
        let calibrated = || {
            hessians.cloned().ok_or_else(|| format!("{} needs layer Hessians from calibration text", self.name()))
        };
        match self {
            Method::Fp32 => Ok(LayerQuantizer::Fp32),
            Method::Mxfp4 if bits == 4 => Ok(LayerQuantizer::Mxfp4),
            Method::Mxfp4 => Err("not applicable: MXFP4 elements are 4-bit E2M1".to_string()),
            Method::RtnMxInt => image_config(config, bits, Some(0)).map(LayerQuantizer::Image).map_err(not_applicable),
            Method::MicroScopiq => image_config(config, bits, None).map(LayerQuantizer::Image).map_err(not_applicable),
            Method::GptqMxInt => {
                let config = image_config(config, bits, Some(0)).map_err(not_applicable)?;
                Ok(LayerQuantizer::Gptq { config, hessians: calibrated()? })
            }
            Method::MicroScopiqGptq => {
                let config = image_config(config, bits, None).map_err(not_applicable)?;
                Ok(LayerQuantizer::Gptq { config, hessians: calibrated()? })
            }
        }
    }
}

impl Serialize for Method {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// Resolves `base` at `bits` inlier bits. `max_pairs` overrides the pairs per micro-block of
/// `base`.
pub(crate) fn image_config(base: &Config, bits: u32, max_pairs: Option<u32>) -> Result<Resolved, String> {
    let mut config = base.clone();
    config.apply(&Overrides { weight_bits: Some(bits), max_pairs, ..Overrides::default() });
    config.resolve().map_err(|e| e.to_string())
}

fn not_applicable(reason: String) -> String {
    format!("not applicable: {reason}")
}

/// Layer Hessians H = 2 X^T X / n of the calibration text, by layer name.
pub type Hessians = Arc<HashMap<String, Hessian>>;

/// A method prepared for one bit width.
#[derive(Clone, Debug)]
pub enum LayerQuantizer {
    /// Keeps the weights.
    Fp32,
    /// MXFP4 with round-half-to-even, the OCP MX default.
    Mxfp4,
    /// [`quantizer::quantize`] with this configuration, stored as its packed image.
    Image(Resolved),
    /// [`gptq::quantize_gptq`] with the default GPTQ options and each layer's Hessian,
    /// stored as its packed image.
    Gptq { config: Resolved, hessians: Hessians },
}

/// One layer after quantization.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    /// Dequantized weights, `[out, in]`.
    pub dequant: Matrix,
    /// Bits that storing the layer takes.
    pub storage_bits: u64,
    /// GPTQ could not factorise the layer's Hessian, so the layer was rounded to nearest.
    pub fell_back_to_rtn: bool,
}

impl LayerQuantizer {
    /// Quantizes the `[out, in]` weight matrix of layer `name`.
    ///
    /// Returns an error when a GPTQ quantizer has no valid Hessian for the layer.
    pub fn quantize(&self, name: &str, weight: &Matrix) -> Result<QuantizedWeight, String> {
        match self {
            LayerQuantizer::Fp32 => Ok(QuantizedWeight {
                dequant: weight.clone(),
                storage_bits: 32 * weight.data.len() as u64,
                fell_back_to_rtn: false,
            }),
            LayerQuantizer::Mxfp4 => Ok(quantize_mxfp4(weight)),
            LayerQuantizer::Image(r) => Ok(packed_weight(weight, &quantizer::quantize(weight, r), r, false)),
            LayerQuantizer::Gptq { config, hessians } => {
                let hessian = hessians
                    .get(name)
                    .ok_or_else(|| format!("no calibration Hessian for layer `{name}`"))?;
                let (layer, info) =
                    gptq::quantize_gptq(weight, hessian, config, &GptqOptions::default()).map_err(|e| e.to_string())?;
                Ok(packed_weight(weight, &layer, config, info.fell_back_to_rtn))
            }
        }
    }
}

/// Returns the dequantized weights of `layer` and the bits of its packed image.
pub(crate) fn packed_weight(weight: &Matrix, layer: &quantizer::QuantizedLayer, r: &Resolved, fell_back_to_rtn: bool) -> QuantizedWeight {
    let packed = image::build(layer, r, &[]);
    let storage_bits = image::weight_image_bits(layer, r, &packed);
    // Every dequantized value is an integer or minifloat times a power of two inside the f32
    // range, so the conversion is exact.
    let data = layer.dequant.iter().map(|&v| v as f32).collect();
    QuantizedWeight {
        dequant: Matrix::new(weight.name.clone(), weight.rows, weight.cols, data),
        storage_bits,
        fell_back_to_rtn,
    }
}

/// Quantizes `weight` to MXFP4 with blocks of [`MXFP4_BLOCK`] consecutive input channels.
///
/// A row whose length is not a multiple of the block size ends with a block padded with
/// zeros. The padding is stored, as in the MicroScopiQ image, so such a layer's EBW is above
/// 4 + 8/32.
pub fn quantize_mxfp4(weight: &Matrix) -> QuantizedWeight {
    let format = FpKind::E2M1.format();
    let blocks_per_row = weight.cols.div_ceil(MXFP4_BLOCK);
    let mut data = vec![0.0f32; weight.data.len()];
    let mut block = [0.0f32; MXFP4_BLOCK];
    for row in 0..weight.rows {
        for index in 0..blocks_per_row {
            let start = row * weight.cols + index * MXFP4_BLOCK;
            let end = (start + MXFP4_BLOCK).min((row + 1) * weight.cols);
            block.fill(0.0);
            block[..end - start].copy_from_slice(&weight.data[start..end]);
            let (_, _, dequant) = quantize_mx_fp_block(&block, format, Rounding::NearestEven);
            for (out, value) in data[start..end].iter_mut().zip(dequant) {
                *out = value as f32;
            }
        }
    }
    let block_bits = (MXFP4_BLOCK as u32 * format.bits() + 8) as u64;
    QuantizedWeight {
        dequant: Matrix::new(weight.name.clone(), weight.rows, weight.cols, data),
        storage_bits: (weight.rows * blocks_per_row) as u64 * block_bits,
        fell_back_to_rtn: false,
    }
}

/// The score of one row: glassllm perplexity or MiniLM cosine similarity. A field is `None`
/// when the method does not apply, or for a standard error of fewer than two samples.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Metric {
    Perplexity {
        /// exp(cross_entropy).
        perplexity: Option<f64>,
        /// Standard error of the perplexity, exp(mean) times the standard error of the mean.
        perplexity_se: Option<f64>,
        /// Mean cross-entropy over the windows, in nats per token.
        cross_entropy: Option<f64>,
        /// Standard error of the mean of the per-window cross-entropies.
        cross_entropy_se: Option<f64>,
        /// Mean cross-entropy minus FP32's on the same windows, in nats per token.
        delta_cross_entropy: Option<f64>,
        /// Standard error of the per-window paired difference to FP32.
        delta_cross_entropy_se: Option<f64>,
        /// Windows of 128 tokens scored.
        windows: usize,
        /// Text the windows come from.
        text: String,
    },
    Cosine {
        /// Mean cosine similarity of the sentence embeddings to FP32's.
        cosine: Option<f64>,
        /// Standard error of the mean cosine similarity.
        cosine_se: Option<f64>,
        /// Sentences embedded.
        sentences: usize,
        /// Text the sentences come from.
        text: String,
    },
}

/// One method at one bit width on one model.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalRow {
    pub model: EvalModel,
    pub method: Method,
    /// Inlier bits b, or 32 for FP32.
    pub bits: u32,
    /// Effective bit width of all linear layers together, or `None` when the method does not apply.
    pub ebw: Option<f64>,
    #[serde(flatten)]
    pub metric: Metric,
    /// Largest relative output error of a layer, `||X W^T - X Q^T||_F / ||X W^T||_F`.
    pub worst_layer_error: Option<f64>,
    /// Layer with the largest relative output error.
    pub worst_layer: Option<String>,
    /// Calibration text of a GPTQ method.
    pub calibration: Option<String>,
    /// Layers that GPTQ rounded to nearest because their Hessian could not be factorised.
    pub gptq_fallback_layers: Option<usize>,
    /// Reason that the method does not apply, for a row without results.
    pub note: Option<String>,
}

/// Methods, bit widths and sample counts of an evaluation.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Methods, each at every bit width except FP32, which runs once.
    pub methods: Vec<Method>,
    /// Inlier bit widths b.
    pub bits: Vec<u32>,
    /// glassllm windows: the first ones of [`GLASSLLM_TEXTS`] in order, or `None` for all.
    pub windows: Option<usize>,
    /// MiniLM sentences.
    pub sentences: usize,
    /// Configuration of the MX-INT and MicroScopiQ methods; each bit width of `bits`
    /// replaces its `weight_bits`.
    pub config: Config,
    /// Calibrate the GPTQ methods sequentially: each group of layers on the inputs of a model
    /// whose earlier layers are already quantized (see [`calibration::quantize_sequential`]).
    pub sequential: bool,
}

impl Default for EvalOptions {
    fn default() -> EvalOptions {
        EvalOptions {
            methods: Method::ALL.to_vec(),
            bits: vec![2, 4],
            windows: None,
            sentences: DEFAULT_SENTENCES,
            config: Config::default_config(),
            sequential: false,
        }
    }
}

/// Evaluates every method of `options` on `model` and returns one row per method and width.
///
/// Progress bars go to `progress`. Returns an error when a model or text file is missing or
/// invalid, when `options.config` is invalid at one of the bit widths, or when `options`
/// requests more windows or sentences than the text has.
pub fn evaluate(model: EvalModel, options: &EvalOptions, progress: &MultiProgress) -> Result<Vec<EvalRow>, String> {
    for &bits in &options.bits {
        image_config(&options.config, bits, Some(0))?;
    }
    match model {
        EvalModel::GlassLlm => evaluate_glassllm(options, progress),
        EvalModel::MiniLm => evaluate_minilm(options, progress),
    }
}

/// Inputs of one linear layer captured from the FP32 model.
struct LayerInputs {
    /// `[tokens, in]` row-major.
    rows: Vec<f32>,
    width: usize,
    /// ||X W^T||_F with the FP32 weights.
    reference_norm: f64,
}

/// Layer inputs by layer name.
struct CapturedInputs(HashMap<String, LayerInputs>);

impl CapturedInputs {
    /// Collects inputs through `run`, which calls its argument once per linear layer and
    /// forward pass, then computes each layer's FP32 output norm.
    fn capture<M: LinearModel>(model: &M, run: impl FnOnce(&mut dyn FnMut(&str, &[f32], usize))) -> CapturedInputs {
        let mut layers: HashMap<String, LayerInputs> = HashMap::new();
        run(&mut |name: &str, rows: &[f32], width: usize| {
            let entry = layers
                .entry(name.to_string())
                .or_insert_with(|| LayerInputs { rows: Vec::new(), width, reference_norm: 0.0 });
            entry.rows.extend_from_slice(rows);
        });
        for (name, inputs) in layers.iter_mut() {
            let weight = model.weight(name);
            inputs.reference_norm = output_norm(inputs, &weight.data, weight.rows);
        }
        CapturedInputs(layers)
    }

    /// Returns ||X W^T - X Q^T||_F / ||X W^T||_F for layer `name`, or 0 without captured inputs.
    fn relative_output_error(&self, name: &str, weight: &Matrix, quantized: &Matrix) -> f64 {
        let Some(inputs) = self.0.get(name) else {
            return 0.0;
        };
        let difference: Vec<f32> = weight.data.iter().zip(&quantized.data).map(|(w, q)| w - q).collect();
        let error = output_norm(inputs, &difference, weight.rows);
        if error == 0.0 {
            0.0
        } else {
            error / inputs.reference_norm
        }
    }
}

/// Returns ||X A^T||_F for `a` given as `[out, in]`.
fn output_norm(inputs: &LayerInputs, a: &[f32], out: usize) -> f64 {
    let tokens = inputs.rows.len() / inputs.width;
    let product = matmul(&inputs.rows, &transpose(a, out, inputs.width), tokens, inputs.width, out);
    product.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

/// A model with every linear layer quantized by one method.
struct QuantizedModel<M> {
    model: M,
    ebw: f64,
    worst_layer_error: f64,
    worst_layer: String,
    fallback_layers: usize,
}

/// Quantizes every linear layer of `base`, several layers at a time, advancing `bar` once
/// per layer.
fn quantize_model<M: LinearModel>(
    base: &M,
    quantizer: &LayerQuantizer,
    inputs: &CapturedInputs,
    bar: &ProgressBar,
) -> Result<QuantizedModel<M>, String> {
    let layers = base.layers();
    let results = parallel_map(&layers, |(name, _, _)| {
        let weight = base.weight(name);
        let quantized = quantizer.quantize(name, &weight)?;
        let error = inputs.relative_output_error(name, &weight, &quantized.dequant);
        bar.inc(1);
        Ok::<_, String>((quantized, error))
    });

    collect_quantized(base.clone(), &layers, results)
}

/// Puts every quantized layer into `model` and sums up the storage, the worst layer error and
/// the GPTQ fallbacks. `results` contains each layer's quantized weights and relative output
/// error, or the error that stopped its quantization, in the order of `layers`.
fn collect_quantized<M: LinearModel>(
    mut model: M,
    layers: &[(String, usize, usize)],
    results: Vec<Result<(QuantizedWeight, f64), String>>,
) -> Result<QuantizedModel<M>, String> {
    let mut storage_bits = 0u64;
    let mut weights = 0u64;
    let mut worst = (0.0f64, String::new());
    let mut fallback_layers = 0;
    for ((name, _, _), result) in layers.iter().zip(results) {
        let (quantized, error) = result?;
        model.set_weight(name, &quantized.dequant)?;
        storage_bits += quantized.storage_bits;
        weights += quantized.dequant.data.len() as u64;
        fallback_layers += usize::from(quantized.fell_back_to_rtn);
        if error > worst.0 || worst.1.is_empty() {
            worst = (error, name.clone());
        }
    }
    Ok(QuantizedModel {
        model,
        ebw: storage_bits as f64 / weights as f64,
        worst_layer_error: worst.0,
        worst_layer: worst.1,
        fallback_layers,
    })
}

/// Quantizes every linear layer of `base` with GPTQ under `config`, calibrating each group of
/// layers sequentially on `set` (see [`calibration::quantize_sequential`]). `bar` advances
/// once per layer.
fn quantize_model_sequential<M: LinearModel>(
    base: &M,
    config: &Resolved,
    set: &CalibrationSet,
    inputs: &CapturedInputs,
    bar: &ProgressBar,
) -> Result<QuantizedModel<M>, String> {
    let layers = base.layers();
    let mut model = base.clone();
    let mut results: HashMap<String, (QuantizedWeight, f64)> = HashMap::new();
    calibration::quantize_sequential(
        &mut model,
        set,
        &|_| true,
        &mut |name, weight, hessian| {
            let (layer, info) =
                gptq::quantize_gptq(weight, hessian, config, &GptqOptions::default()).map_err(|e| e.to_string())?;
            let quantized = packed_weight(weight, &layer, config, info.fell_back_to_rtn);
            let error = inputs.relative_output_error(name, weight, &quantized.dequant);
            let dequant = quantized.dequant.clone();
            results.insert(name.to_string(), (quantized, error));
            Ok(dequant)
        },
        bar,
    )?;
    let ordered = layers
        .iter()
        .map(|(name, _, _)| results.remove(name).ok_or_else(|| format!("sequential calibration skipped layer `{name}`")))
        .collect();
    collect_quantized(model, &layers, ordered)
}

/// Applies `f` to every item on all available threads and returns the results in item order.
pub(crate) fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len()).max(1);
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(index) else { break };
                        done.push((index, f(item)));
                    }
                    done
                })
            })
            .collect();
        for worker in workers {
            for (index, result) in worker.join().expect("evaluation worker panicked") {
                results[index] = Some(result);
            }
        }
    });
    results.into_iter().map(|r| r.expect("every item was mapped")).collect()
}

/// Mean and standard error of the mean (`None` for fewer than two values).
fn mean_and_se(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, None);
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some((variance / n).sqrt()))
}

/// Progress bar over the layers of every method that quantizes.
fn layer_bar(progress: &MultiProgress, model: EvalModel, jobs: usize, layers: usize) -> ProgressBar {
    let bar = progress.add(ProgressBar::new((jobs * layers) as u64));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} layers  [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(model.name());
    bar
}

/// Progress bar over windows or sentences, reset for every method.
pub(crate) fn sample_bar(progress: &MultiProgress, unit: &str, count: usize) -> ProgressBar {
    let bar = progress.add(ProgressBar::new(count as u64));
    bar.set_style(
        ProgressStyle::with_template(&format!("{{prefix:>9}} {unit:<7} [{{bar:30}}] {{pos}}/{{len}} {{msg}}"))
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Lists the (method, bits) pairs to run, with FP32 once at 32 bits and no pair twice.
fn jobs(options: &EvalOptions) -> Vec<(Method, u32)> {
    let mut jobs = Vec::new();
    if options.methods.contains(&Method::Fp32) {
        jobs.push((Method::Fp32, 32));
    }
    for &bits in &options.bits {
        for &method in options.methods.iter().filter(|&&m| m != Method::Fp32) {
            if !jobs.contains(&(method, bits)) {
                jobs.push((method, bits));
            }
        }
    }
    jobs
}

/// Layer Hessians of a model on its calibration text, and a description of that text.
/// Hessians by layer name, and a description of the calibration text.
pub type Calibration = (HashMap<String, Hessian>, String);

/// The metrics of one model for [`run_jobs`].
struct Scoring<F> {
    /// FP32's metric.
    reference: Metric,
    /// The metric of a method that does not apply.
    empty: Metric,
    /// Scores a quantized model. The label names the method for progress messages.
    score: F,
}

/// Runs every job on `base` and scores each quantized model. When a job needs calibration,
/// `calibrate` runs once before any job, or with `options.sequential` `samples` does, and
/// every GPTQ job calibrates sequentially on those samples.
#[allow(clippy::too_many_arguments)]
fn run_jobs<M: LinearModel, F: Fn(&M, &str) -> Metric>(
    model: EvalModel,
    base: &M,
    inputs: &CapturedInputs,
    options: &EvalOptions,
    progress: &MultiProgress,
    scoring: Scoring<F>,
    calibrate: impl FnOnce() -> Result<Calibration, String>,
    samples: impl FnOnce() -> Result<CalibrationSet, String>,
) -> Result<Vec<EvalRow>, String> {
    let Scoring { reference, empty, score } = scoring;
    let jobs = jobs(options);
    let needs_calibration = jobs.iter().any(|(method, _)| method.needs_calibration());
    let mut sequential_set = None;
    let calibration = if needs_calibration && options.sequential {
        // Each job calibrates on its own partly quantized model, so there are no shared
        // Hessians. The empty map only lets the GPTQ methods prepare their configuration.
        let set = samples()?;
        let text = format!("{}; sequential: each layer on the inputs of the quantized layers before it", set.text());
        sequential_set = Some(set);
        Some((Arc::new(HashMap::new()), text))
    } else if needs_calibration {
        let (hessians, text) = calibrate()?;
        Some((Arc::new(hessians), text))
    } else {
        None
    };
    let hessians = calibration.as_ref().map(|(hessians, _)| hessians);
    let prepared: Vec<(Method, u32, Result<LayerQuantizer, String>)> =
        jobs.iter().map(|&(method, bits)| (method, bits, method.prepare(&options.config, bits, hessians))).collect();
    let quantizing = prepared.iter().filter(|(m, _, q)| *m != Method::Fp32 && q.is_ok()).count();
    let bar = layer_bar(progress, model, quantizing, base.layers().len());

    let mut rows = Vec::new();
    for (method, bits, quantizer) in prepared {
        let row = match quantizer {
            _ if method == Method::Fp32 => EvalRow {
                model,
                method,
                bits,
                ebw: Some(32.0),
                metric: reference.clone(),
                worst_layer_error: Some(0.0),
                worst_layer: None,
                calibration: None,
                gptq_fallback_layers: None,
                note: None,
            },
            Err(reason) => EvalRow {
                model,
                method,
                bits,
                ebw: None,
                metric: empty.clone(),
                worst_layer_error: None,
                worst_layer: None,
                calibration: None,
                gptq_fallback_layers: None,
                note: Some(reason),
            },
            Ok(quantizer) => {
                let label = format!("{} W{bits}", method.name());
                bar.set_message(format!("quantizing {label}"));
                let quantized = match (&quantizer, &sequential_set) {
                    (LayerQuantizer::Gptq { config, .. }, Some(set)) => quantize_model_sequential(base, config, set, inputs, &bar)?,
                    _ => quantize_model(base, &quantizer, inputs, &bar)?,
                };
                let metric = score(&quantized.model, &label);
                EvalRow {
                    model,
                    method,
                    bits,
                    ebw: Some(quantized.ebw),
                    metric,
                    worst_layer_error: Some(quantized.worst_layer_error),
                    worst_layer: Some(quantized.worst_layer),
                    calibration: calibration
                        .as_ref()
                        .filter(|_| method.needs_calibration())
                        .map(|(_, text)| text.clone()),
                    gptq_fallback_layers: method.needs_calibration().then_some(quantized.fallback_layers),
                    note: None,
                }
            }
        };
        rows.push(row);
    }
    bar.finish_and_clear();
    Ok(rows)
}

pub(crate) fn shakespeare_path(file: &str) -> PathBuf {
    weights::models_dir().join("shakespeare").join(file)
}

/// Returns an error naming the fix when one of `paths` is missing.
pub(crate) fn require_files(paths: &[PathBuf]) -> Result<(), String> {
    match paths.iter().find(|path| !path.is_file()) {
        None => Ok(()),
        Some(path) => Err(format!(
            "{} not found: run `make fetch-models` to download the models and texts, or set \
             MICROSCOPIQ_MODELS to the folder that contains them",
            path.display()
        )),
    }
}

/// The glassllm evaluation windows.
pub(crate) struct Windows {
    /// Token ids of each text part.
    parts: Vec<Vec<u32>>,
    /// (part, window inside the part), in evaluation order.
    windows: Vec<(usize, usize)>,
    pub(crate) description: String,
}

impl Windows {
    /// Tokenizes [`GLASSLLM_TEXTS`] and keeps the first `limit` windows (all when `None`).
    pub(crate) fn load(model: &GlassLlm, tokenizer: &BpeTokenizer, limit: Option<usize>) -> Result<Windows, String> {
        let mut parts = Vec::new();
        let mut windows = Vec::new();
        let mut descriptions = Vec::new();
        for (index, part) in GLASSLLM_TEXTS.iter().enumerate() {
            let path = shakespeare_path(part.file);
            let text = bpe::read_text_slice(&path, part.chars.clone()).map_err(|e| e.to_string())?;
            let tokens = tokenizer.encode(&text).map_err(|e| e.to_string())?;
            let available = model.window_count(tokens.len());
            let count = part.max_windows.map_or(available, |max| max.min(available));
            windows.extend((0..count).map(|window| (index, window)));
            parts.push(tokens);
            descriptions.push((part.clone(), count));
        }
        let total = windows.len();
        if let Some(limit) = limit {
            if limit == 0 || limit > total {
                return Err(format!(
                    "invalid --windows {limit}: the glassllm evaluation text has {total} windows; \
                     choose 1 to {total}"
                ));
            }
            windows.truncate(limit);
        }

        // Describe only the windows kept.
        let mut remaining = windows.len();
        let mut used = Vec::new();
        for (part, count) in descriptions {
            let kept_windows = count.min(remaining);
            remaining -= kept_windows;
            if kept_windows > 0 {
                let end = if part.chars.end == usize::MAX { String::new() } else { part.chars.end.to_string() };
                used.push(format!("{} chars {}..{end} ({kept_windows} windows)", part.file, part.chars.start));
            }
        }
        Ok(Windows { parts, windows, description: used.join(" + ") })
    }

    /// Returns the mean cross-entropy of each window, in nats per token.
    pub(crate) fn losses(&self, model: &GlassLlm, bar: &ProgressBar) -> Vec<f64> {
        bar.reset();
        bar.set_length(self.windows.len() as u64);
        parallel_map(&self.windows, |&(part, window)| {
            let (loss, _) = model.cross_entropy(&self.parts[part], window..window + 1);
            bar.inc(1);
            loss
        })
    }
}

/// Builds the perplexity metric of `losses`, paired with FP32's `reference` losses.
pub(crate) fn perplexity_metric(losses: &[f64], reference: &[f64], text: &str) -> Metric {
    let (mean, se) = mean_and_se(losses);
    let differences: Vec<f64> = losses.iter().zip(reference).map(|(l, r)| l - r).collect();
    let (delta, delta_se) = mean_and_se(&differences);
    Metric::Perplexity {
        perplexity: Some(mean.exp()),
        perplexity_se: se.map(|se| mean.exp() * se),
        cross_entropy: Some(mean),
        cross_entropy_se: se,
        delta_cross_entropy: Some(delta),
        delta_cross_entropy_se: delta_se,
        windows: losses.len(),
        text: text.to_string(),
    }
}

fn evaluate_glassllm(options: &EvalOptions, progress: &MultiProgress) -> Result<Vec<EvalRow>, String> {
    let dir = weights::models_dir().join("glassllm");
    let mut files = vec![dir.join("en.npz"), dir.join("en.tokenizer.json")];
    files.extend(GLASSLLM_TEXTS.iter().map(|part| shakespeare_path(part.file)));
    require_files(&files)?;
    let model = GlassLlm::load(&files[0]).map_err(|e| e.to_string())?;
    let tokenizer = BpeTokenizer::load(&files[1]).map_err(|e| e.to_string())?;
    let windows = Windows::load(&model, &tokenizer, options.windows)?;

    let bar = sample_bar(progress, "windows", windows.windows.len());
    bar.set_prefix(EvalModel::GlassLlm.name());
    bar.set_message("FP32");
    let reference = windows.losses(&model, &bar);
    let captured = windows.windows.len().min(CAPTURE_WINDOWS);
    let inputs = CapturedInputs::capture(&model, |record| {
        for &(part, window) in &windows.windows[..captured] {
            let start = window * model.config.max_len;
            model.forward(&windows.parts[part][start..start + model.config.max_len], Some(&mut *record));
        }
    });

    let text = &windows.description;
    let empty = Metric::Perplexity {
        perplexity: None,
        perplexity_se: None,
        cross_entropy: None,
        cross_entropy_se: None,
        delta_cross_entropy: None,
        delta_cross_entropy_se: None,
        windows: 0,
        text: text.clone(),
    };
    let rows = run_jobs(
        EvalModel::GlassLlm,
        &model,
        &inputs,
        options,
        progress,
        Scoring {
            reference: perplexity_metric(&reference, &reference, text),
            empty,
            score: |quantized: &GlassLlm, label: &str| {
                bar.set_message(label.to_string());
                perplexity_metric(&windows.losses(quantized, &bar), &reference, text)
            },
        },
        || {
            bar.set_message("calibrating GPTQ");
            calibrate_glassllm(&model, &tokenizer)
        },
        || calibration::glassllm_calibration(&model, &tokenizer),
    );
    bar.finish_and_clear();
    rows
}

/// Reads the MiniLM evaluation sentences: the first `count` whole lines of [`MINILM_TEXT`]
/// after character [`MINILM_TEXT_OFFSET`] that have a word count in [`SENTENCE_WORDS`],
/// trimmed. The line that the offset cuts is skipped.
pub fn minilm_sentences(count: usize) -> Result<Vec<String>, String> {
    let path = shakespeare_path(MINILM_TEXT);
    let lines = sentence_lines(&path, MINILM_TEXT_OFFSET..usize::MAX)?;
    if count == 0 || count > lines.len() {
        return Err(format!(
            "invalid --sentences {count}: {} has {} lines of {} to {} words after character \
             {MINILM_TEXT_OFFSET}; choose 1 to {}",
            path.display(),
            lines.len(),
            SENTENCE_WORDS.start(),
            SENTENCE_WORDS.end(),
            lines.len()
        ));
    }
    Ok(lines.into_iter().take(count).collect())
}

/// Returns the trimmed lines of `chars` in the text file `path` that have a word count in
/// [`SENTENCE_WORDS`], without the first line, which the range may cut.
fn sentence_lines(path: &Path, chars: Range<usize>) -> Result<Vec<String>, String> {
    require_files(&[path.to_path_buf()])?;
    let text = bpe::read_text_slice(path, chars).map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|line| SENTENCE_WORDS.contains(&line.split_whitespace().count()))
        .map(str::to_string)
        .collect())
}

/// Describes the calibration text: each slice of [`hessian::CALIBRATION_TEXT`] and the
/// number of samples (`unit`) taken in all.
pub(crate) fn calibration_description(samples: usize, unit: &str) -> String {
    let slices: Vec<String> = hessian::CALIBRATION_TEXT
        .iter()
        .map(|slice| format!("{}.txt chars {}..{}", slice.play, slice.chars.start, slice.chars.end))
        .collect();
    format!("{} ({samples} {unit} in turn)", slices.join(" + "))
}

/// Returns an error when a slice of [`hessian::CALIBRATION_TEXT`] is evaluation text.
pub(crate) fn check_calibration_slices() -> Result<(), String> {
    for slice in &hessian::CALIBRATION_TEXT {
        check_calibration_text(&format!("{}.txt", slice.play))?;
    }
    Ok(())
}

/// Converts accumulated layer inputs to Hessians by layer name.
fn layer_hessians(accumulated: &LayerHessians) -> Result<HashMap<String, Hessian>, String> {
    accumulated
        .layers()
        .iter()
        .map(|layer| Ok((layer.layer().to_string(), layer.hessian().map_err(|e| e.to_string())?)))
        .collect()
}

/// Accumulates glassllm's layer Hessians on [`CALIBRATION_WINDOWS`] windows of the
/// calibration text.
pub(crate) fn calibrate_glassllm(model: &GlassLlm, tokenizer: &BpeTokenizer) -> Result<Calibration, String> {
    check_calibration_slices()?;
    let dir = weights::models_dir().join("shakespeare");
    let windows = hessian::calibration_windows(&dir, tokenizer, model.config.max_len, CALIBRATION_WINDOWS)
        .map_err(|e| e.to_string())?;
    let accumulated = hessian::capture_glassllm(model, "glassllm", &windows).map_err(|e| e.to_string())?;
    let text = calibration_description(windows.len(), "windows of 128 tokens");
    Ok((layer_hessians(&accumulated)?, text))
}

/// Reads and tokenizes MiniLM's [`CALIBRATION_SENTENCES`] calibration lines, taken from
/// the plays of [`hessian::CALIBRATION_TEXT`] in turn.
pub fn minilm_calibration_sentences(tokenizer: &WordPiece) -> Result<Vec<Vec<u32>>, String> {
    check_calibration_slices()?;
    let mut plays = Vec::new();
    for slice in &hessian::CALIBRATION_TEXT {
        plays.push(sentence_lines(&shakespeare_path(&format!("{}.txt", slice.play)), slice.chars.clone())?);
    }
    let mut sentences = Vec::with_capacity(CALIBRATION_SENTENCES);
    for index in 0..CALIBRATION_SENTENCES {
        let lines = &plays[index % plays.len()];
        let line = lines.get(index / plays.len()).ok_or_else(|| {
            format!("the MiniLM calibration text has too few lines for {CALIBRATION_SENTENCES} sentences")
        })?;
        sentences.push(tokenizer.encode(line));
    }
    Ok(sentences)
}

/// Accumulates MiniLM's layer Hessians on [`CALIBRATION_SENTENCES`] lines of the
/// calibration text, taken from its plays in turn.
pub fn calibrate_minilm(model: &MiniLm, tokenizer: &WordPiece) -> Result<Calibration, String> {
    let sentences = minilm_calibration_sentences(tokenizer)?;
    let mut accumulated = LayerHessians::new("minilm");
    for (sample, ids) in sentences.iter().enumerate() {
        let mut failure = None;
        model.embed(
            ids,
            Some(&mut |layer: &str, inputs: &[f32], width: usize| {
                if failure.is_none() {
                    failure = accumulated.add(layer, sample, inputs, width).err();
                }
            }),
        );
        if let Some(error) = failure {
            return Err(error.to_string());
        }
    }
    let unit = format!("lines of {} to {} words", SENTENCE_WORDS.start(), SENTENCE_WORDS.end());
    let text = calibration_description(sentences.len(), &unit);
    Ok((layer_hessians(&accumulated)?, text))
}

/// Embeds every sentence with `model`.
pub(crate) fn embed_all(model: &MiniLm, sentences: &[Vec<u32>], bar: &ProgressBar) -> Vec<Vec<f32>> {
    bar.reset();
    bar.set_length(sentences.len() as u64);
    parallel_map(sentences, |ids| {
        let embedding = model.embed(ids, None);
        bar.inc(1);
        embedding
    })
}

/// Builds the cosine metric of `embeddings` against FP32's `reference`.
pub(crate) fn cosine_metric(embeddings: &[Vec<f32>], reference: &[Vec<f32>], text: &str) -> Metric {
    let cosines: Vec<f64> = embeddings.iter().zip(reference).map(|(a, b)| cosine(a, b)).collect();
    let (mean, se) = mean_and_se(&cosines);
    Metric::Cosine { cosine: Some(mean), cosine_se: se, sentences: cosines.len(), text: text.to_string() }
}

/// Returns the cosine similarity in f64, or 0 when either vector is zero.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm_a = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let norm_b = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm_a == 0.0 || norm_b == 0.0 {
        0.0
    } else {
        dot / (norm_a * norm_b)
    }
}

fn evaluate_minilm(options: &EvalOptions, progress: &MultiProgress) -> Result<Vec<EvalRow>, String> {
    let dir = weights::models_dir().join("all-MiniLM-L6-v2");
    require_files(&["config.json", "model.safetensors", "tokenizer.json"].map(|file| dir.join(file)))?;
    let sentences = minilm_sentences(options.sentences)?;
    let model = MiniLm::load(&dir).map_err(|e| e.to_string())?;
    let tokenizer = WordPiece::load(&dir).map_err(|e| e.to_string())?;
    let ids: Vec<Vec<u32>> = sentences.iter().map(|s| tokenizer.encode(s)).collect();
    let text = format!(
        "{} chars {}.. ({} lines of {} to {} words)",
        MINILM_TEXT,
        MINILM_TEXT_OFFSET,
        ids.len(),
        SENTENCE_WORDS.start(),
        SENTENCE_WORDS.end()
    );

    let bar = sample_bar(progress, "sentences", ids.len());
    bar.set_prefix(EvalModel::MiniLm.name());
    bar.set_message("FP32");
    let reference = embed_all(&model, &ids, &bar);
    let inputs = CapturedInputs::capture(&model, |record| {
        for sentence in ids.iter().take(CAPTURE_SENTENCES) {
            model.embed(sentence, Some(&mut *record));
        }
    });

    let empty = Metric::Cosine { cosine: None, cosine_se: None, sentences: 0, text: text.clone() };
    let rows = run_jobs(
        EvalModel::MiniLm,
        &model,
        &inputs,
        options,
        progress,
        Scoring {
            reference: cosine_metric(&reference, &reference, &text),
            empty,
            score: |quantized: &MiniLm, label: &str| {
                bar.set_message(label.to_string());
                cosine_metric(&embed_all(quantized, &ids, &bar), &reference, &text)
            },
        },
        || {
            bar.set_message("calibrating GPTQ");
            calibrate_minilm(&model, &tokenizer)
        },
        || calibration::minilm_calibration(&tokenizer),
    );
    bar.finish_and_clear();
    rows
}

/// Formats an optional number with `decimals` places, or an empty string for `None`.
fn number(value: Option<f64>, decimals: usize) -> String {
    value.map_or(String::new(), |v| format!("{v:.decimals$}"))
}

/// Formats `value ± se`, or only the value without a standard error.
fn with_se(value: Option<f64>, se: Option<f64>, decimals: usize) -> String {
    match (value, se) {
        (Some(v), Some(se)) => format!("{v:.decimals$} ± {se:.decimals$}"),
        (Some(v), None) => format!("{v:.decimals$}"),
        _ => String::new(),
    }
}

/// Formats the rows as an aligned text table, followed by the text each model's metric uses.
pub fn format_table(rows: &[EvalRow]) -> String {
    let header = ["model", "method", "bits", "EBW", "accuracy", "vs FP32", "worst layer error"];
    let mut cells: Vec<[String; 7]> = Vec::new();
    for row in rows {
        let (accuracy, versus) = match &row.metric {
            Metric::Perplexity { perplexity, perplexity_se, delta_cross_entropy, delta_cross_entropy_se, .. } => (
                format!("ppl {}", with_se(*perplexity, *perplexity_se, 2)),
                match delta_cross_entropy {
                    Some(d) if row.method != Method::Fp32 => {
                        let se = delta_cross_entropy_se.map_or(String::new(), |se| format!(" ± {se:.4}"));
                        format!("{d:+.4}{se} nats")
                    }
                    _ => String::new(),
                },
            ),
            Metric::Cosine { cosine, cosine_se, .. } => (format!("cos {}", with_se(*cosine, *cosine_se, 5)), String::new()),
        };
        let (accuracy, worst) = match (&row.note, &row.worst_layer) {
            (Some(_), _) => ("not applicable".to_string(), String::new()),
            (None, Some(layer)) => (accuracy, format!("{} ({layer})", number(row.worst_layer_error, 4))),
            (None, None) => (accuracy, number(row.worst_layer_error, 4)),
        };
        cells.push([
            row.model.name().to_string(),
            row.method.name().to_string(),
            row.bits.to_string(),
            number(row.ebw, 3),
            accuracy,
            versus,
            worst,
        ]);
    }

    let mut widths = header.map(|h| h.chars().count());
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_line = |line: &[String]| {
        let mut text = String::from(" ");
        for (index, (cell, width)) in line.iter().zip(widths).enumerate() {
            let pad = width - cell.chars().count();
            // Numbers are right-aligned, text left-aligned.
            if matches!(index, 2 | 3) {
                text.push_str(&format!(" {}{cell}", " ".repeat(pad)));
            } else {
                text.push_str(&format!(" {cell}{}", " ".repeat(pad)));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    push_line(&header.map(String::from));
    for line in &cells {
        push_line(line);
    }

    for row in rows {
        let label = format!("{} {} W{}", row.model.name(), row.method.name(), row.bits);
        if let Some(note) = &row.note {
            let _ = writeln!(out, "  {label}: {note}");
        }
        if let Some(layers @ 1..) = row.gptq_fallback_layers {
            let _ = writeln!(out, "  {label}: {layers} layers fell back to round to nearest");
        }
    }
    let mut described: Vec<(EvalModel, &str)> = Vec::new();
    for row in rows {
        let text = match &row.metric {
            Metric::Perplexity { text, .. } | Metric::Cosine { text, .. } => text.as_str(),
        };
        if row.note.is_none() && !described.iter().any(|(m, _)| *m == row.model) {
            described.push((row.model, text));
        }
    }
    for (model, text) in described {
        let metric_description = match model {
            EvalModel::GlassLlm => "perplexity on",
            EvalModel::MiniLm => "cosine to FP32 embeddings of",
        };
        let _ = writeln!(out, "  {}: {metric_description} {text}", model.name());
        let calibration = rows.iter().find_map(|row| row.calibration.as_ref().filter(|_| row.model == model));
        if let Some(calibration) = calibration {
            let _ = writeln!(out, "  {} GPTQ calibration: {calibration}", model.name());
        }
    }
    out
}

/// Column names of [`to_csv`].
pub const CSV_COLUMNS: [&str; 20] = [
    "model",
    "method",
    "bits",
    "ebw",
    "perplexity",
    "perplexity_se",
    "cross_entropy",
    "cross_entropy_se",
    "delta_cross_entropy",
    "delta_cross_entropy_se",
    "windows",
    "cosine",
    "cosine_se",
    "sentences",
    "worst_layer_error",
    "worst_layer",
    "text",
    "calibration",
    "gptq_fallback_layers",
    "note",
];

/// Quotes a CSV field when it contains a comma, a quote or a line break (RFC 4180).
pub(crate) fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_string()
    }
}

/// Formats the rows as CSV with a header line. Fields that do not apply are empty.
pub fn to_csv(rows: &[EvalRow]) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for row in rows {
        let full = |value: Option<f64>| value.map_or(String::new(), |v| v.to_string());
        let mut fields = vec![
            row.model.name().to_string(),
            row.method.name().to_string(),
            row.bits.to_string(),
            full(row.ebw),
        ];
        match &row.metric {
            Metric::Perplexity {
                perplexity,
                perplexity_se,
                cross_entropy,
                cross_entropy_se,
                delta_cross_entropy,
                delta_cross_entropy_se,
                windows,
                text,
            } => {
                fields.extend([*perplexity, *perplexity_se, *cross_entropy, *cross_entropy_se].map(full));
                fields.extend([*delta_cross_entropy, *delta_cross_entropy_se].map(full));
                fields.extend([windows.to_string(), String::new(), String::new(), String::new()]);
                fields.extend([full(row.worst_layer_error), row.worst_layer.clone().unwrap_or_default(), text.clone()]);
            }
            Metric::Cosine { cosine, cosine_se, sentences, text } => {
                fields.extend((0..7).map(|_| String::new()));
                fields.extend([full(*cosine), full(*cosine_se), sentences.to_string()]);
                fields.extend([full(row.worst_layer_error), row.worst_layer.clone().unwrap_or_default(), text.clone()]);
            }
        }
        fields.push(row.calibration.clone().unwrap_or_default());
        fields.push(row.gptq_fallback_layers.map_or(String::new(), |n| n.to_string()));
        fields.push(row.note.clone().unwrap_or_default());
        debug_assert_eq!(fields.len(), CSV_COLUMNS.len());
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// Formats the rows as JSON lines, one object per row.
pub fn to_json_lines(rows: &[EvalRow]) -> String {
    rows.iter()
        .map(|row| serde_json::to_string(row).expect("rows serialize") + "\n")
        .collect()
}

/// Point colors, by the method's position in [`Method::ALL`].
const PLOT_COLORS: [plotters::style::RGBColor; 6] = [
    plotters::style::RGBColor(0, 0, 0),
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
    plotters::style::RGBColor(148, 103, 189),
    plotters::style::RGBColor(255, 127, 14),
];

/// Height of a point label in pixels, and the estimated width of one of its characters.
const LABEL_HEIGHT: i32 = 13;
const LABEL_CHAR_WIDTH: i32 = 7;

/// One model's points: FP32's score and (EBW, score, row) of every quantized row.
type Panel<'a> = (EvalModel, Option<f64>, Vec<(f64, f64, &'a EvalRow)>);

/// Draws an SVG plot with one panel per model: glassllm perplexity and MiniLM cosine
/// similarity against the EBW, one labelled point per quantized row with results. FP32 is a
/// dashed horizontal line, because its EBW of 32 would squeeze every other point together.
pub fn plot_svg(rows: &[EvalRow]) -> Result<String, String> {
    use plotters::prelude::*;

    let mut panels: Vec<Panel> = Vec::new();
    for row in rows {
        let value = match row.metric {
            Metric::Perplexity { perplexity, .. } => perplexity,
            Metric::Cosine { cosine, .. } => cosine,
        };
        let (Some(ebw), Some(value)) = (row.ebw, value) else { continue };
        let index = match panels.iter().position(|(model, _, _)| *model == row.model) {
            Some(index) => index,
            None => {
                panels.push((row.model, None, Vec::new()));
                panels.len() - 1
            }
        };
        if row.method == Method::Fp32 {
            panels[index].1 = Some(value);
        } else {
            panels[index].2.push((ebw, value, row));
        }
    }
    if panels.is_empty() {
        return Err("nothing to plot: no row has both an EBW and a score".to_string());
    }

    let failed = |e: &dyn std::fmt::Display| format!("drawing the plot failed: {e}");
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640 * panels.len() as u32, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(&e))?;
        let areas = root.split_evenly((1, panels.len()));
        for (area, (model, fp32, points)) in areas.iter().zip(&panels) {
            let (caption, y_label) = match model {
                EvalModel::GlassLlm => ("glassllm: perplexity vs EBW", "perplexity (lower is better)"),
                EvalModel::MiniLm => ("MiniLM: embedding cosine vs EBW", "cosine to FP32 (higher is better)"),
            };
            let values = points.iter().map(|p| p.1).chain(*fp32);
            let (low, high) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
            let margin = ((high - low) * 0.08).max(high.abs() * 1e-4).max(1e-9);
            let ebws = points.iter().map(|p| p.0);
            let (left, right) = ebws.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), e| (lo.min(e), hi.max(e)));
            // The right margin leaves room for the labels of the rightmost points.
            let (left, right) = if left.is_finite() { (left - 0.25, right + 1.3) } else { (2.0, 5.0) };

            let mut chart = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(left..right, (low - margin)..(high + margin))
                .map_err(|e| failed(&e))?;
            chart
                .configure_mesh()
                .light_line_style(TRANSPARENT)
                .x_desc("EBW (bits per weight)")
                .y_desc(y_label)
                .draw()
                .map_err(|e| failed(&e))?;

            // Labels go right of their points and move down until they overlap no other
            // label, with a leader line when moved. Each placed label is (x, y, width).
            let mut placed: Vec<(i32, i32, i32)> = Vec::new();
            if let Some(fp32) = *fp32 {
                let line = DashedLineSeries::new([(left, fp32), (right, fp32)], 6, 4, BLACK.stroke_width(1));
                chart.draw_series(line).map_err(|e| failed(&e))?;
                let label = "FP32 (EBW 32)";
                let (x, y) = chart.backend_coord(&(left, fp32));
                let (x, y) = (x + 4, y - LABEL_HEIGHT - 1);
                placed.push((x, y, LABEL_CHAR_WIDTH * label.len() as i32));
                root.draw(&Text::new(label, (x, y), ("sans-serif", 12))).map_err(|e| failed(&e))?;
            }

            let mut order: Vec<usize> = (0..points.len()).collect();
            order.sort_by_key(|&i| chart.backend_coord(&(points[i].0, points[i].1)).1);
            for index in order {
                let (ebw, value, row) = points[index];
                let position = Method::ALL.iter().position(|m| *m == row.method).unwrap_or(0);
                let color = PLOT_COLORS[position % PLOT_COLORS.len()];
                let point = chart.backend_coord(&(ebw, value));
                chart
                    .draw_series(std::iter::once(Circle::new((ebw, value), 4, color.filled())))
                    .map_err(|e| failed(&e))?;

                let label = format!("{} W{}", row.method.short_name(), row.bits);
                let width = LABEL_CHAR_WIDTH * label.chars().count() as i32;
                let x = point.0 + 7;
                let mut y = point.1 - LABEL_HEIGHT / 2;
                let overlaps = |y: i32, placed: &[(i32, i32, i32)]| {
                    placed.iter().any(|&(px, py, pw)| x < px + pw && px < x + width && (y - py).abs() < LABEL_HEIGHT)
                };
                while overlaps(y, &placed) {
                    y += 2;
                }
                placed.push((x, y, width));
                if y - (point.1 - LABEL_HEIGHT / 2) > LABEL_HEIGHT / 2 {
                    let leader = PathElement::new(vec![(point.0 + 3, point.1 + 2), (x - 1, y + LABEL_HEIGHT / 2)], color.mix(0.6));
                    root.draw(&leader).map_err(|e| failed(&e))?;
                }
                let text = Text::new(label, (x, y), ("sans-serif", 12).into_font().color(&color));
                root.draw(&text).map_err(|e| failed(&e))?;
            }
        }
        root.present().map_err(|e| failed(&e))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded_matrix(rows: usize, cols: usize) -> Matrix {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let data = (0..rows * cols)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        Matrix::new("seeded", rows, cols, data)
    }

    #[test]
    fn mxfp4_ebw_counts_scale_per_block() {
        let full = quantize_mxfp4(&seeded_matrix(8, 64));
        assert_eq!(full.storage_bits as f64 / (8.0 * 64.0), 4.25);

        // 40 input channels need two blocks, the second padded from 8 to 32 elements.
        let ragged = quantize_mxfp4(&seeded_matrix(8, 40));
        assert_eq!(ragged.storage_bits, 8 * 2 * (32 * 4 + 8));
    }

    #[test]
    fn mxfp4_blocks_follow_input_channels() {
        let mut weight = seeded_matrix(2, 64);
        // A large value in block 0 of row 0 coarsens only that block's scale.
        weight.data[3] = 50.0;
        let quantized = quantize_mxfp4(&weight).dequant;
        let base = quantize_mxfp4(&seeded_matrix(2, 64)).dequant;
        assert_eq!(quantized.data[3], 48.0, "50 rounds to 6 * 2^3");
        assert_eq!(quantized.data[32..64], base.data[32..64], "row 0, block 1");
        assert_eq!(quantized.data[64..], base.data[64..], "row 1");
        assert_ne!(quantized.data[..3], base.data[..3], "row 0, block 0");
    }

    #[test]
    fn rtn_config_has_no_pairs() {
        let r = image_config(&Config::default_config(), 2, Some(0)).expect("b = 2 resolves");
        assert_eq!(r.max_pairs, 0);
        let r = image_config(&Config::default_config(), 4, None).expect("b = 4 resolves");
        assert_eq!((r.b, r.max_pairs, r.rows, r.cols), (4, 4, 16, 16));
    }

    #[test]
    fn mxfp4_rejects_two_bits() {
        let reason = Method::Mxfp4.prepare(&Config::default_config(), 2, None).expect_err("MXFP4 is 4-bit only");
        assert!(reason.starts_with("not applicable"), "{reason}");
    }

    #[test]
    fn gptq_needs_hessians() {
        let reason = Method::GptqMxInt.prepare(&Config::default_config(), 2, None).expect_err("no Hessians");
        assert!(reason.contains("needs layer Hessians"), "{reason}");
        let hessians: Hessians = Arc::new(HashMap::new());
        let quantizer = Method::MicroScopiqGptq.prepare(&Config::default_config(), 4, Some(&hessians)).expect("b = 4 resolves");
        let error = quantizer.quantize("layer", &seeded_matrix(16, 16)).expect_err("no Hessian for the layer");
        assert!(error.contains("no calibration Hessian for layer `layer`"), "{error}");
    }

    #[test]
    fn calibration_rejects_evaluation_plays() {
        assert!(check_calibration_text("hamlet_gut.txt").is_err());
        assert!(check_calibration_text("othello_gut_f.txt").is_err());
        assert!(check_calibration_text("julius_caesar_gut.txt").is_err());
        assert!(check_calibration_text("lear_gut.txt").is_ok());
        assert!(check_calibration_text("macbeth_gut.txt").is_ok());
    }

    #[test]
    fn standard_error_of_mean() {
        let (mean, se) = mean_and_se(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(mean, 2.5);
        let expected = (5.0f64 / 3.0 / 4.0).sqrt();
        assert!((se.expect("4 values") - expected).abs() < 1e-15);
        assert_eq!(mean_and_se(&[7.0]), (7.0, None));
    }

    #[test]
    fn output_error_matches_definition() {
        let weight = Matrix::new("w", 2, 3, vec![1.0, 0.0, 2.0, 0.0, 1.0, 0.0]);
        let quantized = Matrix::new("q", 2, 3, vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        let mut layers = HashMap::new();
        let mut inputs = LayerInputs { rows: vec![1.0, 1.0, 1.0], width: 3, reference_norm: 0.0 };
        inputs.reference_norm = output_norm(&inputs, &weight.data, 2);
        layers.insert("w".to_string(), inputs);
        let captured = CapturedInputs(layers);
        // X W^T = [3, 1] and X Q^T = [2, 1], so the error is 1 / sqrt(10).
        let error = captured.relative_output_error("w", &weight, &quantized);
        assert!((error - 1.0 / 10f64.sqrt()).abs() < 1e-7, "{error}");
    }

    #[test]
    fn csv_quotes_commas() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn jobs_run_fp32_once() {
        let options = EvalOptions::default();
        let jobs = jobs(&options);
        assert_eq!(jobs[0], (Method::Fp32, 32));
        assert_eq!(jobs.iter().filter(|(m, _)| *m == Method::Fp32).count(), 1);
        assert_eq!(jobs.len(), 1 + 2 * 5);

        let repeated = EvalOptions { methods: vec![Method::Fp32, Method::Fp32, Method::Mxfp4], bits: vec![4, 4], ..options };
        assert_eq!(super::jobs(&repeated), [(Method::Fp32, 32), (Method::Mxfp4, 4)]);
    }
}
