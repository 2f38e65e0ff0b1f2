//! Fused CPU kernels with their own backward, for the ops whose candle compositions keep many
//! full-size intermediates alive for backward. Each keeps only its inputs (and output):
//!
//! - [`block_attention`]: `softmax(q·kᵀ·scale + mask)·v` computed only on the blocks of the
//!   attention matrix that are not fully masked (a shared prompt's chosen × rejected block, and
//!   padding, are skipped); backward recomputes the probabilities from q and k instead of
//!   storing the `[b, heads, t, t]` scores, their mask sum, exp and softmax.
//! - [`lm_head_logps`]: `log_softmax(h·Wᵀ)[target]` per row; backward derives the log-sum-exp
//!   from the output and turns the logits into dH chunk by chunk, so neither the `[rows, vocab]`
//!   softmax nor its gradient is ever stored whole.
//! - [`rms_norm`], [`rope`]: one stored input instead of five or six intermediates.
//!
//! They compute the same functions as the compositions in [`super::ops`] (tested against them,
//! values and gradients). CPU only: on other devices the model uses the compositions.
//!
//! ```
//! # use candle_core::{Device, Tensor};
//! let w = Tensor::new(&[[0.0f32], [1.0], [2.0]], &Device::Cpu).unwrap(); // lm_head [vocab 3, hidden 1]
//! let h = Tensor::new(&[[1.0f32]], &Device::Cpu).unwrap();
//! let lp = dpo::model::fused::lm_head_logps(&h, &w, &[2]).unwrap();
//! let want = 2.0 - (1f32 + 1f32.exp() + 2f32.exp()).ln();
//! assert!((lp.to_vec1::<f32>().unwrap()[0] - want).abs() < 1e-6);
//! ```
use candle_core::op::BackpropOp;
use candle_core::{Context, CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Result, Shape, Storage, Tensor, bail};
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

/// The storage of a result tensor, for returning from `cpu_fwd`: its own buffer when it has
/// one, else a fresh copy of just its elements (a view into a larger buffer).
fn into_storage(t: Tensor) -> Result<(CpuStorage, Shape)> {
    let shape = t.shape().clone();
    let owns_buffer = {
        let (s, l) = t.storage_and_layout();
        matches!((&*s, l.contiguous_offsets()), (Storage::Cpu(c), Some((0, end))) if end == s_len(c))
    };
    let t = if owns_buffer { t } else { t.force_contiguous()? };
    let (s, _) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok((c.clone(), shape)),
        _ => bail!("fused op: expected a CPU result"),
    }
}

// ---------------------------------------------------------------- block-sparse attention

/// One [`AttentionBlock`](super::layout::AttentionBlock) as tensors: key indices `[nk]` u32 and
/// the additive mask `[q_len, nk]`.
#[derive(Debug, Clone)]
pub struct BlockTensors {
    pub q_start: usize,
    pub q_len: usize,
    pub keys: Tensor,
    pub mask: Tensor,
}

/// Per row, the blocks of a [`TokenLayout`](super::layout::TokenLayout) as tensors.
pub fn block_tensors(layout: &super::layout::TokenLayout, window: Option<usize>, device: &candle_core::Device) -> Result<Vec<Vec<BlockTensors>>> {
    layout
        .attention_blocks(window)
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|b| {
                    let nk = b.keys.len();
                    Ok(BlockTensors {
                        q_start: b.q_start,
                        q_len: b.q_len,
                        keys: Tensor::from_vec(b.keys, nk, device)?,
                        mask: Tensor::from_vec(b.mask, (b.q_len, nk), device)?,
                    })
                })
                .collect()
        })
        .collect()
}

/// Attention computed only on the blocks that are not fully masked (see
/// [`TokenLayout::attention_blocks`](super::layout::TokenLayout::attention_blocks)); same result as
/// dense attention with the layout's mask at every non-pad query (pad queries give 0).
pub fn block_attention(q: &Tensor, k: &Tensor, v: &Tensor, blocks: std::sync::Arc<Vec<Vec<BlockTensors>>>, scale: f64) -> Result<Tensor> {
    let op = BlockAttention { blocks, scale };
    q.contiguous()?.apply_op3_arc(&k.contiguous()?, &v.contiguous()?, std::sync::Arc::new(Box::new(op)))
}

struct BlockAttention {
    blocks: std::sync::Arc<Vec<Vec<BlockTensors>>>,
    scale: f64,
}

