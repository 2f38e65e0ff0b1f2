//! Scoring pairs: the one way a batch becomes log-probs and losses, shared by training, `dpo
//! eval`, the held-out evaluation and the reference cache.
//!
//! - [`micro_batches`]: pairs (by index) → packed [`PairBatch`]es of at most `batch_size`.
//! - [`response_logps`]: summed response log-probs `[2·pairs]` of a batch (chosen, then
//!   rejected), lm_head and log-softmax at scored positions only.
//! - [`reference_logps`]: the frozen reference (adapters off, no graph), from a [`RefCache`]
//!   when one is open and holds the batch, else computed (and stored).
//! - [`score`]: reference and policy log-probs and the per-pair losses.
//! - [`score_all`]: every pair of a list, metrics per pair.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (model, data, loss): (dpo::model::CausalLm, dpo::setup::Dataset, dpo::loss::DpoLoss) = todo!();
//! let scores = dpo::scoring::score_all(&model, 3, &data, &[0, 1, 2], 8, &loss, None)?;
//! let metrics = dpo::loss::RewardMetrics::mean(&scores, loss.beta);
//! # Ok(()) }
//! ```
use crate::data::{PairBatch, TokenizedPair};
use crate::loss::{DpoLoss, PairLogps, PairScore};
use crate::model::CausalLm;
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

/// The pairs at `indices` of `data`, `batch_size` at a time, tokenized and packed.
pub fn micro_batches<'a>(
    data: &'a Dataset,
    indices: &'a [usize],
    batch_size: usize,
    pad_id: u32,
    device: &'a candle_core::Device,
) -> impl Iterator<Item = Result<(Vec<TokenizedPair>, PairBatch)>> + 'a {
    indices.chunks(batch_size.max(1)).map(move |chunk| {
        let pairs = chunk.iter().map(|&i| data.get(i)).collect::<Result<Vec<_>>>()?;
        let batch = PairBatch::new(&pairs, pad_id, device)?;
        Ok((pairs, batch))
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

/// The frozen reference's log-probs `[2·pairs]` (detached): the base model with adapters off.
/// They depend on neither β nor the learning rate, so `cache` may hold them: a hit skips the
/// forward, a miss runs it and stores the values.
pub fn reference_logps(model: &CausalLm, pairs: &[TokenizedPair], batch: &PairBatch, mut cache: Option<&mut RefCache>) -> Result<Tensor> {
    if let Some(values) = cache.as_deref_mut().and_then(|c| c.lookup(pairs, batch)) {
        return Ok(Tensor::from_vec(values, 2 * pairs.len(), model.device())?);
    }
    count_reference_forward();
    let reference = response_logps(model, batch, &mut LoraMode::Off)?.detach();
    if let Some(c) = cache {
        c.store(pairs, batch, &reference.to_dtype(DType::F32)?.to_vec1::<f32>()?)?;
    }
    Ok(reference)
}

/// Policy log-probs (adapters as `policy` says) against the given reference, and the per-pair
/// losses `[pairs]`.
pub fn score(model: &CausalLm, batch: &PairBatch, loss: &DpoLoss, policy: &mut LoraMode, reference: &Tensor) -> Result<(PairLogps, Tensor)> {
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

/// [`score`] with the reference computed here (no cache): what tests and benches compare.
pub fn score_batch(model: &CausalLm, batch: &PairBatch, loss: &DpoLoss, policy: &mut LoraMode) -> Result<(PairLogps, Tensor)> {
    count_reference_forward();
    let reference = response_logps(model, batch, &mut LoraMode::Off)?.detach();
    score(model, batch, loss, policy, &reference)
}

/// Every pair at `indices` scored with the policy (adapters on, no dropout), in order.
pub fn score_all(
    model: &CausalLm,
    pad_id: u32,
    data: &Dataset,
    indices: &[usize],
    batch_size: usize,
    loss: &DpoLoss,
    mut cache: Option<&mut RefCache>,
) -> Result<Vec<PairScore>> {
    let mut scores = Vec::with_capacity(indices.len());
    for item in micro_batches(data, indices, batch_size, pad_id, model.device()) {
        let (pairs, batch) = item?;
        let reference = reference_logps(model, &pairs, &batch, cache.as_deref_mut())?;
        let (logps, losses) = score(model, &batch, loss, &mut LoraMode::On, &reference)?;
        scores.extend(PairScore::collect(&logps, &losses)?);
    }
    Ok(scores)
}
