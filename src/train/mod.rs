//! The training recipe, whatever the task: load, attach what is trained, loop over optimizer
//! steps, write the adapter (or model).
//!
//! One optimizer step takes the next `batch_size × grad_accum` rows of the (seeded) order, runs
//! [`step::micro_step`] on each micro-batch, clips, updates with AdamW and logs a line to
//! `metrics.jsonl`.
//!
//! [`run`] loads the model and data itself; [`run_loaded`] trains on a model and data already
//! loaded (a sweep loads them once for all its runs), optionally taking the reference log-probs
//! from a [`crate::refcache::RefCache`] instead of running the reference forward.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::config::TrainArgs::parse_from(["train", "--model", "m", "--dataset", "d.jsonl"]);
//! let summary = dpo::train::run(&args.settings().unwrap()).unwrap();
//! println!("final loss {}", summary.final_loss);
//! ```
pub mod heldout;
pub mod interrupt;
pub mod memory;
pub mod output;
pub mod plan;
pub mod progress;
pub mod reference;
pub mod resume;
pub mod step;
pub mod trainer;

use crate::checkpoint;
use crate::config::RunSettings;
use crate::data::Dataset;
use crate::fsutil::atomic;
use crate::lora::adapter::NamedParam;
use crate::loss::Metrics;
use crate::provenance::Source;
use crate::scoring::Reference;
use crate::setup::{Loaded, ModelFiles};
use anyhow::{Context, Result, bail};
pub use plan::{StepPlan, StepWork};
use reference::{close_cache, open_cache};
use serde::Serialize;
use std::path::PathBuf;

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CONFIG_FILE: &str = checkpoint::CONFIG_FILE;
pub const EVAL_FILE: &str = "eval_metrics.json";
/// Held-out metrics over training (`--eval-steps`), one JSON object per evaluation with its step.
pub const EVAL_CURVE_FILE: &str = "eval_metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub lr: f64,
    #[serde(flatten)]
    pub metrics: Metrics,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_sec: f64,
}

/// What a finished run reports (stdout, `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    /// Rows trained on, and what they are (`pairs`, `examples`).
    pub rows: usize,
    pub unit: &'static str,
    /// Rows cut by --max-length / --max-prompt-length.
    pub truncated: usize,
    pub final_loss: f64,
    /// The last step's reward accuracy, for tasks that rank pairs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_reward_accuracy: Option<f64>,
    pub seconds: f64,
    pub tokens_per_sec: f64,
    /// `adapter` or `model`: what the output folder holds.
    pub saved: &'static str,
    pub output_dir: PathBuf,
    /// Held-out metrics of the final adapter (`--eval-dataset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<Metrics>,
}

/// What a run trains on once the model is loaded: shared by the runs of a sweep.
pub struct Inputs<'a> {
    pub loaded: &'a mut Loaded,
    pub data: &'a Dataset,
    pub eval_data: Option<&'a Dataset>,
    /// Where the reference's log-probs come from.
    pub reference: Reference<'a>,
    /// Full fine-tuning: every weight, trainable, with its checkpoint name (the model was built
    /// trainable); `None`: adapters are attached.
    pub weights: Option<Vec<NamedParam>>,
}

/// Hooks a caller (a sweep, a test) passes beside the run's settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunControl {
    /// After this step: score the held-out rows, write a checkpoint and return
    /// [`Outcome::Paused`] (successive halving in `dpo sweep`).
    pub pause_after_steps: Option<usize>,
    /// Return [`Outcome::Stopped`] after this step, as if killed (checkpoints already written stay).
    pub stop_after_steps: Option<usize>,
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    Finished(TrainSummary),
    Paused {
        step: usize,
    },
    /// SIGINT/SIGTERM after the step in progress, with a checkpoint to resume from.
    Interrupted(interrupt::Interrupted),
    Stopped {
        step: usize,
    },
}

impl Outcome {
    /// A finished run's summary; anything else is an error ([`interrupt::Interrupted`] for a
    /// signal).
    pub fn into_summary(self) -> Result<TrainSummary> {
        match self {
            Outcome::Finished(s) => Ok(s),
            Outcome::Interrupted(i) => Err(i.into()),
            Outcome::Paused { step } | Outcome::Stopped { step } => bail!("the run stopped after step {step}"),
        }
    }
}

