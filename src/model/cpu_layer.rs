//! One decoder layer as a single CPU op with a hand-written backward (f32).
//!
//! candle records a graph node per elementwise op, allocates a fresh tensor for each, and its
//! backward seeds every gradient with `zeros_like` and then adds to it: for a DPO step on a
//! small model that bookkeeping costs as much as the matmuls. This op runs the whole layer —
//! RMSNorm, q/k/v with their LoRA deltas, RoPE, block-sparse attention, o, SwiGLU MLP and both
//! residuals — on plain buffers: GEMMs accumulate in place (a residual or LoRA delta is a
//! `C += …`, not a pass), elementwise loops are vectorised ([`super::kernels`]), and backward
//! recomputes attention probabilities from the saved log-sum-exp instead of storing them.
//!
//! It computes the same function as the composite layer in [`super::llama`] (tested: values
//! and LoRA gradients, with padding, GQA, q/k/v biases, sliding windows and LoRA dropout).
//!
//! ```no_run
//! # fn main() -> candle_core::Result<()> {
//! # let (layer, x, geometry): (dpo::model::cpu_layer::LayerParams, candle_core::Tensor, std::sync::Arc<dpo::model::cpu_layer::Geometry>) = todo!();
//! let y = dpo::model::cpu_layer::forward(&layer, &geometry, &x, &mut dpo::lora::LoraMode::On)?;
//! # Ok(()) }
//! ```
use super::kernels::{self, Gemm, SharedMut, cpu_storage_f32, rms_norm, rms_norm_backward, storage_f32};
use super::layout::TokenLayout;
use crate::lora::LoraMode;
use crate::lora::linear::{LoraWeights, dropout_mask};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Query rows per attention tile: keys past a tile's last visible one are never touched.
const TILE: usize = 64;

/// The frozen weights of one decoder layer and its adapters (cheap `Tensor` clones).
#[derive(Clone)]
pub struct LayerParams {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// q, k, v, o, gate, up, down: `[out, in]`.
    pub weights: [Tensor; 7],
    /// q, k, v biases (Qwen2).
    pub biases: [Option<Tensor>; 3],
    pub lora: [Option<LoraWeights>; 7],
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub eps: f64,
}

/// One block of attention (see [`TokenLayout::attention_blocks`]) with its query tiles.
struct Block {
    q_start: usize,
    keys: Vec<u32>,
    /// `[q_len, keys.len()]`, 0 or −∞.
    mask: Vec<f32>,
    /// `(first query, end query, keys used)` relative to the block: beyond `keys used` every
    /// query of the tile is masked.
    tiles: Vec<(usize, usize, usize)>,
}

/// What every layer of one forward pass shares: the row layout, per-token RoPE tables, and the
/// attention blocks for one attention window.
pub struct Geometry {
    rows: usize,
    len: usize,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    blocks: Vec<Vec<Block>>,
}

impl Geometry {
    /// `cos`/`sin`: `[rows·len, head_dim]` for each token's position.
    pub fn new(layout: &TokenLayout, window: Option<usize>, cos: Arc<Vec<f32>>, sin: Arc<Vec<f32>>) -> Self {
        let blocks = layout
            .attention_blocks(window)
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|b| {
                        let nk = b.keys.len();
                        let tiles = (0..b.q_len)
                            .step_by(TILE)
                            .map(|q0| {
                                let q1 = (q0 + TILE).min(b.q_len);
                                let used = (q0..q1)
                                    .map(|i| b.mask[i * nk..(i + 1) * nk].iter().rposition(|m| m.is_finite()).map_or(0, |j| j + 1))
                                    .max()
                                    .unwrap_or(0);
                                (q0, q1, used)
                            })
                            .collect();
                        Block { q_start: b.q_start, keys: b.keys, mask: b.mask, tiles }
                    })
                    .collect()
            })
            .collect();
        Self { rows: layout.rows, len: layout.len, cos, sin, blocks }
    }

    fn tokens(&self) -> usize {
        self.rows * self.len
    }
}

