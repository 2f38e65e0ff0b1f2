//! `dpo eval`: score every pair with the policy (base + adapter) and the reference (base),
//! write one JSON line per pair, and report the loss (the mean over `--batch-size` batches, each
//! as the loss defines a batch's value) and the metrics TRL logs for it.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::eval::EvalArgs::parse_from(["eval", "--model", "m", "--dataset", "d.jsonl", "--output", "pairs.jsonl"]);
//! let metrics = dpo::eval::run(&args).unwrap();
//! println!("accuracy {}", metrics.accuracy());
//! ```
use crate::config::CommonArgs;
use crate::fsutil::atomic;
use crate::lora::adapter;
use crate::loss::RewardMetrics;
use crate::scoring::score_all;
use anyhow::Result;
use clap::Parser;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Parser)]
#[command(name = "eval", args_override_self = true)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// peft adapter to evaluate; without it the policy is the base model (policy = reference).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Per-pair results, one JSON object per line, in dataset order.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Pairs scored per forward pass.
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
    reward_chosen: f64,
    reward_rejected: f64,
    /// The pair's loss as a batch of one; null for losses that sort the batch (aot, aot_unpaired).
    loss: Option<f64>,
}

pub fn run(args: &EvalArgs) -> Result<RewardMetrics> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let common = &args.common;
    let objective = crate::setup::objective(common)?;
    let mut loaded = crate::setup::load_model(common)?;
    if let Some(dir) = &args.adapter {
        adapter::attach_from_dir(&mut loaded.model, dir, None)?;
    }
    if objective.reward_model {
        let dir = args.adapter.as_deref().ok_or_else(|| {
            crate::config::UsageError(
                "dpo reward score needs --adapter: a reward model's adapter with its score head".into(),
            )
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
    let data = crate::setup::load_pairs(common, &loaded)?;
    let indices: Vec<usize> = (0..data.len()).collect();
    let batches = score_all(&loaded.model, loaded.pad_id, &data, &indices, args.batch_size, &objective, None)?;
    if let Some(path) = &args.output {
        let mut text = Vec::new();
        for (index, s) in batches.iter().flat_map(|b| &b.pairs).enumerate() {
            let line = PairLine {
                index,
                policy_chosen_logp: (!objective.reward_model).then_some(s.policy_chosen),
                policy_rejected_logp: (!objective.reward_model).then_some(s.policy_rejected),
                reference_chosen_logp: s.ref_chosen,
                reference_rejected_logp: s.ref_rejected,
                chosen_tokens: s.chosen_tokens,
                rejected_tokens: s.rejected_tokens,
                reward_chosen: s.reward_chosen,
                reward_rejected: s.reward_rejected,
                loss: s.loss,
            };
            writeln!(text, "{}", serde_json::to_string(&line)?)?;
        }
        atomic::write_bytes(path, &text)?;
    }
    Ok(RewardMetrics::mean(&batches))
}
