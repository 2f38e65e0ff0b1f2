//! The training recipe as one object: [`Trainer::setup`] (adapters, plan, schedule, optimizer,
//! metrics log), [`Trainer::restore`] (a checkpoint, or a fresh log), then per step
//! [`Trainer::step`], [`Trainer::log`], [`Trainer::evaluate`], [`Trainer::checkpoint`], and
//! [`Trainer::finish`]. [`Trainer::run`] strings them together and says how the run ended.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (args, inputs, prepared): (dpo::config::TrainArgs, dpo::train::Inputs, dpo::train::Prepared) = todo!();
//! let trainer = dpo::train::trainer::Trainer::setup(&args, dpo::train::RunControl::default(), inputs, prepared)?;
//! match trainer.run()? {
//!     dpo::train::Outcome::Finished(summary) => println!("loss {}", summary.final_loss),
//!     other => println!("{other:?}"),
//! }
//! # Ok(()) }
//! ```
use super::interrupt::{Interrupted, StopSignal};
use super::plan::{StepPlan, StepWork};
use super::progress::Progress;
use super::step::{clip, global_norm};
use super::{
    EVAL_CURVE_FILE, EVAL_FILE, Inputs, METRICS_FILE, Outcome, Prepared, RunControl, StepMetrics, TrainSummary,
};
use crate::checkpoint::{self, Checkpoint, Provenance};
use crate::config::TrainArgs;
use crate::data::order::PairOrder;
use crate::fsutil::atomic;
use crate::lora::LoraConfig;
use crate::lora::adapter::{self, NamedParam};
use crate::loss::{Objective, RewardMetrics};
use crate::optim::AdamW;
use crate::optim::schedule::LrSchedule;
use crate::refcache::RefCache;
use crate::rng::{SeededRng, Stream};
use crate::setup::{Dataset, Loaded};
use anyhow::{Context, Result, bail};
use candle_core::{Tensor, Var};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

pub struct Trainer<'a> {
    args: &'a TrainArgs,
    control: RunControl,
    loaded: &'a mut Loaded,
    data: &'a Dataset,
    eval_data: Option<&'a Dataset>,
    cache: Option<&'a mut RefCache>,
    resume: Option<Checkpoint>,
    config_toml: String,
    objective: Objective,
    /// The adapter; `None` for full fine-tuning.
    lora: Option<LoraConfig>,
    params: Vec<NamedParam>,
    vars: Vec<Var>,
    plan: StepPlan,
    order: PairOrder,
    schedule: LrSchedule,
    optimizer: AdamW,
    dropout_rng: SeededRng,
    /// What checkpoints record; computed once, only when the run writes checkpoints.
    provenance: Option<Provenance>,
    metrics: Option<File>,
    progress: Progress,
    stop: StopSignal,
    last: Option<StepMetrics>,
    last_eval: Option<(usize, RewardMetrics)>,
    tokens: usize,
    started: Instant,
}

/// What one optimizer step did, for logging and checkpointing.
pub struct StepDone {
    pub metrics: StepMetrics,
    /// The adapter before the update (what `--verify-resume` recomputes the step from).
    pre_step: Option<Vec<Tensor>>,
    rng_before_step: u128,
    /// Stream position of the next pair.
    next_position: usize,
}

