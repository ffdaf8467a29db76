//! `quantize --all-layers`: every linear layer of a model in one image set, and one layer of
//! the set simulated in RTL.

use std::process::Command;

fn glassllm_present(test: &str) -> bool {
    let path = microscopiq::weights::models_dir().join("glassllm").join("en.npz");
    if path.is_file() {
        return true;
    }
    if std::env::var_os("MICROSCOPIQ_SKIP_MODELS").is_some() {
        println!("skipping {test}: {} is missing", path.display());
        return false;
    }
    panic!("{test}: {} is missing; run `make fetch-models`", path.display());
}

#[test]
fn glassllm_image_set_has_every_layer() {
    if !glassllm_present("glassllm_image_set_has_every_layer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("set");
    let status = Command::new(env!("CARGO_BIN_EXE_microscopiq"))
        .args(["quantize", "--all-layers", "--model", "glassllm", "--rows", "8", "--cols", "8", "--vectors", "2", "--json", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "quantize --all-layers failed: {}", String::from_utf8_lossy(&status.stderr));
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 28, "glassllm has 4 blocks of 7 linear layers");
    assert_eq!(manifest["weights"], 720384);
    let ffn_down = layers.iter().find(|l| l["tensor"] == "blocks.0.ffn.W2").expect("blocks.0.ffn.W2 in the set");
    assert_eq!(ffn_down["shape"], serde_json::json!([128, 341]), "W2 is stored [in, out] and normalised to [out, in]");

    let folder = out.join(ffn_down["folder"].as_str().unwrap());
    let sim = Command::new(env!("CARGO_BIN_EXE_microscopiq"))
        .args(["simulate", "--json", "--image"])
        .arg(&folder)
        .output()
        .unwrap();
    assert!(sim.status.success(), "simulate failed: {}", String::from_utf8_lossy(&sim.stderr));
    let report: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&sim.stdout).trim()).unwrap();
    assert_eq!(report["mismatches"], 0, "{report}");
    assert_eq!(report["cycles"], report["cycles_predicted"], "{report}");
}
