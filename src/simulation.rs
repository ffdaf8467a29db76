//! Verilator co-simulation: builds the generated RTL with a generated testbench, runs it on
//! an image and compares every output and the cycle count with the golden model.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::bits::{index_bits, sign_extend, BitWord};
use crate::config::Resolved;
use crate::generator::{self, GeneratedFile, TestbenchParams};
use crate::golden::Prediction;
use crate::image::{self, Image};

/// Predicted cycle count below which the Verilator model is compiled without optimisation.
pub const SHORT_RUN_CYCLES: u64 = 20_000;

/// Debian packages that provide the external tools.
pub const TOOL_PACKAGES: &str = "verilator yosys iverilog nextpnr-ice40 fpga-icestorm";

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
    run_streaming(cmd, what, log, &mut |_| {})
}

/// Runs `cmd` like [`run_checked`] and passes each line of its stdout to `on_line` as the
/// process writes it.
///
/// stderr is collected by a second thread, so a process that fills the stderr pipe cannot
/// block. The log contains stdout followed by stderr.
fn run_streaming(cmd: &mut Command, what: &str, log: &Path, on_line: &mut dyn FnMut(&str)) -> Result<(), SimError> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SimError(format!("failed to start {what}: {e}")))?;
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let stderr_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let mut text = String::new();
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut line = Vec::new();
    loop {
        line.clear();
        match stdout.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                let decoded = String::from_utf8_lossy(&line);
                on_line(decoded.trim_end_matches(['\n', '\r']));
                text.push_str(&decoded);
            }
            Err(e) => {
                text.push_str(&format!("(reading the output of {what} failed: {e})\n"));
                break;
            }
        }
    }
    let status = child.wait().map_err(|e| SimError(format!("failed to wait for {what}: {e}")))?;
    text.push_str(&String::from_utf8_lossy(&stderr_reader.join().unwrap_or_default()));
    let _ = std::fs::write(log, &text);
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(SimError(format!(
            "{what} failed ({}); log in {}:\n{}",
            status,
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
pub fn testbench_params(r: &Resolved, image: &Image, predicted_cycles: u64, wide: bool) -> TestbenchParams {
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
        wide,
        progress_every: progress_interval(image.tiles() * image.vectors),
    }
}

/// Maximum progress lines that the testbench prints in one run, whatever its length.
pub const MAX_PROGRESS_LINES: usize = 100;

/// Output lines between two progress lines of the testbench for a run of `output_lines`
/// lines, so that it prints at most [`MAX_PROGRESS_LINES`], the last one after the last
/// output line.
pub fn progress_interval(output_lines: usize) -> usize {
    output_lines.div_ceil(MAX_PROGRESS_LINES).max(1)
}

/// A step of [`simulate_with_progress`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// The simulator starts compiling the design and the testbench.
    Building(Simulator),
    /// The compiled simulation starts: `passes` passes of `vectors` output lines each.
    Running { simulator: Simulator, passes: usize, vectors: usize },
    /// The testbench has written `lines` of `total` output lines, the last one at `cycle`.
    Progress(SimProgress),
}

/// One progress line of the testbench.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimProgress {
    /// Output lines written so far.
    pub lines: u64,
    /// Output lines of the whole run (passes times vectors).
    pub total: u64,
    /// Cycle of the last output line written.
    pub cycle: u64,
}

/// Parses a testbench progress line, "msq_progress <lines> <total> <cycle>".
///
/// Returns `None` for every other line, such as the simulator's own messages.
pub fn parse_progress(line: &str) -> Option<SimProgress> {
    let mut parts = line.split_whitespace();
    if parts.next()? != "msq_progress" {
        return None;
    }
    let mut number = || parts.next()?.parse::<u64>().ok();
    let progress = SimProgress { lines: number()?, total: number()?, cycle: number()? };
    parts.next().is_none().then_some(progress)
}

