//! Flags shared by `train` and `eval`: where the model and the pairs come from, how prompts are
//! rendered, the loss, and the device.
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// Settings shared by `train` and `eval`: model, data, template, loss and devices.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CommonArgs {
    /// TOML file whose keys are flag names; command-line flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Model folder (config.json, tokenizer.json, safetensors weights).
    #[arg(long)]
    pub model: PathBuf,
    /// Preference dataset: orca-style JSONL (system, question, chosen, rejected).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Prompt template: orca | raw.
    #[arg(long, default_value = "orca")]
    pub template: String,
    /// sigmoid | ipo | hinge.
    #[arg(long, default_value = "sigmoid")]
    pub loss: String,
    /// DPO temperature β.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// cDPO label smoothing ε (sigmoid loss only).
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Longest prompt + response, in tokens; longer pairs are truncated.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Prompts longer than this keep their end when a pair must be truncated.
    #[arg(long, default_value_t = 512)]
    pub max_prompt_length: usize,
    /// cpu | cuda | cuda:N | auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Base-weight dtype: f32 | bf16 | f16 | auto (f32 on CPU, bf16 on CUDA).
    #[arg(long, default_value = "auto")]
    pub dtype: String,
}

