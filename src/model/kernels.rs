//! Plain f32 slice kernels for the CPU decoder layer ([`super::cpu_layer`]): strided GEMMs that
//! accumulate in place (so a residual add or a LoRA delta costs no extra pass), and the
//! vectorised elementwise loops (exp, softmax rows, SiLU, RMSNorm, RoPE) that candle runs as
//! many separate, allocating, scalar passes; and the borrow of a candle CPU storage as an f32
//! slice that the custom ops start from.
//!
//! The elementwise loops are written so LLVM vectorises them, and compiled three times (AVX-512,
//! AVX2+FMA, baseline) with the widest one the CPU has picked at run time.
//!
//! ```
//! use dpo::model::kernels::{Gemm, exp_shift_sum};
//! // C[2×2] = A[2×3] · B[2×3]ᵀ
//! let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let b = [1.0f32, 0.0, 0.0, 0.0, 1.0, 0.0];
//! let mut c = [0f32; 4];
//! Gemm::a_bt(2, 2, 3).run(&mut c, 2, &a, 3, &b, 3, false, 1.0);
//! assert_eq!(c, [1.0, 2.0, 4.0, 5.0]);
//! let mut row = [0.0f32, 1.0f32.ln()];
//! assert!((exp_shift_sum(&mut row, 0.0) - 2.0).abs() < 1e-6);
//! ```
use candle_core::{CpuStorage, Layout, Storage, bail};
use gemm::Parallelism;
use rayon::prelude::*;

/// The f32 elements of a contiguous CPU storage (what a custom op's `cpu_fwd` receives).
pub fn cpu_storage_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("CPU kernel: input must be contiguous"),
        _ => bail!("CPU kernel: f32 input expected"),
    }
}

/// As [`cpu_storage_f32`], for a tensor's storage (`Tensor::storage_and_layout`).
pub fn storage_f32<'a>(s: &'a Storage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(c) => cpu_storage_f32(c, l),
        _ => bail!("CPU kernel: CPU tensors only"),
    }
}

/// The shape and operand orientation of one `C (+)= scale · op(A) · op(B)`, C `[m, n]` row-major.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    a_t: bool,
    b_t: bool,
    threads: usize,
}

impl Gemm {
    /// `C = A · Bᵀ`: A `[m, k]`, B `[n, k]` (a linear layer: x · Wᵀ).
    pub fn a_bt(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k, a_t: false, b_t: true, threads: rayon::current_num_threads() }
    }

    /// `C = A · B`: A `[m, k]`, B `[k, n]` (a linear layer's dX = dY · W).
    pub fn a_b(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k, a_t: false, b_t: false, threads: rayon::current_num_threads() }
    }

    /// `C = Aᵀ · B`: A `[k, m]`, B `[k, n]` (a weight gradient dYᵀ · X).
    pub fn at_b(m: usize, n: usize, k: usize) -> Self {
        Self { m, n, k, a_t: true, b_t: false, threads: rayon::current_num_threads() }
    }

    /// Single-threaded: for GEMMs run inside an already parallel loop.
    pub fn serial(mut self) -> Self {
        self.threads = 1;
        self
    }

    /// `C = scale·op(A)·op(B)`, or `C += scale·op(A)·op(B)` when `accumulate`; `ldX` are row strides.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        c: &mut [f32],
        ldc: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        accumulate: bool,
        scale: f32,
    ) {
        let (a_rows, a_cols) = if self.a_t { (self.k, self.m) } else { (self.m, self.k) };
        let (b_rows, b_cols) = if self.b_t { (self.n, self.k) } else { (self.k, self.n) };
        assert!(
            needs(c.len(), self.m, self.n, ldc)
                && needs(a.len(), a_rows, a_cols, lda)
                && needs(b.len(), b_rows, b_cols, ldb),
            "gemm operand too small"
        );
        // SAFETY: the asserts above keep every access inside the three slices.
        unsafe { self.run_raw(c.as_mut_ptr(), ldc, a.as_ptr(), lda, b.as_ptr(), ldb, accumulate, scale) }
    }

    /// As [`Gemm::run`] on raw pointers, for disjoint blocks of one buffer written in parallel.
    ///
    /// # Safety
    /// Every element the GEMM reads or writes must be in bounds, and no other thread may write
    /// the `C` block (or read it) while this runs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_raw(
        &self,
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        accumulate: bool,
        scale: f32,
    ) {
        if self.m == 0 || self.n == 0 {
            return;
        }
        // (row stride, column stride) of op(A) [m, k] and op(B) [k, n].
        let (a_rs, a_cs) = if self.a_t { (1, lda as isize) } else { (lda as isize, 1) };
        let (b_rs, b_cs) = if self.b_t { (1, ldb as isize) } else { (ldb as isize, 1) };
        let par = if self.threads > 1 && self.m * self.n * self.k >= 1 << 18 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        };
        // SAFETY: the caller's contract.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                self.k,
                c,
                1,
                ldc as isize,
                accumulate && self.k > 0,
                a,
                a_cs,
                a_rs,
                b,
                b_cs,
                b_rs,
                1.0,
                scale,
                false,
                false,
                false,
                par,
            );
        }
        if self.k == 0 && !accumulate {
            for i in 0..self.m {
                // SAFETY: as above.
                unsafe { std::ptr::write_bytes(c.add(i * ldc), 0, self.n) };
            }
        }
    }
}

