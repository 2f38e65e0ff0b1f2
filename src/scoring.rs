//! Scoring pairs: the one way a batch becomes log-probs and losses, shared by training, `dpo
//! eval`, the held-out evaluation and the reference cache.
//!
//! - [`micro_batches`]: pairs (by index) → packed [`PairBatch`]es of at most `batch_size`, laid
//!   out for the objective (LD-DPO's weights, ORPO's prompt tokens).
//! - [`response_logps`]: summed response log-probs `[2·pairs]` of a batch (chosen, then
//!   rejected), lm_head and log-softmax at scored positions only.
//! - [`reference_logps`]: the frozen reference (adapters off, no graph), from a [`RefCache`]
//!   when one is open and holds the batch, else computed (and stored).
//! - [`score`]: the policy's log-probs (and the per-token statistics TRL logs) against the
//!   reference, and the objective's loss; reference-free objectives take no reference.
//! - [`score_all`]: every pair of a list, metrics per micro-batch and pair.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (model, data, objective): (dpo::model::CausalLm, dpo::setup::Dataset, dpo::loss::Objective) = todo!();
//! let batches = dpo::scoring::score_all(&model, 3, &data, &[0, 1, 2], 8, &objective, None)?;
//! let metrics = dpo::loss::RewardMetrics::mean(&batches);
//! # Ok(()) }
//! ```
use crate::data::{PairBatch, TokenizedPair};
use crate::loss::{BatchScore, Objective, PairLogps, wpo_weights};
use crate::model::CausalLm;
use crate::model::token_stats::TokenStats;
use crate::nn::LoraMode;
use crate::refcache::RefCache;
use crate::setup::Dataset;
use anyhow::Result;
use candle_core::{DType, Tensor};
use std::cell::Cell;

thread_local! {
    static REFERENCE_FORWARDS: Cell<usize> = const { Cell::new(0) };
}

/// Reference forwards this thread has run so far (observability: a cache hit must skip one).
pub fn reference_forwards() -> usize {
    REFERENCE_FORWARDS.with(Cell::get)
}

fn count_reference_forward() {
    REFERENCE_FORWARDS.with(|c| c.set(c.get() + 1));
}

/// The pairs at `indices` of `data`, `batch_size` at a time, tokenized, packed and laid out for
/// `objective` ([`layout_for`]).
pub fn micro_batches<'a>(
    data: &'a Dataset,
    indices: &'a [usize],
    batch_size: usize,
    pad_id: u32,
    device: &'a candle_core::Device,
    objective: &'a Objective,
) -> impl Iterator<Item = Result<(Vec<TokenizedPair>, PairBatch)>> + 'a {
    indices.chunks(batch_size.max(1)).map(move |chunk| {
        if objective.unpaired() {
            let examples = chunk.iter().map(|&i| data.labeled(i)).collect::<Result<Vec<_>>>()?;
            let (pairs, labels) = kl_pairs(examples)?;
            let mut batch = PairBatch::new(&pairs, pad_id, device)?;
            batch.labels = Some(labels);
            return Ok((pairs, batch));
        }
        let pairs = chunk.iter().map(|&i| data.get(i)).collect::<Result<Vec<_>>>()?;
        let batch = layout_for(PairBatch::new(&pairs, pad_id, device)?, &pairs, objective)?;
        Ok((pairs, batch))
    })
}

/// KTO's micro-batch as pairs: example `i`'s completion in the chosen slot and, in the rejected
/// slot, the completion of example `i − 1` (the last one for the first): TRL's mismatched
/// completions for the KL estimate (its `KL_completion_ids`, rotated within each
/// `per_device_train_batch_size` chunk), each scored after example `i`'s own prompt.
pub fn kl_pairs(examples: Vec<(TokenizedPair, Option<bool>)>) -> Result<(Vec<TokenizedPair>, Vec<bool>)> {
    let n = examples.len();
    let labels = examples
        .iter()
        .map(|(_, l)| l.ok_or_else(|| anyhow::anyhow!("--loss kto needs labelled examples")))
        .collect::<Result<Vec<_>>>()?;
    let pairs = (0..n)
        .map(|i| TokenizedPair {
            prompt: examples[i].0.prompt.clone(),
            chosen: examples[i].0.chosen.clone(),
            rejected: examples[(i + n - 1) % n].0.chosen.clone(),
        })
        .collect();
    Ok((pairs, labels))
}

