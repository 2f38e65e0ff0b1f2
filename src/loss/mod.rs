//! The training objective: which preference losses (TRL's names), their weights and parameters,
//! and the one place that turns a micro-batch's summed log-probs into the loss.
//!
//! - [`terms`]: every loss as its formula (DPO, IPO, EXO, NCA, robust, BCO, SPPO, AOT, APO,
//!   DiscoPOP, SFT, SimPO, CPO, ORPO, KTO, and a reward model's Bradley–Terry loss), with the
//!   paper it comes from.
//! - [`Objective`]: a validated mix of terms (TRL's MPO `loss_type` list with `loss_weights`),
//!   LD-DPO's length weighting and WPO's pair weights; what it needs from the model and the data
//!   ([`Objective::needs_reference`], [`Objective::needs_prompt`]) and how its rewards are logged
//!   ([`Objective::reward_rule`]). Which task trains it (preference pairs, or KTO's examples) is
//!   the caller's ([`crate::task::Task`]).
//! - [`metrics`]: the per-pair numbers and the metrics TRL logs for each task.
//!
//! Gradient accumulation: each micro-batch is a batch of its own, as in TRL (its
//! `gradient_accumulation_steps` runs the loss on each micro-batch and averages the gradients):
//! the step's gradient is the mean over micro-batches of each micro-batch's loss. Per-pair losses
//! do not notice; batch-level ones (`aot*` sort within the micro-batch, `sft`/`cpo`/`orpo` take a
//! token mean over it) change with `--batch-size`, exactly as TRL's do with
//! `per_device_train_batch_size`.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! # use dpo::loss::{LossKind, Objective, PairLogps};
//! let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
//! let logps = PairLogps { policy_chosen: t(-1.0), policy_rejected: t(-2.0), ref_chosen: t(-1.0),
//!     ref_rejected: t(-2.0), chosen_tokens: vec![3], rejected_tokens: vec![4], chosen_prompt: None, labels: None };
//! let loss = Objective::single(LossKind::Sigmoid, 0.1).batch_loss(&logps, None).unwrap();
//! assert!((loss.to_scalar::<f32>().unwrap() - std::f32::consts::LN_2).abs() < 1e-6);
//! ```
pub mod metrics;
pub mod terms;

pub use metrics::{BatchScore, Metrics, PairMetrics, PairScore, RewardRule, TaskMetrics};

use candle_core::{Result, Tensor};
use serde::Serialize;
use terms::Term;

/// `--loss`: TRL's `loss_type` names (DPOTrainer), plus the reference-free `simpo`, `cpo`
/// (CPOTrainer) and `orpo` (ORPOTrainer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    Sigmoid,
    Hinge,
    Ipo,
    ExoPair,
    NcaPair,
    Robust,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    Sft,
    SigmoidNorm,
    Simpo,
    Cpo,
    Orpo,
    Kto,
}

/// `--f-divergence`: how the log-ratios enter the sigmoid-family losses (Wang et al. 2023).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[value(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum FDivergence {
    #[default]
    ReverseKl,
    ForwardKl,
    JsDivergence,
    AlphaDivergence,
}

impl FDivergence {
    pub fn name(self) -> &'static str {
        match self {
            Self::ReverseKl => "reverse_kl",
            Self::ForwardKl => "forward_kl",
            Self::JsDivergence => "js_divergence",
            Self::AlphaDivergence => "alpha_divergence",
        }
    }
}

impl LossKind {
    pub fn name(self) -> &'static str {
        use LossKind::*;
        match self {
            Sigmoid => "sigmoid",
            Hinge => "hinge",
            Ipo => "ipo",
            ExoPair => "exo_pair",
            NcaPair => "nca_pair",
            Robust => "robust",
            BcoPair => "bco_pair",
            SppoHard => "sppo_hard",
            Aot => "aot",
            AotUnpaired => "aot_unpaired",
            ApoZero => "apo_zero",
            ApoDown => "apo_down",
            Discopop => "discopop",
            Sft => "sft",
            SigmoidNorm => "sigmoid_norm",
            Simpo => "simpo",
            Cpo => "cpo",
            Orpo => "orpo",
            Kto => "kto",
        }
    }

    /// SimPO, CPO and ORPO score the policy alone.
    pub fn reference_free(self) -> bool {
        matches!(self, Self::Simpo | Self::Cpo | Self::Orpo)
    }

    /// Uses the reference's log-probs (`sft` uses neither the reference nor its absence).
    fn uses_reference(self) -> bool {
        !self.reference_free() && self != Self::Sft
    }

    /// Reads `--label-smoothing` (sigmoid as cDPO).
    fn reads_label_smoothing(self) -> bool {
        use LossKind::*;
        matches!(self, Sigmoid | ExoPair | Robust | Aot | AotUnpaired | Simpo | Cpo)
    }

    /// Accepts an f-divergence other than reverse KL (TRL's list; a no-op for `sft`).
    fn takes_f_divergence(self) -> bool {
        use LossKind::*;
        matches!(self, Sigmoid | SigmoidNorm | Hinge | Ipo | ExoPair | Robust | Discopop | Sft)
    }

    /// Has no loss per pair of its own: sorts across the batch (`aot*`), or estimates KTO's KL
    /// term from the batch's mismatched completions.
    fn batch_only(self) -> bool {
        matches!(self, Self::Aot | Self::AotUnpaired | Self::Kto)
    }
}