impl<'a> Trainer<'a> {
    /// Attaches the adapters (fresh or `--init-adapter`) and builds the step plan, LR schedule,
    /// optimizer and dropout stream.
    pub fn setup(args: &'a TrainArgs, control: RunControl, inputs: Inputs<'a>, prepared: Prepared) -> Result<Self> {
        let Inputs { loaded, data, eval_data, cache } = inputs;
        let objective = crate::setup::objective(&args.common)?;
        let (lora, params) = if args.full {
            // Every weight trained; the reference cache was filled before (see `train::run_with`).
            let named = loaded.model.make_trainable()?;
            loaded.model.seal_reference();
            (None, named.into_iter().map(|(name, var)| NamedParam { name, var }).collect())
        } else {
            let (lora, params) = Self::attach_adapter(args, &objective, loaded)?;
            (Some(lora), params)
        };
        // Recomputation re-runs frozen layers; full fine-tuning trains them (refused by the validator when asked for).
        loaded.model.set_recompute(args.gradient_checkpointing.enabled(&loaded.device) && !args.full);
        let vars: Vec<Var> = params.iter().map(|p| p.var.clone()).collect();
        let plan = StepPlan::new(args, data.len());
        let schedule = LrSchedule {
            kind: args.lr_scheduler,
            base_lr: args.lr,
            warmup_steps: plan.warmup(args),
            total_steps: plan.total_steps,
        };
        let writes_checkpoints = args.save_steps.is_some() || control.pause_after_steps.is_some() || args.verify_resume;
        let provenance = writes_checkpoints.then(|| super::provenance(args, loaded)).transpose()?;
        Ok(Self {
            optimizer: AdamW::new(&vars, 0.9, 0.999, 1e-8, args.weight_decay)?,
            order: PairOrder::new(data.len(), (!args.no_shuffle).then_some(args.seed)),
            dropout_rng: SeededRng::new(args.seed, Stream::Dropout),
            progress: Progress::new(plan.total_steps, args.logging_steps),
            stop: StopSignal::install()?,
            resume: prepared.resume,
            config_toml: prepared.config_toml,
            args,
            control,
            loaded,
            data,
            eval_data,
            cache,
            objective,
            lora,
            params,
            vars,
            plan,
            schedule,
            provenance,
            metrics: None,
            last: None,
            last_eval: None,
            tokens: 0,
            started: Instant::now(),
        })
    }

