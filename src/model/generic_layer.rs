//! The generic decoder layer: every feature of the [`Architecture`] as candle compositions, on
//! any device and dtype. It is the reference the CPU layer op is tested against, and what runs
//! on CUDA.
//!
//! A layer is `x + post(attention(pre(x)))` then `h + post(mlp(pre(h)))`, where each `pre` /
//! `post` norm exists or not as the family places them; attention projects q/k/v (fused or
//! not), norms q and k where the family does, rotates the leading `rotary_dim` dimensions,
//! scales (and soft-caps) the scores, and masks them by the layer's window.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let (layer, x, ctx): (dpo::model::layer::DecoderLayer, candle_core::Tensor, dpo::model::generic_layer::PassShared) = todo!();
//! let y = dpo::model::generic_layer::forward(&layer, &x, &ctx, &mut dpo::nn::LoraMode::On)?;
//! # Ok(()) }
//! ```
use super::arch::rope::RopeTables;
use super::arch::{Activation, Architecture, Proj, QkNorm, RmsNormStyle};
use super::kv_cache::LayerKv;
use super::layer::DecoderLayer;
use super::tiled_attention;
use crate::nn::LoraMode;
use crate::nn::kv_layout::KvLayout;
use crate::nn::layout::TokenLayout;
use crate::nn::ops::{repeat_kv, rope};
use anyhow::Result;
use candle_core::{D, DType, Device, Tensor};
use std::sync::Arc;

/// What one forward pass shares across layers: the description, masks per attention window,
/// cos/sin per RoPE. Shared (`Arc`) so a recomputed layer can re-run in backward.
pub struct PassShared {
    arch: Arc<Architecture>,
    /// Per attention window: the dense additive mask `[rows, 1, len, len]` (f32).
    masks: Vec<(Option<usize>, Tensor)>,
    /// Per RoPE setting: cos and sin `[rows, 1, len, rotary_dim]`.
    rope: Vec<(Tensor, Tensor)>,
}

impl PassShared {
    pub fn new(
        arch: &Arc<Architecture>,
        layout: &TokenLayout,
        tables: &[Arc<RopeTables>],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for spec in &arch.layers {
            if !masks.iter().any(|(w, _)| *w == spec.window) {
                masks.push((spec.window, layout.mask(spec.window, DType::F32, device)?));
            }
        }
        let rope = tables.iter().map(|t| cos_sin(t, layout.rows, layout.len, dtype, device)).collect::<Result<_>>()?;
        Ok(Self { arch: arch.clone(), masks, rope })
    }

    /// A decoding forward's: masks over the cached keys and this forward's, RoPE at the new
    /// tokens' positions.
    pub fn decoding(
        arch: &Arc<Architecture>,
        kv: &KvLayout,
        tables: &[Arc<RopeTables>],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        for spec in &arch.layers {
            if !masks.iter().any(|(w, _)| *w == spec.window) {
                masks.push((spec.window, kv.mask(spec.window, DType::F32, device)?));
            }
        }
        let rope = tables.iter().map(|t| cos_sin(t, kv.rows, kv.new, dtype, device)).collect::<Result<_>>()?;
        Ok(Self { arch: arch.clone(), masks, rope })
    }

    fn mask(&self, window: Option<usize>) -> &Tensor {
        &self.masks.iter().find(|(w, _)| *w == window).expect("a mask per window").1
    }
}