fn needs(len: usize, rows: usize, cols: usize, ld: usize) -> bool {
    rows == 0 || cols == 0 || (ld >= cols && len >= (rows - 1) * ld + cols)
}

/// A pointer that may cross into rayon tasks that write disjoint parts of its buffer.
#[derive(Clone, Copy)]
pub struct SharedMut(pub *mut f32);
// SAFETY: users only write disjoint ranges from different tasks (stated at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    pub fn ptr(&self) -> *mut f32 {
        self.0
    }
}

// ---------------------------------------------------------------- vectorised elementwise loops

/// Compiles `$body` (a generic `#[inline(always)]` fn call) for AVX-512, AVX2+FMA and the
/// baseline, and calls the widest the CPU supports.
macro_rules! dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $generic:ident) => {
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) -> $ret { $generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn mid($($arg: $ty),*) -> $ret { $generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq") && std::arch::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the features were detected.
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were detected.
                    return unsafe { mid($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

const LANES: usize = 16;

/// `eˣ` to about 1 ulp (Cephes' polynomial after range reduction by ln 2), branch-free so it
/// vectorises; `x` below −87.3 (including −∞) gives 0.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer in the low bits
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    // ln 2 split in two so n·C1 is exact (Cephes).
    let r = xc - n * 0.693_359_4;
    let r = r + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let n_int = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((n_int.wrapping_add(127) << 23) as u32);
    if x < -87.3 { 0.0 } else { e * scale }
}

#[inline(always)]
fn max_generic(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    tail.iter().chain(acc.iter()).copied().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn exp_shift_sum_generic(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp_f32(c[i] - shift);
            acc[i] += c[i];
        }
    }
    let mut sum: f32 = 0.0;
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - shift);
        sum += *v;
    }
    sum + acc.iter().sum::<f32>()
}

#[inline(always)]
fn sum_exp_shift_generic(xs: &[f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += exp_f32(c[i] - shift);
        }
    }
    tail.iter().map(|&v| exp_f32(v - shift)).sum::<f32>() + acc.iter().sum::<f32>()
}

#[inline(always)]
fn exp_shift_scale_generic(xs: &mut [f32], shift: f32, factor: f32) {
    for x in xs.iter_mut() {
        *x = factor * exp_f32(*x - shift);
    }
}

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    tail + acc.iter().sum::<f32>()
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

