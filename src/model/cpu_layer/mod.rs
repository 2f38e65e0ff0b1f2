//! One decoder layer as a single CPU op with a hand-written backward (f32), for every family
//! the [`Architecture`] describes.
//!
//! candle records a graph node per elementwise op, allocates a fresh tensor for each, and its
//! backward seeds every gradient with `zeros_like` and then adds to it: for a DPO step on a
//! small model that bookkeeping costs as much as the matmuls. This op runs the whole layer —
//! the family's norms (pre, sandwich or post), the projections (fused or not, with biases) and
//! their LoRA deltas, q/k norms, (partial) RoPE, block-sparse attention (scaled, soft-capped),
//! the gated MLP (SiLU or GELU-tanh) and both residuals — on plain buffers: GEMMs accumulate in
//! place, elementwise loops are vectorised ([`super::kernels`]), and backward recomputes
//! attention probabilities from the scores and the saved log-sum-exp instead of storing them.
//!
//! It computes the same function as [`super::generic_layer`] (tested on every family: values
//! and LoRA gradients, with padding, GQA, sliding windows and LoRA dropout).
//!
//! ```no_run
//! # fn main() -> candle_core::Result<()> {
//! # let (layer, x, geometry): (dpo::model::cpu_layer::LayerParams, candle_core::Tensor, std::sync::Arc<dpo::model::cpu_layer::Geometry>) = todo!();
//! let y = dpo::model::cpu_layer::forward(&layer, &geometry, None, &x, &mut dpo::nn::LoraMode::On)?;
//! # Ok(()) }
//! ```
mod attention;
mod lora;

pub use attention::Geometry;

use super::arch::rope::RopeTables;
use super::arch::{Activation, Architecture, NormPlacement, Proj, ProjInput, QkNorm, RmsNormStyle};
use super::kernels::{self, Gemm, cpu_storage_f32, rms_norm, rms_norm_backward, storage_f32};
use super::layer::DecoderLayer;
use crate::nn::LoraMode;
use crate::nn::linear::LoraWeights;
use crate::nn::lora_pack::LoraPack;
use attention::Heads;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, bail};
use lora::{Adapter, LoraGrads};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::{Arc, Mutex};

/// Whether this op computes `arch` exactly on `device` in `dtype` (else the model runs the
/// generic layer). Every field of the description is named here, so a new one cannot be added
/// without deciding whether the op handles it.
pub fn supports(arch: &Architecture, device: &Device, dtype: DType) -> std::result::Result<(), String> {
    if !device.is_cpu() || dtype != DType::F32 {
        return Err(format!("the CPU layer op runs f32 on the CPU (here {dtype:?} on {device:?})"));
    }
    let Architecture {
        family: _,
        model_type: _,
        hidden_size: _,
        intermediate_size: _,
        num_layers: _,
        num_heads: _,
        num_kv_heads: _,
        head_dim,
        vocab_size: _,
        projections,
        biased: _,
        activation,
        norm: RmsNormStyle { eps: _, unit_offset: _, scale_in_f32: _ },
        placement,
        qk_norm,
        attn_scale: _,
        attn_softcap: _,
        final_softcap: _,
        embed_scale: _,
        tie_word_embeddings: _,
        ropes,
        layers: _,
        max_position_embeddings: _,
        pad_token_id: _,
    } = arch;
    match activation {
        Activation::Silu | Activation::GeluTanh => {}
    }
    match placement {
        NormPlacement::Pre | NormPlacement::Sandwich | NormPlacement::Post => {}
    }
    match qk_norm {
        None | Some(QkNorm::PerHead) | Some(QkNorm::AcrossHeads) => {}
    }
    let fused_or_split = |a: &[Proj], b: Proj| projections.contains(&b) || a.iter().all(|p| projections.contains(p));
    if !fused_or_split(&[Proj::Q, Proj::K, Proj::V], Proj::Qkv)
        || !fused_or_split(&[Proj::Gate, Proj::Up], Proj::GateUp)
    {
        return Err(format!("projections {projections:?} are not a layout the CPU op knows"));
    }
    if let Some(r) = ropes.iter().find(|r| r.rotary_dim % 2 != 0 || r.rotary_dim > *head_dim) {
        return Err(format!("rotary dimension {} of head_dim {head_dim}", r.rotary_dim));
    }
    Ok(())
}

