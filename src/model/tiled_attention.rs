//! Scaled dot-product attention in query tiles, on any device: no `[heads, len, len]` tensor
//! is ever kept — forward keeps the output and one log-sum-exp per query, and backward
//! recomputes each tile's probabilities from them (FlashAttention's scheme, written with
//! candle tensor ops). Scores are `scale·q·kᵀ`, soft-capped as `cap·tanh(s/cap)` when the
//! family caps them, masked additively, softmaxed in f32 (as transformers does) and cast back
//! to the compute dtype before `·v`. A tile's queries only see keys up to their own position,
//! so each tile reads the keys before its end and no further.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let q = Tensor::ones((1, 1, 3, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
//! let v = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((1, 1, 3, 2)).unwrap();
//! let mask = dpo::nn::layout::TokenLayout::causal(1, 3).mask(None, candle_core::DType::F32, &Device::Cpu).unwrap();
//! let o = dpo::model::tiled_attention::attention(&q, &q, &v, &mask, 1.0, None, 2).unwrap();
//! // All scores are equal: each query averages the values it sees.
//! let want = [0.0, 1.0, 1.0, 2.0, 2.0, 3.0];
//! assert!(o.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6));
//! ```
use crate::nn::attach::{Backward, attach};
use candle_core::{D, DType, Result, Tensor};

/// Query rows per tile.
pub const TILE: usize = 256;

/// Attention of `q` over `k`, `v` (all `[rows, heads, len, head_dim]`, k and v already repeated
/// for grouped-query attention), with the additive `mask` `[rows, 1, len, len]` (f32).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    tile: usize,
) -> Result<Tensor> {
    let spec = Spec { mask: mask.clone(), scale, softcap, tile: tile.max(1) };
    let (q_, k_, v_) = (q.detach(), k.detach(), v.detach());
    let (o, lse) = spec.forward(&q_, &k_, &v_)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(o);
    }
    attach(o, &[q, k, v], TiledBackward { spec, lse })
}

#[derive(Clone)]
struct Spec {
    mask: Tensor,
    scale: f64,
    softcap: Option<f64>,
    tile: usize,
}

/// One tile's scores, before and after capping and masking: `(capped, masked f32)`.
struct Scores {
    capped: Option<Tensor>,
    masked: Tensor,
}

impl Spec {
    /// `(end of the tile, keys the tile may see)`.
    fn bounds(&self, t0: usize, len: usize) -> (usize, usize) {
        let t1 = (t0 + self.tile).min(len);
        (t1, t1)
    }

    fn scores(&self, q: &Tensor, k: &Tensor, t0: usize, t1: usize) -> Result<Scores> {
        let s = (q.narrow(2, t0, t1 - t0)?.matmul(&k.narrow(2, 0, t1)?.t()?)? * self.scale)?;
        let capped = match self.softcap {
            Some(c) => Some(((&s / c)?.tanh()? * c)?),
            None => None,
        };
        let s = capped.as_ref().unwrap_or(&s);
        let mask = self.mask.narrow(2, t0, t1 - t0)?.narrow(3, 0, t1)?;
        let masked = s.to_dtype(DType::F32)?.broadcast_add(&mask.to_dtype(DType::F32)?)?;
        Ok(Scores { capped, masked })
    }

    /// `(o, lse)`: the output `[rows, heads, len, d]` and each query's log-sum-exp (f32).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let len = q.dim(2)?;
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for t0 in (0..len).step_by(self.tile) {
            let (t1, keys) = self.bounds(t0, len);
            let s = self.scores(q, k, t0, t1)?.masked;
            let max = s.max_keepdim(D::Minus1)?;
            let lse = (s.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
            let p = s.broadcast_sub(&lse)?.exp()?.to_dtype(q.dtype())?;
            outs.push(p.matmul(&v.narrow(2, 0, keys)?.contiguous()?)?);
            lses.push(lse);
        }
        Ok((Tensor::cat(&outs, 2)?, Tensor::cat(&lses, 2)?))
    }
}

struct TiledBackward {
    spec: Spec,
    lse: Tensor,
}