/// The layer on `x` `[rows, len, hidden]`: adapters as `mode` says, graph recorded only when
/// something upstream or an adapter needs a gradient.
pub fn forward(p: &LayerParams, geo: &Arc<Geometry>, x: &Tensor, mode: &mut LoraMode) -> Result<Tensor> {
    let shape = x.shape().clone();
    let hidden = p.weights[0].dim(1)?;
    let n = geo.tokens();
    if shape.elem_count() != n * hidden {
        bail!("cpu layer: input {shape:?} does not match {n} tokens × {hidden}");
    }
    let x = x.contiguous()?;
    let with_lora = !matches!(mode, LoraMode::Off) && p.lora.iter().any(Option::is_some);
    let slots = if with_lora { lora_slots(p, n, mode)? } else { vec![None; 7] };
    let op = LayerOp { p: p.clone(), geo: geo.clone(), slots, need_dx: x.track_op(), saved: Mutex::new(None) };
    if !with_lora && !x.track_op() {
        // The reference pass: no graph, nothing saved.
        let (storage, _) = x.storage_and_layout();
        let out = op.run_forward(storage_f32(&storage, x.layout())?, &[], &[], false)?;
        drop(storage);
        return Tensor::from_vec(out, shape, x.device());
    }
    if !with_lora {
        return x.apply_op1_arc(Arc::new(Box::new(op)));
    }
    let flat = |f: fn(&LoraWeights) -> &candle_core::Var| -> Result<Tensor> {
        let parts = p.lora.iter().flatten().map(|l| f(l).as_tensor().flatten_all()).collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    };
    x.apply_op3_arc(&flat(|l| &l.a)?, &flat(|l| &l.b)?, Arc::new(Box::new(op)))
}

/// Where one linear's adapter sits in the flattened `A`/`B` inputs, and its dropout mask.
#[derive(Clone)]
struct LoraSlot {
    rank: usize,
    scale: f32,
    a_off: usize,
    b_off: usize,
    mask: Option<Arc<Vec<f32>>>,
}

/// The adapters' slots, drawing dropout masks in the order the composite layer draws them
/// (q, k, v, o, gate, up, down; each over its whole input), so both paths consume the same
/// random stream.
fn lora_slots(p: &LayerParams, n: usize, mode: &mut LoraMode) -> Result<Vec<Option<LoraSlot>>> {
    let (mut a_off, mut b_off) = (0, 0);
    let mut slots = Vec::with_capacity(7);
    for (w, lora) in p.weights.iter().zip(&p.lora) {
        let Some(l) = lora else {
            slots.push(None);
            continue;
        };
        let (out_dim, in_dim) = w.dims2()?;
        let rank = l.a.dim(0)?;
        let mask = match mode {
            LoraMode::Train(rng) if l.dropout > 0.0 => Some(Arc::new(dropout_mask(n * in_dim, l.dropout, rng))),
            _ => None,
        };
        slots.push(Some(LoraSlot { rank, scale: l.scale as f32, a_off, b_off, mask }));
        a_off += rank * in_dim;
        b_off += out_dim * rank;
    }
    Ok(slots)
}

/// Activations kept from forward for backward.
struct Saved {
    xn1: Vec<f32>,
    inv_rms1: Vec<f32>,
    /// q, k (after RoPE) and v: `[n, qw + 2·kw]`.
    qkv: Vec<f32>,
    /// Per head and query: the log-sum-exp of its attention scores.
    lse: Vec<f32>,
    o: Vec<f32>,
    h: Vec<f32>,
    xn2: Vec<f32>,
    inv_rms2: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    /// Per input group (q·k·v, o, gate·up, down): the adapters' `(x∘mask)·Aᵀ` side by side.
    lora_u: [Vec<f32>; 4],
}

struct LayerOp {
    p: LayerParams,
    geo: Arc<Geometry>,
    slots: Vec<Option<LoraSlot>>,
    /// Whether the input needs a gradient (not for the first layer, whose input is the
    /// frozen embedding): without it, backward stops at the adapters' gradients.
    need_dx: bool,
    saved: Mutex<Option<Saved>>,
}

