//! Verilator co-simulation: builds the generated RTL with a generated testbench, runs it on
//! an image and compares every output and the cycle count with the golden model.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bits::{index_bits, sign_extend, BitWord};
use crate::config::Resolved;
use crate::generator::{self, GeneratedFile, TestbenchParams};
use crate::golden::Prediction;
use crate::image::{self, Image};

/// Debian packages that provide the external tools.
pub const TOOL_PACKAGES: &str = "verilator yosys iverilog";

/// A failed simulation step, with what to do about it.
#[derive(Debug)]
pub struct SimError(pub String);

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SimError {}

/// Finds `tool` on PATH or explains how to install it.
pub fn find_tool(tool: &str) -> Result<PathBuf, SimError> {
    which::which(tool).map_err(|_| {
        SimError(format!(
            "{tool} not found on PATH; install it with `apt-get install {TOOL_PACKAGES}` \
             (or run `make deps` as root)"
        ))
    })
}

/// Version line of Verilator, such as "Verilator 5.006 2023-01-22".
pub fn verilator_version() -> Result<String, SimError> {
    let verilator = find_tool("verilator")?;
    let out = Command::new(verilator)
        .arg("--version")
        .output()
        .map_err(|e| SimError(format!("failed to run verilator --version: {e}")))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn run_checked(cmd: &mut Command, what: &str, log: &Path) -> Result<(), SimError> {
    let out = cmd.output().map_err(|e| SimError(format!("failed to start {what}: {e}")))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::write(log, &text);
    if !out.status.success() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(SimError(format!(
            "{what} failed ({}); log in {}:\n{}",
            out.status,
            log.display(),
            tail.join("\n")
        )));
    }
    Ok(())
}

/// Runs `verilator --lint-only -Wall` on the design sources in `dir`.
pub fn lint(dir: &Path, files: &[GeneratedFile]) -> Result<(), SimError> {
    let verilator = find_tool("verilator")?;
    let mut cmd = Command::new(verilator);
    cmd.current_dir(dir).args(["--lint-only", "-Wall", "--top-module", "msq_top"]);
    for f in files {
        cmd.arg(&f.name);
    }
    run_checked(&mut cmd, "verilator --lint-only -Wall", &dir.join("lint.log"))
}

/// Testbench parameters for an image.
pub fn testbench_params(r: &Resolved, image: &Image, predicted_cycles: u64) -> TestbenchParams {
    let depth = |n: usize| n.max(1);
    TestbenchParams {
        row_depth: depth(image.row_words.len()),
        pair_depth: depth(image.pair_words.len()),
        pair_entries: image.pair_words.len(),
        act_depth: depth(image.act_words.len()),
        hdr_depth: depth(image.header_words.len()),
        hdr_index_bits: index_bits(depth(image.header_words.len()) as u64).min(r.config.array.address_bits),
        row_index_bits: index_bits(depth(image.row_words.len()) as u64).min(r.config.array.address_bits),
        pair_index_bits: index_bits(depth(image.pair_words.len()) as u64).min(r.config.array.address_bits),
        act_index_bits: index_bits(depth(image.act_words.len()) as u64).min(r.config.array.address_bits),
        tiles: image.tiles(),
        k_tiles: image.k_tiles,
        vectors: image.vectors,
        max_cycles: predicted_cycles * 2 + 1000,
    }
}

/// Outputs read back from a simulation.
#[derive(Clone, Debug)]
pub struct SimResult {
    /// `outputs[t * vectors + v][c]`.
    pub outputs: Vec<Vec<i128>>,
    /// Cycle of each output line.
    pub output_cycles: Vec<u64>,
    /// Cycle of the first `done_o`.
    pub cycles: u64,
    /// Folder with the sources, the build and the run files.
    pub work_dir: PathBuf,
}

/// Simulator that runs the generated testbench.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Simulator {
    /// Verilator (two-state, compiled), the default.
    #[default]
    Verilator,
    /// Icarus Verilog (four-state), which shows X propagation that Verilator hides.
    Icarus,
}

/// Options of one simulation run.
#[derive(Clone, Debug, Default)]
pub struct SimOptions {
    /// Build and run here instead of a temporary folder; the folder is kept.
    pub work_dir: Option<PathBuf>,
    pub simulator: Simulator,
}

