//! The manifest of an image set: every linear layer of a model quantized into one folder
//! per layer by `quantize --all-layers`, with the method, the configuration and, for GPTQ,
//! the calibration and the GPTQ facts of each layer.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Resolved};
use crate::gptq::GptqInfo;
use crate::image;

/// Top-level `manifest.json` of an image set.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetManifest {
    pub format_version: u32,
    pub generator_version: String,
    /// Hash of the configuration every layer was quantized with.
    pub config_hash: String,
    /// That configuration as TOML, as `generate --print-config` prints it.
    pub config: String,
    /// `minilm` or `glassllm`.
    pub model: String,
    /// The MiniLM safetensors file the layers come from, or `None` for glassllm.
    #[serde(default)]
    pub weights_file: Option<String>,
    /// `rtn` (round to nearest) or `gptq`.
    pub method: String,
    /// Calibration of a GPTQ set, or `None` for round to nearest.
    #[serde(default)]
    pub calibration: Option<CalibrationRecord>,
    /// Weights of all layers together.
    pub weights: usize,
    /// Effective bit width of all layers together.
    pub ebw: f64,
    /// Routing outcomes of all layers, indexed by the outlier candidates of a micro-block.
    #[serde(default)]
    pub routing: Vec<crate::quantizer::RoutingCounts>,
    pub layers: Vec<SetLayer>,
}

/// Calibration text and mode of a GPTQ image set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRecord {
    /// Text slices and samples, such as `macbeth_gut.txt chars 20000..60000 + ...`.
    pub text: String,
    /// Calibration samples: MiniLM sentences or glassllm windows.
    pub samples: usize,
    /// Tokens over all samples, which is the number of rows in every layer's Hessian.
    pub tokens: usize,
    /// Each layer was calibrated on the inputs of a model whose earlier layers were already
    /// quantized, instead of on the FP32 model's inputs.
    pub sequential: bool,
}

/// One layer of an image set.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetLayer {
    pub tensor: String,
    /// Folder of the layer image inside the set.
    pub folder: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    pub ebw: f64,
    pub outliers: usize,
    /// Outliers demoted to inliers because no routable pair set hosted them.
    #[serde(default)]
    pub demoted: usize,
    /// Micro-blocks whose pruned slots were moved so that ReCoN could route them.
    #[serde(default)]
    pub repaired: usize,
    pub relative_error: f64,
    pub cycles_predicted: u64,
    /// GPTQ facts of the layer, or `None` for round to nearest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gptq: Option<GptqRecord>,
}

/// GPTQ facts of one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GptqRecord {
    /// λ added to the diagonal of the Hessian, or `None` after the fallback.
    pub damping: Option<f64>,
    /// λ over the mean diagonal of the Hessian.
    pub relative_damping: Option<f64>,
    /// Factorisations that failed before the damping was large enough.
    pub damping_retries: u32,
    /// Input channels that were zero on every calibration token.
    pub dead_channels: usize,
    /// The Hessian could not be factorised, so the layer was rounded to nearest.
    pub fell_back_to_rtn: bool,
}

impl From<&GptqInfo> for GptqRecord {
    fn from(info: &GptqInfo) -> GptqRecord {
        GptqRecord {
            damping: info.damping,
            relative_damping: info.relative_damping,
            damping_retries: info.damping_retries,
            dead_channels: info.dead_channels.len(),
            fell_back_to_rtn: info.fell_back_to_rtn,
        }
    }
}

