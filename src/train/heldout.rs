//! Scoring held-out pairs with the adapter just trained (`--eval-dataset`): mean loss and
//! reward metrics, the reference from the cache when one is open.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (loaded, data, objective): (dpo::setup::Loaded, dpo::setup::Dataset, dpo::loss::Objective) = todo!();
//! let metrics = dpo::train::heldout::evaluate(&loaded, &data, &objective, 8, None)?;
//! println!("eval reward accuracy {}", metrics.accuracy());
//! # Ok(()) }
//! ```
use crate::loss::{Objective, RewardMetrics};
use crate::refcache::RefCache;
use crate::scoring::score_all;
use crate::setup::{Dataset, Loaded};
use anyhow::Result;

/// Mean metrics of the policy (adapters on, no dropout) over every pair of `data`, in file order.
pub fn evaluate(
    loaded: &Loaded,
    data: &Dataset,
    objective: &Objective,
    batch_size: usize,
    cache: Option<&mut RefCache>,
) -> Result<RewardMetrics> {
    let indices: Vec<usize> = (0..data.len()).collect();
    let scores = score_all(&loaded.model, loaded.pad_id, data, &indices, batch_size, objective, cache)?;
    Ok(RewardMetrics::mean(&scores))
}
