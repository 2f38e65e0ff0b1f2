//! The flags of a training run, whatever it trains (`dpo train`, `dpo sft`, `dpo reward
//! train`): output, what is trained (LoRA or every weight), the optimizer and its schedule,
//! checkpoints, held-out evaluation and the memory plan.
//!
//! The settings a resumed run may change live in one group, [`Adjustable`]: where a field is
//! declared says whether a resume may change it.
//!
//! ```
//! use clap::Parser;
//! #[derive(Parser)]
//! struct Cli { #[command(flatten)] run: dpo::config::RunArgs }
//! let cli = Cli::parse_from(["x", "--lora-r", "16", "--max-steps", "3"]);
//! assert_eq!(cli.run.lora.r(), 16);
//! assert_eq!(cli.run.adjustable.max_steps, Some(3));
//! ```
use crate::lora::LoraTargets;
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// A training run's settings.
#[derive(Debug, Clone, Args, Serialize)]
pub struct RunArgs {
    /// Folder the adapter (or model), metrics.jsonl and the resolved config are written to.
    #[arg(long, default_value = "dpo-output")]
    pub output_dir: PathBuf,
    /// Full fine-tuning: every weight trained (f32 master weights and AdamW state), no adapter;
    /// the output is a full model folder.
    #[arg(long)]
    pub full: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,

    /// Rows per micro-batch (pairs, or examples).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step (each micro-batch's loss is divided by the step's
    /// micro-batch count, as TRL does).
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f64,
    /// Learning-rate schedule (transformers' *_with_warmup semantics).
    #[arg(long, value_enum, default_value = "linear")]
    pub lr_scheduler: crate::optim::schedule::Schedule,
    /// Linear warmup over this many optimizer steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Warmup as a fraction of the total steps (transformers' `warmup_ratio`; used when
    /// --warmup-steps is 0).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Decoupled AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Passes over the dataset when --max-steps is not given.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Seed of LoRA init, dropout and data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Visit rows in file order instead of a seeded shuffle per epoch.
    #[arg(long)]
    pub no_shuffle: bool,

    #[command(flatten)]
    #[serde(flatten)]
    pub adjustable: Adjustable,

    /// Print the final summary as one JSON object on stdout.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,
    /// Continue a run: OUTPUT (its newest checkpoint), OUTPUT/checkpoint-STEP, or
    /// `latest-valid` (the newest checkpoint of --output-dir that verifies).
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<String>,
    /// On resume, recompute the last checkpoint's logged metrics and refuse to continue if they
    /// differ.
    #[arg(long)]
    #[serde(skip)]
    pub verify_resume: bool,
    /// Print the memory plan (weights, adapter and optimizer, activations, workspace) for these
    /// settings, model and data, and exit without loading the weights.
    #[arg(long)]
    #[serde(skip)]
    pub dry_run: bool,
    /// Print the resolved settings as TOML (loadable with --config) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

/// The adapter: fresh (rank, alpha, targets) or `--init-adapter`; refused with `--full`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct LoraArgs {
    /// Start from an existing peft LoRA adapter (its r, alpha and targets are used).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
    /// LoRA rank [default: 8].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_r: Option<usize>,
    /// LoRA alpha (scaling = alpha / r) [default: 16].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA branch input during training [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// Layers to adapt: comma list of q,k,v,o,gate,up,down (with or without _proj; Phi-3:
    /// qkv, gate_up), or all [default: q,v].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_targets: Option<LoraTargets>,
}

impl LoraArgs {
    pub fn r(&self) -> usize {
        self.lora_r.unwrap_or(8)
    }

    pub fn alpha(&self) -> f64 {
        self.lora_alpha.unwrap_or(16.0)
    }

    pub fn dropout(&self) -> f64 {
        self.lora_dropout.unwrap_or(0.0)
    }

    pub fn targets(&self) -> LoraTargets {
        self.lora_targets.clone().unwrap_or_else(|| "q,v".parse().expect("the default targets parse"))
    }

    /// The flags given for a fresh adapter (`--lora-r`, `--lora-alpha`, `--lora-targets`).
    pub fn fresh_flags(&self) -> Vec<&'static str> {
        let given = [
            (self.lora_r.is_some(), "--lora-r"),
            (self.lora_alpha.is_some(), "--lora-alpha"),
            (self.lora_targets.is_some(), "--lora-targets"),
        ];
        given.iter().filter(|(on, _)| *on).map(|(_, f)| *f).collect()
    }
}

/// Settings a resumed run may change: they do not alter the math of the steps to come
/// (`max_steps` extends or shortens the run, as the user asks; recomputation gives the same
/// numbers; the held-out set is scored, never trained on).
#[derive(Debug, Clone, Args, Serialize)]
pub struct Adjustable {
    /// Optimizer steps to run (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Replace a previous run's files in --output-dir instead of refusing.
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// Print a log line every N steps when stderr is not a terminal.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    /// Write OUTPUT/checkpoint-STEP every N optimizer steps, at the last step, and when
    /// interrupted.
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest K checkpoints (never the one being resumed from).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Activation recomputation: each decoder layer keeps only its input and is re-run in
    /// backward (bit-identical numbers, a fraction of the activation memory, one more forward
    /// of compute): auto (on for CUDA, off on CPU) | on | off.
    #[arg(long, value_enum, default_value = "auto")]
    pub gradient_checkpointing: Checkpointing,
    /// Memory budget in GiB for the plan check (default: the device's free memory, or the
    /// available RAM on CPU); a run whose plan exceeds it is refused before loading weights.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<f64>,
    /// Held-out rows scored with the trained model at the end (eval_metrics.json).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_dataset: Option<PathBuf>,
    /// Split scored as held-out rows at the end (e.g. `test`): of --eval-dataset if given,
    /// else of --dataset.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_split: Option<String>,
    /// Score the held-out rows every N optimizer steps too (OUTPUT/eval_metrics.jsonl), not
    /// only at the end.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<usize>,
}

impl Adjustable {
    /// Whether held-out rows are scored.
    pub fn evaluates(&self) -> bool {
        self.eval_dataset.is_some() || self.eval_split.is_some()
    }
}

/// `--gradient-checkpointing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// On for CUDA, off on CPU (where the CPU layer op keeps its activations compactly).
    Auto,
    On,
    Off,
}

impl Checkpointing {
    pub fn enabled(self, device: &candle_core::Device) -> bool {
        match self {
            Checkpointing::Auto => device.is_cuda(),
            Checkpointing::On => true,
            Checkpointing::Off => false,
        }
    }
}
