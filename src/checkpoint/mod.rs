//! What a run leaves on disk, written so that nothing is ever half-written.
//!
//! `OUTPUT/checkpoint-STEP/` holds the adapter in peft format (loadable on its own), the
//! optimizer moments, `trainer_state.json` (step, data position, RNG position), the resolved
//! config and `manifest.json` (provenance and the sha256 of every file). The folder is built
//! as a hidden temporary sibling and renamed into place.
//!
//! ```no_run
//! let steps = dpo::checkpoint::list(std::path::Path::new("out")).unwrap();
//! if let Some((step, dir)) = steps.last() { println!("newest: step {step} in {}", dir.display()); }
//! ```
pub mod manifest;

use crate::fsutil::atomic;

use crate::lora::LoraConfig;
use crate::lora::adapter::{self, NamedParam};
use crate::optim::AdamW;
use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use manifest::{Manifest, hash_dir};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const CONFIG_FILE: &str = "train_config.toml";
pub const PRE_STEP_FILE: &str = "pre_step_adapter.safetensors";
const PREFIX: &str = "checkpoint-";
pub const MODEL_FILE: &str = "model.safetensors";

/// Where the run stands after an optimizer step: enough to continue it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done (= the step this checkpoint was taken after).
    pub step: usize,
    /// Pairs consumed from the seeded order; the next step starts here.
    pub stream_position: usize,
    pub epoch: usize,
    pub index_in_epoch: usize,
    /// Word position of the LoRA-dropout random stream (u128 as a decimal string).
    pub dropout_rng_position: String,
    /// The same, before this step's micro-batches drew their masks (for --verify-resume).
    #[serde(default)]
    pub dropout_rng_position_before_step: String,
    pub optimizer_steps: u64,
}

pub use crate::provenance::Provenance;

pub struct Snapshot<'a> {
    pub params: &'a [NamedParam],
    /// The adapter before this step's update, aligned with `params` (for --verify-resume).
    pub pre_step: Option<&'a [Tensor]>,
    /// The adapter's config; `None` for full fine-tuning (the weights are saved as a model).
    pub lora: Option<&'a LoraConfig>,
    pub optimizer: &'a AdamW,
    pub state: TrainerState,
    pub config_toml: &'a str,
    /// The subcommand that resumes it (`dpo sft`).
    pub command: &'a str,
    pub provenance: &'a Provenance,
    pub metrics: serde_json::Value,
}

/// The checkpoint `--resume` names: a checkpoint folder, a run folder (its newest checkpoint,
/// which must verify), or `latest-valid` (the newest that verifies in `output_dir`).
pub fn resolve(resume: &str, output_dir: Option<&str>) -> Result<Checkpoint> {
    if resume == "latest-valid" {
        let dir = output_dir.context("--resume latest-valid needs --output-dir OUTPUT")?;
        return newest(Path::new(dir), true);
    }
    let path = Path::new(resume);
    if path.join(manifest::MANIFEST_FILE).exists() {
        Checkpoint::open(path)
    } else if path.is_dir() {
        newest(path, false)
    } else {
        bail!("--resume {resume}: no such run or checkpoint folder")
    }
}

pub fn dir_for(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("{PREFIX}{step}"))
}

/// Writes `OUTPUT/checkpoint-STEP/` atomically and returns its path.
pub fn save(output_dir: &Path, snap: &Snapshot) -> Result<PathBuf> {
    let dir = dir_for(output_dir, snap.state.step);
    atomic::write_dir(&dir, |tmp| {
        match snap.lora {
            Some(lora) => adapter::save(tmp, snap.params, lora, &snap.provenance.model.source)?,
            None => save_weights(&tmp.join(MODEL_FILE), snap.params)?,
        }
        save_optimizer(&tmp.join(OPTIMIZER_FILE), snap.params, snap.optimizer)?;
        if let Some(pre) = snap.pre_step {
            let tensors: Vec<(String, Tensor)> =
                snap.params.iter().zip(pre).map(|(p, t)| (p.name.clone(), t.clone())).collect();
            std::fs::write(tmp.join(PRE_STEP_FILE), safetensors::serialize(tensors, None)?)?;
        }
        std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&snap.state)?)?;
        std::fs::write(tmp.join(CONFIG_FILE), snap.config_toml)?;
        let manifest = Manifest {
            dpo_version: env!("CARGO_PKG_VERSION").to_string(),
            step: snap.state.step,
            command: Some(snap.command.to_string()),
            provenance: snap.provenance.clone(),
            metrics: snap.metrics.clone(),
            files: hash_dir(tmp)?,
        };
        std::fs::write(tmp.join(manifest::MANIFEST_FILE), serde_json::to_string_pretty(&manifest)?)?;
        Ok(())
    })?;
    Ok(dir)
}

