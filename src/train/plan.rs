//! Which rows each optimizer step takes, and the step's forward/backward over its
//! micro-batches — shared by the training loop, `--verify-resume` and the reference cache.
//!
//! ```
//! # use clap::Parser;
//! let args = dpo::config::TrainArgs::parse_from(["train", "--model", "m", "--dataset", "d", "--batch-size", "2", "--grad-accum", "2"]);
//! let plan = dpo::train::plan::StepPlan::new(&args.run, 10);
//! assert_eq!(plan.positions(2), vec![4, 5, 6, 7]);
//! ```
use super::step::{GradAccumulator, micro_step};
use crate::config::RunArgs;
use crate::data::Dataset;
use crate::data::order::PairOrder;
use crate::loss::BatchScore;
use crate::nn::LoraMode;
use crate::rng::SeededRng;
use crate::scoring::{Reference, micro_batches as micro_batches_of};
use crate::task::Task;
use anyhow::Result;
use candle_core::Var;

/// Which rows each optimizer step takes from the seeded order.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    pub pairs: usize,
    pub per_step: usize,
    pub batch_size: usize,
    /// Pairs in the whole stream (`usize::MAX` when --max-steps sets the length).
    pub stream_end: usize,
    pub total_steps: usize,
}

impl StepPlan {
    pub fn new(args: &RunArgs, pairs: usize) -> Self {
        let per_step = args.batch_size * args.grad_accum;
        let max_steps = args.adjustable.max_steps;
        let stream_end = match max_steps {
            Some(_) => usize::MAX,
            None => pairs * args.epochs,
        };
        let total_steps = max_steps.unwrap_or_else(|| stream_end.div_ceil(per_step));
        Self { pairs, per_step, batch_size: args.batch_size, stream_end, total_steps }
    }

    /// Stream positions of step `step` (1-based); map them with [`PairOrder::pair_at`].
    pub fn positions(&self, step: usize) -> Vec<usize> {
        let first = (step - 1) * self.per_step;
        (first..(first + self.per_step).min(self.stream_end)).collect()
    }

    /// The rows (dataset indices) of step `step` (1-based), in the order they are trained.
    pub fn rows(&self, step: usize, order: &PairOrder) -> Vec<usize> {
        self.positions(step).into_iter().map(|p| order.pair_at(p)).collect()
    }

    /// Warmup steps: --warmup-steps, else ceil(--warmup-ratio × total steps) as transformers does.
    pub fn warmup(&self, args: &RunArgs) -> usize {
        if args.warmup_steps > 0 {
            args.warmup_steps
        } else {
            (args.warmup_ratio * self.total_steps as f64).ceil() as usize
        }
    }
}

/// Everything one optimizer step's forward/backward reads.
pub struct StepWork<'a> {
    pub model: &'a crate::model::CausalLm,
    pub pad_id: u32,
    pub data: &'a Dataset,
    pub order: &'a PairOrder,
    pub plan: &'a StepPlan,
    pub task: &'a Task,
    pub vars: &'a [Var],
}

impl StepWork<'_> {
    /// Runs step `step`'s micro-batches (forward with the reference from `reference`, backward),
    /// summing gradients. Returns the micro-batches' scores, the summed gradients and the step's
    /// token count.
    pub fn forward_backward(
        &self,
        step: usize,
        dropout: f64,
        dropout_rng: &mut SeededRng,
        reference: &mut Reference,
    ) -> Result<(Vec<BatchScore>, Vec<candle_core::Tensor>, usize)> {
        let indices = self.plan.rows(step, self.order);
        let micro_batches = indices.len().div_ceil(self.plan.batch_size);
        let mut grads = GradAccumulator::new(self.vars.len());
        let (mut scores, mut tokens): (Vec<BatchScore>, usize) = (Vec::new(), 0);
        let device = self.model.device();
        for item in micro_batches_of(self.data, &indices, self.plan.batch_size, self.pad_id, device, self.task) {
            let (pairs, batch) = item?;
            let reference = reference.logps(self.model, &pairs, &batch)?;
            let mut mode = if dropout > 0.0 { LoraMode::Train(dropout_rng) } else { LoraMode::On };
            let scale = 1.0 / micro_batches as f64;
            let m =
                micro_step(self.model, &batch, self.task, self.vars, &mut mode, reference.as_ref(), scale, &mut grads)?;
            scores.push(m);
            tokens += batch.tokens;
        }
        Ok((scores, grads.into_grads()?, tokens))
    }
}
