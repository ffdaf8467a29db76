//! Reference forward passes of the real models used for calibration and evaluation.

pub mod bpe;
pub mod glassllm;
pub mod minilm;
pub mod npz;
pub mod tensor;
pub mod wordpiece;
