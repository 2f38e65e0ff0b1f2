//! Run settings: every `train` flag, and TOML config files whose keys are the flag names.
//!
//! Precedence is built-in defaults < config file < command-line flags. A config file is
//! expanded into flags placed *before* the user's own, and clap lets a later flag override an
//! earlier one, so there is exactly one parser and one set of defaults.
//!
//! ```
//! use clap::Parser;
//! let args = dpo::config::TrainArgs::try_parse_from(["train", "--model", "m", "--dataset", "d.jsonl", "--beta", "0.2"]).unwrap();
//! assert_eq!(args.common.beta, 0.2);
//! ```
use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser};
use serde::Serialize;
use std::path::{Path, PathBuf};

mod common;
pub mod validate;
pub use common::{CommonArgs, Stage};
pub use validate::validate;

#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "train", args_override_self = true)]
pub struct TrainArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,

    /// Folder the adapter, metrics.jsonl and the resolved config are written to.
    #[arg(long, default_value = "dpo-output")]
    pub output_dir: PathBuf,
    /// Replace a previous run's files in --output-dir instead of refusing.
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// Full fine-tuning: every weight trained (f32 master weights and AdamW state), no adapter;
    /// the output is a full model folder. DPO's reference log-probs are computed for the whole
    /// run first, into the reference cache, so there is never a second copy of the weights.
    #[arg(long)]
    pub full: bool,
    /// Start from an existing peft LoRA adapter (its r, alpha and targets are used).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,

    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA alpha (scaling = alpha / r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch input during training.
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Layers to adapt: comma list of q,k,v,o,gate,up,down (with or without _proj), or all.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub lora_targets: String,

    /// Pairs per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Activation recomputation: each decoder layer keeps only its input and is re-run in
    /// backward (bit-identical numbers, a fraction of the activation memory, one more forward
    /// of compute): auto (on for CUDA, off on CPU) | on | off.
    #[arg(long, value_enum, default_value = "auto")]
    pub gradient_checkpointing: Checkpointing,
    /// Micro-batches per optimizer step (each micro-batch loss is divided by this).
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
    /// Optimizer steps to run (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passes over the dataset when --max-steps is not given.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Seed of LoRA init, dropout and data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Visit pairs in file order instead of a seeded shuffle per epoch.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Print a log line every N steps when stderr is not a terminal.
    #[arg(long, default_value_t = 10)]
    pub logging_steps: usize,
    /// Print the final summary as one JSON object on stdout.
    #[arg(long)]
    #[serde(skip)]
    pub json: bool,

    /// Write OUTPUT/checkpoint-STEP every N optimizer steps (and when interrupted).
    #[arg(long)]
    pub save_steps: Option<usize>,
    /// Keep only the newest K checkpoints (never the one being resumed from).
    #[arg(long)]
    pub save_total_limit: Option<usize>,
    /// Continue a run: OUTPUT (its newest checkpoint), OUTPUT/checkpoint-STEP, or
    /// `latest-valid` (the newest checkpoint of --output-dir that verifies).
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<String>,
    /// On resume, recompute the last checkpoint's logged metrics and refuse to continue if they differ.
    #[arg(long)]
    #[serde(skip)]
    pub verify_resume: bool,
    /// Held-out pairs scored with the trained adapter at the end (eval_metrics.json).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_dataset: Option<PathBuf>,
    /// Split scored as held-out pairs at the end (e.g. `test`): of --eval-dataset if given,
    /// else of --dataset.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_split: Option<String>,
    /// Score the held-out pairs every N optimizer steps too (OUTPUT/eval_metrics.jsonl), not
    /// only at the end.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<usize>,
    /// Reference log-prob cache folder: cached pairs skip the reference forward (bit-identical
    /// results); `auto` = OUTPUT's parent/.dpo-ref-cache, shared by runs.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ref_cache: Option<PathBuf>,
    /// Print the memory plan (weights, adapter and optimizer, activations, workspace) for these
    /// settings, model and data, and exit without loading the weights.
    #[arg(long)]
    #[serde(skip)]
    pub dry_run: bool,
    /// Memory budget in GiB for the plan check (default: the device's free memory, or the
    /// available RAM on CPU); a run whose plan exceeds it is refused before loading weights.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<f64>,
    /// Print the resolved settings as TOML (loadable with --config) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

/// The command-line name of a choice (`hh-rlhf`, `bf16`).
pub fn name_of<T: clap::ValueEnum>(choice: &T) -> String {
    choice.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
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

impl TrainArgs {
    /// The resolved settings as TOML, loadable again with `--config`.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// Where `--ref-cache` points, `auto` resolved to `OUTPUT/../.dpo-ref-cache`.
    pub fn ref_cache_dir(&self) -> Option<PathBuf> {
        let dir = self.ref_cache.as_ref()?;
        if dir.as_os_str() != "auto" {
            return Some(dir.clone());
        }
        let parent = self.output_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Some(parent.join(".dpo-ref-cache"))
    }
}

/// Expands `--config FILE` (anywhere in `args`, after the subcommand at `args[1]`) into flags
/// placed before the user's own, for a subcommand whose flags are described by `C`.
pub fn expand_config_file<C: CommandFactory>(args: Vec<String>) -> Result<Vec<String>> {
    match find_flag(&args, "--config") {
        Some(p) => expand_with_file::<C>(args, Path::new(&p)),
        None => Ok(args),
    }
}

/// Places the flags of the TOML file `path` before the user's own in `args` (the user's win).
pub fn expand_with_file<C: CommandFactory>(args: Vec<String>, path: &Path) -> Result<Vec<String>> {
    let flags = config_file_flags::<C>(path).map_err(|e| anyhow::Error::new(UsageError(format!("{e:#}"))))?;
    let mut out = args[..2.min(args.len())].to_vec();
    out.extend(flags);
    out.extend(args.into_iter().skip(2));
    Ok(out)
}

/// A mistake in how dpo was called (bad config file key or value): exit code 2, like a bad flag.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// The value of `--flag VALUE` or `--flag=VALUE` after the subcommand.
pub fn find_flag(args: &[String], flag: &str) -> Option<String> {
    let mut it = args.iter().skip(2);
    let with_eq = format!("{flag}=");
    while let Some(a) = it.next() {
        if a == flag {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix(&with_eq) {
            return Some(v.to_string());
        }
    }
    None
}

/// Turns a TOML table into `--key value` flags, checking every key against the flags of `C`.
pub fn config_file_flags<C: CommandFactory>(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table =
        text.parse().with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    table_flags::<C>(table, &|key| format!("config file {}{}", path.display(), key_line(&text, key)))
}

/// Turns `key = value` settings into flags of `C`; `origin(key)` says where a bad key came from.
pub fn table_flags<C: CommandFactory>(table: toml::Table, origin: &dyn Fn(&str) -> String) -> Result<Vec<String>> {
    let command = C::command();
    let mut flags = Vec::new();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(flag.as_str()) && !matches!(flag.as_str(), "config" | "resume"))
            .with_context(|| format!("{}: unknown key {key:?}", origin(&key)))?;
        let takes_value = arg.get_action().takes_values();
        let text = match (&value, takes_value) {
            (toml::Value::Boolean(true), false) => {
                flags.push(format!("--{flag}"));
                continue;
            }
            (toml::Value::Boolean(false), false) => continue,
            (_, false) => bail!("{}: key {key:?} must be true or false", origin(&key)),
            (toml::Value::String(s), true) => s.clone(),
            (toml::Value::Integer(i), true) => i.to_string(),
            (toml::Value::Float(f), true) => f.to_string(),
            // An empty list is the flag's default (nothing given).
            (toml::Value::Array(items), true) if items.is_empty() => continue,
            (toml::Value::Array(items), true) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))
                .collect::<Vec<_>>()
                .join(","),
            (other, true) => bail!("{}: key {key:?} has unsupported value {other}", origin(&key)),
        };
        flags.push(format!("--{flag}={text}"));
    }
    Ok(flags)
}

/// `key=value` (a `--set` argument) as a one-entry TOML table; the value is read as TOML
/// (`0.1`, `true`, `["q", "v"]`) and as a plain string when it is not valid TOML.
pub fn parse_setting(setting: &str) -> Result<toml::Table> {
    let (key, value) = setting.split_once('=').with_context(|| format!("--set {setting:?}: expected key=value"))?;
    let key = key.trim();
    let value = value.trim();
    let parsed = format!("v = {value}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v"));
    let value = parsed.unwrap_or_else(|| toml::Value::String(value.to_string()));
    Ok(toml::Table::from_iter([(key.to_string(), value)]))
}

/// `:LINE` of the line that sets `key` in a TOML text, for error messages ("" when not found).
fn key_line(text: &str, key: &str) -> String {
    text.lines()
        .position(|l| l.trim_start().strip_prefix(key).is_some_and(|rest| rest.trim_start().starts_with('=')))
        .map(|i| format!(":{}", i + 1))
        .unwrap_or_default()
}
