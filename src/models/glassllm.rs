//! Reference forward pass of glassllm, a small LLaMA-style decoder, in plain `f32`.
//!
//! The model uses token embeddings tied to the output head, pre-norm blocks with RMSNorm,
//! grouped-query causal attention with rotary position embeddings (RoPE), a SwiGLU
//! feed-forward network, and no biases. Per block, with `h` the normalised input:
//!
//! ```text
//! x += W_O · attention(RoPE(h W_Q), RoPE(h W_K), h W_V)      h = RMSNorm(x, norm1)
//! x += (silu(h W1) * (h W3)) W2                              h = RMSNorm(x, norm2)
//! logits = RMSNorm(x, norm_f) Eᵀ
//! ```
//!
//! The npz file stores each weight as `[in, out]` (for `x @ W`) in fp16, and the loader
//! widens it exactly to `f32`. Query head `h` reads key/value head `h / (n_heads /
//! n_kv_heads)`. RoPE rotates the interleaved pairs `(2i, 2i + 1)` of each head by
//! `position * rope_base^(-2i / head_dim)`, with positions counted from 0 in each window.
//! All arithmetic is `f32` except the cross-entropy, which sums log-probabilities in `f64`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::models::npz::{NpyArray, Npz, NpzError, Values};
use crate::models::tensor::{dot, matmul, rms_norm, softmax_in_place, transpose};
use crate::weights::Matrix;

/// Name of the npz entry that contains the JSON configuration.
const CONFIG_ENTRY: &str = "__config__";

/// Suffixes of a block's linear layers in execution order. W_Q, W_K and W_V read the same
/// input, and so do W1 and W3.
const LINEAR_SUFFIXES: [&str; 7] = [
    "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "ffn.W1", "ffn.W3", "ffn.W2",
];

/// Hyper-parameters of the model, from the npz `__config__` entry and the weight shapes.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct GlassConfig {
    /// Number of token ids.
    #[serde(rename = "vocab_size")]
    pub vocab: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Number of decoder blocks.
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads, each shared by `n_heads / n_kv_heads` query heads.
    pub n_kv_heads: usize,
    /// Maximum number of tokens in one forward pass, and the window length of
    /// [`GlassLlm::cross_entropy`].
    pub max_len: usize,
    /// Base of the RoPE frequencies.
    pub rope_base: f64,
    /// Epsilon added to the mean square in RMSNorm.
    pub eps: f64,
    /// Hidden width of the feed-forward network. The config JSON does not contain it, so the
    /// loader takes it from the shape of `blocks.0.ffn.W1`.
    #[serde(skip)]
    pub ffn: usize,
}

impl GlassConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Returns the reason the configuration is unusable, if it is.
    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("max_len", self.max_len),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "d_model {} is not a multiple of n_heads {}",
                self.d_model, self.n_heads
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head width {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if !(self.rope_base > 0.0 && self.rope_base.is_finite()) {
            return Err(format!(
                "rope_base {} must be positive and finite",
                self.rope_base
            ));
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return Err(format!("eps {} must be non-negative and finite", self.eps));
        }
        Ok(())
    }
}

/// Pairing of the head dimensions that RoPE rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i + 1)`. The glassllm weights were trained with this layout.
    Interleaved,
    /// Pairs `(i, i + head_dim / 2)`, as in GPT-NeoX. Wrong for glassllm; it exists so that
    /// tests can show that the layout matters.
    HalfSplit,
}

/// One linear layer without bias, stored as the file stores it.
#[derive(Clone, Debug)]
struct Linear {
    name: String,
    inputs: usize,
    outputs: usize,
    /// `[inputs, outputs]`, row-major, for `x @ W`.
    weight: Vec<f32>,
}

impl Linear {
    /// Returns `x @ W` for `x` of shape `[rows, inputs]`.
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        matmul(
            x,
            &self.weight,
            x.len() / self.inputs,
            self.inputs,
            self.outputs,
        )
    }
}

/// Weights of one decoder block.
#[derive(Clone, Debug)]
struct Block {
    norm1: Vec<f32>,
    norm2: Vec<f32>,
    /// The linear layers in the order of [`LINEAR_SUFFIXES`].
    linears: Vec<Linear>,
}

/// Indices into [`Block::linears`].
const W_Q: usize = 0;
const W_K: usize = 1;
const W_V: usize = 2;
const W_O: usize = 3;
const W1: usize = 4;
const W3: usize = 5;
const W2: usize = 6;

/// The glassllm model with all weights widened to `f32`.
#[derive(Clone, Debug)]
pub struct GlassLlm {
    /// Hyper-parameters, as loaded. Changing them after loading is not supported.
    pub config: GlassConfig,
    /// Token embedding `[vocab, d_model]`, also the output head.
    embedding: Vec<f32>,
    /// The embedding transposed to `[d_model, vocab]`, for the output matmul.
    embedding_transposed: Vec<f32>,
    blocks: Vec<Block>,
    norm_f: Vec<f32>,
    rope_layout: RopeLayout,
    /// `cos` and `sin` of the RoPE angle for each position and pair, `[max_len, head_dim / 2]`.
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
}

/// Callback that receives the input of each linear layer: layer name, the `[tokens, in]`
/// row-major input, and the row width `in`.
pub type CaptureFn<'a> = dyn FnMut(&str, &[f32], usize) + 'a;

