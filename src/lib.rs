//! `dpo`: Direct Preference Optimization with LoRA for Hugging Face causal language models,
//! on candle.
//!
//! Architecture, one concept per module, bottom-up:
//! - [`rng`], [`fsutil`] (atomic writes, sha256), [`device`]: below everything.
//! - [`nn`]: the frozen matmul, token layouts, the LoRA linear, ops with hand-written backward.
//! - [`model`]: the causal LM of every supported family (one architecture description) and its ops.
//! - [`lora`]: adapters on the frozen linears, peft's format on disk; [`merge`] folds them in.
//! - [`data`]: reading rows, prompt templates, tokenization, batches; [`hub`]: `--model` /
//!   `--dataset` repo ids through the Hugging Face Hub cache.
//! - [`loss`]: every loss as its formula, the objective, the logged metrics; [`optim`]: AdamW
//!   and LR schedules.
//! - [`task`]: what a run trains (preference pairs, KTO, SFT, a reward model) and all that
//!   differs between them.
//! - [`scoring`]: a micro-batch to log-probs and a loss; [`refcache`]: the reference cache.
//! - [`config`]: each subcommand's typed flags; [`setup`]: the model and data they name.
//! - [`checkpoint`], [`provenance`]: crash-safe checkpoints and what they were trained from.
//! - [`train`]: the recipe (one Trainer for every task); [`eval`]: scoring rows; [`sweep`],
//!   [`plot`]; [`cli`]: subcommands and exit codes.
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod eval;
pub mod fsutil;
pub mod generate;
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
pub mod task;
pub mod train;

// Training allocates and frees many large activation buffers each step; glibc malloc hands
// those back to the kernel and page-faults them in again (~15% of a CPU step in a profile).
// mimalloc keeps them for reuse.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
