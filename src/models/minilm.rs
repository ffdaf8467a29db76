//! Reference forward pass of sentence-transformers all-MiniLM-L6-v2 in `f32`, in pure Rust.
//!
//! The model is a 6-layer BERT encoder (hidden size 384, 12 heads, FFN 1536). A sentence
//! embedding is the mean of the last layer's token outputs, L2-normalised, as the
//! sentence-transformers pipeline of this model computes it. [`MiniLm::embed`] can report the
//! input of each of the 36 linear layers, which is what quantizer calibration needs.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::weights::{self, Layout, Matrix, WeightError};

/// Name of the weight file in a model directory.
const WEIGHTS_FILE: &str = "model.safetensors";

/// Name of the Hugging Face configuration file in a model directory.
const CONFIG_FILE: &str = "config.json";

/// Smallest norm that L2 normalisation divides by, as in PyTorch's `F.normalize`.
const NORMALIZE_EPS: f64 = 1e-12;

/// Callback of [`MiniLm::embed`] that receives each linear layer's weight name, input rows
/// (`[tokens, in_features]` row-major) and `in_features`.
pub type Capture<'a> = &'a mut dyn FnMut(&str, &[f32], usize);

/// Error from loading or changing the MiniLM model or its tokenizer.
#[derive(Debug)]
#[non_exhaustive]
pub enum ModelError {
    /// Loading a weight matrix failed. The inner error names the file and the tensor.
    Weights(WeightError),
    /// Reading a model file failed.
    Read { path: PathBuf, source: io::Error },
    /// A model file is malformed or describes a model that this code does not support.
    InvalidFile { path: PathBuf, reason: String },
    /// A tensor is missing, has an unexpected shape or dtype, or contains a non-finite value.
    InvalidTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    /// [`MiniLm::set_linear_weight`] was given a name that is not one of the linear layers.
    UnknownLayer { name: String },
    /// [`MiniLm::set_linear_weight`] was given a matrix of the wrong shape.
    WeightShape {
        name: String,
        expected: [usize; 2],
        found: [usize; 2],
    },
    /// [`MiniLm::set_linear_weight`] was given a matrix with a NaN or infinite value.
    NonFiniteWeight {
        name: String,
        row: usize,
        col: usize,
        value: f32,
    },
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Weights(error) => error.fmt(f),
            ModelError::Read { path, source } if source.kind() == io::ErrorKind::NotFound => {
                write!(
                    f,
                    "model file {} not found (run `make fetch-models` to download the models, \
                     or set MICROSCOPIQ_MODELS to the directory that contains them)",
                    path.display()
                )
            }
            ModelError::Read { path, source } => {
                write!(f, "failed to read model file {}: {source}", path.display())
            }
            ModelError::InvalidFile { path, reason } => write!(
                f,
                "model file {} is invalid: {reason}. If `make fetch-models` downloaded it, run \
                 `python3 scripts/fetch_models.py --force` to download it again",
                path.display()
            ),
            ModelError::InvalidTensor {
                path,
                tensor,
                reason,
            } => write!(
                f,
                "tensor `{tensor}` in {} is invalid: {reason}. Check that the file contains \
                 all-MiniLM-L6-v2 or another BERT model that matches its config.json",
                path.display()
            ),
            ModelError::UnknownLayer { name } => write!(
                f,
                "`{name}` is not a linear layer of the model. Use a name that \
                 `MiniLm::linear_layers` returns, such as \
                 `encoder.layer.0.attention.self.query.weight`"
            ),
            ModelError::WeightShape {
                name,
                expected,
                found,
            } => write!(
                f,
                "weight for `{name}` has shape {} x {}, but the layer needs {} x {} \
                 ([out, in])",
                found[0], found[1], expected[0], expected[1]
            ),
            ModelError::NonFiniteWeight {
                name,
                row,
                col,
                value,
            } => write!(
                f,
                "weight for `{name}` contains the non-finite value {value} at [{row}, {col}]. \
                 Replace it with a finite value"
            ),
        }
    }
}

impl std::error::Error for ModelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ModelError::Weights(error) => Some(error),
            ModelError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<WeightError> for ModelError {
    fn from(error: WeightError) -> ModelError {
        ModelError::Weights(error)
    }
}

/// The fields of a BERT `config.json` that the forward pass uses.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct MiniLmConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub type_vocab_size: usize,
    /// Activation of the intermediate layer. Only `"gelu"` (the exact erf form) is supported.
    pub hidden_act: String,
    /// Only `"absolute"` is supported. Older configs omit the field.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn absolute() -> String {
    "absolute".to_string()
}

impl MiniLmConfig {
    /// Reads and checks `config.json`.
    fn load(path: &Path) -> Result<MiniLmConfig, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| ModelError::InvalidFile {
            path: path.to_path_buf(),
            reason,
        };
        let config: MiniLmConfig = serde_json::from_str(&text)
            .map_err(|error| invalid(format!("it is not a BERT config: {error}")))?;

