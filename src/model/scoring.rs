//! Summed response log-probabilities of a [`PairBatch`]: the quantity DPO compares.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let model: dpo::model::CausalLm = todo!(); let batch: dpo::data::PairBatch = todo!();
//! let logps = dpo::model::scoring::response_logps(&model, &batch, &mut dpo::lora::LoraMode::Off)?;
//! let (chosen, rejected) = dpo::model::scoring::split_pairs(&logps, batch.pairs)?;
//! # Ok(()) }
//! ```
use super::CausalLm;
use crate::data::PairBatch;
use crate::lora::LoraMode;
use anyhow::Result;
use candle_core::Tensor;

/// `[2·pairs]` f32: Σ over each sequence's response tokens of `log p(token | prefix)`.
/// lm_head and the log-softmax run only at scored positions.
pub fn response_logps(model: &CausalLm, batch: &PairBatch, mode: &mut LoraMode) -> Result<Tensor> {
    let hidden = model.forward_layout(&batch.ids, &batch.layout, mode)?;
    let (n, t, h) = hidden.dims3()?;
    let rows = hidden.reshape((n * t, h))?.index_select(&batch.rows, 0)?;
    let token_logps = model.token_logps(&rows, &batch.targets)?;
    Ok(batch.segments.matmul(&token_logps.unsqueeze(1)?)?.squeeze(1)?)
}

/// Splits `[2·pairs]` into (chosen, rejected), each `[pairs]`.
pub fn split_pairs(logps: &Tensor, pairs: usize) -> Result<(Tensor, Tensor)> {
    Ok((logps.narrow(0, 0, pairs)?, logps.narrow(0, pairs, pairs)?))
}
