//! `dpo sweep`: a grid over β, learning rate and loss, run in one process. The base model and
//! the data are loaded once, and the reference log-probs are computed once (the shared
//! [`crate::refcache::RefCache`], `OUTPUT/ref-cache` unless the config names one): they depend
//! on neither β, lr nor loss. Each run trains in `OUTPUT/<param>=<value>_.../` exactly as
//! `dpo train` would (same metrics, adapter, checkpoints), and `sweep_summary.{json,md}` are
//! rewritten after every run.
//!
//! ```no_run
//! use clap::Parser;
//! let args = dpo::sweep::SweepArgs::parse_from(["sweep", "--config", "configs/quickstart.toml", "--beta", "0.1,0.5", "--lr", "1e-3,5e-3"]);
//! let summary = dpo::sweep::run(&args, dpo::model::LayerPath::CpuOp).unwrap();
//! assert!(summary.all_finished());
//! ```
pub mod halving;
pub mod plan;
pub mod summary;

use crate::config::{RunSettings, UsageError};
use crate::fsutil::atomic;
use crate::train::{Inputs, Outcome};
use anyhow::{Context, Result, bail};
use clap::Parser;
use plan::{Grid, PLAN_FILE, Plan, Point};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use summary::{Row, Status, Summary};

/// A finished run's record in its folder; its presence is what "finished" means.
pub const RUN_FILE: &str = "run_summary.json";

#[derive(Debug, Clone, Parser)]
#[command(name = "sweep")]
pub struct SweepArgs {
    /// The `train` config file every run starts from.
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Comma list of β values.
    #[arg(long)]
    pub beta: Option<String>,
    /// Comma list of peak learning rates.
    #[arg(long)]
    pub lr: Option<String>,
    /// Comma list of losses, by TRL's names (`sigmoid,ipo,simpo`); `a+b` is one run mixing a and b
    /// (weights: the config's `loss_weights`).
    #[arg(long)]
    pub loss: Option<String>,
    /// A train setting for every run, as key=value (repeatable), over the config file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Held-out pairs scored after each run (eval loss, reward accuracy and margin).
    #[arg(long)]
    pub eval_dataset: Option<PathBuf>,
    /// Sweep folder (default: the config's output_dir).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Continue the sweep in OUTPUT: finished runs are skipped, an interrupted one resumes
    /// from its newest checkpoint.
    #[arg(long, value_name = "OUTPUT", conflicts_with_all = ["config", "beta", "lr", "loss", "sets", "eval_dataset", "output_dir", "early_stop"])]
    pub resume: Option<PathBuf>,
    /// `halving`: successive halving on eval reward accuracy. All runs train to max_steps/2^k,
    /// the better half (by eval reward accuracy, then eval loss) continues to twice the steps,
    /// and so on until one run reaches max_steps; dropped runs are reported as stopped, with
    /// their metrics at the step they stopped. Needs held-out pairs.
    #[arg(long, value_name = "halving", value_parser = ["halving"])]
    pub early_stop: Option<String>,
    /// The runs are `dpo sft` runs: the config is an sft config, and only --lr is swept.
    #[arg(long, conflicts_with_all = ["beta", "loss"])]
    pub sft: bool,
    /// Print the runs (and their state) without training.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the plan or the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One run of the plan, as `--dry-run` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedRun {
    pub name: String,
    pub output_dir: PathBuf,
    pub params: Vec<(String, String)>,
    /// `new`, `resume` (has checkpoints) or `finished`.
    pub state: &'static str,
}

/// The plan of these arguments: a new one, or the saved one of `--resume OUTPUT`.
pub fn plan(args: &SweepArgs) -> Result<Plan> {
    if let Some(out) = &args.resume {
        return Plan::read(out);
    }
    let config = args.config.clone().context("--config is required")?;
    let grid = Grid::parse(args.beta.as_deref(), args.lr.as_deref(), args.loss.as_deref())?;
    if grid.points().len() < 2 && grid == Grid::default() {
        bail!(UsageError("give at least one of --beta, --lr, --loss to sweep over".into()));
    }
    let mut plan = Plan {
        config,
        sets: args.sets.clone(),
        grid,
        output_dir: PathBuf::new(),
        eval_dataset: args.eval_dataset.clone(),
        early_stop: args.early_stop.clone(),
        sft: args.sft,
    };
    plan.output_dir = match &args.output_dir {
        Some(d) => d.clone(),
        None => plan.settings(&Point(Vec::new()))?.run.output_dir,
    };
    Ok(plan)
}