/// The numbers the losses read (TRL's parameter names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossParams {
    /// β; ORPO's λ; IPO's τ.
    pub beta: f64,
    /// ε: cDPO for sigmoid, and exo_pair, robust, aot*, simpo, cpo.
    pub label_smoothing: f64,
    pub f_divergence: FDivergence,
    /// α of the alpha divergence.
    pub f_alpha: f64,
    pub discopop_tau: f64,
    /// SimPO's target margin γ.
    pub simpo_gamma: f64,
    /// Weight of CPO's NLL term; `None`: 1 for cpo, 0 for simpo.
    pub cpo_alpha: Option<f64>,
    /// KTO's weights of desirable and undesirable examples.
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
}

impl LossParams {
    pub fn new(beta: f64) -> Self {
        Self {
            beta,
            label_smoothing: 0.0,
            f_divergence: FDivergence::ReverseKl,
            f_alpha: 1.0,
            discopop_tau: 0.05,
            simpo_gamma: 0.5,
            cpo_alpha: None,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
        }
    }
}

/// Summed response log-probs of a micro-batch, each `[pairs]` f32; reference ones detached
/// (zeros for a reference-free objective, which never reads them).
pub struct PairLogps {
    pub policy_chosen: Tensor,
    pub policy_rejected: Tensor,
    pub ref_chosen: Tensor,
    pub ref_rejected: Tensor,
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
    /// ORPO: the chosen prompts' summed log-probs (tokens after BOS) `[pairs]` and their counts.
    pub chosen_prompt: Option<(Tensor, Vec<usize>)>,
    /// KTO: each example's label (true: desirable). The completion is in the chosen slot, the
    /// mismatched (KL) completion in the rejected slot.
    pub labels: Option<Vec<bool>>,
}

impl PairLogps {
    /// `hc = pc − rc`.
    pub fn chosen_logratio(&self) -> Result<Tensor> {
        &self.policy_chosen - &self.ref_chosen
    }

    /// `hr = pr − rr`.
    pub fn rejected_logratio(&self) -> Result<Tensor> {
        &self.policy_rejected - &self.ref_rejected
    }

    pub fn pairs(&self) -> usize {
        self.chosen_tokens.len()
    }

    /// Pair `i` alone, as a batch of one.
    pub fn pair(&self, i: usize) -> Result<Self> {
        let one = |t: &Tensor| t.narrow(0, i, 1);
        Ok(Self {
            policy_chosen: one(&self.policy_chosen)?,
            policy_rejected: one(&self.policy_rejected)?,
            ref_chosen: one(&self.ref_chosen)?,
            ref_rejected: one(&self.ref_rejected)?,
            chosen_tokens: vec![self.chosen_tokens[i]],
            rejected_tokens: vec![self.rejected_tokens[i]],
            chosen_prompt: match &self.chosen_prompt {
                Some((t, n)) => Some((one(t)?, vec![n[i]])),
                None => None,
            },
            labels: self.labels.as_ref().map(|l| vec![l[i]]),
        })
    }
}

/// A validated objective: weighted loss terms and their settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub terms: Vec<(LossKind, f64)>,
    pub params: LossParams,
    /// LD-DPO (Liu et al. 2024): tokens past the shorter response weigh α in every sum.
    pub ld_alpha: Option<f64>,
    /// WPO (Zhou et al. 2024): each pair's loss weighted by `w_c·w_r`.
    pub use_weighting: bool,
}