/// C++ main for coverage builds. Verilator 5.006's generated `--main` does not write the
/// coverage database, so coverage runs use this loop instead, which writes `coverage.dat`.
const COVERAGE_MAIN: &str = r#"// Generated by microscopiq: simulation loop that writes line coverage.
#include <memory>
#include "Vmsq_tb.h"
#include "verilated.h"
#include "verilated_cov.h"

int main(int argc, char** argv) {
    const std::unique_ptr<VerilatedContext> context{new VerilatedContext};
    context->commandArgs(argc, argv);
    const std::unique_ptr<Vmsq_tb> top{new Vmsq_tb{context.get()}};
    while (!context->gotFinish()) {
        top->eval();
        if (!top->eventsPending()) break;
        context->time(top->nextTimeSlot());
    }
    top->final();
    context->coveragep()->write("coverage.dat");
    return 0;
}
"#;

/// Line coverage summary written by `verilator_coverage --annotate`, such as
/// "Total coverage (290/312) 92.00%".
pub fn coverage_summary(work_dir: &Path) -> Option<String> {
    let log = std::fs::read_to_string(work_dir.join("coverage.log")).ok()?;
    log.lines().find(|l| l.contains("Total coverage")).map(|l| l.trim().to_string())
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
    /// Dump waveforms to `waves.fst` in the work folder.
    pub trace: bool,
    /// Collect line coverage (Verilator only) and annotate the sources into `coverage/`.
    pub coverage: bool,
}

/// Generates, builds and runs the RTL of `r` on `image`.
///
/// The work folder is always kept, also when a step fails, so the build can be inspected.
/// Callers remove [`SimResult::work_dir`] when they no longer need it.
pub fn simulate(r: &Resolved, image: &Image, predicted_cycles: u64, options: &SimOptions) -> Result<SimResult, SimError> {
    simulate_layer(r, r, image, predicted_cycles, options)
}

/// Runs [`simulate`] and reports its steps and the testbench's progress lines to `progress`
/// while the simulator runs.
pub fn simulate_with_progress(
    r: &Resolved,
    image: &Image,
    predicted_cycles: u64,
    options: &SimOptions,
    progress: &dyn Fn(SimEvent),
) -> Result<SimResult, SimError> {
    simulate_layer_with_progress(r, r, image, predicted_cycles, options, progress)
}

/// Generates, builds and runs the RTL of the array `design` on `image`, an image of layer
/// configuration `layer`: `design` itself, or its 2b-bit layers on a multi-precision array.
///
/// The work folder is kept as in [`simulate`].
pub fn simulate_layer(
    design: &Resolved,
    layer: &Resolved,
    image: &Image,
    predicted_cycles: u64,
    options: &SimOptions,
) -> Result<SimResult, SimError> {
    simulate_layer_with_progress(design, layer, image, predicted_cycles, options, &|_| {})
}