        if config.hidden_act != "gelu" {
            return Err(invalid(format!(
                "hidden_act is {:?}, but only \"gelu\" is supported",
                config.hidden_act
            )));
        }
        if config.position_embedding_type != "absolute" {
            return Err(invalid(format!(
                "position_embedding_type is {:?}, but only \"absolute\" is supported",
                config.position_embedding_type
            )));
        }
        let sizes = [
            ("hidden_size", config.hidden_size),
            ("num_hidden_layers", config.num_hidden_layers),
            ("num_attention_heads", config.num_attention_heads),
            ("intermediate_size", config.intermediate_size),
            ("max_position_embeddings", config.max_position_embeddings),
            ("vocab_size", config.vocab_size),
            ("type_vocab_size", config.type_vocab_size),
        ];
        if let Some((field, _)) = sizes.iter().find(|(_, size)| *size == 0) {
            return Err(invalid(format!("{field} is 0")));
        }
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        if !(config.layer_norm_eps.is_finite() && config.layer_norm_eps > 0.0) {
            return Err(invalid(format!(
                "layer_norm_eps is {}, but it must be positive",
                config.layer_norm_eps
            )));
        }
        Ok(config)
    }

    /// Number of features in each attention head.
    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// A linear layer `y = x Wᵀ + b`.
///
/// The weight is stored transposed, `[in, out]` row-major, because `matrixmultiply` packs
/// it 2 to 3 times faster in that layout than in the file's `[out, in]` (measured for
/// 16 tokens on a 2-core AMD EPYC).
#[derive(Clone, Debug)]
struct Linear {
    /// Safetensors name of the weight, such as `encoder.layer.0.attention.self.query.weight`.
    name: String,
    outputs: usize,
    inputs: usize,
    /// `Wᵀ`, where `weight_transposed[i * outputs + o]` is `W[o, i]`.
    weight_transposed: Vec<f32>,
    bias: Vec<f32>,
}

impl Linear {
    fn new(weight: &Matrix, bias: Vec<f32>) -> Linear {
        Linear {
            name: weight.name.clone(),
            outputs: weight.rows,
            inputs: weight.cols,
            weight_transposed: transpose(&weight.data, weight.rows, weight.cols),
            bias,
        }
    }

    /// Returns the weight in the `[out, in]` layout of the file.
    fn weight(&self) -> Matrix {
        let data = transpose(&self.weight_transposed, self.inputs, self.outputs);
        Matrix::new(self.name.clone(), self.outputs, self.inputs, data)
    }
}

/// Returns the transpose of the row-major `rows` x `cols` matrix `data`.
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut transposed = vec![0.0f32; data.len()];
    for (row, values) in data.chunks_exact(cols).enumerate() {
        for (col, &value) in values.iter().enumerate() {
            transposed[col * rows + row] = value;
        }
    }
    transposed
}

/// LayerNorm scale and shift.
#[derive(Clone, Debug)]
struct LayerNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// One BERT encoder layer.
#[derive(Clone, Debug)]
struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl EncoderLayer {
    /// Returns the six linear layers in execution order.
    fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_output,
            &mut self.intermediate,
            &mut self.output,
        ]
    }
}

/// Suffixes of the six linear layers of encoder layer `i`, after `encoder.layer.{i}.`, in
/// execution order.
const LINEAR_SUFFIXES: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// The all-MiniLM-L6-v2 sentence encoder (or another BERT encoder of the same structure) with
/// `f32` weights.
#[derive(Clone, Debug)]
pub struct MiniLm {
    config: MiniLmConfig,
    word_embeddings: Matrix,
    position_embeddings: Matrix,
    token_type_embeddings: Matrix,
    embedding_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
}

impl MiniLm {
    /// Loads `config.json` and `model.safetensors` from `model_dir`.
    ///
    /// Tensor names have no `bert.` prefix, as in the sentence-transformers export. F16 and
    /// BF16 tensors are widened to `f32`. Returns an error naming the file and the tensor when
    /// a file or tensor is missing, a shape does not match the config, or a value is NaN or
    /// infinite.
    pub fn load(model_dir: &Path) -> Result<MiniLm, ModelError> {
        let config = MiniLmConfig::load(&model_dir.join(CONFIG_FILE))?;
        let path = model_dir.join(WEIGHTS_FILE);
        let loader = Loader::open(&path, &config)?;
        let hidden = config.hidden_size;

        let embedding_norm = loader.layer_norm("embeddings.LayerNorm")?;
        let word_embeddings = loader.matrix(
            "embeddings.word_embeddings.weight",
            [config.vocab_size, hidden],
        )?;
        let position_embeddings = loader.matrix(
            "embeddings.position_embeddings.weight",
            [config.max_position_embeddings, hidden],
        )?;
        let token_type_embeddings = loader.matrix(
            "embeddings.token_type_embeddings.weight",
            [config.type_vocab_size, hidden],
        )?;

        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for index in 0..config.num_hidden_layers {
            let prefix = format!("encoder.layer.{index}");
            let intermediate = config.intermediate_size;
            layers.push(EncoderLayer {
                query: loader
                    .linear(&format!("{prefix}.attention.self.query"), [hidden, hidden])?,
                key: loader.linear(&format!("{prefix}.attention.self.key"), [hidden, hidden])?,
                value: loader
                    .linear(&format!("{prefix}.attention.self.value"), [hidden, hidden])?,
                attention_output: loader.linear(
                    &format!("{prefix}.attention.output.dense"),
                    [hidden, hidden],
                )?,
                attention_norm: loader
                    .layer_norm(&format!("{prefix}.attention.output.LayerNorm"))?,
                intermediate: loader.linear(
                    &format!("{prefix}.intermediate.dense"),
                    [intermediate, hidden],
                )?,
                output: loader.linear(&format!("{prefix}.output.dense"), [hidden, intermediate])?,
                output_norm: loader.layer_norm(&format!("{prefix}.output.LayerNorm"))?,
            });
        }

        Ok(MiniLm {
            config,
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embedding_norm,
            layers,
        })
    }

