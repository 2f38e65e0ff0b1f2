//! LoRA deltas on plain buffers for the CPU layer op: the adapters of linears that read the
//! same input form a group, whose `x·Aᵀ` products share one GEMM when no dropout mask tells
//! them apart.
use crate::model::kernels::Gemm;
use rayon::prelude::*;
use std::borrow::Cow;

/// One linear's adapter as slices: `A` `[r, in]`, `B` `[out, r]`, where they sit in the op's
/// flattened inputs, and the output columns the linear writes.
pub(super) struct Adapter<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub a_off: usize,
    pub b_off: usize,
    pub rank: usize,
    pub scale: f32,
    pub mask: Option<&'a [f32]>,
    /// First output column and width in the group's output buffer.
    pub col: usize,
    pub out: usize,
}

/// The op's adapter gradients, `dA` and `dB` laid out as its flattened inputs.
pub(super) struct LoraGrads {
    pub da: Vec<f32>,
    pub db: Vec<f32>,
}

/// Adapters whose `A`s can be applied as one `[Σr, in]` matrix: no dropout masks, and their
/// `A`s adjacent in the flattened input (always so for one layer's group: only linears with an
/// adapter are flattened, in order).
fn stacked(group: &[Adapter]) -> bool {
    group.iter().all(|g| g.mask.is_none()) && group.windows(2).all(|p| p[0].a_off + p[0].a.len() == p[1].a_off)
}

fn masked<'a>(x: &'a [f32], mask: Option<&[f32]>) -> Cow<'a, [f32]> {
    match mask {
        None => Cow::Borrowed(x),
        Some(m) => Cow::Owned(x.iter().zip(m).map(|(a, b)| a * b).collect()),
    }
}

/// LoRA deltas of a group of linears that read the same `x` `[n, in]`: `u_i = (x∘mask_i)·A_iᵀ`
/// (one GEMM for the whole group when [`stacked`]), then `y[:, col_i..] += s_i·u_i·B_iᵀ`.
/// Returns the `u`s side by side, `[n, Σr]`, for backward.
pub(super) fn forward(
    x: &[f32],
    n: usize,
    in_dim: usize,
    group: &[Adapter],
    a: &[f32],
    y: &mut [f32],
    ldy: usize,
) -> Vec<f32> {
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
            Gemm::a_bt(n, g.rank, in_dim).run(
                &mut u[col..],
                ranks,
                &masked(x, g.mask),
                in_dim,
                g.a,
                in_dim,
                false,
                1.0,
            );
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

/// Backward of [`forward`]: `dB_i = s·dy_iᵀ·u_i`, `du_i = s·dy_i·B_i`, `dA_i = du_iᵀ·(x∘mask_i)`,
/// and `dx += Σ (du_i·A_i)∘mask_i` when the input needs a gradient (one GEMM each for a
/// [`stacked`] group). `dy` is the group's output gradient, row stride `ldy`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    dy: &[f32],
    ldy: usize,
    n: usize,
    in_dim: usize,
    group: &[Adapter],
    a: &[f32],
    u: &[f32],
    x: &[f32],
    dx: Option<&mut [f32]>,
    g: &mut LoraGrads,
) {
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
