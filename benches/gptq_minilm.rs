//! Benchmark: GPTQ-MicroScopiQ on all 36 linear layers of all-MiniLM-L6-v2.
//!
//! ```sh
//! cargo bench --bench gptq_minilm -- [--runs N] [--threads T] [--reference-runs N]
//!                                    [--tokens N] [--write-hashes]
//! ```
//!
//! Calibration captures the layer inputs of `--tokens` (default 2048) tokens of the
//! Shakespeare calibration text and is timed on its own. The GPTQ loop over the 36 layers
//! with the default configuration (b = 2, M = 8) then runs `--runs` times (default 5) with
//! the blocked factorisations on `--threads` threads (default: the available cores), and
//! `--reference-runs` times (default 1) with the reference factorisations on the same
//! threads. The program prints each run, the median and minimum, the time per layer kind
//! and phase, and whether every run's 36 results have the digests in
//! `benches/gptq_minilm_hashes.txt`. The code after ReCoN re-pairing and before the
//! quantizer's speed-ups wrote them, with the blocked and the reference factorisations alike.
//! A digest covers the packed image, the dequantized weights, every code of the quantized
//! layer and the `GptqInfo`. The program exits with an error when a digest differs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use microscopiq::config::{Config, Resolved};
use microscopiq::eval::SENTENCE_WORDS;
use microscopiq::gptq::{self, Factorizer, GptqInfo, GptqOptions, PhaseTimes};
use microscopiq::hessian::{self, Hessian};
use microscopiq::image;
use microscopiq::models::minilm::MiniLm;
use microscopiq::models::wordpiece::WordPiece;
use microscopiq::quantizer::QuantizedLayer;
use microscopiq::weights::{self, Matrix};

/// Options of the benchmark, printed by --help.
const USAGE: &str = "cargo bench --bench gptq_minilm -- [--runs N] [--reference-runs N] [--threads T] [--tokens N] [--write-hashes]
  --runs N            timed passes with the blocked factorisations (default 5)
  --reference-runs N  timed passes with the reference factorisations (default 1)
  --threads T         layers quantized in parallel (default: the available cores)
  --tokens N          calibration tokens (default 2048; other counts skip the digest check)
  --write-hashes      rewrite benches/gptq_minilm_hashes.txt from this run (2048 tokens only)";

/// Calibration tokens of the benchmark.
const DEFAULT_TOKENS: usize = 2048;

/// Timed GPTQ runs over all layers with the blocked factorisations.
const DEFAULT_RUNS: usize = 5;

/// Digests of the 36 results of the default configuration from 2048 tokens.
const HASH_FILE: &str = "benches/gptq_minilm_hashes.txt";

/// Layer kinds in the order of an encoder layer: the weight name after `encoder.layer.<i>.`.
const KINDS: [&str; 6] = [
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
];

