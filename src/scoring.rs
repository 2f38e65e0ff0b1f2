//! Scoring: the one way a micro-batch becomes log-probs and a loss, shared by training, `dpo
//! eval`, the held-out evaluation and the reference cache.
//!
//! - [`micro_batches`]: rows (by index) → [`PairBatch`]es of at most `batch_size`, laid out as the
//!   task says ([`Task::micro_batch`]).
//! - [`response_logps`]: summed response log-probs `[2·pairs]` of a batch (chosen, then
//!   rejected), lm_head and log-softmax at scored positions only.
//! - [`Reference`]: where the frozen reference's log-probs come from: computed (adapters off, no
//!   graph) and optionally cached, or only from a cache filled before training.
//! - [`score`]: the policy's log-probs (or a reward model's scores) and the per-token statistics
//!   TRL logs, against the reference, and the task's loss.
//! - [`score_all`]: every row of a list, metrics per micro-batch and pair.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (model, data, task): (dpo::model::CausalLm, dpo::data::Dataset, dpo::task::Task) = todo!();
//! use dpo::scoring::{Reference, score_all};
//! let batches = score_all(&model, 3, &data, &[0, 1, 2], 8, &task, &mut Reference::Compute(None))?;
//! let metrics = dpo::loss::Metrics::mean(&batches);
//! # Ok(()) }
//! ```
use crate::data::{Dataset, PairBatch, TokenizedPair};
use crate::loss::{BatchScore, PairLogps, wpo_weights};
use crate::model::CausalLm;
use crate::model::token_stats::TokenStats;
use crate::nn::LoraMode;
use crate::refcache::RefCache;
use crate::task::Task;
use anyhow::{Result, bail};
use candle_core::{DType, Tensor};
use std::cell::Cell;

thread_local! {
    static REFERENCE_FORWARDS: Cell<usize> = const { Cell::new(0) };
}

/// Reference forwards this thread has run so far (observability: a cache hit must skip one;
/// compare two readings).
pub fn reference_forwards() -> usize {
    REFERENCE_FORWARDS.with(Cell::get)
}

fn count_reference_forward() {
    REFERENCE_FORWARDS.with(|c| c.set(c.get() + 1));
}

/// The rows at `indices` of `data`, `batch_size` at a time, tokenized and laid out for `task`.
pub fn micro_batches<'a>(
    data: &'a Dataset,
    indices: &'a [usize],
    batch_size: usize,
    pad_id: u32,
    device: &'a candle_core::Device,
    task: &'a Task,
) -> impl Iterator<Item = Result<(Vec<TokenizedPair>, PairBatch)>> + 'a {
    indices.chunks(batch_size.max(1)).map(move |chunk| {
        let rows = chunk.iter().map(|&i| data.labeled(i)).collect::<Result<Vec<_>>>()?;
        task.micro_batch(rows, pad_id, device)
    })
}

/// `[2·pairs]` f32: Σ over each sequence's response tokens of `log p(token | prefix)`.
pub fn response_logps(model: &CausalLm, batch: &PairBatch, mode: &mut LoraMode) -> Result<Tensor> {
    let hidden = model.forward_layout(&batch.ids, &batch.layout, mode)?;
    let (n, t, h) = hidden.dims3()?;
    let rows = hidden.reshape((n * t, h))?.index_select(&batch.predictor_rows, 0)?;
    let token_logps = model.token_logps(&rows, &batch.targets)?;
    Ok(batch.sequence_of_token.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?)
}

/// Splits `[2·pairs]` into (chosen, rejected), each `[pairs]`.
pub fn split_pairs(logps: &Tensor, pairs: usize) -> Result<(Tensor, Tensor)> {
    Ok((logps.narrow(0, 0, pairs)?, logps.narrow(0, pairs, pairs)?))
}

