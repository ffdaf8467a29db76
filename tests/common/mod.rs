//! Helpers shared by the integration tests: configurations, seeded test weights, the MiniLM
//! model file, and Verilator runs of hand-built images.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use microscopiq::config::{Config, Resolved};
use microscopiq::flow::{self, SplitMix64};
use microscopiq::generator;
use microscopiq::golden::{self, Prediction};
use microscopiq::image::Image;
use microscopiq::simulation::{self, Comparison, SimOptions, SimResult};
use microscopiq::weights::{self, Layout, Matrix};

/// Environment variable that turns a missing MiniLM file from a failure into a skip.
pub const SKIP_MODELS_ENV: &str = "MICROSCOPIQ_SKIP_MODELS";

/// The MiniLM tensor with the 7.9148 outlier at [99, 856], shape [384, 1536].
pub const FFN_OUTPUT: &str = "encoder.layer.0.output.dense.weight";

/// MiniLM's first attention query projection, shape [384, 384].
pub const QUERY: &str = "encoder.layer.0.attention.self.query.weight";

/// Path of the MiniLM safetensors file that `make fetch-models` downloads.
pub fn minilm_path() -> PathBuf {
    weights::models_dir().join("all-MiniLM-L6-v2").join("model.safetensors")
}

/// Returns the MiniLM path when the file exists.
///
/// When it is missing, the calling test fails with a message that names the fix, unless
/// `MICROSCOPIQ_SKIP_MODELS=1` is set: then this prints a skip line for `test` and returns
/// `None`, and the test should return.
pub fn require_minilm(test: &str) -> Option<PathBuf> {
    let path = minilm_path();
    if path.is_file() {
        return Some(path);
    }
    if std::env::var(SKIP_MODELS_ENV).as_deref() == Ok("1") {
        eprintln!("skipped {test}: {} is missing and {SKIP_MODELS_ENV}=1", path.display());
        return None;
    }
    panic!(
        "{test} needs the MiniLM weights at {}, which are missing: run `make fetch-models`, \
         or set {SKIP_MODELS_ENV}=1 to skip the tests that need them",
        path.display()
    );
}

/// Loads one MiniLM tensor as an `[out, in]` matrix, or returns `None` as [`require_minilm`]
/// does.
pub fn load_minilm(test: &str, tensor: &str) -> Option<Matrix> {
    let path = require_minilm(test)?;
    let matrix = weights::load_matrix(&path, tensor, Layout::OutIn)
        .unwrap_or_else(|e| panic!("{test}: loading `{tensor}` failed: {e}"));
    Some(matrix)
}

/// Copies the block `[n0, n0 + n) x [k0, k0 + k)` of `matrix` into a new matrix.
pub fn slice(matrix: &Matrix, n0: usize, n: usize, k0: usize, k: usize) -> Matrix {
    let mut data = Vec::with_capacity(n * k);
    for row in n0..n0 + n {
        for col in k0..k0 + k {
            data.push(matrix.get(row, col));
        }
    }
    Matrix::new(format!("{}[{n0}..{}, {k0}..{}]", matrix.name, n0 + n, k0 + k), n, k, data)
}

/// Builds the default configuration with another array shape, inlier width, micro-block size and
/// pair limit. The macro-block rows, the ReCoN rows and the outlier format fall back to
/// their defaults for the new shape and width.
pub fn config(rows: u32, cols: u32, weight_bits: u32, ublock: u32, max_pairs: u32) -> Config {
    let mut config = Config::default_config();
    config.array.rows = rows;
    config.array.cols = cols;
    config.array.recon_rows = None;
    config.format.weight_bits = weight_bits;
    config.format.ublock = ublock;
    config.format.max_pairs = max_pairs;
    config.format.mab_rows = None;
    config.format.outlier_format = None;
    config
}

/// Resolves `config`, failing the test with the validation message.
pub fn resolve(config: &Config) -> Resolved {
    config.resolve().unwrap_or_else(|e| panic!("configuration {config:?} is invalid: {e}"))
}

