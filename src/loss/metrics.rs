//! What is logged: each pair's numbers ([`PairScore`]), each micro-batch's ([`BatchScore`]), and
//! their means under TRL's metric names ([`RewardMetrics`]).
//!
//! Rewards follow the trainer TRL would use for the loss: DPOTrainer's `β·(p − r)`; CPOTrainer's
//! `β·p` (SimPO: `β·p/len`); ORPOTrainer's `β·p/len`; `logps/*` likewise (averages for SimPO and
//! ORPO). Loss-specific metrics are computed per micro-batch and averaged over the micro-batches
//! of a step, as TRL averages its per-batch metrics:
//! - DPO losses: `entropy` (token-weighted over the chosen and rejected response tokens),
//!   `logits/chosen|rejected` (mean over response tokens of the vocabulary-mean logit),
//!   `mean_token_accuracy` (chosen response tokens whose target is the argmax);
//! - reward models (`dpo reward train`): `accuracy`, `margin`, `min_reward`, `mean_reward`,
//!   `max_reward` (TRL's RewardTrainer);
//! - `kto`: `kl`, `rewards/*` and `logps/*` per label, `logits/*`, `entropy` (TRL's KTOTrainer);
//! - supervised fine-tuning (`dpo sft`): `entropy` and `mean_token_accuracy` over the
//!   completion tokens, and no rewards;
//! - `cpo`/`simpo`: `nll_loss` (0 unless `cpo_alpha` > 0, as TRL logs it);
//! - `orpo`: `nll_loss` (prompt included), `log_odds_ratio = mean logσ(log odds)`,
//!   `log_odds_chosen = mean log odds` (TRL's names).
//!
//! TRL's CPO/ORPO `logits/*` average over every position of the padded block (prompt and padding
//! included), so they depend on how a batch is padded; they are not logged here.
//!
//! ```
//! # use dpo::loss::{BatchScore, PairScore, RewardMetrics};
//! let pair = PairScore { loss: Some(0.6), policy_chosen: -3.0, policy_rejected: -4.0, ref_chosen: Some(-3.5),
//!     ref_rejected: Some(-3.5), chosen_tokens: 2, rejected_tokens: 3, reward_chosen: 0.05, reward_rejected: -0.05,
//!     logged_chosen: -3.0, logged_rejected: -4.0 };
//! let batch = BatchScore { pairs: vec![pair], loss: 0.6, extra: Default::default(), paired: true };
//! let m = RewardMetrics::mean(&[batch]);
//! assert_eq!(m.accuracy(), 1.0);
//! ```
use super::{LossKind, Objective, PairLogps};
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

