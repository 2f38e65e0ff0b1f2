//! Continuing a run from a checkpoint: which settings may change, and trimming the metrics
//! log back to the checkpoint so the resumed run writes exactly the lines the original would.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (args, ckpt): (dpo::config::TrainArgs, dpo::checkpoint::Checkpoint) = todo!();
//! dpo::train::resume::check_compatible(&args, &ckpt)?;
//! # Ok(()) }
//! ```
use crate::checkpoint::Checkpoint;
use crate::checkpoint::atomic;
use crate::config::TrainArgs;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Settings a resumed run may change: they do not alter the math of the steps to come
/// (`max_steps` extends or shortens the run, as the user asks; `device` moves it).
const MAY_CHANGE: &[&str] = &["logging_steps", "save_steps", "save_total_limit", "max_steps", "device", "overwrite_output_dir"];

/// Refuses a resume whose flags would change the math of the run, naming each such flag.
pub fn check_compatible(args: &TrainArgs, ckpt: &Checkpoint) -> Result<()> {
    let saved: toml::Table = ckpt.config_toml.parse().context("the checkpoint's train_config.toml is corrupt")?;
    let now: toml::Table = args.to_toml()?.parse()?;
    let mut changed = Vec::new();
    for key in saved.keys().chain(now.keys()) {
        if MAY_CHANGE.contains(&key.as_str()) || changed.contains(key) {
            continue;
        }
        if saved.get(key) != now.get(key) {
            changed.push(key.clone());
        }
    }
    if !changed.is_empty() {
        let detail: Vec<String> = changed
            .iter()
            .map(|k| format!("--{} (checkpoint: {}, now: {})", k.replace('_', "-"), show(saved.get(k)), show(now.get(k))))
            .collect();
        bail!(
            "cannot resume from {}: these flags would change the run: {}. Drop them, or start a new run in another --output-dir",
            ckpt.dir.display(),
            detail.join(", ")
        );
    }
    Ok(())
}

fn show(v: Option<&toml::Value>) -> String {
    v.map_or("unset".to_string(), |v| v.to_string())
}

/// Keeps the metrics lines of steps `1..=step`: lines a killed run wrote after its last
/// checkpoint are replayed by the resumed run.
pub fn trim_metrics(path: &Path, step: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { break }; // a torn last line
        if v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s as usize <= step) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    atomic::write_bytes(path, kept.as_bytes())
}