/// `tanh x` to about 1e-7 absolute (Cephes: a polynomial below 0.625, `1 − 2/(e^{2|x|}+1)` above),
/// branch-free so it vectorises.
#[inline(always)]
fn tanh_f32(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let small =
        ((((-5.704_989e-3 * z + 2.063_909e-2) * z - 5.373_971_6e-2) * z + 1.333_144_2e-1) * z - 3.333_328e-1) * z * x
            + x;
    let large = 1.0 - 2.0 / (exp_f32(2.0 * a) + 1.0);
    if a < 0.625 { small } else { large.copysign(x) }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

#[inline(always)]
fn gelu_tanh_mul_generic(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let t = tanh_f32(SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g));
        *o = 0.5 * g * (1.0 + t) * u;
    }
}

#[inline(always)]
fn gelu_tanh_mul_bwd_generic(d_gate: &mut [f32], d_up: &mut [f32], gate: &[f32], up: &[f32], d_out: &[f32]) {
    for i in 0..d_out.len() {
        let (g, u, d) = (gate[i], up[i], d_out[i]);
        let t = tanh_f32(SQRT_2_OVER_PI * (g + GELU_CUBIC * g * g * g));
        // d/dg [½g(1 + t)] = ½(1 + t) + ½g(1 − t²)·√(2/π)(1 + 3·0.044715·g²)
        let dg = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * g * g);
        d_gate[i] = d * u * dg;
        d_up[i] = d * 0.5 * g * (1.0 + t);
    }
}

#[inline(always)]
fn softcap_generic(xs: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for x in xs.iter_mut() {
        *x = cap * tanh_f32(*x * inv);
    }
}

#[inline(always)]
fn softcap_grad_generic(ds: &mut [f32], capped: &[f32], cap: f32) {
    // d/dx cap·tanh(x/cap) = 1 − tanh² = 1 − (capped/cap)²
    let inv = 1.0 / cap;
    for (d, &c) in ds.iter_mut().zip(capped) {
        let t = c * inv;
        *d *= 1.0 - t * t;
    }
}

#[inline(always)]
fn softcapped_logit_grad_generic(row: &mut [f32], lse: f32, g: f32, cap: f32) {
    // row holds the capped logits c; becomes −g·softmax(c)·(1 − (c/cap)²).
    let inv = 1.0 / cap;
    for c in row.iter_mut() {
        let t = *c * inv;
        *c = -g * exp_f32(*c - lse) * (1.0 - t * t);
    }
}

#[inline(always)]
fn softmax_moments_generic(xs: &[f32], shift: f32) -> [f32; 4] {
    // (Σ e, Σ e·x, Σ e², Σ x) with e = exp(x − shift)
    let (mut s1, mut s2, mut s3, mut s4) = ([0f32; LANES], [0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let e = exp_f32(c[i] - shift);
            s1[i] += e;
            s2[i] += e * c[i];
            s3[i] += e * e;
            s4[i] += c[i];
        }
    }
    let mut out = [0f32, s2.iter().sum::<f32>(), s3.iter().sum::<f32>(), s4.iter().sum::<f32>()];
    for &x in tail {
        let e = exp_f32(x - shift);
        out[1] += e * x;
        out[2] += e * e;
        out[3] += x;
    }
    // Σ e summed in `sum_exp_shift`'s order, so the log-sum-exp is the same bits either way.
    out[0] = tail.iter().map(|&v| exp_f32(v - shift)).sum::<f32>() + s1.iter().sum::<f32>();
    out
}

#[inline(always)]
fn silu_mul_generic(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g * sigmoid(g) * u;
    }
}

#[inline(always)]
fn silu_mul_bwd_generic(d_gate: &mut [f32], d_up: &mut [f32], gate: &[f32], up: &[f32], d_out: &[f32]) {
    for i in 0..d_out.len() {
        let (g, u, d) = (gate[i], up[i], d_out[i]);
        let s = sigmoid(g);
        // d/dg [g·σ(g)] = σ(g)·(1 + g·(1 − σ(g)))
        d_gate[i] = d * u * s * (1.0 + g * (1.0 - s));
        d_up[i] = d * g * s;
    }
}

