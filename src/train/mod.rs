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
pub mod schedule;
pub mod step;

use crate::config::TrainArgs;
use crate::data::order::PairOrder;
use crate::lora::{LoraConfig, adapter};
use crate::loss::RewardMetrics;
use crate::rng::{SeededRng, Stream};
use crate::checkpoint;
use crate::fsutil::atomic;
use crate::provenance::Source;
use crate::refcache::{Fingerprint, RefCache};
use crate::setup::{Dataset, Loaded};
use anyhow::{Context, Result, bail};
use candle_core::Var;
use crate::optim::AdamW;
pub use plan::{StepPlan, StepWork};
use progress::Progress;
use schedule::{LrSchedule, Schedule};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use step::{clip, global_norm};

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

/// Loads the model, data and (with `--ref-cache`) the reference cache, then trains.
pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    let started = Instant::now();
    let files = crate::setup::open_model(args)?;
    let data = crate::setup::load_pairs_for(args, &files)?;
    check_memory(args, &files, &data)?;
    let prepared = prepare(args)?;
    let mut loaded = files.load()?;
    let eval_data = load_eval_pairs(args, &loaded)?;
    let mut cache = open_cache(args, &loaded)?;
    let inputs = Inputs { loaded: &mut loaded, data: &data, eval_data: eval_data.as_ref(), cache: cache.as_mut() };
    train_prepared(args, prepared, inputs, started)
}