/// Generates, builds and runs the RTL of `r` on `image`.
///
/// The work folder is always kept, also when a step fails, so the build can be inspected.
/// Callers remove [`SimResult::work_dir`] when they no longer need it.
pub fn simulate(r: &Resolved, image: &Image, predicted_cycles: u64, options: &SimOptions) -> Result<SimResult, SimError> {
    if image.tiles() == 0 || image.vectors == 0 {
        return Err(SimError("nothing to simulate: the image has no tiles or no activation vectors".into()));
    }
    let limit = 1u64 << r.config.array.address_bits;
    for (what, n) in [
        ("row words", image.row_words.len()),
        ("pair entries", image.pair_words.len()),
        ("pass headers", image.header_words.len()),
        ("activation words", image.act_words.len()),
    ] {
        if n as u64 > limit {
            return Err(SimError(format!(
                "the image has {n} {what}, more than address_bits = {} can address; raise address_bits",
                r.config.array.address_bits
            )));
        }
    }
    let tool = match options.simulator {
        Simulator::Verilator => find_tool("verilator")?,
        Simulator::Icarus => find_tool("iverilog")?,
    };
    let work_dir = match &options.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| SimError(format!("cannot create {}: {e}", dir.display())))?;
            dir.clone()
        }
        None => tempfile::Builder::new()
            .prefix("microscopiq-sim-")
            .tempdir()
            .map_err(|e| SimError(format!("cannot create a temporary folder: {e}")))?
            .keep(),
    };
    let io_err = |e: std::io::Error| SimError(format!("cannot write into {}: {e}", work_dir.display()));

    let mut files = generator::generate_rtl(r);
    let tb = testbench_params(r, image, predicted_cycles);
    files.push(generator::generate_testbench(r, &tb));
    generator::write_files(&work_dir, &files).map_err(io_err)?;
    image::write_hex_files(&work_dir, image).map_err(io_err)?;

    match options.simulator {
        Simulator::Verilator => {
            let mut build = Command::new(tool);
            build
                .current_dir(&work_dir)
                .args(["--binary", "--timing", "-j", "2", "--top-module", "msq_tb", "-o", "msq_sim", "--Mdir", "obj"])
                .args(["--x-assign", "unique", "--x-initial", "unique"]);
            for f in &files {
                build.arg(&f.name);
            }
            run_checked(&mut build, "verilator --binary", &work_dir.join("build.log"))?;
            let mut run = Command::new(work_dir.join("obj/msq_sim"));
            run.current_dir(&work_dir);
            run_checked(&mut run, "simulation", &work_dir.join("run.log"))?;
        }
        Simulator::Icarus => {
            let mut build = Command::new(tool);
            build.current_dir(&work_dir).args(["-g2012", "-s", "msq_tb", "-o", "msq_sim.vvp"]);
            for f in &files {
                build.arg(&f.name);
            }
            run_checked(&mut build, "iverilog", &work_dir.join("build.log"))?;
            let vvp = find_tool("vvp")?;
            let mut run = Command::new(vvp);
            run.current_dir(&work_dir).args(["-n", "msq_sim.vvp"]);
            run_checked(&mut run, "vvp", &work_dir.join("run.log"))?;
        }
    }

    let text = std::fs::read_to_string(work_dir.join("outputs.txt"))
        .map_err(|e| SimError(format!("cannot read {}/outputs.txt: {e}", work_dir.display())))?;
    let (outputs, output_cycles, cycles) = parse_outputs(&text, r)?;
    Ok(SimResult { outputs, output_cycles, cycles, work_dir })
}

fn parse_outputs(text: &str, r: &Resolved) -> Result<(Vec<Vec<i128>>, Vec<u64>, u64), SimError> {
    let acc = r.acc_width as usize;
    let mut outputs = Vec::new();
    let mut cycles_of = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut parts = line.split_whitespace();
        let head = parts.next().unwrap_or("");
        let bad = || SimError(format!("outputs.txt:{}: unexpected line `{line}`", i + 1));
        match head {
            "done" => {
                let cycles = parts.next().and_then(|c| c.parse().ok()).ok_or_else(bad)?;
                return Ok((outputs, cycles_of, cycles));
            }
            "timeout" => {
                return Err(SimError(format!(
                    "the simulation timed out at cycle {} without done_o",
                    parts.next().unwrap_or("?")
                )))
            }
            _ => {
                let cycle: u64 = head.parse().map_err(|_| bad())?;
                // An x or z digit from a four-state simulator fails to parse, which reports
                // unknown values as an error instead of reading them as numbers.
                let word = parts.next().and_then(|h| BitWord::from_hex(h, r.cols * acc)).ok_or_else(bad)?;
                outputs.push((0..r.cols).map(|c| sign_extend(word.get_wide(c * acc, acc), acc as u32)).collect());
                cycles_of.push(cycle);
            }
        }
    }
    Err(SimError("outputs.txt ends without a `done` line: the simulation stopped early".into()))
}

/// First difference between the RTL and the golden model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Mismatch {
    pub tile: usize,
    pub vector: usize,
    pub column: usize,
    /// Cycle at which the RTL emitted the output (0 when the output is missing).
    pub cycle: u64,
    pub expected: String,
    pub got: String,
}

/// Result of comparing a simulation with the golden model.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Comparison {
    /// Column outputs compared.
    pub compared: usize,
    pub mismatches: usize,
    pub first: Option<Mismatch>,
    pub cycles: u64,
    pub cycles_predicted: u64,
}

impl Comparison {
    /// True when every output and the cycle count match.
    pub fn passed(&self) -> bool {
        self.mismatches == 0 && self.cycles == self.cycles_predicted
    }
}

/// Compares every output bit for bit and the cycle count.
pub fn compare(prediction: &Prediction, sim: &SimResult, vectors: usize) -> Comparison {
    let mut compared = 0;
    let mut mismatches = 0;
    let mut first = None;
    let n = prediction.outputs.len().max(sim.outputs.len());
    for i in 0..n {
        let expected = prediction.outputs.get(i);
        let got = sim.outputs.get(i);
        let columns = expected.map_or(0, |e| e.len()).max(got.map_or(0, |g| g.len()));
        for c in 0..columns {
            compared += 1;
            let e = expected.and_then(|e| e.get(c));
            let g = got.and_then(|g| g.get(c));
            if e != g {
                mismatches += 1;
                if first.is_none() {
                    first = Some(Mismatch {
                        tile: i / vectors.max(1),
                        vector: i % vectors.max(1),
                        column: c,
                        cycle: sim.output_cycles.get(i).copied().unwrap_or(0),
                        expected: e.map_or("missing".into(), |v| v.to_string()),
                        got: g.map_or("missing".into(), |v| v.to_string()),
                    });
                }
            }
        }
    }
    Comparison { compared, mismatches, first, cycles: sim.cycles, cycles_predicted: prediction.cycles }
}