/// The trained tensors under their own names (full fine-tuning's `model.safetensors`).
pub fn save_weights(path: &Path, params: &[NamedParam]) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    atomic::write_bytes(path, &safetensors::serialize(tensors, Some(meta))?)
}

fn save_optimizer(path: &Path, params: &[NamedParam], opt: &AdamW) -> Result<()> {
    let (m, v) = opt.state();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, p) in params.iter().enumerate() {
        tensors.push((format!("m.{}", p.name), m[i].clone()));
        tensors.push((format!("v.{}", p.name), v[i].clone()));
    }
    let meta = HashMap::from([("step".to_string(), opt.steps().to_string())]);
    std::fs::write(path, safetensors::serialize(tensors, Some(meta))?)?;
    Ok(())
}

/// A verified checkpoint folder: its manifest checked, ready to restore from.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub state: TrainerState,
    pub config_toml: String,
}

impl Checkpoint {
    /// Opens and verifies (sha256 of every file) a checkpoint folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        manifest.verify(dir)?;
        let state_path = dir.join(STATE_FILE);
        let state: TrainerState = serde_json::from_str(&std::fs::read_to_string(&state_path)?)
            .with_context(|| format!("{} is corrupt", state_path.display()))?;
        let config_toml = std::fs::read_to_string(dir.join(CONFIG_FILE))
            .with_context(|| format!("reading {}", dir.join(CONFIG_FILE).display()))?;
        Ok(Self { dir: dir.to_path_buf(), manifest, state, config_toml })
    }

    /// Loads the adapter tensors into `params` and the moments into `optimizer`.
    pub fn restore(&self, params: &[NamedParam], optimizer: &mut AdamW, device: &Device) -> Result<()> {
        let file = if self.dir.join(MODEL_FILE).exists() { MODEL_FILE } else { adapter::WEIGHTS_FILE };
        let weights = candle_core::safetensors::load(self.dir.join(file), device)?;
        let opt = candle_core::safetensors::load(self.dir.join(OPTIMIZER_FILE), device)?;
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for p in params {
            let get = |map: &HashMap<String, Tensor>, key: &str| -> Result<Tensor> {
                map.get(key).cloned().with_context(|| format!("checkpoint {} lacks tensor {key}", self.dir.display()))
            };
            p.var.set(&get(&weights, &p.name)?)?;
            m.push(get(&opt, &format!("m.{}", p.name))?);
            v.push(get(&opt, &format!("v.{}", p.name))?);
        }
        optimizer.restore(self.state.optimizer_steps, m, v)
    }
}

/// Checkpoint folders of a run, oldest first (temporary folders are not listed).
pub fn list(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(output_dir) else { return Ok(found) };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix(PREFIX).and_then(|s| s.parse::<usize>().ok())
            && path.is_dir()
        {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest checkpoint of `output_dir`; with `fall_back`, the newest one that verifies.
pub fn newest(output_dir: &Path, fall_back: bool) -> Result<Checkpoint> {
    let all = list(output_dir)?;
    if all.is_empty() {
        bail!("{} holds no checkpoint-STEP folder to resume from", output_dir.display());
    }
    let mut failures = Vec::new();
    for (_, dir) in all.iter().rev() {
        match Checkpoint::open(dir) {
            Ok(c) => {
                for f in &failures {
                    eprintln!("skipping invalid checkpoint: {f:#}");
                }
                return Ok(c);
            }
            Err(e) if fall_back => failures.push(e),
            Err(e) => {
                return Err(e.context(format!(
                    "the newest checkpoint {} is invalid; pass --resume latest-valid --output-dir {} to fall back to an older one",
                    dir.display(),
                    output_dir.display()
                )));
            }
        }
    }
    bail!(
        "no valid checkpoint in {}: {:?}",
        output_dir.display(),
        failures.iter().map(|e| format!("{e:#}")).collect::<Vec<_>>()
    )
}

/// Keeps the newest `keep` checkpoints (and `protect`, the one resumed from); deletes the rest.
pub fn prune(output_dir: &Path, keep: usize, protect: Option<&Path>) -> Result<()> {
    let all = list(output_dir)?;
    let excess = all.len().saturating_sub(keep);
    for (_, dir) in all.into_iter().take(excess) {
        if protect.is_some_and(|p| same_dir(p, &dir)) {
            continue;
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing old checkpoint {}", dir.display()))?;
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}
