//! AdamW with PyTorch's semantics, whose state (m, v, step) is plain data that can be saved.
//!
//! Per step `t`: `p ← p·(1 − lr·wd)`; `m ← m + (1−β₁)(g − m)`; `v ← β₂v + (1−β₂)g²`;
//! `p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)` — decoupled decay, eps outside the sqrt.
//!
//! ```
//! # use candle_core::{Device, Tensor, Var};
//! # use dpo::optim::AdamW;
//! let p = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
//! let mut opt = AdamW::new(&[p.clone()], 0.9, 0.999, 1e-8, 0.0).unwrap();
//! opt.step(std::slice::from_ref(&p), &[Tensor::new(&[1.0f32, -1.0], &Device::Cpu).unwrap()], 0.1).unwrap();
//! assert_eq!(opt.steps(), 1);
//! ```
pub mod schedule;

use anyhow::{Result, ensure};
use candle_core::{Tensor, Var};

pub struct AdamW {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: &[Var], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        Ok(Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            step: 0,
            m: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The moments, for checkpoints: `(m, v)` aligned with the parameters.
    pub fn state(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores a saved state (shapes must match the parameters).
    pub fn restore(&mut self, step: u64, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        ensure!(m.len() == self.m.len() && v.len() == self.v.len(), "optimizer state has the wrong number of tensors");
        for (new, old) in m.iter().zip(&self.m).chain(v.iter().zip(&self.v)) {
            ensure!(new.shape() == old.shape(), "optimizer state shape {:?} != {:?}", new.shape(), old.shape());
        }
        (self.step, self.m, self.v) = (step, m, v);
        Ok(())
    }

    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        ensure!(params.len() == grads.len() && params.len() == self.m.len(), "params, grads and state disagree");
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let mut value = p.as_tensor().detach();
            if self.weight_decay != 0.0 {
                value = (value * (1.0 - lr * self.weight_decay))?;
            }
            let m = (&self.m[i] + ((g - &self.m[i])? * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + self.eps)?;
            let update = (m.div(&denom)? * step_size)?;
            p.set(&(value - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_torch_adamw_by_hand() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01), p=[1.0], grads 0.5 then -0.25.
        let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(std::slice::from_ref(&p), 0.9, 0.999, 1e-8, 0.01).unwrap();
        let (mut pv, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for (t, g) in [0.5f64, -0.25].iter().enumerate() {
            opt.step(std::slice::from_ref(&p), &[Tensor::new(&[*g as f32], &Device::Cpu).unwrap()], 0.1).unwrap();
            let t = (t + 1) as i32;
            pv *= 1.0 - 0.1 * 0.01;
            m = 0.9 * m + 0.1 * g;
            v = 0.999 * v + 0.001 * g * g;
            pv -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / (v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8);
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((got - pv).abs() < 1e-6, "{got} vs {pv}");
        assert_eq!(opt.steps(), 2);
    }
}