/// cos and sin `[rows, 1, len, rotary_dim]` of RoPE tables.
fn cos_sin(t: &RopeTables, rows: usize, len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let shape = (rows, 1, len, t.rotary_dim);
    let cos = Tensor::from_slice(&t.cos, shape, device)?.to_dtype(dtype)?;
    let sin = Tensor::from_slice(&t.sin, shape, device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// The layer on `x` `[rows, len, hidden]`, adapters as `mode` says.
pub fn forward(layer: &DecoderLayer, x: &Tensor, ctx: &PassShared, mode: &mut LoraMode) -> Result<Tensor> {
    around_attention(layer, x, ctx, mode, |xa, mode| attention(layer, xa, ctx, mode))
}

/// The layer on the new tokens `x` `[rows, new, hidden]` of a decoding forward (`ctx` from
/// [`PassShared::decoding`]): their keys and values join `cache`, and they attend to all of it.
/// No graph is kept for the keys of earlier forwards.
pub fn forward_cached(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &PassShared,
    cache: &mut LayerKv,
    mode: &mut LoraMode,
) -> Result<Tensor> {
    around_attention(layer, x, ctx, mode, |xa, mode| {
        let arch = &ctx.arch;
        let (b, t, _) = xa.dims3()?;
        let (q, k, v) = project_qkv(layer, xa, ctx, mode)?;
        let (k, v) = cache.append(k.detach(), v.detach())?;
        let n_rep = arch.num_heads / arch.num_kv_heads;
        let (k, v) = (repeat_kv(k, n_rep)?, repeat_kv(v, n_rep)?);
        let out = dense_attention(&q, &k, &v, ctx.mask(layer.spec.window), arch.attn_scale, arch.attn_softcap)?;
        let out = out.transpose(1, 2)?.reshape((b, t, arch.q_width()))?;
        Ok(layer.linear(Proj::O).forward(&out, mode)?)
    })
}

/// `x + post(attn(pre(x)))`, then `h + post(mlp(pre(h)))`, the norms where the family has them.
fn around_attention(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &PassShared,
    mode: &mut LoraMode,
    attn: impl FnOnce(&Tensor, &mut LoraMode) -> Result<Tensor>,
) -> Result<Tensor> {
    let [attn_pre, attn_post, mlp_pre, mlp_post] = &layer.norms;
    let style = &ctx.arch.norm;
    let a = attn(&maybe_norm(x, attn_pre, style)?, mode)?;
    let h = (x + maybe_norm(&a, attn_post, style)?)?;
    let m = mlp(layer, &maybe_norm(&h, mlp_pre, style)?, ctx, mode)?;
    Ok((h + maybe_norm(&m, mlp_post, style)?)?)
}

/// Attention of `q` over all of `k`, `v` (`[rows, heads, len, head_dim]`, the keys' len may
/// exceed the queries'), as [`tiled_attention`] computes it but in one piece, for inference:
/// scaled scores, soft-capped where the family caps, masked, softmaxed in f32, cast back, `·v`.
fn dense_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = crate::nn::ops::softcap(&scores, softcap)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?.broadcast_add(mask)?)?;
    Ok(probs.to_dtype(v.dtype())?.matmul(&v.contiguous()?)?)
}

fn maybe_norm(x: &Tensor, w: &Option<Tensor>, style: &RmsNormStyle) -> candle_core::Result<Tensor> {
    match w {
        Some(w) => rms_norm(x, w, style),
        None => Ok(x.clone()),
    }
}

/// RMSNorm over the last dim, normalised in f32. `w` already holds `1 + w` where the family
/// offsets; with `scale_in_f32` it is f32 and the product is cast, else `x̂` is cast first.
pub fn rms_norm(x: &Tensor, w: &Tensor, style: &RmsNormStyle) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + style.eps)?.sqrt()?.recip()?;
    let normed = x.broadcast_mul(&inv_rms)?;
    if style.scale_in_f32 {
        normed.broadcast_mul(&w.to_dtype(DType::F32)?)?.to_dtype(dtype)
    } else {
        normed.to_dtype(dtype)?.broadcast_mul(w)
    }
}

fn attention(layer: &DecoderLayer, x: &Tensor, ctx: &PassShared, mode: &mut LoraMode) -> Result<Tensor> {
    let arch = &ctx.arch;
    let (b, t, _) = x.dims3()?;
    let (q, k, v) = project_qkv(layer, x, ctx, mode)?;
    let n_rep = arch.num_heads / arch.num_kv_heads;
    let (k, v) = (repeat_kv(k, n_rep)?, repeat_kv(v, n_rep)?);
    let mask = ctx.mask(layer.spec.window);
    // In query tiles, probabilities recomputed in backward: no [heads, len, len] tensor is kept.
    let out = tiled_attention::attention(&q, &k, &v, mask, arch.attn_scale, arch.attn_softcap, tiled_attention::TILE)?;
    let out = out.transpose(1, 2)?.reshape((b, t, arch.q_width()))?;
    Ok(layer.linear(Proj::O).forward(&out, mode)?)
}