impl Backward for TiledBackward {
    fn name(&self) -> &'static str {
        "tiled-attention"
    }

    fn backward(&self, inputs: &[Tensor], o: &Tensor, d_o: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (q, k, v) = (&inputs[0], &inputs[1], &inputs[2]);
        let s = &self.spec;
        let (len, dtype) = (q.dim(2)?, q.dtype());
        let pad = |t: Tensor, keys: usize| if keys == len { Ok(t) } else { t.pad_with_zeros(2, 0, len - keys) };
        // D = rowsum(dO ∘ O), f32.
        let d_rows = (d_o.to_dtype(DType::F32)? * o.to_dtype(DType::F32)?)?.sum_keepdim(D::Minus1)?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        for t0 in (0..len).step_by(s.tile) {
            let (t1, keys) = s.bounds(t0, len);
            let sc = s.scores(q, k, t0, t1)?;
            let lse = self.lse.narrow(2, t0, t1 - t0)?;
            let p = sc.masked.broadcast_sub(&lse)?.exp()?;
            let do_t = d_o.narrow(2, t0, t1 - t0)?;
            let (k_t, v_t) = (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?);
            // dV += Pᵀ·dO ; dP = dO·Vᵀ ; dS = P∘(dP − D) (∘ the cap's derivative)
            let dv_t = p.to_dtype(dtype)?.t()?.matmul(&do_t)?;
            let dp = do_t.matmul(&v_t.t()?)?.to_dtype(DType::F32)?;
            let mut ds = (p * dp.broadcast_sub(&d_rows.narrow(2, t0, t1 - t0)?)?)?;
            if let (Some(cap), Some(c)) = (s.softcap, &sc.capped) {
                let t = (c.to_dtype(DType::F32)? / cap)?;
                ds = (ds * (1.0 - t.sqr()?)?)?;
            }
            let ds = ds.to_dtype(dtype)?;
            dq.push((ds.matmul(&k_t)? * s.scale)?);
            let dk_t = pad((ds.t()?.matmul(&q.narrow(2, t0, t1 - t0)?)? * s.scale)?, keys)?;
            let dv_t = pad(dv_t, keys)?;
            dk = Some(match dk {
                None => dk_t,
                Some(acc) => (acc + dk_t)?,
            });
            dv = Some(match dv {
                None => dv_t,
                Some(acc) => (acc + dv_t)?,
            });
        }
        Ok(vec![Some(Tensor::cat(&dq, 2)?), dk, dv])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::layout::{PAD, TokenLayout};
    use candle_core::{Device, Var};

    /// The composite attention candle differentiates itself.
    fn composite(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64, softcap: Option<f64>) -> Tensor {
        let s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let s = match softcap {
            Some(c) => ((s / c).unwrap().tanh().unwrap() * c).unwrap(),
            None => s,
        };
        candle_nn::ops::softmax(&s.broadcast_add(mask).unwrap(), D::Minus1).unwrap().matmul(v).unwrap()
    }

    fn rand(shape: (usize, usize, usize, usize), seed: u64) -> Var {
        let mut rng = crate::rng::SeededRng::new(seed, crate::rng::Stream::LoraInit);
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Var::from_vec((0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect::<Vec<f32>>(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn tiles_give_the_composite_values_and_gradients() {
        // Two rows: shared prompt of 3, branches of 4 and 3, one pad; tiles of 3.
        let layout = TokenLayout::new(2, 11, [vec![0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 0], vec![0; 11]].concat(), {
            let mut s = vec![0, 0, 0, 1, 1, 1, 1, 2, 2, 2, PAD];
            s.extend(std::iter::repeat_n(0u8, 11));
            s
        });
        let mask = layout.mask(Some(4), DType::F32, &Device::Cpu).unwrap();
        let (q, k, v) = (rand((2, 3, 11, 4), 1), rand((2, 3, 11, 4), 2), rand((2, 3, 11, 4), 3));
        let probe = rand((2, 3, 11, 4), 4);
        for softcap in [None, Some(0.7)] {
            let run = |tiled: bool| {
                let o = if tiled {
                    attention(&q, &k, &v, &mask, 0.6, softcap, 3).unwrap()
                } else {
                    composite(&q, &k, &v, &mask, 0.6, softcap)
                };
                let g = (&o * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (flat(&o), [&q, &k, &v].map(|x| flat(g.get(x).unwrap())))
            };
            let (a, b) = (run(true), run(false));
            let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
            assert!(close(&a.0, &b.0), "values, softcap {softcap:?}");
            for i in 0..3 {
                assert!(close(&a.1[i], &b.1[i]), "gradient {i}, softcap {softcap:?}");
            }
        }
    }
}