impl GlassLlm {
    /// Loads the model from an npz file written by the glassllm exporter.
    ///
    /// Returns an error if the file or an entry is missing or malformed, if the configuration
    /// is invalid, if a weight has an unexpected shape or is not floating-point, or if a
    /// weight contains a NaN or infinite value. The message names the file and the entry.
    pub fn load(npz_path: &Path) -> Result<GlassLlm, ModelError> {
        let mut npz = Npz::open(npz_path)?;
        let mut config = read_config(&mut npz)?;

        let mut loader = WeightLoader {
            npz: &mut npz,
            path: npz_path,
        };
        let d_model = config.d_model;
        let (w1_shape, _) = loader.read_any_2d("blocks.0.ffn.W1")?;
        config.ffn = w1_shape[1];
        let kv_width = config.n_kv_heads * config.head_dim();

        let embedding = loader.read("E", &[config.vocab, d_model])?;
        let mut blocks = Vec::with_capacity(config.n_layers);
        for layer in 0..config.n_layers {
            let shapes = [
                (d_model, d_model),
                (d_model, kv_width),
                (d_model, kv_width),
                (d_model, d_model),
                (d_model, config.ffn),
                (d_model, config.ffn),
                (config.ffn, d_model),
            ];
            let mut linears = Vec::with_capacity(LINEAR_SUFFIXES.len());
            for (suffix, (inputs, outputs)) in LINEAR_SUFFIXES.iter().zip(shapes) {
                let name = format!("blocks.{layer}.{suffix}");
                let weight = loader.read(&name, &[inputs, outputs])?;
                linears.push(Linear {
                    name,
                    inputs,
                    outputs,
                    weight,
                });
            }
            blocks.push(Block {
                norm1: loader.read(&format!("blocks.{layer}.norm1.gamma"), &[d_model])?,
                norm2: loader.read(&format!("blocks.{layer}.norm2.gamma"), &[d_model])?,
                linears,
            });
        }
        let norm_f = loader.read("norm_f.gamma", &[d_model])?;

        let embedding_transposed = transpose(&embedding, config.vocab, d_model);
        let mut model = GlassLlm {
            config,
            embedding,
            embedding_transposed,
            blocks,
            norm_f,
            rope_layout: RopeLayout::Interleaved,
            rope_cos: Vec::new(),
            rope_sin: Vec::new(),
        };
        model.build_rope_tables();
        Ok(model)
    }

