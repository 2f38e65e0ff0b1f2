//! The training recipe as one object: [`Trainer::setup`] (adapters, plan, schedule, optimizer,
//! metrics log), [`Trainer::restore`] (a checkpoint, or a fresh log), then per step
//! [`Trainer::step`], [`Trainer::log`], [`Trainer::evaluate`], [`Trainer::checkpoint`], and
//! [`Trainer::finish`]. [`Trainer::run`] strings them together and says how the run ended.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (settings, inputs, prepared): (dpo::config::RunSettings, dpo::train::Inputs, dpo::train::Prepared) = todo!();
//! let trainer = dpo::train::trainer::Trainer::setup(&settings, dpo::train::RunControl::default(), inputs, prepared)?;
//! match trainer.run()? {
//!     dpo::train::Outcome::Finished(summary) => println!("loss {}", summary.final_loss),
//!     other => println!("{other:?}"),
//! }
//! # Ok(()) }
//! ```
use super::interrupt::{Interrupted, StopSignal};
use super::output;
use super::plan::{StepPlan, StepWork};
use super::progress::Progress;
use super::step::{clip, global_norm};
use super::{
    EVAL_CURVE_FILE, EVAL_FILE, Inputs, METRICS_FILE, Outcome, Prepared, RunControl, StepMetrics, TrainSummary,
};
use crate::checkpoint::{self, Checkpoint, Provenance};
use crate::config::RunSettings;
use crate::data::Dataset;
use crate::data::order::PairOrder;
use crate::fsutil::atomic;
use crate::lora::LoraConfig;
use crate::lora::adapter::{self, NamedParam};
use crate::loss::Metrics;
use crate::optim::AdamW;
use crate::optim::schedule::LrSchedule;
use crate::rng::{SeededRng, Stream};
use crate::scoring::Reference;
use crate::setup::Loaded;
use anyhow::{Context, Result, bail};
use candle_core::{Tensor, Var};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