/// The frozen weights of one decoder layer and its adapters (cheap `Tensor` clones), with the
/// description they are read by.
#[derive(Clone)]
pub struct LayerParams {
    arch: Arc<Architecture>,
    /// Attention pre/post, MLP pre/post norm weights (see [`Architecture::norm_names`]).
    norms: [Option<Tensor>; 4],
    qk_norm: Option<[Tensor; 2]>,
    linears: Vec<Linear>,
    /// Keep nothing from forward; backward re-runs the layer first (activation recomputation).
    recompute: bool,
}

#[derive(Clone)]
struct Linear {
    proj: Proj,
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraWeights>,
}

impl LayerParams {
    pub fn new(arch: &Arc<Architecture>, layer: &DecoderLayer, recompute: bool) -> Self {
        let linears = layer
            .linears
            .iter()
            .map(|(p, l)| Linear {
                proj: *p,
                weight: l.weight().clone(),
                bias: l.bias().cloned(),
                lora: l.lora().cloned(),
            })
            .collect();
        Self { arch: arch.clone(), norms: layer.norms.clone(), qk_norm: layer.qk_norm.clone(), linears, recompute }
    }
}

/// The layer on `x` `[rows, len, hidden]`: adapters as `mode` says, RoPE from `rope` (none for
/// a NoPE layer), graph recorded only when something upstream or an adapter needs a gradient.
pub fn forward(
    p: &LayerParams,
    geo: &Arc<Geometry>,
    rope: Option<Arc<RopeTables>>,
    x: &Tensor,
    mode: &mut LoraMode,
) -> Result<Tensor> {
    let shape = x.shape().clone();
    let hidden = p.arch.hidden_size;
    let n = geo.tokens();
    if shape.elem_count() != n * hidden {
        bail!("cpu layer: input {shape:?} does not match {n} tokens × {hidden}");
    }
    let x = x.contiguous()?;
    let pack = match mode {
        LoraMode::Off => None,
        _ => LoraPack::of(p.linears.iter().map(|l| l.lora.as_ref()))?,
    };
    let slots = match &pack {
        Some(pack) => lora_slots(pack, n, mode),
        None => vec![None; p.linears.len()],
    };
    let op = LayerOp { p: p.clone(), geo: geo.clone(), rope, slots, need_dx: x.track_op(), saved: Mutex::new(None) };
    match pack {
        // The reference pass: no graph, nothing saved.
        None if !x.track_op() => {
            let (storage, _) = x.storage_and_layout();
            let out = op.run_forward(storage_f32(&storage, x.layout())?, &[], &[], false)?;
            drop(storage);
            Tensor::from_vec(out, shape, x.device())
        }
        None => x.apply_op1_arc(Arc::new(Box::new(op))),
        Some(pack) => x.apply_op3_arc(&pack.a, &pack.b, Arc::new(Box::new(op))),
    }
}

/// Where one linear's adapter sits in the flat `A`/`B` inputs ([`LoraPack`]), and its dropout mask.
#[derive(Clone)]
struct LoraSlot {
    rank: usize,
    scale: f32,
    a_off: usize,
    b_off: usize,
    mask: Option<Arc<Vec<f32>>>,
}