struct Options {
    runs: usize,
    reference_runs: usize,
    threads: usize,
    tokens: usize,
    write_hashes: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        runs: DEFAULT_RUNS,
        reference_runs: 1,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        tokens: DEFAULT_TOKENS,
        write_hashes: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str, min: usize| -> Result<usize, String> {
            let text = args
                .next()
                .ok_or_else(|| format!("{name} needs a value"))?;
            text.parse()
                .ok()
                .filter(|&v| v >= min)
                .ok_or_else(|| format!("invalid {name} `{text}`: expected an integer of at least {min}"))
        };
        match arg.as_str() {
            "--runs" => options.runs = value("--runs", 1)?,
            "--reference-runs" => options.reference_runs = value("--reference-runs", 0)?,
            "--threads" => options.threads = value("--threads", 1)?,
            "--tokens" => options.tokens = value("--tokens", 1)?,
            "--write-hashes" => options.write_hashes = true,
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            "--help" | "-h" => {
                println!("{}", USAGE);
                std::process::exit(0);
            }
            other => {
                return Err(format!(
                    "unknown argument `{other}`; expected --runs N, --reference-runs N, \
                     --threads T, --tokens N or --write-hashes"
                ))
            }
        }
    }
    // The digest file describes the default run; digests of another token count would make
    // every later default run fail.
    if options.write_hashes && options.tokens != DEFAULT_TOKENS {
        return Err(format!(
            "invalid --write-hashes with --tokens {}: the stored digests are those of {DEFAULT_TOKENS} tokens; \
             drop --tokens",
            options.tokens
        ));
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

/// One timed GPTQ pass over every layer.
struct Run {
    factorizer: Factorizer,
    wall: Duration,
    /// CPU time of the process during the run, all threads.
    cpu: Option<f64>,
    /// Phase times by layer, summed over threads by the caller.
    times: Vec<PhaseTimes>,
    digests: Vec<u64>,
}

fn run_once(
    jobs: &[Job],
    r: &Resolved,
    factorizer: Factorizer,
    threads: usize,
    bar: &ProgressBar,
) -> Result<Run, String> {
    let layers: Vec<(&Matrix, &Hessian)> = jobs.iter().map(|j| (&j.weights, &j.hessian)).collect();
    let cpu_start = process_cpu_seconds();
    let start = Instant::now();
    let results = gptq::quantize_layers(
        &layers,
        r,
        &GptqOptions::default(),
        factorizer,
        threads,
        &|_| bar.inc(1),
    );
    let wall = start.elapsed();
    let cpu = process_cpu_seconds().zip(cpu_start).map(|(end, start)| end - start);
    let mut times = Vec::new();
    let mut digests = Vec::new();
    for result in results {
        let (layer, info, phase) = result.map_err(|e| e.to_string())?;
        times.push(phase);
        digests.push(digest(&layer, &info, r));
    }
    Ok(Run {
        factorizer,
        wall,
        cpu,
        times,
        digests,
    })
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Returns the CPU time of this process, user and system, from `/proc/self/stat`, or `None`
/// where that file does not exist. The kernel counts it in ticks of usually 10 ms.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // NOTE: assumes the usual 100 ticks per second (getconf CLK_TCK), which std cannot read.
    Some(ticks / 100.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| text.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// Prints the median and minimum wall time and the median phase times per layer kind.
/// Returns the kind of a MiniLM weight name such as `encoder.layer.3.output.dense.weight`.
fn kind_of(name: &str) -> &str {
    name.splitn(4, '.').nth(3).unwrap_or(name)
}

fn summarize(label: &str, runs: &[&Run], jobs: &[Job]) {
    if runs.is_empty() {
        return;
    }
    let walls: Vec<f64> = runs.iter().map(|run| seconds(run.wall)).collect();
    println!(
        "{label}: median {:.3} s, min {:.3} s over {} runs",
        median(&walls),
        walls.iter().cloned().fold(f64::INFINITY, f64::min),
        runs.len()
    );
    println!(
        "  {:<32} {:>7} {:>14} {:>12}",
        "layer kind (6 layers each)", "[N, K]", "factorisation", "column loop"
    );
    let mut total = (0.0, 0.0);
    for kind in KINDS {
        let indices: Vec<usize> = (0..jobs.len())
            .filter(|&i| kind_of(&jobs[i].weights.name) == kind)
            .collect();
        let phase = |f: fn(&PhaseTimes) -> Duration| {
            let sums: Vec<f64> = runs
                .iter()
                .map(|run| indices.iter().map(|&i| seconds(f(&run.times[i]))).sum())
                .collect();
            median(&sums)
        };
        let factorization = phase(|t| t.factorization);
        let columns = phase(|t| t.columns);
        total.0 += factorization;
        total.1 += columns;
        let shape = indices.first().map_or(String::new(), |&i| {
            format!("[{}, {}]", jobs[i].weights.rows, jobs[i].weights.cols)
        });
        println!(
            "  {:<32} {shape:>7} {factorization:>12.3} s {columns:>10.3} s",
            kind.trim_end_matches(".weight")
        );
    }
    println!(
        "  {:<32} {:>7} {:>12.3} s {:>10.3} s   (thread time, summed over layers)",
        "all 36 layers", "", total.0, total.1
    );
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
    println!("load average before: {}", load_average());

    let start = Instant::now();
    let jobs = calibrate(options.tokens)?;
    println!(
        "calibration: {} tokens, {} layers, {:.3} s (model loading, tokenizing and capture)",
        options.tokens,
        jobs.len(),
        start.elapsed().as_secs_f64()
    );

    let hash_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(HASH_FILE);
    let expected = if options.write_hashes || options.tokens != DEFAULT_TOKENS {
        None
    } else {
        Some(read_hashes(&hash_path).ok_or_else(|| {
            format!(
                "{} is missing or invalid; write it with --write-hashes from a commit whose \
                 results are known to be right",
                hash_path.display()
            )
        })?)
    };

    // The reference runs alternate with the blocked ones, so that both see similar load.
    let mut plan = vec![Factorizer::Blocked; options.runs];
    for k in 0..options.reference_runs {
        plan.insert((2 * k + 1).min(plan.len()), Factorizer::Reference);
    }
    let bar = ProgressBar::new((plan.len() * jobs.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} layers {elapsed} {msg}")
            .expect("the template is valid"),
    );
    let mut runs = Vec::new();
    for (index, &factorizer) in plan.iter().enumerate() {
        bar.set_message(format!("run {index}, {factorizer:?}"));
        runs.push(run_once(&jobs, &r, factorizer, options.threads, &bar)?);
    }
    bar.finish_and_clear();

    println!("threads: {}, load average after: {}", options.threads, load_average());
    let mut all_match = true;
    for (index, run) in runs.iter().enumerate() {
        let status = match &expected {
            None => "digests not checked".to_string(),
            Some(expected) => {
                let mismatched: Vec<&str> = jobs
                    .iter()
                    .zip(&run.digests)
                    .filter(|(job, digest)| {
                        expected.iter().find(|(name, _)| *name == job.weights.name).map(|e| e.1)
                            != Some(**digest)
                    })
                    .map(|(job, _)| job.weights.name.as_str())
                    .collect();
                all_match &= mismatched.is_empty() && expected.len() == jobs.len();
                if mismatched.is_empty() {
                    "36 digests match".to_string()
                } else {
                    format!("DIGESTS DIFFER for {}", mismatched.join(", "))
                }
            }
        };
        let factorization: Duration = run.times.iter().map(|t| t.factorization).sum();
        let columns: Duration = run.times.iter().map(|t| t.columns).sum();
        let cpu = run.cpu.map_or("unknown".to_string(), |cpu| format!("{cpu:.2} s"));
        println!(
            "run {index} {:<9} wall {:>7.3} s, CPU {cpu}  (factorisation {:.3} s, column loop {:.3} s, thread time)  {status}",
            format!("{:?}", run.factorizer),
            seconds(run.wall),
            seconds(factorization),
            seconds(columns)
        );
    }
    let blocked: Vec<&Run> = runs.iter().filter(|r| r.factorizer == Factorizer::Blocked).collect();
    let reference: Vec<&Run> =
        runs.iter().filter(|r| r.factorizer == Factorizer::Reference).collect();
    summarize("blocked", &blocked, &jobs);
    summarize("reference", &reference, &jobs);
    if !blocked.is_empty() && !reference.is_empty() {
        let wall = |runs: &[&Run]| median(&runs.iter().map(|r| seconds(r.wall)).collect::<Vec<_>>());
        println!(
            "reference / blocked wall time in this process: {:.2}",
            wall(&reference) / wall(&blocked)
        );
    }

    if options.write_hashes {
        let mut text = String::from(
            "# layer, FNV-1a-64 digest of its GPTQ result: default configuration, 2048 tokens\n",
        );
        for (job, digest) in jobs.iter().zip(&runs[0].digests) {
            writeln!(text, "{} {digest:016x}", job.weights.name).expect("writing to a String");
        }
        image::write_atomically(&hash_path, text.as_bytes()).map_err(|e| e.to_string())?;
        println!("wrote {}", hash_path.display());
    }
    let consistent = runs.iter().all(|run| run.digests == runs[0].digests);
    if !consistent {
        return Err("the runs gave different results".to_string());
    }
    if !all_match {
        return Err(format!("a result differs from {}", hash_path.display()));
    }
    Ok(())
}
