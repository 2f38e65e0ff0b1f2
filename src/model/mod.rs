//! The causal LM: one architecture description for every supported family, its weights, the
//! generic (candle) and CPU-op decoder layers, and the ops they are built from.
//!
//! Bottom-up: [`arch`] (the family description), [`weights`] (safetensors on disk),
//! [`kernels`] (plain-buffer CPU kernels), [`token_stats`], [`layer`] (one decoder layer's
//! weights); the layer paths [`generic_layer`] (+ [`tiled_attention`], [`recompute`]) and
//! [`cpu_layer`]; the heads [`chunked_head`] and [`cpu_head`]; then [`causal_lm`], the model.
pub mod arch;
pub mod causal_lm;
pub mod chunked_head;
pub mod cpu_head;
pub mod cpu_layer;
pub mod generic_layer;
pub mod kernels;
pub mod kv_cache;
pub mod layer;
pub mod recompute;
pub mod tiled_attention;
pub mod token_stats;
pub mod weights;

pub use arch::{Architecture, Family};
pub use causal_lm::{CausalLm, Head, LayerPath};
