//! Fused CPU kernels with their own backward, for the ops whose candle compositions keep many
//! full-size intermediates alive for backward. Each keeps only its inputs (and output):
//!
//! - [`attention`]: `softmax(q·kᵀ·scale + mask)·v`; backward recomputes the probabilities from
//!   q and k instead of storing the `[b, heads, t, t]` scores, their mask sum, exp and softmax.
//! - [`log_softmax_gather`]: `log_softmax(logits)[target]` per row; backward derives the
//!   log-sum-exp from the output, so the `[rows, vocab]` softmax is never stored.
//! - [`rms_norm`], [`rope`]: one stored input instead of five or six intermediates.
//!
//! They compute the same functions as the compositions in [`super::ops`] (tested against them,
//! values and gradients). CPU only: on other devices the model uses the compositions.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! let logits = Tensor::new(&[[0.0f32, 1.0, 2.0]], &Device::Cpu).unwrap();
//! let lp = dpo::model::fused::log_softmax_gather(&logits, &[2]).unwrap();
//! let want = 2.0 - (1f32 + 1f32.exp() + 2f32.exp()).ln();
//! assert!((lp.to_vec1::<f32>().unwrap()[0] - want).abs() < 1e-6);
//! ```
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

/// A graph-less tensor over a copy of a contiguous CPU storage.
fn as_tensor(s: &CpuStorage, l: &Layout) -> Result<Tensor> {
    match l.contiguous_offsets() {
        Some((0, end)) if end == s_len(s) => {}
        _ => bail!("fused op: input must be contiguous and start at offset 0"),
    }
    Ok(Tensor::from_storage(Storage::Cpu(s.clone()), l.shape().clone(), BackpropOp::none(), false))
}

fn s_len(s: &CpuStorage) -> usize {
    match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::U32(v) => v.len(),
        CpuStorage::U8(v) => v.len(),
        CpuStorage::I64(v) => v.len(),
        _ => usize::MAX,
    }
}

/// The storage of a result tensor, for returning from `cpu_fwd`.
fn into_storage(t: Tensor) -> Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let shape = t.shape().clone();
    let (s, l) = t.storage_and_layout();
    match (&*s, l.contiguous_offsets()) {
        (Storage::Cpu(c), Some((0, end))) if end == s_len(c) => Ok((c.clone(), shape)),
        (Storage::Cpu(_), _) => {
            drop(s);
            // A view into a larger buffer: copy out just this tensor.
            let copy = Tensor::zeros(t.shape(), t.dtype(), t.device())?.add(&t)?;
            let (s, _) = copy.storage_and_layout();
            match &*s {
                Storage::Cpu(c) => Ok((c.clone(), shape)),
                _ => unreachable!(),
            }
        }
        _ => bail!("fused op: expected a CPU result"),
    }
}

// ---------------------------------------------------------------- attention

/// `softmax(q·kᵀ·scale + mask)·v` for `q, k, v`: `[b, heads, t, d]` (k/v already repeated for
/// GQA) and an additive `mask` broadcastable to `[b, heads, t, t]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let op = Attention { mask: mask.clone(), scale };
    q.contiguous()?.apply_op3_arc(&k.contiguous()?, &v.contiguous()?, std::sync::Arc::new(Box::new(op)))
}

struct Attention {
    mask: Tensor,
    scale: f64,
}

impl Attention {
    fn probs(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&self.mask)?;
        // The fused softmax is fine here: nothing is recorded inside the op.
        candle_nn::ops::softmax_last_dim(&scores)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (as_tensor(s1, l1)?, as_tensor(s2, l2)?, as_tensor(s3, l3)?);
        into_storage(self.probs(&q, &k)?.matmul(&v)?)
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _o: &Tensor, d_o: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, d_o) = (q.detach(), k.detach(), v.detach(), d_o.detach());
        let p = self.probs(&q, &k)?;
        let d_v = p.t()?.matmul(&d_o)?;
        let d_p = d_o.matmul(&v.t()?)?;
        let d_s = (&p * d_p.broadcast_sub(&(&d_p * &p)?.sum_keepdim(D::Minus1)?)?)?;
        let d_q = (d_s.matmul(&k)? * self.scale)?;
        let d_k = (d_s.t()?.matmul(&q)? * self.scale)?;
        Ok((Some(d_q), Some(d_k), Some(d_v)))
    }
}

