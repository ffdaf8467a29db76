//! The end-to-end job: quantize a layer, build its image, predict with the golden model,
//! simulate the generated RTL and compare.

use std::path::PathBuf;

use serde::Serialize;

use crate::config::Resolved;
use crate::formats::pow2;
use crate::golden::{self, Prediction};
use crate::image::{self, Image};
use crate::quantizer::{self, QuantizedLayer};
use crate::simulation::{self, Comparison, SimOptions};
use crate::weights::Matrix;

/// Deterministic 64-bit generator (SplitMix64) for activations and test weights.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform integer in `[lo, hi]`.
    pub fn range_i64(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as i64
    }

    /// Standard normal sample (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// `count` activation vectors of `k` signed `bits`-bit integers, uniform over the full range.
pub fn random_activations(count: usize, k: usize, bits: u32, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = SplitMix64(seed);
    let lo = -(1i64 << (bits - 1));
    let hi = (1i64 << (bits - 1)) - 1;
    (0..count).map(|_| (0..k).map(|_| rng.range_i64(lo, hi)).collect()).collect()
}

/// Quantizes real activation rows to `bits`-bit integers, one symmetric scale per row
/// (max |x| maps to 2^(bits-1) - 1), as the array's integer inputs.
pub fn quantize_activations(rows: &[Vec<f32>], bits: u32) -> Vec<Vec<i64>> {
    let max_code = (1i64 << (bits - 1)) - 1;
    rows.iter()
        .map(|row| {
            let max = row.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
            if max == 0.0 {
                return vec![0; row.len()];
            }
            let scale = max as f64 / max_code as f64;
            row.iter().map(|&x| ((x as f64 / scale).round() as i64).clamp(-max_code, max_code)).collect()
        })
        .collect()
}

/// Captures the input rows of MiniLM layer `tensor` on the evaluation sentences and returns
/// the first `count` token rows.
pub fn capture_minilm_inputs(tensor: &str, count: usize) -> Result<Vec<Vec<f32>>, String> {
    let dir = crate::weights::models_dir().join("all-MiniLM-L6-v2");
    let model = crate::models::minilm::MiniLm::load(&dir).map_err(|e| e.to_string())?;
    let tokenizer = crate::models::wordpiece::WordPiece::load(&dir).map_err(|e| e.to_string())?;
    if !model.linear_layers().iter().any(|(name, _, _)| name == tensor) {
        return Err(format!("`{tensor}` is not a linear layer of MiniLM; real activations need one of its 36 layers"));
    }
    let mut rows: Vec<Vec<f32>> = Vec::new();
    for sentence in crate::eval::minilm_sentences(256)? {
        if rows.len() >= count {
            break;
        }
        let ids = tokenizer.encode(&sentence);
        let mut capture = |name: &str, input: &[f32], width: usize| {
            if name == tensor {
                rows.extend(input.chunks(width).map(|r| r.to_vec()));
            }
        };
        model.embed(&ids, Some(&mut capture));
    }
    rows.truncate(count);
    if rows.len() < count {
        return Err(format!("the evaluation sentences give only {} token rows for `{tensor}`, fewer than {count}", rows.len()));
    }
    Ok(rows)
}

/// Checks that the image, decoded the way the hardware decodes it, gives exactly the
/// quantizer's dequantized weights.
pub fn check_image_dequantization(layer: &QuantizedLayer, r: &Resolved, image: &Image) -> Result<(), String> {
    let decoded = golden::dequantize(r, image, &layer.bases);
    let k_pad = image.k_tiles * r.rows;
    for n in 0..image.n_tiles * r.cols {
        for k in 0..k_pad {
            let expected = if n < layer.n_out && k < layer.k_in { layer.dequant[n * layer.k_in + k] } else { 0.0 };
            let got = decoded[n * k_pad + k];
            if got != expected {
                return Err(format!(
                    "image dequantization differs from the quantizer at output {n}, input {k}: image {got:e}, quantizer {expected:e}"
                ));
            }
        }
    }
    Ok(())
}

