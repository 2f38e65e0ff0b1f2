//! What a run trains, as one type built by its subcommand. A [`Task`] owns everything that
//! differs between them, so the trainer, scoring and evaluation ask it instead of testing flags:
//!
//! | task | built by | rows | reference | loss | metrics | head, saved as |
//! |---|---|---|---|---|---|---|
//! | [`Task::Preference`] | `dpo train` | pairs | unless reference-free | the objective's terms | `rewards/*`, `logps/*`, the loss's own | lm_head; adapter or full model |
//! | [`Task::Kto`] | `dpo train --loss kto` | labelled examples | yes | KTO | `kl`, `rewards/*` per label | lm_head; adapter or full model |
//! | [`Task::Sft`] | `dpo sft` | completions | no | token-mean NLL | `entropy`, `mean_token_accuracy` | lm_head; adapter or full model |
//! | [`Task::Reward`] | `dpo reward train` | pairs | no | Bradley–Terry | `accuracy`, `margin`, rewards | score head; `SEQ_CLS` adapter |
//!
//! ```
//! use dpo::loss::{LossKind, Objective};
//! use dpo::task::Task;
//! let kto = Task::train(Objective::single(LossKind::Kto, 0.1));
//! assert!(matches!(kto, Task::Kto(_)) && kto.needs_reference() && kto.unit() == "examples");
//! assert!(!Task::Sft.needs_reference() && Task::Reward.ranks_pairs());
//! ```
use crate::data::{PairBatch, Rows, TokenizedPair};
use crate::lora::AdapterTask;
use crate::loss::metrics::{self, BatchScore, RewardRule, TaskMetrics};
use crate::loss::{LossKind, Objective, PairLogps, terms};
use crate::model::token_stats::TokenStats;
use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// DPO and its relatives on preference pairs: one loss or a weighted mix (TRL's names).
    Preference(Objective),
    /// KTO on labelled examples (unpaired rows, or each pair's two responses); the objective's
    /// only term is `kto`.
    Kto(Objective),
    /// Supervised fine-tuning on completions: the token-mean NLL over the batch, as TRL's
    /// SFTTrainer normalises it.
    Sft,
    /// A Bradley–Terry reward model: `mean −logσ(r_c − r_r)`, the rewards read by a score head
    /// at each sequence's last token (TRL's RewardTrainer without margin or centring).
    Reward,
}

impl Task {
    /// `dpo train`'s task for a validated objective: KTO's examples when it is `kto`, pairs
    /// otherwise.
    pub fn train(objective: Objective) -> Self {
        if objective.has(LossKind::Kto) { Task::Kto(objective) } else { Task::Preference(objective) }
    }

