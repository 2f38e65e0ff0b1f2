//! Fused CPU ops with their own backward for the head of the model (the decoder layers are
//! [`super::cpu_layer`]):
//!
//! - [`lm_head_logps`]: `log_softmax(h·Wᵀ)[target]` per row; backward turns the saved logits
//!   into the logit gradient in place and runs one GEMM, so no `[rows, vocab]` softmax or
//!   gradient tensor is ever allocated besides the logits themselves.
//! - [`rms_norm`]: the final norm, one stored input instead of five or six intermediates.
//!
//! They compute the same functions as the generic path's head ([`super::chunked_head`]) and
//! final norm (tested against them, values and gradients). CPU only.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! let w = Tensor::new(&[[0.0f32], [1.0], [2.0]], &Device::Cpu).unwrap(); // lm_head [vocab 3, hidden 1]
//! let h = Tensor::new(&[[1.0f32]], &Device::Cpu).unwrap();
//! let lp = dpo::model::cpu_head::lm_head_logps(&h, &w, &[2], None, None).unwrap();
//! let want = 2.0 - (1f32 + 1f32.exp() + 2f32.exp()).ln();
//! assert!((lp.to_vec1::<f32>().unwrap()[0] - want).abs() < 1e-6);
//! ```
use super::kernels::{self, Gemm, cpu_storage_f32};
use super::token_stats::{StatsSink, TokenStats};
use candle_core::{Context, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

// ---------------------------------------------------------------- lm_head + log-softmax + gather

/// `log_softmax(softcap(h·Wᵀ))[target]` per row, for f32 hidden rows `[rows, hidden]` and the
/// frozen lm_head `W` `[vocab, hidden]`; `softcap` is `cap·tanh(z/cap)` (Gemma 2) or none.
/// Returns `[rows]`. The `[rows, vocab]` (capped) logits are kept inside the op for backward
/// (and dropped with it when nothing records a graph).
pub fn lm_head_logps(
    hidden: &Tensor,
    w: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
    stats: Option<&StatsSink>,
) -> Result<Tensor> {
    let rows = hidden.dim(0)?;
    let vocab = w.dim(0)?;
    if targets.len() != rows || targets.iter().any(|&t| t as usize >= vocab) {
        bail!("lm_head_logps: {} targets for {rows} rows of a {vocab}-token vocabulary", targets.len());
    }
    let op = LmHeadLogps {
        w: w.contiguous()?,
        targets: targets.to_vec(),
        softcap: softcap.map(|c| c as f32),
        stats: stats.cloned(),
        logits: std::sync::Mutex::new(None),
    };
    hidden.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(op)))
}

struct LmHeadLogps {
    w: Tensor,
    targets: Vec<u32>,
    softcap: Option<f32>,
    /// Where the forward leaves the scored tokens' [`TokenStats`], when asked.
    stats: Option<StatsSink>,
    /// The forward's (capped) logits `[rows, vocab]`, for backward.
    logits: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LmHeadLogps {
    fn with_w<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        let (st, l) = self.w.storage_and_layout();
        match &*st {
            Storage::Cpu(c) => f(cpu_storage_f32(c, l)?),
            _ => bail!("lm_head_logps: CPU only"),
        }
    }
}

impl CustomOp1 for LmHeadLogps {
    fn name(&self) -> &'static str {
        "lm-head-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let hidden = cpu_storage_f32(s, l)?;
        let (vocab, h) = self.w.dims2()?;
        let rows = self.targets.len();
        let mut logits = vec![0f32; rows * vocab];
        self.with_w(|w| {
            Gemm::a_bt(rows, vocab, h).run(&mut logits, vocab, hidden, h, w, h, false, 1.0);
            Ok(())
        })?;
        if let Some(cap) = self.softcap {
            logits.par_chunks_mut(vocab).for_each(|row| kernels::softcap(row, cap));
        }
        let out: Vec<f32> = match &self.stats {
            None => logits
                .par_chunks(vocab)
                .zip(self.targets.par_iter())
                .map(|(row, &t)| row[t as usize] - kernels::log_sum_exp(row))
                .collect(),
            Some(sink) => {
                // One pass per row gives the log-sum-exp (same bits as above) and the statistics.
                let rows: Vec<(f32, TokenStats)> = logits
                    .par_chunks(vocab)
                    .zip(self.targets.par_iter())
                    .map(|(row, &t)| {
                        let mut s = TokenStats::default();
                        let lse = s.push_row(row, t as usize);
                        (row[t as usize] - lse, s)
                    })
                    .collect();
                let (mut all, mut out) = (TokenStats::default(), Vec::with_capacity(rows.len()));
                for (lp, s) in rows {
                    out.push(lp);
                    all.extend(s);
                }
                *sink.lock().expect("stats sink") = Some(all);
                out
            }
        };
        *self.logits.lock().expect("logits lock") = Some(logits);
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(&self, hidden: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut d = self
            .logits
            .lock()
            .expect("logits lock")
            .take()
            .context("lm_head_logps: backward without a forward (or twice)")?;
        let (vocab, h) = self.w.dims2()?;
        let rows = self.targets.len();
        let (res, grad) = (res.to_vec1::<f32>()?, grad.to_vec1::<f32>()?);
        // d logp[t] / d c[j] = δ(j, t) − softmax(c)[j] for the (capped) logits c; the log-sum-exp
        // is recovered from the output (lse = c[t] − logp[t]); a cap multiplies by its
        // derivative 1 − (c/cap)². The logits become their gradient in place.
        d.par_chunks_mut(vocab).enumerate().for_each(|(i, row)| {
            let t = self.targets[i] as usize;
            let lse = row[t] - res[i];
            match self.softcap {
                None => {
                    kernels::exp_shift_scale(row, lse, -grad[i]);
                    row[t] += grad[i];
                }
                Some(cap) => {
                    let ct = row[t] / cap;
                    kernels::softcapped_logit_grad(row, lse, grad[i], cap);
                    row[t] += grad[i] * (1.0 - ct * ct);
                }
            }
        });
        let mut dh = vec![0f32; rows * h];
        self.with_w(|w| {
            Gemm::a_b(rows, h, vocab).run(&mut dh, h, &d, vocab, w, h, false, 1.0);
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dh, (rows, h), hidden.device())?))
    }
}

// ---------------------------------------------------------------- RMSNorm

/// HF RMSNorm `x / √(mean(x²) + eps) · w` over the last dim, f32 `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2_arc(&weight.contiguous()?, std::sync::Arc::new(Box::new(RmsNorm { eps })))
}

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (cpu_storage_f32(s1, l1)?, cpu_storage_f32(s2, l2)?);
        let (y, _) = kernels::rms_norm(x, w, w.len(), self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xv, wv, dyv) =
            (x.flatten_all()?.to_vec1::<f32>()?, w.to_vec1::<f32>()?, dy.flatten_all()?.to_vec1::<f32>()?);
        let h = wv.len();
        let (_, inv) = kernels::rms_norm(&xv, &wv, h, self.eps);
        let mut dx = vec![0f32; xv.len()];
        kernels::rms_norm_backward(&mut dx, &dyv, &xv, &inv, &wv, h);
        // The norm weight is frozen: no gradient for it.
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), None))
    }
}