/// Per block of one row: (queries `[h, q_len, d]`, keys, values `[h, nk, d]`, probabilities).
fn block_probs(q: &Tensor, k: &Tensor, v: &Tensor, b: &BlockTensors, scale: f64) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let qb = q.narrow(1, b.q_start, b.q_len)?;
    let kb = k.index_select(&b.keys, 1)?;
    let vb = v.index_select(&b.keys, 1)?;
    let scores = (qb.matmul(&kb.t()?)? * scale)?.broadcast_add(&b.mask)?;
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok((qb, kb, vb, p))
}

/// Stitches per-block query outputs `[h, q_len, d]` (in order) into `[h, t, d]`, zeros after.
fn stitch(pieces: Vec<Tensor>, t: usize, like: &Tensor) -> Result<Tensor> {
    let covered: usize = pieces.iter().map(|p| p.dim(1)).sum::<Result<usize>>()?;
    let mut pieces = pieces;
    if covered < t {
        let (h, _, d) = like.dims3()?;
        pieces.push(Tensor::zeros((h, t - covered, d), like.dtype(), like.device())?);
    }
    Tensor::cat(&pieces, 1)
}

impl CustomOp3 for BlockAttention {
    fn name(&self) -> &'static str {
        "block-attention"
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
        let t = q.dim(2)?;
        let mut rows = Vec::with_capacity(self.blocks.len());
        for (r, blocks) in self.blocks.iter().enumerate() {
            let (qr, kr, vr) = (q.get(r)?, k.get(r)?, v.get(r)?);
            let mut pieces = Vec::with_capacity(blocks.len());
            for b in blocks {
                let (_, _, vb, p) = block_probs(&qr, &kr, &vr, b, self.scale)?;
                pieces.push(p.matmul(&vb)?);
            }
            rows.push(stitch(pieces, t, &qr)?);
        }
        into_storage(Tensor::stack(&rows, 0)?)
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _o: &Tensor, d_o: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, d_o) = (q.detach(), k.detach(), v.detach(), d_o.detach());
        let t = q.dim(2)?;
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for (r, blocks) in self.blocks.iter().enumerate() {
            let (qr, kr, vr, dor) = (q.get(r)?, k.get(r)?, v.get(r)?, d_o.get(r)?);
            let mut dq_pieces = Vec::with_capacity(blocks.len());
            let (mut dk, mut dv) = (kr.zeros_like()?, vr.zeros_like()?);
            for b in blocks {
                let (qb, kb, vb, p) = block_probs(&qr, &kr, &vr, b, self.scale)?;
                let dob = dor.narrow(1, b.q_start, b.q_len)?;
                let dvb = p.t()?.matmul(&dob)?;
                let dp = dob.matmul(&vb.t()?)?;
                let ds = (&p * dp.broadcast_sub(&(&dp * &p)?.sum_keepdim(D::Minus1)?)?)?;
                dq_pieces.push((ds.matmul(&kb)? * self.scale)?);
                let dkb = (ds.t()?.matmul(&qb)? * self.scale)?;
                dk = dk.index_add(&b.keys, &dkb, 1)?;
                dv = dv.index_add(&b.keys, &dvb, 1)?;
            }
            dqs.push(stitch(dq_pieces, t, &qr)?);
            dks.push(dk);
            dvs.push(dv);
        }
        Ok((Some(Tensor::stack(&dqs, 0)?), Some(Tensor::stack(&dks, 0)?), Some(Tensor::stack(&dvs, 0)?)))
    }
}

// ---------------------------------------------------------------- lm_head + log-softmax + gather

/// `log_softmax(h·Wᵀ)[target]` per row, for f32 hidden rows `[rows, hidden]` and the frozen
/// lm_head `W` `[vocab, hidden]`; returns `[rows]`. The `[rows, vocab]` logits are kept inside
/// the op for backward, which turns them into dH chunk by chunk, so the `[rows, vocab]` logit
/// gradient (and softmax) never exists whole.
pub fn lm_head_logps(hidden: &Tensor, w: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let rows = hidden.dim(0)?;
    let vocab = w.dim(0)?;
    if targets.len() != rows || targets.iter().any(|&t| t as usize >= vocab) {
        bail!("lm_head_logps: {} targets for {rows} rows of a {vocab}-token vocabulary", targets.len());
    }
    let op = LmHeadLogps { w: w.clone(), targets: targets.to_vec(), logits: std::sync::Mutex::new(None) };
    hidden.contiguous()?.apply_op1_arc(std::sync::Arc::new(Box::new(op)))
}

