//! What is logged: each pair's numbers ([`PairScore`]), each micro-batch's ([`BatchScore`], with
//! its task's own metrics typed: [`TaskMetrics`]), and their means under TRL's metric names
//! ([`Metrics`]).
//!
//! Rewards follow the trainer TRL would use ([`RewardRule`]): DPOTrainer's `β·(p − r)`;
//! CPOTrainer's `β·p` (SimPO: `β·p/len`); ORPOTrainer's `β·p/len`; `logps/*` likewise (averages
//! for SimPO and ORPO); a reward model's scores are its rewards. The task's metrics are computed
//! per micro-batch and averaged over the micro-batches of a step, as TRL averages its per-batch
//! metrics:
//! - DPO losses ([`TokenMetrics`]): `entropy` (token-weighted over the chosen and rejected
//!   response tokens), `logits/chosen|rejected` (mean over response tokens of the
//!   vocabulary-mean logit), `mean_token_accuracy` (chosen response tokens whose target is the
//!   argmax);
//! - `cpo`/`simpo` ([`CpoMetrics`]): `nll_loss` (0 unless `cpo_alpha` > 0, as TRL logs it);
//! - `orpo` ([`OrpoMetrics`]): `nll_loss` (prompt included), `log_odds_ratio = mean logσ(log
//!   odds)`, `log_odds_chosen = mean log odds` (TRL's names);
//! - `kto` ([`KtoMetrics`]): `kl`, `rewards/*` and `logps/*` per label, `logits/*`, `entropy`
//!   (TRL's KTOTrainer);
//! - supervised fine-tuning ([`SftMetrics`]): `entropy` and `mean_token_accuracy` over the
//!   completion tokens, and no rewards;
//! - reward models ([`RewardModelMetrics`]): `accuracy`, `margin`, `min_reward`, `mean_reward`,
//!   `max_reward` (TRL's RewardTrainer).
//!
//! TRL's CPO/ORPO `logits/*` average over every position of the padded block (prompt and padding
//! included), so they depend on how a batch is padded; they are not logged here.
//!
//! ```
//! # use dpo::loss::metrics::{BatchScore, Metrics, PairScore, TaskMetrics, CpoMetrics};
//! let pair = PairScore { loss: Some(0.6), policy_chosen: -3.0, policy_rejected: -4.0, ref_chosen: Some(-3.5),
//!     ref_rejected: Some(-3.5), chosen_tokens: 2, rejected_tokens: 3, reward_chosen: 0.05, reward_rejected: -0.05,
//!     logged_chosen: -3.0, logged_rejected: -4.0 };
//! let batch = BatchScore { pairs: vec![pair], loss: 0.6, metrics: TaskMetrics::Cpo(CpoMetrics { nll_loss: 1.5 }) };
//! let m = Metrics::mean(&[batch]);
//! assert_eq!(m.accuracy(), Some(1.0));
//! assert_eq!(m.extra["nll_loss"], 1.5);
//! ```
use super::PairLogps;
use crate::model::token_stats::TokenStats;
use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::collections::BTreeMap;

/// One pair's numbers, detached.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairScore {
    /// The pair's loss as a batch of one; `None` for losses that sort the batch (`aot*`).
    pub loss: Option<f64>,
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    /// `None` for reference-free objectives.
    pub ref_chosen: Option<f64>,
    pub ref_rejected: Option<f64>,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
    /// The rewards as TRL's trainer for this loss logs them (f32 arithmetic, as TRL).
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    /// `logps/chosen|rejected` as logged (averages for SimPO and ORPO).
    pub logged_chosen: f64,
    pub logged_rejected: f64,
}

/// One micro-batch: its pairs, its loss (what was back-propagated) and its task's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchScore {
    pub pairs: Vec<PairScore>,
    pub loss: f64,
    pub metrics: TaskMetrics,
}

/// A micro-batch's metrics, typed per task; serialized flat, with TRL's names.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TaskMetrics {
    /// Reference-based preference losses (DPOTrainer).
    Tokens(TokenMetrics),
    /// `cpo`, `simpo` (CPOTrainer).
    Cpo(CpoMetrics),
    /// `orpo` (ORPOTrainer).
    Orpo(OrpoMetrics),
    Kto(KtoMetrics),
    Sft(SftMetrics),
    Reward(RewardModelMetrics),
}

impl TaskMetrics {
    /// Whether the batch's pairs are preference pairs whose rewards are logged as
    /// `rewards/*` and `logps/*` (KTO logs its own per label; SFT and reward models have none).
    pub fn logs_pair_rewards(&self) -> bool {
        matches!(self, Self::Tokens(_) | Self::Cpo(_) | Self::Orpo(_))
    }
}