/// Each run with its settings and state.
pub fn planned_runs(plan: &Plan) -> Result<Vec<(PlannedRun, RunSettings)>> {
    plan.grid
        .points()
        .into_iter()
        .map(|p| {
            let args = plan.settings(&p)?;
            let dir = plan.run_dir(&p);
            let state = run_state(&dir);
            Ok((PlannedRun { name: p.name(), output_dir: dir, params: p.0, state }, args))
        })
        .collect()
}

pub(crate) fn run_state(dir: &Path) -> &'static str {
    if dir.join(RUN_FILE).is_file() {
        "finished"
    } else if crate::checkpoint::list(dir).is_ok_and(|c| !c.is_empty()) {
        "resume"
    } else {
        "new"
    }
}

/// Runs every unfinished run of the plan (on the layer path `layer_path` asks for); a failed run
/// is recorded and the others still run.
pub fn run(args: &SweepArgs, layer_path: crate::model::LayerPath) -> Result<Summary> {
    let plan = plan(args)?;
    let mut runs = planned_runs(&plan)?;
    for (_, s) in runs.iter_mut() {
        s.common.model.layer_path = layer_path;
    }
    if args.resume.is_none() && plan.output_dir.join(PLAN_FILE).exists() {
        bail!(UsageError(format!(
            "{} already holds a sweep; continue it with `dpo sweep --resume {}` or choose another --output-dir",
            plan.output_dir.display(),
            plan.output_dir.display()
        )));
    }
    std::fs::create_dir_all(&plan.output_dir).with_context(|| format!("creating {}", plan.output_dir.display()))?;
    atomic::write_bytes(&plan.output_dir.join(PLAN_FILE), serde_json::to_string_pretty(&plan)?.as_bytes())?;
    let first = &runs.first().context("the sweep has no runs")?.1;
    if let Some((r, s)) = runs.iter().find(|(_, s)| s.task.rows() != first.task.rows()) {
        bail!(UsageError(format!(
            "run {} trains on {} but the first run on {}: a sweep's runs share their data",
            r.name,
            s.task.unit(),
            first.task.unit()
        )));
    }
    let mut loaded = crate::setup::load_model(&first.common.model)?;
    let data = crate::setup::load_rows(&first.common, &loaded, &first.task)?;
    let eval_data = crate::train::load_eval_rows(first, &loaded)?;
    let mut cache = crate::train::reference::open_cache(first, &loaded)?;
    let stop = crate::train::interrupt::StopSignal::install()?;

    let mut rows: Vec<Row> = runs.iter().map(|(r, _)| pending_row(r)).collect();
    let mut shared =
        Shared { loaded: &mut loaded, data: &data, eval_data: eval_data.as_ref(), cache: cache.as_mut(), stop: &stop };
    if plan.early_stop.is_some() {
        if eval_data.is_none() {
            bail!(UsageError("--early-stop halving ranks runs by eval reward accuracy: give --eval-dataset (or eval_dataset / eval_split in the config)".into()));
        }
        halving::run(&plan, &runs, &mut rows, &mut shared)?;
    } else {
        for (i, (planned, train_args)) in runs.iter().enumerate() {
            if shared.stop.received().is_some() {
                break;
            }
            eprintln!("sweep run {}/{}: {} ({})", i + 1, runs.len(), planned.name, planned.state);
            rows[i] = match planned.state {
                "finished" => finished_row(planned, &read_run(&planned.output_dir)?),
                _ => match train_segment(planned, train_args.clone(), None, &mut shared) {
                    Segment::Finished(row) | Segment::Failed(row) => row,
                    Segment::Paused => bail!("run {} paused without --early-stop", planned.name),
                    Segment::Interrupted(e) => {
                        rows[i].error = Some(format!("{e:#}"));
                        Summary::new(rows).write(&plan.output_dir)?;
                        return Err(e);
                    }
                },
            };
            Summary::new(rows.clone()).write(&plan.output_dir)?;
        }
    }
    let summary = Summary::new(rows);
    summary.write(&plan.output_dir)?;
    Ok(summary)
}