/// Runs [`simulate_layer`] and reports progress as [`simulate_with_progress`] does.
pub fn simulate_layer_with_progress(
    design: &Resolved,
    layer: &Resolved,
    image: &Image,
    predicted_cycles: u64,
    options: &SimOptions,
    progress: &dyn Fn(SimEvent),
) -> Result<SimResult, SimError> {
    let r = design;
    let wide = layer.b != design.b;
    if design.layer_config(layer.b).map(|expected| expected != layer).unwrap_or(true) {
        return Err(SimError(format!(
            "the image's configuration (hash {}) is not one that the array (hash {}) runs; quantize the \
             layer with the array's configuration{}",
            layer.hash,
            design.hash,
            if design.wide.is_some() { " or its 2b-bit layer configuration" } else { "" }
        )));
    }
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
    let tb = testbench_params(r, image, predicted_cycles, wide);
    files.push(generator::generate_testbench(r, &tb));
    generator::write_files(&work_dir, &files).map_err(io_err)?;
    image::write_hex_files(&work_dir, image).map_err(io_err)?;

    progress(SimEvent::Building(options.simulator));
    let running = SimEvent::Running { simulator: options.simulator, passes: image.tiles(), vectors: image.vectors };
    let mut on_line = |line: &str| {
        if let Some(step) = parse_progress(line) {
            progress(SimEvent::Progress(step));
        }
    };
    match options.simulator {
        Simulator::Verilator => {
            let mut build = Command::new(tool);
            build.current_dir(&work_dir);
            if options.coverage {
                std::fs::write(work_dir.join("sim_main.cpp"), COVERAGE_MAIN).map_err(io_err)?;
                build.args(["--cc", "--exe", "--build", "--timing", "--coverage-line", "sim_main.cpp"]);
            } else {
                build.args(["--binary"]);
            }
            // Short runs spend most of their time compiling the model, so they compile it
            // without optimisation; long runs keep Verilator's default.
            if predicted_cycles < SHORT_RUN_CYCLES {
                build.args(["-MAKEFLAGS", "OPT_FAST=-O0 OPT_GLOBAL=-O0"]);
            }
            build
                .args(["-j", "2", "--top-module", "msq_tb", "-o", "msq_sim", "--Mdir", "obj"])
                .args(["--x-assign", "unique", "--x-initial", "unique"]);
            if options.trace {
                build.args(["--trace-fst", "+define+MSQ_TRACE"]);
            }
            for f in &files {
                build.arg(&f.name);
            }
            run_checked(&mut build, "verilator --binary", &work_dir.join("build.log"))?;
            let mut run = Command::new(work_dir.join("obj/msq_sim"));
            run.current_dir(&work_dir);
            progress(running);
            run_streaming(&mut run, "simulation", &work_dir.join("run.log"), &mut on_line)?;
            if options.coverage {
                let coverage_tool = find_tool("verilator_coverage")?;
                let mut annotate = Command::new(coverage_tool);
                annotate.current_dir(&work_dir).args(["--annotate", "coverage", "coverage.dat"]);
                run_checked(&mut annotate, "verilator_coverage", &work_dir.join("coverage.log"))?;
            }
        }
        Simulator::Icarus => {
            if options.coverage {
                return Err(SimError("line coverage needs Verilator; drop --coverage or use --simulator verilator".into()));
            }
            let mut build = Command::new(tool);
            build.current_dir(&work_dir).args(["-g2012", "-s", "msq_tb", "-o", "msq_sim.vvp"]);
            if options.trace {
                build.arg("-DMSQ_TRACE");
            }
            for f in &files {
                build.arg(&f.name);
            }
            run_checked(&mut build, "iverilog", &work_dir.join("build.log"))?;
            let vvp = find_tool("vvp")?;
            let mut run = Command::new(vvp);
            run.current_dir(&work_dir).args(["-n", "msq_sim.vvp"]);
            if options.trace {
                run.arg("-fst");
            }
            progress(running);
            run_streaming(&mut run, "vvp", &work_dir.join("run.log"), &mut on_line)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_parses() {
        let expected = SimProgress { lines: 12, total: 96, cycle: 140 };
        assert_eq!(parse_progress("msq_progress 12 96 140"), Some(expected));
        assert_eq!(parse_progress("msq_progress 12 96 140  "), Some(expected));
    }

    #[test]
    fn other_lines_are_not_progress() {
        for line in ["- msq_tb.sv:127: Verilog $finish", "msq_progress 12 96", "msq_progress 12 96 140 7", "msq_progress a 96 140", ""] {
            assert_eq!(parse_progress(line), None, "`{line}`");
        }
    }

    #[test]
    fn progress_interval_bounds_lines() {
        assert_eq!(progress_interval(0), 1);
        assert_eq!(progress_interval(75), 1);
        assert_eq!(progress_interval(100), 1);
        assert_eq!(progress_interval(101), 2);
        assert_eq!(progress_interval(147_456), 1475);
        for total in [1usize, 99, 100, 101, 999, 147_456] {
            let lines = total.div_ceil(progress_interval(total));
            assert!(lines <= MAX_PROGRESS_LINES, "{total} output lines give {lines} progress lines");
        }
    }
}
