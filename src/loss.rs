//! DPO losses and the reward metrics TRL logs, from summed response log-probabilities.
//!
//! With policy log-probs `pc, pr`, reference `rc, rr` and `h = (pc − pr) − (rc − rr)`:
//! - `sigmoid`: `−logσ(βh)`; with label smoothing ε (cDPO): `−(1−ε)·logσ(βh) − ε·logσ(−βh)`
//! - `hinge`: `relu(1 − βh)`
//! - `ipo` (TRL's length-normalised form): `((pc−rc)/len_c − (pr−rr)/len_r − 1/(2β))²`
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! # use dpo::loss::{DpoLoss, LossKind, PairLogps};
//! let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
//! let logps = PairLogps { policy_chosen: t(-1.0), policy_rejected: t(-2.0), ref_chosen: t(-1.0),
//!     ref_rejected: t(-2.0), chosen_tokens: vec![3], rejected_tokens: vec![4] };
//! let loss = DpoLoss { kind: LossKind::Sigmoid, beta: 0.1, label_smoothing: 0.0 }.per_pair(&logps).unwrap();
//! assert!((loss.to_vec1::<f32>().unwrap()[0] - std::f32::consts::LN_2).abs() < 1e-6);
//! ```
use anyhow::{Result, bail};
use candle_core::{DType, Tensor};
use serde::Serialize;

/// `--loss`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    Sigmoid,
    Ipo,
    Hinge,
}

impl LossKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Ipo => "ipo",
            Self::Hinge => "hinge",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoLoss {
    pub kind: LossKind,
    pub beta: f64,
    pub label_smoothing: f64,
}

/// Summed response log-probs of a micro-batch, each `[pairs]` f32; reference ones detached.
pub struct PairLogps {
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    pub ref_chosen: Tensor,
    pub ref_rejected: Tensor,
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
}

impl DpoLoss {
    pub fn validate(&self) -> Result<()> {
        if !self.beta.is_finite() || self.beta <= 0.0 {
            bail!("beta must be positive, got {}", self.beta);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!("label_smoothing must be in [0, 0.5), got {}", self.label_smoothing);
        }
        if self.label_smoothing > 0.0 && self.kind != LossKind::Sigmoid {
            bail!("label_smoothing applies to the sigmoid loss only (cDPO)");
        }
        Ok(())
    }

    /// Per-pair losses `[pairs]`, differentiable through the policy log-probs.
    pub fn per_pair(&self, l: &PairLogps) -> Result<Tensor> {
        let chosen_gain = (&l.policy_chosen - &l.ref_chosen)?;
        let rejected_gain = (&l.policy_rejected - &l.ref_rejected)?;
        Ok(match self.kind {
            LossKind::Sigmoid => {
                let z = ((chosen_gain - rejected_gain)? * self.beta)?;
                let eps = self.label_smoothing;
                let loss = (log_sigmoid(&z)? * -(1.0 - eps))?;
                if eps > 0.0 { (loss - (log_sigmoid(&z.neg()?)? * eps)?)? } else { loss }
            }
            LossKind::Hinge => {
                let z = ((chosen_gain - rejected_gain)? * self.beta)?;
                z.affine(-1.0, 1.0)?.relu()?
            }
            LossKind::Ipo => {
                let per_token = |gain: Tensor, lens: &[usize]| -> Result<Tensor> {
                    let lens: Vec<f32> = lens.iter().map(|&n| n as f32).collect();
                    Ok(gain.div(&Tensor::from_vec(lens, gain.shape(), gain.device())?)?)
                };
                let d = (per_token(chosen_gain, &l.chosen_tokens)? - per_token(rejected_gain, &l.rejected_tokens)?)?;
                (d - 1.0 / (2.0 * self.beta))?.sqr()?
            }
        })
    }
}

/// `log σ(x) = min(x, 0) − log(1 + e^−|x|)`, stable and differentiable.
fn log_sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    x.minimum(0.0)? - (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// One pair's numbers, detached, for metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScore {
    pub loss: f64,
    pub policy_chosen: f64,
    pub policy_rejected: f64,
    pub ref_chosen: f64,
    pub ref_rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
}

impl PairScore {
    pub fn collect(l: &PairLogps, losses: &Tensor) -> Result<Vec<Self>> {
        let v = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?) };
        let (loss, pc, pr, rc, rr) =
            (v(losses)?, v(&l.policy_chosen)?, v(&l.policy_rejected)?, v(&l.ref_chosen)?, v(&l.ref_rejected)?);
        Ok((0..loss.len())
            .map(|i| Self {
                loss: loss[i] as f64,
                policy_chosen: pc[i] as f64,
                policy_rejected: pr[i] as f64,
                ref_chosen: rc[i] as f64,
                ref_rejected: rr[i] as f64,
                chosen_tokens: l.chosen_tokens[i],
                rejected_tokens: l.rejected_tokens[i],
            })
            .collect())
    }

    // Rewards in f32 as TRL computes them, so accuracies tie-break the same way.
    pub fn chosen_reward(&self, beta: f64) -> f64 {
        ((beta as f32) * (self.policy_chosen as f32 - self.ref_chosen as f32)) as f64
    }

    pub fn rejected_reward(&self, beta: f64) -> f64 {
        ((beta as f32) * (self.policy_rejected as f32 - self.ref_rejected as f32)) as f64
    }
}

/// Means over a set of pairs, with TRL's metric names.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RewardMetrics {
    pub loss: f64,
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

impl RewardMetrics {
    pub fn mean(scores: &[PairScore], beta: f64) -> Self {
        let n = scores.len().max(1) as f64;
        let mean = |f: &dyn Fn(&PairScore) -> f64| scores.iter().map(f).sum::<f64>() / n;
        Self {
            loss: mean(&|s| s.loss),
            rewards_chosen: mean(&|s| s.chosen_reward(beta)),
            rewards_rejected: mean(&|s| s.rejected_reward(beta)),
            rewards_accuracies: mean(&|s| f64::from(u8::from(s.chosen_reward(beta) > s.rejected_reward(beta)))),
            rewards_margins: mean(&|s| s.chosen_reward(beta) - s.rejected_reward(beta)),
            logps_chosen: mean(&|s| s.policy_chosen),
            logps_rejected: mean(&|s| s.policy_rejected),
        }
    }
}
