//! Command-line interface: argument parsing and the output of each command.

use std::cell::{Cell, RefCell};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::calibration::{self, CalibrationSet, LinearModel};
use crate::config::{Config, OutlierScope, Overrides, Resolved};
use crate::flow::{self, RunOptions};
use crate::formats::{FpKind, Rounding};
use crate::generator;
use crate::golden;
use crate::image;
use crate::image_set::{CalibrationRecord, GptqRecord, SetLayer, SetManifest};
use crate::quantizer;
use crate::simulation;
use crate::weights::{self, Layout, Matrix};

/// The tensor `make run` uses when none is given: MiniLM's first FFN output projection,
/// which contains the 7.9148 outlier at [99, 856].
pub const DEFAULT_TENSOR: &str = "encoder.layer.0.output.dense.weight";

/// MicroScopiQ: outlier-aware microscaling quantizer, RTL generator and golden model.
#[derive(Parser, Debug)]
#[command(name = "microscopiq", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Quantize one tensor and write its memory image, dequantized weights and manifest.
    Quantize(QuantizeArgs),
    /// Generate the accelerator's Verilog for a configuration.
    Generate(GenerateArgs),
    /// Simulate an image written by `quantize` with Verilator and compare with the golden model.
    Simulate(SimulateArgs),
    /// Quantize, check, generate, simulate and compare in one go.
    Run(RunArgs),
    /// Run `verilator --lint-only -Wall` on the generated Verilog.
    Lint(ConfigArgs),
    /// Synthesize the generated Verilog with Yosys and report resources per module.
    Synth(SynthArgs),
    /// Measure model accuracy after quantizing every linear layer with each method.
    Eval(EvalArgs),
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Yosys flow: xilinx (synth_xilinx), ice40 (synth_ice40) or generic (synth).
    #[arg(long, value_enum, default_value = "xilinx")]
    pub target: TargetArg,
    /// Keep the Verilog and the Yosys logs here.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Also place and route on an iCE40 HX8K with nextpnr-ice40 and report the maximum frequency.
    #[arg(long)]
    pub pnr: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Synthesis targets on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TargetArg {
    Xilinx,
    Ice40,
    Generic,
}

/// Configuration file and overrides shared by every command.
#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// TOML configuration; the embedded default (16x16, b = 2, A = 8, M = 8) when absent.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PE rows (input channels per tile).
    #[arg(long)]
    pub rows: Option<u32>,
    /// PE columns (output channels per tile).
    #[arg(long)]
    pub cols: Option<u32>,
    /// Inlier bits b.
    #[arg(long)]
    pub weight_bits: Option<u32>,
    /// Activation bits A.
    #[arg(long)]
    pub act_bits: Option<u32>,
    /// Micro-block size M (output channels sharing a micro-exponent).
    #[arg(long)]
    pub ublock: Option<u32>,
    /// Maximum outlier pairs per micro-block (at most M/2).
    #[arg(long)]
    pub max_pairs: Option<u32>,
    /// Outlier threshold in standard deviations.
    #[arg(long)]
    pub k_sigma: Option<f64>,
    /// Values over which the outlier mean and standard deviation are taken: all output
    /// channels of one input channel, one macro-block (R x M) or one micro-block (M).
    #[arg(long, value_enum)]
    pub outlier_scope: Option<OutlierScopeArg>,
    /// Rounding rule of every encoder.
    #[arg(long, value_enum)]
    pub rounding: Option<RoundingArg>,
    /// PE rows with a ReCoN (default: every row).
    #[arg(long)]
    pub recon_rows: Option<u32>,
    /// Build multi-precision PEs that run both b-bit and 2b-bit layers (rows must be even).
    #[arg(long)]
    pub multi_precision: bool,
    /// Pipeline registers per PE row: 0, 1 (after the multiplier) or 2 (also after ReCoN).
    #[arg(long)]
    pub pipeline_stages: Option<u32>,
    /// Weight copies per PE: 2 (double buffer, default) or 1 (loads wait for compute).
    #[arg(long)]
    pub weight_buffer_depth: Option<u32>,
    /// Outlier element format; it must have 2b bits (default: e2m1 for b = 2, e4m3 for b = 4).
    #[arg(long, value_enum)]
    pub outlier_format: Option<OutlierFormatArg>,
}

/// Outlier element formats on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutlierFormatArg {
    E2m1,
    E3m2,
    E2m3,
    E4m3,
    E5m2,
}

impl OutlierFormatArg {
    fn kind(self) -> FpKind {
        match self {
            OutlierFormatArg::E2m1 => FpKind::E2M1,
            OutlierFormatArg::E3m2 => FpKind::E3M2,
            OutlierFormatArg::E2m3 => FpKind::E2M3,
            OutlierFormatArg::E4m3 => FpKind::E4M3,
            OutlierFormatArg::E5m2 => FpKind::E5M2,
        }
    }
}

/// Rounding rule names on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoundingArg {
    NearestEven,
    NearestAway,
}

/// Outlier scope names on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OutlierScopeArg {
    Column,
    MacroBlock,
    MicroBlock,
}

impl From<OutlierScopeArg> for OutlierScope {
    fn from(arg: OutlierScopeArg) -> OutlierScope {
        match arg {
            OutlierScopeArg::Column => OutlierScope::Column,
            OutlierScopeArg::MacroBlock => OutlierScope::MacroBlock,
            OutlierScopeArg::MicroBlock => OutlierScope::MicroBlock,
        }
    }
}

impl ConfigArgs {
    /// Reads, overrides and validates the configuration.
    pub fn resolve(&self) -> Result<Resolved, String> {
        self.resolve_over(Config::default_config())
    }

    /// Reads the configuration file, or takes `base` when there is none, then applies the
    /// overrides and validates the result.
    pub fn resolve_over(&self, base: Config) -> Result<Resolved, String> {
        self.config_over(base)?.resolve().map_err(|e| e.to_string())
    }

    /// Reads the configuration and applies the overrides, without validating the result.
    pub fn config(&self) -> Result<Config, String> {
        self.config_over(Config::default_config())
    }

    /// Reads the configuration file, or takes `base` when there is none, and applies the
    /// overrides.
    fn config_over(&self, base: Config) -> Result<Config, String> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
            None => base,
        };
        config.apply(&Overrides {
            rows: self.rows,
            cols: self.cols,
            weight_bits: self.weight_bits,
            act_bits: self.act_bits,
            ublock: self.ublock,
            max_pairs: self.max_pairs,
            k_sigma: self.k_sigma,
            outlier_scope: self.outlier_scope.map(OutlierScope::from),
            rounding: self.rounding.map(|r| match r {
                RoundingArg::NearestEven => Rounding::NearestEven,
                RoundingArg::NearestAway => Rounding::NearestAway,
            }),
            recon_rows: self.recon_rows,
            multi_precision: self.multi_precision.then_some(true),
            pipeline_stages: self.pipeline_stages,
            weight_buffer_depth: self.weight_buffer_depth,
            outlier_format: self.outlier_format.map(OutlierFormatArg::kind),
        });
        Ok(config)
    }
}

/// Tensor selection: file, name and storage layout.
#[derive(Args, Debug, Clone)]
pub struct TensorArgs {
    /// safetensors file; defaults to the fetched MiniLM model.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Tensor name.
    #[arg(long, default_value = DEFAULT_TENSOR)]
    pub tensor: String,
    /// Storage layout of the tensor: out-in (PyTorch nn.Linear) or in-out (x @ W).
    #[arg(long, value_enum, default_value = "out-in")]
    pub layout: LayoutArg,
}

/// Layout names on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LayoutArg {
    OutIn,
    InOut,
}

impl TensorArgs {
    fn load(&self) -> Result<Matrix, String> {
        let path = self.weights.clone().unwrap_or_else(default_weights);
        let layout = match self.layout {
            LayoutArg::OutIn => Layout::OutIn,
            LayoutArg::InOut => Layout::InOut,
        };
        weights::load_matrix(&path, &self.tensor, layout).map_err(|e| e.to_string())
    }
}

