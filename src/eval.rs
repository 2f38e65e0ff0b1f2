//! `dpo eval` and `dpo reward score`: score every row with the policy (base + adapter) and,
//! where the task has one, the reference (base); write one JSON line per row, and report the
//! loss (the mean over `--batch-size` batches, each as the loss defines a batch's value) and the
//! metrics TRL logs for it.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::eval::EvalArgs::parse_from(["eval", "--model", "m", "--dataset", "d.jsonl", "--output", "pairs.jsonl"]);
//! let metrics = dpo::eval::run(&args).unwrap();
//! println!("accuracy {:?}", metrics.accuracy());
//! ```
use crate::config::{CommonArgs, ObjectiveArgs, UsageError};
use crate::fsutil::atomic;
use crate::lora::adapter;
use crate::loss::{Metrics, PairScore};
use crate::scoring::{Reference, score_all};
use crate::task::Task;
use anyhow::Result;
use clap::{Args, Parser};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Parser)]
#[command(name = "eval", args_override_self = true)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub objective: ObjectiveArgs,
    /// Score completions as `dpo sft` trains them (each completion's log-prob and the token-mean
    /// NLL) instead of preference pairs.
    #[arg(long, conflicts_with_all = crate::config::objective::FLAGS)]
    pub sft: bool,
    #[command(flatten)]
    pub scoring: ScoringArgs,
}

/// `dpo reward score`: a reward model's rewards for each pair.
#[derive(Debug, Clone, Parser)]
#[command(name = "score", args_override_self = true)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub scoring: ScoringArgs,
}

/// What is scored with which adapter, and where the lines go.
#[derive(Debug, Clone, Args)]
pub struct ScoringArgs {
    /// peft adapter to evaluate; without it the policy is the base model (policy = reference).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Per-row results, one JSON object per line, in dataset order.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Rows scored per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One pair's line of `--output`.
#[derive(Debug, Serialize)]
struct PairLine {
    index: usize,
    /// Absent for reward models (their rewards are the scores).
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_chosen_logp: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_rejected_logp: Option<f64>,
    /// Absent for reference-free losses.
    #[serde(skip_serializing_if = "Option::is_none")]
    reference_chosen_logp: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference_rejected_logp: Option<f64>,
    chosen_tokens: usize,
    rejected_tokens: usize,
    /// Absent for supervised fine-tuning, which has no rewards.
    #[serde(skip_serializing_if = "Option::is_none")]
    reward_chosen: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reward_rejected: Option<f64>,
    /// The row's loss as a batch of one; null for losses only defined over a batch (aot,
    /// aot_unpaired, kto).
    loss: Option<f64>,
}

impl PairLine {
    fn new(index: usize, s: &PairScore, task: &Task) -> Self {
        let logps = !task.scores_sequences();
        let rewards = !matches!(task, Task::Sft);
        Self {
            index,
            policy_chosen_logp: logps.then_some(s.policy_chosen),
            policy_rejected_logp: logps.then_some(s.policy_rejected),
            reference_chosen_logp: s.ref_chosen,
            reference_rejected_logp: s.ref_rejected,
            chosen_tokens: s.chosen_tokens,
            rejected_tokens: s.rejected_tokens,
            reward_chosen: rewards.then_some(s.reward_chosen),
            reward_rejected: rewards.then_some(s.reward_rejected),
            loss: s.loss,
        }
    }
}

/// `dpo eval`: the pairs (or, with `--sft`, completions) under the objective's loss.
pub fn run(args: &EvalArgs) -> Result<Metrics> {
    let task = if args.sft { Task::Sft } else { args.objective.task().map_err(UsageError)? };
    score_rows(&args.common, &args.scoring, &task)
}

/// `dpo reward score`: the pairs under a reward model (`--adapter` with its score head).
pub fn score(args: &ScoreArgs) -> Result<Metrics> {
    score_rows(&args.common, &args.scoring, &Task::Reward)
}

fn score_rows(common: &CommonArgs, args: &ScoringArgs, task: &Task) -> Result<Metrics> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let mut loaded = crate::setup::load_model(&common.model)?;
    if let Some(dir) = &args.adapter {
        adapter::attach_from_dir(&mut loaded.model, dir, None)?;
    }
    if task.scores_sequences() {
        let dir = args.adapter.as_deref().ok_or_else(|| {
            UsageError("dpo reward score needs --adapter: a reward model's adapter with its score head".into())
        })?;
        let has_head = candle_core::safetensors::load(dir.join(adapter::WEIGHTS_FILE), &candle_core::Device::Cpu)?
            .contains_key(adapter::SCORE_KEY);
        anyhow::ensure!(
            has_head,
            "{}: no {} in the adapter: not a reward model (train one with `dpo reward train`)",
            dir.display(),
            adapter::SCORE_KEY
        );
        adapter::attach_score_head(&mut loaded.model, Some(dir), 0)?;
    }
    let data = crate::setup::load_rows(common, &loaded, task)?;
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut reference = Reference::computed(task, None);
    let batches = score_all(&loaded.model, loaded.pad_id, &data, &indices, args.batch_size, task, &mut reference)?;
    if let Some(path) = &args.output {
        let mut text = Vec::new();
        for (index, s) in batches.iter().flat_map(|b| &b.pairs).enumerate() {
            writeln!(text, "{}", serde_json::to_string(&PairLine::new(index, s, task))?)?;
        }
        atomic::write_bytes(path, &text)?;
    }
    Ok(Metrics::mean(&batches))
}