#[inline(always)]
fn softmax_bwd_generic(ds: &mut [f32], p: &[f32], d_row: f32) {
    // ds holds dP on entry: dS = P ∘ (dP − D)
    for (d, &pv) in ds.iter_mut().zip(p) {
        *d = pv * (*d - d_row);
    }
}

#[inline(always)]
fn add_mask_generic(s: &mut [f32], mask: &[f32]) {
    for (v, &m) in s.iter_mut().zip(mask) {
        *v += m;
    }
}

dispatch!(row_max(xs: &[f32]) -> f32 = max_generic);
dispatch!(softmax_moments(xs: &[f32], shift: f32) -> [f32; 4] = softmax_moments_generic);
dispatch!(exp_shift_sum(xs: &mut [f32], shift: f32) -> f32 = exp_shift_sum_generic);
dispatch!(sum_exp_shift(xs: &[f32], shift: f32) -> f32 = sum_exp_shift_generic);
dispatch!(exp_shift_scale(xs: &mut [f32], shift: f32, factor: f32) -> () = exp_shift_scale_generic);
dispatch!(dot(a: &[f32], b: &[f32]) -> f32 = dot_generic);
dispatch!(silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) -> () = silu_mul_generic);
dispatch!(silu_mul_bwd(d_gate: &mut [f32], d_up: &mut [f32], gate: &[f32], up: &[f32], d_out: &[f32]) -> () = silu_mul_bwd_generic);
dispatch!(softmax_bwd(ds: &mut [f32], p: &[f32], d_row: f32) -> () = softmax_bwd_generic);
dispatch!(add_mask(s: &mut [f32], mask: &[f32]) -> () = add_mask_generic);
dispatch!(gelu_tanh_mul(out: &mut [f32], gate: &[f32], up: &[f32]) -> () = gelu_tanh_mul_generic);
dispatch!(gelu_tanh_mul_bwd(d_gate: &mut [f32], d_up: &mut [f32], gate: &[f32], up: &[f32], d_out: &[f32]) -> () = gelu_tanh_mul_bwd_generic);
dispatch!(softcap(xs: &mut [f32], cap: f32) -> () = softcap_generic);
dispatch!(softcap_grad(ds: &mut [f32], capped: &[f32], cap: f32) -> () = softcap_grad_generic);
dispatch!(softcapped_logit_grad(row: &mut [f32], lse: f32, g: f32, cap: f32) -> () = softcapped_logit_grad_generic);

/// `ln Σ exp(row)`, stable.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row_max(row);
    max + sum_exp_shift(row, max).ln()
}

/// Softmax of a row in place; returns its log-sum-exp (kept for the backward recompute).
pub fn softmax_in_place(row: &mut [f32]) -> f32 {
    let max = row_max(row);
    let sum = exp_shift_sum(row, max);
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
    max + sum.ln()
}

/// HF RMSNorm of each row: `(x·r·w, r)` with `r = 1/√(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], w: &[f32], h: usize, eps: f64) -> (Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; x.len()];
    let mut inv = vec![0f32; x.len() / h];
    y.par_chunks_mut(h).zip(x.par_chunks(h)).zip(inv.par_iter_mut()).for_each(|((y, x), r)| {
        let ms = dot(x, x) / h as f32;
        *r = 1.0 / (ms + eps as f32).sqrt();
        for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
            *y = x * *r * w;
        }
    });
    (y, inv)
}