/// Returns the path of the fetched MiniLM safetensors file.
pub fn default_weights() -> PathBuf {
    weights::models_dir().join("all-MiniLM-L6-v2").join("model.safetensors")
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub tensor: TensorArgs,
    /// Output folder, replaced as a whole when the run succeeds.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Inlier bits of the layer: the array's b (default), or 2b on a --multi-precision array.
    /// The image then carries the 2b-bit layer configuration.
    #[arg(long, value_name = "BITS", conflicts_with = "all_layers")]
    pub layer_bits: Option<u32>,
    /// Activation vectors written with the image, for simulation.
    #[arg(long, default_value_t = 32)]
    pub vectors: usize,
    /// Seed of the activation vectors.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Quantize every linear layer of the model into one image set, one folder per layer.
    #[arg(long)]
    pub all_layers: bool,
    /// Model of --all-layers: minilm (the safetensors file of --weights) or glassllm.
    #[arg(long, value_enum, default_value = "minilm")]
    pub model: ModelArg,
    /// With --all-layers and minilm: quantize the 2-D tensors whose names start with this.
    #[arg(long, default_value = "encoder.")]
    pub layers: String,
    /// With --all-layers: quantize with GPTQ calibrated on the Shakespeare calibration text
    /// (Macbeth, King Lear, The Tempest) instead of rounding to nearest.
    #[arg(long, requires = "all_layers")]
    pub gptq: bool,
    /// With --gptq: calibrate layer by layer, each layer on the inputs it receives when every
    /// layer before it is already quantized, instead of on the FP32 model's inputs.
    #[arg(long, requires = "gptq")]
    pub sequential: bool,
    /// With --gptq: calibrate on the first N samples only (MiniLM has 512 sentences, glassllm
    /// 64 windows of 128 tokens).
    #[arg(long, value_name = "N", requires = "gptq")]
    pub calibration_samples: Option<usize>,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Models that --all-layers can read.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModelArg {
    Minilm,
    Glassllm,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Output folder for the Verilog files.
    #[arg(long, value_name = "DIR", required_unless_present = "print_config")]
    pub out: Option<PathBuf>,
    /// Print the fully resolved configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Clock frequency in MHz written into the XDC and SDC constraints.
    #[arg(long, default_value_t = 100.0)]
    pub clock_mhz: f64,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Image folder written by `quantize`.
    #[arg(long, value_name = "DIR")]
    pub image: PathBuf,
    /// TOML configuration of the array to simulate; by default the image's own configuration.
    /// A multi-precision array also runs the images of its 2b-bit layers.
    #[arg(long, value_name = "FILE")]
    pub array: Option<PathBuf>,
    /// Keep the build and run files here.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Simulator: verilator (two-state, fast) or icarus (four-state, shows X propagation).
    #[arg(long, value_enum, default_value = "verilator")]
    pub simulator: SimulatorArg,
    /// Dump waveforms to waves.fst in the kept folder.
    #[arg(long)]
    pub trace: bool,
    /// Collect Verilator line coverage and annotate the sources.
    #[arg(long)]
    pub coverage: bool,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Activation sources on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ActivationsArg {
    /// Seeded random integers over the full A-bit range.
    Random,
    /// Inputs of the MiniLM layer captured on held-out sentences.
    Real,
    /// Inputs of the layer captured on the calibration text that GPTQ uses.
    Calibration,
}

/// Simulator names on the command line.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SimulatorArg {
    Verilator,
    Icarus,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub tensor: TensorArgs,
    /// Activation vectors per tile (seeded INT-A values).
    #[arg(long, default_value_t = 32)]
    pub vectors: usize,
    /// Seed of the activation vectors.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Quantize with GPTQ, calibrated on MiniLM's calibration sentences (MiniLM layers only).
    #[arg(long)]
    pub gptq: bool,
    /// Inlier bits of the layer: the array's b (default), or 2b on a --multi-precision array.
    #[arg(long, value_name = "BITS", conflicts_with = "image_set")]
    pub layer_bits: Option<u32>,
    /// Activations: seeded random integers (the default), or the layer's own inputs captured
    /// on held-out sentences (real, MiniLM only) or on the calibration text (calibration, the
    /// default with --image-set), quantized to A bits per token.
    #[arg(long, value_enum)]
    pub activations: Option<ActivationsArg>,
    /// Simulate a layer of this image set, written by `quantize --all-layers`, instead of
    /// quantizing --tensor. The set's configuration applies, and options that change it are
    /// rejected.
    #[arg(long, value_name = "DIR", requires = "layer", conflicts_with_all = ["gptq", "tensor", "weights", "layout"])]
    pub image_set: Option<PathBuf>,
    /// The layer of --image-set to simulate: its tensor name or its folder name.
    #[arg(long, value_name = "NAME", requires = "image_set")]
    pub layer: Option<String>,
    /// Keep the Verilator build and run files here (they are kept anyway on a mismatch).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Dump waveforms to waves.fst (a mismatch dumps them anyway).
    #[arg(long)]
    pub trace: bool,
    /// Collect Verilator line coverage and annotate the sources.
    #[arg(long)]
    pub coverage: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Configuration of the MX-INT and MicroScopiQ methods, whose inlier bits --bits sets.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Model to evaluate: glassllm (perplexity), minilm (embedding cosine to FP32) or all.
    #[arg(long, value_enum, default_value = "all")]
    pub model: EvalModelArg,
    /// Inlier bit widths b, comma-separated; FP32 runs once.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub bits: Vec<u32>,
    /// glassllm windows of 128 tokens: the first N of the 354 from Hamlet and Othello.
    #[arg(long, value_name = "N")]
    pub windows: Option<usize>,
    /// MiniLM sentences: lines of Julius Caesar.
    #[arg(long, value_name = "N", default_value_t = crate::eval::DEFAULT_SENTENCES)]
    pub sentences: usize,
    /// Write the rows as CSV to this file.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Draw perplexity and cosine against EBW as an SVG plot to this file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Calibrate GPTQ layer by layer: each layer on the inputs it receives when every layer
    /// before it is already quantized, instead of on the FP32 model's inputs.
    #[arg(long)]
    pub sequential: bool,
    /// Print one JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Sweep the outlier rule instead of comparing methods: MicroScopiQ without GPTQ for
    /// every scope of --scopes with every threshold of --k-sigmas and without outliers, then
    /// the best rules with GPTQ.
    #[arg(long, conflicts_with_all = ["k_sigma", "outlier_scope", "sequential"])]
    pub sweep_outliers: bool,
    /// Outlier thresholds of --sweep-outliers, in standard deviations.
    #[arg(long, value_delimiter = ',', default_value = "1.5,2,2.5,3,3.5,4", requires = "sweep_outliers")]
    pub k_sigmas: Vec<f64>,
    /// Outlier scopes of --sweep-outliers.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "column,macro-block,micro-block", requires = "sweep_outliers")]
    pub scopes: Vec<OutlierScopeArg>,
    /// Rules per model and bit width that --sweep-outliers reruns with GPTQ, besides the
    /// configured rule and the rule without outliers.
    #[arg(long, value_name = "N", default_value_t = crate::sweep::DEFAULT_GPTQ_CANDIDATES, requires = "sweep_outliers")]
    pub gptq_candidates: usize,
}

/// Model choices of `eval`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EvalModelArg {
    Glassllm,
    Minilm,
    All,
}

/// Runs the parsed command; returns the process exit code.
pub fn main_with(cli: Cli) -> Result<i32, String> {
    match cli.command {
        Command::Quantize(args) => quantize(args),
        Command::Generate(args) => generate(args),
        Command::Simulate(args) => simulate(args),
        Command::Run(args) => run(args),
        Command::Lint(args) => lint(args),
        Command::Synth(args) => synth(args),
        Command::Eval(args) => eval(args),
    }
}