/// DPOTrainer's token statistics of the response tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenMetrics {
    pub entropy: f64,
    #[serde(rename = "logits/chosen")]
    pub logits_chosen: f64,
    #[serde(rename = "logits/rejected")]
    pub logits_rejected: f64,
    pub mean_token_accuracy: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpoMetrics {
    pub nll_loss: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct OrpoMetrics {
    pub nll_loss: f64,
    pub log_odds_ratio: f64,
    pub log_odds_chosen: f64,
}

/// KTOTrainer's metrics; a per-label key is absent when the batch has no example of that label.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct KtoMetrics {
    pub kl: f64,
    #[serde(rename = "rewards/chosen", skip_serializing_if = "Option::is_none")]
    pub rewards_chosen: Option<f64>,
    #[serde(rename = "rewards/rejected", skip_serializing_if = "Option::is_none")]
    pub rewards_rejected: Option<f64>,
    #[serde(rename = "rewards/margins", skip_serializing_if = "Option::is_none")]
    pub rewards_margins: Option<f64>,
    #[serde(rename = "logps/chosen", skip_serializing_if = "Option::is_none")]
    pub logps_chosen: Option<f64>,
    #[serde(rename = "logps/rejected", skip_serializing_if = "Option::is_none")]
    pub logps_rejected: Option<f64>,
    #[serde(rename = "logits/chosen", skip_serializing_if = "Option::is_none")]
    pub logits_chosen: Option<f64>,
    #[serde(rename = "logits/rejected", skip_serializing_if = "Option::is_none")]
    pub logits_rejected: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
}

/// SFTTrainer's statistics of the completion tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SftMetrics {
    pub entropy: f64,
    pub mean_token_accuracy: f64,
}

/// RewardTrainer's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardModelMetrics {
    /// Pairs with `r_c > r_r` (strictly).
    pub accuracy: f64,
    pub margin: f64,
    pub min_reward: f64,
    pub mean_reward: f64,
    pub max_reward: f64,
}

/// How a pair's logged rewards and `logps/*` follow from its log-probs: as the TRL trainer
/// of the objective does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RewardRule {
    /// DPOTrainer and KTOTrainer: `β·(p − r)`; `logps/*` are `p`.
    Implicit { beta: f64 },
    /// CPOTrainer and ORPOTrainer: `β·a`, `a` the log-probs themselves or (`per_token`: SimPO,
    /// ORPO) their per-token averages, which are also `logps/*`.
    ReferenceFree { beta: f64, per_token: bool },
    /// A reward model's scores (in the log-prob slots) are the rewards.
    Scores,
    /// No rewards (supervised fine-tuning): zeros.
    None,
}

pub(crate) fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Each pair's numbers, detached; `per_pair` are the pairs' own losses (evaluation only);
/// `reference` whether `l` holds reference log-probs.
pub fn pair_scores(
    l: &PairLogps,
    rule: RewardRule,
    reference: bool,
    per_pair: Option<&[f64]>,
) -> Result<Vec<PairScore>> {
    let (pc, pr) = (host(&l.policy_chosen)?, host(&l.policy_rejected)?);
    let (rc, rr) = if reference {
        (host(&l.ref_chosen)?, host(&l.ref_rejected)?)
    } else {
        (vec![0.0; pc.len()], vec![0.0; pr.len()])
    };
    Ok((0..pc.len())
        .map(|i| {
            let (lc, lr) = (l.chosen_tokens[i].max(1) as f32, l.rejected_tokens[i].max(1) as f32);
            let (logged_chosen, logged_rejected) = match rule {
                RewardRule::ReferenceFree { per_token: true, .. } => (pc[i] / lc, pr[i] / lr),
                _ => (pc[i], pr[i]),
            };
            let (reward_chosen, reward_rejected) = match rule {
                RewardRule::Implicit { beta } => (beta as f32 * (pc[i] - rc[i]), beta as f32 * (pr[i] - rr[i])),
                RewardRule::ReferenceFree { beta, .. } => (beta as f32 * logged_chosen, beta as f32 * logged_rejected),
                RewardRule::Scores => (pc[i], pr[i]),
                RewardRule::None => (0.0, 0.0),
            };
            PairScore {
                loss: per_pair.map(|v| v[i]),
                policy_chosen: pc[i] as f64,
                policy_rejected: pr[i] as f64,
                ref_chosen: reference.then_some(rc[i] as f64),
                ref_rejected: reference.then_some(rr[i] as f64),
                chosen_tokens: l.chosen_tokens[i],
                rejected_tokens: l.rejected_tokens[i],
                reward_chosen: reward_chosen as f64,
                reward_rejected: reward_rejected as f64,
                logged_chosen: logged_chosen as f64,
                logged_rejected: logged_rejected as f64,
            }
        })
        .collect())
}