/// Generates seeded `[n_out, k_in]` weights: normal with standard deviation 0.05, with about one entry
/// in ten scaled by 40 so that many of them are outliers.
pub fn outlier_weights(n_out: usize, k_in: usize, seed: u64) -> Matrix {
    let mut rng = SplitMix64(seed);
    let data = (0..n_out * k_in)
        .map(|_| {
            let value = rng.normal() * 0.05;
            let scaled = if rng.next_u64() % 10 == 0 { value * 40.0 } else { value };
            scaled as f32
        })
        .collect();
    Matrix::new(format!("outlier_weights(seed {seed})"), n_out, k_in, data)
}

/// Micro-blocks that hold two or more pairs, from a layer's pair histogram.
pub fn multi_pair_ublocks(pairs_histogram: &[usize]) -> usize {
    pairs_histogram.iter().skip(2).sum()
}

/// Writes the design sources of `r` into a temporary folder and runs
/// `verilator --lint-only -Wall` on them.
pub fn lint_design(r: &Resolved) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("microscopiq-lint-")
        .tempdir()
        .map_err(|e| format!("cannot create a temporary folder: {e}"))?;
    let files = generator::generate_rtl(r);
    generator::write_files(dir.path(), &files).map_err(|e| e.to_string())?;
    simulation::lint(dir.path(), &files).map_err(|e| e.to_string())
}

/// Golden prediction, simulation output and their comparison for one image.
pub struct Cosim {
    pub prediction: Prediction,
    pub sim: SimResult,
    pub comparison: Comparison,
}

/// Runs the golden model and the Verilator simulation on `image` and compares them.
///
/// The Verilator work folder is removed when the comparison passes and kept for inspection
/// otherwise. Panics with the simulator's message when the build or the run fails.
pub fn cosimulate(r: &Resolved, image: &Image, label: &str) -> Cosim {
    let prediction = golden::predict(r, image);
    let sim = simulation::simulate(r, image, prediction.cycles, &SimOptions::default())
        .unwrap_or_else(|e| panic!("{label}: simulation failed: {e}"));
    let comparison = simulation::compare(&prediction, &sim, image.vectors);
    if comparison.passed() {
        let _ = std::fs::remove_dir_all(&sim.work_dir);
    } else {
        eprintln!("{label}: RTL differs from the golden model; files kept in {}", sim.work_dir.display());
    }
    Cosim { prediction, sim, comparison }
}

/// Path of the `microscopiq` binary that Cargo built for these tests.
pub fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_microscopiq"))
}

/// Runs seeded `n_out x k_in` weights as a layer of `weight_bits`-bit inliers on the array `r`
/// (its own width, or 2b on a multi-precision array) with `vectors` activation vectors, checks
/// that the RTL matches the golden model in every output and in the cycle count, lints the
/// design, and returns the report.
pub fn run_checked(r: &Resolved, weight_bits: u32, (n_out, k_in): (usize, usize), vectors: usize, seed: u64, label: &str) -> flow::RunReport {
    let layer_config = r.layer_config(weight_bits).expect("the array runs this width").clone();
    let weights = outlier_weights(n_out, k_in, seed);
    let options = flow::RunOptions { vectors, seed, ..flow::RunOptions::default() };
    let report = flow::run_layer(r, &layer_config, &weights, &options, &|_| {}).unwrap_or_else(|e| panic!("{label}: run failed: {e}"));
    assert_eq!(report.weight_bits, weight_bits, "{label}: wrong layer width reported");
    assert_eq!(report.mismatches, 0, "{label}: first mismatch {:?}, files in {:?}", report.first_mismatch, report.work_dir);
    assert_eq!(report.cycles, report.cycles_predicted, "{label}: RTL cycle count differs from the prediction");
    assert_eq!(report.outputs_compared, report.passes * vectors * r.cols, "{label}: not every output was compared");
    if let Err(e) = lint_design(r) {
        panic!("{label}: verilator --lint-only -Wall reported: {e}");
    }
    report
}