/// Slices of the frozen weights, borrowed for one forward or backward.
struct Weights<'a> {
    norm1: &'a [f32],
    norm2: &'a [f32],
    w: [&'a [f32]; 7],
    bias: [Option<&'a [f32]>; 3],
}

/// One linear's adapter as slices: `A` `[r, in]`, `B` `[out, r]`, where they sit in the
/// flattened inputs, and the output columns the linear writes.
struct Adapter<'a> {
    a: &'a [f32],
    b: &'a [f32],
    a_off: usize,
    b_off: usize,
    rank: usize,
    scale: f32,
    mask: Option<&'a [f32]>,
    /// First output column and width in the group's output buffer.
    col: usize,
    out: usize,
}

impl LayerOp {
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let p = &self.p;
        let hidden = p.weights[0].dims()[1];
        let inter = p.weights[4].dims()[0];
        (hidden, p.num_heads * p.head_dim, p.num_kv_heads * p.head_dim, inter, self.geo.tokens())
    }

    fn with_weights<R>(&self, f: impl FnOnce(&Weights) -> Result<R>) -> Result<R> {
        let p = &self.p;
        let guards: Vec<_> = [&p.input_norm, &p.post_norm].into_iter().chain(p.weights.iter()).map(|t| t.storage_and_layout()).collect();
        let bias_guards: Vec<_> = p.biases.iter().map(|b| b.as_ref().map(|t| t.storage_and_layout())).collect();
        let s: Vec<&[f32]> = guards.iter().map(|(s, l)| storage_f32(s, l)).collect::<Result<_>>()?;
        let bias = |i: usize| -> Result<Option<&[f32]>> { bias_guards[i].as_ref().map(|(s, l)| storage_f32(s, l)).transpose() };
        let w = Weights { norm1: s[0], norm2: s[1], w: [s[2], s[3], s[4], s[5], s[6], s[7], s[8]], bias: [bias(0)?, bias(1)?, bias(2)?] };
        f(&w)
    }

    fn adapter<'a>(&'a self, i: usize, col: usize, a: &'a [f32], b: &'a [f32]) -> Option<Adapter<'a>> {
        let s = self.slots[i].as_ref()?;
        let (out_dim, in_dim) = (self.p.weights[i].dims()[0], self.p.weights[i].dims()[1]);
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

    /// The adapters of linears `ids` (which read the same input), with their output columns.
    fn group<'a>(&'a self, ids: &[(usize, usize)], a: &'a [f32], b: &'a [f32]) -> Vec<Adapter<'a>> {
        ids.iter().filter_map(|&(i, col)| self.adapter(i, col, a, b)).collect()
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
        let width = qw + 2 * kw;
        let (xn1, inv_rms1) = rms_norm(x, w.norm1, h, self.p.eps);
        let mut qkv = vec![0f32; n * width];
        for (i, (col, out_dim)) in [(0, qw), (qw, kw), (qw + kw, kw)].into_iter().enumerate() {
            frozen(&xn1, n, h, w.w[i], out_dim, &mut qkv[col..], width, false);
            if let Some(bias) = w.bias[i] {
                qkv.par_chunks_mut(width).for_each(|row| row[col..col + out_dim].iter_mut().zip(bias).for_each(|(y, b)| *y += b));
            }
        }
        let u_qkv = lora_forward(&xn1, n, h, &self.group(&QKV.map(|i| (i, [0, qw, qw + kw][i])), a, b), a, &mut qkv, width);
        self.rope(&mut qkv, width, qw + kw, false);
        let (o, lse) = self.attention(&qkv);
        let mut hbuf = x.to_vec();
        frozen(&o, n, qw, w.w[3], h, &mut hbuf, h, true);
        let u_o = lora_forward(&o, n, qw, &self.group(&[(3, 0)], a, b), a, &mut hbuf, h);
        let (xn2, inv_rms2) = rms_norm(&hbuf, w.norm2, h, self.p.eps);
        let mut gate_up = vec![0f32; n * 2 * inter];
        frozen(&xn2, n, h, w.w[4], inter, &mut gate_up, 2 * inter, false);
        frozen(&xn2, n, h, w.w[5], inter, &mut gate_up[inter..], 2 * inter, false);
        let u_gu = lora_forward(&xn2, n, h, &self.group(&[(4, 0), (5, inter)], a, b), a, &mut gate_up, 2 * inter);
        let mut act = vec![0f32; n * inter];
        act.par_chunks_mut(inter).zip(gate_up.par_chunks(2 * inter)).for_each(|(o, gu)| kernels::silu_mul(o, &gu[..inter], &gu[inter..]));
        let mut out = hbuf.clone();
        frozen(&act, n, inter, w.w[6], h, &mut out, h, true);
        let u_down = lora_forward(&act, n, inter, &self.group(&[(6, 0)], a, b), a, &mut out, h);
        let lora_u = [u_qkv, u_o, u_gu, u_down];
        let saved = Saved { xn1, inv_rms1, qkv, lse, o, h: hbuf, xn2, inv_rms2, gate_up, act, lora_u };
        (out, saved)
    }

    /// Returns `(dx, dA, dB)`.
    fn run_backward(&self, x: &[f32], a: &[f32], b: &[f32], d_out: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let saved = self.saved.lock().expect("saved activations").take();
        let Some(s) = saved else { bail!("cpu layer: backward without a saved forward (or run twice)") };
        self.with_weights(|w| Ok(self.backward_impl(w, &s, x, a, b, d_out)))
    }

    fn backward_impl(&self, w: &Weights, s: &Saved, x: &[f32], a: &[f32], b: &[f32], d_out: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (h, qw, kw, inter, n) = self.dims();
        let width = qw + 2 * kw;
        let mut g = LoraGrads { da: vec![0f32; a.len()], db: vec![0f32; b.len()] };
        // MLP: out = h + down(silu(gate)·up)
        let mut d_act = vec![0f32; n * inter];
        frozen_backward(d_out, h, n, inter, w.w[6], &mut d_act, false);
        lora_backward(d_out, h, n, inter, &self.group(&[(6, 0)], a, b), a, &s.lora_u[3], &s.act, Some(&mut d_act), &mut g);
        let mut d_gate_up = vec![0f32; n * 2 * inter];
        d_gate_up.par_chunks_mut(2 * inter).zip(s.gate_up.par_chunks(2 * inter)).zip(d_act.par_chunks(inter)).for_each(|((dgu, gu), d)| {
            let (dg, du) = dgu.split_at_mut(inter);
            kernels::silu_mul_bwd(dg, du, &gu[..inter], &gu[inter..], d);
        });
        drop(d_act);
        let mut d_xn2 = vec![0f32; n * h];
        frozen_backward(&d_gate_up, 2 * inter, n, h, w.w[4], &mut d_xn2, false);
        frozen_backward(&d_gate_up[inter..], 2 * inter, n, h, w.w[5], &mut d_xn2, true);
        lora_backward(&d_gate_up, 2 * inter, n, h, &self.group(&[(4, 0), (5, inter)], a, b), a, &s.lora_u[2], &s.xn2, Some(&mut d_xn2), &mut g);
        drop(d_gate_up);
        let mut dh = d_out.to_vec();
        rms_norm_backward(&mut dh, &d_xn2, &s.h, &s.inv_rms2, w.norm2, h);
        // Attention: h = x + o_proj(attn(rope(q), rope(k), v))
        let mut d_o = vec![0f32; n * qw];
        frozen_backward(&dh, h, n, qw, w.w[3], &mut d_o, false);
        lora_backward(&dh, h, n, qw, &self.group(&[(3, 0)], a, b), a, &s.lora_u[1], &s.o, Some(&mut d_o), &mut g);
        let mut d_qkv = self.attention_backward(&s.qkv, &s.o, &s.lse, &d_o);
        drop(d_o);
        self.rope(&mut d_qkv, width, qw + kw, true);
        let mut d_xn1 = if self.need_dx { vec![0f32; n * h] } else { Vec::new() };
        if self.need_dx {
            for (i, col) in [0, qw, qw + kw].into_iter().enumerate() {
                frozen_backward(&d_qkv[col..], width, n, h, w.w[i], &mut d_xn1, i > 0);
            }
        }
        let qkv_group = self.group(&QKV.map(|i| (i, [0, qw, qw + kw][i])), a, b);
        lora_backward(&d_qkv, width, n, h, &qkv_group, a, &s.lora_u[0], &s.xn1, self.need_dx.then_some(&mut d_xn1[..]), &mut g);
        if !self.need_dx {
            return (Vec::new(), g.da, g.db);
        }
        let mut dx = dh;
        rms_norm_backward(&mut dx, &d_xn1, x, &s.inv_rms1, w.norm1, h);
        (dx, g.da, g.db)
    }

    /// HF `rotate_half` RoPE in place on the first `cols` columns (q and k heads) of each row;
    /// `transpose` applies its transpose (the backward).
    fn rope(&self, buf: &mut [f32], width: usize, cols: usize, transpose: bool) {
        let d = self.p.head_dim;
        let half = d / 2;
        let (cos, sin) = (&self.geo.cos, &self.geo.sin);
        let sign = if transpose { -1.0 } else { 1.0 };
        buf.par_chunks_mut(width).enumerate().for_each(|(t, row)| {
            let (c, s) = (&cos[t * d..(t + 1) * d], &sin[t * d..(t + 1) * d]);
            for head in row[..cols].chunks_exact_mut(d) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    // forward: [a·c − b·s, b·c + a·s]; transpose: [a·c + b·s, b·c − a·s]
                    x1[i] = a * c[i] - sign * b * s[i];
                    x2[i] = b * c[half + i] + sign * a * s[half + i];
                }
            }
        });
    }

    /// Block-sparse attention over the `qkv` buffer: `(o [n, qw], lse [heads, n])`.
    fn attention(&self, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (_, qw, kw, _, n) = self.dims();
        let (nh, d) = (self.p.num_heads, self.p.head_dim);
        let n_rep = nh / self.p.num_kv_heads;
        let width = qw + 2 * kw;
        let scale = 1.0 / (d as f32).sqrt();
        let mut o = vec![0f32; n * qw];
        let mut lse = vec![0f32; nh * n];
        let (o_ptr, lse_ptr) = (SharedMut(o.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
        let tasks: Vec<(usize, usize, usize)> = (0..self.geo.rows)
            .flat_map(|r| (0..self.geo.blocks[r].len()).flat_map(move |bi| (0..nh).map(move |hd| (r, bi, hd))))
            .collect();
        tasks.into_par_iter().for_each(|(r, bi, head)| {
            let blk = &self.geo.blocks[r][bi];
            let base = r * self.geo.len;
            let kvh = head / n_rep;
            let nk = blk.keys.len();
            let (kb, vb) = gather_kv(qkv, width, base, &blk.keys, qw + kvh * d, qw + kw + kvh * d, d);
            let mut scores = vec![0f32; TILE * nk];
            for &(q0, q1, used) in &blk.tiles {
                let (m, q_row) = (q1 - q0, base + blk.q_start + q0);
                let sc = &mut scores[..m * used];
                Gemm::a_bt(m, used, d).serial().run(sc, used, &qkv[q_row * width + head * d..], width, &kb, d, false, scale);
                for i in 0..m {
                    let row = &mut sc[i * used..(i + 1) * used];
                    kernels::add_mask(row, &blk.mask[(q0 + i) * nk..(q0 + i) * nk + used]);
                    let l = kernels::softmax_in_place(row);
                    // SAFETY: each (head, query) belongs to exactly one task.
                    unsafe { *lse_ptr.ptr().add(head * n + q_row + i) = l };
                }
                // SAFETY: rows q_row..q_row+m, columns of `head`: written by this task only.
                unsafe { Gemm::a_b(m, d, used).serial().run_raw(o_ptr.ptr().add(q_row * qw + head * d), qw, sc.as_ptr(), used, vb.as_ptr(), d, false, 1.0) };
            }
        });
        (o, lse)
    }

    /// Gradient of the attention with respect to the `qkv` buffer (q and k still rotated).
    fn attention_backward(&self, qkv: &[f32], o: &[f32], lse: &[f32], d_o: &[f32]) -> Vec<f32> {
        let (_, qw, kw, _, n) = self.dims();
        let (nh, nkv, d) = (self.p.num_heads, self.p.num_kv_heads, self.p.head_dim);
        let n_rep = nh / nkv;
        let width = qw + 2 * kw;
        let scale = 1.0 / (d as f32).sqrt();
        let mut d_qkv = vec![0f32; n * width];
        let dq_ptr = SharedMut(d_qkv.as_mut_ptr());
        let tasks: Vec<(usize, usize)> = (0..self.geo.rows).flat_map(|r| (0..nkv).map(move |g| (r, g))).collect();
        // A task owns one row's kv head: its k/v columns, and the q columns of its heads.
        tasks.into_par_iter().for_each(|(r, kvh)| {
            let base = r * self.geo.len;
            for blk in &self.geo.blocks[r] {
                let nk = blk.keys.len();
                let (kb, vb) = gather_kv(qkv, width, base, &blk.keys, qw + kvh * d, qw + kw + kvh * d, d);
                let (mut dkb, mut dvb) = (vec![0f32; nk * d], vec![0f32; nk * d]);
                let (mut p, mut ds) = (vec![0f32; TILE * nk], vec![0f32; TILE * nk]);
                for head in kvh * n_rep..(kvh + 1) * n_rep {
                    for &(q0, q1, used) in &blk.tiles {
                        let (m, q_row) = (q1 - q0, base + blk.q_start + q0);
                        let (pt, dst) = (&mut p[..m * used], &mut ds[..m * used]);
                        let q = &qkv[q_row * width + head * d..];
                        Gemm::a_bt(m, used, d).serial().run(pt, used, q, width, &kb, d, false, scale);
                        for i in 0..m {
                            let row = &mut pt[i * used..(i + 1) * used];
                            kernels::add_mask(row, &blk.mask[(q0 + i) * nk..(q0 + i) * nk + used]);
                            kernels::exp_shift_sum(row, lse[head * n + q_row + i]);
                        }
                        let dob = &d_o[q_row * qw + head * d..];
                        // dV += Pᵀ·dO ; dP = dO·Vᵀ ; dS = P∘(dP − rowsum(dO∘O))
                        Gemm::at_b(used, d, m).serial().run(&mut dvb, d, pt, used, dob, qw, true, 1.0);
                        Gemm::a_bt(m, used, d).serial().run(dst, used, dob, qw, &vb, d, false, 1.0);
                        for i in 0..m {
                            let at = (q_row + i) * qw + head * d;
                            let d_row = kernels::dot(&d_o[at..at + d], &o[at..at + d]);
                            kernels::softmax_bwd(&mut dst[i * used..(i + 1) * used], &pt[i * used..(i + 1) * used], d_row);
                        }
                        // SAFETY: q columns of `head`, rows of this block: this task only.
                        unsafe { Gemm::a_b(m, d, used).serial().run_raw(dq_ptr.ptr().add(q_row * width + head * d), width, dst.as_ptr(), used, kb.as_ptr(), d, false, scale) };
                        Gemm::at_b(used, d, m).serial().run(&mut dkb, d, dst, used, q, width, true, scale);
                    }
                }
                for (j, &key) in blk.keys.iter().enumerate() {
                    let row = (base + key as usize) * width;
                    for (col, src) in [(qw + kvh * d, &dkb), (qw + kw + kvh * d, &dvb)] {
                        // SAFETY: this row's k/v columns of `kvh` belong to this task.
                        let dst = unsafe { std::slice::from_raw_parts_mut(dq_ptr.ptr().add(row + col), d) };
                        dst.iter_mut().zip(&src[j * d..(j + 1) * d]).for_each(|(a, b)| *a += b);
                    }
                }
            }
        });
        d_qkv
    }
}

/// The keys and values `[nk, d]` of one kv head at the given token indices.
fn gather_kv(qkv: &[f32], width: usize, base: usize, keys: &[u32], k_col: usize, v_col: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut kb, mut vb) = (Vec::with_capacity(keys.len() * d), Vec::with_capacity(keys.len() * d));
    for &key in keys {
        let row = (base + key as usize) * width;
        kb.extend_from_slice(&qkv[row + k_col..row + k_col + d]);
        vb.extend_from_slice(&qkv[row + v_col..row + v_col + d]);
    }
    (kb, vb)
}