fn ratio(a: f64, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a / b as f64 }
}

/// DPOTrainer's `entropy`, `logits/*` and `mean_token_accuracy` over the response tokens.
/// `stats` and `owner` describe the scored response tokens (sequence, index in response),
/// chosen sequences first.
pub fn token_metrics(stats: &TokenStats, owner: &[(usize, usize)], pairs: usize) -> TokenMetrics {
    let (mut entropy, mut n) = (0f64, 0usize);
    let (mut logits, mut counts, mut top1) = ([0f64; 2], [0usize; 2], 0usize);
    for (j, &(sequence, _)) in owner.iter().enumerate() {
        let side = usize::from(sequence >= pairs);
        entropy += stats.entropy[j] as f64;
        n += 1;
        logits[side] += stats.mean_logit[j] as f64;
        counts[side] += 1;
        if side == 0 && stats.top1[j] {
            top1 += 1;
        }
    }
    TokenMetrics {
        entropy: ratio(entropy, n),
        logits_chosen: ratio(logits[0], counts[0]),
        logits_rejected: ratio(logits[1], counts[1]),
        mean_token_accuracy: ratio(top1 as f64, counts[0]),
    }
}

/// SFTTrainer's `entropy` and `mean_token_accuracy` over the completion tokens.
pub fn sft_metrics(stats: &TokenStats) -> SftMetrics {
    let n = stats.entropy.len();
    SftMetrics {
        entropy: ratio(stats.entropy.iter().map(|&e| e as f64).sum(), n),
        mean_token_accuracy: ratio(stats.top1.iter().filter(|&&t| t).count() as f64, n),
    }
}

/// RewardTrainer's metrics from the rewards of the chosen and the rejected responses.
pub fn reward_model_metrics(chosen: &[f32], rejected: &[f32]) -> RewardModelMetrics {
    let n = chosen.len().max(1) as f64;
    let all: Vec<f64> = chosen.iter().chain(rejected).map(|&r| r as f64).collect();
    RewardModelMetrics {
        accuracy: chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64 / n,
        margin: chosen.iter().zip(rejected).map(|(c, r)| (c - r) as f64).sum::<f64>() / n,
        min_reward: all.iter().copied().fold(f64::INFINITY, f64::min),
        mean_reward: all.iter().sum::<f64>() / all.len().max(1) as f64,
        max_reward: all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// KTOTrainer's metrics: `kl`, rewards and log-probs per label (a key is absent when the batch
/// has no example of that label, as in TRL), logits per label and entropy over the completions.
pub fn kto_metrics(beta: f32, l: &PairLogps, stats: &TokenStats, owner: &[(usize, usize)]) -> Result<KtoMetrics> {
    let labels = l.labels.as_deref().unwrap_or_default();
    let (pc, rc, pr, rr) =
        (host(&l.policy_chosen)?, host(&l.ref_chosen)?, host(&l.policy_rejected)?, host(&l.ref_rejected)?);
    let n = labels.len();
    let kl = ((0..n).map(|i| (pr[i] - rr[i]) as f64).sum::<f64>() / n.max(1) as f64).max(0.0);
    let mut entropy = (0.0, 0usize);
    let mut logits = [(0.0, 0usize); 2];
    for (j, &(sequence, _)) in owner.iter().enumerate() {
        if sequence < n {
            entropy = (entropy.0 + stats.entropy[j] as f64, entropy.1 + 1);
            let side = &mut logits[usize::from(!labels[sequence])];
            *side = (side.0 + stats.mean_logit[j] as f64, side.1 + 1);
        }
    }
    let mean = |(sum, count): (f64, usize)| (count > 0).then(|| sum / count as f64);
    // Per label (desirable first): the mean reward and log-prob, and the mean logit if any.
    let side = |desirable: bool| {
        let picked: Vec<usize> = (0..n).filter(|&i| labels[i] == desirable).collect();
        if picked.is_empty() {
            return (None, None, None);
        }
        let m = picked.len() as f64;
        let reward = picked.iter().map(|&i| (beta * (pc[i] - rc[i])) as f64).sum::<f64>() / m;
        let logp = picked.iter().map(|&i| pc[i] as f64).sum::<f64>() / m;
        (Some(reward), Some(logp), mean(logits[usize::from(!desirable)]))
    };
    let ((rewards_chosen, logps_chosen, logits_chosen), (rewards_rejected, logps_rejected, logits_rejected)) =
        (side(true), side(false));
    Ok(KtoMetrics {
        kl,
        rewards_chosen,
        rewards_rejected,
        rewards_margins: rewards_chosen.zip(rewards_rejected).map(|(c, r)| c - r),
        logps_chosen,
        logps_rejected,
        logits_chosen,
        logits_rejected,
        entropy: mean(entropy),
    })
}

/// CPOTrainer's `nll_loss`: the chosen NLL when its weight `alpha` is positive, else 0 (as TRL
/// logs it).
pub fn cpo_metrics(l: &PairLogps, alpha: f64) -> Result<CpoMetrics> {
    Ok(CpoMetrics { nll_loss: if alpha > 0.0 { scalar(&super::terms::chosen_nll(l)?)? } else { 0.0 } })
}

/// ORPOTrainer's `nll_loss`, `log_odds_ratio`, `log_odds_chosen`.
pub fn orpo_metrics(l: &PairLogps) -> Result<OrpoMetrics> {
    let (nll, log_odds) = super::terms::orpo_parts(l)?;
    Ok(OrpoMetrics {
        nll_loss: scalar(&nll)?,
        log_odds_ratio: scalar(&super::terms::log_sigmoid(&log_odds)?.mean_all()?)?,
        log_odds_chosen: scalar(&log_odds.mean_all()?)?,
    })
}

/// The preference metrics: rewards and log-probs of the chosen and rejected responses.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PairMetrics {
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
}

/// Means over a step's (or an evaluation's) micro-batches, with TRL's metric names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metrics {
    pub loss: f64,
    /// Preference tasks only (see [`TaskMetrics::logs_pair_rewards`]).
    #[serde(flatten)]
    pub pairwise: Option<PairMetrics>,
    /// The task's own metrics (`entropy`, `nll_loss`, `kl`, `accuracy` …), each averaged over the
    /// micro-batches that logged it.
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
    /// A reward model's mean `accuracy`.
    #[serde(skip)]
    reward_model_accuracy: Option<f64>,
}