    /// Fills the RoPE tables. Angles are computed in `f64` and rounded once to `f32`.
    fn build_rope_tables(&mut self) {
        let pairs = self.config.head_dim() / 2;
        let head_dim = self.config.head_dim() as f64;
        let mut cos = Vec::with_capacity(self.config.max_len * pairs);
        let mut sin = Vec::with_capacity(self.config.max_len * pairs);
        for position in 0..self.config.max_len {
            for pair in 0..pairs {
                let frequency = self.config.rope_base.powf(-2.0 * pair as f64 / head_dim);
                let angle = position as f64 * frequency;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        self.rope_cos = cos;
        self.rope_sin = sin;
    }

    /// Current RoPE pairing, [`RopeLayout::Interleaved`] after loading.
    pub fn rope_layout(&self) -> RopeLayout {
        self.rope_layout
    }

    /// Sets the RoPE pairing. Only [`RopeLayout::Interleaved`] reproduces the trained model.
    pub fn set_rope_layout(&mut self, layout: RopeLayout) {
        self.rope_layout = layout;
    }

    /// Names of every linear layer in execution order, such as `blocks.0.attn.W_Q`, with the
    /// `[out, in]` shape of its weight.
    ///
    /// The tied embedding and output head `E` is not included, because it is also the
    /// embedding table.
    pub fn linear_layers(&self) -> Vec<(String, usize, usize)> {
        self.blocks
            .iter()
            .flat_map(|block| &block.linears)
            .map(|linear| (linear.name.clone(), linear.outputs, linear.inputs))
            .collect()
    }

    fn find_linear(&self, name: &str) -> Option<&Linear> {
        self.blocks
            .iter()
            .flat_map(|block| &block.linears)
            .find(|linear| linear.name == name)
    }

    /// Returns the weight of one linear layer as an `[out, in]` matrix, or `None` for an
    /// unknown name.
    pub fn linear_weight(&self, name: &str) -> Option<Matrix> {
        let linear = self.find_linear(name)?;
        let data = transpose(&linear.weight, linear.inputs, linear.outputs);
        Some(Matrix::new(name, linear.outputs, linear.inputs, data))
    }

    /// Replaces the weight of one linear layer with `w`, given as `[out, in]`.
    ///
    /// Returns an error for an unknown layer name, a shape other than the layer's, or a NaN
    /// or infinite value. The model is unchanged after an error.
    pub fn set_linear_weight(&mut self, name: &str, w: &Matrix) -> Result<(), ModelError> {
        let known: Vec<String> = self
            .linear_layers()
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        let linear = self
            .blocks
            .iter_mut()
            .flat_map(|block| &mut block.linears)
            .find(|linear| linear.name == name)
            .ok_or_else(|| ModelError::UnknownLayer {
                name: name.to_string(),
                known,
            })?;
        if (w.rows, w.cols) != (linear.outputs, linear.inputs) {
            return Err(ModelError::LayerShapeMismatch {
                name: name.to_string(),
                expected: (linear.outputs, linear.inputs),
                found: (w.rows, w.cols),
            });
        }
        if let Some(index) = w.data.iter().position(|value| !value.is_finite()) {
            return Err(ModelError::NonFiniteLayerWeight {
                name: name.to_string(),
                row: index / w.cols,
                col: index % w.cols,
                value: w.data[index],
            });
        }
        linear.weight = transpose(&w.data, w.rows, w.cols);
        Ok(())
    }

    /// Runs the model on one window of token ids and returns the `[tokens, vocab]` logits.
    ///
    /// Positions count from 0 at `tokens[0]`. When `capture` is given, it is called with the
    /// input of each linear layer in execution order (see [`CaptureFn`]). W_Q, W_K and W_V
    /// receive the same rows, and so do W1 and W3.
    ///
    /// # Panics
    ///
    /// Panics if `tokens` is longer than `max_len` or contains an id of `vocab` or more.
    pub fn forward(&self, tokens: &[u32], capture: Option<&mut CaptureFn<'_>>) -> Vec<f32> {
        let config = &self.config;
        let mut capture = capture;
        let mut x = self.embed_tokens(tokens);
        for index in 0..self.blocks.len() {
            x = self.run_block(index, &x, capture.as_deref_mut());
        }

        let h = rms_norm(&x, &self.norm_f, config.eps as f32);
        matmul(
            &h,
            &self.embedding_transposed,
            tokens.len(),
            config.d_model,
            config.vocab,
        )
    }

    /// Returns the number of transformer blocks.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Looks up the embedding rows of `tokens`: the `[tokens, d_model]` input of block 0.
    ///
    /// # Panics
    ///
    /// Panics as [`GlassLlm::forward`] does.
    pub fn embed_tokens(&self, tokens: &[u32]) -> Vec<f32> {
        let config = &self.config;
        assert!(
            tokens.len() <= config.max_len,
            "glassllm forward: {} tokens exceed max_len {}",
            tokens.len(),
            config.max_len
        );
        let mut x = Vec::with_capacity(tokens.len() * config.d_model);
        for &token in tokens {
            assert!(
                (token as usize) < config.vocab,
                "glassllm forward: token id {token} is not below the vocabulary size {}",
                config.vocab
            );
            let row = token as usize * config.d_model;
            x.extend_from_slice(&self.embedding[row..row + config.d_model]);
        }
        x
    }

    /// Runs block `index` on `x`, the `[tokens, d_model]` residual stream with row i at
    /// position i, and returns the block's output.
    ///
    /// `capture` receives the input of each of the block's linear layers, as in
    /// [`GlassLlm::forward`], which chains [`GlassLlm::embed_tokens`] and this for every block.
    ///
    /// # Panics
    ///
    /// Panics if `index` is not a block, or if `x` is not whole rows of at most `max_len`
    /// tokens.
    pub fn run_block(&self, index: usize, x: &[f32], capture: Option<&mut CaptureFn<'_>>) -> Vec<f32> {
        let config = &self.config;
        let block = &self.blocks[index];
        assert!(
            x.len().is_multiple_of(config.d_model) && x.len() / config.d_model <= config.max_len,
            "glassllm block {index}: {} values are not at most {} rows of {}",
            x.len(),
            config.max_len,
            config.d_model
        );
        let tokens = x.len() / config.d_model;
        let mut capture = capture;
        let mut report = |linear: &Linear, input: &[f32]| {
            if let Some(callback) = capture.as_deref_mut() {
                callback(&linear.name, input, linear.inputs);
            }
        };
        let mut x = x.to_vec();
        let eps = config.eps as f32;
        let linears = &block.linears;

        let h = rms_norm(&x, &block.norm1, eps);
        report(&linears[W_Q], &h);
        let mut q = linears[W_Q].apply(&h);
        report(&linears[W_K], &h);
        let mut k = linears[W_K].apply(&h);
        report(&linears[W_V], &h);
        let v = linears[W_V].apply(&h);
        self.apply_rope(&mut q, linears[W_Q].outputs);
        self.apply_rope(&mut k, linears[W_K].outputs);
        let attention = self.attention(&q, &k, &v, tokens);
        report(&linears[W_O], &attention);
        add_in_place(&mut x, &linears[W_O].apply(&attention));

        let h = rms_norm(&x, &block.norm2, eps);
        report(&linears[W1], &h);
        let gate = linears[W1].apply(&h);
        report(&linears[W3], &h);
        let up = linears[W3].apply(&h);
        let hidden: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
        report(&linears[W2], &hidden);
        add_in_place(&mut x, &linears[W2].apply(&hidden));
        x
    }

    /// Rotates each head of `x`, a `[tokens, width]` buffer of heads of `head_dim` values,
    /// by the position of its row.
    fn apply_rope(&self, x: &mut [f32], width: usize) {
        let head_dim = self.config.head_dim();
        let pairs = head_dim / 2;
        for (position, row) in x.chunks_exact_mut(width).enumerate() {
            let cos = &self.rope_cos[position * pairs..(position + 1) * pairs];
            let sin = &self.rope_sin[position * pairs..(position + 1) * pairs];
            for head in row.chunks_exact_mut(head_dim) {
                for pair in 0..pairs {
                    let (first, second) = match self.rope_layout {
                        RopeLayout::Interleaved => (2 * pair, 2 * pair + 1),
                        RopeLayout::HalfSplit => (pair, pair + pairs),
                    };
                    let (a, b) = (head[first], head[second]);
                    head[first] = a * cos[pair] - b * sin[pair];
                    head[second] = a * sin[pair] + b * cos[pair];
                }
            }
        }
    }

    /// Causal grouped-query attention. `q` is `[tokens, n_heads * head_dim]`, `k` and `v`
    /// are `[tokens, n_kv_heads * head_dim]`. Returns `[tokens, n_heads * head_dim]`.
    fn attention(&self, q: &[f32], k: &[f32], v: &[f32], tokens: usize) -> Vec<f32> {
        let config = &self.config;
        let head_dim = config.head_dim();
        let q_width = config.n_heads * head_dim;
        let kv_width = config.n_kv_heads * head_dim;
        let group = config.n_heads / config.n_kv_heads;
        let scale = 1.0 / (head_dim as f32).sqrt();

        let mut out = vec![0.0f32; tokens * q_width];
        let mut scores = vec![0.0f32; tokens];
        for head in 0..config.n_heads {
            let q_offset = head * head_dim;
            let kv_offset = (head / group) * head_dim;
            for t in 0..tokens {
                let query = &q[t * q_width + q_offset..t * q_width + q_offset + head_dim];
                let scores = &mut scores[..=t];
                for (s, score) in scores.iter_mut().enumerate() {
                    let key = &k[s * kv_width + kv_offset..s * kv_width + kv_offset + head_dim];
                    *score = dot(query, key) * scale;
                }
                softmax_in_place(scores);

                let output = &mut out[t * q_width + q_offset..t * q_width + q_offset + head_dim];
                for (s, weight) in scores.iter().enumerate() {
                    let value = &v[s * kv_width + kv_offset..s * kv_width + kv_offset + head_dim];
                    for (o, value) in output.iter_mut().zip(value) {
                        *o += weight * value;
                    }
                }
            }
        }
        out
    }

    /// Number of complete windows in `token_count` tokens for [`GlassLlm::cross_entropy`]:
    /// each window needs `max_len` inputs plus one more token for its last target.
    pub fn window_count(&self, token_count: usize) -> usize {
        token_count.saturating_sub(1) / self.config.max_len
    }

    /// Returns the mean cross-entropy in nats per token over the given windows, and the
    /// number of predictions it averages.
    ///
    /// Window `i` has inputs `tokens[L*i .. L*i + L]` and targets `tokens[L*i + 1 .. L*i + L
    /// + 1]`, with `L = max_len`, and every position of every window counts. Windows run on
    /// all available threads. Each log-probability is computed from the `f32` logits in `f64`
    /// and summed in `f64` in window order, so the result does not depend on the thread
    /// count. An empty range returns `(NaN, 0)`. The perplexity is `exp` of the mean.
    ///
    /// # Panics
    ///
    /// Panics if `windows.end` exceeds [`GlassLlm::window_count`] of `tokens.len()`, or if a
    /// token id is not below the vocabulary size.
    pub fn cross_entropy(&self, tokens: &[u32], windows: Range<usize>) -> (f64, usize) {
        let available = self.window_count(tokens.len());
        assert!(
            windows.end <= available,
            "glassllm cross_entropy: windows {windows:?} need {} tokens, but only {} are \
             given ({available} complete windows)",
            windows.end * self.config.max_len + 1,
            tokens.len()
        );
        if windows.is_empty() {
            return (f64::NAN, 0);
        }

        let window_ids: Vec<usize> = windows.collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |count| count.get())
            .min(window_ids.len());
        let per_thread = window_ids.len().div_ceil(threads);
        let window_sums: Vec<f64> = std::thread::scope(|scope| {
            let handles: Vec<_> = window_ids
                .chunks(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|window| self.window_loss_sum(tokens, *window))
                            .collect::<Vec<f64>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|handle| handle.join().expect("cross-entropy worker panicked"))
                .collect()
        });

        let predictions = window_ids.len() * self.config.max_len;
        let total: f64 = window_sums.iter().sum();
        (total / predictions as f64, predictions)
    }

