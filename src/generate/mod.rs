//! Generation: decoding from a model (and its adapters) with a KV cache, as transformers'
//! `generate` decodes.
//!
//! - [`processors`]: repetition penalty, temperature, top-k, top-p, min-p in transformers'
//!   order; greedy and seeded sampling.
//! - [`engine`]: a left-padded batch of prompts, prefilled in one forward, then one token per
//!   row per forward until each row ends (an end id, a stop condition, or the length limit).
pub mod engine;
pub mod processors;