    fn work(&self) -> StepWork<'_> {
        StepWork {
            model: &self.loaded.model,
            pad_id: self.loaded.pad_id,
            data: self.data,
            order: &self.order,
            plan: &self.plan,
            objective: &self.objective,
            vars: &self.vars,
        }
    }

    fn metrics_path(&self) -> PathBuf {
        self.args.output_dir.join(METRICS_FILE)
    }

    /// LoRA adapters (fresh or `--init-adapter`), plus a reward model's score head.
    fn attach_adapter(
        args: &TrainArgs,
        objective: &crate::loss::Objective,
        loaded: &mut Loaded,
    ) -> Result<(LoraConfig, Vec<NamedParam>)> {
        let (mut lora, mut params) = match &args.init_adapter {
            Some(dir) => adapter::attach_from_dir(&mut loaded.model, dir, Some(args.lora_dropout))?,
            None => adapter::attach_fresh(
                &mut loaded.model,
                &LoraConfig::new(args.lora_r, args.lora_alpha, args.lora_dropout, &args.lora_targets)?,
                args.seed,
            )?,
        };
        super::check_no_stale_adapters(&mut loaded.model, params.len())?;
        if lora.sequence_classification && !objective.reward_model {
            bail!(
                "--init-adapter {}: a reward model's adapter (task_type SEQ_CLS); train it with `dpo reward train`",
                args.init_adapter.as_deref().unwrap_or(std::path::Path::new("?")).display()
            );
        }
        if objective.reward_model {
            // The score head: from --init-adapter when it has one, else fresh; trained in full.
            params.push(adapter::attach_score_head(&mut loaded.model, args.init_adapter.as_deref(), args.seed)?);
            lora.sequence_classification = true;
        }
        Ok((lora, params))
    }

    fn dropout(&self) -> f64 {
        self.lora.as_ref().map_or(0.0, |l| l.dropout)
    }

    /// From a checkpoint (verified with `--verify-resume`: inputs and the logged step), or a
    /// fresh metrics log. Returns the first step to run.
    pub fn restore(&mut self) -> Result<usize> {
        let curve = self.args.output_dir.join(EVAL_CURVE_FILE);
        let first = match self.resume.take() {
            Some(ckpt) => {
                if self.args.verify_resume {
                    let now = self.provenance.as_ref().context("provenance is computed for --verify-resume")?;
                    now.check_same_as(&ckpt.manifest.provenance)
                        .with_context(|| format!("--verify-resume: the inputs of {} changed", ckpt.dir.display()))?;
                    super::resume::verify(&ckpt, &self.params, &self.work(), self.dropout(), &self.loaded.device)?;
                }
                ckpt.restore(&self.params, &mut self.optimizer, &self.loaded.device)?;
                self.dropout_rng.set_word_pos(ckpt.state.dropout_rng_position.parse().context("corrupt RNG position")?);
                super::resume::trim_metrics(&self.metrics_path(), ckpt.state.step)?;
                if curve.exists() {
                    super::resume::trim_metrics(&curve, ckpt.state.step)?;
                }
                eprintln!("resuming from {} (step {})", ckpt.dir.display(), ckpt.state.step);
                let first = ckpt.state.step + 1;
                self.resume = Some(ckpt);
                first
            }
            None => {
                std::fs::write(self.metrics_path(), b"")
                    .with_context(|| format!("creating {}", self.metrics_path().display()))?;
                if curve.exists() {
                    std::fs::remove_file(&curve).with_context(|| format!("removing the old {}", curve.display()))?;
                }
                1
            }
        };
        self.metrics = Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(self.metrics_path())
                .with_context(|| format!("opening {}", self.metrics_path().display()))?,
        );
        Ok(first)
    }

    /// One optimizer step: the micro-batches' forward/backward, the norm, clipping, AdamW.
    pub fn step(&mut self, step: usize) -> Result<StepDone> {
        let started = Instant::now();
        let rng_before_step = self.dropout_rng.word_pos();
        let next_position = self.plan.positions(step).last().map_or((step - 1) * self.plan.per_step, |p| p + 1);
        let work = StepWork {
            model: &self.loaded.model,
            pad_id: self.loaded.pad_id,
            data: self.data,
            order: &self.order,
            plan: &self.plan,
            objective: &self.objective,
            vars: &self.vars,
        };
        let (scores, grads, tokens) =
            work.forward_backward(step, self.dropout(), &mut self.dropout_rng, self.cache.as_deref_mut())?;
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            bail!("step {step}: gradient norm is {grad_norm}; stopping before the adapter is corrupted");
        }
        // The pre-step adapter (for --verify-resume) is a small copy; for --full it would be the
        // whole model every step, so full runs keep none (and refuse --verify-resume).
        let pre_step = match (&self.provenance, &self.lora) {
            (Some(_), Some(_)) => {
                Some(self.vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?)
            }
            _ => None,
        };
        let lr = self.schedule.lr_at(step);
        self.optimizer.step(&self.vars, &clip(grads, grad_norm, self.args.max_grad_norm)?, lr)?;
        let rewards = RewardMetrics::mean(&scores);
        let tokens_per_sec = tokens as f64 / started.elapsed().as_secs_f64();
        let metrics = StepMetrics { step, lr, rewards, grad_norm, tokens, tokens_per_sec };
        Ok(StepDone { metrics, pre_step, rng_before_step, next_position })
    }

    /// Appends the step's line to `metrics.jsonl` (flushed) and shows progress.
    pub fn log(&mut self, done: &StepDone) -> Result<()> {
        let m = &done.metrics;
        let file = self.metrics.as_mut().context("restore() opens the metrics log")?;
        writeln!(file, "{}", serde_json::to_string(m)?)?;
        file.flush()?;
        self.progress.step(m.step, m.rewards.loss, m.rewards.accuracy(), m.tokens_per_sec);
        self.tokens += m.tokens;
        self.last = Some(m.clone());
        Ok(())
    }

    /// Scores the held-out pairs when due (`--eval-steps`, or a pause) into the eval curve.
    /// It reads the adapter and draws no random numbers: it never changes the run.
    pub fn evaluate(&mut self, step: usize, paused: bool) -> Result<()> {
        let due =
            paused || self.args.eval_steps.is_some_and(|every| step % every == 0 || step == self.plan.total_steps);
        let Some(data) = self.eval_data.filter(|_| due) else { return Ok(()) };
        let m = super::heldout::evaluate(
            self.loaded,
            data,
            &self.objective,
            self.args.batch_size,
            self.cache.as_deref_mut(),
        )?;
        super::append_eval_line(&self.args.output_dir, step, &m)?;
        self.last_eval = Some((step, m));
        Ok(())
    }

    /// Writes `checkpoint-STEP` (when the run records provenance) and prunes old ones.
    pub fn checkpoint(&mut self, done: StepDone) -> Result<Option<PathBuf>> {
        let Some(provenance) = self.provenance.as_ref() else { return Ok(None) };
        let n = self.plan.pairs;
        let state = crate::checkpoint::TrainerState {
            step: done.metrics.step,
            stream_position: done.next_position,
            epoch: done.next_position / n,
            index_in_epoch: done.next_position % n,
            dropout_rng_position: self.dropout_rng.word_pos().to_string(),
            dropout_rng_position_before_step: done.rng_before_step.to_string(),
            optimizer_steps: self.optimizer.steps(),
        };
        let snapshot = checkpoint::Snapshot {
            params: &self.params,
            pre_step: done.pre_step.as_deref(),
            lora: self.lora.as_ref(),
            optimizer: &self.optimizer,
            state,
            config_toml: &self.config_toml,
            provenance,
            metrics: serde_json::to_value(&done.metrics)?,
        };
        let dir = checkpoint::save(&self.args.output_dir, &snapshot)?;
        if let Some(keep) = self.args.save_total_limit {
            checkpoint::prune(&self.args.output_dir, keep, self.resume.as_ref().map(|c| c.dir.as_path()))?;
        }
        Ok(Some(dir))
    }

    /// Stops the progress display and syncs the metrics log.
    fn close_log(&mut self) -> Result<()> {
        self.progress.finish();
        if let Some(f) = &self.metrics {
            f.sync_all()?;
        }
        Ok(())
    }

    /// Writes the adapter and the held-out metrics of the final adapter; the run's summary.
    pub fn finish(mut self) -> Result<TrainSummary> {
        self.close_log()?;
        let args = self.args;
        match &self.lora {
            Some(lora) => {
                adapter::save(&args.output_dir, &self.params, lora, &args.common.model.display().to_string())?
            }
            None => super::save_full_model(&args.output_dir, &self.params, &self.loaded.model_dir)?,
        }
        let total_steps = self.plan.total_steps;
        let Some(last) = self.last.take() else { bail!("nothing to do: the run already finished {total_steps} steps") };
        let eval = match self.eval_data {
            Some(d) => {
                let m = match self.last_eval.take() {
                    Some((step, m)) if step == total_steps => m,
                    _ => super::heldout::evaluate(
                        self.loaded,
                        d,
                        &self.objective,
                        args.batch_size,
                        self.cache.as_deref_mut(),
                    )?,
                };
                atomic::write_bytes(&args.output_dir.join(EVAL_FILE), serde_json::to_string_pretty(&m)?.as_bytes())?;
                Some(m)
            }
            None => None,
        };
        let seconds = self.started.elapsed().as_secs_f64();
        Ok(TrainSummary {
            steps: total_steps,
            pairs: self.data.len(),
            truncated_pairs: self.data.truncated,
            final_loss: last.rewards.loss,
            final_reward_accuracy: last.rewards.accuracy(),
            seconds,
            tokens_per_sec: self.tokens as f64 / seconds,
            output_dir: args.output_dir.clone(),
            eval,
        })
    }

    /// The run: restore, then step, log, evaluate and checkpoint until the last step, a
    /// signal, a pause or a stop; then finish.
    pub fn run(mut self) -> Result<Outcome> {
        let first = self.restore()?;
        self.announce();
        let total = self.plan.total_steps;
        for step in first..=total {
            let done = self.step(step)?;
            self.log(&done)?;
            let paused = self.control.pause_after_steps == Some(step) && step < total;
            self.evaluate(step, paused)?;
            let signal = self.stop.received();
            let due = paused || self.args.save_steps.is_some_and(|every| step % every == 0 && step < total);
            let saved = if due || signal.is_some() { self.checkpoint(done)? } else { None };
            if let Some(signal) = signal {
                self.close_log()?;
                let Some(checkpoint) = saved else {
                    bail!(
                        "interrupted by signal {signal} at step {step}; no checkpoint written (pass --save-steps to make runs resumable)"
                    )
                };
                return Ok(Outcome::Interrupted(Interrupted {
                    signal,
                    checkpoint,
                    output_dir: self.args.output_dir.clone(),
                }));
            }
            if paused {
                self.close_log()?;
                return Ok(Outcome::Paused { step });
            }
            if self.control.stop_after_steps == Some(step) {
                self.close_log()?;
                return Ok(Outcome::Stopped { step });
            }
        }
        Ok(Outcome::Finished(self.finish()?))
    }

    fn announce(&self) {
        let n = self.data.len();
        if self.data.truncated > 0 {
            eprintln!(
                "{} of {n} pairs were truncated to --max-length {}",
                self.data.truncated, self.args.common.max_length
            );
        }
        let parameters: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        eprintln!(
            "training {} LoRA tensors ({parameters} parameters) on {n} pairs for {} steps",
            self.vars.len(),
            self.plan.total_steps
        );
    }
}