/// One micro-batch: its pairs, its loss (what was back-propagated) and loss-specific metrics.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchScore {
    pub pairs: Vec<PairScore>,
    pub loss: f64,
    pub extra: BTreeMap<String, f64>,
    /// Preference pairs (false for supervised fine-tuning and KTO, whose rewards, if any, are
    /// in `extra`).
    pub paired: bool,
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl BatchScore {
    /// Detaches a scored micro-batch. `stats` and `owner` describe its response tokens
    /// (sequence, index in response), chosen sequences first.
    pub fn collect(
        objective: &Objective,
        l: &PairLogps,
        loss: &Tensor,
        per_pair: Option<Vec<f64>>,
        stats: &TokenStats,
        owner: &[(usize, usize)],
    ) -> Result<Self> {
        let (pc, pr) = (host(&l.policy_chosen)?, host(&l.policy_rejected)?);
        let reference = objective.needs_reference();
        let (rc, rr) = if reference {
            (host(&l.ref_chosen)?, host(&l.ref_rejected)?)
        } else {
            (vec![0.0; pc.len()], vec![0.0; pr.len()])
        };
        let beta = objective.beta() as f32;
        let free = objective.reference_free_kind();
        let pairs = (0..pc.len())
            .map(|i| {
                let (lc, lr) = (l.chosen_tokens[i].max(1) as f32, l.rejected_tokens[i].max(1) as f32);
                let (logged_chosen, logged_rejected) = match free {
                    Some(LossKind::Simpo | LossKind::Orpo) => (pc[i] / lc, pr[i] / lr),
                    _ => (pc[i], pr[i]),
                };
                let (reward_chosen, reward_rejected) = match free {
                    _ if objective.reward_model => (pc[i], pr[i]),
                    Some(_) => (beta * logged_chosen, beta * logged_rejected),
                    None => (beta * (pc[i] - rc[i]), beta * (pr[i] - rr[i])),
                };
                PairScore {
                    loss: per_pair.as_ref().map(|v| v[i]),
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
            .collect();
        let mut extra = match free {
            _ if objective.reward_model => reward_model_metrics(&pc, &pr),
            _ if objective.unpaired() => kto_metrics(objective.beta() as f32, l, stats, owner)?,
            None => token_metrics(stats, owner, pc.len()),
            Some(kind) => reference_free_metrics(objective, kind, l)?,
        };
        if objective.supervised {
            // TRL's SFTTrainer logs entropy and token accuracy over the completion tokens.
            extra.retain(|k, _| k == "entropy" || k == "mean_token_accuracy");
        }
        Ok(Self {
            pairs,
            loss: scalar(loss)?,
            extra,
            paired: !objective.supervised && !objective.unpaired() && !objective.reward_model,
        })
    }
}

/// DPOTrainer's `entropy`, `logits/*` and `mean_token_accuracy` over the response tokens.
fn token_metrics(stats: &TokenStats, owner: &[(usize, usize)], pairs: usize) -> BTreeMap<String, f64> {
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
    let ratio = |a: f64, b: usize| if b == 0 { 0.0 } else { a / b as f64 };
    BTreeMap::from([
        ("entropy".to_string(), ratio(entropy, n)),
        ("logits/chosen".to_string(), ratio(logits[0], counts[0])),
        ("logits/rejected".to_string(), ratio(logits[1], counts[1])),
        ("mean_token_accuracy".to_string(), ratio(top1 as f64, counts[0])),
    ])
}

/// RewardTrainer's metrics: `accuracy` (strict `r_c > r_r`), `margin`, and the min, mean and max
/// of all rewards.
fn reward_model_metrics(chosen: &[f32], rejected: &[f32]) -> BTreeMap<String, f64> {
    let n = chosen.len().max(1) as f64;
    let all: Vec<f64> = chosen.iter().chain(rejected).map(|&r| r as f64).collect();
    BTreeMap::from([
        ("accuracy".to_string(), chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64 / n),
        ("margin".to_string(), chosen.iter().zip(rejected).map(|(c, r)| (c - r) as f64).sum::<f64>() / n),
        ("min_reward".to_string(), all.iter().copied().fold(f64::INFINITY, f64::min)),
        ("mean_reward".to_string(), all.iter().sum::<f64>() / all.len().max(1) as f64),
        ("max_reward".to_string(), all.iter().copied().fold(f64::NEG_INFINITY, f64::max)),
    ])
}

/// KTOTrainer's metrics: `kl`, rewards and log-probs per label (a key is absent when the batch
/// has no example of that label, as in TRL), logits per label and entropy over the completions.
fn kto_metrics(
    beta: f32,
    l: &PairLogps,
    stats: &TokenStats,
    owner: &[(usize, usize)],
) -> Result<BTreeMap<String, f64>> {
    let labels = l.labels.as_ref().map(Vec::as_slice).unwrap_or_default();
    let (pc, rc, pr, rr) =
        (host(&l.policy_chosen)?, host(&l.ref_chosen)?, host(&l.policy_rejected)?, host(&l.ref_rejected)?);
    let n = labels.len();
    let kl = ((0..n).map(|i| (pr[i] - rr[i]) as f64).sum::<f64>() / n.max(1) as f64).max(0.0);
    let mut out = BTreeMap::from([("kl".to_string(), kl)]);
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
    let mut rewards = [None, None];
    for (side, name) in [(true, "chosen"), (false, "rejected")] {
        let picked: Vec<usize> = (0..n).filter(|&i| labels[i] == side).collect();
        if picked.is_empty() {
            continue;
        }
        let m = picked.len() as f64;
        let reward = picked.iter().map(|&i| (beta * (pc[i] - rc[i])) as f64).sum::<f64>() / m;
        rewards[usize::from(!side)] = Some(reward);
        out.insert(format!("rewards/{name}"), reward);
        out.insert(format!("logps/{name}"), picked.iter().map(|&i| pc[i] as f64).sum::<f64>() / m);
        if let Some(v) = mean(logits[usize::from(!side)]) {
            out.insert(format!("logits/{name}"), v);
        }
    }
    if let [Some(c), Some(r)] = rewards {
        out.insert("rewards/margins".into(), c - r);
    }
    if let Some(e) = mean(entropy) {
        out.insert("entropy".into(), e);
    }
    Ok(out)
}

/// CPOTrainer's `nll_loss`; ORPOTrainer's `nll_loss`, `log_odds_ratio`, `log_odds_chosen`.
fn reference_free_metrics(objective: &Objective, kind: LossKind, l: &PairLogps) -> Result<BTreeMap<String, f64>> {
    Ok(match kind {
        LossKind::Orpo => {
            let (nll, log_odds) = super::terms::orpo_parts(l)?;
            BTreeMap::from([
                ("nll_loss".to_string(), scalar(&nll)?),
                ("log_odds_ratio".to_string(), scalar(&super::terms::log_sigmoid(&log_odds)?.mean_all()?)?),
                ("log_odds_chosen".to_string(), scalar(&log_odds.mean_all()?)?),
            ])
        }
        _ => {
            let alpha = objective.params.cpo_alpha.unwrap_or(if kind == LossKind::Cpo { 1.0 } else { 0.0 });
            BTreeMap::from([(
                "nll_loss".to_string(),
                if alpha > 0.0 { scalar(&super::terms::chosen_nll(l)?)? } else { 0.0 },
            )])
        }
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
pub struct RewardMetrics {
    pub loss: f64,
    /// Absent for supervised fine-tuning, which has no pairs.
    #[serde(flatten)]
    pub pairwise: Option<PairMetrics>,
    /// Loss-specific metrics (`entropy`, `nll_loss`, `log_odds_ratio` …).
    #[serde(flatten)]
    pub extra: BTreeMap<String, f64>,
}

impl RewardMetrics {
    /// Pair metrics over all pairs; the loss and the extra metrics over the micro-batches.
    pub fn mean(batches: &[BatchScore]) -> Self {
        let pairs: Vec<&PairScore> = batches.iter().flat_map(|b| &b.pairs).collect();
        let n = pairs.len().max(1) as f64;
        let mean = |f: &dyn Fn(&PairScore) -> f64| pairs.iter().map(|s| f(s)).sum::<f64>() / n;
        let m = batches.len().max(1) as f64;
        // Each metric averaged over the micro-batches that logged it.
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for b in batches {
            for (k, v) in &b.extra {
                let e = sums.entry(k.clone()).or_insert((0.0, 0));
                *e = (e.0 + v, e.1 + 1);
            }
        }
        let extra = sums.into_iter().map(|(k, (sum, count))| (k, sum / count as f64)).collect();
        let pairwise = batches.iter().all(|b| b.paired).then(|| PairMetrics {
            rewards_chosen: mean(&|s| s.reward_chosen),
            rewards_rejected: mean(&|s| s.reward_rejected),
            rewards_accuracies: mean(&|s| f64::from(u8::from(s.reward_chosen > s.reward_rejected))),
            rewards_margins: mean(&|s| s.reward_chosen - s.reward_rejected),
            logps_chosen: mean(&|s| s.logged_chosen),
            logps_rejected: mean(&|s| s.logged_rejected),
        });
        Self { loss: batches.iter().map(|b| b.loss).sum::<f64>() / m, pairwise, extra }
    }

    /// Reward accuracy (a reward model's `accuracy`), NaN when there is none.
    pub fn accuracy(&self) -> f64 {
        self.pairwise
            .as_ref()
            .map(|p| p.rewards_accuracies)
            .or_else(|| self.extra.get("accuracy").copied())
            .unwrap_or(f64::NAN)
    }
}
