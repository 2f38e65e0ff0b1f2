//! Scoring held-out pairs with the adapter just trained (`--eval-dataset`): mean loss and
//! reward metrics, the reference from the cache when one is open.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (loaded, data, loss): (dpo::setup::Loaded, dpo::setup::Dataset, dpo::loss::DpoLoss) = todo!();
//! let metrics = dpo::train::heldout::evaluate(&loaded, &data, &loss, 8, None)?;
//! println!("eval reward accuracy {}", metrics.rewards_accuracies);
//! # Ok(()) }
//! ```
use crate::data::PairBatch;
use crate::lora::LoraMode;
use crate::loss::{DpoLoss, PairScore, RewardMetrics};
use crate::refcache::RefCache;
use crate::setup::{Dataset, Loaded};
use crate::train::step::{score, score_against};
use anyhow::Result;

/// Mean metrics of the policy (adapters on, no dropout) over every pair of `data`, in file order.
pub fn evaluate(loaded: &Loaded, data: &Dataset, loss: &DpoLoss, batch_size: usize, mut cache: Option<&mut RefCache>) -> Result<RewardMetrics> {
    let mut scores = Vec::with_capacity(data.len());
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let pairs = chunk.iter().map(|&i| data.get(i)).collect::<Result<Vec<_>>>()?;
        let batch = PairBatch::new(&pairs, loaded.pad_id, &loaded.device)?;
        let (logps, losses) = match cache.as_deref_mut() {
            Some(c) => {
                let reference = c.reference(&loaded.model, &pairs, &batch)?;
                score_against(&loaded.model, &batch, loss, &mut LoraMode::On, &reference)?
            }
            None => score(&loaded.model, &batch, loss, &mut LoraMode::On)?,
        };
        scores.extend(PairScore::collect(&logps, &losses)?);
    }
    Ok(RewardMetrics::mean(&scores, loss.beta))
}