    /// Returns the model configuration read from `config.json`.
    pub fn config(&self) -> &MiniLmConfig {
        &self.config
    }

    /// Names of the encoder's linear layers in execution order, with `[out, in]`.
    ///
    /// The names are the safetensors weight names, such as
    /// `encoder.layer.0.attention.self.query.weight`. all-MiniLM-L6-v2 has 36 of them: six
    /// per layer (query, key, value, attention output, intermediate and output).
    pub fn linear_layers(&self) -> Vec<(String, usize, usize)> {
        self.layers
            .iter()
            .flat_map(|layer| layer.linears())
            .map(|linear| (linear.name.clone(), linear.outputs, linear.inputs))
            .collect()
    }

    /// Returns a copy of the `[out, in]` weight of the linear layer `name`, or `None` if no
    /// linear layer has that name.
    pub fn linear_weight(&self, name: &str) -> Option<Matrix> {
        self.find_linear(name).map(Linear::weight)
    }

    /// Replaces the weight of the linear layer `name` with the values of `weight`, such as a
    /// dequantized copy. The bias stays.
    ///
    /// The layer keeps its own name, whatever `weight.name` is. Returns an error, and changes
    /// nothing, if no layer has that name, the shape is not the layer's `[out, in]`, or a value
    /// is NaN or infinite.
    pub fn set_linear_weight(&mut self, name: &str, weight: &Matrix) -> Result<(), ModelError> {
        let linear = self
            .layers
            .iter_mut()
            .flat_map(|layer| layer.linears_mut())
            .find(|linear| linear.name == name)
            .ok_or_else(|| ModelError::UnknownLayer {
                name: name.to_string(),
            })?;

        let expected = [linear.outputs, linear.inputs];
        let found = [weight.rows, weight.cols];
        if expected != found || weight.data.len() != weight.rows * weight.cols {
            return Err(ModelError::WeightShape {
                name: name.to_string(),
                expected,
                found,
            });
        }
        if let Some(index) = weight.data.iter().position(|value| !value.is_finite()) {
            return Err(ModelError::NonFiniteWeight {
                name: name.to_string(),
                row: index / weight.cols,
                col: index % weight.cols,
                value: weight.data[index],
            });
        }

        linear.weight_transposed = transpose(&weight.data, weight.rows, weight.cols);
        Ok(())
    }

    /// Computes the mean-pooled, L2-normalised sentence embedding of `ids`.
    ///
    /// `ids` are the tokenizer's output with `[CLS]` and `[SEP]` and without padding. Every
    /// id is treated as a real token, so pooling and attention use an all-ones mask. When
    /// `capture` is given, it receives the input of each linear layer in execution order as
    /// `(weight name, rows, in_features)`, where `rows` is `[tokens, in_features]` row-major.
    /// Query, key and value receive the same input. Token type ids are all 0.
    ///
    /// # Panics
    ///
    /// Panics if `ids` is empty, longer than `max_position_embeddings` (512), or contains an
    /// id that is not below `vocab_size`.
    pub fn embed(&self, ids: &[u32], capture: Option<Capture<'_>>) -> Vec<f32> {
        let hidden_states = self.token_embeddings(ids, capture);
        mean_pool_normalized(&hidden_states, ids.len(), self.config.hidden_size)
    }

    /// Computes the last encoder layer's output for each token, `[tokens, hidden_size]`
    /// row-major, before pooling.
    ///
    /// Inputs, `capture` and panics are as for [`MiniLm::embed`].
    pub fn token_embeddings(&self, ids: &[u32], mut capture: Option<Capture<'_>>) -> Vec<f32> {
        let mut hidden_states = self.embeddings(ids);
        for layer in &self.layers {
            hidden_states = self.encoder_layer(layer, &hidden_states, ids.len(), &mut capture);
        }
        hidden_states
    }

    /// Returns the number of encoder layers.
    pub fn encoder_layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Computes the embedding layer's output for `ids`: the `[tokens, hidden_size]` input of
    /// encoder layer 0. Inputs and panics are as for [`MiniLm::embed`].
    pub fn embedding_output(&self, ids: &[u32]) -> Vec<f32> {
        self.embeddings(ids)
    }

    /// Runs encoder layer `index` on `input`, `[tokens, hidden_size]` row-major, and returns
    /// its output. `capture` receives the inputs of the layer's linear layers, as in
    /// [`MiniLm::embed`], which chains [`MiniLm::embedding_output`] and every encoder layer.
    ///
    /// # Panics
    ///
    /// Panics if `index` is not an encoder layer or `input` is not whole rows.
    pub fn run_encoder_layer(&self, index: usize, input: &[f32], capture: Option<Capture<'_>>) -> Vec<f32> {
        let hidden = self.config.hidden_size;
        assert!(
            input.len().is_multiple_of(hidden),
            "MiniLM encoder layer {index}: {} values are not whole rows of {hidden}",
            input.len()
        );
        let mut capture = capture;
        self.encoder_layer(&self.layers[index], input, input.len() / hidden, &mut capture)
    }

    fn find_linear(&self, name: &str) -> Option<&Linear> {
        self.layers
            .iter()
            .flat_map(|layer| layer.linears())
            .find(|linear| linear.name == name)
    }

