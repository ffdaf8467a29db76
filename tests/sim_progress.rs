//! Progress lines of the testbench. A real Verilator and Icarus run of a small layer must
//! report every expected progress line in order. The command-line tool must keep its
//! `--json` output clean, and a short run quiet on a stderr that is not a terminal.

mod common;

use std::cell::RefCell;
use std::path::Path;
use std::process::{Command, Output};

use microscopiq::flow;
use microscopiq::golden;
use microscopiq::image;
use microscopiq::quantizer;
use microscopiq::simulation::{self, SimEvent, SimOptions, SimProgress, Simulator};

/// Activation vectors of the small layer: 15 passes x 12 vectors = 180 output lines, so
/// the testbench prints a progress line every 2 output lines.
const VECTORS: usize = 12;

/// Simulates a 24 x 20 layer on a 4x8 array with `simulator` and checks its progress events.
fn check_progress(simulator: Simulator) {
    let label = format!("{simulator:?}");
    let r = common::resolve(&common::config(4, 8, 2, 8, 4));
    let layer = quantizer::quantize(&common::outlier_weights(24, 20, 3), &r);
    let acts = flow::random_activations(VECTORS, layer.k_pad, r.a, 3);
    let image = image::build(&layer, &r, &acts);
    let prediction = golden::predict(&r, &image);
    let passes = image.tiles();
    assert_eq!(passes, 15, "{label}: passes of the 24 x 20 layer on a 4x8 array");

    let events = RefCell::new(Vec::new());
    let options = SimOptions { simulator, ..SimOptions::default() };
    let sim = simulation::simulate_with_progress(&r, &image, prediction.cycles, &options, &|event| events.borrow_mut().push(event))
        .unwrap_or_else(|e| panic!("{label}: simulation failed: {e}"));
    let comparison = simulation::compare(&prediction, &sim, image.vectors);
    assert!(comparison.passed(), "{label}: RTL differs from the golden model: {comparison:?}; files in {}", sim.work_dir.display());
    let _ = std::fs::remove_dir_all(&sim.work_dir);

    let events = events.into_inner();
    assert_eq!(events.first(), Some(&SimEvent::Building(simulator)), "{label}: first event");
    assert_eq!(
        events.get(1),
        Some(&SimEvent::Running { simulator, passes, vectors: VECTORS }),
        "{label}: second event"
    );
    let steps: Vec<SimProgress> = events[2..]
        .iter()
        .map(|event| match event {
            SimEvent::Progress(step) => *step,
            other => panic!("{label}: {other:?} after the simulation started"),
        })
        .collect();

    let total = (passes * VECTORS) as u64;
    let every = simulation::progress_interval(passes * VECTORS) as u64;
    assert_eq!(every, 2, "{label}: progress interval for {total} output lines");
    let expected_lines: Vec<u64> = (1..=total).filter(|lines| lines % every == 0).collect();
    let got_lines: Vec<u64> = steps.iter().map(|step| step.lines).collect();
    assert_eq!(got_lines, expected_lines, "{label}: output lines of the progress lines");
    assert!(steps.iter().all(|step| step.total == total), "{label}: every progress line names {total} output lines");
    for step in &steps {
        let index = step.lines as usize - 1;
        assert_eq!(step.cycle, sim.output_cycles[index], "{label}: cycle of output line {}", step.lines);
    }
}

#[test]
fn progress_lines_verilator() {
    check_progress(Simulator::Verilator);
}

#[test]
fn progress_lines_icarus() {
    check_progress(Simulator::Icarus);
}

fn run_binary(args: &[&str]) -> Output {
    Command::new(common::binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", common::binary().display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `matrix` as the F32 tensor `name` of a safetensors file.
fn write_safetensors(path: &Path, name: &str, matrix: &microscopiq::weights::Matrix) {
    let bytes: Vec<u8> = (0..matrix.rows)
        .flat_map(|n| (0..matrix.cols).map(move |k| (n, k)))
        .flat_map(|(n, k)| matrix.get(n, k).to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![matrix.rows, matrix.cols], &bytes)
        .expect("valid tensor view");
    let file = safetensors::serialize([(name, view)], None).expect("tensor serialises");
    std::fs::write(path, file).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

#[test]
fn simulate_json_stays_clean() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let weights = dir.path().join("weights.safetensors");
    write_safetensors(&weights, "layer.weight", &common::outlier_weights(24, 20, 4));
    let image = dir.path().join("image");
    let (weights, image) = (weights.to_str().expect("UTF-8 path"), image.to_str().expect("UTF-8 path"));
    let quantize = run_binary(&[
        "quantize", "--rows", "4", "--cols", "8", "--weights", weights, "--tensor", "layer.weight",
        "--out", image, "--vectors", "12", "--json",
    ]);
    assert!(quantize.status.success(), "quantize failed: {}", text(&quantize.stderr));

    let json = run_binary(&["simulate", "--image", image, "--json"]);
    assert!(json.status.success(), "simulate --json failed: {}{}", text(&json.stdout), text(&json.stderr));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| panic!("simulate --json printed more than one JSON value ({e}):\n{}", text(&json.stdout)));
    assert_eq!(report["mismatches"], 0, "simulate --json: {report}");
    assert_eq!(report["compared"], 15 * 12 * 8, "simulate --json: outputs compared (15 passes x 12 vectors x 8 columns)");
    assert_eq!(text(&json.stderr), "", "simulate --json wrote to stderr");

    // stderr is a pipe here, so the tool prints plain progress lines, and a run shorter than
    // their interval prints none.
    let table = run_binary(&["simulate", "--image", image]);
    assert!(table.status.success(), "simulate failed: {}{}", text(&table.stdout), text(&table.stderr));
    assert!(text(&table.stdout).contains("mismatches          0"), "simulate printed:\n{}", text(&table.stdout));
    assert_eq!(text(&table.stderr), "", "a short simulate run wrote to stderr");
}