/// Loads the model, data and (with `--ref-cache`) the reference cache, then trains to the end.
pub fn run(settings: &RunSettings) -> Result<TrainSummary> {
    run_with(settings, RunControl::default())?.into_summary()
}

/// As [`run`], with run-control hooks; says how the run ended. Everything that can be checked
/// without the weights (the data, the memory plan, the output folder) is, before they load.
pub fn run_with(s: &RunSettings, control: RunControl) -> Result<Outcome> {
    let files = crate::setup::open_model(&s.common.model)?;
    check_before_loading(s, &files)?;
    let data = crate::setup::load_rows_for(&s.common, &files, &s.task)?;
    check_memory(s, &files, &data)?;
    let prepared = prepare(s)?;
    if s.run.full {
        return run_full(s, control, files, &data, prepared);
    }
    let mut loaded = files.load()?;
    let eval_data = load_eval_rows(s, &loaded)?;
    let mut cache = open_cache(s, &loaded)?;
    let reference = Reference::computed(&s.task, cache.as_mut());
    let inputs = Inputs { loaded: &mut loaded, data: &data, eval_data: eval_data.as_ref(), reference, weights: None };
    let outcome = trainer::Trainer::setup(s, control, inputs, prepared)?.run();
    close_cache(cache)?;
    outcome
}

/// Full fine-tuning: the reference is the starting weights, computed for the whole run before
/// step 1 through the path the policy will take (so the two agree exactly at step 1), into the
/// reference cache, then only read from it: there is never a second copy of the weights.
fn run_full(
    s: &RunSettings,
    control: RunControl,
    files: ModelFiles,
    data: &Dataset,
    prepared: Prepared,
) -> Result<Outcome> {
    let (mut loaded, weights) = files.load_trainable()?;
    let eval_data = load_eval_rows(s, &loaded)?;
    let mut cache = None;
    if s.task.needs_reference() {
        let mut with_cache = s.clone();
        with_cache.ref_cache.get_or_insert_with(|| PathBuf::from("auto"));
        let mut c = open_cache(&with_cache, &loaded)?.context("a reference cache")?;
        reference::precompute_reference(s, &loaded, data, eval_data.as_ref(), &mut c)?;
        cache = Some(c);
    }
    let reference = match cache.as_mut() {
        Some(c) => Reference::CacheOnly(c),
        None => Reference::None,
    };
    let inputs = Inputs { loaded: &mut loaded, data, eval_data: eval_data.as_ref(), reference, weights: Some(weights) };
    let outcome = trainer::Trainer::setup(s, control, inputs, prepared)?.run();
    close_cache(cache)?;
    outcome
}

/// What the model's description alone can refuse: LoRA targets it does not have, full
/// fine-tuning it cannot do.
fn check_before_loading(s: &RunSettings, files: &ModelFiles) -> Result<()> {
    if s.run.full {
        if let Some(why) = crate::model::causal_lm::full_training_unsupported(&files.arch, files.dtype) {
            bail!(crate::config::UsageError(why));
        }
    } else if s.run.lora.init_adapter.is_none() {
        let l = &s.run.lora;
        crate::lora::LoraConfig::with_targets(l.r(), l.alpha(), l.dropout(), &l.targets())?
            .resolve(&files.arch)
            .map_err(|e| crate::config::UsageError(format!("--lora-targets {}: {e:#}", l.targets())))?;
    }
    Ok(())
}

/// Trains one run on an already loaded model (a sweep loads it once for all its runs).
/// Adapters are attached afresh (replacing those of a previous run, which must have had the
/// same targets), so runs are independent.
pub fn run_loaded(s: &RunSettings, control: RunControl, inputs: Inputs) -> Result<Outcome> {
    if s.run.full {
        bail!(
            "--full runs cannot share a loaded model (each trains every weight): run them with `{}`, not `dpo sweep`",
            s.task.command()
        );
    }
    let prepared = prepare(s)?;
    trainer::Trainer::setup(s, control, inputs, prepared)?.run()
}

