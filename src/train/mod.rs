//! The training recipe: load, attach LoRA, loop over optimizer steps, write the adapter.
//!
//! One optimizer step takes the next `batch_size × grad_accum` pairs of the (seeded) order,
//! runs [`step::micro_step`] on each micro-batch, clips, updates with AdamW and logs a line
//! to `metrics.jsonl`.
//!
//! [`run`] loads the model and data itself; [`run_loaded`] trains on a model and data already
//! loaded (a sweep loads them once for all its runs), optionally taking the reference log-probs
//! from a [`RefCache`] instead of running the reference forward.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::config::TrainArgs::parse_from(["train", "--model", "m", "--dataset", "d.jsonl"]);
//! let summary = dpo::train::run(&args).unwrap();
//! println!("final loss {}", summary.final_loss);
//! ```
pub mod heldout;
pub mod interrupt;
pub mod memory;
pub mod plan;
pub mod progress;
pub mod resume;
pub mod step;
pub mod trainer;

use crate::checkpoint;
use crate::config::TrainArgs;
use crate::fsutil::atomic;
use crate::lora::adapter;
use crate::loss::RewardMetrics;
use crate::provenance::Source;
use crate::refcache::{Fingerprint, RefCache};
use crate::setup::{Dataset, Loaded};
use anyhow::{Context, Result, bail};
pub use plan::{StepPlan, StepWork};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// Held-out metrics of the final adapter (`--eval-dataset`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<RewardMetrics>,
}

/// What a run trains on once the model is loaded: shared by the runs of a sweep.
pub struct Inputs<'a> {
    pub loaded: &'a mut Loaded,
    pub data: &'a Dataset,
    pub eval_data: Option<&'a Dataset>,
    pub cache: Option<&'a mut RefCache>,
}

/// Hooks a caller (a sweep, a test) passes beside the run's settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunControl {
    /// After this step: score the held-out pairs, write a checkpoint and return
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

/// Loads the model, data and (with `--ref-cache`) the reference cache, then trains to the end.
/// Anything but a finished run is an error ([`interrupt::Interrupted`] for a signal).
pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    match run_with(args, RunControl::default())? {
        Outcome::Finished(s) => Ok(s),
        Outcome::Interrupted(i) => Err(i.into()),
        Outcome::Paused { step } | Outcome::Stopped { step } => bail!("the run stopped after step {step}"),
    }
}

/// As [`run`], with run-control hooks; says how the run ended.
pub fn run_with(args: &TrainArgs, control: RunControl) -> Result<Outcome> {
    let files = crate::setup::open_model(&args.common)?;
    let data = crate::setup::load_pairs_for(&args.common, &files)?;
    check_memory(args, &files, &data)?;
    let prepared = prepare(args)?;
    let mut loaded = files.load()?;
    let eval_data = load_eval_pairs(args, &loaded)?;
    let objective = crate::setup::objective(&args.common)?;
    let full_reference = args.full && objective.needs_reference();
    let mut cache = if full_reference {
        // Full fine-tuning: the reference is the starting weights, computed for the whole run
        // before step 1 (the weights change from then on; there is never a second copy).
        let mut with_cache = args.clone();
        with_cache.ref_cache.get_or_insert_with(|| PathBuf::from("auto"));
        let mut cache = open_cache(&with_cache, &loaded)?.context("a reference cache")?;
        // Through the code path the policy will take, so the two agree exactly at step 1.
        loaded.model.make_trainable()?;
        precompute_reference(args, &loaded, &data, eval_data.as_ref(), &mut cache)?;
        Some(cache)
    } else {
        open_cache(args, &loaded)?
    };
    let inputs = Inputs { loaded: &mut loaded, data: &data, eval_data: eval_data.as_ref(), cache: cache.as_mut() };
    let outcome = trainer::Trainer::setup(args, control, inputs, prepared)?.run();
    close_cache(cache)?;
    outcome
}

/// Trains one run on an already loaded model (a sweep loads it once for all its runs).
/// Adapters are attached afresh (replacing those of a previous run, which must have had the
/// same targets), so runs are independent.
pub fn run_loaded(args: &TrainArgs, control: RunControl, inputs: Inputs) -> Result<Outcome> {
    if args.full {
        bail!(
            "--full runs cannot share a loaded model (each trains every weight): run them with `dpo train`, not `dpo sweep`"
        );
    }
    let prepared = prepare(args)?;
    trainer::Trainer::setup(args, control, inputs, prepared)?.run()
}