/// `dx += RMSNorm backward` of `dy` (the norm weight is frozen: no gradient for it).
pub fn rms_norm_backward(dx: &mut [f32], dy: &[f32], x: &[f32], inv: &[f32], w: &[f32], h: usize) {
    dx.par_chunks_mut(h).zip(dy.par_chunks(h)).zip(x.par_chunks(h)).zip(inv.par_iter()).for_each(
        |(((dx, dy), x), &r)| {
            // x̂ = x·r, d̂ = dy·w: dx = (d̂ − x̂·mean(d̂·x̂))·r
            let proj: f32 = dy.iter().zip(w).zip(x).map(|((d, w), x)| d * w * x * r).sum::<f32>() / h as f32;
            for (((dx, &d), &w), &x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *dx += (d * w - x * r * proj) * r;
            }
        },
    );
}

/// RMSNorm in place over `seg`-wide segments of columns `[col, col + cols)` of each
/// `width`-wide row (per-head or across-heads q/k norms); returns `1/rms` per (row, segment).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_segments(
    buf: &mut [f32],
    width: usize,
    col: usize,
    cols: usize,
    seg: usize,
    w: &[f32],
    eps: f64,
) -> Vec<f32> {
    let per_row = cols / seg;
    let mut inv = vec![0f32; buf.len() / width * per_row];
    buf.par_chunks_mut(width).zip(inv.par_chunks_mut(per_row)).for_each(|(row, inv)| {
        for (x, r) in row[col..col + cols].chunks_exact_mut(seg).zip(inv.iter_mut()) {
            *r = 1.0 / (dot(x, x) / seg as f32 + eps as f32).sqrt();
            for (x, &w) in x.iter_mut().zip(w) {
                *x *= *r * w;
            }
        }
    });
    inv
}