    /// Sums the word, position and token type 0 embeddings and applies LayerNorm.
    fn embeddings(&self, ids: &[u32]) -> Vec<f32> {
        let hidden = self.config.hidden_size;
        assert!(!ids.is_empty(), "MiniLm needs at least one token id");
        assert!(
            ids.len() <= self.config.max_position_embeddings,
            "{} token ids exceed the model's maximum of {}. Truncate the input, as `WordPiece::encode` does",
            ids.len(),
            self.config.max_position_embeddings
        );

        let token_type = &self.token_type_embeddings.data[..hidden];
        let mut states = Vec::with_capacity(ids.len() * hidden);
        for (position, &id) in ids.iter().enumerate() {
            let id = id as usize;
            assert!(
                id < self.config.vocab_size,
                "token id {id} at position {position} is not below the vocabulary size {}",
                self.config.vocab_size
            );
            let word = &self.word_embeddings.data[id * hidden..(id + 1) * hidden];
            let position_row =
                &self.position_embeddings.data[position * hidden..(position + 1) * hidden];
            for i in 0..hidden {
                states.push(word[i] + token_type[i] + position_row[i]);
            }
        }
        self.layer_norm(&mut states, &self.embedding_norm);
        states
    }

    /// Runs one encoder layer on `input`, `[tokens, hidden_size]` row-major.
    fn encoder_layer(
        &self,
        layer: &EncoderLayer,
        input: &[f32],
        tokens: usize,
        capture: &mut Option<Capture<'_>>,
    ) -> Vec<f32> {
        let query = apply_linear(&layer.query, input, tokens, capture);
        let key = apply_linear(&layer.key, input, tokens, capture);
        let value = apply_linear(&layer.value, input, tokens, capture);
        let context = self.self_attention(&query, &key, &value, tokens);

        let mut attention = apply_linear(&layer.attention_output, &context, tokens, capture);
        add_in_place(&mut attention, input);
        self.layer_norm(&mut attention, &layer.attention_norm);

        let mut intermediate = apply_linear(&layer.intermediate, &attention, tokens, capture);
        for value in &mut intermediate {
            *value = gelu(*value);
        }

        let mut output = apply_linear(&layer.output, &intermediate, tokens, capture);
        add_in_place(&mut output, &attention);
        self.layer_norm(&mut output, &layer.output_norm);
        output
    }

    /// Computes scaled dot-product attention for every head and concatenates the heads.
    ///
    /// All tokens attend to all tokens, because the input has no padding.
    fn self_attention(&self, query: &[f32], key: &[f32], value: &[f32], tokens: usize) -> Vec<f32> {
        let hidden = self.config.hidden_size;
        let head_size = self.config.head_size();
        let scale = 1.0 / (head_size as f32).sqrt();
        let mut context = vec![0.0f32; tokens * hidden];
        let mut scores = vec![0.0f32; tokens];

        for head in 0..self.config.num_attention_heads {
            let columns = head * head_size..(head + 1) * head_size;
            for i in 0..tokens {
                let q = &query[i * hidden..][columns.clone()];
                for (j, score) in scores.iter_mut().enumerate() {
                    let k = &key[j * hidden..][columns.clone()];
                    *score = dot(q, k) * scale;
                }
                softmax_in_place(&mut scores);

                let out = &mut context[i * hidden..][columns.clone()];
                for (j, &weight) in scores.iter().enumerate() {
                    let v = &value[j * hidden..][columns.clone()];
                    for (o, &x) in out.iter_mut().zip(v) {
                        *o += weight * x;
                    }
                }
            }
        }
        context
    }

    /// Normalises each row of `states` to zero mean and unit variance, then scales and shifts.
    fn layer_norm(&self, states: &mut [f32], norm: &LayerNorm) {
        let hidden = self.config.hidden_size;
        let eps = self.config.layer_norm_eps;
        for row in states.chunks_exact_mut(hidden) {
            let mean = row.iter().map(|&x| f64::from(x)).sum::<f64>() / hidden as f64;
            let variance = row
                .iter()
                .map(|&x| (f64::from(x) - mean).powi(2))
                .sum::<f64>()
                / hidden as f64;
            let inverse_std = 1.0 / (variance + eps).sqrt();
            for ((x, &gamma), &beta) in row.iter_mut().zip(&norm.gamma).zip(&norm.beta) {
                let normalized = ((f64::from(*x) - mean) * inverse_std) as f32;
                *x = normalized * gamma + beta;
            }
        }
    }
}

/// Reports the input of `linear` to `capture`, then applies the layer.
fn apply_linear(
    linear: &Linear,
    input: &[f32],
    tokens: usize,
    capture: &mut Option<Capture<'_>>,
) -> Vec<f32> {
    if let Some(capture) = capture {
        capture(&linear.name, input, linear.inputs);
    }
    linear_forward(input, tokens, linear)
}

/// Averages the token rows of `states` and scales the mean to unit L2 norm.
fn mean_pool_normalized(states: &[f32], tokens: usize, hidden: usize) -> Vec<f32> {
    let mut sum = vec![0.0f64; hidden];
    for row in states.chunks_exact(hidden) {
        for (total, &x) in sum.iter_mut().zip(row) {
            *total += f64::from(x);
        }
    }
    let mean: Vec<f64> = sum.iter().map(|total| total / tokens as f64).collect();
    let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
    let divisor = norm.max(NORMALIZE_EPS);
    mean.iter().map(|x| (x / divisor) as f32).collect()
}