/// What the runs of one sweep share: the loaded model, the data and the reference cache.
pub(crate) struct Shared<'a> {
    loaded: &'a mut crate::setup::Loaded,
    data: &'a crate::data::Dataset,
    eval_data: Option<&'a crate::data::Dataset>,
    cache: Option<&'a mut crate::refcache::RefCache>,
    stop: &'a crate::train::interrupt::StopSignal,
}

/// How one stretch of a run's training ended.
pub(crate) enum Segment {
    Finished(Row),
    Failed(Row),
    /// Paused at its rung (successive halving).
    Paused,
    /// Stopped by a signal: the sweep stops too.
    Interrupted(anyhow::Error),
}

/// Trains (or resumes) one run with `args`, in the sweep's loaded model, pausing after
/// `pause_after` (a halving rung); a finished run gets its `run_summary.json`.
pub(crate) fn train_segment(
    planned: &PlannedRun,
    mut args: RunSettings,
    pause_after: Option<usize>,
    shared: &mut Shared,
) -> Segment {
    match run_state(&planned.output_dir) {
        "resume" => args.run.resume = Some(planned.output_dir.display().to_string()),
        _ => args.run.adjustable.overwrite_output_dir = true,
    }
    let started = Instant::now();
    let inputs = Inputs {
        loaded: shared.loaded,
        data: shared.data,
        eval_data: shared.eval_data,
        reference: crate::scoring::Reference::computed(&args.task, shared.cache.as_deref_mut()),
        weights: None,
    };
    let failed = |e: &anyhow::Error| Row {
        status: Status::Failed,
        error: Some(format!("{e:#}")),
        seconds: started.elapsed().as_secs_f64(),
        ..pending_row(planned)
    };
    let control = crate::train::RunControl { pause_after_steps: pause_after, stop_after_steps: None };
    match crate::train::run_loaded(&args, control, inputs) {
        Ok(Outcome::Finished(s)) => {
            let written = serde_json::to_string_pretty(&s)
                .map_err(anyhow::Error::from)
                .and_then(|json| atomic::write_bytes(&planned.output_dir.join(RUN_FILE), json.as_bytes()))
                .and_then(|_| Ok(serde_json::to_value(&s)?));
            match written {
                Ok(v) => Segment::Finished(finished_row(planned, &v)),
                Err(e) => Segment::Failed(failed(&e)),
            }
        }
        Ok(Outcome::Paused { step }) => {
            eprintln!("sweep run {}: paused after step {step} (successive halving)", planned.name);
            Segment::Paused
        }
        Ok(Outcome::Interrupted(i)) => {
            eprintln!("sweep run {}: {i}", planned.name);
            Segment::Interrupted(i.into())
        }
        Ok(Outcome::Stopped { step }) => Segment::Failed(failed(&anyhow::anyhow!("stopped after step {step}"))),
        Err(e) => {
            eprintln!("sweep run {} failed: {e:#}", planned.name);
            Segment::Failed(failed(&e))
        }
    }
}

pub(crate) fn pending_row(r: &PlannedRun) -> Row {
    Row {
        name: r.name.clone(),
        params: r.params.clone(),
        status: Status::Pending,
        final_train_loss: None,
        eval_loss: None,
        eval_reward_accuracy: None,
        eval_reward_margin: None,
        seconds: 0.0,
        error: None,
        best: false,
        stopped_at_step: None,
    }
}

pub(crate) fn read_run(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(RUN_FILE);
    serde_json::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{} is corrupt", path.display()))
}

/// A row from a run's [`TrainSummary`] (as JSON, so rows of earlier processes read the same).
pub(crate) fn finished_row(r: &PlannedRun, s: &serde_json::Value) -> Row {
    let f = |v: &serde_json::Value| v.as_f64();
    let eval = &s["eval"];
    Row {
        status: Status::Finished,
        final_train_loss: f(&s["final_loss"]),
        eval_loss: f(&eval["loss"]),
        eval_reward_accuracy: f(&eval["rewards/accuracies"]),
        eval_reward_margin: f(&eval["rewards/margins"]),
        seconds: f(&s["seconds"]).unwrap_or(0.0),
        ..pending_row(r)
    }
}
