//! Each preference loss as its formula, in one place. Notation (TRL's): `pc, pr` the policy's
//! summed response log-probs of the chosen and rejected responses, `rc, rr` the reference's,
//! `hc = pc − rc`, `hr = pr − rr`, `len_c, len_r` their token counts, `β` the temperature,
//! `ε` the label smoothing, `sc, sr` the log-ratios through the f-divergence (`hc`, `hr` for the
//! reverse KL of standard DPO) and `Δ = sc − sr`.
//!
//! Most losses are a value per pair, averaged over the batch ([`Term::PerPair`]); `aot*`, `sft`,
//! `orpo`, `kto` (its KL estimate), and `cpo`/`simpo` with an NLL term (`--cpo-alpha` > 0) are batch-level
//! ([`Term::Batch`]): they sort across the batch or take a token mean over it, so they change
//! with micro-batching exactly as in TRL (each micro-batch is a batch of its own; see
//! [`super::Objective`]).
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! # use dpo::loss::{LossKind, LossParams, PairLogps, terms::{term, Term}};
//! let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
//! let l = PairLogps { policy_chosen: t(&[-1.0, -2.0]), policy_rejected: t(&[-3.0, -1.0]), ref_chosen: t(&[-1.5, -2.0]),
//!     ref_rejected: t(&[-2.5, -1.5]), chosen_tokens: vec![2, 4], rejected_tokens: vec![3, 1], chosen_prompt: None, labels: None };
//! // sft: −Σ pc / Σ len_c over the batch, not a mean of per-pair values.
//! let Term::Batch(sft) = term(LossKind::Sft, &l, &LossParams::new(0.1)).unwrap() else { panic!() };
//! assert!((sft.to_scalar::<f32>().unwrap() - 0.5).abs() < 1e-6);
//! ```
use super::{FDivergence, LossKind, LossParams, PairLogps};
use candle_core::{Result, Tensor};

/// One loss term's value on a batch.
pub enum Term {
    /// `[pairs]`, averaged (after WPO's weights) into the batch value.
    PerPair(Tensor),
    /// The batch's value, a scalar.
    Batch(Tensor),
}

/// `log σ(x)`, stable, with the right gradient `σ(−x)` everywhere — at `x = 0` too, where a
/// policy equal to its reference puts every DPO pair on the first step. (The form
/// `min(x, 0) − log(1 + e^−|x|)` differentiates to 1 there through candle's tie-splitting
/// `min` and `|x|' = 1`: twice the true gradient.) Each branch is evaluated where it cannot
/// overflow: `−log(1 + e^−x)` for `x ≥ 0`, `x − log(1 + e^x)` below.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    let non_negative = x.ge(&zero)?;
    let (xp, xn) = (non_negative.where_cond(x, &zero)?, non_negative.where_cond(&zero, x)?);
    let upper = (xp.neg()?.exp()? + 1.0)?.log()?.neg()?;
    let lower = (&xn - (xn.exp()? + 1.0)?.log()?)?;
    non_negative.where_cond(&upper, &lower)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    log_sigmoid(x)?.exp()
}

/// `−(1−ε)·logσ(z) − ε·logσ(−z)`: the label-smoothed logistic loss.
fn smoothed(z: &Tensor, eps: f64) -> Result<Tensor> {
    let loss = (log_sigmoid(z)? * -(1.0 - eps))?;
    if eps > 0.0 { loss - (log_sigmoid(&z.neg()?)? * eps)? } else { Ok(loss) }
}

/// The per-pair log-ratios through the f-divergence: `(sc, sr)` (TRL `f_divergence_type`).
fn scores(l: &PairLogps, p: &LossParams) -> Result<(Tensor, Tensor)> {
    let (hc, hr) = (l.chosen_logratio()?, l.rejected_logratio()?);
    let f = |h: Tensor| -> Result<Tensor> {
        match p.f_divergence {
            FDivergence::ReverseKl => Ok(h),
            // f'(t) = 1 − 1/t
            FDivergence::ForwardKl => h.neg()?.exp()?.affine(-1.0, 1.0),
            // f'(t) = log 2 + logσ(log t)
            FDivergence::JsDivergence => log_sigmoid(&h)? + std::f64::consts::LN_2,
            // f'(t) = (t^(α−1) − 1)/(α−1); TRL clamps (α−1)·h at 80 before exp
            FDivergence::AlphaDivergence if (p.f_alpha - 1.0).abs() < 1e-6 => Ok(h),
            FDivergence::AlphaDivergence => {
                let a = p.f_alpha - 1.0;
                ((h * a)?.minimum(80.0)?.exp()? - 1.0)? / a
            }
        }
    };
    Ok((f(hc)?, f(hr)?))
}

