//! GPTQ calibration of whole models: calibration samples, layer Hessians and captured layer
//! inputs.
//!
//! Parallel calibration ([`parallel_hessians`]) runs the FP32 model on every sample and
//! accumulates the input of every linear layer, so each layer is calibrated on FP32 inputs.
//! Sequential calibration ([`quantize_sequential`]) goes through the model one block at a
//! time. It calibrates each layer on the inputs it receives when every layer before it is
//! already quantized, quantizes it, and puts the dequantized weights back into the model
//! before it captures the next layer's inputs. Layers that read the same input, such as
//! query, key and value, are calibrated together on that input.

use std::collections::HashMap;

use indicatif::ProgressBar;

use crate::hessian::{self, Hessian, LayerHessians};
use crate::models::bpe::BpeTokenizer;
use crate::models::glassllm::GlassLlm;
use crate::models::minilm::MiniLm;
use crate::models::wordpiece::WordPiece;
use crate::weights::{self, Matrix};

/// Receives the input of each linear layer: layer name, `[tokens, in]` row-major rows, `in`.
pub type Capture<'a> = &'a mut dyn FnMut(&str, &[f32], usize);

/// The operations on a model's linear layers that calibration and evaluation need.
pub trait LinearModel: Clone + Sync {
    /// Names, `[out, in]` shapes, in execution order.
    fn layers(&self) -> Vec<(String, usize, usize)>;
    fn weight(&self, name: &str) -> Matrix;
    fn set_weight(&mut self, name: &str, weight: &Matrix) -> Result<(), String>;
    /// Returns the model's name for error messages and manifests.
    fn model_name(&self) -> &'static str;
    /// Returns the number of blocks (transformer or encoder layers), each with several linear
    /// layers.
    fn block_count(&self) -> usize;
    /// Computes the `[tokens, width]` input of block 0 for the token ids of one sample.
    fn block_input(&self, sample: &[u32]) -> Vec<f32>;
    /// Runs block `block` on its `[tokens, width]` input and returns the input of the next
    /// block. `capture` receives the input of each linear layer of the block.
    fn run_block(&self, block: usize, input: &[f32], capture: Option<Capture<'_>>) -> Vec<f32>;
}

impl LinearModel for GlassLlm {
    fn layers(&self) -> Vec<(String, usize, usize)> {
        self.linear_layers()
    }

    fn model_name(&self) -> &'static str {
        "glassllm"
    }

    fn block_count(&self) -> usize {
        GlassLlm::block_count(self)
    }

    fn block_input(&self, sample: &[u32]) -> Vec<f32> {
        self.embed_tokens(sample)
    }

    fn run_block(&self, block: usize, input: &[f32], capture: Option<Capture<'_>>) -> Vec<f32> {
        match capture {
            Some(capture) => GlassLlm::run_block(self, block, input, Some(capture)),
            None => GlassLlm::run_block(self, block, input, None),
        }
    }

    fn weight(&self, name: &str) -> Matrix {
        self.linear_weight(name).expect("name comes from linear_layers")
    }

    fn set_weight(&mut self, name: &str, weight: &Matrix) -> Result<(), String> {
        self.set_linear_weight(name, weight).map_err(|e| e.to_string())
    }
}

impl LinearModel for MiniLm {
    fn layers(&self) -> Vec<(String, usize, usize)> {
        self.linear_layers()
    }

    fn model_name(&self) -> &'static str {
        "minilm"
    }

    fn block_count(&self) -> usize {
        self.encoder_layer_count()
    }

    fn block_input(&self, sample: &[u32]) -> Vec<f32> {
        self.embedding_output(sample)
    }

    fn run_block(&self, block: usize, input: &[f32], capture: Option<Capture<'_>>) -> Vec<f32> {
        self.run_encoder_layer(block, input, capture)
    }

    fn weight(&self, name: &str) -> Matrix {
        self.linear_weight(name).expect("name comes from linear_layers")
    }

    fn set_weight(&mut self, name: &str, weight: &Matrix) -> Result<(), String> {
        self.set_linear_weight(name, weight).map_err(|e| e.to_string())
    }
}

/// Token ids of the calibration samples of one model.
#[derive(Clone, Debug)]
pub struct CalibrationSet {
    /// Token ids of each sample: a MiniLM sentence or a glassllm window.
    pub samples: Vec<Vec<u32>>,
    /// Description of one sample, such as `windows of 128 tokens`.
    pub unit: String,
}

