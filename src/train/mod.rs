//! The training recipe: load, attach LoRA, loop over optimizer steps, write the adapter.
//!
//! One optimizer step takes the next `batch_size × grad_accum` pairs of the (seeded) order,
//! runs [`step::micro_step`] on each micro-batch, clips, updates with AdamW and logs a line
//! to `metrics.jsonl`.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::config::TrainArgs::parse_from(["train", "--model", "m", "--dataset", "d.jsonl"]);
//! let summary = dpo::train::run(&args).unwrap();
//! println!("final loss {}", summary.final_loss);
//! ```
pub mod optimizer;
pub mod progress;
pub mod schedule;
pub mod step;

use crate::config::TrainArgs;
use crate::data::PairBatch;
use crate::data::order::PairOrder;
use crate::lora::{LoraConfig, LoraMode, adapter};
use crate::loss::{PairScore, RewardMetrics};
use crate::rng::{SeededRng, Stream};
use crate::checkpoint::atomic;
use anyhow::{Context, Result, bail};
use candle_core::Var;
use optimizer::AdamW;
use progress::Progress;
use schedule::{LrSchedule, Schedule};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use step::{GradAccumulator, clip, global_norm, micro_step};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CONFIG_FILE: &str = "train_config.toml";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub lr: f64,
    #[serde(flatten)]
    pub rewards: RewardMetrics,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_sec: f64,
}

/// What a finished run reports (stdout, `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub pairs: usize,
    pub truncated_pairs: usize,
    pub final_loss: f64,
    pub final_reward_accuracy: f64,
    pub seconds: f64,
    pub tokens_per_sec: f64,
    pub output_dir: PathBuf,
}

pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    validate(args)?;
    let started = Instant::now();
    prepare_output_dir(&args.output_dir, args.overwrite_output_dir)?;
    atomic::write_bytes(&args.output_dir.join(CONFIG_FILE), args.to_toml()?.as_bytes())?;

    let mut loaded = crate::setup::load_model(args)?;
    let data = crate::setup::load_pairs(args, &loaded)?;
    let loss = crate::setup::dpo_loss(args)?;
    let (lora_cfg, params) = match &args.init_adapter {
        Some(dir) => adapter::attach_from_dir(&mut loaded.model, dir, Some(args.lora_dropout))?,
        None => {
            let cfg = LoraConfig::new(args.lora_r, args.lora_alpha, args.lora_dropout, &args.lora_targets)?;
            let params = adapter::attach_fresh(&mut loaded.model, &cfg, args.seed)?;
            (cfg, params)
        }
    };
    let vars: Vec<Var> = params.iter().map(|p| p.var.clone()).collect();

    let n = data.len();
    let per_step = args.batch_size * args.grad_accum;
    let stream_end = match args.max_steps {
        Some(_) => usize::MAX,
        None => n * args.epochs,
    };
    let total_steps = args.max_steps.unwrap_or_else(|| stream_end.div_ceil(per_step));
    let order = PairOrder::new(n, (!args.no_shuffle).then_some(args.seed));
    let schedule = LrSchedule {
        kind: Schedule::parse(&args.lr_scheduler)?,
        base_lr: args.lr,
        warmup_steps: args.warmup_steps,
        total_steps,
    };
    let mut optimizer = AdamW::new(&vars, 0.9, 0.999, 1e-8, args.weight_decay)?;
    let mut dropout_rng = SeededRng::new(args.seed, Stream::Dropout);
    let mut metrics_file = std::fs::File::create(args.output_dir.join(METRICS_FILE))
        .with_context(|| format!("creating {}", args.output_dir.join(METRICS_FILE).display()))?;
    if data.truncated > 0 {
        eprintln!("{} of {n} pairs were truncated to --max-length {}", data.truncated, args.max_length);
    }
    eprintln!(
        "training {} LoRA tensors ({} parameters) on {n} pairs for {total_steps} steps",
        vars.len(),
        vars.iter().map(|v| v.elem_count()).sum::<usize>()
    );

    let mut progress = Progress::new(total_steps, args.logging_steps);
    let (mut last, mut all_tokens) = (None, 0usize);
    for step in 1..=total_steps {
        let step_start = Instant::now();
        let first = (step - 1) * per_step;
        let positions: Vec<usize> = (first..(first + per_step).min(stream_end)).collect();
        let micro_batches: Vec<&[usize]> = positions.chunks(args.batch_size).collect();
        let mut grads = GradAccumulator::new(vars.len());
        let (mut scores, mut tokens): (Vec<PairScore>, usize) = (Vec::new(), 0);
        for chunk in &micro_batches {
            let pairs = chunk.iter().map(|&pos| data.get(order.pair_at(pos))).collect::<Result<Vec<_>>>()?;
            let batch = PairBatch::new(&pairs, loaded.pad_id, &loaded.device)?;
            let mut mode = if lora_cfg.dropout > 0.0 { LoraMode::Train(&mut dropout_rng) } else { LoraMode::On };
            let scale = 1.0 / micro_batches.len() as f64;
            scores.extend(micro_step(&loaded.model, &batch, &loss, &vars, &mut mode, scale, &mut grads)?);
            tokens += batch.tokens;
        }
        let grads = grads.into_grads()?;
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            bail!("step {step}: gradient norm is {grad_norm}; stopping before the adapter is corrupted");
        }
        let lr = schedule.lr_at(step);
        optimizer.step(&vars, &clip(grads, grad_norm, args.max_grad_norm)?, lr)?;

        let seconds = step_start.elapsed().as_secs_f64();
        let metrics = StepMetrics {
            step,
            lr,
            rewards: RewardMetrics::mean(&scores, loss.beta),
            grad_norm,
            tokens,
            tokens_per_sec: tokens as f64 / seconds,
        };
        writeln!(metrics_file, "{}", serde_json::to_string(&metrics)?)?;
        metrics_file.flush()?;
        progress.step(step, metrics.rewards.loss, metrics.rewards.rewards_accuracies, metrics.tokens_per_sec);
        all_tokens += tokens;
        last = Some(metrics);
    }
    progress.finish();
    metrics_file.sync_all()?;
    adapter::save(&args.output_dir, &params, &lora_cfg, &args.model.to_string_lossy())?;

    let last = last.context("no optimizer step was run")?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        steps: total_steps,
        pairs: n,
        truncated_pairs: data.truncated,
        final_loss: last.rewards.loss,
        final_reward_accuracy: last.rewards.rewards_accuracies,
        seconds,
        tokens_per_sec: all_tokens as f64 / seconds,
        output_dir: args.output_dir.clone(),
    })
}

fn validate(args: &TrainArgs) -> Result<()> {
    let positive = [("batch-size", args.batch_size), ("grad-accum", args.grad_accum), ("epochs", args.epochs)];
    for (name, v) in positive {
        if v == 0 {
            bail!("--{name} must be at least 1");
        }
    }
    if args.max_steps == Some(0) {
        bail!("--max-steps must be at least 1");
    }
    if !(args.lr.is_finite() && args.lr > 0.0) {
        bail!("--lr must be positive, got {}", args.lr);
    }
    if !(args.weight_decay >= 0.0 && args.max_grad_norm >= 0.0) {
        bail!("--weight-decay and --max-grad-norm must not be negative");
    }
    Schedule::parse(&args.lr_scheduler)?;
    crate::setup::dpo_loss(args)?;
    Ok(())
}

/// Refuses to mix a new run into a folder that holds another run's results, unless asked.
fn prepare_output_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let previous = [METRICS_FILE, adapter::WEIGHTS_FILE].iter().any(|f| dir.join(f).exists());
    if previous && !overwrite {
        bail!(
            "{} already holds a training run; choose another --output-dir or pass --overwrite-output-dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating output dir {}", dir.display()))
}