/// `x / max(len, 1)` per pair.
fn per_token(x: &Tensor, lens: &[usize]) -> Result<Tensor> {
    let lens: Vec<f32> = lens.iter().map(|&n| n.max(1) as f32).collect();
    x.div(&Tensor::from_vec(lens, x.shape(), x.device())?)
}

/// `−Σ pc / Σ len_c`: the chosen responses' token-mean NLL over the batch.
pub fn chosen_nll(l: &PairLogps) -> Result<Tensor> {
    let tokens: usize = l.chosen_tokens.iter().sum();
    l.policy_chosen.sum_all()?.affine(-1.0 / tokens.max(1) as f64, 0.0)
}

/// Sorts a `[pairs]` vector ascending, differentiably (the gradient follows the permutation).
fn sorted(x: &Tensor) -> Result<Tensor> {
    let order = x.arg_sort_last_dim(true)?;
    x.index_select(&order, 0)
}

/// The value of loss `kind` on the batch `l`.
pub fn term(kind: LossKind, l: &PairLogps, p: &LossParams) -> Result<Term> {
    let b = p.beta;
    Ok(match kind {
        // DPO (Rafailov et al. 2023) `−logσ(βΔ)`; with ε, cDPO as TRL ≤ 0.28 defined it.
        LossKind::Sigmoid => {
            let (sc, sr) = scores(l, p)?;
            Term::PerPair(smoothed(&((sc - sr)? * b)?, p.label_smoothing)?)
        }
        // SLiC (Zhao et al. 2023): `relu(1 − βΔ)`.
        LossKind::Hinge => {
            let (sc, sr) = scores(l, p)?;
            Term::PerPair(((sc - sr)? * b)?.affine(-1.0, 1.0)?.relu()?)
        }
        // IPO (Azar et al. 2023), TRL's length-normalised form: `(sc/len_c − sr/len_r − 1/(2β))²`.
        LossKind::Ipo => {
            let (sc, sr) = scores(l, p)?;
            let d = (per_token(&sc, &l.chosen_tokens)? - per_token(&sr, &l.rejected_tokens)?)?;
            Term::PerPair((d - 1.0 / (2.0 * b))?.sqr()?)
        }
        // EXO (Ji et al. 2024, Eq. 16): `σ(z)(logσ(z) − log(1−ε)) + σ(−z)(logσ(−z) − log ε)`, z = βΔ.
        LossKind::ExoPair => {
            let (sc, sr) = scores(l, p)?;
            let z = ((sc - sr)? * b)?;
            let eps = p.label_smoothing;
            let win = (sigmoid(&z)? * (log_sigmoid(&z)? - (-eps).ln_1p())?)?;
            let lose = (sigmoid(&z.neg()?)? * (log_sigmoid(&z.neg()?)? - eps.ln())?)?;
            Term::PerPair((win + lose)?)
        }
        // NCA (Chen et al. 2024): `−logσ(βhc) − ½logσ(−βhc) − ½logσ(−βhr)`.
        LossKind::NcaPair => {
            let (c, r) = ((l.chosen_logratio()? * b)?, (l.rejected_logratio()? * b)?);
            let loss =
                ((log_sigmoid(&c)?.neg()? - (log_sigmoid(&c.neg()?)? * 0.5)?)? - (log_sigmoid(&r.neg()?)? * 0.5)?)?;
            Term::PerPair(loss)
        }
        // Robust DPO (Chowdhury et al. 2024): `(−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε)`.
        LossKind::Robust => {
            let (sc, sr) = scores(l, p)?;
            let z = ((sc - sr)? * b)?;
            let eps = p.label_smoothing;
            let loss = ((log_sigmoid(&z)? * -(1.0 - eps))? + (log_sigmoid(&z.neg()?)? * eps)?)?;
            Term::PerPair((loss / (1.0 - 2.0 * eps))?)
        }
        // BCO, paired (Jung et al. 2024): `−logσ(βhc) − logσ(−βhr)`.
        LossKind::BcoPair => {
            let (c, r) = ((l.chosen_logratio()? * b)?, (l.rejected_logratio()? * b)?);
            Term::PerPair((log_sigmoid(&c)?.neg()? - log_sigmoid(&r.neg()?)?)?)
        }
        // SPPO, hard labels (Wu et al. 2024): `(hc − ½β⁻¹)² + (hr + ½β⁻¹)²`.
        LossKind::SppoHard => {
            let (hc, hr) = (l.chosen_logratio()?, l.rejected_logratio()?);
            Term::PerPair(((hc - 0.5 / b)?.sqr()? + (hr + 0.5 / b)?.sqr()?)?)
        }
        // AOT (Melnyk et al. 2024): `sort(pc − pr) − sort(rc − rr)`, each sorted over the batch.
        LossKind::Aot => {
            let policy = (&l.policy_chosen - &l.policy_rejected)?;
            let reference = (&l.ref_chosen - &l.ref_rejected)?;
            let d = (sorted(&policy)? - sorted(&reference)?)?;
            Term::Batch(smoothed(&(d * b)?, p.label_smoothing)?.mean_all()?)
        }
        // AOT, unpaired: `sort(hc) − sort(hr)`.
        LossKind::AotUnpaired => {
            let d = (sorted(&l.chosen_logratio()?)? - sorted(&l.rejected_logratio()?)?)?;
            Term::Batch(smoothed(&(d * b)?, p.label_smoothing)?.mean_all()?)
        }
        // APO-zero (D'Oosterlinck et al. 2024, Eq. 7): `1 − σ(βhc) + σ(βhr)`.
        LossKind::ApoZero => {
            let (c, r) = ((l.chosen_logratio()? * b)?, (l.rejected_logratio()? * b)?);
            Term::PerPair((sigmoid(&c)?.affine(-1.0, 1.0)? + sigmoid(&r)?)?)
        }
        // APO-down (Eq. 8): `σ(βhc) + 1 − σ(β(hc − hr))`.
        LossKind::ApoDown => {
            let (hc, hr) = (l.chosen_logratio()?, l.rejected_logratio()?);
            let margin = sigmoid(&((&hc - hr)? * b)?)?;
            Term::PerPair((sigmoid(&(hc * b)?)? + margin.affine(-1.0, 1.0)?)?)
        }
        // DiscoPOP (Chris Lu et al. 2024, Eq. 5): `−logσ(z)(1 − m) + e^−z·m`, z = βΔ, m = σ(z/τ).
        LossKind::Discopop => {
            let (sc, sr) = scores(l, p)?;
            let z = ((sc - sr)? * b)?;
            let m = sigmoid(&(&z / p.discopop_tau)?)?;
            let logistic = (log_sigmoid(&z)?.neg()? * m.affine(-1.0, 1.0)?)?;
            Term::PerPair((logistic + (z.neg()?.exp()? * m)?)?)
        }
        // TRL's `sft`: the chosen responses' token-mean NLL over the batch.
        LossKind::Sft => Term::Batch(chosen_nll(l)?),
        // TRL's `sigmoid_norm`: `−logσ(β(sc/len_c − sr/len_r))`.
        LossKind::SigmoidNorm => {
            let (sc, sr) = scores(l, p)?;
            let d = (per_token(&sc, &l.chosen_tokens)? - per_token(&sr, &l.rejected_tokens)?)?;
            Term::PerPair(log_sigmoid(&(d * b)?)?.neg()?)
        }
        // SimPO (Meng et al. 2024), as TRL's CPOTrainer: average log-probs, margin γ:
        // `−(1−ε)logσ(β(pc/len_c − pr/len_r) − γ) − ε·logσ(−…)`; with `--cpo-alpha` α > 0, TRL's
        // CPO-SimPO adds `α·NLL(chosen)`.
        LossKind::Simpo => {
            let d =
                (per_token(&l.policy_chosen, &l.chosen_tokens)? - per_token(&l.policy_rejected, &l.rejected_tokens)?)?;
            let simpo = smoothed(&((d - p.simpo_gamma / b)? * b)?, p.label_smoothing)?;
            match p.cpo_alpha.unwrap_or(0.0) {
                0.0 => Term::PerPair(simpo),
                alpha => Term::Batch((simpo.mean_all()? + (chosen_nll(l)? * alpha)?)?),
            }
        }
        // CPO (Xu et al. 2024), TRL's CPOTrainer sigmoid: `mean(−logσ(β(pc − pr))) + α·NLL(chosen)`.
        LossKind::Cpo => {
            let preference = smoothed(&((&l.policy_chosen - &l.policy_rejected)? * b)?, p.label_smoothing)?;
            match p.cpo_alpha.unwrap_or(1.0) {
                0.0 => Term::PerPair(preference),
                alpha => Term::Batch((preference.mean_all()? + (chosen_nll(l)? * alpha)?)?),
            }
        }
        // KTO (Ethayarajh et al. 2024), TRL's KTOTrainer: `z = clamp(mean(KL log-ratios), 0)`
        // (detached) from the batch's mismatched completions; desirable `1 − σ(β(h − z))`,
        // undesirable `1 − σ(β(z − h))`, weighted, averaged over the batch's examples.
        LossKind::Kto => {
            let labels =
                l.labels.as_ref().ok_or_else(|| candle_core::Error::Msg("kto needs labelled examples".into()))?;
            let kl = l.rejected_logratio()?.mean_all()?.maximum(0.0)?.detach();
            let h = l.chosen_logratio()?;
            let d = (h.broadcast_sub(&kl)? * b)?;
            let (desirable, undesirable) = (sigmoid(&d)?.affine(-1.0, 1.0)?, sigmoid(&d)?);
            let pick = |yes: f64, no: f64| -> Result<Tensor> {
                let v: Vec<f32> = labels.iter().map(|&y| if y { yes as f32 } else { no as f32 }).collect();
                Tensor::from_vec(v, labels.len(), h.device())
            };
            let loss =
                ((desirable * pick(p.desirable_weight, 0.0)?)? + (undesirable * pick(0.0, p.undesirable_weight)?)?)?;
            Term::Batch(loss.mean_all()?)
        }
        // ORPO (Hong et al. 2024), TRL's ORPOTrainer: `NLL(chosen, prompt included) − λ·mean logσ(log odds)`.
        LossKind::Orpo => {
            let (nll, log_odds) = orpo_parts(l)?;
            Term::Batch((nll - (log_sigmoid(&log_odds)?.mean_all()? * b)?)?)
        }
    })
}