fn spinner(json: bool) -> ProgressBar {
    if json {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Time between two plain progress lines when stderr is not a terminal.
const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Shows a simulation's progress on the command's spinner `bar`.
///
/// While the simulator compiles, the bar spins. While it runs, the bar shows passes done of
/// all passes, with rate and ETA. When stderr is not a terminal, indicatif draws nothing, so
/// a plain line goes to stderr at most every [`PLAIN_PROGRESS_INTERVAL`] instead. With
/// `--json` nothing is shown.
struct SimulationProgress {
    bar: ProgressBar,
    plain: Option<RefCell<PlainProgress>>,
    vectors: Cell<usize>,
}

impl SimulationProgress {
    fn new(bar: &ProgressBar, json: bool) -> SimulationProgress {
        let plain = (!json && !std::io::stderr().is_terminal())
            .then(|| RefCell::new(PlainProgress::new(PLAIN_PROGRESS_INTERVAL)));
        SimulationProgress { bar: bar.clone(), plain, vectors: Cell::new(1) }
    }

    fn show(&self, event: simulation::SimEvent) {
        use simulation::SimEvent;
        match event {
            SimEvent::Building(simulator) => {
                self.bar.set_message(format!("compiling the RTL for {simulator:?}"));
                self.bar.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("valid template"));
            }
            SimEvent::Running { simulator, passes, vectors } => {
                self.vectors.set(vectors.max(1));
                self.bar.set_message(format!("simulating with {simulator:?}"));
                self.bar.set_style(
                    ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {pos}/{len} passes, {per_sec}, ETA {eta} {msg}")
                        .expect("valid template"),
                );
                self.bar.set_length(passes as u64);
                self.bar.set_position(0);
                self.bar.reset_eta();
            }
            SimEvent::Progress(step) => {
                self.bar.set_position(step.lines / self.vectors.get() as u64);
            }
        }
        if let Some(plain) = &self.plain {
            if let Some(line) = plain.borrow_mut().line(event, Instant::now()) {
                eprintln!("{line}");
            }
        }
    }
}

/// Plain progress lines for a stderr that is not a terminal: at most one per `interval`, so
/// a run shorter than `interval` prints none.
struct PlainProgress {
    interval: Duration,
    started: Option<Instant>,
    last_line: Option<Instant>,
    vectors: u64,
}

impl PlainProgress {
    fn new(interval: Duration) -> PlainProgress {
        PlainProgress { interval, started: None, last_line: None, vectors: 1 }
    }

    /// Takes one event seen at `now` and returns the line to print, if one is due.
    fn line(&mut self, event: simulation::SimEvent, now: Instant) -> Option<String> {
        use simulation::SimEvent;
        let step = match event {
            SimEvent::Building(_) => return None,
            SimEvent::Running { vectors, .. } => {
                self.started = Some(now);
                self.last_line = Some(now);
                self.vectors = vectors.max(1) as u64;
                return None;
            }
            SimEvent::Progress(step) => step,
        };
        let (started, last_line) = (self.started?, self.last_line?);
        if now.duration_since(last_line) < self.interval {
            return None;
        }
        self.last_line = Some(now);
        let done = step.lines / self.vectors;
        let total = step.total / self.vectors;
        let seconds = now.duration_since(started).as_secs_f64();
        let rate = if seconds > 0.0 { done as f64 / seconds } else { 0.0 };
        let percent = if total > 0 { 100.0 * done as f64 / total as f64 } else { 100.0 };
        let left = if rate > 0.0 {
            format!("about {} left", indicatif::HumanDuration(Duration::from_secs_f64(total.saturating_sub(done) as f64 / rate)))
        } else {
            "time left unknown".to_string()
        };
        Some(format!("simulation: {done}/{total} passes ({percent:.1}%), {rate:.1} passes/s, {left}"))
    }
}

/// Manifest written next to an image.
#[derive(Serialize)]
struct Manifest {
    format_version: u32,
    generator_version: &'static str,
    config_hash: String,
    /// `rtn` (round to nearest) or `gptq`.
    method: &'static str,
    rounding: &'static str,
    tensor: String,
    shape: [usize; 2],
    padded_shape: [usize; 2],
    tiles: [usize; 2],
    passes: usize,
    vectors: usize,
    seed: u64,
    row_word_bits: u32,
    pair_entry_bits: u32,
    acc_width: u32,
    ebw: f64,
    weight_image_bits: u64,
    cycles_predicted: u64,
    stats: quantizer::LayerStats,
    files: Vec<&'static str>,
}

/// One quantized layer with its image, golden prediction and manifest.
struct LayerImage {
    layer: quantizer::QuantizedLayer,
    image: image::Image,
    prediction: golden::Prediction,
    manifest: Manifest,
}

/// Quantizes one tensor with round to nearest, builds its image with seeded activations and
/// checks it.
fn build_layer_image(r: &Resolved, weights: &Matrix, vectors: usize, seed: u64) -> Result<LayerImage, String> {
    layer_image(r, weights, quantizer::quantize(weights, r), "rtn", vectors, seed)
}

/// Builds the image of `layer`, quantized from `weights` by `method`, with seeded
/// activations, and checks it.
fn layer_image(r: &Resolved, weights: &Matrix, layer: quantizer::QuantizedLayer, method: &'static str, vectors: usize, seed: u64) -> Result<LayerImage, String> {
    let acts = flow::random_activations(vectors, layer.k_pad, r.a, seed);
    let image = image::build(&layer, r, &acts);
    flow::check_image_dequantization(&layer, r, &image)?;
    let prediction = golden::predict(r, &image);
    let mut files = vec!["config.toml", "rows.hex", "acts.hex", "bases.hex", "expected.hex", "dequant.safetensors", "manifest.json"];
    if !image.pair_words.is_empty() {
        files.push("pairs.hex");
    }
    if !image.header_words.is_empty() {
        files.push("headers.hex");
    }
    let manifest = Manifest {
        format_version: image::FORMAT_VERSION,
        generator_version: generator::VERSION,
        config_hash: r.hash.clone(),
        method,
        rounding: r.rounding.name(),
        tensor: weights.name.clone(),
        shape: [weights.rows, weights.cols],
        padded_shape: [layer.n_pad, layer.k_pad],
        tiles: [image.n_tiles, image.k_tiles],
        passes: image.tiles(),
        vectors: image.vectors,
        seed,
        row_word_bits: r.row_word_bits,
        pair_entry_bits: r.pair_entry_bits,
        acc_width: r.acc_width,
        ebw: image::effective_bit_width(&layer, r, &image),
        weight_image_bits: image::weight_image_bits(&layer, r, &image),
        cycles_predicted: prediction.cycles,
        stats: layer.stats.clone(),
        files,
    };
    Ok(LayerImage { layer, image, prediction, manifest })
}

/// Writes the files of one layer image into `dir`.
fn write_layer_files(dir: &Path, r: &Resolved, item: &LayerImage) -> std::io::Result<()> {
    let manifest_text = serde_json::to_string_pretty(&item.manifest).expect("manifest serialises");
    image::write_atomically(&dir.join("config.toml"), r.to_toml().as_bytes())?;
    image::write_hex_files(dir, &item.image)?;
    let bases: Vec<String> = item.layer.bases.iter().map(|b| format!("{:02x}", b.0)).collect();
    image::write_atomically(&dir.join("bases.hex"), (bases.join("\n") + "\n").as_bytes())?;
    image::write_atomically(&dir.join("expected.hex"), image::expected_hex(&item.prediction.outputs, r).as_bytes())?;
    write_dequant(&dir.join("dequant.safetensors"), &item.layer)?;
    image::write_atomically(&dir.join("manifest.json"), manifest_text.as_bytes())
}

/// Loads every linear layer of the chosen model as `[out, in]` matrices.
fn model_layers(args: &QuantizeArgs) -> Result<Vec<Matrix>, String> {
    match args.model {
        ModelArg::Minilm => {
            let path = args.tensor.weights.clone().unwrap_or_else(default_weights);
            let prefix = args.layers.clone();
            weights::load_all_matrices(&path, Layout::OutIn, |name| name.starts_with(&prefix) && name.ends_with(".weight"))
                .map_err(|e| e.to_string())
        }
        ModelArg::Glassllm => {
            let path = weights::models_dir().join("glassllm").join("en.npz");
            let model = crate::models::glassllm::GlassLlm::load(&path).map_err(|e| e.to_string())?;
            Ok(model.linear_layers().iter().filter_map(|(name, _, _)| model.linear_weight(name)).collect())
        }
    }
}

/// Folder name of layer `index` in an image set: the index and the tensor name with every
/// character outside [A-Za-z0-9._-] replaced.
fn layer_folder(index: usize, name: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    format!("{index:02}_{clean}")
}

fn quantize(args: QuantizeArgs) -> Result<i32, String> {
    let array = args.config.resolve()?;
    let r = array.layer_config(args.layer_bits.unwrap_or(array.b)).map_err(|e| format!("--layer-bits: {e}"))?.clone();
    if args.vectors == 0 {
        return Err("invalid --vectors 0: at least one activation vector is needed".into());
    }
    if args.all_layers {
        return quantize_all_layers(&args, &r);
    }
    let weights = args.tensor.load()?;
    let bar = spinner(args.json);
    bar.set_message(format!("quantizing {} [{} x {}]", weights.name, weights.rows, weights.cols));
    let item = build_layer_image(&r, &weights, args.vectors, args.seed)?;
    bar.set_message(format!("writing {}", args.out.display()));
    image::write_dir_atomically(&args.out, |dir| write_layer_files(dir, &r, &item))
        .map_err(|e| format!("cannot write the image to {}: {e}", args.out.display()))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&item.manifest).expect("manifest serialises"));
    } else {
        let stats = &item.layer.stats;
        print_table(&[
            ("tensor", format!("{} [{} x {}]", weights.name, weights.rows, weights.cols)),
            ("config", r.hash.clone()),
            ("EBW (bits/weight)", format!("{:.3}", item.manifest.ebw)),
            ("outliers", stats.outliers.to_string()),
            ("pruned", stats.pruned.to_string()),
            ("demoted (unroutable)", stats.demoted.to_string()),
            ("re-paired micro-blocks", stats.repaired.to_string()),
            ("relative error", format!("{:.5}", stats.relative_error)),
            ("image", args.out.display().to_string()),
        ]);
    }
    Ok(0)
}