/// `--dry-run`: prints the memory plan of these settings, model and data (stdout), without
/// loading weights; fails as a real run would when it does not fit.
pub fn dry_run(args: &TrainArgs) -> Result<()> {
    let files = crate::setup::open_model(args)?;
    let data = crate::setup::load_pairs_for(args, &files)?;
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

/// Trains one run on an already loaded model. Adapters are attached afresh (replacing those of
/// a previous run, which must have had the same targets), so runs are independent.
pub fn run_loaded(args: &TrainArgs, inputs: Inputs) -> Result<TrainSummary> {
    let started = Instant::now();
    let prepared = prepare(args)?;
    train_prepared(args, prepared, inputs, started)
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
    let cache = RefCache::open(&dir, reference_fingerprint(args, loaded)?)?;
    eprintln!("reference cache {}: {} pairs cached", cache.dir().display(), cache.len());
    Ok(Some(cache))
}

/// What a run's reference log-probs depend on besides the pairs: the model (every file read),
/// the template, truncation, dtype, device class, padding and the dpo build.
pub fn reference_fingerprint(args: &crate::config::CommonArgs, loaded: &Loaded) -> Result<Fingerprint> {
    let model = Source::model(&loaded.model_dir.display().to_string(), &loaded.model_dir)?;
    let mut settings = vec![
        ("template", args.template.clone()),
        ("format", args.format.clone()),
        ("max_length", args.max_length.to_string()),
        ("max_prompt_length", args.max_prompt_length.to_string()),
        ("dtype", format!("{:?}", loaded.model.dtype())),
        ("device", if loaded.device.is_cpu() { "cpu" } else { "cuda" }.to_string()),
        ("pad_id", loaded.pad_id.to_string()),
    ];
    if let Some(t) = &args.template_file {
        settings.push(("template_file", crate::fsutil::sha256_file(t).with_context(|| format!("hashing --template-file {}", t.display()))?));
    }
    Fingerprint::new(&model, &settings)
}

/// Checked settings, the checkpoint to resume from, and the output folder made ready.
struct Prepared {
    resume: Option<checkpoint::Checkpoint>,
    config_toml: String,
}

fn prepare(args: &TrainArgs) -> Result<Prepared> {
    validate(args)?;
    let resume = match &args.resume {
        Some(r) => Some(crate::config::resolve_resume(r, Some(&args.output_dir.to_string_lossy()))?),
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

fn train_prepared(args: &TrainArgs, prepared: Prepared, inputs: Inputs, started: Instant) -> Result<TrainSummary> {
    let Inputs { loaded, data, eval_data, mut cache } = inputs;
    let result = train_loop(args, prepared, loaded, data, eval_data, cache.as_deref_mut(), started);
    if let Some(c) = cache {
        c.flush()?;
        eprintln!("reference cache: {} pairs reused, {} computed", c.hits, c.misses);
    }
    result
}

fn train_loop(
    args: &TrainArgs,
    prepared: Prepared,
    loaded: &mut Loaded,
    data: &Dataset,
    eval_data: Option<&Dataset>,
    mut cache: Option<&mut RefCache>,
    started: Instant,
) -> Result<TrainSummary> {
    let Prepared { resume, config_toml } = prepared;
    let loss = crate::setup::dpo_loss(args)?;
    let (lora_cfg, params) = match &args.init_adapter {
        Some(dir) => adapter::attach_from_dir(&mut loaded.model, dir, Some(args.lora_dropout))?,
        None => {
            let cfg = LoraConfig::new(args.lora_r, args.lora_alpha, args.lora_dropout, &args.lora_targets)?;
            adapter::attach_fresh(&mut loaded.model, &cfg, args.seed)?
        }
    };
    check_no_stale_adapters(&mut loaded.model, params.len())?;
    loaded.model.set_recompute(args.gradient_checkpointing.enabled(&loaded.device));
    let vars: Vec<Var> = params.iter().map(|p| p.var.clone()).collect();

    let n = data.len();
    let plan = StepPlan::new(args, n);
    let (per_step, total_steps) = (plan.per_step, plan.total_steps);
    let order = PairOrder::new(n, (!args.no_shuffle).then_some(args.seed));
    let schedule = LrSchedule {
        kind: Schedule::parse(&args.lr_scheduler)?,
        base_lr: args.lr,
        warmup_steps: plan.warmup(args),
        total_steps,
    };
    let mut optimizer = AdamW::new(&vars, 0.9, 0.999, 1e-8, args.weight_decay)?;
    let mut dropout_rng = SeededRng::new(args.seed, Stream::Dropout);
    let metrics_path = args.output_dir.join(METRICS_FILE);
    let mut first_step = 1;
    if let Some(ckpt) = &resume {
        if args.verify_resume {
            provenance(args, loaded)?
                .check_same_as(&ckpt.manifest.provenance)
                .with_context(|| format!("--verify-resume: the inputs of {} changed", ckpt.dir.display()))?;
            let work = StepWork { model: &loaded.model, pad_id: loaded.pad_id, data, order: &order, plan: &plan, loss: &loss, vars: &vars };
            resume::verify(ckpt, &params, &work, lora_cfg.dropout, &loaded.device)?;
        }
        ckpt.restore(&params, &mut optimizer, &loaded.device)?;
        dropout_rng.set_word_pos(ckpt.state.dropout_rng_position.parse().context("corrupt RNG position")?);
        resume::trim_metrics(&metrics_path, ckpt.state.step)?;
        let curve = args.output_dir.join(EVAL_CURVE_FILE);
        if curve.exists() {
            resume::trim_metrics(&curve, ckpt.state.step)?;
        }
        first_step = ckpt.state.step + 1;
        eprintln!("resuming from {} (step {})", ckpt.dir.display(), ckpt.state.step);
    } else {
        std::fs::write(&metrics_path, b"").with_context(|| format!("creating {}", metrics_path.display()))?;
        let curve = args.output_dir.join(EVAL_CURVE_FILE);
        if curve.exists() {
            std::fs::remove_file(&curve).with_context(|| format!("removing the old {}", curve.display()))?;
        }
    }
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    if data.truncated > 0 {
        eprintln!("{} of {n} pairs were truncated to --max-length {}", data.truncated, args.max_length);
    }
    eprintln!(
        "training {} LoRA tensors ({} parameters) on {n} pairs for {total_steps} steps",
        vars.len(),
        vars.iter().map(|v| v.elem_count()).sum::<usize>()
    );
    // Checkpoints (periodic, or the one a pause writes) carry the run's provenance.
    let checkpoints = args.save_steps.is_some() || args.pause_after_steps.is_some();
    let provenance = checkpoints.then(|| provenance(args, loaded)).transpose()?;
    let stop = interrupt::StopSignal::install()?;

    let mut progress = Progress::new(total_steps, args.logging_steps);
    let (mut last, mut all_tokens) = (None, 0usize);
    let mut last_eval: Option<(usize, RewardMetrics)> = None;
    for step in first_step..=total_steps {
        let step_start = Instant::now();
        let rng_before_step = dropout_rng.word_pos();
        let first = (step - 1) * per_step;
        let positions = plan.positions(step);
        let work = StepWork { model: &loaded.model, pad_id: loaded.pad_id, data, order: &order, plan: &plan, loss: &loss, vars: &vars };
        let (scores, grads, tokens) = work.forward_backward(step, lora_cfg.dropout, &mut dropout_rng, cache.as_deref_mut())?;
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            bail!("step {step}: gradient norm is {grad_norm}; stopping before the adapter is corrupted");
        }
        // What --verify-resume needs to recompute this step: the adapter before its update.
        let pre_step = match provenance {
            Some(_) => Some(vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?),
            None => None,
        };
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
        let line = serde_json::to_string(&metrics)?;
        writeln!(metrics_file, "{line}")?;
        metrics_file.flush()?;
        progress.step(step, metrics.rewards.loss, metrics.rewards.rewards_accuracies, metrics.tokens_per_sec);
        all_tokens += tokens;
        last = Some(metrics);
        let paused = args.pause_after_steps == Some(step) && step < total_steps;
        // Evaluation reads the adapter and draws no random numbers: it never changes the run.
        let eval_due = paused || args.eval_steps.is_some_and(|every| step % every == 0 || step == total_steps);
        if let (true, Some(d)) = (eval_due, eval_data) {
            let m = heldout::evaluate(loaded, d, &loss, args.batch_size, cache.as_deref_mut())?;
            append_eval_line(&args.output_dir, step, &m)?;
            last_eval = Some((step, m));
        }

        let signal = stop.received();
        let due = paused || args.save_steps.is_some_and(|every| step % every == 0 && step < total_steps);
        if let Some(provenance) = provenance.as_ref().filter(|_| due || signal.is_some()) {
            let stream_position = positions.last().map_or(first, |p| p + 1);
            let state = crate::checkpoint::TrainerState {
                step,
                stream_position,
                epoch: stream_position / n,
                index_in_epoch: stream_position % n,
                dropout_rng_position: dropout_rng.word_pos().to_string(),
                dropout_rng_position_before_step: rng_before_step.to_string(),
                optimizer_steps: optimizer.steps(),
            };
            let snapshot = checkpoint::Snapshot {
                params: &params,
                pre_step: pre_step.as_deref(),
                lora: &lora_cfg,
                optimizer: &optimizer,
                state,
                config_toml: &config_toml,
                provenance,
                metrics: serde_json::from_str(&line)?,
            };
            let dir = checkpoint::save(&args.output_dir, &snapshot)?;
            if let Some(keep) = args.save_total_limit {
                checkpoint::prune(&args.output_dir, keep, resume.as_ref().map(|c| c.dir.as_path()))?;
            }
            if let Some(signal) = signal {
                progress.finish();
                metrics_file.sync_all()?;
                return Err(interrupt::Interrupted { signal, checkpoint: dir, output_dir: args.output_dir.clone() }.into());
            }
            if paused {
                progress.finish();
                metrics_file.sync_all()?;
                return Err(interrupt::Paused { step }.into());
            }
        }
        if let Some(signal) = signal {
            bail!("interrupted by signal {signal} at step {step}; no checkpoint written (pass --save-steps to make runs resumable)");
        }
        if args.stop_after_steps == Some(step) {
            progress.finish();
            bail!("stopped after step {step} (--stop-after-steps)");
        }
    }
    progress.finish();
    metrics_file.sync_all()?;
    adapter::save(&args.output_dir, &params, &lora_cfg, &Path::new(&args.model).display().to_string())?;

    let final_metrics = match last {
        Some(m) => m.rewards,
        None => bail!("nothing to do: the run already finished {total_steps} steps"),
    };
    let eval = match eval_data {
        Some(d) => {
            let m = match last_eval {
                Some((step, m)) if step == total_steps => m,
                _ => heldout::evaluate(loaded, d, &loss, args.batch_size, cache)?,
            };
            atomic::write_bytes(&args.output_dir.join(EVAL_FILE), serde_json::to_string_pretty(&m)?.as_bytes())?;
            Some(m)
        }
        None => None,
    };
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        steps: total_steps,
        pairs: n,
        truncated_pairs: data.truncated,
        final_loss: final_metrics.loss,
        final_reward_accuracy: final_metrics.rewards_accuracies,
        seconds,
        tokens_per_sec: all_tokens as f64 / seconds,
        output_dir: args.output_dir.clone(),
        eval,
    })
}

