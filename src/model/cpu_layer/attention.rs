//! Block-sparse attention on the CPU layer op's `[q | k | v]` buffer: only the blocks of the
//! attention matrix that are not entirely masked ([`TokenLayout::attention_blocks`]), in query
//! tiles, the probabilities never stored (backward recomputes them from the scores and the
//! saved log-sum-exp). Scores are `scale·q·kᵀ`, soft-capped as `cap·tanh(s/cap)` when the
//! family caps them; backward multiplies by the cap's derivative `1 − (capped/cap)²`.
use crate::model::kernels::{self, Gemm, SharedMut};
use crate::nn::layout::TokenLayout;
use rayon::prelude::*;

/// Query rows per attention tile: keys past a tile's last visible one are never touched.
const TILE: usize = 64;

/// One block of attention with its query tiles.
struct Block {
    q_start: usize,
    keys: Vec<u32>,
    /// `[q_len, keys.len()]`, 0 or −∞.
    mask: Vec<f32>,
    /// `(first query, end query, keys used)` relative to the block: beyond `keys used` every
    /// query of the tile is masked.
    tiles: Vec<(usize, usize, usize)>,
}

/// The attention blocks of one forward pass for one attention window.
pub struct Geometry {
    pub(super) rows: usize,
    pub(super) len: usize,
    blocks: Vec<Vec<Block>>,
}

impl Geometry {
    pub fn new(layout: &TokenLayout, window: Option<usize>) -> Self {
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
                                    .map(|i| {
                                        b.mask[i * nk..(i + 1) * nk]
                                            .iter()
                                            .rposition(|m| m.is_finite())
                                            .map_or(0, |j| j + 1)
                                    })
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
        Self { rows: layout.rows, len: layout.len, blocks }
    }

    pub(super) fn tokens(&self) -> usize {
        self.rows * self.len
    }
}

/// The heads and how scores are formed.
#[derive(Clone, Copy)]
pub(super) struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
}

impl Heads {
    fn widths(&self) -> (usize, usize) {
        (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim)
    }

    /// Scores of one tile: `scale·q·kᵀ`, capped, masked; with the cap's derivative when asked.
    #[allow(clippy::too_many_arguments)]
    fn scores(
        &self,
        sc: &mut [f32],
        cap_grad: Option<&mut [f32]>,
        q: &[f32],
        width: usize,
        kb: &[f32],
        used: usize,
        m: usize,
        mask_rows: impl Fn(usize) -> std::ops::Range<usize>,
        mask: &[f32],
    ) {
        let d = self.head_dim;
        Gemm::a_bt(m, used, d).serial().run(sc, used, q, width, kb, d, false, self.scale);
        if let Some(cap) = self.softcap {
            kernels::softcap(sc, cap);
            if let Some(cg) = cap_grad {
                cg.copy_from_slice(sc);
            }
        }
        for i in 0..m {
            kernels::add_mask(&mut sc[i * used..(i + 1) * used], &mask[mask_rows(i)]);
        }
    }
}

/// Attention over the `qkv` buffer `[n, qw + 2·kw]`: `(o [n, qw], lse [heads, n])`.
pub(super) fn forward(geo: &Geometry, heads: Heads, qkv: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (qw, kw) = heads.widths();
    let n = geo.tokens();
    let (nh, d) = (heads.num_heads, heads.head_dim);
    let n_rep = nh / heads.num_kv_heads;
    let width = qw + 2 * kw;
    let mut o = vec![0f32; n * qw];
    let mut lse = vec![0f32; nh * n];
    let (o_ptr, lse_ptr) = (SharedMut(o.as_mut_ptr()), SharedMut(lse.as_mut_ptr()));
    let tasks: Vec<(usize, usize, usize)> = (0..geo.rows)
        .flat_map(|r| (0..geo.blocks[r].len()).flat_map(move |bi| (0..nh).map(move |hd| (r, bi, hd))))
        .collect();
    tasks.into_par_iter().for_each(|(r, bi, head)| {
        let blk = &geo.blocks[r][bi];
        let base = r * geo.len;
        let kvh = head / n_rep;
        let nk = blk.keys.len();
        let (kb, vb) = gather_kv(qkv, width, base, &blk.keys, qw + kvh * d, qw + kw + kvh * d, d);
        let mut scores = vec![0f32; TILE * nk];
        for &(q0, q1, used) in &blk.tiles {
            let (m, q_row) = (q1 - q0, base + blk.q_start + q0);
            let sc = &mut scores[..m * used];
            let q = &qkv[q_row * width + head * d..];
            heads.scores(sc, None, q, width, &kb, used, m, |i| (q0 + i) * nk..(q0 + i) * nk + used, &blk.mask);
            for i in 0..m {
                let l = kernels::softmax_in_place(&mut sc[i * used..(i + 1) * used]);
                // SAFETY: each (head, query) belongs to exactly one task.
                unsafe { *lse_ptr.ptr().add(head * n + q_row + i) = l };
            }
            // SAFETY: rows q_row..q_row+m, columns of `head`: written by this task only.
            unsafe {
                Gemm::a_b(m, d, used).serial().run_raw(
                    o_ptr.ptr().add(q_row * qw + head * d),
                    qw,
                    sc.as_ptr(),
                    used,
                    vb.as_ptr(),
                    d,
                    false,
                    1.0,
                )
            };
        }
    });
    (o, lse)
}