/// Which settings the user gave explicitly (so that one a loss ignores can be refused).
#[derive(Debug, Clone, Copy, Default)]
pub struct Explicit {
    pub f_alpha: bool,
    pub discopop_tau: bool,
    pub simpo_gamma: bool,
}

type Check = std::result::Result<(), String>;

impl Objective {
    /// One loss with default parameters.
    pub fn single(kind: LossKind, beta: f64) -> Self {
        Self { terms: vec![(kind, 1.0)], params: LossParams::new(beta), ld_alpha: None, use_weighting: false }
    }

    /// Checks a combination as TRL does and more; every message names the flags involved.
    pub fn new(
        kinds: &[LossKind],
        weights: &[f64],
        params: LossParams,
        ld_alpha: Option<f64>,
        use_weighting: bool,
        explicit: Explicit,
    ) -> std::result::Result<Self, String> {
        if kinds.is_empty() {
            return Err("--loss (config key loss) needs at least one loss".into());
        }
        let weights = match weights.len() {
            0 => vec![1.0; kinds.len()],
            n if n == kinds.len() => weights.to_vec(),
            n => {
                return Err(format!(
                    "--loss-weights gives {n} weight(s) but --loss names {} loss(es) (config keys loss_weights, loss)",
                    kinds.len()
                ));
            }
        };
        let objective = Self { terms: kinds.iter().copied().zip(weights).collect(), params, ld_alpha, use_weighting };
        objective.check_ranges()?;
        objective.check_mix()?;
        objective.check_parameters(explicit)?;
        objective.check_weighting()?;
        Ok(objective)
    }

    fn loss_flag(&self) -> String {
        format!("--loss {}", self.name())
    }

    /// β, ε and the weights in range.
    fn check_ranges(&self) -> Check {
        let p = &self.params;
        if !(p.beta.is_finite() && p.beta > 0.0) {
            return Err(format!("--beta {} is out of range: must be a positive number (config key beta)", p.beta));
        }
        if !(p.label_smoothing.is_finite() && (0.0..0.5).contains(&p.label_smoothing)) {
            return Err(format!(
                "--label-smoothing {} is out of range: must be in [0, 0.5) (config key label_smoothing)",
                p.label_smoothing
            ));
        }
        if let Some((_, w)) = self.terms.iter().find(|(_, w)| !(w.is_finite() && *w >= 0.0)) {
            return Err(format!(
                "--loss-weights {w} is out of range: weights must be finite and not negative (config key loss_weights)"
            ));
        }
        Ok(())
    }

    /// Which losses may be mixed: no loss twice, reference-free ones alone (one of them), KTO alone.
    fn check_mix(&self) -> Check {
        let loss_flag = self.loss_flag();
        let names = |f: fn(LossKind) -> bool| {
            self.terms.iter().filter(|(k, _)| f(*k)).map(|(k, _)| k.name()).collect::<Vec<_>>()
        };
        if self.terms.iter().enumerate().any(|(i, (k, _))| self.terms[..i].iter().any(|(j, _)| j == k)) {
            return Err(format!("{loss_flag}: a loss is named twice (config key loss)"));
        }
        let (free, with_ref) = (names(LossKind::reference_free), names(LossKind::uses_reference));
        if !free.is_empty() && !with_ref.is_empty() {
            return Err(format!(
                "{loss_flag}: the reference-free loss {} cannot be mixed with the reference-based {} (config key loss)",
                free[0], with_ref[0]
            ));
        }
        if self.has(LossKind::Kto) && self.terms.len() > 1 {
            return Err(format!(
                "{loss_flag}: kto trains on unpaired examples and cannot be mixed with other losses (config key loss)"
            ));
        }
        if free.len() > 1 {
            return Err(format!("{loss_flag}: give one of simpo, cpo, orpo (config key loss)"));
        }
        Ok(())
    }

