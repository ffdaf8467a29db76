//! GPTQ calibration of whole models: the operations on a model's linear layers that
//! calibration and evaluation need.

use crate::models::glassllm::GlassLlm;
use crate::models::minilm::MiniLm;
use crate::weights::Matrix;

/// The operations on a model's linear layers that the evaluation needs.
pub trait LinearModel: Clone + Sync {
    /// Names, `[out, in]` shapes, in execution order.
    fn layers(&self) -> Vec<(String, usize, usize)>;
    fn weight(&self, name: &str) -> Matrix;
    fn set_weight(&mut self, name: &str, weight: &Matrix) -> Result<(), String>;
}

impl LinearModel for GlassLlm {
    fn layers(&self) -> Vec<(String, usize, usize)> {
        self.linear_layers()
    }

    fn weight(&self, name: &str) -> Matrix {
        self.linear_weight(name).expect("name comes from linear_layers")
    }

    fn set_weight(&mut self, name: &str, weight: &Matrix) -> Result<(), String> {
        self.set_linear_weight(name, weight).map_err(|e| e.to_string())
    }
}

impl LinearModel for MiniLm {
    fn layers(&self) -> Vec<(String, usize, usize)> {
        self.linear_layers()
    }

    fn weight(&self, name: &str) -> Matrix {
        self.linear_weight(name).expect("name comes from linear_layers")
    }

    fn set_weight(&mut self, name: &str, weight: &Matrix) -> Result<(), String> {
        self.set_linear_weight(name, weight).map_err(|e| e.to_string())
    }
}