fn quantize_all_layers(args: &QuantizeArgs, r: &Resolved) -> Result<i32, String> {
    let (items, records, calibration) = if args.gptq {
        let (items, records, calibration) = gptq_layer_images(args, r)?;
        (items, records.into_iter().map(Some).collect(), Some(calibration))
    } else {
        let items = rtn_layer_images(args, r)?;
        let records = vec![None; items.len()];
        (items, records, None)
    };
    let entries: Vec<SetLayer> = items
        .iter()
        .zip(records)
        .enumerate()
        .map(|(i, (item, gptq))| SetLayer {
            tensor: item.manifest.tensor.clone(),
            folder: layer_folder(i, &item.manifest.tensor),
            shape: item.manifest.shape,
            ebw: item.manifest.ebw,
            outliers: item.layer.stats.outliers,
            demoted: item.layer.stats.demoted,
            repaired: item.layer.stats.repaired,
            relative_error: item.layer.stats.relative_error,
            cycles_predicted: item.manifest.cycles_predicted,
            gptq,
        })
        .collect();
    let total_bits: u64 = items.iter().map(|i| i.manifest.weight_image_bits).sum();
    let total_weights: usize = items.iter().map(|i| i.manifest.shape[0] * i.manifest.shape[1]).sum();
    let mut routing = vec![quantizer::RoutingCounts::default(); r.max_pairs + 1];
    for item in &items {
        for (sum, counts) in routing.iter_mut().zip(&item.layer.stats.routing) {
            sum.add(counts);
        }
    }
    let weights_file = match args.model {
        ModelArg::Minilm => Some(args.tensor.weights.clone().unwrap_or_else(default_weights).display().to_string()),
        ModelArg::Glassllm => None,
    };
    let set_manifest = SetManifest {
        format_version: image::FORMAT_VERSION,
        generator_version: generator::VERSION.to_string(),
        config_hash: r.hash.clone(),
        config: r.to_toml(),
        model: format!("{:?}", args.model).to_lowercase(),
        weights_file,
        method: if args.gptq { "gptq" } else { "rtn" }.to_string(),
        calibration,
        weights: total_weights,
        ebw: total_bits as f64 / total_weights as f64,
        routing,
        layers: entries,
    };
    let text = serde_json::to_string_pretty(&set_manifest).expect("manifest serialises");
    image::write_dir_atomically(&args.out, |dir| {
        for (entry, item) in set_manifest.layers.iter().zip(&items) {
            let sub = dir.join(&entry.folder);
            std::fs::create_dir_all(&sub)?;
            write_layer_files(&sub, r, item)?;
        }
        image::write_atomically(&dir.join("manifest.json"), text.as_bytes())
    })
    .map_err(|e| format!("cannot write the image set to {}: {e}", args.out.display()))?;
    if args.json {
        println!("{text}");
        return Ok(0);
    }
    let entries = &set_manifest.layers;
    println!("  {:<48} {:>12} {:>7} {:>9}", "layer", "shape", "EBW", "outliers");
    for e in entries {
        println!("  {:<48} {:>12} {:>7.3} {:>9}", e.tensor, format!("{}x{}", e.shape[0], e.shape[1]), e.ebw, e.outliers);
    }
    print_routing(&set_manifest.routing);
    println!("  {} layers, {} weights, EBW {:.3}; image set in {}", entries.len(), total_weights, set_manifest.ebw, args.out.display());
    if let Some(c) = &set_manifest.calibration {
        let mode = if c.sequential { "sequential" } else { "parallel" };
        let fallbacks = entries.iter().filter(|e| e.gptq.as_ref().is_some_and(|g| g.fell_back_to_rtn)).count();
        println!("  GPTQ ({mode} calibration) on {} samples, {} tokens: {}", c.samples, c.tokens, c.text);
        println!("  layers that fell back to round to nearest: {fallbacks}");
    }
    println!("  simulate one layer with: microscopiq simulate --image {}/{}", args.out.display(), entries[0].folder);
    println!(
        "  or with calibration activations: microscopiq run --image-set {} --layer {}",
        args.out.display(),
        entries[0].tensor
    );
    Ok(0)
}

