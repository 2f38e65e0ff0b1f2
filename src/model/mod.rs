//! The Llama-family causal LM: config, weights, differentiable ops and the decoder.
pub mod config;
pub mod cpu_layer;
pub mod fused;
pub mod kernels;
pub mod layout;
pub mod llama;
pub mod ops;
pub mod scoring;
pub mod weights;

pub use config::ModelConfig;
pub use llama::Llama;