/// Rows of logit gradient materialised at once in backward (`CHUNK × vocab` floats).
const CHUNK: usize = 128;

struct LmHeadLogps {
    w: Tensor,
    targets: Vec<u32>,
    /// The forward's logits, for backward (dropped with the graph; a reference pass keeps none
    /// alive because nothing records it).
    logits: std::sync::Mutex<Option<Tensor>>,
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

impl CustomOp1 for LmHeadLogps {
    fn name(&self) -> &'static str {
        "lm-head-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let hidden = as_tensor(s, l)?;
        let logits = hidden.matmul(&self.w.t()?)?.contiguous()?;
        let (rows, vocab) = logits.dims2()?;
        let out: Vec<f32> = {
            let (st, ll) = logits.storage_and_layout();
            let x = match &*st {
                Storage::Cpu(c) => f32_slice(c, ll)?,
                _ => bail!("lm_head_logps: CPU only"),
            };
            (0..rows)
                .into_par_iter()
                .map(|i| {
                    let row = &x[i * vocab..(i + 1) * vocab];
                    row[self.targets[i] as usize] - log_sum_exp(row)
                })
                .collect()
        };
        *self.logits.lock().expect("logits lock") = Some(logits);
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(&self, hidden: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let logits = self.logits.lock().expect("logits lock").clone().context("lm_head_logps: backward without a forward")?;
        let (rows, vocab) = logits.dims2()?;
        let (res, grad) = (res.to_vec1::<f32>()?, grad.to_vec1::<f32>()?);
        let (st, ll) = logits.storage_and_layout();
        let x = match &*st {
            Storage::Cpu(c) => f32_slice(c, ll)?,
            _ => bail!("lm_head_logps: CPU only"),
        };
        let mut dh = Vec::with_capacity(rows.div_ceil(CHUNK));
        for start in (0..rows).step_by(CHUNK) {
            let n = CHUNK.min(rows - start);
            // d logp[t] / d logit[j] = δ(j, t) − softmax(logits)[j]; the log-sum-exp is
            // recovered from the output: lse = logit[t] − logp[t].
            let mut d = vec![0f32; n * vocab];
            d.par_chunks_mut(vocab).enumerate().for_each(|(k, out)| {
                let i = start + k;
                let row = &x[i * vocab..(i + 1) * vocab];
                let t = self.targets[i] as usize;
                let lse = row[t] - res[i];
                for (o, &z) in out.iter_mut().zip(row) {
                    *o = -grad[i] * (z - lse).exp();
                }
                out[t] += grad[i];
            });
            let d = Tensor::from_vec(d, (n, vocab), hidden.device())?;
            dh.push(d.matmul(&self.w)?);
        }
        drop(st);
        Ok(Some(Tensor::cat(&dh, 0)?))
    }
}

// ---------------------------------------------------------------- SiLU(gate) · up

/// `silu(gate) · up`, the SwiGLU product, in one pass each way (f32, same shapes).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!("silu_mul: gate {:?} and up {:?} differ", gate.shape(), up.shape());
    }
    gate.contiguous()?.apply_op2_arc(&up.contiguous()?, std::sync::Arc::new(Box::new(SiluMul)))
}

struct SiluMul;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Applies `f` elementwise over three equal-length slices in parallel chunks, into a new vector.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(4096).enumerate().for_each(|(c, o)| {
        let base = c * 4096;
        for (k, v) in o.iter_mut().enumerate() {
            *v = f(a[base + k], b[base + k]);
        }
    });
    out
}

fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        Ok((CpuStorage::F32(zip_map(g, u, |g, u| g * sigmoid(g) * u)), l1.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, d) = (cpu_f32(gate)?, cpu_f32(up)?, cpu_f32(&dy.contiguous()?)?);
        // d/dg [g·σ(g)] = σ(g)·(1 + g·(1 − σ(g)))
        let dg_du: Vec<f32> = zip_map(&g, &d, |g, d| d * sigmoid(g) * (1.0 + g * (1.0 - sigmoid(g))));
        let dg: Vec<f32> = dg_du.iter().zip(&u).map(|(a, u)| a * u).collect();
        let du = zip_map(&g, &d, |g, d| d * g * sigmoid(g));
        let shape = gate.shape();
        Ok((Some(Tensor::from_vec(dg, shape, gate.device())?), Some(Tensor::from_vec(du, shape, gate.device())?)))
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