/// What the objective needs scored besides the responses: LD-DPO's token weights, ORPO's
/// chosen prompt tokens.
pub fn layout_for(mut batch: PairBatch, pairs: &[TokenizedPair], objective: &Objective) -> Result<PairBatch> {
    if let Some(alpha) = objective.ld_alpha {
        batch = batch.with_ld_alpha(alpha)?;
    }
    if objective.needs_prompt() {
        batch = batch.with_prompt_scoring(pairs)?;
    }
    Ok(batch)
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

/// The frozen reference's log-probs `[2·pairs]` (detached): the base model with adapters off.
/// They depend on neither β nor the learning rate, so `cache` may hold them: a hit skips the
/// forward, a miss runs it and stores the values.
pub fn reference_logps(
    model: &CausalLm,
    pairs: &[TokenizedPair],
    batch: &PairBatch,
    mut cache: Option<&mut RefCache>,
) -> Result<Tensor> {
    if let Some(values) = cache.as_deref_mut().and_then(|c| c.lookup(pairs, batch)) {
        return Ok(Tensor::from_vec(values, 2 * pairs.len(), model.device())?);
    }
    anyhow::ensure!(
        !model.reference_sealed(),
        "full fine-tuning: these pairs' reference log-probs are not in the reference cache (it is filled before step 1; was it cleared?)"
    );
    count_reference_forward();
    let reference = response_logps(model, batch, &mut LoraMode::Off)?.detach();
    if let Some(c) = cache {
        c.store(pairs, batch, &reference.to_dtype(DType::F32)?.to_vec1::<f32>()?)?;
    }
    Ok(reference)
}

/// The policy's pass over a batch: summed response log-probs, ORPO's prompt sums, the
/// statistics of the response tokens, and (for WPO only) their per-token log-probs, detached.
struct PolicyPass {
    sums: Tensor,
    prompt_sums: Option<Tensor>,
    token_logps: Vec<f32>,
    stats: TokenStats,
}

fn policy_pass(model: &CausalLm, batch: &PairBatch, mode: &mut LoraMode, objective: &Objective) -> Result<PolicyPass> {
    let hidden = model.forward_layout(&batch.ids, &batch.layout, mode)?;
    let (n, t, h) = hidden.dims3()?;
    let flat = hidden.reshape((n * t, h))?;
    if objective.reward_model {
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
        if objective.use_weighting { response.detach().to_dtype(DType::F32)?.to_vec1::<f32>()? } else { Vec::new() };
    Ok(PolicyPass { sums, prompt_sums, token_logps, stats })
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
    pub fn collect(&self, objective: &Objective, batch: &PairBatch, per_pair: bool) -> Result<BatchScore> {
        let losses = if per_pair { objective.per_pair(&self.logps, self.weights.as_ref())? } else { None };
        BatchScore::collect(objective, &self.logps, &self.loss, losses, &self.stats, &batch.token_owner)
    }
}

/// The policy (adapters as `policy` says) against `reference` (`None` for a reference-free
/// objective), and the objective's loss on the batch.
pub fn score(
    model: &CausalLm,
    batch: &PairBatch,
    objective: &Objective,
    policy: &mut LoraMode,
    reference: Option<&Tensor>,
) -> Result<Scored> {
    let pass = policy_pass(model, batch, policy, objective)?;
    let (policy_chosen, policy_rejected) = split_pairs(&pass.sums, batch.pairs)?;
    let (ref_chosen, ref_rejected) = match reference {
        Some(r) => split_pairs(&r.detach(), batch.pairs)?,
        None => {
            anyhow::ensure!(!objective.needs_reference(), "--loss {} needs the reference log-probs", objective.name());
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
    let weights = if objective.use_weighting {
        let w = wpo_weights(&pass.token_logps, &pass.stats.log_sum_sq, &batch.token_owner, batch.pairs);
        Some(Tensor::from_vec(w, batch.pairs, model.device())?)
    } else {
        None
    };
    let loss = objective.batch_loss(&logps, weights.as_ref())?;
    Ok(Scored { logps, loss, weights, stats: pass.stats })
}

/// [`score`] with the reference (if the objective needs one) computed here, no cache: what
/// tests and benches compare.
pub fn score_batch(
    model: &CausalLm,
    batch: &PairBatch,
    objective: &Objective,
    policy: &mut LoraMode,
) -> Result<Scored> {
    let reference = if objective.needs_reference() {
        count_reference_forward();
        Some(response_logps(model, batch, &mut LoraMode::Off)?.detach())
    } else {
        None
    };
    score(model, batch, objective, policy, reference.as_ref())
}

/// The reference log-probs of a micro-batch when the objective needs them.
pub fn reference_for(
    model: &CausalLm,
    objective: &Objective,
    pairs: &[TokenizedPair],
    batch: &PairBatch,
    cache: Option<&mut RefCache>,
) -> Result<Option<Tensor>> {
    if objective.needs_reference() { reference_logps(model, pairs, batch, cache).map(Some) } else { Ok(None) }
}

/// Every pair at `indices` scored with the policy (adapters on, no dropout), in order, with
/// each pair's own loss.
pub fn score_all(
    model: &CausalLm,
    pad_id: u32,
    data: &Dataset,
    indices: &[usize],
    batch_size: usize,
    objective: &Objective,
    mut cache: Option<&mut RefCache>,
) -> Result<Vec<BatchScore>> {
    let mut batches = Vec::new();
    for item in micro_batches(data, indices, batch_size, pad_id, model.device(), objective) {
        let (pairs, batch) = item?;
        let reference = reference_for(model, objective, &pairs, &batch, cache.as_deref_mut())?;
        let scored = score(model, &batch, objective, &mut LoraMode::On, reference.as_ref())?;
        batches.push(scored.collect(objective, &batch, true)?);
    }
    Ok(batches)
}