/// Gradient of the attention with respect to the `qkv` buffer (q and k still rotated).
pub(super) fn backward(geo: &Geometry, heads: Heads, qkv: &[f32], o: &[f32], lse: &[f32], d_o: &[f32]) -> Vec<f32> {
    let (qw, kw) = heads.widths();
    let n = geo.tokens();
    let (nh, nkv, d) = (heads.num_heads, heads.num_kv_heads, heads.head_dim);
    let n_rep = nh / nkv;
    let width = qw + 2 * kw;
    let mut d_qkv = vec![0f32; n * width];
    let dq_ptr = SharedMut(d_qkv.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..geo.rows).flat_map(|r| (0..nkv).map(move |g| (r, g))).collect();
    // A task owns one row's kv head: its k/v columns, and the q columns of its heads.
    tasks.into_par_iter().for_each(|(r, kvh)| {
        let base = r * geo.len;
        for blk in &geo.blocks[r] {
            let nk = blk.keys.len();
            let (kb, vb) = gather_kv(qkv, width, base, &blk.keys, qw + kvh * d, qw + kw + kvh * d, d);
            let (mut dkb, mut dvb) = (vec![0f32; nk * d], vec![0f32; nk * d]);
            let (mut p, mut ds) = (vec![0f32; TILE * nk], vec![0f32; TILE * nk]);
            let mut cap_grad = if heads.softcap.is_some() { vec![0f32; TILE * nk] } else { Vec::new() };
            for head in kvh * n_rep..(kvh + 1) * n_rep {
                for &(q0, q1, used) in &blk.tiles {
                    let (m, q_row) = (q1 - q0, base + blk.q_start + q0);
                    let (pt, dst) = (&mut p[..m * used], &mut ds[..m * used]);
                    let q = &qkv[q_row * width + head * d..];
                    let cg = heads.softcap.map(|_| &mut cap_grad[..m * used]);
                    heads.scores(pt, cg, q, width, &kb, used, m, |i| (q0 + i) * nk..(q0 + i) * nk + used, &blk.mask);
                    for i in 0..m {
                        kernels::exp_shift_sum(&mut pt[i * used..(i + 1) * used], lse[head * n + q_row + i]);
                    }
                    let dob = &d_o[q_row * qw + head * d..];
                    // dV += Pᵀ·dO ; dP = dO·Vᵀ ; dS = P∘(dP − rowsum(dO∘O)) (∘ the cap's derivative)
                    Gemm::at_b(used, d, m).serial().run(&mut dvb, d, pt, used, dob, qw, true, 1.0);
                    Gemm::a_bt(m, used, d).serial().run(dst, used, dob, qw, &vb, d, false, 1.0);
                    for i in 0..m {
                        let at = (q_row + i) * qw + head * d;
                        let d_row = kernels::dot(&d_o[at..at + d], &o[at..at + d]);
                        kernels::softmax_bwd(&mut dst[i * used..(i + 1) * used], &pt[i * used..(i + 1) * used], d_row);
                    }
                    if let Some(cap) = heads.softcap {
                        kernels::softcap_grad(dst, &cap_grad[..m * used], cap);
                    }
                    // SAFETY: q columns of `head`, rows of this block: this task only.
                    unsafe {
                        Gemm::a_b(m, d, used).serial().run_raw(
                            dq_ptr.ptr().add(q_row * width + head * d),
                            width,
                            dst.as_ptr(),
                            used,
                            kb.as_ptr(),
                            d,
                            false,
                            heads.scale,
                        )
                    };
                    Gemm::at_b(used, d, m).serial().run(&mut dkb, d, dst, used, q, width, true, heads.scale);
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

/// The keys and values `[nk, d]` of one kv head at the given token indices.
fn gather_kv(
    qkv: &[f32],
    width: usize,
    base: usize,
    keys: &[u32],
    k_col: usize,
    v_col: usize,
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (mut kb, mut vb) = (Vec::with_capacity(keys.len() * d), Vec::with_capacity(keys.len() * d));
    for &key in keys {
        let row = (base + key as usize) * width;
        kb.extend_from_slice(&qkv[row + k_col..row + k_col + d]);
        vb.extend_from_slice(&qkv[row + v_col..row + v_col + d]);
    }
    (kb, vb)
}