/// Backward of [`rms_norm_segments`] in place: the gradient of the normed columns in `d`
/// becomes the gradient of the raw ones (`raw` laid out like `d`).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_segments_backward(
    d: &mut [f32],
    raw: &[f32],
    inv: &[f32],
    width: usize,
    col: usize,
    cols: usize,
    seg: usize,
    w: &[f32],
) {
    let per_row = cols / seg;
    d.par_chunks_mut(width).zip(raw.par_chunks(width)).zip(inv.par_chunks(per_row)).for_each(|((d, raw), inv)| {
        for ((d, x), &r) in
            d[col..col + cols].chunks_exact_mut(seg).zip(raw[col..col + cols].chunks_exact(seg)).zip(inv)
        {
            let proj: f32 = d.iter().zip(w).zip(x).map(|((d, w), x)| d * w * x * r).sum::<f32>() / seg as f32;
            for ((d, &w), &x) in d.iter_mut().zip(w).zip(x) {
                *d = (*d * w - x * r * proj) * r;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 + i as f32 * (175.0 / 200_000.0);
            let want = x.exp();
            worst = worst.max(((exp_f32(x) - want) / want).abs());
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
    }

    #[test]
    fn dispatched_loops_match_scalar_definitions() {
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let want_lse = xs.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((log_sum_exp(&xs) - want_lse).abs() < 1e-5);
        assert_eq!(row_max(&xs), xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mut p = xs.clone();
        let lse = softmax_in_place(&mut p);
        assert!((lse - want_lse).abs() < 1e-5);
        for (pi, x) in p.iter().zip(&xs) {
            assert!((pi - (x - want_lse).exp()).abs() < 1e-6);
        }
        let d: f32 = xs.iter().zip(&p).map(|(a, b)| a * b).sum();
        assert!((dot(&xs, &p) - d).abs() < 1e-5);
        let (mut out, mut dg, mut du) = (vec![0f32; 37], vec![0f32; 37], vec![0f32; 37]);
        silu_mul(&mut out, &xs, &p);
        silu_mul_bwd(&mut dg, &mut du, &xs, &p, &xs);
        for i in 0..37 {
            let (g, u) = (xs[i] as f64, p[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            assert!((out[i] as f64 - g * s * u).abs() < 1e-5);
            assert!((dg[i] as f64 - g * u * s * (1.0 + g * (1.0 - s))).abs() < 1e-4);
            assert!((du[i] as f64 - g * g * s).abs() < 1e-4);
        }
    }

    #[test]
    fn tanh_and_gelu_match_their_definitions() {
        let mut worst = 0f64;
        for i in 0..200_000 {
            let x = -12.0 + i as f32 * (24.0 / 200_000.0);
            worst = worst.max((tanh_f32(x) as f64 - (x as f64).tanh()).abs());
        }
        assert!(worst < 2e-7, "tanh max abs error {worst:e}");
        let xs: Vec<f32> = (0..41).map(|i| (i as f32 - 20.0) * 0.3).collect();
        let ones = vec![1f32; xs.len()];
        let (mut out, mut dg, mut du) = (vec![0f32; 41], vec![0f32; 41], vec![0f32; 41]);
        gelu_tanh_mul(&mut out, &xs, &ones);
        gelu_tanh_mul_bwd(&mut dg, &mut du, &xs, &ones, &ones);
        let gelu = |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
        for i in 0..41 {
            let x = xs[i] as f64;
            assert!((out[i] as f64 - gelu(x)).abs() < 1e-5, "gelu({x})");
            let fd = (gelu(x + 1e-5) - gelu(x - 1e-5)) / 2e-5;
            assert!((dg[i] as f64 - fd).abs() < 1e-4, "gelu'({x}): {} vs {fd}", dg[i]);
            assert_eq!(du[i], out[i]);
        }
        let mut capped = xs.clone();
        softcap(&mut capped, 5.0);
        for (c, x) in capped.iter().zip(&xs) {
            assert!((*c as f64 - 5.0 * (*x as f64 / 5.0).tanh()).abs() < 1e-6);
        }
    }

    #[test]
    fn segment_norm_backward_matches_finite_differences() {
        // Two rows of width 6: columns 1..5 normed in two segments of 2.
        let raw: Vec<f32> = (0..12).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.7 + 0.1).collect();
        let w = [1.5f32, -0.5];
        let forward = |x: &[f32]| {
            let mut b = x.to_vec();
            rms_norm_segments(&mut b, 6, 1, 4, 2, &w, 1e-6);
            b
        };
        let probe: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).cos()).collect();
        let mut b = raw.clone();
        let inv = rms_norm_segments(&mut b, 6, 1, 4, 2, &w, 1e-6);
        let mut d = probe.clone();
        rms_norm_segments_backward(&mut d, &raw, &inv, 6, 1, 4, 2, &w);
        for j in [1usize, 2, 3, 4, 7, 10] {
            let (mut p, mut m) = (raw.clone(), raw.clone());
            p[j] += 1e-3;
            m[j] -= 1e-3;
            let f = |v: Vec<f32>| v.iter().zip(&probe).map(|(a, b)| (a * b) as f64).sum::<f64>();
            let fd = (f(forward(&p)) - f(forward(&m))) / 2e-3;
            assert!((d[j] as f64 - fd).abs() < 2e-3, "col {j}: {} vs {fd}", d[j]);
        }
    }

    #[test]
    fn gemm_orientations_and_accumulation() {
        // A [2, 3], B [3, 2]
        let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut c = [1f32; 4];
        Gemm::a_b(2, 2, 3).run(&mut c, 2, &a, 3, &b, 2, true, 2.0);
        assert_eq!(c, [1.0 + 2.0 * 22.0, 1.0 + 2.0 * 28.0, 1.0 + 2.0 * 49.0, 1.0 + 2.0 * 64.0]);
        // Aᵀ · A with A [2, 3] → [3, 3]
        let mut c = [0f32; 9];
        Gemm::at_b(3, 3, 2).run(&mut c, 3, &a, 3, &a, 3, false, 1.0);
        assert_eq!(c[..3], [17.0, 22.0, 27.0]);
        // k = 0 writes zeros.
        let mut c = [5f32; 4];
        Gemm::a_bt(2, 2, 0).run(&mut c, 2, &[], 0, &[], 0, false, 1.0);
        assert_eq!(c, [0.0; 4]);
    }
}