impl CalibrationSet {
    /// Describes the text slices and the number of samples, as `eval` reports them.
    pub fn text(&self) -> String {
        crate::eval::calibration_description(self.samples.len(), &self.unit)
    }

    /// Returns the number of tokens over all samples.
    pub fn tokens(&self) -> usize {
        self.samples.iter().map(Vec::len).sum()
    }

    /// Keeps only the first `count` samples, for quick runs and tests.
    pub fn truncate(&mut self, count: usize) {
        self.samples.truncate(count);
    }
}

/// Returns MiniLM's calibration sentences, the ones `eval` and `run --gptq` calibrate on.
pub fn minilm_calibration(tokenizer: &WordPiece) -> Result<CalibrationSet, String> {
    let samples = crate::eval::minilm_calibration_sentences(tokenizer)?;
    let unit = format!(
        "lines of {} to {} words",
        crate::eval::SENTENCE_WORDS.start(),
        crate::eval::SENTENCE_WORDS.end()
    );
    Ok(CalibrationSet { samples, unit })
}

/// Returns glassllm's calibration windows of `max_len` tokens, the ones `eval` calibrates on.
pub fn glassllm_calibration(model: &GlassLlm, tokenizer: &BpeTokenizer) -> Result<CalibrationSet, String> {
    crate::eval::check_calibration_slices()?;
    let dir = weights::models_dir().join("shakespeare");
    let samples = hessian::calibration_windows(&dir, tokenizer, model.config.max_len, crate::eval::CALIBRATION_WINDOWS)
        .map_err(|e| e.to_string())?;
    let unit = format!("windows of {} tokens", model.config.max_len);
    Ok(CalibrationSet { samples, unit })
}

/// Runs `model` on every sample, block after block, and accumulates the input of every
/// linear layer that `selected` accepts: the parallel calibration, in which every layer
/// receives FP32 inputs.
///
/// Sample i is calibration sample i in error messages. `bar` advances once per sample.
pub fn parallel_hessians<M: LinearModel>(
    model: &M,
    set: &CalibrationSet,
    selected: &dyn Fn(&str) -> bool,
    bar: &ProgressBar,
) -> Result<LayerHessians, String> {
    let mut accumulated = LayerHessians::new(model.model_name());
    for (sample, ids) in set.samples.iter().enumerate() {
        let mut failure = None;
        let mut hidden = model.block_input(ids);
        for block in 0..model.block_count() {
            hidden = model.run_block(
                block,
                &hidden,
                Some(&mut |layer: &str, inputs: &[f32], width: usize| {
                    if failure.is_none() && selected(layer) {
                        failure = accumulated.add(layer, sample, inputs, width).err();
                    }
                }),
            );
        }
        if let Some(error) = failure {
            return Err(error.to_string());
        }
        bar.inc(1);
    }
    Ok(accumulated)
}

/// Splits the linear layers of block `block` into groups that read the same input, in
/// execution order, by running the block once on `input`.
///
/// Consecutive layers whose captured inputs are equal value for value form one group, such
/// as query, key and value, or glassllm's W1 and W3.
pub fn input_groups<M: LinearModel>(model: &M, block: usize, input: &[f32]) -> Vec<Vec<String>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut previous: Vec<f32> = Vec::new();
    model.run_block(
        block,
        input,
        Some(&mut |layer: &str, inputs: &[f32], _width: usize| {
            let shared = !groups.is_empty() && previous.len() == inputs.len() && previous.iter().zip(inputs).all(|(a, b)| a.to_bits() == b.to_bits());
            if shared {
                groups.last_mut().expect("a group exists").push(layer.to_string());
            } else {
                groups.push(vec![layer.to_string()]);
                previous = inputs.to_vec();
            }
        }),
    );
    groups
}