/// The pack's slots with this forward's dropout masks ([`LoraPack::dropout_masks`]: the order
/// the generic layer draws them in, so both paths consume the same random stream).
fn lora_slots(pack: &LoraPack, n: usize, mode: &mut LoraMode) -> Vec<Option<LoraSlot>> {
    let masks = pack.dropout_masks(n, mode);
    pack.slots
        .iter()
        .zip(masks)
        .map(|(slot, mask)| {
            slot.as_ref().map(|s| LoraSlot {
                rank: s.rank,
                scale: s.scale as f32,
                a_off: s.a_off,
                b_off: s.b_off,
                mask: mask.map(Arc::new),
            })
        })
        .collect()
}

/// A sublayer output that went through a post-norm: its raw value and `1/rms` per row.
struct PostNormed {
    raw: Vec<f32>,
    inv: Vec<f32>,
}

/// Activations kept from forward for backward.
struct Saved {
    /// The attention input after its pre-norm (absent: the input itself), with `1/rms`.
    attn_in: Option<(Vec<f32>, Vec<f32>)>,
    /// `[q | k | v]` before the q/k norms, and their `1/rms` (q segments, then k, per row).
    qk_raw: Option<(Vec<f32>, Vec<f32>)>,
    /// `[q | k | v]` as attention read it (q and k normed and rotated).
    qkv: Vec<f32>,
    /// Per head and query: the log-sum-exp of its attention scores.
    lse: Vec<f32>,
    o: Vec<f32>,
    attn_post: Option<PostNormed>,
    /// The residual stream between the sublayers.
    h: Vec<f32>,
    mlp_in: Option<(Vec<f32>, Vec<f32>)>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    mlp_post: Option<PostNormed>,
    /// Per input group (attention, attention out, MLP, MLP out): the adapters' `(x∘mask)·Aᵀ`.
    lora_u: [Vec<f32>; 4],
}

struct LayerOp {
    p: LayerParams,
    geo: Arc<Geometry>,
    rope: Option<Arc<RopeTables>>,
    slots: Vec<Option<LoraSlot>>,
    /// Whether the input needs a gradient (not for the first layer, whose input is the
    /// frozen embedding): without it, backward stops at the adapters' gradients.
    need_dx: bool,
    saved: Mutex<Option<Saved>>,
}

