//! Scoring held-out rows with the model just trained (`--eval-dataset`): mean loss and the
//! task's metrics, the reference from the run's source (its cache when one is open).
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (loaded, data, task): (dpo::setup::Loaded, dpo::data::Dataset, dpo::task::Task) = todo!();
//! let mut reference = dpo::scoring::Reference::computed(&task, None);
//! let metrics = dpo::train::heldout::evaluate(&loaded, &data, &task, 8, &mut reference)?;
//! println!("eval reward accuracy {:?}", metrics.accuracy());
//! # Ok(()) }
//! ```
use crate::data::Dataset;
use crate::loss::Metrics;
use crate::scoring::{Reference, score_all};
use crate::setup::Loaded;
use crate::task::Task;
use anyhow::Result;

/// Mean metrics of the policy (adapters on, no dropout) over every row of `data`, in file order.
pub fn evaluate(
    loaded: &Loaded,
    data: &Dataset,
    task: &Task,
    batch_size: usize,
    reference: &mut Reference,
) -> Result<Metrics> {
    let indices: Vec<usize> = (0..data.len()).collect();
    let scores = score_all(&loaded.model, loaded.pad_id, data, &indices, batch_size, task, reference)?;
    Ok(Metrics::mean(&scores))
}
