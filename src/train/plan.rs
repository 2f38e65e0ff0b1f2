//! Which pairs each optimizer step takes, and the step's forward/backward over its
//! micro-batches — shared by the training loop and `--verify-resume`.
//!
//! ```
//! # use clap::Parser;
//! let args = dpo::config::TrainArgs::parse_from(["train", "--model", "m", "--dataset", "d", "--batch-size", "2", "--grad-accum", "2"]);
//! let plan = dpo::train::plan::StepPlan::new(&args, 10);
//! assert_eq!(plan.positions(2), vec![4, 5, 6, 7]);
//! ```
use super::step::{GradAccumulator, micro_step};
use crate::config::TrainArgs;
use crate::data::order::PairOrder;
use crate::loss::BatchScore;
use crate::nn::LoraMode;
use crate::refcache::RefCache;
use crate::rng::SeededRng;
use crate::scoring::{micro_batches as micro_batches_of, reference_for};
use crate::setup::Dataset;
use anyhow::Result;
use candle_core::Var;

/// Which pairs each optimizer step takes from the seeded order.
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
    pub fn new(args: &TrainArgs, pairs: usize) -> Self {
        let per_step = args.batch_size * args.grad_accum;
        let stream_end = match args.max_steps {
            Some(_) => usize::MAX,
            None => pairs * args.epochs,
        };
        let total_steps = args.max_steps.unwrap_or_else(|| stream_end.div_ceil(per_step));
        Self { pairs, per_step, batch_size: args.batch_size, stream_end, total_steps }
    }

    /// Stream positions of step `step` (1-based); map them with [`PairOrder::pair_at`].
    pub fn positions(&self, step: usize) -> Vec<usize> {
        let first = (step - 1) * self.per_step;
        (first..(first + self.per_step).min(self.stream_end)).collect()
    }

    /// Warmup steps: --warmup-steps, else ceil(--warmup-ratio × total steps) as transformers does.
    pub fn warmup(&self, args: &TrainArgs) -> usize {
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
    pub objective: &'a crate::loss::Objective,
    pub vars: &'a [Var],
}

impl StepWork<'_> {
    /// Runs step `step`'s micro-batches (forward both models, backward), summing gradients.
    /// Returns the micro-batches' scores, the summed gradients and the step's token count.
    pub fn forward_backward(
        &self,
        step: usize,
        dropout: f64,
        dropout_rng: &mut SeededRng,
        mut cache: Option<&mut RefCache>,
    ) -> Result<(Vec<BatchScore>, Vec<candle_core::Tensor>, usize)> {
        let indices: Vec<usize> = self.plan.positions(step).into_iter().map(|pos| self.order.pair_at(pos)).collect();
        let micro_batches = indices.len().div_ceil(self.plan.batch_size);
        let mut grads = GradAccumulator::new(self.vars.len());
        let (mut scores, mut tokens): (Vec<BatchScore>, usize) = (Vec::new(), 0);
        for item in micro_batches_of(
            self.data,
            &indices,
            self.plan.batch_size,
            self.pad_id,
            self.model.device(),
            self.objective,
        ) {
            let (pairs, batch) = item?;
            let reference = reference_for(self.model, self.objective, &pairs, &batch, cache.as_deref_mut())?;
            let mut mode = if dropout > 0.0 { LoraMode::Train(dropout_rng) } else { LoraMode::On };
            let scale = 1.0 / micro_batches as f64;
            scores.push(micro_step(
                self.model,
                &batch,
                self.objective,
                self.vars,
                &mut mode,
                reference.as_ref(),
                scale,
                &mut grads,
            )?);
            tokens += batch.tokens;
        }
        Ok((scores, grads.into_grads()?, tokens))
    }
}