// ---------------------------------------------------------------- log-softmax + gather

/// `log_softmax(logits[i])[targets[i]]` for f32 `logits` `[rows, vocab]`; returns `[rows]`.
pub fn log_softmax_gather(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows || targets.iter().any(|&t| t as usize >= vocab) {
        bail!("log_softmax_gather: {} targets for {rows} rows of {vocab}", targets.len());
    }
    logits.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(LogSoftmaxGather { targets: targets.to_vec() })))
}

struct LogSoftmaxGather {
    targets: Vec<u32>,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("fused op: input must be contiguous"),
        _ => bail!("fused op: f32 input expected"),
    }
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|x| (x - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp1 for LogSoftmaxGather {
    fn name(&self) -> &'static str {
        "log-softmax-gather"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let x = f32_slice(s, l)?;
        let out: Vec<f32> = (0..rows)
            .into_par_iter()
            .map(|i| {
                let row = &x[i * vocab..(i + 1) * vocab];
                row[self.targets[i] as usize] - log_sum_exp(row)
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(&self, logits: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, vocab) = logits.dims2()?;
        let logits = logits.contiguous()?;
        let (res, grad) = (res.to_vec1::<f32>()?, grad.to_vec1::<f32>()?);
        let (s, l) = logits.storage_and_layout();
        let x = match &*s {
            Storage::Cpu(c) => f32_slice(c, l)?,
            _ => bail!("log_softmax_gather: CPU only"),
        };
        let mut d = vec![0f32; rows * vocab];
        d.par_chunks_mut(vocab).enumerate().for_each(|(i, out)| {
            let row = &x[i * vocab..(i + 1) * vocab];
            let t = self.targets[i] as usize;
            // log-sum-exp recovered from the output: lse = logit[target] − logp[target].
            let lse = row[t] - res[i];
            for (o, &z) in out.iter_mut().zip(row) {
                *o = -grad[i] * (z - lse).exp();
            }
            out[t] += grad[i];
        });
        drop(s);
        Ok(Some(Tensor::from_vec(d, (rows, vocab), logits.device())?))
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

impl RmsNorm {
    fn inv_rms(&self, x: &Tensor) -> Result<Tensor> {
        (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (as_tensor(s1, l1)?, as_tensor(s2, l2)?);
        into_storage(x.broadcast_mul(&self.inv_rms(&x)?)?.broadcast_mul(&w)?)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, w, dy) = (x.detach(), w.detach(), dy.detach());
        let r = self.inv_rms(&x)?;
        let x_hat = x.broadcast_mul(&r)?;
        let d_hat = dy.broadcast_mul(&w)?;
        let proj = (&d_hat * &x_hat)?.mean_keepdim(D::Minus1)?;
        let dx = (d_hat - x_hat.broadcast_mul(&proj)?)?.broadcast_mul(&r)?;
        // The norm weight is frozen: no gradient for it.
        Ok((Some(dx), None))
    }
}

// ---------------------------------------------------------------- RoPE

/// HF `rotate_half` RoPE: `x·cos + rotate_half(x)·sin` for `x` `[b, heads, t, d]` and `cos`/`sin`
/// broadcastable to it (`[t, d]` or `[b, 1, t, d]`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(Rope { cos: cos.clone(), sin: sin.clone() })))
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// `rotate_half(x) = cat(−x₂, x₁)` and its transpose `cat(x₂, −x₁)` (`sign` = −1 / +1).
fn rotate(x: &Tensor, sign: f64) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
    Tensor::cat(&[&(x2 * sign)?, &(x1 * -sign)?], D::Minus1)
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = as_tensor(s, l)?;
        into_storage((x.broadcast_mul(&self.cos)? + rotate(&x, -1.0)?.broadcast_mul(&self.sin)?)?)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dy = dy.detach();
        Ok(Some((dy.broadcast_mul(&self.cos)? + rotate(&dy.broadcast_mul(&self.sin)?, 1.0)?)?))
    }
}