/// Quantizes every selected linear layer with round to nearest.
fn rtn_layer_images(args: &QuantizeArgs, r: &Resolved) -> Result<Vec<LayerImage>, String> {
    let layers = model_layers(args)?;
    if layers.is_empty() {
        return Err(format!("no linear layer matches `{}`; check --layers and --weights", args.layers));
    }
    let bar = if args.json { ProgressBar::hidden() } else { ProgressBar::new(layers.len() as u64) };
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"));
    let mut items = Vec::with_capacity(layers.len());
    for weights in &layers {
        bar.set_message(weights.name.clone());
        items.push(build_layer_image(r, weights, args.vectors, args.seed)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(items)
}

/// Image of each layer, its GPTQ facts, and the calibration of a GPTQ image set.
type GptqImages = (Vec<LayerImage>, Vec<GptqRecord>, CalibrationRecord);

/// Loads the chosen model and its calibration samples, then quantizes every selected layer
/// with GPTQ.
fn gptq_layer_images(args: &QuantizeArgs, r: &Resolved) -> Result<GptqImages, String> {
    match args.model {
        ModelArg::Minilm => {
            let path = args.tensor.weights.clone().unwrap_or_else(default_weights);
            let (model, tokenizer) = load_minilm_folder(&path)?;
            let set = calibration::minilm_calibration(&tokenizer)?;
            let prefix = args.layers.clone();
            gptq_images(model, set, &|name: &str| name.starts_with(&prefix), args, r)
        }
        ModelArg::Glassllm => {
            let (model, tokenizer) = load_glassllm()?;
            let set = calibration::glassllm_calibration(&model, &tokenizer)?;
            gptq_images(model, set, &|_: &str| true, args, r)
        }
    }
}

/// Loads MiniLM and its tokenizer from the folder of the safetensors file `weights`, which
/// must be that folder's `model.safetensors`, because calibration runs the whole model.
fn load_minilm_folder(weights: &Path) -> Result<(crate::models::minilm::MiniLm, crate::models::wordpiece::WordPiece), String> {
    let folder = weights.parent().unwrap_or(Path::new("."));
    if weights.file_name().and_then(|n| n.to_str()) != Some("model.safetensors") {
        return Err(format!(
            "invalid --weights {}: calibration runs the whole MiniLM model, so --weights must name the \
             model.safetensors of a model folder that also contains config.json and tokenizer.json",
            weights.display()
        ));
    }
    let model = crate::models::minilm::MiniLm::load(folder).map_err(|e| e.to_string())?;
    let tokenizer = crate::models::wordpiece::WordPiece::load(folder).map_err(|e| e.to_string())?;
    Ok((model, tokenizer))
}

/// Loads glassllm and its tokenizer from the models folder.
fn load_glassllm() -> Result<(crate::models::glassllm::GlassLlm, crate::models::bpe::BpeTokenizer), String> {
    let dir = weights::models_dir().join("glassllm");
    let model = crate::models::glassllm::GlassLlm::load(&dir.join("en.npz")).map_err(|e| e.to_string())?;
    let tokenizer = crate::models::bpe::BpeTokenizer::load(&dir.join("en.tokenizer.json")).map_err(|e| e.to_string())?;
    Ok((model, tokenizer))
}

/// Calibrates `model` on `set`, in parallel or sequentially as `args.sequential` selects, and quantizes
/// every layer that `selected` accepts with GPTQ, in execution order.
fn gptq_images<M: LinearModel>(
    model: M,
    mut set: CalibrationSet,
    selected: &dyn Fn(&str) -> bool,
    args: &QuantizeArgs,
    r: &Resolved,
) -> Result<GptqImages, String> {
    if let Some(count) = args.calibration_samples {
        if count == 0 || count > set.samples.len() {
            return Err(format!("invalid --calibration-samples {count}: choose 1 to {}", set.samples.len()));
        }
        set.truncate(count);
    }
    let names: Vec<String> = model.layers().into_iter().map(|(name, _, _)| name).filter(|name| selected(name)).collect();
    if names.is_empty() {
        return Err(format!("no linear layer of {} matches `{}`; check --layers", model.model_name(), args.layers));
    }
    let calibration = CalibrationRecord { text: set.text(), samples: set.samples.len(), tokens: set.tokens(), sequential: args.sequential };

    let quantize_one = |weight: &Matrix, hessian: &crate::hessian::Hessian| -> Result<(LayerImage, GptqRecord), String> {
        let name = &weight.name;
        let (layer, info) = crate::gptq::quantize_gptq(weight, hessian, r, &crate::gptq::GptqOptions::default()).map_err(|e| {
            format!("GPTQ of layer `{name}` failed: {e}; check the model weights and the calibration text, or quantize without --gptq")
        })?;
        let item = layer_image(r, weight, layer, "gptq", args.vectors, args.seed).map_err(|e| format!("layer `{name}`: {e}"))?;
        Ok((item, GptqRecord::from(&info)))
    };
    let style = ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template");
    let new_bar = |length: usize| if args.json { ProgressBar::hidden() } else { ProgressBar::new(length as u64).with_style(style.clone()) };

    let mut done: Vec<Option<(LayerImage, GptqRecord)>> = names.iter().map(|_| None).collect();
    if args.sequential {
        let bar = new_bar(names.len());
        let mut model = model;
        calibration::quantize_sequential(
            &mut model,
            &set,
            selected,
            &mut |name, weight, hessian| {
                let (item, record) = quantize_one(weight, hessian)?;
                let dequant = item.layer.dequant.iter().map(|&v| v as f32).collect();
                let index = names.iter().position(|n| n == name).expect("selected layers are in `names`");
                done[index] = Some((item, record));
                Ok(Matrix::new(name, weight.rows, weight.cols, dequant))
            },
            &bar,
        )?;
        bar.finish_and_clear();
    } else {
        let bar = new_bar(set.samples.len());
        bar.set_message(format!("calibrating {} on {} samples", model.model_name(), set.samples.len()));
        let accumulated = calibration::parallel_hessians(&model, &set, selected, &bar)?;
        bar.finish_and_clear();
        let bar = new_bar(names.len());
        for (slot, name) in done.iter_mut().zip(&names) {
            bar.set_message(format!("GPTQ {name}"));
            let hessian = accumulated
                .layer(name)
                .ok_or_else(|| format!("layer `{name}` received no calibration input"))?
                .hessian()
                .map_err(|e| e.to_string())?;
            *slot = Some(quantize_one(&model.weight(name), &hessian)?);
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    let mut items = Vec::with_capacity(names.len());
    let mut records = Vec::with_capacity(names.len());
    for (slot, name) in done.into_iter().zip(&names) {
        let (item, record) = slot.ok_or_else(|| format!("sequential calibration skipped layer `{name}`"))?;
        items.push(item);
        records.push(record);
    }
    Ok((items, records, calibration))
}

/// Prints the routing outcomes of all layers by number of outlier candidates per micro-block.
fn print_routing(routing: &[quantizer::RoutingCounts]) {
    println!();
    println!("  {:>10} {:>12} {:>15} {:>10} {:>10}", "candidates", "micro-blocks", "routed at once", "re-paired", "demoted");
    for (candidates, counts) in routing.iter().enumerate() {
        println!(
            "  {:>10} {:>12} {:>15} {:>10} {:>10}",
            candidates, counts.ublocks, counts.routed_at_once, counts.repaired, counts.demoted
        );
    }
    println!();
}

fn write_dequant(path: &Path, layer: &quantizer::QuantizedLayer) -> std::io::Result<()> {
    let data: Vec<u8> = layer.dequant.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![layer.n_out, layer.k_in], &data)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let bytes = safetensors::serialize([(layer.name.as_str(), view)], None)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    image::write_atomically(path, &bytes)
}

fn generate(args: GenerateArgs) -> Result<i32, String> {
    let r = args.config.resolve()?;
    if args.print_config {
        print!("{}", r.to_toml());
        return Ok(0);
    }
    let out = args.out.expect("clap requires --out without --print-config");
    if !(args.clock_mhz.is_finite() && args.clock_mhz > 0.0) {
        return Err(format!("invalid --clock-mhz {}: it must be a positive frequency in MHz", args.clock_mhz));
    }
    let mut files = generator::generate_rtl(&r);
    files.extend(generator::generate_constraints(&r, args.clock_mhz));
    image::write_dir_atomically(&out, |dir| generator::write_files(dir, &files))
        .map_err(|e| format!("cannot write the Verilog to {}: {e}", out.display()))?;
    println!("wrote {} files for configuration {} to {}", files.len(), r.hash, out.display());
    Ok(0)
}

fn read_image_dir(dir: &Path) -> Result<(Resolved, image::Image, golden::Prediction), String> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("cannot read {}: {e}; write the image with `microscopiq quantize --out {}`", dir.join(name).display(), dir.display()))
    };
    let r = Config::from_toml(&read("config.toml")?, &dir.join("config.toml").display().to_string())
        .and_then(|c| c.resolve())
        .map_err(|e| e.to_string())?;
    let manifest: serde_json::Value = serde_json::from_str(&read("manifest.json")?)
        .map_err(|e| format!("invalid {}: {e}", dir.join("manifest.json").display()))?;
    let field = |key: &str, index: Option<usize>| -> Result<usize, String> {
        let value = match index {
            Some(i) => &manifest[key][i],
            None => &manifest[key],
        };
        value.as_u64().map(|v| v as usize).ok_or_else(|| format!("manifest.json lacks `{key}`"))
    };
    if manifest["format_version"].as_u64() != Some(image::FORMAT_VERSION as u64) {
        return Err(format!(
            "{} has image format version {}, this tool reads version {}; quantize again",
            dir.display(),
            manifest["format_version"],
            image::FORMAT_VERSION
        ));
    }
    let parse = |name: &str, width: u32| -> Result<Vec<crate::bits::BitWord>, String> {
        if !dir.join(name).exists() {
            return Ok(Vec::new());
        }
        image::parse_hex_lines(&read(name)?, width as usize, &dir.join(name).display().to_string())
    };
    let row_words = parse("rows.hex", r.row_word_bits)?;
    let header_words = parse("headers.hex", r.header_bits)?;
    let k_tiles = field("tiles", Some(1))?;
    let pass_count = if r.has_sharing { header_words.len() } else { row_words.len() / r.rows };
    let passes = image::passes_from_headers(&r, pass_count, &header_words, k_tiles);
    let image = image::Image {
        n_tiles: field("tiles", Some(0))?,
        k_tiles,
        vectors: field("vectors", None)?,
        passes,
        row_words,
        pair_words: parse("pairs.hex", r.pair_entry_bits)?,
        header_words,
        act_words: parse("acts.hex", r.rows as u32 * r.a)?,
    };
    let stored: usize = image::rows_per_pass(&r, &image.header_words, image.tiles()).iter().sum();
    if image.row_words.len() != stored || image.act_words.len() != image.k_tiles * image.vectors {
        return Err(format!("{}: the hex files do not match the shapes in manifest.json; quantize again", dir.display()));
    }
    golden::validate(&r, &image).map_err(|e| format!("{}: {e}; quantize again", dir.display()))?;
    let prediction = golden::predict(&r, &image);
    let expected = parse("expected.hex", r.cols as u32 * r.acc_width)?;
    let acc = r.acc_width as usize;
    for (i, word) in expected.iter().enumerate() {
        let row: Vec<i128> = (0..r.cols).map(|c| crate::bits::sign_extend(word.get_wide(c * acc, acc), acc as u32)).collect();
        if prediction.outputs.get(i) != Some(&row) {
            return Err(format!("{}: expected.hex line {} differs from the golden model", dir.display(), i + 1));
        }
    }
    Ok((r, image, prediction))
}