fn add_in_place(values: &mut [f32], addend: &[f32]) {
    for (value, &x) in values.iter_mut().zip(addend) {
        *value += x;
    }
}

/// Replaces `scores` with their softmax, subtracting the maximum first so `exp` cannot
/// overflow.
fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for score in scores.iter_mut() {
        *score = (*score - max).exp();
        sum += *score;
    }
    for score in scores.iter_mut() {
        *score /= sum;
    }
}

/// Number of independent partial sums in [`dot`].
const DOT_LANES: usize = 8;

/// Dot product of two equally long slices, with `DOT_LANES` partial sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0.0f32; DOT_LANES];
    let mut a_chunks = a.chunks_exact(DOT_LANES);
    let mut b_chunks = b.chunks_exact(DOT_LANES);
    for (x, y) in a_chunks.by_ref().zip(b_chunks.by_ref()) {
        for lane in 0..DOT_LANES {
            partial[lane] += x[lane] * y[lane];
        }
    }
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    partial.iter().sum::<f32>() + tail
}

/// Computes `input · Wᵀ + b` for `tokens` rows of `input`, returning `[tokens, outputs]`
/// row-major.
///
/// The output columns are split among the available cores when the product is large enough
/// to pay for starting threads. Every output element is computed the same way whatever the
/// split, so the result does not depend on the number of cores.
fn linear_forward(input: &[f32], tokens: usize, linear: &Linear) -> Vec<f32> {
    let threads = thread_count(tokens * linear.outputs * linear.inputs);
    linear_forward_threads(input, tokens, linear, threads)
}

/// Computes [`linear_forward`] with the outputs split into `threads` column ranges, each
/// computed on its own thread.
fn linear_forward_threads(
    input: &[f32],
    tokens: usize,
    linear: &Linear,
    threads: usize,
) -> Vec<f32> {
    let outputs = linear.outputs;
    let threads = threads.min(outputs);
    if threads <= 1 {
        let mut result = vec![0.0f32; tokens * outputs];
        matmul_block(input, tokens, linear, 0..outputs, &mut result);
        return result;
    }

    let chunk = outputs.div_ceil(threads);
    let ranges: Vec<Range<usize>> = (0..outputs)
        .step_by(chunk)
        .map(|start| start..(start + chunk).min(outputs))
        .collect();
    let blocks: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranges
            .iter()
            .map(|range| {
                let range = range.clone();
                scope.spawn(move || {
                    let mut block = vec![0.0f32; tokens * range.len()];
                    matmul_block(input, tokens, linear, range, &mut block);
                    block
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("matmul worker thread panicked"))
            .collect()
    });

    let mut result = vec![0.0f32; tokens * outputs];
    for (range, block) in ranges.iter().zip(&blocks) {
        for (token, block_row) in block.chunks_exact(range.len()).enumerate() {
            result[token * outputs..][range.clone()].copy_from_slice(block_row);
        }
    }
    result
}

/// Minimum multiply-adds per thread before [`linear_forward`] starts another thread.
///
/// Starting a thread costs tens of microseconds, while 2^22 multiply-adds take about 0.1 ms
/// on one AVX core, so smaller products stay on the calling thread. On a 2-core AMD EPYC,
/// splitting made 64 short sentences about 30% faster (an estimate from a loaded machine).
const MIN_WORK_PER_THREAD: usize = 1 << 22;

/// Returns how many threads a product of `work` multiply-adds should use.
fn thread_count(work: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    cores.min(work / MIN_WORK_PER_THREAD).max(1)
}

/// Computes the output columns `range` of `input · Wᵀ + b` into `block`, which is
/// `[tokens, range.len()]` row-major.
///
/// The product is `matrixmultiply::sgemm`, which picks AVX, FMA or AVX-512 kernels at run
/// time.
fn matmul_block(
    input: &[f32],
    tokens: usize,
    linear: &Linear,
    range: Range<usize>,
    block: &mut [f32],
) {
    let (outputs, inputs) = (linear.outputs, linear.inputs);
    let width = range.len();
    assert!(
        range.end <= outputs,
        "output range {range:?} exceeds {outputs} outputs"
    );
    assert_eq!(
        input.len(),
        tokens * inputs,
        "input is not {tokens} x {inputs}"
    );
    assert_eq!(
        block.len(),
        tokens * width,
        "block is not {tokens} x {width}"
    );
    if tokens == 0 || width == 0 || inputs == 0 {
        return;
    }

    for row in block.chunks_exact_mut(width) {
        row.copy_from_slice(&linear.bias[range.clone()]);
    }
    // Wᵀ restricted to the columns `range`: inputs x width with row stride `outputs`.
    let weights = &linear.weight_transposed[range.start..];
    // SAFETY: the asserts above bound every access. A is `input` as tokens x inputs with row
    // stride `inputs`. B is `weights` as inputs x width with row stride `outputs`, so its last
    // element is at `range.start + (inputs - 1) * outputs + width - 1`, which is below
    // `inputs * outputs` because `range.end <= outputs`. C is `block` as tokens x width with
    // row stride `width`. With beta = 1, C keeps the bias and adds the product.
    unsafe {
        matrixmultiply::sgemm(
            tokens,
            inputs,
            width,
            1.0,
            input.as_ptr(),
            inputs as isize,
            1,
            weights.as_ptr(),
            outputs as isize,
            1,
            1.0,
            block.as_mut_ptr(),
            width as isize,
            1,
        );
    }
}

/// GELU in its exact form `x/2 · (1 + erf(x/√2))`, as BERT's `hidden_act = "gelu"` defines it.
pub fn gelu(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// Above this |x|, erf(x) rounds to ±1 in `f64`, because erfc(6) is about 2e-17.
const ERF_SATURATION: f64 = 6.0;

/// Width of the intervals of the erf lookup table.
const ERF_TABLE_STEP: f64 = 1.0 / 16.0;

/// Number of table intervals, which together cover [0, `ERF_SATURATION`).
const ERF_TABLE_INTERVALS: usize = 96;

/// Degree of the Taylor polynomial of erf about each interval's center.
///
/// The remainder of degree 8 at distance 1/32 from the center is below 1e-15, using
/// Cramér's bound `|Hₙ(x)| e^(-x²/2) ≤ 1.09 √(2ⁿ n!)` on the Hermite polynomials in the
/// derivatives of erf.
const ERF_TAYLOR_DEGREE: usize = 8;

/// Computes the error function erf(x) in `f64`.
///
/// The absolute error is about 1e-15 (the tests compare against reference values and against
/// `erf_reference` on a dense grid). Each call evaluates a degree-8 Taylor polynomial about
/// the center of one of 96 intervals of [0, 6). This made GELU about twice as fast as
/// summing the series that `erf_reference` uses.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let magnitude = x.abs();
    if magnitude >= ERF_SATURATION {
        return 1.0f64.copysign(x);
    }

    // The cast truncates toward zero, so this is the index of the interval that contains x.
    let index = ((magnitude / ERF_TABLE_STEP) as usize).min(ERF_TABLE_INTERVALS - 1);
    let offset = magnitude - interval_center(index);
    let coefficients = &erf_table()[index];
    let result = coefficients
        .iter()
        .rev()
        .fold(0.0, |sum, &coefficient| sum * offset + coefficient);
    result.copysign(x)
}

fn interval_center(index: usize) -> f64 {
    (index as f64 + 0.5) * ERF_TABLE_STEP
}

/// Returns the Taylor coefficients of erf about each interval center, lowest power first.
///
/// The n-th derivative of erf for n ≥ 1 is `2/√π · (-1)^(n-1) · H_(n-1)(x) · e^(-x²)`, where
/// Hₙ are the physicists' Hermite polynomials.
fn erf_table() -> &'static [[f64; ERF_TAYLOR_DEGREE + 1]] {
    static TABLE: OnceLock<Vec<[f64; ERF_TAYLOR_DEGREE + 1]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..ERF_TABLE_INTERVALS)
            .map(|index| {
                let center = interval_center(index);
                let hermite = hermite_polynomials(center);
                let derivative_scale = std::f64::consts::FRAC_2_SQRT_PI * (-center * center).exp();
                let mut coefficients = [0.0; ERF_TAYLOR_DEGREE + 1];
                coefficients[0] = erf_reference(center);
                let mut factorial = 1.0;
                for power in 1..=ERF_TAYLOR_DEGREE {
                    factorial *= power as f64;
                    let sign = if power % 2 == 1 { 1.0 } else { -1.0 };
                    coefficients[power] = sign * derivative_scale * hermite[power - 1] / factorial;
                }
                coefficients
            })
            .collect()
    })
}

