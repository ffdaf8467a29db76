//! Benchmark: GPTQ-MicroScopiQ on all 36 linear layers of all-MiniLM-L6-v2.
//!
//! ```sh
//! cargo bench --bench gptq_minilm -- [--runs N] [--threads T] [--tokens N] [--write-hashes]
//! ```
//!
//! Calibration captures the layer inputs of `--tokens` (default 2048) tokens of the
//! Shakespeare calibration text and is timed on its own. The GPTQ loop over the 36 layers
//! then runs `--runs` times, and the program prints each run, the median and the minimum, and
//! every run's digest of the 36 results against the digests in `gptq_minilm_hashes.txt`,
//! which the code before the blocked factorisation produced. A digest covers the packed
//! image, the dequantized weights, every code of the quantized layer and the `GptqInfo`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use microscopiq::config::{Config, Resolved};
use microscopiq::eval::SENTENCE_WORDS;
use microscopiq::gptq::{self, GptqInfo, GptqOptions};
use microscopiq::hessian::{self, Hessian};
use microscopiq::image;
use microscopiq::models::minilm::MiniLm;
use microscopiq::models::wordpiece::WordPiece;
use microscopiq::quantizer::QuantizedLayer;
use microscopiq::weights::{self, Matrix};

/// Calibration tokens of the benchmark.
const DEFAULT_TOKENS: usize = 2048;

/// GPTQ runs over all layers.
const DEFAULT_RUNS: usize = 5;

/// Digests of the 36 results of the default configuration from 2048 tokens.
const HASH_FILE: &str = "benches/gptq_minilm_hashes.txt";

struct Options {
    runs: usize,
    threads: usize,
    tokens: usize,
    write_hashes: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        runs: DEFAULT_RUNS,
        threads: 1,
        tokens: DEFAULT_TOKENS,
        write_hashes: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<usize, String> {
            let text = args
                .next()
                .ok_or_else(|| format!("{name} needs a value"))?;
            text.parse()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("invalid {name} `{text}`: expected a positive integer"))
        };
        match arg.as_str() {
            "--runs" => options.runs = value("--runs")?,
            "--threads" => options.threads = value("--threads")?,
            "--tokens" => options.tokens = value("--tokens")?,
            "--write-hashes" => options.write_hashes = true,
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            other => {
                return Err(format!(
                    "unknown argument `{other}`; expected --runs N, --threads T, --tokens N or \
                     --write-hashes"
                ))
            }
        }
    }
    Ok(options)
}

/// 64-bit FNV-1a, stable across Rust versions, unlike `DefaultHasher`.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that moving bytes between fields changes the digest.
        self.0 = self.0.rotate_left(17) ^ bytes.len() as u64;
    }
}

/// Digests every output of one GPTQ run that reaches an image or a report.
fn digest(layer: &QuantizedLayer, info: &GptqInfo, r: &Resolved) -> u64 {
    let mut hash = Fnv::new();
    let img = image::build(layer, r, &[]);
    for words in [&img.row_words, &img.pair_words, &img.header_words] {
        hash.bytes(image::to_hex_lines(words).as_bytes());
    }
    let dequant: Vec<u8> = layer.dequant.iter().flat_map(|v| v.to_le_bytes()).collect();
    hash.bytes(&dequant);
    hash.bytes(&layer.slots);
    hash.bytes(&layer.micro_exps);
    let pair_index: Vec<u8> = layer.pair_index.iter().flat_map(|v| v.to_le_bytes()).collect();
    hash.bytes(&pair_index);
    hash.bytes(format!("{:?}", layer.bases).as_bytes());
    hash.bytes(format!("{:?}", layer.pair_blocks).as_bytes());
    hash.bytes(format!("{:?}", layer.stats).as_bytes());
    hash.bytes(format!("{info:?}").as_bytes());
    hash.0
}

/// One layer to quantize.
struct Job {
    weights: Matrix,
    hessian: Hessian,
}

