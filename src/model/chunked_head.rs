//! The head on any device, in row chunks: `log_softmax(softcap(h·Wᵀ))[target]` for the scored
//! rows, keeping only the hidden rows for backward. The forward never holds more than one
//! chunk's `[rows, vocab]` logits, and backward recomputes each chunk's softmax to turn it into
//! the logit gradient (`δ(j, t) − softmax_j`, times the cap's derivative) and `dh = dz·W`.
//! The logits, their soft-cap and the log-softmax are f32 whatever the compute dtype.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let w = Tensor::new(&[[0.0f32], [1.0], [2.0]], &Device::Cpu).unwrap(); // lm_head [vocab 3, hidden 1]
//! let h = Tensor::new(&[[1.0f32]], &Device::Cpu).unwrap();
//! let lp = dpo::model::chunked_head::lm_head_logps(&h, &w, &[2], None, None).unwrap();
//! let want = 2.0 - (1f32 + 1f32.exp() + 2f32.exp()).ln();
//! assert!((lp.to_vec1::<f32>().unwrap()[0] - want).abs() < 1e-6);
//! ```
use super::token_stats::{StatsSink, TokenStats};
use crate::nn::attach::{Backward, attach};
use crate::nn::ops::softcap;
use candle_core::{D, DType, Result, Tensor};

/// Logit elements per chunk (f32): 32 MiB, e.g. 256 rows of a 32k vocabulary.
const CHUNK_ELEMS: usize = 8 << 20;

/// `[rows]` f32 log-probs of `targets` for hidden rows `[rows, hidden]` and the frozen lm_head
/// `W` `[vocab, hidden]`.
pub fn lm_head_logps(
    hidden: &Tensor,
    w: &Tensor,
    targets: &[u32],
    cap: Option<f64>,
    stats: Option<&StatsSink>,
) -> Result<Tensor> {
    let (rows, vocab) = (hidden.dim(0)?, w.dim(0)?);
    if targets.len() != rows || targets.iter().any(|&t| t as usize >= vocab) {
        candle_core::bail!("lm_head_logps: {} targets for {rows} rows of a {vocab}-token vocabulary", targets.len());
    }
    let head = Head {
        w: w.clone(),
        targets: Tensor::new(targets, hidden.device())?,
        cap,
        chunk: (CHUNK_ELEMS / vocab).max(1),
        stats: Default::default(),
    };
    let value = head.logps(&hidden.detach(), stats.map(|_| targets))?;
    if let (Some(sink), Some(s)) = (stats, head.stats.lock().expect("stats").take()) {
        *sink.lock().expect("stats sink") = Some(s);
    }
    if !hidden.track_op() {
        return Ok(value);
    }
    attach(value, &[hidden], head)
}

struct Head {
    w: Tensor,
    /// `[rows]` u32.
    targets: Tensor,
    cap: Option<f64>,
    chunk: usize,
    stats: std::sync::Mutex<Option<TokenStats>>,
}

impl Head {
    /// One chunk's (capped) f32 logits.
    fn logits(&self, h: &Tensor) -> Result<Tensor> {
        softcap(&h.matmul(&self.w.t()?)?.to_dtype(DType::F32)?, self.cap)
    }

    fn chunks(&self, rows: usize) -> impl Iterator<Item = (usize, usize)> + use<'_> {
        (0..rows).step_by(self.chunk).map(move |r0| (r0, self.chunk.min(rows - r0)))
    }

    /// The log-probs; with `targets`, also the chunks' [`TokenStats`] (kept in `self.stats`).
    fn logps(&self, hidden: &Tensor, targets: Option<&[u32]>) -> Result<Tensor> {
        let mut out = Vec::new();
        let mut stats = TokenStats::default();
        for (r0, n) in self.chunks(hidden.dim(0)?) {
            let logits = self.logits(&hidden.narrow(0, r0, n)?)?;
            if let Some(t) = targets {
                stats.extend(chunk_stats(&logits, &t[r0..r0 + n])?);
            }
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let t = self.targets.narrow(0, r0, n)?.unsqueeze(1)?.contiguous()?;
            out.push(lp.gather(&t, 1)?.squeeze(1)?);
        }
        if targets.is_some() {
            *self.stats.lock().expect("stats") = Some(stats);
        }
        Tensor::cat(&out, 0)
    }
}