impl SetManifest {
    /// Reads `manifest.json` of the image set in `dir` and checks its format version.
    pub fn read(dir: &Path) -> Result<SetManifest, String> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!("cannot read {}: {e}; write the image set with `microscopiq quantize --all-layers --out {}`", path.display(), dir.display())
        })?;
        let manifest: SetManifest = serde_json::from_str(&text).map_err(|e| {
            format!("invalid image set manifest {}: {e}; quantize the set again with `quantize --all-layers`", path.display())
        })?;
        // A layer folder is a plain child of the set, so a manifest cannot point a run at
        // another set's images.
        if let Some(layer) = manifest.layers.iter().find(|l| {
            let mut parts = Path::new(&l.folder).components();
            !matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None))
        }) {
            return Err(format!(
                "invalid image set manifest {}: layer `{}` has folder `{}`, which is not a folder name inside the set; \
                 quantize the set again with `quantize --all-layers`",
                path.display(),
                layer.tensor,
                layer.folder
            ));
        }
        if manifest.format_version != image::FORMAT_VERSION {
            return Err(format!(
                "{} has image format version {}, this tool reads version {}; quantize the set again",
                path.display(),
                manifest.format_version,
                image::FORMAT_VERSION
            ));
        }
        Ok(manifest)
    }

    /// Returns the layer named `name`, matched against the tensor names and the folder names,
    /// or an error that lists the available tensor names.
    pub fn layer(&self, name: &str) -> Result<&SetLayer, String> {
        self.layers.iter().find(|layer| layer.tensor == name || layer.folder == name).ok_or_else(|| {
            let names: Vec<&str> = self.layers.iter().map(|layer| layer.tensor.as_str()).collect();
            format!("layer `{name}` is not in the image set; its {} layers are: {}", names.len(), names.join(", "))
        })
    }

    /// Parses the configuration the set was quantized with.
    pub fn parsed_config(&self) -> Result<Config, String> {
        Config::from_toml(&self.config, "the image set manifest").map_err(|e| e.to_string())
    }

    /// Returns an error when `r` is not the configuration the set was quantized with.
    pub fn check_config(&self, r: &Resolved, dir: &Path) -> Result<(), String> {
        if r.hash == self.config_hash {
            return Ok(());
        }
        let recorded = self.parsed_config().and_then(|c| c.resolve().map_err(|e| e.to_string()))?;
        Err(format!(
            "the configuration options give configuration {} ({}), but the image set {} was quantized \
             with configuration {} ({}); drop the configuration options to use the set's, or \
             quantize the set again with them",
            r.hash,
            describe(r),
            dir.display(),
            self.config_hash,
            describe(&recorded)
        ))
    }
}

/// Describes the main parameters of a configuration in one line.
fn describe(r: &Resolved) -> String {
    format!(
        "{}x{} array, b = {}, A = {}, M = {}, {} pairs per micro-block, k_sigma = {}",
        r.rows, r.cols, r.b, r.a, r.m, r.max_pairs, r.k_sigma
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with_folder(folder: &str) -> SetManifest {
        SetManifest {
            format_version: image::FORMAT_VERSION,
            generator_version: "test".into(),
            config_hash: "0".into(),
            config: String::new(),
            model: "minilm".into(),
            weights_file: None,
            method: "rtn".into(),
            calibration: None,
            weights: 1,
            ebw: 2.0,
            routing: Vec::new(),
            layers: vec![SetLayer {
                tensor: "layer.weight".into(),
                folder: folder.into(),
                shape: [1, 1],
                ebw: 2.0,
                outliers: 0,
                demoted: 0,
                repaired: 0,
                relative_error: 0.0,
                cycles_predicted: 1,
                gptq: None,
            }],
        }
    }

    fn read_with_folder(folder: &str) -> Result<SetManifest, String> {
        let dir = tempfile::tempdir().unwrap();
        let text = serde_json::to_string(&manifest_with_folder(folder)).unwrap();
        std::fs::write(dir.path().join("manifest.json"), text).unwrap();
        SetManifest::read(dir.path())
    }

    #[test]
    fn manifest_rejects_folders_outside_set() {
        for folder in ["../other_set/00_layer", "/tmp/00_layer", "a/b", ".", ""] {
            let error = read_with_folder(folder).expect_err(folder);
            assert!(error.contains("not a folder name inside the set"), "folder `{folder}`: unexpected message: {error}");
        }
    }

    #[test]
    fn manifest_accepts_plain_folder() {
        let manifest = read_with_folder("00_layer.weight").expect("a plain folder name is valid");
        assert_eq!(manifest.layers[0].folder, "00_layer.weight");
    }
}