/// A reward model's Bradley–Terry loss `mean −logσ(r_c − r_r)`, the rewards in the log-prob
/// slots (Ouyang et al. 2022; TRL's RewardTrainer).
pub fn bradley_terry(l: &PairLogps) -> Result<Tensor> {
    log_sigmoid(&(&l.policy_chosen - &l.policy_rejected)?)?.neg()?.mean_all()
}

/// ORPO's token-mean NLL over the whole chosen sequences (every token after BOS) and the
/// per-pair log odds ratio `(ac − ar) − (log(1 − e^ac) − log(1 − e^ar))`, `a = p/len`.
pub fn orpo_parts(l: &PairLogps) -> Result<(Tensor, Tensor)> {
    let (prompt, prompt_tokens) = l
        .chosen_prompt
        .as_ref()
        .ok_or_else(|| candle_core::Error::Msg("orpo needs the chosen prompts' log-probs".into()))?;
    let tokens: usize = prompt_tokens.iter().sum::<usize>() + l.chosen_tokens.iter().sum::<usize>();
    let nll = (prompt + &l.policy_chosen)?.sum_all()?.affine(-1.0 / tokens.max(1) as f64, 0.0)?;
    let (ac, ar) = (per_token(&l.policy_chosen, &l.chosen_tokens)?, per_token(&l.policy_rejected, &l.rejected_tokens)?);
    let log1m_exp = |a: &Tensor| a.exp()?.affine(-1.0, 1.0)?.log();
    let log_odds = ((&ac - &ar)? - (log1m_exp(&ac)? - log1m_exp(&ar)?)?)?;
    Ok((nll, log_odds))
}

