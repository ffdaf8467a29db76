//! `run --activations real` and `run --gptq`: a MiniLM layer simulated in RTL with its own
//! inputs, captured on held-out sentences and quantized to INT8 per token, and a GPTQ image.

mod common;

use microscopiq::flow;

#[test]
fn activations_quantize_per_row() {
    let rows = vec![vec![0.5f32, -1.0, 0.25], vec![0.0; 3], vec![2.0, 1.0, -0.01]];
    let q = flow::quantize_activations(&rows, 8);
    assert_eq!(q[0], vec![64, -127, 32]);
    assert_eq!(q[1], vec![0, 0, 0]);
    assert_eq!(q[2], vec![127, 64, -1]);
}

#[test]
fn run_with_real_minilm_activations() {
    let Some(_) = common::require_minilm("run_with_real_minilm_activations") else { return };
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_microscopiq"))
        .args(["run", "--json", "--activations", "real", "--rows", "8", "--cols", "8", "--vectors", "4"])
        .args(["--tensor", "encoder.layer.0.attention.self.query.weight"])
        .output()
        .expect("run the binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "run --activations real failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["cycles"], report["cycles_predicted"], "{report}");
    assert_eq!(report["outputs_compared"], 48 * 48 * 4 * 8, "{report}");
}

#[test]
fn real_activations_need_a_minilm_layer() {
    let Some(_) = common::require_minilm("real_activations_need_a_minilm_layer") else { return };
    let error = flow::capture_minilm_inputs("embeddings.word_embeddings.weight", 4).unwrap_err();
    assert!(error.contains("not a linear layer"), "{error}");
}

#[test]
fn run_gptq_image_matches_rtl() {
    let Some(_) = common::require_minilm("run_gptq_image_matches_rtl") else { return };
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_microscopiq"))
        .args(["run", "--json", "--gptq", "--activations", "real", "--rows", "8", "--cols", "8", "--vectors", "2"])
        .args(["--tensor", "encoder.layer.0.attention.self.query.weight"])
        .output()
        .expect("run the binary");
    assert!(output.status.success(), "run --gptq failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).expect("one JSON object");
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["cycles"], report["cycles_predicted"], "{report}");
    assert!(report["outliers"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn wrong_activation_width_rejected() {
    let r = common::resolve(&common::config(2, 4, 2, 4, 2));
    let weights = common::outlier_weights(4, 6, 1);
    let options = flow::RunOptions { activations: Some(vec![vec![1; 9]]), ..flow::RunOptions::default() };
    let error = flow::run(&r, &weights, &options, &|_| {}).expect_err("9 activations for 6 input channels");
    assert!(error.contains("9 elements"), "message does not give the activation width: {error}");
    assert!(error.contains("6 input channels"), "message does not give the layer width: {error}");
    assert!(error.contains("--layout"), "message does not point at --layout: {error}");
}
