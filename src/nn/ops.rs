//! Differentiable building blocks for the decoder that candle's fused ops lack.
//!
//! candle 0.11's fused `rms_norm`, `softmax_last_dim` and `rope*` have no backward
//! and silently cut the graph, so the training path uses compositions (RMSNorm in
//! [`crate::model::generic_layer`], RoPE below).
//! `frozen_matmul` is the one custom op: `x · Wᵀ` for a weight that is never
//! trained, whose backward returns dX only (candle's `Matmul` would also compute
//! and keep a full dW for every frozen matrix).
//!
//! ```no_run
//! # use candle_core::{Device, Tensor};
//! # fn main() -> candle_core::Result<()> {
//! let w = Tensor::ones((8, 4), candle_core::DType::F32, &Device::Cpu)?; // [out, in]
//! let x = Tensor::ones((3, 4), candle_core::DType::F32, &Device::Cpu)?;
//! let y = dpo::nn::ops::frozen_matmul(&x, &w)?; // [3, 8]
//! # Ok(()) }
//! ```
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, D, Layout, Result, Shape, Storage, Tensor};

/// `x · Wᵀ` for a frozen `W` of shape `[out, in]`; `x` is `[..., in]`.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().expect("frozen_matmul on a scalar");
    let rows = x.elem_count() / k;
    let x2 = x.contiguous()?.reshape((rows, k))?;
    let y = if w.track_op() {
        // A trained weight (full fine-tuning): candle's matmul, which also computes dW.
        x2.matmul(&w.t()?)?
    } else if x.track_op() {
        x2.apply_op1_arc(std::sync::Arc::new(Box::new(FrozenMatmul { w: w.clone() })))?
    } else {
        // Nothing upstream needs a gradient: a plain matmul records no graph either.
        x2.matmul(&w.t()?)?
    };
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = w.dim(0)?;
    y.reshape(out_dims)
}

struct FrozenMatmul {
    w: Tensor,
}

impl FrozenMatmul {
    /// Runs the backend matmul of `x` (`[m, k]`, contiguous) by `Wᵀ` directly on storages,
    /// so the result carries no graph node of its own.
    fn fwd<S: BackendStorage>(&self, x: &S, x_layout: &Layout, w: &S, w_layout: &Layout) -> Result<(S, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, k2) = w_layout.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen_matmul: input has {k} features, weight expects {k2}");
        }
        let wt = w_layout.transpose(0, 1)?;
        let out = x.matmul(w, (1, m, n, k), x_layout, &wt)?;
        Ok((out, Shape::from((m, n))))
    }
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, w_layout) = self.w.storage_and_layout();
        match &*w {
            Storage::Cpu(w) => self.fwd(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen_matmul: input on cpu, weight elsewhere"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, layout: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, w_layout) = self.w.storage_and_layout();
        match &*w {
            Storage::Cuda(w) => self.fwd(x, layout, w, w_layout),
            _ => candle_core::bail!("frozen_matmul: input on cuda, weight elsewhere"),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        // dX = dY · W ; no dW: the weight is frozen.
        Ok(Some(grad_y.detach().matmul(&self.w)?))
    }
}

/// `x·cos + rotate_half(x)·sin` (HF convention), `cos`/`sin` broadcastable to `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Repeats key/value heads for grouped-query attention: `[b, kv, t, d]` → `[b, kv·n_rep, t, d]`.
pub fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, n_rep, t, d))?.reshape((b, kv * n_rep, t, d))
}

/// `cap·tanh(x/cap)` (soft-capping), or `x` itself.
pub fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(c) => (x / c)?.tanh()? * c,
        None => Ok(x.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn frozen_matmul_equals_matmul_and_returns_only_dx() {
        let w = t(&[0.5, -1.0, 2.0, 0.25, 1.5, -0.75], (3, 2));
        let x = Var::from_tensor(&t(&[1.0, 2.0, -3.0, 0.5], (2, 2))).unwrap();
        let y = frozen_matmul(x.as_tensor(), &w).unwrap();
        let expected = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), expected.to_vec2::<f32>().unwrap());

        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let expected_grads = expected.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            grads.get(&x).unwrap().to_vec2::<f32>().unwrap(),
            expected_grads.get(&x).unwrap().to_vec2::<f32>().unwrap()
        );
        // The plain matmul leaves a dW behind for the frozen weight; ours does not.
        assert!(grads.get_ids().count() < expected_grads.get_ids().count());
    }

    #[test]
    fn rope_carries_gradients_and_leaves_position_zero() {
        let x =
            Var::from_tensor(&Tensor::arange(0f32, 16., &Device::Cpu).unwrap().reshape((1, 1, 2, 8)).unwrap()).unwrap();
        // cos/sin rows for positions 0 and 1, HF layout cat(freqs, freqs).
        let freqs: Vec<f32> = (0..4).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / 8.0)).collect();
        let table = |f: fn(f32) -> f32| {
            let v: Vec<f32> =
                [0.0f32, 1.0].iter().flat_map(|&p| freqs.iter().chain(&freqs).map(move |w| f(p * w))).collect();
            Tensor::from_vec(v, (1, 1, 2, 8), &Device::Cpu).unwrap()
        };
        let (cos, sin) = (table(f32::cos), table(f32::sin));
        let y = rope(x.as_tensor(), &cos, &sin).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        // Position 0 is not rotated; position 1 is.
        let row = |t: &Tensor, i: usize| t.get(0).unwrap().get(0).unwrap().get(i).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row(&y, 0), row(x.as_tensor(), 0));
        assert_ne!(row(&y, 1), row(x.as_tensor(), 1));
    }
}