#[cfg(test)]
mod tests {
    use super::log_sigmoid;
    use candle_core::{Device, Var};

    #[test]
    fn log_sigmoid_values_and_gradients_are_exact_at_zero_and_far_out() {
        let xs = [0.0f32, 1e-3, -1e-3, 3.0, -3.0, 40.0, -40.0, 200.0, -200.0];
        let x = Var::new(&xs[..], &Device::Cpu).unwrap();
        let y = log_sigmoid(x.as_tensor()).unwrap();
        let grad = y.sum_all().unwrap().backward().unwrap().get(&x).unwrap().to_vec1::<f32>().unwrap();
        for (i, (v, &xi)) in y.to_vec1::<f32>().unwrap().iter().zip(&xs).enumerate() {
            let x64 = xi as f64;
            let want = if x64 >= 0.0 { -(-x64).exp().ln_1p() } else { x64 - x64.exp().ln_1p() };
            assert!((*v as f64 - want).abs() <= 1e-6 * want.abs().max(1.0), "value at {xi}: {v} vs {want}");
            let dwant = 1.0 / (1.0 + x64.exp()); // σ(−x)
            assert!((grad[i] as f64 - dwant).abs() < 1e-6, "gradient at {xi}: {} vs {dwant}", grad[i]);
        }
    }
}
