//! The causal LM: one architecture description for every supported family, its weights, the
//! generic (candle) and CPU-op decoder layers, and the ops they are built from.
pub mod arch;
pub mod causal_lm;
pub mod chunked_head;
pub mod cpu_layer;
pub mod fused;
pub mod generic_layer;
pub mod kernels;
pub mod recompute;
pub mod tiled_attention;
pub mod token_stats;
pub mod weights;

pub use arch::{Architecture, Family};
pub use causal_lm::{CausalLm, LayerPath};
