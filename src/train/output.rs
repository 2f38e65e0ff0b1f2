//! A run's output folder: made ready (refusing to mix two runs), the held-out curve appended
//! to, and full fine-tuning's model folder written.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! dpo::train::output::prepare_dir(std::path::Path::new("out"), false, false)?;
//! # Ok(()) }
//! ```
use super::{EVAL_CURVE_FILE, METRICS_FILE};
use crate::checkpoint;
use crate::fsutil::atomic;
use crate::lora::adapter::{self, NamedParam};
use crate::loss::Metrics;
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::Path;

/// Refuses to mix a new run into a folder that holds another run's results, unless asked
/// (then the old checkpoints go too, so a later --resume cannot pick them up). Always removes
/// temporary folders a crashed run left behind.
pub fn prepare_dir(dir: &Path, overwrite: bool, resuming: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating output dir {}", dir.display()))?;
    for stale in atomic::remove_stale_temps(dir)? {
        eprintln!("removed {stale}, left half-written by an interrupted run");
    }
    if resuming {
        return Ok(());
    }
    let checkpoints = checkpoint::list(dir)?;
    let previous = !checkpoints.is_empty()
        || [METRICS_FILE, adapter::WEIGHTS_FILE, checkpoint::MODEL_FILE].iter().any(|f| dir.join(f).exists());
    if previous && !overwrite {
        bail!(
            "{} already holds a training run; resume it with --resume {}, choose another --output-dir, or pass --overwrite-output-dir",
            dir.display(),
            dir.display()
        );
    }
    for (_, old) in checkpoints {
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

/// Appends one held-out evaluation (with its step) to `OUTPUT/eval_metrics.jsonl`.
pub fn append_eval_line(output_dir: &Path, step: usize, m: &Metrics) -> Result<()> {
    let mut line = serde_json::to_value(m)?;
    line["step"] = step.into();
    let path = output_dir.join(EVAL_CURVE_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// Full fine-tuning's output: `model.safetensors` with the model's own tensor names, beside
/// the base model's config and tokenizer files, so the folder loads as a model.
pub fn save_full_model(dir: &Path, params: &[NamedParam], base: &Path) -> Result<()> {
    checkpoint::save_weights(&dir.join(checkpoint::MODEL_FILE), params)?;
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let from = base.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            atomic::write_bytes(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}