/// Fills `cache` with the reference log-probs of every micro-batch the run will score: the
/// training steps in order, then the held-out pairs (`dpo ref-cache build`, and `--full` before
/// its first step).
pub fn precompute_reference(
    args: &TrainArgs,
    loaded: &Loaded,
    data: &Dataset,
    eval: Option<&Dataset>,
    cache: &mut RefCache,
) -> Result<()> {
    let objective = crate::setup::objective(&args.common)?;
    let plan = plan::StepPlan::new(args, data.len());
    let order = crate::data::order::PairOrder::new(data.len(), (!args.no_shuffle).then_some(args.seed));
    let mut fill = |data: &Dataset, indices: &[usize]| -> Result<()> {
        for item in
            crate::scoring::micro_batches(data, indices, plan.batch_size, loaded.pad_id, &loaded.device, &objective)
        {
            let (pairs, batch) = item?;
            crate::scoring::reference_logps(&loaded.model, &pairs, &batch, Some(&mut *cache))?;
        }
        Ok(())
    };
    for step in 1..=plan.total_steps {
        let indices: Vec<usize> = plan.positions(step).into_iter().map(|p| order.pair_at(p)).collect();
        fill(data, &indices)?;
    }
    if let Some(eval) = eval {
        fill(eval, &(0..eval.len()).collect::<Vec<_>>())?;
    }
    Ok(())
}