/// Checks that every golden tile output equals the exact sum of the dequantized weights
/// times the activations, in integer arithmetic at the tile column's exponent.
pub fn check_golden_against_gemm(layer: &QuantizedLayer, r: &Resolved, image: &Image, prediction: &Prediction, vectors: &[Vec<i64>]) -> Result<(), String> {
    let ub_per_k = layer.n_pad / r.m;
    // Passes of one tile add up, so the golden sums are compared per tile.
    let mut sums: std::collections::BTreeMap<(usize, usize, usize), Vec<i128>> = std::collections::BTreeMap::new();
    for (t, pass) in image.passes.iter().enumerate() {
        for v in 0..vectors.len() {
            let entry = sums.entry((pass.n_tile, pass.k_tile, v)).or_insert_with(|| vec![0; r.cols]);
            for (c, value) in prediction.outputs[t * vectors.len() + v].iter().enumerate() {
                entry[c] += value;
            }
        }
    }
    for ((nt, kt, v), got) in &sums {
        let x = &vectors[*v];
        for (c, &got) in got.iter().enumerate() {
            let n = nt * r.cols + c;
            let k0 = kt * r.rows;
            let base = layer.bases[(k0 / r.mab_rows) * ub_per_k + n / r.m];
            let exp = r.column_exponent(base.exponent().expect("finite base"));
            let mut exact: i128 = 0;
            for k in k0..k0 + r.rows {
                if n >= layer.n_out || k >= layer.k_in {
                    continue;
                }
                let w = layer.dequant[n * layer.k_in + k] * pow2(-exp);
                if w.fract() != 0.0 || w.abs() >= 2f64.powi(100) {
                    return Err(format!("weight [{n}, {k}] = {w} units of 2^{exp} is not an integer"));
                }
                exact += w as i128 * x[k] as i128;
            }
            if got != exact {
                return Err(format!("golden tile ({nt}, {kt}) vector {v} column {c} is {got}, exact GEMM gives {exact}"));
            }
        }
    }
    Ok(())
}

/// Summary of one end-to-end run, printed as a table or as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Hash of the array's configuration.
    pub config_hash: String,
    /// Inlier bits of the layer: the array's b, or 2b on a multi-precision array.
    pub weight_bits: u32,
    pub tensor: String,
    pub shape: [usize; 2],
    pub ebw: f64,
    pub outliers: usize,
    pub pruned: usize,
    pub demoted: usize,
    /// Micro-blocks whose outliers were re-paired with other pruned lanes so that they route.
    pub repaired: usize,
    pub flagged_ublocks: usize,
    pub relative_error: f64,
    /// Tiles of the layer (column tiles x row tiles).
    pub tiles: usize,
    /// Passes the array ran: the tiles plus extra passes of split tiles.
    pub passes: usize,
    pub vectors: usize,
    pub outputs_compared: usize,
    pub mismatches: usize,
    pub cycles: u64,
    pub cycles_predicted: u64,
    pub verilator_version: String,
    pub first_mismatch: Option<simulation::Mismatch>,
    /// Verilator line coverage summary, when requested.
    pub coverage: Option<String>,
    /// Folder kept for inspection, when the run failed or one was requested.
    pub work_dir: Option<PathBuf>,
}

/// Options of [`run`]. The default runs 32 vectors with seed 1 in a temporary folder.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub vectors: usize,
    pub seed: u64,
    pub work_dir: Option<PathBuf>,
    /// Dump waveforms; a failing run dumps them anyway by simulating again.
    pub trace: bool,
    /// Collect Verilator line coverage.
    pub coverage: bool,
    /// Activation vectors to use instead of seeded random ones (`[v][k]`, k < K_in).
    pub activations: Option<Vec<Vec<i64>>>,
    /// Quantize with GPTQ on this Hessian instead of rounding to nearest.
    pub hessian: Option<crate::hessian::Hessian>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { vectors: 32, seed: 1, work_dir: None, trace: false, coverage: false, activations: None, hessian: None }
    }
}

/// Quantizes `weights`, checks the image against the quantizer and the golden model against
/// an exact GEMM, simulates the RTL and compares it with the golden model.
///
/// `progress` receives the name of each step.
pub fn run(r: &Resolved, weights: &Matrix, options: &RunOptions, progress: &dyn Fn(&str)) -> Result<RunReport, String> {
    run_layer_with_progress(r, r, weights, options, progress, &|_| {})
}

/// Runs [`run`] and also passes the simulation's events to `sim_progress`.
pub fn run_with_progress(
    r: &Resolved,
    weights: &Matrix,
    options: &RunOptions,
    progress: &dyn Fn(&str),
    sim_progress: &dyn Fn(simulation::SimEvent),
) -> Result<RunReport, String> {
    run_layer_with_progress(r, r, weights, options, progress, sim_progress)
}

/// Runs [`run`] for a layer of configuration `r` on the array `design`: `r` is `design`
/// itself, or its 2b-bit layer configuration on a multi-precision array.
pub fn run_layer(
    design: &Resolved,
    r: &Resolved,
    weights: &Matrix,
    options: &RunOptions,
    progress: &dyn Fn(&str),
) -> Result<RunReport, String> {
    run_layer_with_progress(design, r, weights, options, progress, &|_| {})
}