pub(crate) fn append_eval_line(output_dir: &Path, step: usize, m: &RewardMetrics) -> Result<()> {
    let mut line = serde_json::to_value(m)?;
    line["step"] = step.into();
    let path = output_dir.join(EVAL_CURVE_FILE);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// Every adapter on the model belongs to this run (a previous run of a sweep with other
/// targets would leave its own behind, silently training a different model).
fn check_no_stale_adapters(model: &mut crate::model::CausalLm, params: usize) -> Result<()> {
    let attached = model.linear_layers_mut().iter().filter(|(_, _, l)| l.lora().is_some()).count();
    if attached * 2 != params {
        bail!("the model carries {attached} adapters but this run attached {}: runs sharing a loaded model must target the same layers", params / 2);
    }
    Ok(())
}

/// What the manifests record about the run's inputs (hashed once, at the start).
fn provenance(args: &TrainArgs, loaded: &Loaded) -> Result<checkpoint::Provenance> {
    Ok(checkpoint::Provenance {
        model: Source::model(&args.model.display().to_string(), &loaded.model_dir)?,
        dataset: Source::files(&args.dataset.display().to_string(), &crate::setup::dataset_files(args)?)?,
        template: args.template.clone(),
    })
}

fn validate(args: &TrainArgs) -> Result<()> {
    crate::config::validate(args)?;
    let positive = [("batch-size", args.batch_size), ("grad-accum", args.grad_accum), ("epochs", args.epochs)];
    for (name, v) in positive {
        if v == 0 {
            bail!("--{name} must be at least 1");
        }
    }
    for (name, v) in [("max-steps", args.max_steps), ("save-steps", args.save_steps), ("save-total-limit", args.save_total_limit)] {
        if v == Some(0) {
            bail!("--{name} must be at least 1");
        }
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
    let previous = !checkpoints.is_empty() || [METRICS_FILE, adapter::WEIGHTS_FILE].iter().any(|f| dir.join(f).exists());
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