/// Full fine-tuning's output: `model.safetensors` with the model's own tensor names, beside
/// the base model's config and tokenizer files, so the folder loads as a model.
pub fn save_full_model(dir: &Path, params: &[adapter::NamedParam], base: &Path) -> Result<()> {
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

/// `--dry-run`: prints the memory plan of these settings, model and data (stdout), without
/// loading weights; fails as a real run would when it does not fit.
pub fn dry_run(args: &TrainArgs) -> Result<()> {
    let files = crate::setup::open_model(&args.common)?;
    let data = crate::setup::load_pairs_for(&args.common, &files)?;
    println!("{}", check_memory(args, &files, &data)?);
    Ok(())
}

/// Prints the run's memory plan and refuses a run that would not fit, before any weight is
/// loaded or output written. Returns the plan's line.
fn check_memory(args: &TrainArgs, files: &crate::setup::ModelFiles, data: &Dataset) -> Result<String> {
    let (plan, setup, geo) = memory::plan_run(args, files, data)?;
    let (budget, what) = match args.max_memory {
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
        memory::check(&plan, budget, &what, &setup, &geo, args.batch_size)?;
    }
    Ok(line)
}

fn close_cache(cache: Option<RefCache>) -> Result<()> {
    if let Some(mut c) = cache {
        c.flush()?;
        eprintln!("reference cache: {} pairs reused, {} computed", c.hits, c.misses);
    }
    Ok(())
}

/// The held-out pairs (`--eval-dataset` and/or `--eval-split`), read with the run's data settings.
pub fn load_eval_pairs(args: &TrainArgs, loaded: &Loaded) -> Result<Option<Dataset>> {
    if args.eval_dataset.is_none() && args.eval_split.is_none() {
        return Ok(None);
    }
    let mut common = args.common.clone();
    if let Some(path) = &args.eval_dataset {
        common.dataset = path.clone();
    }
    if let Some(split) = &args.eval_split {
        common.split = split.clone();
    }
    crate::setup::load_pairs(&common, loaded)
        .with_context(|| format!("reading the held-out pairs ({} split {})", common.dataset.display(), common.split))
        .map(Some)
}

/// The reference cache `--ref-cache` names, opened for this model and these data settings.
pub fn open_cache(args: &TrainArgs, loaded: &Loaded) -> Result<Option<RefCache>> {
    let Some(dir) = args.ref_cache_dir() else { return Ok(None) };
    if !crate::setup::objective(&args.common)?.needs_reference() {
        // Reference-free losses never run the reference: nothing to cache.
        return Ok(None);
    }
    let cache = RefCache::open(&dir, reference_fingerprint(&args.common, loaded)?)?;
    eprintln!("reference cache {}: {} pairs cached", cache.dir().display(), cache.len());
    Ok(Some(cache))
}

/// What a run's reference log-probs depend on besides the pairs: the model (every file read),
/// the template, truncation, dtype, device class, padding and the dpo build.
pub fn reference_fingerprint(args: &crate::config::CommonArgs, loaded: &Loaded) -> Result<Fingerprint> {
    let model = Source::model(&loaded.model_dir.display().to_string(), &loaded.model_dir)?;
    let mut settings = vec![
        ("template", crate::config::name_of(&args.template)),
        ("format", crate::config::name_of(&args.format)),
        ("max_length", args.max_length.to_string()),
        ("max_prompt_length", args.max_prompt_length.to_string()),
        ("dtype", format!("{:?}", loaded.model.dtype())),
        ("device", if loaded.device.is_cpu() { "cpu" } else { "cuda" }.to_string()),
        ("pad_id", loaded.pad_id.to_string()),
    ];
    if let Some(alpha) = args.ld_alpha {
        // LD-DPO's weighted sums are what is cached.
        settings.push(("ld_alpha", alpha.to_string()));
    }
    if let Some(t) = &args.template_file {
        settings.push((
            "template_file",
            crate::fsutil::sha256_file(t).with_context(|| format!("hashing --template-file {}", t.display()))?,
        ));
    }
    Fingerprint::new(&model, &settings)
}

/// Checked settings, the checkpoint to resume from, and the output folder made ready.
pub struct Prepared {
    pub resume: Option<checkpoint::Checkpoint>,
    pub config_toml: String,
}

fn prepare(args: &TrainArgs) -> Result<Prepared> {
    crate::config::validate(args)?;
    let resume = match &args.resume {
        Some(r) => Some(crate::checkpoint::resolve(r, Some(&args.output_dir.to_string_lossy()))?),
        None => None,
    };
    if let Some(ckpt) = &resume {
        resume::check_compatible(&neutral_as_saved(args, ckpt)?, ckpt)?;
    }
    prepare_output_dir(&args.output_dir, args.overwrite_output_dir, resume.is_some())?;
    let config_toml = args.to_toml()?;
    atomic::write_bytes(&args.output_dir.join(CONFIG_FILE), config_toml.as_bytes())?;
    Ok(Prepared { resume, config_toml })
}

/// `args` with the settings that cannot change the training math (the reference cache, the
/// held-out set and split) taken from the checkpoint, so a resume may add or drop them.
fn neutral_as_saved(args: &TrainArgs, ckpt: &checkpoint::Checkpoint) -> Result<TrainArgs> {
    let saved: toml::Table = ckpt.config_toml.parse().context("the checkpoint's train_config.toml is corrupt")?;
    let path = |key: &str| saved.get(key).and_then(|v| v.as_str()).map(PathBuf::from);
    let mut view = args.clone();
    view.ref_cache = path("ref_cache");
    view.eval_dataset = path("eval_dataset");
    view.eval_split = saved.get("eval_split").and_then(|v| v.as_str()).map(str::to_string);
    Ok(view)
}

pub(crate) fn append_eval_line(output_dir: &Path, step: usize, m: &RewardMetrics) -> Result<()> {
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
pub(crate) fn provenance(args: &TrainArgs, loaded: &Loaded) -> Result<checkpoint::Provenance> {
    Ok(checkpoint::Provenance {
        model: Source::model(&args.common.model.display().to_string(), &loaded.model_dir)?,
        dataset: Source::files(
            &args.common.dataset.display().to_string(),
            &crate::setup::dataset_files(&args.common)?,
        )?,
        template: crate::config::name_of(&args.common.template),
    })
}

/// Refuses to mix a new run into a folder that holds another run's results, unless asked
/// (then the old checkpoints go too, so a later --resume cannot pick them up). Always removes
/// temporary folders a crashed run left behind.
fn prepare_output_dir(dir: &Path, overwrite: bool, resuming: bool) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating output dir {}", dir.display()))?;
    for stale in atomic::remove_stale_temps(dir)? {
        eprintln!("removed {stale}, left half-written by an interrupted run");
    }
    if resuming {
        return Ok(());
    }
    let checkpoints = checkpoint::list(dir)?;
    let previous =
        !checkpoints.is_empty() || [METRICS_FILE, adapter::WEIGHTS_FILE].iter().any(|f| dir.join(f).exists());
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