/// Returns H₀(x) to H₇(x) by the recurrence `Hₙ₊₁ = 2x Hₙ - 2n Hₙ₋₁`.
fn hermite_polynomials(x: f64) -> [f64; ERF_TAYLOR_DEGREE] {
    let mut hermite = [0.0; ERF_TAYLOR_DEGREE];
    hermite[0] = 1.0;
    hermite[1] = 2.0 * x;
    for n in 1..ERF_TAYLOR_DEGREE - 1 {
        hermite[n + 1] = 2.0 * x * hermite[n] - 2.0 * n as f64 * hermite[n - 1];
    }
    hermite
}

/// Below this |x|, [`erf_reference`] sums the power series. Above it, it evaluates the
/// continued fraction of erfc.
const ERF_SERIES_LIMIT: f64 = 2.5;

/// Maximum number of power series terms. At |x| = 2.5 the series converges in about 60.
const ERF_SERIES_TERMS: usize = 120;

/// Number of terms of the erfc continued fraction. At |x| = 2.5 the truncation error is below
/// the `f64` rounding error.
const ERFC_FRACTION_TERMS: usize = 80;

/// Computes erf(x) accurately but slowly, to build the table of [`erf`].
///
/// For |x| < 2.5 this sums the series `erf(x) = 2/√π · e^(-x²) · Σ 2ⁿ x^(2n+1) /
/// (1·3·…·(2n+1))`, whose terms are all positive, so no cancellation occurs. Above that it
/// evaluates the continued fraction `erfc(x) = e^(-x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/
/// (x + …))))` from its tail.
fn erf_reference(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let magnitude = x.abs();
    let result = if magnitude >= ERF_SATURATION {
        1.0
    } else if magnitude < ERF_SERIES_LIMIT {
        erf_series(magnitude)
    } else {
        1.0 - erfc_continued_fraction(magnitude)
    };
    result.copysign(x)
}