fn simulate(args: SimulateArgs) -> Result<i32, String> {
    let (r, image, prediction) = read_image_dir(&args.image)?;
    let design = match &args.array {
        Some(path) => Config::from_file(path).and_then(|c| c.resolve()).map_err(|e| e.to_string())?,
        None => r.clone(),
    };
    let prediction = if args.array.is_some() { golden::predict_on_array(&r, &image, design.rows) } else { prediction };
    let bar = spinner(args.json);
    let simulator = match args.simulator {
        SimulatorArg::Verilator => simulation::Simulator::Verilator,
        SimulatorArg::Icarus => simulation::Simulator::Icarus,
    };
    let simulation_progress = SimulationProgress::new(&bar, args.json);
    let options = simulation::SimOptions { work_dir: args.keep.clone(), simulator, trace: args.trace, coverage: args.coverage };
    let sim = simulation::simulate_layer_with_progress(&design, &r, &image, prediction.cycles, &options, &|event| {
        simulation_progress.show(event)
    })
    .map_err(|e| e.to_string())?;
    let comparison = simulation::compare(&prediction, &sim, image.vectors);
    if !comparison.passed() && !args.trace {
        bar.set_message("simulating again with waveforms (waves.fst) for the mismatch");
        let retrace = simulation::SimOptions { work_dir: Some(sim.work_dir.clone()), simulator, trace: true, coverage: false };
        simulation::simulate_layer_with_progress(&design, &r, &image, prediction.cycles, &retrace, &|event| {
            simulation_progress.show(event)
        })
        .map_err(|e| e.to_string())?;
    }
    bar.finish_and_clear();
    if args.coverage {
        if let Some(summary) = simulation::coverage_summary(&sim.work_dir) {
            println!("line coverage: {summary} (annotated sources in {}/coverage)", sim.work_dir.display());
        }
    }
    let keep = args.keep.is_some() || !comparison.passed() || args.trace || args.coverage;
    if !keep {
        let _ = std::fs::remove_dir_all(&sim.work_dir);
    }
    if args.json {
        println!("{}", serde_json::to_string(&comparison).expect("comparison serialises"));
    } else {
        print_comparison(&comparison, &sim.work_dir, !keep);
    }
    Ok(if comparison.passed() { 0 } else { 1 })
}

fn print_comparison(c: &simulation::Comparison, work_dir: &Path, removed: bool) {
    print_table(&[
        ("outputs compared", c.compared.to_string()),
        ("mismatches", c.mismatches.to_string()),
        ("cycles (RTL)", c.cycles.to_string()),
        ("cycles (predicted)", c.cycles_predicted.to_string()),
    ]);
    if let Some(m) = &c.first {
        println!(
            "first mismatch: tile {}, vector {}, column {}, cycle {}: expected {}, got {}",
            m.tile, m.vector, m.column, m.cycle, m.expected, m.got
        );
    }
    if !removed {
        println!("build and run files: {}", work_dir.display());
    }
}

fn run(args: RunArgs) -> Result<i32, String> {
    if args.vectors == 0 {
        return Err("invalid --vectors 0: at least one activation vector is needed".into());
    }
    if let Some(dir) = &args.image_set {
        return run_image_set(&args, dir);
    }
    let array = args.config.resolve()?;
    let r = array
        .layer_config(args.layer_bits.unwrap_or(array.b))
        .map_err(|e| format!("--layer-bits: {e}"))?
        .clone();
    let weights = args.tensor.load()?;
    let bar = spinner(args.json);
    let activations = match args.activations.unwrap_or(ActivationsArg::Random) {
        ActivationsArg::Random => None,
        ActivationsArg::Real => {
            bar.set_message(format!("capturing the inputs of {} on held-out sentences", args.tensor.tensor));
            let rows = flow::capture_minilm_inputs(&args.tensor.tensor, args.vectors)?;
            Some(flow::quantize_activations(&rows, r.a))
        }
        ActivationsArg::Calibration => {
            bar.set_message(format!("capturing the inputs of {} on the calibration text", args.tensor.tensor));
            let path = args.tensor.weights.clone().unwrap_or_else(default_weights);
            let (model, tokenizer) = load_minilm_folder(&path)?;
            let set = calibration::minilm_calibration(&tokenizer)?;
            let rows = calibration::capture_layer_inputs(&model, &set, &args.tensor.tensor, args.vectors)?;
            Some(flow::quantize_activations(&rows, r.a))
        }
    };
    let hessian = if args.gptq {
        bar.set_message("calibrating MiniLM for GPTQ on the calibration sentences");
        let dir = weights::models_dir().join("all-MiniLM-L6-v2");
        let model = crate::models::minilm::MiniLm::load(&dir).map_err(|e| e.to_string())?;
        let tokenizer = crate::models::wordpiece::WordPiece::load(&dir).map_err(|e| e.to_string())?;
        let (mut hessians, _) = crate::eval::calibrate_minilm(&model, &tokenizer)?;
        let h = hessians.remove(&args.tensor.tensor).ok_or_else(|| {
            format!("--gptq needs a MiniLM linear layer; `{}` has no calibration Hessian", args.tensor.tensor)
        })?;
        Some(h)
    } else {
        None
    };
    let simulation_progress = SimulationProgress::new(&bar, args.json);
    let report = flow::run_layer_with_progress(
        &array,
        &r,
        &weights,
        &RunOptions {
            vectors: args.vectors,
            seed: args.seed,
            work_dir: args.keep.clone(),
            trace: args.trace,
            coverage: args.coverage,
            activations,
            hessian,
        },
        &|step| bar.set_message(step.to_string()),
        &|event| simulation_progress.show(event),
    )?;
    bar.finish_and_clear();
    Ok(print_run_report(&report, &array, args.json, &[]))
}