/// The q, k, v linears: they read the same input.
const QKV: [usize; 3] = [0, 1, 2];

/// `y[:, ..out] (+)= x·Wᵀ` for `x` `[n, in]`, `W` `[out, in]`, `y` with row stride `ldy`.
#[allow(clippy::too_many_arguments)]
fn frozen(x: &[f32], n: usize, in_dim: usize, w: &[f32], out_dim: usize, y: &mut [f32], ldy: usize, accumulate: bool) {
    Gemm::a_bt(n, out_dim, in_dim).run(y, ldy, x, in_dim, w, in_dim, accumulate, 1.0);
}

/// `dx (+)= dy·W` (no dW: the weight is frozen). `dy` is `[n, out]` with row stride `ldy`.
fn frozen_backward(dy: &[f32], ldy: usize, n: usize, in_dim: usize, w: &[f32], dx: &mut [f32], accumulate: bool) {
    Gemm::a_b(n, in_dim, w.len() / in_dim).run(dx, in_dim, dy, ldy, w, in_dim, accumulate, 1.0);
}

/// Adapters whose `A`s can be applied as one `[Σr, in]` matrix: no dropout masks, and their
/// `A`s adjacent in the flattened input (always so for one layer's group: only linears with an
/// adapter are flattened, in order).
fn stacked(group: &[Adapter]) -> bool {
    group.iter().all(|g| g.mask.is_none()) && group.windows(2).all(|p| p[0].a_off + p[0].a.len() == p[1].a_off)
}

