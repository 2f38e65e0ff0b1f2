//! Tensor-level pieces below the model and LoRA: the frozen matmul and the differentiable ops
//! candle lacks ([`ops`]), where each token of a batch row sits ([`layout`]), and the linear
//! layer that may carry a LoRA adapter ([`linear`]).
pub mod attach;
pub mod kv_layout;
pub mod layout;
pub mod linear;
pub mod lora_pack;
pub mod ops;

pub use linear::{LoraLinear, LoraMode};