/// Prints a run report as JSON or as a table with `extra` rows after the configuration, and
/// returns the exit code: 0 when the RTL matches the golden model, 1 when it does not.
fn print_run_report(report: &flow::RunReport, r: &Resolved, json: bool, extra: &[(&str, String)]) -> i32 {
    let passed = report.mismatches == 0 && report.cycles == report.cycles_predicted;
    if json {
        println!("{}", serde_json::to_string(&report).expect("report serialises"));
    } else {
        let mut rows = vec![
            ("tensor", format!("{} [{} x {}]", report.tensor, report.shape[0], report.shape[1])),
            ("config", format!("{} ({}x{} array, b = {}, A = {}, M = {})", report.config_hash, r.rows, r.cols, r.b, r.a, r.m)),
            ("layer weights", format!("W{}", report.weight_bits)),
        ];
        rows.extend(extra.iter().cloned());
        rows.extend([
            ("EBW (bits/weight)", format!("{:.3}", report.ebw)),
            ("outliers / pruned", format!("{} / {}", report.outliers, report.pruned)),
            ("relative error", format!("{:.5}", report.relative_error)),
            ("tiles (passes) x vectors", format!("{} ({}) x {}", report.tiles, report.passes, report.vectors)),
            ("outputs compared", report.outputs_compared.to_string()),
            ("mismatches", report.mismatches.to_string()),
            ("cycles (RTL / predicted)", format!("{} / {}", report.cycles, report.cycles_predicted)),
            ("verilator", report.verilator_version.clone()),
        ]);
        print_table(&rows);
        if let Some(m) = &report.first_mismatch {
            println!(
                "first mismatch: tile {}, vector {}, column {}, cycle {}: expected {}, got {}",
                m.tile, m.vector, m.column, m.cycle, m.expected, m.got
            );
        }
        if let Some(summary) = &report.coverage {
            println!("line coverage: {summary}");
        }
        if let Some(dir) = &report.work_dir {
            println!("build and run files: {}", dir.display());
        }
        println!("{}", if passed { "PASS: RTL matches the golden model" } else { "FAIL: RTL differs from the golden model" });
    }
    if passed {
        0
    } else {
        1
    }
}

/// Simulates layer `--layer` of the image set in `dir` with activations captured on the
/// calibration text (or seeded ones), after checking the configuration against the set's.
fn run_image_set(args: &RunArgs, dir: &Path) -> Result<i32, String> {
    let name = args.layer.as_deref().expect("clap requires --layer with --image-set");
    let manifest = SetManifest::read(dir)?;
    let entry = manifest.layer(name)?;
    let r = args.config.resolve_over(manifest.parsed_config()?).map_err(|e| {
        format!("the configuration options do not fit the configuration of image set {}: {e}; drop them to use the set's", dir.display())
    })?;
    manifest.check_config(&r, dir)?;
    let folder = dir.join(&entry.folder);
    let (stored, mut image, _) = read_image_dir(&folder)?;
    if stored.hash != manifest.config_hash {
        return Err(format!(
            "{}: config.toml has configuration {}, but the set manifest records {}; quantize the set again",
            folder.display(),
            stored.hash,
            manifest.config_hash
        ));
    }
    let layer = stored_layer(&folder, &r, entry)?;
    if layer.k_pad != image.k_tiles * r.rows {
        return Err(format!("{}: the image has {} row tiles, which does not match the layer shape; quantize the set again", folder.display(), image.k_tiles));
    }

    let bar = spinner(args.json);
    let (vectors, source) = match args.activations.unwrap_or(ActivationsArg::Calibration) {
        ActivationsArg::Random => (flow::random_activations(args.vectors, layer.k_pad, r.a, args.seed), format!("seeded random, seed {}", args.seed)),
        ActivationsArg::Calibration => {
            bar.set_message(format!("capturing the inputs of {} on the calibration text", entry.tensor));
            let (rows, source) = capture_set_inputs(&manifest, entry, dir, args.vectors)?;
            (flow::quantize_activations(&rows, r.a), source)
        }
        ActivationsArg::Real => {
            return Err("--activations real captures held-out MiniLM sentences and is not available with --image-set; \
                        use --activations calibration (the default) or random"
                .into())
        }
    };
    image.vectors = vectors.len();
    image.act_words = image::pack_activations(&vectors, layer.k_pad, &r);
    let options = RunOptions { work_dir: args.keep.clone(), trace: args.trace, coverage: args.coverage, ..RunOptions::default() };
    let simulation_progress = SimulationProgress::new(&bar, args.json);
    let report = flow::run_image(
        &r,
        &r,
        &layer,
        &image,
        &vectors,
        &options,
        &|step| bar.set_message(step.to_string()),
        &|event| simulation_progress.show(event),
    )?;
    bar.finish_and_clear();
    let mode = match &manifest.calibration {
        Some(c) if c.sequential => "gptq, sequential calibration",
        Some(_) => "gptq, parallel calibration",
        None => "round to nearest",
    };
    let extra = [("image set", format!("{} ({mode})", folder.display())), ("activations", source)];
    Ok(print_run_report(&report, &r, args.json, &extra))
}

/// Rebuilds the parts of a quantized layer that the checks of `flow::run_image` read from the
/// files of a layer image: the shape, the base exponents, the dequantized weights and the
/// counts of its manifest.
fn stored_layer(folder: &Path, r: &Resolved, entry: &SetLayer) -> Result<quantizer::QuantizedLayer, String> {
    let path = folder.join("dequant.safetensors");
    let dequant = weights::load_matrix(&path, &entry.tensor, Layout::OutIn).map_err(|e| e.to_string())?;
    if [dequant.rows, dequant.cols] != entry.shape {
        return Err(format!(
            "{}: `{}` is [{} x {}], but the set manifest records [{} x {}]; quantize the set again",
            path.display(),
            entry.tensor,
            dequant.rows,
            dequant.cols,
            entry.shape[0],
            entry.shape[1]
        ));
    }
    let mut layer = quantizer::QuantizedLayer::empty(&dequant, r);
    layer.dequant = dequant.data.iter().map(|&v| f64::from(v)).collect();

    let bases_path = folder.join("bases.hex");
    let text = std::fs::read_to_string(&bases_path).map_err(|e| format!("cannot read {}: {e}; quantize the set again", bases_path.display()))?;
    let bases = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            u8::from_str_radix(line.trim(), 16)
                .map(crate::formats::E8m0)
                .map_err(|e| format!("{} line {}: invalid base exponent `{line}`: {e}; quantize the set again", bases_path.display(), i + 1))
        })
        .collect::<Result<Vec<_>, String>>()?;
    if bases.len() != layer.bases.len() {
        return Err(format!("{}: {} base exponents, the layer needs {}; quantize the set again", bases_path.display(), bases.len(), layer.bases.len()));
    }
    layer.bases = bases;

    let manifest_path = folder.join("manifest.json");
    let manifest: serde_json::Value = std::fs::read_to_string(&manifest_path)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
        .map_err(|e| format!("cannot read {}: {e}; quantize the set again", manifest_path.display()))?;
    let stats = &manifest["stats"];
    let count = |key: &str| stats[key].as_u64().map(|v| v as usize).ok_or_else(|| format!("{} lacks `stats.{key}`; quantize the set again", manifest_path.display()));
    layer.stats.weights = count("weights")?;
    layer.stats.outliers = count("outliers")?;
    layer.stats.pruned = count("pruned")?;
    layer.stats.demoted = count("demoted")?;
    layer.stats.flagged_ublocks = count("flagged_ublocks")?;
    layer.stats.relative_error = stats["relative_error"].as_f64().unwrap_or(f64::NAN);
    Ok(layer)
}

/// Captures the first `count` input rows of the set's layer `entry` on the calibration
/// samples the set was quantized with, through the set's model, and describes the source.
///
/// In a set calibrated sequentially, every layer before `entry` runs with its dequantized
/// weights from the set, so the rows are the inputs that calibrated the layer.
fn capture_set_inputs(manifest: &SetManifest, entry: &SetLayer, dir: &Path, count: usize) -> Result<(Vec<Vec<f32>>, String), String> {
    match manifest.model.as_str() {
        "minilm" => {
            let path = manifest.weights_file.as_ref().map(PathBuf::from).unwrap_or_else(default_weights);
            let (model, tokenizer) = load_minilm_folder(&path)?;
            let set = calibration::minilm_calibration(&tokenizer)?;
            capture_through(model, set, manifest, entry, dir, count)
        }
        "glassllm" => {
            let (model, tokenizer) = load_glassllm()?;
            let set = calibration::glassllm_calibration(&model, &tokenizer)?;
            capture_through(model, set, manifest, entry, dir, count)
        }
        other => Err(format!("{}: unknown model `{other}` in the set manifest; quantize the set again", dir.display())),
    }
}