/// Runs [`run_layer`] and also passes the simulation's events to `sim_progress`.
pub fn run_layer_with_progress(
    design: &Resolved,
    r: &Resolved,
    weights: &Matrix,
    options: &RunOptions,
    progress: &dyn Fn(&str),
    sim_progress: &dyn Fn(simulation::SimEvent),
) -> Result<RunReport, String> {
    progress("quantizing");
    let layer = match &options.hessian {
        Some(h) => {
            crate::gptq::quantize_gptq(weights, h, r, &crate::gptq::GptqOptions::default()).map_err(|e| e.to_string())?.0
        }
        None => quantizer::quantize(weights, r),
    };
    if let Some(wrong) = options.activations.iter().flatten().find(|v| v.len() != weights.cols) {
        return Err(format!(
            "the activation vectors have {} elements, but layer `{}` has {} input channels; check --layout \
             (the tensor may be stored [in, out]) and that the activations belong to this layer",
            wrong.len(),
            weights.name,
            weights.cols
        ));
    }
    let vectors = match &options.activations {
        Some(given) => given.iter().map(|v| (0..layer.k_pad).map(|k| v.get(k).copied().unwrap_or(0)).collect()).collect(),
        None => random_activations(options.vectors, layer.k_pad, r.a, options.seed),
    };
    let image = image::build(&layer, r, &vectors);
    run_image(design, r, &layer, &image, &vectors, options, progress, sim_progress)
}

/// Checks `image` against `layer` and the golden model against an exact GEMM, simulates the
/// RTL and compares it with the golden model.
///
/// `vectors` are the activation vectors packed into `image` (`[v][k]` over the padded input
/// channels). Of `options`, only the work folder, tracing and coverage apply, because the
/// layer is already quantized and the activations already packed. `design` is the array
/// that runs the layer of configuration `r`, as in [`run_layer`].
#[allow(clippy::too_many_arguments)]
pub fn run_image(
    design: &Resolved,
    r: &Resolved,
    layer: &QuantizedLayer,
    image: &Image,
    vectors: &[Vec<i64>],
    options: &RunOptions,
    progress: &dyn Fn(&str),
    sim_progress: &dyn Fn(simulation::SimEvent),
) -> Result<RunReport, String> {
    progress("checking the image against the quantizer");
    check_image_dequantization(layer, r, image)?;
    progress("running the golden model");
    let prediction = golden::predict_on_array(r, image, design.rows);
    check_golden_against_gemm(layer, r, image, &prediction, vectors)?;
    let verilator_version = simulation::verilator_version().map_err(|e| e.to_string())?;
    progress("building and running the RTL with Verilator");
    let sim_options = SimOptions {
        work_dir: options.work_dir.clone(),
        trace: options.trace,
        coverage: options.coverage,
        ..SimOptions::default()
    };
    let sim = simulation::simulate_layer_with_progress(design, r, image, prediction.cycles, &sim_options, sim_progress)
        .map_err(|e| e.to_string())?;
    let comparison: Comparison = simulation::compare(&prediction, &sim, image.vectors);
    if !comparison.passed() && !options.trace {
        progress("simulating again with waveforms (waves.fst) for the mismatch");
        let retrace = SimOptions { work_dir: Some(sim.work_dir.clone()), trace: true, ..SimOptions::default() };
        simulation::simulate_layer_with_progress(design, r, image, prediction.cycles, &retrace, sim_progress)
            .map_err(|e| e.to_string())?;
    }
    let coverage = if options.coverage { simulation::coverage_summary(&sim.work_dir) } else { None };
    let keep = options.work_dir.is_some() || !comparison.passed() || options.trace || options.coverage;
    if !keep {
        let _ = std::fs::remove_dir_all(&sim.work_dir);
    }
    Ok(RunReport {
        config_hash: design.hash.clone(),
        weight_bits: r.b,
        tensor: layer.name.clone(),
        shape: [layer.n_out, layer.k_in],
        ebw: image::effective_bit_width(layer, r, image),
        outliers: layer.stats.outliers,
        pruned: layer.stats.pruned,
        demoted: layer.stats.demoted,
        repaired: layer.stats.repaired,
        flagged_ublocks: layer.stats.flagged_ublocks,
        relative_error: layer.stats.relative_error,
        tiles: image.n_tiles * image.k_tiles,
        passes: image.tiles(),
        vectors: image.vectors,
        outputs_compared: comparison.compared,
        mismatches: comparison.mismatches,
        cycles: comparison.cycles,
        cycles_predicted: comparison.cycles_predicted,
        verilator_version,
        first_mismatch: comparison.first,
        coverage,
        work_dir: keep.then_some(sim.work_dir),
    })
}