fn masked<'a>(x: &'a [f32], mask: Option<&[f32]>) -> std::borrow::Cow<'a, [f32]> {
    match mask {
        None => std::borrow::Cow::Borrowed(x),
        Some(m) => std::borrow::Cow::Owned(x.iter().zip(m).map(|(a, b)| a * b).collect()),
    }
}

/// LoRA deltas of a group of linears that read the same `x` `[n, in]`: `u_i = (x∘mask_i)·A_iᵀ`
/// (one GEMM for the whole group when [`stacked`]), then `y[:, col_i..] += s_i·u_i·B_iᵀ`.
/// Returns the `u`s side by side, `[n, Σr]`, for backward.
fn lora_forward(x: &[f32], n: usize, in_dim: usize, group: &[Adapter], a: &[f32], y: &mut [f32], ldy: usize) -> Vec<f32> {
    let ranks: usize = group.iter().map(|g| g.rank).sum();
    let mut u = vec![0f32; n * ranks];
    if group.is_empty() {
        return u;
    }
    if stacked(group) {
        let a_all = &a[group[0].a_off..group[0].a_off + ranks * in_dim];
        Gemm::a_bt(n, ranks, in_dim).run(&mut u, ranks, x, in_dim, a_all, in_dim, false, 1.0);
    } else {
        let mut col = 0;
        for g in group {
            Gemm::a_bt(n, g.rank, in_dim).run(&mut u[col..], ranks, &masked(x, g.mask), in_dim, g.a, in_dim, false, 1.0);
            col += g.rank;
        }
    }
    let mut col = 0;
    for g in group {
        Gemm::a_bt(n, g.out, g.rank).run(&mut y[g.col..], ldy, &u[col..], ranks, g.b, g.rank, true, g.scale);
        col += g.rank;
    }
    u
}