pub struct Trainer<'a> {
    s: &'a RunSettings,
    control: RunControl,
    loaded: &'a mut Loaded,
    data: &'a Dataset,
    eval_data: Option<&'a Dataset>,
    reference: Reference<'a>,
    resume: Option<Checkpoint>,
    /// The adapter; `None` for full fine-tuning.
    lora: Option<LoraConfig>,
    /// What is trained: the adapters (and a reward model's score head), or every weight.
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
    last_eval: Option<(usize, Metrics)>,
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
    /// Attaches what is trained (adapters fresh or from `--init-adapter`, a reward model's
    /// score head; or, for full fine-tuning, the weights the model was built with) and builds
    /// the step plan, LR schedule, optimizer and dropout stream.
    pub fn setup(s: &'a RunSettings, control: RunControl, inputs: Inputs<'a>, prepared: Prepared) -> Result<Self> {
        let Inputs { loaded, data, eval_data, reference, weights } = inputs;
        let (lora, params) = match weights {
            Some(weights) => (None, weights),
            None => {
                let (lora, params) = Self::attach(s, loaded)?;
                (Some(lora), params)
            }
        };
        // Recomputation re-runs frozen layers; full fine-tuning trains them (refused when asked for).
        loaded.model.set_recompute(s.run.adjustable.gradient_checkpointing.enabled(&loaded.device) && !s.run.full);
        let vars: Vec<Var> = params.iter().map(|p| p.var.clone()).collect();
        let run = &s.run;
        let plan = StepPlan::new(run, data.len());
        let schedule = LrSchedule {
            kind: run.lr_scheduler,
            base_lr: run.lr,
            warmup_steps: plan.warmup(run),
            total_steps: plan.total_steps,
        };
        let writes_checkpoints =
            run.adjustable.save_steps.is_some() || control.pause_after_steps.is_some() || run.verify_resume;
        let provenance = writes_checkpoints.then(|| super::provenance(s, loaded)).transpose()?;
        Ok(Self {
            optimizer: AdamW::new(&vars, 0.9, 0.999, 1e-8, run.weight_decay)?,
            order: PairOrder::new(data.len(), (!run.no_shuffle).then_some(run.seed)),
            dropout_rng: SeededRng::new(run.seed, Stream::Dropout),
            progress: Progress::new(plan.total_steps, run.adjustable.logging_steps),
            stop: StopSignal::install()?,
            resume: prepared.resume,
            s,
            control,
            loaded,
            data,
            eval_data,
            reference,
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
            task: &self.s.task,
            vars: &self.vars,
        }
    }

    fn metrics_path(&self) -> PathBuf {
        self.s.run.output_dir.join(METRICS_FILE)
    }

    /// LoRA adapters (fresh or `--init-adapter`) as the task saves them, plus a reward model's
    /// score head.
    fn attach(s: &RunSettings, loaded: &mut Loaded) -> Result<(LoraConfig, Vec<NamedParam>)> {
        let l = &s.run.lora;
        let (mut lora, mut params) = match &l.init_adapter {
            Some(dir) => adapter::attach_from_dir(&mut loaded.model, dir, Some(l.dropout()))?,
            None => {
                let cfg = LoraConfig::with_targets(l.r(), l.alpha(), l.dropout(), &l.targets())?;
                adapter::attach_fresh(&mut loaded.model, &cfg, s.run.seed)?
            }
        };
        super::check_no_stale_adapters(&mut loaded.model, params.len())?;
        let wanted = s.task.adapter_task();
        if let (Some(dir), true) = (&l.init_adapter, lora.task_type != wanted) {
            bail!(
                "--init-adapter {}: a {} adapter, but `{}` trains a {} one",
                dir.display(),
                lora.task_type.peft_name(),
                s.task.command(),
                wanted.peft_name()
            );
        }
        if s.task.scores_sequences() {
            // The score head: from --init-adapter when it has one, else fresh; trained in full.
            params.push(adapter::attach_score_head(&mut loaded.model, l.init_adapter.as_deref(), s.run.seed)?);
        }
        lora.task_type = wanted;
        Ok((lora, params))
    }

    fn dropout(&self) -> f64 {
        self.lora.as_ref().map_or(0.0, |l| l.dropout)
    }

    /// From a checkpoint (verified with `--verify-resume`: inputs and the logged step), or a
    /// fresh metrics log. Returns the first step to run.
    pub fn restore(&mut self) -> Result<usize> {
        let curve = self.s.run.output_dir.join(EVAL_CURVE_FILE);
        let first = match self.resume.take() {
            Some(ckpt) => {
                if self.s.run.verify_resume {
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
            task: &self.s.task,
            vars: &self.vars,
        };
        let (scores, grads, tokens) =
            work.forward_backward(step, self.dropout(), &mut self.dropout_rng, &mut self.reference)?;
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            bail!("step {step}: gradient norm is {grad_norm}; stopping before the trained weights are corrupted");
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
        self.optimizer.step(&self.vars, &clip(grads, grad_norm, self.s.run.max_grad_norm)?, lr)?;
        let metrics = Metrics::mean(&scores);
        let tokens_per_sec = tokens as f64 / started.elapsed().as_secs_f64();
        let metrics = StepMetrics { step, lr, metrics, grad_norm, tokens, tokens_per_sec };
        Ok(StepDone { metrics, pre_step, rng_before_step, next_position })
    }

    /// Appends the step's line to `metrics.jsonl` (flushed) and shows progress.
    pub fn log(&mut self, done: &StepDone) -> Result<()> {
        let m = &done.metrics;
        let file = self.metrics.as_mut().context("restore() opens the metrics log")?;
        writeln!(file, "{}", serde_json::to_string(m)?)?;
        file.flush()?;
        self.progress.step(m.step, m.metrics.loss, m.metrics.accuracy(), m.tokens_per_sec);
        self.tokens += m.tokens;
        self.last = Some(m.clone());
        Ok(())
    }

    /// The held-out rows' metrics under the model as it is now.
    fn heldout(&mut self, data: &Dataset) -> Result<Metrics> {
        super::heldout::evaluate(self.loaded, data, &self.s.task, self.s.run.batch_size, &mut self.reference)
    }

    /// Scores the held-out rows when due (`--eval-steps`, or a pause) into the eval curve.
    /// It reads the trained weights and draws no random numbers: it never changes the run.
    pub fn evaluate(&mut self, step: usize, paused: bool) -> Result<()> {
        let every = self.s.run.adjustable.eval_steps;
        let due = paused || every.is_some_and(|every| step % every == 0 || step == self.plan.total_steps);
        let Some(data) = self.eval_data.filter(|_| due) else { return Ok(()) };
        let m = self.heldout(data)?;
        output::append_eval_line(&self.s.run.output_dir, step, &m)?;
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
            config_toml: &self.s.config_toml,
            command: self.s.task.command(),
            provenance,
            metrics: serde_json::to_value(&done.metrics)?,
        };
        let output_dir = &self.s.run.output_dir;
        let dir = checkpoint::save(output_dir, &snapshot)?;
        if let Some(keep) = self.s.run.adjustable.save_total_limit {
            checkpoint::prune(output_dir, keep, self.resume.as_ref().map(|c| c.dir.as_path()))?;
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

    /// Writes the adapter (or model) and the held-out metrics of the final weights; the run's
    /// summary.
    pub fn finish(mut self) -> Result<TrainSummary> {
        self.close_log()?;
        let s = self.s;
        let output_dir = &s.run.output_dir;
        match &self.lora {
            Some(lora) => adapter::save(output_dir, &self.params, lora, &s.common.model.path.display().to_string())?,
            None => output::save_full_model(output_dir, &self.params, &self.loaded.model_dir)?,
        }
        let total_steps = self.plan.total_steps;
        let Some(last) = self.last.take() else { bail!("nothing to do: the run already finished {total_steps} steps") };
        let eval = match self.eval_data {
            Some(d) => {
                let m = match self.last_eval.take() {
                    Some((step, m)) if step == total_steps => m,
                    _ => self.heldout(d)?,
                };
                atomic::write_bytes(&output_dir.join(EVAL_FILE), serde_json::to_string_pretty(&m)?.as_bytes())?;
                Some(m)
            }
            None => None,
        };
        let seconds = self.started.elapsed().as_secs_f64();
        Ok(TrainSummary {
            steps: total_steps,
            rows: self.data.len(),
            unit: s.task.unit(),
            truncated: self.data.truncated,
            final_loss: last.metrics.loss,
            final_reward_accuracy: last.metrics.accuracy(),
            seconds,
            tokens_per_sec: self.tokens as f64 / seconds,
            saved: if self.lora.is_some() { "adapter" } else { "model" },
            output_dir: output_dir.clone(),
            eval,
        })
    }

    /// Whether step `step` writes a checkpoint: every `--save-steps` and the last step (as HF's
    /// Trainer does), and a pause.
    fn checkpoint_due(&self, step: usize, paused: bool) -> bool {
        let last = step == self.plan.total_steps;
        paused || self.s.run.adjustable.save_steps.is_some_and(|every| step % every == 0 || last)
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
            let saved =
                if self.checkpoint_due(step, paused) || signal.is_some() { self.checkpoint(done)? } else { None };
            if let Some(signal) = signal {
                self.close_log()?;
                let Some(checkpoint) = saved else {
                    bail!(
                        "interrupted by signal {signal} at step {step}; no checkpoint written (pass --save-steps to make runs resumable)"
                    )
                };
                let output_dir = self.s.run.output_dir.clone();
                let command = self.s.task.command();
                return Ok(Outcome::Interrupted(Interrupted { signal, checkpoint, output_dir, command }));
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
        let (n, unit) = (self.data.len(), self.s.task.unit());
        if self.data.truncated > 0 {
            let max = self.s.common.max_length;
            eprintln!("{} of {n} {unit} were truncated to --max-length {max}", self.data.truncated);
        }
        let parameters: usize = self.vars.iter().map(|v| v.elem_count()).sum();
        let what = match (&self.lora, self.s.task.scores_sequences()) {
            (None, _) => format!("every weight ({} tensors)", self.vars.len()),
            (Some(_), false) => format!("{} LoRA tensors", self.vars.len()),
            (Some(_), true) => format!("{} LoRA tensors and the score head", self.vars.len() - 1),
        };
        eprintln!("training {what} ({parameters} parameters) on {n} {unit} for {} steps", self.plan.total_steps);
    }
}