/// q, k and v `[rows, heads, len, head_dim]` of `x`: projected (fused or not), normed where the
/// family norms them, rotated where the layer has RoPE; k and v not yet repeated for
/// grouped-query attention.
fn project_qkv(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &PassShared,
    mode: &mut LoraMode,
) -> Result<(Tensor, Tensor, Tensor)> {
    let arch = &ctx.arch;
    let (b, t, _) = x.dims3()?;
    let (qw, kw, hd) = (arch.q_width(), arch.kv_width(), arch.head_dim);
    let (q, k, v) = if arch.projections.contains(&Proj::Qkv) {
        let qkv = layer.linear(Proj::Qkv).forward(x, mode)?;
        (qkv.narrow(D::Minus1, 0, qw)?, qkv.narrow(D::Minus1, qw, kw)?, qkv.narrow(D::Minus1, qw + kw, kw)?)
    } else {
        let q = layer.linear(Proj::Q).forward(x, mode)?;
        let k = layer.linear(Proj::K).forward(x, mode)?;
        (q, k, layer.linear(Proj::V).forward(x, mode)?)
    };
    let (mut q, mut k) = (q, k);
    if let (Some(QkNorm::AcrossHeads), Some([qn, kn])) = (arch.qk_norm, &layer.qk_norm) {
        q = rms_norm(&q, qn, &arch.norm)?;
        k = rms_norm(&k, kn, &arch.norm)?;
    }
    let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd));
    let (mut q, mut k) = (heads(q, arch.num_heads)?, heads(k, arch.num_kv_heads)?);
    if let (Some(QkNorm::PerHead), Some([qn, kn])) = (arch.qk_norm, &layer.qk_norm) {
        q = rms_norm(&q, qn, &arch.norm)?;
        k = rms_norm(&k, kn, &arch.norm)?;
    }
    let (mut q, mut k) = (q.transpose(1, 2)?.contiguous()?, k.transpose(1, 2)?.contiguous()?);
    let v = heads(v, arch.num_kv_heads)?.transpose(1, 2)?.contiguous()?;
    if let Some(i) = layer.spec.rope {
        let (cos, sin) = &ctx.rope[i];
        q = rotate(&q, cos, sin)?;
        k = rotate(&k, cos, sin)?;
    }
    Ok((q, k, v))
}

/// RoPE on the leading `rotary_dim` dimensions of each head (all of them unless partial).
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (hd, rd) = (x.dim(D::Minus1)?, cos.dim(D::Minus1)?);
    if rd == hd {
        return rope(x, cos, sin);
    }
    let rotated = rope(&x.narrow(D::Minus1, 0, rd)?, cos, sin)?;
    Tensor::cat(&[&rotated, &x.narrow(D::Minus1, rd, hd - rd)?], D::Minus1)
}

fn mlp(layer: &DecoderLayer, x: &Tensor, ctx: &PassShared, mode: &mut LoraMode) -> Result<Tensor> {
    let inter = ctx.arch.intermediate_size;
    let (gate, up) = if ctx.arch.projections.contains(&Proj::GateUp) {
        let gu = layer.linear(Proj::GateUp).forward(x, mode)?;
        (gu.narrow(D::Minus1, 0, inter)?, gu.narrow(D::Minus1, inter, inter)?)
    } else {
        let gate = layer.linear(Proj::Gate).forward(x, mode)?;
        (gate, layer.linear(Proj::Up).forward(x, mode)?)
    };
    let act = match ctx.arch.activation {
        Activation::Silu => gate.silu()?,
        // candle's gelu is the tanh approximation.
        Activation::GeluTanh => gate.gelu()?,
    };
    Ok(layer.linear(Proj::Down).forward(&(act * up)?, mode)?)
}
