//! `dpo`: Direct Preference Optimization with LoRA for Hugging Face causal language models,
//! on candle.
//!
//! Architecture, one concept per module:
//! - [`cli`]: subcommands and exit codes; [`config`]: flags and TOML config files.
//! - [`data`]: reading pairs, prompt templates, tokenization, batches.
//! - [`model`]: the causal LM of every supported family (one architecture description) and its ops.
//! - [`lora`]: adapters on the frozen linears, peft's format on disk.
//! - [`loss`]: DPO losses and reward metrics.
//! - [`train`]: the recipe, the DPO step, AdamW, LR schedules.
//! - [`hub`]: `--model`/`--dataset` repo ids through the Hugging Face Hub cache.
//! - [`eval`]: scoring pairs; [`checkpoint`]: crash-safe writes.
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod fsutil;
pub mod hub;
pub mod lora;
pub mod loss;
pub mod merge;
pub mod model;
pub mod nn;
pub mod optim;
pub mod plot;
pub mod provenance;
pub mod refcache;
pub mod rng;
pub mod scoring;
pub mod setup;
pub mod sweep;
pub mod train;

// Training allocates and frees many large activation buffers each step; glibc malloc hands
// those back to the kernel and page-faults them in again (~15% of a CPU step in a profile).
// mimalloc keeps them for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