    /// The subcommand that trains it.
    pub fn command(&self) -> &'static str {
        match self {
            Task::Preference(_) | Task::Kto(_) => "dpo train",
            Task::Sft => "dpo sft",
            Task::Reward => "dpo reward train",
        }
    }

    /// For logs: the loss names of `dpo train`, or `sft`, `reward`.
    pub fn name(&self) -> String {
        match self {
            Task::Preference(o) | Task::Kto(o) => o.name(),
            Task::Sft => "sft".into(),
            Task::Reward => "reward".into(),
        }
    }

    /// The preference (or KTO) objective, for what only it configures (WPO, LD-DPO, ORPO).
    pub fn objective(&self) -> Option<&Objective> {
        match self {
            Task::Preference(o) | Task::Kto(o) => Some(o),
            Task::Sft | Task::Reward => None,
        }
    }

    /// Whether the frozen reference's log-probs enter the loss.
    pub fn needs_reference(&self) -> bool {
        match self {
            Task::Preference(o) => o.needs_reference(),
            Task::Kto(_) => true,
            Task::Sft | Task::Reward => false,
        }
    }

    /// What each row of the data holds.
    pub fn rows(&self) -> Rows {
        match self {
            Task::Preference(_) | Task::Reward => Rows::Pairs,
            Task::Kto(_) => Rows::Examples,
            Task::Sft => Rows::Completions,
        }
    }

    /// What one of its rows is called in summaries.
    pub fn unit(&self) -> &'static str {
        match self.rows() {
            Rows::Pairs => "pairs",
            Rows::Examples | Rows::Completions => "examples",
        }
    }

    /// Whether it ranks the responses of pairs, so that a reward accuracy means something.
    pub fn ranks_pairs(&self) -> bool {
        self.rows() == Rows::Pairs
    }

    /// Whether the model ends in a reward model's score head instead of the lm_head.
    pub fn scores_sequences(&self) -> bool {
        matches!(self, Task::Reward)
    }

    /// What a peft adapter of this task is (`task_type`).
    pub fn adapter_task(&self) -> AdapterTask {
        match self {
            Task::Reward => AdapterTask::SequenceClassification,
            _ => AdapterTask::CausalLm,
        }
    }

    /// A micro-batch of rows as the model sees it: packed pairs laid out for the objective
    /// (LD-DPO's weights, ORPO's prompt tokens); for KTO, each example beside a mismatched
    /// completion ([`kl_pairs`]). Returns the pairs scored and the batch.
    pub fn micro_batch(
        &self,
        rows: Vec<(TokenizedPair, Option<bool>)>,
        pad_id: u32,
        device: &Device,
    ) -> Result<(Vec<TokenizedPair>, PairBatch)> {
        if let Task::Kto(_) = self {
            let (pairs, labels) = kl_pairs(rows)?;
            let mut batch = PairBatch::new(&pairs, pad_id, device)?;
            batch.labels = Some(labels);
            return Ok((pairs, batch));
        }
        let pairs: Vec<TokenizedPair> = rows.into_iter().map(|(p, _)| p).collect();
        let mut batch = PairBatch::new(&pairs, pad_id, device)?;
        if let Task::Preference(o) = self {
            if let Some(alpha) = o.ld_alpha {
                batch = batch.with_ld_alpha(alpha)?;
            }
            if o.needs_prompt() {
                batch = batch.with_prompt_scoring(&pairs)?;
            }
        }
        Ok((pairs, batch))
    }

    /// The micro-batch's loss (a scalar); `weights` are WPO's pair weights.
    pub fn loss(&self, l: &PairLogps, weights: Option<&Tensor>) -> Result<Tensor> {
        Ok(match self {
            Task::Preference(o) | Task::Kto(o) => o.batch_loss(l, weights)?,
            Task::Sft => terms::chosen_nll(l)?,
            Task::Reward => terms::bradley_terry(l)?,
        })
    }

    /// Each pair's (example's) loss as a batch of one; `None` where a loss is only defined over
    /// the batch (`aot*` sort it, KTO estimates its KL term from it).
    pub fn per_pair_losses(&self, l: &PairLogps, weights: Option<&Tensor>) -> Result<Option<Vec<f64>>> {
        if let Task::Preference(o) | Task::Kto(o) = self {
            return Ok(o.per_pair(l, weights)?);
        }
        let mut out = Vec::with_capacity(l.pairs());
        for i in 0..l.pairs() {
            out.push(self.loss(&l.pair(i)?, None)?.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        }
        Ok(Some(out))
    }

    /// How its pairs' rewards are logged.
    fn reward_rule(&self) -> RewardRule {
        match self {
            Task::Preference(o) => o.reward_rule(),
            Task::Kto(o) => RewardRule::Implicit { beta: o.beta() },
            Task::Sft => RewardRule::None,
            Task::Reward => RewardRule::Scores,
        }
    }

    /// The detached numbers of a scored micro-batch: each pair's, and the task's metrics.
    /// `stats` and `owner` describe its scored response tokens (sequence, index in response),
    /// chosen sequences first; `per_pair` the pairs' own losses, when computed.
    pub fn collect(
        &self,
        l: &PairLogps,
        loss: &Tensor,
        per_pair: Option<&[f64]>,
        stats: &TokenStats,
        owner: &[(usize, usize)],
    ) -> Result<BatchScore> {
        let pairs = metrics::pair_scores(l, self.reward_rule(), self.needs_reference(), per_pair)?;
        let task_metrics = match self {
            Task::Preference(o) => match o.reference_free_kind() {
                None => TaskMetrics::Tokens(metrics::token_metrics(stats, owner, l.pairs())),
                Some(LossKind::Orpo) => TaskMetrics::Orpo(metrics::orpo_metrics(l)?),
                Some(kind) => {
                    let default = if kind == LossKind::Cpo { 1.0 } else { 0.0 };
                    TaskMetrics::Cpo(metrics::cpo_metrics(l, o.params.cpo_alpha.unwrap_or(default))?)
                }
            },
            Task::Kto(o) => TaskMetrics::Kto(metrics::kto_metrics(o.beta() as f32, l, stats, owner)?),
            Task::Sft => TaskMetrics::Sft(metrics::sft_metrics(stats)),
            Task::Reward => {
                let (chosen, rejected) = (metrics::host(&l.policy_chosen)?, metrics::host(&l.policy_rejected)?);
                TaskMetrics::Reward(metrics::reward_model_metrics(&chosen, &rejected))
            }
        };
        Ok(BatchScore { pairs, loss: metrics::scalar(loss)?, metrics: task_metrics })
    }
}

/// KTO's micro-batch as pairs: example `i`'s completion in the chosen slot and, in the rejected
/// slot, the completion of example `i − 1` (the last one for the first): TRL's mismatched
/// completions for the KL estimate (its `KL_completion_ids`, rotated within each
/// `per_device_train_batch_size` chunk), each scored after example `i`'s own prompt.
pub fn kl_pairs(examples: Vec<(TokenizedPair, Option<bool>)>) -> Result<(Vec<TokenizedPair>, Vec<bool>)> {
    let n = examples.len();
    let mut labels = Vec::with_capacity(n);
    for (_, label) in &examples {
        let Some(l) = label else { bail!("--loss kto needs labelled examples") };
        labels.push(*l);
    }
    let pairs = (0..n)
        .map(|i| TokenizedPair {
            prompt: examples[i].0.prompt.clone(),
            chosen: examples[i].0.chosen.clone(),
            rejected: examples[(i + n - 1) % n].0.chosen.clone(),
        })
        .collect();
    Ok((pairs, labels))
}