    /// Each loss parameter in range, and given only for a loss that reads it.
    fn check_parameters(&self, explicit: Explicit) -> Check {
        let (p, loss_flag) = (&self.params, self.loss_flag());
        for (flag, w) in [("--desirable-weight", p.desirable_weight), ("--undesirable-weight", p.undesirable_weight)] {
            let key = flag.trim_start_matches("--").replace('-', "_");
            if !(w.is_finite() && w > 0.0) {
                return Err(format!("{flag} {w} is out of range: must be a positive number (config key {key})"));
            }
            if w != 1.0 && !self.has(LossKind::Kto) {
                return Err(format!("{flag} applies to --loss kto only, not {loss_flag} (config keys {key}, loss)"));
            }
        }
        self.check_f_divergence(explicit)?;
        if p.label_smoothing > 0.0 {
            if let Some(k) = self.terms.iter().map(|(k, _)| *k).find(|k| !k.reads_label_smoothing()) {
                return Err(format!(
                    "--label-smoothing {} has no effect on --loss {}: it applies to sigmoid (cDPO), exo_pair, robust, aot, aot_unpaired, simpo, cpo (config keys label_smoothing, loss)",
                    p.label_smoothing,
                    k.name()
                ));
            }
        }
        if self.has(LossKind::ExoPair) && p.label_smoothing <= 0.0 {
            return Err("--loss exo_pair needs --label-smoothing > 0 (its ε; the paper uses 1e-3) (config keys loss, label_smoothing)".into());
        }
        if explicit.discopop_tau && !self.has(LossKind::Discopop) {
            return Err(format!(
                "--discopop-tau applies to --loss discopop only, not {loss_flag} (config keys discopop_tau, loss)"
            ));
        }
        if !(p.discopop_tau.is_finite() && p.discopop_tau > 0.0) {
            return Err(format!(
                "--discopop-tau {} is out of range: must be a positive number (config key discopop_tau)",
                p.discopop_tau
            ));
        }
        if explicit.simpo_gamma && !self.has(LossKind::Simpo) {
            return Err(format!(
                "--simpo-gamma applies to --loss simpo only, not {loss_flag} (config keys simpo_gamma, loss)"
            ));
        }
        if !p.simpo_gamma.is_finite() {
            return Err(format!(
                "--simpo-gamma {} is out of range: must be a finite number (config key simpo_gamma)",
                p.simpo_gamma
            ));
        }
        if let Some(a) = p.cpo_alpha {
            if !(self.has(LossKind::Cpo) || self.has(LossKind::Simpo)) {
                return Err(format!(
                    "--cpo-alpha applies to --loss cpo or simpo only, not {loss_flag} (config keys cpo_alpha, loss)"
                ));
            }
            if !(a.is_finite() && a >= 0.0) {
                return Err(format!("--cpo-alpha {a} is out of range: must not be negative (config key cpo_alpha)"));
            }
        }
        Ok(())
    }

    /// `--f-divergence` (and its α) only for the losses TRL defines it for.
    fn check_f_divergence(&self, explicit: Explicit) -> Check {
        let p = &self.params;
        if p.f_divergence != FDivergence::ReverseKl {
            let f = format!("--f-divergence {}", p.f_divergence.name());
            if let Some(k) = self.terms.iter().map(|(k, _)| *k).find(|k| !k.takes_f_divergence()) {
                let why = if k.reference_free() {
                    "it is reference-free"
                } else {
                    "TRL defines it for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft only"
                };
                return Err(format!(
                    "{f} cannot be used with --loss {}: {why} (config keys f_divergence, loss)",
                    k.name()
                ));
            }
        }
        if explicit.f_alpha && p.f_divergence != FDivergence::AlphaDivergence {
            return Err(
                "--f-alpha applies to --f-divergence alpha_divergence only (config keys f_alpha, f_divergence)".into(),
            );
        }
        if p.f_divergence == FDivergence::AlphaDivergence && !(p.f_alpha.is_finite() && p.f_alpha > 0.0) {
            return Err(format!(
                "--f-alpha {} is out of range: must be a positive number (config key f_alpha)",
                p.f_alpha
            ));
        }
        Ok(())
    }

    /// LD-DPO and WPO only on the per-pair, reference-based losses they reweight.
    fn check_weighting(&self) -> Check {
        let loss_flag = self.loss_flag();
        if let Some(a) = self.ld_alpha {
            if self.has(LossKind::Kto) {
                return Err("--ld-alpha cannot be used with --loss kto: LD-DPO weights the tokens of paired responses (config keys ld_alpha, loss)".into());
            }
            if !(a.is_finite() && (0.0..=1.0).contains(&a)) {
                return Err(format!("--ld-alpha {a} is out of range: must be in [0, 1] (config key ld_alpha)"));
            }
            if !self.needs_reference() {
                return Err(format!(
                    "--ld-alpha cannot be used with {loss_flag}: LD-DPO reweights the policy and reference sums of reference-based losses (config keys ld_alpha, loss)"
                ));
            }
        }
        if self.use_weighting {
            if let Some(k) = self.terms.iter().map(|(k, _)| *k).find(|k| k.batch_only() || !k.uses_reference()) {
                return Err(format!(
                    "--use-weighting cannot be used with --loss {}: WPO weights per-pair losses of reference-based DPO losses (TRL refuses it too) (config keys use_weighting, loss)",
                    k.name()
                ));
            }
        }
        Ok(())
    }