/// Where the frozen reference's log-probs come from. They depend on neither β nor the learning
/// rate, so a [`RefCache`] may hold them.
pub enum Reference<'a> {
    /// The task needs none.
    None,
    /// The base model with adapters off (no graph); with a cache, a hit skips the forward and a
    /// miss stores what it computed.
    Compute(Option<&'a mut RefCache>),
    /// Only from a cache filled before training (full fine-tuning: the weights being trained
    /// are no longer the reference); a miss is an error.
    CacheOnly(&'a mut RefCache),
}

impl<'a> Reference<'a> {
    /// What `task` reads: nothing, or the reference computed (through `cache`, when given).
    pub fn computed(task: &Task, cache: Option<&'a mut RefCache>) -> Self {
        if task.needs_reference() { Reference::Compute(cache) } else { Reference::None }
    }

    /// The reference's log-probs `[2·pairs]` of a micro-batch (detached); `None` for
    /// [`Reference::None`].
    pub fn logps(&mut self, model: &CausalLm, pairs: &[TokenizedPair], batch: &PairBatch) -> Result<Option<Tensor>> {
        let (mut cache, cache_only) = match self {
            Reference::None => return Ok(None),
            Reference::Compute(cache) => (cache.as_deref_mut(), false),
            Reference::CacheOnly(cache) => (Some(&mut **cache), true),
        };
        if let Some(values) = cache.as_mut().and_then(|c| c.lookup(pairs, batch)) {
            return Ok(Some(Tensor::from_vec(values, 2 * pairs.len(), model.device())?));
        }
        if cache_only {
            bail!(
                "full fine-tuning: these pairs' reference log-probs are not in the reference cache (it is filled before step 1; was it cleared?)"
            );
        }
        let reference = compute_reference(model, batch)?;
        if let Some(c) = cache {
            c.store(pairs, batch, &reference.to_dtype(DType::F32)?.to_vec1::<f32>()?)?;
        }
        Ok(Some(reference))
    }

    /// The cache this reference reads, if any.
    pub fn cache(&mut self) -> Option<&mut RefCache> {
        match self {
            Reference::None | Reference::Compute(None) => None,
            Reference::Compute(Some(c)) => Some(c),
            Reference::CacheOnly(c) => Some(c),
        }
    }
}

/// The base model's log-probs with the adapters off, detached.
fn compute_reference(model: &CausalLm, batch: &PairBatch) -> Result<Tensor> {
    count_reference_forward();
    Ok(response_logps(model, batch, &mut LoraMode::Off)?.detach())
}

/// The policy's pass over a batch: summed response log-probs (or a reward model's scores),
/// ORPO's prompt sums, the statistics of the response tokens, and (for WPO only) their per-token
/// log-probs, detached.
struct PolicyPass {
    sums: Tensor,
    prompt_sums: Option<Tensor>,
    token_logps: Vec<f32>,
    stats: TokenStats,
}

fn policy_pass(model: &CausalLm, batch: &PairBatch, mode: &mut LoraMode, task: &Task) -> Result<PolicyPass> {
    let hidden = model.forward_layout(&batch.ids, &batch.layout, mode)?;
    let (n, t, h) = hidden.dims3()?;
    let flat = hidden.reshape((n * t, h))?;
    if task.scores_sequences() {
        // The score head at each sequence's last token: the rewards take the log-probs' place.
        let last = Tensor::from_vec(batch.last_rows.clone(), batch.last_rows.len(), model.device())?;
        let sums = model.rewards(&flat.index_select(&last, 0)?)?;
        return Ok(PolicyPass { sums, prompt_sums: None, token_logps: Vec::new(), stats: TokenStats::default() });
    }
    let scored = batch.targets.len();
    let (rows, targets) = match &batch.prompt {
        Some(p) if !p.targets.is_empty() => {
            let rows = Tensor::cat(&[&batch.predictor_rows, &p.predictor_rows], 0)?;
            (flat.index_select(&rows, 0)?, [batch.targets.as_slice(), &p.targets].concat())
        }
        _ => (flat.index_select(&batch.predictor_rows, 0)?, batch.targets.clone()),
    };
    let (all, mut stats) = model.token_logps_with_stats(&rows, &targets)?;
    let response = all.narrow(0, 0, scored)?;
    let sums = batch.sequence_of_token.matmul(&response.unsqueeze(1)?)?.squeeze(1)?;
    let prompt_sums = match &batch.prompt {
        Some(p) if !p.targets.is_empty() => {
            Some(p.pair_of_token.matmul(&all.narrow(0, scored, p.targets.len())?.unsqueeze(1)?)?.squeeze(1)?)
        }
        Some(_) => Some(Tensor::zeros(batch.pairs, DType::F32, model.device())?),
        None => None,
    };
    stats.truncate(scored);
    // Copied to the host only for WPO's weights.
    let token_logps =
        if uses_wpo(task) { response.detach().to_dtype(DType::F32)?.to_vec1::<f32>()? } else { Vec::new() };
    Ok(PolicyPass { sums, prompt_sums, token_logps, stats })
}

fn uses_wpo(task: &Task) -> bool {
    task.objective().is_some_and(|o| o.use_weighting)
}

/// A scored micro-batch: log-probs, the loss (with its graph), WPO's weights, token statistics.
pub struct Scored {
    pub logps: PairLogps,
    pub loss: Tensor,
    pub weights: Option<Tensor>,
    pub stats: TokenStats,
}

impl Scored {
    /// The detached numbers; `per_pair` also computes each pair's own loss (evaluation).
    pub fn collect(&self, task: &Task, batch: &PairBatch, per_pair: bool) -> Result<BatchScore> {
        let losses = if per_pair { task.per_pair_losses(&self.logps, self.weights.as_ref())? } else { None };
        task.collect(&self.logps, &self.loss, losses.as_deref(), &self.stats, &batch.token_owner)
    }
}

/// The policy (adapters as `policy` says) against `reference` (`None` for a task that needs
/// none), and the task's loss on the batch.
pub fn score(
    model: &CausalLm,
    batch: &PairBatch,
    task: &Task,
    policy: &mut LoraMode,
    reference: Option<&Tensor>,
) -> Result<Scored> {
    let pass = policy_pass(model, batch, policy, task)?;
    let (policy_chosen, policy_rejected) = split_pairs(&pass.sums, batch.pairs)?;
    let (ref_chosen, ref_rejected) = match reference {
        Some(r) => split_pairs(&r.detach(), batch.pairs)?,
        None if task.needs_reference() => bail!("--loss {} needs the reference log-probs", task.name()),
        None => {
            let zeros = policy_chosen.zeros_like()?;
            (zeros.clone(), zeros)
        }
    };
    let (chosen_tokens, rejected_tokens) = batch.response_tokens.split_at(batch.pairs);
    let prompt_tokens = batch.prompt.as_ref().map(|p| p.tokens.clone());
    let logps = PairLogps {
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        chosen_tokens: chosen_tokens.to_vec(),
        rejected_tokens: rejected_tokens.to_vec(),
        chosen_prompt: pass.prompt_sums.zip(prompt_tokens),
        labels: batch.labels.clone(),
    };
    let weights = if uses_wpo(task) {
        let w = wpo_weights(&pass.token_logps, &pass.stats.log_sum_sq, &batch.token_owner, batch.pairs);
        Some(Tensor::from_vec(w, batch.pairs, model.device())?)
    } else {
        None
    };
    let loss = task.loss(&logps, weights.as_ref())?;
    Ok(Scored { logps, loss, weights, stats: pass.stats })
}

/// [`score`] with the reference (if the task needs one) computed here, no cache: what tests
/// and benches compare.
pub fn score_batch(model: &CausalLm, batch: &PairBatch, task: &Task, policy: &mut LoraMode) -> Result<Scored> {
    let reference = if task.needs_reference() { Some(compute_reference(model, batch)?) } else { None };
    score(model, batch, task, policy, reference.as_ref())
}

/// Every row at `indices` scored with the policy (adapters on, no dropout), in order, with
/// each row's own loss.
pub fn score_all(
    model: &CausalLm,
    pad_id: u32,
    data: &Dataset,
    indices: &[usize],
    batch_size: usize,
    task: &Task,
    reference: &mut Reference,
) -> Result<Vec<BatchScore>> {
    let mut batches = Vec::new();
    for item in micro_batches(data, indices, batch_size, pad_id, model.device(), task) {
        let (pairs, batch) = item?;
        let reference = reference.logps(model, &pairs, &batch)?;
        let scored = score(model, &batch, task, &mut LoraMode::On, reference.as_ref())?;
        batches.push(scored.collect(task, &batch, true)?);
    }
    Ok(batches)
}