fn erf_series(x: f64) -> f64 {
    let two_x_squared = 2.0 * x * x;
    let mut term = x;
    let mut sum = x;
    for n in 1..ERF_SERIES_TERMS {
        term *= two_x_squared / (2 * n + 1) as f64;
        sum += term;
        if term < sum * f64::EPSILON * 0.25 {
            break;
        }
    }
    std::f64::consts::FRAC_2_SQRT_PI * (-x * x).exp() * sum
}

/// Evaluates erfc(x) for x ≥ 2.5 by its continued fraction.
fn erfc_continued_fraction(x: f64) -> f64 {
    let mut denominator = x;
    for k in (1..=ERFC_FRACTION_TERMS).rev() {
        denominator = x + (k as f64 / 2.0) / denominator;
    }
    (-x * x).exp() / (std::f64::consts::PI.sqrt() * denominator)
}

/// Reads the tensors of one safetensors file and checks their shapes against the config.
struct Loader<'a> {
    path: &'a Path,
    /// The whole file, for the 1-D tensors that `weights::load_matrix` does not read.
    bytes: Vec<u8>,
    config: &'a MiniLmConfig,
}

impl<'a> Loader<'a> {
    fn open(path: &'a Path, config: &'a MiniLmConfig) -> Result<Loader<'a>, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // Parse once here so that a malformed file fails with one clear message.
        SafeTensors::deserialize(&bytes).map_err(|error| ModelError::InvalidFile {
            path: path.to_path_buf(),
            reason: format!("it is not a valid safetensors file: {error}"),
        })?;
        Ok(Loader {
            path,
            bytes,
            config,
        })
    }

    fn invalid_tensor(&self, tensor: &str, reason: String) -> ModelError {
        ModelError::InvalidTensor {
            path: self.path.to_path_buf(),
            tensor: tensor.to_string(),
            reason,
        }
    }

    /// Loads a 2-D tensor and checks that its stored shape is `shape`.
    fn matrix(&self, name: &str, shape: [usize; 2]) -> Result<Matrix, ModelError> {
        let matrix = weights::load_matrix(self.path, name, Layout::OutIn)?;
        if [matrix.rows, matrix.cols] != shape {
            return Err(self.invalid_tensor(
                name,
                format!(
                    "its shape is [{}, {}], but config.json implies {shape:?}",
                    matrix.rows, matrix.cols
                ),
            ));
        }
        Ok(matrix)
    }

    /// Loads `{prefix}.weight` of shape `[out, in]` and `{prefix}.bias` of length `out`.
    fn linear(&self, prefix: &str, shape: [usize; 2]) -> Result<Linear, ModelError> {
        let weight = self.matrix(&format!("{prefix}.weight"), shape)?;
        let bias = self.vector(&format!("{prefix}.bias"), shape[0])?;
        Ok(Linear::new(&weight, bias))
    }

    fn layer_norm(&self, prefix: &str) -> Result<LayerNorm, ModelError> {
        let hidden = self.config.hidden_size;
        Ok(LayerNorm {
            gamma: self.vector(&format!("{prefix}.weight"), hidden)?,
            beta: self.vector(&format!("{prefix}.bias"), hidden)?,
        })
    }

    /// Loads a 1-D F32, F16 or BF16 tensor of length `length` as `f32`.
    fn vector(&self, name: &str, length: usize) -> Result<Vec<f32>, ModelError> {
        let tensors = SafeTensors::deserialize(&self.bytes)
            .expect("the file was parsed successfully when it was opened");
        let view = tensors
            .tensor(name)
            .map_err(|_| self.invalid_tensor(name, "it is missing from the file".to_string()))?;
        if view.shape() != [length] {
            return Err(self.invalid_tensor(
                name,
                format!(
                    "its shape is {:?}, but config.json implies [{length}]",
                    view.shape()
                ),
            ));
        }

        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(self.invalid_tensor(
                    name,
                    format!("its dtype is {other}, but only F32, F16 and BF16 are supported"),
                ))
            }
        };
        if let Some(index) = values.iter().position(|value| !value.is_finite()) {
            return Err(self.invalid_tensor(
                name,
                format!(
                    "it contains the non-finite value {} at [{index}]",
                    values[index]
                ),
            ));
        }
        Ok(values)
    }
}