    /// Returns the summed negative log-likelihood of the targets of one window.
    fn window_loss_sum(&self, tokens: &[u32], window: usize) -> f64 {
        let length = self.config.max_len;
        let start = window * length;
        let inputs = &tokens[start..start + length];
        let targets = &tokens[start + 1..start + length + 1];
        let logits = self.forward(inputs, None);

        let mut sum = 0.0f64;
        for (row, target) in logits.chunks_exact(self.config.vocab).zip(targets) {
            assert!(
                (*target as usize) < self.config.vocab,
                "glassllm cross_entropy: target id {target} is not below the vocabulary size {}",
                self.config.vocab
            );
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let exp_sum: f64 = row.iter().map(|value| (*value as f64 - max).exp()).sum();
            let log_sum_exp = max + exp_sum.ln();
            sum += log_sum_exp - row[*target as usize] as f64;
        }
        sum
    }
}

/// Adds `delta` to `x` element by element.
fn add_in_place(x: &mut [f32], delta: &[f32]) {
    for (value, d) in x.iter_mut().zip(delta) {
        *value += d;
    }
}

/// SiLU (swish): `a * sigmoid(a)`.
fn silu(a: f32) -> f32 {
    a / (1.0 + (-a).exp())
}

/// Reads and validates the JSON configuration entry.
fn read_config(npz: &mut Npz) -> Result<GlassConfig, ModelError> {
    let path = npz.path().to_path_buf();
    let array = npz.read(CONFIG_ENTRY)?;
    let json = array.as_text().ok_or_else(|| ModelError::InvalidEntry {
        path: path.clone(),
        entry: CONFIG_ENTRY.to_string(),
        reason: format!(
            "expected a 0-d unicode string, found dtype {:?}",
            array.dtype
        ),
    })?;
    let config: GlassConfig =
        serde_json::from_str(json).map_err(|error| ModelError::InvalidEntry {
            path: path.clone(),
            entry: CONFIG_ENTRY.to_string(),
            reason: format!("invalid JSON configuration: {error}"),
        })?;
    config
        .validate()
        .map_err(|reason| ModelError::InvalidEntry {
            path,
            entry: CONFIG_ENTRY.to_string(),
            reason,
        })?;
    Ok(config)
}