fn capture_through<M: LinearModel>(
    mut model: M,
    mut set: CalibrationSet,
    manifest: &SetManifest,
    entry: &SetLayer,
    dir: &Path,
    count: usize,
) -> Result<(Vec<Vec<f32>>, String), String> {
    if let Some(c) = &manifest.calibration {
        set.truncate(c.samples);
    }
    let sequential = manifest.calibration.as_ref().is_some_and(|c| c.sequential);
    if sequential {
        for (name, _, _) in model.layers() {
            if name == entry.tensor {
                break;
            }
            let Ok(earlier) = manifest.layer(&name) else { continue };
            let path = dir.join(&earlier.folder).join("dequant.safetensors");
            let dequant = weights::load_matrix(&path, &name, Layout::OutIn).map_err(|e| e.to_string())?;
            model.set_weight(&name, &dequant).map_err(|e| format!("{}: {e}; quantize the set again", path.display()))?;
        }
    }
    let rows = calibration::capture_layer_inputs(&model, &set, &entry.tensor, count)?;
    let through = if sequential { "the earlier layers quantized as in the set" } else { "the FP32 model" };
    let source = format!("{count} token rows of the calibration text through {through}, quantized per token");
    Ok((rows, source))
}

fn lint(args: ConfigArgs) -> Result<i32, String> {
    let r = args.resolve()?;
    let files = generator::generate_rtl(&r);
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    generator::write_files(dir.path(), &files).map_err(|e| e.to_string())?;
    simulation::lint(dir.path(), &files).map_err(|e| e.to_string())?;
    println!("verilator --lint-only -Wall: clean ({} files, configuration {})", files.len(), r.hash);
    Ok(0)
}

fn synth(args: SynthArgs) -> Result<i32, String> {
    let r = args.config.resolve()?;
    let target = match args.target {
        TargetArg::Xilinx => crate::synthesis::Target::Xilinx,
        TargetArg::Ice40 => crate::synthesis::Target::Ice40,
        TargetArg::Generic => crate::synthesis::Target::Generic,
    };
    let files = generator::generate_rtl(&r);
    let temp = tempfile::tempdir().map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let dir = args.keep.clone().unwrap_or_else(|| temp.path().to_path_buf());
    generator::write_files(&dir, &files).map_err(|e| format!("cannot write into {}: {e}", dir.display()))?;
    let bar = spinner(args.json);
    bar.set_message(format!("synthesizing {}x{} with yosys ({target:?})", r.rows, r.cols));
    let report = crate::synthesis::synthesize(&dir, &files, target).map_err(|e| e.to_string())?;
    let place_route = if args.pnr {
        bar.set_message("placing and routing on an iCE40 HX8K with nextpnr-ice40");
        let wrapper = generator::generate_fmax_wrapper(&r);
        generator::write_files(&dir, &wrapper).map_err(|e| format!("cannot write into {}: {e}", dir.display()))?;
        let mut all = files.clone();
        all.extend(wrapper);
        Some(crate::synthesis::place_and_route_ice40(&dir, &all).map_err(|e| e.to_string())?)
    } else {
        None
    };
    bar.finish_and_clear();
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            config_hash: &'a str,
            #[serde(flatten)]
            report: &'a crate::synthesis::ResourceReport,
            #[serde(skip_serializing_if = "Option::is_none")]
            place_route: Option<&'a crate::synthesis::PlaceRouteReport>,
        }
        let out = Out { config_hash: &r.hash, report: &report, place_route: place_route.as_ref() };
        println!("{}", serde_json::to_string(&out).expect("report serialises"));
        return Ok(0);
    }
    println!("  {:<12} {:>9} {:>9} {:>9} {:>6} {:>9} {:>7}", "module", "instances", "LUTs", "FFs", "DSPs", "cells", "LUT %");
    for (name, m) in report.modules.iter().chain(std::iter::once((&"total".to_string(), &report.total))) {
        let share = if report.total.luts > 0 { 100.0 * m.luts as f64 / report.total.luts as f64 } else { 0.0 };
        println!("  {:<12} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6.1}%", name, m.instances, m.luts, m.ffs, m.dsps, m.cells, share);
    }
    println!("  ReCoN + decode share of LUTs: {:.1}%", 100.0 * report.recon_decode_lut_share);
    if let Some(pnr) = &place_route {
        println!(
            "  {}: {} / {} logic cells, maximum frequency {:.2} MHz",
            pnr.device, pnr.logic_cells, pnr.logic_cells_available, pnr.fmax_mhz
        );
    }
    if args.keep.is_some() {
        println!("  Verilog and Yosys logs: {}", dir.display());
    }
    Ok(0)
}

fn eval(args: EvalArgs) -> Result<i32, String> {
    use crate::eval::{self, EvalModel};

    let models = match args.model {
        EvalModelArg::Glassllm => vec![EvalModel::GlassLlm],
        EvalModelArg::Minilm => vec![EvalModel::MiniLm],
        EvalModelArg::All => vec![EvalModel::GlassLlm, EvalModel::MiniLm],
    };
    if let Some(bits) = args.config.weight_bits {
        return Err(format!("invalid --weight-bits {bits} for eval: set the inlier bit widths with --bits"));
    }
    let options = eval::EvalOptions {
        bits: args.bits.clone(),
        windows: args.windows,
        sentences: args.sentences,
        config: args.config.config()?,
        sequential: args.sequential,
        ..eval::EvalOptions::default()
    };
    let progress = if args.json {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    } else {
        indicatif::MultiProgress::new()
    };
    if args.sweep_outliers {
        return sweep_outliers(&args, models, options, &progress);
    }
    let mut rows = Vec::new();
    for model in models {
        rows.extend(eval::evaluate(model, &options, &progress)?);
    }

    if let Some(path) = &args.csv {
        image::write_atomically(path, eval::to_csv(&rows).as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let svg = eval::plot_svg(&rows)?;
        image::write_atomically(path, svg.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if args.json {
        print!("{}", eval::to_json_lines(&rows));
    } else {
        print!("{}", eval::format_table(&rows));
    }
    Ok(0)
}

/// Runs `eval --sweep-outliers` with the models and evaluation options of `eval`.
fn sweep_outliers(
    args: &EvalArgs,
    models: Vec<crate::eval::EvalModel>,
    options: crate::eval::EvalOptions,
    progress: &indicatif::MultiProgress,
) -> Result<i32, String> {
    use crate::sweep;

    let options = sweep::SweepOptions {
        models,
        bits: options.bits,
        scopes: args.scopes.iter().map(|&scope| OutlierScope::from(scope)).collect(),
        k_sigmas: args.k_sigmas.clone(),
        gptq_candidates: args.gptq_candidates,
        windows: options.windows,
        sentences: options.sentences,
        config: options.config,
    };
    let rows = sweep::sweep(&options, progress)?;
    if let Some(path) = &args.csv {
        image::write_atomically(path, sweep::to_csv(&rows).as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let svg = sweep::plot_svg(&rows)?;
        image::write_atomically(path, svg.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if args.json {
        print!("{}", sweep::to_json_lines(&rows));
    } else {
        print!("{}", sweep::format_table(&rows));
    }
    Ok(0)
}

/// Prints two-column rows as an aligned table.
pub fn print_table(rows: &[(&str, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in rows {
        println!("  {key:<width$}  {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulation::{SimEvent, SimProgress, Simulator};

    fn progress(lines: u64) -> SimEvent {
        SimEvent::Progress(SimProgress { lines, total: 400, cycle: lines + 20 })
    }

    #[test]
    fn plain_progress_waits_for_interval() {
        let mut plain = PlainProgress::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(plain.line(SimEvent::Building(Simulator::Verilator), start), None);
        assert_eq!(plain.line(progress(40), start), None, "a line before the run started");
        let running = SimEvent::Running { simulator: Simulator::Verilator, passes: 100, vectors: 4 };
        assert_eq!(plain.line(running, start), None);
        assert_eq!(plain.line(progress(40), start + Duration::from_secs(9)), None, "a line before the interval");

        let first = plain.line(progress(80), start + Duration::from_secs(10));
        assert_eq!(first.as_deref(), Some("simulation: 20/100 passes (20.0%), 2.0 passes/s, about 40 seconds left"));
        assert_eq!(plain.line(progress(120), start + Duration::from_secs(15)), None, "two lines within one interval");
        let second = plain.line(progress(400), start + Duration::from_secs(20));
        assert_eq!(second.as_deref(), Some("simulation: 100/100 passes (100.0%), 5.0 passes/s, about 0 seconds left"));
    }
}