/// [`TokenStats`] of a chunk's f32 logits `[n, vocab]`, reduced on the device (only `[n]`
/// vectors come back).
fn chunk_stats(z: &Tensor, targets: &[u32]) -> Result<TokenStats> {
    let vocab = z.dim(1)? as f64;
    let m = z.max_keepdim(D::Minus1)?;
    let e = z.broadcast_sub(&m)?.exp()?;
    let s1 = e.sum_keepdim(D::Minus1)?;
    let s2 = (&e * z)?.sum_keepdim(D::Minus1)?;
    let s3 = e.sqr()?.sum_keepdim(D::Minus1)?;
    let lse = (s1.log()? + &m)?;
    let v = |t: Tensor| t.squeeze(1)?.to_vec1::<f32>();
    let entropy = v((lse - (s2 / &s1)?)?)?;
    let log_sum_sq = v((s3.log()? - (s1.log()? * 2.0)?)?)?;
    let mean_logit = v((z.sum_keepdim(D::Minus1)? / vocab)?)?;
    let argmax = z.argmax_keepdim(D::Minus1)?.squeeze(1)?.to_vec1::<u32>()?;
    let top1 = argmax.iter().zip(targets).map(|(a, t)| a == t).collect();
    Ok(TokenStats { entropy, mean_logit, top1, log_sum_sq })
}

impl Backward for Head {
    fn name(&self) -> &'static str {
        "chunked-lm-head-logps"
    }

    fn backward(&self, inputs: &[Tensor], _value: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let hidden = &inputs[0];
        let mut dh = Vec::new();
        for (r0, n) in self.chunks(hidden.dim(0)?) {
            let h = hidden.narrow(0, r0, n)?;
            let c = self.logits(&h)?;
            let g = grad.narrow(0, r0, n)?.to_dtype(DType::F32)?.unsqueeze(1)?;
            // d logp[t] / d c = onehot(t) − softmax(c)
            let p = candle_nn::ops::softmax(&c, D::Minus1)?;
            let t = self.targets.narrow(0, r0, n)?.unsqueeze(1)?.contiguous()?;
            let mut dz = p.broadcast_mul(&g.neg()?)?.scatter_add(&t, &g.contiguous()?, 1)?;
            if let Some(cap) = self.cap {
                dz = (dz * (1.0 - (c / cap)?.sqr()?)?)?;
            }
            dh.push(dz.to_dtype(h.dtype())?.matmul(&self.w)?);
        }
        Ok(vec![Some(Tensor::cat(&dh, 0)?)])
    }
}

/// The head for a trained lm_head (full fine-tuning): candle's own ops, so the graph carries
/// dW as well as dh (the whole `[rows, vocab]` logits are kept for backward).
pub fn trainable_logps(
    hidden: &Tensor,
    w: &Tensor,
    targets: &[u32],
    cap: Option<f64>,
    stats: Option<&StatsSink>,
) -> Result<Tensor> {
    let rows = hidden.dim(0)?;
    let logits = softcap(&hidden.to_dtype(DType::F32)?.matmul(&w.to_dtype(DType::F32)?.t()?)?, cap)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    let index = Tensor::new(targets, hidden.device())?.unsqueeze(1)?;
    let picked = logits.gather(&index, 1)?;
    let logps = (picked - lse)?.reshape(rows)?;
    if let Some(sink) = stats {
        *sink.lock().expect("stats sink") = Some(chunk_stats(&logits.detach(), targets)?);
    }
    Ok(logps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn chunks_give_the_composite_values_and_gradients() {
        let mut rng = crate::rng::SeededRng::new(9, crate::rng::Stream::LoraInit);
        let mut r = |n: usize| (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect::<Vec<f32>>();
        let (rows, hidden, vocab) = (7, 5, 11);
        let h = Var::from_vec(r(rows * hidden), (rows, hidden), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(r(vocab * hidden), (vocab, hidden), &Device::Cpu).unwrap();
        let probe = Tensor::from_vec(r(rows), rows, &Device::Cpu).unwrap();
        let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 3) % vocab as u32).collect();
        for cap in [None, Some(1.5)] {
            let head = Head {
                w: w.clone(),
                targets: Tensor::new(targets.as_slice(), &Device::Cpu).unwrap(),
                cap,
                chunk: 3,
                stats: Default::default(),
            };
            let chunked = attach(head.logps(&h.as_tensor().detach(), None).unwrap(), &[h.as_tensor()], head).unwrap();
            let plain = {
                let logits = softcap(&h.as_tensor().matmul(&w.t().unwrap()).unwrap(), cap).unwrap();
                let t = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap().unsqueeze(1).unwrap();
                candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().gather(&t, 1).unwrap().squeeze(1).unwrap()
            };
            let run = |lp: &Tensor| {
                let g = (lp * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (lp.to_vec1::<f32>().unwrap(), g.get(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            let (a, b) = (run(&chunked), run(&plain));
            assert!(a.0.iter().zip(&b.0).all(|(x, y)| (x - y).abs() < 1e-6), "values, cap {cap:?}");
            assert!(a.1.iter().zip(&b.1).all(|(x, y)| (x - y).abs() < 1e-6), "gradients, cap {cap:?}");
        }
    }
}