/// Returns the weight names of the linear layers of an encoder with `layers` layers, in
/// execution order.
pub fn linear_layer_names(layers: usize) -> Vec<String> {
    (0..layers)
        .flat_map(|layer| {
            LINEAR_SUFFIXES
                .iter()
                .map(move |suffix| format!("encoder.layer.{layer}.{suffix}.weight"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf values from `math.erf` of CPython 3.11.
    const ERF_TABLE: [(f64, f64); 9] = [
        (0.0, 0.0),
        (0.1, 0.112_462_916_018_284_9),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (1.5, 0.966_105_146_475_310_8),
        (2.0, 0.995_322_265_018_952_7),
        (2.5, 0.999_593_047_982_555),
        (3.0, 0.999_977_909_503_001_4),
        (4.0, 0.999_999_984_582_742_1),
    ];

    #[test]
    fn erf_matches_table() {
        for (x, expected) in ERF_TABLE {
            for (name, function) in [
                ("erf", erf as fn(f64) -> f64),
                ("erf_reference", erf_reference),
            ] {
                let actual = function(x);
                assert!(
                    (actual - expected).abs() < 1e-15,
                    "{name}({x}) = {actual}, expected {expected}"
                );
                assert_eq!(function(-x), -actual, "{name} is not odd at {x}");
            }
        }
    }

    #[test]
    fn erf_matches_reference_on_grid() {
        let mut max_error = 0.0f64;
        for step in -70_000..=70_000 {
            let x = f64::from(step) * 1e-4;
            max_error = max_error.max((erf(x) - erf_reference(x)).abs());
        }

        assert!(max_error < 2e-15, "max error {max_error}");
    }

    #[test]
    fn erf_reference_continuous_at_method_switch() {
        let below = erf_reference(ERF_SERIES_LIMIT - 1e-12);
        let above = erf_reference(ERF_SERIES_LIMIT);

        assert!((above - below).abs() < 1e-14, "{below} vs {above}");
    }

    #[test]
    fn erf_saturates_and_propagates_nan() {
        assert_eq!(erf(ERF_SATURATION), 1.0);
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert!(erf(f64::NAN).is_nan());
        assert!(1.0 - erf(5.999) < 1e-15);
    }

    #[test]
    fn gelu_known_values() {
        // gelu(1) = 0.5 · (1 + erf(1/√2)) = 0.5 · (1 + 0.6826894921370859).
        assert!((f64::from(gelu(1.0)) - 0.841_344_746_068_543).abs() < 1e-7);
        assert!((f64::from(gelu(-1.0)) + 0.158_655_253_931_457).abs() < 1e-7);
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(10.0), 10.0);
        assert!(gelu(-10.0).abs() < 1e-20);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut scores = [1000.0, 1001.0, 999.0];

        softmax_in_place(&mut scores);

        assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(scores[1] > scores[0]);
        assert!(scores[0] > scores[2]);
    }

    #[test]
    fn linear_forward_matches_naive_product() {
        // Odd sizes exercise the edge tiles of the matrix product.
        for (tokens, outputs, inputs) in
            [(1, 1, 1), (5, 3, 11), (9, 7, 40), (4, 2, 8), (17, 33, 70)]
        {
            let input: Vec<f32> = (0..tokens * inputs)
                .map(|i| (i as f32 * 0.37).sin())
                .collect();
            let data: Vec<f32> = (0..outputs * inputs)
                .map(|i| (i as f32 * 0.11).cos())
                .collect();
            let bias: Vec<f32> = (0..outputs).map(|o| o as f32 * 0.5).collect();
            let weight = Matrix::new("w", outputs, inputs, data);
            let linear = Linear::new(&weight, bias.clone());

            let result = linear_forward(&input, tokens, &linear);

            for t in 0..tokens {
                for o in 0..outputs {
                    let expected: f64 = bias[o] as f64
                        + (0..inputs)
                            .map(|i| input[t * inputs + i] as f64 * weight.get(o, i) as f64)
                            .sum::<f64>();
                    let actual = result[t * outputs + o] as f64;
                    assert!(
                        (actual - expected).abs() < 1e-4,
                        "[{t}, {o}] of {tokens}x{outputs}x{inputs}: {actual} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn linear_forward_same_for_any_thread_count() {
        let (tokens, outputs, inputs) = (13, 301, 384);
        let input: Vec<f32> = (0..tokens * inputs)
            .map(|i| (i as f32 * 0.013).sin())
            .collect();
        let data: Vec<f32> = (0..outputs * inputs)
            .map(|i| (i as f32 * 0.007).cos())
            .collect();
        let bias = vec![0.25; outputs];
        let weight = Matrix::new("w", outputs, inputs, data);
        let linear = Linear::new(&weight, bias);

        let single = linear_forward_threads(&input, tokens, &linear, 1);

        for threads in [2, 3, 7] {
            let result = linear_forward_threads(&input, tokens, &linear, threads);
            assert_eq!(result, single, "{threads} threads");
        }
    }

    #[test]
    fn linear_weight_round_trips_through_transpose() {
        let weight = Matrix::new("w", 2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);

        let linear = Linear::new(&weight, vec![0.0; 2]);

        assert_eq!(linear.weight_transposed, vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        assert_eq!(linear.weight(), weight);
    }

    #[test]
    fn mean_pool_normalized_has_unit_norm() {
        let states = [3.0, 0.0, 3.0, 8.0];

        let pooled = mean_pool_normalized(&states, 2, 2);

        assert!((pooled[0] - 0.6).abs() < 1e-7);
        assert!((pooled[1] - 0.8).abs() < 1e-7);
    }

    #[test]
    fn linear_layer_names_in_execution_order() {
        let names = linear_layer_names(2);

        assert_eq!(names.len(), 12);
        assert_eq!(names[0], "encoder.layer.0.attention.self.query.weight");
        assert_eq!(names[5], "encoder.layer.0.output.dense.weight");
        assert_eq!(names[9], "encoder.layer.1.attention.output.dense.weight");
    }

    #[test]
    fn load_reports_missing_config() {
        let dir = tempfile::tempdir().unwrap();

        let message = MiniLm::load(dir.path()).unwrap_err().to_string();

        assert!(message.contains("config.json"), "{message}");
        assert!(message.contains("make fetch-models"), "{message}");
    }

    #[test]
    fn config_rejects_other_activation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        let json = r#"{"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "layer_norm_eps": 1e-12, "max_position_embeddings": 4,
            "vocab_size": 10, "type_vocab_size": 2, "hidden_act": "relu"}"#;
        std::fs::write(&path, json).unwrap();

        let message = MiniLmConfig::load(&path).unwrap_err().to_string();

        assert!(message.contains("hidden_act is \"relu\""), "{message}");
    }
}