/// Calibrates and quantizes the layers of `model` that `selected` accepts, one group of
/// layers after another in execution order, so each group is calibrated on the inputs of a
/// model whose earlier selected layers are already quantized.
///
/// `quantize` receives a layer's name, FP32 weights and Hessian, and returns the dequantized
/// weights, which replace the layer's weights in `model` before the next group is captured.
/// Layers that `selected` rejects keep their weights and get no Hessian. A group's input is
/// accumulated once and its Hessian given to every layer of the group. `bar` advances once
/// per quantized layer. Returns the Hessian of every selected layer, by name.
pub fn quantize_sequential<M: LinearModel>(
    model: &mut M,
    set: &CalibrationSet,
    selected: &dyn Fn(&str) -> bool,
    quantize: &mut dyn FnMut(&str, &Matrix, &Hessian) -> Result<Matrix, String>,
    bar: &ProgressBar,
) -> Result<HashMap<String, Hessian>, String> {
    if set.samples.is_empty() {
        return Err(format!("{}: sequential calibration needs at least one calibration sample", model.model_name()));
    }
    let mut hessians = HashMap::new();
    let total = model.layers().iter().filter(|(name, _, _)| selected(name)).count();
    let mut hidden: Vec<Vec<f32>> = set.samples.iter().map(|ids| model.block_input(ids)).collect();
    for block in 0..model.block_count() {
        if hessians.len() == total {
            // No later block has a selected layer, so its inputs are not needed.
            break;
        }
        for group in input_groups(model, block, &hidden[0]) {
            let members: Vec<String> = group.into_iter().filter(|name| selected(name)).collect();
            let Some(leader) = members.first() else { continue };
            bar.set_message(format!("calibrating {}", members.join(", ")));
            // The block runs on several threads, but the inputs are added in sample order, so
            // the Hessian does not depend on the thread count.
            let captured = parallel_map(&hidden, |input| {
                let mut rows = (Vec::new(), 0);
                model.run_block(
                    block,
                    input,
                    Some(&mut |layer: &str, inputs: &[f32], width: usize| {
                        if layer == leader {
                            rows = (inputs.to_vec(), width);
                        }
                    }),
                );
                rows
            });
            let mut accumulated = LayerHessians::new(model.model_name());
            for (sample, (inputs, width)) in captured.iter().enumerate() {
                accumulated.add(leader, sample, inputs, *width).map_err(|e| e.to_string())?;
            }
            let hessian = accumulated
                .layer(leader)
                .ok_or_else(|| format!("{}: layer `{leader}` received no calibration input", model.model_name()))?
                .hessian()
                .map_err(|e| e.to_string())?;
            for name in &members {
                bar.set_message(format!("quantizing {name}"));
                let dequant = quantize(name, &model.weight(name), &hessian)?;
                model.set_weight(name, &dequant)?;
                hessians.insert(name.clone(), hessian.clone());
                bar.inc(1);
            }
        }
        let model: &M = model;
        hidden = parallel_map(&hidden, |input| model.run_block(block, input, None));
    }
    Ok(hessians)
}

/// Captures the first `count` input rows of layer `layer` on the calibration samples, in
/// sample order, through `model` as it is.
///
/// Returns an error naming the available layers when `model` has no layer `layer`, and an
/// error when the samples give fewer than `count` rows.
pub fn capture_layer_inputs<M: LinearModel>(model: &M, set: &CalibrationSet, layer: &str, count: usize) -> Result<Vec<Vec<f32>>, String> {
    let layers = model.layers();
    if !layers.iter().any(|(name, _, _)| name == layer) {
        let names: Vec<&str> = layers.iter().map(|(name, _, _)| name.as_str()).collect();
        return Err(format!("`{layer}` is not a linear layer of {}; its layers are {}", model.model_name(), names.join(", ")));
    }
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for ids in &set.samples {
        if rows.len() >= count {
            break;
        }
        let mut hidden = model.block_input(ids);
        for block in 0..model.block_count() {
            let mut seen = false;
            hidden = model.run_block(
                block,
                &hidden,
                Some(&mut |name: &str, inputs: &[f32], width: usize| {
                    if name == layer {
                        rows.extend(inputs.chunks(width).map(<[f32]>::to_vec));
                        seen = true;
                    }
                }),
            );
            if seen {
                break;
            }
        }
    }
    if rows.len() < count {
        return Err(format!(
            "the {} calibration samples give only {} input rows for `{layer}`, fewer than the {count} requested; lower --vectors",
            set.samples.len(),
            rows.len()
        ));
    }
    rows.truncate(count);
    Ok(rows)
}

/// Applies `f` to every item on all available threads and returns the results in item order.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(items.len()).max(1);
    let chunk = items.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = items.chunks(chunk).map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>())).collect();
        workers.into_iter().flat_map(|worker| worker.join().expect("calibration worker panicked")).collect()
    })
}
