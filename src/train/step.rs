//! A training step's backward: score a micro-batch with the policy against its reference
//! log-probs (when the task has one), take the task's loss, backpropagate into what is trained
//! (LoRA tensors, a score head, or every weight); gradient accumulation, the global norm and
//! clipping.
//!
//! ```no_run
//! # use dpo::train::step::{micro_step, GradAccumulator};
//! # fn main() -> anyhow::Result<()> {
//! # let (model, batch, task, params): (dpo::model::CausalLm, dpo::data::PairBatch, dpo::task::Task, Vec<candle_core::Var>) = todo!();
//! # let reference: Option<candle_core::Tensor> = todo!();
//! let mut grads = GradAccumulator::new(params.len());
//! let score = micro_step(&model, &batch, &task, &params, &mut dpo::nn::LoraMode::On, reference.as_ref(), 1.0, &mut grads)?;
//! # Ok(()) }
//! ```
use crate::data::PairBatch;
use crate::loss::BatchScore;
use crate::model::CausalLm;
use crate::nn::LoraMode;
use crate::scoring::score;
use crate::task::Task;
use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

/// One micro-batch: the policy forward against the given reference log-probs (none for a task
/// without one), backpropagate the micro-batch's loss `· loss_scale` (`1 /
/// micro-batches` under gradient accumulation: each micro-batch is a batch of its own, as in
/// TRL) and add the gradients to `grads`.
#[allow(clippy::too_many_arguments)]
pub fn micro_step(
    model: &CausalLm,
    batch: &PairBatch,
    task: &Task,
    params: &[Var],
    policy: &mut LoraMode,
    reference: Option<&Tensor>,
    loss_scale: f64,
    grads: &mut GradAccumulator,
) -> Result<BatchScore> {
    let scored = score(model, batch, task, policy, reference)?;
    let store = (&scored.loss * loss_scale)?.backward()?;
    for (i, p) in params.iter().enumerate() {
        // A trained tensor without a gradient means the graph was cut: fail loudly, never train silently wrong.
        let g = store.get(p).with_context(|| format!("trained parameter {i} received no gradient"))?;
        grads.add(i, g)?;
    }
    scored.collect(task, batch, false)
}

/// Sums gradients over the micro-batches of one optimizer step.
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(n: usize) -> Self {
        Self { sums: vec![None; n] }
    }

    fn add(&mut self, i: usize, g: &Tensor) -> Result<()> {
        self.sums[i] = Some(match self.sums[i].take() {
            None => g.detach(),
            Some(s) => (s + g.detach())?,
        });
        Ok(())
    }

    pub fn into_grads(self) -> Result<Vec<Tensor>> {
        self.sums.into_iter().map(|g| g.context("a parameter got no gradient this step")).collect()
    }
}

/// Global L2 norm of all gradients (torch `clip_grad_norm_`'s total norm).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (torch semantics; 0 disables).
pub fn clip(grads: Vec<Tensor>, norm: f64, max_norm: f64) -> Result<Vec<Tensor>> {
    let coef = max_norm / (norm + 1e-6);
    if max_norm <= 0.0 || coef >= 1.0 {
        return Ok(grads);
    }
    Ok(grads.into_iter().map(|g| g * coef).collect::<candle_core::Result<_>>()?)
}
