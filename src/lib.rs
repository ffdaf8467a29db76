//! MicroScopiQ: outlier-aware microscaling quantization co-designed with an accelerator.
//!
//! The crate quantizes real model weights into packed memory images, generates the
//! accelerator's Verilog from a configuration, predicts its outputs and cycle count with an
//! integer-exact golden model, and checks generated RTL against that model with Verilator.

pub mod bits;
pub mod calibration;
pub mod cli;
pub mod config;
pub mod eval;
pub mod flow;
pub mod formats;
pub mod generator;
pub mod golden;
pub mod gptq;
pub mod hessian;
pub mod image;
pub mod image_set;
pub mod models;
pub mod quantizer;
pub mod recon;
pub mod simulation;
pub mod sweep;
pub mod synthesis;
pub mod weights;