    pub fn has(&self, kind: LossKind) -> bool {
        self.terms.iter().any(|(k, _)| *k == kind)
    }

    /// `sigmoid`, or `sigmoid,sft` for a mix.
    pub fn name(&self) -> String {
        self.terms.iter().map(|(k, _)| k.name()).collect::<Vec<_>>().join(",")
    }

    pub fn beta(&self) -> f64 {
        self.params.beta
    }

    /// False for SimPO/CPO/ORPO (mixed with `sft` or not): no reference forward, no reference
    /// cache. `sft` alone keeps the reference, as TRL's DPOTrainer does, for its rewards.
    pub fn needs_reference(&self) -> bool {
        self.reference_free_kind().is_none()
    }

    /// How the pairs' rewards are logged: by the trainer TRL would use for these losses.
    pub fn reward_rule(&self) -> RewardRule {
        let beta = self.params.beta;
        match self.reference_free_kind() {
            Some(kind) => {
                RewardRule::ReferenceFree { beta, per_token: matches!(kind, LossKind::Simpo | LossKind::Orpo) }
            }
            None => RewardRule::Implicit { beta },
        }
    }

    /// ORPO's NLL covers the chosen prompts too.
    pub fn needs_prompt(&self) -> bool {
        self.has(LossKind::Orpo)
    }

    /// The single reference-free method, which decides how rewards are logged.
    pub fn reference_free_kind(&self) -> Option<LossKind> {
        self.terms.iter().map(|(k, _)| *k).find(|k| k.reference_free())
    }

    /// The micro-batch's loss (a scalar): `Σ_k w_k · term_k`, a per-pair term averaged over
    /// the pairs after WPO's `weights` (`[pairs]`, detached).
    pub fn batch_loss(&self, l: &PairLogps, weights: Option<&Tensor>) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for &(kind, w) in &self.terms {
            let value = match terms::term(kind, l, &self.params)? {
                Term::PerPair(v) => match weights {
                    Some(wpo) => (v * wpo)?.mean_all()?,
                    None => v.mean_all()?,
                },
                Term::Batch(v) => v,
            };
            let value = if w == 1.0 { value } else { (value * w)? };
            total = Some(match total {
                None => value,
                Some(t) => (t + value)?,
            });
        }
        Ok(total.expect("an objective has at least one term"))
    }

    /// Each pair's loss as a batch of one (TRL's per-pair value); `None` when a term sorts the
    /// batch (`aot*`), where a pair has no loss of its own.
    pub fn per_pair(&self, l: &PairLogps, weights: Option<&Tensor>) -> Result<Option<Vec<f64>>> {
        if self.terms.iter().any(|(k, _)| k.batch_only()) {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(l.pairs());
        for i in 0..l.pairs() {
            let w = weights.map(|w| w.narrow(0, i, 1)).transpose()?;
            let v = self.batch_loss(&l.pair(i)?, w.as_ref())?;
            out.push(v.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?);
        }
        Ok(Some(out))
    }
}

/// WPO's pair weights `w_c·w_r` (`[pairs]`, no gradient), `w_y = exp(mean_t(lp_t − lss_t))`
/// over the response tokens of `y` under the policy, `lss_t = log Σ_v p_t(v)²` (Zhou et al. 2024,
/// TRL's `use_weighting`). `token_logps` and `log_sum_sq` run over the scored response tokens,
/// `owner` names each one's sequence (chosen sequences first).
pub fn wpo_weights(token_logps: &[f32], log_sum_sq: &[f32], owner: &[(usize, usize)], pairs: usize) -> Vec<f32> {
    let (mut sum, mut count) = (vec![0f64; 2 * pairs], vec![0usize; 2 * pairs]);
    for (j, &(sequence, _)) in owner.iter().enumerate() {
        sum[sequence] += (token_logps[j] - log_sum_sq[j]) as f64;
        count[sequence] += 1;
    }
    let w = |s: usize| (sum[s] / count[s].max(1) as f64).exp();
    (0..pairs).map(|i| (w(i) * w(pairs + i)) as f32).collect()
}