/// Reads float arrays from the npz file and checks their shapes and values.
struct WeightLoader<'a> {
    npz: &'a mut Npz,
    path: &'a Path,
}

impl WeightLoader<'_> {
    /// Reads a 2-D float array of any shape, returning its shape and values.
    fn read_any_2d(&mut self, entry: &str) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let array = self.npz.read(entry)?;
        let shape = array.shape.clone();
        if shape.len() != 2 {
            return Err(self.invalid(
                entry,
                format!("expected a 2-D array, found shape {shape:?}"),
            ));
        }
        let values = self.float_values(entry, array)?;
        Ok((shape, values))
    }

    /// Reads a float array of exactly `shape`.
    fn read(&mut self, entry: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let array = self.npz.read(entry)?;
        if array.shape != shape {
            return Err(self.invalid(
                entry,
                format!("expected shape {shape:?}, found {:?}", array.shape),
            ));
        }
        self.float_values(entry, array)
    }

    /// Returns the values of an `<f2` or `<f4` array after checking that all are finite.
    fn float_values(&self, entry: &str, array: NpyArray) -> Result<Vec<f32>, ModelError> {
        let dtype = array.dtype;
        let values = match array.values {
            Values::F32(values) => values,
            _ => {
                return Err(self.invalid(
                    entry,
                    format!("expected an f2 or f4 array, found dtype {dtype:?}"),
                ))
            }
        };
        if let Some(index) = values.iter().position(|value| !value.is_finite()) {
            let reason = format!(
                "value {} at flat index {index} is not finite",
                values[index]
            );
            return Err(self.invalid(entry, reason));
        }
        Ok(values)
    }

    fn invalid(&self, entry: &str, reason: String) -> ModelError {
        ModelError::InvalidEntry {
            path: self.path.to_path_buf(),
            entry: entry.to_string(),
            reason,
        }
    }
}

/// Error from loading glassllm or replacing one of its weights.
#[derive(Debug)]
#[non_exhaustive]
pub enum ModelError {
    /// The npz file or one of its entries could not be read.
    Npz(NpzError),
    /// An entry was read but has the wrong type, shape or values, for the stated reason.
    InvalidEntry {
        path: PathBuf,
        entry: String,
        reason: String,
    },
    /// [`GlassLlm::set_linear_weight`] got a name that is not a linear layer.
    UnknownLayer { name: String, known: Vec<String> },
    /// [`GlassLlm::set_linear_weight`] got a matrix of another `[out, in]` shape.
    LayerShapeMismatch {
        name: String,
        expected: (usize, usize),
        found: (usize, usize),
    },
    /// [`GlassLlm::set_linear_weight`] got a NaN or infinite value at `[row, col]`.
    NonFiniteLayerWeight {
        name: String,
        row: usize,
        col: usize,
        value: f32,
    },
}

impl From<NpzError> for ModelError {
    fn from(error: NpzError) -> ModelError {
        ModelError::Npz(error)
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::Npz(error) => write!(f, "{error}"),
            ModelError::InvalidEntry {
                path,
                entry,
                reason,
            } => write!(
                f,
                "entry `{entry}` in {} is not a valid glassllm weight: {reason}. If `make \
                 fetch-models` downloaded it, run `python3 scripts/fetch_models.py --force` \
                 to download it again",
                path.display()
            ),
            ModelError::UnknownLayer { name, known } => write!(
                f,
                "`{name}` is not a glassllm linear layer. Known layers are `{}` to `{}`",
                known.first().map_or("", String::as_str),
                known.last().map_or("", String::as_str)
            ),
            ModelError::LayerShapeMismatch {
                name,
                expected,
                found,
            } => write!(
                f,
                "weight for `{name}` has shape [{}, {}], but the layer needs [out, in] = \
                 [{}, {}]",
                found.0, found.1, expected.0, expected.1
            ),
            ModelError::NonFiniteLayerWeight {
                name,
                row,
                col,
                value,
            } => write!(
                f,
                "weight for `{name}` contains the non-finite value {value} at [{row}, {col}]"
            ),
        }
    }
}