/// Slices of the frozen weights, borrowed for one forward or backward.
struct Weights<'a> {
    norms: [Option<&'a [f32]>; 4],
    qk_norm: Option<[&'a [f32]; 2]>,
    /// Per linear (in the layer's order): weight `[out, in]` and bias.
    linears: Vec<(&'a [f32], Option<&'a [f32]>)>,
}

impl LayerOp {
    fn arch(&self) -> &Architecture {
        &self.p.arch
    }

    fn heads(&self) -> Heads {
        let a = self.arch();
        Heads {
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            scale: a.attn_scale as f32,
            softcap: a.attn_softcap.map(|c| c as f32),
        }
    }

    /// `(hidden, qw, kw, inter, tokens)`.
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let a = self.arch();
        (a.hidden_size, a.q_width(), a.kv_width(), a.intermediate_size, self.geo.tokens())
    }

    fn with_weights<R>(&self, f: impl FnOnce(&Weights) -> Result<R>) -> Result<R> {
        let p = &self.p;
        fn guard(t: &Tensor) -> (candle_core::StorageRef<'_>, &Layout) {
            t.storage_and_layout()
        }
        let norm_g: Vec<_> = p.norms.iter().map(|t| t.as_ref().map(guard)).collect();
        let qk_g: Option<Vec<_>> = p.qk_norm.as_ref().map(|ts| ts.iter().map(guard).collect());
        let lin_g: Vec<_> = p.linears.iter().map(|l| (guard(&l.weight), l.bias.as_ref().map(guard))).collect();
        fn slice<'a>(g: &'a (candle_core::StorageRef<'_>, &Layout)) -> Result<&'a [f32]> {
            storage_f32(&g.0, g.1)
        }
        let mut norms = [None; 4];
        for (slot, g) in norms.iter_mut().zip(&norm_g) {
            *slot = g.as_ref().map(slice).transpose()?;
        }
        let qk_norm = match &qk_g {
            Some(g) => Some([slice(&g[0])?, slice(&g[1])?]),
            None => None,
        };
        let linears =
            lin_g.iter().map(|(w, b)| Ok((slice(w)?, b.as_ref().map(slice).transpose()?))).collect::<Result<_>>()?;
        f(&Weights { norms, qk_norm, linears })
    }

    fn adapter<'a>(&'a self, i: usize, col: usize, a: &'a [f32], b: &'a [f32]) -> Option<Adapter<'a>> {
        let s = self.slots[i].as_ref()?;
        let (out_dim, in_dim) = self.p.linears[i].weight.dims2().expect("2-D weight");
        Some(Adapter {
            a: &a[s.a_off..s.a_off + s.rank * in_dim],
            b: &b[s.b_off..s.b_off + out_dim * s.rank],
            a_off: s.a_off,
            b_off: s.b_off,
            rank: s.rank,
            scale: s.scale,
            mask: s.mask.as_deref().map(|m| m.as_slice()),
            col,
            out: out_dim,
        })
    }

    /// The linears reading `input`: `(index, column in the output buffer)`.
    fn members(&self, input: ProjInput) -> Vec<(usize, usize)> {
        let arch = self.arch();
        self.p
            .linears
            .iter()
            .enumerate()
            .filter(|(_, l)| l.proj.input() == input)
            .map(|(i, l)| (i, arch.proj_geometry(l.proj).1))
            .collect()
    }

    fn group<'a>(&'a self, input: ProjInput, a: &'a [f32], b: &'a [f32]) -> Vec<Adapter<'a>> {
        self.members(input).into_iter().filter_map(|(i, col)| self.adapter(i, col, a, b)).collect()
    }

    /// `y[:, cols] (+)= x·Wᵀ + bias` for every linear reading `input`, then their LoRA deltas;
    /// returns the adapters' `u` for backward.
    #[allow(clippy::too_many_arguments)]
    fn project(
        &self,
        w: &Weights,
        input: ProjInput,
        x: &[f32],
        in_dim: usize,
        y: &mut [f32],
        ldy: usize,
        accumulate: bool,
        a: &[f32],
        b: &[f32],
    ) -> Vec<f32> {
        let n = self.geo.tokens();
        for (i, col) in self.members(input) {
            let (weight, bias) = w.linears[i];
            let out = weight.len() / in_dim;
            Gemm::a_bt(n, out, in_dim).run(&mut y[col..], ldy, x, in_dim, weight, in_dim, accumulate, 1.0);
            if let Some(bias) = bias {
                y.par_chunks_mut(ldy)
                    .for_each(|row| row[col..col + out].iter_mut().zip(bias).for_each(|(v, b)| *v += b));
            }
        }
        lora::forward(x, n, in_dim, &self.group(input, a, b), a, y, ldy)
    }

    /// Backward of [`Self::project`]: `dx (+)= dy·W` over the group (no dW: frozen), and the
    /// adapters' gradients.
    #[allow(clippy::too_many_arguments)]
    fn project_backward(
        &self,
        w: &Weights,
        input: ProjInput,
        dy: &[f32],
        ldy: usize,
        x: &[f32],
        in_dim: usize,
        dx: Option<&mut [f32]>,
        u: &[f32],
        a: &[f32],
        b: &[f32],
        g: &mut LoraGrads,
    ) {
        let n = self.geo.tokens();
        let mut dx = dx;
        if let Some(dx) = dx.as_deref_mut() {
            for (k, (i, col)) in self.members(input).into_iter().enumerate() {
                let weight = w.linears[i].0;
                Gemm::a_b(n, in_dim, weight.len() / in_dim).run(
                    dx,
                    in_dim,
                    &dy[col..],
                    ldy,
                    weight,
                    in_dim,
                    k > 0,
                    1.0,
                );
            }
        }
        lora::backward(dy, ldy, n, in_dim, &self.group(input, a, b), a, u, x, dx, g);
    }

    fn run_forward(&self, x: &[f32], a: &[f32], b: &[f32], save: bool) -> Result<Vec<f32>> {
        self.with_weights(|w| {
            let (out, saved) = self.forward_impl(w, x, a, b);
            if save {
                *self.saved.lock().expect("saved activations") = Some(saved);
            }
            Ok(out)
        })
    }

    fn forward_impl(&self, w: &Weights, x: &[f32], a: &[f32], b: &[f32]) -> (Vec<f32>, Saved) {
        let (h, qw, kw, inter, n) = self.dims();
        let eps = self.arch().norm.eps;
        let width = qw + 2 * kw;
        // Attention: h = x + post(o_proj(attn(rope(qk_norm(q, k)), v)))
        let attn_in = w.norms[0].map(|nw| rms_norm(x, nw, h, eps));
        let xa = attn_in.as_ref().map_or(x, |(v, _)| v.as_slice());
        let mut qkv = vec![0f32; n * width];
        let u_attn = self.project(w, ProjInput::Attention, xa, h, &mut qkv, width, false, a, b);
        let qk_raw = w.qk_norm.map(|[qn, kn]| {
            let raw = qkv.clone();
            let inv = self.qk_norm(&mut qkv, qn, kn);
            (raw, inv)
        });
        self.rope(&mut qkv, false);
        let (o, lse) = attention::forward(&self.geo, self.heads(), &qkv);
        let (hbuf, u_o, attn_post) = self.residual(w, ProjInput::AttentionOut, x, &o, qw, w.norms[1], a, b);
        // MLP: out = h + post(down(act(gate)·up)) of pre(h)
        let mlp_in = w.norms[2].map(|nw| rms_norm(&hbuf, nw, h, eps));
        let xm = mlp_in.as_ref().map_or(hbuf.as_slice(), |(v, _)| v.as_slice());
        let mut gate_up = vec![0f32; n * 2 * inter];
        let u_mlp = self.project(w, ProjInput::Mlp, xm, h, &mut gate_up, 2 * inter, false, a, b);
        let mut act = vec![0f32; n * inter];
        let activation = self.arch().activation;
        act.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(o, gu)| match activation {
            Activation::Silu => kernels::silu_mul(o, &gu[..inter], &gu[inter..]),
            Activation::GeluTanh => kernels::gelu_tanh_mul(o, &gu[..inter], &gu[inter..]),
        });
        let (out, u_down, mlp_post) = self.residual(w, ProjInput::MlpOut, &hbuf, &act, inter, w.norms[3], a, b);
        let lora_u = [u_attn, u_o, u_mlp, u_down];
        let saved = Saved { attn_in, qk_raw, qkv, lse, o, attn_post, h: hbuf, mlp_in, gate_up, act, mlp_post, lora_u };
        (out, saved)
    }

    /// `residual + post(project(x))`: straight into a copy of the residual when there is no
    /// post-norm; else through its own buffer, kept raw for backward.
    #[allow(clippy::too_many_arguments)]
    fn residual(
        &self,
        w: &Weights,
        input: ProjInput,
        residual: &[f32],
        x: &[f32],
        in_dim: usize,
        post: Option<&[f32]>,
        a: &[f32],
        b: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Option<PostNormed>) {
        let h = self.arch().hidden_size;
        let mut out = residual.to_vec();
        let Some(nw) = post else {
            let u = self.project(w, input, x, in_dim, &mut out, h, true, a, b);
            return (out, u, None);
        };
        let mut raw = vec![0f32; residual.len()];
        let u = self.project(w, input, x, in_dim, &mut raw, h, false, a, b);
        let (normed, inv) = rms_norm(&raw, nw, h, self.arch().norm.eps);
        out.par_iter_mut().zip(normed.par_iter()).for_each(|(o, v)| *o += v);
        (out, u, Some(PostNormed { raw, inv }))
    }

    /// The q/k norms in place on the `[q | k | v]` buffer; returns `1/rms` per (row, segment).
    fn qk_norm(&self, qkv: &mut [f32], qn: &[f32], kn: &[f32]) -> Vec<f32> {
        let (_, qw, kw, _, n) = self.dims();
        let width = qw + 2 * kw;
        let (q_seg, k_seg) = self.qk_segments();
        let eps = self.arch().norm.eps;
        let inv_q = kernels::rms_norm_segments(qkv, width, 0, qw, q_seg, qn, eps);
        let inv_k = kernels::rms_norm_segments(qkv, width, qw, kw, k_seg, kn, eps);
        let (per_q, per_k) = (qw / q_seg, kw / k_seg);
        let mut inv = Vec::with_capacity(n * (per_q + per_k));
        for t in 0..n {
            inv.extend_from_slice(&inv_q[t * per_q..(t + 1) * per_q]);
            inv.extend_from_slice(&inv_k[t * per_k..(t + 1) * per_k]);
        }
        inv
    }

    fn qk_segments(&self) -> (usize, usize) {
        let a = self.arch();
        match a.qk_norm {
            Some(QkNorm::AcrossHeads) => (a.q_width(), a.kv_width()),
            _ => (a.head_dim, a.head_dim),
        }
    }

    /// Returns `(dx, dA, dB)`.
    fn run_backward(&self, x: &[f32], a: &[f32], b: &[f32], d_out: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        if self.p.recompute {
            // The forward kept nothing: run it again (same weights, same dropout masks).
            self.run_forward(x, a, b, true)?;
        }
        let saved = self.saved.lock().expect("saved activations").take();
        let Some(s) = saved else { bail!("cpu layer: backward without a saved forward (or run twice)") };
        self.with_weights(|w| Ok(self.backward_impl(w, &s, x, a, b, d_out)))
    }

    fn backward_impl(
        &self,
        w: &Weights,
        s: &Saved,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        d_out: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut g = LoraGrads { da: vec![0f32; a.len()], db: vec![0f32; b.len()] };
        let dh = self.mlp_backward(w, s, a, b, d_out, &mut g);
        let dx = self.attention_backward(w, s, x, a, b, dh, &mut g);
        (dx, g.da, g.db)
    }

    /// The MLP sublayer, `out = h + post(down(act(gate)·up))`: the gradient of `h` from `d_out`.
    fn mlp_backward(&self, w: &Weights, s: &Saved, a: &[f32], b: &[f32], d_out: &[f32], g: &mut LoraGrads) -> Vec<f32> {
        let (h, _, _, inter, n) = self.dims();
        let d_m = post_norm_backward(d_out, s.mlp_post.as_ref(), w.norms[3], h);
        let mut d_act = vec![0f32; n * inter];
        let lora = &s.lora_u[3];
        self.project_backward(w, ProjInput::MlpOut, &d_m, h, &s.act, inter, Some(&mut d_act), lora, a, b, g);
        drop(d_m);
        let mut d_gate_up = vec![0f32; n * 2 * inter];
        let activation = self.arch().activation;
        d_gate_up.par_chunks_mut(2 * inter).zip(s.gate_up.par_chunks(2 * inter)).zip(d_act.par_chunks(inter)).for_each(
            |((dgu, gu), d)| {
                let (dg, du) = dgu.split_at_mut(inter);
                match activation {
                    Activation::Silu => kernels::silu_mul_bwd(dg, du, &gu[..inter], &gu[inter..], d),
                    Activation::GeluTanh => kernels::gelu_tanh_mul_bwd(dg, du, &gu[..inter], &gu[inter..], d),
                }
            },
        );
        drop(d_act);
        let xm = s.mlp_in.as_ref().map_or(s.h.as_slice(), |(v, _)| v.as_slice());
        let mut d_xm = vec![0f32; n * h];
        let lora = &s.lora_u[2];
        self.project_backward(w, ProjInput::Mlp, &d_gate_up, 2 * inter, xm, h, Some(&mut d_xm), lora, a, b, g);
        drop(d_gate_up);
        let mut dh = d_out.to_vec();
        pre_norm_backward(&mut dh, &d_xm, &s.h, s.mlp_in.as_ref(), w.norms[2], h);
        dh
    }

    /// The attention sublayer, `h = x + post(o_proj(attn(...)))`: the gradient of `x` from
    /// `dh` (empty when the input needs none).
    #[allow(clippy::too_many_arguments)] // the layer's weights, activations, flat adapters and gradients
    fn attention_backward(
        &self,
        w: &Weights,
        s: &Saved,
        x: &[f32],
        a: &[f32],
        b: &[f32],
        dh: Vec<f32>,
        g: &mut LoraGrads,
    ) -> Vec<f32> {
        let (h, qw, kw, _, n) = self.dims();
        let d_a = post_norm_backward(&dh, s.attn_post.as_ref(), w.norms[1], h);
        let mut d_o = vec![0f32; n * qw];
        let lora = &s.lora_u[1];
        self.project_backward(w, ProjInput::AttentionOut, &d_a, h, &s.o, qw, Some(&mut d_o), lora, a, b, g);
        drop(d_a);
        let mut d_qkv = attention::backward(&self.geo, self.heads(), &s.qkv, &s.o, &s.lse, &d_o);
        drop(d_o);
        self.rope(&mut d_qkv, true);
        if let (Some([qn, kn]), Some((raw, inv))) = (w.qk_norm, &s.qk_raw) {
            self.qk_norm_backward(&mut d_qkv, raw, inv, qn, kn);
        }
        let xa = s.attn_in.as_ref().map_or(x, |(v, _)| v.as_slice());
        let mut d_xa = if self.need_dx { vec![0f32; n * h] } else { Vec::new() };
        let (width, lora) = (qw + 2 * kw, &s.lora_u[0]);
        let d_xa_out = self.need_dx.then_some(&mut d_xa[..]);
        self.project_backward(w, ProjInput::Attention, &d_qkv, width, xa, h, d_xa_out, lora, a, b, g);
        if !self.need_dx {
            return Vec::new();
        }
        let mut dx = dh;
        pre_norm_backward(&mut dx, &d_xa, x, s.attn_in.as_ref(), w.norms[0], h);
        dx
    }

    fn qk_norm_backward(&self, d_qkv: &mut [f32], raw: &[f32], inv: &[f32], qn: &[f32], kn: &[f32]) {
        let (_, qw, kw, _, n) = self.dims();
        let width = qw + 2 * kw;
        let (q_seg, k_seg) = self.qk_segments();
        let (per_q, per_k) = (qw / q_seg, kw / k_seg);
        let (mut inv_q, mut inv_k) = (Vec::with_capacity(n * per_q), Vec::with_capacity(n * per_k));
        for row in inv.chunks(per_q + per_k) {
            inv_q.extend_from_slice(&row[..per_q]);
            inv_k.extend_from_slice(&row[per_q..]);
        }
        kernels::rms_norm_segments_backward(d_qkv, raw, &inv_q, width, 0, qw, q_seg, qn);
        kernels::rms_norm_segments_backward(d_qkv, raw, &inv_k, width, qw, kw, k_seg, kn);
    }

    /// HF `rotate_half` RoPE in place on the leading `rotary_dim` dimensions of every q and k
    /// head; `transpose` applies its transpose (the backward). Nothing for a NoPE layer.
    fn rope(&self, buf: &mut [f32], transpose: bool) {
        let Some(t) = &self.rope else { return };
        let (_, qw, kw, _, _) = self.dims();
        let (width, cols, d, rd) = (qw + 2 * kw, qw + kw, self.arch().head_dim, t.rotary_dim);
        let half = rd / 2;
        let sign = if transpose { -1.0 } else { 1.0 };
        buf.par_chunks_mut(width).enumerate().for_each(|(tok, row)| {
            let (c, s) = (&t.cos[tok * rd..(tok + 1) * rd], &t.sin[tok * rd..(tok + 1) * rd]);
            for head in row[..cols].chunks_exact_mut(d) {
                let (x1, x2) = head[..rd].split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    // forward: [a·c − b·s, b·c + a·s]; transpose: [a·c + b·s, b·c − a·s]
                    x1[i] = a * c[i] - sign * b * s[i];
                    x2[i] = b * c[half + i] + sign * a * s[half + i];
                }
            }
        });
    }
}

