//! The DPO step: score a micro-batch with the reference (adapters off, no graph) and the
//! policy (adapters on), take the loss, backpropagate into the LoRA tensors only.
//!
//! ```no_run
//! # use dpo::train::step::{micro_step, GradAccumulator};
//! # fn main() -> anyhow::Result<()> {
//! # let (model, batch, loss, params): (dpo::model::CausalLm, dpo::data::PairBatch, dpo::loss::DpoLoss, Vec<candle_core::Var>) = todo!();
//! let mut grads = GradAccumulator::new(params.len());
//! let scores = micro_step(&model, &batch, &loss, &params, &mut dpo::lora::LoraMode::On, None, 1.0, &mut grads)?;
//! # Ok(()) }
//! ```
use crate::data::PairBatch;
use crate::lora::LoraMode;
use crate::loss::{DpoLoss, PairLogps, PairScore};
use crate::model::CausalLm;
use crate::model::scoring::{response_logps, split_pairs};
use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

/// The frozen reference's summed response log-probs `[2·pairs]` (chosen rows, then rejected):
/// the base model with adapters off, no graph. They depend on neither β nor the learning rate,
/// so they can be computed once and cached.
pub fn reference_logps(model: &CausalLm, batch: &PairBatch) -> Result<Tensor> {
    Ok(response_logps(model, batch, &mut LoraMode::Off)?.detach())
}

/// Reference and policy log-probs of a batch, and the per-pair losses.
pub fn score(model: &CausalLm, batch: &PairBatch, loss: &DpoLoss, policy: &mut LoraMode) -> Result<(PairLogps, Tensor)> {
    let reference = reference_logps(model, batch)?;
    score_against(model, batch, loss, policy, &reference)
}

/// As [`score`], with the reference log-probs `[2·pairs]` given (e.g. from a cache).
pub fn score_against(
    model: &CausalLm,
    batch: &PairBatch,
    loss: &DpoLoss,
    policy: &mut LoraMode,
    reference: &Tensor,
) -> Result<(PairLogps, Tensor)> {
    let (ref_chosen, ref_rejected) = split_pairs(&reference.detach(), batch.pairs)?;
    let (policy_chosen, policy_rejected) = split_pairs(&response_logps(model, batch, policy)?, batch.pairs)?;
    let (chosen_tokens, rejected_tokens) = batch.response_tokens.split_at(batch.pairs);
    let logps = PairLogps {
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        chosen_tokens: chosen_tokens.to_vec(),
        rejected_tokens: rejected_tokens.to_vec(),
    };
    let losses = loss.per_pair(&logps)?;
    Ok((logps, losses))
}

/// One micro-batch: forward both models (the reference only when `reference` is not given),
/// backpropagate `mean(loss) · loss_scale` (`1 / micro-batches` under gradient accumulation)
/// and add the gradients to `grads`.
#[allow(clippy::too_many_arguments)]
pub fn micro_step(
    model: &CausalLm,
    batch: &PairBatch,
    loss: &DpoLoss,
    params: &[Var],
    policy: &mut LoraMode,
    reference: Option<&Tensor>,
    loss_scale: f64,
    grads: &mut GradAccumulator,
) -> Result<Vec<PairScore>> {
    let (logps, losses) = match reference {
        Some(r) => score_against(model, batch, loss, policy, r)?,
        None => score(model, batch, loss, policy)?,
    };
    let objective = (losses.mean_all()? * loss_scale)?;
    let store = objective.backward()?;
    for (i, p) in params.iter().enumerate() {
        // A LoRA tensor without a gradient means the graph was cut: fail loudly, never train silently wrong.
        let g = store.get(p).with_context(|| format!("LoRA parameter {i} received no gradient"))?;
        grads.add(i, g)?;
    }
    PairScore::collect(&logps, &losses)
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