impl Metrics {
    /// Pair metrics over all pairs; the loss and the task's metrics over the micro-batches.
    pub fn mean(batches: &[BatchScore]) -> Self {
        let pairs: Vec<&PairScore> = batches.iter().flat_map(|b| &b.pairs).collect();
        let n = pairs.len().max(1) as f64;
        let mean = |f: &dyn Fn(&PairScore) -> f64| pairs.iter().map(|s| f(s)).sum::<f64>() / n;
        let m = batches.len().max(1) as f64;
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for b in batches {
            let serde_json::Value::Object(fields) = serde_json::to_value(&b.metrics).unwrap_or_default() else {
                continue;
            };
            for (k, v) in fields {
                let e = sums.entry(k).or_insert((0.0, 0));
                *e = (e.0 + v.as_f64().unwrap_or(f64::NAN), e.1 + 1);
            }
        }
        let extra = sums.into_iter().map(|(k, (sum, count))| (k, sum / count as f64)).collect();
        let pairwise =
            (!batches.is_empty() && batches.iter().all(|b| b.metrics.logs_pair_rewards())).then(|| PairMetrics {
                rewards_chosen: mean(&|s| s.reward_chosen),
                rewards_rejected: mean(&|s| s.reward_rejected),
                rewards_accuracies: mean(&|s| f64::from(u8::from(s.reward_chosen > s.reward_rejected))),
                rewards_margins: mean(&|s| s.reward_chosen - s.reward_rejected),
                logps_chosen: mean(&|s| s.logged_chosen),
                logps_rejected: mean(&|s| s.logged_rejected),
            });
        let accuracies: Vec<f64> = batches
            .iter()
            .filter_map(|b| match &b.metrics {
                TaskMetrics::Reward(r) => Some(r.accuracy),
                _ => None,
            })
            .collect();
        let reward_model_accuracy =
            (!accuracies.is_empty()).then(|| accuracies.iter().sum::<f64>() / accuracies.len() as f64);
        Self { loss: batches.iter().map(|b| b.loss).sum::<f64>() / m, pairwise, extra, reward_model_accuracy }
    }

    /// Reward accuracy: preference pairs' `rewards/accuracies`, a reward model's `accuracy`;
    /// `None` for tasks without pairs to rank (SFT, KTO).
    pub fn accuracy(&self) -> Option<f64> {
        self.pairwise.as_ref().map(|p| p.rewards_accuracies).or(self.reward_model_accuracy)
    }
}