/// The gradient entering a sublayer's output: through its post-norm if it has one.
fn post_norm_backward<'a>(d: &'a [f32], post: Option<&PostNormed>, w: Option<&[f32]>, h: usize) -> Cow<'a, [f32]> {
    match (post, w) {
        (Some(p), Some(w)) => {
            let mut raw = vec![0f32; d.len()];
            rms_norm_backward(&mut raw, d, &p.raw, &p.inv, w, h);
            Cow::Owned(raw)
        }
        _ => Cow::Borrowed(d),
    }
}

/// `dx += ` the gradient of a sublayer's input `d_in`, through its pre-norm if it has one.
fn pre_norm_backward(
    dx: &mut [f32],
    d_in: &[f32],
    x: &[f32],
    normed: Option<&(Vec<f32>, Vec<f32>)>,
    w: Option<&[f32]>,
    h: usize,
) {
    match (normed, w) {
        (Some((_, inv)), Some(w)) => rms_norm_backward(dx, d_in, x, inv, w, h),
        _ => dx.par_iter_mut().zip(d_in.par_iter()).for_each(|(a, b)| *a += b),
    }
}

impl CustomOp1 for LayerOp {
    fn name(&self) -> &'static str {
        "cpu-decoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.run_forward(cpu_storage_f32(s, l)?, &[], &[], !self.p.recompute)?;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (dx, _, _) = self.backward_tensors(x, None, dy)?;
        Ok(dx)
    }
}