/// `--dry-run`: prints the memory plan of these settings, model and data (stdout), without
/// loading weights; fails as a real run would when it does not fit.
pub fn dry_run(s: &RunSettings) -> Result<()> {
    let files = crate::setup::open_model(&s.common.model)?;
    check_before_loading(s, &files)?;
    let data = crate::setup::load_rows_for(&s.common, &files, &s.task)?;
    println!("{}", check_memory(s, &files, &data)?);
    Ok(())
}

/// Prints the run's memory plan and refuses a run that would not fit, before any weight is
/// loaded or output written. Returns the plan's line.
fn check_memory(s: &RunSettings, files: &ModelFiles, data: &Dataset) -> Result<String> {
    let (plan, setup, geo) = memory::plan_run(&s.run, files, data)?;
    let (budget, what) = match s.run.adjustable.max_memory {
        Some(gib) => (Some((gib * (1u64 << 30) as f64) as u64), "--max-memory allows".to_string()),
        None => (memory::available(&files.device), format!("the {} has", format!("{:?}", files.device).to_lowercase())),
    };
    let line = format!(
        "memory plan: {} ({} path, {:?}, recomputation {}, {} rows of up to {} tokens){}",
        plan.describe(),
        setup.path,
        setup.dtype,
        if setup.recompute { "on" } else { "off" },
        geo.rows,
        geo.row_len,
        budget.map(|b| format!("; {what} {:.2} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or_default()
    );
    eprintln!("{line}");
    if let Some(budget) = budget {
        memory::check(&plan, budget, &what, &setup, &geo, s.run.batch_size)?;
    }
    Ok(line)
}

/// The held-out rows (`--eval-dataset` and/or `--eval-split`), read with the run's data settings.
pub fn load_eval_rows(s: &RunSettings, loaded: &Loaded) -> Result<Option<Dataset>> {
    let adj = &s.run.adjustable;
    if !adj.evaluates() {
        return Ok(None);
    }
    let mut common = s.common.clone();
    if let Some(path) = &adj.eval_dataset {
        common.dataset = path.clone();
    }
    if let Some(split) = &adj.eval_split {
        common.split = split.clone();
    }
    crate::setup::load_rows(&common, loaded, &s.task)
        .with_context(|| format!("reading the held-out rows ({} split {})", common.dataset.display(), common.split))
        .map(Some)
}

/// Checked settings, the checkpoint to resume from, and the output folder made ready.
pub struct Prepared {
    pub resume: Option<checkpoint::Checkpoint>,
}

fn prepare(s: &RunSettings) -> Result<Prepared> {
    let resume = match &s.run.resume {
        Some(r) => Some(crate::checkpoint::resolve(r, Some(&s.run.output_dir.to_string_lossy()))?),
        None => None,
    };
    if let Some(ckpt) = &resume {
        resume::check_compatible(s, ckpt)?;
    }
    output::prepare_dir(&s.run.output_dir, s.run.adjustable.overwrite_output_dir, resume.is_some())?;
    atomic::write_bytes(&s.run.output_dir.join(CONFIG_FILE), s.config_toml.as_bytes())?;
    Ok(Prepared { resume })
}

/// Every adapter on the model belongs to this run (a previous run of a sweep with other
/// targets would leave its own behind, silently training a different model).
pub(crate) fn check_no_stale_adapters(model: &mut crate::model::CausalLm, params: usize) -> Result<()> {
    let attached = model.linear_layers_mut().iter().filter(|(_, _, l)| l.lora().is_some()).count();
    if attached * 2 != params {
        bail!(
            "the model carries {attached} adapters but this run attached {}: runs sharing a loaded model must target the same layers",
            params / 2
        );
    }
    Ok(())
}

/// What the manifests record about the run's inputs (hashed once, at the start).
pub(crate) fn provenance(s: &RunSettings, loaded: &Loaded) -> Result<checkpoint::Provenance> {
    let common = &s.common;
    Ok(checkpoint::Provenance {
        model: Source::model(&common.model.path.display().to_string(), &loaded.model_dir)?,
        dataset: Source::files(&common.dataset.display().to_string(), &crate::setup::dataset_files(common)?)?,
        template: crate::config::name_of(&common.render.template),
    })
}
