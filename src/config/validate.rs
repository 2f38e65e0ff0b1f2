//! Range checks on resolved `train` settings. Every error names the config key (and its flag),
//! so a mistake in a config file is found without guessing.
//!
//! ```
//! use clap::Parser;
//! let args = dpo::config::TrainArgs::parse_from(["train", "--model", "m", "--dataset", "d", "--beta=-1"]);
//! let err = dpo::config::validate(&args).unwrap_err().to_string();
//! assert!(err.contains("beta"), "{err}");
//! ```
use super::{TrainArgs, UsageError};
use anyhow::Result;

/// Checks every numeric and named setting of `args`; the first problem is a [`UsageError`].
pub fn validate(args: &TrainArgs) -> Result<()> {
    check(args).map_err(|msg| UsageError(msg).into())
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

fn check(a: &TrainArgs) -> Result<(), String> {
    let inf = f64::INFINITY;
    for (key, v) in
        [("batch_size", a.batch_size), ("grad_accum", a.grad_accum), ("epochs", a.epochs), ("lora_r", a.lora_r)]
    {
        at_least_one(key, v)?;
    }
    for (key, v) in [
        ("logging_steps", a.logging_steps),
        ("max_length", a.common.max_length),
        ("max_prompt_length", a.common.max_prompt_length),
    ] {
        at_least_one(key, v)?;
    }
    for (key, v) in [
        ("max_steps", a.max_steps),
        ("save_steps", a.save_steps),
        ("save_total_limit", a.save_total_limit),
        ("eval_steps", a.eval_steps),
    ] {
        if let Some(v) = v {
            at_least_one(key, v)?;
        }
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        return Err(out_of_range("lr", a.lr, "must be a positive number"));
    }
    if !(a.lora_alpha.is_finite() && a.lora_alpha > 0.0) {
        return Err(out_of_range("lora_alpha", a.lora_alpha, "must be a positive number"));
    }
    in_range("lora_dropout", a.lora_dropout, 0.0, 1.0, false, "must be in [0, 1)")?;
    in_range("warmup_ratio", a.warmup_ratio, 0.0, 1.0, false, "must be in [0, 1)")?;
    in_range("weight_decay", a.weight_decay, 0.0, inf, false, "must not be negative")?;
    in_range("max_grad_norm", a.max_grad_norm, 0.0, inf, false, "must not be negative (0 disables clipping)")?;
    in_range("max_skip_ratio", a.common.max_skip_ratio, 0.0, 1.0, true, "must be in [0, 1]")?;
    a.common.objective()?;
    if a.full {
        let clash = [
            (a.init_adapter.is_some(), "--init-adapter"),
            (a.verify_resume, "--verify-resume (it keeps a pre-step copy of everything trained: the whole model)"),
            (a.lora_dropout > 0.0, "--lora-dropout"),
            (a.common.stage == super::Stage::Reward, "dpo reward train"),
            (
                a.gradient_checkpointing == super::Checkpointing::On,
                "--gradient-checkpointing on (recomputation is built for frozen layers)",
            ),
        ];
        if let Some((_, flag)) = clash.iter().find(|(on, _)| *on) {
            return Err(format!("--full (config key full) cannot be used with {flag}"));
        }
    }
    Ok(())
}