impl CustomOp3 for LayerOp {
    fn name(&self) -> &'static str {
        "cpu-decoder-layer-lora"
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
        let out = self.run_forward(
            cpu_storage_f32(s1, l1)?,
            cpu_storage_f32(s2, l2)?,
            cpu_storage_f32(s3, l3)?,
            !self.p.recompute,
        )?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward_tensors(x, Some((a, b)), dy)
    }
}

impl LayerOp {
    fn backward_tensors(
        &self,
        x: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ds, dl) = dy.storage_and_layout();
        let (ga, gb) = match ab {
            Some((a, b)) => (Some(a.storage_and_layout()), Some(b.storage_and_layout())),
            None => (None, None),
        };
        let a_slice = match &ga {
            Some((s, l)) => storage_f32(s, l)?,
            None => &[],
        };
        let b_slice = match &gb {
            Some((s, l)) => storage_f32(s, l)?,
            None => &[],
        };
        let (dx, da, db) = self.run_backward(storage_f32(&xs, xl)?, a_slice, b_slice, storage_f32(&ds, dl)?)?;
        let dev = x.device();
        let dx = if self.need_dx { Some(Tensor::from_vec(dx, x.shape(), dev)?) } else { None };
        let grads = match ab {
            Some((a, b)) => (Some(Tensor::from_vec(da, a.shape(), dev)?), Some(Tensor::from_vec(db, b.shape(), dev)?)),
            None => (None, None),
        };
        Ok((dx, grads.0, grads.1))
    }
}