impl std::error::Error for ModelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ModelError::Npz(error) => Some(error),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::npz::test_support::{npy_f32, npy_text, write_npz};

    const VOCAB: usize = 11;
    const D_MODEL: usize = 16;
    const HEAD_DIM: usize = 4;
    const FFN: usize = 6;
    const MAX_LEN: usize = 6;

    /// Named weight with its stored shape and row-major values.
    type Tensor = (String, Vec<usize>, Vec<f32>);

    fn config_json(n_heads: usize, n_kv_heads: usize) -> String {
        format!(
            "{{\"vocab_size\": {VOCAB}, \"d_model\": {D_MODEL}, \"n_layers\": 2, \
             \"n_heads\": {n_heads}, \"n_kv_heads\": {n_kv_heads}, \"max_len\": {MAX_LEN}, \
             \"rope_base\": 10000.0, \"eps\": 1e-06, \"init_std\": 0.02}}"
        )
    }

    /// Deterministic values in [-scale, scale).
    fn values(count: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Weights of a two-block model with four query heads and two key/value heads.
    fn tiny_tensors() -> Vec<Tensor> {
        let kv_width = 2 * HEAD_DIM;
        let mut tensors = vec![(
            "E".to_string(),
            vec![VOCAB, D_MODEL],
            values(VOCAB * D_MODEL, 1, 1.0),
        )];
        for layer in 0..2u64 {
            let shapes = [
                ("norm1.gamma", vec![D_MODEL]),
                ("attn.W_Q", vec![D_MODEL, D_MODEL]),
                ("attn.W_K", vec![D_MODEL, kv_width]),
                ("attn.W_V", vec![D_MODEL, kv_width]),
                ("attn.W_O", vec![D_MODEL, D_MODEL]),
                ("norm2.gamma", vec![D_MODEL]),
                ("ffn.W1", vec![D_MODEL, FFN]),
                ("ffn.W3", vec![D_MODEL, FFN]),
                ("ffn.W2", vec![FFN, D_MODEL]),
            ];
            for (index, (suffix, shape)) in shapes.into_iter().enumerate() {
                let count = shape.iter().product();
                let seed = 100 * (layer + 1) + index as u64;
                let data = if suffix.ends_with("gamma") {
                    values(count, seed, 0.5).iter().map(|v| 1.0 + v).collect()
                } else {
                    values(count, seed, 0.6)
                };
                tensors.push((format!("blocks.{layer}.{suffix}"), shape, data));
            }
        }
        tensors.push((
            "norm_f.gamma".to_string(),
            vec![D_MODEL],
            vec![1.0; D_MODEL],
        ));
        tensors
    }

    fn write_model(dir: &Path, file: &str, config: &str, tensors: &[Tensor]) -> PathBuf {
        let mut entries = vec![(
            "__config__.npy".to_string(),
            npy_text(config, config.chars().count()),
        )];
        for (name, shape, data) in tensors {
            entries.push((format!("{name}.npy"), npy_f32(shape, data)));
        }
        let path = dir.join(file);
        write_npz(&path, &entries);
        path
    }

    fn load_tiny() -> (tempfile::TempDir, GlassLlm) {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = write_model(dir.path(), "tiny.npz", &config_json(4, 2), &tiny_tensors());
        let model = GlassLlm::load(&path).unwrap_or_else(|e| panic!("{e}"));
        (dir, model)
    }

    /// Gives each query head its own copy of its key/value columns, with query head `h`
    /// reading old key/value head `kv_head_of(h)`.
    fn expand_kv_heads(tensors: &[Tensor], kv_head_of: impl Fn(usize) -> usize) -> Vec<Tensor> {
        tensors
            .iter()
            .map(|(name, shape, data)| {
                if !(name.ends_with("W_K") || name.ends_with("W_V")) {
                    return (name.clone(), shape.clone(), data.clone());
                }
                let old_width = shape[1];
                let mut expanded = Vec::with_capacity(D_MODEL * D_MODEL);
                for row in data.chunks_exact(old_width) {
                    for head in 0..4 {
                        let start = kv_head_of(head) * HEAD_DIM;
                        expanded.extend_from_slice(&row[start..start + HEAD_DIM]);
                    }
                }
                (name.clone(), vec![D_MODEL, D_MODEL], expanded)
            })
            .collect()
    }

    const TOKENS: [u32; 6] = [3, 10, 0, 7, 7, 2];

    #[test]
    fn load_reads_config_and_layers() {
        let (_dir, model) = load_tiny();
        assert_eq!(model.config.vocab, VOCAB);
        assert_eq!(model.config.head_dim(), HEAD_DIM);
        assert_eq!(model.config.ffn, FFN);
        assert_eq!(model.config.eps, 1e-6);
        assert_eq!(model.rope_layout(), RopeLayout::Interleaved);

        let layers = model.linear_layers();
        assert_eq!(layers.len(), 14);
        let expected_block0 = [
            ("blocks.0.attn.W_Q", D_MODEL, D_MODEL),
            ("blocks.0.attn.W_K", 2 * HEAD_DIM, D_MODEL),
            ("blocks.0.attn.W_V", 2 * HEAD_DIM, D_MODEL),
            ("blocks.0.attn.W_O", D_MODEL, D_MODEL),
            ("blocks.0.ffn.W1", FFN, D_MODEL),
            ("blocks.0.ffn.W3", FFN, D_MODEL),
            ("blocks.0.ffn.W2", D_MODEL, FFN),
        ];
        for (layer, (name, out, inputs)) in layers.iter().zip(expected_block0) {
            assert_eq!(layer, &(name.to_string(), out, inputs));
        }
        assert_eq!(layers[13].0, "blocks.1.ffn.W2");
    }

    #[test]
    fn forward_is_causal() {
        let (_dir, model) = load_tiny();
        let full = model.forward(&TOKENS, None);
        assert_eq!(full.len(), TOKENS.len() * VOCAB);
        assert!(full.iter().all(|v| v.is_finite()));
        let prefix = model.forward(&TOKENS[..3], None);
        assert_eq!(
            prefix,
            full[..3 * VOCAB],
            "a prefix must not see later tokens"
        );
        let mut changed_tail = TOKENS;
        changed_tail[4] = 9;
        let changed = model.forward(&changed_tail, None);
        assert_eq!(changed[..4 * VOCAB], full[..4 * VOCAB]);
        assert_ne!(changed[4 * VOCAB..], full[4 * VOCAB..]);
    }

    #[test]
    fn kv_heads_serve_consecutive_query_heads() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let tensors = tiny_tensors();
        let grouped = write_model(dir.path(), "grouped.npz", &config_json(4, 2), &tensors);
        let grouped = GlassLlm::load(&grouped).expect("grouped model");

        // Query heads 0 and 1 share key/value head 0, heads 2 and 3 share head 1.
        let expanded = expand_kv_heads(&tensors, |head| head / 2);
        let path = write_model(dir.path(), "expanded.npz", &config_json(4, 4), &expanded);
        let expanded = GlassLlm::load(&path).expect("expanded model");
        assert_eq!(
            grouped.forward(&TOKENS, None),
            expanded.forward(&TOKENS, None)
        );

        let interleaved = expand_kv_heads(&tensors, |head| head % 2);
        let path = write_model(
            dir.path(),
            "interleaved.npz",
            &config_json(4, 4),
            &interleaved,
        );
        let interleaved = GlassLlm::load(&path).expect("interleaved model");
        assert_ne!(
            grouped.forward(&TOKENS, None),
            interleaved.forward(&TOKENS, None)
        );
    }

    #[test]
    fn rope_pairs_follow_layout() {
        let (_dir, mut model) = load_tiny();
        let rows = [1.0, 2.0, 3.0, 4.0, 1.0, 0.0, 1.0, 0.0];
        let (slow, fast) = (1.0f64, 0.01f64); // angles at position 1: 10000^0 and 10000^-0.5

        let mut interleaved = rows;
        model.apply_rope(&mut interleaved, HEAD_DIM);
        assert_eq!(interleaved[..4], rows[..4], "position 0 is not rotated");
        let expected = [slow.cos(), slow.sin(), fast.cos(), fast.sin()].map(|v| v as f32);
        assert_eq!(interleaved[4..], expected);

        model.set_rope_layout(RopeLayout::HalfSplit);
        let mut half_split = rows;
        model.apply_rope(&mut half_split, HEAD_DIM);
        let (cos, sin) = (slow.cos() as f32, slow.sin() as f32);
        assert_eq!(half_split[4..], [cos - sin, 0.0, sin + cos, 0.0]);

        let (_dir2, interleaved_model) = load_tiny();
        assert_ne!(
            model.forward(&TOKENS, None),
            interleaved_model.forward(&TOKENS, None)
        );
    }

    #[test]
    fn capture_reports_each_linear_input() {
        let (_dir, model) = load_tiny();
        let tokens = &TOKENS[..5];
        let mut captured: Vec<(String, Vec<f32>, usize)> = Vec::new();
        let mut record = |name: &str, rows: &[f32], width: usize| {
            captured.push((name.to_string(), rows.to_vec(), width));
        };
        let logits = model.forward(tokens, Some(&mut record));
        assert_eq!(
            logits,
            model.forward(tokens, None),
            "capture must not change the result"
        );

        let layers = model.linear_layers();
        assert_eq!(captured.len(), layers.len());
        for ((name, rows, width), (layer, _out, inputs)) in captured.iter().zip(&layers) {
            assert_eq!(name, layer);
            assert_eq!(*width, *inputs, "{name}");
            assert_eq!(rows.len(), tokens.len() * inputs, "{name}");
        }
        for block in [0, 7] {
            assert_eq!(
                captured[block].1,
                captured[block + 1].1,
                "W_Q and W_K share input"
            );
            assert_eq!(
                captured[block].1,
                captured[block + 2].1,
                "W_Q and W_V share input"
            );
            assert_eq!(
                captured[block + 4].1,
                captured[block + 5].1,
                "W1 and W3 share input"
            );
            assert_ne!(
                captured[block].1,
                captured[block + 4].1,
                "norm2 input differs"
            );
        }
        let first_input = rms_norm(
            &model.embedding[3 * D_MODEL..4 * D_MODEL],
            &model.blocks[0].norm1,
            1e-6,
        );
        assert_eq!(captured[0].1[..D_MODEL], first_input[..]);
    }

    #[test]
    fn linear_weight_round_trips() {
        let (_dir, mut model) = load_tiny();
        let tensors = tiny_tensors();
        let (_, shape, stored) = tensors
            .iter()
            .find(|(name, _, _)| name == "blocks.1.attn.W_K")
            .expect("W_K in the tiny weights");
        let matrix = model
            .linear_weight("blocks.1.attn.W_K")
            .expect("known layer");
        assert_eq!((matrix.rows, matrix.cols), (shape[1], shape[0]));
        assert_eq!(
            matrix.get(5, 3),
            stored[3 * shape[1] + 5],
            "[out, in] is the transpose"
        );
        assert!(model.linear_weight("blocks.2.attn.W_K").is_none());
        assert!(model.linear_weight("E").is_none());

        let before = model.forward(&TOKENS, None);
        model
            .set_linear_weight("blocks.1.attn.W_K", &matrix)
            .expect("same weight");
        assert_eq!(model.forward(&TOKENS, None), before);

        let mut scaled = matrix.clone();
        scaled.data.iter_mut().for_each(|v| *v *= 2.0);
        model
            .set_linear_weight("blocks.1.attn.W_K", &scaled)
            .expect("scaled weight");
        assert_ne!(model.forward(&TOKENS, None), before);
        assert_eq!(
            model.linear_weight("blocks.1.attn.W_K").expect("known"),
            scaled
        );
    }

    #[test]
    fn set_linear_weight_rejects_bad_input() {
        let (_dir, mut model) = load_tiny();
        let good = model.linear_weight("blocks.0.ffn.W2").expect("known layer");
        let before = model.forward(&TOKENS, None);

        let error = model
            .set_linear_weight("blocks.0.ffn.W4", &good)
            .expect_err("unknown");
        assert!(error
            .to_string()
            .contains("`blocks.0.ffn.W4` is not a glassllm linear layer"));

        let transposed = Matrix::new("t", good.cols, good.rows, good.data.clone());
        let error = model
            .set_linear_weight("blocks.0.ffn.W2", &transposed)
            .expect_err("shape");
        assert!(error.to_string().contains("has shape [6, 16]"), "{error}");

        let mut nan = good.clone();
        nan.data[FFN + 2] = f32::NAN;
        let error = model
            .set_linear_weight("blocks.0.ffn.W2", &nan)
            .expect_err("NaN");
        assert!(error.to_string().contains("at [1, 2]"), "{error}");

        assert_eq!(
            model.forward(&TOKENS, None),
            before,
            "rejected weights must not be applied"
        );
    }

    #[test]
    fn load_errors_name_the_entry() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let config = config_json(4, 2);
        let tensors = tiny_tensors();

        let without_w2: Vec<Tensor> = tensors
            .iter()
            .filter(|(n, _, _)| n != "blocks.1.ffn.W2")
            .cloned()
            .collect();
        let path = write_model(dir.path(), "missing.npz", &config, &without_w2);
        let message = GlassLlm::load(&path).expect_err("missing W2").to_string();
        assert!(
            message.contains("entry `blocks.1.ffn.W2` not found"),
            "{message}"
        );

        let mut wrong_shape = tensors.clone();
        let w_k = wrong_shape
            .iter_mut()
            .find(|(n, _, _)| n == "blocks.0.attn.W_K")
            .expect("W_K");
        w_k.1 = vec![2 * HEAD_DIM, D_MODEL];
        let path = write_model(dir.path(), "shape.npz", &config, &wrong_shape);
        let message = GlassLlm::load(&path)
            .expect_err("transposed W_K")
            .to_string();
        assert!(message.contains("entry `blocks.0.attn.W_K`"), "{message}");
        assert!(
            message.contains("expected shape [16, 8], found [8, 16]"),
            "{message}"
        );

        let mut infinite = tensors.clone();
        infinite[0].2[5] = f32::INFINITY;
        let path = write_model(dir.path(), "infinite.npz", &config, &infinite);
        let message = GlassLlm::load(&path).expect_err("infinite E").to_string();
        assert!(message.contains("entry `E`"), "{message}");
        assert!(message.contains("flat index 5 is not finite"), "{message}");

        let path = write_model(dir.path(), "heads.npz", &config_json(3, 1), &tensors);
        let message = GlassLlm::load(&path).expect_err("3 heads").to_string();
        assert!(message.contains("entry `__config__`"), "{message}");
        assert!(message.contains("not a multiple of n_heads 3"), "{message}");

        let path = write_model(dir.path(), "json.npz", "{\"d_model\": 16}", &tensors);
        let message = GlassLlm::load(&path)
            .expect_err("incomplete JSON")
            .to_string();
        assert!(message.contains("missing field `vocab_size`"), "{message}");
    }

    #[test]
    fn cross_entropy_averages_windows() {
        let (_dir, model) = load_tiny();
        let tokens: Vec<u32> = (0..2 * MAX_LEN as u32 + 3)
            .map(|i| (i * 7 + 1) % 11)
            .collect();
        assert_eq!(model.window_count(tokens.len()), 2);
        assert_eq!(
            model.window_count(2 * MAX_LEN),
            1,
            "the last window needs one more target"
        );
        assert_eq!(model.window_count(0), 0);

        let mut expected_sum = 0.0f64;
        for window in 0..2 {
            let start = window * MAX_LEN;
            let logits = model.forward(&tokens[start..start + MAX_LEN], None);
            for (t, row) in logits.chunks_exact(VOCAB).enumerate() {
                let exp_sum: f64 = row.iter().map(|v| (*v as f64).exp()).sum();
                expected_sum += exp_sum.ln() - row[tokens[start + t + 1] as usize] as f64;
            }
        }
        let (mean, predictions) = model.cross_entropy(&tokens, 0..2);
        assert_eq!(predictions, 2 * MAX_LEN);
        assert!(
            (mean - expected_sum / 12.0).abs() < 1e-12,
            "{mean} vs {}",
            expected_sum / 12.0
        );

        let (second, count) = model.cross_entropy(&tokens, 1..2);
        assert_eq!(count, MAX_LEN);
        assert!(second.is_finite(), "{second}");
        assert!(second > 0.0, "{second}");
        let (empty, none) = model.cross_entropy(&tokens, 1..1);
        assert!(empty.is_nan());
        assert_eq!(none, 0);
    }

    #[test]
    #[should_panic(expected = "windows 0..3 need 19 tokens")]
    fn cross_entropy_rejects_missing_tokens() {
        let (_dir, model) = load_tiny();
        model.cross_entropy(&[1; 15], 0..3);
    }

    #[test]
    #[should_panic(expected = "7 tokens exceed max_len 6")]
    fn forward_rejects_long_windows() {
        let (_dir, model) = load_tiny();
        model.forward(&[1; 7], None);
    }

    #[test]
    #[should_panic(expected = "token id 11 is not below the vocabulary size 11")]
    fn forward_rejects_unknown_ids() {
        let (_dir, model) = load_tiny();
        model.forward(&[1, 11], None);
    }
}