/// Loads MiniLM, cuts the calibration samples and accumulates the 36 layer Hessians.
fn calibrate(tokens: usize) -> Result<Vec<Job>, String> {
    let dir = weights::models_dir().join("all-MiniLM-L6-v2");
    let model = MiniLm::load(&dir).map_err(|e| e.to_string())?;
    let tokenizer = WordPiece::load(&dir).map_err(|e| e.to_string())?;
    let shakespeare = weights::models_dir().join("shakespeare");
    let samples =
        hessian::minilm_calibration_samples(&shakespeare, &tokenizer, SENTENCE_WORDS, tokens)
            .map_err(|e| e.to_string())?;
    let hessians =
        hessian::capture_minilm(&model, "minilm", &samples).map_err(|e| e.to_string())?;
    let mut jobs = Vec::new();
    for (name, _, _) in model.linear_layers() {
        let accumulator = hessians
            .layer(&name)
            .ok_or_else(|| format!("no calibration inputs were captured for `{name}`"))?;
        jobs.push(Job {
            weights: model.linear_weight(&name).expect("listed layers exist"),
            hessian: accumulator.hessian().map_err(|e| e.to_string())?,
        });
    }
    Ok(jobs)
}

fn read_hashes(path: &Path) -> Option<Vec<(String, u64)>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (name, hex) = line.split_once(' ')?;
            Some((name.to_string(), u64::from_str_radix(hex.trim(), 16).ok()?))
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

fn main() {
    if let Err(message) = run() {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let options = parse_options()?;
    let r = Config::default_config()
        .resolve()
        .map_err(|e| e.to_string())?;
    let gptq_options = GptqOptions::default();

    let start = Instant::now();
    let jobs = calibrate(options.tokens)?;
    let capture = start.elapsed();
    println!(
        "calibration: {} tokens, {} layers, {:.3} s",
        options.tokens,
        jobs.len(),
        capture.as_secs_f64()
    );

    let bar = ProgressBar::new((options.runs * jobs.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} layers {elapsed}")
            .expect("the template is valid"),
    );
    let mut totals = Vec::new();
    let mut digests: Vec<Vec<u64>> = Vec::new();
    for _ in 0..options.runs {
        let start = Instant::now();
        let mut run_digests = Vec::new();
        let mut elapsed = Duration::ZERO;
        for job in &jobs {
            let layer_start = Instant::now();
            let (layer, info) =
                gptq::quantize_gptq(&job.weights, &job.hessian, &r, &gptq_options)
                    .map_err(|e| e.to_string())?;
            elapsed += layer_start.elapsed();
            run_digests.push(digest(&layer, &info, &r));
            bar.inc(1);
        }
        let _ = start;
        totals.push(elapsed.as_secs_f64());
        digests.push(run_digests);
    }
    bar.finish_and_clear();

    for (run, total) in totals.iter().enumerate() {
        println!("run {run}: {total:.3} s");
    }
    println!(
        "median {:.3} s, min {:.3} s",
        median(&totals),
        totals.iter().cloned().fold(f64::INFINITY, f64::min)
    );

    let hash_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(HASH_FILE);
    if options.write_hashes {
        let mut text = String::from("# layer FNV-1a-64 digest of the GPTQ result, default config, 2048 tokens\n");
        for (job, digest) in jobs.iter().zip(&digests[0]) {
            writeln!(text, "{} {digest:016x}", job.weights.name).unwrap();
        }
        std::fs::write(&hash_path, text).map_err(|e| e.to_string())?;
        println!("wrote {}", hash_path.display());
    }
    let expected = read_hashes(&hash_path);
    for (run, run_digests) in digests.iter().enumerate() {
        let matches = expected.as_ref().map(|expected| {
            expected.len() == run_digests.len()
                && expected.iter().zip(run_digests).all(|((_, e), d)| e == d)
        });
        println!("run {run} digests match {HASH_FILE}: {matches:?}");
    }
    Ok(())
}
