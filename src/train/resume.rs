//! Continuing a run from a checkpoint: which settings may change, and trimming the metrics
//! log back to the checkpoint so the resumed run writes exactly the lines the original would.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (settings, ckpt): (dpo::config::RunSettings, dpo::checkpoint::Checkpoint) = todo!();
//! dpo::train::resume::check_compatible(&settings, &ckpt)?;
//! # Ok(()) }
//! ```
use crate::checkpoint::{Checkpoint, PRE_STEP_FILE};
use crate::config::RunSettings;
use crate::fsutil::atomic;
use crate::lora::adapter::NamedParam;
use crate::loss::Metrics;
use crate::rng::{SeededRng, Stream};
use crate::scoring::Reference;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Refuses a resume whose flags would change the math of the run, naming each such flag.
/// The settings a resume may change are those of the [`crate::config::Adjustable`] groups.
pub fn check_compatible(s: &RunSettings, ckpt: &Checkpoint) -> Result<()> {
    let saved: toml::Table = ckpt.config_toml.parse().context("the checkpoint's train_config.toml is corrupt")?;
    let now: toml::Table = s.config_toml.parse()?;
    let adjustable = RunSettings::adjustable_keys();
    let mut changed = Vec::new();
    for key in saved.keys().chain(now.keys()) {
        if adjustable.contains(key) || changed.contains(key) {
            continue;
        }
        if saved.get(key) != now.get(key) {
            changed.push(key.clone());
        }
    }
    if !changed.is_empty() {
        let detail: Vec<String> = changed
            .iter()
            .map(|k| {
                format!("--{} (checkpoint: {}, now: {})", k.replace('_', "-"), show(saved.get(k)), show(now.get(k)))
            })
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

/// `--verify-resume`: recomputes the checkpoint step's logged metrics from what the checkpoint
/// holds (the adapter before that step, the data position, the RNG position) and refuses to go
/// on if any differs from the logged value by more than 1e-6. Leaves `params` at the pre-step
/// values; the caller restores the checkpoint afterwards.
pub fn verify(
    ckpt: &Checkpoint,
    params: &[NamedParam],
    work: &super::StepWork,
    dropout: f64,
    device: &candle_core::Device,
) -> Result<()> {
    let path = ckpt.dir.join(PRE_STEP_FILE);
    let pre = candle_core::safetensors::load(&path, device)
        .with_context(|| format!("--verify-resume needs {}", path.display()))?;
    for p in params {
        p.var.set(pre.get(&p.name).with_context(|| format!("{} lacks {}", path.display(), p.name))?)?;
    }
    let step = ckpt.state.step;
    let seed_pos: u128 = ckpt.state.dropout_rng_position_before_step.parse().context("corrupt RNG position")?;
    let seed: u64 = {
        let cfg: toml::Table = ckpt.config_toml.parse()?;
        cfg.get("seed").and_then(|v| v.as_integer()).context("checkpoint config has no seed")? as u64
    };
    let mut rng = SeededRng::new(seed, Stream::Dropout);
    rng.set_word_pos(seed_pos);
    let mut reference = Reference::computed(work.task, None);
    let (scores, grads, _) = work.forward_backward(step, dropout, &mut rng, &mut reference)?;
    let mut now = serde_json::to_value(Metrics::mean(&scores))?;
    now["grad_norm"] = super::step::global_norm(&grads)?.into();
    let logged = &ckpt.manifest.metrics;
    for (key, value) in now.as_object().unwrap() {
        let (a, b) = (value.as_f64().unwrap_or(f64::NAN), logged.get(key).and_then(|v| v.as_f64()).unwrap_or(f64::NAN));
        // Written so that NaN on either side fails.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        let differs = !((a - b).abs() <= 1e-6 * b.abs().max(1.0));
        if differs {
            bail!(
                "--verify-resume: step {step} recomputed from {} gives {key} = {a}, but {b} was logged; \
                 the model, data or checkpoint differ from the original run",
                ckpt.dir.display()
            );
        }
    }
    eprintln!("verified: step {step}'s metrics recomputed from the checkpoint match the log");
    Ok(())
}