/// The op's adapter gradients, `dA` and `dB` laid out as its flattened inputs.
struct LoraGrads {
    da: Vec<f32>,
    db: Vec<f32>,
}

/// Backward of [`lora_forward`]: `dB_i = s·dy_iᵀ·u_i`, `du_i = s·dy_i·B_i`,
/// `dA_i = du_iᵀ·(x∘mask_i)`, and `dx += Σ (du_i·A_i)∘mask_i` when the input needs a gradient
/// (one GEMM each for a [`stacked`] group). `dy` is the group's output gradient, row stride `ldy`.
#[allow(clippy::too_many_arguments)]
fn lora_backward(dy: &[f32], ldy: usize, n: usize, in_dim: usize, group: &[Adapter], a: &[f32], u: &[f32], x: &[f32], dx: Option<&mut [f32]>, g: &mut LoraGrads) {
    if group.is_empty() {
        return;
    }
    let ranks: usize = group.iter().map(|ad| ad.rank).sum();
    let mut du = vec![0f32; n * ranks];
    let mut col = 0;
    for ad in group {
        let dyi = &dy[ad.col..];
        Gemm::a_b(n, ad.rank, ad.out).run(&mut du[col..], ranks, dyi, ldy, ad.b, ad.rank, false, ad.scale);
        let db = &mut g.db[ad.b_off..ad.b_off + ad.out * ad.rank];
        Gemm::at_b(ad.out, ad.rank, n).run(db, ad.rank, dyi, ldy, &u[col..], ranks, false, ad.scale);
        col += ad.rank;
    }
    if stacked(group) {
        let (off, len) = (group[0].a_off, ranks * in_dim);
        Gemm::at_b(ranks, in_dim, n).run(&mut g.da[off..off + len], in_dim, &du, ranks, x, in_dim, false, 1.0);
        if let Some(dx) = dx {
            Gemm::a_b(n, in_dim, ranks).run(dx, in_dim, &du, ranks, &a[off..off + len], in_dim, true, 1.0);
        }
        return;
    }
    let mut dx = dx;
    let mut col = 0;
    for ad in group {
        let xm = masked(x, ad.mask);
        let da = &mut g.da[ad.a_off..ad.a_off + ad.a.len()];
        Gemm::at_b(ad.rank, in_dim, n).run(da, in_dim, &du[col..], ranks, &xm, in_dim, false, 1.0);
        if let Some(dx) = dx.as_deref_mut() {
            match ad.mask {
                None => Gemm::a_b(n, in_dim, ad.rank).run(dx, in_dim, &du[col..], ranks, ad.a, in_dim, true, 1.0),
                Some(mask) => {
                    let mut t = vec![0f32; n * in_dim];
                    Gemm::a_b(n, in_dim, ad.rank).run(&mut t, in_dim, &du[col..], ranks, ad.a, in_dim, false, 1.0);
                    dx.par_iter_mut().zip(t.par_iter()).zip(mask.par_iter()).for_each(|((d, t), m)| *d += t * m);
                }
            }
        }
        col += ad.rank;
    }
}

impl CustomOp1 for LayerOp {
    fn name(&self) -> &'static str {
        "cpu-decoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.run_forward(cpu_storage_f32(s, l)?, &[], &[], true)?;
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

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.run_forward(cpu_storage_f32(s1, l1)?, cpu_storage_f32(s2, l2)?, cpu_storage_f32(s3, l3)?, true)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward_tensors(x, Some((a, b)), dy)
    }
}

impl LayerOp {
    fn backward_tensors(&self, x: &Tensor, ab: Option<(&Tensor, &Tensor)>, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
