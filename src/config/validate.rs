//! Range and combination checks on a training run's settings. Every error names the config key
//! (and its flag), so a mistake in a config file is found without guessing; a flag the run would
//! ignore is refused, as the loss parameters are.
//!
//! ```
//! use clap::Parser;
//! let args = dpo::config::TrainArgs::parse_from(["train", "--model", "m", "--dataset", "d", "--lr=-1"]);
//! let err = args.settings().unwrap_err().to_string();
//! assert!(err.contains("lr"), "{err}");
//! ```
use super::{CommonArgs, RunArgs, UsageError};
use crate::task::Task;
use anyhow::Result;

/// Checks every numeric and named setting of a run; the first problem is a [`UsageError`].
pub fn validate(common: &CommonArgs, run: &RunArgs, task: &Task) -> Result<()> {
    check_ranges(common, run).and_then(|()| check_combinations(run, task)).map_err(|msg| UsageError(msg).into())
}

fn out_of_range(key: &str, value: impl std::fmt::Display, want: &str) -> String {
    format!("{key} = {value} is out of range: {want} (config key {key}, flag --{})", key.replace('_', "-"))
}

fn at_least_one(key: &str, v: usize) -> Result<(), String> {
    if v == 0 { Err(out_of_range(key, v, "must be at least 1")) } else { Ok(()) }
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64, hi_inclusive: bool, want: &str) -> Result<(), String> {
    let ok = v.is_finite() && v >= lo && if hi_inclusive { v <= hi } else { v < hi };
    if ok { Ok(()) } else { Err(out_of_range(key, v, want)) }
}

fn check_ranges(common: &CommonArgs, a: &RunArgs) -> Result<(), String> {
    let inf = f64::INFINITY;
    let adj = &a.adjustable;
    for (key, v) in [("batch_size", a.batch_size), ("grad_accum", a.grad_accum), ("epochs", a.epochs)] {
        at_least_one(key, v)?;
    }
    for (key, v) in [
        ("logging_steps", adj.logging_steps),
        ("max_length", common.max_length),
        ("max_prompt_length", common.max_prompt_length),
    ] {
        at_least_one(key, v)?;
    }
    for (key, v) in [
        ("max_steps", adj.max_steps),
        ("save_steps", adj.save_steps),
        ("save_total_limit", adj.save_total_limit),
        ("eval_steps", adj.eval_steps),
    ] {
        if let Some(v) = v {
            at_least_one(key, v)?;
        }
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        return Err(out_of_range("lr", a.lr, "must be a positive number"));
    }
    // LoRA's ranges have one definition, shared with adapter files.
    if let Some((key, value, rule)) = crate::lora::hyper_problem(a.lora.r(), a.lora.alpha(), a.lora.dropout()) {
        return Err(out_of_range(key, value, rule));
    }
    in_range("warmup_ratio", a.warmup_ratio, 0.0, 1.0, false, "must be in [0, 1)")?;
    in_range("weight_decay", a.weight_decay, 0.0, inf, false, "must not be negative")?;
    in_range("max_grad_norm", a.max_grad_norm, 0.0, inf, false, "must not be negative (0 disables clipping)")?;
    in_range("max_skip_ratio", common.max_skip_ratio, 0.0, 1.0, true, "must be in [0, 1]")?;
    Ok(())
}

/// Flags that cannot go together, or that this run would ignore.
fn check_combinations(a: &RunArgs, task: &Task) -> Result<(), String> {
    let adj = &a.adjustable;
    let lora = &a.lora;
    if a.full {
        let clash = [
            (matches!(task, Task::Reward), "dpo reward train (its score head is trained on a frozen base with LoRA)"),
            (lora.init_adapter.is_some(), "--init-adapter"),
            (lora.lora_dropout.is_some(), "--lora-dropout"),
            (!lora.fresh_flags().is_empty(), "--lora-r, --lora-alpha or --lora-targets (no adapter is trained)"),
            (a.verify_resume, "--verify-resume (it keeps a pre-step copy of everything trained: the whole model)"),
            (
                adj.gradient_checkpointing == super::Checkpointing::On,
                "--gradient-checkpointing on (recomputation is built for frozen layers)",
            ),
        ];
        if let Some((_, flag)) = clash.iter().find(|(on, _)| *on) {
            return Err(format!("--full (config key full) cannot be used with {flag}"));
        }
    }
    if lora.init_adapter.is_some() {
        if let Some(flag) = lora.fresh_flags().first() {
            return Err(format!(
                "{flag} cannot be used with --init-adapter: the adapter's own r, alpha and targets are used (config keys {}, init_adapter)",
                flag.trim_start_matches("--").replace('-', "_")
            ));
        }
    }
    let ignored = [
        (
            adj.eval_steps.is_some() && !adj.evaluates(),
            "--eval-steps needs held-out rows: --eval-dataset or --eval-split",
        ),
        (adj.save_total_limit.is_some() && adj.save_steps.is_none(), "--save-total-limit needs --save-steps"),
        (a.verify_resume && a.resume.is_none(), "--verify-resume needs --resume"),
        (
            a.warmup_ratio > 0.0 && a.warmup_steps > 0,
            "--warmup-ratio is ignored when --warmup-steps is given: give one of them",
        ),
    ];
    if let Some((_, why)) = ignored.iter().find(|(on, _)| *on) {
        return Err(why.to_string());
    }
    Ok(())
}
